/* Products of weights packed by oneDNN (torch.ops.mkldnn._reorder_linear_weight) or by MLX (LAYOUT_QUANT: quant.c),
 * read in place: product_f32 (one input row, fp32 in and out), product_rows_f32 (up to ROWS_MAX rows per pass over
 * the weight) and fused_products (several weights that read the same input, e.g. KDA's six input projections, in one
 * call: one dispatch instead of six, output rows of all of them shared among threads; with one part, a product of
 * up to 8 rows in the model dtype: native.PackedGemv).
 *
 * Reference: oneDNN's blocked memory formats (AB16b64a2b); kimi_lm/cpu/native.py (PackedGemv) checks each packed
 * weight against oneDNN's own product before it is used here.
 */
#include "common.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

/* acc[a] += W[a][2p] x0 + W[a][2p + 1] x1 for the 64 outputs of one AB16b64a2b row of input pairs */
static inline void accumulate_pairs(float *acc, const uint32_t *row, float x0, float x1) {
#pragma omp simd
    for (long a = 0; a < 64; a++) {
        const uint32_t u = row[a];
        acc[a] += bits_to_f32(u << 16) * x0 + bits_to_f32(u & 0xffff0000u) * x1;
    }
}

/* one dot product of a plain weight row (fp32 or bf16) with x [I] fp32 */
static inline float plain_dot(int bf16, long I, const void *row, const float *x) {
    float t = 0.0f;
    if (bf16) {
        const uint16_t *w = (const uint16_t *)row;
#pragma omp simd reduction(+ : t)
        for (long i = 0; i < I; i++) t += bf16_to_f32(w[i]) * x[i];
    } else {
        const float *w = (const float *)row;
#pragma omp simd reduction(+ : t)
        for (long i = 0; i < I; i++) t += w[i] * x[i];
    }
    return t;
}

#if defined(__AVX512F__)
/* one plain fp32 row's dot with x [I]: 4 accumulators (an FMA's latency is 4 of its issue slots), the weight stream
 * fetched ahead (prefetch_stream). Against the `omp simd` dot (one accumulator, no prefetch), weights streamed from
 * memory on 2 threads: 1024x512 71 -> 55 us, 2048x2304 272 -> 232, 6144x2304 781 -> 669 */
static float plain_row_one(long I, const float *w, const float *x) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    long i = 0;
    for (; i + 64 <= I; i += 64) {
#pragma GCC unroll 4
        for (int k = 0; k < 4; k++) {
            prefetch_stream(w + i + 16 * k);
            acc[k] = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 16 * k), _mm512_loadu_ps(x + i + 16 * k), acc[k]);
        }
    }
    for (; i < I; i += 16) {
        const __mmask16 k = I - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (I - i)) - 1u);
        acc[0] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, w + i), _mm512_maskz_loadu_ps(k, x + i), acc[0]);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
}
#endif

#if defined(__AVX512F__)
/* the 64 outputs of one AB16b64a2b block row += its weight pairs p0 .. p1 times x's pairs (x [2 p1] at least), as fused
 * multiply-adds into named accumulators (accumulate_pairs' array stayed in memory: a load and a store per step), the
 * weight stream fetched ahead (prefetch_stream). A bf16 decode step of the bench model (alternating rounds in one
 * process, median of 6): 1.38 -> 1.25 ms. */
static inline void pair_block_steps(const uint32_t *blk, long p0, long p1, const float *x, long I, __m512 *a0,
                                    __m512 *a1, __m512 *a2, __m512 *a3) {
    const __m512i high = _mm512_set1_epi32((int)0xffff0000u);
    __m512 s0 = *a0, s1 = *a1, s2 = *a2, s3 = *a3;
    for (long p = p0; p < p1; p++) {
        const uint32_t *row = blk + p * 64;
        for (int k = 0; k < 64; k += 16) prefetch_stream(row + k);
        const __m512 x0 = _mm512_set1_ps(x[2 * p]), x1 = _mm512_set1_ps(2 * p + 1 < I ? x[2 * p + 1] : 0.0f);
        const __m512i w0 = _mm512_loadu_si512(row), w1 = _mm512_loadu_si512(row + 16);
        const __m512i w2 = _mm512_loadu_si512(row + 32), w3 = _mm512_loadu_si512(row + 48);
        s0 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(w0, 16)), x0, s0);
        s1 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(w1, 16)), x0, s1);
        s2 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(w2, 16)), x0, s2);
        s3 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(w3, 16)), x0, s3);
        s0 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(w0, high)), x1, s0);
        s1 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(w1, high)), x1, s1);
        s2 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(w2, high)), x1, s2);
        s3 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(w3, high)), x1, s3);
    }
    *a0 = s0, *a1 = s1, *a2 = s2, *a3 = s3;
}

