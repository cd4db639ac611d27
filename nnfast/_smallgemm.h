/* float32 matrix products by hand (AVX2+FMA build only): the row split's per-thread
 * slices, the layer products of batches up to a few hundred rows, and every product of
 * a layer of up to HAND_MAX_WEIGHTS weights (_kernels.pyx). At small sizes a gemm call
 * spends more time packing its operands into panels than it saves (B/32 on a 64-128-10
 * net: OpenBLAS's A-panel copy took 17 % of a training step and its kernel 22 %; A/32's
 * forward ran 47 GFLOP/s, 24 % of the step in the panel copy of W). These kernels read
 * A where it lies, copy only 16-wide panels of B (nnf_sgemm_nn, below) and keep a whole
 * tile of C in registers across a block of the inner dimension.
 *
 * Row-major, as the rest of the engine:
 *   nn: C[m, n] = alpha * A @ B (+ C when accumulate), A[i, p] = a[i * rsa + p * csa],
 *       so A may be a matrix (rsa = lda, csa = 1) or a transposed one (rsa = 1, csa = lda);
 *   nt: C[m, n] = alpha * A @ B^T (+ C when accumulate), A[m, k] and B[n, k] row-major.
 * C must not overlap A or B. Both can finish with an epilogue (nnf_epilogue, below): the
 * bias, ReLU, ReLU's slope or B's column sums, applied as the result is stored. */
#ifndef NNFAST_SMALLGEMM_H
#define NNFAST_SMALLGEMM_H

#include <stdlib.h>

#include "_simd.h"

/* HAND_MAX_WEIGHTS's default (_kernels.pyx): every product of a layer of at most this
 * many weights takes these kernels at any number of rows. On a Zen 4 the AVX2 build ran
 * A/512 1.05x faster in training with the rule on than off, and the 512-bit tiles run A/512's
 * products at the sgemm peak (Zen 5, 2 threads: 427-452 GFLOP/s). On a Zen 3 (AVX2,
 * 512 KB of L2 a core) OpenBLAS's gemm beats the 256-bit tiles past the row limits:
 * in-process A/B in training, 2 threads, the rule off against on, A/64 1.09x, A/128
 * 1.01-1.04x, A/192 1.05x, A/256 1.02x, A/512 1.03-1.05x, A/1024 1.03x, B/32 1.00x,
 * B/256 0.99x. Zen 4 takes the AVX-512 build now, so the AVX2 build ships it off. */
#if defined(__AVX512F__)
#define NNF_HAND_MAX_WEIGHTS 262144
#else
#define NNF_HAND_MAX_WEIGHTS 0
#endif

/* What a product does with its result besides storing C, on its last block of the inner
 * dimension (a NULL member: nothing), so that no pass of its own reads C again:
 *   bias:   C[i, j] += bias[j] (before what follows);
 *   act:    act[i, j] = C[i, j] > 0 ? C[i, j] : 0 as well (ReLU; rows ld_act apart);
 *   slope:  C[i, j] = slope[i, j] > 0 ? C[i, j] : 0 (ReLU's slope, read from the stored
 *           activations; rows ld_slope apart);
 *   colsum: colsum[j] += colsum_alpha * B[p, j] for p = 0..k-1 in turn (B's column sums:
 *           the bias gradient sum, or plain SGD's bias step, beside dW = X^T dZ).
 * Each is the operation of the separate pass it replaces (nnf_sbias_relu,
 * nnf_srelu_backward, _add_column_sums), so the results are bit-identical. */
typedef struct {
    const float *bias;
    float *act;
    long ld_act;
    const float *slope;
    long ld_slope;
    float *colsum;
    float colsum_alpha;
} nnf_epilogue;

#if defined(__AVX2__) && defined(__FMA__)
#define NNF_HAVE_SMALL_GEMM 1

/* One 8-lane piece (columns q..q+7 of a tile's row i, masked to ``mask`` when ``masked``)
 * of a tile's result v, stored at cq with the epilogue e (offset to the tile's first row
 * and column; bias, act and slope as in nnf_epilogue). */
static inline void nnf_epilogue_store8(const nnf_epilogue *e, long i, long q, float *cq,
                                       __m256 v, int masked, __m256i mask) {
    const __m256 zero = _mm256_setzero_ps();
    if (e->bias)
        v = _mm256_add_ps(v, masked ? _mm256_maskload_ps(e->bias + q, mask)
                                    : _mm256_loadu_ps(e->bias + q));
    if (e->slope) {
        const float *sp = e->slope + i * e->ld_slope + q;
        __m256 sl = masked ? _mm256_maskload_ps(sp, mask) : _mm256_loadu_ps(sp);
        v = _mm256_and_ps(v, _mm256_cmp_ps(sl, zero, _CMP_GT_OQ));
    }
    if (masked) _mm256_maskstore_ps(cq, mask, v); else _mm256_storeu_ps(cq, v);
    if (e->act) {
        float *ap = e->act + i * e->ld_act + q;
        __m256 a = _mm256_and_ps(v, _mm256_cmp_ps(v, zero, _CMP_GT_OQ));
        if (masked) _mm256_maskstore_ps(ap, mask, a); else _mm256_storeu_ps(ap, a);
    }
}

/* An MR x 16 tile of C, two vectors per row: MR * 2 accumulators live across k. The
 * second vector's loads and stores are a parameter: plain (tile16) or masked to the last
 * 9-15 columns of a C, such as a 10-class output layer (tile16m; the mask is unused in
 * tile16, so its inner loop has no masked load). */
