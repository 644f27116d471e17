/* The ShadowNet trusted app's linear maps of one pixel's channels, for its restore / push kernel
 * (ta_shadownet_kernels.c): a restore's A and a push's B (block matmuls, gathers, scales, permutations), run
 * over a tile of pixels, and the epilogue a block restore applies to each vector while it is still in a
 * register (offset, addend, activation). Static inline: the kernel's loops inline them. */
#ifndef TA_SHADOWNET_LINEAR_MAP_H
#define TA_SHADOWNET_LINEAR_MAP_H

#include <stdint.h>
#include <string.h>

#include "ta_shadownet_kernels.h"

enum { SN_NONE = 0, SN_GATHER = 1, SN_BLOCKS = 2, SN_SCALE = 3 };
enum { SN_IDENTITY = 0, SN_RELU = 1, SN_RELU6 = 2, SN_RELU_N1_TO_1 = 3, SN_LEAKY_RELU = 4 };

/* A linear map of one pixel's channels, n_in -> n_out.
 * SN_GATHER: out[n] = sum_j coef[j][n] * in[index[j][n]]  (coef NULL: all ones)
 * SN_SCALE:  out[n] = coef[n] * in[n]  (coef NULL: a copy)
 * SN_BLOCKS: in' = order ? in[order] : in; for each block (src, width_in, dst, width_out, at):
 *            out[dst : dst + width_out] = in'[src : src + width_in] @ M, M = mats[at:] as
 *            [width_in][width_out rounded up to 16], zero-padded; blocks in increasing dst order and
 *            tiling [0, n_out) (a block's spill past its width is overwritten by the next one; the last
 *            one's lands in the scratch's spare floats); then, with perm (and no order), out[n] =
 *            out'[perm[n]]. A gather folds its permutation into index and coef. */
typedef struct {
    int32_t kind, n_in, n_out, k;
    const int32_t *index;
    const float *coef;
    const int32_t *order;
    int32_t n_order, nblocks;
    const int32_t *blocks; /* [nblocks][5] */
    const float *mats;
    const int32_t *perm;
} sn_linear;

/* What a restore does to each output vector of its blocks before storing it, while it is still in a
 * register: add the offset (16 channels of pixel p's: offset + p * offset_pix; NULL: none) and the
 * addend (likewise), and apply the activation. */
typedef struct {
    const float *offset;
    int64_t offset_pix;
    int32_t activation;
    float alpha;
    const float *addend;
    int64_t addend_pix;
} epilogue;


/* As activate() below, on one vector (a NaN gives the same result: every comparison is false). */
INLINE vn activated(vn v, int32_t kind, float alpha) {
    const vn zero = {0}, six = zero + 6.0f, one = zero + 1.0f;
    switch (kind) {
    case SN_RELU: return select(v > zero, v, zero);
    case SN_RELU6: v = select(v > zero, v, zero); return select(v < six, v, six);
    case SN_RELU_N1_TO_1: v = select(v > -one, v, -one); return select(v < one, v, one);
    case SN_LEAKY_RELU: { vn a = v * alpha; return select(v > a, v, a); }
    default: return v;
    }
}

INLINE vn finish(vn v, const epilogue *e, int64_t p, int32_t c) {
    if (!e) return v;
    if (e->offset) v += loadn(e->offset + p * e->offset_pix + c);
    if (e->addend) v += loadn(e->addend + p * e->addend_pix + c);
    return activated(v, e->activation, e->alpha);
}

/* activated() of one value. */
INLINE float activated1(float x, int32_t kind, float alpha) {
    float v;
    switch (kind) {
    case SN_RELU: return x > 0.0f ? x : 0.0f;
    case SN_RELU6: v = x > 0.0f ? x : 0.0f; return v < 6.0f ? v : 6.0f;
    case SN_RELU_N1_TO_1: v = x > -1.0f ? x : -1.0f; return v < 1.0f ? v : 1.0f;
    case SN_LEAKY_RELU: v = x * alpha; return x > v ? x : v; /* max(x, alpha * x), 0 <= alpha <= 1 */
    default: return x;
    }
}

/* finish() of one channel. */
INLINE float finish1(float x, const epilogue *e, int64_t p, int32_t c) {
    if (!e) return x;
    if (e->offset) x += e->offset[p * e->offset_pix + c];
    if (e->addend) x += e->addend[p * e->addend_pix + c];
    return activated1(x, e->activation, e->alpha);
}

/* A scale (a depthwise layer's restore) of t pixels, finished as it goes: whole vectors, then the
 * channels left over one by one (nothing is read past a pixel's channels). */
