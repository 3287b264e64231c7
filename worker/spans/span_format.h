// On-disk formats of the span store: span records (append-only span file) and
// the manifest. Both are checksummed with XXH3-64 (libxxhash).
//
// Span record (little-endian; the file "spans.dat" is a sequence of records):
//   RecordHeader (72 bytes)                      -- covered by header_checksum
//   payload      k [tokens, kv_heads, head_dim] then v [tokens, kv_heads, head_dim]
//                in the store's dtype          -- covered by payload_checksum
//   summary      kv_heads * 4 * head_dim float32 -- covered by header_checksum
//                per kv head the keys' [max[D] | min[D] | mean[D]], then per
//                kv head the values' mean[D]
// Version 2 added the value means; version 3 moved the summary after the
// payload, so reading a span's K/V is one contiguous header+payload range (the
// summary is ~20% of a span-16 record and is in RAM anyway). Records of other
// versions are refused at open, never read with the wrong layout.
// The header and summary are verified when a store is opened (the summaries are
// the in-RAM index); the payload is verified every time it is read from disk.
//
// Manifest ("MANIFEST"): the durable checkpoint of a store: the structural
// options, the committed length of spans.dat, and per span its position range
// and record location. Written to "MANIFEST.tmp", fsync'ed, renamed over
// "MANIFEST", then the directory is fsync'ed, so a crash leaves either the old
// or the new manifest, never a torn one.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "base/file_util.h"  // WriteFileAtomically, ReadWholeFile: used with the format
#include "base/status.h"
#include "kernels/dtype.h"

