/* Products with MLX-quantized weights read straight from their packed bytes (no dequantized copy): affine 2-8 bit,
 * MXFP4, MXFP8 and NVFP4 (layouts: kimi_lm/quant/affine.py, mxfp4.py, mxfp8.py, nvfp4.py; spec
 * kimi_k2_and_quantization.md section 5). A decode step reads each weight once; a 4-bit weight is 4.25-4.5 bits, so the
 * product streams ~3.6x fewer bytes than bf16 and the decoding must keep up with memory: it does, with AVX-512.
 *
 * Three paths, one per shape of code:
 *   nibbles (4-bit: MXFP4, NVFP4, affine 4-bit; AVX-512 BF16): 64 packed bytes = 128 codes = one 128-bit lane per 32
 *     weights. Two byte shuffles turn the codes into the bf16 bits of their values (E2M1, or the integers 0..15 for
 *     affine; all exact in bf16), and vdpbf16ps multiplies them with the input, whose elements were permuted once per
 *     call into the order the shuffles leave the codes in. Each lane's four fp32 sums then take their group's scale in
 *     one multiply-add. A bf16 input is exact; an fp32 input is split into two bf16 parts (hi + lo, ~2^-16 relative).
 *   bytes (MXFP8, affine 8-bit; AVX-512): 32 codes widened to fp32 (E4M3 through its fp16 bits and vcvtph2ps, exact
 *     with subnormals) and multiplied with the fp32 input.
 *   generic (every format, and every CPU): each group's codes decoded to fp32 by shifts, then an `omp simd` dot. It is
 *     the only path for affine 2, 3, 5 and 6 bit and where AVX-512 BF16 is missing.
 * Affine weights are scale q + bias: the products sum scale (q . x) per group and add bias . (sum of the group's x).
 * Symmetric affine weights (compressed-tensors INT4: bias = -8 scale) come without biases (NULL): derived per row.
 *
 * quant_matmul: y = x W^T for M input rows (any M; 8 rows per pass over the weight), output rows shared among threads.
 * quant_experts_rows: SwiGLU experts with packed gate|up and down weights on a few rows each (a decode step's experts
 * in one call), as moe_experts_rows does for oneDNN's packed weights.
 *
 * Reference: OCP Microscaling Formats (MX) v1.0; Intel intrinsics guide (vpshufb, vdpbf16ps, vcvtph2ps).
 */
#include "common.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__) && defined(__AVX512VL__) && \
    defined(__F16C__)
#include <immintrin.h>
#define QUANT_AVX512 1
#else
#define QUANT_AVX512 0
#endif
#if QUANT_AVX512 && defined(__AVX512VBMI__)
#define QUANT_VBMI 1 /* byte permutes across a whole vector (vpermi2b): MXFP8's codes looked up as bf16 */
#else
#define QUANT_VBMI 0
#endif

static int force_generic; /* tests: the generic path on a CPU that has the vector ones */

void quant_use_generic(int on) { force_generic = on; }

