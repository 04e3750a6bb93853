/* Kimi Delta Attention: kda_decode (one token of B sequences in one call), kda_scan (the recurrence over many
 * tokens), kda_prefill_inputs (conv, q/k norms, gates: what comes before the scan) and gated_rms_norm (what comes
 * after it). The PyTorch path they replace, and their reference: kimi_lm/model/kda.py and kimi_lm/ops/kda_naive.py.
 *
 * Reference math: spec shared/specs/kimi_linear.md sections 5-6; fla v0.4.0 fla/layers/kda.py and
 * fla/ops/kda/naive.py.
 */
#include "common.h"

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

/* ---- KDA decode: one token of B sequences ------------------------------------------------------------------------ */

/* One Kimi Delta Attention decode token for B sequences (H heads of width K; values are K wide too).
 *
 * proj       [B, 3D + 2K + H]  model dtype: q | k | v (D = H K) | f_a | g_a | b, the fused input projection's output
 * conv_state [B, W - 1, 3D]    model dtype: the last W - 1 inputs of the q | k | v convs; slides by one (updated)
 * state      [B, H, K, K]      fp32: recurrent state S[key][value] (updated)
 * taps       [W, 3D]           fp32: conv taps, row W - 1 multiplies the current token
 * neg_A      [H]               fp32: -exp(A_log)
 * dt_bias    [H K]             fp32
 * f_b, g_b   [D, K]            the low-rank gate's second products, read in place: packed by oneDNN in layout
 *                              f_layout / g_layout, or MLX-quantized (LAYOUT_QUANT: a qweight; see product_f32)
 * norm_w     [K]               fp32: gated RMSNorm weight; norm_eps its eps; l2_eps the q/k L2-norm eps
 * out        [B, D]            model dtype: gated-normed output, the input of o_proj
 * The B H (sequence, head) pairs are independent: they are shared among `threads` threads (parallel_for).
 * Returns 0, or 1 when the scratch memory could not be allocated.
 */
typedef struct {
    long H, K, W;
    int bf16, f_layout, g_layout;
    const void *proj, *f_b, *g_b;
    void *const *conv_rows; /* [B]: each sequence's conv_state [W - 1, 3D] */
    float *const *state_rows; /* [B]: each sequence's state [H, K, K] */
    void *out;
    const float *taps, *neg_A, *dt_bias, *norm_w;
    float norm_eps, l2_eps;
    const float *f_out, *g_out; /* [B, D] fp32: the gate products f_b(f_a), g_b(g_a) of all rows, made beforehand
                                 * (B > 1: each weight read once for all rows); NULL: each head makes its own rows */
    int failed; /* set when a row could not allocate its scratch memory */
} kda_decode_job;

/* rows [r0, r1) of a gate product y = W x (W [D, K] read in place: oneDNN layout 0 / 1, or a qweight) for one input
 * row x [K] fp32 -> y [r1 - r0] fp32. Returns 0, or 1 when out of memory. */
static int gate_rows(int layout, int bf16, long K, const void *w, long r0, long r1, const float *x, float *y) {
    void *input;
    if (row_input(layout, w, x, bf16, &input)) return 1;
    weight_rows(layout, bf16, w, input, K, x, r0, r1, y - r0); /* weight_rows writes y[r] for the absolute row r */
    row_input_free(layout, input);
    return 0;
}

#if defined(__AVX512F__)
#include <immintrin.h>
#define STATE_STEP_K 128 /* the key and value width of every Kimi Linear / K3 head */
#define SV(m) _mm512_loadu_ps(Si + 16 * (m))
/* The delta-rule step of one head (K = V = 128) with the state read twice, not four times, and the partial sums in
 * registers:
 *     pred = (k d)^T S,  qs = (q d)^T S          one read-only pass (d = exp(g), the decay; k, q scaled)
 *     delta = beta (v - pred);  o = qs + (q . k) delta        (= q^T S_new, S_new = diag(d) S + k delta^T)
 *     S <- diag(d) S + k delta^T                 one read-write pass
 * The two-pass form (decay and predict, then update and read out) stored the state twice and kept its sums in memory:
 * kda_decode of the bench model's heads 20 -> 16 us for one sequence, 78 -> 54 us for 8 (state in L2). */
