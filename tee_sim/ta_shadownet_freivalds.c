/* The ShadowNet trusted app's Freivalds check (tee_sim.freivalds, which derives the bound), its first
 * half: fv_prepare, a checked layer's z and tau from its secure input, when the TEE writes it (the check of
 * the result: ta_shadownet_freivalds_check.c). Kept out of the restore / push file; the same library.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "ta_shadownet_lanes.h"

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
                                           of one position's outputs; prepare_tiled: zeros
                                           and the last pixel; compute_dw: zeros) */
    double tau_norm;                    /* out: ||tau|| */
    const float *dw_weights;            /* depthwise, multiplier 1: the layer's weights [kh * kw][mp],
                                           zero-padded (prepare_dw); NULL: filters (prepare_kp) */
    const float *u;                     /* with dw_weights: the packed projections [ceil(M / G)][16] */
    int64_t mp;                         /* with dw_weights: the channels rounded up to 16 */
    float *y_out;                       /* with dw_weights: NULL, or where the layer's result goes, [N * Ho *
                                           Wo][C], instead of z and tau (the TEE uses it, not the
                                           accelerator's: tee_sim.per_inference_kernels) */
    int32_t tiled;                      /* prepare_tiled, or compute_dw with y_out (tee_sim.freivalds.
                                           LayerCheck says when) */
    const float *sent;                  /* a popped check's (an exact split's, tee_sim.freivalds): the
                                           secure copy of what was sent, [x_hi | x_lo] on x's pixels, whose
                                           rounding the tolerance adds; NULL: none */
    float hi_weight;                    /* with sent: the weight of x_hi's squares (x_lo's: 1) */
} fv_prepare_t;

/* pixel_norms for C < SN_VL channels, C a constant where it is inlined (round 1's image, 3 channels, or its
 * exact split's 6): the generic loops (squared_norm's tail, the `sent` loop) are one scalar loop of run-time
 * length per pixel, which took most of MobileNet's round-1 prepares' norms (perf); unrolled, and in one pass
 * over x and sent. The same sums in the same order as squared_norm's tail and the loop below, but compiled
 * otherwise (across pixels): tau within 1-2 ulp of theirs in 327 of 273,240 values on the AVX2 and AVX-512
 * builds, z the same bits (a review's comparison of the two builds; explicit fused multiply-adds did not
 * change it). tau is a tolerance: an ulp of it moves no verdict that matters. */
INLINE void pixel_norms_few(fv_prepare_t *s, const int64_t c) {
    int64_t pixels = s->n * s->h * s->w;
    const float *x = s->x, *sent = s->sent;
    if (!sent) {
        for (int64_t pix = 0; pix < pixels; pix++, x += c) {
            float q = 0.0f;
            for (int64_t i = 0; i < c; i++) q += x[i] * x[i];
            s->norms[pix] = q;
        }
        return;
    }
    float hi_weight = s->hi_weight;
    for (int64_t pix = 0; pix < pixels; pix++, x += c, sent += 2 * c) {
        float q = 0.0f, hi = 0.0f, lo = 0.0f;
        for (int64_t i = 0; i < c; i++) q += x[i] * x[i];
        for (int64_t i = 0; i < c; i++) {
            hi += sent[i] * sent[i];
            lo += sent[c + i] * sent[c + i];
        }
        float added = hi_weight * hi + lo;
        s->norms[pix] = q + added;
    }
}

/* Every input pixel's squared norm, into the scratch's first N * H * W floats; a popped check's adds
 * hi_weight |x_hi|^2 + |x_lo|^2 of the pixel sent (the accelerator's rounding of y_lo, and the pop mask's).
 * Not inlined: one call per prepare, and its cases once in the library, not once per prepare and lane
 * layout. */
static __attribute__((noinline)) void pixel_norms(fv_prepare_t *s) {
    int64_t c = s->c, pixels = s->n * s->h * s->w;
    switch (c < SN_VL ? c : 0) { /* a few channels: pixel_norms_few (squared_norm's tail alone) */
    case 1: pixel_norms_few(s, 1); return;
    case 2: pixel_norms_few(s, 2); return;
    case 3: pixel_norms_few(s, 3); return;
    case 4: pixel_norms_few(s, 4); return;
    case 6: pixel_norms_few(s, 6); return;
    case 8: pixel_norms_few(s, 8); return;
    default: break;
    }
    for (int64_t pix = 0; pix < pixels; pix++) s->norms[pix] = squared_norm(s->x + pix * c, c);
    if (!s->sent) return;
    if (c >= SN_VL) {
        for (int64_t pix = 0; pix < pixels; pix++) {
            const float *sent = s->sent + pix * 2 * c;
            s->norms[pix] += s->hi_weight * squared_norm(sent, c) + squared_norm(sent + c, c);
        }
        return;
    }
    /* A few channels (round 1's image): one plain loop, not two calls per pixel (MobileNet's 225x225x3:
     * the pass 260 -> 100 us) */
    const float *sent = s->sent;
    for (int64_t pix = 0; pix < pixels; pix++, sent += 2 * c) {
        float hi = 0.0f, lo = 0.0f;
        for (int64_t i = 0; i < c; i++) {
            hi += sent[i] * sent[i];
            lo += sent[c + i] * sent[c + i];
        }
        s->norms[pix] += s->hi_weight * hi + lo;
    }
}

