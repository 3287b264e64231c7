// SpanRecordFile: the span store's durable part. Owns the append-only span
// file (<data_dir>/spans.dat, or spans.<g>.dat after compactions) of
// checksummed records (span_format.h), its file descriptor, the MANIFEST, and
// per span where its latest record is. Does recovery at open, compaction,
// verified reads of cold records, and the scrub.
//
// Invariants: every record a location names is whole and verified (header +
// summary at open, or written by this process); file_bytes() is the end of
// the last whole record; the manifest on disk names a file generation whose
// file holds every record it lists (a crash leaves the old or the new
// generation, never a mix). The summaries in a record are the index's
// (SpanIndex), byte for byte: reads verify a header checksum against them.
//
// Without a data_dir the object is inert: enabled() is false, nothing is
// written, Sync is a no-op.
//
// Threading: no lock. Const methods (reads, VerifyAll) only pread the file and
// may run concurrently with each other; mutators (Write, Sync, Truncate,
// Recover, DropPageCache) need exclusive access (SpanStore's mutator contract).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "base/status.h"
#include "worker/spans/span_format.h"
#include "worker/spans/span_index.h"
#include "worker/spans/span_types.h"

namespace ringtree {

class SpanRecordFile {
 public:
  // Where a span's latest record is (persisted_tokens == 0: none yet).
  struct Location {
    uint64_t offset = 0;
    uint64_t bytes = 0;
    int32_t persisted_tokens = 0;
  };
  // One cold read: span `span`'s K into k and V into v (tokens * row bytes each).
  struct ColdRead {
    int64_t span;
    uint8_t* k;
    uint8_t* v;
  };

  // options: validated; the structural fields are written into the manifest.
  SpanRecordFile(const SpanStoreOptions& options, const SpanIndex& index);
  ~SpanRecordFile();
  SpanRecordFile(const SpanRecordFile&) = delete;
  SpanRecordFile& operator=(const SpanRecordFile&) = delete;

  bool enabled() const { return !data_dir_.empty(); }

  // Creates generation 0's empty file (truncating one left over).
  Status Create();
  // Opens the manifest's generation and recovers (see SpanStore::Open): checks
  // every committed record's header + summary, replays the whole valid records
  // past the committed length, truncates the file at the first torn/invalid
  // one. Restores the spans into `index` (sealed; the caller runs
  // index->FinishRecovery()). `report` must not be null.
  Status Open(const Manifest& manifest, SpanIndex* index, RecoveryReport* report);

  // Appends a record of span `span` (index entry + summaries; k, v the span's
  // rows, tokens * row bytes each) and points the span's location at it.
  Status Write(int64_t span, const uint8_t* k, const uint8_t* v);
  // fdatasync + manifest; compacts first when the dead bytes exceed both
  // compact_min_bytes and the live bytes. Returns true when it compacted (the
  // caller then drops cache entries keyed by the old offsets).
  Result<bool> Sync();
  // Keeps the locations of the first `count` spans (the rest become dead bytes).
  void Truncate(int64_t count);

  // Reads and verifies the records of `count` cold spans; records adjacent in
  // the file are read with one preadv per run. DATA_LOSS naming file@offset on
  // a short read or a checksum / size / identity mismatch; the destination
  // bytes are then not to be used.
  Status ReadCold(const ColdRead* reads, size_t count) const;
  // posix_fadvise(WILLNEED) on a span's header + payload (sparse reads).
  void AdviseWillNeed(int64_t span) const;
  // Reads and verifies every record (scrub).
  Status VerifyAll() const;
  // fdatasync + POSIX_FADV_DONTNEED on the file (benchmarks).
  Status DropPageCache();

  const Location& location(int64_t span) const { return locations_[span]; }
  bool persisted(int64_t span) const {
    return span < int64_t(locations_.size()) &&
           locations_[span].persisted_tokens == index_.span(span).tokens;
  }
  const std::string& path() const { return path_; }
  uint32_t generation() const { return generation_; }
  uint64_t file_bytes() const { return file_bytes_; }
  size_t live_bytes() const;  // bytes of the records the spans use
  int64_t compactions() const { return compactions_; }

 private:
  Status OpenFile(bool create);
  Status WriteManifest();
  Status Compact();
  size_t row_bytes() const;

  const SpanStoreOptions options_;  // structural fields + data_dir, compact_min_bytes
  const std::string data_dir_;
  const SpanIndex& index_;
  std::string path_;
  uint32_t generation_ = 0;
  int64_t compactions_ = 0;
  int fd_ = -1;
  uint64_t file_bytes_ = 0;
  std::vector<Location> locations_;  // per span of index_ (shorter while unwritten)
};

}  // namespace ringtree
