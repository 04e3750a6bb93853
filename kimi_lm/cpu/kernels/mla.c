/* Multi-head Latent Attention, one decode token per sequence in the absorbed form, in one call (mla_decode): what
 * kimi_lm/model/mla.py attend_absorbed and attend_latent do for T = 1 with ~45 tensor ops per layer (bmm, cat,
 * permutes, two matmuls over the history, softmax, casts), each costing several microseconds in a decode step.
 *
 * Per sequence b and head h (q = [q_nope | q_pe], history rows c_s = [ĉ_s | k_pe_s]):
 *     q_lat = W_UK[h]^T q_nope                  [512]   rounded to the model dtype (as the bmm's output)
 *     score_s = [q_lat | q_pe] . c_s            rounded to the model dtype, then times the softmax scale (fp32)
 *     p = softmax(score)                         fp32, rounded to the model dtype
 *     o_lat = sum_s p_s ĉ_s                      [512]   rounded
 *     o = W_UV[h] o_lat                          [v]     rounded, stored
 * The history is read once per pass for all heads (rows outer, heads inner), as the plain path's [H, 576] x [576, S]
 * product reads it once. Five phases, each shared among threads: the absorbed queries by head and block of columns
 * (for all sequences: W_UK read once per step, not once per sequence), the scores by sequence and range of history
 * rows (a decode step of one sequence splits its history, so that each thread reads its share rather than all of
 * it), the softmax by sequence and head, the weighted latents by sequence and row range, their sums and W_UV by head
 * and block of columns (W_UV read once).
 *
 * Reference: kimi_lm/model/mla.py (the oracle); DeepSeek-V3 inference/model.py (absorb).
 */
#include "common.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#define MLA_AVX512 1
#else
#define MLA_AVX512 0
#endif

#define HEAD_BLOCK 4 /* heads whose dot products with one history row run side by side */

typedef struct {
    long B, H, nope, pe, C, V, splits;
    int bf16;
    const void *q;          /* [B, H, nope + pe] */
    const void *const *histories; /* [B]: sequence b's [S_b, C + pe] rows, contiguous */
    const int64_t *lengths; /* [B] rows of each history that are real */
    const void *w_uk;       /* [H, nope, C] */
    const void *w_uv_t;     /* [H, C, V] */
    float scale;
    void *out;              /* [B, H, V] */
    /* the phases' shared scratch: */
    float *qf;              /* [B, Hq, D] full queries (Hq: H padded to a multiple of HEAD_BLOCK with zero rows) */
    long Hq;
    float *p;               /* [B, Hq, S_max] scores, then probabilities (padding rows zero) */
    float *ol;              /* [B, splits, Hq, C] Σ p ĉ over each split's rows */
    long S_max;
    int failed; /* a phase could not allocate its scratch memory */
} mla_job;

#if !MLA_AVX512
/* columns [c0, c1) of y [n_out] = x W for x [n_in] fp32 and W [n_in, n_out] in the model dtype: W's rows scaled and
 * summed (each row's stretch read once, in order), fp32; y holds just those columns (y[0] is column c0) */
static void vector_matrix(int bf16, long n_in, long n_out, const void *W, const float *x, long c0, long c1, float *y) {
    const long n = c1 - c0;
    memset(y, 0, sizeof(float) * (size_t)n);
    for (long d = 0; d < n_in; d++) {
        const float xd = x[d];
        if (bf16) {
            const uint16_t *row = (const uint16_t *)W + d * n_out + c0;
#pragma omp simd
            for (long c = 0; c < n; c++) y[c] += xd * bf16_to_f32(row[c]);
        } else {
            const float *row = (const float *)W + d * n_out + c0;
#pragma omp simd
            for (long c = 0; c < n; c++) y[c] += xd * row[c];
        }
    }
}
#endif

