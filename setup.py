"""Builds the optional fused CPU kernel (csrc/attend.c) as attnmask.engines._attend.

The kernel needs only a C compiler and Python's headers (no torch headers: it takes raw
pointers), so it is independent of the installed torch's ABI. If it cannot be built the
install still succeeds and the engine runs its pure-PyTorch path, saying so in
``attnmask.engines.fused.status()`` and ``attnmask --version``.
"""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "attnmask.engines._attend",
            sources=["csrc/attend.c"],
            depends=["csrc/attend_item.h", "csrc/attend_bwd_item.h"],
            extra_compile_args=["-O3", "-std=gnu11", "-fno-math-errno", "-Wall"],
            libraries=["dl"],  # dlopen of torch's OpenMP runtime (part of libc from glibc 2.34)
            optional=True,
        )
    ]
)