static const float E2M1[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                               -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

/* E4M3 (fp8, no infinities) -> fp32, subnormals included; branch-free so that loops over it vectorise */
static inline float e4m3_to_f32(uint32_t b) {
    const uint32_t e = (b >> 3) & 15u, m = b & 7u;
    const float normal = bits_to_f32(((b & 0x80u) << 24) | ((e + 120u) << 23) | (m << 20));
    const float sub = (b & 0x80u ? -0.001953125f : 0.001953125f) * (float)m; /* ±m / 8 2^-6 */
    return e ? normal : sub;
}

/* one group's scale as fp32 */
static inline float scale_of(const qweight *W, long row, long g) {
    const long n = W->I / W->group;
    if (W->mode == MXFP4 || W->mode == MXFP8) return bits_to_f32((uint32_t)((const uint8_t *)W->scales)[row * n + g] << 23);
    if (W->mode == NVFP4) return e4m3_to_f32(((const uint8_t *)W->scales)[row * n + g]);
    return load_one(W->scales, row * n + g, W->scale_bf16);
}

/* the scales [rows, I / group] (and affine biases; none stored: symmetric) of rows row .. row + rows - 1 as fp32,
 * in one pass (they are contiguous: one loop instead of a call per row, which cost a fifth of a 4-bit product with
 * 256-512 inputs per row) */
static void rows_scales(const qweight *W, long row, long rows, float *s, float *b) {
    const long n = W->I / W->group * rows, at = row * (W->I / W->group);
    const uint8_t *u = (const uint8_t *)W->scales + at;
    if (W->mode == MXFP4 || W->mode == MXFP8) {
#pragma omp simd
        for (long g = 0; g < n; g++) s[g] = bits_to_f32((uint32_t)u[g] << 23);
    } else if (W->mode == NVFP4) {
#pragma omp simd
        for (long g = 0; g < n; g++) s[g] = e4m3_to_f32(u[g]);
    } else {
        const size_t esize = W->scale_bf16 ? 2 : 4;
        load_row(s, (const char *)W->scales + (size_t)at * esize, n, W->scale_bf16);
        if (W->biases) {
            load_row(b, (const char *)W->biases + (size_t)at * esize, n, W->scale_bf16);
        } else { /* symmetric (compressed-tensors INT4): bias = -2^(bits - 1) scale, exact in fp32 as in bf16 */
            const float mid = (float)(1 << (W->bits - 1));
#pragma omp simd
            for (long g = 0; g < n; g++) b[g] = -mid * s[g];
        }
    }
}

static void row_scales(const qweight *W, long row, float *s, float *b) { rows_scales(W, row, 1, s, b); }

/* ---- the input rows, prepared once per call ------------------------------------------------------------------- */

struct qinput {
    long M;
    float *xf;          /* [M, I] fp32 */
    uint16_t *xh, *xl;  /* [M, I] bf16, permuted per block of 128 for the nibble path, of 64 for the fp8 path;
                         * xl: x - hi (NULL: x is bf16) */
    float *xsum;        /* [M, I / group]: affine groups' input sums */
};

/* the vector paths find a group's scale by a shift: groups are powers of two (every format's are) */
static inline int pow2_group(const qweight *W) { return W->group > 0 && (W->group & (W->group - 1)) == 0; }

static inline int nibble_path(const qweight *W) {
    return QUANT_AVX512 && !force_generic && pow2_group(W) && W->bits == 4 && (W->mode != AFFINE || W->group >= 32);
}

/* 8-bit codes (MXFP8, affine 8-bit) with whole-vector byte permutes: each code looked up as bf16 and multiplied with
 * vdpbf16ps, as the nibble path does for 4-bit codes (the fp32 conversion of the byte path was 2x the instructions per
 * weight); groups of 32 or whole multiples of the 64-code block */
static inline int fp8_path(const qweight *W) {
    return QUANT_VBMI && !force_generic && pow2_group(W) && W->bits == 8 && (W->mode == MXFP8 || W->mode == AFFINE) &&
           (W->group == 32 || W->group % 64 == 0);
}

static inline int byte_path(const qweight *W) {
    return QUANT_AVX512 && !force_generic && pow2_group(W) && W->bits == 8 && (W->mode == MXFP8 || W->mode == AFFINE);
}

/* where element j of a block of 128 goes in the nibble path's order: vector k (A, B, C, D) of 32 bf16, lane l of 8,
 * word p; A holds each lane's elements 2p, B 16 + 2p, C 2p + 1, D 17 + 2p (what unpacklo/hi of the shuffled low and
 * high nibbles give) */
static inline long nibble_slot(long j) {
    const long l = j / 32, e = j % 32, odd = e & 1, half = (e % 32) >= 16;
    const long p = (e - 16 * half - odd) / 2;
    return 32 * (2 * odd + half) + 8 * l + p;
}

static long slots[128], slots8[64]; /* nibble_slot(j), unpacked_slot(j) (the 8-bit path), filled at load */

__attribute__((constructor)) static void fill_slots(void) {
    for (long j = 0; j < 128; j++) slots[j] = nibble_slot(j);
    for (long j = 0; j < 64; j++) slots8[j] = unpacked_slot(j);
}

static void free_input(qinput *X) {
    free(X->xf);
    X->xf = NULL;
}

/* M rows of x (model dtype) -> the forms the paths read. Returns 0, or 1 when memory could not be allocated. */
static int prepare_input(const qweight *W, long M, const float *x, int exact_bf16, qinput *X) {
    const long I = W->I, n = I / W->group;
    /* affine 8-bit from an fp32 input stays on the byte path: its codes up to 255 against biases near -128 scale
     * cancel, and the input's bf16 high and low halves (17 bits) then fall short of fp32's accuracy */
    const int nib = nibble_path(W), fp8 = fp8_path(W) && (W->mode == MXFP8 || exact_bf16);
    X->M = M;
    size_t floats = (size_t)(M * I) + (size_t)(M * n) + (nib || fp8 ? (size_t)(M * I) : 0) + 16;
    X->xf = malloc(sizeof(float) * floats);
    if (!X->xf) return 1;
    memcpy(X->xf, x, sizeof(float) * (size_t)(M * I));
    X->xsum = X->xf + M * I;
    X->xh = X->xl = NULL;
    if (W->mode == AFFINE)
        for (long m = 0; m < M; m++)
            for (long g = 0; g < n; g++) {
                float s = 0.0f;
                const float *xg = x + m * I + g * W->group;
#pragma omp simd reduction(+ : s)
                for (long i = 0; i < W->group; i++) s += xg[i];
                X->xsum[m * n + g] = s;
            }
    if (nib || fp8) { /* bf16 copies of x in the vector path's order per block */
        const long B = nib ? 128 : 64, full = I / B * B;
        const long *slot = nib ? slots : slots8;
        X->xh = (uint16_t *)(X->xsum + M * n);
        X->xl = exact_bf16 ? NULL : X->xh + M * I;
        for (long m = 0; m < M; m++)
            for (long b = 0; b < full; b += B)
                for (long j = 0; j < B; j++) {
                    const float v = x[m * I + b + j];
                    const uint16_t hi = f32_to_bf16(v);
                    X->xh[m * I + b + slot[j]] = hi;
                    if (X->xl) X->xl[m * I + b + slot[j]] = f32_to_bf16(v - bf16_to_f32(hi));
                }
    }
    return 0;
}

/* ---- generic path --------------------------------------------------------------------------------------------- */

/* the codes of group g of one row as their values before the scale; `bits` a constant where inlined */
static inline __attribute__((always_inline)) void decode_codes(int mode, long bits, long G, const uint8_t *row,
                                                               long g, float *v) {
    const uint64_t mask = (1u << bits) - 1;
    const uint8_t *p = row + g * G / 8 * bits;
    for (long c = 0; c < G / 8; c++, p += bits) { /* 8 codes fill `bits` whole bytes */
        uint64_t chunk = 0;
        for (long k = 0; k < bits; k++) chunk |= (uint64_t)p[k] << (8 * k);
        for (long k = 0; k < 8; k++) {
            const uint32_t code = (uint32_t)((chunk >> (k * bits)) & mask);
            v[c * 8 + k] = mode == AFFINE ? (float)code : mode == MXFP8 ? e4m3_to_f32(code) : E2M1[code];
        }
    }
}

static void decode_group(const qweight *W, const uint8_t *row, long g, float *v) {
    switch (W->mode == AFFINE ? W->bits : W->mode == MXFP8 ? 9 : 10) { /* each format its own unrolled copy */
    case 2: decode_codes(AFFINE, 2, W->group, row, g, v); break;
    case 3: decode_codes(AFFINE, 3, W->group, row, g, v); break;
    case 4: decode_codes(AFFINE, 4, W->group, row, g, v); break;
    case 5: decode_codes(AFFINE, 5, W->group, row, g, v); break;
    case 6: decode_codes(AFFINE, 6, W->group, row, g, v); break;
    case 8: decode_codes(AFFINE, 8, W->group, row, g, v); break;
    case 9: decode_codes(MXFP8, 8, W->group, row, g, v); break;
    default: decode_codes(MXFP4, 4, W->group, row, g, v); break; /* MXFP4, NVFP4: E2M1 */
    }
}

static void rows_generic(const qweight *W, const qinput *X, long r0, long r1, float *y) {
    const long I = W->I, G = W->group, n = I / G, row_bytes = I * W->bits / 8;
    float v[128], s[n + 1], b[n + 1];
    for (long r = r0; r < r1; r++) {
        row_scales(W, r, s, b);
        float acc[ROWS_MAX] = {0};
        for (long g = 0; g < n; g++) {
            decode_group(W, W->w + r * row_bytes, g, v);
            for (long m = 0; m < X->M; m++) {
                const float *xg = X->xf + m * I + g * G;
                float d = 0.0f;
#pragma omp simd reduction(+ : d)
                for (long i = 0; i < G; i++) d += v[i] * xg[i];
                acc[m] += s[g] * d + (W->mode == AFFINE ? b[g] * X->xsum[m * n + g] : 0.0f);
            }
        }
        for (long m = 0; m < X->M; m++) y[m * W->O + r] = acc[m];
    }
}

/* ---- vector paths --------------------------------------------------------------------------------------------- */
#if QUANT_AVX512

/* rows whose scales the vector paths convert in one pass: SCALE_CHUNK floats (or one row, if longer) */
#define SCALE_CHUNK 1024

/* The scales (and affine biases) of rows row .. row + rows - 1 (clipped at O) fetched into the caches. A thread's
 * rows are one contiguous range (threads.c), so these are the next chunk's: they are streams of their own beside the
 * weight's, and their first loads, at the start of each chunk, held 8 % of an MXFP4 decode step's samples and 13 %
 * of an affine 4-bit one's (bf16 scales and biases); fetched a chunk ahead: that step 9.24 -> 9.02 ms */
static inline void prefetch_scales(const qweight *W, long row, long rows) {
    if (row >= W->O) return;
    if (row + rows > W->O) rows = W->O - row;
    const long n = W->I / W->group;
    const size_t es = W->mode == AFFINE ? (W->scale_bf16 ? 2 : 4) : 1;
    const size_t at = (size_t)(row * n) * es, len = (size_t)(rows * n) * es;
    for (size_t o = 0; o < len; o += 64) {
        _mm_prefetch((const char *)W->scales + at + o, _MM_HINT_T0);
        if (W->biases) _mm_prefetch((const char *)W->biases + at + o, _MM_HINT_T0);
    }
}

/* one row r of a vector path: its scales s and affine biases b (fp32), the path's constants ctx, y as quant_rows' */
typedef void (*row_fn)(const qweight *W, const qinput *X, long r, const float *s, const float *b, const void *ctx,
                       float *y);

/* rows [r0, r1) of a vector path: the scales (and biases) of a chunk of rows converted in one pass, then row() for
 * each. Inlined into each path with its row function a constant, so that the call is direct and the path's constants
 * stay in registers (through a function pointer the 4-bit products ran 7 % slower) */
static inline __attribute__((always_inline)) void each_row(const qweight *W, const qinput *X, long r0, long r1,
                                                           row_fn row, const void *ctx, float *y) {
    const long n = W->I / W->group, chunk = n >= SCALE_CHUNK ? 1 : SCALE_CHUNK / n;
    float s[chunk * n + 16], b[chunk * n + 16]; /* 16 past the end: a block's scale load may read them */
    memset(s + chunk * n, 0, sizeof(float) * 16);
    for (long c0 = r0; c0 < r1; c0 += chunk) {
        const long c1 = c0 + chunk < r1 ? c0 + chunk : r1;
        rows_scales(W, c0, c1 - c0, s, b);
        prefetch_scales(W, c1, chunk);
        for (long r = c0; r < c1; r++) row(W, X, r, s + (r - c0) * n, b + (r - c0) * n, ctx, y);
    }
}

/* a row function's body: the row for X->M input rows, each M its own unrolled copy of ROW(k) */
#define FOR_EACH_M(ROW)                                                                                                \
    switch (X->M) {                                                                                                    \
    case 1: ROW(1); break;                                                                                             \
    case 2: ROW(2); break;                                                                                             \
    case 3: ROW(3); break;                                                                                             \
    case 4: ROW(4); break;                                                                                             \
    case 5: ROW(5); break;                                                                                             \
    case 6: ROW(6); break;                                                                                             \
    case 7: ROW(7); break;                                                                                             \
    case 8: ROW(8); break;                                                                                             \
    }

static inline __m512bh as_bh(__m512i v) { return (__m512bh)v; }

/* the lanes of Σ_g b[g] xs[g] over n groups (an affine row's biases times the input's group sums): masked vector
 * steps, added to the row's accumulator before its one horizontal sum */
static inline __m512 bias_dot(const float *b, const float *xs, long n) {
    __m512 acc = _mm512_setzero_ps();
    for (long g = 0; g < n; g += 16) {
        const __mmask16 k = n - g >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - g)) - 1);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, b + g), _mm512_maskz_loadu_ps(k, xs + g), acc);
    }
    return acc;
}

