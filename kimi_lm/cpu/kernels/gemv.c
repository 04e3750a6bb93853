/* Products of weights packed by oneDNN (torch.ops.mkldnn._reorder_linear_weight), read in place: product_f32 (one
 * input row, fp32 in and out), product_rows_f32 (up to ROWS_MAX rows per pass over the weight) and packed_gemv (one
 * row in the model dtype, exported).
 *
 * Reference: oneDNN's blocked memory formats (AB16b64a2b); kimi_lm/cpu/native.py (PackedGemv) checks each packed
 * weight against oneDNN's own product before it is used here.
 */
#include "common.h"

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
 * kimi_lm/cpu/native.py checks each packed weight against oneDNN's own product before it is used here. */
void product_f32(int layout, int bf16, long O, long I, const void *w, const float *x, float *y) {
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
void product_rows_f32(int layout, int bf16, long O, long I, const void *w, long M, const float *x, float *y) {
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