/* product_f32 on AB16b64a2b blocks (one input row): each block row of 64 outputs in four vector accumulators, its
 * weight stream fetched ahead (prefetch_stream); the partial last block's padding past I is never read */
static void pair_blocks_one(long O, long I, const uint32_t *w, const float *x, float *y) {
    const long nOB = (O + 63) / 64, nIB = (I + 31) / 32, full = I / 32;
    for (long ob = 0; ob < nOB; ob++) {
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        const uint32_t *blocks = w + ob * nIB * 1024;
        for (long ib = 0; ib < full; ib++) {
            const uint32_t *blk = blocks + ib * 1024;
            pair_block_steps(blk, 0, 16, x + ib * 32, 32, &a0, &a1, &a2, &a3);
        }
        if (I > full * 32) /* the partial block: its pairs within I */
            pair_block_steps(blocks + full * 1024, 0, (I - full * 32 + 1) / 2, x + full * 32, I - full * 32, &a0, &a1,
                             &a2, &a3);
        float acc[64];
        _mm512_storeu_ps(acc, a0);
        _mm512_storeu_ps(acc + 16, a1);
        _mm512_storeu_ps(acc + 32, a2);
        _mm512_storeu_ps(acc + 48, a3);
        const long n = O - ob * 64 < 64 ? O - ob * 64 : 64;
        memcpy(y + ob * 64, acc, sizeof(float) * (size_t)n);
    }
}
#endif

/* y[O] = W x in fp32 for one input row x [I] (fp32), W as ``torch.ops.mkldnn._reorder_linear_weight`` stores it.
 * layout 0: plain row-major [O, I] in the model dtype (what oneDNN keeps for fp32 here); layout 1: bf16 "AB16b64a2b"
 * ([O/64][I/32] blocks of [16][64][2]: 64 outputs by 32 inputs, input pairs adjacent, padded to whole blocks).
 * kimi_lm/cpu/native.py checks each packed weight against oneDNN's own product before it is used here. */
int product_f32(int layout, int bf16, long O, long I, const void *w, const float *x, float *y) {
    if (layout == LAYOUT_QUANT) return product_rows_f32(layout, bf16, O, I, w, 1, x, y);
    if (layout == 0) {
#if defined(__AVX512F__)
        if (!bf16) {
            for (long r = 0; r < O; r++) y[r] = plain_row_one(I, (const float *)w + r * I, x);
            return 0;
        }
#endif
        for (long r = 0; r < O; r++) y[r] = plain_dot(bf16, I, (const char *)w + (size_t)(r * I) * (bf16 ? 2 : 4), x);
        return 0;
    }
#if defined(__AVX512F__)
    pair_blocks_one(O, I, (const uint32_t *)w, x, y);
    return 0;
#endif
    const long nOB = (O + 63) / 64, nIB = (I + 31) / 32, full = I / 32, tail = I % 32;
    const uint32_t *pairs = (const uint32_t *)w; /* one uint32 = the bf16 weights of inputs 2p and 2p + 1 */
    for (long ob = 0; ob < nOB; ob++) {
        float acc[64] = {0};
        /* whole blocks with a constant trip count (kept unrolled and in registers: 3-5x faster than a variable one) */
        for (long ib = 0; ib < full; ib++) {
            const uint32_t *blk = pairs + (ob * nIB + ib) * 1024;
            for (long p = 0; p < 16; p++) accumulate_pairs(acc, blk + p * 64, x[ib * 32 + 2 * p], x[ib * 32 + 2 * p + 1]);
        }
        /* the last, partial block: its padding past I is skipped */
        const uint32_t *blk = pairs + (ob * nIB + full) * 1024;
        for (long p = 0; 2 * p < tail; p++)
            accumulate_pairs(acc, blk + p * 64, x[full * 32 + 2 * p], 2 * p + 1 < tail ? x[full * 32 + 2 * p + 1] : 0.0f);
        const long n = O - ob * 64 < 64 ? O - ob * 64 : 64;
        memcpy(y + ob * 64, acc, sizeof(float) * (size_t)n);
    }
    return 0;
}

