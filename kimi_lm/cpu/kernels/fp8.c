/* Products with FP8 block weights read in place: float8 e4m3 codes Q [O, I] (one byte each) with one fp32 scale per
 * 128x128 block, S [ceil(O/128), ceil(I/128)] (DeepSeek-V3 / Kimi K2's `weight_scale_inv`; edge blocks partial),
 * W[r, i] = Q[r, i] S[r / 128, i / 128]. The plain path (kimi_lm/quant/fp8_block.py) dequantizes a tile of W per call
 * and multiplies it on BLAS; here a decode step's product (1-8 input rows) reads each code once, decodes it in
 * registers and multiplies it at once: 1 byte per weight streamed instead of bf16's 2 (plus the bf16 copy written
 * and read back by the plain path).
 *
 * Four paths, chosen at run time up to what the build has (every E4M3 value, subnormals included, decodes exactly):
 *   AVX-512 BF16 + VBMI: per 64 codes two byte lookups (vpermi2b: the low and high bytes of each magnitude's bf16
 *     value; E4M3 is exact in bf16), the sign, two unpacks, then vdpbf16ps with the input in bf16 (a bf16 model's
 *     input exactly; an fp32 input as three bf16 parts, within 2^-24), permuted once per call into the codes' order.
 *     7168 -> 2048 at one row: 1.07 ms vs 2.0 ms on the AVX-512 path below (one core, CPU time).
 *   AVX-512 (F, BW, VL + F16C): the code sign-extended to 16 bits and shifted left by 7 is, with bit 14 cleared, the
 *     fp16 bits of its value times 2^-8 (exponent bias 7 vs 15; subnormals map to subnormals); vcvtph2ps widens 16
 *     of them to fp32. Partial blocks (and the BF16 path's columns past a block's last whole 64) via masked loads.
 *   AVX2 (+ F16C, FMA): the same, 16 codes per step; the tail below 16 scalar.
 *   scalar: a 256-entry table of the codes' fp32 values, then an `omp simd` dot.
 * All sums are fp32: per 128-column block the codes' dot with the input, times the block's scale, summed over blocks
 * (the reference scales first: only the order of fp32 roundings differs). Inputs are the model dtype (bf16 or fp32);
 * outputs rounded once to the model dtype. Codes 0x7f / 0xff (NaN) never occur in checkpoints (quantizers clamp to
 * +-448); the fp16 paths read them as +-480.
 *
 * Exported (bound by kimi_lm/cpu/fp8.py): fp8_matmul (y = x W^T, output rows shared among threads), fp8_experts_rows
 * (SwiGLU experts with fp8 gate, up and down on a few rows each: a decode step's experts, or a dense MLP, in one
 * call, as moe_experts_rows does for oneDNN's packed weights), fp8_dequantize (W in the model dtype, bit-exact with
 * fp8_block.dequantize_rows: the many-row path dequantizes a tile in C, then BLAS), fp8_limit_path / fp8_path (tests).
 *
 * Reference: OCP 8-bit Floating Point Specification (OFP8) v1.0 (E4M3); DeepSeek-V3 inference/kernel.py
 * (weight_dequant); Intel intrinsics guide (vpermi2b, vdpbf16ps, vpmovsxbw, vcvtph2ps).
 */
#include "common.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__F16C__)
#include <immintrin.h>
#define FP8_HAVE_AVX512 1
#else
#define FP8_HAVE_AVX512 0
#endif
#if FP8_HAVE_AVX512 && defined(__AVX512BF16__) && defined(__AVX512VBMI__)
#define FP8_HAVE_BF16 1
#else
#define FP8_HAVE_BF16 0
#endif
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#define FP8_HAVE_AVX2 1
#else
#define FP8_HAVE_AVX2 0
#endif

#define FP8_BLOCK 128
#define FP8_ROWS_PER_ITEM 16 /* output rows per work item of fp8_matmul / fp8_dequantize */

