/* Reductions the compiler may vectorise: `omp simd reduction` licenses reassociation
 * (enabled by -fopenmp or -fopenmp-simd; without either the loops stay scalar). */
#ifndef NNFAST_SIMD_H
#define NNFAST_SIMD_H

/* Batch rows below which the hand loops beat the layer products, measured per build
 * (2-core EPYC, OpenBLAS; the limits set through _set_small_batch_limits, processes
 * alternated, medians of 4-7 runs): NNF_SMALL_BATCH for every layer; for layers of at
 * least PAR_MIN_ELEMS weights, NNF_SMALL_BATCH_LARGE on one thread and
 * NNF_SMALL_BATCH_SPLIT when their rows are split across threads.
 * AVX2, where the products are the hand kernels of _smallgemm.h up to 192 rows, on
 * 784-256-128-10, products / hand loops (samples/s): one thread 0.65 at 2 rows, 0.81 at
 * 3, 1.14 at 4, 1.26 at 6, 1.44 at 8; two threads 0.84 at 4, 0.97 at 6, 0.93 at 7,
 * 1.04-1.10 at 8, 1.38 at 12. (Against gemm, before those kernels, the hand loops won up
 * to 8 rows on one thread and 12 on two.) float64 shares the float32 limits; its products
 * are gemm, and the new limits measured 1.05 at A/8 on two threads, 0.97 at A/6 on one.
 * SSE2 (gemm), hand loops / gemm: one thread 1.09 at 6, 0.73 at 8; two threads 1.13 at 6,
 * 0.91 at 8. Narrow layers (64-128-10) lose from 4 rows on (0.92 at 4, 0.72 at 6) and win
 * below (1.38 at 3). */
#define NNF_SMALL_BATCH 4
/* Samples whose first-layer steps the unit split applies in one pass at batch 1
 * (UNIT_LAZY_BLOCK in _kernels.pyx; 0: a pass a sample). The blocked pass is bound by
 * its FMAs, two a weight a sample, and the pass a sample by the L2 cache: on 512-bit
 * vectors the FMAs are the cheaper (A/1, Zen 5, 2 threads, in-process A/B: 1.2-1.4x),
 * on 256-bit ones not (the AVX2 build on the same CPU: 0.91x with blocks of 4, 0.93x
 * with 8). */
#if defined(__AVX512F__)
#define NNF_LAZY_BLOCK 8
#else
#define NNF_LAZY_BLOCK 0
#endif
#if defined(__AVX2__) && defined(__FMA__)
#define NNF_SMALL_BATCH_LARGE 4
#define NNF_SMALL_BATCH_SPLIT 8
#else
#define NNF_SMALL_BATCH_LARGE 7
#define NNF_SMALL_BATCH_SPLIT 7
#endif
/* dot and axpy, the inner loops of the small-batch kernels. With AVX2 or SSE2 they are
 * written out by hand (NNF_DOT, and NNF_AXPY for the element-wise loops; one body for
 * every vector width), four vectors per trip, every load of a trip issued before its
 * first store: the compiler's one-vector `omp simd` loop stores y and then loads x from
 * an address 4 KiB apart (rows of W, stride a multiple of 1 KiB), which the CPU takes
 * for a dependency and stalls on (4K aliasing). Measured on the 2-core EPYC, a
 * 784x256 forward + SGD update per sample: 36-44 us one vector per trip, 18-23 us four
 * (2 threads); A/1 training 1.5x. The dot keeps four accumulators, so it waits on the
 * FMA latency once per four vectors rather than once per vector. x and y must not
 * overlap. */
#define NNF_DOT(P, T, V, W, LOAD, FMADD, ZERO, ADD, HSUM)                           \
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
}
/* The element-wise loops: every element of y or z gets the same operations at any
 * vector width, so builds of different widths agree bit for bit. */
#define NNF_AXPY(P, T, V, W, LOAD, STORE, SET1, FMADD)                                 \
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
}                                                                                     \
/* z += b[r] * w[r] for four consecutive rows w[r] of n values (stride ld >= n: a     \
 * block of columns), in row order: the four axpys' operations per element, with z     \
 * loaded and stored once instead of four times. */                                   \