#define NNF_LOAD_FULL(p, mask) _mm256_loadu_ps(p)
#define NNF_STORE_FULL(p, mask, v) _mm256_storeu_ps(p, v)
#define NNF_LOAD_MASKED(p, mask) _mm256_maskload_ps(p, mask)
#define NNF_STORE_MASKED(p, mask, v) _mm256_maskstore_ps(p, mask, v)
#define NNF_NN_TILE16(NAME, MR, LOAD_HI, STORE_HI, HI_MASKED)                          \
static inline void NAME##_##MR(long k, float alpha, const float *a, long rsa,          \
                               long csa, const float *b, long ldb, float *c,           \
                               long ldc, int accumulate, __m256i mask,                 \
                               const nnf_epilogue *ep) {                               \
    (void)mask;                                                                        \
    __m256 acc[MR][2];                                                                 \
    _Pragma("GCC unroll 8") for (int i = 0; i < MR; i++) {                             \
        acc[i][0] = _mm256_setzero_ps(); acc[i][1] = _mm256_setzero_ps();              \
    }                                                                                  \
    for (long p = 0; p < k; p++) {                                                     \
        const float *bp = b + p * ldb;                                                 \
        __m256 b0 = _mm256_loadu_ps(bp), b1 = LOAD_HI(bp + 8, mask);                   \
        const float *ap = a + p * csa;                                                 \
        _Pragma("GCC unroll 8") for (int i = 0; i < MR; i++) {                         \
            __m256 ai = _mm256_broadcast_ss(ap + i * rsa);                             \
            acc[i][0] = _mm256_fmadd_ps(ai, b0, acc[i][0]);                            \
            acc[i][1] = _mm256_fmadd_ps(ai, b1, acc[i][1]);                            \
        }                                                                              \
    }                                                                                  \
    const __m256 va = _mm256_set1_ps(alpha);                                           \
    _Pragma("GCC unroll 8") for (int i = 0; i < MR; i++) {                             \
        float *ci = c + i * ldc;                                                       \
        __m256 v0, v1;  /* with C: one rounding, written out (no contraction to choose) */ \
        if (accumulate) {                                                              \
            v0 = _mm256_fmadd_ps(va, acc[i][0], _mm256_loadu_ps(ci));                  \
            v1 = _mm256_fmadd_ps(va, acc[i][1], LOAD_HI(ci + 8, mask));                \
        } else {                                                                       \
            v0 = _mm256_mul_ps(va, acc[i][0]); v1 = _mm256_mul_ps(va, acc[i][1]);      \
        }                                                                              \
        if (ep) {                                                                      \
            nnf_epilogue_store8(ep, i, 0, ci, v0, 0, mask);                            \
            nnf_epilogue_store8(ep, i, 8, ci + 8, v1, HI_MASKED, mask);                \
            continue;                                                                  \
        }                                                                              \
        _mm256_storeu_ps(ci, v0); STORE_HI(ci + 8, mask, v1);                          \
    }                                                                                  \
}
#define NNF_NN_TILE16_BOTH(MR)                                                         \
    NNF_NN_TILE16(nnf_snn_tile16, MR, NNF_LOAD_FULL, NNF_STORE_FULL, 0)                \
    NNF_NN_TILE16(nnf_snn_tile16m, MR, NNF_LOAD_MASKED, NNF_STORE_MASKED, 1)
/* An MR x r tile, r <= 8 columns, through masked loads and stores (the last columns). */
#define NNF_NN_TILE8(MR)                                                               \
static inline void nnf_snn_tile8_##MR(long k, float alpha, const float *a, long rsa,   \
                                       long csa, const float *b, long ldb, float *c,   \
                                       long ldc, int accumulate, __m256i mask,         \
                                       const nnf_epilogue *ep) {                       \
    __m256 acc[MR];                                                                    \
    _Pragma("GCC unroll 8") for (int i = 0; i < MR; i++) acc[i] = _mm256_setzero_ps(); \
    for (long p = 0; p < k; p++) {                                                     \
        __m256 b0 = _mm256_maskload_ps(b + p * ldb, mask);                             \
        const float *ap = a + p * csa;                                                 \
        _Pragma("GCC unroll 8") for (int i = 0; i < MR; i++)                           \
            acc[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(ap + i * rsa), b0, acc[i]);   \
    }                                                                                  \
    const __m256 va = _mm256_set1_ps(alpha);                                           \
    _Pragma("GCC unroll 8") for (int i = 0; i < MR; i++) {                             \
        float *ci = c + i * ldc;                                                       \
        __m256 v = accumulate ? _mm256_fmadd_ps(va, acc[i], _mm256_maskload_ps(ci, mask)) \
                              : _mm256_mul_ps(va, acc[i]);                             \
        if (ep) { nnf_epilogue_store8(ep, i, 0, ci, v, 1, mask); continue; }           \
        _mm256_maskstore_ps(ci, mask, v);                                              \
    }                                                                                  \
}
NNF_NN_TILE16_BOTH(1) NNF_NN_TILE16_BOTH(2) NNF_NN_TILE16_BOTH(3)
NNF_NN_TILE16_BOTH(4) NNF_NN_TILE16_BOTH(5) NNF_NN_TILE16_BOTH(6)
NNF_NN_TILE8(1) NNF_NN_TILE8(2) NNF_NN_TILE8(3) NNF_NN_TILE8(4)
NNF_NN_TILE8(5) NNF_NN_TILE8(6)

/* One tile of C: mr (1-6) rows by the 16 (or, masked, the last nr <= 16) columns at b, c. */
#define NNF_NN_TILE_CASE(KIND, MR)                                                     \
    case MR: nnf_snn_##KIND##_##MR(k, alpha, a, rsa, csa, b, ldb, c, ldc, accumulate, mask, \
                                   ep); break;
