# _kernels_plan.pxi: NetworkPlan: one model's pointers and workspaces, and the entry
# points fit calls. Included by _kernels.pyx, whose header holds the shared
# declarations, settings and conventions.

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

    def forward(self, X, out):
        """out = the last layer's activation of every row of X, in chunks of the plan's
        capacity, in one nogil call (``predict``)."""
        _plan_forward(self, X, out)

    def forward_rows(self, X):
        """The forward pass of X's rows (at most the capacity) into the plan's Z and A
        rows, in one nogil call (``evaluate``)."""
        _plan_forward_rows(self, X)

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


cdef int _check_forward_input(NetworkPlan plan, Py_ssize_t d, bint is64) except -1:
    _check(is64 == plan.is64, "array dtype differs from the model's")
    _check(d == plan.net.width[0], "X width differs from the first layer's")
    return 0


def _plan_forward(NetworkPlan plan, const floating[:, ::1] X, floating[:, ::1] out):
    # IN  X: (n, inputs) rows to predict
    # OUT out: (n, outputs), none of the plan's buffers (predict passes a new array; the
    #     plan is not public API)
    cdef:
        Py_ssize_t n = X.shape[0], start = 0, m
        int L = plan.net.n_layers
        int n_out = plan.net.width[L]
    _check_forward_input(plan, X.shape[1], sizeof(floating) == 8)
    _check(out.shape[0] == n and out.shape[1] == n_out, "out must be (rows, outputs)")
    with nogil:
        while start < n:
            m = min(plan.capacity, n - start)
            _net_forward(&plan.net, &X[start, 0], m, False, L)
            memcpy(&out[start, 0], plan.net.A[L - 1], m * n_out * sizeof(floating))
            start += m


def _plan_forward_rows(NetworkPlan plan, const floating[:, ::1] X):
    # IN  X: (m, inputs), 1 <= m <= capacity
    # OUT the plan's Z[l] and A[l], rows [:m]
    cdef Py_ssize_t m = X.shape[0]
    _check_forward_input(plan, X.shape[1], sizeof(floating) == 8)
    _check(1 <= m <= plan.capacity, "rows must be in [1, capacity]")
    with nogil:
        _net_forward(&plan.net, &X[0, 0], m, False, plan.net.n_layers)


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
