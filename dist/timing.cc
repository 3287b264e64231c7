#include "dist/timing.h"

#include <chrono>
#include <cstdio>

#include "dist/communicator.h"

namespace ringtree {

PhaseTimings& PhaseTimings::operator+=(const PhaseTimings& o) {
  compute_seconds += o.compute_seconds;
  wait_seconds += o.wait_seconds;
  merge_seconds += o.merge_seconds;
  total_seconds += o.total_seconds;
  bytes_sent += o.bytes_sent;
  bytes_received += o.bytes_received;
  steps += o.steps;
  computed_pairs += o.computed_pairs;
  skipped_pairs += o.skipped_pairs;
  transfer_polls += o.transfer_polls;
  transfer_seconds += o.transfer_seconds;
  transfers_unfinished += o.transfers_unfinished;
  return *this;
}

std::string PhaseTimings::ToString() const {
  char buf[256];
  const double pct = total_seconds > 0 ? 100.0 * wait_seconds / total_seconds : 0.0;
  std::snprintf(buf, sizeof(buf),
                "total %.4f s  compute %.4f s  wait %.4f s (%.1f%%)  merge %.4f s  sent %.2f MB  recv %.2f MB  "
                "steps %lld",
                total_seconds, compute_seconds, wait_seconds, pct, merge_seconds, bytes_sent / 1e6,
                bytes_received / 1e6, static_cast<long long>(steps));
  return buf;
}

double NowSeconds() {
  using Clock = std::chrono::steady_clock;
  return std::chrono::duration<double>(Clock::now().time_since_epoch()).count();
}

Result<std::vector<PhaseTimings>> GatherTimings(const Communicator& comm, const PhaseTimings& local, int root) {
  constexpr int kFields = 12;
  double mine[kFields] = {local.compute_seconds,
                          local.wait_seconds,
                          local.merge_seconds,
                          local.total_seconds,
                          static_cast<double>(local.bytes_sent),
                          static_cast<double>(local.bytes_received),
                          static_cast<double>(local.steps),
                          static_cast<double>(local.computed_pairs),
                          static_cast<double>(local.skipped_pairs),
                          static_cast<double>(local.transfer_polls),
                          local.transfer_seconds,
                          static_cast<double>(local.transfers_unfinished)};
  std::vector<double> all(static_cast<size_t>(comm.size()) * kFields);
  RINGTREE_RETURN_IF_ERROR(comm.Gather(mine, sizeof(mine), all.data(), root));
  std::vector<PhaseTimings> out;
  if (comm.rank() != root) return out;
  out.resize(comm.size());
  for (int r = 0; r < comm.size(); ++r) {
    const double* f = all.data() + static_cast<size_t>(r) * kFields;
    out[r].compute_seconds = f[0];
    out[r].wait_seconds = f[1];
    out[r].merge_seconds = f[2];
    out[r].total_seconds = f[3];
    out[r].bytes_sent = static_cast<int64_t>(f[4]);
    out[r].bytes_received = static_cast<int64_t>(f[5]);
    out[r].steps = static_cast<int64_t>(f[6]);
    out[r].computed_pairs = static_cast<int64_t>(f[7]);
    out[r].skipped_pairs = static_cast<int64_t>(f[8]);
    out[r].transfer_polls = static_cast<int64_t>(f[9]);
    out[r].transfer_seconds = f[10];
    out[r].transfers_unfinished = static_cast<int64_t>(f[11]);
  }
  return out;
}

}  // namespace ringtree