enum { FP8_SCALAR = 0, FP8_AVX2 = 1, FP8_AVX512 = 2, FP8_BF16 = 3 };
static int fp8_limit = FP8_BF16;

/* the best path this build has, no better than `fp8_limit` */
int fp8_path(void) {
    if (FP8_HAVE_BF16 && fp8_limit >= FP8_BF16) return FP8_BF16;
    if (FP8_HAVE_AVX512 && fp8_limit >= FP8_AVX512) return FP8_AVX512;
    if (FP8_HAVE_AVX2 && fp8_limit >= FP8_AVX2) return FP8_AVX2;
    return FP8_SCALAR;
}

/* tests: run the paths below the best one on a CPU that has it */
void fp8_limit_path(int level) { fp8_limit = level; }

static float fp8_table[256]; /* each code's fp32 value (E4M3, no infinities; 0x7f / 0xff NaN) */
static uint8_t fp8_bf16_lo[128], fp8_bf16_hi[128]; /* the bf16 bits of each magnitude's value (all exact in bf16) */

__attribute__((constructor)) static void fp8_fill_table(void) {
    for (int b = 0; b < 256; b++) {
        const int e = (b >> 3) & 15, m = b & 7;
        float v = e ? ldexpf(1.0f + (float)m / 8.0f, e - 7) : ldexpf((float)m / 8.0f, -6);
        if ((b & 0x7f) == 0x7f) v = NAN;
        fp8_table[b] = b & 0x80 ? -v : v;
        if (b < 128) {
            const uint16_t h = f32_to_bf16(v);
            fp8_bf16_lo[b] = (uint8_t)h;
            fp8_bf16_hi[b] = (uint8_t)(h >> 8);
        }
    }
}

/* one fp8 block-quantized matrix: rows [O, I] of codes, scales [ceil(O/128), cb] (row block r / 128) */
typedef struct {
    const uint8_t *q;
    const float *s;
    long O, I, cb;
} fp8w;

static fp8w fp8_matrix(const void *q, const void *s, long O, long I) {
    return (fp8w){(const uint8_t *)q, (const float *)s, O, I, (I + FP8_BLOCK - 1) / FP8_BLOCK};
}

/* M <= ROWS_MAX input rows, prepared once per call: fp32, and for the bf16 path `parts` bf16 vectors whose sum is x
 * (1 when x holds bf16 values, else 3: hi, mid, lo, within 2^-24 of x), each full 64-column chunk permuted into the
 * order the path's decoded codes come in (unpacked_slot) */
typedef struct {
    long M, parts;
    const float *x;   /* [M, I] */
    uint16_t *xp;     /* [parts][M, I], or NULL (other paths) */
} fp8in;


static long fp8_input_size(long M, long I) { return FP8_HAVE_BF16 && fp8_path() == FP8_BF16 ? 3 * M * I : 0; }

/* X for x [M, I] fp32 (exact_bf16: its values are bf16's); xp: fp8_input_size(M, I) uint16 of scratch */
static fp8in fp8_input(long M, long I, const float *x, int exact_bf16, uint16_t *xp) {
    fp8in X = {M, exact_bf16 ? 1 : 3, x, NULL};
    if (!fp8_input_size(M, I)) return X;
    X.xp = xp;
    for (long m = 0; m < M; m++)
        for (long c0 = 0; c0 + 64 <= I; c0 += 64)
            for (long j = 0; j < 64; j++) {
                float v = x[m * I + c0 + j];
                for (long p = 0; p < X.parts; p++) { /* each part the rounding of what the ones before left */
                    const uint16_t h = f32_to_bf16(v);
                    xp[(p * M + m) * I + c0 + unpacked_slot(j)] = h;
                    v -= bf16_to_f32(h);
                }
            }
    return X;
}

/* ---- scalar ------------------------------------------------------------------------------------------------------ */

