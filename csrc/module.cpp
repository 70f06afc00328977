// The Python module init of each selfattn extension (selfattn._C and the CPU
// kernel modules selfattn._cpu_*): an empty module. Importing it runs the
// static TORCH_LIBRARY / TORCH_LIBRARY_IMPL registrations of the same .so;
// there are no pybind11 functions. TORCH_EXTENSION_NAME comes from setup.py.
#include <Python.h>

#define SELFATTN_CONCAT_(a, b) a##b
#define SELFATTN_CONCAT(a, b) SELFATTN_CONCAT_(a, b)
#define SELFATTN_STR_(a) #a
#define SELFATTN_STR(a) SELFATTN_STR_(a)

extern "C" PyMODINIT_FUNC SELFATTN_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, SELFATTN_STR(TORCH_EXTENSION_NAME), nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
