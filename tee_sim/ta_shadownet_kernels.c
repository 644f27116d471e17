/* The ShadowNet trusted app's restore / push kernel: one pass over a tensor, a tile of pixels at a time.
 *
 * For each pixel (a [rows, cols] grid, channels contiguous), from the accelerator's output or a secure
 * tensor `src`:
 *     a = A(src)          restore: block matmuls or a k-term gather, then an optional permutation
 *     a += offset         per channel (the bias) or per element (bias minus a pop mask)
 *     a = activation(a)   RELU, RELU6, RELU_N1_TO_1, LEAKY_RELU
 *     b = B(a)            the next round's input transform: block matmuls (after an optional gather) or a
 *                         k-term gather; or nothing
 *     dst = b + mask      the one-time or static mask, or none
 * An exact split's (tee_sim.exact_split): a restore's A reads (y_hi - pop_hi) + (y_lo - pop_lo), a push
 * stores [r_hi + q | w - q] for w = b + r_lo, r_hi the mask rounded to the split's grid, q = w rounded.
 * A push is the same with A, the offset and the activation left out. Every intermediate value lives in the
 * caller's scratch (secure memory), a tile of pixels of one row at a time: nothing before its transform
 * and mask reaches `dst`, which may be shared memory. On a verified model the same pass copies each tile
 * of an accelerator's result into secure memory, checks it (Freivalds, below) and restores it from there,
 * and writes the secure copy of what it sends next to `dst`: no extra pass over either tensor.
 *
 * Why C: the numpy version of this step made 4-6 passes over each tensor and called BLAS once per block
 * of 16 channels; this reads each input once and writes each output once. Blocks of 16 x 16 (group
 * mixing's usual case) keep their matrix in 16 vector registers while a tile of pixels streams through:
 * 16 broadcasts and 16 FMAs per pixel (with AVX-512; with narrower vectors the matrix's rows stream from
 * the L1 cache over four pixels at a time). The TA's time per inference (in-process, A/B interleaved on a
 * 2-core VM): ResNet-44 1.3-2.3 -> 0.8-1.5 ms (small tensors: numpy's per-call costs dominated),
 * yolov4-tiny 34 -> 23-25 ms, MobileNet 11.3 -> 9.0-10.3 ms (its restores are bound by memory traffic
 * either way: a 112x112x64 restore takes 0.57 ms in cache, 1.5 ms out of it, a plain copy 0.71 ms).
 * A block restore adds its offset and applies the activation to each vector as it leaves the block, in
 * registers (`epilogue`), instead of two more passes over the tile: a 104x104x64 restore 1.29 -> 0.67 ms
 * with its data in cache; the TA's time per inference (secure-world process, old and new library
 * alternated, medians of 15): yolov4-tiny 28.5-29.0 -> 24.4-25.5 ms, MobileNet 15.5-16.3 -> 10.3-11.9 ms,
 * ResNet-44 1.9-2.3 -> 1.6 ms. Unmasked, the last stage stores straight into dst when it writes exactly
 * dst's channels (in-process TA time: MobileNet 6.5-7.3 -> 5.4-6.0 ms, yolov4-tiny 19.8 -> 14.4-15.4).
 * Written with GCC's vector extension so that it vectorizes on any target; on x86-64, setup.py builds it
 * three times - for AVX-512, AVX2 and the baseline - and the loader picks what the CPU runs (SN_VL below).
 *
 * Plain C, no Python API: tee_sim.ta_shadownet_restore_push loads it with ctypes and passes one
 * `sn_step` per instruction, prepared once when the program is bound.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))

/* LANES: the width of the layouts shared with Python (block matrices padded to it; Freivalds' packed
 * lanes). */
#define LANES 16

/* SN_VL: the restore / push path's vector width in floats, the target's own - 16 with AVX-512, 8 with
 * AVX2, 4 otherwise - as setup.py builds one library per x86-64 level (tee_sim.ta_shadownet_kernels loads
 * the best this CPU runs). GCC lowers a 16-float vector on a target without 64-byte registers badly: every
 * store and comparison went through the stack, element by element, and MobileNet's restores took 3x as
 * long on an AVX2 machine (20 ms per inference against 6.8 on an AVX-512 one). */
#ifndef SN_VL
#define SN_VL 4
#endif
typedef float vn __attribute__((vector_size(SN_VL * sizeof(float))));
typedef int32_t vni __attribute__((vector_size(SN_VL * sizeof(int32_t))));

INLINE vn loadn(const float *p) { vn v; memcpy(&v, p, sizeof v); return v; }
INLINE void storen(float *p, vn v) { memcpy(p, &v, sizeof v); }

#if SN_VL == 16
#define IOTA {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}
#elif SN_VL == 8
#define IOTA {0, 1, 2, 3, 4, 5, 6, 7}
#elif SN_VL == 4
#define IOTA {0, 1, 2, 3}
#else
#error "SN_VL must be 4, 8 or 16"
#endif

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

typedef struct {
    const float *p;   /* NULL: absent */
    int64_t row, pix; /* strides in floats; 0, 0: one vector for every pixel */
} sn_tensor;

typedef struct fv_check fv_check_t; /* below */

