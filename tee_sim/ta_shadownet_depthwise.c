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
 * add zero), then clamped; vectorised across channels, a row at a time (row()), the channels past the last
 * whole vector one by one. Not LiteRT's summation order (XNNPACK's differs from its reference kernel's too):
 * within float32 rounding of LiteRT's result, not bit for bit.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "ta_shadownet_kernels.h"

typedef struct {
    const float *src;
    int64_t n, h, w, c, src_img, src_row, src_pix;  /* strides in floats */
    const float *weights;                            /* [kh, kw, c], contiguous (the channels past the
                                                        last whole vector read them) */
    const float *bias;                               /* [c] */
    float *dst;
    int64_t oh, ow, dst_img, dst_row, dst_pix;
    int32_t kh, kw, sh, sw, top, left;
    float lo, hi;                                    /* the activation's clamp (-inf, inf: none) */
    const float *packed;                             /* the weights as [ceil(c / 16)][kh * kw][16] */
} sn_depthwise_params;

/* Tap t's weights (of `taps`) for channels [k, k + SN_VL) in the packed layout. */
INLINE vn tap(const float *packed, int64_t k, int32_t t, int32_t taps) {
    return loadn(packed + (k / LANES) * (taps * LANES) + t * LANES + k % LANES);
}

/* max then min, as LiteRT's ReLU kernels (a NaN passes through) */
INLINE vn clamp(vn v, vn lo, vn hi) {
    v = select(v < lo, lo, v);
    return select(v > hi, hi, v);
}