namespace ringtree {

inline constexpr uint32_t kSpanRecordMagic = 0x50535452;  // "RTSP"
inline constexpr uint16_t kSpanRecordVersion = 3;
inline constexpr uint32_t kManifestMagic = 0x4d535452;  // "RTSM"
inline constexpr uint32_t kManifestVersion = 2;  // 1 is still read (generation 0)

// RecordHeader::flags: the span ended at a discovered boundary (an append
// with span_starts), not at a multiple of span_tokens, so Open() keeps it
// sealed. Older records have 0 there (the byte was reserved), so they open
// as before.
inline constexpr uint8_t kRecordClosed = 1;

#pragma pack(push, 1)
struct RecordHeader {
  uint32_t magic = kSpanRecordMagic;
  uint16_t version = kSpanRecordVersion;
  uint16_t header_bytes = sizeof(RecordHeader);
  uint64_t span_index = 0;      // index of the span in its store (append order)
  int64_t position_start = 0;   // absolute position of the span's first token
  uint32_t tokens = 0;          // tokens in this record (a tail span may be partial)
  uint32_t kv_heads = 0;
  uint32_t head_dim = 0;
  uint8_t dtype = 0;            // DType
  uint8_t flags = 0;            // kRecordClosed; 0 in records written before flags existed
  uint8_t reserved[2] = {0, 0};
  uint64_t summary_bytes = 0;
  uint64_t payload_bytes = 0;
  uint64_t payload_checksum = 0;  // XXH3-64 of the payload
  uint64_t header_checksum = 0;   // XXH3-64 of the header bytes before this field + summary
};
#pragma pack(pop)
static_assert(sizeof(RecordHeader) == 72, "RecordHeader must be 72 bytes");

// XXH3-64 of `bytes` bytes (seed 0).
uint64_t Checksum64(const void* data, size_t bytes);
// XXH3-64 of the concatenation a ++ b, without copying.
uint64_t Checksum64Pair(const void* a, size_t a_bytes, const void* b, size_t b_bytes);

// Fills header.header_checksum / payload_checksum for the given summary/payload.
void SealRecordHeader(RecordHeader* header, const void* summary, const void* payload);

// Verifies magic, version, sizes and header checksum. `where` names the
// location for messages, e.g. "/data/s1/spans.dat@4096". Returns DataLoss.
Status VerifyRecordHeader(const RecordHeader& header, const void* summary, const std::string& where);
// Same, with the summary given as two consecutive parts (a_bytes + b_bytes
// must equal header.summary_bytes).
Status VerifyRecordHeaderSplit(const RecordHeader& header, const void* summary_a, size_t a_bytes,
                               const void* summary_b, size_t b_bytes, const std::string& where);

// Per-span entry in the manifest.
struct ManifestSpan {
  int64_t position_start = 0;
  uint32_t tokens = 0;
  uint64_t record_offset = 0;  // offset of the record in spans.dat
  uint64_t record_bytes = 0;
};

struct Manifest {
  // Structural options (fixed at creation).
  int32_t kv_heads = 0;
  int32_t head_dim = 0;
  DType dtype = DType::kFloat32;
  int32_t span_tokens = 0;
  int64_t sink_tokens = 0;
  int64_t window_tokens = 0;
  // Length of spans.dat covered by this manifest; bytes beyond it are a log
  // tail that recovery scans (replays whole valid records, drops a torn one).
  uint64_t committed_file_bytes = 0;
  // Which span file the offsets refer to: 0 is "spans.dat", g > 0 is
  // "spans.<g>.dat". Compaction writes the live records to the next
  // generation's file and commits by writing the manifest (version 2;
  // version-1 manifests have no field and mean generation 0).
  uint32_t file_generation = 0;
  std::vector<ManifestSpan> spans;
};

// The span file name of a generation: "spans.dat" or "spans.<g>.dat".
std::string SpanFileName(uint32_t generation);
// True for names SpanFileName can produce (the engine sums their sizes).
bool IsSpanFileName(const std::string& name);

// Serialises with a trailing XXH3-64 checksum.
std::string EncodeManifest(const Manifest& manifest);
// Parses and verifies; DataLoss naming `path` on any mismatch.
Result<Manifest> DecodeManifest(const std::string& bytes, const std::string& path);

// A checksummed record log (the engine's write-ahead log, rank 0's session
// journal): each record is `magic` (u32), the payload's bytes (u32), the
// payload's XXH3-64 (u64), then the payload.
// Appends one record to `fd` (whose records end at `size_before`) and
// fdatasyncs it; *appended: the record's bytes. A failed write is cut back
// off the file; *reopen is set when the file's state is unknown (failed sync,
// or a cut that failed): the caller closes it and reopens.
//   allocated == nullptr: `fd` is open with O_APPEND and `size_before` long.
//   Otherwise (preallocated): `fd` is open without O_APPEND, *allocated is
//   the file's length (zeros after size_before); the record is written in
//   place, and when it does not fit the file first grows by
//   kLogPreallocateBytes of zeros (written and synced). A record's sync then
//   writes data only, no metadata: on ext4 it takes about half as long
//   (2026-11-30, this VM: 200 against 400 us) and concurrent syncs of
//   several logs no longer queue behind each other's journal commits.
//   Readers see the zeros as the end of the log (ForEachLogRecord).
// Errors: IO_ERROR naming `path`.
Status AppendLogRecord(int fd, uint32_t magic, const std::string& payload, int64_t size_before,
                       const std::string& path, int64_t* appended, bool* reopen,
                       int64_t* allocated = nullptr);
constexpr int64_t kLogPreallocateBytes = int64_t{2} << 20;
// Opens (creating) the log at `path` for AppendLogRecord's preallocated
// mode: cuts it to its valid prefix (dropping a preallocated or torn tail,
// synced) and returns the fd; *end: the prefix's length (size_before and
// *allocated for the next record). *created: the file did not exist (its
// directory entry is then the caller's to sync). Errors: IO_ERROR naming it.
Result<int> OpenLogForAppend(const std::string& path, uint32_t magic, int64_t* end, bool* created);
// True when log[from, end) is all zero bytes (a preallocated tail, not a torn record).
bool IsZeroTail(const std::string& log, size_t from);
// The bytes AppendLogRecord writes for one record (to write a whole log at
// once, e.g. with WriteFileAtomically).
std::string FrameLogRecord(uint32_t magic, const std::string& payload);
// Calls visit(payload, bytes) for each whole record with a valid checksum,
// in order, stopping at the first that is not (a torn tail). Returns the
// length of that valid prefix, or visit's first error. A torn tail is the
// log's last record: records are appended one at a time, each synced before
// the next is written. So an invalid record followed by a whole valid one
// is corruption, not a crash, and dropping it would drop acknowledged
// records after it: DATA_LOSS naming `path` and both offsets.
Result<size_t> ForEachLogRecord(
    const std::string& log, uint32_t magic,
    const std::function<Status(const char* payload, uint32_t bytes)>& visit,
    const std::string& path = "");

}  // namespace ringtree
