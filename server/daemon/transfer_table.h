// What the daemon remembers about transfers, for GetTransfer / ListTransfers / CancelTransfer:
// every live transfer and the most recent finished ones (bounded).
#pragma once

#include <cstdint>
#include <deque>
#include <map>
#include <mutex>
#include <optional>
#include <vector>

#include "spectrumkv/v1/spectrumkv.pb.h"

namespace skv::daemon {

class TransferTable {
 public:
  explicit TransferTable(size_t max_finished = 4096) : max_finished_(max_finished) {}

  // Creates or replaces the record of (request_id, role); stamps `updated`.
  void Put(spectrumkv::v1::TransferInfo info);
  // Applies `update` to an existing record (no-op when absent); stamps `updated`.
  template <typename F>
  void Update(uint64_t request_id, spectrumkv::v1::TransferRole role, F&& update) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = records_.find({request_id, role});
    if (it == records_.end()) return;
    update(it->second);
    Stamp(it->second);
    RememberIfFinished(it->first, it->second);
  }
  std::vector<spectrumkv::v1::TransferInfo> Get(uint64_t request_id,
                                                spectrumkv::v1::TransferRole role) const;
  // Newest first, filtered; `offset` is the page start.
  std::vector<spectrumkv::v1::TransferInfo> List(spectrumkv::v1::TransferRole role,
                                                 spectrumkv::v1::TransferState state, size_t offset,
                                                 size_t limit, bool* more) const;

  static bool IsFinished(spectrumkv::v1::TransferState state);

 private:
  using Key = std::pair<uint64_t, spectrumkv::v1::TransferRole>;
  static void Stamp(spectrumkv::v1::TransferInfo& info);
  void RememberIfFinished(const Key& key, const spectrumkv::v1::TransferInfo& info);

  const size_t max_finished_;
  mutable std::mutex mu_;
  std::map<Key, spectrumkv::v1::TransferInfo> records_;
  std::deque<Key> finished_order_;  // oldest first; trimmed to max_finished_
};

}  // namespace skv::daemon
