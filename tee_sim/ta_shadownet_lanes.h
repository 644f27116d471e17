/* The packed lanes of Freivalds' check, shared by its prepares (ta_shadownet_freivalds.c) and its checks
 * (ta_shadownet_freivalds_check.c): vectors of 16 lanes as PARTS registers of the build's width, input
 * values repeated across them, sums across a projection's lanes, a row of values times packed coefficients.
 */
#ifndef TA_SHADOWNET_LANES_H
#define TA_SHADOWNET_LANES_H

#include <stdint.h>
#include <string.h>

#include "ta_shadownet_kernels.h"

#if SN_VL == 16 && defined(__AVX512F__)
#include <immintrin.h>
#endif

/* Lanes: k <= 16 projections are padded to kp in {1, 2, 4, 8, 16}, and a vector holds G = 16 / kp
 * channels of each projection (lane l: projection l / G, channel l % G of the group), so that a layer
 * checked with 4 projections fills the vector with 4 channels at a time instead of wasting 12 lanes (the
 * G input values are repeated for every projection by one permutation). Packed
 * filters: [taps][ceil(C / G)][16]; packed projections: [ceil(M / G)][16]; zero where the channel or the
 * projection does not exist. z is kept as kp floats per output position.
 */

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
static inline vl repeat_tail(const float *x, int32_t kp, int64_t room) {
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

/* The tiled loops (prepare_tiled, check_rows): registers of sums, 4 multiply-adds in flight on each of 2
 * ports; a position's 16 lanes take PARTS of them, so a tile has TILE_ROWS positions. */
#define TILE_SUMS 8
#define TILE_ROWS (TILE_SUMS / PARTS)

typedef float v4f __attribute__((vector_size(4 * sizeof(float))));
typedef float v8f __attribute__((vector_size(8 * sizeof(float))));
typedef double vnd __attribute__((vector_size(SN_VL * sizeof(float))));

/* The G = 16 / kp floats at p repeated across a vector: a broadcast load for 1 or 2 (x - 0 folds away),
 * a load and a permutation for 4 (GCC's choice, which measured faster on the AVX2 EPYC than
 * vbroadcastf128). With AVX-512 a broadcast load (vbroadcastf32x4): two doublings (a load and two
 * permutations) took 7-28% longer per kp = 4 prepare on Zen 5 (minima of 300 calls, in turn), and a
 * single 4 -> 16 shuffle made GCC 12 store the 4 floats and load 64 bytes back from the stack, a failed
 * store forwarding per load (7-14x slower than the AVX2 build's prepares and checks). */
INLINE vn repeat_load(const float *p, int32_t kp) {
    int32_t g = LANES / kp;
    if (g == 1) return *p - (vn){0};
    if (g == 2) {
        double d;
        memcpy(&d, p, sizeof d);
        return (vn)(d - (vnd){0});
    }
    v4f x;
    memcpy(&x, p, sizeof x);
#if SN_VL == 4
    return x;
#elif SN_VL == 8
    return __builtin_shufflevector(x, x, 0, 1, 2, 3, 0, 1, 2, 3);
#elif defined(__AVX512F__)
    return (vn)_mm512_broadcast_f32x4((__m128)x);
#else
    v8f twice = __builtin_shufflevector(x, x, 0, 1, 2, 3, 0, 1, 2, 3);
    return __builtin_shufflevector(twice, twice, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7);
#endif
}

/* A tile of rows (row r's values from rows[r]) times packed [groups][16] coefficients, into each row's sums:
 * each coefficient vector loaded once for the tile, each row's G values repeated by their own load. The
 * inner loop of prepare_tiled (a window's tap) and of check_rows' tiles. */
INLINE void tile_dot(vl sums[TILE_ROWS], const float *const rows[TILE_ROWS], int64_t groups, const float *coef,
                     int32_t kp) {
    int32_t g = LANES / kp;
    for (int64_t cg = 0; cg < groups; cg++) {
        vl w = vl_load(coef + cg * LANES);
#pragma GCC unroll 8
        for (int32_t r = 0; r < TILE_ROWS; r++) {
            vn x = repeat_load(rows[r] + cg * g, kp);
            for (int32_t h = 0; h < PARTS; h++) sums[r].part[h] += x * w.part[h];
        }
    }
}

#endif