/* y[m O + r] for rows [r0, r1) and M input rows x [M, I] fp32 */
static void rows_scalar(const fp8w *W, long M, const float *x, long r0, long r1, float *y) {
    const long I = W->I;
    float v[FP8_BLOCK];
    for (long r = r0; r < r1; r++) {
        const uint8_t *q = W->q + r * I;
        const float *s = W->s + (r / FP8_BLOCK) * W->cb;
        float acc[ROWS_MAX] = {0};
        for (long c = 0; c < W->cb; c++) {
            const long c0 = c * FP8_BLOCK, n = I - c0 < FP8_BLOCK ? I - c0 : FP8_BLOCK;
            for (long i = 0; i < n; i++) v[i] = fp8_table[q[c0 + i]];
            for (long m = 0; m < M; m++) {
                const float *xm = x + m * I + c0;
                float d = 0.0f;
#pragma omp simd reduction(+ : d)
                for (long i = 0; i < n; i++) d += v[i] * xm[i];
                acc[m] += s[c] * d;
            }
        }
        for (long m = 0; m < M; m++) y[m * W->O + r] = acc[m];
    }
}

/* ---- AVX2 -------------------------------------------------------------------------------------------------------- */
#if FP8_HAVE_AVX2

/* 16 codes -> two vectors of their values times 2^-8 */
static inline void decode16(const uint8_t *p, __m256 *w0, __m256 *w1) {
    const __m256i u = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p)); /* see decode32 */
    const __m256i h = _mm256_and_si256(_mm256_slli_epi16(u, 7), _mm256_set1_epi16((short)0xbfff));
    *w0 = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
    *w1 = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
}

static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* one output row with M input rows; M a constant where inlined */
static inline __attribute__((always_inline)) void row_avx2(const fp8w *W, long r, long M, const float *x, float *y) {
    const long I = W->I;
    const uint8_t *q = W->q + r * I;
    const float *s = W->s + (r / FP8_BLOCK) * W->cb;
    __m256 acc[ROWS_MAX];
    float tail[ROWS_MAX];
    for (long m = 0; m < M; m++) acc[m] = _mm256_setzero_ps(), tail[m] = 0.0f;
    for (long c = 0; c < W->cb; c++) {
        const long c0 = c * FP8_BLOCK, n = I - c0 < FP8_BLOCK ? I - c0 : FP8_BLOCK;
        __m256 ta[ROWS_MAX], tb[ROWS_MAX];
        for (long m = 0; m < M; m++) ta[m] = tb[m] = _mm256_setzero_ps();
        long j = 0;
        for (; j + 16 <= n; j += 16) {
            __m256 w0, w1;
            decode16(q + c0 + j, &w0, &w1);
            for (long m = 0; m < M; m++) {
                const float *xm = x + m * I + c0 + j;
                ta[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xm), ta[m]);
                tb[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xm + 8), tb[m]);
            }
        }
        const __m256 sv = _mm256_set1_ps(s[c]);
        for (long m = 0; m < M; m++) {
            acc[m] = _mm256_fmadd_ps(_mm256_add_ps(ta[m], tb[m]), sv, acc[m]);
            float d = 0.0f; /* the last few columns of a partial block */
            for (long i = j; i < n; i++) d += fp8_table[q[c0 + i]] * x[m * I + c0 + i];
            tail[m] += s[c] * d;
        }
    }
    for (long m = 0; m < M; m++) y[m * W->O + r] = 256.0f * hsum256(acc[m]) + tail[m];
}

static void rows_avx2(const fp8w *W, long M, const float *x, long r0, long r1, float *y) {
    for (long r = r0; r < r1; r++) switch (M) {
#define CASE(k) case k: row_avx2(W, r, k, x, y); break;
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
        }
}
#endif

/* ---- AVX-512 ----------------------------------------------------------------------------------------------------- */
#if FP8_HAVE_AVX512

