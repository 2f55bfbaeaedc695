// Internal logging: forwards to the process-wide kiln::Logger (include/kiln/logger.h).
#pragma once
#include <sstream>
#include <string>

#include "kiln/logger.h"

namespace kiln {

Logger& active_logger();
void set_active_logger(Logger* logger);  // nullptr restores the default stderr logger
void log_message(Severity s, const std::string& msg);

}  // namespace kiln

#define KILN_LOG(sev, expr)                                                 \
  do {                                                                      \
    if (::kiln::active_logger().enabled(::kiln::Severity::sev)) {           \
      std::ostringstream _kiln_os;                                          \
      _kiln_os << expr;                                                     \
      ::kiln::log_message(::kiln::Severity::sev, _kiln_os.str());           \
    }                                                                       \
  } while (0)
