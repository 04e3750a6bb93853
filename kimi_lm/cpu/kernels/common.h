/* CPU kernels in plain C for kimi_lm (built into one shared library and bound by kimi_lm/cpu/native.py).
 *
 * Decode: in a CPU decode step the products stream weights at memory bandwidth, and the ~40 small tensor ops between
 * them (conv, norms, gates, the delta rule) each cost 5-15 us of dispatch in place, more than their arithmetic.
 * One C call does the same math in fp32, in the same order of roundings as the PyTorch path it replaces
 * (kimi_lm/model/kda.py, KimiDeltaAttention._decode, which stays as the reference and the fallback); only the
 * order of fp32 summations differs. The same for the MoE glue and one-row products of packed weights.
 *
 * Prefill: the KDA recurrence as a scan over value-column slices of the state (kda_scan), what surrounds it, RMSNorm,
 * SwiGLU and the MoE routing/grouping/combining for many tokens, each split over PyTorch's OpenMP threads
 * (parallel_for).
 *
 * Built with the system C compiler (-O3 -march=native -fopenmp-simd -fno-trapping-math: SIMD pragmas only, no OpenMP
 * runtime linked) and called through ctypes. Tensors arrive as raw pointers to contiguous memory; `bf16` says whether
 * the model-dtype tensors hold bfloat16 (else float32).
 *
 * The files, one concern each (all compiled together into the one library):
 *   common.h   this header: model-dtype loads and stores, the vector math (exp, log, sigmoid, SiLU, softplus),
 *              and what the files share (the packed products, parallel_for, work-item sizes)
 *   threads.c  parallel_for on PyTorch's OpenMP team or on pthreads (use_openmp)
 *   gemv.c     products of packed weights (oneDNN's, or MLX's via quant.c): product_f32, product_rows_f32,
 *              fused_products (several weights reading the same input, in one call; one weight: PackedGemv)
 *   quant.c    products of MLX-quantized weights read in their packed bytes
 *   mla.c      Multi-head Latent Attention: one absorbed decode token per sequence (mla_decode)
 *   kda.c      Kimi Delta Attention: kda_decode, kda_scan, kda_prefill_inputs, gated_rms_norm
 *   moe.c      mixture of experts: routers, SwiGLU, weighted sums, dispatch, combine, experts on a few rows,
 *              a decode step's whole block (moe_decode_rows)
 *   layer.c    a KDA decoder layer's decode step (one sequence or a few), the kernels above in one call
 *   rope.c     rotary position embedding of a decode step's queries and keys (Kimi K2's MLA)
 *   norm.c     rms_norm over many rows
 *   math.c     elementwise: the vector math below, exported for the tests
 * Only the functions the ctypes bindings call are exported; what one file lends another is INTERNAL (hidden).
 *
 * Reference math: spec shared/specs/kimi_linear.md sections 5-6; fla v0.4.0 fla/layers/kda.py and
 * fla/ops/kda/naive.py; DeepSeek-V3 inference/model.py (Gate); Cephes (expf, logf).
 */
#ifndef KIMI_LM_KERNELS_COMMON_H
#define KIMI_LM_KERNELS_COMMON_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* shared among the files of the library, not exported from it */
#define INTERNAL __attribute__((visibility("hidden")))

/* ---- the model dtype: bfloat16 or float32 ----------------------------------------------------------------------- */

static inline float bits_to_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float bf16_to_f32(uint16_t h) { return bits_to_f32((uint32_t)h << 16); }

