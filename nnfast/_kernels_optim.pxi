# _kernels_optim.pxi: optimizer updates (SGD, Adam): one pass per parameter array.
# Included by _kernels.pyx, whose header holds the shared declarations, settings and
# conventions.

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


cdef void _sgd_apply(floating* p, floating* gsum, floating* v, Py_ssize_t n, double scale,
                     double lr, double momentum, bint nesterov, double wd) noexcept nogil:
    cdef:
        int nthreads = _threads_for(<double>n)
        int t
        Py_ssize_t chunk, lo, hi
    if nthreads <= 1:
        _sgd_range(p, gsum, v, <floating>scale, <floating>lr, <floating>momentum, nesterov,
                   <floating>wd, 0, n)
        return
    chunk = (n + nthreads - 1) // nthreads
    for t in prange(nthreads, num_threads=nthreads, schedule='static'):
        lo = t * chunk
        hi = min(n, lo + chunk)
        if hi > lo:
            _sgd_range(p, gsum, v, <floating>scale, <floating>lr, <floating>momentum, nesterov,
                       <floating>wd, lo, hi)


@cython.boundscheck(False)
@cython.wraparound(False)
def sgd_update(floating[::1] param, floating[::1] grad_sum, floating[::1] velocity,
               double scale, double lr, double momentum, bint nesterov, double weight_decay):
    """PyTorch's SGD on the averaged gradient g = grad_sum * scale; grad_sum is zeroed.

    param (n,) IN/OUT; grad_sum (n,) IN/OUT; velocity (n,) IN/OUT (unused when
    momentum == 0, pass param); scale = 1 / samples accumulated."""
    cdef Py_ssize_t n = param.shape[0]
    _check(n >= 1 and grad_sum.shape[0] == n and velocity.shape[0] == n, "shape mismatch")
    with nogil:
        _sgd_apply(&param[0], &grad_sum[0], &velocity[0], n, scale, lr, momentum, nesterov,
                   weight_decay)


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


cdef void _adam_apply(floating* p, floating* gsum, floating* m1, floating* m2, Py_ssize_t n,
                      double scale, double lr, double beta1, double beta2, double eps,
                      double weight_decay, bint decoupled, long step) noexcept nogil:
    """Adam on one array; ``step`` is the 1-based number of this update."""
    cdef:
        int nthreads = _threads_for(<double>n)
        int t
        Py_ssize_t chunk, lo, hi
        double bias1 = 1.0 - beta1 ** step
        floating bias2_sqrt = <floating>sqrt(1.0 - beta2 ** step)
        floating l2 = <floating>(0.0 if decoupled else weight_decay)
        floating decay_factor = <floating>((1.0 - lr * weight_decay) if decoupled else 1.0)
        floating step_size = <floating>(lr / bias1)
    if nthreads <= 1:
        _adam_range(p, gsum, m1, m2, <floating>scale, step_size, <floating>beta1,
                    <floating>beta2, <floating>eps, bias2_sqrt, l2, decay_factor, 0, n)
        return
    chunk = (n + nthreads - 1) // nthreads
    for t in prange(nthreads, num_threads=nthreads, schedule='static'):
        lo = t * chunk
        hi = min(n, lo + chunk)
        if hi > lo:
            _adam_range(p, gsum, m1, m2, <floating>scale, step_size, <floating>beta1,
                        <floating>beta2, <floating>eps, bias2_sqrt, l2, decay_factor, lo, hi)


@cython.boundscheck(False)
@cython.wraparound(False)
def adam_update(floating[::1] param, floating[::1] grad_sum, floating[::1] exp_avg,
                floating[::1] exp_avg_sq, double scale, double lr, double beta1, double beta2,
                double eps, double weight_decay, bint decoupled, long step):
    """PyTorch's Adam (bias-corrected) on g = grad_sum * scale; grad_sum is zeroed.

    ``decoupled=True`` is AdamW's decay (param *= 1 - lr*wd); otherwise wd*param is added
    to g (L2). step is the 1-based step number of this update."""
    cdef Py_ssize_t n = param.shape[0]
    _check(n >= 1 and grad_sum.shape[0] == n and exp_avg.shape[0] == n
           and exp_avg_sq.shape[0] == n, "shape mismatch")
    _check(step >= 1, "step must be >= 1")
    with nogil:
        _adam_apply(&param[0], &grad_sum[0], &exp_avg[0], &exp_avg_sq[0], n, scale, lr, beta1,
                    beta2, eps, weight_decay, decoupled, step)
