/* RMSNorm over many rows (kimi_lm/model/layers.py RMSNorm), split among threads. KDA's gated output norm is with
 * the rest of KDA (kda.c).
 *
 * Reference: Zhang and Sennrich 2019, Root Mean Square Layer Normalization.
 */
#include "common.h"

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