/* round to nearest even, as torch's float -> bfloat16 conversion does; NaN stays NaN */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* A decode step's packed products stream each weight once, and the hardware prefetchers alone left the loads waiting
 * on memory (a 4-bit product's first load of each 64 bytes took a fifth of its time): the line this far ahead of
 * the one about to be read is asked for in software. Rows are contiguous and each thread reads one range of them
 * (threads.c), so ahead is the same thread's next data. Measured on 2 threads, weights streamed from DRAM,
 * 32768 x 2304 MXFP4 / affine 4-bit and 16384 x 2304 MXFP8 / affine 8-bit / FP8 blocks (us, distance 0 / 2 / 4 /
 * 6 / 8 KiB): 4-bit 954 / - / 783 / 760 / 786, 1022 / - / 839 / 814 / 817; 8-bit 975 / 864 / 808 / - / 789,
 * 1030 / 900 / 851 / - / 831, 923 / 824 / 769 / - / 755. A prefetch never faults: past the end is harmless. */
#define STREAM_PREFETCH_BYTES 6144

static inline void prefetch_stream(const void *at) {
    __builtin_prefetch((const char *)at + STREAM_PREFETCH_BYTES, 0, 3);
}

/* n values of the model dtype -> fp32 */
static inline void load_row(float *dst, const void *src, long n, int bf16) {
    if (bf16) {
        const uint16_t *s = (const uint16_t *)src;
#pragma omp simd
        for (long i = 0; i < n; i++) dst[i] = bf16_to_f32(s[i]);
    } else {
        memcpy(dst, src, (size_t)n * sizeof(float));
    }
}

/* n fp32 values -> the model dtype */
static inline void store_row(void *dst, const float *src, long n, int bf16) {
    if (bf16) {
        uint16_t *d = (uint16_t *)dst;
#pragma omp simd
        for (long i = 0; i < n; i++) d[i] = f32_to_bf16(src[i]);
    } else {
        memcpy(dst, src, (size_t)n * sizeof(float));
    }
}

/* element i of a model-dtype array, as fp32 / stored into one */
static inline float load_one(const void *p, long i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store_one(void *p, long i, float v, int bf16) {
    if (bf16)
        ((uint16_t *)p)[i] = f32_to_bf16(v);
    else
        ((float *)p)[i] = v;
}

/* what the model dtype would hold: the rounding a product's output gets before the next op reads it */
static inline float as_model_dtype(float x, int bf16) { return bf16 ? bf16_to_f32(f32_to_bf16(x)) : x; }

/* ---- vector math ------------------------------------------------------------------------------------------------ */

/* exp and log that vectorise. libm's expf/log1pf are scalar calls inside `omp simd` loops (GCC vectorises them only
 * under -ffast-math), and a prefill spends millions of them: the conv's SiLU, the gates and sigmoids measured 7 ms per
 * KDA layer at 1024 tokens with libm, 1 ms with these. Both are the Cephes single-precision algorithms (range
 * reduction plus a polynomial), within 2 ulp of libm over the ranges used here (tests compare them). */
/* 2^n for n in [-126, 127] */
static inline float pow2i(int n) {
    union { uint32_t u; float f; } v = {(uint32_t)(n + 127) << 23};
    return v.f;
}

static inline float exp_f32(float x) {
    x = x < -104.0f ? -104.0f : x; /* exp(-104) rounds to 0; NaN passes through (comparisons are false) */
    x = x > 89.0f ? 89.0f : x;      /* exp(89) overflows to inf, as does everything above 88.73 */
    /* x = n ln2 + r with n the nearest integer (adding and removing 1.5 2^23 rounds; floorf does not vectorise) */
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const float y = p * r * r + r + 1.0f;
    const int e = (int)n, half = e / 2; /* 2^n in two factors: n down to -150 reaches the subnormals */
    return y * pow2i(half) * pow2i(e - half);
}

/* log(x) for finite x > 0; branch-free (selects), so that loops calling it vectorise */
static inline float log_f32(float x) {
    union { float f; uint32_t u; } v = {x};
    const int e0 = (int)((v.u >> 23) & 0xff) - 126; /* x = m 2^e, m in [0.5, 1) (normal x) */
    v.u = (v.u & 0x807fffffu) | 0x3f000000u;
    const int low = v.f < 0.707106781186547524f;   /* m in [sqrt(1/2), sqrt(2)) after doubling a low m */
    const float m = (low ? v.f + v.f : v.f) - 1.0f;
    const float fe = (float)(e0 - low);
    const float z = m * m;
    float p = 7.0376836292e-2f;
    p = p * m - 1.1514610310e-1f;
    p = p * m + 1.1676998740e-1f;
    p = p * m - 1.2420140846e-1f;
    p = p * m + 1.4249322787e-1f;
    p = p * m - 1.6668057665e-1f;
    p = p * m + 2.0000714765e-1f;
    p = p * m - 2.4999993993e-1f;
    p = p * m + 3.3333331174e-1f;
    const float y = p * m * z - 2.12194440e-4f * fe - 0.5f * z;
    return m + y + 0.693359375f * fe;
}

/* log(1 + u) for u >= 0: log(w) for w = 1 + u, corrected for the rounding of w (exact as u -> 0) */
static inline float log1p_f32(float u) {
    const float w = 1.0f + u;
    return log_f32(w) - ((w - 1.0f) - u) / w;
}

static inline float sigmoid(float x) { return 1.0f / (1.0f + exp_f32(-x)); }

static inline float silu(float x) { return x / (1.0f + exp_f32(-x)); }

/* torch.nn.functional.softplus (beta 1, threshold 20) */
static inline float softplus(float x) {
    const float smooth = log1p_f32(exp_f32(x)); /* computed either way: a select, not a branch, vectorises */
    return x > 20.0f ? x : smooth;
}

/* ---- shared with the other files -------------------------------------------------------------------------------- */

/* where code j of a block of 64 lands when its two byte halves (looked up per 16-byte lane) are interleaved by
 * unpacklo / unpackhi: the first vector holds each lane's codes 0-7, the second its codes 8-15. The 8-bit vector paths
 * (fp8.c, quant.c) permute their bf16 inputs into this order once per call. */
static inline long unpacked_slot(long j) { return ((j & 15) >= 8) * 32 + 8 * (j >> 4) + (j & 7); }

/* A weight packed by MLX (quant.c): affine 2-8 bit, MXFP4, MXFP8, NVFP4 (mode AFFINE .. NVFP4). The products below
 * take one as layout LAYOUT_QUANT, `w` pointing at this descriptor (kimi_lm/cpu/products.py QWeight mirrors it). */
enum { AFFINE = 0, MXFP4 = 1, MXFP8 = 2, NVFP4 = 3 };
typedef struct {
    int mode, bits;
    long group, O, I;
    const uint8_t *w;            /* [O, I bits / 8] */
    const void *scales, *biases; /* [O, I / group]: uint8 (MX, NV) or the affine dtype (scale_bf16: bf16 else fp32) */
    int scale_bf16;
} qweight;
#define LAYOUT_QUANT 2

/* quant.c: M <= ROWS_MAX input rows x [M, I] fp32 prepared once for the product paths (exact_bf16: x holds values
 * exact in bf16), then y [M, W->O] fp32 for output rows [r0, r1); quant_input returns NULL when out of memory */
typedef struct qinput qinput;
INTERNAL qinput *quant_input(const qweight *W, long M, const float *x, int exact_bf16);
INTERNAL void quant_input_free(qinput *X);
INTERNAL void quant_rows(const qweight *W, const qinput *X, long r0, long r1, float *y);

/* FP8 128x128 blocks (fp8.c): codes [O, I] e4m3 and scales [ceil(O/128), ceil(I/128)] fp32. moe_decode_rows takes one as
 * layout LAYOUT_FP8, `w` pointing at this descriptor (kimi_lm/cpu/fp8.py FP8Weight mirrors it). */
typedef struct {
    const void *q, *s;
    long O, I;
} fp8_weight;
#define LAYOUT_FP8 3
typedef struct fp8_prepared fp8_prepared;
INTERNAL fp8_prepared *fp8_prepare(long M, long I, const float *x, int exact_bf16); /* NULL when out of memory */
INTERNAL void fp8_prepared_free(fp8_prepared *X);
INTERNAL void fp8_weight_rows(const fp8_weight *W, const fp8_prepared *X, long r0, long r1, float *y);

/* one input row x [I] fp32 through a weight in any layout (gemv.c): output rows [r0, r1) (any, also mid-block of
 * oneDNN's blocked layout) into y[r0 .. r1) fp32;
 * `input` what row_input prepared for the layout (none for oneDNN's: NULL). row_input returns 1 when out of memory;
 * same_row_input: whether two weights take the same prepared input. */
INTERNAL int row_input(int layout, const void *w, const float *x, int bf16, void **input);
INTERNAL int rows_input(int layout, const void *w, long M, const float *x, int bf16, void **input);
INTERNAL void row_input_free(int layout, void *input);
INTERNAL int same_row_input(int layout_a, const void *a, int layout_b, const void *b);
INTERNAL void weight_rows(int layout, int bf16, const void *w, const void *input, long I, const float *x, long r0,
                          long r1, float *y);
/* the same for M <= ROWS_MAX input rows x [M, I] (rows_input prepares them): rows [r0, r1) of y [M, O]; on oneDNN's
 * blocked layout with M > 1, r0 a multiple of 64 */
INTERNAL void weight_rows_m(int layout, int bf16, const void *w, const void *input, long I, long O, long M,
                            const float *x, long r0, long r1, float *y);

/* products of packed weights (gemv.c): oneDNN's layouts 0 and 1, or LAYOUT_QUANT; one input row, or up to ROWS_MAX
 * rows at once (fp32 in and out; `bf16`: the model dtype, whose values the inputs hold). 0, or 1 when out of memory */
#define ROWS_MAX 8
INTERNAL int product_f32(int layout, int bf16, long O, long I, const void *w, const float *x, float *y);
INTERNAL int product_rows_f32(int layout, int bf16, long O, long I, const void *w, long M, const float *x, float *y);
/* rows [r0, r1) of an M-row product on oneDNN's layouts 0 / 1 (r0 a multiple of 64) -> y [M, r1 - r0] */
INTERNAL void packed_rows_range(int layout, int bf16, long I, const void *w, long r0, long r1, long M, const float *x,
                                float *y);

/* fn(ctx, item) for every item in [0, items), split among up to `threads` threads (threads.c) */
typedef void (*item_fn)(const void *ctx, long item);
INTERNAL void parallel_for(item_fn fn, const void *ctx, long items, int threads);

#define INPUT_ROWS 16 /* tokens per work item of the many-token kernels */

/* exported kernels that layer.c strings together (gemv.c, kda.c, moe.c, norm.c): declared once here, so that each
 * definition is checked against the declaration its callers use */
int fused_products(long n, const int *layouts, const void *const *weights, const long *outs, long I, int bf16, long M,
                   const void *x, void *y, int threads);
int kda_decode_rows(long B, long H, long K, long W, int bf16, const void *proj, void *const *conv_rows,
                    float *const *state_rows, const float *taps, const float *neg_A, const float *dt_bias, int f_layout,
                    const void *f_b, int g_layout, const void *g_b, const float *norm_w, float norm_eps, float l2_eps,
                    void *out, int threads);
int moe_decode_rows(long N, long E, long hidden, long I, long top_k, long n_group, long topk_group, int renormalize,
                    float scaling, int bf16, const void *x, int router_layout, const void *router, const float *bias,
                    const int *gate_up_layouts, const void *const *gate_up, const int *down_layouts,
                    const void *const *down, long I_shared, int shared_gate_up_layout, const void *shared_gate_up,
                    int shared_down_layout, const void *shared_down, int64_t *idx, float *weights, void *out,
                    int threads);
void rms_norm(long rows, long D, int bf16, const void *x, const float *weight, float eps, void *out, int threads);
void swiglu(long n, long I, int bf16, const void *in, void *out, int threads);

#endif
