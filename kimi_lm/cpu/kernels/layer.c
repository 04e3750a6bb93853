/* A Kimi Delta Attention decoder layer's decode step in one call, for one sequence or a few decoded together
 * (kda_layer_decode_rows: each product reads its weight once for all of them), strung together
 * from the kernels the layer's modules call one by one (kimi_lm/cpu/layer.py CpuDecoderLayer): input RMSNorm, the
 * fused input products, kda_decode, o_proj, the residual add, the post-attention RMSNorm, the MoE block (moe_decode_rows)
 * or the SwiGLU MLP, and the second residual add. The same kernels in the same order, so the same roundings: the
 * output equals the module path's bit for bit. What it saves is the Python between them (module calls, output
 * allocations, residual adds: ~150 us per layer of a decode step of the bench model, more than its products).
 *
 * Reference: kimi_lm/model/kimi_linear.py DecoderLayer.forward (the oracle); the kernels' own files.
 */
#include "common.h"

/* products of one input read in place, as fused_products takes them: n parts' layouts, weights and widths */
typedef struct {
    long n;
    const int *layouts;
    const void *const *weights;
    const long *outs;
} products;

/* what kda_layer_decode_rows reads besides the tokens and the layer's caches (kimi_lm/cpu/layer.py KDALayerPlan mirrors it) */
typedef struct {
    long hidden;
    int bf16;
    const float *norm1, *norm2; /* [hidden] fp32: input and post-attention RMSNorm weights */
    float eps1, eps2;
    /* the mixer: KDA (arguments of kda_decode) between its input products and o_proj */
    products in_proj; /* [hidden] -> [3D + 2K + H] */
    long H, K, W;
    const float *taps, *neg_A, *dt_bias, *gate_norm;
    float gate_norm_eps, l2_eps;
    int f_layout, g_layout;
    const void *f_b, *g_b;
    products o_proj; /* [D] -> [hidden] */
    /* the feed-forward block: MoE (E > 0: arguments of moe_decode_rows) or the SwiGLU MLP */
    long E, I, top_k, n_group, topk_group;
    int renormalize;
    float scaling;
    int router_layout;
    const void *router;
    const float *bias;
    const int *gate_up_layouts, *down_layouts;
    const void *const *gate_up, *const *down;
    long I_shared;
    int shared_gate_up_layout, shared_down_layout;
    const void *shared_gate_up, *shared_down;
    products mlp_gate_up, mlp_down; /* [hidden] -> [2 I_mlp] and [I_mlp] -> [hidden] */
    long I_mlp;
} kda_layer;

/* out = round(h + delta) in the model dtype, as PyTorch's add */
static void residual_add(long n, int bf16, const void *h, const void *delta, void *out) {
    for (long i = 0; i < n; i++) store_one(out, i, load_one(h, i, bf16) + load_one(delta, i, bf16), bf16);
}

/* One token of each of B <= ROWS_MAX sequences through the layer: h, out [B, hidden] model dtype; conv_rows[b]
 * [W - 1, 3D] (model dtype) and state_rows[b] [H, K, K] fp32, sequence b's KDA cache where it lies, advanced in place.
 * Each product reads its weight once for all B rows. Returns 0, or 1 when scratch memory could not be allocated. */
int kda_layer_decode_rows(const kda_layer *L, long B, const void *h, void *const *conv_rows, float *const *state_rows,
                          void *out, int threads) {
    const long hidden = L->hidden, D = L->H * L->K, P = 3 * D + 2 * L->K + L->H;
    const long I_ffn = L->E ? 0 : L->I_mlp;
    const size_t es = L->bf16 ? 2 : 4;
    if (B < 1 || B > ROWS_MAX || (L->E && L->top_k > 64)) return 1;
    /* model-dtype buffers, B rows each: normed input, projections, KDA output, mixer output, normed FFN input, FFN
     * output, MLP gate | up and its SwiGLU */
    char *buf = malloc(es * (size_t)(B * (4 * hidden + P + D + 3 * I_ffn)));
    if (!buf) return 1;
    char *x1 = buf, *proj = x1 + es * B * hidden, *o = proj + es * B * P, *a = o + es * B * D;
    char *x2 = a + es * B * hidden, *f = x2 + es * B * hidden, *gate_up = f + es * B * hidden;
    char *act = gate_up + es * B * 2 * I_ffn;
    const products *in = &L->in_proj, *op = &L->o_proj;
    int failed = 0;
    rms_norm(B, hidden, L->bf16, h, L->norm1, L->eps1, x1, threads);
    failed = fused_products(in->n, in->layouts, in->weights, in->outs, hidden, L->bf16, B, x1, proj, threads) ||
             kda_decode_rows(B, L->H, L->K, L->W, L->bf16, proj, conv_rows, state_rows, L->taps, L->neg_A,
                             L->dt_bias, L->f_layout, L->f_b, L->g_layout, L->g_b, L->gate_norm, L->gate_norm_eps,
                             L->l2_eps, o, threads) ||
             fused_products(op->n, op->layouts, op->weights, op->outs, D, L->bf16, B, o, a, threads);
    if (!failed) {
        residual_add(B * hidden, L->bf16, h, a, out);
        rms_norm(B, hidden, L->bf16, out, L->norm2, L->eps2, x2, threads);
        if (L->E) {
            int64_t idx[ROWS_MAX * 64];
            float weights[ROWS_MAX * 64];
            failed = moe_decode_rows(B, L->E, hidden, L->I, L->top_k, L->n_group, L->topk_group, L->renormalize,
                                     L->scaling, L->bf16, x2, L->router_layout, L->router, L->bias,
                                     L->gate_up_layouts, L->gate_up, L->down_layouts, L->down, L->I_shared,
                                     L->shared_gate_up_layout, L->shared_gate_up, L->shared_down_layout,
                                     L->shared_down, idx, weights, f, threads);
        } else {
            const products *gu = &L->mlp_gate_up, *dn = &L->mlp_down;
            failed = fused_products(gu->n, gu->layouts, gu->weights, gu->outs, hidden, L->bf16, B, x2, gate_up,
                                    threads);
            if (!failed) {
                swiglu(B, I_ffn, L->bf16, gate_up, act, threads);
                failed = fused_products(dn->n, dn->layouts, dn->weights, dn->outs, I_ffn, L->bf16, B, act, f,
                                        threads);
            }
        }
    }
    if (!failed) residual_add(B * hidden, L->bf16, out, f, out);
    free(buf);
    return failed;
}
