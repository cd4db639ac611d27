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
from cython.parallel cimport prange
from libc.math cimport exp, expf, log, logf, tanh, tanhf, sqrt, sqrtf, log1p, log1pf, fabs, fabsf
from libc.stdint cimport int64_t
from libc.string cimport memcpy, memset
from scipy.linalg.cython_blas cimport sgemm, dgemm

import numpy as np

cdef extern from "_omp_shim.h":
    int nnf_openmp_enabled() noexcept nogil
    int nnf_omp_max_threads() noexcept nogil

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
cdef double PAR_MIN_FLOPS = 4000000.0

cdef int _num_threads = 1


def openmp_enabled():
    """True when this build was compiled with OpenMP."""
    return bool(nnf_openmp_enabled())


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
        sgemm(&tb, &ta, &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc)
    else:
        dgemm(&tb, &ta, &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc)


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
        chunk = (n + nthreads - 1) // nthreads
        chunk = ((chunk + 15) // 16) * 16  # whole SIMD panels per thread
        for t in prange(nthreads, num_threads=nthreads, schedule='static'):
            lo = t * chunk
            hi = min(n, lo + chunk)
            if hi > lo:
                _gemm(trans_a, trans_b, m, hi - lo, k, alpha, a, lda,
                      b + (<Py_ssize_t>lo * ldb if trans_b else lo), ldb,
                      beta, c + lo, ldc)


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
        for j in range(n):
            zr[j] = zr[j] + bias[j]
        if act == SOFTMAX:
            mx = zr[0]
            for j in range(1, n):
                if zr[j] > mx:
                    mx = zr[j]
            s = 0
            for j in range(n):
                v = _exp(zr[j] - mx)
                ar[j] = v
                s = s + v
            s = 1 / s
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
        int nthreads = _threads_for(<double>m * n)
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
    cdef Py_ssize_t i
    for i in range(r0 * n, r1 * n):
        g[i] = g[i] * _activation_slope(a[i], act)


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


cdef void _add_column_sums(floating* g, floating* out, Py_ssize_t m, int n) noexcept nogil:
    """out[j] += sum_r G[r, j]; rows outer so the inner loop is contiguous."""
    cdef:
        Py_ssize_t r, j
        floating* gr
    for r in range(m):
        gr = g + r * n
        for j in range(n):
            out[j] = out[j] + gr[j]


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
            # softmax cross-entropy: L = logsumexp(z) - sum_k y_k z_k (with sum_k y_k = 1)
            mx = zr[0]
            for j in range(1, n):
                if zr[j] > mx:
                    mx = zr[j]
            s = 0
            for j in range(n):
                s = s + _exp(zr[j] - mx)
            lse = mx + _log(s)
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

    Z, A (M, K) IN: last layer's pre-activation and activation. T (M, K) IN: targets
    (ignored for integer-label cross-entropy, pass any (1, K) array). labels (M,) IN:
    class indices (used only for integer-label cross-entropy, else pass an empty array).
    dZ (M, K) OUT."""
    cdef Py_ssize_t m = Z.shape[0], n = Z.shape[1], r
    _check(m >= 1 and n >= 1, "empty operand")
    _check(A.shape[0] == m and A.shape[1] == n and dZ.shape[0] == m and dZ.shape[1] == n,
           "A/dZ shape must equal Z's")
    if loss == CROSS_ENTROPY:
        _check(labels.shape[0] == m, "labels must have M entries")
        for r in range(m):
            _check(0 <= labels[r] < n, "label out of range")
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
        _add_column_sums(<floating*>&dZ[0, 0], &db[0], m, <int>n)


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
        _pgemm(False, True, <int>m, <int>k, <int>n, <floating>1, <floating*>&dZ[0, 0], <int>n,
               <floating*>&W[0, 0], <int>n, <floating>0, &dZ_prev[0, 0], <int>k)
        _scale_by_slope(&dZ_prev[0, 0], <floating*>&A_prev[0, 0], m, <int>k, act_prev)


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


@cython.boundscheck(False)
@cython.wraparound(False)
def sgd_update(floating[::1] param, floating[::1] grad_sum, floating[::1] velocity,
               double scale, double lr, double momentum, bint nesterov, double weight_decay):
    """PyTorch's SGD on the averaged gradient g = grad_sum * scale; grad_sum is zeroed.

    param (n,) IN/OUT; grad_sum (n,) IN/OUT; velocity (n,) IN/OUT (unused when
    momentum == 0, pass param); scale = 1 / samples accumulated."""
    cdef:
        Py_ssize_t n = param.shape[0], chunk, lo, hi
        int nthreads = _threads_for(<double>n)
        int t
    _check(n >= 1 and grad_sum.shape[0] == n and velocity.shape[0] == n, "shape mismatch")
    with nogil:
        if nthreads <= 1:
            _sgd_range(&param[0], &grad_sum[0], &velocity[0], <floating>scale, <floating>lr,
                       <floating>momentum, nesterov, <floating>weight_decay, 0, n)
        else:
            chunk = (n + nthreads - 1) // nthreads
            for t in prange(nthreads, num_threads=nthreads, schedule='static'):
                lo = t * chunk
                hi = min(n, lo + chunk)
                if hi > lo:
                    _sgd_range(&param[0], &grad_sum[0], &velocity[0], <floating>scale,
                               <floating>lr, <floating>momentum, nesterov,
                               <floating>weight_decay, lo, hi)


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


@cython.boundscheck(False)
@cython.wraparound(False)
def adam_update(floating[::1] param, floating[::1] grad_sum, floating[::1] exp_avg,
                floating[::1] exp_avg_sq, double scale, double lr, double beta1, double beta2,
                double eps, double weight_decay, bint decoupled, long step):
    """PyTorch's Adam (bias-corrected) on g = grad_sum * scale; grad_sum is zeroed.

    ``decoupled=True`` is AdamW's decay (param *= 1 - lr*wd); otherwise wd*param is added
    to g (L2). step is the 1-based step number after this update."""
    cdef:
        Py_ssize_t n = param.shape[0], chunk, lo, hi
        int nthreads = _threads_for(<double>n)
        int t
        double bias1 = 1.0 - beta1 ** step
        double bias2_sqrt = sqrt(1.0 - beta2 ** step)
        double l2 = 0.0 if decoupled else weight_decay
        double decay_factor = (1.0 - lr * weight_decay) if decoupled else 1.0
        floating step_size = <floating>(lr / bias1)
    _check(n >= 1 and grad_sum.shape[0] == n and exp_avg.shape[0] == n
           and exp_avg_sq.shape[0] == n, "shape mismatch")
    _check(step >= 1, "step must be >= 1")
    with nogil:
        if nthreads <= 1:
            _adam_range(&param[0], &grad_sum[0], &exp_avg[0], &exp_avg_sq[0], <floating>scale,
                        step_size, <floating>beta1, <floating>beta2, <floating>eps,
                        <floating>bias2_sqrt, <floating>l2, <floating>decay_factor, 0, n)
        else:
            chunk = (n + nthreads - 1) // nthreads
            for t in prange(nthreads, num_threads=nthreads, schedule='static'):
                lo = t * chunk
                hi = min(n, lo + chunk)
                if hi > lo:
                    _adam_range(&param[0], &grad_sum[0], &exp_avg[0], &exp_avg_sq[0],
                                <floating>scale, step_size, <floating>beta1, <floating>beta2,
                                <floating>eps, <floating>bias2_sqrt, <floating>l2,
                                <floating>decay_factor, lo, hi)


# ----------------------------------------------------------------------------------
# batch gathering
# ----------------------------------------------------------------------------------
@cython.boundscheck(False)
@cython.wraparound(False)
def gather_rows(const floating[:, ::1] X, const int64_t[::1] index, floating[:, ::1] out):
    """out[i] = X[index[i]] for every i (the shuffled batch buffer).

    X (N, d) IN; index (m,) IN, each in [0, N); out (m, d) OUT."""
    cdef:
        Py_ssize_t m = index.shape[0], d = X.shape[1], N = X.shape[0], i
        size_t row_bytes = d * sizeof(floating)
    _check(out.shape[0] == m and out.shape[1] == d, "out must be (len(index), X.shape[1])")
    for i in range(m):
        _check(0 <= index[i] < N, "index out of range")
    if m == 0 or d == 0:
        return
    with nogil:
        for i in range(m):
            memcpy(&out[i, 0], &X[index[i], 0], row_bytes)
