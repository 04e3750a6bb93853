/* The vector math of common.h (exp_f32, log1p_f32, sigmoid, silu, softplus), exported for the tests only
 * (tests/test_native.py compares it with libm over fp32's whole range).
 *
 * Reference: Cephes (expf, logf).
 */
#include "common.h"

/* exported for the tests only: 0 exp, 1 log1p, 2 sigmoid, 3 silu, 4 softplus of n values */
void elementwise(int which, long n, const float *x, float *y) {
    for (long i = 0; i < n; i++)
        y[i] = which == 0 ? exp_f32(x[i]) : which == 1 ? log1p_f32(x[i]) : which == 2 ? sigmoid(x[i])
             : which == 3 ? silu(x[i]) : softplus(x[i]);
}
