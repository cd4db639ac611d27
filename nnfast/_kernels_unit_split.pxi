# _kernels_unit_split.pxi: the unit split: small batches stepping every batch on several
# threads, one parallel region per run. Included by _kernels.pyx, whose header holds the
# shared declarations, settings and conventions.

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