/* p[k, s] = round(qf[k] . c_s) scale for history rows [s0, s1) of sequence b and its H queries qf [H, D] (rows up to
 * a multiple of HEAD_BLOCK, the extra ones zero): each row read once for all heads, four heads' dot products at a
 * time in 16-lane partial sums (one head's alone is a chain of dependent multiply-adds: 2-3x slower); scratch [D]:
 * a bf16 row widened (an fp32 row is read where it lies: copying it was 8 % of a batch-8 step of the bench model) */
static void scores(const mla_job *job, long b, long s0, long s1, const float *qf, float *p, long S, float *scratch) {
    const long H = job->H, D = job->C + job->pe, full = D / 16 * 16;
    const int bf16 = job->bf16;
    const char *hist = (const char *)job->histories[b];
    for (long s = s0; s < s1; s++) {
        const float *row = (const float *)(hist + (size_t)(s * D) * (bf16 ? 2 : 4)); /* fp32: read in place */
        if (bf16) {
            load_row(scratch, row, D, 1);
            row = scratch;
        }
        for (long k0 = 0; k0 < H; k0 += HEAD_BLOCK) {
            const float *q = qf + k0 * D;
#if MLA_AVX512 /* GCC keeps the portable loop's partial sums on the stack */
            __m512 a[HEAD_BLOCK];
            for (long k = 0; k < HEAD_BLOCK; k++) a[k] = _mm512_setzero_ps();
            for (long j0 = 0; j0 < full; j0 += 16) {
                const __m512 r = _mm512_loadu_ps(row + j0);
                for (long k = 0; k < HEAD_BLOCK; k++)
                    a[k] = _mm512_add_ps(a[k], _mm512_mul_ps(_mm512_loadu_ps(q + k * D + j0), r));
            }
            for (long k = 0; k < HEAD_BLOCK && k0 + k < H; k++) {
                float d = _mm512_reduce_add_ps(a[k]);
                for (long j = full; j < D; j++) d += q[k * D + j] * row[j];
                p[(k0 + k) * S + s] = as_model_dtype(d, bf16) * job->scale;
            }
            continue;
#endif
            float acc[HEAD_BLOCK][16] = {{0}};
            for (long j0 = 0; j0 < full; j0 += 16)
                for (long k = 0; k < HEAD_BLOCK; k++)
#pragma omp simd
                    for (long l = 0; l < 16; l++) acc[k][l] += q[k * D + j0 + l] * row[j0 + l];
            for (long k = 0; k < HEAD_BLOCK && k0 + k < H; k++) {
                float d = 0.0f;
                for (long l = 0; l < 16; l++) d += acc[k][l];
                for (long j = full; j < D; j++) d += q[k * D + j] * row[j];
                p[(k0 + k) * S + s] = as_model_dtype(d, bf16) * job->scale;
            }
        }
    }
}

/* softmax of one head's S scores in fp32, probabilities rounded to the model dtype */
static void softmax_rounded(float *pk, long S, int bf16) {
    float mx = -INFINITY, sum = 0.0f;
    for (long s = 0; s < S; s++) mx = pk[s] > mx ? pk[s] : mx;
    for (long s = 0; s < S; s++) {
        pk[s] = exp_f32(pk[s] - mx);
        sum += pk[s];
    }
    for (long s = 0; s < S; s++) pk[s] = as_model_dtype(pk[s] / sum, bf16);
}

#define LATENT_BLOCK 32 /* latent channels per pass over the rows: one 64-byte line of a bf16 row */

/* ol [Hq, C] = Σ_{s in [s0, s1)} p[k, s] ĉ_s for sequence b (p [Hq, S], rows past H zero): for each block of
 * LATENT_BLOCK channels and HEAD_BLOCK heads, the sums stay in registers while the rows stream by (accumulating into
 * ol row by row was bound by its loads and stores: 2x slower); a block of channels of all rows is read again from
 * L2 for the next heads */
