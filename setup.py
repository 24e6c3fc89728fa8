"""Build the CRC32C extension (plain CPython buffer protocol, no libtorch)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "shardckpt._crc32c",
            sources=["csrc/crc32c.cpp"],
            language="c++",
            extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden"],
        )
    ]
)
