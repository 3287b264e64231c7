// NumPy .npy files: the one implementation of the format (header parsing and
// encoding, whole-file reading and writing), without MPI. Job mode's MPI-IO
// reader and writer (dist/npy.h) and the command-line client (attnctl) both
// use it. Library ringtree_npy: links ringtree_kernels only.
//
// Supported input: format version 1.0 / 2.0 / 3.0 headers, little-endian
// '<f4' (float32) or '<f2' (float16) — and '<f8' (float64, read as float32)
// where the caller allows it — C order. Output: '<f4' or '<f2', version 1.0
// header (2.0 when the header does not fit). Arrays are treated as rows of
// the first dimension: row r = all elements with leading index r. Every size
// computed from a header is checked (never wrapped).
//
// Error messages name the file and the field, e.g.
//   "[npy] q.npy: dtype '<f8' not supported (want '<f4' float32 or '<f2' float16, little-endian)"
//   "[npy] k.npy: fortran_order True not supported (want C order)"
// All functions are thread-safe (no shared state).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "base/status.h"
#include "kernels/dtype.h"

namespace ringtree {

struct NpyHeader {
  DType dtype = DType::kFloat32;  // kFloat32 or kFloat16 (kFloat32 for a '<f8' file: see float64)
  bool float64 = false;           // the file holds '<f8' (only when the parse allowed it)
  std::vector<int64_t> shape;
  int64_t data_offset = 0;  // byte offset of element 0 in the file
  int64_t file_bytes = 0;   // size of the file on disk

  int64_t elements() const;         // product of shape (1 for a 0-d array)
  int64_t row_elements() const;     // product of shape[1:] (elements per leading row)
  int64_t element_bytes() const;    // 8 for '<f8', else DTypeSize(dtype)
  std::string ShapeString() const;  // "(4, 8, 64)"
};

// Parses a header from the first bytes of a file (no I/O). `name` is used in
// messages; `file_bytes` < 0 skips the size check. Errors: bad magic,
// unsupported version, dtype, byte order, fortran order, malformed dict,
// shape that does not fit in `file_bytes` or whose byte count overflows
// int64. '<f8' is accepted only with allow_float64.
Result<NpyHeader> ParseNpyHeader(const std::string& name, const uint8_t* data, size_t size,
                                 int64_t file_bytes, bool allow_float64 = false);
// Reads and parses the header of the file at `path` (the first MiB of it).
Result<NpyHeader> ReadNpyHeaderFile(const std::string& path);
// Complete header bytes (magic, version, length, padded dict) of a C-order
// array of `shape` and `dtype` (kFloat32 or kFloat16).
std::string EncodeNpyHeader(const std::vector<int64_t>& shape, DType dtype = DType::kFloat32);

// A whole array in memory: raw little-endian elements of `dtype`.
struct NpyArray {
  DType dtype = DType::kFloat32;  // kFloat32 or kFloat16
  std::vector<int64_t> shape;
  std::string data;  // product(shape) * DTypeSize(dtype) bytes
};
// Parses a whole file's bytes ('<f4', '<f2', or '<f8' converted to float32);
// the data must be exactly what the shape needs. Any bytes are safe (fuzzed:
// fuzz/npy_fuzzer.cc).
Result<NpyArray> ParseNpyArray(const std::string& name, const std::string& contents);
// Reads the whole file at `path` (NOT_FOUND when it cannot be opened).
Result<NpyArray> ReadNpyArray(const std::string& path);
// Writes a '<f4' or '<f2' array (data as in NpyArray).
Status WriteNpyArray(const std::string& path, const NpyArray& array);

// Float32 helpers for tests and tools.
// Writes a float32 (.npy '<f4') or float16 ('<f2', converted) array.
Status WriteNpyFile(const std::string& path, const float* data, const std::vector<int64_t>& shape,
                    DType dtype = DType::kFloat32);
// Reads a whole '<f4'/'<f2' file as float32.
Status ReadNpyFile(const std::string& path, std::vector<float>* data, std::vector<int64_t>* shape);

// Reads a small 1-D integer .npy ('<i8', '<i4', '<u8', '<u4') whole, on the
// calling rank (e.g. attnjob's --doc-lengths). Errors name the file and field.
Result<std::vector<int64_t>> ReadNpyIntegers(const std::string& path);
// The same from a whole file's bytes in memory; `name` is used in messages.
// Any bytes are safe (fuzzed: fuzz/npy_fuzzer.cc).
Result<std::vector<int64_t>> ParseNpyIntegers(const std::string& name,
                                              const std::vector<uint8_t>& bytes);

}  // namespace ringtree
