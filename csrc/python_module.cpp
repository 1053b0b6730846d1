// Makes `labelkit_ext._C` importable from Python (setup.py builds only). Importing it loads this
// shared library, whose static TORCH_LIBRARY blocks register the ops; the module itself is empty.
#include <Python.h>

static struct PyModuleDef labelkit_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  return PyModule_Create(&labelkit_module);
}
