/* Decode-step kernels in plain C: the small-tensor math between the big products of one decode token, as one call.
 *
 * Why: in a CPU decode step the products stream weights at memory bandwidth, and the ~40 small tensor ops between
 * them (conv, norms, gates, the delta rule) each cost 5-15 us of dispatch in place, more than their arithmetic.
 * One C call does the same math in fp32, in the same order of roundings as the PyTorch path it replaces
 * (kimi_lm/model/kda.py, KimiDeltaAttention._decode, which stays as the reference and the fallback); only the
 * order of fp32 summations differs.
 *
 * Built by kimi_lm/ops/native.py with the system C compiler (-O3 -march=native -fopenmp-simd: SIMD pragmas only, no
 * OpenMP runtime) and called through ctypes. Tensors arrive as raw pointers to contiguous memory; `bf16` says whether
 * the model-dtype tensors hold bfloat16 (else float32). Single-threaded: the work per token is tens of microseconds.
 *
 * Reference math: spec shared/specs/kimi_linear.md section 5; fla v0.4.0 fla/layers/kda.py (decode branch).
 */
#include <math.h>
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

static inline float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

/* torch.nn.functional.softplus (beta 1, threshold 20) */
static inline float softplus(float x) { return x > 20.0f ? x : log1pf(expf(x)); }

/* 1 / sqrt(mean(x^2) + eps) over n values */
static float inv_rms(const float *x, long n, float eps) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (long i = 0; i < n; i++) s += x[i] * x[i];
    return 1.0f / sqrtf(s / (float)n + eps);
}

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
 * Returns 0, or 1 when the scratch memory could not be allocated.
 */
int kda_decode(long B, long H, long K, long W, int bf16, const void *proj, void *conv_state, float *state,
                const float *taps, const float *neg_A, const float *dt_bias, int f_layout, const void *f_b,
                int g_layout, const void *g_b, const float *norm_w, float norm_eps, float l2_eps, void *out) {
    const long D = H * K, C = 3 * D, P = 3 * D + 2 * K + H;
    const size_t esize = bf16 ? 2 : 4;
    float *buf = malloc(sizeof(float) * (size_t)(2 * C + 2 * K + H + 4 * D));
    float *x = buf;            /* [C] this token's q | k | v inputs, fp32 */
    float *qkv = x + C;        /* [C] after conv + SiLU */
    float *fa = qkv + C;       /* [K] */
    float *ga = fa + K;        /* [K] */
    float *bb = ga + K;        /* [H] */
    float *g = bb + H;         /* [D] log-decay per head and key channel */
    float *z = g + D;          /* [D] output gate (pre-sigmoid) */
    float *o = z + D;          /* [D] attention output */
    float *pred = o + D;       /* [D] k^T S per head, then delta */
    if (!buf) return 1;
    for (long bi = 0; bi < B; bi++) {
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
        for (long c = 0; c < C; c++) qkv[c] = qkv[c] / (1.0f + expf(-qkv[c]));

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
            /* L2 norms: q / |q| / sqrt(K) (the attention scale folded in), k / |k| */
            const float q_scale = inv_rms(q, K, l2_eps / (float)K) / (float)K;
            const float k_scale = inv_rms(k, K, l2_eps / (float)K) / sqrtf((float)K);
            const float beta = sigmoid(bb[h]);
            float *S = S_b + h * K * K, *pr = pred + h * K, *oh = o + h * K;
            /* S <- diag(exp(g)) S and pred = k^T S in one pass */
            memset(pr, 0, sizeof(float) * (size_t)K);
            for (long i = 0; i < K; i++) {
                const float decay = expf(g[h * K + i]), ki = k[i] * k_scale;
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
            /* gated RMSNorm: (o / rms(o)) w sigmoid(z), one rounding to the model dtype */
            const float r = inv_rms(oh, K, norm_eps);
            for (long j = 0; j < K; j++)
                store_one(out, bi * D + h * K + j, oh[j] * r * norm_w[j] * sigmoid(z[h * K + j]), bf16);
        }
    }
    free(buf);
    return 0;
}

/* ---- mixture of experts, one token ---------------------------------------------------------------------------- */

/* index of the largest value among the n at v that are not yet taken (ties: the lowest index) */
static long argmax_free(const float *v, const unsigned char *taken, long n) {
    long best = -1;
    for (long i = 0; i < n; i++)
        if (!taken[i] && (best < 0 || v[i] > v[best])) best = i;
    return best;
}

/* The sigmoid router of one token (DeepSeek-V3 noaux_tc, as kimi_lm/model/moe.py TopkRouter.forward):
 *   s = sigmoid(x W^T) in fp32; experts chosen by s + bias (within the best topk_group of n_group groups, a group
 *   scoring the sum of its two best), weighted by the unbiased s, renormalised if asked, times scaling.
 * x [hidden] model dtype, W [E, hidden] fp32, bias [E] fp32 -> idx [top_k] int64, weights [top_k] fp32.
 * Returns 0, or 1 when scratch memory could not be allocated. */
int moe_route(long E, long hidden, long top_k, long n_group, long topk_group, int renormalize, float scaling,
              int bf16, const void *x, const float *W, const float *bias, int64_t *idx, float *weights) {
    float *buf = malloc(sizeof(float) * (size_t)(hidden + 2 * E + n_group));
    unsigned char *taken = calloc((size_t)(E + n_group), 1);
    if (!buf || !taken) {
        free(buf);
        free(taken);
        return 1;
    }
    float *xf = buf, *scores = xf + hidden, *choice = scores + E, *group_score = choice + E;
    load_row(xf, x, hidden, bf16);
    for (long e = 0; e < E; e++) {
        const float *row = W + e * hidden;
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (long i = 0; i < hidden; i++) s += row[i] * xf[i];
        scores[e] = sigmoid(s);
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
    free(buf);
    free(taken);
    return 0;
}

/* SwiGLU of n rows: out[r] = silu(gate) * up, where rows[r] points at one [2I] row (gate | up) in the model dtype.
 * As torch does in the model dtype: silu's output is rounded, then the product. out [n, I] model dtype. */
void swiglu_rows(long n, long I, int bf16, const void *const *rows, void *out) {
    for (long r = 0; r < n; r++) {
        for (long j = 0; j < I; j++) {
            const float gate = load_one(rows[r], j, bf16), up = load_one(rows[r], I + j, bf16);
            store_one(out, r * I + j, as_model_dtype(gate / (1.0f + expf(-gate)), bf16) * up, bf16);
        }
    }
}

/* y = sum_r w[r] rows[r] with fp32 accumulation, rounded to the model dtype; then y + shared (rounded again) when
 * shared is not NULL. rows: n pointers to [hidden] in the model dtype; out [hidden] model dtype. */
void weighted_sum_rows(long n, long hidden, int bf16, const void *const *rows, const float *w, const void *shared,
                       void *out) {
    for (long j = 0; j < hidden; j++) {
        float s = 0.0f;
        for (long r = 0; r < n; r++) s += w[r] * load_one(rows[r], j, bf16);
        if (shared) s = as_model_dtype(s, bf16) + load_one(shared, j, bf16);
        store_one(out, j, s, bf16);
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