/* Output position `out`'s z (projection j: lane j * G of `sums`) and tolerance, from its window's squared
 * norm q; returns the tolerance squared (for ||tau||). */
INLINE double put_position(fv_prepare_t *s, vl sums, float q, int64_t out, int32_t kp) {
    int32_t g = LANES / kp;
    for (int32_t j = 0; j < kp; j++) s->z[out * kp + j] = vl_lane(sums, j * g);
    /* A window whose squares underflow (an input of ~1e-19 and less: a blank image through zero biases)
     * has q = 0 and so a tolerance of 0, which its honest, tiny results failed: q is floored at the
     * smallest normal float, which lets a change pass only below 1.1e-19 x unit (an output of that size
     * is not a result). NaN stays NaN: the check fails it. */
    float t = s->unit * sqrtf(q < FLT_MIN ? FLT_MIN : q);
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
    if (!s->y_out) pixel_norms(s);
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
                if (s->y_out) {
                    memcpy(s->y_out + out * c, y, (size_t)c * sizeof(float));
                    continue;
                }
                total += put_position(s, block_sums(dot_groups(vl_zero(), y, c, mp, s->u, kp), kp), q, out, kp);
            }
        }
    }
    s->tau_norm = sqrt(total);
}

/* A depthwise layer with multiplier 1 computed into y_out (no z, no tau; a verified model's, which the TA
 * uses instead of the accelerator's), for C a multiple of SN_VL: DW_TILE output positions of a row at a
 * time, their taps' pointers found once for all the channels, DW_VECTORS vectors of channels at a time,
 * each tap's weight vector loaded once for the tile (prepare_dw loads it for every position: two loads per
 * multiply-add), the taps outside the input and the positions past the row reading a row of zeros in the
 * scratch, each vector stored straight into y_out (not through the scratch and a memcpy per position).
 * Each vector's taps are summed in prepare_dw's order: y is the same bit for bit. Against prepare_dw,
 * alternated in one process (minima of 20 calls, AVX2): MobileNet's 13 depthwise layers 2.08 -> 1.56 ms
 * and 2.62 -> 1.85 ms per inference (112x112x32 1.7x, 14x14x512 1.1x). */
#define DW_TILE 3
#define FV_MAX_DIRECT_TAPS 4096 /* tee_sim.freivalds.MAX_DIRECT_TAPS: the most prepare_dw / compute_dw take */
/* The tile's sums over its taps for `vectors` vectors of channels from v0: inlined with each constant count
 * the caller passes, so that every count's loops unroll and its sums stay in registers. A layer of 32
 * channels is two vectors on the AVX-512 build, which went through a loop over a variable count: MobileNet's
 * 112x112x32 layer 686 -> 556 us, its 13 depthwise layers 2.77 -> 2.60 ms (medians of 30 calls of each layer
 * in turn, the two builds alternated in one process), y the same bit for bit. */
INLINE void dw_sums(vn acc[DW_TILE][DW_VECTORS], const float *(*xs)[DW_TILE], const float *const *ws,
                    int32_t taps, int64_t v0, int32_t vectors) {
    for (int32_t t = 0; t < taps; t++) {
#pragma GCC unroll 8
        for (int32_t e = 0; e < vectors; e++) {
            vn w = loadn(ws[t] + v0 + e * SN_VL);
#pragma GCC unroll 8
            for (int32_t r = 0; r < DW_TILE; r++)
                acc[r][e] += w * loadn(xs[t][r] + v0 + e * SN_VL);
        }
    }
}