typedef struct {
    int64_t rows, cols;
    sn_tensor src;
    sn_linear a;
    sn_tensor offset;
    int32_t activation;
    float alpha;
    sn_linear b;
    sn_tensor mask;
    float *dst;
    int64_t dst_row, dst_pix;
    int32_t channels; /* dst's channels */
    float *scratch;   /* four tiles of `tile` pixels x `stride` floats (stride >= widest + 16) */
    int64_t stride, tile;
    fv_check_t *check; /* NULL, or the check of src (an accelerator's result), made tile by tile */
    float *copy;       /* NULL, or a secure copy of what is written to dst (dst's grid) */
    int64_t copy_row, copy_pix;
    sn_tensor addend;  /* a restore's: a tensor on the output's grid added before the activation (a
                          residual block's shortcut); NULL: none */
    sn_tensor pop;     /* a restore's: an exact split's pop mask (tee_sim.exact_split), 2 * a.n_in channels
                          on src's grid; src then holds [y_hi | y_lo] and A restores (y_hi - pop_hi) +
                          (y_lo - pop_lo), formed a tile at a time; NULL: none */
    float grid;        /* a push's: an exact split's grid, the mask r = r_hi + r_lo (r_hi = r on the grid);
                          dst then receives, per pixel, [r_hi + q | w - q] for w = x + r_lo, q = w on the
                          grid (tee_sim.exact_split); 0: none */
} sn_step;

#define MAX_STACK_BIAS 16384 /* floats: wider per-channel offsets take the unfused path */

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

INLINE vn select(vni m, vn a, vn b) { return (vn)(((vni)a & m) | ((vni)b & ~m)); }

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

/* The activation over n floats, in place: whole vectors, then the rest one by one. */
INLINE void activate(float *x, int64_t n, int32_t kind, float alpha) {
    if (kind == SN_IDENTITY) return;
    int64_t i = 0;
    for (; i + SN_VL <= n; i += SN_VL) storen(x + i, activated(loadn(x + i), kind, alpha));
    for (; i < n; i++) x[i] = activated1(x[i], kind, alpha);
}

INLINE void add_into(float *dst, const float *x, const float *y, int32_t n) {
    for (int32_t i = 0; i < n; i++) dst[i] = x[i] + y[i];
}

/* t pixels of x (+ the mask's, if any) into dst: what a step sends, and its secure copy. */
INLINE void send(float *dst, int64_t dst_pix, const float *x, int64_t x_pix, const float *mask,
                 int64_t mask_pix, int64_t t, int32_t c) {
    for (int64_t p = 0; p < t; p++) {
        if (mask)
            add_into(dst + p * dst_pix, x + p * x_pix, mask + p * mask_pix, c);
        else
            copy(dst + p * dst_pix, x + p * x_pix, c);
    }
}


/* ---------------------------------------------------------------------------------------------------
 * Freivalds' check of one layer (tee_sim.freivalds, which derives the bound).
 *
 * Lanes: k <= 16 projections are padded to kp in {1, 2, 4, 8, 16}, and a vector holds G = 16 / kp
 * channels of each projection (lane l: projection l / G, channel l % G of the group), so that a layer
 * checked with 4 projections fills the vector with 4 channels at a time instead of wasting 12 lanes (the
 * G input values are repeated for every projection by one permutation). Packed
 * filters: [taps][ceil(C / G)][16]; packed projections: [ceil(M / G)][16]; zero where the channel or the
 * projection does not exist. z is kept as kp floats per output position.
 */

typedef struct {
    const float *x;                     /* the secure copy of the layer's input, [N, H, W, C] */
    int64_t n, h, w, c, ho, wo;
    int32_t kh, kw, sh, sw, dh, dw, top, left;
    const float *filters;               /* packed [kh * kw][ceil(C / G)][16] */
    int32_t k, kp;
    float *z;                           /* [N * Ho * Wo][kp] */
    float *tau;                         /* [N * Ho * Wo]: unit * the norm of each output's input window */
    float unit;
    float *norms;                       /* scratch: [N * H * W] input pixels' squared norms, then
                                           [Wo * 17] floats of one output row's sums (prepare_dw: [mp]
                                           of one position's outputs) */
    double tau_norm;                    /* out: ||tau|| */
    const float *dw_weights;            /* depthwise, multiplier 1: the layer's weights [kh * kw][mp],
                                           zero-padded (prepare_dw); NULL: filters (prepare_kp) */
    const float *u;                     /* with dw_weights: the packed projections [ceil(M / G)][16] */
    int64_t mp;                         /* with dw_weights: the channels rounded up to 16 */
} fv_prepare_t;

struct fv_check {
    const float *y;                     /* the secure copy of the accelerator's result, [P, M] */
    int64_t p, m;
    const float *u;                     /* packed projections [ceil(M / G)][16] */
    int32_t k, kp;
    const float *z, *tau;               /* z: [P][kp] and 16 floats of slack */
    double worst;                       /* out: max |u . y_p - z_p| / tau_p (0 where both are 0) */
    double y_norm2;                     /* out, when asked (want_norm): ||y||^2 */
    int32_t want_norm;
};

/* A vector of the packed layout's 16 lanes, as PARTS vectors of the target's width (lane l: part l / SN_VL,
 * lane l % SN_VL of it); with AVX-512, one register. */
#define PARTS (LANES / SN_VL)
typedef struct { vn part[PARTS]; } vl;
typedef struct { vni part[PARTS]; } vli;

