/* Reductions the compiler may vectorise: `omp simd reduction` licenses reassociation
 * (enabled by -fopenmp or -fopenmp-simd; without either the loops stay scalar). */
#ifndef NNFAST_SIMD_H
#define NNFAST_SIMD_H

/* Batch rows below which the hand loops beat gemm, measured per build (2-core EPYC,
 * OpenBLAS, in-process A/B of the limits, median of 5-7 alternating pairs):
 * NNF_SMALL_BATCH for every layer; for layers of at least PAR_MIN_ELEMS weights,
 * NNF_SMALL_BATCH_LARGE on one thread and NNF_SMALL_BATCH_SPLIT when their rows are split
 * across threads. On 784-256-128-10, hand loops / gemm: AVX2 one thread 1.21 at 7 rows,
 * 1.04 at 8, 0.90 at 10; two threads 1.43 at 12, 1.01 at 13, 0.98 at 14, 0.72 at 16.
 * SSE2 one thread 1.09 at 6, 0.73 at 8; two threads 1.13 at 6, 0.91 at 8. Narrow layers
 * (64-128-10) lose from 4 rows on (0.92 at 4, 0.72 at 6) and win below (1.38 at 3). */
#define NNF_SMALL_BATCH 4
#if defined(__AVX2__) && defined(__FMA__)
#define NNF_SMALL_BATCH_LARGE 9
#define NNF_SMALL_BATCH_SPLIT 13
#else
#define NNF_SMALL_BATCH_LARGE 7
#define NNF_SMALL_BATCH_SPLIT 7
#endif
/* dot and axpy, the inner loops of the small-batch kernels. With AVX2 or SSE2 they are
 * written out by hand (NNF_DOT_AXPY, one body for both widths), four vectors per trip,
 * every load of a trip issued before its first store: the compiler's one-vector `omp simd` loop stores y and then loads x from
 * an address 4 KiB apart (rows of W, stride a multiple of 1 KiB), which the CPU takes
 * for a dependency and stalls on (4K aliasing). Measured on the 2-core EPYC, a
 * 784x256 forward + SGD update per sample: 36-44 us one vector per trip, 18-23 us four
 * (2 threads); A/1 training 1.5x. The dot keeps four accumulators, so it waits on the
 * FMA latency once per four vectors rather than once per vector. x and y must not
 * overlap. */
#define NNF_DOT_AXPY(P, T, V, W, LOAD, STORE, SET1, FMADD, ZERO, ADD, HSUM)             \
static inline T nnf_##P##dot(const T *a, const T *b, long n) {                        \
    V s0 = ZERO(), s1 = ZERO(), s2 = ZERO(), s3 = ZERO();                             \
    long i = 0;                                                                       \
    for (; i + 4 * W <= n; i += 4 * W) {                                              \
        s0 = FMADD(LOAD(a + i), LOAD(b + i), s0);                                     \
        s1 = FMADD(LOAD(a + i + W), LOAD(b + i + W), s1);                             \
        s2 = FMADD(LOAD(a + i + 2 * W), LOAD(b + i + 2 * W), s2);                     \
        s3 = FMADD(LOAD(a + i + 3 * W), LOAD(b + i + 3 * W), s3);                     \
    }                                                                                 \
    for (; i + W <= n; i += W) s0 = FMADD(LOAD(a + i), LOAD(b + i), s0);              \
    T s = HSUM(ADD(ADD(s0, s1), ADD(s2, s3)));                                        \
    for (; i < n; i++) s += a[i] * b[i];                                              \
    return s;                                                                         \
}                                                                                     \
static inline void nnf_##P##axpy(T *y, T alpha, const T *x, long n) {                 \
    const V va = SET1(alpha);                                                         \
    long i = 0;                                                                       \
    for (; i + 4 * W <= n; i += 4 * W) {                                              \
        V y0 = LOAD(y + i), y1 = LOAD(y + i + W);                                     \
        V y2 = LOAD(y + i + 2 * W), y3 = LOAD(y + i + 3 * W);                         \
        y0 = FMADD(va, LOAD(x + i), y0);                                              \
        y1 = FMADD(va, LOAD(x + i + W), y1);                                          \
        y2 = FMADD(va, LOAD(x + i + 2 * W), y2);                                      \
        y3 = FMADD(va, LOAD(x + i + 3 * W), y3);                                      \
        STORE(y + i, y0); STORE(y + i + W, y1);                                       \
        STORE(y + i + 2 * W, y2); STORE(y + i + 3 * W, y3);                           \
    }                                                                                 \
    for (; i + W <= n; i += W) STORE(y + i, FMADD(va, LOAD(x + i), LOAD(y + i)));    \
    for (; i < n; i++) y[i] += alpha * x[i];                                          \
}
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
static inline float nnf_hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline double nnf_hsum_pd(__m256d v) {
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    s = _mm_add_sd(s, _mm_unpackhi_pd(s, s));
    return _mm_cvtsd_f64(s);
}
NNF_DOT_AXPY(s, float, __m256, 8, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_set1_ps,
             _mm256_fmadd_ps, _mm256_setzero_ps, _mm256_add_ps, nnf_hsum_ps)
NNF_DOT_AXPY(d, double, __m256d, 4, _mm256_loadu_pd, _mm256_storeu_pd, _mm256_set1_pd,
             _mm256_fmadd_pd, _mm256_setzero_pd, _mm256_add_pd, nnf_hsum_pd)
#elif defined(__SSE2__)
#include <emmintrin.h>
static inline float nnf_hsum_ps(__m128 v) {
    __m128 s = _mm_add_ps(v, _mm_movehl_ps(v, v));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}
static inline double nnf_hsum_pd(__m128d v) {
    return _mm_cvtsd_f64(_mm_add_sd(v, _mm_unpackhi_pd(v, v)));
}
/* no FMA in SSE2: a*b+c rounds twice, as the scalar loops did */
#define NNF_SSE_FMADD_PS(a, b, c) _mm_add_ps(_mm_mul_ps(a, b), c)
#define NNF_SSE_FMADD_PD(a, b, c) _mm_add_pd(_mm_mul_pd(a, b), c)
NNF_DOT_AXPY(s, float, __m128, 4, _mm_loadu_ps, _mm_storeu_ps, _mm_set1_ps,
             NNF_SSE_FMADD_PS, _mm_setzero_ps, _mm_add_ps, nnf_hsum_ps)
NNF_DOT_AXPY(d, double, __m128d, 2, _mm_loadu_pd, _mm_storeu_pd, _mm_set1_pd,
             NNF_SSE_FMADD_PD, _mm_setzero_pd, _mm_add_pd, nnf_hsum_pd)
#else
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
#endif

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