/* the end of a vector path's row r: an affine row's bias term added to each input row's sums, their horizontal sums
 * stored, then groups `tail` .. n - 1 (below a whole block) by the generic decode */
static inline __attribute__((always_inline)) void finish_row(const qweight *W, const qinput *X, long r, long M,
                                                             const float *s, const float *b, __m512 *acc, long tail,
                                                             float *y) {
    const long I = W->I, G = W->group, n = I / G;
    if (W->mode == AFFINE)
        for (long m = 0; m < M; m++) acc[m] = _mm512_add_ps(acc[m], bias_dot(b, X->xsum + m * n, n));
    for (long m = 0; m < M; m++) y[m * W->O + r] = _mm512_reduce_add_ps(acc[m]);
    float v[128];
    for (long g = tail; g < n; g++) {
        decode_group(W, W->w + r * (I * W->bits / 8), g, v);
        for (long m = 0; m < M; m++) {
            const float *xg = X->xf + m * I + g * G;
            float d = 0.0f;
            for (long i = 0; i < G; i++) d += v[i] * xg[i];
            y[m * W->O + r] += s[g] * d;
        }
    }
}

/* the low and high bytes of the bf16 bits of each code's value, for vpshufb (each 16-byte table in every lane) */
static void nibble_tables(int mode, __m512i *lo, __m512i *hi) {
    uint8_t l[16], h[16];
    for (int c = 0; c < 16; c++) {
        const uint16_t bits = f32_to_bf16(mode == AFFINE ? (float)c : E2M1[c]);
        l[c] = (uint8_t)bits;
        h[c] = (uint8_t)(bits >> 8);
    }
    *lo = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)l));
    *hi = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)h));
}