#if defined(__AVX512F__)
/* The 16 horizontal sums of acc[0..15] in one vector: lane 4r + m holds the sum of acc[4m + r]'s lanes (a tree of
 * 128-bit block shuffles, then in-block ones: 15 adds for 16 sums instead of 16 reductions of 4 steps each). */
static inline __m512 sum16(const __m512 acc[16]) {
    __m512 c[8], d[4];
    for (int k = 0; k < 8; k++) /* halves: [acc 2k | acc 2k+1], each half the sum of its vector's two halves */
        c[k] = _mm512_add_ps(_mm512_shuffle_f32x4(acc[2 * k], acc[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_f32x4(acc[2 * k], acc[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int k = 0; k < 4; k++) /* 128-bit blocks: acc 4k, 4k+1, 4k+2, 4k+3 */
        d[k] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * k], c[2 * k + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(c[2 * k], c[2 * k + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512 e0 = _mm512_add_ps(_mm512_unpacklo_ps(d[0], d[1]), _mm512_unpackhi_ps(d[0], d[1]));
    const __m512 e1 = _mm512_add_ps(_mm512_unpacklo_ps(d[2], d[3]), _mm512_unpackhi_ps(d[2], d[3]));
    return _mm512_add_ps(_mm512_shuffle_ps(e0, e1, _MM_SHUFFLE(1, 0, 1, 0)), _mm512_shuffle_ps(e0, e1, _MM_SHUFFLE(3, 2, 3, 2)));
}

/* Batched products of plain fp32 rows (the layout oneDNN keeps for fp32). A row-by-row dot loads the weight once
 * per input row: 2 loads per FMA, which made 8 rows cost 3x one row's time, where the weight's bytes should bound
 * it. Two shapes of shared loads, by whether the M input rows fit L1 (measured, 2 threads, weights streamed from
 * DRAM, 1024x512 / 512x2304: 8 rows 184 -> 123 / 415 -> 266 us, one row 58 / 126 us):
 *   plain_rows_2xM two weight rows against all M input rows (2 + M loads per 2M FMAs), each weight row read in
 *                  order; the M rows must stay in L1 (plain_row_M, one weight row, for an odd last one);
 *   plain_dots_4x4 4 weight rows against 4 input rows (8 loads per 16 FMAs) when they do not: fewer input loads,
 *                  but 4 interleaved weight streams, which the prefetchers serve worse (2 rows: 1.6x the time of
 *                  plain_row). */
#define PLAIN_ROW_PREFETCH 512 /* floats ahead in the weight stream: 2 KiB, ~a memory latency of FMAs at 8 rows
                                * (8 rows 1024x512 / 2048x512: 151 -> 141 / 290 -> 246 us; 1 and 4 rows unchanged) */
#define PLAIN_ROW(MT)                                                                                                 \
    static void plain_row_##MT(long I, long O, const float *w, const float *x, float *y) {                            \
        __m512 acc[MT];                                                                                               \
        for (int m = 0; m < (MT); m++) acc[m] = _mm512_setzero_ps();                                                  \
        for (long i = 0; i < I; i += 16) {                                                                            \
            const __mmask16 k = I - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (I - i)) - 1u);                  \
            const __m512 wv = _mm512_maskz_loadu_ps(k, w + i);                                                        \
            _mm_prefetch((const char *)(w + i + PLAIN_ROW_PREFETCH), _MM_HINT_T0);                                  \
            _Pragma("GCC unroll 8") for (int m = 0; m < (MT); m++)                                                    \
                acc[m] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(k, x + m * I + i), acc[m]);                        \
        }                                                                                                             \
        for (int m = 0; m < (MT); m++) y[m * O] = _mm512_reduce_add_ps(acc[m]);                                       \
    }
PLAIN_ROW(2)
PLAIN_ROW(3)
PLAIN_ROW(4)
PLAIN_ROW(5)
PLAIN_ROW(6)
PLAIN_ROW(7)
PLAIN_ROW(8)

/* Two weight rows at a time against M input rows: y[m O] and y[m O + 1] = w_0 . x_m and w_1 . x_m (w: the two rows,
 * stride I), each input vector loaded once for both rows and the 2M sums reduced together (sum16), the rows' weight
 * fetched 6 KiB ahead (prefetch_stream). Against plain_row_M one weight row at a time, whose accumulator array GCC
 * kept in memory (a store per FMA) and which fetched 2 KiB ahead: 1796x512 with the weight in L2, 2 threads, 8 / 4 /
 * 2 rows 96 -> 54 / 53 -> 36 / 33 -> 28 us; a batched decode step of the bench model (8 sequences, weights streamed
 * from memory, alternating rounds in one process) 6.10 -> 5.31 ms (median of 6). The same tile with an accumulator
 * array and the 2 KiB distance had measured no faster than plain_row_8 in that step. */
/* one input row m of plain_rows_2x: its vector at i, times both weight rows (named accumulators: GCC kept an array of
 * them in memory, a store per FMA) */
#define ROWS_2X_STEP(m)                                                                                               \
    if ((m) < rows) {                                                                                                 \
        const __m512 xm = _mm512_maskz_loadu_ps(k, x + (m) * I + i);                                                  \
        a##m##0 = _mm512_fmadd_ps(w0, xm, a##m##0);                                                                   \
        a##m##1 = _mm512_fmadd_ps(w1, xm, a##m##1);                                                                   \
    }
#define PLAIN_ROWS_2X(MT)                                                                                             \
    static void plain_rows_2x##MT(long I, long O, const float *w, const float *x, float *y) {                        \
        const int rows = (MT);                                                                                        \
        const __m512 z = _mm512_setzero_ps();                                                                         \
        __m512 a00 = z, a01 = z, a10 = z, a11 = z, a20 = z, a21 = z, a30 = z, a31 = z;                                \
        __m512 a40 = z, a41 = z, a50 = z, a51 = z, a60 = z, a61 = z, a70 = z, a71 = z;                                \
        for (long i = 0; i < I; i += 16) {                                                                            \
            const __mmask16 k = I - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (I - i)) - 1u);                  \
            const __m512 w0 = _mm512_maskz_loadu_ps(k, w + i), w1 = _mm512_maskz_loadu_ps(k, w + I + i);              \
            prefetch_stream(w + i);                                                                                   \
            prefetch_stream(w + I + i);                                                                               \
            ROWS_2X_STEP(0) ROWS_2X_STEP(1) ROWS_2X_STEP(2) ROWS_2X_STEP(3)                                           \
            ROWS_2X_STEP(4) ROWS_2X_STEP(5) ROWS_2X_STEP(6) ROWS_2X_STEP(7)                                           \
        }                                                                                                             \
        const __m512 sums[16] = {a00, a01, a10, a11, a20, a21, a30, a31, a40, a41, a50, a51, a60, a61, a70, a71};     \
        float out[16];                                                                                                \
        _mm512_storeu_ps(out, sum16(sums)); /* lane 4r + q: the sum of sums[4q + r] */                               \
        for (int a = 0; a < 2 * (MT); a++) y[(a >> 1) * O + (a & 1)] = out[4 * (a & 3) + (a >> 2)];                  \
    }