INLINE vl vl_load(const float *p) {
    vl v;
    for (int32_t h = 0; h < PARTS; h++) v.part[h] = loadn(p + h * SN_VL);
    return v;
}

INLINE void vl_store(float *p, vl v) {
    for (int32_t h = 0; h < PARTS; h++) storen(p + h * SN_VL, v.part[h]);
}

INLINE vl vl_zero(void) { vl v; for (int32_t h = 0; h < PARTS; h++) v.part[h] = (vn){0}; return v; }

INLINE vl vl_add(vl a, vl b) { for (int32_t h = 0; h < PARTS; h++) a.part[h] += b.part[h]; return a; }

/* acc + a * b, lane by lane */
INLINE vl vl_fma(vl acc, vl a, vl b) {
    for (int32_t h = 0; h < PARTS; h++) acc.part[h] += a.part[h] * b.part[h];
    return acc;
}

INLINE float vl_lane(vl v, int32_t l) { return v.part[l / SN_VL][l % SN_VL]; }

/* The G = 16 / kp floats at base + start (start < 16) repeated kp times (kp is a constant where this is
 * inlined): a load and at most one permutation per part. Reads within base[0, 16) and within
 * base[start, start + max(G, SN_VL)): the caller makes sure they are readable. (Widening a 4-float load
 * instead went through the stack with GCC 12: 7x slower.) */
INLINE vl repeat_at(const float *base, int32_t start, int32_t kp) {
    int32_t g = LANES / kp;
    vl v;
    if (g >= SN_VL) {
        for (int32_t h = 0; h < PARTS; h++) v.part[h] = loadn(base + start + (h * SN_VL) % g);
        return v;
    }
    const vni iota = IOTA;
    int32_t chunk = start / SN_VL * SN_VL; /* g divides SN_VL: the group lies in one chunk */
    vn r = __builtin_shuffle(loadn(base + chunk), iota % g + (start - chunk));
    for (int32_t h = 0; h < PARTS; h++) v.part[h] = r;
    return v;
}

INLINE vl repeat(const float *x, int32_t kp) { return repeat_at(x, 0, kp); }

/* The same where fewer than 16 floats are left in the buffer (the rest read as 0). */
static vl repeat_tail(const float *x, int32_t kp, int64_t room) {
    float tail[LANES] = {0};
    memcpy(tail, x, (size_t)(room < LANES ? room : LANES) * sizeof(float));
    switch (kp) {
    case 1: return repeat(tail, 1);
    case 2: return repeat(tail, 2);
    case 4: return repeat(tail, 4);
    case 8: return repeat(tail, 8);
    default: return repeat(tail, 16);
    }
}

/* Every lane of v gets the sum of its aligned block of g lanes (g a power of two; at most the whole
 * vector): log2 g shuffle-adds. */
INLINE vn lane_block_sums(vn v, int32_t g) {
    const vni iota = IOTA;
    for (int32_t d = 1; d < g && d < SN_VL; d *= 2) v += __builtin_shuffle(v, iota ^ d);
    return v;
}

/* Every lane of projection j's block of G lanes gets the block's sum (log2 G shuffle-adds and part
 * adds). */
INLINE vl block_sums(vl v, int32_t kp) {
    int32_t g = LANES / kp;
    for (int32_t h = 0; h < PARTS; h++) v.part[h] = lane_block_sums(v.part[h], g);
    for (int32_t span = 1; span * SN_VL < g; span *= 2) /* blocks wider than a part */
        for (int32_t h = 0; h < PARTS; h++)
            if (!(h & span)) v.part[h] = v.part[h + span] = v.part[h] + v.part[h + span];
    return v;
}

/* A row of `count` values times packed [groups][16] coefficients, accumulated per lane; `room`: floats
 * readable from x. kp is a constant where this is inlined. The 16 floats at x + cg * G serve kp groups
 * (a permutation each; kp = 16 broadcasts every value from memory instead), into four sums: one chain
 * of dependent FMAs would wait on each one's latency (measured: a single sum was 1.3-1.5x slower). */
INLINE vl dot_groups(vl acc, const float *x, int64_t count, int64_t room, const float *coef, int32_t kp) {
    int32_t g = LANES / kp;
    int64_t groups = (count + g - 1) / g;
    int64_t cg = 0;
    /* Every index into sums is a constant once the loops are unrolled, so the sums can live in registers:
     * indexed at run time (cg & 3), the array lived on the stack and each FMA chain went through
     * store-to-load forwarding. */
    vl sums[4] = {acc, vl_zero(), vl_zero(), vl_zero()};
    if (kp == LANES) {
        for (; cg + 4 <= groups; cg += 4)
#pragma GCC unroll 4
            for (int32_t q = 0; q < 4; q++) {
                vl c = vl_load(coef + (cg + q) * LANES);
                for (int32_t h = 0; h < PARTS; h++) sums[q].part[h] += x[cg + q] * c.part[h];
            }
        for (; cg < groups; cg++) {
            vl c = vl_load(coef + cg * LANES);
            for (int32_t h = 0; h < PARTS; h++) sums[0].part[h] += x[cg] * c.part[h];
        }
    } else {
        for (; cg + kp <= groups && cg * g + LANES <= room; cg += kp)
#pragma GCC unroll 16
            for (int32_t q = 0; q < kp; q++)
                sums[q & 3] = vl_fma(sums[q & 3], repeat_at(x + cg * g, q * g, kp),
                                     vl_load(coef + (cg + q) * LANES));
        for (; cg < groups; cg++) {
            const float *at = x + cg * g;
            sums[0] = vl_fma(sums[0], room - cg * g >= LANES ? repeat(at, kp) : repeat_tail(at, kp, room - cg * g),
                             vl_load(coef + cg * LANES));
        }
    }
    return vl_add(vl_add(sums[0], sums[1]), vl_add(sums[2], sums[3]));
}

