// Status and Result<T>: the project's one error model (leveldb/Arrow style).
// Cheap when OK. Converted to grpc::Status only at the RPC edge and to an
// exit code only in main(). Messages start with the operation's name and name
// the offending field: "[attnjob] q.npy: dtype '<f8' not supported".
#pragma once

#include <optional>
#include <string>
#include <utility>
#include <variant>

namespace ringtree {

enum class StatusCode {
  kOk = 0,
  kInvalidArgument,
  kNotFound,
  kFailedPrecondition,
  kResourceExhausted,
  kDeadlineExceeded,
  kUnavailable,
  kDataLoss,  // corrupt or torn record on disk
  kIoError,
  kInternal,
  kCancelled,
  kAlreadyExists,
  kUnauthenticated,  // no or unknown credentials (the RPC edge)
};

const char* StatusCodeName(StatusCode code);

class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}
  static Status Ok() { return {}; }
  static Status InvalidArgument(std::string m) {
    return {StatusCode::kInvalidArgument, std::move(m)};
  }
  static Status NotFound(std::string m) { return {StatusCode::kNotFound, std::move(m)}; }
  static Status FailedPrecondition(std::string m) {
    return {StatusCode::kFailedPrecondition, std::move(m)};
  }
  static Status ResourceExhausted(std::string m) {
    return {StatusCode::kResourceExhausted, std::move(m)};
  }
  static Status DeadlineExceeded(std::string m) {
    return {StatusCode::kDeadlineExceeded, std::move(m)};
  }
  static Status Unavailable(std::string m) { return {StatusCode::kUnavailable, std::move(m)}; }
  static Status DataLoss(std::string m) { return {StatusCode::kDataLoss, std::move(m)}; }
  static Status IoError(std::string m) { return {StatusCode::kIoError, std::move(m)}; }
  static Status Internal(std::string m) { return {StatusCode::kInternal, std::move(m)}; }
  static Status Cancelled(std::string m) { return {StatusCode::kCancelled, std::move(m)}; }
  static Status AlreadyExists(std::string m) { return {StatusCode::kAlreadyExists, std::move(m)}; }
  static Status Unauthenticated(std::string m) {
    return {StatusCode::kUnauthenticated, std::move(m)};
  }

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }
  // "INVALID_ARGUMENT: message" (or "OK").
  std::string ToString() const;

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

// Either a value or a non-OK Status.
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : value_(std::move(value)) {}          // NOLINT(implicit)
  Result(Status status) : status_(std::move(status)) {}  // NOLINT(implicit)
  bool ok() const { return status_.ok(); }
  const Status& status() const { return status_; }
  T& value() & { return *value_; }
  const T& value() const& { return *value_; }
  T&& value() && { return std::move(*value_); }
  T* operator->() { return &*value_; }
  const T* operator->() const { return &*value_; }
  T& operator*() { return *value_; }

 private:
  Status status_;
  std::optional<T> value_;
};

#define RINGTREE_RETURN_IF_ERROR(expr) \
  do {                                 \
    ::ringtree::Status _st = (expr);   \
    if (!_st.ok()) return _st;         \
  } while (0)

#define RINGTREE_CONCAT_INNER(a, b) a##b
#define RINGTREE_CONCAT(a, b) RINGTREE_CONCAT_INNER(a, b)
#define RINGTREE_ASSIGN_OR_RETURN(lhs, expr)                                                    \
  auto RINGTREE_CONCAT(_res_, __LINE__) = (expr);                                               \
  if (!RINGTREE_CONCAT(_res_, __LINE__).ok()) return RINGTREE_CONCAT(_res_, __LINE__).status(); \
  lhs = std::move(RINGTREE_CONCAT(_res_, __LINE__)).value()

}  // namespace ringtree