static inline void nnf_##P##forward4(const T *w, long ld, long n, const T *b, T *z) {  \
    const V b0 = SET1(b[0]), b1 = SET1(b[1]), b2 = SET1(b[2]), b3 = SET1(b[3]);       \
    const T *w1 = w + ld, *w2 = w + 2 * ld, *w3 = w + 3 * ld;                         \
    long j = 0;                                                                       \
    for (; j + W <= n; j += W) {                                                      \
        V zz = FMADD(b0, LOAD(w + j), LOAD(z + j));                                   \
        zz = FMADD(b1, LOAD(w1 + j), zz);                                             \
        zz = FMADD(b2, LOAD(w2 + j), zz);                                             \
        STORE(z + j, FMADD(b3, LOAD(w3 + j), zz));                                    \
    }                                                                                 \
    for (; j < n; j++) {                                                              \
        z[j] += b[0] * w[j]; z[j] += b[1] * w1[j];                                    \
        z[j] += b[2] * w2[j]; z[j] += b[3] * w3[j];                                   \
    }                                                                                 \
}                                                                                     \
/* Four consecutive rows w[r] (n values, stride ld) of the first layer at batch 1: the \
 * SGD step w[r] += a[r] * dz, then z += b[r] * w[r] (the next sample's forward), rows \
 * in order.                                                                          \
 * Per element exactly the operations of the two axpys it replaces, but z is loaded     \
 * and stored once per four rows instead of once per row (one store per weight is the   \
 * bound: 392x256 rows 7.9 -> 4.6 us, C microbenchmark, one thread). */                 \
static inline void nnf_##P##step_forward4(T *w, long ld, long n, const T *dz,         \
                                          const T *a, const T *b, T *z) {             \
    const V a0 = SET1(a[0]), a1 = SET1(a[1]), a2 = SET1(a[2]), a3 = SET1(a[3]);       \
    const V b0 = SET1(b[0]), b1 = SET1(b[1]), b2 = SET1(b[2]), b3 = SET1(b[3]);       \
    T *w1 = w + ld, *w2 = w + 2 * ld, *w3 = w + 3 * ld;                               \
    long j = 0;                                                                       \
    for (; j + W <= n; j += W) {                                                      \
        const V d = LOAD(dz + j);                                                     \
        V zz = LOAD(z + j), v;                                                        \
        v = FMADD(a0, d, LOAD(w + j));  STORE(w + j, v);  zz = FMADD(b0, v, zz);      \
        v = FMADD(a1, d, LOAD(w1 + j)); STORE(w1 + j, v); zz = FMADD(b1, v, zz);      \
        v = FMADD(a2, d, LOAD(w2 + j)); STORE(w2 + j, v); zz = FMADD(b2, v, zz);      \
        v = FMADD(a3, d, LOAD(w3 + j)); STORE(w3 + j, v); zz = FMADD(b3, v, zz);      \
        STORE(z + j, zz);                                                             \
    }                                                                                 \
    for (; j < n; j++) {                                                              \
        w[j] += a[0] * dz[j];  z[j] += b[0] * w[j];                                   \
        w1[j] += a[1] * dz[j]; z[j] += b[1] * w1[j];                                  \
        w2[j] += a[2] * dz[j]; z[j] += b[2] * w2[j];                                  \
        w3[j] += a[3] * dz[j]; z[j] += b[3] * w3[j];                                  \
    }                                                                                 \
}
/* The first layer at batch 1, plain SGD, with its steps applied KB samples at a time
 * (the unit split's lazy first layer, _kernels.pyx): for every row i of w (``rows``
 * rows of ld values, ld a multiple of the vector width) with flags[i] & 1, the KB steps
 * w[i] += u[i * KB + j] * g[j] for j = 0..KB-1 in turn (g: KB rows, ld apart); then,
 * for rows with flags[i] & 2, the next KB samples' products zb[j] = sum_i f[i * KB + j]
 * * w[i] in row order (zb: KB rows, ld apart; rows without the flag add nothing).
 * Per element the operations of KB sequential axpys and of the forward pass, but each
 * vector of w is loaded and stored once per KB samples instead of once per sample: on
 * the 2-core Zen 5, a 784 x 128 block, one thread, 3.7 us a sample one sample at a time
 * (nnf_sstep_forward4), 2.1 us eight at a time; the loop is then bound by its FMAs, two
 * a weight a sample, not by the cache. Column strips outermost: the KB gradient vectors
 * and the KB sums stay in registers while the strip's rows stream past. */
