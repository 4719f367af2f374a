// The Python module spanbert_fast._native. Importing it loads this shared library, whose
// static initialisers register the operators (reached through torch.ops.spanbert_fast.*);
// the module itself only carries what it was built against, which spanbert_fast/_C.py
// reads to explain a mismatch.
//
// Plain CPython API (no pybind11) to keep this file's compile time negligible.
#include <Python.h>

#define SBF_STRINGIFY_TOKENS(x) #x
#define SBF_STRINGIFY(x) SBF_STRINGIFY_TOKENS(x)

// setup.py passes these as bare tokens (e.g. -DSBF_TORCH_VERSION=2.13.0+cpu) so that no
// quoting has to survive the shell, ninja and distutils alike.
#ifndef SBF_TORCH_VERSION
#define SBF_TORCH_VERSION unknown
#endif
#ifndef SBF_CUDA_VERSION
#define SBF_CUDA_VERSION none
#endif

#ifdef SBF_WITH_CUDA
#define SBF_WITH_CUDA_FLAG 1
#else
#define SBF_WITH_CUDA_FLAG 0
#endif

// Also found by scanning the binary when the module cannot be imported (an ABI mismatch
// fails before PyInit runs): keep the "spanbert_fast-build:" prefix in sync with _C.py.
extern "C" const char sbf_build_info[] =
    "spanbert_fast-build: torch=" SBF_STRINGIFY(SBF_TORCH_VERSION) " cuda=" SBF_STRINGIFY(
        SBF_CUDA_VERSION) ";";

static PyModuleDef sbf_module = {
    PyModuleDef_HEAD_INIT,
    "_native",
    "Compiled operators of spanbert_fast (reach them through torch.ops.spanbert_fast).",
    -1,
    nullptr,
};

PyMODINIT_FUNC PyInit__native(void) {
  PyObject* module = PyModule_Create(&sbf_module);
  if (module == nullptr) {
    return nullptr;
  }
  if (PyModule_AddStringConstant(module, "built_with_torch",
                                 SBF_STRINGIFY(SBF_TORCH_VERSION)) < 0 ||
      PyModule_AddStringConstant(module, "built_with_cuda", SBF_STRINGIFY(SBF_CUDA_VERSION)) <
          0 ||
      PyModule_AddIntConstant(module, "with_cuda", SBF_WITH_CUDA_FLAG) < 0 ||
      PyModule_AddStringConstant(module, "build_info", sbf_build_info) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
