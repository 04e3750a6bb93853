/* Mixture of experts: the sigmoid router (moe_route for one token, moe_route_logits for many), SwiGLU (swiglu_rows,
 * and swiglu for contiguous rows, which the dense MLP uses too), the weighted sum of the experts' outputs
 * (weighted_sum_rows, moe_combine), grouping tokens by expert (moe_dispatch), SwiGLU experts on a few rows each
 * straight from their packed weights (moe_experts_rows) and the whole block for the few tokens of a decode step in one
 * call (moe_decode_rows). The PyTorch path they replace: kimi_lm/model/moe.py.
 *
 * Reference: DeepSeek-V3 inference/model.py (Gate, noaux_tc routing).
 */
#include "common.h"

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

/* The router's logits of one token: xf [hidden] fp32 -> logits [E] = xf W^T, W fp32 [E, hidden] (layout 0: plain rows
 * in fp32) or quantized by MLX (LAYOUT_QUANT: W a qweight; its input prepared from fp32, as CpuPackedRouter hands it
 * x.float()), through the row readers. Returns 0, or 1 when scratch memory could not be allocated. */
static int router_logits(int layout, long E, long hidden, const void *W, const float *xf, float *logits) {
    void *input;
    if (row_input(layout, W, xf, 0, &input)) return 1;
    weight_rows(layout, 0, W, input, hidden, xf, 0, E, logits);
    row_input_free(layout, input);
    return 0;
}

/* moe_route with the router in either layout of router_logits */
static int route_token(long E, long hidden, long top_k, long n_group, long topk_group, int renormalize, float scaling,
                       int bf16, const void *x, int router_layout, const void *W, const float *bias, int64_t *idx,
                       float *weights) {
    float *buf = malloc(sizeof(float) * (size_t)(hidden + 3 * E + n_group));
    unsigned char *taken = malloc((size_t)(E + n_group));
    int failed = !buf || !taken;
    if (!failed) {
        float *xf = buf, *logits = xf + hidden, *scratch = logits + E;
        load_row(xf, x, hidden, bf16);
        failed = router_logits(router_layout, E, hidden, W, xf, logits);
        if (!failed)
            route_logits(E, top_k, n_group, topk_group, renormalize, scaling, logits, bias, scratch, taken, idx,
                         weights);
    }
    free(buf);
    free(taken);
    return failed;
}

/* The router of one token: its logits x W^T (x [hidden] model dtype, W [E, hidden] fp32), then route_logits.
 * Returns 0, or 1 when scratch memory could not be allocated. */
