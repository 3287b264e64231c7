// Fuzzes opening a span store from arbitrary on-disk bytes
// (worker/spans: DecodeManifest, SpanStore::Open's recovery of the committed
// records and of the log tail, then reading every span back).
//
// Input: 1 flags byte, a little-endian uint32 manifest length M, M manifest
// bytes, and the rest is spans.dat. With flags bit 0 set, the harness seals
// the checksums first (it appends the manifest's trailing checksum and
// re-seals each record it can walk in spans.dat), so the fuzzer reaches the
// structural checks behind them; with it clear the bytes are used as given.
// The files live in a private directory under /dev/shm (or $TMPDIR).
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>

#include "worker/spans/span_format.h"
#include "worker/spans/span_store.h"

namespace {

// Never destroyed: the atexit handler that removes it runs after static destructors.
const std::string& Dir() {
  static const std::string* dir = [] {
    const char* base =
        std::filesystem::is_directory("/dev/shm") ? "/dev/shm" : std::getenv("TMPDIR");
    auto* pattern =
        new std::string(std::string(base ? base : "/tmp") + "/ringtree_span_fuzz.XXXXXX");
    if (::mkdtemp(pattern->data()) == nullptr) std::abort();
    std::atexit([] { std::filesystem::remove_all(Dir()); });
    return pattern;
  }();
  return *dir;
}

void WriteFile(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// Re-seals every record reachable by walking spans.dat from offset 0.
void SealRecords(std::string* file) {
  uint64_t offset = 0;
  while (file->size() - offset >= sizeof(ringtree::RecordHeader)) {
    ringtree::RecordHeader h;
    std::memcpy(&h, file->data() + offset, sizeof(h));
    const uint64_t left = file->size() - offset - sizeof(h);
    if (h.payload_bytes > left || h.summary_bytes > left - h.payload_bytes) break;
    char* payload = file->data() + offset + sizeof(h);
    ringtree::SealRecordHeader(&h, payload + h.payload_bytes, payload);
    std::memcpy(file->data() + offset, &h, sizeof(h));
    offset += sizeof(h) + h.payload_bytes + h.summary_bytes;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 5) return 0;
  const bool seal = data[0] & 1;
  uint32_t manifest_bytes;
  std::memcpy(&manifest_bytes, data + 1, 4);
  data += 5;
  size -= 5;
  manifest_bytes = static_cast<uint32_t>(std::min<size_t>(manifest_bytes, size));
  std::string manifest(reinterpret_cast<const char*>(data), manifest_bytes);
  std::string spans(reinterpret_cast<const char*>(data) + manifest_bytes, size - manifest_bytes);
  if (seal) {
    const uint64_t checksum = ringtree::Checksum64(manifest.data(), manifest.size());
    manifest.append(reinterpret_cast<const char*>(&checksum), sizeof(checksum));
    SealRecords(&spans);
  }

  // The manifest parser alone.
  auto decoded = ringtree::DecodeManifest(manifest, "MANIFEST");
  (void)decoded;

  // The whole open + recovery, then every span read back.
  const std::string& dir = Dir();
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(dir, ec))
    std::filesystem::remove_all(e.path(), ec);
  WriteFile(dir + "/MANIFEST", manifest);
  WriteFile(dir + "/spans.dat", spans);
  ringtree::SpanStoreOptions options;
  options.data_dir = dir;
  options.cache_budget_bytes = size_t{1} << 20;
  ringtree::RecoveryReport report;
  auto store = ringtree::SpanStore::Open(options, &report);
  if (!store.ok()) return 0;
  (void)store.value()->VerifyAll();
  (void)store.value()->ForEachChunk(
      [](const void*, const void*, int64_t, int64_t) { return ringtree::Status::Ok(); });
  (void)store.value()->Spans();
  return 0;
}