#define NNF_BLOCK_PASS(P, T, V, W, LOAD, STORE, SET1, FMADD, ZERO, KB)                  \
static inline void nnf_##P##block_pass##KB(T *w, long ld, long rows, const T *g,        \
                                           const T *u, const T *f,                    \
                                           const unsigned char *flags, T *zb) {       \
    for (long q = 0; q + W <= ld; q += W) {                                           \
        V gv[KB], acc[KB];                                                            \
        _Pragma("GCC unroll 16") for (int j = 0; j < KB; j++) {                       \
            gv[j] = LOAD(g + j * ld + q); acc[j] = ZERO();                            \
        }                                                                             \
        T *wp = w + q;                                                                \
        for (long i = 0; i < rows; i++, wp += ld) {                                   \
            const int fl = flags[i];                                                  \
            if (!fl) continue;                                                        \
            V v = LOAD(wp);                                                           \
            if (fl & 1) {                                                             \
                const T *ui = u + i * KB;                                             \
                _Pragma("GCC unroll 16") for (int j = 0; j < KB; j++)                 \
                    v = FMADD(SET1(ui[j]), gv[j], v);                                 \
                STORE(wp, v);                                                         \
            }                                                                         \
            if (fl & 2) {                                                             \
                const T *fi = f + i * KB;                                             \
                _Pragma("GCC unroll 16") for (int j = 0; j < KB; j++)                 \
                    acc[j] = FMADD(SET1(fi[j]), v, acc[j]);                           \
            }                                                                         \
        }                                                                             \
        _Pragma("GCC unroll 16") for (int j = 0; j < KB; j++) STORE(zb + j * ld + q, acc[j]); \
    }                                                                                 \
}
#define NNF_BLOCK_PASSES(P, T, V, W, LOAD, STORE, SET1, FMADD, ZERO)                     \
    NNF_BLOCK_PASS(P, T, V, W, LOAD, STORE, SET1, FMADD, ZERO, 4)                       \
    NNF_BLOCK_PASS(P, T, V, W, LOAD, STORE, SET1, FMADD, ZERO, 8)
/* z[0:n] = the sum over rows i0 <= i < i1 with x[i] != 0 of x[i] * w[i * ld + 0:n], in
 * row order: the forward pass of one row of X, zero inputs skipped, with the same
 * operations per element as one axpy a row (_forward_row), but columns in strips of S
 * vectors held in registers across the rows instead of z loaded and stored for every
 * row. On the 2-core Zen 5, one row of a 128 x 128 layer with a third of its inputs 0:
 * 0.35 us as axpys, 0.13 us in registers (C microbenchmark, one thread). */