/* 64 packed bytes (128 codes) -> the bf16 values in vectors A, B, C, D (see nibble_slot) */
static inline void nibble_decode(const uint8_t *p, __m512i lut_lo, __m512i lut_hi, __m512i *v) {
    const __m512i raw = _mm512_loadu_si512(p), mask = _mm512_set1_epi8(0x0f);
    const __m512i lo = _mm512_and_si512(raw, mask), hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), mask);
    const __m512i lo_l = _mm512_shuffle_epi8(lut_lo, lo), lo_h = _mm512_shuffle_epi8(lut_hi, lo);
    const __m512i hi_l = _mm512_shuffle_epi8(lut_lo, hi), hi_h = _mm512_shuffle_epi8(lut_hi, hi);
    v[0] = _mm512_unpacklo_epi8(lo_l, lo_h);
    v[1] = _mm512_unpackhi_epi8(lo_l, lo_h);
    v[2] = _mm512_unpacklo_epi8(hi_l, hi_h);
    v[3] = _mm512_unpackhi_epi8(hi_l, hi_h);
}

/* The dot products of 128 decoded codes v (A, B, C, D) with input row positions x[at … at + 127] in bf16 (plus its
   low part for an fp32 input), as two partial sums: t0 over A and C, t1 over B and D (nibble_slot's lane order) */
static inline void nibble_dot(const __m512i *v, const qinput *X, long at, __m512 *t0, __m512 *t1) {
    const uint16_t *xh = X->xh + at;
    __m512 a = _mm512_dpbf16_ps(_mm512_setzero_ps(), as_bh(v[0]), as_bh(_mm512_loadu_si512(xh)));
    __m512 b = _mm512_dpbf16_ps(_mm512_setzero_ps(), as_bh(v[1]), as_bh(_mm512_loadu_si512(xh + 32)));
    a = _mm512_dpbf16_ps(a, as_bh(v[2]), as_bh(_mm512_loadu_si512(xh + 64)));
    b = _mm512_dpbf16_ps(b, as_bh(v[3]), as_bh(_mm512_loadu_si512(xh + 96)));
    if (X->xl) {
        const uint16_t *xl = X->xl + at;
        a = _mm512_dpbf16_ps(a, as_bh(v[0]), as_bh(_mm512_loadu_si512(xl)));
        b = _mm512_dpbf16_ps(b, as_bh(v[1]), as_bh(_mm512_loadu_si512(xl + 32)));
        a = _mm512_dpbf16_ps(a, as_bh(v[2]), as_bh(_mm512_loadu_si512(xl + 64)));
        b = _mm512_dpbf16_ps(b, as_bh(v[3]), as_bh(_mm512_loadu_si512(xl + 96)));
    }
    *t0 = a;
    *t1 = b;
}

