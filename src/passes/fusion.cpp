#include "passes/fusion.h"

namespace kiln {

Status run_fusion_passes(Graph& g, const FusionOptions& opts, PassStats* stats) {
  (void)g;
  (void)opts;
  (void)stats;
  return Status::ok();
}

}  // namespace kiln