#define NNF_ROWS_FORWARD(P, T, V, W, LOAD, STORE, SET1, FMADD, ZERO, S)                 \
static inline void nnf_##P##rows_forward(const T *x, const T *w, long ld, long i0,       \
                                         long i1, long n, T *z) {                     \
    long q = 0;                                                                       \
    for (; q + S * W <= n; q += S * W) {                                              \
        V acc[S];                                                                     \
        _Pragma("GCC unroll 8") for (int v = 0; v < S; v++) acc[v] = ZERO();          \
        for (long i = i0; i < i1; i++) {                                              \
            const T xi = x[i];                                                        \
            if (xi == 0) continue;                                                    \
            const V xb = SET1(xi);                                                    \
            const T *wi = w + i * ld + q;                                             \
            _Pragma("GCC unroll 8") for (int v = 0; v < S; v++)                       \
                acc[v] = FMADD(xb, LOAD(wi + v * W), acc[v]);                         \
        }                                                                             \
        _Pragma("GCC unroll 8") for (int v = 0; v < S; v++) STORE(z + q + v * W, acc[v]); \
    }                                                                                 \
    for (; q + W <= n; q += W) {                                                      \
        V acc = ZERO();                                                               \
        for (long i = i0; i < i1; i++)                                                \
            if (x[i] != 0) acc = FMADD(SET1(x[i]), LOAD(w + i * ld + q), acc);        \
        STORE(z + q, acc);                                                            \
    }                                                                                 \
    for (; q < n; q++) {                                                              \
        T acc = 0;                                                                    \
        for (long i = i0; i < i1; i++)                                                \
            if (x[i] != 0) acc += x[i] * w[i * ld + q];                               \
        z[q] = acc;                                                                   \
    }                                                                                 \
}
/* the loops above for one vector type (S: the strip of nnf_*rows_forward) */
#define NNF_LOOP_KERNELS(P, T, V, W, LOAD, STORE, SET1, FMADD, ZERO, S)                  \
    NNF_BLOCK_PASSES(P, T, V, W, LOAD, STORE, SET1, FMADD, ZERO)                        \
    NNF_ROWS_FORWARD(P, T, V, W, LOAD, STORE, SET1, FMADD, ZERO, S)
#define NNF_DOT_AXPY(P, T, V, W, LOAD, STORE, SET1, FMADD, ZERO, ADD, HSUM)             \
    NNF_DOT(P, T, V, W, LOAD, FMADD, ZERO, ADD, HSUM)                                  \
    NNF_AXPY(P, T, V, W, LOAD, STORE, SET1, FMADD)
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
#if defined(__AVX512F__)
/* The AVX-512 build: the element-wise loops on 512-bit vectors (A/1 training, process
 * A/B against the same build with the 256-bit loops, 2 threads on the Xeon, 3 rounds:
 * 1.21-1.23x; A/8 1.01-1.06x), the dots as in the AVX2 build (the same sums in the same
 * order; 16-lane dots are not measured). */
NNF_DOT(s, float, __m256, 8, _mm256_loadu_ps, _mm256_fmadd_ps, _mm256_setzero_ps,
        _mm256_add_ps, nnf_hsum_ps)
NNF_DOT(d, double, __m256d, 4, _mm256_loadu_pd, _mm256_fmadd_pd, _mm256_setzero_pd,
        _mm256_add_pd, nnf_hsum_pd)
NNF_AXPY(s, float, __m512, 16, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_set1_ps,
         _mm512_fmadd_ps)
NNF_AXPY(d, double, __m512d, 8, _mm512_loadu_pd, _mm512_storeu_pd, _mm512_set1_pd,
         _mm512_fmadd_pd)
NNF_LOOP_KERNELS(s, float, __m512, 16, _mm512_loadu_ps, _mm512_storeu_ps,
                 _mm512_set1_ps, _mm512_fmadd_ps, _mm512_setzero_ps, 8)
NNF_LOOP_KERNELS(d, double, __m512d, 8, _mm512_loadu_pd, _mm512_storeu_pd,
                 _mm512_set1_pd, _mm512_fmadd_pd, _mm512_setzero_pd, 8)
#else
NNF_DOT_AXPY(s, float, __m256, 8, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_set1_ps,
             _mm256_fmadd_ps, _mm256_setzero_ps, _mm256_add_ps, nnf_hsum_ps)
NNF_DOT_AXPY(d, double, __m256d, 4, _mm256_loadu_pd, _mm256_storeu_pd, _mm256_set1_pd,
             _mm256_fmadd_pd, _mm256_setzero_pd, _mm256_add_pd, nnf_hsum_pd)
NNF_LOOP_KERNELS(s, float, __m256, 8, _mm256_loadu_ps, _mm256_storeu_ps,
                 _mm256_set1_ps, _mm256_fmadd_ps, _mm256_setzero_ps, 8)