/* one row's products with M input rows on the nibble path; M a constant where inlined (always_inline) */
static inline __attribute__((always_inline)) void nibble_row(const qweight *W, const qinput *X, long r, long M,
                                                             const float *s, const float *b, __m512i lut_lo,
                                                             __m512i lut_hi, __m512i idx0, __m512i idx1, float *y) {
    const long I = W->I, G = W->group, full = I / 128, row_bytes = I / 2;
    const int g_log2 = __builtin_ctzl((unsigned long)G); /* groups are powers of two: a shift, not a division */
    const uint8_t *row = W->w + r * row_bytes;
    __m512 acc[ROWS_MAX];
    for (long m = 0; m < M; m++) acc[m] = _mm512_setzero_ps();
    for (long blk = 0; blk < full; blk++) {
        __m512i v[4];
        prefetch_stream(row + blk * 64);
        nibble_decode(row + blk * 64, lut_lo, lut_hi, v);
        if (G == 16) { /* two groups per lane: A, C the first; B, D the second */
            const __m512 s0 = _mm512_permutexvar_ps(idx0, _mm512_loadu_ps(s + blk * 8));
            const __m512 s1 = _mm512_permutexvar_ps(idx1, _mm512_loadu_ps(s + blk * 8));
            for (long m = 0; m < M; m++) {
                __m512 t0, t1;
                nibble_dot(v, X, m * I + blk * 128, &t0, &t1);
                acc[m] = _mm512_fmadd_ps(t0, s0, acc[m]);
                acc[m] = _mm512_fmadd_ps(t1, s1, acc[m]);
            }
        } else { /* one group per lane (group 32) or per 2 or 4 lanes */
            const __m512 sv = _mm512_permutexvar_ps(idx0, _mm512_loadu_ps(s + (blk * 128 >> g_log2)));
            for (long m = 0; m < M; m++) {
                __m512 t0, t1;
                nibble_dot(v, X, m * I + blk * 128, &t0, &t1);
                acc[m] = _mm512_fmadd_ps(_mm512_add_ps(t0, t1), sv, acc[m]);
            }
        }
    }
    finish_row(W, X, r, M, s, b, acc, full * 128 / G, y);
}

typedef struct {
    __m512i lut_lo, lut_hi, idx0, idx1;
} nibble_consts;

static inline __attribute__((always_inline)) void nibble_one(const qweight *W, const qinput *X, long r,
                                                             const float *s, const float *b, const void *ctx,
                                                             float *y) {
    const nibble_consts *c = (const nibble_consts *)ctx;
#define ROW(k) nibble_row(W, X, r, k, s, b, c->lut_lo, c->lut_hi, c->idx0, c->idx1, y)
    FOR_EACH_M(ROW)
#undef ROW
}

static void rows_nibble(const qweight *W, const qinput *X, long r0, long r1, float *y) {
    nibble_consts c;
    nibble_tables(W->mode, &c.lut_lo, &c.lut_hi);
    int i0[16], i1[16];
    for (int k = 0; k < 16; k++) { /* float k of the scale vector: lane k / 4's group within the block */
        const int lane = k / 4;
        i0[k] = W->group == 16 ? 2 * lane : (int)(32 * lane / W->group);
        i1[k] = 2 * lane + 1;
    }
    c.idx0 = _mm512_loadu_si512(i0);
    c.idx1 = _mm512_loadu_si512(i1);
    each_row(W, X, r0, r1, nibble_one, &c, y);
}

/* 32 codes (MXFP8 E4M3 or affine 8-bit bytes) -> two vectors of their fp32 values */
static inline void byte_decode(int mode, const uint8_t *p, __m512 *w0, __m512 *w1) {
    if (mode == AFFINE) {
        *w0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)));
        *w1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + 16))));
        return;
    }
    /* E4M3 as fp16 bits: magnitude << 7 (exponent and mantissa land 2^8 lower, subnormals too), sign at bit 15 */
    const __m512i u = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)p));
    const __m512i h = _mm512_or_si512(_mm512_slli_epi16(_mm512_and_si512(u, _mm512_set1_epi16(0x7f)), 7),
                                      _mm512_slli_epi16(_mm512_and_si512(u, _mm512_set1_epi16(0x80)), 8));
    *w0 = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
    *w1 = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
}

static inline __attribute__((always_inline)) void byte_row(const qweight *W, const qinput *X, long r, long M,
                                                           const float *s, const float *b, float *y) {
    const long I = W->I, G = W->group, n = I / G;
    const int g_log2 = __builtin_ctzl((unsigned long)G);
    const uint8_t *row = W->w + r * I;
    __m512 acc[ROWS_MAX];
    for (long m = 0; m < M; m++) acc[m] = _mm512_setzero_ps();
    for (long c = 0; c < I / 32; c++) {
        __m512 w0, w1;
        if (!(c & 1)) prefetch_stream(row + c * 32); /* one per 64-byte line */
        byte_decode(W->mode, row + c * 32, &w0, &w1);
        const __m512 sv = _mm512_set1_ps(s[c * 32 >> g_log2]);
        for (long m = 0; m < M; m++) {
            const float *x = X->xf + m * I + c * 32;
            __m512 t = _mm512_mul_ps(w0, _mm512_loadu_ps(x));
            t = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + 16), t);
            acc[m] = _mm512_fmadd_ps(t, sv, acc[m]);
        }
    }
    const float unit = W->mode == MXFP8 ? 256.0f : 1.0f; /* the fp16 bits of E4M3 are 2^-8 of its value */
    if (W->mode == AFFINE) /* unit 1 */
        for (long m = 0; m < M; m++) acc[m] = _mm512_add_ps(acc[m], bias_dot(b, X->xsum + m * n, n));
    for (long m = 0; m < M; m++) y[m * W->O + r] = unit * _mm512_reduce_add_ps(acc[m]);
}

static inline __attribute__((always_inline)) void byte_one(const qweight *W, const qinput *X, long r,
                                                           const float *s, const float *b, const void *ctx, float *y) {
    (void)ctx;
#define ROW(k) byte_row(W, X, r, k, s, b, y)
    FOR_EACH_M(ROW)
#undef ROW
}

static void rows_byte(const qweight *W, const qinput *X, long r0, long r1, float *y) {
    each_row(W, X, r0, r1, byte_one, NULL, y);
}
#endif

#if QUANT_VBMI
/* the bf16 bits of each code's value, low and high bytes, as 64-byte quarters for vpermi2b: E4M3 magnitudes (7 bits;
 * the sign is the byte's top bit, as bf16's: e4m3_to_f32's values) and the affine codes 0-255 (integers), all exact
 * in bf16 */
