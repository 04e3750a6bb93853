/* Rotary position embedding of a few tokens' rope dims in one call (rope_rotate): what kimi_lm/model/rope.py
 * RotaryEmbedding.__call__ does with ~15 tensor ops (angles, cos, sin, the cos/sin factor, the two halves or the
 * interleaved pairs, the rotation, the cast back), each costing several microseconds in a decode step: two calls per
 * MLA layer of Kimi K2, ~16 % of its bench-model decode step.
 *
 * Same arithmetic in fp32 in the same order (angle = position x inverse frequency; cos and sin times the factor;
 * x1 cos - x2 sin, x2 cos + x1 sin; one rounding to the model dtype); cos and sin from libm, within an ulp of
 * PyTorch's (tests compare).
 *
 * Reference: kimi_lm/model/rope.py (the oracle); RoFormer (Su et al. 2021); DeepSeek-V3 inference/model.py.
 */
#include "common.h"

/* x: rows of `heads` vectors of `dim` values (model dtype), row r at x + r row_stride, head h at + h head_stride
 * (elements), each vector contiguous; positions[r * pos_stride] the row's absolute position; inv_freq [dim / 2] fp32.
 * out [rows, heads, dim] contiguous, model dtype. interleaved: pairs (2i, 2i + 1), else halves (i, i + dim / 2). */
void rope_rotate(long rows, long heads, long dim, int interleaved, int bf16, const void *x, long row_stride,
                 long head_stride, const int64_t *positions, long pos_stride, const float *inv_freq, float factor,
                 void *out) {
    const long half = dim / 2;
    const size_t es = bf16 ? 2 : 4;
    float cs[half], sn[half], v[dim], o[dim];
    for (long r = 0; r < rows; r++) {
        const float pos = (float)positions[r * pos_stride];
        for (long i = 0; i < half; i++) {
            const float angle = pos * inv_freq[i];
            cs[i] = cosf(angle) * factor;
            sn[i] = sinf(angle) * factor;
        }
        for (long h = 0; h < heads; h++) {
            load_row(v, (const char *)x + (size_t)(r * row_stride + h * head_stride) * es, dim, bf16);
            for (long i = 0; i < half; i++) {
                const long a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
                o[a] = v[a] * cs[i] - v[b] * sn[i];
                o[b] = v[b] * cs[i] + v[a] * sn[i];
            }
            store_row((char *)out + (size_t)((r * heads + h) * dim) * es, o, dim, bf16);
        }
    }
}