static inline void nnf_snn_tile(long mr, long nr, long k, float alpha, const float *a,
                                long rsa, long csa, const float *b, long ldb, float *c,
                                long ldc, int accumulate, const nnf_epilogue *ep) {
    __m256i mask;
    if (nr == 16) {
        mask = _mm256_setzero_si256();
        switch (mr) {
            NNF_NN_TILE_CASE(tile16, 1) NNF_NN_TILE_CASE(tile16, 2) NNF_NN_TILE_CASE(tile16, 3)
            NNF_NN_TILE_CASE(tile16, 4) NNF_NN_TILE_CASE(tile16, 5) NNF_NN_TILE_CASE(tile16, 6)
        }
    } else if (nr > 8) {
        mask = nnf_first_lanes(nr - 8);
        switch (mr) {
            NNF_NN_TILE_CASE(tile16m, 1) NNF_NN_TILE_CASE(tile16m, 2) NNF_NN_TILE_CASE(tile16m, 3)
            NNF_NN_TILE_CASE(tile16m, 4) NNF_NN_TILE_CASE(tile16m, 5) NNF_NN_TILE_CASE(tile16m, 6)
        }
    } else {
        mask = nnf_first_lanes(nr);
        switch (mr) {
            NNF_NN_TILE_CASE(tile8, 1) NNF_NN_TILE_CASE(tile8, 2) NNF_NN_TILE_CASE(tile8, 3)
            NNF_NN_TILE_CASE(tile8, 4) NNF_NN_TILE_CASE(tile8, 5) NNF_NN_TILE_CASE(tile8, 6)
        }
    }
}

/* Inner-dimension block: a 256 x 16 block of B (16 KB) is read by every row tile while it
 * is still in L2. Row-major B with a row stride of 1 KB maps its rows to 1/16 of L2's sets,
 * so a whole 784-row panel did not stay there: 32x784 @ 784x256 ran 67 GFLOP/s sweeping
 * all of B per 6 rows, 73-75 in blocks of 128-256 rows (OpenBLAS: 47; one thread). */
#define NNF_NN_KC 256

/* Panels of B are copied into a contiguous 16-wide buffer (at most NNF_NN_KC x 16 floats,
 * 16 KB) before the row tiles read them, where there are at least 64 rows of C and 128 of
 * the inner dimension: a layer's W with rows 1 KB apart (256 columns) otherwise maps a
 * panel's rows to 1/16 of L1's sets, and every row tile read it again from L2. In
 * training (in-process A/B, packing on / off, 2 threads): A/128 1.009-1.013x with the
 * row limits alone (before HAND_MAX_WEIGHTS), and it is what makes the hand kernels beat
 * gemm at the sizes of
 * HAND_MAX_WEIGHTS in _kernels.pyx (without it they lose: A/512 0.977x, A/256 0.995x).
 * Packing at every size instead lost on small products: B/256 0.974x, A/32 0.98x,
 * A/8 0.93x. The copy does not change the arithmetic: results are bit-identical.
 * (nnf_pack_b: 0 turns it off, for measuring and testing.) */
static int nnf_pack_b = 1;

/* dst[p * ldd + q] = src[q * lds + p] for q < 8, p < 8: an 8 x 8 block of B's rows
 * written as 8 rows of a packed panel (eight loads, the AVX2 transpose, eight stores). */
static inline void nnf_transpose8x8_ld(const float *src, long lds, float *dst, long ldd) {
    __m256 r0 = _mm256_loadu_ps(src), r1 = _mm256_loadu_ps(src + lds);
    __m256 r2 = _mm256_loadu_ps(src + 2 * lds), r3 = _mm256_loadu_ps(src + 3 * lds);
    __m256 r4 = _mm256_loadu_ps(src + 4 * lds), r5 = _mm256_loadu_ps(src + 5 * lds);
    __m256 r6 = _mm256_loadu_ps(src + 6 * lds), r7 = _mm256_loadu_ps(src + 7 * lds);
    __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
    __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
    __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
    __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    _mm256_storeu_ps(dst + 0 * ldd, _mm256_permute2f128_ps(u0, u4, 0x20));
    _mm256_storeu_ps(dst + 1 * ldd, _mm256_permute2f128_ps(u1, u5, 0x20));
    _mm256_storeu_ps(dst + 2 * ldd, _mm256_permute2f128_ps(u2, u6, 0x20));
    _mm256_storeu_ps(dst + 3 * ldd, _mm256_permute2f128_ps(u3, u7, 0x20));
    _mm256_storeu_ps(dst + 4 * ldd, _mm256_permute2f128_ps(u0, u4, 0x31));
    _mm256_storeu_ps(dst + 5 * ldd, _mm256_permute2f128_ps(u1, u5, 0x31));
    _mm256_storeu_ps(dst + 6 * ldd, _mm256_permute2f128_ps(u2, u6, 0x31));
    _mm256_storeu_ps(dst + 7 * ldd, _mm256_permute2f128_ps(u3, u7, 0x31));
}

/* colsum[0..nr) += alpha * B[p, 0..nr) for the kc rows of a panel of B in turn (rows ldb
 * apart), as _add_column_sums adds them (nnf_epilogue's colsum). One FMA a term: the
 * same as that pass only where the compiler contracts its axpy (y += alpha * x) into an
 * FMA, as GCC does on this build; tests/test_epilogues.py checks the two agree bit for
 * bit. */
