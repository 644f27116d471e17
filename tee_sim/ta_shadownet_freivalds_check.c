/* The ShadowNet trusted app's Freivalds check of an accelerator's result (tee_sim.freivalds, which derives
 * the bound): fv_check (a whole result), and fv_check_tile / fv_check_finish for sn_run, which checks a
 * result tile by tile as it restores it (ta_shadownet_kernels.c), against what fv_prepare
 * (ta_shadownet_freivalds.c) made of the layer's input. The same library.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "ta_shadownet_lanes.h"

/* Positions p0 .. p0 + t of a check, the results y (pixel stride y_pix, `room` floats readable from y):
 * the largest |u . y_p - z_p| / tau_p so far in *worst (as the bits of a non-negative float, which
 * order like it: NaN's lie above infinity's; tau_p widened by s->coherent's term where set), ||y||^2 so
 * far in *norm2 when asked. */
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
    /* Position p's w = u . y_p (lane j * G: projection j) against its z. */
#define COMPARE(p, w)                                                                                    \
    do {                                                                                                 \
        const float *zp = s->z + (p0 + (p)) * kp; /* z has 16 floats of slack */                         \
        float tau = s->tau[p0 + (p)], yy = 0.0f;                                                         \
        if (s->coherent > 0.0f || s->want_norm) yy = squared_norm(y + (p) * y_pix, s->m);                \
        if (s->coherent > 0.0f) /* in double: tau^2 is past float32 from tau = 1.8e19 */                 \
            tau = (float)sqrt((double)tau * tau + (double)s->coherent * yy);                             \
        tau = tau < INFINITY ? tau : 0.0f; /* overflowed (window norms past float32): fail, not pass */  \
        for (int32_t h = 0; h < PARTS; h++) {                                                            \
            vn z = __builtin_shuffle(loadn(zp + base[h]), spread[h]);                                    \
            vn off = (vn)((vni)((w).part[h] - z) & magnitude);                                           \
            /* 0 where both are 0; inf where tau is 0 */                                                 \
            vni ratio = (vni)(off / tau) & valid[h] & (off != 0.0f);                                     \
            vni larger = ratio > worst->part[h];                                                         \
            worst->part[h] = (ratio & larger) | (worst->part[h] & ~larger);                              \
        }                                                                                                \
        *norm2 += yy;                                                                                    \
    } while (0)
    int64_t p = 0;
    /* TILE_SUMS / PARTS positions at a time, as prepare_tiled: each projection vector of u loaded once for
     * them, each position's G values repeated by their load, the sums across lanes once per position.
     * Against position by position (dot_groups), alternated in one process (minima of 30 calls, AVX2):
     * 1.8-4.0x faster (ResNet's 32x32x16 at k = 4 30 -> 11 us, yolov4-tiny's 104x104x64 at k = 5 620 ->
     * 170 us). */
    if (s->tiled && kp >= 4 && s->m % g == 0) {
        enum { R = TILE_ROWS };
        for (; p + R <= t; p += R) {
            vl acc[R];
            const float *rows[R];
            for (int32_t r = 0; r < R; r++) {
                acc[r] = vl_zero();
                rows[r] = y + (p + r) * y_pix;
            }
            tile_dot(acc, rows, s->m / g, s->u, kp);
            for (int32_t r = 0; r < R; r++) COMPARE(p + r, block_sums(acc[r], kp));
        }
    }
    for (; p < t; p++)
        COMPARE(p, block_sums(dot_groups(vl_zero(), y + p * y_pix, s->m, room - p * y_pix, s->u, kp), kp));
#undef COMPARE
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

int fv_check(fv_check_t *s) {
    vli worst = {{{0}}};
    double norm2 = 0.0;
    if (check_rows_kp(s, s->y, s->m, s->p * s->m, 0, s->p, &worst, &norm2)) return -1;
    check_done(s, worst, norm2);
    return 0;
}
