// .npy files as HostTensors for the command-line client (whole file in
// memory). A thin adapter: the format itself is dist/npy_format.h, the one
// implementation job mode's MPI-IO reader uses too.
#pragma once

#include <string>

#include "base/status.h"
#include "rpc/tensor_codec.h"

namespace ringtree {

// Reads '<f4', '<f2' or '<f8' (converted to float32) arrays in C order.
// Errors name the path: "[npy] k.npy: fortran_order arrays not supported".
Result<HostTensor> ReadNpy(const std::string& path);
// The same from a whole file's bytes already in memory; `name` is used in
// messages. Any bytes are safe (fuzzed: fuzz/npy_fuzzer.cc).
Result<HostTensor> ParseNpy(const std::string& name, const std::string& contents);

// Writes a float32 or float16 tensor ('<f4' / '<f2'); bfloat16 is written as
// float32 (NumPy has no bfloat16).
Status WriteNpy(const std::string& path, const HostTensor& tensor);

}  // namespace ringtree