static uint8_t fp8_lo[128], fp8_hi[128], int8_lo[256], int8_hi[256];

__attribute__((constructor)) static void fill_fp8_tables(void) {
    for (uint32_t c = 0; c < 256; c++) {
        const uint16_t e4m3 = f32_to_bf16(e4m3_to_f32(c & 0x7f)), code = f32_to_bf16((float)c);
        if (c < 128) fp8_lo[c] = (uint8_t)e4m3, fp8_hi[c] = (uint8_t)(e4m3 >> 8);
        int8_lo[c] = (uint8_t)code;
        int8_hi[c] = (uint8_t)(code >> 8);
    }
}

/* 64 codes -> their values as bf16 in two vectors (unpacked_slot's order); tables: MXFP8's four quarters, or affine's
 * eight (low bytes of codes 0-127, 128-255, then high bytes) */
static inline void fp8_decode(int mode, const uint8_t *p, const __m512i *tables, __m512i *v0, __m512i *v1) {
    const __m512i raw = _mm512_loadu_si512(p), low7 = _mm512_and_si512(raw, _mm512_set1_epi8(0x7f));
    __m512i lo, hi;
    if (mode == MXFP8) {
        lo = _mm512_permutex2var_epi8(tables[0], low7, tables[1]);
        hi = _mm512_or_si512(_mm512_permutex2var_epi8(tables[2], low7, tables[3]),
                             _mm512_and_si512(raw, _mm512_set1_epi8((char)0x80)));
    } else { /* codes 128-255 from the second half of each table */
        const __mmask64 upper = _mm512_movepi8_mask(raw);
        lo = _mm512_mask_blend_epi8(upper, _mm512_permutex2var_epi8(tables[0], low7, tables[1]),
                                    _mm512_permutex2var_epi8(tables[2], low7, tables[3]));
        hi = _mm512_mask_blend_epi8(upper, _mm512_permutex2var_epi8(tables[4], low7, tables[5]),
                                    _mm512_permutex2var_epi8(tables[6], low7, tables[7]));
    }
    *v0 = _mm512_unpacklo_epi8(lo, hi);
    *v1 = _mm512_unpackhi_epi8(lo, hi);
}

/* one row's products with M input rows on the fp8 path; M a constant where inlined. Lane i of a block's dot
 * products covers codes of group i / 8 for groups of 32 (two per block of 64), of one group for larger ones. */
static inline __attribute__((always_inline)) void fp8_row(const qweight *W, const qinput *X, long r, long M,
                                                          const float *s, const float *b, const __m512i *tables,
                                                          __m512i sidx, float *y) {
    const long I = W->I, G = W->group, full = I / 64;
    const int g_log2 = __builtin_ctzl((unsigned long)G);
    const uint8_t *row = W->w + r * I;
    __m512 acc[ROWS_MAX];
    for (long m = 0; m < M; m++) acc[m] = _mm512_setzero_ps();
    for (long blk = 0; blk < full; blk++) {
        __m512i v0, v1;
        prefetch_stream(row + blk * 64);
        fp8_decode(W->mode, row + blk * 64, tables, &v0, &v1);
        const __m512 sv = G == 32 ? _mm512_permutexvar_ps(sidx, _mm512_loadu_ps(s + blk * 2))
                                  : _mm512_set1_ps(s[blk * 64 >> g_log2]);
        for (long m = 0; m < M; m++) {
            const uint16_t *xh = X->xh + m * I + blk * 64;
            __m512 t = _mm512_dpbf16_ps(_mm512_setzero_ps(), as_bh(v0), as_bh(_mm512_loadu_si512(xh)));
            t = _mm512_dpbf16_ps(t, as_bh(v1), as_bh(_mm512_loadu_si512(xh + 32)));
            if (X->xl) {
                const uint16_t *xl = X->xl + m * I + blk * 64;
                t = _mm512_dpbf16_ps(t, as_bh(v0), as_bh(_mm512_loadu_si512(xl)));
                t = _mm512_dpbf16_ps(t, as_bh(v1), as_bh(_mm512_loadu_si512(xl + 32)));
            }
            acc[m] = _mm512_fmadd_ps(t, sv, acc[m]);
        }
    }
    finish_row(W, X, r, M, s, b, acc, full * 64 / G, y); /* a tail only for groups of 32 */
}

typedef struct {
    __m512i tables[8], sidx;
} fp8_consts;

static inline __attribute__((always_inline)) void fp8_one(const qweight *W, const qinput *X, long r,
                                                          const float *s, const float *b, const void *ctx, float *y) {
    const fp8_consts *c = (const fp8_consts *)ctx;
#define ROW(k) fp8_row(W, X, r, k, s, b, c->tables, c->sidx, y)
    FOR_EACH_M(ROW)
#undef ROW
}

static void rows_fp8(const qweight *W, const qinput *X, long r0, long r1, float *y) {
    fp8_consts c;
    const uint8_t *quarters[8] = {fp8_lo, fp8_lo + 64, fp8_hi, fp8_hi + 64, NULL, NULL, NULL, NULL};
    if (W->mode == AFFINE)
        for (int q = 0; q < 8; q++) quarters[q] = (q < 4 ? int8_lo : int8_hi) + 64 * (q % 4);
    for (int q = 0; q < 8; q++) c.tables[q] = quarters[q] ? _mm512_loadu_si512(quarters[q]) : _mm512_setzero_si512();
    c.sidx = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    each_row(W, X, r0, r1, fp8_one, &c, y);
}
#endif

