/* What the ShadowNet trusted app's C files share: ta_shadownet_kernels.c (restore / push: sn_run),
 * ta_shadownet_freivalds.c and _freivalds_check.c (the check of an accelerator's result, whose packed lanes
 * are in ta_shadownet_lanes.h), ta_shadownet_max_pool.c, ta_shadownet_small_ops.c and ta_shadownet_pool.c
 * (what a pool refill computes) - the vector types of the build's width (SN_VL), the width of the layouts
 * shared with Python (LANES), and the check's entry points that sn_run calls tile by tile. All are built
 * into one library per target (setup.py) and measured with the TA's code.
 */
#ifndef TA_SHADOWNET_KERNELS_H
#define TA_SHADOWNET_KERNELS_H

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

INLINE vn select(vni m, vn a, vn b) { return (vn)(((vni)a & m) | ((vni)b & ~m)); }

/* The spread a followed one-time mask compares (tee_sim.mask_spread): add_squares adds the squares of n
 * contiguous floats to *sum (float lanes over blocks of 4096, each block's sum added in double) and keeps
 * the largest in *top (a NaN reaches the sum); in_band says whether the squared spread of count values -
 * the larger of their mean square and peak_weight times their largest square, stored in *spread - lies
 * in (lo, hi] (NaN: outside). SN_SPREAD (a plain push's check) and sn_run's measure (a restore's) share
 * them. */
INLINE void add_squares(const float *x, int64_t n, double *sum, float *top) {
    vn peak = {0};
    float most = *top;
    int64_t k = 0;
    while (k + SN_VL <= n) {
        int64_t end = k + 4096 < n ? k + 4096 : n;
        vn a = {0}, b = {0};
        for (; k + 2 * SN_VL <= end; k += 2 * SN_VL) {
            vn u = loadn(x + k), v = loadn(x + k + SN_VL);
            vn uu = u * u, vv = v * v;
            a += uu;
            b += vv;
            peak = select(uu > peak, uu, peak);
            peak = select(vv > peak, vv, peak);
        }
        for (; k + SN_VL <= end; k += SN_VL) {
            vn u = loadn(x + k), uu = u * u;
            a += uu;
            peak = select(uu > peak, uu, peak);
        }
        a += b;
        for (int j = 0; j < SN_VL; j++) *sum += (double)a[j];
    }
    for (int j = 0; j < SN_VL; j++) most = peak[j] > most ? peak[j] : most;
    for (; k < n; k++) {
        float uu = x[k] * x[k];
        *sum += (double)uu;
        most = uu > most ? uu : most;
    }
    *top = most;
}

INLINE int in_band(double sum, float top, int64_t count, double peak_weight, double lo, double hi,
                   double *spread) {
    double mean = sum / (double)(count > 0 ? count : 1), peak = peak_weight * (double)top;
    *spread = peak > mean ? peak : mean;
    return *spread > lo && *spread <= hi;
}

/* A vector of the packed layout's 16 lanes, as PARTS vectors of the target's width (lane l: part l / SN_VL,
 * lane l % SN_VL of it); with AVX-512, one register. */
#define PARTS (LANES / SN_VL)
typedef struct { vn part[PARTS]; } vl;
typedef struct { vni part[PARTS]; } vli;

/* Freivalds' check of one layer (ta_shadownet_freivalds_check.c). For sn_run, which checks an accelerator's
 * result tile by tile as it restores it: fv_check_tile takes t positions from p0 (results y, pixel stride
 * y_pix, `room` floats readable from y) into the running worst ratio and norm; it returns 1 once the
 * worst ratio fails the check (nothing of the tile may be used), -1 for a lane layout it does not know,
 * else 0. fv_check_finish stores the outcome, as fv_check does. */
typedef struct fv_check fv_check_t;
struct fv_check { /* one layer's check (tee_sim.freivalds.LayerCheck fills it) */
    const float *y;                     /* the secure copy of the accelerator's result, [P, M] */
    int64_t p, m;
    const float *u;                     /* packed projections [ceil(M / G)][16] */
    int32_t k, kp;
    const float *z, *tau;               /* z: [P][kp] and 16 floats of slack */
    double worst;                       /* out: max |u . y_p - z_p| / tau_p (0 where both are 0) */
    double y_norm2;                     /* out, when asked (want_norm): ||y||^2 */
    int32_t want_norm;
    int32_t tiled;                      /* M a multiple of G, kp >= 4: positions a tile at a time */
    float coherent;                     /* tau_p^2 + coherent * ||y_p||^2 is the tolerance squared: an
                                           honest sum's rounding that grows with the result (0: none) */
};
int fv_check_tile(const fv_check_t *s, const float *y, int64_t y_pix, int64_t room, int64_t p0, int64_t t,
                  vli *worst, double *norm2);
void fv_check_finish(fv_check_t *s, const vli *worst, double norm2);

#endif
