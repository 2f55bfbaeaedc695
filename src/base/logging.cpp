#include "base/logging.h"

#include <atomic>
#include <cstdio>
#include <mutex>

#include "base/hash.h"

namespace kiln {

namespace {
StderrLogger& default_logger() {
  static StderrLogger l;
  return l;
}
std::atomic<Logger*> g_logger{nullptr};
std::mutex g_stderr_mu;
}  // namespace

const char* severity_name(Severity s) {
  switch (s) {
    case Severity::kInternalError: return "F";
    case Severity::kError: return "E";
    case Severity::kWarning: return "W";
    case Severity::kInfo: return "I";
    case Severity::kVerbose: return "V";
  }
  return "?";
}

void StderrLogger::log(Severity severity, const std::string& message) {
  if (!enabled(severity)) return;
  std::lock_guard<std::mutex> lock(g_stderr_mu);
  std::fprintf(stderr, "[kiln] [%s] %s\n", severity_name(severity), message.c_str());
}

Logger& active_logger() {
  Logger* l = g_logger.load(std::memory_order_acquire);
  return l ? *l : default_logger();
}
void set_active_logger(Logger* logger) { g_logger.store(logger, std::memory_order_release); }
void set_logger(Logger* logger) { set_active_logger(logger); }
Logger& get_logger() { return active_logger(); }
void log_message(Severity s, const std::string& msg) { active_logger().log(s, msg); }

std::string to_hex64(uint64_t v) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(v));
  return buf;
}
std::string Hasher::hex() const { return to_hex64(digest()); }

}  // namespace kiln
