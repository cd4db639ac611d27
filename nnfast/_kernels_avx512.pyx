# cython: language_level=3
# The same kernels as _kernels.pyx, compiled by setup.py with -mavx2 -mfma and AVX-512
# (F, DQ, BW, VL; x86-64 only): the hand matrix products of _smallgemm.h take 512-bit tiles.
# nnfast._compiled imports this build only when the CPU and OS run AVX-512.
include "_kernels.pyx"