static inline void nnf_column_sums16(float *colsum, float alpha, const float *b, long ldb,
                                     long kc, long nr) {
    const __m256 va = _mm256_set1_ps(alpha);
    __m256i m0 = nnf_first_lanes(nr < 8 ? nr : 8), m1 = nnf_first_lanes(nr > 8 ? nr - 8 : 0);
    __m256 s0 = _mm256_maskload_ps(colsum, m0), s1 = _mm256_maskload_ps(colsum + 8, m1);
    for (long p = 0; p < kc; p++) {
        s0 = _mm256_fmadd_ps(va, _mm256_maskload_ps(b + p * ldb, m0), s0);
        s1 = _mm256_fmadd_ps(va, _mm256_maskload_ps(b + p * ldb + 8, m1), s1);
    }
    _mm256_maskstore_ps(colsum, m0, s0);
    _mm256_maskstore_ps(colsum + 8, m1, s1);
}

/* Rows of the next tile when ``left`` rows of C remain: 6, but 7-9 end as 4 + 3-5 rather
 * than 6 + 1-3. A tile of 1 or 2 rows keeps 2 or 4 accumulators, too few to cover the
 * FMA latency, and runs at a fraction of the 6-row tile's rate (tiles never change the
 * arithmetic of an element of C). Two threads, 128 rows (128 = 20 x 6 + 4 + 4):
 * 128x256x784 244 -> 240.5 us, 128x128x256 39.7 -> 39.35 us. */
static inline long nnf_tile_rows(long left) {
    return left >= 7 && left <= 9 ? 4 : left < 6 ? left : 6;
}

#if defined(__AVX512F__)
/* The AVX-512 build (_kernels_avx512): the same loop with 32-wide panels of C, 512-bit
 * vectors and tiles of up to 12 rows (24 accumulators of the 32 registers). On a CPU with
 * two 512-bit FMA units (Xeon Sapphire Rapids, the 2-core VM of the benchmarks) that is
 * twice the FLOPs a cycle of the 16-wide AVX2 tiles, and OpenBLAS's SkylakeX kernels run
 * at that rate: with the AVX2 tiles there, one thread, 128x784 @ 784x256 took 770 us
 * against NumPy's 715. Every element of C sums the same terms in the same order (one FMA
 * chain over each NNF_NN_KC block, then alpha and C as in the AVX2 tiles), so the two
 * builds' products are bit-identical. */
#define NNF_PANEL_WIDTH 32

/* nnf_epilogue_store8 for 16 lanes of a tile's row i from column q, stored under mask. */
static inline void nnf_epilogue_store16(const nnf_epilogue *e, long i, long q, float *cq,
                                        __m512 v, __mmask16 mask) {
    const __m512 zero = _mm512_setzero_ps();
    if (e->bias)
        v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, e->bias + q));
    if (e->slope) {
        __m512 sl = _mm512_maskz_loadu_ps(mask, e->slope + i * e->ld_slope + q);
        v = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(sl, zero, _CMP_GT_OQ), v);
    }
    _mm512_mask_storeu_ps(cq, mask, v);
    if (e->act)
        _mm512_mask_storeu_ps(e->act + i * e->ld_act + q, mask,
                              _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, zero, _CMP_GT_OQ), v));
}

/* Loads of a tile's vector: plain where the tile is FULL (as in the AVX2 tiles: no mask
 * in the inner loop of a full tile), else under the mask. */
#define NNF_Z_LOAD(FULL, mask, p) ((FULL) ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(mask, p))
#define NNF_Z_STORE(FULL, mask, p, v) \
    do { if (FULL) _mm512_storeu_ps(p, v); else _mm512_mask_storeu_ps(p, mask, v); } while (0)

/* An MR x 32 tile (NV = 2 vectors a row; the second under m1 unless FULL) or an MR x 16
 * one (NV = 1, under m0 unless FULL). */
#define NNF_Z_TILE(NAME, MR, NV, FULL)                                                 \
static inline void NAME##_##MR(long k, float alpha, const float *a, long rsa,          \
                               long csa, const float *b, long ldb, float *c,           \
                               long ldc, int accumulate, __mmask16 m0, __mmask16 m1,   \
                               const nnf_epilogue *ep) {                               \
    (void)m0; (void)m1;                                                                \
    __m512 acc[MR][NV];                                                                \
    _Pragma("GCC unroll 12") for (int i = 0; i < MR; i++)                              \
        _Pragma("GCC unroll 2") for (int v = 0; v < NV; v++)                           \
            acc[i][v] = _mm512_setzero_ps();                                           \
    for (long p = 0; p < k; p++) {                                                     \
        const float *bp = b + p * ldb;                                                 \
        __m512 bv[NV];                                                                 \
        if (NV == 1) bv[0] = NNF_Z_LOAD(FULL, m0, bp);                                 \
        else { bv[0] = _mm512_loadu_ps(bp); bv[NV - 1] = NNF_Z_LOAD(FULL, m1, bp + 16); } \
        const float *ap = a + p * csa;                                                 \
        _Pragma("GCC unroll 12") for (int i = 0; i < MR; i++) {                        \
            __m512 ai = _mm512_set1_ps(ap[i * rsa]);                                   \
            _Pragma("GCC unroll 2") for (int v = 0; v < NV; v++)                       \
                acc[i][v] = _mm512_fmadd_ps(ai, bv[v], acc[i][v]);                     \
        }                                                                              \
    }                                                                                  \
    const __m512 va = _mm512_set1_ps(alpha);                                           \
    _Pragma("GCC unroll 12") for (int i = 0; i < MR; i++) {                            \
        float *ci = c + i * ldc;                                                       \
        _Pragma("GCC unroll 2") for (int v = 0; v < NV; v++) {                         \
            int full = (FULL) || (NV == 2 && v == 0);                                  \
            __mmask16 mv = NV == 1 ? m0 : v == 0 ? (__mmask16)0xFFFF : m1;             \
            __m512 r = accumulate                                                      \
                ? _mm512_fmadd_ps(va, acc[i][v], NNF_Z_LOAD(full, mv, ci + 16 * v))    \
                : _mm512_mul_ps(va, acc[i][v]);                                        \
            if (ep) nnf_epilogue_store16(ep, i, 16 * v, ci + 16 * v, r,                \
                                         full ? (__mmask16)0xFFFF : mv);               \
            else NNF_Z_STORE(full, mv, ci + 16 * v, r);                                \
        }                                                                              \
    }                                                                                  \
}
#define NNF_Z_TILES(MR)                                                                \
    NNF_Z_TILE(nnf_z_tile32, MR, 2, 1) NNF_Z_TILE(nnf_z_tile32m, MR, 2, 0)             \
    NNF_Z_TILE(nnf_z_tile16, MR, 1, 1) NNF_Z_TILE(nnf_z_tile16m, MR, 1, 0)