NNF_LOOP_KERNELS(d, double, __m256d, 4, _mm256_loadu_pd, _mm256_storeu_pd,
                 _mm256_set1_pd, _mm256_fmadd_pd, _mm256_setzero_pd, 8)
#endif
/* Narrow rows (W to 2W lanes: 8-16 floats, 4-8 doubles; a 10-class output layer): two
 * vectors cover a row, [0, W) and [n-W, n), overlapping when n < 2W. The axpy loads both
 * before storing either, so overlapping lanes get the same value twice; the dot masks
 * the overlap out of the upper window. The forward keeps the outputs in registers across
 * all rows of W, two rows per trip on independent accumulators, and does not skip zero
 * inputs: on a 64-128-10 net the generic loop spent most of B/1 on the output layer
 * (store-to-load chains through z, a branch on every ReLU output). */
static const long long nnf_lane_mask64[8] = {0, 0, 0, 0, -1, -1, -1, -1};
static const int nnf_lane_mask32[16] = {0, 0, 0, 0, 0, 0, 0, 0, -1, -1, -1, -1, -1, -1, -1, -1};
#define NNF_NARROW(P, T, V, W, LOAD, STORE, SET1, FMADD, ZERO, ADD, MUL, AND, HSUM, UPPER) \
static inline int nnf_##P##narrow(long n) { return n >= W && n <= 2 * W; }            \
static inline T nnf_##P##narrow_dot(const T *a, const T *b, long n) {                 \
    V lo = MUL(LOAD(a), LOAD(b));                                                     \
    V hi = AND(UPPER(n), MUL(LOAD(a + n - W), LOAD(b + n - W)));                      \
    return HSUM(ADD(lo, hi));                                                         \
}                                                                                     \
static inline void nnf_##P##narrow_axpy(T *y, T alpha, const T *x, long n) {          \
    const V va = SET1(alpha);                                                         \
    V lo = FMADD(va, LOAD(x), LOAD(y));                                               \
    V hi = FMADD(va, LOAD(x + n - W), LOAD(y + n - W));                               \
    STORE(y, lo);                                                                     \
    STORE(y + n - W, hi);                                                             \
}                                                                                     \
/* z = x[i0:i1] @ w[i0:i1], one input row x of stride-1 values */                     \
static inline void nnf_##P##narrow_forward(const T *x, const T *w, long i0, long i1,  \
                                           long n, T *z) {                            \
    V lo0 = ZERO(), hi0 = ZERO(), lo1 = ZERO(), hi1 = ZERO();                         \
    long i = i0;                                                                      \
    for (; i + 2 <= i1; i += 2) {                                                     \
        const T *w0 = w + i * n, *w1 = w0 + n;                                        \
        V x0 = SET1(x[i]), x1 = SET1(x[i + 1]);                                       \
        lo0 = FMADD(x0, LOAD(w0), lo0);                                               \
        hi0 = FMADD(x0, LOAD(w0 + n - W), hi0);                                       \
        lo1 = FMADD(x1, LOAD(w1), lo1);                                               \
        hi1 = FMADD(x1, LOAD(w1 + n - W), hi1);                                       \
    }                                                                                 \
    if (i < i1) {                                                                     \
        V x0 = SET1(x[i]);                                                            \
        lo0 = FMADD(x0, LOAD(w + i * n), lo0);                                        \
        hi0 = FMADD(x0, LOAD(w + i * n + n - W), hi0);                                \
    }                                                                                 \
    STORE(z, ADD(lo0, lo1));                                                          \
    STORE(z + n - W, ADD(hi0, hi1));                                                  \
}
static inline __m256 nnf_s_upper(long n) {
    return _mm256_loadu_ps((const float *)(nnf_lane_mask32 + n - 8));
}
static inline __m256d nnf_d_upper(long n) {
    return _mm256_loadu_pd((const double *)(nnf_lane_mask64 + n - 4));
}
NNF_NARROW(s, float, __m256, 8, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_set1_ps,
           _mm256_fmadd_ps, _mm256_setzero_ps, _mm256_add_ps, _mm256_mul_ps, _mm256_and_ps,
           nnf_hsum_ps, nnf_s_upper)