/* 32 codes -> two vectors of their values times 2^-8 (a masked load: codes past the mask read as 0) */
static inline void decode32(const uint8_t *p, __mmask32 k, __m512 *w0, __m512 *w1) {
    /* sign-extended to 16 bits, the code's bit 7 fills bits 7-15: shifted left by 7, the magnitude lands in bits
     * 7-13 and the sign in 14 and 15; clearing bit 14 leaves the fp16 bits (3 operations instead of 6) */
    const __m512i u = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(k, p));
    const __m512i h = _mm512_and_si512(_mm512_slli_epi16(u, 7), _mm512_set1_epi16((short)0xbfff));
    *w0 = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
    *w1 = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
}

/* one output row with M input rows; M a constant where inlined. Two partial sums per input row per block (w0's and
 * w1's) halve the chain of dependent multiply-adds a one-row product would wait on. */
static inline __attribute__((always_inline)) void row_avx512(const fp8w *W, long r, long M, const float *x, float *y) {
    const long I = W->I;
    const uint8_t *q = W->q + r * I;
    const float *s = W->s + (r / FP8_BLOCK) * W->cb;
    __m512 acc[ROWS_MAX];
    for (long m = 0; m < M; m++) acc[m] = _mm512_setzero_ps();
    for (long c = 0; c < W->cb; c++) {
        const long c0 = c * FP8_BLOCK, n = I - c0 < FP8_BLOCK ? I - c0 : FP8_BLOCK;
        __m512 ta[ROWS_MAX], tb[ROWS_MAX];
        for (long m = 0; m < M; m++) ta[m] = tb[m] = _mm512_setzero_ps();
        if (n == FP8_BLOCK) { /* a whole block: a constant trip count, unrolled */
            for (long j = 0; j < FP8_BLOCK; j += 32) {
                __m512 w0, w1;
                if (!(j & 32)) prefetch_stream(q + c0 + j); /* one per 64-byte line */
                decode32(q + c0 + j, 0xffffffffu, &w0, &w1);
                for (long m = 0; m < M; m++) {
                    const float *xm = x + m * I + c0 + j;
                    ta[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xm), ta[m]);
                    tb[m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xm + 16), tb[m]);
                }
            }
        } else { /* the partial last block column */
            for (long j = 0; j < n; j += 32) {
                const long left = n - j < 32 ? n - j : 32;
                const __mmask32 k = left == 32 ? 0xffffffffu : (__mmask32)((1u << left) - 1);
                __m512 w0, w1;
                decode32(q + c0 + j, k, &w0, &w1);
                for (long m = 0; m < M; m++) {
                    const float *xm = x + m * I + c0 + j;
                    ta[m] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps((__mmask16)k, xm), ta[m]);
                    tb[m] = _mm512_fmadd_ps(w1, _mm512_maskz_loadu_ps((__mmask16)(k >> 16), xm + 16), tb[m]);
                }
            }
        }
        const __m512 sv = _mm512_set1_ps(s[c]);
        for (long m = 0; m < M; m++) acc[m] = _mm512_fmadd_ps(_mm512_add_ps(ta[m], tb[m]), sv, acc[m]);
    }
    for (long m = 0; m < M; m++) y[m * W->O + r] = 256.0f * _mm512_reduce_add_ps(acc[m]);
}

static void rows_avx512(const fp8w *W, long M, const float *x, long r0, long r1, float *y) {
    for (long r = r0; r < r1; r++) switch (M) {
#define CASE(k) case k: row_avx512(W, r, k, x, y); break;
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
        }
}
#endif

/* ---- AVX-512 BF16 + VBMI ---------------------------------------------------------------------------------------- */
#if FP8_HAVE_BF16

/* one output row with M input rows of P bf16 parts each; M, P constants where inlined. Per 64 codes: two byte
 * lookups (vpermi2b, 128-entry tables: the low and the high byte of each magnitude's bf16 value), the sign, two
 * unpacks, then one vdpbf16ps per 32 weights and part: a third of the AVX-512 path's operations. Columns of a
 * partial block past its last whole 64 take the AVX-512 path's masked loads. */
