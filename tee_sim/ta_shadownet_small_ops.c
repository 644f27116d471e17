/* The ShadowNet trusted app's small ops, each one C call so that a step made of kernel calls runs on the
 * secure world's fast path instead of the TA's Python (tee_sim.ta_shadownet_small_ops, which measured it):
 *     SN_COPY     dst = src, n * positions * c contiguous floats (a copy, a reshape);
 *     SN_MEAN     dst[i][k] = (sum over p of src[i][p][k]) / positions, the positions (an image's pixels)
 *                 summed in order in float32, then divided, as LiteRT's reference MEAN does;
 *     SN_SOFTMAX  over each of the n * positions rows of c channels: e_k = exp(beta * (x_k - max x)),
 *                 dst_k = e_k / sum e, as LiteRT's reference SOFTMAX (its kernels' exp differs from libm's
 *                 by an ulp or so);
 *     SN_ROWS     n rows of c floats each, row r at dst + r * dst_stride, from src + r * src_stride, or
 *                 zeros with no src (a padded push's border: the mask's values there, or nothing);
 *     SN_SPREAD   0 when the larger of the mean square of the c contiguous floats at src and beta times
 *                 their largest square lies in (lo, hi], else 2 (as sn_run's SPREAD_OUTSIDE, never 1, a
 *                 failed check's answer; the step goes back to the TA's Python):
 *                 whether a plain push's one-time mask may stay at its power of two for this input
 *                 (tee_sim.mask_spread); float lanes, each block's sums in double; with weights, of
 *                 each value times its channel's weight, positions channels to a pixel (a raw input whose
 *                 channels the mixing scales), the mean square that of the largest channel (in double);
 *     SN_LOGISTIC dst = 1 / (1 + exp(-src)), c contiguous floats (EfficientNet's swish and gates), exp
 *                 vectorized here (vexp): within 2 ulps of expf, where libm's is called a float at a time;
 *     SN_HARD_SWISH dst = src * clamp(src / 6 + 1/2, 0, 1), c contiguous floats (XNNPACK's formula);
 *     SN_GELU     dst = src * Phi(src), Phi the normal distribution function, c contiguous floats
 *                 (ConvNeXt's):
 *                 with beta 0, Phi(x) = erfc(-x / sqrt 2) / 2 (LiteRT's exact GELU), erfc by Numerical
 *                 Recipes' erfcc (the formula's relative error below 1.2e-7; in float32 the result is
 *                 within 2.7e-7 of |x|, 2e-6 of itself above -5, 2e-5 in its tail near -12.6, as LiteRT's
 *                 builtin kernel's 1.2e-5 there) on vexp; with beta 1, LiteRT's approximate
 *                 GELU, Phi(x) = (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))) / 2;
 *     SN_DENSE    dst[r][j] = src[r] . weights[j], n rows of positions floats each against c rows of
 *                 weights (a dense layer, or a conv laid out as one, that the TEE computes instead of
 *                 checking it: tee_sim.freivalds' computing): float lanes across each dot product, added
 *                 lane by lane at its end.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "ta_shadownet_kernels.h"

enum { SN_COPY = 0, SN_MEAN = 1, SN_SOFTMAX = 2, SN_ROWS = 3, SN_SPREAD = 4, SN_LOGISTIC = 5,
       SN_HARD_SWISH = 6, SN_GELU = 7, SN_DENSE = 8 };

/* exp of each lane for x in [-88, 88] (the caller clamps): x = n ln2 + r, |r| <= ln2 / 2, e^r by its
 * Taylor polynomial to r^7 (relative error below 2^-24 there), times 2^n built in the exponent's bits. */
INLINE vn vexp(vn x) {
    const vn zero = {0};
    const vn magic = zero + 12582912.0f; /* 1.5 * 2^23: adding it rounds a float below 2^22 to an integer */
    vn n = (x * 1.44269504088896341f + magic) - magic;
    vn r = (x - n * 0.693359375f) - n * -2.12194440e-4f; /* ln2 in two parts: n * hi is exact */
    vn p = zero + 1.0f / 5040;
    p = p * r + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    /* 2^n as 2^(n >> 1) * 2^(n - (n >> 1)), each factor normal (2^-127 itself has no exponent bits: a
     * review found vexp 0 on [-88, -87.68]); the last product rounds a subnormal result once */
    vni whole = __builtin_convertvector(n, vni), half = whole >> 1;
    vni bits1 = (half + 127) << 23, bits2 = (whole - half + 127) << 23;
    vn scale1, scale2;
    memcpy(&scale1, &bits1, sizeof scale1);
    memcpy(&scale2, &bits2, sizeof scale2);
    return p * scale1 * scale2;
}