PLAIN_ROWS_2X(2)
PLAIN_ROWS_2X(3)
PLAIN_ROWS_2X(4)
PLAIN_ROWS_2X(5)
PLAIN_ROWS_2X(6)
PLAIN_ROWS_2X(7)
PLAIN_ROWS_2X(8)

/* out[sum16 lane of 4m + r] = w_r . x_m for 4 weight rows (w, row stride I) and 4 input rows */
static void plain_dots_4x4(long I, const float *w, const float *const x[4], float out[16]) {
    __m512 acc[16];
    for (int a = 0; a < 16; a++) acc[a] = _mm512_setzero_ps();
    for (long i = 0; i < I; i += 16) {
        const __mmask16 k = I - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (I - i)) - 1u);
        __m512 wr[4];
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++) wr[r] = _mm512_maskz_loadu_ps(k, w + r * I + i);
#pragma GCC unroll 4
        for (int m = 0; m < 4; m++) {
            const __m512 xm = _mm512_maskz_loadu_ps(k, x[m] + i);
#pragma GCC unroll 4
            for (int r = 0; r < 4; r++) acc[4 * m + r] = _mm512_fmadd_ps(wr[r], xm, acc[4 * m + r]);
        }
    }
    _mm512_storeu_ps(out, sum16(acc));
}

#define PLAIN_ROW_L1_FLOATS 4608 /* M x I inputs up to 18 KiB: plain_row (measured up to 8 x 512 and 2 x 2304) */

