// The arena planner is header-only (see arena_plan.h for why); this file keeps it compiled, with
// the project's warnings, in every build, CUDA or not.
#include "runtime/arena_plan.h"