static void weighted_latents(const mla_job *job, long b, long s0, long s1, const float *p, long S, float *ol) {
    const long H = job->H, C = job->C, D = C + job->pe;
    const int bf16 = job->bf16;
    const size_t es = bf16 ? 2 : 4;
    const char *hist = (const char *)job->histories[b];
    for (long c0 = 0; c0 < C; c0 += LATENT_BLOCK) {
        const long n = C - c0 < LATENT_BLOCK ? C - c0 : LATENT_BLOCK;
        for (long k0 = 0; k0 < H; k0 += HEAD_BLOCK) {
#if MLA_AVX512 /* the sums in registers (GCC keeps the portable loop's on the stack); the same roundings */
            if (n == LATENT_BLOCK) {
                __m512 a[HEAD_BLOCK][2];
                for (long k = 0; k < HEAD_BLOCK; k++) a[k][0] = a[k][1] = _mm512_setzero_ps();
                for (long s = s0; s < s1; s++) {
                    const char *at = hist + (size_t)(s * D + c0) * es;
                    __m512 v0, v1;
                    if (bf16) {
                        const __m512i raw = _mm512_loadu_si512(at);
                        const __m512i lo = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(raw));
                        const __m512i hi = _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(raw, 1));
                        v0 = _mm512_castsi512_ps(_mm512_slli_epi32(lo, 16));
                        v1 = _mm512_castsi512_ps(_mm512_slli_epi32(hi, 16));
                    } else {
                        v0 = _mm512_loadu_ps((const float *)at);
                        v1 = _mm512_loadu_ps((const float *)at + 16);
                    }
                    for (long k = 0; k < HEAD_BLOCK; k++) {
                        const __m512 w = _mm512_set1_ps(p[(k0 + k) * S + s]);
                        a[k][0] = _mm512_add_ps(a[k][0], _mm512_mul_ps(w, v0));
                        a[k][1] = _mm512_add_ps(a[k][1], _mm512_mul_ps(w, v1));
                    }
                }
                for (long k = 0; k < HEAD_BLOCK; k++) {
                    _mm512_storeu_ps(ol + (k0 + k) * C + c0, a[k][0]);
                    _mm512_storeu_ps(ol + (k0 + k) * C + c0 + 16, a[k][1]);
                }
                continue;
            }
#endif
            float acc[HEAD_BLOCK][LATENT_BLOCK] = {{0}};
            float v[LATENT_BLOCK] = {0};
            for (long s = s0; s < s1; s++) {
                load_row(v, hist + (size_t)(s * D + c0) * es, n, bf16);
                for (long k = 0; k < HEAD_BLOCK; k++) {
                    const float w = p[(k0 + k) * S + s];
#pragma omp simd
                    for (long l = 0; l < LATENT_BLOCK; l++) acc[k][l] += w * v[l];
                }
            }
            for (long k = 0; k < HEAD_BLOCK; k++) memcpy(ol + (k0 + k) * C + c0, acc[k], sizeof(float) * (size_t)n);
        }
    }
}

/* the history of sequence b split into `splits` row ranges (each read by one thread, twice): several when there are
 * fewer sequences than threads */
static inline void split_rows(const mla_job *job, long b, long i, long *s0, long *s1) {
    const long S = job->lengths[b];
    *s0 = S * i / job->splits;
    *s1 = S * (i + 1) / job->splits;
}

#if MLA_AVX512
/* one tile of Y [B, n_out] = X W (X [B, n_in] fp32, row stride x_stride; W [n_in, n_out] in the model dtype): rows
 * b0 .. b0 + rows (rows <= 4) and columns c .. c + n (n <= 64), 16 named accumulators (an array of them stayed in
 * memory), fused multiply-adds in order of d; y row b at y + b y_stride, column c at y[c - y_c0] */