INLINE float squared_norm(const float *x, int64_t n) {
    vn acc = {0};
    int64_t i = 0;
    for (; i + SN_VL <= n; i += SN_VL) { vn v = loadn(x + i); acc += v * v; }
    /* a tree of shuffle-adds: 16 serial scalar adds cost a pixel of 32 channels more than its products
     * (perf, MobileNet's checks) */
    float q = n >= SN_VL ? lane_block_sums(acc, SN_VL)[0] : 0.0f;
    for (; i < n; i++) q += x[i] * x[i];
    return q;
}

/* Every input pixel's squared norm, into the scratch's first N * H * W floats. */
INLINE void pixel_norms(fv_prepare_t *s) {
    int64_t c = s->c, pixels = s->n * s->h * s->w;
    for (int64_t pix = 0; pix < pixels; pix++) s->norms[pix] = squared_norm(s->x + pix * c, c);
}

/* Output position `out`'s z (projection j: lane j * G of `sums`) and tolerance, from its window's squared
 * norm q; returns the tolerance squared (for ||tau||). */
INLINE double put_position(fv_prepare_t *s, vl sums, float q, int64_t out, int32_t kp) {
    int32_t g = LANES / kp;
    for (int32_t j = 0; j < kp; j++) s->z[out * kp + j] = vl_lane(sums, j * g);
    float t = s->unit * sqrtf(q);
    s->tau[out] = t;
    return (double)t * t;
}

/* Output row by output row; in a row, tap by tap, every output position the tap reaches inside the
 * input (a range found once per tap: no bounds test per position), accumulated per position in scratch.
 * Measured on MobileNet's depthwise layers: 1.2-1.6x faster than position by position, whose bounds tests
 * and pointer arithmetic per tap cost about as much as a tap's few vector FMAs. */
INLINE void prepare_kp(fv_prepare_t *s, int32_t kp) {
    int32_t g = LANES / kp;
    int64_t c = s->c, pixels = s->n * s->h * s->w, end = pixels * c;
    int64_t groups = (c + g - 1) / g;
    float *acc = s->norms + pixels;  /* [Wo][16] */
    float *q = acc + s->wo * LANES;  /* [Wo] */
    pixel_norms(s);
    double total = 0.0;
    int64_t out = 0;
    for (int64_t b = 0; b < s->n; b++) {
        for (int64_t oh = 0; oh < s->ho; oh++) {
            memset(acc, 0, (size_t)s->wo * LANES * sizeof(float));
            memset(q, 0, (size_t)s->wo * sizeof(float));
            for (int32_t i = 0; i < s->kh; i++) {
                int64_t ih = oh * s->sh + (int64_t)i * s->dh - s->top;
                if (ih < 0 || ih >= s->h) continue;
                const float *row = s->x + (b * s->h + ih) * s->w * c;
                const float *row_norms = s->norms + (b * s->h + ih) * s->w;
                for (int32_t j = 0; j < s->kw; j++) {
                    /* iw = ow * sw + shift lies in [0, W) for ow in [lo, hi) */
                    int64_t shift = (int64_t)j * s->dw - s->left;
                    int64_t lo = shift >= 0 ? 0 : (-shift + s->sw - 1) / s->sw;
                    int64_t hi = shift >= s->w ? 0 : (s->w - 1 - shift) / s->sw + 1;
                    if (hi > s->wo) hi = s->wo;
                    const float *f = s->filters + ((int64_t)i * s->kw + j) * groups * LANES;
                    for (int64_t ow = lo; ow < hi; ow++) {
                        int64_t iw = ow * s->sw + shift;
                        const float *xp = row + iw * c;
                        vl_store(acc + ow * LANES,
                                 dot_groups(vl_load(acc + ow * LANES), xp, c, end - (xp - s->x), f, kp));
                        q[ow] += row_norms[iw];
                    }
                }
            }
            for (int64_t ow = 0; ow < s->wo; ow++, out++)
                total += put_position(s, block_sums(vl_load(acc + ow * LANES), kp), q[ow], out, kp);
        }
    }
    s->tau_norm = sqrt(total);
}

/* For each tap of output position (b, oh, ow)'s window that falls inside the input, the statements given
 * (`...`), with the tap's row i and column j and `pix`, its input pixel's flat index, in scope. Expanded in
 * place, the two position-by-position prepares below compile to the same machine code as when each wrote
 * the loop out; a helper that listed the taps into arrays made the 3-channel prepare ~10% slower. */
