// Helpers shared by shardckpt's CPython extensions (crc32c.cpp, bytegroup.cpp):
// METH_FASTCALL argument parsing and listing a dispatch table's usable kernels.
#pragma once

#include <Python.h>

#include <cstddef>

namespace shardckpt_ext {

// Positional/keyword arguments of a METH_FASTCALL | METH_KEYWORDS function into
// out[0..nnames), the first nrequired mandatory. 0 on success, -1 with TypeError set.
inline int parse_args(const char* fname, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames,
               const char* const* names, Py_ssize_t nnames, Py_ssize_t nrequired,
               PyObject** out) {
    for (Py_ssize_t i = 0; i < nnames; ++i) out[i] = nullptr;
    if (nargs > nnames) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %zd arguments (%zd given)", fname,
                     nnames, nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < nargs; ++i) out[i] = args[i];
    if (kwnames != nullptr) {
        const Py_ssize_t nkw = PyTuple_GET_SIZE(kwnames);
        for (Py_ssize_t j = 0; j < nkw; ++j) {
            PyObject* key = PyTuple_GET_ITEM(kwnames, j);
            Py_ssize_t slot = -1;
            for (Py_ssize_t i = 0; i < nnames; ++i) {
                if (PyUnicode_CompareWithASCIIString(key, names[i]) == 0) {
                    slot = i;
                    break;
                }
            }
            if (slot < 0) {
                PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%U'",
                             fname, key);
                return -1;
            }
            if (out[slot] != nullptr) {
                PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%s'",
                             fname, names[slot]);
                return -1;
            }
            out[slot] = args[nargs + j];
        }
    }
    for (Py_ssize_t i = 0; i < nrequired; ++i) {
        if (out[i] == nullptr) {
            PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s'", fname,
                         names[i]);
            return -1;
        }
    }
    return 0;
}

// Names of the kernels whose ``supported`` flag is set, in table (dispatch) order.
template <class Impl>
PyObject* supported_names(const Impl* impls, size_t n) {
    PyObject* list = PyList_New(0);
    if (list == nullptr) return nullptr;
    for (size_t i = 0; i < n; ++i) {
        if (!impls[i].supported) continue;
        PyObject* s = PyUnicode_FromString(impls[i].name);
        if (s == nullptr || PyList_Append(list, s) < 0) {
            Py_XDECREF(s);
            Py_DECREF(list);
            return nullptr;
        }
        Py_DECREF(s);
    }
    return list;
}

}  // namespace shardckpt_ext

#define FASTCALL_KW(f) reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(f))
