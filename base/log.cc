#include "base/log.h"

#include <spdlog/sinks/stdout_sinks.h>

#include <cstdlib>
#include <memory>

namespace ringtree {
namespace {

std::shared_ptr<spdlog::logger> MakeLogger() {
  auto logger = spdlog::stderr_logger_mt("ringtree");
  // Time and level, then the message (which names its component: "[attnserve] ...").
  logger->set_pattern("[%Y-%m-%d %H:%M:%S.%e] [%l] %v");
  logger->set_level(spdlog::level::info);
  logger->flush_on(spdlog::level::trace);  // diagnostics are rare: never lose one to a crash
  if (const char* level = std::getenv("RINGTREE_LOG_LEVEL"); level != nullptr && *level != '\0') {
    const spdlog::level::level_enum parsed = spdlog::level::from_str(level);
    if (parsed == spdlog::level::off && std::string(level) != "off") {
      logger->warn(
          "RINGTREE_LOG_LEVEL={}: not a level (trace, debug, info, warn, error, critical, off); "
          "using info",
          level);
    } else {
      logger->set_level(parsed);
    }
  }
  return logger;
}

}  // namespace

spdlog::logger& Logger() {
  static const std::shared_ptr<spdlog::logger> logger = MakeLogger();
  return *logger;
}

Status SetLogLevel(const std::string& level) {
  const spdlog::level::level_enum parsed = spdlog::level::from_str(level);
  if (parsed == spdlog::level::off && level != "off") {
    return Status::InvalidArgument("[log] level '" + level +
                                   "': want trace, debug, info, warn, error, critical or off");
  }
  Logger().set_level(parsed);
  return Status::Ok();
}

}  // namespace ringtree
