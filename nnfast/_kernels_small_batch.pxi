# _kernels_small_batch.pxi: small batches: the hand-written loops that beat BLAS below
# the measured crossovers. Included by _kernels.pyx, whose header holds the shared
# declarations, settings and conventions.

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
