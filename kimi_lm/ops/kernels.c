/* CPU kernels in plain C for kimi_lm (built and bound by kimi_lm/ops/native.py).
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
 * Reference math: spec shared/specs/kimi_linear.md sections 5-6; fla v0.4.0 fla/layers/kda.py and
 * fla/ops/kda/naive.py; DeepSeek-V3 inference/model.py (Gate); Cephes (expf, logf).
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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

/* n values of the model dtype -> fp32 */
static void load_row(float *dst, const void *src, long n, int bf16) {
    if (bf16) {
        const uint16_t *s = (const uint16_t *)src;
#pragma omp simd
        for (long i = 0; i < n; i++) dst[i] = bf16_to_f32(s[i]);
    } else {
        memcpy(dst, src, (size_t)n * sizeof(float));
    }
}

/* n fp32 values -> the model dtype */
static void store_row(void *dst, const float *src, long n, int bf16) {
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

/* acc[a] += W[a][2p] x0 + W[a][2p + 1] x1 for the 64 outputs of one AB16b64a2b row of input pairs */
static inline void accumulate_pairs(float *acc, const uint32_t *row, float x0, float x1) {
#pragma omp simd
    for (long a = 0; a < 64; a++) {
        const uint32_t u = row[a];
        acc[a] += bits_to_f32(u << 16) * x0 + bits_to_f32(u & 0xffff0000u) * x1;
    }
}

/* y[O] = W x in fp32 for one input row x [I] (fp32), W as ``torch.ops.mkldnn._reorder_linear_weight`` stores it.
 * layout 0: plain row-major [O, I] in the model dtype (what oneDNN keeps for fp32 here); layout 1: bf16 "AB16b64a2b"
 * ([O/64][I/32] blocks of [16][64][2]: 64 outputs by 32 inputs, input pairs adjacent, padded to whole blocks).
 * kimi_lm/ops/native.py checks each packed weight against oneDNN's own product before it is used here. */
static void product_f32(int layout, int bf16, long O, long I, const void *w, const float *x, float *y) {
    if (layout == 0) {
        for (long r = 0; r < O; r++) {
            float s = 0.0f;
            if (bf16) {
                const uint16_t *row = (const uint16_t *)w + r * I;
#pragma omp simd reduction(+ : s)
                for (long i = 0; i < I; i++) s += bf16_to_f32(row[i]) * x[i];
            } else {
                const float *row = (const float *)w + r * I;
#pragma omp simd reduction(+ : s)
                for (long i = 0; i < I; i++) s += row[i] * x[i];
            }
            y[r] = s;
        }
        return;
    }
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
}

/* product_f32 for M <= 8 input rows x [M, I] -> y [M, O] at once: each block of the weight is read once for all rows
 * (a second row would otherwise stream a weight larger than the caches again). */
#define ROWS_MAX 8
static void product_rows_f32(int layout, int bf16, long O, long I, const void *w, long M, const float *x, float *y) {
    if (layout == 0) {
        for (long r = 0; r < O; r++) /* the weight row stays in L1 for the M dots */
            for (long m = 0; m < M; m++) {
                const float *xm = x + m * I;
                float s = 0.0f;
                if (bf16) {
                    const uint16_t *row = (const uint16_t *)w + r * I;
#pragma omp simd reduction(+ : s)
                    for (long i = 0; i < I; i++) s += bf16_to_f32(row[i]) * xm[i];
                } else {
                    const float *row = (const float *)w + r * I;
#pragma omp simd reduction(+ : s)
                    for (long i = 0; i < I; i++) s += row[i] * xm[i];
                }
                y[m * O + r] = s;
            }
        return;
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
}

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

/* exported for the tests only: 0 exp, 1 log1p, 2 sigmoid, 3 silu, 4 softplus of n values */
void elementwise(int which, long n, const float *x, float *y) {
    for (long i = 0; i < n; i++)
        y[i] = which == 0 ? exp_f32(x[i]) : which == 1 ? log1p_f32(x[i]) : which == 2 ? sigmoid(x[i])
             : which == 3 ? silu(x[i]) : softplus(x[i]);
}

/* 1 / sqrt(mean(x^2) + eps) over n values */
static float inv_rms(const float *x, long n, float eps) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (long i = 0; i < n; i++) s += x[i] * x[i];
    return 1.0f / sqrtf(s / (float)n + eps);
}

/* The factors of KDA's q/k L2 norms for one head: q / |q| / sqrt(K) (the attention scale K^-1/2 folded in) and
 * k / |k|, with eps inside the root as fla's kernel (via an RMS over K values: eps / K) */
static void qk_l2_scales(const float *q, const float *k, long K, float eps, float *q_scale, float *k_scale) {
    *q_scale = inv_rms(q, K, eps / (float)K) / (float)K;
    *k_scale = inv_rms(k, K, eps / (float)K) / sqrtf((float)K);
}

/* KDA's gated output norm of one head (layers.py GatedRMSNorm): dst = (o / rms(o)) w sigmoid(z), fp32; dst may be z */
static void gated_norm_head(const float *o, const float *z, const float *w, long K, float eps, float *dst) {
    const float r = inv_rms(o, K, eps);
#pragma omp simd
    for (long i = 0; i < K; i++) dst[i] = o[i] * r * w[i] * sigmoid(z[i]);
}

/* defined with the threads below: fn(ctx, item) for every item in [0, items), split among threads */
typedef void (*item_fn)(const void *ctx, long item);
static void parallel_for(item_fn fn, const void *ctx, long items, int threads);

/* One Kimi Delta Attention decode token for B sequences (H heads of width K; values are K wide too).
 *
 * proj       [B, 3D + 2K + H]  model dtype: q | k | v (D = H K) | f_a | g_a | b, the fused input projection's output
 * conv_state [B, W - 1, 3D]    model dtype: the last W - 1 inputs of the q | k | v convs; slides by one (updated)
 * state      [B, H, K, K]      fp32: recurrent state S[key][value] (updated)
 * taps       [W, 3D]           fp32: conv taps, row W - 1 multiplies the current token
 * neg_A      [H]               fp32: -exp(A_log)
 * dt_bias    [H K]             fp32
 * f_b, g_b   [D, K]            model dtype: the low-rank gate's second products, packed by oneDNN in layout
 *                              f_layout / g_layout (see product_f32)
 * norm_w     [K]               fp32: gated RMSNorm weight; norm_eps its eps; l2_eps the q/k L2-norm eps
 * out        [B, D]            model dtype: gated-normed output, the input of o_proj
 * The B rows are independent: several are shared among `threads` threads (parallel_for).
 * Returns 0, or 1 when the scratch memory could not be allocated.
 */
typedef struct {
    long H, K, W;
    int bf16, f_layout, g_layout;
    const void *proj, *f_b, *g_b;
    void *conv_state, *out;
    float *state;
    const float *taps, *neg_A, *dt_bias, *norm_w;
    float norm_eps, l2_eps;
    int failed; /* set when a row could not allocate its scratch memory */
} kda_decode_job;

static void kda_decode_row(const void *ctx, long bi) {
    kda_decode_job *job = (kda_decode_job *)ctx;
    const long H = job->H, K = job->K, W = job->W;
    const int bf16 = job->bf16, f_layout = job->f_layout, g_layout = job->g_layout;
    const void *proj = job->proj, *f_b = job->f_b, *g_b = job->g_b;
    void *conv_state = job->conv_state, *out = job->out;
    float *state = job->state;
    const float *taps = job->taps, *neg_A = job->neg_A, *dt_bias = job->dt_bias, *norm_w = job->norm_w;
    const float norm_eps = job->norm_eps, l2_eps = job->l2_eps;
    const long D = H * K, C = 3 * D, P = 3 * D + 2 * K + H;
    const size_t esize = bf16 ? 2 : 4;
    float *buf = malloc(sizeof(float) * (size_t)(2 * C + 2 * K + H + 4 * D));
    if (!buf) {
        job->failed = 1;
        return;
    }
    float *x = buf;            /* [C] this token's q | k | v inputs, fp32 */
    float *qkv = x + C;        /* [C] after conv + SiLU */
    float *fa = qkv + C;       /* [K] */
    float *ga = fa + K;        /* [K] */
    float *bb = ga + K;        /* [H] */
    float *g = bb + H;         /* [D] log-decay per head and key channel */
    float *z = g + D;          /* [D] output gate (pre-sigmoid) */
    float *o = z + D;          /* [D] attention output */
    float *pred = o + D;       /* [D] k^T S per head, then delta */
    const char *row = (const char *)proj + (size_t)(bi * P) * esize;
    load_row(x, row, C, bf16);
    load_row(fa, row + (size_t)C * esize, K, bf16);
    load_row(ga, row + (size_t)(C + K) * esize, K, bf16);
    load_row(bb, row + (size_t)(C + 2 * K) * esize, H, bf16);

    /* causal depthwise conv over [conv_state, x] and SiLU; then the window slides by one */
    char *cs = (char *)conv_state + (size_t)(bi * (W - 1) * C) * esize;
#pragma omp simd
    for (long c = 0; c < C; c++) qkv[c] = x[c] * taps[(W - 1) * C + c];
    for (long w = 0; w < W - 1; w++) {
        const float *tap = taps + w * C;
        if (bf16) {
            const uint16_t *hist = (const uint16_t *)cs + w * C;
#pragma omp simd
            for (long c = 0; c < C; c++) qkv[c] += bf16_to_f32(hist[c]) * tap[c];
        } else {
            const float *hist = (const float *)cs + w * C;
#pragma omp simd
            for (long c = 0; c < C; c++) qkv[c] += hist[c] * tap[c];
        }
    }
    if (W > 1) {
        memmove(cs, cs + (size_t)C * esize, (size_t)((W - 2) * C) * esize);
        memcpy(cs + (size_t)((W - 2) * C) * esize, row, (size_t)C * esize);
    }
#pragma omp simd
    for (long c = 0; c < C; c++) qkv[c] = silu(qkv[c]);

    /* gates: g = -exp(A_log) softplus(f_b(f_a) + dt_bias), z = g_b(g_a), beta = sigmoid(b) */
    product_f32(f_layout, bf16, D, K, f_b, fa, g);
    product_f32(g_layout, bf16, D, K, g_b, ga, z);
    for (long h = 0; h < H; h++)
        for (long i = 0; i < K; i++) { /* both products' outputs rounded to the model dtype, as in PyTorch */
            z[h * K + i] = as_model_dtype(z[h * K + i], bf16);
            g[h * K + i] = neg_A[h] * softplus(as_model_dtype(g[h * K + i], bf16) + dt_bias[h * K + i]);
        }

    float *S_b = state + bi * H * K * K;
    for (long h = 0; h < H; h++) {
        float *q = qkv + h * K, *k = qkv + D + h * K, *v = qkv + 2 * D + h * K;
        float q_scale, k_scale;
        qk_l2_scales(q, k, K, l2_eps, &q_scale, &k_scale);
        const float beta = sigmoid(bb[h]);
        float *S = S_b + h * K * K, *pr = pred + h * K, *oh = o + h * K;
        /* S <- diag(exp(g)) S and pred = k^T S in one pass */
        memset(pr, 0, sizeof(float) * (size_t)K);
        for (long i = 0; i < K; i++) {
            const float decay = exp_f32(g[h * K + i]), ki = k[i] * k_scale;
            float *Si = S + i * K;
#pragma omp simd
            for (long j = 0; j < K; j++) {
                Si[j] *= decay;
                pr[j] += ki * Si[j];
            }
        }
        /* delta = beta (v - pred); S += k delta^T and o = q^T S in one pass */
#pragma omp simd
        for (long j = 0; j < K; j++) pr[j] = beta * (v[j] - pr[j]);
        memset(oh, 0, sizeof(float) * (size_t)K);
        for (long i = 0; i < K; i++) {
            const float ki = k[i] * k_scale, qi = q[i] * q_scale;
            float *Si = S + i * K;
#pragma omp simd
            for (long j = 0; j < K; j++) {
                Si[j] += ki * pr[j];
                oh[j] += qi * Si[j];
            }
        }
        /* gated RMSNorm, one rounding to the model dtype */
        gated_norm_head(oh, z + h * K, norm_w, K, norm_eps, z + h * K);
        store_row((char *)out + (size_t)(bi * D + h * K) * esize, z + h * K, K, bf16);
    }
    free(buf);
}

int kda_decode(long B, long H, long K, long W, int bf16, const void *proj, void *conv_state, float *state,
               const float *taps, const float *neg_A, const float *dt_bias, int f_layout, const void *f_b,
               int g_layout, const void *g_b, const float *norm_w, float norm_eps, float l2_eps, void *out,
               int threads) {
    kda_decode_job job = {H, K, W, bf16, f_layout, g_layout, proj, f_b, g_b, conv_state, out, state, taps, neg_A,
                          dt_bias, norm_w, norm_eps, l2_eps, 0};
    parallel_for(kda_decode_row, &job, B, threads); /* rows (sequences) are independent */
    return job.failed;
}

/* ---- mixture of experts, one token ---------------------------------------------------------------------------- */

/* index of the largest value among the n at v that are not yet taken (ties: the lowest index) */
static long argmax_free(const float *v, const unsigned char *taken, long n) {
    long best = -1;
    for (long i = 0; i < n; i++)
        if (!taken[i] && (best < 0 || v[i] > v[best])) best = i;
    return best;
}

/* The choice of the sigmoid router (DeepSeek-V3 noaux_tc, as kimi_lm/model/moe.py TopkRouter.forward) from one
 * token's logits [E] fp32: s = sigmoid(logits); experts chosen by s + bias (within the best topk_group of n_group
 * groups, a group scoring the sum of its two best), weighted by the unbiased s, renormalised if asked, times scaling.
 * scratch: 2E + n_group floats; taken: E + n_group bytes. -> idx [top_k] int64, weights [top_k] fp32. */
static void route_logits(long E, long top_k, long n_group, long topk_group, int renormalize, float scaling,
                         const float *logits, const float *bias, float *scratch, unsigned char *taken, int64_t *idx,
                         float *weights) {
    float *scores = scratch, *choice = scores + E, *group_score = choice + E;
    memset(taken, 0, (size_t)(E + n_group));
    for (long e = 0; e < E; e++) {
        scores[e] = sigmoid(logits[e]);
        choice[e] = scores[e] + bias[e];
    }
    if (n_group > 1 && topk_group < n_group) {
        const long per = E / n_group;
        unsigned char *group_taken = taken + E;
        for (long grp = 0; grp < n_group; grp++) {
            const long a = argmax_free(choice + grp * per, taken + grp * per, per);
            taken[grp * per + a] = 1;
            const long b = argmax_free(choice + grp * per, taken + grp * per, per);
            taken[grp * per + a] = 0;
            group_score[grp] = choice[grp * per + a] + (b >= 0 ? choice[grp * per + b] : 0.0f);
        }
        for (long t = 0; t < topk_group; t++) group_taken[argmax_free(group_score, group_taken, n_group)] = 1;
        /* experts of groups not kept are out of the running: mark them taken */
        for (long grp = 0; grp < n_group; grp++)
            if (!group_taken[grp]) memset(taken + grp * per, 1, (size_t)per);
    }
    float sum = 0.0f;
    for (long t = 0; t < top_k; t++) {
        const long e = argmax_free(choice, taken, E);
        taken[e] = 1;
        idx[t] = e;
        weights[t] = scores[e];
        sum += scores[e];
    }
    for (long t = 0; t < top_k; t++) {
        if (renormalize && top_k > 1) weights[t] = weights[t] / (sum + 1e-20f);
        weights[t] *= scaling;
    }
}

/* The router of one token: its logits x W^T (x [hidden] model dtype, W [E, hidden] fp32), then route_logits.
 * Returns 0, or 1 when scratch memory could not be allocated. */
int moe_route(long E, long hidden, long top_k, long n_group, long topk_group, int renormalize, float scaling,
              int bf16, const void *x, const float *W, const float *bias, int64_t *idx, float *weights) {
    float *buf = malloc(sizeof(float) * (size_t)(hidden + 3 * E + n_group));
    unsigned char *taken = malloc((size_t)(E + n_group));
    if (!buf || !taken) {
        free(buf);
        free(taken);
        return 1;
    }
    float *xf = buf, *logits = xf + hidden, *scratch = logits + E;
    load_row(xf, x, hidden, bf16);
    for (long e = 0; e < E; e++) {
        const float *row = W + e * hidden;
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (long i = 0; i < hidden; i++) s += row[i] * xf[i];
        logits[e] = s;
    }
    route_logits(E, top_k, n_group, topk_group, renormalize, scaling, logits, bias, scratch, taken, idx, weights);
    free(buf);
    free(taken);
    return 0;
}

/* SwiGLU of n rows: out[r] = silu(gate) * up, where rows[r] points at one [2I] row (gate | up) in the model dtype.
 * As torch does in the model dtype: silu's output is rounded, then the product. out [n, I] model dtype. */
static void swiglu_row(long I, int bf16, const void *row, void *out) {
    float gate[256], up[256]; /* in blocks of 256: loads, math and stores each vectorise */
    const size_t esize = bf16 ? 2 : 4;
    for (long j0 = 0; j0 < I; j0 += 256) {
        const long m = I - j0 < 256 ? I - j0 : 256;
        load_row(gate, (const char *)row + (size_t)j0 * esize, m, bf16);
        load_row(up, (const char *)row + (size_t)(I + j0) * esize, m, bf16);
#pragma omp simd
        for (long j = 0; j < m; j++) gate[j] = as_model_dtype(silu(gate[j]), bf16) * up[j];
        store_row((char *)out + (size_t)j0 * esize, gate, m, bf16);
    }
}

void swiglu_rows(long n, long I, int bf16, const void *const *rows, void *out) {
    for (long r = 0; r < n; r++) swiglu_row(I, bf16, rows[r], (char *)out + (size_t)(r * I) * (bf16 ? 2 : 4));
}

/* y = sum_r w[r] rows[r] with fp32 accumulation, rounded to the model dtype; then y + shared (rounded again) when
 * shared is not NULL. rows: n pointers to [hidden] in the model dtype; out [hidden] model dtype. */
void weighted_sum_rows(long n, long hidden, int bf16, const void *const *rows, const float *w, const void *shared,
                       void *out) {
    float acc[1024]; /* columns in blocks of 1024: each row's block is added in one vectorised pass */
    for (long j0 = 0; j0 < hidden; j0 += 1024) {
        const long m = hidden - j0 < 1024 ? hidden - j0 : 1024;
        memset(acc, 0, sizeof(float) * (size_t)m);
        for (long r = 0; r < n; r++) {
            const float wr = w[r];
            if (bf16) {
                const uint16_t *row = (const uint16_t *)rows[r] + j0;
#pragma omp simd
                for (long j = 0; j < m; j++) acc[j] += wr * bf16_to_f32(row[j]);
            } else {
                const float *row = (const float *)rows[r] + j0;
#pragma omp simd
                for (long j = 0; j < m; j++) acc[j] += wr * row[j];
            }
        }
        for (long j = 0; j < m; j++) {
            float s = acc[j];
            if (shared) s = as_model_dtype(s, bf16) + load_one(shared, j0 + j, bf16);
            store_one(out, j0 + j, s, bf16);
        }
    }
}

/* ---- one-row products on oneDNN's packed weights ---------------------------------------------------------------- */

/* y[O] = W x for one input row x [I], both in the model dtype, W packed by oneDNN in ``layout`` (see product_f32);
 * fp32 accumulation, one rounding. Returns 0, or 1 when scratch memory could not be allocated. */
int packed_gemv(int layout, int bf16, long O, long I, const void *w, const void *x, void *y) {
    float *buf = malloc(sizeof(float) * (size_t)(I + O));
    if (!buf) return 1;
    float *xf = buf, *yf = buf + I;
    load_row(xf, x, I, bf16);
    product_f32(layout, bf16, O, I, w, xf, yf);
    for (long r = 0; r < O; r++) store_one(y, r, yf[r], bf16);
    free(buf);
    return 0;
}

/* ---- threads --------------------------------------------------------------------------------------------------- */

/* PyTorch's CPU ops run on an OpenMP team whose idle threads keep spinning for a while after each op; new threads of
 * our own would compete with them for the cores (measured: a 2-thread scan right after a PyTorch op ran slower than
 * one thread). So where PyTorch's OpenMP runtime is loaded, kimi_lm/ops/native.py hands over its entry points (the
 * GCC OpenMP ABI that `#pragma omp parallel` compiles to) and the work runs on PyTorch's own team; elsewhere on
 * pthreads. */
typedef void (*omp_parallel_fn)(void (*)(void *), void *, unsigned, unsigned);
typedef int (*omp_int_fn)(void);
static omp_parallel_fn omp_parallel;
static omp_int_fn omp_thread_num, omp_num_threads;

void use_openmp(void *parallel, void *thread_num, void *num_threads) {
    omp_parallel = (omp_parallel_fn)parallel;
    omp_thread_num = (omp_int_fn)thread_num;
    omp_num_threads = (omp_int_fn)num_threads;
}

typedef struct {
    item_fn fn;
    const void *ctx;
    long items, member, members; /* this member runs items [member items / members, (member + 1) items / members) */
} team_share;

static void run_share(const team_share *share) {
    const long begin = share->items * share->member / share->members;
    const long end = share->items * (share->member + 1) / share->members;
    for (long item = begin; item < end; item++) share->fn(share->ctx, item);
}

static void omp_member(void *arg) {
    team_share share = *(const team_share *)arg;
    share.member = omp_thread_num(); /* the team may be smaller than asked for: share by its real size */
    share.members = omp_num_threads();
    run_share(&share);
}

static void *pthread_member(void *arg) {
    run_share((const team_share *)arg);
    return NULL;
}

/* fn(ctx, item) for every item in [0, items), on up to `threads` threads, each taking one contiguous range */
static void parallel_for(item_fn fn, const void *ctx, long items, int threads) {
    if (threads > items) threads = (int)items;
    if (threads > 64) threads = 64;
    if (threads <= 1) {
        for (long item = 0; item < items; item++) fn(ctx, item);
        return;
    }
    if (omp_parallel) {
        team_share share = {fn, ctx, items, 0, 1};
        omp_parallel(omp_member, &share, (unsigned)threads, 0);
        return;
    }
    team_share shares[64];
    pthread_t ids[64];
    int started[64] = {0};
    for (int i = 0; i < threads; i++) shares[i] = (team_share){fn, ctx, items, i, threads};
    for (int i = 1; i < threads; i++) started[i] = pthread_create(&ids[i], NULL, pthread_member, &shares[i]) == 0;
    run_share(&shares[0]);
    for (int i = 1; i < threads; i++) { /* a thread that could not start: its share runs here */
        if (started[i])
            pthread_join(ids[i], NULL);
        else
            run_share(&shares[i]);
    }
}

/* ---- KDA over many tokens: the recurrence itself, for prefill and multi-token steps ------------------------------ */

/* Value columns per work item. Each column of the state S [K, V] evolves on its own (the delta rule's prediction,
 * update and read-out mix key channels, never value columns), so a [K, 64] slice of S is scanned over all T tokens
 * while it stays in L1 (32 KiB at K = 128; 64 columns ran 1.1x faster than 32 and 1.3x faster than 16), and slices
 * are shared out among threads. */
#define SCAN_COLS 64
/* fused multiply-add where the CPU has one (a single rounding); a plain multiply-add elsewhere */
#ifdef __FMA__
#define MUL_ADD(x, y, z) fmaf(x, y, z)
#else
#define MUL_ADD(x, y, z) ((x) * (y) + (z))
#endif
#define SCAN_MAX_K 256 /* the slice lives on the stack: 64 KiB at most */

typedef struct {
    long B, T, H, K, V;
    const float *q, *k, *v, *decay, *beta;
    float *state, *out;
} kda_scan_job;

/* One [K, SCAN_COLS] slice of one sequence's head, all T tokens. Per token t, with a = exp(g_t):
 *     S <- diag(a) S;  delta = beta (v - S^T k);  S <- S + k delta^T;  o = S^T q
 * computed in one pass over the slice per token: the prediction S^T k of token t + 1 is (a_{t+1} k_{t+1})^T S_t,
 * accumulated while S_t is written. Two partial sums (even and odd key channels) halve the add chains. */
static void kda_scan_slice(const void *ctx, long item) {
    const kda_scan_job *job = (const kda_scan_job *)ctx;
    const long H = job->H, K = job->K, V = job->V, T = job->T;
    const long slices = (V + SCAN_COLS - 1) / SCAN_COLS;
    const long b = item / (H * slices), h = (item / slices) % H, c0 = (item % slices) * SCAN_COLS;
    const long width = V - c0 < SCAN_COLS ? V - c0 : SCAN_COLS;
    float S[(SCAN_MAX_K + 1) * SCAN_COLS], ak[SCAN_MAX_K + 1]; /* + 1: the pad row of an odd K */
    float pred[SCAN_COLS], delta[SCAN_COLS], o0[SCAN_COLS], o1[SCAN_COLS], p0[SCAN_COLS], p1[SCAN_COLS];
    float *state = job->state + ((b * H + h) * K) * V + c0;
    for (long d = 0; d < K; d++)
        for (long c = 0; c < SCAN_COLS; c++) S[d * SCAN_COLS + c] = c < width ? state[d * V + c] : 0.0f;
    ak[K] = 0.0f; /* the odd-K pad row of the pair loop reads it */
    for (long c = 0; c < SCAN_COLS; c++) S[K * SCAN_COLS + c] = 0.0f;

    const long kstep = H * K, vstep = H * V; /* one token further in [B, T, H, K] / [B, T, H, V] */
    const float *q = job->q + (b * T * H + h) * K, *k = job->k + (b * T * H + h) * K;
    const float *a = job->decay + (b * T * H + h) * K, *v = job->v + (b * T * H + h) * V + c0;
    const float *beta = job->beta + b * T * H + h;
    float *out = job->out + (b * T * H + h) * V + c0;

    /* prediction of token 0 from the initial state */
    for (long d = 0; d < K; d++) ak[d] = a[d] * k[d];
    for (long c = 0; c < SCAN_COLS; c++) pred[c] = 0.0f;
    for (long d = 0; d < K; d++)
#pragma omp simd
        for (long c = 0; c < SCAN_COLS; c++) pred[c] = MUL_ADD(ak[d], S[d * SCAN_COLS + c], pred[c]);

    for (long t = 0; t < T; t++) {
        const float *qt = q + t * kstep, *kt = k + t * kstep, *at = a + t * kstep, *vt = v + t * vstep;
        const float bt = beta[t * H];
        for (long c = 0; c < SCAN_COLS; c++) delta[c] = c < width ? bt * (vt[c] - pred[c]) : 0.0f;
        if (t + 1 < T) { /* a_{t+1} k_{t+1}, for the next token's prediction */
            const float *an = at + kstep, *kn = kt + kstep;
#pragma omp simd
            for (long d = 0; d < K; d++) ak[d] = an[d] * kn[d];
        } else {
            memset(ak, 0, sizeof(float) * (size_t)K);
        }
        for (long c = 0; c < SCAN_COLS; c++) o0[c] = o1[c] = p0[c] = p1[c] = 0.0f;
        for (long d = 0; d < K; d += 2) {
            float *r0 = S + d * SCAN_COLS, *r1 = r0 + SCAN_COLS;
            const float a0 = at[d], k0 = kt[d], q0 = qt[d], n0 = ak[d];
            /* an odd K's last pair has a zero pad row: decay 0, key 0, query 0 keep it (and the sums) unchanged */
            const int pad = d + 1 == K;
            const float a1 = pad ? 0.0f : at[d + 1], k1 = pad ? 0.0f : kt[d + 1], q1 = pad ? 0.0f : qt[d + 1];
            const float n1 = ak[d + 1];
#pragma omp simd
            for (long c = 0; c < SCAN_COLS; c++) {
                const float s0 = MUL_ADD(k0, delta[c], a0 * r0[c]), s1 = MUL_ADD(k1, delta[c], a1 * r1[c]);
                r0[c] = s0;
                r1[c] = s1;
                o0[c] = MUL_ADD(q0, s0, o0[c]);
                o1[c] = MUL_ADD(q1, s1, o1[c]);
                p0[c] = MUL_ADD(n0, s0, p0[c]);
                p1[c] = MUL_ADD(n1, s1, p1[c]);
            }
        }
        float *ot = out + t * vstep;
        for (long c = 0; c < width; c++) ot[c] = o0[c] + o1[c];
        for (long c = 0; c < SCAN_COLS; c++) pred[c] = p0[c] + p1[c];
    }
    for (long d = 0; d < K; d++)
        for (long c = 0; c < width; c++) state[d * V + c] = S[d * SCAN_COLS + c];
}

/* The KDA recurrence over T tokens for B sequences of H heads (kimi_lm/ops/kda_naive.py is its definition), all fp32
 * and contiguous:
 * q, k, decay [B, T, H, K]   q already L2-normalised and scaled, k L2-normalised, decay = exp(g) per key channel
 * v           [B, T, H, V]
 * beta        [B, T, H]
 * state       [B, H, K, V]   recurrent state: read as the initial state, left as the final one
 * out         [B, T, H, V]
 * threads: how many threads share the B H ceil(V / 64) slices (see parallel_for).
 * Returns 0, or 1 when K is larger than SCAN_MAX_K (256). */
int kda_scan(long B, long T, long H, long K, long V, const float *q, const float *k, const float *v,
             const float *decay, const float *beta, float *state, float *out, int threads) {
    if (K > SCAN_MAX_K) return 1;
    const kda_scan_job job = {B, T, H, K, V, q, k, v, decay, beta, state, out};
    parallel_for(kda_scan_slice, &job, B * H * ((V + SCAN_COLS - 1) / SCAN_COLS), threads);
    return 0;
}

/* ---- KDA prefill: what surrounds the scan ----------------------------------------------------------------------- */

typedef struct {
    long B, T, H, K, W, P;
    int bf16;
    const void *proj, *history, *f_b;
    const float *taps, *neg_A, *dt_bias;
    float l2_eps;
    float *q, *k, *v, *decay, *beta;
    int failed; /* set when a work item could not allocate its scratch memory */
} kda_inputs_job;

#define INPUT_ROWS 16 /* tokens per work item */

/* Tokens [item 16, item 16 + 16) of all sequences' B T: conv + SiLU, q/k L2 norms, gate -> decay, beta. */
static void kda_inputs_rows(const void *ctx, long item) {
    kda_inputs_job *job = (kda_inputs_job *)ctx;
    const long T = job->T, H = job->H, K = job->K, W = job->W, D = H * K, C = 3 * D;
    const size_t esize = job->bf16 ? 2 : 4;
    float *buf = malloc(sizeof(float) * (size_t)(2 * C));
    if (!buf) {
        job->failed = 1;
        return;
    }
    float *x = buf, *y = buf + C;
    const long end = (item + 1) * INPUT_ROWS < job->B * T ? (item + 1) * INPUT_ROWS : job->B * T;
    for (long row = item * INPUT_ROWS; row < end; row++) {
        const long b = row / T, t = row % T;
        /* y = x_t tap[W - 1] + sum_w x_{t - W + 1 + w} tap[w]: the PyTorch path's order (_short_conv) */
        load_row(x, (const char *)job->proj + (size_t)(row * job->P) * esize, C, job->bf16);
#pragma omp simd
        for (long c = 0; c < C; c++) y[c] = x[c] * job->taps[(W - 1) * C + c];
        for (long w = 0; w < W - 1; w++) {
            const long s = t - (W - 1) + w; /* the input position this tap reads; < 0: the history (or zeros) */
            const char *src = s >= 0 ? (const char *)job->proj + (size_t)((b * T + s) * job->P) * esize
                              : job->history ? (const char *)job->history + (size_t)((b * (W - 1) + (W - 1) + s) * C) * esize
                                             : NULL;
            if (!src) continue;
            load_row(x, src, C, job->bf16);
            const float *tap = job->taps + w * C;
#pragma omp simd
            for (long c = 0; c < C; c++) y[c] += x[c] * tap[c];
        }
#pragma omp simd
        for (long c = 0; c < C; c++) y[c] = silu(y[c]);
        const char *proj_row = (const char *)job->proj + (size_t)(row * job->P) * esize;
        for (long h = 0; h < H; h++) {
            const float *q = y + h * K, *k = y + D + h * K;
            float q_scale, k_scale;
            qk_l2_scales(q, k, K, job->l2_eps, &q_scale, &k_scale);
            float *q_out = job->q + row * D + h * K, *k_out = job->k + row * D + h * K;
#pragma omp simd
            for (long i = 0; i < K; i++) {
                q_out[i] = q[i] * q_scale;
                k_out[i] = k[i] * k_scale;
            }
            job->beta[row * H + h] = sigmoid(load_one(proj_row, C + 2 * K + h, job->bf16));
        }
        memcpy(job->v + row * D, y + 2 * D, sizeof(float) * (size_t)D);
        load_row(x, (const char *)job->f_b + (size_t)(row * D) * esize, D, job->bf16);
        for (long h = 0; h < H; h++) {
            const float neg_A = job->neg_A[h], *f = x + h * K, *dt_bias = job->dt_bias + h * K;
            float *decay = job->decay + row * D + h * K;
#pragma omp simd
            for (long i = 0; i < K; i++) decay[i] = exp_f32(neg_A * softplus(f[i] + dt_bias[i]));
        }
    }
    free(buf);
}

/* Everything between a KDA layer's input products and the scan, for T tokens of B sequences (the PyTorch path:
 * kimi_lm/model/kda.py, KimiDeltaAttention.forward):
 * proj     [B, T, P]           model dtype, rows P apart: q | k | v (D = H K) | f_a | g_a | b, the fused input product
 * history  [B, W - 1, 3D]      model dtype: the inputs before token 0 (the conv cache), or NULL for zeros; updated
 *                              to the last W - 1 inputs when update_history is set
 * f_b      [B, T, D]           model dtype: f_b_proj(f_a)
 * taps     [W, 3D] fp32; neg_A [H] fp32 = -exp(A_log); dt_bias [H K] fp32; l2_eps: the q/k L2-norm eps
 * q, k, v, decay [B, T, D] fp32 out: q / |q| / sqrt(K), k / |k|, v, exp(-exp(A_log) softplus(f_b + dt_bias))
 * beta     [B, T, H] fp32 out: sigmoid(b)
 * Returns 0, or 1 when scratch memory could not be allocated. */
int kda_prefill_inputs(long B, long T, long H, long K, long W, long P, int bf16, const void *proj, void *history,
                       const void *f_b, const float *taps, const float *neg_A, const float *dt_bias, float l2_eps,
                       float *q, float *k, float *v, float *decay, float *beta, int threads) {
    kda_inputs_job job = {B, T, H, K, W, P, bf16, proj, history, f_b, taps, neg_A, dt_bias, l2_eps,
                          q, k, v, decay, beta, 0};
    parallel_for(kda_inputs_rows, &job, (B * T + INPUT_ROWS - 1) / INPUT_ROWS, threads);
    if (job.failed) return 1;
    if (history && W > 1) { /* the conv cache keeps the last W - 1 inputs of [history, proj] */
        const long C = 3 * H * K;
        const size_t esize = bf16 ? 2 : 4, row_bytes = (size_t)C * esize;
        for (long b = 0; b < B; b++) {
            char *hist = (char *)history + (size_t)(b * (W - 1)) * row_bytes;
            const long keep = W - 1 > T ? W - 1 - T : 0; /* old rows still inside the window */
            memmove(hist, hist + (size_t)(W - 1 - keep) * row_bytes, (size_t)keep * row_bytes);
            for (long r = keep; r < W - 1; r++)
                memcpy(hist + (size_t)r * row_bytes, (const char *)proj + (size_t)((b * T + T - (W - 1) + r) * P) * esize,
                       row_bytes);
        }
    }
    return 0;
}

typedef struct {
    long rows, H, K;
    int bf16;
    const float *o, *weight;
    const void *z;
    float eps;
    void *out;
    int failed;
} gated_norm_job;

static void gated_norm_rows(const void *ctx, long item) {
    gated_norm_job *job = (gated_norm_job *)ctx;
    const long H = job->H, K = job->K, end = (item + 1) * INPUT_ROWS < job->rows ? (item + 1) * INPUT_ROWS : job->rows;
    const size_t esize = job->bf16 ? 2 : 4;
    float *z = malloc(sizeof(float) * (size_t)(H * K));
    if (!z) {
        job->failed = 1;
        return;
    }
    for (long row = item * INPUT_ROWS; row < end; row++) {
        load_row(z, (const char *)job->z + (size_t)(row * H * K) * esize, H * K, job->bf16);
        for (long h = 0; h < H; h++)
            gated_norm_head(job->o + (row * H + h) * K, z + h * K, job->weight, K, job->eps, z + h * K);
        store_row((char *)job->out + (size_t)(row * H * K) * esize, z, H * K, job->bf16);
    }
    free(z);
}

/* KDA's gated output norm for `rows` tokens (layers.py GatedRMSNorm): out = (o / rms(o)) w sigmoid(z) per head, fp32
 * with one rounding to the model dtype. o [rows, H, K] fp32; z [rows, H K] model dtype; weight [K] fp32;
 * out [rows, H K] model dtype. Returns 0, or 1 when scratch memory could not be allocated. */
int gated_rms_norm(long rows, long H, long K, int bf16, const float *o, const void *z, const float *weight, float eps,
                   void *out, int threads) {
    gated_norm_job job = {rows, H, K, bf16, o, weight, z, eps, out, 0};
    parallel_for(gated_norm_rows, &job, (rows + INPUT_ROWS - 1) / INPUT_ROWS, threads);
    return job.failed;
}

/* ---- mixture of experts, many tokens ---------------------------------------------------------------------------- */

typedef struct {
    long N, k, hidden;
    int bf16;
    const void *shared;
    const void *const *slot_rows;
    const float *weights;
    void *out;
} moe_combine_job;

static void moe_combine_rows(const void *ctx, long item) {
    const moe_combine_job *job = (const moe_combine_job *)ctx;
    const size_t row_bytes = (size_t)job->hidden * (job->bf16 ? 2 : 4);
    const long end = (item + 1) * INPUT_ROWS < job->N ? (item + 1) * INPUT_ROWS : job->N;
    for (long t = item * INPUT_ROWS; t < end; t++) {
        weighted_sum_rows(job->k, job->hidden, job->bf16, job->slot_rows + t * job->k, job->weights + t * job->k,
                          job->shared ? (const char *)job->shared + (size_t)t * row_bytes : NULL,
                          (char *)job->out + (size_t)t * row_bytes);
    }
}

/* The routed experts' outputs back to their N tokens (moe.py, StackedExperts.forward): out[t] = sum_j weights[t, j]
 * slot_rows[t k + j][:] in fp32, rounded to the model dtype, then + shared[t] (rounded again) when shared is not NULL.
 * slot_rows [N k]: the address of the output row [hidden] (model dtype) of token t's j-th expert; weights [N, k] fp32;
 * shared, out [N, hidden] model dtype. */
void moe_combine(long N, long k, long hidden, int bf16, const void *const *slot_rows, const float *weights,
                 const void *shared, void *out, int threads) {
    const moe_combine_job job = {N, k, hidden, bf16, shared, slot_rows, weights, out};
    parallel_for(moe_combine_rows, &job, (N + INPUT_ROWS - 1) / INPUT_ROWS, threads);
}

typedef struct {
    long n, I;
    int bf16;
    const void *in;
    void *out;
} swiglu_job;

static void swiglu_block(const void *ctx, long item) {
    const swiglu_job *job = (const swiglu_job *)ctx;
    const size_t esize = job->bf16 ? 2 : 4;
    const long end = (item + 1) * INPUT_ROWS < job->n ? (item + 1) * INPUT_ROWS : job->n;
    for (long r = item * INPUT_ROWS; r < end; r++)
        swiglu_row(job->I, job->bf16, (const char *)job->in + (size_t)(r * 2 * job->I) * esize,
                   (char *)job->out + (size_t)(r * job->I) * esize);
}

/* silu(gate) up for n contiguous gate | up rows [n, 2I] -> out [n, I], model dtype, rounded as swiglu_rows */
void swiglu(long n, long I, int bf16, const void *in, void *out, int threads) {
    const swiglu_job job = {n, I, bf16, in, out};
    parallel_for(swiglu_block, &job, (n + INPUT_ROWS - 1) / INPUT_ROWS, threads);
}

/* ---- RMSNorm, many rows ----------------------------------------------------------------------------------------- */

typedef struct {
    long rows, D;
    int bf16;
    const void *x;
    const float *weight;
    float eps;
    void *out;
} rms_norm_job;

static void rms_norm_block(const void *ctx, long item) {
    const rms_norm_job *job = (const rms_norm_job *)ctx;
    const long D = job->D, end = (item + 1) * INPUT_ROWS < job->rows ? (item + 1) * INPUT_ROWS : job->rows;
    const size_t esize = job->bf16 ? 2 : 4;
    float buf[1024]; /* a row in blocks of 1024 values */
    for (long row = item * INPUT_ROWS; row < end; row++) {
        const char *x = (const char *)job->x + (size_t)(row * D) * esize;
        char *out = (char *)job->out + (size_t)(row * D) * esize;
        float sum = 0.0f;
        for (long j0 = 0; j0 < D; j0 += 1024) {
            const long m = D - j0 < 1024 ? D - j0 : 1024;
            load_row(buf, x + (size_t)j0 * esize, m, job->bf16);
#pragma omp simd reduction(+ : sum)
            for (long j = 0; j < m; j++) sum += buf[j] * buf[j];
        }
        const float r = 1.0f / sqrtf(sum / (float)D + job->eps);
        for (long j0 = 0; j0 < D; j0 += 1024) {
            const long m = D - j0 < 1024 ? D - j0 : 1024;
            const float *w = job->weight + j0;
            load_row(buf, x + (size_t)j0 * esize, m, job->bf16);
#pragma omp simd
            for (long j = 0; j < m; j++) buf[j] = buf[j] * r * w[j];
            store_row(out + (size_t)j0 * esize, buf, m, job->bf16);
        }
    }
}

/* x / sqrt(mean(x^2) + eps) * weight over rows of D values (layers.py RMSNorm): fp32 math, one rounding to the model
 * dtype. x, out [rows, D] model dtype; weight [D] fp32. */
void rms_norm(long rows, long D, int bf16, const void *x, const float *weight, float eps, void *out, int threads) {
    const rms_norm_job job = {rows, D, bf16, x, weight, eps, out};
    parallel_for(rms_norm_block, &job, (rows + INPUT_ROWS - 1) / INPUT_ROWS, threads);
}

/* ---- mixture of experts, many tokens: routing and dispatch ------------------------------------------------------ */

typedef struct {
    long N, E, top_k, n_group, topk_group;
    int renormalize;
    float scaling;
    const float *logits, *bias;
    int64_t *idx;
    float *weights;
    int failed;
} route_job;

static void route_block(const void *ctx, long item) {
    route_job *job = (route_job *)ctx;
    const long E = job->E, end = (item + 1) * INPUT_ROWS < job->N ? (item + 1) * INPUT_ROWS : job->N;
    float *scratch = malloc(sizeof(float) * (size_t)(2 * E + job->n_group));
    unsigned char *taken = malloc((size_t)(E + job->n_group));
    if (scratch && taken)
        for (long t = item * INPUT_ROWS; t < end; t++)
            route_logits(E, job->top_k, job->n_group, job->topk_group, job->renormalize, job->scaling,
                         job->logits + t * E, job->bias, scratch, taken, job->idx + t * job->top_k,
                         job->weights + t * job->top_k);
    else
        job->failed = 1;
    free(scratch);
    free(taken);
}

/* The router's choice for N tokens from their logits [N, E] fp32 (TopkRouter.forward after its product):
 * -> idx [N, top_k] int64, weights [N, top_k] fp32. Returns 0, or 1 when scratch memory could not be allocated. */
int moe_route_logits(long N, long E, long top_k, long n_group, long topk_group, int renormalize, float scaling,
                     const float *logits, const float *bias, int64_t *idx, float *weights, int threads) {
    route_job job = {N, E, top_k, n_group, topk_group, renormalize, scaling, logits, bias, idx, weights, 0};
    parallel_for(route_block, &job, (N + INPUT_ROWS - 1) / INPUT_ROWS, threads);
    return job.failed;
}

typedef struct {
    long k, slots;
    size_t row_bytes;
    const char *x;
    const int64_t *order;
    char *xs;
} gather_job;

static void gather_block(const void *ctx, long item) {
    const gather_job *job = (const gather_job *)ctx;
    const long end = (item + 1) * 64 < job->slots ? (item + 1) * 64 : job->slots;
    for (long r = item * 64; r < end; r++)
        memcpy(job->xs + (size_t)r * job->row_bytes, job->x + (size_t)(job->order[r] / job->k) * job->row_bytes,
               job->row_bytes);
}

/* Grouping by expert (StackedExperts.forward): idx [N, k] int64 (expert of token t's slot j) -> counts [E] (slots
 * per expert), slot_row [N k] (the row of slot t k + j in the expert-sorted order; ties in slot order, as a stable
 * sort), xs [N k, hidden] (the token's input rows in that order, model dtype). x [N, hidden] model dtype.
 * order: scratch [N k] int64. Returns 0, 1 when an expert index is outside [0, E), 2 when scratch memory could not be
 * allocated. */
int moe_dispatch(long N, long k, long E, long hidden, int bf16, const int64_t *idx, const void *x, int64_t *counts,
                 int64_t *slot_row, int64_t *order, void *xs, int threads) {
    const long slots = N * k;
    memset(counts, 0, sizeof(int64_t) * (size_t)E);
    for (long i = 0; i < slots; i++) {
        if (idx[i] < 0 || idx[i] >= E) return 1;
        counts[idx[i]]++;
    }
    int64_t *next = malloc(sizeof(int64_t) * (size_t)E);
    if (!next) return 2;
    int64_t start = 0;
    for (long e = 0; e < E; e++) {
        next[e] = start;
        start += counts[e];
    }
    for (long i = 0; i < slots; i++) {
        const int64_t row = next[idx[i]]++;
        slot_row[i] = row;
        order[row] = i;
    }
    free(next);
    const gather_job job = {k, slots, (size_t)hidden * (bf16 ? 2 : 4), (const char *)x, order, (char *)xs};
    parallel_for(gather_block, &job, (slots + 63) / 64, threads);
    return 0;
}

/* ---- MoE experts for a few rows: one-row products straight from the packed weights ------------------------------ */

typedef struct {
    long hidden, I;
    int bf16;
    const int64_t *starts, *counts;           /* per work item (one expert): its first row in xs, its row count */
    const int *gate_up_layout, *down_layout;  /* per work item */
    const void *const *gate_up, *const *down; /* per work item: the expert's packed weight memory */
    const void *xs;
    void *out;
    int failed;
} experts_job;

static void experts_item(const void *ctx, long item) {
    experts_job *job = (experts_job *)ctx;
    const long hidden = job->hidden, I = job->I, e = item;
    const size_t esize = job->bf16 ? 2 : 4;
    float *buf = malloc(sizeof(float) * (size_t)ROWS_MAX * (size_t)(hidden + 3 * I + hidden));
    if (!buf) {
        job->failed = 1;
        return;
    }
    float *x = buf, *gate_up = x + ROWS_MAX * hidden, *h = gate_up + ROWS_MAX * 2 * I, *y = h + ROWS_MAX * I;
    const long first = job->starts[item], end = first + job->counts[item];
    for (long r0 = first; r0 < end; r0 += ROWS_MAX) { /* up to 8 rows per pass over the expert's weights */
        const long M = end - r0 < ROWS_MAX ? end - r0 : ROWS_MAX;
        load_row(x, (const char *)job->xs + (size_t)(r0 * hidden) * esize, M * hidden, job->bf16);
        product_rows_f32(job->gate_up_layout[e], job->bf16, 2 * I, hidden, job->gate_up[e], M, x, gate_up);
        for (long m = 0; m < M; m++)
            for (long j = 0; j < I; j++) { /* the product's output, silu's and the gated product each rounded */
                const float gate = as_model_dtype(gate_up[m * 2 * I + j], job->bf16);
                const float up = as_model_dtype(gate_up[m * 2 * I + I + j], job->bf16);
                h[m * I + j] = as_model_dtype(as_model_dtype(silu(gate), job->bf16) * up, job->bf16);
            }
        product_rows_f32(job->down_layout[e], job->bf16, hidden, I, job->down[e], M, h, y);
        store_row((char *)job->out + (size_t)(r0 * hidden) * esize, y, M * hidden, job->bf16);
    }
    free(buf);
}

/* SwiGLU experts (moe.py StackedExperts.expert) on a few rows each, weights read in place from their oneDNN
 * packing (layouts as product_f32): for work item i, rows starts[i] .. starts[i] + counts[i] of xs [rows, hidden]
 * (model dtype) go through the expert whose packed gate | up [2I, hidden] and down [hidden, I] weights are
 * gate_up[i] and down[i]; out [rows, hidden] model dtype. Items are shared among threads.
 * Returns 0, or 1 when scratch memory could not be allocated. */
int moe_experts_rows(long items, long hidden, long I, int bf16, const int64_t *starts, const int64_t *counts,
                     const int *gate_up_layout, const void *const *gate_up, const int *down_layout,
                     const void *const *down, const void *xs, void *out, int threads) {
    experts_job job = {hidden, I, bf16, starts, counts, gate_up_layout, down_layout, gate_up, down, xs, out, 0};
    parallel_for(experts_item, &job, items, threads);
    return job.failed;
}
