# _kernels_network.pxi: the network as the whole-network passes see it (Net, OptSpec,
# batches) and the optimizer step on it. Included by _kernels.pyx, whose header holds
# the shared declarations, settings and conventions.

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