#define FOR_EACH_TAP(s, b, oh, ow, ...)                                                 \
    for (int32_t i = 0; i < (s)->kh; i++) {                                             \
        int64_t ih = (oh) * (s)->sh + (int64_t)i * (s)->dh - (s)->top;                  \
        if (ih < 0 || ih >= (s)->h) continue;                                           \
        for (int32_t j = 0; j < (s)->kw; j++) {                                         \
            int64_t iw = (ow) * (s)->sw + (int64_t)j * (s)->dw - (s)->left;             \
            if (iw < 0 || iw >= (s)->w) continue;                                       \
            int64_t pix = ((b) * (s)->h + ih) * (s)->w + iw;                            \
            __VA_ARGS__                                                                 \
        }                                                                               \
    }

/* prepare_kp for an input whose channels fit in SMALL_GROUPS vector groups (C <= 3 * 16 / kp: an RGB image,
 * or its exact split's 6 channels), position by position: every tap's pixel times its filter vectors into
 * one register, the taps out of the input skipped one by one. prepare_kp's tap-major loop spent its time
 * on its accumulator in memory and its group loop, for one multiply-add vector per position and tap: 1.6x
 * slower on MobileNet's and yolov4-tiny's first layers (800 -> 480 us, 2.7 -> 1.7 ms; minima of 25 calls,
 * the two builds alternated in one process; two accumulators instead of one gained nothing). With the
 * exact split's 6 channels (two groups at 4 projections): 224x224x6 1641 -> 1323 us, 416x416x6 5633 ->
 * 4497 us; a 32x32x16 layer at four groups was not faster (102 / 104 us), nor were four chains of FMAs
 * instead of one (1584 -> 1918 us). */
#define SMALL_GROUPS 3
INLINE void prepare_small(fv_prepare_t *s, int32_t kp) {
    int32_t g = LANES / kp;
    int64_t c = s->c, end = s->n * s->h * s->w * c, groups = (c + g - 1) / g;
    pixel_norms(s);
    double total = 0.0;
    int64_t out = 0;
    for (int64_t b = 0; b < s->n; b++) {
        for (int64_t oh = 0; oh < s->ho; oh++) {
            for (int64_t ow = 0; ow < s->wo; ow++, out++) {
                vl acc = vl_zero();
                float q = 0.0f;
                FOR_EACH_TAP(s, b, oh, ow,
                    const float *f = s->filters + ((int64_t)i * s->kw + j) * groups * LANES;
                    for (int64_t cg = 0; cg < groups; cg++) {
                        int64_t room = end - pix * c - cg * g;
                        const float *at = s->x + pix * c + cg * g;
                        acc = vl_fma(acc, room >= LANES ? repeat(at, kp) : repeat_tail(at, kp, room),
                                     vl_load(f + cg * LANES));
                    }
                    q += s->norms[pix];
                )
                total += put_position(s, block_sums(acc, kp), q, out, kp);
            }
        }
    }
    s->tau_norm = sqrt(total);
}

/* Vectors of channels summed side by side: each vector's taps are a chain of dependent FMAs, which one at
 * a time waited on each FMA's latency (perf: nearly half of the prepare on the instruction after it).
 * Four chains, with each tap's two pointers read once for the four: MobileNet's depthwise prepares 1.3-1.9x
 * faster on the AVX2 build (112x112x32 1490 -> 1065 us, 56x56x128 997 -> 585 us, 28x28x256 585 -> 312
 * us; minima of 40 calls, alternated in one process), z and tau bit for bit the same (each vector's taps
 * are summed in the same order). Eight chains gained nothing more, and leave 32 channels out. */
#define DW_VECTORS 4

/* A depthwise layer with multiplier 1: its Freivalds filters read as many inputs per output as the layer
 * itself (k T C multiply-adds per position, against the layer's T C), so the TEE computes the layer, y =
 * L(x, W'), position by position (each vector of channels' taps summed in a register, the taps outside the
 * input skipped), and projects each position's y as the check projects the accelerator's: z_p = u . y_p,
 * T C + k C multiply-adds per position. Same z in exact arithmetic; the rounding of both is inside tau
 * (tee_sim.freivalds). */