NNF_Z_TILES(1) NNF_Z_TILES(2) NNF_Z_TILES(3) NNF_Z_TILES(4) NNF_Z_TILES(5)
NNF_Z_TILES(6) NNF_Z_TILES(7) NNF_Z_TILES(8) NNF_Z_TILES(9) NNF_Z_TILES(10)
NNF_Z_TILES(11) NNF_Z_TILES(12)

#define NNF_Z_CASE(KIND, MR)                                                           \
    case MR: nnf_z_##KIND##_##MR(k, alpha, a, rsa, csa, b, ldb, c, ldc, accumulate,    \
                                 m0, m1, ep); break;
#define NNF_Z_SWITCH(KIND)                                                             \
    switch (mr) {                                                                      \
        NNF_Z_CASE(KIND, 1) NNF_Z_CASE(KIND, 2) NNF_Z_CASE(KIND, 3) NNF_Z_CASE(KIND, 4) \
        NNF_Z_CASE(KIND, 5) NNF_Z_CASE(KIND, 6) NNF_Z_CASE(KIND, 7) NNF_Z_CASE(KIND, 8) \
        NNF_Z_CASE(KIND, 9) NNF_Z_CASE(KIND, 10) NNF_Z_CASE(KIND, 11)                  \
        NNF_Z_CASE(KIND, 12)                                                           \
    }

/* The first n of a vector's 16 lanes (none for n <= 0, all for n >= 16): with n - 16,
 * the second vector's lanes of a 32-wide panel's first n columns. */
static inline __mmask16 nnf_z_lanes(long n) {
    return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1);
}

/* One tile of C: mr (1-12) rows by the 32 (or the last nr <= 32) columns at b, c. */
static inline void nnf_z_tile(long mr, long nr, long k, float alpha, const float *a,
                              long rsa, long csa, const float *b, long ldb, float *c,
                              long ldc, int accumulate, const nnf_epilogue *ep) {
    __mmask16 m0 = nnf_z_lanes(nr), m1 = nnf_z_lanes(nr - 16);
    if (nr == 32) NNF_Z_SWITCH(tile32)
    else if (nr > 16) NNF_Z_SWITCH(tile32m)
    else if (nr == 16) NNF_Z_SWITCH(tile16)
    else NNF_Z_SWITCH(tile16m)
}

/* nnf_tile_rows for 12-row tiles: 13-24 remaining rows end as two near-equal tiles
 * (128 = 9 x 12 + 10 + 10), so no tile is left with too few accumulators. */
static inline long nnf_z_tile_rows(long left) {
    return left <= 12 ? left : left <= 24 ? (left + 1) / 2 : 12;
}

/* nnf_column_sums16 over a 32-wide panel (the same FMA a term, in the same order). */
static inline void nnf_column_sums32(float *colsum, float alpha, const float *b, long ldb,
                                     long kc, long nr) {
    const __m512 va = _mm512_set1_ps(alpha);
    __mmask16 m0 = nnf_z_lanes(nr), m1 = nnf_z_lanes(nr - 16);
    __m512 s0 = _mm512_maskz_loadu_ps(m0, colsum), s1 = _mm512_maskz_loadu_ps(m1, colsum + 16);
    for (long p = 0; p < kc; p++) {
        s0 = _mm512_fmadd_ps(va, _mm512_maskz_loadu_ps(m0, b + p * ldb), s0);
        s1 = _mm512_fmadd_ps(va, _mm512_maskz_loadu_ps(m1, b + p * ldb + 16), s1);
    }
    _mm512_mask_storeu_ps(colsum, m0, s0);
    _mm512_mask_storeu_ps(colsum + 16, m1, s1);
}

/* The tiles of this build, for the loop below */
#define nnf_panel_tile nnf_z_tile
#define nnf_panel_tile_rows nnf_z_tile_rows
#define nnf_panel_column_sums nnf_column_sums32
#else
#define NNF_PANEL_WIDTH 16
#define nnf_panel_tile nnf_snn_tile
#define nnf_panel_tile_rows nnf_tile_rows
#define nnf_panel_column_sums nnf_column_sums16
#endif

/* panel[p * W + q] = B[j + q, p0 + p] (bj at B's row j, column p0; W = NNF_PANEL_WIDTH)
 * for the nr rows of B a panel of B^T takes, zero past nr: 8 x 8 blocks transposed,
 * the rest one value at a time. */
static inline void nnf_pack_transposed(float *panel, const float *bj, long ldb, long kc,
                                       long nr) {
    const long W = NNF_PANEL_WIDTH;
    long q8 = nr / 8 * 8, p8 = kc / 8 * 8;
    for (long q = 0; q < q8; q += 8)
        for (long p = 0; p < p8; p += 8)
            nnf_transpose8x8_ld(bj + q * ldb + p, ldb, panel + p * W + q, W);
    for (long p = 0; p < kc; p++)
        for (long q = p < p8 ? q8 : 0; q < W; q++)
            panel[p * W + q] = q < nr ? bj[q * ldb + p] : 0.0f;
}

