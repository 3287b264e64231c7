// Fuzzes the engine's command decoding (worker/engine/command.cc): every rank
// decodes the bytes rank 0 sends. Whatever decodes must encode again to bytes
// that decode.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "worker/engine/command.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string bytes(reinterpret_cast<const char*>(data), size);
  auto command = ringtree::DecodeCommand(bytes);
  if (!command.ok()) return 0;
  const std::string again = ringtree::EncodeCommand(command.value());
  if (again.size() != bytes.size()) std::abort();
  if (!ringtree::DecodeCommand(again).ok()) std::abort();
  return 0;
}