#define TILE_ROW(r)                                                                                                   \
    if ((r) < rows) {                                                                                                 \
        const __m512 xb = _mm512_set1_ps(x[(b0 + (r)) * x_stride + d]);                                               \
        a##r##0 = _mm512_fmadd_ps(w0, xb, a##r##0);                                                                   \
        a##r##1 = _mm512_fmadd_ps(w1, xb, a##r##1);                                                                   \
        a##r##2 = _mm512_fmadd_ps(w2, xb, a##r##2);                                                                   \
        a##r##3 = _mm512_fmadd_ps(w3, xb, a##r##3);                                                                   \
    }
#define TILE_STORE(r)                                                                                                 \
    if ((r) < rows) {                                                                                                 \
        float *yr = y + (b0 + (r)) * y_stride + (c - y_c0);                                                           \
        _mm512_mask_storeu_ps(yr, k[0], a##r##0);                                                                     \
        _mm512_mask_storeu_ps(yr + 16, k[1], a##r##1);                                                                \
        _mm512_mask_storeu_ps(yr + 32, k[2], a##r##2);                                                                \
        _mm512_mask_storeu_ps(yr + 48, k[3], a##r##3);                                                                \
    }
static inline __m512 load_weights(int bf16, const void *W, long at, __mmask16 k) {
    if (bf16) /* bf16 -> fp32: the 16 bits as the high half */
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, (const uint16_t *)W + at)), 16));
    return _mm512_maskz_loadu_ps(k, (const float *)W + at);
}
static void matrix_tile(int bf16, long n_in, long n_out, const void *W, long c, long n, long b0, long rows,
                        const float *x, long x_stride, float *y, long y_stride, long y_c0) {
    const __m512 z = _mm512_setzero_ps();
    __m512 a00 = z, a01 = z, a02 = z, a03 = z, a10 = z, a11 = z, a12 = z, a13 = z;
    __m512 a20 = z, a21 = z, a22 = z, a23 = z, a30 = z, a31 = z, a32 = z, a33 = z;
    __mmask16 k[4];
    for (int v = 0; v < 4; v++) {
        const long left = n - 16 * v;
        k[v] = left >= 16 ? (__mmask16)0xffff : left > 0 ? (__mmask16)((1u << left) - 1u) : 0;
    }
    for (long d = 0; d < n_in; d++) {
        const long at = d * n_out + c;
        const __m512 w0 = load_weights(bf16, W, at, k[0]), w1 = load_weights(bf16, W, at + 16, k[1]);
        const __m512 w2 = load_weights(bf16, W, at + 32, k[2]), w3 = load_weights(bf16, W, at + 48, k[3]);
        TILE_ROW(0) TILE_ROW(1) TILE_ROW(2) TILE_ROW(3)
    }
    TILE_STORE(0) TILE_STORE(1) TILE_STORE(2) TILE_STORE(3)
}
#endif

/* Y [B, c1 - c0] = columns [c0, c1) of X W for the B rows of X [B, n_in] fp32 (row stride x_stride) and W [n_in,
 * n_out] in the model dtype, each row's sums in order of d: the per-head products of all sequences at once (W's
 * columns read from memory once for all rows) */
static void rows_matrix(int bf16, long n_in, long n_out, const void *W, long B, const float *x, long x_stride,
                        long c0, long c1, float *y) {
#if MLA_AVX512
    for (long b0 = 0; b0 < B; b0 += 4)
        for (long c = c0; c < c1; c += 64)
            matrix_tile(bf16, n_in, n_out, W, c, c1 - c < 64 ? c1 - c : 64, b0, B - b0 < 4 ? B - b0 : 4, x, x_stride, y,
                        c1 - c0, c0);
#else
    for (long b = 0; b < B; b++) vector_matrix(bf16, n_in, n_out, W, x + b * x_stride, c0, c1, y + b * (c1 - c0));
#endif
}

#define COLUMN_BLOCK 256 /* output columns per work item of the per-head products (64: a one-sequence step 34 -> 42 us) */

/* a per-head item's head and its block of columns [c0, c1) of an n-wide output; and its zeroed scratch (NULL, and
 * the job marked failed, when out of memory) */