static inline __attribute__((always_inline)) void row_bf16(const fp8w *W, const fp8in *X, long r, long M, long P,
                                                           const __m512i *lut, float *y) {
    const long I = W->I;
    const uint8_t *q = W->q + r * I;
    const float *s = W->s + (r / FP8_BLOCK) * W->cb;
    const __m512i sign = _mm512_set1_epi8((char)0x80);
    __m512 acc[ROWS_MAX], acc16[ROWS_MAX]; /* acc16: the masked path's sums, in its 2^-8 units */
    for (long m = 0; m < M; m++) acc[m] = acc16[m] = _mm512_setzero_ps();
    for (long c = 0; c < W->cb; c++) {
        const long c0 = c * FP8_BLOCK, n = I - c0 < FP8_BLOCK ? I - c0 : FP8_BLOCK, whole = n / 64 * 64;
        const __m512 sv = _mm512_set1_ps(s[c]);
        __m512 ta[ROWS_MAX], tb[ROWS_MAX];
        for (long m = 0; m < M; m++) ta[m] = tb[m] = _mm512_setzero_ps();
        for (long j = 0; j < whole; j += 64) {
            prefetch_stream(q + c0 + j);
            const __m512i raw = _mm512_loadu_si512(q + c0 + j);
            const __m512i lo = _mm512_permutex2var_epi8(lut[0], raw, lut[1]);
            const __m512i hi = _mm512_ternarylogic_epi32(_mm512_permutex2var_epi8(lut[2], raw, lut[3]), raw, sign,
                                                         0xf8); /* hi | (raw & 0x80) */
            const __m512bh wa = (__m512bh)_mm512_unpacklo_epi8(lo, hi), wb = (__m512bh)_mm512_unpackhi_epi8(lo, hi);
            for (long m = 0; m < M; m++)
                for (long p = 0; p < P; p++) {
                    const uint16_t *xp = X->xp + (p * M + m) * I + c0 + j;
                    ta[m] = _mm512_dpbf16_ps(ta[m], wa, (__m512bh)_mm512_loadu_si512(xp));
                    tb[m] = _mm512_dpbf16_ps(tb[m], wb, (__m512bh)_mm512_loadu_si512(xp + 32));
                }
        }
        for (long m = 0; m < M; m++) acc[m] = _mm512_fmadd_ps(_mm512_add_ps(ta[m], tb[m]), sv, acc[m]);
        if (whole == n) continue;
        for (long m = 0; m < M; m++) ta[m] = tb[m] = _mm512_setzero_ps();
        for (long j = whole; j < n; j += 32) {
            const long left = n - j < 32 ? n - j : 32;
            const __mmask32 k = left == 32 ? 0xffffffffu : (__mmask32)((1u << left) - 1);
            __m512 w0, w1;
            decode32(q + c0 + j, k, &w0, &w1);
            for (long m = 0; m < M; m++) {
                const float *xm = X->x + m * I + c0 + j;
                ta[m] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps((__mmask16)k, xm), ta[m]);
                tb[m] = _mm512_fmadd_ps(w1, _mm512_maskz_loadu_ps((__mmask16)(k >> 16), xm + 16), tb[m]);
            }
        }
        for (long m = 0; m < M; m++) acc16[m] = _mm512_fmadd_ps(_mm512_add_ps(ta[m], tb[m]), sv, acc16[m]);
    }
    for (long m = 0; m < M; m++)
        y[m * W->O + r] = _mm512_reduce_add_ps(acc[m]) + 256.0f * _mm512_reduce_add_ps(acc16[m]);
}