INLINE void compute_dw(fv_prepare_t *s) {
    int32_t kernel = s->kh * s->kw;
    int64_t c = s->c, mp = s->mp, pixels = s->n * s->h * s->w;
    float *zeros = s->norms + pixels;
    memset(zeros, 0, (size_t)c * sizeof(float));
    const float *xs[kernel][DW_TILE], *ws[kernel];
    int64_t out = 0;
    for (int64_t b = 0; b < s->n; b++)
        for (int64_t oh = 0; oh < s->ho; oh++)
            for (int64_t ow0 = 0; ow0 < s->wo; ow0 += DW_TILE) {
                int64_t live = s->wo - ow0 < DW_TILE ? s->wo - ow0 : DW_TILE;
                int32_t taps = 0; /* the taps whose row lies inside the input, for every position of the tile */
                for (int32_t i = 0; i < s->kh; i++) {
                    int64_t ih = oh * s->sh + (int64_t)i * s->dh - s->top;
                    if (ih < 0 || ih >= s->h) continue;
                    for (int32_t j = 0; j < s->kw; j++, taps++) {
                        for (int32_t r = 0; r < DW_TILE; r++) {
                            int64_t iw = (ow0 + r) * s->sw + (int64_t)j * s->dw - s->left;
                            int inside = r < live && iw >= 0 && iw < s->w;
                            xs[taps][r] = inside ? s->x + ((b * s->h + ih) * s->w + iw) * c : zeros;
                        }
                        ws[taps] = s->dw_weights + ((int64_t)i * s->kw + j) * mp;
                    }
                }
                for (int64_t v0 = 0; v0 < c; v0 += DW_VECTORS * SN_VL) {
                    int32_t vectors = c - v0 < DW_VECTORS * SN_VL ? (int32_t)((c - v0) / SN_VL) : DW_VECTORS;
                    vn acc[DW_TILE][DW_VECTORS];
                    for (int32_t r = 0; r < DW_TILE; r++)
                        for (int32_t e = 0; e < DW_VECTORS; e++) acc[r][e] = (vn){0};
                    if (vectors == DW_VECTORS)
                        dw_sums(acc, xs, ws, taps, v0, DW_VECTORS);
                    else if (vectors == 2)
                        dw_sums(acc, xs, ws, taps, v0, 2);
                    else if (vectors == 1)
                        dw_sums(acc, xs, ws, taps, v0, 1);
                    else
                        dw_sums(acc, xs, ws, taps, v0, vectors);
                    for (int32_t r = 0; r < live; r++)
                        for (int32_t e = 0; e < vectors; e++)
                            storen(s->y_out + (out + r) * c + v0 + e * SN_VL, acc[r][e]);
                }
                out += live;
            }
}

/* A conv layer's prepare as a matrix product (kp >= 4; tee_sim.freivalds picks it): the output positions
 * of a row TILE_SUMS / PARTS at a time, each position's 16 packed lanes (G channels of each of kp
 * projections) in PARTS registers for its whole window. Per tap and group of G channels the packed filter
 * vector is loaded once for the tile, and each position's G input values once, repeated across the
 * vector; the sums across each projection's G lanes are made once per position, at the end. prepare_kp
 * instead loads and stores each position's sums at every tap, and permutes the input values for every
 * multiply-add. Taps outside the input and positions past the row read a row of zeros in the scratch
 * (after the pixels' norms), so the loop over channels has no test. tau is summed as prepare_kp sums it
 * (the same bit for bit), z in another order (its rounding is inside tau: tee_sim.freivalds).
 *
 * Against prepare_kp, alternated in one process (minima of 20-30 calls, AVX2): 3x3 layers 1.4-1.9x faster
 * (ResNet's 32x32x16 k = 4 61 -> 44 us, yolov4-tiny's 52x52x128 k = 6 1190 -> 613 us); pointwise layers,
 * whose positions are taken across rows, 1.0-1.4x at k = 4 and 1.2-1.5x at k = 5 (MobileNet's 1.25 -> 1.00
 * and 1.48 -> 1.09 ms per inference; row by row they were 0.9x at k = 4); against
 * prepare_small on inputs of 3-12 channels 1.2-1.5x (MobileNet's first layer, the exact split's 224x224x6
 * at stride 2, 808 -> 635 us). Also tried: the channels along the registers, each projection's own vector
 * of partial sums (no lanes padded past k, no permutation, the filters repacked per call): 0.7-1.8x,
 * slower on the small layers. */

/* Where prepare_tiled reads a pixel at `at`: in the input, or, from `tail_from` on, in its padded copy. */
INLINE const float *tail_read(const float *at, const float *tail_from, const float *copy) {
    return at < tail_from ? at : copy + (at - tail_from);
}

