# _kernels_rows.pxi: element-wise passes over rows (bias and activation, slopes, column
# sums) and the losses fused with their gradient. Included by _kernels.pyx, whose header
# holds the shared declarations, settings and conventions.

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
