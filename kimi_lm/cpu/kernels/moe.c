/* Mixture of experts: the sigmoid router (moe_route for one token, moe_route_logits for many), SwiGLU (swiglu_rows,
 * and swiglu for contiguous rows, which the dense MLP uses too), the weighted sum of the experts' outputs
 * (weighted_sum_rows, moe_combine), grouping tokens by expert (moe_dispatch) and SwiGLU experts on a few rows each
 * straight from their packed weights (moe_experts_rows). The PyTorch path they replace: kimi_lm/model/moe.py.
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

/* h [I] = silu(gate) * up of one fp32 gate | up row [2 I], with the roundings of the model dtype the PyTorch path
 * makes: the product's output, silu's and the gated product each rounded */
static void swiglu_rounded(long I, int bf16, const float *gate_up, float *h) {
    for (long j = 0; j < I; j++) {
        const float gate = as_model_dtype(gate_up[j], bf16), up = as_model_dtype(gate_up[I + j], bf16);
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
        for (long m = 0; m < M; m++) swiglu_rounded(I, job->bf16, gate_up + m * 2 * I, h + m * I);
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

/* ---- a whole MoE block for one token: route, k experts and the shared expert, weighted sum ---------------------- */

/* A part's weights (a routed expert's or the shared expert's) as moe_decode reads them: gate | up [2 I, hidden] and
 * down [hidden, I] packed by oneDNN (layouts 0 / 1: the packed memory), quantized by MLX (LAYOUT_QUANT) or in FP8
 * blocks (LAYOUT_FP8): gate | up then points at two descriptor pointers, gate's and up's [I, hidden] each, down at
 * one descriptor (qweight, fp8_weight). */
typedef struct {
    long n, hidden; /* n parts: the k routed experts, then the shared expert if any */
    int bf16;
    const int *gate_up_layout, *down_layout; /* per part */
    const void *const *gate_up, *const *down;
    const long *I, *first_item;           /* per part: intermediate size, first gate|up work item */
    void *const *x_in, *const *h_in;       /* per part: x and h prepared for its products (row_input) */
    const float *x;                        /* [hidden] fp32 */
    float *const *gate_up_out, *const *h;  /* per part: [2 I] and [I] fp32 */
    float *const *down_f32;                /* per part: [hidden] fp32 */
    void *const *down_out;                 /* per part: [hidden] model dtype */
} moe_token_job;

/* gate | up as two descriptors (quantized or FP8 parts) rather than one packed weight */
static inline int is_pair(int layout) { return layout == LAYOUT_QUANT || layout == LAYOUT_FP8; }

/* phase 1: 64 rows of one part's gate | up product */
static void moe_token_gate_up(const void *ctx, long item) {
    const moe_token_job *job = (const moe_token_job *)ctx;
    long p = 0;
    while (p + 1 < job->n && job->first_item[p + 1] <= item) p++;
    const long I = job->I[p], r0 = (item - job->first_item[p]) * 64, r1 = r0 + 64 < 2 * I ? r0 + 64 : 2 * I;
    const int layout = job->gate_up_layout[p];
    float *out = job->gate_up_out[p];
    if (is_pair(layout)) { /* rows below I from gate's weight, the rest from up's */
        const void *const *halves = (const void *const *)job->gate_up[p];
        const long hidden = job->hidden;
        if (r0 < I) weight_rows(layout, job->bf16, halves[0], job->x_in[p], hidden, job->x, r0, r1 < I ? r1 : I, out);
        if (r1 > I)
            weight_rows(layout, job->bf16, halves[1], job->x_in[p], hidden, job->x, (r0 > I ? r0 : I) - I, r1 - I,
                        out + I);
        return;
    }
    weight_rows(layout, job->bf16, job->gate_up[p], NULL, job->hidden, job->x, r0, r1, out);
}

/* phase 2: 64 output columns of one part's down product (items ordered part by part, so that each thread streams
 * whole stretches of one weight: interleaving the parts' weights 64 rows at a time measured 1.5x slower) */
static void moe_token_down(const void *ctx, long item) {
    const moe_token_job *job = (const moe_token_job *)ctx;
    const long hidden = job->hidden, chunks = (hidden + 63) / 64, p = item / chunks, r0 = item % chunks * 64;
    const long r1 = r0 + 64 < hidden ? r0 + 64 : hidden;
    float *y = job->down_f32[p];
    weight_rows(job->down_layout[p], job->bf16, job->down[p], job->h_in[p], job->I[p], job->h[p], r0, r1, y);
    store_row((char *)job->down_out[p] + (size_t)r0 * (job->bf16 ? 2 : 4), y + r0, r1 - r0, job->bf16); /* rounded */
}

/* x (fp32) prepared for part p's gate | up, shared with an earlier part that takes the same (*shared set) */
static int gate_up_input(long p, const int *layout, const void *const *gate_up, void *const *prepared, const float *x,
                         int bf16, void **input, int *shared) {
    *shared = 0;
    if (!is_pair(layout[p])) {
        *input = NULL;
        return 0;
    }
    const void *W = ((const void *const *)gate_up[p])[0];
    for (long q = 0; q < p; q++)
        if (is_pair(layout[q]) && same_row_input(layout[q], ((const void *const *)gate_up[q])[0], layout[p], W)) {
            *input = prepared[q];
            *shared = 1;
            return 0;
        }
    return row_input(layout[p], W, x, bf16, input);
}

#define MOE_PARTS_MAX 65 /* top_k <= 64 routed experts and a shared one */

/* The MoE block of one token in one call, as CpuSparseMoE computes it in several (kimi_lm/cpu/moe.py): the router
 * (route_token: W_r [E, hidden] in a layout of router_logits), the k chosen experts' SwiGLU (their gate | up and down
 * weights read in place, per expert arrays of E layouts and pointers as moe_token_job describes: oneDNN-packed or
 * MLX-quantized), and the shared expert's (I_shared > 0: its gate | up and down likewise), summed with the routing
 * weights. Roundings as the multi-call path: each product's output, silu's and the gated product in the model dtype,
 * the sum as weighted_sum_rows.
 * Both phases (gate | up rows of every part, then output columns of every down product) are shared among threads.
 * x, out [hidden] model dtype; idx [top_k] int64 and weights [top_k] fp32 receive the routing.
 * Returns 0, or 1 when scratch memory could not be allocated. */
int moe_decode(long E, long hidden, long I, long top_k, long n_group, long topk_group, int renormalize, float scaling,
               int bf16, const void *x, int router_layout, const void *router, const float *bias,
               const int *gate_up_layouts, const void *const *gate_up, const int *down_layouts, const void *const *down,
               long I_shared,
               int shared_gate_up_layout, const void *shared_gate_up, int shared_down_layout, const void *shared_down,
               int64_t *idx, float *weights, void *out, int threads) {
    const long n = top_k + (I_shared > 0);
    if (n > MOE_PARTS_MAX) return 1;
    /* x, then per part gate | up, h, its down output in fp32 and in the model dtype (in room for fp32) */
    const long scratch = hidden + 3 * (top_k * I + I_shared) + 2 * n * hidden;
    float *buf = malloc(sizeof(float) * (size_t)scratch);
    int part_layout[2][MOE_PARTS_MAX];
    const void *part_w[2][MOE_PARTS_MAX];
    long part_I[MOE_PARTS_MAX], first_item[MOE_PARTS_MAX];
    float *gu[MOE_PARTS_MAX], *h[MOE_PARTS_MAX], *yf[MOE_PARTS_MAX];
    void *y[MOE_PARTS_MAX];
    void *x_in[MOE_PARTS_MAX] = {0}, *h_in[MOE_PARTS_MAX] = {0};
    int x_shared[MOE_PARTS_MAX] = {0};
    int failed = !buf;
    if (!failed)
        failed = route_token(E, hidden, top_k, n_group, topk_group, renormalize, scaling, bf16, x, router_layout,
                             router, bias, idx, weights);
    if (!failed) {
        float *xf = buf, *at = xf + hidden;
        load_row(xf, x, hidden, bf16);
        long items = 0;
        for (long p = 0; p < n && !failed; p++) {
            const int shared = p == top_k;
            const long e = shared ? 0 : idx[p];
            part_layout[0][p] = shared ? shared_gate_up_layout : gate_up_layouts[e];
            part_layout[1][p] = shared ? shared_down_layout : down_layouts[e];
            part_w[0][p] = shared ? shared_gate_up : gate_up[e];
            part_w[1][p] = shared ? shared_down : down[e];
            part_I[p] = shared ? I_shared : I;
            first_item[p] = items;
            items += (2 * part_I[p] + 63) / 64;
            gu[p] = at;
            h[p] = at + 2 * part_I[p];
            yf[p] = at + 3 * part_I[p];
            y[p] = yf[p] + hidden;
            at += 3 * part_I[p] + 2 * hidden;
            failed = gate_up_input(p, part_layout[0], part_w[0], x_in, xf, bf16, &x_in[p], &x_shared[p]);
        }
        moe_token_job job = {n, hidden, bf16, part_layout[0], part_layout[1], part_w[0], part_w[1], part_I,
                             first_item, x_in, h_in, xf, gu, h, yf, y};
        if (!failed) {
            parallel_for(moe_token_gate_up, &job, items, threads);
            for (long p = 0; p < n && !failed; p++) {
                swiglu_rounded(part_I[p], bf16, gu[p], h[p]);
                failed = row_input(part_layout[1][p], part_w[1][p], h[p], bf16, &h_in[p]);
            }
        }
        if (!failed) {
            parallel_for(moe_token_down, &job, n * ((hidden + 63) / 64), threads);
            weighted_sum_rows(top_k, hidden, bf16, (const void *const *)y, weights, n > top_k ? y[top_k] : NULL, out);
        }
    }
    for (long p = 0; p < n; p++) { /* each prepared input once, though parts may share one */
        if (!x_shared[p]) row_input_free(part_layout[0][p], x_in[p]);
        row_input_free(part_layout[1][p], h_in[p]);
    }
    free(buf);
    return failed;
}
