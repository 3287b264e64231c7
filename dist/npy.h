// NumPy .npy files, read and written with MPI-IO so each rank touches only
// its own rows (job mode, attnjob). The format itself (headers, whole-file
// reading and writing) is dist/npy_format.h.
//
// Supported input: format version 1.0 / 2.0 / 3.0 headers, little-endian
// '<f4' (float32) or '<f2' (float16) (also '|' byte order is rejected for
// multi-byte types), C order. Output: float32, version 1.0 header (2.0 when
// the header does not fit). Arrays are treated as rows of the first
// dimension: row r = all elements with leading index r.
//
// Error messages name the file and the field, e.g.
//   "[npy] q.npy: dtype '<f8' not supported (want '<f4' or '<f2')"
//   "[npy] k.npy: fortran_order True not supported (want C order)"
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "base/status.h"
#include "dist/communicator.h"
#include "dist/npy_format.h"
#include "kernels/dtype.h"

namespace ringtree {

// Collective over `comm`: rank 0 reads and parses the header and broadcasts
// it (or the error, so every rank returns the same error).
Result<NpyHeader> ReadNpyHeaderCollective(const Communicator& comm, const std::string& path);

// Collective over `comm`: every rank reads its own leading-dimension row
// ranges [begin, end) of `path` (MPI_File_read_at, independent of other
// ranks' ranges) and converts them to float32 into `out` (ranges
// concatenated; out holds sum(lengths) * row_elements floats).
// Errors (agreed across ranks): open/read failures, ranges out of bounds.
Status ReadNpyRowsCollective(const Communicator& comm, const std::string& path,
                             const NpyHeader& header, const std::vector<std::pair<int64_t, int64_t>>& row_ranges,
                             float* out);

// Collective writer of one float32 .npy file of shape `shape`. Each rank
// writes its own leading-dimension rows. Data goes to "<path>.tmp.<pid>"
// first; Commit() renames it to `path` after every rank has written
// successfully; destroying an uncommitted writer (or Abort()) deletes the
// temporary, so no partial output file is ever left at `path`.
class NpyWriter {
 public:
  // Collective. Creates the temporary file and writes the header (rank 0).
  static Result<std::unique_ptr<NpyWriter>> Create(const Communicator& comm, const std::string& path,
                                                   std::vector<int64_t> shape);
  ~NpyWriter();
  NpyWriter(const NpyWriter&) = delete;
  NpyWriter& operator=(const NpyWriter&) = delete;

  // Not collective in MPI terms, but every rank must call it before Commit:
  // writes rows [range.first, range.second) from `rows` (concatenated per range).
  Status WriteRows(const std::vector<std::pair<int64_t, int64_t>>& row_ranges, const float* rows);
  // Collective. Agrees on `local` status of every rank; on success closes
  // and renames into place (rank 0); on any failure deletes the temporary
  // and returns the agreed error.
  Status Commit(const Status& local = Status::Ok());
  // Collective. Closes and deletes the temporary.
  void Abort();

 private:
  NpyWriter() = default;
  const Communicator* comm_ = nullptr;
  std::string path_;
  std::string temp_path_;
  std::vector<int64_t> shape_;
  int64_t data_offset_ = 0;
  int64_t row_elements_ = 1;
  MPI_File file_ = MPI_FILE_NULL;
  bool done_ = false;
};

}  // namespace ringtree
