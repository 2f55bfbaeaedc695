// Shared set-up for the libFuzzer targets: quiet logging and a tight memory limit so that a
// hostile size is refused by Kiln's own checks (kOutOfMemory) instead of tripping the fuzzer's
// RSS limit.
#pragma once
#include <cstdint>

#include "kiln/logger.h"
#include "kiln/tensor.h"

namespace kiln_fuzz {

class NullLogger : public kiln::Logger {
 public:
  void log(kiln::Severity, const std::string&) override {}
  kiln::Severity min_severity() const override { return kiln::Severity::kInternalError; }
};

inline void init() {
  static NullLogger logger;
  kiln::set_logger(&logger);
  kiln::set_memory_limit(uint64_t{256} << 20);
}

}  // namespace kiln_fuzz
