// Helpers shared by shardckpt's CPython extensions (crc32c.cpp, bytegroup.cpp, copy.cpp):
// METH_FASTCALL argument parsing, listing a dispatch table's usable kernels,
// C-contiguous buffer views and the overlap check of two byte ranges.
#pragma once
// The one definition of what every extension shares: argument parsing, buffer
// access, the kernel table's introspection and selection, the x86 switch.

#include <Python.h>

#include <cstddef>
#include <cstdint>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(SHARDCKPT_PORTABLE_ONLY)
#define SHARDCKPT_X86 1
#include <immintrin.h>
#else
#define SHARDCKPT_X86 0
#endif

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

// The kernel to use: ``active``, or the one ``impl`` names (a testing hook);
// ``what`` names the family in errors ("copy", "byte-group", "CRC32C").
template <class Impl>
const Impl* pick_impl(PyObject* impl, const Impl* active, const Impl* impls, size_t n, const char* what) {
    if (impl == nullptr || impl == Py_None) return active;
    if (!PyUnicode_Check(impl)) {
        PyErr_SetString(PyExc_TypeError, "impl must be a str or None");
        return nullptr;
    }
    for (size_t i = 0; i < n; ++i) {
        if (PyUnicode_CompareWithASCIIString(impl, impls[i].name) == 0) {
            if (!impls[i].supported) {
                PyErr_Format(PyExc_ValueError, "%s implementation %R is not supported on this CPU", what, impl);
                return nullptr;
            }
            return &impls[i];
        }
    }
    PyErr_Format(PyExc_ValueError, "unknown %s implementation %R", what, impl);
    return nullptr;
}

// Get a C-contiguous byte view of `obj` (writable when asked); on failure
// sets an exception, a BufferError naming the problem for strided exporters.
inline int get_buffer(PyObject* obj, Py_buffer* view, bool writable, const char* what) {
    const int flags = writable ? PyBUF_WRITABLE : PyBUF_SIMPLE;
    if (PyObject_GetBuffer(obj, view, flags) == 0) return 0;
    if (!PyObject_CheckBuffer(obj)) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s must support the buffer protocol, not %.100s", what,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    PyObject *etype, *evalue, *etb;
    PyErr_Fetch(&etype, &evalue, &etb);
    Py_buffer probe;
    if (PyObject_GetBuffer(obj, &probe, PyBUF_FULL_RO) == 0) {
        const int contiguous = PyBuffer_IsContiguous(&probe, 'C');
        const int readonly = probe.readonly;
        PyBuffer_Release(&probe);
        if (!contiguous || (writable && readonly)) {
            Py_XDECREF(etype);
            Py_XDECREF(evalue);
            Py_XDECREF(etb);
            if (!contiguous) {
                PyErr_Format(PyExc_BufferError,
                             "%s is not C-contiguous; pass a contiguous buffer", what);
            } else {
                PyErr_Format(PyExc_TypeError, "%s must be a writable buffer", what);
            }
            return -1;
        }
    } else {
        PyErr_Clear();
    }
    PyErr_Restore(etype, evalue, etb);
    return -1;
}

inline bool overlaps(const void* a, size_t alen, const void* b, size_t blen) {
    const auto pa = reinterpret_cast<uintptr_t>(a);
    const auto pb = reinterpret_cast<uintptr_t>(b);
    return alen != 0 && blen != 0 && pa < pb + blen && pb < pa + alen;
}

}  // namespace shardckpt_ext

#define FASTCALL_KW(f) reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(f))

// The two introspection functions every extension exposes over its kernel table:
// implementation() (the active kernel) and available_implementations().
#define SHARDCKPT_IMPL_INTROSPECTION(active, impls, n)                \
    PyObject* py_implementation(PyObject*, PyObject*) {                \
        return PyUnicode_FromString((active)->name);                   \
    }                                                                  \
    PyObject* py_available_implementations(PyObject*, PyObject*) {     \
        return shardckpt_ext::supported_names(impls, n);               \
    }

// Their method-table entries; ``calls`` names what dispatches ("copy()/copy_many()").
#define SHARDCKPT_IMPL_METHODS(calls)                                                   \
    {"implementation", py_implementation, METH_NOARGS,                                  \
     "implementation() -> str\n\nName of the kernel " calls " dispatch to."},          \
    {"available_implementations", py_available_implementations, METH_NOARGS,            \
     "available_implementations() -> list[str]\n\n"                                    \
     "Kernels usable on this CPU, in dispatch preference order."}

// A single-phase module definition named ``name`` (its import path) over ``methods``.
#define SHARDCKPT_MODULE_DEF(var, name, doc, methods) \
    PyModuleDef var = {PyModuleDef_HEAD_INIT, name, doc, -1, methods, nullptr, nullptr, nullptr, nullptr}
