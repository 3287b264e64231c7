// Diagnostic logging for library code (coordinator/, worker/, dist/), on
// spdlog: one process-wide logger writing to stderr. The user-facing output
// of the command-line tools and benchmarks (tables, results) stays on
// stdout/printf; this is for what an operator reads in a server's log.
//
// Level: the environment variable RINGTREE_LOG_LEVEL (trace, debug, info,
// warn, error, critical or off; default info), read once at the first log
// call, or SetLogLevel (e.g. from a command-line flag). Thread-safe.
//
//   LogWarn("[attnserve] rank {}: dropped {} torn tail bytes", rank, bytes);
#pragma once

#include <spdlog/spdlog.h>

#include <string>
#include <utility>

#include "base/status.h"

namespace ringtree {

// The logger (created on first use). Thread-safe.
spdlog::logger& Logger();
// Sets the level by name (as RINGTREE_LOG_LEVEL). Errors: INVALID_ARGUMENT
// naming the value.
Status SetLogLevel(const std::string& level);

template <typename... Args>
void LogDebug(spdlog::format_string_t<Args...> format, Args&&... args) {
  Logger().debug(format, std::forward<Args>(args)...);
}
template <typename... Args>
void LogInfo(spdlog::format_string_t<Args...> format, Args&&... args) {
  Logger().info(format, std::forward<Args>(args)...);
}
template <typename... Args>
void LogWarn(spdlog::format_string_t<Args...> format, Args&&... args) {
  Logger().warn(format, std::forward<Args>(args)...);
}
template <typename... Args>
void LogError(spdlog::format_string_t<Args...> format, Args&&... args) {
  Logger().error(format, std::forward<Args>(args)...);
}

}  // namespace ringtree
