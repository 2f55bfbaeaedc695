// Kiln's logger interface (as TensorRT's ILogger). Replace it with set_logger() to route
// messages into your application; the default writes to stderr at kWarning and above.
#pragma once
#include <string>

namespace kiln {

enum class Severity { kInternalError = 0, kError = 1, kWarning = 2, kInfo = 3, kVerbose = 4 };

const char* severity_name(Severity s);

class Logger {
 public:
  virtual ~Logger() = default;
  // Called from any thread; implementations must be thread-safe.
  virtual void log(Severity severity, const std::string& message) = 0;
  // Messages less severe than this are not formatted at all.
  virtual Severity min_severity() const { return Severity::kWarning; }
  bool enabled(Severity s) const { return static_cast<int>(s) <= static_cast<int>(min_severity()); }
};

// A thread-safe logger writing "[kiln] [W] message" lines to stderr.
class StderrLogger : public Logger {
 public:
  explicit StderrLogger(Severity min = Severity::kWarning) : min_(min) {}
  void log(Severity severity, const std::string& message) override;
  Severity min_severity() const override { return min_; }
  void set_min_severity(Severity s) { min_ = s; }

 private:
  Severity min_;
};

// Installs `logger` for the whole process (not owned; must outlive its use). nullptr restores
// the default StderrLogger.
void set_logger(Logger* logger);
Logger& get_logger();

}  // namespace kiln