/* exp of each lane for any x: 0 below -88, exp(88) above 88 (vlogistic discards it there; verfc never). */
INLINE vn vexp_clamped(vn x) {
    const vn zero = {0}, lo = zero - 88.0f, hi = zero + 88.0f;
    vn y = vexp(select(x < lo, lo, select(x > hi, hi, x)));
    return select(x < lo, zero, y);
}

/* 1 / (1 + exp(-x)) of each lane (a NaN stays NaN): above 88 the result is 1 within a float32 rounding;
 * below -88 it is 0, as XNNPACK's (below -87.34; LiteRT's builtin kernel gives subnormals down to -104:
 * 6e-39 apart at most). */
INLINE vn vlogistic(vn x) {
    const vn zero = {0};
    vn y = select(x < -88.0f, zero, 1.0f / (1.0f + vexp_clamped(-x)));
    return select(x == x, y, x);
}

/* erfc(z) of each lane for z >= 0 (Numerical Recipes' erfcc: fractional error below 1.2e-7). */
INLINE vn verfc(vn z) {
    vn t = 1.0f / (1.0f + 0.5f * z);
    vn p = t * 0.17087277f - 0.82215223f;
    p = p * t + 1.48851587f;
    p = p * t - 1.13520398f;
    p = p * t + 0.27886807f;
    p = p * t - 0.18628806f;
    p = p * t + 0.09678418f;
    p = p * t + 0.37409196f;
    p = p * t + 1.00002368f;
    p = p * t - 1.26551223f;
    return t * vexp_clamped(p - z * z);
}

/* x * Phi(x) of each lane (a NaN stays NaN): exact (erf) or approximate (tanh), as LiteRT's GELU. */
INLINE vn vgelu(vn x, int approximate) {
    const vn zero = {0};
    vn phi;
    if (approximate) { /* (1 + tanh(u)) / 2 = logistic(2u): 0 below 2u = -88 (-inf gives NaN, as LiteRT) */
        phi = vlogistic(2.0f * (x * 0.7978845608f * (1.0f + 0.044715f * x * x)));
    } else {  /* erfc(-x / sqrt 2) / 2: for x < 0 from erfc(|x| / sqrt 2), else 1 - erfc(x / sqrt 2) / 2 */
        vn half_tail = 0.5f * verfc(select(x < zero, -x, x) * 0.70710678118654752f);
        phi = select(x < zero, half_tail, 1.0f - half_tail);
    }
    return select(x == x, x * phi, x);
}

INLINE vn vhard_swish(vn x) {
    const vn zero = {0}, one = zero + 1.0f;
    vn g = x * (1.0f / 6) + 0.5f;
    g = select(g > zero, g, zero);
    g = select(g < one, g, one);
    return select(x == x, x * g, x);
}

typedef struct {
    const float *src;
    float *dst;
    int64_t n, positions, c;
    float beta;
    int32_t kind;
    int64_t dst_stride, src_stride;  /* SN_ROWS's, in floats */
    double lo, hi;                   /* SN_SPREAD's band */
    const float *weights;            /* SN_DENSE's, c rows of positions floats */
} sn_small;

INLINE vn smooth(int kind, int approximate, vn x) {
    return kind == SN_LOGISTIC ? vlogistic(x)
         : kind == SN_HARD_SWISH ? vhard_swish(x) : vgelu(x, approximate);
}

