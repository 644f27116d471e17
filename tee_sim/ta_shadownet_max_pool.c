/* The ShadowNet trusted app's max pool (tee_sim.ta_shadownet_max_pool): MAX_POOL_2D over an NHWC tensor
 * whose channels are contiguous (any other strides: a slice of a concatenation's slot reads in place). Window positions outside the input are skipped, as LiteRT's kernel
 * does (they never win); each output is numpy's np.maximum over the window's positions in row-major order,
 * bit for bit (the second value on ties, a NaN wins), as the numpy version it replaces computed it. One
 * read of each window position and one write per output, where numpy made a pass over the output per
 * window position (yolov4-tiny's 2x2 pool of 104x104x128: 2.0 ms in numpy).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "ta_shadownet_kernels.h"

typedef struct {
    const float *src;
    int64_t n, h, w, c, src_img, src_row, src_pix;  /* strides in floats */
    float *dst;
    int64_t oh, ow, dst_img, dst_row, dst_pix;
    int32_t fh, fw, sh, sw, top, left;
} sn_pool;

INLINE vn max_nan(vn a, vn b) { return select((a > b) | (a != a), a, b); }
INLINE float max_nan1(float a, float b) { return (a > b || a != a) ? a : b; }

int sn_max_pool(const sn_pool *s) {
    int64_t c = s->c;
    for (int64_t i = 0; i < s->n; i++)
        for (int64_t oy = 0; oy < s->oh; oy++) {
            int64_t y0 = oy * s->sh - s->top, y1 = y0 + s->fh;
            y0 = y0 < 0 ? 0 : y0;
            y1 = y1 > s->h ? s->h : y1;
            for (int64_t ox = 0; ox < s->ow; ox++) {
                int64_t x0 = ox * s->sw - s->left, x1 = x0 + s->fw;
                x0 = x0 < 0 ? 0 : x0;
                x1 = x1 > s->w ? s->w : x1;
                float *o = s->dst + i * s->dst_img + oy * s->dst_row + ox * s->dst_pix;
                const float *base = s->src + i * s->src_img;
                if (y0 >= y1 || x0 >= x1) { /* a window wholly in the padding: -inf, as padding with it */
                    for (int64_t k = 0; k < c; k++) o[k] = -INFINITY;
                    continue;
                }
                const float *first = base + y0 * s->src_row + x0 * s->src_pix;
                int64_t k = 0;
                for (; k + SN_VL <= c; k += SN_VL) {
                    vn m = loadn(first + k);
                    for (int64_t y = y0; y < y1; y++)
                        for (int64_t x = (y == y0 ? x0 + 1 : x0); x < x1; x++)
                            m = max_nan(m, loadn(base + y * s->src_row + x * s->src_pix + k));
                    storen(o + k, m);
                }
                for (; k < c; k++) {
                    float m = first[k];
                    for (int64_t y = y0; y < y1; y++)
                        for (int64_t x = (y == y0 ? x0 + 1 : x0); x < x1; x++)
                            m = max_nan1(m, base[y * s->src_row + x * s->src_pix + k]);
                    o[k] = m;
                }
            }
        }
    return 0;
}
