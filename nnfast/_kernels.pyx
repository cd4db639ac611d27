# cython: language_level=3
"""The compiled hot loops of nnfast.

Every loop over numbers in the engine lives in this module: this file (declarations,
settings, conventions) and the ``_kernels_*.pxi`` files it includes at its end, one
job each. The Python layers above validate shapes, dtypes and values first; the
``def`` entry points re-check the shapes they index with (cheap, and a wrong shape
must never become a wild write), then release the GIL and run ``nogil`` helpers over
raw pointers.

Conventions
-----------
* All matrices are C-contiguous (row-major). BLAS is column-major, so ``_gemm``
  computes ``C^T = op(B)^T op(A)^T`` by handing BLAS the operands swapped.
* ``floating`` is Cython's fused float/double type: one source, two specialisations.
* Gradient buffers hold **sums** of per-sample gradients. The division by the sample
  count happens inside the optimizer update pass (``sgd_update`` / ``adam_update``).
* Threads: nnfast parallelises with OpenMP and always calls BLAS single-threaded
  (``nnfast._threads`` pins SciPy's OpenBLAS to one thread). An OpenMP region running
  while a threaded BLAS call spins on the same cores was measured 10-15x slower, so the
  two never mix: large products are split into row/column blocks, one block per
  OpenMP thread, each a single-threaded gemm.
"""
cimport cython
from cython cimport floating
from cython.parallel cimport prange, parallel
from libc.math cimport exp, expf, log, logf, tanh, tanhf, sqrt, sqrtf, log1p, log1pf, fabs, fabsf, isnan, isinf, NAN
from libc.stdlib cimport malloc, calloc, free
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset
from scipy.linalg.cython_blas cimport sgemm, dgemm

import numpy as np

cdef extern from "_hugealloc.h":
    void* nnf_alloc_huge(size_t nbytes) noexcept nogil
    void nnf_free_huge(void* p) noexcept nogil

cdef extern from "_omp_shim.h":
    int nnf_openmp_enabled() noexcept nogil
    int nnf_omp_max_threads() noexcept nogil
    int nnf_cpu_has_avx2_fma() noexcept nogil
    int nnf_cpu_has_avx512() noexcept nogil
    const char* nnf_compiled_isa() noexcept nogil
    int nnf_thread_num() noexcept nogil
    int nnf_team_size() noexcept nogil
    void nnf_barrier() noexcept nogil

cdef extern from "_smallgemm.h":
    enum:
        NNF_HAVE_SMALL_GEMM
        NNF_PANEL_WIDTH
        NNF_HAND_MAX_WEIGHTS
    ctypedef struct nnf_epilogue:
        const float* bias
        float* act
        long ld_act
        const float* slope
        long ld_slope
        float* colsum
        float colsum_alpha
    void nnf_sgemm_nn_epilogue(long m, long n, long k, float alpha, const float* a, long rsa,
                               long csa, const float* b, long ldb, float* c, long ldc,
                               int accumulate, const nnf_epilogue* ep) noexcept nogil
    void nnf_sgemm_nn(long m, long n, long k, float alpha, const float* a, long rsa, long csa,
                      const float* b, long ldb, float* c, long ldc, int accumulate) noexcept nogil
    int nnf_pack_b
    int nnf_pack_a
    int nnf_transposed_a_packs(long rsa, long csa) noexcept nogil
    void nnf_sgemm_nt_packed(long m, long n, long k, float alpha, const float* a, long lda,
                             const float* b, long ldb, float* c, long ldc,
                             int accumulate, const nnf_epilogue* ep) noexcept nogil
    void nnf_sgemm_nt(long m, long n, long k, float alpha, const float* a, long lda,
                      const float* b, long ldb, float* c, long ldc, int accumulate,
                      float* scratch) noexcept nogil