/* A transposed A (rsa == 1: the weight gradient X^T @ dZ, A^T's rows being X's columns)
 * is copied, a block of NNF_A_MC rows by NNF_NN_KC at a time, into the row tiles' order
 * (tile by tile, each tile's mr values of one p together) before the panels read it. Read
 * where it lies, a tile's mr values of a p are 48 bytes of a row of X, the next p's a row
 * (3 KB for 784 inputs) further on: every panel of B walked X's block with a new line,
 * and often a new page, each p, from L3 when X no longer fits L2 beside C. Same shape
 * (784x256x512, 2 threads, Xeon): X^T @ dZ 189-202 GFLOP/s, X' @ dZ with X' = X^T stored
 * 243-253; packed, X^T @ dZ 238-240. Packed, the block is read from X once per thread and
 * then streamed in order. The copy pays where X's rows lie more than NNF_A_MIN_STRIDE
 * floats apart (784x256x512 1.20x, 640x256x512 1.11x, 1024x256x512 1.13x; 512 or fewer:
 * 512x128x512 0.91x, 256x128x512 0.90x, 64x128x256 0.90x), there are two panels of B or
 * more (784x128x512 1.10x on two), and a block is at least NNF_A_MIN_KC deep (784x256x64
 * 1.01x). In training (in-process A/B, on / off, 2 threads): A/128 1.010x, A/256 1.007x,
 * A/512 1.060x, A/2048 1.148x. Results are bit-identical (the same FMAs in the same
 * order). (nnf_pack_a: 0 turns it off, for measuring and testing.) */
#define NNF_A_MC 1024
#define NNF_A_MIN_KC 64
#define NNF_A_MIN_STRIDE 512
static int nnf_pack_a = 1;

/* Whether A (A[i, p] = a[i * rsa + p * csa]) is a transposed operand that gets packed,
 * given enough panels and depth (below); _hand_nn_split splits such products by rows. */
static inline int nnf_transposed_a_packs(long rsa, long csa) {
    return nnf_pack_a && rsa == 1 && csa > NNF_A_MIN_STRIDE;
}

/* Each thread's buffer for packed A, kept for the thread's lifetime (OpenMP's workers
 * persist; one that exits leaves its buffer, at most NNF_A_MC x NNF_NN_KC floats, behind):
 * growing it is the only allocation, once a thread; NULL when malloc fails (the caller
 * then reads A where it lies). Unaligned loads read it, so plain malloc will do. */
#if defined(_MSC_VER)
#define NNF_THREAD_LOCAL __declspec(thread)
#else
#define NNF_THREAD_LOCAL __thread
#endif
static NNF_THREAD_LOCAL float *nnf_apack_buf = NULL;
static NNF_THREAD_LOCAL long nnf_apack_cap = 0;

static float *nnf_apack_reserve(long count) {
    if (count > nnf_apack_cap) {
        float *p = (float *)malloc((size_t)count * sizeof(float));
        if (!p) return NULL;
        free(nnf_apack_buf);
        nnf_apack_buf = p;
        nnf_apack_cap = count;
    }
    return nnf_apack_buf;
}

/* dst[i * kc + p * mr + r] = A^T[i + r, p] for the row tiles (i, mr) of the loop below
 * over m rows (A^T[i, p] = a[i + p * csa]): tile i's kc x mr values in order, at i * kc. */
static void nnf_pack_a_tiles(float *dst, const float *a, long csa, long m, long kc) {
    for (long i = 0, mr; i < m; i += mr) {
        mr = nnf_panel_tile_rows(m - i);
        const float *src = a + i;
        float *d = dst + i * kc;
#if defined(__AVX512F__)
        __mmask16 mk = nnf_z_lanes(mr);
        for (long p = 0; p < kc; p++)
            _mm512_mask_storeu_ps(d + p * mr, mk, _mm512_maskz_loadu_ps(mk, src + p * csa));
#else
        __m256i mk = nnf_first_lanes(mr);
        for (long p = 0; p < kc; p++)
            _mm256_maskstore_ps(d + p * mr, mk, _mm256_maskload_ps(src + p * csa, mk));
#endif
    }
}

/* The loop of both products below: blocks of NNF_NN_KC of the inner dimension, panels
 * of C's columns NNF_PANEL_WIDTH wide, row tiles (6 x 16 AVX2, 12 x 32 AVX-512). B is
 * k x n (ldb apart) or, with b_transposed, n x k (B^T's panels are then always packed,
 * transposed in 8 x 8 blocks). */