INLINE void prepare_dw(fv_prepare_t *s, int32_t kp) {
    int32_t kernel = s->kh * s->kw;
    int64_t c = s->c, mp = s->mp, pixels = s->n * s->h * s->w, end = pixels * c;
    float *y = s->norms + pixels; /* [mp]: one position's outputs */
    const float *xs[kernel], *ws[kernel];
    int64_t rooms[kernel];
    pixel_norms(s);
    double total = 0.0;
    int64_t out = 0;
    for (int64_t b = 0; b < s->n; b++) {
        for (int64_t oh = 0; oh < s->ho; oh++) {
            for (int64_t ow = 0; ow < s->wo; ow++, out++) {
                int32_t taps = 0;
                float q = 0.0f;
                FOR_EACH_TAP(s, b, oh, ow,
                    xs[taps] = s->x + pix * c;
                    rooms[taps] = end - pix * c;
                    ws[taps++] = s->dw_weights + ((int64_t)i * s->kw + j) * mp;
                    q += s->norms[pix];
                )
                int64_t v = 0;
                int whole = 1; /* every tap's pixel has mp floats readable after it: no tail to mind */
                for (int32_t t = 0; t < taps; t++) whole &= rooms[t] >= mp;
                if (whole)
                    for (; v + DW_VECTORS * SN_VL <= mp; v += DW_VECTORS * SN_VL) {
                        vn a[DW_VECTORS] = {{0}};
                        for (int32_t t = 0; t < taps; t++) {
                            const float *xt = xs[t] + v, *wt = ws[t] + v;
#pragma GCC unroll 8
                            for (int32_t e = 0; e < DW_VECTORS; e++)
                                a[e] += loadn(wt + e * SN_VL) * loadn(xt + e * SN_VL);
                        }
#pragma GCC unroll 8
                        for (int32_t e = 0; e < DW_VECTORS; e++) storen(y + v + e * SN_VL, a[e]);
                    }
                for (; v < mp; v += SN_VL) {
                    vn a = {0};
                    for (int32_t t = 0; t < taps; t++) {
                        /* past channel c a vector reads the next pixel's, times zero weights */
                        vn xv;
                        if (v + SN_VL <= rooms[t]) {
                            xv = loadn(xs[t] + v);
                        } else {
                            float tail[SN_VL] = {0};
                            int64_t left = rooms[t] - v < 0 ? 0 : rooms[t] - v;
                            memcpy(tail, xs[t] + v, (size_t)(left < SN_VL ? left : SN_VL) * sizeof(float));
                            xv = loadn(tail);
                        }
                        a += loadn(ws[t] + v) * xv;
                    }
                    storen(y + v, a);
                }
                total += put_position(s, block_sums(dot_groups(vl_zero(), y, c, mp, s->u, kp), kp), q, out, kp);
            }
        }
    }
    s->tau_norm = sqrt(total);
}

/* Positions p0 .. p0 + t of a check, the results y (pixel stride y_pix, `room` floats readable from y):
 * the largest |u . y_p - z_p| / tau_p so far in *worst (as the bits of a non-negative float, which
 * order like it: NaN's lie above infinity's), ||y||^2 so far in *norm2 when asked. */
INLINE void check_rows(const fv_check_t *s, const float *y, int64_t y_pix, int64_t room, int64_t p0, int64_t t,
                       vli *worst, double *norm2, int32_t kp) {
    int32_t g = LANES / kp;
    vni valid[PARTS], spread[PARTS]; /* lanes of existing projections; part h, lane i reads z[l / G - base] */
    int32_t base[PARTS];             /* for l = h * SN_VL + i, base = h * SN_VL / G */
    for (int32_t h = 0; h < PARTS; h++) {
        base[h] = h * SN_VL / g;
        for (int32_t i = 0; i < SN_VL; i++) {
            int32_t l = h * SN_VL + i;
            valid[h][i] = l / g < s->k ? -1 : 0;
            spread[h][i] = l / g - base[h];
        }
    }
    const vni magnitude = (vni){0} + 0x7fffffff; /* all bits but the sign */
    for (int64_t p = 0; p < t; p++) {
        const float *yp = y + p * y_pix;
        vl w = block_sums(dot_groups(vl_zero(), yp, s->m, room - p * y_pix, s->u, kp), kp);
        const float *zp = s->z + (p0 + p) * kp; /* z has 16 floats of slack */
        float tau = s->tau[p0 + p];
        for (int32_t h = 0; h < PARTS; h++) {
            vn z = __builtin_shuffle(loadn(zp + base[h]), spread[h]);
            vn off = (vn)((vni)(w.part[h] - z) & magnitude);
            vni ratio = (vni)(off / tau) & valid[h] & (off != 0.0f); /* 0 where both are 0; inf where tau is */
            vni larger = ratio > worst->part[h];
            worst->part[h] = (ratio & larger) | (worst->part[h] & ~larger);
        }
        if (s->want_norm) *norm2 += squared_norm(yp, s->m);
    }
}

INLINE int32_t vmax(vli v) {
    int32_t top = 0;
    for (int32_t h = 0; h < PARTS; h++)
        for (int32_t i = 0; i < SN_VL; i++) top = v.part[h][i] > top ? v.part[h][i] : top;
    return top;
}

/* The outcome of a check into s: the worst ratio (NaN as infinity) and ||y||^2. */
INLINE void check_done(fv_check_t *s, vli worst, double norm2) {
    int32_t top = vmax(worst);
    float value;
    memcpy(&value, &top, sizeof value);
    s->worst = value != value ? INFINITY : (double)value;
    s->y_norm2 = norm2;
}

#define ONE_BITS 0x3f800000 /* 1.0f: a ratio above it fails the check */

/* check_rows for s->kp: one copy per lane layout, so that the shuffles are constants. */
INLINE int check_rows_kp(const fv_check_t *s, const float *y, int64_t y_pix, int64_t room, int64_t p0,
                         int64_t t, vli *worst, double *norm2) {
    switch (s->kp) {
    case 1: check_rows(s, y, y_pix, room, p0, t, worst, norm2, 1); return 0;
    case 2: check_rows(s, y, y_pix, room, p0, t, worst, norm2, 2); return 0;
    case 4: check_rows(s, y, y_pix, room, p0, t, worst, norm2, 4); return 0;
    case 8: check_rows(s, y, y_pix, room, p0, t, worst, norm2, 8); return 0;
    case 16: check_rows(s, y, y_pix, room, p0, t, worst, norm2, 16); return 0;
    default: return -1;
    }
}

