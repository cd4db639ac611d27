# _kernels_epoch.pxi: runs of iterations (one nogil call per epoch): gathering the
# shuffled rows, accumulation groups, fusing batch it + 1's first product. Included by
# _kernels.pyx, whose header holds the shared declarations, settings and conventions.

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
