/* The ShadowNet trusted app's depthwise convolution (tee_sim.ta_shadownet_depthwise): DEPTHWISE_CONV_2D of
 * depth multiplier 1, no dilation, over an NHWC tensor whose channels are contiguous, with its bias and the
 * clamp of the activation after it, if any (ReLU, ReLU6, ReLU_N1_TO_1: converters.plan_tee fuses it back).
 * The default scheme runs a
 * model's depthwise layers in the TEE (offloaded, their rounds give the pointwise layers around them away:
 * SECURITY.md); through the TEE-side LiteRT each kept an arena of its own, its input and its output
 * (MobileNet: 20.5 MiB of secure memory for 13 layers), and each crossing into it cost a copy. Here the layer
 * reads the TA's liveness-planned arena and writes into it.
 *
 * Each output is the bias plus the window's taps in row-major order, positions in the padding skipped (they
 * add zero), then clamped; vectorised across channels. Not LiteRT's summation order (XNNPACK's differs from its reference
 * kernel's too): within float32 rounding of LiteRT's result, not bit for bit.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "ta_shadownet_kernels.h"

typedef struct {
    const float *src;
    int64_t n, h, w, c, src_img, src_row, src_pix;  /* strides in floats */
    const float *weights;                            /* [kh, kw, c], contiguous */
    const float *bias;                               /* [c] */
    float *dst;
    int64_t oh, ow, dst_img, dst_row, dst_pix;
    int32_t kh, kw, sh, sw, top, left;
    float lo, hi;                                    /* the activation's clamp (-inf, inf: none) */
} sn_depthwise_params;

/* max then min, as LiteRT's ReLU kernels (a NaN passes through) */
INLINE vn clamp(vn v, vn lo, vn hi) {
    v = select(v < lo, lo, v);
    return select(v > hi, hi, v);
}

INLINE float clamp1(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

/* One vector of channels [k, k + SN_VL) of every output pixel, the window's weights held in registers for
 * the whole image (channels outermost: each weight is loaded once per image, where pixel by pixel it was
 * loaded per output; MobileNet's 13 layers, one profile: 2.6 -> 1.5 ms). A window wholly inside the input
 * takes the branch-free 3x3 path; one at the border checks each tap. */
static void channels_3x3(const sn_depthwise_params *s, const float *base, float *out, int64_t k, vn lo, vn hi) {
    const int64_t c = s->c;
    vn w[9];
    for (int32_t t = 0; t < 9; t++) w[t] = loadn(s->weights + t * c + k);
    const vn bias = loadn(s->bias + k);
    for (int64_t oy = 0; oy < s->oh; oy++) {
        const int64_t y0 = oy * s->sh - s->top;
        const int rows_inside = y0 >= 0 && y0 + 3 <= s->h;
        for (int64_t ox = 0; ox < s->ow; ox++) {
            const int64_t x0 = ox * s->sw - s->left;
            vn acc = bias;
            if (rows_inside && x0 >= 0 && x0 + 3 <= s->w) {
                const float *p = base + y0 * s->src_row + x0 * s->src_pix + k;
                for (int32_t ky = 0; ky < 3; ky++, p += s->src_row) {
                    acc += loadn(p) * w[ky * 3];
                    acc += loadn(p + s->src_pix) * w[ky * 3 + 1];
                    acc += loadn(p + 2 * s->src_pix) * w[ky * 3 + 2];
                }
            } else {
                for (int32_t ky = 0; ky < 3; ky++) {
                    const int64_t y = y0 + ky;
                    if (y < 0 || y >= s->h) continue;
                    for (int32_t kx = 0; kx < 3; kx++) {
                        const int64_t x = x0 + kx;
                        if (x < 0 || x >= s->w) continue;
                        acc += loadn(base + y * s->src_row + x * s->src_pix + k) * w[ky * 3 + kx];
                    }
                }
            }
            storen(out + oy * s->dst_row + ox * s->dst_pix + k, clamp(acc, lo, hi));
        }
    }
}

int sn_depthwise(const sn_depthwise_params *s) {
    const int64_t c = s->c;
    const vn lo = (vn){0} + s->lo, hi = (vn){0} + s->hi;
    const int fast = s->kh == 3 && s->kw == 3;
    const int64_t vectors = fast ? c / SN_VL * SN_VL : 0;  /* channels the 3x3 path computes */
    for (int64_t i = 0; i < s->n; i++)
        for (int64_t k = 0; k < vectors; k += SN_VL)
            channels_3x3(s, s->src + i * s->src_img, s->dst + i * s->dst_img, k, lo, hi);
    for (int64_t i = 0; i < s->n; i++)
        for (int64_t oy = 0; oy < s->oh; oy++) {
            const int64_t y0 = oy * s->sh - s->top;
            for (int64_t ox = 0; ox < s->ow; ox++) {
                const int64_t x0 = ox * s->sw - s->left;
                float *o = s->dst + i * s->dst_img + oy * s->dst_row + ox * s->dst_pix;
                const float *base = s->src + i * s->src_img;
                int64_t k = vectors;
                for (; k + SN_VL <= c; k += SN_VL) {
                    vn acc = loadn(s->bias + k);
                    for (int32_t ky = 0; ky < s->kh; ky++) {
                        const int64_t y = y0 + ky;
                        if (y < 0 || y >= s->h) continue;
                        for (int32_t kx = 0; kx < s->kw; kx++) {
                            const int64_t x = x0 + kx;
                            if (x < 0 || x >= s->w) continue;
                            acc += loadn(base + y * s->src_row + x * s->src_pix + k)
                                 * loadn(s->weights + ((int64_t)ky * s->kw + kx) * c + k);
                        }
                    }
                    storen(o + k, clamp(acc, lo, hi));
                }
                for (; k < c; k++) {
                    float acc = s->bias[k];
                    for (int32_t ky = 0; ky < s->kh; ky++) {
                        const int64_t y = y0 + ky;
                        if (y < 0 || y >= s->h) continue;
                        for (int32_t kx = 0; kx < s->kw; kx++) {
                            const int64_t x = x0 + kx;
                            if (x < 0 || x >= s->w) continue;
                            acc += base[y * s->src_row + x * s->src_pix + k]
                                 * s->weights[((int64_t)ky * s->kw + kx) * c + k];
                        }
                    }
                    o[k] = clamp1(acc, s->lo, s->hi);
                }
            }
        }
    return 0;
}