INLINE void prepare_tiled(fv_prepare_t *s, int32_t kp) {
    enum { R = TILE_ROWS };
    int32_t g = LANES / kp;
    int64_t c = s->c, groups = (c + g - 1) / g, pixels = s->n * s->h * s->w, span = groups * g;
    /* A last group of fewer than G channels reads the next pixels' first ones (span - c values), times
     * zero filter values; the last pixels, whose reads would pass the input's end (all those within
     * span - c values of it: three of them with one channel and G = 4), are read from a copy of the
     * input's tail padded with zeros. */
    int64_t tail = span > c ? (span - 1) / c : 1;
    tail = tail < pixels ? tail : pixels;
    float *zeros = s->norms + pixels, *last = zeros + span;
    memset(zeros, 0, (size_t)(2 * span + tail * c) * sizeof(float));
    memcpy(last, s->x + (pixels - tail) * c, (size_t)(tail * c) * sizeof(float));
    const float *const tail_from = s->x + (pixels - tail) * c;
    double total = 0.0;
    if (s->kh == 1 && s->kw == 1 && s->sh == 1 && s->sw == 1 && s->top == 0 && s->left == 0 && s->ho == s->h
        && s->wo == s->w) { /* pointwise: position p reads pixel p, so R positions at a time across rows */
        for (int64_t p0 = 0; p0 < pixels; p0 += R) {
            int64_t live = pixels - p0 < R ? pixels - p0 : R;
            vl acc[R];
            const float *xr[R];
            for (int32_t r = 0; r < R; r++) {
                acc[r] = vl_zero();
                xr[r] = r >= live ? zeros : tail_read(s->x + (p0 + r) * c, tail_from, last);
            }
            tile_dot(acc, xr, groups, s->filters, kp);
            for (int32_t r = 0; r < live; r++)
                total += put_position(s, block_sums(acc[r], kp), s->norms[p0 + r], p0 + r, kp);
        }
        s->tau_norm = sqrt(total);
        return;
    }
    int64_t out = 0;
    for (int64_t b = 0; b < s->n; b++)
        for (int64_t oh = 0; oh < s->ho; oh++)
            for (int64_t ow0 = 0; ow0 < s->wo; ow0 += R) {
                int64_t live = s->wo - ow0 < R ? s->wo - ow0 : R;
                vl acc[R];
                float q[R];
                for (int32_t r = 0; r < R; r++) {
                    acc[r] = vl_zero();
                    q[r] = 0.0f;
                }
                for (int32_t i = 0; i < s->kh; i++) {
                    int64_t ih = oh * s->sh + (int64_t)i * s->dh - s->top;
                    if (ih < 0 || ih >= s->h) continue;
                    for (int32_t j = 0; j < s->kw; j++) {
                        /* The tile's positions whose tap reads the input are one run, [lo, hi): found
                         * once per tap, instead of testing every position (those tests took 40% of a
                         * 32x32x16 prepare at k = 5). */
                        int64_t iw0 = ow0 * s->sw + (int64_t)j * s->dw - s->left; /* position 0's column */
                        int64_t lo = iw0 >= 0 ? 0 : (s->sw - 1 - iw0) / s->sw;
                        int64_t hi = iw0 >= s->w ? 0 : (s->w - 1 - iw0) / s->sw + 1;
                        hi = hi < live ? hi : live;
                        lo = lo < hi ? lo : hi;
                        int64_t pix0 = (b * s->h + ih) * s->w + iw0;
                        const float *xr[R];
                        for (int32_t r = 0; r < R; r++) xr[r] = zeros;
                        for (int64_t r = lo; r < hi; r++) {
                            xr[r] = tail_read(s->x + (pix0 + r * s->sw) * c, tail_from, last);
                            q[r] += s->norms[pix0 + r * s->sw];
                        }
                        tile_dot(acc, xr, groups, s->filters + ((int64_t)i * s->kw + j) * groups * LANES, kp);
                    }
                }
                for (int32_t r = 0; r < live; r++, out++)
                    total += put_position(s, block_sums(acc[r], kp), q[r], out, kp);
            }
    s->tau_norm = sqrt(total);
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
    if (s->dw_weights) {
        /* prepare_dw and compute_dw keep a pointer or two per tap on the stack: a kernel of 360,000 taps
         * overflowed it (a helper's ASan run); tee_sim.freivalds.direct leaves larger ones to prepare_kp */
        if ((int64_t)s->kh * s->kw > FV_MAX_DIRECT_TAPS) return -1;
        if (s->y_out && s->tiled && s->c % SN_VL == 0) {
            compute_dw(s);
            return 0;
        }
        FOR_LANE_LAYOUT(prepare_dw, s)
    }
    if (s->tiled && s->kp >= 4) {
        pixel_norms(s);
        switch (s->kp) {
        case 4: prepare_tiled(s, 4); return 0;
        case 8: prepare_tiled(s, 8); return 0;
        default: prepare_tiled(s, 16); return 0;
        }
    }
    if (s->c <= SMALL_GROUPS * (LANES / s->kp)) FOR_LANE_LAYOUT(prepare_small, s)
    FOR_LANE_LAYOUT(prepare_kp, s)
}