cdef extern from "_simd.h":
    enum:
        NNF_SMALL_BATCH
        NNF_SMALL_BATCH_LARGE
        NNF_SMALL_BATCH_SPLIT
        NNF_LAZY_BLOCK
    float nnf_sdot(const float* a, const float* b, long n) noexcept nogil
    double nnf_ddot(const double* a, const double* b, long n) noexcept nogil
    void nnf_saxpy(float* y, float alpha, const float* x, long n) noexcept nogil
    void nnf_daxpy(double* y, double alpha, const double* x, long n) noexcept nogil
    void nnf_sforward4(const float* w, long ld, long n, const float* b, float* z) noexcept nogil
    void nnf_dforward4(const double* w, long ld, long n, const double* b,
                       double* z) noexcept nogil
    void nnf_sstep_forward4(float* w, long ld, long n, const float* dz, const float* a,
                            const float* b, float* z) noexcept nogil
    void nnf_dstep_forward4(double* w, long ld, long n, const double* dz, const double* a,
                            const double* b, double* z) noexcept nogil
    void nnf_sblock_pass4(float* w, long ld, long rows, const float* g, const float* u,
                          const float* f, const unsigned char* flags, float* zb) noexcept nogil
    void nnf_sblock_pass8(float* w, long ld, long rows, const float* g, const float* u,
                          const float* f, const unsigned char* flags, float* zb) noexcept nogil
    void nnf_dblock_pass4(double* w, long ld, long rows, const double* g, const double* u,
                          const double* f, const unsigned char* flags, double* zb) noexcept nogil
    void nnf_sblock_inputs(const float** xr, int nk, int kb, long n0, float* f,
                           unsigned char* flags) noexcept nogil
    void nnf_dblock_inputs(const double** xr, int nk, int kb, long n0, double* f,
                           unsigned char* flags) noexcept nogil
    void nnf_srows_forward(const float* x, const float* w, long ld, long i0, long i1, long n,
                           float* z) noexcept nogil
    void nnf_drows_forward(const double* x, const double* w, long ld, long i0, long i1, long n,
                           double* z) noexcept nogil
    void nnf_dblock_pass8(double* w, long ld, long rows, const double* g, const double* u,
                          const double* f, const unsigned char* flags, double* zb) noexcept nogil
    int nnf_snarrow(long n) noexcept nogil
    int nnf_dnarrow(long n) noexcept nogil
    void nnf_snarrow_axpy(float* y, float alpha, const float* x, long n) noexcept nogil
    void nnf_dnarrow_axpy(double* y, double alpha, const double* x, long n) noexcept nogil
    void nnf_snarrow_dots(const float* w, long n, long rows, const float* v,
                          float* out) noexcept nogil
    void nnf_dnarrow_dots(const double* w, long n, long rows, const double* v,
                          double* out) noexcept nogil
    void nnf_snarrow_forward(const float* x, const float* w, long i0, long i1, long n,
                             float* z) noexcept nogil
    void nnf_dnarrow_forward(const double* x, const double* w, long i0, long i1, long n,
                             double* z) noexcept nogil
    float nnf_sexp_sum(const float* x, float shift, float* out, long n) noexcept nogil
    double nnf_dexp_sum(const double* x, double shift, double* out, long n) noexcept nogil
    void nnf_sbias_add(float* z, const float* b, long n) noexcept nogil
    void nnf_dbias_add(double* z, const double* b, long n) noexcept nogil
    void nnf_sbias_relu(float* z, const float* b, float* a, long n) noexcept nogil
    void nnf_dbias_relu(double* z, const double* b, double* a, long n) noexcept nogil
    void nnf_sbias_leaky_relu(float* z, const float* b, float* a, long n, float slope) noexcept nogil
    void nnf_dbias_leaky_relu(double* z, const double* b, double* a, long n, double slope) noexcept nogil
    void nnf_srelu_backward(float* g, const float* a, long n) noexcept nogil
    void nnf_drelu_backward(double* g, const double* a, long n) noexcept nogil
    void nnf_sleaky_relu_backward(float* g, const float* a, long n, float slope) noexcept nogil
    void nnf_dleaky_relu_backward(double* g, const double* a, long n, double slope) noexcept nogil
    void nnf_stanh_backward(float* g, const float* a, long n) noexcept nogil
    void nnf_dtanh_backward(double* g, const double* a, long n) noexcept nogil
    void nnf_ssigmoid_backward(float* g, const float* a, long n) noexcept nogil
    void nnf_dsigmoid_backward(double* g, const double* a, long n) noexcept nogil
    void nnf_prefetch_l2(const void* p, long n) noexcept nogil

# Activation and loss codes shared with nnfast/layers.py and nnfast/losses.py.
cpdef enum Activation:
    IDENTITY = 0
    RELU = 1
    LEAKY_RELU = 2
    TANH = 3
    SIGMOID = 4
    SOFTMAX = 5

cpdef enum Loss:
    MSE = 0
    CROSS_ENTROPY = 1        # integer class labels
    CROSS_ENTROPY_PROBS = 2  # probability rows
    BINARY_CROSS_ENTROPY = 3

cdef double LEAKY_SLOPE = 0.01  # PyTorch's default negative slope
# Below these sizes a parallel region costs more than it saves (measured on 2 cores).
cdef double PAR_MIN_ELEMS = 32768
cdef double PAR_MIN_FLOPS = 1000000.0

cdef int _num_threads = 1


def openmp_enabled():
    """True when this build was compiled with OpenMP."""
    return bool(nnf_openmp_enabled())


def cpu_has_avx2_fma():
    """Whether this CPU and OS run AVX2+FMA code (decides which kernel build is used)."""
    return bool(nnf_cpu_has_avx2_fma())


def cpu_has_avx512():
    """Whether this CPU and OS run the AVX-512 build (AVX-512 F, DQ, BW and VL)."""
    return bool(nnf_cpu_has_avx512())


def compiled_isa():
    """``"avx512"`` or ``"avx2"`` for the builds compiled for those (the AVX-512 one also
    takes AVX2+FMA), else ``"generic"``."""
    return nnf_compiled_isa().decode("ascii")


def omp_max_threads():
    """OpenMP's default team size (the number of cores unless OMP_NUM_THREADS says)."""
    return nnf_omp_max_threads()


def set_kernel_threads(int n):
    """Number of OpenMP threads the kernels use (1 without OpenMP)."""
    global _num_threads
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    _num_threads = n if nnf_openmp_enabled() else 1


def get_kernel_threads():
    return _num_threads


cdef inline int _threads_for(double work) noexcept nogil:
    return _num_threads if work >= PAR_MIN_ELEMS else 1


# The kernels, one job a file (textual includes: this stays one extension module,
# compiled once per instruction set; _kernels_avx2.pyx and _kernels_avx512.pyx include
# this file):
include "_kernels_math.pxi"
include "_kernels_products.pxi"
include "_kernels_rows.pxi"
include "_kernels_layer_ops.pxi"
include "_kernels_optim.pxi"
include "_kernels_network.pxi"
include "_kernels_small_batch.pxi"
include "_kernels_iteration.pxi"
include "_kernels_epoch.pxi"
include "_kernels_unit_split.pxi"
include "_kernels_plan.pxi"