NNF_NARROW(d, double, __m256d, 4, _mm256_loadu_pd, _mm256_storeu_pd, _mm256_set1_pd,
           _mm256_fmadd_pd, _mm256_setzero_pd, _mm256_add_pd, _mm256_mul_pd, _mm256_and_pd,
           nnf_hsum_pd, nnf_d_upper)
/* out[i] = w[i] . v for rows i < rows of a narrow W (8-16 floats): eight rows per trip,
 * their eight sums reduced together by a tree of horizontal adds rather than one
 * horizontal sum per row (in B/1 the per-row sums were the larger part of the output
 * layer's backward). */
static inline void nnf_snarrow_dots(const float *w, long n, long rows, const float *v,
                                    float *out) {
    const __m256 vlo = _mm256_loadu_ps(v), vhi = _mm256_loadu_ps(v + n - 8);
    const __m256 upper = nnf_s_upper(n);
    long i = 0;
    for (; i + 8 <= rows; i += 8) {
        __m256 s[8];
        for (int q = 0; q < 8; q++) {
            const float *wq = w + (i + q) * n;
            s[q] = _mm256_fmadd_ps(_mm256_loadu_ps(wq), vlo,
                                   _mm256_and_ps(upper, _mm256_mul_ps(_mm256_loadu_ps(wq + n - 8), vhi)));
        }
        __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(s[0], s[1]), _mm256_hadd_ps(s[2], s[3]));
        __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(s[4], s[5]), _mm256_hadd_ps(s[6], s[7]));
        _mm256_storeu_ps(out + i, _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),
                                                _mm256_permute2f128_ps(u0, u1, 0x31)));
    }
    for (; i < rows; i++) out[i] = nnf_snarrow_dot(w + i * n, v, n);
}
static inline void nnf_dnarrow_dots(const double *w, long n, long rows, const double *v,
                                    double *out) {
    for (long i = 0; i < rows; i++) out[i] = nnf_dnarrow_dot(w + i * n, v, n);
}
#define NNF_NARROW_STUBS 0
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
NNF_LOOP_KERNELS(s, float, __m128, 4, _mm_loadu_ps, _mm_storeu_ps, _mm_set1_ps,
                 NNF_SSE_FMADD_PS, _mm_setzero_ps, 4)
NNF_LOOP_KERNELS(d, double, __m128d, 2, _mm_loadu_pd, _mm_storeu_pd, _mm_set1_pd,
                 NNF_SSE_FMADD_PD, _mm_setzero_pd, 4)
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
#define NNF_STEP_FORWARD4(P, T)                                                       \
static inline void nnf_##P##forward4(const T *w, long ld, long n, const T *b, T *z) {  \
    for (int r = 0; r < 4; r++) nnf_##P##axpy(z, b[r], w + r * ld, n);                \
}                                                                                     \
static inline void nnf_##P##step_forward4(T *w, long ld, long n, const T *dz,         \
                                          const T *a, const T *b, T *z) {             \
    for (int r = 0; r < 4; r++) {                                                     \
        nnf_##P##axpy(w + r * ld, a[r], dz, n);                                       \
        nnf_##P##axpy(z, b[r], w + r * ld, n);                                        \
    }                                                                                 \
}
NNF_STEP_FORWARD4(s, float)
NNF_STEP_FORWARD4(d, double)
/* one "vector" of one element: the same loops, scalar */
#define NNF_SCALAR_LOAD(p) (*(p))
#define NNF_SCALAR_STORE(p, v) (*(p) = (v))
#define NNF_SCALAR_SET1(x) (x)
#define NNF_SCALAR_FMADD(a, b, c) ((a) * (b) + (c))
#define NNF_SCALAR_ZERO() 0
NNF_LOOP_KERNELS(s, float, float, 1, NNF_SCALAR_LOAD, NNF_SCALAR_STORE,
                 NNF_SCALAR_SET1, NNF_SCALAR_FMADD, NNF_SCALAR_ZERO, 4)
