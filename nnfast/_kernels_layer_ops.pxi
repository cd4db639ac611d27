# _kernels_layer_ops.pxi: the Python-visible kernels of one layer (forward, loss
# gradient, backward) and the finite check. Included by _kernels.pyx, whose header holds
# the shared declarations, settings and conventions.

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
