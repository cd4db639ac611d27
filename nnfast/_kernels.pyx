# cython: language_level=3
"""The compiled hot loops of nnfast.

Every loop over numbers in the engine lives here. The Python layers above validate
shapes, dtypes and values first; the ``def`` entry points below re-check the shapes
they index with (cheap, and a wrong shape must never become a wild write), then
release the GIL and run ``nogil`` helpers over raw pointers.

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


# ----------------------------------------------------------------------------------
# scalar math, one name for both precisions
# ----------------------------------------------------------------------------------
cdef inline floating _exp(floating x) noexcept nogil:
    if floating is float:
        return expf(x)
    else:
        return exp(x)

cdef inline floating _exp_sum(const floating* x, floating shift, floating* out,
                              Py_ssize_t n) noexcept nogil:
    """out[j] = exp(x[j] - shift); returns the sum (vectorised in the AVX2 build)."""
    if floating is float:
        return nnf_sexp_sum(x, shift, out, n)
    else:
        return nnf_dexp_sum(x, shift, out, n)


cdef inline floating _log(floating x) noexcept nogil:
    if floating is float:
        return logf(x)
    else:
        return log(x)

cdef inline floating _log1p(floating x) noexcept nogil:
    if floating is float:
        return log1pf(x)
    else:
        return log1p(x)

cdef inline floating _tanh(floating x) noexcept nogil:
    if floating is float:
        return tanhf(x)
    else:
        return tanh(x)

cdef inline floating _sqrt(floating x) noexcept nogil:
    if floating is float:
        return sqrtf(x)
    else:
        return sqrt(x)

cdef inline floating _fabs(floating x) noexcept nogil:
    if floating is float:
        return fabsf(x)
    else:
        return fabs(x)

cdef inline floating _dot(const floating* a, const floating* b, Py_ssize_t n) noexcept nogil:
    if floating is float:
        return nnf_sdot(a, b, n)
    else:
        return nnf_ddot(a, b, n)

cdef inline void _axpy(floating* y, floating alpha, const floating* x, Py_ssize_t n) noexcept nogil:
    if floating is float:
        nnf_saxpy(y, alpha, x, n)
    else:
        nnf_daxpy(y, alpha, x, n)

cdef inline bint _narrow(floating* typed, Py_ssize_t n) noexcept nogil:
    """Whether rows of n values take the narrow-row kernels (_simd.h; AVX2 build only)."""
    if floating is float:
        return nnf_snarrow(n)
    else:
        return nnf_dnarrow(n)

cdef inline void _narrow_axpy(floating* y, floating alpha, const floating* x,
                              Py_ssize_t n) noexcept nogil:
    if floating is float:
        nnf_snarrow_axpy(y, alpha, x, n)
    else:
        nnf_dnarrow_axpy(y, alpha, x, n)

cdef inline void _narrow_forward(const floating* x, const floating* w, Py_ssize_t i0,
                                 Py_ssize_t i1, Py_ssize_t n, floating* z) noexcept nogil:
    if floating is float:
        nnf_snarrow_forward(x, w, i0, i1, n, z)
    else:
        nnf_dnarrow_forward(x, w, i0, i1, n, z)

cdef inline floating _sigmoid(floating x) noexcept nogil:
    # two branches so exp never overflows
    cdef floating e
    if x >= 0:
        return 1 / (1 + _exp(-x))
    e = _exp(x)
    return e / (1 + e)

cdef inline floating _activate(floating z, int act) noexcept nogil:
    if act == RELU:
        return z if z > 0 else 0
    elif act == LEAKY_RELU:
        return z if z > 0 else <floating>LEAKY_SLOPE * z
    elif act == TANH:
        return _tanh(z)
    elif act == SIGMOID:
        return _sigmoid(z)
    return z

cdef inline floating _activation_slope(floating a, int act) noexcept nogil:
    """act'(z) written in terms of a = act(z): every activation here allows that,
    so backward needs only the stored activations."""
    if act == RELU:
        return 1 if a > 0 else 0
    elif act == LEAKY_RELU:
        return 1 if a > 0 else <floating>LEAKY_SLOPE
    elif act == TANH:
        return 1 - a * a
    elif act == SIGMOID:
        return a * (1 - a)
    return 1


# ----------------------------------------------------------------------------------
# matrix products
# ----------------------------------------------------------------------------------
ctypedef void (*sgemm_fn)(char*, char*, int*, int*, int*, float*, float*, int*, float*,
                          int*, float*, float*, int*) noexcept nogil
ctypedef void (*dgemm_fn)(char*, char*, int*, int*, int*, double*, double*, int*, double*,
                          int*, double*, double*, int*) noexcept nogil

# The gemm every product that is not on the hand kernels calls: SciPy's (cython_blas)
# unless _use_blas gave the Fortran sgemm_/dgemm_ of another single-threaded BLAS with
# 32-bit integers (nnfast._blas: the scipy-openblas32 package, a newer OpenBLAS).
cdef sgemm_fn _sgemm = sgemm
cdef dgemm_fn _dgemm = dgemm


def _use_blas(size_t sgemm_address=0, size_t dgemm_address=0):
    """Point the kernels' gemm at these Fortran sgemm_ / dgemm_ (0: SciPy's, the
    default). The caller vouches for the addresses and for the library running
    single-threaded (nnfast._blas). Returns the previous pair (0 for SciPy's)."""
    global _sgemm, _dgemm
    old = (0 if _sgemm == sgemm else <size_t><void*>_sgemm,
           0 if _dgemm == dgemm else <size_t><void*>_dgemm)
    _sgemm = <sgemm_fn><void*>sgemm_address if sgemm_address else sgemm
    _dgemm = <dgemm_fn><void*>dgemm_address if dgemm_address else dgemm
    return old


cdef void _gemm(bint trans_a, bint trans_b, int m, int n, int k, floating alpha,
                floating* a, int lda, floating* b, int ldb, floating beta,
                floating* c, int ldc) noexcept nogil:
    """Row-major C[m, n] = alpha * op(A)[m, k] @ op(B)[k, n] + beta * C.

    lda/ldb/ldc are row strides (elements) of the arrays as stored."""
    cdef char ta = b'T' if trans_a else b'N'
    cdef char tb = b'T' if trans_b else b'N'
    if m <= 0 or n <= 0:
        return
    if floating is float:
        _sgemm(&tb, &ta, &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc)
    else:
        _dgemm(&tb, &ta, &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc)


cdef inline int _panel_chunk(int n, int nthreads) noexcept nogil:
    """Columns per thread when n columns are split across threads: whole SIMD panels
    of the hand kernels (16 wide, 32 in the AVX-512 build; the last thread takes what is
    left)."""
    return (((n + nthreads - 1) // nthreads + NNF_PANEL_WIDTH - 1)
            // NNF_PANEL_WIDTH) * NNF_PANEL_WIDTH


# The blocks are equal on purpose. Tried on the 2-core Zen 3 VM: blocks sized to each
# thread's speed as measured in the previous calls (the two cores ran the same sgemm
# 10-20 % apart, which one was slower changing by the second). In-process A/B at A/512,
# 9 pairs: 1.010x and 1.015x; the waits it removes are mostly zero-sum there (a core
# runs faster while the other waits). And OpenBLAS's float32 results depend on where
# C is split: no block size from 1 to 192 rows or columns gives the unsplit product's
# bits in every probed shape (float64's do), so a timing-dependent split would end the
# bit-identical results for a given seed and thread count. Not kept.
cdef void _pgemm(bint trans_a, bint trans_b, int m, int n, int k, floating alpha,
                 floating* a, int lda, floating* b, int ldb, floating beta,
                 floating* c, int ldc) noexcept nogil:
    """_gemm split into one block of C per OpenMP thread (the larger of m and n)."""
    cdef:
        int nthreads = _num_threads
        int t, lo, hi, chunk
    if nthreads <= 1 or 2.0 * m * n * k < PAR_MIN_FLOPS:
        _gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
        return
    if m >= n:
        chunk = (m + nthreads - 1) // nthreads
        for t in prange(nthreads, num_threads=nthreads, schedule='static'):
            lo = t * chunk
            hi = min(m, lo + chunk)
            if hi > lo:
                _gemm(trans_a, trans_b, hi - lo, n, k, alpha,
                      a + (lo if trans_a else <Py_ssize_t>lo * lda), lda,
                      b, ldb, beta, c + <Py_ssize_t>lo * ldc, ldc)
    else:
        chunk = _panel_chunk(n, nthreads)
        for t in prange(nthreads, num_threads=nthreads, schedule='static'):
            lo = t * chunk
            hi = min(n, lo + chunk)
            if hi > lo:
                _gemm(trans_a, trans_b, m, hi - lo, k, alpha, a, lda,
                      b + (<Py_ssize_t>lo * ldb if trans_b else lo), ldb,
                      beta, c + lo, ldc)


# Where the hand products (float32, AVX2 build) beat gemm. Both read the operands where
# they lie; gemm first copies them into panels, which at these sizes costs more than it
# saves. The row limits below decide for products of more weights than HAND_MAX_WEIGHTS
# (further down); they were measured on A's shapes before the hand kernels packed panels
# of B, and those shapes now take the hand kernels at any batch size. One thread, best of
# 25 interleaved rounds, hand / gemm time (rows x cols x inner):
#   A @ B:   32x256x784 0.61, 96x256x784 0.79, 192x256x784 0.89, 256x256x784 1.13,
#            128x128x256 0.80, 256x128x256 0.93;
#   A^T @ B: 784x256x32 0.90, 784x256x64 1.14, 784x256x256 1.40, 256x128x64 0.92,
#            64x128x256 0.71.
cdef Py_ssize_t HAND_NN_ROWS = 192
cdef Py_ssize_t HAND_TN_ROWS = 128
cdef Py_ssize_t HAND_TN_INNER = 32
# A @ B^T: the 2x4 tiles end in horizontal sums; gemm wins from about 48 rows. (The
# gradient below a layer takes packed panels of W^T from 64 rows instead: _matmul_nt.)
cdef Py_ssize_t HAND_NT_ROWS = 48
# Products narrower than this (the 10-wide output layer) take gemm: OpenBLAS's small-matrix
# kernels (SkylakeX build, chosen on Zen 4 too) beat a 16-wide tile that is mostly masked.
# Hand / gemm time, median of 3 interleaved rounds, 2 threads where the product splits:
#   A^T @ B: 128x10x32 1.14, 128x10x64 1.22, 128x10x128 1.33, 128x10x256 1.43,
#            128x10x512 1.33, 64x10x256 1.43, 128x3x256 1.75; 128x16x256 1.01;
#   A @ B:   32x10x128 1.05, 64x10x128 1.06, 128x10x128 1.11, 192x10x128 1.12;
#            128x16x128 1.01, and 128x10x8 or 16x10x128 0.98-1.00.
# (The table above once had A^T @ B 128x10x256 at 0.53; remeasured here, 1.43.)
cdef Py_ssize_t HAND_MIN_COLS = 16
# Products whose weight-shaped operand (B = W of a forward product, C = W of its update)
# has at most this many elements take the hand kernels at any number of rows, where W's
# columns give every thread two 16-wide panels or more: a 1 MB float32 W is one Zen 4
# core's L2, and split by columns across threads (_matmul_nn) each core keeps its
# columns of W from the forward product to the update. (With fewer columns a thread the
# split would go by rows, every thread reading all of W: not measured, so gemm.) With the panel
# packing of _smallgemm.h, in-process A/B in training, this rule (262,144) against none
# (0), 2 threads: A/128 1.010-1.049x, A/512 1.048x, A/2048 1.033x, B/512 1.100x, B/2048
# 1.013x (the row split's per-thread blocks); 1 thread, all A products on the hand
# kernels: A/128 1.034x, A/512 1.025x. C's layers (4.2M and 16.8M weights) keep gemm:
# there the hand kernels re-read A from L3 for every 16-column panel (C/256, 2 threads:
# every dW on them 0.894x, every forward product 0.999x; with A^T packed, nnf_pack_a, C's
# dW products alone on them still 0.76-0.82x gemm). Those measurements are the AVX2
# build's on a Zen 4 and the AVX-512 build's; the AVX2 build ships with the rule off
# (NNF_HAND_MAX_WEIGHTS, _smallgemm.h: on a Zen 3 gemm wins).
cdef Py_ssize_t HAND_MAX_WEIGHTS = NNF_HAND_MAX_WEIGHTS


cdef inline bint _hand_product(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k,
                               bint a_transposed) noexcept nogil:
    """Whether C[m, n] = op(A)[m, k] @ B takes the hand kernels (float32 callers only)."""
    if not NNF_HAVE_SMALL_GEMM or n < HAND_MIN_COLS:
        return False
    if a_transposed:
        return (m <= HAND_TN_ROWS or k <= HAND_TN_INNER
                or (m * n <= HAND_MAX_WEIGHTS and n >= 32 * _num_threads))
    return m <= HAND_NN_ROWS or (k * n <= HAND_MAX_WEIGHTS and n >= 32 * _num_threads)


cdef inline void _small_nn_ld(Py_ssize_t m, int n, Py_ssize_t k, floating alpha,
                              const floating* a, Py_ssize_t rsa, Py_ssize_t csa,
                              const floating* b, Py_ssize_t ldb, floating* c,
                              Py_ssize_t ldc, bint accumulate) noexcept nogil:
    """C[m, n] = alpha * A @ B (+ C when ``accumulate``), serially.
    # IN  a: A[i, p] = a[i * rsa + p * csa], one of rsa, csa being 1 (A or a transpose)
    # IN  b: B, (k, n), rows ldb apart
    # OUT c: C, (m, n), rows ldc apart
    float32 takes the hand kernels of _smallgemm.h where ``_hand_product`` says they win;
    everything else takes gemm."""
    cdef bint as_stored = csa == 1 and rsa >= k  # not A^T (gemm's lda >= k when k == 1)
    if floating is float and _hand_product(m, n, k, not as_stored):
        nnf_sgemm_nn(m, n, k, alpha, a, rsa, csa, b, ldb, c, ldc, accumulate)
    elif as_stored:
        _gemm(False, False, <int>m, n, <int>k, alpha, <floating*>a, <int>rsa, <floating*>b,
              <int>ldb, <floating>(1 if accumulate else 0), c, <int>ldc)
    else:
        _gemm(True, False, <int>m, n, <int>k, alpha, <floating*>a, <int>csa, <floating*>b,
              <int>ldb, <floating>(1 if accumulate else 0), c, <int>ldc)


cdef inline void _small_nn(Py_ssize_t m, int n, Py_ssize_t k, floating alpha,
                           const floating* a, Py_ssize_t rsa, Py_ssize_t csa,
                           const floating* b, floating* c, bint accumulate) noexcept nogil:
    """``_small_nn_ld`` with B (k, n) and C (m, n) contiguous."""
    _small_nn_ld(m, n, k, alpha, a, rsa, csa, b, n, c, n, accumulate)


cdef void _matmul_nn(Py_ssize_t m, int n, Py_ssize_t k, floating alpha, const floating* a,
                     Py_ssize_t rsa, Py_ssize_t csa, const floating* b, floating* c,
                     bint accumulate) noexcept nogil:
    """``_small_nn`` across the OpenMP threads (``_hand_nn_split``), or ``_pgemm`` where
    gemm wins."""
    cdef bint as_stored = csa == 1 and rsa >= k  # as in _small_nn
    if floating is not float or not _hand_product(m, n, k, not as_stored):
        if not as_stored:
            _pgemm(True, False, <int>m, n, <int>k, alpha, <floating*>a, <int>csa,
                   <floating*>b, n, <floating>(1 if accumulate else 0), c, n)
        else:
            _pgemm(False, False, <int>m, n, <int>k, alpha, <floating*>a, <int>rsa,
                   <floating*>b, n, <floating>(1 if accumulate else 0), c, n)
        return
    _hand_nn_split(m, n, k, alpha, a, rsa, csa, b, c, accumulate, NULL)


cdef inline void _small_nt_ld(Py_ssize_t m, int n, int k, const floating* a, Py_ssize_t lda,
                              const floating* b, Py_ssize_t ldb, floating* c, Py_ssize_t ldc,
                              floating* scratch) noexcept nogil:
    """C[m, n] = A @ B^T for small operands, serially.
    # IN  a: A, (m, k), rows lda apart;  b: B, (n, k), rows ldb apart
    # OUT c: C, (m, n), rows ldc apart;  scratch: room for k * n values (B^T when k is
    #     short)"""
    if (floating is float and NNF_HAVE_SMALL_GEMM and HAND_NT_ROWS > 0
            and (m <= HAND_NT_ROWS or k < 16)):
        nnf_sgemm_nt(m, n, k, 1, a, lda, b, ldb, c, ldc, 0, scratch)
    else:
        _gemm(False, True, <int>m, n, k, <floating>1, <floating*>a, <int>lda, <floating*>b,
              <int>ldb, <floating>0, c, <int>ldc)


cdef bint HAND_NT_PACKED = True


cdef bint _matmul_nt(Py_ssize_t m, int n, int k, const floating* a, const floating* b,
                     floating* c, const floating* relu_out) noexcept nogil:
    """C[m, n] = A @ B^T across the OpenMP threads, A (m, k), B (n, k), C (m, n)
    contiguous: the gradient below a layer, dZ @ W^T (B = W, n x k). Products of 64+
    rows with at most HAND_MAX_WEIGHTS weights take the hand kernels with packed panels
    of B^T (``nnf_sgemm_nt_packed``), threads taking blocks of C's columns (W's rows);
    the rest gemm. gemm packs B^T slowly (OpenBLAS, one thread, 128 x 128 x 128: 54 us as
    A @ B^T, 47 us as A @ B). In-process A/B in training, hand path on / off, 2 threads:
    A/128 1.024x (calm VM), A/512 1.004-1.014x.

    With ``relu_out`` (m, n; or NULL), on the hand kernels C is also zeroed where
    relu_out <= 0 (ReLU's slope, as ``_scale_by_slope``) as it is stored (an epilogue,
    see EPILOGUES), and True returned; False: C is the bare product."""
    global EPILOGUE_PRODUCTS
    cdef:
        int nthreads = _num_threads
        int t, lo, hi, chunk
        bint fuse
    if (floating is not float or not NNF_HAVE_SMALL_GEMM or not HAND_NT_PACKED or m < 64
            or n < HAND_MIN_COLS or <Py_ssize_t>n * k > HAND_MAX_WEIGHTS):
        _pgemm(False, True, <int>m, n, k, <floating>1, <floating*>a, k, <floating*>b, k,
               <floating>0, c, n)
        return False
    fuse = relu_out != NULL and EPILOGUES
    if fuse:
        EPILOGUE_PRODUCTS += 1
    if nthreads <= 1 or 2.0 * m * n * k < PAR_MIN_FLOPS or n < 32 * nthreads:
        _nt_packed_part(m, n, k, <const float*>a, <const float*>b, <float*>c, n,
                        <const float*>relu_out if fuse else NULL)
        return fuse
    chunk = _panel_chunk(n, nthreads)
    for t in prange(nthreads, num_threads=nthreads, schedule='static'):
        lo = t * chunk
        hi = min(n, lo + chunk)
        if hi > lo:
            _nt_packed_part(m, hi - lo, k, <const float*>a,
                            <const float*>b + <Py_ssize_t>lo * k, <float*>c + lo, n,
                            <const float*>relu_out + lo if fuse else NULL)
    return fuse


cdef inline void _nt_packed_part(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, const float* a,
                                 const float* b, float* c, Py_ssize_t ldc,
                                 const float* relu_out) noexcept nogil:
    """One thread's columns of ``_matmul_nt`` on the hand kernels (b, c and relu_out
    offset to them; relu_out NULL: no epilogue)."""
    cdef nnf_epilogue ep
    if relu_out == NULL:
        nnf_sgemm_nt_packed(m, n, k, 1, a, k, b, k, c, ldc, 0, NULL)
        return
    memset(&ep, 0, sizeof(nnf_epilogue))
    ep.slope = relu_out
    ep.ld_slope = ldc
    nnf_sgemm_nt_packed(m, n, k, 1, a, k, b, k, c, ldc, 0, &ep)


cdef inline void _backward_input(Py_ssize_t m, int n, int k, const floating* dz,
                                 const floating* w, floating* dx, const floating* a_prev,
                                 int act_prev) noexcept nogil:
    """dX (m, n) = (dZ @ W^T) * act_prev'(.), read off the stored activations a_prev
    (m, n): the gradient below a layer (W: n x k). ReLU's slope in the product's kernel
    where it can (``_matmul_nt``), else a pass of its own."""
    if not _matmul_nt(m, n, k, dz, w, dx, a_prev if act_prev == RELU else NULL):
        _scale_by_slope(dx, <floating*>a_prev, m, n, act_prev)


# The hand products' epilogues (nnf_epilogue in _smallgemm.h): a hidden layer's bias and
# ReLU in its forward product, ReLU's slope in the gradient below it (dZ W^T) and the
# bias gradient's column sums in its weight gradient, each applied by the kernel that
# forms the result instead of a pass of its own over it (and, for the column sums and a
# layer of 128 units, instead of a serial pass while the other threads wait). The
# results are bit-identical either way (tested). In-process A/B in training, on / off,
# 2 threads, paired medians: A/128 1.005-1.030x (six runs), A/256 1.026x, A/512
# 0.997-1.007x. (The same three applied by each thread to its own columns as passes
# inside the product's region measured 0.992-1.009x at A/128.)
cdef bint EPILOGUES = True
cdef int64_t EPILOGUE_PRODUCTS = 0  # products so far that applied their epilogue (tests)


def _epilogue_products():
    """How many products so far applied their epilogue in the kernel (for tests)."""
    return EPILOGUE_PRODUCTS


def _set_epilogues(bint on):
    """Turn the hand products' epilogues on or off (for measuring them and for testing
    both paths); returns the previous setting."""
    global EPILOGUES
    old = EPILOGUES
    EPILOGUES = on
    return old


cdef inline void _epilogue_nn_part(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, float alpha,
                                   const float* a, Py_ssize_t rsa, Py_ssize_t csa,
                                   const float* b, Py_ssize_t ldb, float* c, Py_ssize_t ldc,
                                   bint accumulate, const nnf_epilogue* ep, Py_ssize_t r0,
                                   Py_ssize_t c0, bint colsum) noexcept nogil:
    """One thread's block of ``_hand_nn_split``: C's rows from r0 and columns from c0
    (a, b and c already offset to them), ep's pointers (ep may be NULL) offset likewise
    (its column sums only with ``colsum``)."""
    cdef nnf_epilogue part
    if ep == NULL:
        nnf_sgemm_nn(m, n, k, alpha, a, rsa, csa, b, ldb, c, ldc, accumulate)
        return
    part = ep[0]
    part.bias = ep.bias + c0 if ep.bias != NULL else NULL
    part.act = ep.act + r0 * ep.ld_act + c0 if ep.act != NULL else NULL
    part.slope = ep.slope + r0 * ep.ld_slope + c0 if ep.slope != NULL else NULL
    part.colsum = ep.colsum + c0 if ep.colsum != NULL and colsum else NULL
    nnf_sgemm_nn_epilogue(m, n, k, alpha, a, rsa, csa, b, ldb, c, ldc, accumulate, &part)


cdef bint _matmul_nn_epilogue(Py_ssize_t m, int n, Py_ssize_t k, floating alpha,
                              const floating* a, Py_ssize_t rsa, Py_ssize_t csa,
                              const floating* b, floating* c, bint accumulate,
                              const nnf_epilogue* ep) noexcept nogil:
    """``_matmul_nn`` with the epilogue ``ep`` (its pointers index this C's rows and
    columns; colsum B's columns) where the product takes the hand kernels, split across
    the threads as there. Returns False, having done nothing, where it would not (the
    caller then runs the product and the separate passes)."""
    global EPILOGUE_PRODUCTS
    cdef bint as_stored = csa == 1 and rsa >= k  # as in _matmul_nn
    if floating is not float:
        return False
    if not EPILOGUES or not _hand_product(m, n, k, not as_stored):
        return False
    EPILOGUE_PRODUCTS += 1
    _hand_nn_split(m, n, k, alpha, a, rsa, csa, b, c, accumulate, ep)
    return True


cdef void _hand_nn_split(Py_ssize_t m, int n, Py_ssize_t k, floating alpha,
                         const floating* a, Py_ssize_t rsa, Py_ssize_t csa,
                         const floating* b, floating* c, bint accumulate,
                         const nnf_epilogue* ep) noexcept nogil:
    """C = alpha * A @ B (+ C) on the hand kernels (float32), with the epilogue ep or NULL:
    serially for small products, else threads take blocks of C's columns (16-wide
    panels) when there are at least two panels each, so the forward product and the
    update of a layer (C = W) give every thread the same columns of W; otherwise blocks
    of C's rows. A transposed A that the kernels pack (X^T of a weight gradient with X's
    rows over NNF_A_MIN_STRIDE floats apart, _smallgemm.h) takes blocks of rows too:
    each thread then packs its own rows of X^T rather than all of them. In training
    (in-process A/B, rows / columns, 2 threads, 7-11 paired rounds): A/512 1.035-1.041x,
    A/256 0.997-1.030x, A/128 1.001x, A/2048 1.008x, though W's rows then move between
    the cores' caches from the forward product (blocks of columns) to the update."""
    cdef:
        int nthreads = _num_threads
        int t, lo, hi, chunk
    if floating is not float:
        return
    if nthreads <= 1 or 2.0 * m * n * k < PAR_MIN_FLOPS:
        nnf_sgemm_nn_epilogue(m, n, k, alpha, a, rsa, csa, b, n, c, n, accumulate, ep)
    elif n >= 32 * nthreads and not nnf_transposed_a_packs(rsa, csa):
        chunk = _panel_chunk(n, nthreads)
        for t in prange(nthreads, num_threads=nthreads, schedule='static'):
            lo = t * chunk
            hi = min(n, lo + chunk)
            if hi > lo:
                _epilogue_nn_part(m, hi - lo, k, alpha, a, rsa, csa, b + lo, n, c + lo, n,
                                  accumulate, ep, 0, lo, True)
    else:  # blocks of rows: every thread reads all of B, so its column sums come after
        chunk = <int>((m + nthreads - 1) // nthreads)
        for t in prange(nthreads, num_threads=nthreads, schedule='static'):
            lo = t * chunk
            hi = <int>min(m, lo + chunk)
            if hi > lo:
                _epilogue_nn_part(hi - lo, n, k, alpha, a + lo * rsa, rsa, csa, b, n,
                                  c + <Py_ssize_t>lo * n, n, accumulate, ep, lo, 0, False)
        if ep != NULL and ep.colsum != NULL:
            _add_column_sums(b, <floating*>ep.colsum, k, n, <floating>ep.colsum_alpha)


cdef inline void _small_nt(Py_ssize_t m, int n, int k, const floating* a, const floating* b,
                           floating* c, floating* scratch) noexcept nogil:
    """``_small_nt_ld`` with A (m, k), B (n, k) and C (m, n) contiguous."""
    _small_nt_ld(m, n, k, a, k, b, k, c, n, scratch)


# ----------------------------------------------------------------------------------
# row helpers (serial over a row range; drivers split rows across threads)
# ----------------------------------------------------------------------------------
cdef void _bias_activate_rows(floating* z, floating* bias, floating* a, int n, int act,
                              Py_ssize_t r0, Py_ssize_t r1) noexcept nogil:
    """Z[r] += b; A[r] = act(Z[r]) for rows r0..r1 (A may be Z)."""
    cdef:
        Py_ssize_t r, j
        floating* zr
        floating* ar
        floating mx, s, v
    for r in range(r0, r1):
        zr = z + r * n
        ar = a + r * n
        if act == RELU:
            if floating is float:
                nnf_sbias_relu(zr, bias, ar, n)
            else:
                nnf_dbias_relu(zr, bias, ar, n)
            continue
        if act == LEAKY_RELU:
            if floating is float:
                nnf_sbias_leaky_relu(zr, bias, ar, n, <float>LEAKY_SLOPE)
            else:
                nnf_dbias_leaky_relu(zr, bias, ar, n, LEAKY_SLOPE)
            continue
        if floating is float:
            nnf_sbias_add(zr, bias, n)
        else:
            nnf_dbias_add(zr, bias, n)
        if act == SOFTMAX:
            mx = zr[0]
            for j in range(1, n):
                if zr[j] > mx:
                    mx = zr[j]
            s = 1 / _exp_sum(zr, mx, ar, n)
            for j in range(n):
                ar[j] = ar[j] * s
        elif act == IDENTITY:
            if ar != zr:
                memcpy(ar, zr, n * sizeof(floating))
        else:
            for j in range(n):
                ar[j] = _activate(zr[j], act)


cdef void _bias_activate(floating* z, floating* bias, floating* a, Py_ssize_t m, int n,
                         int act) noexcept nogil:
    cdef:
        # an exp or tanh costs about what 8 ReLUs do (as in _loss)
        int nthreads = _threads_for(<double>m * n * (1 if act == RELU or act == LEAKY_RELU
                                                     or act == IDENTITY else 8))
        int t
        Py_ssize_t chunk, lo, hi
    if nthreads <= 1:
        _bias_activate_rows(z, bias, a, n, act, 0, m)
        return
    chunk = (m + nthreads - 1) // nthreads
    for t in prange(nthreads, num_threads=nthreads, schedule='static'):
        lo = t * chunk
        hi = min(m, lo + chunk)
        if hi > lo:
            _bias_activate_rows(z, bias, a, n, act, lo, hi)


cdef void _scale_by_slope_rows(floating* g, floating* a, int n, int act,
                               Py_ssize_t r0, Py_ssize_t r1) noexcept nogil:
    """G[r] *= act'(.) expressed through the stored activations A[r]."""
    cdef:
        Py_ssize_t lo = r0 * n, cnt = (r1 - r0) * n
    if act == RELU:
        if floating is float:
            nnf_srelu_backward(g + lo, a + lo, cnt)
        else:
            nnf_drelu_backward(g + lo, a + lo, cnt)
    elif act == LEAKY_RELU:
        if floating is float:
            nnf_sleaky_relu_backward(g + lo, a + lo, cnt, <float>LEAKY_SLOPE)
        else:
            nnf_dleaky_relu_backward(g + lo, a + lo, cnt, LEAKY_SLOPE)
    elif act == TANH:
        if floating is float:
            nnf_stanh_backward(g + lo, a + lo, cnt)
        else:
            nnf_dtanh_backward(g + lo, a + lo, cnt)
    elif act == SIGMOID:
        if floating is float:
            nnf_ssigmoid_backward(g + lo, a + lo, cnt)
        else:
            nnf_dsigmoid_backward(g + lo, a + lo, cnt)


cdef void _scale_by_slope(floating* g, floating* a, Py_ssize_t m, int n, int act) noexcept nogil:
    cdef:
        int nthreads = _threads_for(<double>m * n)
        int t
        Py_ssize_t chunk, lo, hi
    if act == IDENTITY:
        return
    if nthreads <= 1:
        _scale_by_slope_rows(g, a, n, act, 0, m)
        return
    chunk = (m + nthreads - 1) // nthreads
    for t in prange(nthreads, num_threads=nthreads, schedule='static'):
        lo = t * chunk
        hi = min(m, lo + chunk)
        if hi > lo:
            _scale_by_slope_rows(g, a, n, act, lo, hi)


cdef void _add_column_sums(const floating* g, floating* out, Py_ssize_t m, int n,
                           floating alpha) noexcept nogil:
    """out[j] += alpha * G[r, j] for r = 0..m-1 in turn: the bias gradient sum (alpha 1)
    or plain SGD's bias step (alpha -lr/M). Rows outer, so the inner loop is contiguous.

    Serial: blocks of columns on the OpenMP threads measured no faster (A/512 1.005x,
    A/128 0.994x, A/256 1.02x, in-process A/B, 6 pairs each)."""
    cdef Py_ssize_t r
    for r in range(m):
        _axpy(out, alpha, g + r * n, n)


# ----------------------------------------------------------------------------------
# losses fused with their gradient w.r.t. the last pre-activation (per sample,
# unscaled: the buffers accumulate sums). Each returns the summed loss of rows r0..r1.
# ----------------------------------------------------------------------------------
cdef double _loss_rows(floating* z, floating* a, floating* t, int64_t* labels,
                       floating* dz, int n, int loss, int act,
                       Py_ssize_t r0, Py_ssize_t r1) noexcept nogil:
    cdef:
        Py_ssize_t r, j
        floating* zr
        floating* ar
        floating* tr
        floating* dr
        Py_ssize_t jmax
        floating mx, s, lse, d, zj
        double total = 0
    for r in range(r0, r1):
        zr = z + r * n
        ar = a + r * n
        dr = dz + r * n
        if loss == MSE:
            tr = t + r * n
            for j in range(n):
                d = ar[j] - tr[j]
                total += 0.5 * d * d
                dr[j] = d * _activation_slope(ar[j], act)
        elif loss == BINARY_CROSS_ENTROPY:
            tr = t + r * n
            for j in range(n):
                zj = zr[j]
                # max(z, 0) - z*y + log(1 + exp(-|z|)): the stable logits form
                total += (zj if zj > 0 else 0) - zj * tr[j] + _log1p(_exp(-_fabs(zj)))
                dr[j] = ar[j] - tr[j]
        else:
            # softmax cross-entropy: L = logsumexp(z) - sum_k y_k z_k (with sum_k y_k = 1).
            # a = softmax(z) is at hand: logsumexp(z) = z_k - log(a_k) for every k, taken
            # at the largest z_k, whose a_k >= 1/n (no underflow), instead of n more exps
            mx = zr[0]
            jmax = 0
            for j in range(1, n):
                if zr[j] > mx:
                    mx = zr[j]
                    jmax = j
            lse = mx - _log(ar[jmax])
            if loss == CROSS_ENTROPY:
                total += lse - zr[labels[r]]
                for j in range(n):
                    dr[j] = ar[j]
                dr[labels[r]] = dr[labels[r]] - 1
            else:
                tr = t + r * n
                for j in range(n):
                    total += tr[j] * (lse - zr[j])
                    dr[j] = ar[j] - tr[j]
    return total


cdef double _loss(floating* z, floating* a, floating* t, int64_t* labels, floating* dz,
                  Py_ssize_t m, int n, int loss, int act) noexcept nogil:
    cdef:
        int nthreads = _threads_for(<double>m * n * 8)
        int i
        Py_ssize_t chunk, lo, hi
        double total = 0
    if nthreads <= 1:
        return _loss_rows(z, a, t, labels, dz, n, loss, act, 0, m)
    chunk = (m + nthreads - 1) // nthreads
    for i in prange(nthreads, num_threads=nthreads, schedule='static'):
        lo = i * chunk
        hi = min(m, lo + chunk)
        if hi > lo:
            total += _loss_rows(z, a, t, labels, dz, n, loss, act, lo, hi)
    return total


# ----------------------------------------------------------------------------------
# Python-visible kernels (one job each). Shapes are re-checked before the GIL goes.
# ----------------------------------------------------------------------------------
cdef bint _labels_in_range(const int64_t[::1] v, Py_ssize_t n) noexcept nogil:
    """Whether every entry of v is in [0, n) (one pass, no branch per entry)."""
    cdef:
        Py_ssize_t r
        bint ok = True
    for r in range(v.shape[0]):
        ok &= (v[r] >= 0) & (v[r] < n)
    return ok


cdef Py_ssize_t FINITE_BLOCK = 1 << 16  # elements scanned between looks for a hit


cdef bint _finite_span(const floating* x, Py_ssize_t n) noexcept nogil:
    """Whether none of x[0..n) is NaN or infinite.

    Works on the bits, so no compiler flag can fold it away: an exponent of all ones
    (NaN, inf) plus one unit of the exponent carries into the sign bit, and any other
    exponent does not. Adds and ORs only, which the compiler vectorizes."""
    cdef:
        Py_ssize_t i
        uint32_t acc32 = 0
        uint64_t acc64 = 0
        const uint32_t* u32 = <const uint32_t*>x
        const uint64_t* u64 = <const uint64_t*>x
    if floating is float:
        for i in range(n):
            acc32 |= (u32[i] & 0x7f800000u) + 0x00800000u
        return (acc32 & 0x80000000u) == 0
    else:
        for i in range(n):
            acc64 |= (u64[i] & 0x7ff0000000000000u) + 0x0010000000000000u
        return (acc64 & 0x8000000000000000u) == 0


cdef bint _copy_finite(floating* dst, const floating* src, Py_ssize_t n) noexcept nogil:
    """dst[0..n) = src[0..n), and whether none of them is NaN or infinite (the bit test of
    ``_finite_span`` in the same pass as the copy)."""
    cdef:
        Py_ssize_t i
        uint32_t acc32 = 0, v32
        uint64_t acc64 = 0, v64
        const uint32_t* s32 = <const uint32_t*>src
        const uint64_t* s64 = <const uint64_t*>src
        uint32_t* d32 = <uint32_t*>dst
        uint64_t* d64 = <uint64_t*>dst
    if floating is float:
        for i in range(n):
            v32 = s32[i]
            d32[i] = v32
            acc32 |= (v32 & 0x7f800000u) + 0x00800000u
        return (acc32 & 0x80000000u) == 0
    else:
        for i in range(n):
            v64 = s64[i]
            d64[i] = v64
            acc64 |= (v64 & 0x7ff0000000000000u) + 0x0010000000000000u
        return (acc64 & 0x8000000000000000u) == 0


@cython.boundscheck(False)
@cython.wraparound(False)
def all_finite(const floating[::1] x):
    """Whether no entry of x is NaN or infinite: the NaN/inf check of the Python boundary.

    60,000 x 784 float32: 5.5 ms, against 8.9 ms for NumPy's chunked
    ``isfinite(...).all()``. One thread: the check also runs right after NumPy-backend
    fits and predictions, whose threaded BLAS may still be spinning on the other cores.
    Measured, an OpenMP split (blocks handed out dynamically) took 3.0-5.6 ms after a
    pause but 8.2-11.2 ms right after threaded NumPy matmuls; one thread 5.4-5.6 ms
    either way."""
    cdef:
        Py_ssize_t n = x.shape[0], lo = 0
        bint ok = True
    with nogil:
        while ok and lo < n:
            ok = _finite_span(&x[lo], min(FINITE_BLOCK, n - lo))
            lo += FINITE_BLOCK
    return ok


cdef inline void _check(bint ok, str what) except *:
    if not ok:
        raise ValueError("nnfast kernel: " + what)


@cython.boundscheck(False)
@cython.wraparound(False)
def dense_forward(const floating[:, ::1] X, const floating[:, ::1] W, const floating[::1] b,
                  floating[:, ::1] Z, floating[:, ::1] A, int act):
    """Z = X @ W + b; A = act(Z).

    X (M, in) IN; W (in, out) IN; b (out,) IN; Z (M, out) OUT; A (M, out) OUT (may be Z
    for an element-wise activation, never for softmax)."""
    cdef Py_ssize_t m = X.shape[0], k = X.shape[1], n = W.shape[1]
    _check(m >= 1 and k >= 1 and n >= 1, "empty operand")
    _check(W.shape[0] == k and b.shape[0] == n, "W/b shape does not match X")
    _check(Z.shape[0] == m and Z.shape[1] == n and A.shape[0] == m and A.shape[1] == n,
           "Z/A shape must be (M, out)")
    _check(0 <= act <= SOFTMAX, "unknown activation code")
    with nogil:
        _pgemm(False, False, <int>m, <int>n, <int>k, <floating>1, <floating*>&X[0, 0], <int>k,
               <floating*>&W[0, 0], <int>n, <floating>0, &Z[0, 0], <int>n)
        _bias_activate(&Z[0, 0], <floating*>&b[0], &A[0, 0], m, <int>n, act)


@cython.boundscheck(False)
@cython.wraparound(False)
def loss_gradient(const floating[:, ::1] Z, const floating[:, ::1] A, const floating[:, ::1] T,
                  const int64_t[::1] labels, floating[:, ::1] dZ, int loss, int act):
    """Summed loss of the batch, and dZ = dL_i/dZ per sample (not divided by M).

    Z, A (M, K) IN: last layer's pre-activation and activation, A = act(Z) (for
    cross-entropy, A = softmax(Z), from which the log-sum-exp is taken). T (M, K) IN: targets
    (ignored for integer-label cross-entropy, pass any (1, K) array). labels (M,) IN:
    class indices (used only for integer-label cross-entropy, else pass an empty array).
    dZ (M, K) OUT."""
    cdef Py_ssize_t m = Z.shape[0], n = Z.shape[1], r
    _check(m >= 1 and n >= 1, "empty operand")
    _check(A.shape[0] == m and A.shape[1] == n and dZ.shape[0] == m and dZ.shape[1] == n,
           "A/dZ shape must equal Z's")
    if loss == CROSS_ENTROPY:
        _check(labels.shape[0] == m, "labels must have M entries")
        _check(_labels_in_range(labels, n), "label out of range")
    else:
        _check(T.shape[0] == m and T.shape[1] == n, "targets shape must equal Z's")
        _check(0 <= loss <= BINARY_CROSS_ENTROPY, "unknown loss code")
    cdef double total
    cdef floating* tp = <floating*>&T[0, 0] if T.shape[0] > 0 else NULL
    cdef int64_t* lp = <int64_t*>&labels[0] if labels.shape[0] > 0 else NULL
    with nogil:
        total = _loss(<floating*>&Z[0, 0], <floating*>&A[0, 0], tp, lp, &dZ[0, 0],
                      m, <int>n, loss, act)
    return total


@cython.boundscheck(False)
@cython.wraparound(False)
def dense_backward_params(const floating[:, ::1] X, const floating[:, ::1] dZ,
                          floating[:, ::1] dW, floating[::1] db):
    """dW += X^T @ dZ; db += column sums of dZ (gradient-sum buffers).

    X (M, in) IN; dZ (M, out) IN; dW (in, out) IN/OUT; db (out,) IN/OUT."""
    cdef Py_ssize_t m = X.shape[0], k = X.shape[1], n = dZ.shape[1]
    _check(m >= 1 and k >= 1 and n >= 1, "empty operand")
    _check(dZ.shape[0] == m, "dZ must have as many rows as X")
    _check(dW.shape[0] == k and dW.shape[1] == n and db.shape[0] == n, "dW/db shape")
    with nogil:
        _pgemm(True, False, <int>k, <int>n, <int>m, <floating>1, <floating*>&X[0, 0], <int>k,
               <floating*>&dZ[0, 0], <int>n, <floating>1, &dW[0, 0], <int>n)
        _add_column_sums(<floating*>&dZ[0, 0], &db[0], m, <int>n, <floating>1)


@cython.boundscheck(False)
@cython.wraparound(False)
def dense_backward_input(const floating[:, ::1] dZ, const floating[:, ::1] W,
                         const floating[:, ::1] A_prev, floating[:, ::1] dZ_prev, int act_prev):
    """dZ_prev = (dZ @ W^T) * act_prev'(.), the gradient w.r.t. the previous layer's
    pre-activation (act_prev' read off the stored activations A_prev).

    dZ (M, out) IN; W (in, out) IN; A_prev (M, in) IN; dZ_prev (M, in) OUT."""
    cdef Py_ssize_t m = dZ.shape[0], n = dZ.shape[1], k = W.shape[0]
    _check(m >= 1 and k >= 1 and n >= 1, "empty operand")
    _check(W.shape[1] == n, "W must have dZ's width")
    _check(A_prev.shape[0] == m and A_prev.shape[1] == k and
           dZ_prev.shape[0] == m and dZ_prev.shape[1] == k, "A_prev/dZ_prev shape")
    _check(0 <= act_prev < SOFTMAX, "activation code of a hidden layer")
    with nogil:
        _backward_input(m, <int>k, <int>n, &dZ[0, 0], &W[0, 0], &dZ_prev[0, 0], &A_prev[0, 0],
                        act_prev)


# ----------------------------------------------------------------------------------
# optimizer updates: one pass per parameter array, gradient averaged and cleared in it
# ----------------------------------------------------------------------------------
cdef void _sgd_range(floating* p, floating* gsum, floating* v, floating scale, floating lr,
                     floating momentum, bint nesterov, floating wd,
                     Py_ssize_t i0, Py_ssize_t i1) noexcept nogil:
    cdef:
        Py_ssize_t i
        floating g
    for i in range(i0, i1):
        g = gsum[i] * scale
        gsum[i] = 0
        if wd != 0:
            g = g + wd * p[i]
        if momentum != 0:
            v[i] = momentum * v[i] + g
            if nesterov:
                g = g + momentum * v[i]
            else:
                g = v[i]
        p[i] = p[i] - lr * g


cdef void _sgd_apply(floating* p, floating* gsum, floating* v, Py_ssize_t n, double scale,
                     double lr, double momentum, bint nesterov, double wd) noexcept nogil:
    cdef:
        int nthreads = _threads_for(<double>n)
        int t
        Py_ssize_t chunk, lo, hi
    if nthreads <= 1:
        _sgd_range(p, gsum, v, <floating>scale, <floating>lr, <floating>momentum, nesterov,
                   <floating>wd, 0, n)
        return
    chunk = (n + nthreads - 1) // nthreads
    for t in prange(nthreads, num_threads=nthreads, schedule='static'):
        lo = t * chunk
        hi = min(n, lo + chunk)
        if hi > lo:
            _sgd_range(p, gsum, v, <floating>scale, <floating>lr, <floating>momentum, nesterov,
                       <floating>wd, lo, hi)


@cython.boundscheck(False)
@cython.wraparound(False)
def sgd_update(floating[::1] param, floating[::1] grad_sum, floating[::1] velocity,
               double scale, double lr, double momentum, bint nesterov, double weight_decay):
    """PyTorch's SGD on the averaged gradient g = grad_sum * scale; grad_sum is zeroed.

    param (n,) IN/OUT; grad_sum (n,) IN/OUT; velocity (n,) IN/OUT (unused when
    momentum == 0, pass param); scale = 1 / samples accumulated."""
    cdef Py_ssize_t n = param.shape[0]
    _check(n >= 1 and grad_sum.shape[0] == n and velocity.shape[0] == n, "shape mismatch")
    with nogil:
        _sgd_apply(&param[0], &grad_sum[0], &velocity[0], n, scale, lr, momentum, nesterov,
                   weight_decay)


cdef void _adam_range(floating* p, floating* gsum, floating* m1, floating* m2, floating scale,
                      floating step_size, floating b1, floating b2, floating eps,
                      floating bias2_sqrt, floating wd, floating decay_factor,
                      Py_ssize_t i0, Py_ssize_t i1) noexcept nogil:
    cdef:
        Py_ssize_t i
        floating g, denom
    for i in range(i0, i1):
        g = gsum[i] * scale
        gsum[i] = 0
        if wd != 0:
            g = g + wd * p[i]
        p[i] = p[i] * decay_factor
        m1[i] = b1 * m1[i] + (1 - b1) * g
        m2[i] = b2 * m2[i] + (1 - b2) * g * g
        denom = _sqrt(m2[i]) / bias2_sqrt + eps
        p[i] = p[i] - step_size * (m1[i] / denom)


cdef void _adam_apply(floating* p, floating* gsum, floating* m1, floating* m2, Py_ssize_t n,
                      double scale, double lr, double beta1, double beta2, double eps,
                      double weight_decay, bint decoupled, long step) noexcept nogil:
    """Adam on one array; ``step`` is the 1-based number of this update."""
    cdef:
        int nthreads = _threads_for(<double>n)
        int t
        Py_ssize_t chunk, lo, hi
        double bias1 = 1.0 - beta1 ** step
        floating bias2_sqrt = <floating>sqrt(1.0 - beta2 ** step)
        floating l2 = <floating>(0.0 if decoupled else weight_decay)
        floating decay_factor = <floating>((1.0 - lr * weight_decay) if decoupled else 1.0)
        floating step_size = <floating>(lr / bias1)
    if nthreads <= 1:
        _adam_range(p, gsum, m1, m2, <floating>scale, step_size, <floating>beta1,
                    <floating>beta2, <floating>eps, bias2_sqrt, l2, decay_factor, 0, n)
        return
    chunk = (n + nthreads - 1) // nthreads
    for t in prange(nthreads, num_threads=nthreads, schedule='static'):
        lo = t * chunk
        hi = min(n, lo + chunk)
        if hi > lo:
            _adam_range(p, gsum, m1, m2, <floating>scale, step_size, <floating>beta1,
                        <floating>beta2, <floating>eps, bias2_sqrt, l2, decay_factor, lo, hi)


@cython.boundscheck(False)
@cython.wraparound(False)
def adam_update(floating[::1] param, floating[::1] grad_sum, floating[::1] exp_avg,
                floating[::1] exp_avg_sq, double scale, double lr, double beta1, double beta2,
                double eps, double weight_decay, bint decoupled, long step):
    """PyTorch's Adam (bias-corrected) on g = grad_sum * scale; grad_sum is zeroed.

    ``decoupled=True`` is AdamW's decay (param *= 1 - lr*wd); otherwise wd*param is added
    to g (L2). step is the 1-based step number of this update."""
    cdef Py_ssize_t n = param.shape[0]
    _check(n >= 1 and grad_sum.shape[0] == n and exp_avg.shape[0] == n
           and exp_avg_sq.shape[0] == n, "shape mismatch")
    _check(step >= 1, "step must be >= 1")
    with nogil:
        _adam_apply(&param[0], &grad_sum[0], &exp_avg[0], &exp_avg_sq[0], n, scale, lr, beta1,
                    beta2, eps, weight_decay, decoupled, step)


# ----------------------------------------------------------------------------------
# batch gathering
# ----------------------------------------------------------------------------------
@cython.boundscheck(False)
@cython.wraparound(False)
def gather_rows(const floating[:, ::1] X, const int64_t[::1] index, floating[:, ::1] out,
                bint check=False):
    """out[i] = X[index[i]] for every i (the shuffled batch buffer). With ``check``,
    returns whether the gathered rows are finite (as fit's first epoch checks them),
    else True.

    X (N, d) IN; index (m,) IN, each in [0, N); out (m, d) OUT."""
    cdef:
        Py_ssize_t m = index.shape[0], d = X.shape[1], N = X.shape[0], i
        bint finite
    _check(out.shape[0] == m and out.shape[1] == d, "out must be (len(index), X.shape[1])")
    for i in range(m):
        _check(0 <= index[i] < N, "index out of range")
    if m == 0 or d == 0:
        return True
    with nogil:
        finite = _gather_batch(&X[0, 0], d, <floating*>NULL, 0, NULL, &index[0], m,
                               &out[0, 0], <floating*>NULL, NULL, check)
    return finite


# ----------------------------------------------------------------------------------
# whole-network passes: one nogil call per iteration, or per run of iterations
# ----------------------------------------------------------------------------------
# Below SMALL_BATCH rows the hand-written loops beat BLAS (each weight row is touched
# once per pass for all rows of the batch, and zero activations are skipped). Layers of
# at least PAR_MIN_ELEMS weights keep them up to SMALL_BATCH_LARGE rows, and up to
# SMALL_BATCH_SPLIT when their rows are split across threads (each core streams only its
# own rows, while gemm splits a few-row product badly). Measured per build: see _simd.h.
cdef Py_ssize_t SMALL_BATCH = NNF_SMALL_BATCH
cdef Py_ssize_t SMALL_BATCH_LARGE = NNF_SMALL_BATCH_LARGE
cdef Py_ssize_t SMALL_BATCH_SPLIT = NNF_SMALL_BATCH_SPLIT


# Networks with at most this many parameters train batches of ROW_SPLIT_MIN_BATCH rows
# or more in one parallel region per iteration (``_net_iteration_split``); larger ones
# split every product instead (A, 235K parameters, through the split: 0.93-1.10x).
# Remeasured on a Zen 3 (AVX2 build, gemm for A's products), in-process A/B, median of
# 11-21 interleaved pairs, limit raised to 2^22 against this one: A/512 1.011-1.022x,
# A/256 1.015x, A/128 0.992-1.028x, A/64 0.995x, A/2048 1.005x; with the split's
# backward rows all before one barrier, A/512 0.987-1.018x and B/256 0.985x. Again on
# a noisier day, 15-31 pairs: A/512 1.036x, 1.026x, 1.015x, 1.000x; A/256 0.978x, 0.964x,
# 0.996x; A/128 1.030x; A/1024 0.980x. Within that VM's noise, so the limit stays.
cdef Py_ssize_t ROW_SPLIT_MAX_PARAMS = 65536
# fewest rows a thread gets in a row split (below it the fork/join costs more than it
# saves; B/8 on 2 threads: 4 rows per thread 0.96x of one thread, B/6 at 3 rows 0.64x)
cdef Py_ssize_t ROW_SPLIT_MIN_ROWS = 8
# smallest batch that takes the row split's kernels (on one thread below 2 *
# ROW_SPLIT_MIN_ROWS); a single row is left to the hand loops, which split W's rows
# across threads. B on 1 thread, split kernels / hand loops: 1.41 at 2 rows, 1.87 at 3,
# 2.26 at 4; 0.99 at 1 row (0.82 on 2 threads). In-process A/B, median of 7 pairs.
cdef Py_ssize_t ROW_SPLIT_MIN_BATCH = 2


def _set_row_split_max_params(Py_ssize_t n):
    """Largest network (in parameters) whose plans split batches by rows; 0 turns the
    row split off. Affects plans made afterwards. Returns the previous limit."""
    global ROW_SPLIT_MAX_PARAMS
    if n < 0:
        raise ValueError("limit must be >= 0")
    old = ROW_SPLIT_MAX_PARAMS
    ROW_SPLIT_MAX_PARAMS = n
    return old


def _set_row_split_rows(Py_ssize_t min_rows_per_thread, Py_ssize_t min_batch):
    """ROW_SPLIT_MIN_ROWS and ROW_SPLIT_MIN_BATCH (for measuring them); returns the old
    pair."""
    global ROW_SPLIT_MIN_ROWS, ROW_SPLIT_MIN_BATCH
    if min_rows_per_thread < 1 or min_batch < 1:
        raise ValueError("row split limits must be >= 1")
    old = (ROW_SPLIT_MIN_ROWS, ROW_SPLIT_MIN_BATCH)
    ROW_SPLIT_MIN_ROWS, ROW_SPLIT_MIN_BATCH = min_rows_per_thread, min_batch
    return old


def _set_hand_product_limits(Py_ssize_t nn_rows, Py_ssize_t tn_rows, Py_ssize_t tn_inner,
                             Py_ssize_t nt_rows, Py_ssize_t min_cols=-1,
                             Py_ssize_t max_weights=-1):
    """HAND_NN_ROWS, HAND_TN_ROWS, HAND_TN_INNER, HAND_NT_ROWS and, unless -1,
    HAND_MIN_COLS (0: narrow products on the hand kernels too) and HAND_MAX_WEIGHTS. All
    0 (max_weights too) send every product to gemm: for measuring the crossovers and for
    testing both paths. Returns the old six."""
    global HAND_NN_ROWS, HAND_TN_ROWS, HAND_TN_INNER, HAND_NT_ROWS, HAND_MIN_COLS
    global HAND_MAX_WEIGHTS
    for v in (nn_rows, tn_rows, tn_inner, nt_rows):
        if v < 0:
            raise ValueError("hand product limits must be >= 0")
    if min_cols < -1:
        raise ValueError("min_cols must be >= 0 (or -1: unchanged)")
    if max_weights < -1:
        raise ValueError("max_weights must be >= 0 (or -1: unchanged)")
    old = (HAND_NN_ROWS, HAND_TN_ROWS, HAND_TN_INNER, HAND_NT_ROWS, HAND_MIN_COLS,
           HAND_MAX_WEIGHTS)
    HAND_NN_ROWS, HAND_TN_ROWS, HAND_TN_INNER, HAND_NT_ROWS = nn_rows, tn_rows, tn_inner, nt_rows
    if min_cols >= 0:
        HAND_MIN_COLS = min_cols
    if max_weights >= 0:
        HAND_MAX_WEIGHTS = max_weights
    return old


def _set_hand_nt_packed(bint on):
    """Whether the gradient below a layer may take the hand kernels with packed panels
    of W (``_matmul_nt``; for measuring it and testing both paths); returns the previous
    setting."""
    global HAND_NT_PACKED
    old = HAND_NT_PACKED
    HAND_NT_PACKED = on
    return old


def _set_panel_packing(bint on):
    """Whether the hand kernels copy panels of B into a contiguous buffer before use
    (``nnf_pack_b`` in _smallgemm.h; for measuring it and testing both paths). Returns
    the previous setting."""
    global nnf_pack_b
    old = nnf_pack_b != 0
    nnf_pack_b = 1 if on else 0
    return old


def _set_a_packing(bint on):
    """Whether the hand kernels copy a transposed A (the X^T of a weight gradient) into
    the row tiles' order before use (``nnf_pack_a`` in _smallgemm.h; for measuring it and
    testing both paths). Returns the previous setting."""
    global nnf_pack_a
    old = nnf_pack_a != 0
    nnf_pack_a = 1 if on else 0
    return old


def _set_small_batch_limits(Py_ssize_t every_layer, Py_ssize_t large_layer,
                            Py_ssize_t split_layer):
    """Batches of fewer rows than ``every_layer`` use the hand loops; for layers of at
    least PAR_MIN_ELEMS weights, fewer than ``large_layer`` on one thread and fewer than
    ``split_layer`` when split across threads (for measuring the crossover; plans made
    afterwards size their scratch for it). Returns the previous triple."""
    global SMALL_BATCH, SMALL_BATCH_LARGE, SMALL_BATCH_SPLIT
    for v in (every_layer, large_layer, split_layer):
        if not 1 <= v <= 4096:
            raise ValueError("limits must be in [1, 4096]")
    old = _small_batch_limits()
    SMALL_BATCH, SMALL_BATCH_LARGE, SMALL_BATCH_SPLIT = every_layer, large_layer, split_layer
    return old


def _small_batch_limits():
    """(every_layer, large_layer, split_layer): see ``_set_small_batch_limits``."""
    return (SMALL_BATCH, SMALL_BATCH_LARGE, SMALL_BATCH_SPLIT)

cdef enum OptKind:
    OPT_NONE = 0
    OPT_SGD = 1
    OPT_ADAM = 2

cdef struct OptSpec:
    int kind
    double lr, momentum, weight_decay, beta1, beta2, eps
    bint nesterov, decoupled
    long step                 # updates done so far
    # per-step constants of Adam (set by _begin_step)
    double step_size, bias2_sqrt, l2, decay_factor
    void** s1                 # per parameter array (W0, b0, W1, b1, ...): velocity/exp_avg
    void** s2                 # exp_avg_sq

cdef struct Net:
    int n_layers
    Py_ssize_t capacity
    int* width                # n_layers + 1
    int* act
    void** W
    void** b
    void** dW
    void** db
    void** Z
    void** A
    void** G
    void* scratch             # per-thread partial outputs of the small-batch forward
    int scratch_threads       # threads the scratch (and split_scratch) have room for
    Py_ssize_t scratch_rows   # batch rows the scratch has room for
    Py_ssize_t n_params
    Py_ssize_t* param_offset  # 2 * n_layers: where W_l, b_l start in a flat gradient
    void* split_scratch       # row split: n_params values per thread (B^T), or NULL
    void* tail_scratch        # tail split: the last layer's k * n values per thread, or NULL
    double* split_loss        # per-thread results of the row split
    int64_t* split_correct
    void* next_x              # scratch_rows rows of X, T and labels: the batch after the
    void* next_t              # current one, gathered while the current one is in use
    int64_t* next_labels      # (the fused first-layer pass, see _net_run)
    int64_t fused_iterations  # iterations whose first-layer product came from that pass
    int64_t tail_iterations   # iterations whose last layer took the tail split
    # the unit split (_unit_split_run; unit_view NULL where the net does not qualify): per
    # thread, pointers W, b, Z, A, G for every layer (thread 0: the net's own arrays,
    # threads 1..: private copies of the tail) and their storage; the team's private
    # blocks and layer 1's partial outputs (allocated on the first run)
    void** unit_view          # scratch_threads * 5 * n_layers
    void* unit_mem
    void* unit_blocks         # the team's private blocks (_unit_block), then the partials
    void* unit_blocks_mem
    int unit_blocks_team      # the team size unit_blocks is laid out for (0: none yet)
    Py_ssize_t unit_blocks_rows  # and the batch size
    bint unit_blocks_full     # and whether they hold gradient sums and optimizer state
    Py_ssize_t unit_rows      # batch rows the tail copies hold (the largest batch taken)
    int* unit_stop            # per thread: its loss was not finite (2 * scratch_threads:
                              # samples of even and odd index, see _unit_split_worker)
    int64_t unit_iterations   # iterations trained by the unit split
    int64_t lazy_passes       # passes over W0 of the lazy first layer (UNIT_LAZY_BLOCK)


cdef struct Batch:
    void* x                   # (rows, width[0]) inputs
    void* t                   # (rows, outputs) targets, or NULL
    int64_t* labels           # (rows,) class labels, or NULL


cdef struct RowSource:
    # a shuffled batch not gathered yet: rows[r] of X, T and labels go to row r of the
    # batch buffers (the row split's threads gather their own rows, see _split_worker)
    const void* X
    const void* T             # or NULL
    const int64_t* labels     # or NULL
    const int64_t* rows
    bint check                # whether the rows of X are checked for NaN/inf as gathered


cdef void _begin_step(OptSpec* opt) noexcept nogil:
    opt.step += 1
    if opt.kind == OPT_ADAM:
        opt.step_size = opt.lr / (1.0 - opt.beta1 ** opt.step)
        opt.bias2_sqrt = sqrt(1.0 - opt.beta2 ** opt.step)
        opt.l2 = 0.0 if opt.decoupled else opt.weight_decay
        opt.decay_factor = (1.0 - opt.lr * opt.weight_decay) if opt.decoupled else 1.0


cdef void _update_span(OptSpec* opt, floating* p, floating* g, floating* s1, floating* s2,
                       double scale, Py_ssize_t n) noexcept nogil:
    """Serial optimizer update of n parameters p from their gradient sums g (zeroed),
    with their state s1 (velocity or exp_avg; NULL where there is none) and s2."""
    if opt.kind == OPT_SGD:
        _sgd_range(p, g, s1 if s1 != NULL else p, <floating>scale, <floating>opt.lr,
                   <floating>opt.momentum, opt.nesterov, <floating>opt.weight_decay, 0, n)
    elif opt.kind == OPT_ADAM:
        _adam_range(p, g, s1, s2, <floating>scale, <floating>opt.step_size,
                    <floating>opt.beta1, <floating>opt.beta2, <floating>opt.eps,
                    <floating>opt.bias2_sqrt, <floating>opt.l2, <floating>opt.decay_factor,
                    0, n)


cdef void _update_range(OptSpec* opt, int j, floating* p, floating* g, double scale,
                        Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    """Serial optimizer update of elements lo..hi of parameter array j."""
    cdef:
        floating* s1 = <floating*>opt.s1[j] + lo if opt.s1 != NULL else NULL
        floating* s2 = <floating*>opt.s2[j] + lo if opt.s2 != NULL else NULL
    _update_span(opt, p + lo, g + lo, s1, s2, scale, hi - lo)


cdef void _update_array(OptSpec* opt, int j, floating* p, floating* g, Py_ssize_t n,
                        double scale) noexcept nogil:
    """Optimizer update of a whole parameter array (split across threads when large)."""
    cdef floating* s1 = <floating*>opt.s1[j] if opt.s1 != NULL else NULL
    if opt.kind == OPT_SGD:
        _sgd_apply(p, g, s1 if s1 != NULL else p, n, scale, opt.lr, opt.momentum,
                   opt.nesterov, opt.weight_decay)
    elif opt.kind == OPT_ADAM:
        _adam_apply(p, g, s1, <floating*>opt.s2[j], n, scale, opt.lr, opt.beta1, opt.beta2,
                    opt.eps, opt.weight_decay, opt.decoupled, opt.step)


cdef void _small_forward_rows(const floating* x, Py_ssize_t m, int k, int n,
                              const floating* w, floating* z, Py_ssize_t i0,
                              Py_ssize_t i1) noexcept nogil:
    """Z = X[:, i0:i1] @ W[i0:i1] for a few rows: W's rows streamed once, zero inputs
    skipped; one row of X with its sums in registers (``nnf_*rows_forward``)."""
    cdef:
        Py_ssize_t r, i
    if _narrow(z, n):
        for r in range(m):
            _narrow_forward(x + r * k, w, i0, i1, n, z + r * n)
        return
    if m == 1:
        if floating is float:
            nnf_srows_forward(x, w, n, i0, i1, n, z)
        else:
            nnf_drows_forward(x, w, n, i0, i1, n, z)
        return
    memset(z, 0, m * n * sizeof(floating))
    i = i0
    while i + 4 <= i1:
        _forward_rows4(x, m, k, n, w, z, i)
        i += 4
    for i in range(i, i1):
        _forward_row(x, m, k, n, w + i * n, z, i)


cdef inline void _forward_row(const floating* x, Py_ssize_t m, int k, int n,
                              const floating* wi, floating* z, Py_ssize_t i) noexcept nogil:
    """Z[r] += X[r, i] * W[i] for the m rows of X (zero inputs skipped)."""
    cdef:
        Py_ssize_t r
        floating xv
    for r in range(m):
        xv = x[r * k + i]
        if xv != 0:
            _axpy(z + r * n, xv, wi, n)


cdef inline void _forward_rows4(const floating* x, Py_ssize_t m, int k, int n,
                                const floating* w, floating* z, Py_ssize_t i) noexcept nogil:
    """``_forward_row`` for rows i..i+3 of W: each Z[r] gets the four rows' terms in row
    order, as from four calls, but in one pass over Z[r] when its four inputs are
    non-zero (``nnf_*forward4``); zero inputs are skipped as there."""
    cdef Py_ssize_t r
    for r in range(m):  # the four inputs X[r, i..i+3] are contiguous
        _forward4_skip(x + r * k + i, w + i * n, n, n, z + r * n)


cdef inline void _reduce_partials(Net* net, floating* z, Py_ssize_t m, int n,
                                  int nthreads) noexcept nogil:
    """Z += the partial products of threads 1.. (thread 0 wrote Z itself), in thread
    order, so the sum does not depend on which thread finished first."""
    cdef:
        int t
        Py_ssize_t e
        floating* part
    for t in range(1, nthreads):
        part = <floating*>net.scratch + (t - 1) * m * n
        for e in range(m * n):
            z[e] = z[e] + part[e]


cdef inline int _small_threads(Net* net, int k, int n) noexcept nogil:
    """Threads for a small-batch layer pass: each takes a fixed block of W's rows, so in
    forward, backward and update every core touches only its own rows (they stay in
    that core's cache)."""
    cdef int t = min(_num_threads, net.scratch_threads)
    if <double>k * n < PAR_MIN_ELEMS or t < 2:
        return 1
    return min(t, k)


cdef inline bint _hand_loops(Net* net, Py_ssize_t m, int k, int n) noexcept nogil:
    """Whether an m-row pass of a (k, n) layer runs the hand loops rather than gemm
    (never for more rows than the plan's scratch holds: the limits are module knobs)."""
    if m > net.scratch_rows:
        return False
    if m < SMALL_BATCH:
        return True
    if <double>k * n < PAR_MIN_ELEMS:
        return False
    return m < (SMALL_BATCH_SPLIT if _small_threads(net, k, n) > 1 else SMALL_BATCH_LARGE)


cdef void _small_forward(Net* net, const floating* x, Py_ssize_t m, int k, int n,
                         const floating* w, floating* z) noexcept nogil:
    cdef:
        int nthreads = _small_threads(net, k, n), t
        Py_ssize_t chunk, lo, hi
    if nthreads <= 1:
        _small_forward_rows(x, m, k, n, w, z, 0, k)
        return
    chunk = (k + nthreads - 1) // nthreads
    for t in prange(nthreads, num_threads=nthreads, schedule='static'):
        lo = t * chunk
        hi = min(k, lo + chunk)
        _small_forward_rows(x, m, k, n, w,
                            z if t == 0 else <floating*>net.scratch + (t - 1) * m * n, lo, hi)
    _reduce_partials(net, z, m, n, nthreads)


cdef void _small_backward_rows(const floating* x, const floating* dz, Py_ssize_t m, int k,
                               int n, floating* w, floating* dw, floating* dx,
                               const floating* a_prev, int act_prev, OptSpec* opt, int jw,
                               bint update, bint fold, double scale, Py_ssize_t i0,
                               Py_ssize_t i1) noexcept nogil:
    """Rows i0..i1 of W, one pass: dX[:, i] (with the previous activation's slope),
    dW[i] += X[:, i]^T dZ, then row i's update. With ``fold`` (plain SGD, one
    micro-batch) W[i] is updated directly and dW stays untouched."""
    cdef:
        Py_ssize_t r, i
        floating sl
        floating* wi
        floating neg = <floating>(-opt.lr * scale) if fold else 0
    if _narrow(w, n):
        _small_backward_narrow_rows(x, dz, m, k, n, w, dw, dx, a_prev, act_prev, opt, jw,
                                    update, fold, scale, i0, i1)
        return
    for i in range(i0, i1):
        wi = w + i * n
        if dx != NULL:
            for r in range(m):
                sl = _activation_slope(a_prev[r * k + i], act_prev)
                dx[r * k + i] = _dot(dz + r * n, wi, n) * sl if sl != 0 else 0
        _gradient_row(x, dz, m, k, n, w, dw, opt, jw, update, fold, scale, neg, i)


cdef inline void _gradient_row(const floating* x, const floating* dz, Py_ssize_t m, int k,
                               int n, floating* w, floating* dw, OptSpec* opt, int jw,
                               bint update, bint fold, double scale, floating neg,
                               Py_ssize_t i) noexcept nogil:
    """Row i of W: dW[i] += X[:, i]^T dZ and its update, or with ``fold`` the plain SGD
    step W[i] += neg * X[:, i]^T dZ (neg = -lr / samples) with dW untouched."""
    cdef:
        Py_ssize_t r
        floating xv
        floating* wi = w + i * n
    for r in range(m):
        xv = x[r * k + i]
        if xv != 0:
            if fold:
                _axpy(wi, neg * xv, dz + r * n, n)
            else:
                _axpy(dw + i * n, xv, dz + r * n, n)
    if update and not fold:
        _update_range(opt, jw, w, dw, scale, i * n, (i + 1) * n)


cdef inline bint _step_forward4_dense(const floating* x, const floating* x_next,
                                      floating neg, floating* w, Py_ssize_t ld,
                                      Py_ssize_t n, const floating* dz,
                                      floating* z_next) noexcept nogil:
    """Four rows w[0..3] (n values, stride ld) of the first layer at batch 1, plain SGD:
    when their inputs x[0..3] and the next sample's x_next[0..3] are all non-zero, the
    step w[q] += neg * x[q] * dz and the next forward z_next += x_next[q] * w[q] in one
    pass (``nnf_*step_forward4``; the next inputs are contiguous and go to the kernel as
    they lie) and True; else nothing and False (the caller skips zero inputs row by
    row)."""
    cdef:
        floating a[4]
        int q
    for q in range(4):
        if x[q] == 0 or x_next[q] == 0:
            return False
        a[q] = neg * x[q]
    if floating is float:
        nnf_sstep_forward4(w, ld, n, dz, a, x_next, z_next)
    else:
        nnf_dstep_forward4(w, ld, n, dz, a, x_next, z_next)
    return True


cdef void _first_layer_step_forward_rows(const floating* x, const floating* dz,
                                         Py_ssize_t m, int k, int n, floating* w,
                                         floating* dw, OptSpec* opt, bint update, bint fold,
                                         double scale, const floating* x_next,
                                         Py_ssize_t m_next, floating* z_next, Py_ssize_t i0,
                                         Py_ssize_t i1) noexcept nogil:
    """Rows i0..i1 of the first layer: this batch's gradient and step of row i (as
    ``_small_backward_rows``; the first layer has no dX), then the next batch's forward
    product through the stepped row while it is still in L1 cache
    (Z_next += X_next[:, i] * W[i], as ``_small_forward_rows``). W is streamed once per
    iteration instead of twice; each row sees the same operations in the same order as in
    the two separate passes, so the results are identical."""
    cdef:
        Py_ssize_t i = i0, r
        floating neg = <floating>(-opt.lr * scale) if fold else 0
    memset(z_next, 0, m_next * n * sizeof(floating))
    while i + 4 <= i1:
        # batch 1, plain SGD, no zero input: step and forward in one pass over the rows
        if not (fold and m == 1 and m_next == 1
                and _step_forward4_dense(x + i, x_next + i, neg, w + i * n, n, n, dz,
                                         z_next)):
            # four rows stepped, then read (still in L1) by the forward
            for r in range(4):
                _gradient_row(x, dz, m, k, n, w, dw, opt, 0, update, fold, scale, neg, i + r)
            _forward_rows4(x_next, m_next, k, n, w, z_next, i)
        i += 4
    for i in range(i, i1):
        _gradient_row(x, dz, m, k, n, w, dw, opt, 0, update, fold, scale, neg, i)
        _forward_row(x_next, m_next, k, n, w + i * n, z_next, i)


cdef void _small_backward_narrow_rows(const floating* x, const floating* dz, Py_ssize_t m,
                                     int k, int n, floating* w, floating* dw, floating* dx,
                                     const floating* a_prev, int act_prev, OptSpec* opt,
                                     int jw, bint update, bint fold, double scale,
                                     Py_ssize_t i0, Py_ssize_t i1) noexcept nogil:
    """``_small_backward_rows`` for rows of a narrow W (``_narrow``): two vectors per row
    and no branches (a zero input adds zero). A loop of its own: merged into
    ``_small_backward_rows`` behind a flag, B/1 ran 0.84-0.94x (alternating processes)."""
    cdef:
        Py_ssize_t r, i
        floating* wi
        floating neg = <floating>(-opt.lr * scale) if fold else 0
    if dx != NULL:  # all of dX first: it reads these rows of W before their update
        for r in range(m):
            if floating is float:
                nnf_snarrow_dots(w + i0 * n, n, i1 - i0, dz + r * n, dx + r * k + i0)
            else:
                nnf_dnarrow_dots(w + i0 * n, n, i1 - i0, dz + r * n, dx + r * k + i0)
            # the slopes as one vectorised pass (per element, a scalar call took more
            # time than the dots: B/1, 128 rows of a 10-wide layer)
            _scale_by_slope_rows(dx + r * k + i0, <floating*>a_prev + r * k + i0,
                                 <int>(i1 - i0), act_prev, 0, 1)
    for i in range(i0, i1):
        wi = w + i * n
        for r in range(m):
            if fold:
                _narrow_axpy(wi, neg * x[r * k + i], dz + r * n, n)
            else:
                _narrow_axpy(dw + i * n, x[r * k + i], dz + r * n, n)
        if update and not fold:
            _update_range(opt, jw, w, dw, scale, i * n, (i + 1) * n)


cdef void _small_backward(Net* net, const floating* x, const floating* dz, Py_ssize_t m,
                          int k, int n, floating* w, floating* dw, floating* b, floating* db,
                          floating* dx, const floating* a_prev, int act_prev,
                          OptSpec* opt, int jw, bint update, bint fold, double scale,
                          const floating* x_next, Py_ssize_t m_next) noexcept nogil:
    """Backward (and update) of one layer for a few rows; W's rows split across threads
    exactly as in ``_small_forward``. With ``x_next`` (first layer only, see
    ``_first_layer_fusable``) the same pass also computes the next batch's first-layer
    product X_next @ W into Z[0], through the rows just stepped."""
    cdef:
        int nthreads = _small_threads(net, k, n), t
        Py_ssize_t chunk, lo, hi
        floating neg = <floating>(-opt.lr * scale) if fold else 0
        floating* z_next = <floating*>net.Z[0]
    if x_next != NULL:
        if nthreads <= 1:
            _first_layer_step_forward_rows(x, dz, m, k, n, w, dw, opt, update, fold, scale,
                                           x_next, m_next, z_next, 0, k)
        else:
            chunk = (k + nthreads - 1) // nthreads
            for t in prange(nthreads, num_threads=nthreads, schedule='static'):
                lo = t * chunk
                hi = min(k, lo + chunk)
                _first_layer_step_forward_rows(
                    x, dz, m, k, n, w, dw, opt, update, fold, scale, x_next, m_next,
                    z_next if t == 0 else <floating*>net.scratch + (t - 1) * m_next * n,
                    lo, hi)
            _reduce_partials(net, z_next, m_next, n, nthreads)
    elif nthreads <= 1:
        _small_backward_rows(x, dz, m, k, n, w, dw, dx, a_prev, act_prev, opt, jw, update,
                             fold, scale, 0, k)
    else:
        chunk = (k + nthreads - 1) // nthreads
        for t in prange(nthreads, num_threads=nthreads, schedule='static'):
            lo = t * chunk
            hi = min(k, lo + chunk)
            _small_backward_rows(x, dz, m, k, n, w, dw, dx, a_prev, act_prev, opt, jw,
                                 update, fold, scale, lo, hi)
    if fold:
        _add_column_sums(dz, b, m, n, neg)
    else:
        _add_column_sums(dz, db, m, n, <floating>1)
        if update:
            _update_range(opt, jw + 1, b, db, scale, 0, n)


cdef void _blas_backward(const floating* x, floating* dz, Py_ssize_t m, int k, int n,
                         floating* w, floating* dw, floating* b, floating* db,
                         floating* dx, const floating* a_prev, int act_prev,
                         OptSpec* opt, int jw, bint update, bint fold,
                         double scale) noexcept nogil:
    """Backward of one layer with gemm; dX first, since the update changes W."""
    cdef:
        floating neg = <floating>(-opt.lr * scale) if fold else 0
        nnf_epilogue ep
    if dx != NULL:
        _backward_input(m, k, n, dz, w, dx, a_prev, act_prev)
    memset(&ep, 0, sizeof(nnf_epilogue))
    if fold:
        # plain SGD folded into the product: W += (-lr/M) X^T dZ, b += (-lr/M) sum dZ
        ep.colsum = <float*>b
        ep.colsum_alpha = <float>neg
        if not _matmul_nn_epilogue(k, n, m, neg, x, 1, k, dz, w, True, &ep):
            _matmul_nn(k, n, m, neg, x, 1, k, dz, w, True)
            _add_column_sums(dz, b, m, n, neg)
        return
    ep.colsum = <float*>db
    ep.colsum_alpha = 1
    if not _matmul_nn_epilogue(k, n, m, <floating>1, x, 1, k, dz, dw, True, &ep):
        _matmul_nn(k, n, m, <floating>1, x, 1, k, dz, dw, True)
        _add_column_sums(dz, db, m, n, <floating>1)
    if update:
        _update_array(opt, jw, w, dw, <Py_ssize_t>k * n, scale)
        _update_array(opt, jw + 1, b, db, n, scale)


def _small_matmul(str form, const floating[:, ::1] A, const floating[:, ::1] B,
                  floating[:, ::1] C, double alpha=1.0, bint accumulate=False,
                  bint threaded=False):
    """Test hook of the products (``_small_nn``, ``_small_nt``; with ``threaded``,
    ``_matmul_nn`` across the kernel threads): form "nn" C (+)= alpha A @ B, "tn"
    C (+)= alpha A^T @ B, "nt" C = A @ B^T (alpha 1, no accumulate)."""
    cdef:
        Py_ssize_t m = C.shape[0], n = C.shape[1], k
        int code = 0 if form == "nn" else 1 if form == "tn" else 2
        floating[::1] scratch
    if form == "nn":
        k = A.shape[1]
        _check(A.shape[0] == m and B.shape[0] == k and B.shape[1] == n, "nn shapes")
    elif form == "tn":
        k = A.shape[0]
        _check(A.shape[1] == m and B.shape[0] == k and B.shape[1] == n, "tn shapes")
    elif form == "nt":
        k = A.shape[1]
        _check(A.shape[0] == m and B.shape[0] == n and B.shape[1] == k, "nt shapes")
        _check(alpha == 1.0 and not accumulate, "nt takes alpha 1, no accumulate")
    else:
        raise ValueError("form must be nn, tn or nt")
    _check(m >= 1 and n >= 1 and k >= 1, "empty product")
    scratch = np.empty(k * n, dtype=np.float64 if floating is double else np.float32)
    with nogil:
        if threaded and code == 0:
            _matmul_nn(m, <int>n, k, <floating>alpha, &A[0, 0], k, 1, &B[0, 0], &C[0, 0],
                       accumulate)
        elif threaded and code == 1:
            _matmul_nn(m, <int>n, k, <floating>alpha, &A[0, 0], 1, m, &B[0, 0], &C[0, 0],
                       accumulate)
        elif code == 0:
            _small_nn(m, <int>n, k, <floating>alpha, &A[0, 0], k, 1, &B[0, 0], &C[0, 0],
                      accumulate)
        elif code == 1:
            _small_nn(m, <int>n, k, <floating>alpha, &A[0, 0], 1, m, &B[0, 0], &C[0, 0],
                      accumulate)
        else:
            _small_nt(m, <int>n, <int>k, &A[0, 0], &B[0, 0], &C[0, 0], &scratch[0])
    return C


def _epilogue_product(str form, const float[:, ::1] A, const float[:, ::1] B,
                      float[:, ::1] C, float[::1] bias=None, float[:, ::1] act=None,
                      const float[:, ::1] slope=None, float[::1] colsum=None,
                      double alpha=1.0, bint accumulate=False, bint fused=True):
    """Test hook of the hand products' epilogues, across the kernel threads:
    "nn" C = A @ B + bias, act = ReLU(C) (``_matmul_nn_epilogue``); "tn" C (+)= alpha
    A^T @ B, colsum += alpha * (B's column sums) (the same); "nt" C = A @ B^T, zeroed
    where slope <= 0 (``_matmul_nt``). With ``fused`` False, the product and then
    the separate passes the epilogues replace. Returns whether the kernel applied the
    epilogue (False: the separate passes ran, as they do where it would not)."""
    cdef:
        Py_ssize_t m = C.shape[0], n = C.shape[1], k
        nnf_epilogue ep
        bint done = False
        int code = 0 if form == "nn" else 1 if form == "tn" else 2
    memset(&ep, 0, sizeof(nnf_epilogue))
    if form == "nn":
        k = A.shape[1]
        _check(A.shape[0] == m and B.shape[0] == k and B.shape[1] == n, "nn shapes")
        _check(bias is not None and bias.shape[0] == n, "nn needs bias (n,)")
        _check(act is not None and act.shape[0] == m and act.shape[1] == n,
               "nn needs act (m, n)")
        _check(alpha == 1.0 and not accumulate, "nn takes alpha 1, no accumulate")
        ep.bias = &bias[0]
        ep.act = &act[0, 0]
        ep.ld_act = n
    elif form == "tn":
        k = A.shape[0]
        _check(A.shape[1] == m and B.shape[0] == k and B.shape[1] == n, "tn shapes")
        _check(colsum is not None and colsum.shape[0] == n, "tn needs colsum (n,)")
        ep.colsum = &colsum[0]
        ep.colsum_alpha = <float>alpha
    elif form == "nt":
        k = A.shape[1]
        _check(A.shape[0] == m and B.shape[0] == n and B.shape[1] == k, "nt shapes")
        _check(slope is not None and slope.shape[0] == m and slope.shape[1] == n,
               "nt needs slope (m, n)")
        _check(alpha == 1.0 and not accumulate, "nt takes alpha 1, no accumulate")
    else:
        raise ValueError("form must be nn, tn or nt")
    _check(m >= 1 and n >= 1 and k >= 1, "empty product")
    outs = [np.asarray(C)]
    ins = [np.asarray(A), np.asarray(B)]
    if act is not None:
        outs.append(np.asarray(act))
    if colsum is not None:
        outs.append(np.asarray(colsum))
    if bias is not None:
        ins.append(np.asarray(bias))
    if slope is not None:
        ins.append(np.asarray(slope))
    for i, o in enumerate(outs):
        for other in ins + outs[i + 1:]:
            _check(not np.shares_memory(o, other), "outputs overlap")
    with nogil:
        if code == 0:
            if fused:
                done = _matmul_nn_epilogue(m, <int>n, k, <float>1, &A[0, 0], k, 1, &B[0, 0],
                                           &C[0, 0], False, &ep)
            if not done:
                _matmul_nn(m, <int>n, k, <float>1, &A[0, 0], k, 1, &B[0, 0], &C[0, 0], False)
                _bias_activate(&C[0, 0], &bias[0], &act[0, 0], m, <int>n, RELU)
        elif code == 1:
            if fused:
                done = _matmul_nn_epilogue(m, <int>n, k, <float>alpha, &A[0, 0], 1, m,
                                           &B[0, 0], &C[0, 0], accumulate, &ep)
            if not done:
                _matmul_nn(m, <int>n, k, <float>alpha, &A[0, 0], 1, m, &B[0, 0], &C[0, 0],
                           accumulate)
                _add_column_sums(&B[0, 0], &colsum[0], k, <int>n, <float>alpha)
        else:
            done = _matmul_nt(m, <int>n, <int>k, &A[0, 0], &B[0, 0], &C[0, 0],
                              &slope[0, 0] if fused else NULL)
            if not done:
                _scale_by_slope(&C[0, 0], <float*>&slope[0, 0], m, <int>n, RELU)
    return done


cdef int64_t _count_correct(const floating* a, const floating* t, const int64_t* labels,
                            Py_ssize_t m, int n, int loss) noexcept nogil:
    """Rows classified right (argmax, first maximum wins) or, for binary cross-entropy,
    outputs on the right side of 0.5."""
    cdef:
        Py_ssize_t r, j, am, at
        int64_t c = 0
        const floating* ar
        const floating* tr
    if loss == MSE:
        return 0
    for r in range(m):
        ar = a + r * n
        if loss == BINARY_CROSS_ENTROPY:
            tr = t + r * n
            for j in range(n):
                c += (ar[j] > 0.5) == (tr[j] > 0.5)
            continue
        am = 0
        for j in range(1, n):
            if ar[j] > ar[am]:
                am = j
        if loss == CROSS_ENTROPY:
            c += am == labels[r]
        else:
            tr = t + r * n
            at = 0
            for j in range(1, n):
                if tr[j] > tr[at]:
                    at = j
            c += am == at
    return c


cdef double _net_forward(Net* net, const floating* x, Py_ssize_t m,
                         bint first_ready, int upto) noexcept nogil:
    """Forward pass of m rows through layers 0..upto-1; with ``first_ready`` Z[0] already
    holds X @ W0 (computed by the previous iteration's fused first-layer pass)."""
    cdef:
        int l, k, n
        const floating* inp = x
    for l in range(upto):
        k = net.width[l]
        n = net.width[l + 1]
        if l == 0 and first_ready:
            pass
        elif _hand_loops(net, m, k, n):
            _small_forward(net, inp, m, k, n, <floating*>net.W[l], <floating*>net.Z[l])
        elif net.act[l] == RELU and _forward_relu(net, l, inp, m):
            inp = <floating*>net.A[l]
            continue
        else:
            _matmul_nn(m, n, k, <floating>1, inp, k, 1, <floating*>net.W[l],
                       <floating*>net.Z[l], False)
        _bias_activate(<floating*>net.Z[l], <floating*>net.b[l], <floating*>net.A[l], m, n,
                       net.act[l])
        inp = <floating*>net.A[l]
    return 0


cdef inline bint _forward_relu(Net* net, int l, const floating* inp,
                               Py_ssize_t m) noexcept nogil:
    """Z[l] = inp @ W[l] + b[l] and A[l] = ReLU(Z[l]) in the product's kernel, where it
    takes the hand kernels (``_matmul_nn_epilogue``); else False, nothing done."""
    cdef nnf_epilogue ep
    memset(&ep, 0, sizeof(nnf_epilogue))
    ep.bias = <float*>net.b[l]
    ep.act = <float*>net.A[l]
    ep.ld_act = net.width[l + 1]
    return _matmul_nn_epilogue(m, net.width[l + 1], net.width[l], <floating>1, inp,
                               net.width[l], 1, <floating*>net.W[l], <floating*>net.Z[l],
                               False, &ep)


cdef inline int _row_split_threads(Net* net, Py_ssize_t m) noexcept nogil:
    """Threads for a row split of an m-row batch (1: the split's kernels on this thread),
    or 0 when the batch does not take the row split."""
    cdef Py_ssize_t t
    if net.split_scratch == NULL or m < ROW_SPLIT_MIN_BATCH:
        return 0
    t = min(<Py_ssize_t>min(_num_threads, net.scratch_threads), m // ROW_SPLIT_MIN_ROWS)
    return <int>t if t > 1 else 1


cdef void _split_layer_params(Net* net, int l, const floating* x, Py_ssize_t m, int tid,
                              int team, OptSpec* opt, bint update, bint fold,
                              double scale) noexcept nogil:
    """Thread ``tid``'s share of layer l's parameter gradient over all m rows: a block of
    W's rows (dW[i] = sum over rows of X[r, i] * dZ[r]) and a block of b's columns, each
    added to the gradient sums and stepped (with ``fold``, plain SGD on one micro-batch,
    applied to the parameters directly). Every element is summed by one thread in row
    order, so the result does not depend on the thread count."""
    cdef:
        int k = net.width[l], n = net.width[l + 1], j = 2 * l
        Py_ssize_t chunk, p0, p1, c0, c1, r
        const floating* inp = x if l == 0 else <floating*>net.A[l - 1]
        floating* g = <floating*>net.G[l]
        floating* w = <floating*>net.W[l]
        floating* dw = <floating*>net.dW[l]
        floating* bias = <floating*>net.b[l]
        floating* db = <floating*>net.db[l]
        floating neg = <floating>(-opt.lr * scale)
    chunk = (k + team - 1) // team
    p0 = min(<Py_ssize_t>k, tid * chunk)
    p1 = min(<Py_ssize_t>k, p0 + chunk)
    if p1 > p0:
        if fold:
            _small_nn(p1 - p0, n, m, neg, inp + p0, 1, k, g, w + p0 * n, True)
        else:
            _small_nn(p1 - p0, n, m, <floating>1, inp + p0, 1, k, g, dw + p0 * n, True)
            if update:
                _update_range(opt, j, w, dw, scale, p0 * n, p1 * n)
    chunk = (n + team - 1) // team
    c0 = min(<Py_ssize_t>n, tid * chunk)
    c1 = min(<Py_ssize_t>n, c0 + chunk)
    if c1 > c0:
        for r in range(m):
            _axpy(bias + c0 if fold else db + c0, neg if fold else <floating>1,
                  g + r * n + c0, c1 - c0)
        if update and not fold:
            _update_range(opt, j + 1, bias, db, scale, c0, c1)


cdef void _split_back_rows(Net* net, int l, Py_ssize_t r0, Py_ssize_t r1,
                           floating* scratch) noexcept nogil:
    """Rows r0..r1 of the gradient below layer l: G[l-1] = (G[l] @ W[l]^T) * act'."""
    cdef int k = net.width[l], n = net.width[l + 1]
    if r1 <= r0:
        return
    _small_nt(r1 - r0, k, n, <floating*>net.G[l] + r0 * n, <floating*>net.W[l],
              <floating*>net.G[l - 1] + r0 * k, scratch)
    _scale_by_slope_rows(<floating*>net.G[l - 1], <floating*>net.A[l - 1], k,
                         net.act[l - 1], r0, r1)


cdef void _split_worker(Net* net, const floating* x, Py_ssize_t m, const floating* t,
                        const int64_t* labels, int loss, OptSpec* opt, bint update,
                        bint fold, double scale, bint count,
                        const RowSource* src) noexcept nogil:
    """One thread's part of ``_net_iteration_split`` (run by every thread of the team).

    Rows are split for what is row by row (forward, loss, the gradients w.r.t. the
    layer outputs); parameters are split for what sums over rows (dW, db, the step).
    Barriers order the two: after the forward and the last layer's backward rows (all
    losses known, G[last] and G[last-1] complete), and after each lower layer's backward
    rows (so no thread still reads W[l] when its rows are stepped). With ``src`` each
    thread first gathers its block of rows into x, t and labels (the batch buffers):
    only it reads them before the first barrier."""
    cdef:
        int tid = nnf_thread_num(), team = nnf_team_size(), i
        int L = net.n_layers, last = net.n_layers - 1, l, k, n, n_out = net.width[L]
        Py_ssize_t chunk = (m + team - 1) // team
        Py_ssize_t r0 = min(m, tid * chunk), r1 = min(m, tid * chunk + chunk)
        double total = 0
        const floating* inp = x
        floating* scratch = <floating*>net.split_scratch + tid * net.n_params
    if r1 > r0 and src != NULL and not _gather_rows_range(
            <floating*>src.X, net.width[0], <floating*>src.T, n_out, src.labels, src.rows,
            <floating*>x, <floating*>t, <int64_t*>labels, r0, r1, src.check):
        net.split_loss[tid] = NAN  # NaN or inf in X (src.check): the team stops below
        r1 = r0
    if r1 > r0:  # (split_loss and split_correct were zeroed by the caller)
        for l in range(L):
            k = net.width[l]
            n = net.width[l + 1]
            _small_nn(r1 - r0, n, k, <floating>1, inp + r0 * k, k, 1, <floating*>net.W[l],
                      <floating*>net.Z[l] + r0 * n, False)
            _bias_activate_rows(<floating*>net.Z[l], <floating*>net.b[l],
                                <floating*>net.A[l], n, net.act[l], r0, r1)
            inp = <floating*>net.A[l]
        net.split_loss[tid] = _loss_rows(<floating*>net.Z[last], <floating*>net.A[last],
                                         <floating*>t, <int64_t*>labels,
                                         <floating*>net.G[last], n_out, loss,
                                         net.act[last], r0, r1)
        if count:
            net.split_correct[tid] = _count_correct(
                <floating*>net.A[last] + r0 * n_out,
                t + r0 * n_out if t != NULL else NULL,
                labels + r0 if labels != NULL else NULL, r1 - r0, n_out, loss)
        if last > 0:
            _split_back_rows(net, last, r0, r1, scratch)
    nnf_barrier()
    for i in range(team):
        total += net.split_loss[i]
    if isnan(total) or isinf(total):
        return  # every thread sees the same total: all leave, no barrier is skipped
    for l in range(last, -1, -1):
        _split_layer_params(net, l, x, m, tid, team, opt, update, fold, scale)
        if l >= 2:
            _split_back_rows(net, l - 1, r0, r1, scratch)
            nnf_barrier()


cdef inline void _team_begin(Net* net, int nsplit, OptSpec* opt, bint update) noexcept nogil:
    """Before a team region (row or tail split): clear the per-thread results (a team
    smaller than asked leaves the last entries alone) and begin the step."""
    cdef int i
    for i in range(nsplit):
        net.split_loss[i] = 0
        net.split_correct[i] = 0
    if update:
        _begin_step(opt)  # undone by _team_end when the loss is not finite


cdef inline double _team_end(Net* net, int nsplit, int64_t* correct, OptSpec* opt,
                             long step0) noexcept nogil:
    """After a team region: the summed loss (per-thread sums in thread order) and, into
    ``correct`` (or NULL), the right answers; a step begun for a non-finite loss is
    undone."""
    cdef:
        int i
        double total = 0
        int64_t right = 0
    for i in range(nsplit):
        total += net.split_loss[i]
        right += net.split_correct[i]
    if correct != NULL:
        correct[0] = right
    if isnan(total) or isinf(total):
        opt.step = step0
    return total


cdef double _net_iteration_split(Net* net, const floating* x, Py_ssize_t m,
                                 const floating* t, const int64_t* labels, int loss,
                                 OptSpec* opt, bint update, bint fold, double scale,
                                 int64_t* correct, int nsplit,
                                 const RowSource* src) noexcept nogil:
    """``_net_iteration`` for small networks: every product of such a network is too
    small for gemm's packing to pay or to split across threads, so one parallel region
    runs the whole iteration (``_split_worker``): each thread takes a block of the batch's
    rows through forward, loss and backward, and a block of every parameter array
    through its gradient sum and step; the products are the small kernels. With
    ``nsplit`` 1 the worker runs on this thread, without a region."""
    cdef long step0 = opt.step
    _team_begin(net, nsplit, opt, update)
    if nsplit == 1:
        _split_worker(net, x, m, t, labels, loss, opt, update, fold, scale, correct != NULL,
                      src)
    else:
        with parallel(num_threads=nsplit):
            _split_worker(net, x, m, t, labels, loss, opt, update, fold, scale,
                          correct != NULL, src)
    return _team_end(net, nsplit, correct, opt, step0)


# The tail split: a narrow last layer (the 10 classes of A and C) and the loss run as one
# parallel region with a row split (the kernels of the row split above), where they would
# otherwise be five serial gemm and epilogue calls too small to split across threads.
# Each thread takes a block of the batch's rows through the last layer's forward, the
# loss and the gradient below the layer (which the lower layers' backward needs whole:
# one barrier), then a block of the layer's parameters through the sum over all rows and
# the step, as ``_split_worker`` does.
cdef bint TAIL_SPLIT = True
cdef int TAIL_SPLIT_MAX_OUTPUTS = 15  # last layers at most this wide


def _set_tail_split(bint on):
    """Turn the tail split (``_net_tail_split``) on or off (for measuring it and for
    testing both paths); returns the previous setting."""
    global TAIL_SPLIT
    old = TAIL_SPLIT
    TAIL_SPLIT = on
    return old


cdef inline int _tail_split_threads(Net* net, Py_ssize_t m) noexcept nogil:
    """Threads for the tail split of an m-row batch (1: its kernels on this thread), or 0
    where the batch's last layer takes the general path: small batches, whose hand loops
    split the layer's parameters instead, and nets without a tail split (``tail_scratch``)."""
    cdef int last = net.n_layers - 1
    cdef Py_ssize_t t
    if (not TAIL_SPLIT or net.tail_scratch == NULL
            or _hand_loops(net, m, net.width[last], net.width[last + 1])):
        return 0
    t = min(<Py_ssize_t>min(_num_threads, net.scratch_threads), m // ROW_SPLIT_MIN_ROWS)
    return <int>t if t > 1 else 1


cdef void _tail_worker(Net* net, Py_ssize_t m, const floating* t, const int64_t* labels,
                       int loss, OptSpec* opt, bint update, bint fold, double scale,
                       bint count) noexcept nogil:
    """One thread's part of ``_net_tail_split`` (run by every thread of the team)."""
    cdef:
        int tid = nnf_thread_num(), team = nnf_team_size(), i
        int last = net.n_layers - 1, k = net.width[last], n = net.width[last + 1]
        Py_ssize_t chunk = (m + team - 1) // team
        Py_ssize_t r0 = min(m, tid * chunk), r1 = min(m, tid * chunk + chunk)
        double total = 0
        floating* scratch = <floating*>net.tail_scratch + <Py_ssize_t>tid * k * n
    if r1 > r0:  # (split_loss and split_correct were zeroed by the caller)
        _small_nn(r1 - r0, n, k, <floating>1, <floating*>net.A[last - 1] + r0 * k, k, 1,
                  <floating*>net.W[last], <floating*>net.Z[last] + r0 * n, False)
        _bias_activate_rows(<floating*>net.Z[last], <floating*>net.b[last],
                            <floating*>net.A[last], n, net.act[last], r0, r1)
        net.split_loss[tid] = _loss_rows(<floating*>net.Z[last], <floating*>net.A[last],
                                         <floating*>t, <int64_t*>labels,
                                         <floating*>net.G[last], n, loss, net.act[last],
                                         r0, r1)
        if count:
            net.split_correct[tid] = _count_correct(
                <floating*>net.A[last] + r0 * n, t + r0 * n if t != NULL else NULL,
                labels + r0 if labels != NULL else NULL, r1 - r0, n, loss)
        _split_back_rows(net, last, r0, r1, scratch)
    nnf_barrier()  # G[last] whole (for the parameter sums), W[last] read by every thread
    for i in range(team):
        total += net.split_loss[i]
    if isnan(total) or isinf(total):
        return
    _split_layer_params(net, last, <floating*>NULL, m, tid, team, opt, update, fold, scale)


cdef double _net_tail_split(Net* net, Py_ssize_t m, const floating* t,
                            const int64_t* labels, int loss, OptSpec* opt, bint update,
                            bint fold, double scale, int64_t* correct,
                            int nsplit) noexcept nogil:
    """The last layer and the loss of an m-row iteration, forward and backward, on
    ``nsplit`` threads (``_tail_worker``); layers below have run forward. Leaves G[last-1]
    for the layer below and, when the loss is finite, the last layer's gradient summed
    (and stepped when ``update``, the step begun here). Returns the summed loss."""
    cdef long step0 = opt.step
    net.tail_iterations += 1
    _team_begin(net, nsplit, opt, update)
    if nsplit == 1:
        _tail_worker(net, m, t, labels, loss, opt, update, fold, scale, correct != NULL)
    else:
        with parallel(num_threads=nsplit):
            _tail_worker(net, m, t, labels, loss, opt, update, fold, scale, correct != NULL)
    return _team_end(net, nsplit, correct, opt, step0)


cdef bint FIRST_LAYER_FUSION = True


def _set_first_layer_fusion(bint on):
    """Turn the fused first-layer pass (``_first_layer_fusable``) on or off (for measuring
    it and for testing both paths); returns the previous setting."""
    global FIRST_LAYER_FUSION
    old = FIRST_LAYER_FUSION
    FIRST_LAYER_FUSION = on
    return old


cdef inline bint _first_layer_fusable(Net* net, const floating* typed, Py_ssize_t m,
                                      Py_ssize_t m_next) noexcept nogil:
    """Whether an m-row iteration followed by an m_next-row one may fuse the first layer's
    backward with the next forward: both batches on the hand loops (whose passes step W0
    row by row, so a row is final as soon as its pass is done) with the same row split of
    W0, and wide rows (the narrow-row kernels keep their outputs in registers instead)."""
    cdef int k = net.width[0], n = net.width[1]
    if not FIRST_LAYER_FUSION or _narrow(<floating*>typed, n):
        return False
    return (_row_split_threads(net, m) == 0 and _row_split_threads(net, m_next) == 0
            and _hand_loops(net, m, k, n) and _hand_loops(net, m_next, k, n))


cdef double _net_iteration(Net* net, const floating* x, Py_ssize_t m, const floating* t,
                           const int64_t* labels, int loss, OptSpec* opt, bint update,
                           bint fold, double scale, int64_t* correct, bint first_ready,
                           const floating* x_next, Py_ssize_t m_next,
                           const RowSource* src) noexcept nogil:
    """Forward, loss, backward (and the step when ``update``) for one batch of m rows.

    ``first_ready``: Z[0] already holds X @ W0. ``x_next`` (or NULL): the next batch, of
    m_next rows, whose first-layer product the first layer's backward pass computes
    (only where ``_first_layer_fusable``; see ``_first_layer_step_forward_rows``).
    ``src`` (or NULL): where the batch's rows are still to be gathered from, into x, t
    and labels (by the row split's threads, or here first).
    Returns the summed loss; when it is not finite nothing is accumulated or updated
    (and the next batch's product is not computed)."""
    cdef:
        int L = net.n_layers, l, k, n, last = net.n_layers - 1
        double total
        const floating* inp
        floating* dx
        floating* a_prev
        int nsplit = _row_split_threads(net, m), ntail, top
    if nsplit > 0:
        return _net_iteration_split(net, x, m, t, labels, loss, opt, update, fold, scale,
                                    correct, nsplit, src)
    if src != NULL and not _gather_batch(
            <floating*>src.X, net.width[0], <floating*>src.T, net.width[L], src.labels,
            src.rows, m, <floating*>x, <floating*>t, <int64_t*>labels, src.check):
        return NAN
    ntail = _tail_split_threads(net, m)
    if ntail > 0:
        _net_forward(net, x, m, first_ready, last)
        total = _net_tail_split(net, m, t, labels, loss, opt, update, fold, scale, correct,
                                ntail)
        if isnan(total) or isinf(total):
            return total
        top = last - 1
    else:
        _net_forward(net, x, m, first_ready, L)
        total = _loss(<floating*>net.Z[last], <floating*>net.A[last], <floating*>t,
                      <int64_t*>labels, <floating*>net.G[last], m, net.width[L], loss,
                      net.act[last])
        if correct != NULL:
            correct[0] = _count_correct(<floating*>net.A[last], t, labels, m,
                                        net.width[L], loss)
        if isnan(total) or isinf(total):
            return total
        if update:
            _begin_step(opt)
        top = last
    for l in range(top, -1, -1):
        k = net.width[l]
        n = net.width[l + 1]
        inp = x if l == 0 else <floating*>net.A[l - 1]
        dx = <floating*>net.G[l - 1] if l > 0 else NULL
        a_prev = <floating*>net.A[l - 1] if l > 0 else NULL
        if _hand_loops(net, m, k, n):
            _small_backward(net, inp, <floating*>net.G[l], m, k, n, <floating*>net.W[l],
                            <floating*>net.dW[l], <floating*>net.b[l], <floating*>net.db[l],
                            dx, a_prev, net.act[l - 1] if l > 0 else IDENTITY,
                            opt, 2 * l, update, fold, scale,
                            x_next if l == 0 else NULL, m_next)
        else:
            _blas_backward(inp, <floating*>net.G[l], m, k, n, <floating*>net.W[l],
                           <floating*>net.dW[l], <floating*>net.b[l], <floating*>net.db[l],
                           dx, a_prev, net.act[l - 1] if l > 0 else IDENTITY,
                           opt, 2 * l, update, fold, scale)
    return total


cdef Py_ssize_t GATHER_AHEAD = 3  # rows of X asked into L2 ahead of their copy (_simd.h)


def _set_gather_ahead(Py_ssize_t rows):
    """GATHER_AHEAD (0: no prefetch; for measurement); returns the old value."""
    global GATHER_AHEAD
    if rows < 0:
        raise ValueError("rows must be >= 0")
    old = GATHER_AHEAD
    GATHER_AHEAD = rows
    return old


cdef bint _gather_rows_range(const floating* X, Py_ssize_t d, const floating* T,
                             Py_ssize_t kt, const int64_t* labels, const int64_t* rows,
                             floating* xbuf, floating* tbuf, int64_t* lbuf, Py_ssize_t r0,
                             Py_ssize_t r1, bint check) noexcept nogil:
    """Rows r0..r1 of the batch buffers <- rows ``rows[r0..r1)`` of X, T and labels.
    With ``check``, returns whether every copied row of X is finite (each row is looked
    at right after its copy, while it is in L1), else True."""
    cdef:
        Py_ssize_t r, src, ahead = GATHER_AHEAD
        long row_bytes = d * sizeof(floating)
        bint finite = True
    for r in range(r0, min(r1, r0 + ahead)):
        nnf_prefetch_l2(X + rows[r] * d, row_bytes)
    for r in range(r0, r1):
        if r + ahead < r1:
            nnf_prefetch_l2(X + rows[r + ahead] * d, row_bytes)
        src = rows[r]
        if check:
            finite &= _copy_finite(xbuf + r * d, X + src * d, d)
        else:
            memcpy(xbuf + r * d, X + src * d, d * sizeof(floating))
        if T != NULL:
            memcpy(tbuf + r * kt, T + src * kt, kt * sizeof(floating))
        if labels != NULL:
            lbuf[r] = labels[src]
    return finite


cdef bint _gather_batch(const floating* X, Py_ssize_t d, const floating* T, Py_ssize_t kt,
                        const int64_t* labels, const int64_t* rows, Py_ssize_t m,
                        floating* xbuf, floating* tbuf, int64_t* lbuf,
                        bint check) noexcept nogil:
    """Batch buffers <- the rows ``rows[0..m)`` of X, T and labels; with ``check``,
    returns whether those rows of X are finite (else True). Split across threads
    for large batches: the rows are scattered over all of X, so each copy waits on
    memory (rows of 784 floats out of 60,000, C microbenchmark: 512 rows 263 -> 149 us on
    two threads, 128 rows 69 -> 42 us, 64 rows 25 -> 16 us; an A/512 step is ~5 ms).
    All of the gather's cost in training, the upper bound for hiding it: A/512 unshuffled
    (no gather) against shuffled, same model, 11 interleaved pairs, 1.026x."""
    cdef:
        int nthreads = _threads_for(<double>m * (d + kt)), t
        int bad = 0
        Py_ssize_t chunk
    if nthreads <= 1:
        return _gather_rows_range(X, d, T, kt, labels, rows, xbuf, tbuf, lbuf, 0, m, check)
    chunk = (m + nthreads - 1) // nthreads
    for t in prange(nthreads, num_threads=nthreads, schedule='static'):
        bad += not _gather_rows_range(X, d, T, kt, labels, rows, xbuf, tbuf, lbuf,
                                      t * chunk, min(m, (t + 1) * chunk), check)
    return bad == 0


cdef bint _rows_finite(const floating* X, Py_ssize_t d, const int64_t* order,
                       Py_ssize_t start, Py_ssize_t m) noexcept nogil:
    """Whether the epoch's rows start..start+m (rows ``order[start..start+m)`` of X, or
    with ``order`` NULL the rows from ``start`` on) are finite: the input check of the
    unit split's runs, which read their rows in place."""
    cdef:
        Py_ssize_t r, ahead = GATHER_AHEAD
        long row_bytes = d * sizeof(floating)
        const int64_t* rows = order + start
        bint finite = True
    if order == NULL:
        return _finite_span(X + start * d, m * d)
    for r in range(min(m, ahead)):
        nnf_prefetch_l2(X + rows[r] * d, row_bytes)
    for r in range(m):
        if r + ahead < m:
            nnf_prefetch_l2(X + rows[r + ahead] * d, row_bytes)
        finite &= _finite_span(X + rows[r] * d, d)
    return finite


cdef Py_ssize_t _net_run(Net* net, const floating* X, Py_ssize_t d, const floating* T,
                         Py_ssize_t kt, const int64_t* labels, const int64_t* order,
                         Py_ssize_t n_samples, Py_ssize_t bs, Py_ssize_t it0, Py_ssize_t it1,
                         Py_ssize_t n_iters, int accumulate, int loss, OptSpec* opt,
                         bint fold_ok, floating* xbuf, floating* tbuf, int64_t* lbuf,
                         double* out_loss, int64_t* out_correct, int64_t* group,
                         int64_t* steps, bint check_x) noexcept nogil:
    """Iterations it0..it1-1 of an epoch: gather (when ``order``), iterate, step every
    ``accumulate`` iterations and at the epoch's end. ``group`` = [micro-batches,
    samples] of the open accumulation group, carried across calls. Returns the index of
    an iteration whose loss was not finite (it stopped there), else -1.

    Batches of 1 to UNIT_SPLIT_MAX_BATCH rows stepping every batch on several threads
    run as one parallel region instead (``_unit_split_threads``, ``_unit_split_run``). Elsewhere, where
    ``_first_layer_fusable``, batch it + 1 is fetched before batch it runs, and
    batch it's first-layer backward computes batch it + 1's first product
    (``first_ready`` for the next iteration); within one call only, so the workspace
    holds the last batch's values when the call returns.

    With ``check_x`` (fit's first epoch, when X was not scanned for NaN/inf before it),
    every batch's rows of X are checked before the batch is used, while the gather has
    them in cache: a batch holding NaN or inf stops the run there as a non-finite loss
    does (its loss reads NaN), and ``fit`` tells the two apart."""
    cdef:
        Py_ssize_t it, start, m, m_next = 0
        Batch cur, nxt, spare
        RowSource src
        bint update, fold, fuse, first_ready = False, deferred
        double total
        Batch bufs = Batch(<void*>xbuf, <void*>tbuf, lbuf)
        int team
    team = _unit_split_threads(net, bs, accumulate, fold_ok, group)
    if (team > 0 and (it1 - it0) * bs >= UNIT_SPLIT_MIN_SAMPLES
            and _unit_blocks_room(net, X, team, bs, not fold_ok) == 0
            and (not check_x or _rows_finite(X, d, order, it0 * bs,
                                             min(it1 * bs, n_samples) - it0 * bs))):
        # (with NaN or inf in the rows, the loop below runs them and stops at their batch)
        return _unit_split_run(net, X, d, T, kt, labels, order, n_samples, bs, it0, it1,
                               loss, opt, out_loss, out_correct, steps, team, fold_ok)
    # with the fused first-layer pass, batch it + 1 is gathered while batch it is still in
    # use: the two take turns in the plan's buffers and the net's own small ones
    spare = Batch(net.next_x, net.next_t, net.next_labels)
    for it in range(it0, it1):
        start = it * bs
        m = min(bs, n_samples - start)
        deferred = False
        if not first_ready:  # else the previous iteration fetched this batch into cur
            deferred = order != NULL and _row_split_threads(net, m) > 1
            if deferred:  # each thread of the row split gathers (and checks) its own rows
                src = RowSource(X, T, labels, order + start, check_x)
                cur.x = bufs.x
                cur.t = bufs.t if T != NULL else <void*>NULL
                cur.labels = bufs.labels if labels != NULL else <int64_t*>NULL
            elif not _fetch_batch(X, d, T, kt, labels, order, start, m, bufs, &cur, check_x):
                out_loss[it - it0] = NAN
                return it
        fuse = False
        if it + 1 < it1 and net.next_x != NULL:
            m_next = min(bs, n_samples - start - bs)
            fuse = m_next <= net.scratch_rows and _first_layer_fusable(net, X, m, m_next)
            if fuse:  # (not with NaN or inf in it: the next iteration fetches it again)
                fuse = _fetch_batch(X, d, T, kt, labels, order, start + bs, m_next,
                                    spare if cur.x == bufs.x else bufs, &nxt, check_x)
        group[0] += 1
        group[1] += m
        update = group[0] == accumulate or it == n_iters - 1
        fold = fold_ok and update and group[0] == 1
        total = _net_iteration(net, <floating*>cur.x, m, <floating*>cur.t, cur.labels, loss,
                               opt, update, fold, 1.0 / group[1], &out_correct[it - it0],
                               first_ready, <floating*>nxt.x if fuse else NULL, m_next,
                               &src if deferred else NULL)
        out_loss[it - it0] = total
        if isnan(total) or isinf(total):
            return it
        if update:
            group[0] = 0
            group[1] = 0
            steps[0] += 1
        first_ready = fuse
        if fuse:
            cur = nxt
            net.fused_iterations += 1
    return -1


cdef bint _fetch_batch(const floating* X, Py_ssize_t d, const floating* T, Py_ssize_t kt,
                       const int64_t* labels, const int64_t* order, Py_ssize_t start,
                       Py_ssize_t m, Batch buf, Batch* b, bint check) noexcept nogil:
    """The batch of rows start..start+m of the epoch into ``b``: gathered into ``buf``
    when the epoch is shuffled (``order``), else pointers into X, T and labels. A single
    row is contiguous where it lies, so it is never copied (in-process A/B, batch 1: B/1
    1.02-1.03x, A/1 1.01-1.02x). With ``check``, returns whether the batch's rows of X
    are finite (else True)."""
    cdef Py_ssize_t row
    if order != NULL and m == 1:
        row = order[start]
        b.x = <void*>(X + row * d)
        b.t = <void*>(T + row * kt) if T != NULL else NULL
        b.labels = <int64_t*>(labels + row) if labels != NULL else NULL
    elif order != NULL:
        b.x = buf.x
        b.t = buf.t if T != NULL else NULL
        b.labels = buf.labels if labels != NULL else NULL
        return _gather_batch(X, d, T, kt, labels, order + start, m, <floating*>buf.x,
                             <floating*>buf.t, buf.labels, check)
    else:
        b.x = <void*>(X + start * d)
        b.t = <void*>(T + start * kt) if T != NULL else NULL
        b.labels = <int64_t*>(labels + start) if labels != NULL else NULL
    return not check or _finite_span(<floating*>b.x, m * d)


# The unit split: small batches (1 to UNIT_SPLIT_MAX_BATCH rows, any optimizer) stepping
# every batch on several threads, the whole run in one parallel region with one barrier
# per batch. Thread t owns a block U_t of the first
# hidden layer's units: columns U_t of W0 and b0 and rows U_t of W1. Its forward
# (z0[U_t], a0[U_t], a0[U_t] @ W1[U_t] as a partial of z1), its backward below z1
# (dX of layer 1 on its rows, which is d a0[U_t], and the steps of its rows of W1 and
# columns of W0) and the next sample's first product (fused with the W0 step, as in
# _first_layer_step_forward_rows) need nothing from another thread. Only z1 is shared:
# after the barrier every thread sums the partials (in thread order) and runs the rest
# of the network, the "tail" (b1 and the layers above), on its own copy of the tail's
# parameters, with identical inputs, operations and alignment, so every copy takes the
# same values; thread 0's copy is the model's own arrays. The row-split hand loops need
# three fork/joins per sample and leave the tail to one thread while the others wait
# (A/1 on 2 threads: libgomp spin-waits 14 % of the samples). Batches of m rows do the
# same for the m rows at once (_unit_batch_worker), with any optimizer: against the row
# split and hand loops (in-process A/B, 2 threads, plain SGD) A/8 1.34-1.36x, A/32
# 1.02x, B/32 1.22x on a calm VM, and A/8 1.70x, A/32 1.39-1.41x, A/64 1.23-1.30x, B/32
# 2.39-2.52x, B/64 2.03-2.15x in its slow spells, when the cores are slow to talk to
# each other: the row split moves W's rows and the batch's activations between the
# cores every batch, here only the partials of z1 cross. With momentum A/8 3.98x, B/32
# 3.47x. A/128 0.90x (gemm wins), hence the limit.
cdef bint UNIT_SPLIT = True
# fewest first-layer units a thread gets, and the largest tail (parameters replicated
# on every thread: the tail is not split, every thread computes all of it)
cdef Py_ssize_t UNIT_SPLIT_MIN_UNITS = 16
cdef Py_ssize_t UNIT_SPLIT_MAX_TAIL = 16384
# smallest layers 0 and 1 (weights) worth the region on several threads
cdef Py_ssize_t UNIT_SPLIT_MIN_PARAMS = 0
# fewest samples in a run (each run copies W0, and its optimizer state, into the
# threads' blocks and back)
cdef Py_ssize_t UNIT_SPLIT_MIN_SAMPLES = 64
# the largest batch it takes (plans made later hold that many rows in the tail copies)
cdef Py_ssize_t UNIT_SPLIT_MAX_BATCH = 64
# at batch 2, and at batch 1 with an optimizer other than plain SGD (those take
# _unit_batch_worker), the largest first layer (weights) it takes: the hand loops' fused
# step and next forward win on a large one (in-process A/B: A/2 0.93x plain SGD, 0.99x
# momentum, A/1 0.86x momentum; B/2 1.35x, 1.41x, B/1 1.28x momentum, 1.60x Adam)
cdef double UNIT_SPLIT_BATCH2_MAX_W0 = 65536
# and at most this many bytes of rows of Z, A, G in each thread's copy of the tail
# (A: 138 values a row, 64 rows in 106 KB; B: 10 values a row)
cdef size_t UNIT_SPLIT_TAIL_ROW_BYTES = 1 << 20
# At batch 1 with plain SGD, the first layer's steps are applied UNIT_LAZY_BLOCK samples
# at a time (0: every sample; 4 or 8). A sample's step changes W0 by neg * x outer dz, so
# the next sample's z0 = x' @ W0 can be had as x' @ W0_then + neg * (x' . x) dz: each
# block of samples is one pass over W0 (their steps, then the next block's products,
# ``nnf_*block_pass*``) plus, per sample, a few axpys of the earlier samples' dz with
# their dot products. Exact but for rounding (the products and dots are summed in another
# order than the step-by-step pass). One pass a sample is bound by the L2 cache, a load
# and a store of every weight a sample; the blocked pass by its FMAs, so it is the
# default only where they are 512 bits wide (NNF_LAZY_BLOCK, _simd.h). A/1 training,
# 2 threads, Zen 5: 1.20-1.38x in-process against a pass a sample; against the build
# before it, processes alternated, 1.45x (1.3-1.7x with 80 % of the inputs 0).
cdef int UNIT_LAZY_BLOCK = NNF_LAZY_BLOCK
cdef int UNIT_LAZY_MAX = 8


def checks_batches_cheaply(Py_ssize_t batch_size):
    """Whether ``_net_run``'s ``check_x`` costs about nothing on batches of ``batch_size``
    rows: where rows are gathered (``_gather_rows_range`` checks each row as it copies it,
    8 us of an A/512 step, against 47 us for its share of a pass over all of X), but not
    on the unit split's batches, whose check is a pass of its own over each run's rows
    ahead of it (in-process A/B against the pass over all of X: B/1 0.986x, A/8 0.975x)."""
    return not UNIT_SPLIT or batch_size > UNIT_SPLIT_MAX_BATCH


def _set_unit_split(bint on, Py_ssize_t min_params=-1, Py_ssize_t min_samples=-1,
                    Py_ssize_t max_batch=-1):
    """Turn the unit split (``_unit_split_run``) on or off, and optionally set the
    smallest first two layers (in weights) that take it, the fewest samples of a run
    and the largest batch; for measuring it and for testing both paths. Returns the
    previous (on, min_params, min_samples, max_batch). The largest batch applies to
    plans made after the call (a plan's tail copies hold that many rows)."""
    global UNIT_SPLIT, UNIT_SPLIT_MIN_PARAMS, UNIT_SPLIT_MIN_SAMPLES, UNIT_SPLIT_MAX_BATCH
    old = (UNIT_SPLIT, UNIT_SPLIT_MIN_PARAMS, UNIT_SPLIT_MIN_SAMPLES, UNIT_SPLIT_MAX_BATCH)
    UNIT_SPLIT = on
    if min_params >= 0:
        UNIT_SPLIT_MIN_PARAMS = min_params
    if min_samples >= 1:
        UNIT_SPLIT_MIN_SAMPLES = min_samples
    if max_batch >= 1:
        UNIT_SPLIT_MAX_BATCH = max_batch
    return old


def _set_unit_lazy_block(int samples):
    """Set how many samples' first-layer steps the unit split applies in one pass at
    batch 1 with plain SGD (``UNIT_LAZY_BLOCK``: 0 for one pass a sample, or 4 or 8);
    for measuring it and testing both paths. Returns the previous value."""
    global UNIT_LAZY_BLOCK
    if samples not in (0, 4, 8):
        raise ValueError(f"samples must be 0, 4 or 8, got {samples}")
    old = UNIT_LAZY_BLOCK
    UNIT_LAZY_BLOCK = samples
    return old


cdef inline Py_ssize_t _unit_tail_params(Net* net) noexcept nogil:
    """Parameters of the tail: b1 and every layer above layer 1."""
    cdef:
        Py_ssize_t total = net.width[2]
        int l
    for l in range(2, net.n_layers):
        total += <Py_ssize_t>net.width[l] * net.width[l + 1] + net.width[l + 1]
    return total


cdef inline int _unit_split_threads(Net* net, Py_ssize_t bs, int accumulate, bint fold_ok,
                                    const int64_t* group) noexcept nogil:
    """Threads for a unit-split run, or 0 when the run does not take it: batches of at
    most ``unit_rows`` stepping every batch (the steps of different threads' blocks
    then need no ordering), at least two threads with UNIT_SPLIT_MIN_UNITS units each,
    and at batch 2 (or 1, but for plain SGD) a first layer of at most
    UNIT_SPLIT_BATCH2_MAX_W0 weights."""
    cdef int t = min(_num_threads, net.scratch_threads)
    if (not UNIT_SPLIT or net.unit_view == NULL or bs < 1 or bs > net.unit_rows
            or accumulate != 1 or group[0] != 0 or t < 2):
        return 0
    if ((bs == 2 or (bs == 1 and not fold_ok))
            and <double>net.width[0] * net.width[1] > UNIT_SPLIT_BATCH2_MAX_W0):
        return 0
    if (<double>net.width[0] * net.width[1] + <double>net.width[1] * net.width[2]
            < UNIT_SPLIT_MIN_PARAMS):
        return 0
    t = min(t, <int>(net.width[1] // UNIT_SPLIT_MIN_UNITS))
    return t if t >= 2 else 0


cdef inline Py_ssize_t _unit_bound(Net* net, const floating* typed, int t,
                                   int team) noexcept nogil:
    """First unit of thread t's block (t == team: the end), on a 64-byte boundary of a
    row: the same for every model of these widths, so the sums (and the results) do not
    depend on where the arrays lie."""
    cdef Py_ssize_t n1 = net.width[1], q = 64 // sizeof(floating)
    if t <= 0:
        return 0
    if t >= team:
        return n1
    return min(n1, ((n1 * t) // team + q // 2) // q * q)


cdef inline Py_ssize_t _unit_ld(Net* net, const floating* typed, int t,
                                int team) noexcept nogil:
    """Row length of thread t's private block of W0: its units, rounded up to a
    64-byte line."""
    cdef Py_ssize_t q = 64 // sizeof(floating)
    return (_unit_bound(net, typed, t + 1, team) - _unit_bound(net, typed, t, team)
            + q - 1) // q * q


cdef inline Py_ssize_t _up(Py_ssize_t v, Py_ssize_t q) noexcept nogil:
    return (v + q - 1) // q * q


cdef floating* _unit_block(Net* net, const floating* typed, int t, int team,
                           Py_ssize_t rows, bint full) noexcept nogil:
    """Thread t's private block for batches of ``rows``: width[0] rows of ``_unit_ld``
    values (its columns of W0), then ``rows`` rows each of its slices of z0, a0 and
    d z0, one row for its slice of b0, and with rows > 1 its copy of the batch
    (``_unit_batch_len``); with ``full`` (optimizers that keep gradient sums and state)
    then the gradient sums of its W0 columns and b0 slice, and their s1 and s2 state,
    laid out as W0's columns and b0's slice. The team's blocks lie one after another in
    ``unit_blocks``, each row on its own cache lines: nothing a thread writes every
    sample shares a line with another thread's (on Z0, 4 lines of 64 bytes written by
    both threads made A/1's first-layer pass 2-3x slower)."""
    return <floating*>net.unit_blocks + _unit_block_offset(net, typed, t, team, rows, full)


cdef inline Py_ssize_t _unit_lazy_len(Net* net, const floating* typed, int t,
                                      int team) noexcept nogil:
    """Values of a batch-1 block's room for the lazy first layer (``UNIT_LAZY_BLOCK``),
    laid out in ``_unit_split_worker``: dz0 and z0 rows of UNIT_LAZY_MAX samples, their
    inputs and steps' factors, their dot products and a flag byte per row of W0."""
    cdef Py_ssize_t q = 64 // sizeof(floating), n0 = net.width[0], K = UNIT_LAZY_MAX
    return (2 * K * _unit_ld(net, typed, t, team) + 2 * _up(n0 * K, q) + _up(K * K, q)
            + _up(n0 // sizeof(floating) + 1, q))


cdef inline Py_ssize_t _unit_batch_len(Net* net, const floating* typed, int t, int team,
                                       Py_ssize_t rows, bint full) noexcept nogil:
    """Values of a block's copy of the batch (for ``_unit_batch_worker``: rows > 1, or
    ``full``): X's rows, T's rows, the labels (int64) and room for the transpose of
    W1's rows in ``_small_nt_ld``, each part on whole cache lines. At batch 1 with plain
    SGD (``_unit_split_worker``) the room of the lazy first layer instead."""
    cdef Py_ssize_t q = 64 // sizeof(floating)
    if rows <= 1 and not full:
        return _unit_lazy_len(net, typed, t, team)
    return (rows * _up(net.width[0], q) + rows * _up(net.width[net.n_layers], q)
            + _up(rows * 8 // sizeof(floating), q)
            + _up(<Py_ssize_t>net.width[2] * _unit_ld(net, typed, t, team), q))


cdef inline Py_ssize_t _unit_block_offset(Net* net, const floating* typed, int t,
                                          int team, Py_ssize_t rows, bint full) noexcept nogil:
    cdef:
        Py_ssize_t off = 0, ld
        int s
    for s in range(t):
        ld = _unit_ld(net, typed, s, team)
        off += (ld * (net.width[0] + 3 * rows + 1)
                + _unit_batch_len(net, typed, s, team, rows, full))
        if full:
            off += 3 * ld * (net.width[0] + 1)
    return off


cdef inline Py_ssize_t _unit_partial_ld(Net* net, const floating* typed) noexcept nogil:
    """Stride of the partials of z1: width[2] rounded up to a 64-byte line."""
    cdef Py_ssize_t q = 64 // sizeof(floating)
    return (net.width[2] + q - 1) // q * q


cdef inline floating* _unit_partials(Net* net, const floating* typed, int team,
                                     Py_ssize_t rows, bint full) noexcept nogil:
    """The partials of z1, after the team's blocks: two sets (alternating iterations)
    of ``team`` times ``rows`` rows of ``_unit_partial_ld``."""
    return _unit_block(net, typed, team, team, rows, full)


cdef int _unit_blocks_room(Net* net, const floating* typed, int team, Py_ssize_t rows,
                           bint full) noexcept nogil:
    """``unit_blocks`` laid out for a team of ``team``, batches of ``rows`` and ``full``
    or not (allocated on the first unit-split run and when one of them changes); -1 when
    out of memory."""
    cdef Py_ssize_t total
    if (net.unit_blocks != NULL and net.unit_blocks_team == team
            and net.unit_blocks_rows == rows and net.unit_blocks_full == full):
        return 0
    total = (_unit_block_offset(net, typed, team, team, rows, full)
             + 2 * team * rows * _unit_partial_ld(net, typed))
    nnf_free_huge(net.unit_blocks_mem)
    net.unit_blocks = NULL
    net.unit_blocks_team = 0
    net.unit_blocks_rows = 0
    net.unit_blocks_mem = nnf_alloc_huge(total * sizeof(floating))
    if net.unit_blocks_mem == NULL:
        return -1
    net.unit_blocks = net.unit_blocks_mem
    net.unit_blocks_team = team
    net.unit_blocks_rows = rows
    net.unit_blocks_full = full
    return 0

cdef inline void _forward4_skip(const floating* xr, const floating* w, Py_ssize_t ld,
                                Py_ssize_t n, floating* z) noexcept nogil:
    """z += xr[q] * w[q] for four rows w[q] (n values, stride ld), in row order, zero
    inputs skipped (as ``_forward_rows4`` for one row of X)."""
    cdef int q
    if xr[0] != 0 and xr[1] != 0 and xr[2] != 0 and xr[3] != 0:
        if floating is float:
            nnf_sforward4(w, ld, n, xr, z)
        else:
            nnf_dforward4(w, ld, n, xr, z)
        return
    for q in range(4):
        if xr[q] != 0:
            _axpy(z, xr[q], w + q * ld, n)


cdef void _forward_cols(const floating* x, Py_ssize_t k, const floating* w, Py_ssize_t ld,
                        Py_ssize_t n, floating* z) noexcept nogil:
    """z = x @ W[:, cols] for one input row x (k values) and a block of n columns of W
    (w: its first column, ld: W's row length)."""
    cdef Py_ssize_t i = 0
    memset(z, 0, n * sizeof(floating))
    while i + 4 <= k:
        _forward4_skip(x + i, w + i * ld, ld, n, z)
        i += 4
    for i in range(i, k):
        if x[i] != 0:
            _axpy(z, x[i], w + i * ld, n)


cdef void _step_forward_cols(const floating* x, const floating* dz, Py_ssize_t k,
                             floating* w, Py_ssize_t ld, Py_ssize_t n, floating neg,
                             const floating* x_next, floating* z_next) noexcept nogil:
    """A block of n columns of the first layer at batch 1, plain SGD: row i steps by
    W[i, cols] += neg * x[i] * dz, then (with ``x_next``) adds the next sample's term
    z_next += x_next[i] * W[i, cols] while the row is in L1 cache. The operations of
    ``_first_layer_step_forward_rows`` at batch 1, on a block of columns."""
    cdef:
        Py_ssize_t i = 0
        int q
    if x_next != NULL:
        memset(z_next, 0, n * sizeof(floating))
    while i + 4 <= k:
        if not (x_next != NULL
                and _step_forward4_dense(x + i, x_next + i, neg, w + i * ld, ld, n, dz,
                                         z_next)):
            for q in range(4):
                if x[i + q] != 0:
                    _axpy(w + (i + q) * ld, neg * x[i + q], dz, n)
            if x_next != NULL:
                _forward4_skip(x_next + i, w + i * ld, ld, n, z_next)
        i += 4
    for i in range(i, k):
        if x[i] != 0:
            _axpy(w + i * ld, neg * x[i], dz, n)
        if x_next != NULL and x_next[i] != 0:
            _axpy(z_next, x_next[i], w + i * ld, n)


cdef enum ViewPart:
    # what a thread's view (Net.unit_view) holds per layer, in this order: the arrays,
    # then the gradient sums and optimizer state of the tail (for the optimizers that do
    # not fold into the gradient product)
    V_W = 0
    V_B = 1
    V_Z = 2
    V_A = 3
    V_G = 4
    V_DW = 5
    V_DB = 6
    V_S1W = 7
    V_S1B = 8
    V_S2W = 9
    V_S2B = 10
    V_PARTS = 11


cdef inline Py_ssize_t _view_len(int L) noexcept nogil:
    """Pointers in one thread's view: V_PARTS per layer, then the optimizer's state
    pointers by parameter (W0, b0, W1, ...: 2 * L for s1, 2 * L for s2), which the
    thread's copy of the OptSpec points to."""
    return (V_PARTS + 4) * L


cdef inline void* _part(void** view, int L, int part, int l) noexcept nogil:
    """Array ``part`` (V_W, V_B, ...) of layer l in a thread's view."""
    return view[part * L + l]


cdef double _unit_tail_forward(Net* net, void** view, const floating* partial,
                               Py_ssize_t pld, Py_ssize_t pstride, int team, Py_ssize_t m,
                               const floating* t, const int64_t* label,
                               int loss) noexcept nogil:
    """z1 (m rows) = the team's partials summed in thread order (thread p's row r at
    partial + p * pstride + r * pld), then b1 and the layers above on this thread's
    copy (``view``), the loss and its gradient in view's G[last]. t and label: the m
    rows' targets or labels, one after another."""
    cdef:
        int L = net.n_layers, last = L - 1, l, k, n, n2 = net.width[2], p
        Py_ssize_t e, r
        floating* z1 = <floating*>_part(view, L, V_Z, 1)
        floating* zr
        floating* z
        floating* a
        const floating* part
        const floating* inp
    for r in range(m):
        zr = z1 + r * n2
        memcpy(zr, partial + r * pld, n2 * sizeof(floating))
        for p in range(1, team):
            part = partial + p * pstride + r * pld
            for e in range(n2):
                zr[e] = zr[e] + part[e]
    inp = <floating*>_part(view, L, V_A, 1)
    _bias_activate_rows(z1, <floating*>_part(view, L, V_B, 1), <floating*>inp, n2,
                        net.act[1], 0, m)
    for l in range(2, L):
        k = net.width[l]
        n = net.width[l + 1]
        z = <floating*>_part(view, L, V_Z, l)
        a = <floating*>_part(view, L, V_A, l)
        _small_forward_rows(inp, m, k, n, <floating*>_part(view, L, V_W, l), z, 0, k)
        _bias_activate_rows(z, <floating*>_part(view, L, V_B, l), a, n, net.act[l], 0, m)
        inp = a
    return _loss_rows(<floating*>_part(view, L, V_Z, last), <floating*>inp, <floating*>t,
                      <int64_t*>label, <floating*>_part(view, L, V_G, last), net.width[L],
                      loss, net.act[last], 0, m)


cdef inline void _step_bias(floating* bias, floating neg, const floating* g, Py_ssize_t m,
                            Py_ssize_t ld, Py_ssize_t n) noexcept nogil:
    """bias += neg * g[r] for the m rows of g (ld apart), in row order."""
    cdef Py_ssize_t r
    for r in range(m):
        _axpy(bias, neg, g + r * ld, n)


cdef void _unit_bias_step(void** view, int L, int l, OptSpec* opt, Py_ssize_t m, int n,
                          floating neg, bint fold) noexcept nogil:
    """b_l's step from view's G[l] (m rows): folded (neg = -lr / m), or through its
    gradient sum (view's DB) and the optimizer (opt: this thread's copy)."""
    cdef floating* db
    if fold:
        _step_bias(<floating*>_part(view, L, V_B, l), neg, <floating*>_part(view, L, V_G, l),
                   m, n, n)
        return
    db = <floating*>_part(view, L, V_DB, l)
    _step_bias(db, <floating>1, <floating*>_part(view, L, V_G, l), m, n, n)
    _update_range(opt, 2 * l + 1, <floating*>_part(view, L, V_B, l), db, 1.0 / m, 0, n)


cdef void _unit_tail_backward(Net* net, void** view, OptSpec* opt, Py_ssize_t m,
                              floating neg, bint fold) noexcept nogil:
    """Backward and step of the tail for m rows on this thread's copy: layers last..2
    (each leaves the gradient below it in view's G), then b1; view's G[1] is dz1. With
    ``fold`` plain SGD (neg = -lr / m) on the parameters directly, else through the
    view's gradient sums and the optimizer (opt: this thread's copy, whose state
    pointers are the view's)."""
    cdef:
        int L = net.n_layers, l, k, n
        floating* a_prev
        floating* g
    for l in range(L - 1, 1, -1):
        k = net.width[l]
        n = net.width[l + 1]
        a_prev = <floating*>_part(view, L, V_A, l - 1)
        g = <floating*>_part(view, L, V_G, l)
        _small_backward_rows(a_prev, g, m, k, n, <floating*>_part(view, L, V_W, l),
                             <floating*>_part(view, L, V_DW, l),
                             <floating*>_part(view, L, V_G, l - 1), a_prev, net.act[l - 1],
                             opt, 2 * l, True, fold, 1.0 / m, 0, k)
        _unit_bias_step(view, L, l, opt, m, n, neg, fold)
    _unit_bias_step(view, L, 1, opt, m, net.width[2], neg, fold)


cdef inline bint _unit_stopped(Net* net, int team, Py_ssize_t it) noexcept nogil:
    """Whether a thread of the team had a loss that was not finite at sample ``it``."""
    cdef int p
    for p in range(team):
        if net.unit_stop[(it & 1) * team + p]:
            return True
    return False


cdef inline void _unit_copy_cols(floating* dst, Py_ssize_t dld, const floating* src,
                                 Py_ssize_t sld, Py_ssize_t rows,
                                 Py_ssize_t n) noexcept nogil:
    """n values of each of ``rows`` rows, from rows sld apart to rows dld apart."""
    cdef Py_ssize_t i
    for i in range(rows):
        memcpy(dst + i * dld, src + i * sld, n * sizeof(floating))


cdef void _unit_write_back(Net* net, const floating* block, Py_ssize_t ld, Py_ssize_t rows,
                           Py_ssize_t c0, Py_ssize_t units) noexcept nogil:
    """The end of a unit-split run: thread's block (``_unit_block``) back into its columns
    of W0 and b0, and the first ``rows`` rows of its z0, a0 and d z0 into the workspace
    (which then holds the run's last batch, as after the other paths)."""
    cdef:
        Py_ssize_t n0 = net.width[0], n1 = net.width[1], blk = net.unit_blocks_rows
        const floating* z = block + n0 * ld
    _unit_copy_cols(<floating*>net.W[0] + c0, n1, block, ld, n0, units)
    memcpy(<floating*>net.b[0] + c0, z + 3 * blk * ld, units * sizeof(floating))
    _unit_copy_cols(<floating*>net.Z[0] + c0, n1, z, ld, rows, units)
    _unit_copy_cols(<floating*>net.A[0] + c0, n1, z + blk * ld, ld, rows, units)
    _unit_copy_cols(<floating*>net.G[0] + c0, n1, z + 2 * blk * ld, ld, rows, units)


cdef inline void _lazy_pass(int kb, floating* w, Py_ssize_t ld, Py_ssize_t rows,
                            const floating* g, const floating* u, const floating* f,
                            const unsigned char* flags, floating* zb) noexcept nogil:
    """``nnf_*block_pass*`` for blocks of kb (4 or 8) samples."""
    if floating is float:
        if kb == 8:
            nnf_sblock_pass8(w, ld, rows, g, u, f, flags, zb)
        else:
            nnf_sblock_pass4(w, ld, rows, g, u, f, flags, zb)
    else:
        if kb == 8:
            nnf_dblock_pass8(w, ld, rows, g, u, f, flags, zb)
        else:
            nnf_dblock_pass4(w, ld, rows, g, u, f, flags, zb)


cdef bint _lazy_block_inputs(const floating* X, Py_ssize_t d, const int64_t* order,
                             Py_ssize_t s0, int nk, int kb, int n0, floating neg,
                             floating* f, floating* c, unsigned char* flags) noexcept nogil:
    """The inputs of samples s0..s0+nk-1 (a block of the lazy first layer) for the pass
    that computes their products: f[i * kb + j] = x_j[i] (0 for j >= nk), bit 1 of
    flags[i] where one of them is non-zero (bit 0, the rows the pending steps touch, is
    kept), and c[j * kb + s] = neg * (x_j . x_s) for s < j: sample j's z0 is
    zb[j] + sum_s c[j * kb + s] * dz_s. Returns whether every c is finite: inputs so
    large that a dot product overflows would make z0 inf - inf (NaN, which ReLU turns
    into 0) where the step-by-step pass has a huge or infinite z0, and the run then goes
    on one step a sample."""
    cdef:
        const floating* xr[8]
        int j, s
        bint finite = True
    for j in range(nk):
        xr[j] = X + (order[s0 + j] if order != NULL else s0 + j) * d
    if floating is float:
        nnf_sblock_inputs(xr, nk, kb, n0, f, flags)
    else:
        nnf_dblock_inputs(xr, nk, kb, n0, f, flags)
    for j in range(1, nk):
        for s in range(j):
            c[j * kb + s] = neg * _dot(xr[j], xr[s], n0)
            finite = finite and not (isnan(c[j * kb + s]) or isinf(c[j * kb + s]))
    return finite


cdef inline void _lazy_steps_pending(floating* u, const floating* f, Py_ssize_t n, int kb,
                                     floating neg, unsigned char* flags,
                                     Py_ssize_t n0) noexcept nogil:
    """After a pass: the block whose products it computed becomes the pending one, its
    steps' factors u = neg * f and the rows they touch (bit 0 of flags) those of f."""
    cdef Py_ssize_t i
    for i in range(n):
        u[i] = neg * f[i]
    for i in range(n0):
        flags[i] = flags[i] >> 1


cdef void _lazy_flush(int kb, int pending, floating* w, Py_ssize_t ld, Py_ssize_t n0,
                      floating* gk, floating* u, floating* f, unsigned char* flags,
                      floating* zb) noexcept nogil:
    """Apply the first ``pending`` steps of the block (a run that stopped inside one): the
    others' factors and gradient rows are zeroed, and no products are computed."""
    cdef:
        Py_ssize_t i
        int j
    for i in range(n0):
        for j in range(pending, kb):
            u[i * kb + j] = 0
        flags[i] = flags[i] & 1
    for j in range(pending, kb):
        memset(gk + j * ld, 0, ld * sizeof(floating))
    _lazy_pass(kb, w, ld, n0, gk, u, f, flags, zb)


cdef void _unit_split_worker(Net* net, const floating* X, Py_ssize_t d, const floating* T,
                             Py_ssize_t kt, const int64_t* labels, const int64_t* order,
                             Py_ssize_t it0, Py_ssize_t it1, int loss, OptSpec* opt,
                             double* out_loss, int64_t* out_correct,
                             Py_ssize_t* failed) noexcept nogil:
    """One thread's part of ``_unit_split_run`` (run by every thread of the team); the
    team's one barrier per sample orders the partials of z1 (two sets, alternating, so a
    thread may write the next sample's while another still reads this one's).

    For the run, the thread works on private copies (``_unit_block``) of its columns of
    W0 (rows of its units only, one after another) and of its slices of b0 and of the
    first layer's workspace, written back at the end. In place, the block of columns
    would lie on rows a power of two long, so in half of the L2 cache's sets, and the
    slices would share their end lines with the next thread's."""
    cdef:
        int tid = nnf_thread_num(), team = nnf_team_size(), L = net.n_layers
        int n0 = net.width[0], n1 = net.width[1], n2 = net.width[2], n_out = net.width[L]
        floating* w0 = <floating*>net.W[0]
        floating* w1
        floating* partial = _unit_partials(net, w0, team, 1, False)
        floating neg = <floating>(-opt.lr)
        void** view = net.unit_view + tid * _view_len(L)
        Py_ssize_t c0 = _unit_bound(net, w0, tid, team)
        Py_ssize_t c1 = _unit_bound(net, w0, tid + 1, team), units = c1 - c0
        Py_ssize_t ld = _unit_ld(net, w0, tid, team), pld = _unit_partial_ld(net, w0)
        Py_ssize_t it, row, i
        floating* block = _unit_block(net, w0, tid, team, 1, False)
        floating* z = block + n0 * ld  # this thread's z0[U_t], a0[U_t], d z0[U_t], b0[U_t]
        floating* a = z + ld
        floating* g = a + ld
        floating* b = g + ld
        const floating* x
        const floating* x_next
        const floating* t
        const int64_t* label
        double total
        bint stop = False
        # the lazy first layer (UNIT_LAZY_BLOCK): this block's samples s0..s0+nk-1,
        # ``pending`` of them with their dz in gk and their steps not yet applied
        int kb = UNIT_LAZY_BLOCK, nk = 0, pending = 0, j, s
        Py_ssize_t s0 = it0, K = UNIT_LAZY_MAX, q = 64 // sizeof(floating)
        floating* gk = b + ld          # kb rows of dz0[U_t], ld apart
        floating* zb = gk + K * ld     # kb rows: x_j @ W0[:, U_t] at the block's start
        floating* f = zb + K * ld      # the block's inputs, f[i * kb + j] = x_j[i]
        floating* u = f + _up(n0 * K, q)  # the pending steps' factors, neg * x_j[i]
        floating* c = u + _up(n0 * K, q)  # c[j * kb + s] = neg * x_j . x_s
        unsigned char* flags = <unsigned char*>(c + _up(K * K, q))
        bint finite
    w1 = <floating*>net.W[1] + c0 * n2  # rows U_t of W1
    _unit_copy_cols(block, ld, w0 + c0, n1, n0, units)
    memcpy(b, <floating*>net.b[0] + c0, units * sizeof(floating))
    x = X + (order[it0] if order != NULL else it0) * d
    if kb:
        memset(gk, 0, K * ld * sizeof(floating))  # (lanes past the units stay 0)
        memset(flags, 0, n0)
        nk = <int>min(<Py_ssize_t>kb, it1 - it0)
        if not _lazy_block_inputs(X, d, order, s0, nk, kb, n0, neg, f, c, flags):
            kb = 0
    if kb:
        _lazy_pass(kb, block, ld, n0, gk, u, f, flags, zb)  # no steps pending: products only
        _lazy_steps_pending(u, f, n0 * kb, kb, neg, flags, n0)
        if tid == 0:
            net.lazy_passes += 1
    else:
        _forward_cols(x, n0, block, ld, units, z)
    for it in range(it0, it1):
        if not stop:
            if kb:
                j = <int>(it - s0)
                if it + nk < it1:  # the next block's sample j, for _lazy_block_inputs
                    nnf_prefetch_l2(X + (order[it + nk] if order != NULL else it + nk) * d,
                                    n0 * sizeof(floating))
                memcpy(z, zb + j * ld, units * sizeof(floating))
                for s in range(j):
                    _axpy(z, c[j * kb + s], gk + s * ld, units)
            _bias_activate_rows(z, b, a, <int>units, net.act[0], 0, 1)
            _small_forward_rows(a, 1, <int>units, n2, w1,
                                partial + ((it & 1) * team + tid) * pld, 0, units)
        nnf_barrier()
        # the flags of the previous sample: set before this barrier, and no thread writes
        # them after it (this sample's go to the other set), so every thread reads the
        # same and the team leaves together
        if it > it0 and _unit_stopped(net, team, it - 1):
            if tid == 0:
                failed[0] = it - 1
            break
        row = order[it] if order != NULL else it
        t = T + row * kt if T != NULL else NULL
        label = labels + row if labels != NULL else NULL
        total = _unit_tail_forward(net, view, partial + (it & 1) * team * pld, pld, pld, team,
                                   1, t, label, loss)
        if tid == 0:
            out_loss[it - it0] = total
            if out_correct != NULL:
                out_correct[it - it0] = _count_correct(
                    <floating*>_part(view, L, V_A, L - 1), t, label, 1, n_out, loss)
        if isnan(total) or isinf(total):
            # nothing of this sample is stepped; the team stops after the next barrier,
            # all together even if their totals differed (a thread leaving alone would
            # leave the others waiting at the barrier)
            stop = True
            net.unit_stop[(it & 1) * team + tid] = 1
            continue
        _unit_tail_backward(net, view, opt, 1, neg, True)
        # rows U_t of W1: d a0[U_t] (with a0's slope: d z0[U_t]) and their step
        _small_backward_rows(a, <floating*>_part(view, L, V_G, 1), 1, <int>units, n2, w1,
                             <floating*>net.dW[1] + c0 * n2, g, a, net.act[0], opt, 2,
                             True, True, 1.0, 0, units)
        _axpy(b, neg, g, units)
        if kb:
            j = <int>(it - s0)
            memcpy(gk + j * ld, g, units * sizeof(floating))
            pending = j + 1
            if pending == nk:  # the block's steps, and the next block's products
                s0 = it + 1
                nk = <int>min(<Py_ssize_t>kb, it1 - s0)
                finite = True
                if nk > 0:
                    finite = _lazy_block_inputs(X, d, order, s0, nk, kb, n0, neg, f, c, flags)
                else:
                    for i in range(n0):
                        flags[i] = flags[i] & 1
                _lazy_pass(kb, block, ld, n0, gk, u, f, flags, zb)
                _lazy_steps_pending(u, f, n0 * kb, kb, neg, flags, n0)
                pending = 0
                if tid == 0:
                    net.lazy_passes += 1
                if not finite:  # one step a sample from here: zb[0] is sample s0's z0
                    kb = 0
                    memcpy(z, zb, units * sizeof(floating))
                    x = X + (order[s0] if order != NULL else s0) * d
            continue
        x_next = X + (order[it + 1] if order != NULL else it + 1) * d if it + 1 < it1 else NULL
        _step_forward_cols(x, g, n0, block, ld, units, neg, x_next, z)
        x = x_next
    nnf_barrier()  # (a loss of the run's last sample is seen here)
    if tid == 0 and failed[0] < 0 and _unit_stopped(net, team, it1 - 1):
        failed[0] = it1 - 1
    if pending > 0:  # the run stopped inside a block: the steps of the samples before
        _lazy_flush(kb, pending, block, ld, n0, gk, u, f, flags, zb)
        if tid == 0:
            net.lazy_passes += 1
    _unit_write_back(net, block, ld, 1, c0, units)


cdef void _unit_batch_worker(Net* net, const floating* X, Py_ssize_t d, const floating* T,
                             Py_ssize_t kt, const int64_t* labels, const int64_t* order,
                             Py_ssize_t n_samples, Py_ssize_t bs, Py_ssize_t it0,
                             Py_ssize_t it1, int loss, OptSpec* opt, bint fold,
                             double* out_loss, int64_t* out_correct,
                             Py_ssize_t* failed) noexcept nogil:
    """``_unit_split_worker`` for batches of 1..``unit_rows`` rows (iteration it: rows
    it * bs .. of the epoch, the last one possibly short). Each thread copies the batch
    (X's rows, and T's rows or the labels) into its block, then per batch:
    z0[:, U_t] = X @ W0[:, U_t] and a0, its partial a0[:, U_t] @ W1[U_t] of z1; the
    barrier; the tail on its own copy (as at batch 1, for m rows); then
    d z0[:, U_t] = (dz1 @ W1[U_t]^T) * act', and the steps of W1[U_t] (gradient
    a0^T dz1), b0[U_t] (the sum of d z0) and W0[:, U_t] (X^T d z0): with ``fold``
    (plain SGD) W -= lr/m times the gradient, folded into the product; else the gradient
    sums go to the optimizer (any of them: each thread steps its own parameters, and its
    copy of the OptSpec counts the steps and points at its own state). The products are
    the serial small kernels; the W0 block stays in this core's cache from batch to
    batch."""
    cdef:
        int tid = nnf_thread_num(), team = nnf_team_size(), L = net.n_layers
        int n0 = net.width[0], n1 = net.width[1], n2 = net.width[2], n_out = net.width[L]
        Py_ssize_t q = 64 // sizeof(floating)
        floating* w0 = <floating*>net.W[0]
        floating* w1
        floating* partial = _unit_partials(net, w0, team, bs, not fold)
        floating* part
        floating* dz1
        floating neg
        void** view = net.unit_view + tid * _view_len(L)
        OptSpec lopt = opt[0]
        Py_ssize_t c0 = _unit_bound(net, w0, tid, team)
        Py_ssize_t c1 = _unit_bound(net, w0, tid + 1, team), units = c1 - c0
        Py_ssize_t ld = _unit_ld(net, w0, tid, team), pld = _unit_partial_ld(net, w0)
        Py_ssize_t xld = _up(n0, q), tld = _up(n_out, q)
        Py_ssize_t it, r, i, row, start, m = 0, xs
        floating* block = _unit_block(net, w0, tid, team, bs, not fold)
        floating* z = block + n0 * ld  # this thread's z0, a0, d z0 (bs rows each), b0
        floating* a = z + bs * ld
        floating* g = a + bs * ld
        floating* b = g + bs * ld
        floating* xb = b + ld          # the batch: X's rows, T's rows, the labels
        floating* tb = xb + bs * xld
        int64_t* lb = <int64_t*>(tb + bs * tld)
        floating* nt_scratch = <floating*>lb + _up(bs * 8 // sizeof(floating), q)
        # (not fold) gradient sums of the W0 block and b0, then their state s1, s2:
        # each (n0 + 1) rows of ld, laid out as the block's W0 rows and b0
        floating* dwb = nt_scratch + _up(<Py_ssize_t>n2 * ld, q)
        floating* s1b = dwb + (n0 + 1) * ld
        floating* s2b = s1b + (n0 + 1) * ld
        floating* s1w0 = <floating*>opt.s1[0] if opt.s1 != NULL else NULL
        floating* s2w0 = <floating*>opt.s2[0] if opt.s2 != NULL else NULL
        const floating* x
        const floating* t
        const int64_t* label
        double total
        bint stop = False
    lopt.s1 = view + V_PARTS * L if opt.s1 != NULL else NULL
    lopt.s2 = view + (V_PARTS + 2) * L if opt.s2 != NULL else NULL
    w1 = <floating*>net.W[1] + c0 * n2  # rows U_t of W1
    _unit_copy_cols(block, ld, w0 + c0, n1, n0, units)
    memcpy(b, <floating*>net.b[0] + c0, units * sizeof(floating))
    if not fold:
        memset(dwb, 0, (n0 + 1) * ld * sizeof(floating))
        if s1w0 != NULL:
            _unit_copy_cols(s1b, ld, s1w0 + c0, n1, n0, units)
            memcpy(s1b + n0 * ld, <floating*>opt.s1[1] + c0, units * sizeof(floating))
        if s2w0 != NULL:
            _unit_copy_cols(s2b, ld, s2w0 + c0, n1, n0, units)
            memcpy(s2b + n0 * ld, <floating*>opt.s2[1] + c0, units * sizeof(floating))
    for it in range(it0, it1):
        start = it * bs
        m = min(bs, n_samples - start)
        if order == NULL:  # the batch lies in X, T and labels as it is (kt == n_out)
            x = X + start * d
            xs = d
            t = T + start * kt if T != NULL else NULL
            label = labels + start if labels != NULL else NULL
        else:  # (T's rows one after another, as _loss_rows reads them)
            for r in range(m):
                row = order[start + r]
                memcpy(xb + r * xld, X + row * d, n0 * sizeof(floating))
                if T != NULL:
                    memcpy(tb + r * n_out, T + row * kt, n_out * sizeof(floating))
                if labels != NULL:
                    lb[r] = labels[row]
            x = xb
            xs = xld
            t = tb if T != NULL else NULL
            label = lb if labels != NULL else NULL
        if not stop:
            _small_nn_ld(m, <int>units, n0, <floating>1, x, xs, 1, block, ld, z, ld, False)
            for r in range(m):
                _bias_activate_rows(z + r * ld, b, a + r * ld, <int>units, net.act[0], 0, 1)
            part = partial + ((it & 1) * team + tid) * bs * pld
            _small_nn_ld(m, n2, units, <floating>1, a, ld, 1, w1, n2, part, pld, False)
        nnf_barrier()
        # the flags of the previous iteration (as in _unit_split_worker)
        if it > it0 and _unit_stopped(net, team, it - 1):
            if tid == 0:
                failed[0] = it - 1
            break
        total = _unit_tail_forward(net, view, partial + (it & 1) * team * bs * pld, pld,
                                   bs * pld, team, m, t, label, loss)
        if tid == 0:
            out_loss[it - it0] = total
            if out_correct != NULL:
                out_correct[it - it0] = _count_correct(
                    <floating*>_part(view, L, V_A, L - 1), t, label, m, n_out, loss)
        if isnan(total) or isinf(total):
            stop = True
            net.unit_stop[(it & 1) * team + tid] = 1
            continue
        neg = <floating>(-opt.lr * (1.0 / m))
        if not fold:
            _begin_step(&lopt)
        _unit_tail_backward(net, view, &lopt, m, neg, fold)
        dz1 = <floating*>_part(view, L, V_G, 1)
        # d a0[:, U_t] through W1's rows U_t before they are stepped, then act'
        _small_nt_ld(m, <int>units, n2, dz1, n2, w1, n2, g, ld, nt_scratch)
        for r in range(m):
            _scale_by_slope_rows(g + r * ld, a + r * ld, <int>units, net.act[0], 0, 1)
        if fold:
            _small_nn_ld(units, n2, m, neg, a, 1, ld, dz1, n2, w1, n2, True)
            _step_bias(b, neg, g, m, ld, units)
            _small_nn_ld(n0, <int>units, m, neg, x, 1, xs, g, ld, block, ld, True)
            continue
        _small_nn_ld(units, n2, m, <floating>1, a, 1, ld, dz1, n2,
                     <floating*>net.dW[1] + c0 * n2, n2, False)
        _update_range(&lopt, 2, <floating*>net.W[1], <floating*>net.dW[1], 1.0 / m,
                      c0 * n2, c1 * n2)
        _step_bias(dwb + n0 * ld, <floating>1, g, m, ld, units)
        _update_span(&lopt, b, dwb + n0 * ld, s1b + n0 * ld if s1w0 != NULL else NULL,
                     s2b + n0 * ld if s2w0 != NULL else NULL, 1.0 / m, units)
        _small_nn_ld(n0, <int>units, m, <floating>1, x, 1, xs, g, ld, dwb, ld, False)
        for i in range(n0):
            _update_span(&lopt, block + i * ld, dwb + i * ld,
                         s1b + i * ld if s1w0 != NULL else NULL,
                         s2b + i * ld if s2w0 != NULL else NULL, 1.0 / m, units)
    nnf_barrier()  # (a loss of the run's last batch is seen here)
    if tid == 0 and failed[0] < 0 and _unit_stopped(net, team, it1 - 1):
        failed[0] = it1 - 1
    _unit_write_back(net, block, ld, m, c0, units)
    if not fold:
        if s1w0 != NULL:
            _unit_copy_cols(s1w0 + c0, n1, s1b, ld, n0, units)
            memcpy(<floating*>opt.s1[1] + c0, s1b + n0 * ld, units * sizeof(floating))
        if s2w0 != NULL:
            _unit_copy_cols(s2w0 + c0, n1, s2b, ld, n0, units)
            memcpy(<floating*>opt.s2[1] + c0, s2b + n0 * ld, units * sizeof(floating))


cdef Py_ssize_t _unit_split_run(Net* net, const floating* X, Py_ssize_t d,
                                const floating* T, Py_ssize_t kt, const int64_t* labels,
                                const int64_t* order, Py_ssize_t n_samples, Py_ssize_t bs,
                                Py_ssize_t it0, Py_ssize_t it1, int loss, OptSpec* opt,
                                double* out_loss, int64_t* out_correct, int64_t* steps,
                                int team, bint fold) noexcept nogil:
    """Iterations it0..it1-1 of an epoch of batches of ``bs``, a step every batch, in
    one parallel region of ``team`` threads (see the notes above ``UNIT_SPLIT``); the
    result of ``_net_run``. ``fold``: plain SGD. At batch 1 with plain SGD
    (``_unit_split_worker``), within each block the operations are those of the hand
    loops on one thread; z1's terms are summed per block and then across blocks."""
    cdef:
        int L = net.n_layers, p, l, j
        Py_ssize_t failed = -1, done, nb, nw
        void** view
    memset(net.unit_stop, 0, 2 * team * sizeof(int))
    for p in range(team):
        view = net.unit_view + p * _view_len(L)
        for j in range(2 * L):  # the optimizer's state, or this thread's copy of the tail's
            view[V_PARTS * L + j] = opt.s1[j] if opt.s1 != NULL else NULL
            view[(V_PARTS + 2) * L + j] = opt.s2[j] if opt.s2 != NULL else NULL
        if p == 0:
            continue
        for l in range(1, L):  # the tail copies start from the model's values
            nb = net.width[l + 1]
            nw = <Py_ssize_t>net.width[l] * nb
            memcpy(view[V_B * L + l], net.b[l], nb * sizeof(floating))
            if l >= 2:
                memcpy(view[V_W * L + l], net.W[l], nw * sizeof(floating))
            if fold:
                continue
            memset(view[V_DB * L + l], 0, nb * sizeof(floating))
            if l >= 2:
                memset(view[V_DW * L + l], 0, nw * sizeof(floating))
            if opt.s1 != NULL:
                view[V_PARTS * L + 2 * l + 1] = view[V_S1B * L + l]
                memcpy(view[V_S1B * L + l], opt.s1[2 * l + 1], nb * sizeof(floating))
                if l >= 2:
                    view[V_PARTS * L + 2 * l] = view[V_S1W * L + l]
                    memcpy(view[V_S1W * L + l], opt.s1[2 * l], nw * sizeof(floating))
            if opt.s2 != NULL:
                view[(V_PARTS + 2) * L + 2 * l + 1] = view[V_S2B * L + l]
                memcpy(view[V_S2B * L + l], opt.s2[2 * l + 1], nb * sizeof(floating))
                if l >= 2:
                    view[(V_PARTS + 2) * L + 2 * l] = view[V_S2W * L + l]
                    memcpy(view[V_S2W * L + l], opt.s2[2 * l], nw * sizeof(floating))
    if bs == 1 and fold:
        with parallel(num_threads=team):
            _unit_split_worker(net, X, d, T, kt, labels, order, it0, it1, loss, opt,
                               out_loss, out_correct, &failed)
    else:
        with parallel(num_threads=team):
            _unit_batch_worker(net, X, d, T, kt, labels, order, n_samples, bs, it0, it1,
                               loss, opt, fold, out_loss, out_correct, &failed)
    done = (failed if failed >= 0 else it1) - it0
    opt.step += done
    steps[0] += done
    net.unit_iterations += done
    return failed

cdef inline size_t _round64(size_t nbytes) noexcept nogil:
    return (nbytes + 63) // 64 * 64


cdef inline char* _like(char** cursor, const void* orig, size_t nbytes) noexcept nogil:
    """Room for a copy of ``orig`` at ``cursor`` (64-byte aligned), at the same offset
    within a cache line as orig: the vector kernels then split the copy into the same
    aligned and unaligned parts, so every thread's copy computes the same values."""
    cdef char* p = cursor[0] + <size_t>orig % 64
    cursor[0] += _round64(nbytes) + 64
    return p


cdef int _unit_split_alloc(Net* net, size_t item) noexcept nogil:
    """The unit split's buffers (``_unit_split_run``): per thread a view of W, b, Z, A, G
    for every layer, thread 0's the net's own arrays, the others' private copies of the
    tail (b and ``unit_rows`` rows of Z, A, G from layer 1 on, W from layer 2 on; unit_rows
    is the smallest of the capacity, UNIT_SPLIT_MAX_BATCH and the rows that fit in
    UNIT_SPLIT_TAIL_ROW_BYTES, at least 1). Returns -1 when
    out of memory (the net then keeps the other paths)."""
    cdef:
        int T = net.scratch_threads, L = net.n_layers, t, l
        size_t per = 0, nb, nw, rows = <size_t>min(net.capacity, UNIT_SPLIT_MAX_BATCH)
        size_t row_bytes = 0
        char* cursor
        void** view
    for l in range(1, L):
        row_bytes += 3 * net.width[l + 1] * item
    # a wide tail (a layer 1 of thousands of units with nothing above it) holds fewer rows
    rows = max(<size_t>1, min(rows, UNIT_SPLIT_TAIL_ROW_BYTES // row_bytes))
    for l in range(1, L):
        nb = net.width[l + 1] * item
        per += 4 * (_round64(nb) + 64) + 3 * (_round64(rows * nb) + 64)
        if l >= 2:
            per += 4 * (_round64(<size_t>net.width[l] * nb) + 64)
    net.unit_view = <void**>calloc(T * _view_len(L), sizeof(void*))
    net.unit_stop = <int*>calloc(2 * T, sizeof(int))
    net.unit_mem = calloc(max(<size_t>1, (T - 1) * per) + 64, 1)  # gradient sums start at 0
    if net.unit_view == NULL or net.unit_mem == NULL or net.unit_stop == NULL:
        free(net.unit_view)
        free(net.unit_mem)
        free(net.unit_stop)
        net.unit_view = NULL
        net.unit_mem = NULL
        net.unit_stop = NULL
        return -1
    for l in range(L):  # (thread 0's state pointers are the optimizer's, set per run)
        net.unit_view[V_W * L + l] = net.W[l]
        net.unit_view[V_B * L + l] = net.b[l]
        net.unit_view[V_Z * L + l] = net.Z[l]
        net.unit_view[V_A * L + l] = net.A[l]
        net.unit_view[V_G * L + l] = net.G[l]
        net.unit_view[V_DW * L + l] = net.dW[l]
        net.unit_view[V_DB * L + l] = net.db[l]
    cursor = <char*>net.unit_mem + (64 - <size_t>net.unit_mem % 64) % 64
    for t in range(1, T):
        view = net.unit_view + t * _view_len(L)
        for l in range(1, L):
            nb = net.width[l + 1] * item
            view[V_B * L + l] = _like(&cursor, net.b[l], nb)
            view[V_Z * L + l] = _like(&cursor, net.Z[l], rows * nb)
            view[V_A * L + l] = _like(&cursor, net.A[l], rows * nb)
            view[V_G * L + l] = _like(&cursor, net.G[l], rows * nb)
            view[V_DB * L + l] = _like(&cursor, net.db[l], nb)
            view[V_S1B * L + l] = _like(&cursor, NULL, nb)
            view[V_S2B * L + l] = _like(&cursor, NULL, nb)
            if l >= 2:
                nw = <size_t>net.width[l] * nb
                view[V_W * L + l] = _like(&cursor, net.W[l], nw)
                view[V_DW * L + l] = _like(&cursor, net.dW[l], nw)
                view[V_S1W * L + l] = _like(&cursor, NULL, nw)
                view[V_S2W * L + l] = _like(&cursor, NULL, nw)
    net.unit_rows = <Py_ssize_t>rows
    return 0


cdef void* _data(arr):
    return <void*><size_t>arr.__array_interface__["data"][0]


cdef class NetworkPlan:
    """Raw pointers to one model's parameters, gradient sums and workspace buffers, so
    that a whole iteration, or a run of them, is a single ``nogil`` call.

    The arrays stay owned by Python (the plan keeps references); the pointers stay valid
    because parameters are updated in place and workspaces are never resized (a larger
    batch gets a new workspace and a new plan)."""
    cdef Net net
    cdef object _keep
    cdef readonly bint is64
    cdef readonly Py_ssize_t capacity

    def __cinit__(self, list Ws, list bs, list dWs, list dbs, list Zs, list As, list Gs,
                  list acts):
        cdef int L = len(Ws), l
        if L < 1 or not (len(bs) == len(dWs) == len(dbs) == len(Zs) == len(As) == len(Gs)
                         == len(acts) == L):
            raise ValueError("NetworkPlan: one entry per layer in every list")
        dtype = Ws[0].dtype
        if dtype not in (np.float32, np.float64):
            raise TypeError("NetworkPlan: float32 or float64 parameters")
        self.is64 = dtype == np.float64
        self.capacity = Zs[0].shape[0]
        self._keep = (Ws, bs, dWs, dbs, Zs, As, Gs)
        for l in range(L):
            k, n = Ws[l].shape[0], Ws[l].shape[1]
            if l > 0 and k != Ws[l - 1].shape[1]:
                raise ValueError("NetworkPlan: layer widths do not chain")
            shapes = [(Ws[l], (k, n)), (dWs[l], (k, n)), (bs[l], (n,)), (dbs[l], (n,)),
                      (Zs[l], (self.capacity, n)), (As[l], (self.capacity, n)),
                      (Gs[l], (self.capacity, n))]
            for arr, shape in shapes:
                if (not isinstance(arr, np.ndarray) or arr.dtype != dtype or arr.shape != shape
                        or not arr.flags.c_contiguous or not arr.flags.writeable):
                    raise ValueError("NetworkPlan: buffers must be writeable C-contiguous "
                                     f"{dtype} arrays of the layer's shapes")
            if not (0 <= acts[l] <= SOFTMAX) or (acts[l] == SOFTMAX and l != L - 1):
                raise ValueError("NetworkPlan: bad activation code")
        self.net.n_layers = L
        self.net.capacity = self.capacity
        self.net.width = <int*>calloc(L + 1, sizeof(int))
        self.net.act = <int*>calloc(L, sizeof(int))
        self.net.W = <void**>calloc(L, sizeof(void*))
        self.net.b = <void**>calloc(L, sizeof(void*))
        self.net.dW = <void**>calloc(L, sizeof(void*))
        self.net.db = <void**>calloc(L, sizeof(void*))
        self.net.Z = <void**>calloc(L, sizeof(void*))
        self.net.A = <void**>calloc(L, sizeof(void*))
        self.net.G = <void**>calloc(L, sizeof(void*))
        if (self.net.width == NULL or self.net.act == NULL or self.net.W == NULL
                or self.net.b == NULL or self.net.dW == NULL or self.net.db == NULL
                or self.net.Z == NULL or self.net.A == NULL or self.net.G == NULL):
            raise MemoryError()
        # room for the thread count in effect even where it exceeds the cores
        self.net.scratch_threads = max(1, nnf_omp_max_threads(), _num_threads)
        cdef int widest = max(W.shape[1] for W in Ws)
        self.net.scratch_rows = max(SMALL_BATCH, SMALL_BATCH_LARGE, SMALL_BATCH_SPLIT)
        self.net.scratch = calloc(
            max(1, (self.net.scratch_threads - 1) * self.net.scratch_rows * widest),
            8 if self.is64 else 4)
        if self.net.scratch == NULL:
            raise MemoryError()
        self.net.param_offset = <Py_ssize_t*>calloc(2 * L, sizeof(Py_ssize_t))
        self.net.split_loss = <double*>calloc(self.net.scratch_threads, sizeof(double))
        self.net.split_correct = <int64_t*>calloc(self.net.scratch_threads, sizeof(int64_t))
        if (self.net.param_offset == NULL or self.net.split_loss == NULL
                or self.net.split_correct == NULL):
            raise MemoryError()
        self.net.n_params = 0
        for l in range(L):
            self.net.param_offset[2 * l] = self.net.n_params
            self.net.n_params += Ws[l].shape[0] * Ws[l].shape[1]
            self.net.param_offset[2 * l + 1] = self.net.n_params
            self.net.n_params += Ws[l].shape[1]
        self.net.next_x = calloc(self.net.scratch_rows * Ws[0].shape[0], 8 if self.is64 else 4)
        self.net.next_t = calloc(self.net.scratch_rows * Ws[L - 1].shape[1],
                                 8 if self.is64 else 4)
        self.net.next_labels = <int64_t*>calloc(self.net.scratch_rows, sizeof(int64_t))
        if (self.net.next_x == NULL or self.net.next_t == NULL
                or self.net.next_labels == NULL):
            raise MemoryError()
        self.net.split_scratch = NULL
        if self.net.n_params <= ROW_SPLIT_MAX_PARAMS:
            self.net.split_scratch = calloc(self.net.scratch_threads * self.net.n_params,
                                          8 if self.is64 else 4)
            if self.net.split_scratch == NULL:
                raise MemoryError()
        self.net.tail_scratch = NULL
        if L >= 2 and Ws[L - 1].shape[1] <= TAIL_SPLIT_MAX_OUTPUTS:
            self.net.tail_scratch = calloc(
                self.net.scratch_threads * Ws[L - 1].shape[0] * Ws[L - 1].shape[1],
                8 if self.is64 else 4)
            if self.net.tail_scratch == NULL:
                raise MemoryError()
        self.net.width[0] = Ws[0].shape[0]
        for l in range(L):
            self.net.width[l + 1] = Ws[l].shape[1]
            self.net.act[l] = acts[l]
            self.net.W[l] = _data(Ws[l])
            self.net.b[l] = _data(bs[l])
            self.net.dW[l] = _data(dWs[l])
            self.net.db[l] = _data(dbs[l])
            self.net.Z[l] = _data(Zs[l])
            self.net.A[l] = _data(As[l])
            self.net.G[l] = _data(Gs[l])
        self.net.unit_view = NULL
        self.net.unit_mem = NULL
        self.net.unit_blocks = NULL
        self.net.unit_blocks_mem = NULL
        self.net.unit_blocks_team = 0
        self.net.unit_blocks_rows = 0
        self.net.unit_blocks_full = False
        self.net.unit_rows = 0
        self.net.unit_stop = NULL
        if (L >= 2 and self.net.width[1] >= 2 * UNIT_SPLIT_MIN_UNITS
                and _unit_tail_params(&self.net) <= UNIT_SPLIT_MAX_TAIL):
            _unit_split_alloc(&self.net, 8 if self.is64 else 4)

    def __dealloc__(self):
        free(self.net.scratch)
        free(self.net.param_offset)
        free(self.net.split_scratch)
        free(self.net.tail_scratch)
        free(self.net.split_loss)
        free(self.net.split_correct)
        free(self.net.next_x)
        free(self.net.next_t)
        free(self.net.next_labels)
        free(self.net.unit_view)
        free(self.net.unit_mem)
        free(self.net.unit_stop)
        nnf_free_huge(self.net.unit_blocks_mem)
        free(self.net.width)
        free(self.net.act)
        free(self.net.W)
        free(self.net.b)
        free(self.net.dW)
        free(self.net.db)
        free(self.net.Z)
        free(self.net.A)
        free(self.net.G)

    @property
    def unit_split_iterations(self):
        """Iterations so far trained by the unit split (``_unit_split_run``)."""
        return self.net.unit_iterations

    @property
    def lazy_first_layer_passes(self):
        """Passes over W0 so far of the unit split's lazy first layer (``UNIT_LAZY_BLOCK``):
        one a run to start it, one a block of samples, one where a run stopped inside a
        block."""
        return self.net.lazy_passes

    @property
    def tail_split_iterations(self):
        """Iterations so far whose last layer and loss took the tail split
        (``_net_tail_split``)."""
        return self.net.tail_iterations

    @property
    def fused_iterations(self):
        """Iterations so far whose first-layer product was computed by the previous
        iteration's backward pass (``_first_layer_step_forward_rows``)."""
        return self.net.fused_iterations

    def iteration(self, X, T, labels, int loss):
        """Forward, loss and backward of one batch (the gradient sums grow, no update).
        Returns the summed loss."""
        return _plan_iteration(self, X, T, labels, loss)

    def run(self, X, T, labels, order, Py_ssize_t batch_size, Py_ssize_t it0, Py_ssize_t it1,
            Py_ssize_t n_iters, int accumulate, int loss, tuple opt, list state1, list state2,
            xbuf, tbuf, lbuf, double[::1] out_loss, int64_t[::1] out_correct,
            int64_t[::1] group, bint check_x=False):
        """Iterations it0..it1-1 of an epoch in one nogil call (see ``_net_run``).

        ``opt`` = (kind, lr, momentum, nesterov, weight_decay, beta1, beta2, eps,
        decoupled, steps_so_far); ``state1``/``state2`` the optimizer's per-parameter
        arrays (flat, parameter order W0, b0, W1, ...) or empty lists.
        With ``check_x`` every batch's rows of X are checked for NaN and inf before use;
        such a batch stops the run as a non-finite loss does.
        Returns (index of a non-finite iteration or -1, steps taken)."""
        return _plan_run(self, X, T, labels, order, batch_size, it0, it1, n_iters, accumulate,
                         loss, opt, state1, state2, xbuf, tbuf, lbuf, out_loss, out_correct,
                         group, check_x)


cdef int _check_batch(NetworkPlan plan, Py_ssize_t m, Py_ssize_t d, Py_ssize_t tm,
                      Py_ssize_t tk, Py_ssize_t lm, int loss, bint is64) except -1:
    cdef int n_out = plan.net.width[plan.net.n_layers]
    _check(is64 == plan.is64, "array dtype differs from the model's")
    _check(1 <= m <= plan.capacity, "batch rows must be in [1, capacity]")
    _check(d == plan.net.width[0], "X width differs from the first layer's")
    _check(0 <= loss <= BINARY_CROSS_ENTROPY, "unknown loss code")
    if loss == CROSS_ENTROPY:
        _check(lm == m, "labels must have one entry per row")
    else:
        _check(tm == m and tk == n_out, "targets must be (rows, outputs)")
    return 0


def _plan_iteration(NetworkPlan plan, const floating[:, ::1] X, const floating[:, ::1] T,
                    const int64_t[::1] labels, int loss):
    cdef:
        Py_ssize_t m = X.shape[0], r
        int n_out = plan.net.width[plan.net.n_layers]
        OptSpec opt
        double total
    _check_batch(plan, m, X.shape[1], T.shape[0], T.shape[1], labels.shape[0], loss,
                 sizeof(floating) == 8)
    if loss == CROSS_ENTROPY:
        _check(_labels_in_range(labels, n_out), "label out of range")
    memset(&opt, 0, sizeof(OptSpec))
    with nogil:
        total = _net_iteration(&plan.net, &X[0, 0], m,
                               &T[0, 0] if T.shape[0] > 0 else NULL,
                               &labels[0] if labels.shape[0] > 0 else NULL,
                               loss, &opt, False, False, 1.0, NULL, False, NULL, 0, NULL)
    return total


def _plan_run(NetworkPlan plan, const floating[:, ::1] X, const floating[:, ::1] T,
              const int64_t[::1] labels, const int64_t[::1] order, Py_ssize_t bs,
              Py_ssize_t it0, Py_ssize_t it1, Py_ssize_t n_iters, int accumulate, int loss,
              tuple opt_args, list state1, list state2, floating[:, ::1] xbuf,
              floating[:, ::1] tbuf, int64_t[::1] lbuf, double[::1] out_loss,
              int64_t[::1] out_correct, int64_t[::1] group, bint check_x):
    cdef:
        Py_ssize_t n = X.shape[0], d = X.shape[1], kt = T.shape[1], r, failed
        int n_out = plan.net.width[plan.net.n_layers], L = plan.net.n_layers, j
        bint shuffled = order.shape[0] > 0
        OptSpec opt
        int64_t steps = 0
        void** s1 = NULL
        void** s2 = NULL
        bint fold_ok
    _check((sizeof(floating) == 8) == plan.is64, "array dtype differs from the model's")
    _check(n >= 1 and d == plan.net.width[0], "X width differs from the first layer's")
    _check(0 <= loss <= BINARY_CROSS_ENTROPY, "unknown loss code")
    _check(1 <= bs <= plan.capacity, "batch_size must be in [1, capacity]")
    _check(accumulate >= 1, "accumulate must be >= 1")
    _check(n_iters >= 1 and (n_iters == n // bs or n_iters == (n + bs - 1) // bs),
           "n_iters must be floor or ceil of rows / batch_size")
    _check(0 <= it0 <= it1 <= n_iters, "iteration range")
    _check(out_loss.shape[0] >= it1 - it0 and out_correct.shape[0] >= it1 - it0,
           "output arrays too short")
    _check(group.shape[0] == 2 and 0 <= group[0] < accumulate, "group state")
    if loss == CROSS_ENTROPY:
        _check(labels.shape[0] == n, "labels must have one entry per row of X")
        _check(_labels_in_range(labels, n_out), "label out of range")
    else:
        _check(T.shape[0] == n and kt == n_out, "targets must be (rows of X, outputs)")
    if shuffled:
        _check(order.shape[0] == n, "order must be a permutation of the rows")
        _check(_labels_in_range(order, n), "order entry out of range")
        _check(xbuf.shape[0] >= min(bs, n) and xbuf.shape[1] == d, "xbuf shape")
        if loss == CROSS_ENTROPY:
            _check(lbuf.shape[0] >= min(bs, n), "lbuf shape")
        else:
            _check(tbuf.shape[0] >= min(bs, n) and tbuf.shape[1] == kt, "tbuf shape")
    memset(&opt, 0, sizeof(OptSpec))
    (opt.kind, opt.lr, opt.momentum, opt.nesterov, opt.weight_decay, opt.beta1, opt.beta2,
     opt.eps, opt.decoupled, opt.step) = opt_args
    _check(opt.kind in (OPT_SGD, OPT_ADAM), "optimizer kind")
    need1 = opt.kind == OPT_ADAM or opt.momentum != 0
    need2 = opt.kind == OPT_ADAM
    for lst, needed in ((state1, need1), (state2, need2)):
        if needed:
            _check(len(lst) == 2 * L, "one optimizer state array per parameter")
            for j in range(2 * L):
                arr = lst[j]
                size = plan.net.width[j // 2] * plan.net.width[j // 2 + 1] if j % 2 == 0 \
                    else plan.net.width[j // 2 + 1]
                _check(isinstance(arr, np.ndarray) and arr.dtype == (np.float64 if plan.is64
                       else np.float32) and arr.size == size and arr.flags.c_contiguous
                       and arr.flags.writeable, "optimizer state array")
    try:
        if need1:
            s1 = <void**>malloc(2 * L * sizeof(void*))
            for j in range(2 * L):
                s1[j] = _data(state1[j])
        if need2:
            s2 = <void**>malloc(2 * L * sizeof(void*))
            for j in range(2 * L):
                s2[j] = _data(state2[j])
        opt.s1 = s1
        opt.s2 = s2
        fold_ok = opt.kind == OPT_SGD and opt.momentum == 0 and opt.weight_decay == 0
        with nogil:
            failed = _net_run(&plan.net, &X[0, 0], d, &T[0, 0] if T.shape[0] > 0 else NULL, kt,
                              &labels[0] if labels.shape[0] > 0 else NULL,
                              &order[0] if shuffled else NULL, n, bs, it0, it1, n_iters,
                              accumulate, loss, &opt, fold_ok,
                              &xbuf[0, 0] if shuffled else NULL,
                              &tbuf[0, 0] if shuffled and tbuf.shape[0] > 0 else NULL,
                              &lbuf[0] if shuffled and lbuf.shape[0] > 0 else NULL,
                              &out_loss[0] if out_loss.shape[0] > 0 else NULL,
                              &out_correct[0] if out_correct.shape[0] > 0 else NULL,
                              &group[0], &steps, check_x)
    finally:
        free(s1)
        free(s2)
    return failed, steps