static void nnf_sgemm_panels(long m, long n, long k, float alpha, const float *a, long rsa,
                             long csa, const float *b, long ldb, int b_transposed, float *c,
                             long ldc, int accumulate, const nnf_epilogue *ep) {
    const long W = NNF_PANEL_WIDTH;
    float panel[NNF_NN_KC * NNF_PANEL_WIDTH] __attribute__((aligned(64)));
    nnf_epilogue te;  /* ep offset to the tile at hand */
    if (ep) te = *ep;
    for (long p0 = 0; p0 < k || p0 == 0; p0 += NNF_NN_KC) {
        long kc = k - p0 < NNF_NN_KC ? k - p0 : NNF_NN_KC;
        int acc = accumulate || p0 > 0;
        int pack_a = nnf_transposed_a_packs(rsa, csa) && n > W && kc >= NNF_A_MIN_KC;
        long mc_max = pack_a ? NNF_A_MC : m;
        for (long i0 = 0; i0 < m; i0 += mc_max) {
            long mc = m - i0 < mc_max ? m - i0 : mc_max;
            const float *ap = a + p0 * csa + i0 * rsa;
            float *apk = pack_a ? nnf_apack_reserve(mc * kc) : NULL;
            if (apk) nnf_pack_a_tiles(apk, ap, csa, mc, kc);
            float *ci0 = c + i0 * ldc;
            for (long j = 0; j < n; j += W) {
                long nr = n - j < W ? n - j : W;
                const float *bj = b_transposed ? b + j * ldb + p0 : b + p0 * ldb + j;
                long ldbj = ldb;
                if (b_transposed) {
                    nnf_pack_transposed(panel, bj, ldb, kc, nr);
                    bj = panel;
                    ldbj = W;
                } else if (nnf_pack_b && nr == W && m >= 64 && kc >= 128) {
                    for (long p = 0; p < kc; p++)
                        for (long q = 0; q < W; q += 8)
                            _mm256_store_ps(panel + p * W + q,
                                            _mm256_loadu_ps(bj + p * ldb + q));
                    bj = panel;
                    ldbj = W;
                }
                if (ep && ep->colsum && !b_transposed && i0 == 0)
                    nnf_panel_column_sums(ep->colsum + j, ep->colsum_alpha, bj, ldbj, kc, nr);
                int last = ep && p0 + kc >= k;
                if (last) te.bias = ep->bias ? ep->bias + j : NULL;
                for (long i = 0, mr; i < mc; i += mr) {
                    mr = nnf_panel_tile_rows(mc - i);
                    if (last) {
                        te.act = ep->act ? ep->act + (i0 + i) * ep->ld_act + j : NULL;
                        te.slope = ep->slope ? ep->slope + (i0 + i) * ep->ld_slope + j : NULL;
                    }
                    nnf_panel_tile(mr, nr, kc, alpha, apk ? apk + i * kc : ap + i * rsa,
                                   apk ? 1 : rsa, apk ? mr : csa, bj, ldbj,
                                   ci0 + i * ldc + j, ldc, acc,
                                   last && (te.bias || te.act || te.slope) ? &te : NULL);
                }
            }
        }
    }
}

static void nnf_sgemm_nn(long m, long n, long k, float alpha, const float *a, long rsa,
                         long csa, const float *b, long ldb, float *c, long ldc,
                         int accumulate) {
    nnf_sgemm_panels(m, n, k, alpha, a, rsa, csa, b, ldb, 0, c, ldc, accumulate, NULL);
}

/* nnf_sgemm_nn with the epilogue ep (NULL: none; its pointers index the columns and
 * rows of this C). */
static void nnf_sgemm_nn_epilogue(long m, long n, long k, float alpha, const float *a,
                                  long rsa, long csa, const float *b, long ldb, float *c,
                                  long ldc, int accumulate, const nnf_epilogue *ep) {
    nnf_sgemm_panels(m, n, k, alpha, a, rsa, csa, b, ldb, 0, c, ldc, accumulate, ep);
}

/* C[m, n] = alpha * A @ B^T (+ C when accumulate), A (m, k) and B (n, k) row-major, as
 * nnf_sgemm_nn with panels of B^T packed from B's rows: each 16 rows of B (a 16-wide
 * panel of B^T, up to NNF_NN_KC deep) are transposed into the panel buffer once and read
 * by every row tile of C. For products of 64+ rows (the gradient below a layer,
 * dZ @ W^T); the 2 x 4 tiles of nnf_sgemm_nt end in horizontal sums and lose to gemm
 * from about 48 rows. */
static void nnf_sgemm_nt_packed(long m, long n, long k, float alpha, const float *a,
                                long lda, const float *b, long ldb, float *c, long ldc,
                                int accumulate, const nnf_epilogue *ep) {
    nnf_sgemm_panels(m, n, k, alpha, a, lda, 1, b, ldb, 1, c, ldc, accumulate, ep);
}

/* four sums of eight lanes each, as one 128-bit vector */
static inline __m128 nnf_hsum4_ps(__m256 s0, __m256 s1, __m256 s2, __m256 s3) {
    __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(s0, s1), _mm256_hadd_ps(s2, s3));
    return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

/* Rows i, i+1 of A against rows j..j+3 of B (clamped to the last row of B; only nr
 * columns are stored), eight lanes of k per trip, the last trip masked. */