INLINE void scale_rows(const sn_linear *l, const float *in, int64_t in_pix, float *out, int64_t stride,
                       int64_t t, const epilogue *e) {
    int32_t n = l->n_out;
    const float *c = l->coef;
    for (int64_t p = 0; p < t; p++) {
        const float *x = in + p * in_pix;
        float *o = out + p * stride;
        int32_t i = 0;
        for (; i + SN_VL <= n; i += SN_VL)
            storen(o + i, finish(c ? loadn(x + i) * loadn(c + i) : loadn(x + i), e, p, i));
        for (; i < n; i++) o[i] = finish1(c ? x[i] * c[i] : x[i], e, p, i);
    }
}

/* How many pixels ahead block16 asks for the cache lines of a step's source (shared memory the accelerator
 * has just written: in the other core's cache, or in memory). A block restore reads the source in strided
 * passes - 16 channels of each of the tile's pixels, then the next 16 - which the hardware's prefetchers
 * do not follow. On the AVX2 machine, TA time per inference (in-process, alternated in one process):
 * MobileNet 14.0 -> 10.9 ms, yolov4-tiny 35.8 -> 24.3 ms. A scale or a gather reads each pixel's
 * channels in one go, and gained nothing from it. `fetch`: whether `in` is the step's source. */
#define FETCH_AHEAD 16

#if SN_VL == 16
/* out[p] = in[p] @ M for t pixels, M a 16 x 16 block held in registers (16 of AVX-512's 32). */
INLINE void block16(const float *in, int64_t in_pix, float *out, int64_t out_pix, int64_t t,
                    const float *m, const epilogue *e, int32_t c, int fetch) {
    vn m0 = loadn(m), m1 = loadn(m + 16), m2 = loadn(m + 32), m3 = loadn(m + 48), m4 = loadn(m + 64),
       m5 = loadn(m + 80), m6 = loadn(m + 96), m7 = loadn(m + 112), m8 = loadn(m + 128), m9 = loadn(m + 144),
       m10 = loadn(m + 160), m11 = loadn(m + 176), m12 = loadn(m + 192), m13 = loadn(m + 208),
       m14 = loadn(m + 224), m15 = loadn(m + 240);
    for (int64_t p = 0; p < t; p++) {
        const float *x = in + p * in_pix;
        if (fetch) __builtin_prefetch(x + FETCH_AHEAD * in_pix);
        /* two sums: half the chain of dependent FMAs */
        vn a = x[0] * m0 + x[2] * m2, b = x[1] * m1 + x[3] * m3;
        a += x[4] * m4; b += x[5] * m5; a += x[6] * m6; b += x[7] * m7;
        a += x[8] * m8; b += x[9] * m9; a += x[10] * m10; b += x[11] * m11;
        a += x[12] * m12; b += x[13] * m13; a += x[14] * m14; b += x[15] * m15;
        storen(out + p * out_pix, finish(a + b, e, p, c));
    }
}

#else
/* The same where M would not fit in registers (16 x 16 floats: 32 of AVX2's 16): four pixels at a time,
 * each of M's rows read once (from the L1 cache) for the four, into 16 / SN_VL vectors per pixel. */
#define BLOCK_PARTS (16 / SN_VL)
INLINE void block16(const float *in, int64_t in_pix, float *out, int64_t out_pix, int64_t t,
                    const float *m, const epilogue *e, int32_t c, int fetch) {
    int64_t p = 0;
    for (; p + 4 <= t; p += 4) {
        const float *x[4] = {in + p * in_pix, in + (p + 1) * in_pix, in + (p + 2) * in_pix,
                             in + (p + 3) * in_pix};
        if (fetch)
            for (int32_t q = 0; q < 4; q++) __builtin_prefetch(x[q] + FETCH_AHEAD * in_pix);
        vn acc[4][BLOCK_PARTS] = {{{0}}};
        for (int32_t i = 0; i < 16; i++)
            for (int32_t h = 0; h < BLOCK_PARTS; h++) {
                vn row = loadn(m + 16 * i + h * SN_VL);
                for (int32_t q = 0; q < 4; q++) acc[q][h] += x[q][i] * row;
            }
        for (int32_t q = 0; q < 4; q++)
            for (int32_t h = 0; h < BLOCK_PARTS; h++)
                storen(out + (p + q) * out_pix + h * SN_VL, finish(acc[q][h], e, p + q, c + h * SN_VL));
    }
    for (; p < t; p++) { /* two sums: half the chain of dependent FMAs */
        const float *x = in + p * in_pix;
        for (int32_t h = 0; h < BLOCK_PARTS; h++) {
            vn a = {0}, b = {0};
            for (int32_t i = 0; i < 16; i += 2) {
                a += x[i] * loadn(m + 16 * i + h * SN_VL);
                b += x[i + 1] * loadn(m + 16 * (i + 1) + h * SN_VL);
            }
            storen(out + p * out_pix + h * SN_VL, finish(a + b, e, p, c + h * SN_VL));
        }
    }
}
#endif

