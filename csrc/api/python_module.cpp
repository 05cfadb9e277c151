// Lets `import nsa_cuda._C` load the op library (running its TORCH_LIBRARY
// registrations) without any pybind11 glue. Only the Python build compiles it;
// LibTorch users link the same op library without Python (CMakeLists.txt).
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
