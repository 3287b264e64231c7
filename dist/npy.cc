#include "dist/npy.h"

#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <sstream>

namespace ringtree {

namespace {

constexpr int64_t kMaxIoBytes = int64_t{1} << 30;

}  // namespace

Result<NpyHeader> ReadNpyHeaderCollective(const Communicator& comm, const std::string& path) {
  // Rank 0 parses; the header (or the error) is broadcast as int64 fields + text.
  std::vector<int64_t> fields(64, 0);
  std::string message;
  if (comm.rank() == 0) {
    Result<NpyHeader> h = ReadNpyHeaderFile(path);
    if (!h.ok()) {
      fields[0] = static_cast<int64_t>(h.status().code());
      message = h.status().message();
    } else if (h->shape.size() > 56) {
      fields[0] = static_cast<int64_t>(StatusCode::kInvalidArgument);
      message = "[npy] " + path + ": too many dimensions";
    } else {
      fields[1] = static_cast<int64_t>(h->dtype);
      fields[2] = h->data_offset;
      fields[3] = h->file_bytes;
      fields[4] = static_cast<int64_t>(h->shape.size());
      for (size_t i = 0; i < h->shape.size(); ++i) fields[5 + i] = h->shape[i];
    }
  }
  RINGTREE_RETURN_IF_ERROR(comm.Broadcast(fields.data(), fields.size() * sizeof(int64_t), 0));
  if (fields[0] != 0) {
    RINGTREE_RETURN_IF_ERROR(comm.BroadcastString(&message, 0));
    return Status(static_cast<StatusCode>(fields[0]), message);
  }
  NpyHeader h;
  h.dtype = static_cast<DType>(fields[1]);
  h.data_offset = fields[2];
  h.file_bytes = fields[3];
  for (int64_t i = 0; i < fields[4]; ++i) h.shape.push_back(fields[5 + i]);
  return h;
}

Status ReadNpyRowsCollective(const Communicator& comm, const std::string& path, const NpyHeader& header,
                             const std::vector<std::pair<int64_t, int64_t>>& row_ranges, float* out) {
  MPI_File file = MPI_FILE_NULL;
  RINGTREE_RETURN_IF_ERROR(comm.AgreeOnStatus(MpiStatus(
      MPI_File_open(comm.handle(), path.c_str(), MPI_MODE_RDONLY, MPI_INFO_NULL, &file), "MPI_File_open " + path)));
  const int64_t rows = header.shape.empty() ? 1 : header.shape[0];
  const int64_t elem = static_cast<int64_t>(DTypeSize(header.dtype));
  const int64_t row_bytes = header.row_elements() * elem;
  Status local;
  std::vector<uint8_t> staging;
  float* dst = out;
  for (const auto& [begin, end] : row_ranges) {
    if (begin < 0 || end < begin || end > rows) {
      local = Status::InvalidArgument("[npy] " + path + ": row range [" + std::to_string(begin) + ", " +
                                      std::to_string(end) + ") out of bounds (rows " + std::to_string(rows) + ")");
      break;
    }
    const int64_t bytes = (end - begin) * row_bytes;
    const int64_t n_elem = (end - begin) * header.row_elements();
    uint8_t* target = reinterpret_cast<uint8_t*>(dst);
    if (header.dtype != DType::kFloat32) {
      staging.resize(static_cast<size_t>(bytes));
      target = staging.data();
    }
    for (int64_t off = 0; off < bytes && local.ok();) {
      const int n = static_cast<int>(std::min(kMaxIoBytes, bytes - off));
      MPI_Status st;
      local = MpiStatus(MPI_File_read_at(file, header.data_offset + begin * row_bytes + off, target + off, n, MPI_BYTE, &st),
                        "MPI_File_read_at " + path);
      int got = 0;
      if (local.ok()) MPI_Get_count(&st, MPI_BYTE, &got);
      if (local.ok() && got != n) local = Status::IoError("[npy] " + path + ": short read (file truncated?)");
      off += n;
    }
    if (!local.ok()) break;
    if (header.dtype != DType::kFloat32) ConvertToFloat32(header.dtype, staging.data(), dst, static_cast<size_t>(n_elem));
    dst += n_elem;
  }
  MPI_File_close(&file);
  return comm.AgreeOnStatus(local);
}

// ---------------------------------------------------------------------------
// NpyWriter

Result<std::unique_ptr<NpyWriter>> NpyWriter::Create(const Communicator& comm, const std::string& path,
                                                     std::vector<int64_t> shape) {
  std::unique_ptr<NpyWriter> w(new NpyWriter());
  w->comm_ = &comm;
  w->path_ = path;
  w->shape_ = std::move(shape);
  for (size_t i = 1; i < w->shape_.size(); ++i) w->row_elements_ *= w->shape_[i];
  std::string temp = path + ".tmp." + std::to_string(getpid());
  RINGTREE_RETURN_IF_ERROR(comm.BroadcastString(&temp, 0));
  w->temp_path_ = temp;
  const std::string header = EncodeNpyHeader(w->shape_);
  w->data_offset_ = static_cast<int64_t>(header.size());
  Status opened = MpiStatus(MPI_File_open(comm.handle(), temp.c_str(), MPI_MODE_CREATE | MPI_MODE_WRONLY,
                                          MPI_INFO_NULL, &w->file_),
                            "MPI_File_open " + path);
  RINGTREE_RETURN_IF_ERROR(comm.AgreeOnStatus(opened.ok() ? Status::Ok()
                                                          : Status::IoError("[npy] " + path + ": cannot create (" +
                                                                            opened.message() + ")")));
  // Collective: drop whatever a stale temporary of the same name held.
  Status wrote = MpiStatus(MPI_File_set_size(w->file_, 0), "MPI_File_set_size " + path);
  if (comm.rank() == 0 && wrote.ok()) {
    MPI_Status st;
    wrote = MpiStatus(MPI_File_write_at(w->file_, 0, header.data(), static_cast<int>(header.size()), MPI_BYTE, &st),
                      "MPI_File_write_at " + path);
  }
  Status agreed = comm.AgreeOnStatus(wrote);
  if (!agreed.ok()) {
    w->Abort();
    return agreed;
  }
  return w;
}

NpyWriter::~NpyWriter() {
  // Uncommitted: best-effort local cleanup (no collectives in a destructor).
  if (!done_) {
    if (file_ != MPI_FILE_NULL) MPI_File_close(&file_);
    if (comm_ && comm_->rank() == 0) std::remove(temp_path_.c_str());
  }
}

Status NpyWriter::WriteRows(const std::vector<std::pair<int64_t, int64_t>>& row_ranges, const float* rows) {
  const int64_t row_bytes = row_elements_ * static_cast<int64_t>(sizeof(float));
  const int64_t total_rows = shape_.empty() ? 1 : shape_[0];
  const uint8_t* src = reinterpret_cast<const uint8_t*>(rows);
  for (const auto& [begin, end] : row_ranges) {
    if (begin < 0 || end < begin || end > total_rows)
      return Status::InvalidArgument("[npy] " + path_ + ": row range out of bounds");
    const int64_t bytes = (end - begin) * row_bytes;
    for (int64_t off = 0; off < bytes;) {
      const int n = static_cast<int>(std::min(kMaxIoBytes, bytes - off));
      MPI_Status st;
      RINGTREE_RETURN_IF_ERROR(
          MpiStatus(MPI_File_write_at(file_, data_offset_ + begin * row_bytes + off, src + off, n, MPI_BYTE, &st),
                    "MPI_File_write_at " + path_));
      off += n;
    }
    src += bytes;
  }
  return Status::Ok();
}

Status NpyWriter::Commit(const Status& local) {
  Status agreed = comm_->AgreeOnStatus(local);
  if (!agreed.ok()) {
    Abort();
    return agreed;
  }
  Status closed = MpiStatus(MPI_File_close(&file_), "MPI_File_close " + path_);
  file_ = MPI_FILE_NULL;
  Status renamed;
  if (closed.ok() && comm_->rank() == 0 && std::rename(temp_path_.c_str(), path_.c_str()) != 0)
    renamed = Status::IoError("[npy] " + path_ + ": rename from " + temp_path_ + " failed (" + std::strerror(errno) + ")");
  agreed = comm_->AgreeOnStatus(closed.ok() ? renamed : closed);
  if (!agreed.ok() && comm_->rank() == 0) std::remove(temp_path_.c_str());
  done_ = true;
  return agreed;
}

void NpyWriter::Abort() {
  if (done_) return;
  if (file_ != MPI_FILE_NULL) MPI_File_close(&file_);
  file_ = MPI_FILE_NULL;
  if (comm_->rank() == 0) std::remove(temp_path_.c_str());
  done_ = true;
}

}  // namespace ringtree
