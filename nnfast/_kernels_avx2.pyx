# cython: language_level=3
# The same kernels as _kernels.pyx, compiled by setup.py with -mavx2 -mfma (x86-64 only).
# nnfast._compiled imports this build only when the CPU runs AVX2 and FMA.
include "_kernels.pyx"