NNF_LOOP_KERNELS(d, double, double, 1, NNF_SCALAR_LOAD, NNF_SCALAR_STORE,
                 NNF_SCALAR_SET1, NNF_SCALAR_FMADD, NNF_SCALAR_ZERO, 4)
#endif

#ifndef NNF_NARROW_STUBS
/* builds without AVX2: no narrow-row kernels; the generic loops take every width */
#define NNF_NARROW_STUB(P, T)                                                          \
static inline int nnf_##P##narrow(long n) { (void)n; return 0; }                      \
static inline T nnf_##P##narrow_dot(const T *a, const T *b, long n) {                 \
    return nnf_##P##dot(a, b, n);                                                     \
}                                                                                     \
static inline void nnf_##P##narrow_axpy(T *y, T alpha, const T *x, long n) {          \
    nnf_##P##axpy(y, alpha, x, n);                                                    \
}                                                                                     \
static inline void nnf_##P##narrow_forward(const T *x, const T *w, long i0, long i1,  \
                                           long n, T *z) {                            \
    for (long j = 0; j < n; j++) z[j] = 0;                                            \
    for (long i = i0; i < i1; i++) nnf_##P##axpy(z, x[i], w + i * n, n);              \
}                                                                                     \
static inline void nnf_##P##narrow_dots(const T *w, long n, long rows, const T *v,    \
                                        T *out) {                                     \
    for (long i = 0; i < rows; i++) out[i] = nnf_##P##dot(w + i * n, v, n);           \
}
NNF_NARROW_STUB(s, float)
NNF_NARROW_STUB(d, double)
#endif

/* The inputs of a block of the lazy first layer (``_lazy_block_inputs``), transposed:
 * f[i * kb + j] = xr[j][i] for rows i < n0 and samples j < nk (0 for nk <= j < kb), and
 * bit 1 of flags[i] set where one of row i's nk inputs is non-zero (bit 0 kept). In the
 * float builds with AVX2 and kb = 8, eight rows at a time through an 8 x 8 transpose in
 * registers (element by element the loop took 8 % of A/1 training). */
#define NNF_BLOCK_INPUTS(P, T)                                                         \
static inline void nnf_##P##block_inputs_rows(const T *const *xr, int nk, int kb,       \
                                              long i0, long n0, T *f,                   \
                                              unsigned char *flags) {                   \
    for (long i = i0; i < n0; i++) {                                                  \
        int nz = 0;                                                                   \
        for (int j = 0; j < nk; j++) {                                                \
            T v = xr[j][i];                                                           \
            f[i * kb + j] = v;                                                        \
            nz |= v != 0;                                                             \
        }                                                                             \
        for (int j = nk; j < kb; j++) f[i * kb + j] = 0;                              \
        flags[i] = (unsigned char)((flags[i] & 1) | (nz ? 2 : 0));                    \
    }                                                                                 \
}
NNF_BLOCK_INPUTS(s, float)
NNF_BLOCK_INPUTS(d, double)
static inline void nnf_dblock_inputs(const double *const *xr, int nk, int kb, long n0,
                                     double *f, unsigned char *flags) {
    nnf_dblock_inputs_rows(xr, nk, kb, 0, n0, f, flags);
}
static inline void nnf_sblock_inputs(const float *const *xr, int nk, int kb, long n0,
                                     float *f, unsigned char *flags) {
    long i = 0;
#if defined(__AVX2__) && defined(__FMA__)
    if (kb == 8) {
        const __m256 zero = _mm256_setzero_ps();
        for (; i + 8 <= n0; i += 8) {
            __m256 r[8];
            for (int j = 0; j < 8; j++) r[j] = j < nk ? _mm256_loadu_ps(xr[j] + i) : zero;
            __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
            __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
            __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
            __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
            __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
            __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
            __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
            __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
            __m256 o[8];
            o[0] = _mm256_permute2f128_ps(u0, u4, 0x20); o[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
            o[2] = _mm256_permute2f128_ps(u2, u6, 0x20); o[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
            o[4] = _mm256_permute2f128_ps(u0, u4, 0x31); o[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
            o[6] = _mm256_permute2f128_ps(u2, u6, 0x31); o[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
            for (int q = 0; q < 8; q++) {
                _mm256_storeu_ps(f + (i + q) * 8, o[q]);
                int nz = _mm256_movemask_ps(_mm256_cmp_ps(o[q], zero, _CMP_NEQ_UQ)) != 0;
                flags[i + q] = (unsigned char)((flags[i + q] & 1) | (nz ? 2 : 0));
            }
        }
    }
#endif
    nnf_sblock_inputs_rows(xr, nk, kb, i, n0, f, flags);
}

/* out[j] = exp(x[j] - shift) for j < n, returning their sum: the softmax and the
 * log-sum-exp of the cross-entropy loss. The AVX2 build evaluates eight lanes at once
 * (Cephes' expf: range reduction by ln 2 in two parts, a degree-5 polynomial, about
 * 1 ulp; results below FLT_MIN flush to 0); in B/32 training the scalar libm calls took
 * 8 % of the time. Other builds call expf. */
#if defined(__AVX2__) && defined(__FMA__)
static inline __m256 nnf_exp8_ps(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)),
                      _mm256_set1_ps(-88.3762626647949f));
    __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f),
                                                _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx),
                                                   _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
