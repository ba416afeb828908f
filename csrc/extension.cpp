// msflow_fast._C: the Python module shell and the op library definition.
// Each op group adds its schemas with TORCH_LIBRARY_FRAGMENT in its own file,
// its CPU kernels beside them and its CUDA kernels in csrc/cuda/.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing msflow_fast._C runs the static TORCH_LIBRARY initialisers of this shared object.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace msflow_fast {

// Bumped whenever an op schema changes; msflow_fast/ops/_extension.py refuses a stale build.
constexpr int64_t kAbiVersion = 3;

int64_t abi_version() { return kAbiVersion; }

bool compiled_with_cuda() {
#ifdef MSFLOW_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace msflow_fast

TORCH_LIBRARY(msflow_fast, m) {
  m.def("compiled_with_cuda() -> bool", &msflow_fast::compiled_with_cuda);
  m.def("abi_version() -> int", &msflow_fast::abi_version);
}