/* An exact split's send (tee_sim.exact_split): the mask r as r_hi = grid * rint(r / grid) and r_lo = r -
 * r_hi, w = x + r_lo, q = grid * rint(w / grid), dst = [r_hi + q | w - q]; all exact but w (grid is a
 * power of two); c channels per half. */
INLINE void send_split(float *dst, int64_t dst_pix, const float *x, int64_t x_pix, const float *mask,
                       int64_t mask_pix, int64_t t, int32_t c, float grid) {
    float inverse = 1.0f / grid;
    for (int64_t p = 0; p < t; p++) {
        const float *a = x + p * x_pix, *r = mask + p * mask_pix;
        float *o = dst + p * dst_pix;
        for (int32_t k = 0; k < c; k++) {
            float high = rintf(r[k] * inverse) * grid;
            float w = a[k] + (r[k] - high);
            float q = rintf(w * inverse) * grid;
            o[k] = high + q;
            o[c + k] = w - q;
        }
    }
}

/* An exact split's halves, minus their pop mask: out = (y_hi - pop_hi) + (y_lo - pop_lo), m channels
 * per pixel, in that order (the first difference is exact: both hold the mask's magnitude exactly). */
INLINE void pop_halves(const float *y, int64_t y_pix, const float *pop, int64_t pop_pix, float *out,
                       int64_t out_pix, int64_t t, int32_t m) {
    for (int64_t p = 0; p < t; p++) {
        const float *a = y + p * y_pix, *q = pop + p * pop_pix;
        float *o = out + p * out_pix;
        int32_t c = 0;
        for (; c + SN_VL <= m; c += SN_VL)
            storen(o + c, (loadn(a + c) - loadn(q + c)) + (loadn(a + m + c) - loadn(q + m + c)));
        for (; c < m; c++) o[c] = (a[c] - q[c]) + (a[m + c] - q[m + c]);
    }
}

int sn_run(const sn_step *s) {
    int64_t stride = s->stride, tile = s->tile;
    float *tile_a = s->scratch, *tile_b = s->scratch + tile * stride, *tmp = s->scratch + 2 * tile * stride;
    float *tile_y = s->scratch + 3 * tile * stride;
    int32_t n = s->a.n_out, c = s->channels;
    int restored = s->a.kind != SN_NONE;
    fv_check_t *check = s->check;
    vli worst = {{{0}}};
    double norm2 = 0.0;
    /* A scale, or a block restore with no permutation after it, adds the offset and activates each
     * vector as it leaves: two passes over the tile fewer. A per-channel offset (the bias) is padded with
     * zeros for the last block's spill; a per-element one (round 1's) is read in place, so for blocks only
     * when none spills past the last channel. */
    int fuse = restored && ((s->a.kind == SN_BLOCKS && !s->a.perm) || s->a.kind == SN_SCALE);
    int per_channel = !s->offset.row && !s->offset.pix;
    if (fuse && s->a.kind == SN_BLOCKS && (s->addend.p || (s->offset.p && !per_channel)) && !exact(&s->a))
        fuse = 0; /* the addend, like a per-element offset, is read in place */
    if (fuse && s->offset.p && per_channel && stride > MAX_STACK_BIAS) fuse = 0; /* the copy is on the stack */
    /* Unmasked, with no secure copy to write: the last stage stores straight into dst when it writes
     * exactly dst's channels (a spill there could land on another tensor's): no tile copy. */
    int direct = !s->mask.p && !s->copy &&
                 (s->b.kind != SN_NONE ? exact(&s->b) : fuse && exact(&s->a));
    float bias[fuse && s->offset.p && per_channel ? stride : 1];
    epilogue finish_block = {s->offset.p, s->offset.pix, s->activation, s->alpha, s->addend.p, s->addend.pix};
    if (fuse && s->offset.p && per_channel) {
        memcpy(bias, s->offset.p, sizeof(float) * (size_t)n);
        memset(bias + n, 0, sizeof(float) * (size_t)(stride - n));
        finish_block.offset = bias;
    }
    for (int64_t r = 0; r < s->rows; r++) {
        for (int64_t q0 = 0; q0 < s->cols; q0 += tile) {
            int64_t t = s->cols - q0 < tile ? s->cols - q0 : tile;
            float *out = s->dst + r * s->dst_row + q0 * s->dst_pix;
            const float *x = s->src.p + r * s->src.row + q0 * s->src.pix;
            const float *src = x; /* shared memory: its lines are fetched ahead (FETCH_AHEAD) */
            int64_t x_pix = s->src.pix;
            if (check) {
                /* The tile is copied into secure memory, checked there and restored from there: the
                 * normal world cannot change what is used after it was checked. */
                for (int64_t p = 0; p < t; p++) copy(tile_y + p * stride, x + p * x_pix, (int32_t)check->m);
                x = tile_y;
                x_pix = stride;
                if (check_rows_kp(check, x, stride, t * stride, r * s->cols + q0, t, &worst, &norm2))
                    return -1;
                if (vmax(worst) > ONE_BITS) { /* wrong: nothing of this tile is used */
                    check_done(check, worst, norm2);
                    return 1;
                }
            }
            if (s->pop.p) { /* tile_b is free until B */
                const float *pop = s->pop.p + r * s->pop.row + q0 * s->pop.pix;
                pop_halves(x, x_pix, pop, s->pop.pix, tile_b, stride, t, s->a.n_in);
                x = tile_b;
                x_pix = stride;
            }
            if (fuse) {
                if (s->offset.p && !per_channel)
                    finish_block.offset = s->offset.p + r * s->offset.row + q0 * s->offset.pix;
                if (s->addend.p)
                    finish_block.addend = s->addend.p + r * s->addend.row + q0 * s->addend.pix;
                int last = direct && s->b.kind == SN_NONE;
                float *a_out = last ? out : tile_a;
                int64_t a_pix = last ? s->dst_pix : stride;
                if (s->a.kind == SN_SCALE)
                    scale_rows(&s->a, x, x_pix, a_out, a_pix, t, &finish_block);
                else
                    apply(&s->a, x, x_pix, a_out, a_pix, tmp, stride, t, &finish_block, x == src);
                if (last) continue;
                x = tile_a;
                x_pix = stride;
            } else if (restored) {
                apply(&s->a, x, x_pix, tile_a, stride, tmp, stride, t, NULL, x == src);
                if (s->offset.p) {
                    const float *off = s->offset.p + r * s->offset.row + q0 * s->offset.pix;
                    for (int64_t p = 0; p < t; p++)
                        add_into(tile_a + p * stride, tile_a + p * stride, off + p * s->offset.pix, n);
                }
                if (s->addend.p) {
                    const float *add = s->addend.p + r * s->addend.row + q0 * s->addend.pix;
                    for (int64_t p = 0; p < t; p++)
                        add_into(tile_a + p * stride, tile_a + p * stride, add + p * s->addend.pix, n);
                }
                activate(tile_a, t * stride, s->activation, s->alpha);
                x = tile_a;
                x_pix = stride;
            }
            if (s->b.kind != SN_NONE && direct) {
                apply(&s->b, x, x_pix, out, s->dst_pix, tmp, stride, t, NULL, x == src);
                continue;
            }
            if (s->b.kind != SN_NONE) {
                apply(&s->b, x, x_pix, tile_b, stride, tmp, stride, t, NULL, x == src);
                x = tile_b;
                x_pix = stride;
            }
            const float *m = s->mask.p ? s->mask.p + r * s->mask.row + q0 * s->mask.pix : NULL;
            if (s->grid > 0 && m) {
                send_split(out, s->dst_pix, x, x_pix, m, s->mask.pix, t, c, s->grid);
                if (s->copy)
                    send_split(s->copy + r * s->copy_row + q0 * s->copy_pix, s->copy_pix, x, x_pix, m, s->mask.pix,
                               t, c, s->grid);
                continue;
            }
            send(out, s->dst_pix, x, x_pix, m, s->mask.pix, t, c);
            if (s->copy) /* the secure copy of what was sent, from the secure tile, not read back */
                send(s->copy + r * s->copy_row + q0 * s->copy_pix, s->copy_pix, x, x_pix, m, s->mask.pix, t, c);
        }
    }
    if (check) check_done(check, worst, norm2);
    return 0;
}

