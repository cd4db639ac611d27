# _kernels_products.pxi: matrix products: gemm through BLAS, split across the threads;
# the hand products of _smallgemm.h and their epilogues; the products' test hooks.
# Included by _kernels.pyx, whose header holds the shared declarations, settings and
# conventions.

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