qinput *quant_input(const qweight *W, long M, const float *x, int exact_bf16) {
    qinput *X = malloc(sizeof(qinput));
    if (!X) return NULL;
    if (prepare_input(W, M, x, exact_bf16, X)) {
        free(X);
        return NULL;
    }
    return X;
}

void quant_input_free(qinput *X) {
    if (!X) return;
    free_input(X);
    free(X);
}

/* y [M, O] fp32 (M <= ROWS_MAX) for output rows [r0, r1) */
void quant_rows(const qweight *W, const qinput *X, long r0, long r1, float *y) {
#if QUANT_AVX512
    if (nibble_path(W)) return rows_nibble(W, X, r0, r1, y);
#if QUANT_VBMI
    if (fp8_path(W) && X->xh) return rows_fp8(W, X, r0, r1, y);
#endif
    if (byte_path(W)) return rows_byte(W, X, r0, r1, y);
#endif
    rows_generic(W, X, r0, r1, y);
}

/* ---- exported ------------------------------------------------------------------------------------------------- */

#define ROWS_PER_ITEM 16

typedef struct {
    const qweight *W;
    const qinput *X;
    float *y;
} matmul_job;

static void matmul_item(const void *ctx, long item) {
    const matmul_job *job = (const matmul_job *)ctx;
    const long r0 = item * ROWS_PER_ITEM, r1 = r0 + ROWS_PER_ITEM < job->W->O ? r0 + ROWS_PER_ITEM : job->W->O;
    quant_rows(job->W, job->X, r0, r1, job->y);
}

/* y [M, O] = x [M, I] W^T, x and y in the model dtype (bf16 or fp32), W packed as `mode` (0 affine, 1 MXFP4,
 * 2 MXFP8, 3 NVFP4) with `bits` and `group`: w [O, I bits / 8] bytes, scales [O, I / group] (uint8, or the affine
 * dtype: scale_bf16), biases (affine) likewise. fp32 accumulation, one rounding. Output rows are shared among
 * `threads`. Returns 0, or 1 when scratch memory could not be allocated. */