static void rows_bf16(const fp8w *W, const fp8in *X, long r0, long r1, float *y) {
    const __m512i lut[4] = {_mm512_loadu_si512(fp8_bf16_lo), _mm512_loadu_si512(fp8_bf16_lo + 64),
                            _mm512_loadu_si512(fp8_bf16_hi), _mm512_loadu_si512(fp8_bf16_hi + 64)};
    for (long r = r0; r < r1; r++) switch (X->M * 4 + X->parts) {
#define CASE(k)                                                                                                        \
    case 4 * k + 1: row_bf16(W, X, r, k, 1, lut, y); break;                                                            \
    case 4 * k + 3: row_bf16(W, X, r, k, 3, lut, y); break;
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
        }
}
#endif

/* y [M, O] fp32 (rows [r0, r1) filled) = x [M, I] fp32 (M <= ROWS_MAX) times W^T, on the best path allowed */
static void fp8_rows(const fp8w *W, const fp8in *X, long r0, long r1, float *y) {
    const int path = fp8_path();
    const long M = X->M;
    const float *x = X->x;
#if FP8_HAVE_BF16
    if (path == FP8_BF16 && X->xp) return rows_bf16(W, X, r0, r1, y);
#endif
#if FP8_HAVE_AVX512
    if (path >= FP8_AVX512) return rows_avx512(W, M, x, r0, r1, y);
#endif
#if FP8_HAVE_AVX2
    if (path == FP8_AVX2) return rows_avx2(W, M, x, r0, r1, y);
#endif
    (void)path;
    rows_scalar(W, M, x, r0, r1, y);
}

/* ---- one input prepared for moe_decode_rows' parts (common.h) -------------------------------------------------- */

struct fp8_prepared {
    fp8in X;
    uint16_t xp[]; /* fp8_input_size(M, I) */
};

fp8_prepared *fp8_prepare(long M, long I, const float *x, int exact_bf16) {
    fp8_prepared *in = malloc(sizeof(fp8_prepared) + sizeof(uint16_t) * (size_t)fp8_input_size(M, I));
    if (in) in->X = fp8_input(M, I, x, exact_bf16, in->xp);
    return in;
}

void fp8_prepared_free(fp8_prepared *X) { free(X); }

void fp8_weight_rows(const fp8_weight *W, const fp8_prepared *X, long r0, long r1, float *y) {
    const fp8w matrix = fp8_matrix(W->q, W->s, W->O, W->I);
    fp8_rows(&matrix, &X->X, r0, r1, y);
}

/* ---- exported: products ------------------------------------------------------------------------------------------ */

typedef struct {
    fp8w W;
    const fp8in *X;
    float *y;
} fp8_matmul_job;

static void fp8_matmul_item(const void *ctx, long item) {
    const fp8_matmul_job *job = (const fp8_matmul_job *)ctx;
    const long r0 = item * FP8_ROWS_PER_ITEM;
    const long r1 = r0 + FP8_ROWS_PER_ITEM < job->W.O ? r0 + FP8_ROWS_PER_ITEM : job->W.O;
    fp8_rows(&job->W, job->X, r0, r1, job->y);
}

/* y [M, O] = x [M, I] W^T, W = Q [O, I] e4m3 times S [ceil(O/128), ceil(I/128)] fp32; x and y in the model dtype
 * (bf16: bfloat16, else float32); any M (8 rows per pass over W); output rows shared among `threads`.
 * Returns 0, or 1 when scratch memory could not be allocated. */
int fp8_matmul(long O, long I, const void *q, const void *s, long M, const void *x, int bf16, void *y, int threads) {
    const long P = M < ROWS_MAX ? M : ROWS_MAX;
    float *buf = malloc(sizeof(float) * (size_t)(P * (I + O)) + sizeof(uint16_t) * (size_t)fp8_input_size(P, I));
    if (!buf) return 1;
    float *xf = buf, *yf = buf + P * I;
    const size_t esize = bf16 ? 2 : 4;
    for (long m0 = 0; m0 < M; m0 += ROWS_MAX) {
        const long n = M - m0 < ROWS_MAX ? M - m0 : ROWS_MAX;
        load_row(xf, (const char *)x + (size_t)(m0 * I) * esize, n * I, bf16);
        const fp8in X = fp8_input(n, I, xf, bf16, (uint16_t *)(yf + P * O));
        const fp8_matmul_job job = {fp8_matrix(q, s, O, I), &X, yf};
        parallel_for(fp8_matmul_item, &job, (O + FP8_ROWS_PER_ITEM - 1) / FP8_ROWS_PER_ITEM, threads);
        store_row((char *)y + (size_t)(m0 * O) * esize, yf, n * O, bf16);
    }
    free(buf);
    return 0;
}