/* y [M, O] = x W^T for plain fp32 rows W [O, I] and 2 <= M <= ROWS_MAX input rows */
static void plain_rows_f32(long O, long I, const float *w, long M, const float *x, float *y) {
    if (M * I <= PLAIN_ROW_L1_FLOATS) {
        void (*const row[9])(long, long, const float *, const float *, float *) = {
            NULL, NULL, plain_row_2, plain_row_3, plain_row_4, plain_row_5, plain_row_6, plain_row_7, plain_row_8};
        void (*const pair[9])(long, long, const float *, const float *, float *) = {
            NULL, NULL, plain_rows_2x2, plain_rows_2x3, plain_rows_2x4, plain_rows_2x5, plain_rows_2x6, plain_rows_2x7,
            plain_rows_2x8};
        long r = 0;
        for (; r + 2 <= O; r += 2) pair[M](I, O, w + r * I, x, y + r);
        for (; r < O; r++) row[M](I, O, w + r * I, x, y + r);
        return;
    }
    long r = 0;
    for (; r + 4 <= O; r += 4)
        for (long m0 = 0; m0 < M; m0 += 4) {
            const long mn = M - m0 < 4 ? M - m0 : 4;
            const float *xs[4];
            for (long k = 0; k < 4; k++) xs[k] = x + (m0 + (k < mn ? k : mn - 1)) * I; /* short of 4: repeat the last */
            float out[16];
            plain_dots_4x4(I, w + r * I, xs, out);
            for (long k = 0; k < mn; k++)
                for (long j = 0; j < 4; j++) y[(m0 + k) * O + r + j] = out[4 * j + k];
        }
    for (; r < O; r++)
        for (long m = 0; m < M; m++) y[m * O + r] = plain_dot(0, I, w + r * I, x + m * I);
}
#endif

/* product_f32 for M <= 8 input rows x [M, I] -> y [M, O] at once: each block of the weight is read once for all rows
 * (a second row would otherwise stream a weight larger than the caches again). LAYOUT_QUANT: w is a qweight
 * (its O and I are the ones used). */
int product_rows_f32(int layout, int bf16, long O, long I, const void *w, long M, const float *x, float *y) {
    if (layout == LAYOUT_QUANT) {
        const qweight *W = (const qweight *)w;
        qinput *X = quant_input(W, M, x, bf16);
        if (!X) return 1;
        quant_rows(W, X, 0, W->O, y);
        quant_input_free(X);
        return 0;
    }
    if (M == 1) /* one row: product_f32's loops (the accumulators in registers; GCC's clone of the loops below for a
                 * one-row caller measured 3x slower, its dot products unvectorised) */
        return product_f32(layout, bf16, O, I, w, x, y);
#if defined(__AVX512F__)
    if (layout == 0 && !bf16) {
        plain_rows_f32(O, I, (const float *)w, M, x, y);
        return 0;
    }
#endif
    if (layout == 0) {
        for (long r = 0; r < O; r++) /* the weight row stays in L1 for the M dots */
            for (long m = 0; m < M; m++)
                y[m * O + r] = plain_dot(bf16, I, (const char *)w + (size_t)(r * I) * (bf16 ? 2 : 4), x + m * I);
        return 0;
    }
    const long nOB = (O + 63) / 64, nIB = (I + 31) / 32, full = I / 32, tail = I % 32;
    const uint32_t *pairs = (const uint32_t *)w;
    for (long ob = 0; ob < nOB; ob++) {
        float acc[ROWS_MAX][64] = {{0}};
        for (long ib = 0; ib < full; ib++) {
            const uint32_t *blk = pairs + (ob * nIB + ib) * 1024;
            for (long m = 0; m < M; m++) {
                const float *xm = x + m * I + ib * 32;
                for (long p = 0; p < 16; p++) accumulate_pairs(acc[m], blk + p * 64, xm[2 * p], xm[2 * p + 1]);
            }
        }
        const uint32_t *blk = pairs + (ob * nIB + full) * 1024;
        for (long m = 0; m < M; m++) {
            const float *xm = x + m * I + full * 32;
            for (long p = 0; 2 * p < tail; p++)
                accumulate_pairs(acc[m], blk + p * 64, xm[2 * p], 2 * p + 1 < tail ? xm[2 * p + 1] : 0.0f);
        }
        const long n = O - ob * 64 < 64 ? O - ob * 64 : 64;
        for (long m = 0; m < M; m++) memcpy(y + m * O + ob * 64, acc[m], sizeof(float) * (size_t)n);
    }
    return 0;
}

