// Python module shell of the CPU extension: importing it loads the shared library, whose
// static initialisers register the torch.ops.qframe_cpu operators (ops.cpp). No pybind11: the
// operators go through torch's dispatcher, and the build stays fast.
#include <Python.h>

#define QF_CAT2(a, b) a##b
#define QF_CAT(a, b) QF_CAT2(a, b)
#define QF_STR2(a) #a
#define QF_STR(a) QF_STR2(a)

static struct PyModuleDef qframe_cpu_module = {
    PyModuleDef_HEAD_INIT, QF_STR(TORCH_EXTENSION_NAME),
    "qframe CPU kernels; the operators live in torch.ops.qframe_cpu", -1, nullptr};

PyMODINIT_FUNC QF_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&qframe_cpu_module); }