static inline void nnf_snt_tile(long mr, long nr, long k, float alpha, const float *a0,
                                const float *a1, const float *b, long ldb, long jmax,
                                float *c0, float *c1, int accumulate) {
    const float *bq[4];
    for (int q = 0; q < 4; q++) bq[q] = b + (q < jmax ? q : jmax) * ldb;
    __m256 s00 = _mm256_setzero_ps(), s01 = s00, s02 = s00, s03 = s00;
    __m256 s10 = s00, s11 = s00, s12 = s00, s13 = s00;
    long p = 0;
    for (; p + 8 <= k; p += 8) {
        __m256 x0 = _mm256_loadu_ps(a0 + p), x1 = _mm256_loadu_ps(a1 + p);
        __m256 w = _mm256_loadu_ps(bq[0] + p);
        s00 = _mm256_fmadd_ps(x0, w, s00); s10 = _mm256_fmadd_ps(x1, w, s10);
        w = _mm256_loadu_ps(bq[1] + p);
        s01 = _mm256_fmadd_ps(x0, w, s01); s11 = _mm256_fmadd_ps(x1, w, s11);
        w = _mm256_loadu_ps(bq[2] + p);
        s02 = _mm256_fmadd_ps(x0, w, s02); s12 = _mm256_fmadd_ps(x1, w, s12);
        w = _mm256_loadu_ps(bq[3] + p);
        s03 = _mm256_fmadd_ps(x0, w, s03); s13 = _mm256_fmadd_ps(x1, w, s13);
    }
    if (p < k) {
        __m256i mask = nnf_first_lanes(k - p);
        __m256 x0 = _mm256_maskload_ps(a0 + p, mask), x1 = _mm256_maskload_ps(a1 + p, mask);
        __m256 w = _mm256_maskload_ps(bq[0] + p, mask);
        s00 = _mm256_fmadd_ps(x0, w, s00); s10 = _mm256_fmadd_ps(x1, w, s10);
        w = _mm256_maskload_ps(bq[1] + p, mask);
        s01 = _mm256_fmadd_ps(x0, w, s01); s11 = _mm256_fmadd_ps(x1, w, s11);
        w = _mm256_maskload_ps(bq[2] + p, mask);
        s02 = _mm256_fmadd_ps(x0, w, s02); s12 = _mm256_fmadd_ps(x1, w, s12);
        w = _mm256_maskload_ps(bq[3] + p, mask);
        s03 = _mm256_fmadd_ps(x0, w, s03); s13 = _mm256_fmadd_ps(x1, w, s13);
    }
    const __m128 va = _mm_set1_ps(alpha);
    float out[2][4];
    __m128 r0 = _mm_mul_ps(va, nnf_hsum4_ps(s00, s01, s02, s03));
    __m128 r1 = _mm_mul_ps(va, nnf_hsum4_ps(s10, s11, s12, s13));
    if (nr == 4) {
        if (accumulate) r0 = _mm_add_ps(r0, _mm_loadu_ps(c0));
        _mm_storeu_ps(c0, r0);
        if (mr == 2) {
            if (accumulate) r1 = _mm_add_ps(r1, _mm_loadu_ps(c1));
            _mm_storeu_ps(c1, r1);
        }
        return;
    }
    _mm_storeu_ps(out[0], r0);
    _mm_storeu_ps(out[1], r1);
    for (long q = 0; q < nr; q++) {
        c0[q] = accumulate ? c0[q] + out[0][q] : out[0][q];
        if (mr == 2) c1[q] = accumulate ? c1[q] + out[1][q] : out[1][q];
    }
}

/* A short inner dimension (k < 16: the backward through a 10-class output layer) leaves
 * the tiles above mostly horizontal sums; there B^T is written to ``scratch`` (k * n
 * floats) and the product taken as nn (16 rows of dX through a 10-wide layer, 16x10 @ (128x10)^T: 2.0 us as nt tiles,
 * 1.05 us this way, OpenBLAS 1.6 us). */
static void nnf_sgemm_nt(long m, long n, long k, float alpha, const float *a, long lda,
                         const float *b, long ldb, float *c, long ldc, int accumulate,
                         float *scratch) {
    if (k < 16 && scratch != 0) {
        for (long j = 0; j < n; j++)
            for (long p = 0; p < k; p++) scratch[p * n + j] = b[j * ldb + p];
        nnf_sgemm_nn(m, n, k, alpha, a, lda, 1, scratch, n, c, ldc, accumulate);
        return;
    }
    for (long i = 0; i < m; i += 2) {
        long mr = m - i < 2 ? 1 : 2;
        const float *a0 = a + i * lda, *a1 = mr == 2 ? a0 + lda : a0;
        float *c0 = c + i * ldc, *c1 = c0 + ldc;
        for (long j = 0; j < n; j += 4) {
            long nr = n - j < 4 ? n - j : 4;
            nnf_snt_tile(mr, nr, k, alpha, a0, a1, b + j * ldb, ldb, nr - 1, c0 + j, c1 + j,
                         accumulate);
        }
    }
}

#else
#define NNF_HAVE_SMALL_GEMM 0
#define NNF_PANEL_WIDTH 16
static int nnf_pack_b = 0;  /* (no hand kernels to pack for) */
static int nnf_pack_a = 0;
static inline int nnf_transposed_a_packs(long rsa, long csa) {
    (void)rsa; (void)csa;
    return 0;
}
/* never called in builds without AVX2 (gemm takes every product there) */
static inline void nnf_sgemm_nn(long m, long n, long k, float alpha, const float *a,
                                long rsa, long csa, const float *b, long ldb, float *c,
                                long ldc, int accumulate) {
    (void)m; (void)n; (void)k; (void)alpha; (void)a; (void)rsa; (void)csa; (void)b;
    (void)ldb; (void)c; (void)ldc; (void)accumulate;
}
static inline void nnf_sgemm_nt(long m, long n, long k, float alpha, const float *a,
                                long lda, const float *b, long ldb, float *c, long ldc,
                                int accumulate, float *scratch) {
    (void)m; (void)n; (void)k; (void)alpha; (void)a; (void)lda; (void)b; (void)ldb;
    (void)c; (void)ldc; (void)accumulate; (void)scratch;
}
static inline void nnf_sgemm_nt_packed(long m, long n, long k, float alpha, const float *a,
                                       long lda, const float *b, long ldb, float *c,
                                       long ldc, int accumulate, const nnf_epilogue *ep) {
    (void)m; (void)n; (void)k; (void)alpha; (void)a; (void)lda; (void)b; (void)ldb;
    (void)c; (void)ldc; (void)accumulate; (void)ep;
}
static inline void nnf_sgemm_nn_epilogue(long m, long n, long k, float alpha,
                                         const float *a, long rsa, long csa, const float *b,
                                         long ldb, float *c, long ldc, int accumulate,
                                         const nnf_epilogue *ep) {
    (void)m; (void)n; (void)k; (void)alpha; (void)a; (void)rsa; (void)csa; (void)b;
    (void)ldb; (void)c; (void)ldc; (void)accumulate; (void)ep;
}
#endif
#endif
