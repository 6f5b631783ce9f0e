#include "transfer_table.h"

#include <algorithm>

#include "google/protobuf/util/time_util.h"

namespace skv::daemon {

using spectrumkv::v1::TransferInfo;
using spectrumkv::v1::TransferRole;
using spectrumkv::v1::TransferState;

bool TransferTable::IsFinished(TransferState state) {
  return state == spectrumkv::v1::TRANSFER_STATE_COMMITTED ||
         state == spectrumkv::v1::TRANSFER_STATE_FAILED ||
         state == spectrumkv::v1::TRANSFER_STATE_CANCELLED ||
         state == spectrumkv::v1::TRANSFER_STATE_EXPIRED;
}

void TransferTable::Stamp(TransferInfo& info) {
  *info.mutable_updated() = google::protobuf::util::TimeUtil::GetCurrentTime();
  if (!info.has_created()) *info.mutable_created() = info.updated();
}

void TransferTable::RememberIfFinished(const Key& key, const TransferInfo& info) {
  if (!IsFinished(info.state())) return;
  if (std::find(finished_order_.begin(), finished_order_.end(), key) != finished_order_.end())
    return;
  finished_order_.push_back(key);
  while (finished_order_.size() > max_finished_) {
    records_.erase(finished_order_.front());
    finished_order_.pop_front();
  }
}

void TransferTable::Put(TransferInfo info) {
  std::lock_guard<std::mutex> lock(mu_);
  const Key key{info.request_id(), info.role()};
  // A new transfer reusing a finished one's id replaces it.
  finished_order_.erase(std::remove(finished_order_.begin(), finished_order_.end(), key),
                        finished_order_.end());
  Stamp(info);
  auto& slot = records_[key];
  slot = std::move(info);
  RememberIfFinished(key, slot);
}

std::vector<TransferInfo> TransferTable::Get(uint64_t request_id, TransferRole role) const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<TransferInfo> out;
  for (TransferRole r :
       {spectrumkv::v1::TRANSFER_ROLE_SENDER, spectrumkv::v1::TRANSFER_ROLE_RECEIVER}) {
    if (role != spectrumkv::v1::TRANSFER_ROLE_UNSPECIFIED && role != r) continue;
    auto it = records_.find({request_id, r});
    if (it != records_.end()) out.push_back(it->second);
  }
  return out;
}

std::vector<TransferInfo> TransferTable::List(TransferRole role, TransferState state, size_t offset,
                                              size_t limit, bool* more) const {
  std::vector<TransferInfo> all;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [key, info] : records_) {
      if (role != spectrumkv::v1::TRANSFER_ROLE_UNSPECIFIED && info.role() != role) continue;
      if (state != spectrumkv::v1::TRANSFER_STATE_UNSPECIFIED && info.state() != state) continue;
      all.push_back(info);
    }
  }
  std::sort(all.begin(), all.end(), [](const TransferInfo& a, const TransferInfo& b) {
    if (a.created().seconds() != b.created().seconds())
      return a.created().seconds() > b.created().seconds();
    if (a.created().nanos() != b.created().nanos())
      return a.created().nanos() > b.created().nanos();
    return a.request_id() > b.request_id();
  });
  *more = all.size() > offset + limit;
  if (offset >= all.size()) return {};
  return {all.begin() + offset, all.begin() + std::min(all.size(), offset + limit)};
}

}  // namespace skv::daemon