typedef struct {
    long hidden, I;
    int bf16;
    const int64_t *starts, *counts;
    const void *const *parts; /* per item: (codes, scales) of gate [I, hidden], up [I, hidden], down [hidden, I] */
    const void *xs;
    void *out;
    int failed;
} fp8_experts_job;

static void fp8_experts_item(const void *ctx, long item) {
    fp8_experts_job *job = (fp8_experts_job *)ctx;
    const long hidden = job->hidden, I = job->I;
    const size_t esize = job->bf16 ? 2 : 4;
    const void *const *p = job->parts + 6 * item;
    const fp8w gate = fp8_matrix(p[0], p[1], I, hidden), up = fp8_matrix(p[2], p[3], I, hidden);
    const fp8w down = fp8_matrix(p[4], p[5], hidden, I);
    const long wide = hidden > I ? hidden : I;
    float *buf = malloc(sizeof(float) * (size_t)ROWS_MAX * (size_t)(2 * hidden + 3 * I) +
                        sizeof(uint16_t) * (size_t)fp8_input_size(ROWS_MAX, wide));
    if (!buf) {
        job->failed = 1;
        return;
    }
    float *x = buf, *g = x + ROWS_MAX * hidden, *u = g + ROWS_MAX * I, *h = u + ROWS_MAX * I, *y = h + ROWS_MAX * I;
    uint16_t *xp = (uint16_t *)(y + ROWS_MAX * hidden);
    const long first = job->starts[item], end = first + job->counts[item];
    for (long r0 = first; r0 < end; r0 += ROWS_MAX) { /* up to 8 rows per pass over the expert's weights */
        const long M = end - r0 < ROWS_MAX ? end - r0 : ROWS_MAX;
        load_row(x, (const char *)job->xs + (size_t)(r0 * hidden) * esize, M * hidden, job->bf16);
        const fp8in X = fp8_input(M, hidden, x, job->bf16, xp);
        fp8_rows(&gate, &X, 0, I, g);
        fp8_rows(&up, &X, 0, I, u);
        for (long j = 0; j < M * I; j++) { /* the products' outputs, silu's and the gated product each rounded */
            const float gj = as_model_dtype(g[j], job->bf16), uj = as_model_dtype(u[j], job->bf16);
            h[j] = as_model_dtype(as_model_dtype(silu(gj), job->bf16) * uj, job->bf16);
        }
        const fp8in H = fp8_input(M, I, h, job->bf16, xp);
        fp8_rows(&down, &H, 0, hidden, y);
        store_row((char *)job->out + (size_t)(r0 * hidden) * esize, y, M * hidden, job->bf16);
    }
    free(buf);
}

/* SwiGLU experts (kimi_lm/model/moe.py StackedExperts.expert, or one dense MLP) with fp8 block weights, on a few rows
 * each: work item i takes rows starts[i] .. starts[i] + counts[i] of xs [rows, hidden] (model dtype) through the
 * expert whose codes and scales are parts[6i .. 6i + 5]: gate [I, hidden], up [I, hidden], down [hidden, I], each
 * (codes, scales) on its own block grid (a stacked gate|up: up's codes I rows on, its scales ceil(I/128) block rows
 * on); out [rows, hidden] model dtype. Items shared among threads. Returns 0, or 1 when scratch memory could not be
 * allocated. */