int quant_matmul(int mode, int bits, long group, long O, long I, const void *w, const void *scales,
                 const void *biases, int scale_bf16, long M, const void *x, int bf16, void *y, int threads) {
    const qweight W = {mode, bits, group, O, I, (const uint8_t *)w, scales, biases, scale_bf16};
    float *buf = malloc(sizeof(float) * (size_t)(ROWS_MAX * (I + O)));
    if (!buf) return 1;
    float *xf = buf, *yf = buf + ROWS_MAX * I;
    const size_t esize = bf16 ? 2 : 4;
    for (long m0 = 0; m0 < M; m0 += ROWS_MAX) {
        const long rows = M - m0 < ROWS_MAX ? M - m0 : ROWS_MAX;
        load_row(xf, (const char *)x + (size_t)(m0 * I) * esize, rows * I, bf16);
        qinput X;
        if (prepare_input(&W, rows, xf, bf16, &X)) {
            free(buf);
            return 1;
        }
        const matmul_job job = {&W, &X, yf};
        parallel_for(matmul_item, &job, (O + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM, threads);
        store_row((char *)y + (size_t)(m0 * O) * esize, yf, rows * O, bf16);
        free_input(&X);
    }
    free(buf);
    return 0;
}

/* ---- MoE experts on a few rows -------------------------------------------------------------------------------- */

typedef struct {
    long hidden, I;
    int bf16, scale_bf16;
    const int *gate_up_spec, *down_spec; /* mode, bits, group */
    const int64_t *starts, *counts;      /* per work item (one expert): its first row in xs, its row count */
    const void *const *gate_up;          /* per item: weight, scales, biases of gate [I, hidden], then of up */
    const void *const *down;             /* per item: weight, scales, biases of down [hidden, I] */
    const void *xs;
    void *out;
    int failed;
} qexperts_job;

static void qexperts_item(const void *ctx, long item) {
    qexperts_job *job = (qexperts_job *)ctx;
    const long hidden = job->hidden, I = job->I;
    const size_t esize = job->bf16 ? 2 : 4;
    const int *gs = job->gate_up_spec, *ds = job->down_spec;
    const void *const *gu = job->gate_up + 6 * item, *const *dn = job->down + 3 * item;
    const qweight Wg = {gs[0], gs[1], gs[2], I, hidden, gu[0], gu[1], gu[2], job->scale_bf16};
    const qweight Wu = {gs[0], gs[1], gs[2], I, hidden, gu[3], gu[4], gu[5], job->scale_bf16};
    const qweight Wd = {ds[0], ds[1], ds[2], hidden, I, dn[0], dn[1], dn[2], job->scale_bf16};
    float *buf = malloc(sizeof(float) * (size_t)ROWS_MAX * (size_t)(hidden + 3 * I + hidden));
    if (!buf) {
        job->failed = 1;
        return;
    }
    float *x = buf, *gate = x + ROWS_MAX * hidden, *up = gate + ROWS_MAX * I, *h = up + ROWS_MAX * I;
    float *y = h + ROWS_MAX * I;
    const long first = job->starts[item], end = first + job->counts[item];
    for (long r0 = first; r0 < end; r0 += ROWS_MAX) {
        const long M = end - r0 < ROWS_MAX ? end - r0 : ROWS_MAX;
        load_row(x, (const char *)job->xs + (size_t)(r0 * hidden) * esize, M * hidden, job->bf16);
        qinput X;
        if (prepare_input(&Wg, M, x, job->bf16, &X)) {
            job->failed = 1;
            break;
        }
        quant_rows(&Wg, &X, 0, I, gate);
        quant_rows(&Wu, &X, 0, I, up);
        free_input(&X);
        for (long m = 0; m < M; m++)
            for (long j = 0; j < I; j++) { /* the product's output, silu's and the gated product each rounded */
                const float g = as_model_dtype(gate[m * I + j], job->bf16);
                const float u = as_model_dtype(up[m * I + j], job->bf16);
                h[m * I + j] = as_model_dtype(as_model_dtype(silu(g), job->bf16) * u, job->bf16);
            }
        if (prepare_input(&Wd, M, h, job->bf16, &X)) {
            job->failed = 1;
            break;
        }
        quant_rows(&Wd, &X, 0, hidden, y);
        free_input(&X);
        store_row((char *)job->out + (size_t)(r0 * hidden) * esize, y, M * hidden, job->bf16);
    }
    free(buf);
}

/* SwiGLU experts (moe.py StackedExperts.expert) with MLX-packed weights on a few rows each: for work item i, rows
 * starts[i] .. starts[i] + counts[i] of xs [rows, hidden] (model dtype) go through the expert whose gate and up
 * [I, hidden] and down [hidden, I] weights are gate_up[6i .. 6i + 2], gate_up[6i + 3 .. 6i + 5] and
 * down[3i .. 3i + 2] (weight, scales, biases; specs as quant_matmul's); out [rows, hidden] model dtype. Items are shared among threads.
 * Returns 0, or 1 when scratch memory could not be allocated. */
int quant_experts_rows(long items, long hidden, long I, int bf16, int scale_bf16, const int *gate_up_spec,
                       const int *down_spec, const int64_t *starts, const int64_t *counts,
                       const void *const *gate_up, const void *const *down, const void *xs, void *out, int threads) {
    qexperts_job job = {hidden, I, bf16, scale_bf16, gate_up_spec, down_spec, starts, counts, gate_up, down, xs, out, 0};
    parallel_for(qexperts_item, &job, items, threads);
    return job.failed;
}

/* ---- dequantization for many-row products --------------------------------------------------------------------- */

typedef struct {
    const qweight *W;
    void *out;
    int bf16;
} dequant_job;

#if QUANT_AVX512
/* dequant_item's rows on the byte path (MXFP8, affine 8-bit): 32 codes per step through byte_decode, multiplied and
 * added apart (no fused multiply-add: the same roundings as kimi_lm.quant's dequantize). The generic decode of E4M3
 * ran ~18x slower (18 vs 1 ms for 1024 x 2304 on one core), which made MXFP8 prefill 0.3x of bf16's. */
static void dequant_rows_byte(const qweight *W, long r0, long r1, void *out, int bf16) {
    const long I = W->I, G = W->group, n = I / G;
    float s[n + 1], b[n + 1], row[I];
    const __m512 unit = _mm512_set1_ps(W->mode == MXFP8 ? 256.0f : 1.0f); /* E4M3's fp16 bits are 2^-8 of it */
    for (long r = r0; r < r1; r++) {
        row_scales(W, r, s, b);
        for (long c = 0; c < I / 32; c++) {
            __m512 w0, w1;
            byte_decode(W->mode, W->w + r * I + c * 32, &w0, &w1);
            const long g = c * 32 / G;
            const __m512 sv = _mm512_set1_ps(s[g]);
            w0 = _mm512_mul_ps(_mm512_mul_ps(w0, unit), sv); /* ×256 exact, then the scale: one rounding */
            w1 = _mm512_mul_ps(_mm512_mul_ps(w1, unit), sv);
            if (W->mode == AFFINE) {
                const __m512 bv = _mm512_set1_ps(b[g]);
                w0 = _mm512_add_ps(w0, bv);
                w1 = _mm512_add_ps(w1, bv);
            }
            _mm512_storeu_ps(row + c * 32, w0);
            _mm512_storeu_ps(row + c * 32 + 16, w1);
        }
        store_row((char *)out + (size_t)(r * I) * (bf16 ? 2 : 4), row, I, bf16);
    }
}
#endif

static void dequant_item(const void *ctx, long item) {
    const dequant_job *job = (const dequant_job *)ctx;
    const qweight *W = job->W;
    const long I = W->I, G = W->group, n = I / G, row_bytes = I * W->bits / 8;
    const long r0 = item * ROWS_PER_ITEM, r1 = r0 + ROWS_PER_ITEM < W->O ? r0 + ROWS_PER_ITEM : W->O;
#if QUANT_AVX512
    if (byte_path(W) && G % 32 == 0) return dequant_rows_byte(W, r0, r1, job->out, job->bf16);
#endif
    float v[128], s[n + 1], b[n + 1], row[I];
    for (long r = r0; r < r1; r++) {
        row_scales(W, r, s, b);
        for (long g = 0; g < n; g++) {
            decode_group(W, W->w + r * row_bytes, g, v);
            const float sg = s[g], bg = W->mode == AFFINE ? b[g] : 0.0f;
#pragma omp simd
            for (long i = 0; i < G; i++) row[g * G + i] = v[i] * sg + bg;
        }
        store_row((char *)job->out + (size_t)(r * I) * (job->bf16 ? 2 : 4), row, I, job->bf16);
    }
}

/* W [O, I] in the model dtype (bf16 or fp32) from its packing (arguments as quant_matmul's): w = scale q + bias
 * (affine) or value scale, rounded once, as kimi_lm/quant's dequantize does. Rows are shared among threads. */
void quant_dequantize(int mode, int bits, long group, long O, long I, const void *w, const void *scales,
                      const void *biases, int scale_bf16, void *out, int bf16, int threads) {
    const qweight W = {mode, bits, group, O, I, (const uint8_t *)w, scales, biases, scale_bf16};
    const dequant_job job = {&W, out, bf16};
    parallel_for(dequant_item, &job, (O + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM, threads);
}
