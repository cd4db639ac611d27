/* Reductions the compiler may vectorise: `omp simd reduction` licenses reassociation
 * (enabled by -fopenmp or -fopenmp-simd; without either the loops stay scalar). */
#ifndef NNFAST_SIMD_H
#define NNFAST_SIMD_H

/* Batch rows below which the hand loops beat gemm, measured per build (2-core EPYC,
 * OpenBLAS): NNF_SMALL_BATCH for every layer; for layers of at least PAR_MIN_ELEMS
 * weights, NNF_SMALL_BATCH_LARGE on one thread and NNF_SMALL_BATCH_SPLIT when their rows
 * are split across threads. With 8-wide FMA the loops win on 784-256-128-10 up to 6 rows
 * on one thread (A/6: 1.25x gemm) and up to 9 on two (A/8: 1.05-1.6x, A/10: 0.95x), but
 * not on narrow layers (64-128-10 at 6 rows: 0.79x); with SSE2 they lose from 4 rows on. */
#define NNF_SMALL_BATCH 4
#if defined(__AVX2__) && defined(__FMA__)
#define NNF_SMALL_BATCH_LARGE 7
#define NNF_SMALL_BATCH_SPLIT 10
#else
#define NNF_SMALL_BATCH_LARGE 4
#define NNF_SMALL_BATCH_SPLIT 4
#endif
static inline float nnf_sdot(const float *a, const float *b, long n) {
    float s = 0.0f;
    #pragma omp simd reduction(+:s)
    for (long i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}
static inline double nnf_ddot(const double *a, const double *b, long n) {
    double s = 0.0;
    #pragma omp simd reduction(+:s)
    for (long i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}
/* y += alpha * x */
static inline void nnf_saxpy(float *y, float alpha, const float *x, long n) {
    #pragma omp simd
    for (long i = 0; i < n; i++) y[i] += alpha * x[i];
}
static inline void nnf_daxpy(double *y, double alpha, const double *x, long n) {
    #pragma omp simd
    for (long i = 0; i < n; i++) y[i] += alpha * x[i];
}

/* Elementwise epilogues of the piecewise-linear activations, written as selects so they
 * compile to blends: as branches, a ReLU on ~50 % positive data mispredicts every other
 * element (measured: the two epilogues took 31 % of a B/32 training step).
 * bias_*: z += b, then a = act(z) (a may be z). *_backward: g *= act'(z), from a. */
#define NNF_EPILOGUES(P, T)                                                           \
static inline void nnf_##P##bias_add(T *z, const T *b, long n) {                      \
    _Pragma("omp simd")                                                               \
    for (long i = 0; i < n; i++) z[i] += b[i];                                        \
}                                                                                     \
static inline void nnf_##P##bias_relu(T *z, const T *b, T *a, long n) {               \
    _Pragma("omp simd")                                                               \
    for (long i = 0; i < n; i++) { T v = z[i] + b[i]; z[i] = v; a[i] = v > 0 ? v : (T)0; } \
}                                                                                     \
static inline void nnf_##P##bias_leaky_relu(T *z, const T *b, T *a, long n, T slope) { \
    _Pragma("omp simd")                                                               \
    for (long i = 0; i < n; i++) { T v = z[i] + b[i]; z[i] = v; a[i] = v > 0 ? v : slope * v; } \
}                                                                                     \
static inline void nnf_##P##relu_backward(T *g, const T *a, long n) {                 \
    _Pragma("omp simd")                                                               \
    for (long i = 0; i < n; i++) g[i] = a[i] > 0 ? g[i] : (T)0;                       \
}                                                                                     \
static inline void nnf_##P##leaky_relu_backward(T *g, const T *a, long n, T slope) {  \
    _Pragma("omp simd")                                                               \
    for (long i = 0; i < n; i++) g[i] = a[i] > 0 ? g[i] : slope * g[i];               \
}                                                                                     \
static inline void nnf_##P##tanh_backward(T *g, const T *a, long n) {                 \
    _Pragma("omp simd")                                                               \
    for (long i = 0; i < n; i++) g[i] *= 1 - a[i] * a[i];                             \
}                                                                                     \
static inline void nnf_##P##sigmoid_backward(T *g, const T *a, long n) {              \
    _Pragma("omp simd")                                                               \
    for (long i = 0; i < n; i++) g[i] *= a[i] * (1 - a[i]);                           \
}
NNF_EPILOGUES(s, float)
NNF_EPILOGUES(d, double)
#endif