static inline long head_columns(long item, long n, long *c0, long *c1) {
    const long blocks = (n + COLUMN_BLOCK - 1) / COLUMN_BLOCK;
    *c0 = item % blocks * COLUMN_BLOCK;
    *c1 = *c0 + COLUMN_BLOCK < n ? *c0 + COLUMN_BLOCK : n;
    return item / blocks;
}

static float *phase_scratch(mla_job *job, long floats) {
    float *buf = calloc((size_t)floats, sizeof(float));
    if (!buf) job->failed = 1;
    return buf;
}

/* item = (h, block of COLUMN_BLOCK latent columns): qf[b, h] = [round(W_UK[h]^T q_nope[b, h]) | q_pe[b, h]] for every
 * sequence b, W_UK[h]'s block of columns read from memory once for all of them (per sequence: 1 MiB of W_UK per
 * layer and step at 4 heads in fp32, what a batched step's MLA spent most of its time on) */
static void phase_queries(const void *ctx, long item) {
    mla_job *job = (mla_job *)ctx;
    const long nope = job->nope, pe = job->pe, C = job->C, D = C + pe, B = job->B;
    long c0, c1;
    const long h = head_columns(item, C, &c0, &c1);
    const int bf16 = job->bf16;
    const size_t es = bf16 ? 2 : 4;
    const void *w = (const char *)job->w_uk + (size_t)(h * nope * C) * es;
    float *qn = phase_scratch(job, B * (nope + COLUMN_BLOCK));
    if (!qn) return;
    float *tmp = qn + B * nope;
    for (long b = 0; b < B; b++) {
        const char *qh = (const char *)job->q + (size_t)((b * job->H + h) * (nope + pe)) * es;
        load_row(qn + b * nope, qh, nope, bf16);
        if (c0 == 0) load_row(job->qf + (b * job->Hq + h) * D + C, qh + (size_t)nope * es, pe, bf16);
    }
    rows_matrix(bf16, nope, C, w, B, qn, nope, c0, c1, tmp); /* W_UK[h]^T q of every sequence, these columns */
    for (long b = 0; b < B; b++) {
        float *qf = job->qf + (b * job->Hq + h) * D;
        for (long c = c0; c < c1; c++) qf[c] = as_model_dtype(tmp[b * (c1 - c0) + c - c0], bf16);
    }
    free(qn);
}

static void phase_scores(const void *ctx, long item) { /* item = (b, split) */
    mla_job *job = (mla_job *)ctx;
    const long b = item / job->splits, D = job->C + job->pe;
    long s0, s1;
    split_rows(job, b, item % job->splits, &s0, &s1);
    float row[D];
    scores(job, b, s0, s1, job->qf + b * job->Hq * D, job->p + b * job->Hq * job->S_max, job->S_max, row);
}

static void phase_softmax(const void *ctx, long item) { /* item = (b, h) */
    mla_job *job = (mla_job *)ctx;
    const long b = item / job->H, h = item % job->H;
    softmax_rounded(job->p + (b * job->Hq + h) * job->S_max, job->lengths[b], job->bf16);
}

static void phase_latents(const void *ctx, long item) { /* item = (b, split) */
    mla_job *job = (mla_job *)ctx;
    const long b = item / job->splits;
    long s0, s1;
    split_rows(job, b, item % job->splits, &s0, &s1);
    weighted_latents(job, b, s0, s1, job->p + b * job->Hq * job->S_max, job->S_max, job->ol + item * job->Hq * job->C);
}

/* item = (h, block of COLUMN_BLOCK value columns): out[b, h] = round(W_UV[h] round(o_lat[b, h])) for every sequence b,
 * o_lat the sum of its splits' weighted latents; W_UV[h]'s block of columns read from memory once for all of them */
