#include "base/file_util.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include "base/file_sync.h"

namespace ringtree {

namespace {
Status Errno(const std::string& op, const std::string& path) {
  return Status::IoError("[spans] " + op + " " + path + ": " + std::strerror(errno));
}
}  // namespace

Status WriteFileAtomically(const std::string& dir, const std::string& name,
                           const std::string& bytes) {
  const std::string tmp = dir + "/" + name + ".tmp";
  const std::string final_path = dir + "/" + name;
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return Errno("open", tmp);
  size_t done = 0;
  while (done < bytes.size()) {
    ssize_t n = WriteFile(fd, bytes.data() + done, bytes.size() - done, tmp);
    if (n < 0) {
      if (errno == EINTR) continue;
      Status st = Errno("write", tmp);
      ::close(fd);
      return st;
    }
    done += static_cast<size_t>(n);
  }
  if (SyncFile(fd) != 0) {
    Status st = Errno("fsync", tmp);
    ::close(fd);
    return st;
  }
  ::close(fd);
  if (::rename(tmp.c_str(), final_path.c_str()) != 0) return Errno("rename", tmp);
  return SyncDirectory(dir);
}

Status SyncDirectory(const std::string& dir) {
  int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) return Errno("open", dir);
  if (SyncFile(dfd) != 0) {
    Status st = Errno("fsync", dir);
    ::close(dfd);
    return st;
  }
  ::close(dfd);
  return Status::Ok();
}

Status CreateDirectoriesDurably(const std::string& dir) {
  std::filesystem::path path = std::filesystem::path(dir).lexically_normal();
  if (!path.has_filename()) path = path.parent_path();  // trailing slash
  std::error_code ec;
  if (path.empty() || std::filesystem::is_directory(path, ec)) return Status::Ok();
  const std::filesystem::path parent = path.parent_path();
  if (!parent.empty()) RINGTREE_RETURN_IF_ERROR(CreateDirectoriesDurably(parent.string()));
  if (::mkdir(path.c_str(), 0755) != 0 && errno != EEXIST) return Errno("mkdir", path.string());
  return SyncDirectory(parent.empty() ? "." : parent.string());
}

Status RemoveAllDurably(const std::string& path) {
  std::error_code ec;
  std::filesystem::remove_all(path, ec);
  if (ec) return Status::IoError("[spans] remove " + path + ": " + ec.message());
  const std::filesystem::path parent = std::filesystem::path(path).lexically_normal().parent_path();
  if (!std::filesystem::is_directory(parent, ec)) return Status::Ok();
  return SyncDirectory(parent.string());
}

Result<std::string> ReadWholeFile(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return Status::NotFound("[spans] " + path + ": no such file");
    return Errno("open", path);
  }
  std::string out;
  char buf[1 << 16];
  while (true) {
    ssize_t n = ::read(fd, buf, sizeof(buf));
    if (n < 0) {
      if (errno == EINTR) continue;
      Status st = Errno("read", path);
      ::close(fd);
      return st;
    }
    if (n == 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  return out;
}

}  // namespace ringtree
