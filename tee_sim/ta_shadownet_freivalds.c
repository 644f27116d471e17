/* The ShadowNet trusted app's Freivalds check (tee_sim.freivalds, which derives the bound): fv_prepare
 * (a checked layer's z and tau, from its secure input), fv_check (a whole result), and fv_check_tile /
 * fv_check_finish for sn_run, which checks an accelerator's result tile by tile as it restores it
 * (ta_shadownet_kernels.c). Kept out of the restore / push file; the same library.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "ta_shadownet_kernels.h"

/* Lanes: k <= 16 projections are padded to kp in {1, 2, 4, 8, 16}, and a vector holds G = 16 / kp
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
    float *y_out;                       /* with dw_weights: NULL, or where the layer's result goes, [N * Ho *
                                           Wo][C], instead of z and tau (the TEE uses it, not the
                                           accelerator's: tee_sim.per_inference) */
} fv_prepare_t;

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


int fv_check_tile(const fv_check_t *s, const float *y, int64_t y_pix, int64_t room, int64_t p0, int64_t t,
                  vli *worst, double *norm2) {
    if (check_rows_kp(s, y, y_pix, room, p0, t, worst, norm2)) return -1;
    return vmax(*worst) > ONE_BITS;
}

void fv_check_finish(fv_check_t *s, const vli *worst, double norm2) { check_done(s, *worst, norm2); }

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