/* ---- several products of one input ------------------------------------------------------------------------------ */

#define FUSED_ROWS 64 /* output rows per work item: one AB16b64a2b block row; 4-bit ones are ~1/4 the bytes */

typedef struct {
    long n, I, M;
    int bf16;
    const int *layouts;
    const void *const *weights;
    const long *outs, *first_item; /* per part: its output width, its first work item */
    qinput **inputs;               /* per part: x prepared for a quantized part (NULL for oneDNN's) */
    const float *x;                /* [M, I] fp32 */
    float *const *y;               /* per part: its [M, out] fp32 */
} fused_job;

static void fused_item(const void *ctx, long item) {
    const fused_job *job = (const fused_job *)ctx;
    long p = 0;
    while (p + 1 < job->n && job->first_item[p + 1] <= item) p++;
    const long O = job->outs[p], r0 = (item - job->first_item[p]) * FUSED_ROWS;
    const long r1 = r0 + FUSED_ROWS < O ? r0 + FUSED_ROWS : O, I = job->I, M = job->M;
    weight_rows_m(job->layouts[p], job->bf16, job->weights[p], job->inputs[p], I, O, M, job->x, r0, r1, job->y[p]);
}

/* y [M, Σ outs] = x [M, I] [W_0 | W_1 | …]^T for M <= ROWS_MAX rows, x and y in the model dtype: n weights reading
 * the same input (layouts[i]: 0 / 1 oneDNN-packed memory, LAYOUT_QUANT a qweight), their outputs side by side.
 * fp32 accumulation, one rounding per output. Output rows of all parts are shared among `threads`.
 * Returns 0, or 1 when scratch memory could not be allocated. */
int fused_products(long n, const int *layouts, const void *const *weights, const long *outs, long I, int bf16, long M,
                   const void *x, void *y, int threads) {
    long total = 0;
    for (long p = 0; p < n; p++) total += outs[p];
    float *buf = malloc(sizeof(float) * (size_t)(M * (I + total)));
    long *first_item = malloc(sizeof(long) * (size_t)n);
    qinput **inputs = calloc((size_t)n, sizeof(qinput *));
    float **ys = malloc(sizeof(float *) * (size_t)n);
    int failed = !buf || !first_item || !inputs || !ys;
    if (!failed) {
        float *xf = buf;
        load_row(xf, x, M * I, bf16);
        long items = 0, at = M * I;
        for (long p = 0; p < n && !failed; p++) {
            first_item[p] = items;
            items += (outs[p] + FUSED_ROWS - 1) / FUSED_ROWS;
            ys[p] = buf + at;
            at += M * outs[p];
            if (layouts[p] == LAYOUT_QUANT) { /* the same spec's input is prepared once */
                for (long q = 0; q < p && !inputs[p]; q++)
                    if (same_row_input(layouts[q], weights[q], layouts[p], weights[p])) inputs[p] = inputs[q];
                if (!inputs[p]) failed = !(inputs[p] = quant_input((const qweight *)weights[p], M, xf, bf16));
            }
        }
        if (!failed) {
            const fused_job job = {n, I, M, bf16, layouts, weights, outs, first_item, inputs, xf, ys};
            parallel_for(fused_item, &job, items, threads);
            const size_t esize = bf16 ? 2 : 4;
            for (long m = 0; m < M; m++)
                for (long p = 0, col = 0; p < n; col += outs[p], p++)
                    store_row((char *)y + (size_t)(m * total + col) * esize, ys[p] + m * outs[p], outs[p], bf16);
        }
    }
    if (inputs)
        for (long p = 0; p < n; p++) { /* each prepared input once, though parts may share it */
            int shared = 0;
            for (long q = 0; q < p; q++) shared |= inputs[q] == inputs[p];
            if (!shared) quant_input_free(inputs[p]);
        }
    free(buf);
    free(first_item);
    free(inputs);
    free(ys);
    return failed;
}

/* rows [r0, r1) of y [M, O] = x W^T for M <= ROWS_MAX input rows x [M, I] fp32, W packed by oneDNN (layout 0: whole
 * rows; layout 1: AB16b64a2b, r0 a multiple of 64, one block row per 64 rows) -> y [M, r1 - r0] fp32: the rows as a
 * weight of their own, what a work item of a threaded product computes */