int fp8_experts_rows(long items, long hidden, long I, int bf16, const int64_t *starts, const int64_t *counts,
                     const void *const *parts, const void *xs, void *out, int threads) {
    fp8_experts_job job = {hidden, I, bf16, starts, counts, parts, xs, out, 0};
    parallel_for(fp8_experts_item, &job, items, threads);
    return job.failed;
}

/* ---- exported: dequantization ------------------------------------------------------------------------------------ */

typedef struct {
    fp8w W;
    int bf16;
    void *out;
} fp8_dequantize_job;

/* one row's fp32 values Q[r, i] S[r / 128, i / 128]: one rounding of the exact product, as torch's q.float() * s */
static void dequantize_row(const fp8w *W, long r, float *v) {
    const long I = W->I;
    const uint8_t *q = W->q + r * I;
    const float *s = W->s + (r / FP8_BLOCK) * W->cb;
    long i = 0;
#if FP8_HAVE_AVX512
    if (fp8_path() >= FP8_AVX512)
        for (; i + 32 <= I; i += 32) { /* 32 columns never straddle a block: both are multiples of 32 */
            __m512 w0, w1;
            decode32(q + i, 0xffffffffu, &w0, &w1);
            const __m512 sv = _mm512_set1_ps(256.0f * s[i / FP8_BLOCK]); /* the decoded 2^-8 back, exactly */
            _mm512_storeu_ps(v + i, _mm512_mul_ps(w0, sv));
            _mm512_storeu_ps(v + i + 16, _mm512_mul_ps(w1, sv));
        }
#endif
#if FP8_HAVE_AVX2
    if (fp8_path() == FP8_AVX2)
        for (; i + 16 <= I; i += 16) {
            __m256 w0, w1;
            decode16(q + i, &w0, &w1);
            const __m256 sv = _mm256_set1_ps(256.0f * s[i / FP8_BLOCK]);
            _mm256_storeu_ps(v + i, _mm256_mul_ps(w0, sv));
            _mm256_storeu_ps(v + i + 8, _mm256_mul_ps(w1, sv));
        }
#endif
    for (; i < I; i++) v[i] = fp8_table[q[i]] * s[i / FP8_BLOCK];
}

static void fp8_dequantize_item(const void *ctx, long item) {
    const fp8_dequantize_job *job = (const fp8_dequantize_job *)ctx;
    const long I = job->W.I, r0 = item * FP8_ROWS_PER_ITEM;
    const long r1 = r0 + FP8_ROWS_PER_ITEM < job->W.O ? r0 + FP8_ROWS_PER_ITEM : job->W.O;
    const size_t esize = job->bf16 ? 2 : 4;
    for (long r = r0; r < r1; r++) {
        char *dst = (char *)job->out + (size_t)(r * I) * esize;
        if (job->bf16) {
            float v[FP8_BLOCK];
            for (long c0 = 0; c0 < I; c0 += FP8_BLOCK) { /* a block at a time through a buffer in L1 */
                const long n = I - c0 < FP8_BLOCK ? I - c0 : FP8_BLOCK;
                const fp8w part = {job->W.q + r * I + c0, job->W.s + (r / FP8_BLOCK) * job->W.cb + c0 / FP8_BLOCK,
                                   1, n, 1};
                dequantize_row(&part, 0, v);
                store_row(dst + (size_t)c0 * esize, v, n, 1);
            }
        } else {
            dequantize_row(&job->W, r, (float *)dst);
        }
    }
}

/* out [O, I] = Q S in the model dtype (bf16: bfloat16 rounded to nearest even, else float32), rows shared among
 * `threads`: what kimi_lm/quant/fp8_block.py dequantize_rows gives, bit for bit. The rows of Q must start a block. */
void fp8_dequantize(long O, long I, const void *q, const void *s, int bf16, void *out, int threads) {
    const fp8_dequantize_job job = {fp8_matrix(q, s, O, I), bf16, out};
    parallel_for(fp8_dequantize_item, &job, (O + FP8_ROWS_PER_ITEM - 1) / FP8_ROWS_PER_ITEM, threads);
}