int sn_small_op(const sn_small *s) {
    int64_t n = s->n, positions = s->positions, c = s->c;
    switch (s->kind) {
    case SN_COPY:
        memmove(s->dst, s->src, sizeof(float) * (size_t)(n * positions * c));
        return 0;
    case SN_MEAN:
        for (int64_t i = 0; i < n; i++) {
            const float *x = s->src + i * positions * c;
            float *o = s->dst + i * c;
            int64_t k = 0;
            for (; k + SN_VL <= c; k += SN_VL) {
                vn sum = loadn(x + k);
                for (int64_t p = 1; p < positions; p++) sum += loadn(x + p * c + k);
                storen(o + k, sum / (float)positions);
            }
            for (; k < c; k++) {
                float sum = x[k];
                for (int64_t p = 1; p < positions; p++) sum += x[p * c + k];
                o[k] = sum / (float)positions;
            }
        }
        return 0;
    case SN_SOFTMAX:
        for (int64_t r = 0; r < n * positions; r++) {
            const float *x = s->src + r * c;
            float *o = s->dst + r * c;
            float top = x[0], sum = 0.0f;
            for (int64_t k = 1; k < c; k++) top = x[k] > top ? x[k] : top;
            for (int64_t k = 0; k < c; k++) {
                o[k] = expf(s->beta * (x[k] - top));
                sum += o[k];
            }
            for (int64_t k = 0; k < c; k++) o[k] /= sum;
        }
        return 0;
    case SN_ROWS:
        for (int64_t r = 0; r < n; r++) {
            float *o = s->dst + r * s->dst_stride;
            if (s->src)
                memcpy(o, s->src + r * s->src_stride, sizeof(float) * (size_t)c);
            else
                memset(o, 0, sizeof(float) * (size_t)c);
        }
        return 0;
    case SN_SPREAD: { /* float lanes over blocks of 4096, each block's sums added in double */
        double sum = 0.0, spread;
        float top = 0.0f;
        int64_t count = c;
        if (s->weights && positions > 0 && c % positions == 0) {
            count = c / positions; /* values per channel */
            for (int64_t j0 = 0; j0 < positions; j0 += 256) { /* 256 channels' sums at a time */
                int64_t width = positions - j0 < 256 ? positions - j0 : 256;
                double acc[256] = {0};
                float peak[256] = {0}; /* per channel: one chain through every value was 6x a plain check */
                for (int64_t p = 0; p < count; p++) {
                    const float *x = s->src + p * positions + j0;
                    for (int64_t j = 0; j < width; j++) {
                        float u = x[j] * s->weights[j0 + j], uu = u * u;
                        acc[j] += (double)uu;
                        peak[j] = uu > peak[j] ? uu : peak[j];
                    }
                }
                for (int64_t j = 0; j < width; j++) { /* the largest; a NaN is kept: the band's test fails */
                    if (sum == sum && (acc[j] > sum || acc[j] != acc[j])) sum = acc[j];
                    top = peak[j] > top ? peak[j] : top;
                }
            }
        } else {
            add_squares(s->src, c, &sum, &top);
        }
        return in_band(sum, top, count, (double)s->beta, s->lo, s->hi, &spread) ? 0 : 2;
    }
    case SN_LOGISTIC:
    case SN_HARD_SWISH:
    case SN_GELU: {
        const float *x = s->src;
        float *o = s->dst;
        const int kind = s->kind, approximate = s->beta != 0.0f;
        int64_t k = 0;
        for (; k + SN_VL <= c; k += SN_VL)
            storen(o + k, smooth(kind, approximate, loadn(x + k)));
        if (k < c) { /* the last floats, through a vector's room */
            float tail[SN_VL] = {0};
            memcpy(tail, x + k, sizeof(float) * (size_t)(c - k));
            vn v = smooth(kind, approximate, loadn(tail));
            memcpy(o + k, &v, sizeof(float) * (size_t)(c - k));
        }
        return 0;
    }
    case SN_DENSE:
        for (int64_t r = 0; r < n; r++) {
            const float *x = s->src + r * positions;
            float *o = s->dst + r * c;
            for (int64_t j = 0; j < c; j++) {
                const float *w = s->weights + j * positions;
                vn acc = {0};
                int64_t k = 0;
                for (; k + SN_VL <= positions; k += SN_VL) acc += loadn(x + k) * loadn(w + k);
                float lanes[SN_VL], sum = 0.0f;
                memcpy(lanes, &acc, sizeof lanes);
                for (int l = 0; l < SN_VL; l++) sum += lanes[l];
                for (; k < positions; k++) sum += x[k] * w[k];
                o[j] = sum;
            }
        }
        return 0;
    default:
        return -1;
    }
}