static void phase_values(const void *ctx, long item) {
    mla_job *job = (mla_job *)ctx;
    const long C = job->C, V = job->V, B = job->B;
    long v0, v1;
    const long h = head_columns(item, V, &v0, &v1);
    const int bf16 = job->bf16;
    const size_t es = bf16 ? 2 : 4;
    const void *w = (const char *)job->w_uv_t + (size_t)(h * C * V) * es;
    float *o = phase_scratch(job, B * (C + COLUMN_BLOCK));
    if (!o) return;
    float *tmp = o + B * C;
    for (long b = 0; b < B; b++) { /* the splits' sums, rounded */
        float *ob = o + b * C;
        memset(ob, 0, sizeof(float) * (size_t)C);
        for (long i = 0; i < job->splits; i++) {
            const float *part = job->ol + ((b * job->splits + i) * job->Hq + h) * C;
#pragma omp simd
            for (long c = 0; c < C; c++) ob[c] += part[c];
        }
        for (long c = 0; c < C; c++) ob[c] = as_model_dtype(ob[c], bf16);
    }
    rows_matrix(bf16, C, V, w, B, o, C, v0, v1, tmp); /* W_UV[h] o_lat of every sequence, these columns */
    for (long b = 0; b < B; b++)
        store_row((char *)job->out + (size_t)((b * job->H + h) * V + v0) * es, tmp + b * (v1 - v0), v1 - v0, bf16);
    free(o);
}

/* One absorbed MLA decode token for B sequences (see the top of this file): q [B, H, nope + pe], histories at
 * histories[b] ([lengths[b], C + pe] each, model dtype, each its own buffer: the rows of a batched step's caches
 * where they lie), w_uk [H, nope, C], w_uv_t [H, C, V] ->
 * out [B, H, V] (model dtype). The phases' items shared among `threads`; each history read in `splits` row ranges
 * (several: a decode step of fewer sequences than threads).
 * Returns 0, or 1 when scratch memory could not be allocated. */
int mla_decode(long B, long H, long nope, long pe, long C, long V, int bf16, const void *q,
               const void *const *histories, const int64_t *lengths, const void *w_uk, const void *w_uv_t, float scale, void *out,
               long splits, int threads) {
    mla_job job = {B, H, nope, pe, C, V, splits < 1 ? 1 : splits, bf16, q, histories, lengths, w_uk, w_uv_t,
                   scale, out, NULL, 0, NULL, NULL, 0, 0};
    for (long b = 0; b < B; b++) job.S_max = lengths[b] > job.S_max ? lengths[b] : job.S_max;
    const long Hq = (H + HEAD_BLOCK - 1) / HEAD_BLOCK * HEAD_BLOCK; /* each sequence's queries padded with zero rows */
    const size_t queries = (size_t)(B * Hq * (C + pe)), probabilities = (size_t)(B * Hq * job.S_max);
    float *buf = malloc(sizeof(float) * (queries + probabilities + (size_t)(B * job.splits * Hq * C)));
    if (!buf) return 1;
    job.qf = buf;
    job.Hq = Hq;
    job.p = job.qf + queries;
    job.ol = job.p + probabilities;
    for (long b = 0; b < B; b++) { /* the padding rows stay zero (the phases write every other one they read) */
        memset(job.qf + (b * Hq + H) * (C + pe), 0, sizeof(float) * (size_t)((Hq - H) * (C + pe)));
        memset(job.p + (b * Hq + H) * job.S_max, 0, sizeof(float) * (size_t)((Hq - H) * job.S_max));
    }
    parallel_for(phase_queries, &job, H * ((C + COLUMN_BLOCK - 1) / COLUMN_BLOCK), threads);
    parallel_for(phase_scores, &job, B * job.splits, threads);
    parallel_for(phase_softmax, &job, B * H, threads);
    parallel_for(phase_latents, &job, B * job.splits, threads);
    parallel_for(phase_values, &job, H * ((V + COLUMN_BLOCK - 1) / COLUMN_BLOCK), threads);
    free(buf);
    return job.failed;
}
