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

int sn_depthwise(const sn_depthwise_params *s) {
    const int64_t c = s->c;
    const vn lo = (vn){0} + s->lo, hi = (vn){0} + s->hi;
    for (int64_t i = 0; i < s->n; i++)
        for (int64_t oy = 0; oy < s->oh; oy++) {
            const int64_t y0 = oy * s->sh - s->top;
            for (int64_t ox = 0; ox < s->ow; ox++) {
                const int64_t x0 = ox * s->sw - s->left;
                float *o = s->dst + i * s->dst_img + oy * s->dst_row + ox * s->dst_pix;
                const float *base = s->src + i * s->src_img;
                int64_t k = 0;
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