INTERNAL void packed_rows_range(int layout, int bf16, long I, const void *w, long r0, long r1, long M, const float *x,
                                float *y) {
    const size_t offset = layout == 0 ? (size_t)(r0 * I) * (bf16 ? 2 : 4) : (size_t)(r0 / 64) * (size_t)((I + 31) / 32) * 1024 * 4;
    product_rows_f32(layout, bf16, r1 - r0, I, (const char *)w + offset, M, x, y); /* oneDNN layouts: cannot fail */
}

/* ---- one input row through a weight in any layout (moe_decode_rows' parts) ------------------------------------------ */

int rows_input(int layout, const void *w, long M, const float *x, int bf16, void **input) {
    *input = NULL;
    if (layout == LAYOUT_QUANT) *input = quant_input((const qweight *)w, M, x, bf16);
    else if (layout == LAYOUT_FP8) *input = fp8_prepare(M, ((const fp8_weight *)w)->I, x, bf16);
    else return 0;
    return *input == NULL;
}

int row_input(int layout, const void *w, const float *x, int bf16, void **input) {
    return rows_input(layout, w, 1, x, bf16, input);
}

void row_input_free(int layout, void *input) {
    if (layout == LAYOUT_QUANT) quant_input_free((qinput *)input);
    else if (layout == LAYOUT_FP8) fp8_prepared_free((fp8_prepared *)input);
}

int same_row_input(int layout_a, const void *a, int layout_b, const void *b) {
    if (layout_a != layout_b) return 0;
    if (layout_a == LAYOUT_FP8) return ((const fp8_weight *)a)->I == ((const fp8_weight *)b)->I;
    if (layout_a != LAYOUT_QUANT) return 0;
    const qweight *V = (const qweight *)a, *W = (const qweight *)b;
    return V->mode == W->mode && V->bits == W->bits && V->group == W->group && V->I == W->I;
}

void weight_rows(int layout, int bf16, const void *w, const void *input, long I, const float *x, long r0, long r1,
                 float *y) {
    if (layout == LAYOUT_QUANT) {
        quant_rows((const qweight *)w, (const qinput *)input, r0, r1, y);
    } else if (layout == LAYOUT_FP8) {
        fp8_weight_rows((const fp8_weight *)w, (const fp8_prepared *)input, r0, r1, y);
    } else if (layout == 1 && (r0 % 64 || r1 % 64)) { /* rows mid-block: each whole block around them (the layout
                                                        * is padded to whole blocks), then the rows wanted */
        for (long a = r0 / 64 * 64; a < r1; a += 64) {
            float block[64];
            packed_rows_range(layout, bf16, I, w, a, a + 64, 1, x, block);
            const long from = a > r0 ? a : r0, to = a + 64 < r1 ? a + 64 : r1;
            memcpy(y + from, block + (from - a), sizeof(float) * (size_t)(to - from));
        }
    } else {
        packed_rows_range(layout, bf16, I, w, r0, r1, 1, x, y + r0);
    }
}

/* weight_rows for M <= ROWS_MAX input rows x [M, I] fp32 (`input` as rows_input prepared it): output rows [r0, r1)
 * of y [M, O] fp32 (row stride O). One row: weight_rows (any r0); several on oneDNN's blocked layout: r0 a multiple of
 * 64 (whole blocks). */
void weight_rows_m(int layout, int bf16, const void *w, const void *input, long I, long O, long M, const float *x,
                   long r0, long r1, float *y) {
    if (M == 1) {
        weight_rows(layout, bf16, w, input, I, x, r0, r1, y);
    } else if (layout == LAYOUT_QUANT) {
        quant_rows((const qweight *)w, (const qinput *)input, r0, r1, y);
    } else if (layout == LAYOUT_FP8) {
        fp8_weight_rows((const fp8_weight *)w, (const fp8_prepared *)input, r0, r1, y);
    } else {
        float part[ROWS_MAX * 64];
        for (long a = r0; a < r1; a += 64) { /* the rows as a weight of their own, 64 at a time */
            const long b = a + 64 < r1 ? a + 64 : r1;
            packed_rows_range(layout, bf16, I, w, a, b, M, x, part);
            for (long m = 0; m < M; m++) memcpy(y + m * O + a, part + m * (b - a), sizeof(float) * (size_t)(b - a));
        }
    }
}