/* out[p] = in[p] @ M for t pixels, any block shape (M [width_in][padded]). */
INLINE void block_any(const float *in, int64_t in_pix, float *out, int64_t out_pix, int64_t t,
                      const float *m, int32_t width_in, int32_t width_out, const epilogue *e, int32_t c) {
    int32_t padded = (width_out + LANES - 1) / LANES * LANES;
    for (int64_t p = 0; p < t; p++) {
        const float *x = in + p * in_pix;
        for (int32_t c0 = 0; c0 < width_out; c0 += SN_VL) {
            vn a = {0}, b = {0};
            int32_t i = 0;
            for (; i + 2 <= width_in; i += 2) {
                a += x[i] * loadn(m + (int64_t)i * padded + c0);
                b += x[i + 1] * loadn(m + (int64_t)(i + 1) * padded + c0);
            }
            if (i < width_in) a += x[i] * loadn(m + (int64_t)i * padded + c0);
            storen(out + p * out_pix + c0, finish(a + b, e, p, c + c0));
        }
    }
}

/* A pixel's channels (a loop, not a call of memcpy per pixel). */
INLINE void copy(float *restrict dst, const float *restrict x, int32_t n) {
    int32_t i = 0;
    for (; i + SN_VL <= n; i += SN_VL) storen(dst + i, loadn(x + i));
    for (; i < n; i++) dst[i] = x[i];
}

/* One pixel of a gather / scale. */
INLINE void gather1(const sn_linear *l, const float *in, float *out) {
    int32_t n_out = l->n_out;
    const float *c = l->coef;
    if (l->kind == SN_SCALE) {
        if (c)
            for (int32_t n = 0; n < n_out; n++) out[n] = in[n] * c[n];
        else
            copy(out, in, n_out);
        return;
    }
    const int32_t *ix = l->index;
    for (int32_t n = 0; n < n_out; n++) out[n] = c ? c[n] * in[ix[n]] : in[ix[n]];
    for (int32_t j = 1; j < l->k; j++) {
        ix = l->index + (int64_t)j * n_out;
        if (c) {
            const float *cj = c + (int64_t)j * n_out;
            for (int32_t n = 0; n < n_out; n++) out[n] += cj[n] * in[ix[n]];
        } else {
            for (int32_t n = 0; n < n_out; n++) out[n] += in[ix[n]];
        }
    }
}

INLINE void permute(const int32_t *perm, int32_t n, const float *in, float *out) {
    for (int32_t i = 0; i < n; i++) out[i] = in[perm[i]];
}

/* t pixels of `in` (pixel stride in_pix) through `l` into `out` (pixel stride `stride`); `tmp` is a
 * third tile, for the gathered input (order) or the output before its permutation (perm). */
INLINE void apply(const sn_linear *l, const float *in, int64_t in_pix, float *out, int64_t out_pix,
                  float *tmp, int64_t stride, int64_t t, const epilogue *e, int fetch) {
    if (l->kind != SN_BLOCKS) {
        for (int64_t p = 0; p < t; p++) gather1(l, in + p * in_pix, out + p * out_pix);
        return;
    }
    const float *x = in;
    int64_t x_pix = in_pix;
    float *target = l->perm ? tmp : out;
    int64_t target_pix = l->perm ? stride : out_pix;
    if (l->order) {
        for (int64_t p = 0; p < t; p++) permute(l->order, l->n_order, in + p * in_pix, tmp + p * stride);
        x = tmp;
        x_pix = stride;
    }
    for (int32_t b = 0; b < l->nblocks; b++) {
        const int32_t *blk = l->blocks + 5 * (int64_t)b;
        if (blk[1] == 16 && blk[3] <= 16)
            block16(x + blk[0], x_pix, target + blk[2], target_pix, t, l->mats + blk[4], e, blk[2],
                    fetch && x == in);
        else
            block_any(x + blk[0], x_pix, target + blk[2], target_pix, t, l->mats + blk[4], blk[1], blk[3],
                      e, blk[2]);
    }
    if (l->perm)
        for (int64_t p = 0; p < t; p++) permute(l->perm, l->n_out, target + p * stride, out + p * out_pix);
}

/* Whether `l` writes exactly its n_out channels of each pixel, nothing past them (a block's vectors may
 * spill past its width when it is not a multiple of 16). */
INLINE int exact(const sn_linear *l) {
    if (l->kind != SN_BLOCKS) return 1;
    if (l->perm) return 0;
    for (int32_t b = 0; b < l->nblocks; b++) {
        const int32_t *blk = l->blocks + 5 * (int64_t)b;
        if (blk[2] + (blk[3] + LANES - 1) / LANES * LANES > l->n_out) return 0;
    }
    return 1;
}

#endif