/* One copy of each loop per lane layout, so that the shuffles are constants: `prepare(s, kp)` for s->kp. */
#define FOR_LANE_LAYOUT(prepare, s)                \
    switch ((s)->kp) {                             \
    case 1: prepare(s, 1); return 0;               \
    case 2: prepare(s, 2); return 0;               \
    case 4: prepare(s, 4); return 0;               \
    case 8: prepare(s, 8); return 0;               \
    case 16: prepare(s, 16); return 0;             \
    default: return -1;                            \
    }

int fv_prepare(fv_prepare_t *s) {
    if (s->dw_weights) FOR_LANE_LAYOUT(prepare_dw, s)
    if (s->c <= SMALL_GROUPS * (LANES / s->kp)) FOR_LANE_LAYOUT(prepare_small, s)
    FOR_LANE_LAYOUT(prepare_kp, s)
}

int fv_check(fv_check_t *s) {
    vli worst = {{{0}}};
    double norm2 = 0.0;
    if (check_rows_kp(s, s->y, s->m, s->p * s->m, 0, s->p, &worst, &norm2)) return -1;
    check_done(s, worst, norm2);
    return 0;
}

/* ---------------------------------------------------------------------------------------------------
 * MAX_POOL_2D over an NHWC tensor whose channels are contiguous (any other strides: a slice of a
 * concatenation's slot reads in place). Window positions outside the input are skipped, as LiteRT's kernel
 * does (they never win); each output is numpy's np.maximum over the window's positions in row-major order,
 * bit for bit (the second value on ties, a NaN wins), as the numpy version it replaces computed it. One
 * read of each window position and one write per output, where numpy made a pass over the output per
 * window position (yolov4-tiny's 2x2 pool of 104x104x128: 2.0 ms in numpy).
 */
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

/* Which of setup.py's builds of this file the CPU runs: 2 the AVX-512 one (F, BW, CD, DQ, VL), 1 the AVX2
 * one (with FMA), 0 only the baseline. Called in the baseline build, whose code runs everywhere;
 * libgcc's test also asks the operating system whether it saves the wider registers. */
int sn_cpu_level(void) {
#if defined(__GNUC__) && defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
                __builtin_cpu_supports("avx512vl"))
            return 2;
        return 1;
    }
#endif
    return 0;
}
