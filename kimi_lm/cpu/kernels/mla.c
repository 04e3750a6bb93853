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
 * The history is read once per work item for all of its heads (rows outer, heads inner), as the plain path's
 * [H, 576] x [576, S] product reads it once; work items are (sequence, group of heads), shared among threads.
 *
 * Reference: kimi_lm/model/mla.py (the oracle); DeepSeek-V3 inference/model.py (absorb).
 */
#include "common.h"

typedef struct {
    long B, H, S_stride, nope, pe, C, V, groups;
    int bf16;
    const void *q;          /* [B, H, nope + pe] */
    const void *history;    /* row b at b * S_stride: [S_b, C + pe] */
    const int64_t *lengths; /* [B] rows of each history that are real */
    const void *w_uk;       /* [H, nope, C] */
    const void *w_uv_t;     /* [H, C, V] */
    float scale;
    void *out;              /* [B, H, V] */
    int failed;
} mla_job;

static void mla_item(const void *ctx, long item) {
    mla_job *job = (mla_job *)ctx;
    const long H = job->H, nope = job->nope, pe = job->pe, C = job->C, V = job->V, D = C + pe;
    const long b = item / job->groups, g = item % job->groups;
    const long h0 = H * g / job->groups, h1 = H * (g + 1) / job->groups, nh = h1 - h0, S = job->lengths[b];
    const int bf16 = job->bf16;
    const size_t es = bf16 ? 2 : 4;
    float *buf = malloc(sizeof(float) * (size_t)(nh * (D + S + C) + D + nope + C));
    if (!buf) {
        job->failed = 1;
        return;
    }
    float *qf = buf;            /* [nh, D] full queries */
    float *p = qf + nh * D;     /* [nh, S] scores, then probabilities */
    float *ol = p + nh * S;     /* [nh, C] Σ p ĉ */
    float *row = ol + nh * C;   /* [D] one history row / weight row in fp32 */
    float *qn = row + D;        /* [nope] */
    float *tmp = qn + nope;     /* [C] */
    for (long k = 0; k < nh; k++) {
        const long h = h0 + k;
        const char *qh = (const char *)job->q + (size_t)((b * H + h) * (nope + pe)) * es;
        load_row(qn, qh, nope, bf16);
        load_row(qf + k * D + C, qh + (size_t)nope * es, pe, bf16);
        memset(tmp, 0, sizeof(float) * (size_t)C);
        for (long d = 0; d < nope; d++) { /* W_UK[h]^T q_nope: rows of W_UK[h] [nope, C] scaled and summed */
            load_row(row, (const char *)job->w_uk + (size_t)((h * nope + d) * C) * es, C, bf16);
            const float x = qn[d];
#pragma omp simd
            for (long c = 0; c < C; c++) tmp[c] += x * row[c];
        }
        for (long c = 0; c < C; c++) qf[k * D + c] = as_model_dtype(tmp[c], bf16);
    }
    const char *hist = (const char *)job->history + (size_t)(b * job->S_stride * D) * es;
    for (long s = 0; s < S; s++) { /* scores: each history row read once for the group's heads */
        load_row(row, hist + (size_t)(s * D) * es, D, bf16);
        for (long k = 0; k < nh; k++) {
            const float *q = qf + k * D;
            float d = 0.0f;
#pragma omp simd reduction(+ : d)
            for (long j = 0; j < D; j++) d += q[j] * row[j];
            p[k * S + s] = as_model_dtype(d, bf16) * job->scale;
        }
    }
    for (long k = 0; k < nh; k++) { /* softmax in fp32, probabilities rounded to the model dtype */
        float *pk = p + k * S, mx = -INFINITY, sum = 0.0f;
        for (long s = 0; s < S; s++) mx = pk[s] > mx ? pk[s] : mx;
        for (long s = 0; s < S; s++) {
            pk[s] = exp_f32(pk[s] - mx);
            sum += pk[s];
        }
        for (long s = 0; s < S; s++) pk[s] = as_model_dtype(pk[s] / sum, bf16);
    }
    memset(ol, 0, sizeof(float) * (size_t)(nh * C));
    for (long s = 0; s < S; s++) { /* Σ_s p_s ĉ_s, the history read once more */
        load_row(row, hist + (size_t)(s * D) * es, C, bf16);
        for (long k = 0; k < nh; k++) {
            const float w = p[k * S + s];
            float *o = ol + k * C;
#pragma omp simd
            for (long c = 0; c < C; c++) o[c] += w * row[c];
        }
    }
    for (long k = 0; k < nh; k++) { /* W_UV[h] o_lat: rows of W_UVᵀ[h] [C, V] scaled and summed */
        const long h = h0 + k;
        float *o = ol + k * C;
        for (long c = 0; c < C; c++) o[c] = as_model_dtype(o[c], bf16);
        memset(tmp, 0, sizeof(float) * (size_t)V);
        for (long c = 0; c < C; c++) {
            load_row(row, (const char *)job->w_uv_t + (size_t)((h * C + c) * V) * es, V, bf16);
            const float x = o[c];
#pragma omp simd
            for (long v = 0; v < V; v++) tmp[v] += x * row[v];
        }
        store_row((char *)job->out + (size_t)((b * H + h) * V) * es, tmp, V, bf16);
    }
    free(buf);
}

/* One absorbed MLA decode token for B sequences (see the top of this file): q [B, H, nope + pe], histories at
 * history + b S_stride rows ([lengths[b], C + pe] each, model dtype), w_uk [H, nope, C], w_uv_t [H, C, V] ->
 * out [B, H, V] (model dtype). Heads split into `groups` per sequence; items shared among `threads`.
 * Returns 0, or 1 when scratch memory could not be allocated. */
int mla_decode(long B, long H, long nope, long pe, long C, long V, int bf16, const void *q, const void *history,
               long S_stride, const int64_t *lengths, const void *w_uk, const void *w_uv_t, float scale, void *out,
               long groups, int threads) {
    mla_job job = {B, H, S_stride, nope, pe, C, V, groups, bf16, q, history, lengths, w_uk, w_uv_t, scale, out, 0};
    parallel_for(mla_item, &job, B * groups, threads);
    return job.failed;
}
