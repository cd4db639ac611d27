# _kernels_math.pxi: scalar math (exp, log, tanh, activations and their slopes), one
# name for both precisions. Included by _kernels.pyx, whose header holds the shared
# declarations, settings and conventions.

# ----------------------------------------------------------------------------------
# scalar math, one name for both precisions
# ----------------------------------------------------------------------------------
cdef inline floating _exp(floating x) noexcept nogil:
    if floating is float:
        return expf(x)
    else:
        return exp(x)

cdef inline floating _exp_sum(const floating* x, floating shift, floating* out,
                              Py_ssize_t n) noexcept nogil:
    """out[j] = exp(x[j] - shift); returns the sum (vectorised in the AVX2 build)."""
    if floating is float:
        return nnf_sexp_sum(x, shift, out, n)
    else:
        return nnf_dexp_sum(x, shift, out, n)


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

cdef inline floating _dot(const floating* a, const floating* b, Py_ssize_t n) noexcept nogil:
    if floating is float:
        return nnf_sdot(a, b, n)
    else:
        return nnf_ddot(a, b, n)

cdef inline void _axpy(floating* y, floating alpha, const floating* x, Py_ssize_t n) noexcept nogil:
    if floating is float:
        nnf_saxpy(y, alpha, x, n)
    else:
        nnf_daxpy(y, alpha, x, n)

cdef inline bint _narrow(floating* typed, Py_ssize_t n) noexcept nogil:
    """Whether rows of n values take the narrow-row kernels (_simd.h; AVX2 build only)."""
    if floating is float:
        return nnf_snarrow(n)
    else:
        return nnf_dnarrow(n)

cdef inline void _narrow_axpy(floating* y, floating alpha, const floating* x,
                              Py_ssize_t n) noexcept nogil:
    if floating is float:
        nnf_snarrow_axpy(y, alpha, x, n)
    else:
        nnf_dnarrow_axpy(y, alpha, x, n)

cdef inline void _narrow_forward(const floating* x, const floating* w, Py_ssize_t i0,
                                 Py_ssize_t i1, Py_ssize_t n, floating* z) noexcept nogil:
    if floating is float:
        nnf_snarrow_forward(x, w, i0, i1, n, z)
    else:
        nnf_dnarrow_forward(x, w, i0, i1, n, z)

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