INLINE float clamp1(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

/* Q outputs of a row whose windows lie inside the input, one row of their taps (at stride `sw`, 1 or 2 a
 * constant where it is inlined): each input vector loaded once, Q independent sums (one sum's 9 FMAs
 * depend on each other; Q of them in flight fill the FMA units). */
#define Q 8
INLINE void taps_row(vn acc[Q], const float *p, int64_t pix, int64_t sw, vn wa, vn wb, vn wc) {
    vn v[(Q - 1) * 2 + 3];
    for (int32_t i = 0; i < (Q - 1) * sw + 3; i++) v[i] = loadn(p + i * pix);
    for (int32_t q = 0; q < Q; q++) {
        acc[q] += v[q * sw] * wa;
        acc[q] += v[q * sw + 1] * wb;
        acc[q] += v[q * sw + 2] * wc;
    }
}

/* The window sums of Q outputs from x (their first window's top left), channels [k, k + SN_VL). */
INLINE void windows(vn acc[Q], const float *x, int64_t row, int64_t pix, int64_t sw, const vn w[9], vn bias) {
    for (int32_t q = 0; q < Q; q++) acc[q] = bias;
    taps_row(acc, x, pix, sw, w[0], w[1], w[2]);
    taps_row(acc, x + row, pix, sw, w[3], w[4], w[5]);
    taps_row(acc, x + 2 * row, pix, sw, w[6], w[7], w[8]);
}

/* The outputs [first, end) of the row whose windows start at input row y0 that lie wholly inside the input
 * (none when the row's windows do not). */
INLINE void inside(const sn_depthwise_params *s, int64_t y0, int64_t *first, int64_t *end) {
    *first = *end = 0;
    if (y0 >= 0 && y0 + s->kh <= s->h && s->w >= s->kw) {
        *first = ((int64_t)s->left + s->sw - 1) / s->sw; /* in 64 bits: stride and pad reach 2^31 - 1 */
        *end = (s->w - s->kw + s->left) / s->sw + 1;
        if (*end > s->ow) *end = s->ow;
        if (*first > *end) *first = *end;
    }
}

/* One output's window sum, channels [k, k + SN_VL), any window: tap by tap, the taps outside the input
 * skipped, the weights loaded as they are used. */
INLINE vn window(const sn_depthwise_params *s, const float *base, int64_t y0, int64_t x0, int64_t k) {
    const int32_t kh = s->kh, kw = s->kw;
    vn acc = loadn(s->bias + k);
    for (int32_t ky = 0; ky < kh; ky++) {
        const int64_t y = y0 + ky;
        if (y < 0 || y >= s->h) continue;
        for (int32_t kx = 0; kx < kw; kx++) {
            const int64_t x = x0 + kx;
            if (x < 0 || x >= s->w) continue;
            acc += loadn(base + y * s->src_row + x * s->src_pix + k)
                 * tap(s->packed, k, ky * kw + kx, kh * kw);
        }
    }
    return acc;
}

/* A 3x3 window wholly inside the input, from x (its top left, channel k): its weights in registers. */
INLINE vn inside_3x3(const sn_depthwise_params *s, const float *x, int64_t k) {
    const int64_t pix = s->src_pix;
    vn acc = loadn(s->bias + k);
    for (int32_t ky = 0; ky < 3; ky++, x += s->src_row) {
        acc += loadn(x) * tap(s->packed, k, ky * 3, 9);
        acc += loadn(x + pix) * tap(s->packed, k, ky * 3 + 1, 9);
        acc += loadn(x + 2 * pix) * tap(s->packed, k, ky * 3 + 2, 9);
    }
    return acc;
}

/* Q outputs' windows wholly inside the input from x (the first's top left, channel k): a 3x3 window with
 * its weights in registers and each input vector loaded once (windows()), any other tap by tap. */
INLINE void block(const sn_depthwise_params *s, int three, const float *x, int64_t k, vn acc[Q]) {
    const vn bias = loadn(s->bias + k);
    if (three) {
        vn w[9];
        for (int32_t t = 0; t < 9; t++) w[t] = tap(s->packed, k, t, 9);
        if (s->sw == 1)
            windows(acc, x, s->src_row, s->src_pix, 1, w, bias);
        else
            windows(acc, x, s->src_row, s->src_pix, 2, w, bias);
        return;
    }
    const int32_t kh = s->kh, kw = s->kw;
    const int64_t step = s->sw * s->src_pix;
    for (int32_t q = 0; q < Q; q++) acc[q] = bias;
    for (int32_t ky = 0; ky < kh; ky++)
        for (int32_t kx = 0; kx < kw; kx++) {
            const vn w = tap(s->packed, k, ky * kw + kx, kh * kw);
            const float *p = x + ky * s->src_row + kx * s->src_pix;
            for (int32_t q = 0; q < Q; q++) acc[q] += loadn(p + q * step) * w;
        }
}

/* Output row oy, channels [0, vectors): pixel by pixel, each pixel's channels in order, so that the layer
 * reads its input and weights in address order; the windows wholly inside the input Q at a time (a 3x3
 * window at stride 1 or 2, any other at any stride), the others one by one, tap by tap at the border. It
 * went channels outermost before - a vector of channels of every pixel, then the next - with the weights
 * in LiteRT's layout: on 512 channels a vector's pixels lie 2 KiB apart, and a 1024-channel layer's nine
 * taps 4 KiB apart, each in the same few sets of the L1 cache, and one dependent chain of FMAs at a time.
 * MobileNet's 13 layers (their shapes, one core, medians of 200 runs of the 13, three runs alternated with
 * the old kernel): 1.97-2.24 -> 1.27-1.50 ms; its TA's time per inference (in-process, 100 inferences,
 * three runs alternated) 4.1-4.3 -> 3.5-3.6 ms. 5x5 layers of EfficientNet's shapes (28x28x240,
 * 14x14x480, 56x56x144 stride 2, 14x14x672; one core, two runs alternated) 487, 232, 311, 325 -> 244, 128,
 * 161, 187 us, where XNNPACK takes 334, 160, 138, 224. Each output's sum is formed in the same order as
 * before: the same bits (a differential run of 2,826 random layers, windows 1x1 to 7x7, strides 1-3, pads
 * 0-3, two images, on the three builds against the kernel before). */
INLINE void row(const sn_depthwise_params *s, const float *base, float *out, int64_t oy, int64_t vectors,
                vn lo, vn hi, const int three) {
    const int64_t pix = s->src_pix, sw = s->sw, left = s->left, ow = s->ow, opix = s->dst_pix;
    const int64_t y0 = oy * s->sh - s->top;
    const float *top = base + y0 * s->src_row;
    float *o = out + oy * s->dst_row;
    int64_t first, end;
    inside(s, y0, &first, &end);
    for (int64_t ox = 0; ox < ow; ox++) {
        if (ox == first) { /* the inside, Q at a time, then one by one */
            for (; ox + Q <= end && (sw <= 2 || !three); ox += Q)
                for (int64_t k = 0; k < vectors; k += SN_VL) {
                    vn acc[Q];
                    block(s, three, top + (ox * sw - left) * pix + k, k, acc);
                    for (int32_t q = 0; q < Q; q++) storen(o + (ox + q) * opix + k, clamp(acc[q], lo, hi));
                }
            if (ox >= ow) break;
        }
        const int64_t x0 = ox * sw - left;
        const int within = three && ox >= first && ox < end;
        for (int64_t k = 0; k < vectors; k += SN_VL)
            storen(o + ox * opix + k, clamp(within ? inside_3x3(s, top + x0 * pix + k, k)
                                                   : window(s, base, y0, x0, k), lo, hi));
    }
}

int sn_depthwise(const sn_depthwise_params *s) {
    const int64_t c = s->c;
    const vn lo = (vn){0} + s->lo, hi = (vn){0} + s->hi;
    const int64_t vectors = c / SN_VL * SN_VL;  /* channels the vector paths compute */
    const int three = s->kh == 3 && s->kw == 3;
    for (int64_t i = 0; i < s->n; i++)
        for (int64_t oy = 0; oy < s->oh && vectors; oy++)
            if (three) /* row() specialised for 3x3 windows, and for the others */
                row(s, s->src + i * s->src_img, s->dst + i * s->dst_img, oy, vectors, lo, hi, 1);
            else
                row(s, s->src + i * s->src_img, s->dst + i * s->dst_img, oy, vectors, lo, hi, 0);
    for (int64_t i = 0; i < s->n && vectors < c; i++) /* the channels left, one by one */
        for (int64_t oy = 0; oy < s->oh; oy++) {
            const int64_t y0 = oy * s->sh - s->top;
            for (int64_t ox = 0; ox < s->ow; ox++) {
                const int64_t x0 = ox * s->sw - s->left;
                float *o = s->dst + i * s->dst_img + oy * s->dst_row + ox * s->dst_pix;
                const float *base = s->src + i * s->src_img;
                for (int64_t k = vectors; k < c; k++) {
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
