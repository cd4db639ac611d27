# _kernels_iteration.pxi: one iteration of the whole network (forward, loss, backward,
# step): gemm path, row split, tail split. Included by _kernels.pyx, whose header holds
# the shared declarations, settings and conventions.

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
