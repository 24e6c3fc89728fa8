"""Build the C++ extensions (plain CPython buffer protocol, no libtorch):
CRC32C, the byte-grouping kernels of the compression codec and the staging copy."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "shardckpt.native._crc32c",
            sources=["csrc/crc32c.cpp"],
            depends=["csrc/pyext_common.h"],
            language="c++",
            extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden"],
        ),
        Extension(
            "shardckpt.native._bytegroup",
            sources=["csrc/bytegroup.cpp"],
            depends=["csrc/pyext_common.h"],
            language="c++",
            extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden"],
        ),
        Extension(
            "shardckpt.native._copy",
            sources=["csrc/copy.cpp"],
            depends=["csrc/pyext_common.h"],
            language="c++",
            # std::thread: the copy may be split over a few threads
            extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden", "-pthread"],
            extra_link_args=["-pthread"],
        ),
    ]
)