int moe_route(long E, long hidden, long top_k, long n_group, long topk_group, int renormalize, float scaling,
              int bf16, const void *x, const float *W, const float *bias, int64_t *idx, float *weights) {
    return route_token(E, hidden, top_k, n_group, topk_group, renormalize, scaling, bf16, x, 0, W, bias, idx, weights);
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

/* h [I] = silu(gate) * up of one row's fp32 gate [I] and up [I] products, with the roundings of the model dtype the
 * PyTorch path makes: the product's output, silu's and the gated product each rounded */
static void swiglu_rounded(long I, int bf16, const float *gate_in, const float *up_in, float *h) {
    for (long j = 0; j < I; j++) {
        const float gate = as_model_dtype(gate_in[j], bf16), up = as_model_dtype(up_in[j], bf16);
        h[j] = as_model_dtype(as_model_dtype(silu(gate), bf16) * up, bf16);
    }
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
        if (product_rows_f32(job->gate_up_layout[e], job->bf16, 2 * I, hidden, job->gate_up[e], M, x, gate_up)) {
            job->failed = 1;
            break;
        }
        for (long m = 0; m < M; m++) swiglu_rounded(I, job->bf16, gate_up + m * 2 * I, gate_up + m * 2 * I + I, h + m * I);
        if (product_rows_f32(job->down_layout[e], job->bf16, hidden, I, job->down[e], M, h, y)) {
            job->failed = 1;
            break;
        }
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

/* ---- a whole MoE block for a few tokens: route, their experts and the shared expert, weighted sums -------------- */

/* A part's weights (a routed expert's or the shared expert's) as moe_decode_rows reads them: gate | up [2 I, hidden] and
 * down [hidden, I] packed by oneDNN (layouts 0 / 1: the packed memory), quantized by MLX (LAYOUT_QUANT) or in FP8
 * blocks (LAYOUT_FP8): gate | up then points at two descriptor pointers, gate's and up's [I, hidden] each, down at
 * one descriptor (qweight, fp8_weight). A part runs on M rows: the tokens routed to it (the shared expert: all). */
typedef struct {
    long n, hidden; /* n parts: the routed experts chosen (ascending), then the shared expert if any */
    int bf16;
    const int *gate_up_layout, *down_layout; /* per part */
    const void *const *gate_up, *const *down;
    const long *I, *M, *first_item;        /* per part: intermediate size, rows, first gate|up work item */
    void *const *x_in, *const *h_in;       /* per part: x and h prepared for its products (rows_input) */
    float *const *x;                       /* per part: its rows' inputs [M, hidden] fp32 */
    float *const *gate_up_out, *const *h;  /* per part: [M, 2 I] (a pair: gate [M, I] then up [M, I]), [M, I] fp32 */
    float *const *down_f32;                /* per part: [M, hidden] fp32 */
    void *const *down_out;                 /* per part: [M, hidden] model dtype */
} moe_rows_job;

/* gate | up as two descriptors (quantized or FP8 parts) rather than one packed weight */
static inline int is_pair(int layout) { return layout == LAYOUT_QUANT || layout == LAYOUT_FP8; }

/* phase 1: 64 rows of one part's gate | up product, for the part's M input rows */
static void moe_rows_gate_up(const void *ctx, long item) {
    const moe_rows_job *job = (const moe_rows_job *)ctx;
    long p = 0;
    while (p + 1 < job->n && job->first_item[p + 1] <= item) p++;
    const long I = job->I[p], M = job->M[p], hidden = job->hidden;
    const long r0 = (item - job->first_item[p]) * 64, r1 = r0 + 64 < 2 * I ? r0 + 64 : 2 * I;
    const int layout = job->gate_up_layout[p];
    float *out = job->gate_up_out[p];
    if (is_pair(layout)) { /* rows below I from gate's weight, the rest from up's */
        const void *const *halves = (const void *const *)job->gate_up[p];
        if (r0 < I)
            weight_rows_m(layout, job->bf16, halves[0], job->x_in[p], hidden, I, M, job->x[p], r0, r1 < I ? r1 : I,
                          out);
        if (r1 > I)
            weight_rows_m(layout, job->bf16, halves[1], job->x_in[p], hidden, I, M, job->x[p], (r0 > I ? r0 : I) - I,
                          r1 - I, out + M * I);
        return;
    }
    weight_rows_m(layout, job->bf16, job->gate_up[p], NULL, hidden, 2 * I, M, job->x[p], r0, r1, out);
}

/* phase 2: 64 output columns of one part's down product (items ordered part by part, so that each thread streams
 * whole stretches of one weight: interleaving the parts' weights 64 rows at a time measured 1.5x slower) */
static void moe_rows_down(const void *ctx, long item) {
    const moe_rows_job *job = (const moe_rows_job *)ctx;
    const long hidden = job->hidden, chunks = (hidden + 63) / 64, p = item / chunks, r0 = item % chunks * 64;
    const long r1 = r0 + 64 < hidden ? r0 + 64 : hidden, M = job->M[p];
    const size_t es = job->bf16 ? 2 : 4;
    float *y = job->down_f32[p];
    weight_rows_m(job->down_layout[p], job->bf16, job->down[p], job->h_in[p], job->I[p], hidden, M, job->h[p], r0, r1,
                  y);
    for (long m = 0; m < M; m++) /* rounded to the model dtype */
        store_row((char *)job->down_out[p] + (size_t)(m * hidden + r0) * es, y + m * hidden + r0, r1 - r0, job->bf16);
}

/* x (fp32) prepared for part p's gate | up, shared with an earlier part that takes the same rows (*shared set) */
static int gate_up_input(long p, const moe_rows_job *job, void **input, int *shared) {
    *shared = 0;
    *input = NULL;
    const int *layout = job->gate_up_layout;
    if (!is_pair(layout[p])) return 0;
    const void *W = ((const void *const *)job->gate_up[p])[0];
    for (long q = 0; q < p; q++)
        if (is_pair(layout[q]) && job->x[q] == job->x[p] &&
            same_row_input(layout[q], ((const void *const *)job->gate_up[q])[0], layout[p], W)) {
            *input = job->x_in[q];
            *shared = 1;
            return 0;
        }
    return rows_input(layout[p], W, job->M[p], job->x[p], job->bf16, input);
}

/* phase 0: 64 experts' router logits for every token (the router read once for all of them) */
typedef struct {
    int layout;
    const void *W;
    const void *input;
    long E, hidden, N;
    const float *x;
    float *logits; /* [N, E] */
} router_rows_job;

static void router_rows_item(const void *ctx, long item) {
    const router_rows_job *job = (const router_rows_job *)ctx;
    const long r0 = item * 64, r1 = r0 + 64 < job->E ? r0 + 64 : job->E;
    weight_rows_m(job->layout, 0, job->W, job->input, job->hidden, job->E, job->N, job->x, r0, r1, job->logits);
}

/* The MoE block of N <= ROWS_MAX tokens (a decode step of one sequence or a few) in one call, as CpuSparseMoE computes
 * it in several (kimi_lm/cpu/moe.py): the router (W_r [E, hidden], fp32 plain rows or a qweight as router_logits
 * reads it; its product for all tokens at once), each chosen expert's SwiGLU on the tokens routed to it (gate | up and
 * down read in place, once per step, per expert arrays of E layouts and pointers as moe_rows_job describes), the shared
 * expert's on all tokens (I_shared > 0), and each token's sum with its routing weights. Roundings as the multi-call
 * path: each product's output, silu's and the gated product in the model dtype, the sum as weighted_sum_rows.
 * The router's rows, then every part's gate | up rows, then every part's down output columns are shared among threads.
 * x, out [N, hidden] model dtype; idx [N, top_k] int64 and weights [N, top_k] fp32 receive the routing.
 * Returns 0, or 1 when scratch memory could not be allocated (or N is out of range). */
int moe_decode_rows(long N, long E, long hidden, long I, long top_k, long n_group, long topk_group, int renormalize,
                    float scaling, int bf16, const void *x, int router_layout, const void *router, const float *bias,
                    const int *gate_up_layouts, const void *const *gate_up, const int *down_layouts,
                    const void *const *down, long I_shared, int shared_gate_up_layout, const void *shared_gate_up,
                    int shared_down_layout, const void *shared_down, int64_t *idx, float *weights, void *out,
                    int threads) {
    if (N < 1 || N > ROWS_MAX) return 1;
    const size_t es = bf16 ? 2 : 4;
    /* per token: fp32 x [N, hidden], logits [N, E], routing scratch; per part (at most N top_k + 1): what moe_rows_job
     * points at */
    const long max_parts = N * top_k < E ? N * top_k + 1 : E + 1;
    float *xf = malloc(sizeof(float) * (size_t)(N * (hidden + E) + 2 * E + n_group));
    unsigned char *taken = malloc((size_t)(E + n_group));
    int *ints = calloc((size_t)(3 * max_parts), sizeof(int));
    long *longs = malloc(sizeof(long) * (size_t)(3 * max_parts + E));
    void **ptrs = calloc((size_t)(9 * max_parts + N * top_k), sizeof(void *));
    int failed = !xf || !taken || !ints || !longs || !ptrs;
    float *buf = NULL;
    long n = 0;
    int *part_layout[2] = {NULL, NULL}, *x_shared = NULL;
    void **x_in = NULL, **h_in = NULL;
    if (!failed) {
        float *logits = xf + N * hidden, *scratch = logits + N * E;
        load_row(xf, x, N * hidden, bf16);
        void *router_in;
        failed = rows_input(router_layout, router, N, xf, 0, &router_in);
        if (!failed) {
            const router_rows_job rj = {router_layout, router, router_in, E, hidden, N, xf, logits};
            parallel_for(router_rows_item, &rj, (E + 63) / 64, threads);
            row_input_free(router_layout, router_in);
            for (long t = 0; t < N; t++)
                route_logits(E, top_k, n_group, topk_group, renormalize, scaling, logits + t * E, bias, scratch, taken,
                             idx + t * top_k, weights + t * top_k);
        }
    }
    if (!failed) {
        /* parts: the chosen experts in ascending order (counts[e] tokens each), then the shared expert */
        long *counts = longs + 3 * max_parts; /* [E]: tokens routed to e; then e's part index */
        memset(counts, 0, sizeof(long) * (size_t)E);
        for (long i = 0; i < N * top_k; i++) {
            if (idx[i] < 0 || idx[i] >= E) {
                failed = 1;
                break;
            }
            counts[idx[i]]++;
        }
        long *part_I = longs, *part_M = part_I + max_parts, *first_item = part_M + max_parts;
        part_layout[0] = ints;
        part_layout[1] = ints + max_parts;
        x_shared = ints + 2 * max_parts;
        const void **part_w[2] = {(const void **)ptrs, (const void **)ptrs + max_parts};
        float **xs = (float **)(ptrs + 2 * max_parts), **gu = xs + max_parts, **h = gu + max_parts;
        float **yf = h + max_parts;
        void **y = (void **)(yf + max_parts);
        x_in = (void **)(y + max_parts);
        h_in = x_in + max_parts;
        const void **slot_rows = (const void **)(h_in + max_parts); /* [N top_k]: each slot's output row */
        long floats = 0;
        for (long e = 0; e < E && !failed; e++)
            if (counts[e]) {
                part_layout[0][n] = gate_up_layouts[e];
                part_layout[1][n] = down_layouts[e];
                part_w[0][n] = gate_up[e];
                part_w[1][n] = down[e];
                part_I[n] = I;
                part_M[n] = counts[e];
                counts[e] = n++;
            }
        const long routed = n;
        if (I_shared > 0) {
            part_layout[0][n] = shared_gate_up_layout;
            part_layout[1][n] = shared_down_layout;
            part_w[0][n] = shared_gate_up;
            part_w[1][n] = shared_down;
            part_I[n] = I_shared;
            part_M[n++] = N;
        }
        for (long p = 0; p < n; p++) /* gathered inputs (N > 1, routed parts), gate | up, h, down fp32 and rounded */
            floats += part_M[p] * (3 * part_I[p] + 2 * hidden + (N > 1 && p < routed ? hidden : 0));
        buf = failed ? NULL : malloc(sizeof(float) * (size_t)floats);
        failed = failed || !buf;
        long items = 0;
        float *at = buf;
        for (long p = 0; p < n && !failed; p++) {
            const long M = part_M[p], Ip = part_I[p];
            if (N > 1 && p < routed) { /* this expert's tokens, in token order */
                xs[p] = at;
                at += M * hidden;
            } else {
                xs[p] = xf;
            }
            gu[p] = at;
            h[p] = at + M * 2 * Ip;
            yf[p] = h[p] + M * Ip;
            y[p] = yf[p] + M * hidden;
            at = (float *)y[p] + M * hidden;
            first_item[p] = items;
            items += (2 * Ip + 63) / 64;
            if (p < routed) part_M[p] = 0; /* an expert's rows are counted again below as they are placed */
        }
        for (long t = 0; t < N && !failed; t++)
            for (long j = 0; j < top_k; j++) {
                const long p = counts[idx[t * top_k + j]], m = part_M[p]++;
                if (xs[p] != xf) memcpy(xs[p] + m * hidden, xf + t * hidden, sizeof(float) * (size_t)hidden);
                slot_rows[t * top_k + j] = (const char *)y[p] + (size_t)(m * hidden) * es;
            }
        moe_rows_job job = {n, hidden, bf16, part_layout[0], part_layout[1], (const void *const *)part_w[0],
                            (const void *const *)part_w[1], part_I, part_M, first_item, x_in, h_in, xs, gu, h, yf, y};
        for (long p = 0; p < n && !failed; p++) failed = gate_up_input(p, &job, &x_in[p], &x_shared[p]);
        if (!failed) {
            parallel_for(moe_rows_gate_up, &job, items, threads);
            for (long p = 0; p < n && !failed; p++) {
                const long Ip = part_I[p], M = part_M[p];
                const int pair = is_pair(part_layout[0][p]);
                for (long m = 0; m < M; m++)
                    swiglu_rounded(Ip, bf16, gu[p] + (pair ? m * Ip : m * 2 * Ip),
                                   gu[p] + (pair ? (M + m) * Ip : m * 2 * Ip + Ip), h[p] + m * Ip);
                failed = rows_input(part_layout[1][p], part_w[1][p], M, h[p], bf16, &h_in[p]);
            }
        }
        if (!failed) {
            parallel_for(moe_rows_down, &job, n * ((hidden + 63) / 64), threads);
            for (long t = 0; t < N; t++)
                weighted_sum_rows(top_k, hidden, bf16, (const void *const *)slot_rows + t * top_k,
                                  weights + t * top_k, I_shared > 0 ? (const char *)y[n - 1] + (size_t)(t * hidden) * es
                                                                     : NULL,
                                  (char *)out + (size_t)(t * hidden) * es);
        }
    }
    for (long p = 0; p < n && x_in && h_in; p++) { /* each prepared input once, though parts may share one */
        if (!x_shared[p]) row_input_free(part_layout[0][p], x_in[p]);
        row_input_free(part_layout[1][p], h_in[p]);
    }
    free(buf);
    free(xf);
    free(taken);
    free(ints);
    free(longs);
    free(ptrs);
    return failed;
}