/* lanes [0, r) set, 0 < r <= 8 */
static const int nnf_first_mask32[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
static inline __m256i nnf_first_lanes(long r) {
    return _mm256_loadu_si256((const __m256i *)(nnf_first_mask32 + 8 - r));
}
static inline float nnf_sexp_sum(const float *x, float shift, float *out, long n) {
    const __m256 vs = _mm256_set1_ps(shift);
    __m256 acc = _mm256_setzero_ps();
    long j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256 v = nnf_exp8_ps(_mm256_sub_ps(_mm256_loadu_ps(x + j), vs));
        _mm256_storeu_ps(out + j, v);
        acc = _mm256_add_ps(acc, v);
    }
    if (j < n) {
        __m256i mask = nnf_first_lanes(n - j);
        __m256 v = nnf_exp8_ps(_mm256_sub_ps(_mm256_maskload_ps(x + j, mask), vs));
        v = _mm256_and_ps(v, _mm256_castsi256_ps(mask));
        _mm256_maskstore_ps(out + j, mask, v);
        acc = _mm256_add_ps(acc, v);
    }
    return nnf_hsum_ps(acc);
}
#else
#include <math.h>
static inline float nnf_sexp_sum(const float *x, float shift, float *out, long n) {
    float s = 0.0f;
    for (long j = 0; j < n; j++) { out[j] = expf(x[j] - shift); s += out[j]; }
    return s;
}
#endif
#include <math.h>
static inline double nnf_dexp_sum(const double *x, double shift, double *out, long n) {
    double s = 0.0;
    for (long j = 0; j < n; j++) { out[j] = exp(x[j] - shift); s += out[j]; }
    return s;
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
/* Ask for n bytes at p to come into L2 (prefetcht1) ahead of their use. The batch gather
 * copies rows scattered over all of X, each a fresh stream for the hardware prefetcher;
 * asking for whole rows a few ahead keeps more of them in flight (C microbenchmark, 512
 * random rows of 784 floats out of 60,000, two threads: 83-112 us with memcpy alone,
 * 54-57 us asking 1-6 rows ahead; into L1, prefetcht0, 90 us: no gain). In a fit, 3 rows
 * ahead, the batch fetch per step fell from 98-102 to 71-74 us at A/512 and from 32-33
 * to 27-30 us at A/128 (calm VM, alternate epochs); whole epochs moved within their
 * noise (A/512 1.004x). A no-op where the compiler has no __builtin_prefetch. */
static inline void nnf_prefetch_l2(const void *p, long n) {
#if defined(__GNUC__) || defined(__clang__)
    const char *c = (const char *)p;
    for (long i = 0; i < n; i += 64) __builtin_prefetch(c + i, 0, 2);
    if (n > 0) __builtin_prefetch(c + n - 1, 0, 2);
#else
    (void)p; (void)n;
#endif
}

#endif
