// The stages of the send path, each with one job, so the pipeline in daemon_send.cc only wires
// them together: the rate estimates the passthrough decision rests on, the decision itself
// (DESIGN 3.7), and the encoder that runs ahead of the wire.
#pragma once

#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "spectrumkv/v1/spectrumkv.pb.h"

namespace skv::daemon {

namespace v1 = ::spectrumkv::v1;

// Exponential moving averages of throughputs (bytes per second), one per key (a peer address, or
// "codec"). Thread-safe. Unknown keys read 0: no estimate yet.
class RateEstimator {
 public:
  // Weight of a new sample: recent transfers count most, one outlier does not flip decisions.
  static constexpr double kNewSampleWeight = 0.3;

  // Folds in `bytes` moved in `seconds` (ignored unless both are positive); returns the estimate.
  double Observe(const std::string& key, double bytes, double seconds);
  double Get(const std::string& key) const;

 private:
  mutable std::mutex mu_;
  std::map<std::string, double> rates_ ABSL_GUARDED_BY(mu_);
};

// Whether to send FP16 rows instead of encoding: forced by the request, implied by budget >= 1,
// or chosen when the link is fast enough that raw rows arrive before encoded ones would (the
// slower of encode+decode and the compressed rows' link time, which overlap layer by layer).
// With no estimate yet for either rate, the codec runs (its first transfer measures both).
// Fills reason, passthrough, planned_budget and the two rates it used.
v1::PassthroughDecision ChoosePassthrough(v1::PassthroughMode mode, double budget,
                                          uint64_t raw_bytes, double link_bytes_per_second,
                                          double codec_bytes_per_second);
inline v1::PassthroughDecision ChoosePassthrough(const v1::SendRequest& request, uint64_t raw_bytes,
                                                 double link_bytes_per_second,
                                                 double codec_bytes_per_second) {
  return ChoosePassthrough(request.passthrough(), request.budget(), raw_bytes,
                           link_bytes_per_second, codec_bytes_per_second);
}

// Runs `encode(i)` for i = 0 .. count-1 on `threads` threads, at most `window` items ahead of
// the consumer, and hands the results out in order: the wire sends item i while items
// i+1 .. i+window encode. The first error stops the encoding and is what Next() returns from
// then on. Destroying the encoder stops and joins its threads (items in flight finish first).
template <typename Item>
class OrderedEncoder {
 public:
  using EncodeFn = std::function<absl::StatusOr<Item>(size_t index)>;

  OrderedEncoder(size_t count, unsigned threads, size_t window, EncodeFn encode)
      : count_(count),
        window_(std::max<size_t>(window, 1)),
        encode_(std::move(encode)),
        slots_(count) {
    const unsigned n = std::clamp<unsigned>(threads, 1, unsigned(std::max<size_t>(count, 1)));
    for (unsigned i = 0; i < n; ++i) {
      try {
        threads_.emplace_back([this] { Work(); });
      } catch (const std::system_error&) {
        break;  // no more threads to be had: the ones running share all the work
      }
    }
    if (threads_.empty()) error_ = absl::ResourceExhaustedError("no thread to encode on");
  }
  OrderedEncoder(const OrderedEncoder&) = delete;
  OrderedEncoder& operator=(const OrderedEncoder&) = delete;
  ~OrderedEncoder() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    for (std::thread& t : threads_) t.join();
  }

  // The next item in order (blocks until it is encoded), or the first error. Call at most
  // `count` times.
  absl::StatusOr<Item> Next() {
    std::unique_lock<std::mutex> lock(mu_);
    if (consumed_ == count_) return absl::OutOfRangeError("every item was handed out");
    cv_.wait(lock, [&] { return !error_.ok() || slots_[consumed_].has_value(); });
    if (!error_.ok()) return error_;
    Item item = std::move(*slots_[consumed_]);
    slots_[consumed_].reset();
    ++consumed_;
    lock.unlock();
    cv_.notify_all();  // a window slot is free
    return item;
  }

 private:
  void Work() {
    std::unique_lock<std::mutex> lock(mu_);
    while (true) {
      cv_.wait(lock, [&] {
        return stopping_ || !error_.ok() || next_ == count_ || next_ < consumed_ + window_;
      });
      if (stopping_ || !error_.ok() || next_ == count_) return;
      const size_t index = next_++;
      lock.unlock();
      absl::StatusOr<Item> item = encode_(index);
      lock.lock();
      if (item.ok()) {
        slots_[index].emplace(*std::move(item));
      } else if (error_.ok()) {
        error_ = item.status();
      }
      cv_.notify_all();
    }
  }

  const size_t count_;
  const size_t window_;
  const EncodeFn encode_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::optional<Item>> slots_ ABSL_GUARDED_BY(mu_);
  size_t next_ ABSL_GUARDED_BY(mu_) = 0;      // next index to encode
  size_t consumed_ ABSL_GUARDED_BY(mu_) = 0;  // items handed out
  absl::Status error_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

}  // namespace skv::daemon
