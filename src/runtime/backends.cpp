#include "runtime/backend.h"
#include "runtime/device_context.h"

namespace kiln {

#if !KILN_WITH_CUDA
const Backend* cuda_backend() { return nullptr; }
const DeviceRuntime* cuda_runtime() { return nullptr; }
#endif

}  // namespace kiln