static void state_step(float *S, const float *decay, const float *q, const float *k, const float *v, float q_scale,
                       float k_scale, float beta, float *o) {
    const __m512 z = _mm512_setzero_ps();
    __m512 p0 = z, p1 = z, p2 = z, p3 = z, p4 = z, p5 = z, p6 = z, p7 = z;
    __m512 s0 = z, s1 = z, s2 = z, s3 = z, s4 = z, s5 = z, s6 = z, s7 = z;
    float qk = 0.0f;
    for (long i = 0; i < STATE_STEP_K; i++) {
        const float ki = k[i] * k_scale, qi = q[i] * q_scale;
        qk += qi * ki;
        const __m512 kd = _mm512_set1_ps(ki * decay[i]), qd = _mm512_set1_ps(qi * decay[i]);
        const float *Si = S + i * STATE_STEP_K;
        __m512 r;
#define PREDICT(m) r = SV(m); p##m = _mm512_fmadd_ps(kd, r, p##m); s##m = _mm512_fmadd_ps(qd, r, s##m);
        PREDICT(0) PREDICT(1) PREDICT(2) PREDICT(3) PREDICT(4) PREDICT(5) PREDICT(6) PREDICT(7)
#undef PREDICT
    }
    const __m512 b = _mm512_set1_ps(beta), qkv = _mm512_set1_ps(qk);
    __m512 d0, d1, d2, d3, d4, d5, d6, d7;
#define DELTA(m)                                                                                                     \
    d##m = _mm512_mul_ps(b, _mm512_sub_ps(_mm512_loadu_ps(v + 16 * (m)), p##m));                                     \
    _mm512_storeu_ps(o + 16 * (m), _mm512_fmadd_ps(qkv, d##m, s##m));
    DELTA(0) DELTA(1) DELTA(2) DELTA(3) DELTA(4) DELTA(5) DELTA(6) DELTA(7)
#undef DELTA
    for (long i = 0; i < STATE_STEP_K; i++) {
        const __m512 di = _mm512_set1_ps(decay[i]), ki = _mm512_set1_ps(k[i] * k_scale);
        float *Si = S + i * STATE_STEP_K;
#define UPDATE(m) _mm512_storeu_ps(Si + 16 * (m), _mm512_fmadd_ps(ki, d##m, _mm512_mul_ps(di, SV(m))));
        UPDATE(0) UPDATE(1) UPDATE(2) UPDATE(3) UPDATE(4) UPDATE(5) UPDATE(6) UPDATE(7)
#undef UPDATE
    }
}
#undef SV
#endif

/* One head h of sequence bi: its q, k, v channels' conv and SiLU (and their slide of the conv window), its rows of
 * the gate products, the delta-rule step on its state and its gated norm; heads are independent. */
static void kda_decode_head(kda_decode_job *job, long bi, long h) {
    const long H = job->H, K = job->K, W = job->W;
    const int bf16 = job->bf16;
    const long D = H * K, C = 3 * D, P = 3 * D + 2 * K + H;
    const size_t esize = bf16 ? 2 : 4;
    float *buf = malloc(sizeof(float) * (size_t)(12 * K));
    if (!buf) {
        job->failed = 1;
        return;
    }
    float *x = buf;        /* [3K] this head's q | k | v inputs, fp32 */
    float *qkv = x + 3 * K; /* [3K] after conv + SiLU */
    float *fa = qkv + 3 * K, *ga = fa + K, *g = ga + K, *z = g + K, *o = z + K, *pr = o + K; /* [K] each */
    const char *row = (const char *)job->proj + (size_t)(bi * P) * esize;
    char *cs = (char *)job->conv_rows[bi];
    for (long sec = 0; sec < 3; sec++) { /* q, k, v: channels sec D + h K .. + K */
        const long c0 = sec * D + h * K;
        float *xs = x + sec * K, *ys = qkv + sec * K;
        load_row(xs, row + (size_t)c0 * esize, K, bf16);
        const float *tap_now = job->taps + (W - 1) * C + c0;
#pragma omp simd
        for (long c = 0; c < K; c++) ys[c] = xs[c] * tap_now[c];
        for (long w = 0; w < W - 1; w++) { /* causal depthwise conv over [conv_state, x] */
            const float *tap = job->taps + w * C + c0;
            if (bf16) {
                const uint16_t *hist = (const uint16_t *)cs + w * C + c0;
#pragma omp simd
                for (long c = 0; c < K; c++) ys[c] += bf16_to_f32(hist[c]) * tap[c];
            } else {
                const float *hist = (const float *)cs + w * C + c0;
#pragma omp simd
                for (long c = 0; c < K; c++) ys[c] += hist[c] * tap[c];
            }
        }
        for (long w = 0; w + 1 < W - 1; w++) /* the window slides by one */
            memcpy(cs + (size_t)(w * C + c0) * esize, cs + (size_t)((w + 1) * C + c0) * esize, (size_t)K * esize);
        if (W > 1) memcpy(cs + (size_t)((W - 2) * C + c0) * esize, row + (size_t)c0 * esize, (size_t)K * esize);
#pragma omp simd
        for (long c = 0; c < K; c++) ys[c] = silu(ys[c]);
    }
    const float b_h = load_one(row + (size_t)(C + 2 * K) * esize, h, bf16);

    /* gates: g = -exp(A_log) softplus(f_b(f_a) + dt_bias), z = g_b(g_a), beta = sigmoid(b); this head's rows */
    if (job->f_out) {
        memcpy(g, job->f_out + bi * D + h * K, sizeof(float) * (size_t)K);
        memcpy(z, job->g_out + bi * D + h * K, sizeof(float) * (size_t)K);
    } else {
        load_row(fa, row + (size_t)C * esize, K, bf16);
        load_row(ga, row + (size_t)(C + K) * esize, K, bf16);
        if (gate_rows(job->f_layout, bf16, K, job->f_b, h * K, (h + 1) * K, fa, g) ||
            gate_rows(job->g_layout, bf16, K, job->g_b, h * K, (h + 1) * K, ga, z)) {
            job->failed = 1;
            free(buf);
            return;
        }
    }
    const float neg_A = job->neg_A[h], *dt_bias = job->dt_bias + h * K;
#pragma omp simd /* both products' outputs rounded to the model dtype, as in PyTorch; g becomes the decay exp(g) */
    for (long i = 0; i < K; i++) {
        z[i] = as_model_dtype(z[i], bf16);
        g[i] = exp_f32(neg_A * softplus(as_model_dtype(g[i], bf16) + dt_bias[i]));
    }

    float *q = qkv, *k = qkv + K, *v = qkv + 2 * K;
    float q_scale, k_scale;
    qk_l2_scales(q, k, K, job->l2_eps, &q_scale, &k_scale);
    const float beta = sigmoid(b_h);
    float *S = job->state_rows[bi] + h * K * K;
#if defined(__AVX512F__)
    if (K == STATE_STEP_K) {
        state_step(S, g, q, k, v, q_scale, k_scale, beta, o);
        gated_norm_head(o, z, job->norm_w, K, job->norm_eps, z);
        store_row((char *)job->out + (size_t)(bi * D + h * K) * esize, z, K, bf16);
        free(buf);
        return;
    }
#endif
    /* S <- diag(exp(g)) S and pred = k^T S in one pass */
    memset(pr, 0, sizeof(float) * (size_t)K);
    for (long i = 0; i < K; i++) {
        const float decay = g[i], ki = k[i] * k_scale;
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
    memset(o, 0, sizeof(float) * (size_t)K);
    for (long i = 0; i < K; i++) {
        const float ki = k[i] * k_scale, qi = q[i] * q_scale;
        float *Si = S + i * K;
#pragma omp simd
        for (long j = 0; j < K; j++) {
            Si[j] += ki * pr[j];
            o[j] += qi * Si[j];
        }
    }
    /* gated RMSNorm, one rounding to the model dtype */
    gated_norm_head(o, z, job->norm_w, K, job->norm_eps, z);
    store_row((char *)job->out + (size_t)(bi * D + h * K) * esize, z, K, bf16);
    free(buf);
}

/* work item: one head of one sequence (the heads of a token are independent) */
static void kda_decode_item(const void *ctx, long item) {
    kda_decode_job *job = (kda_decode_job *)ctx;
    kda_decode_head(job, item / job->H, item % job->H);
}

/* the gate products of a batched step's rows, before its heads: f_b(f_a) and g_b(g_a) [B, D] for B <= ROWS_MAX */
typedef struct {
    long B, D, K;
    int f_layout, g_layout, bf16;
    const void *f_b, *g_b, *f_in, *g_in; /* the weights and their prepared inputs (rows_input) */
    const float *fa, *ga;                /* [B, K] fp32 */
    float *f_out, *g_out;                /* [B, D] fp32 */
} gate_products_job;

/* 64 output rows of f_b or g_b (items: f_b's chunks, then g_b's) for all B rows */
static void gate_products_item(const void *ctx, long item) {
    const gate_products_job *job = (const gate_products_job *)ctx;
    const long chunks = (job->D + 63) / 64, second = item >= chunks, r0 = (item % chunks) * 64;
    const long r1 = r0 + 64 < job->D ? r0 + 64 : job->D;
    weight_rows_m(second ? job->g_layout : job->f_layout, job->bf16, second ? job->g_b : job->f_b,
                  second ? job->g_in : job->f_in, job->K, job->D, job->B, second ? job->ga : job->fa, r0, r1,
                  second ? job->g_out : job->f_out);
}

/* kda_decode with each sequence's caches where they lie: conv_rows[b] [W - 1, 3D] and state_rows[b] [H, K, K] (a
 * batched decode step of sequences with caches of their own: nothing stacked, nothing copied back). Several sequences
 * (up to ROWS_MAX): the gate products of all of them first, each weight read once for all (a head making its own rows
 * of both read 128 KiB per head and sequence at the bench model's sizes). */
int kda_decode_rows(long B, long H, long K, long W, int bf16, const void *proj, void *const *conv_rows,
                    float *const *state_rows, const float *taps, const float *neg_A, const float *dt_bias, int f_layout,
                    const void *f_b, int g_layout, const void *g_b, const float *norm_w, float norm_eps, float l2_eps,
                    void *out, int threads) {
    kda_decode_job job = {H, K, W, bf16, f_layout, g_layout, proj, f_b, g_b, conv_rows, state_rows, out, taps, neg_A,
                          dt_bias, norm_w, norm_eps, l2_eps, NULL, NULL, 0};
    float *gates = NULL;
    if (B > 1 && B <= ROWS_MAX) { /* the gate products of all rows first, each weight read once for them */
        const long D = H * K, P = 3 * D + 2 * K + H;
        const size_t es = bf16 ? 2 : 4;
        gates = malloc(sizeof(float) * (size_t)(2 * B * K + 2 * B * D));
        if (!gates) return 1;
        float *fa = gates, *ga = fa + B * K, *f_out = ga + B * K, *g_out = f_out + B * D;
        for (long b = 0; b < B; b++) {
            const char *row = (const char *)proj + (size_t)(b * P) * es;
            load_row(fa + b * K, row + (size_t)(3 * D) * es, K, bf16);
            load_row(ga + b * K, row + (size_t)(3 * D + K) * es, K, bf16);
        }
        void *f_in = NULL, *g_in = NULL;
        int failed = rows_input(f_layout, f_b, B, fa, bf16, &f_in) || rows_input(g_layout, g_b, B, ga, bf16, &g_in);
        if (!failed) {
            const gate_products_job gj = {B, D, K, f_layout, g_layout, bf16, f_b, g_b, f_in, g_in, fa, ga, f_out, g_out};
            parallel_for(gate_products_item, &gj, 2 * ((D + 63) / 64), threads);
        }
        row_input_free(f_layout, f_in);
        row_input_free(g_layout, g_in);
        if (failed) {
            free(gates);
            return 1;
        }
        job.f_out = f_out;
        job.g_out = g_out;
    }
    parallel_for(kda_decode_item, &job, B * H, threads);
    free(gates);
    return job.failed;
}

int kda_decode(long B, long H, long K, long W, int bf16, const void *proj, void *conv_state, float *state,
               const float *taps, const float *neg_A, const float *dt_bias, int f_layout, const void *f_b,
               int g_layout, const void *g_b, const float *norm_w, float norm_eps, float l2_eps, void *out,
               int threads) {
    void **rows = malloc(sizeof(void *) * (size_t)(2 * B));
    if (!rows) return 1;
    const long D = H * K;
    for (long b = 0; b < B; b++) {
        rows[b] = (char *)conv_state + (size_t)(b * (W - 1) * 3 * D) * (bf16 ? 2 : 4);
        rows[B + b] = state + b * H * K * K;
    }
    const int failed = kda_decode_rows(B, H, K, W, bf16, proj, rows, (float *const *)(rows + B), taps, neg_A, dt_bias,
                                       f_layout, f_b, g_layout, g_b, norm_w, norm_eps, l2_eps, out, threads);
    free(rows);
    return failed;
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
