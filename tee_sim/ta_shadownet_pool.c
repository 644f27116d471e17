/* The ShadowNet trusted app's pool kernels: what a refill computes for a pool entry, off an inference's
 * path - the projections of a verified layer (fv_draw, for tee_sim.freivalds) and the pop mask of a
 * one-time-masked conv layer (sn_pop, for tee_sim.exact_split and tee_sim.one_time_masks). Kept out of
 * the inference's kernels; built into the same libraries and measured with the TA's code.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "ta_shadownet_kernels.h" /* LANES, SN_VL */

/* ---------------------------------------------------------------------------------------------------
 * Freivalds' projections of one layer (tee_sim.freivalds.LayerCheck.draw), once per checked layer and
 * entry. From fresh projections u (double [m][kp], zero past k) and the layer's obfuscated weights w
 * (float32 [m][taps * c]: LiteRT's CONV_2D [M, kh, kw, C] or FULLY_CONNECTED [M, C] layout) it computes
 * the projected filters F[e][j] = sum_i u[i][j] w[i][e] in double, then packs u and F for fv_prepare /
 * fv_check (the layout ta_shadownet_lanes.h describes: lane l of a vector holds projection l / G of
 * channel l % G of its group, G = 16 / kp; zero where the projection or the channel does not exist).
 *
 * Why C: numpy spent about 100 us of calls per layer and entry (a float64 copy of the weights, a
 * tensordot, two packings through padded temporaries), ResNet-404's 406 checked layers 40 ms of a 60 ms
 * refill; this keeps the sums in registers over the whole column of weights.
 */
typedef struct {
    const double *u;      /* [m][kp], the projections (columns k..kp-1 zero) */
    const float *w;       /* [m][taps * c], the weights; NULL: pack u only (a layer the TEE computes) */
    double *acc;          /* scratch [taps * c][kp] */
    int64_t m, taps, c;
    int32_t k, kp;
    float *u_packed;      /* [ceil(m / G)][16] */
    float *f_packed;      /* [taps][ceil(c / G)][16] */
} fv_draw_t;

/* The sums here are doubles, DW to a vector of the build's width (SN_VL floats). */
#define DW (SN_VL / 2)
typedef double vd __attribute__((vector_size(DW * sizeof(double))));
typedef float vf __attribute__((vector_size(DW * sizeof(float))));

/* out[t][g][j * G + r] = src[(t * rows + g * G + r) * kp + j], zero outside k projections and rows rows. */
static void pack(const double *src, int64_t taps, int64_t rows, int32_t k, int32_t kp, float *out) {
    int64_t group = LANES / kp, groups = (rows + group - 1) / group;
    for (int64_t t = 0; t < taps; t++)
        for (int64_t g = 0; g < groups; g++) {
            float *o = out + (t * groups + g) * LANES;
            for (int32_t j = 0; j < kp; j++)
                for (int64_t r = 0; r < group; r++) {
                    int64_t row = g * group + r;
                    o[j * group + r] = j < k && row < rows ? (float)src[(t * rows + row) * kp + j] : 0.0f;
                }
        }
}

/* acc[e][j0 .. j0 + JC - 1] = sum_i u[i][j] w[i][e]: 2 DW weights and JC <= 4 projections at a time,
 * their 2 JC vectors of sums in registers over every row i (an axpy per projection made a store per
 * multiply-add and ran at a third of this; sixteen vectors of sums spilled, on SSE2 from eight). */
#define PROJECT(JC)                                                                                \
    do {                                                                                           \
        int64_t e0 = 0;                                                                            \
        for (; e0 + 2 * DW <= d; e0 += 2 * DW) {                                                   \
            vd sum[JC][2];                                                                         \
            memset(sum, 0, sizeof sum);                                                            \
            for (int64_t i = 0; i < s->m; i++) {                                                   \
                vf w0, w1;                                                                         \
                memcpy(&w0, s->w + i * d + e0, sizeof w0);                                         \
                memcpy(&w1, s->w + i * d + e0 + DW, sizeof w1);                                    \
                vd a = __builtin_convertvector(w0, vd), b = __builtin_convertvector(w1, vd);       \
                const double *ui = s->u + i * kp + j0;                                             \
                for (int j = 0; j < JC; j++) {                                                     \
                    sum[j][0] += ui[j] * a;                                                        \
                    sum[j][1] += ui[j] * b;                                                        \
                }                                                                                  \
            }                                                                                      \
            for (int q = 0; q < DW; q++)                                                           \
                for (int j = 0; j < JC; j++) {                                                     \
                    s->acc[(e0 + q) * kp + j0 + j] = sum[j][0][q];                                 \
                    s->acc[(e0 + DW + q) * kp + j0 + j] = sum[j][1][q];                            \
                }                                                                                  \
        }                                                                                          \
        for (; e0 < d; e0++)                                                                       \
            for (int j = 0; j < JC; j++) {                                                         \
                double sum = 0.0;                                                                  \
                for (int64_t i = 0; i < s->m; i++)                                                 \
                    sum += s->u[i * kp + j0 + j] * (double)s->w[i * d + e0];                       \
                s->acc[e0 * kp + j0 + j] = sum;                                                    \
            }                                                                                      \
    } while (0)

int fv_draw(const fv_draw_t *s) {
    if (s->k < 1 || s->kp < s->k || s->kp > LANES || LANES % s->kp) return -1;
    pack(s->u, 1, s->m, s->k, s->kp, s->u_packed);
    if (!s->w) return 0;
    int64_t d = s->taps * s->c, kp = s->kp;
    /* The k projections (pack reads no others) in ceil(k / 4) passes of as many each (5: 3 + 2, not 4 + 1,
     * whose pass would have two chains of FMAs). */
    int passes = (s->k + 3) / 4;
    for (int p = 0, j0 = 0; p < passes; p++) {
        int jc = (s->k - j0 + passes - p - 1) / (passes - p);
        switch (jc) {
        case 1: PROJECT(1); break;
        case 2: PROJECT(2); break;
        case 3: PROJECT(3); break;
        default: PROJECT(4); break;
        }
        j0 += jc;
    }
    pack(s->acc, s->taps, s->c, s->k, s->kp, s->f_packed);
    return 0;
}

/* ---------------------------------------------------------------------------------------------------
 * The pop mask of a one-time-masked CONV_2D, once per entry, for the mask r (float32 [n][h][w][c]) and
 * w_full, the layer's weights as double [kh * kw * c][m] (rows tap-major, then channel). Zero padding, as
 * LiteRT's. Two kinds:
 * - an exact split (grid > 0; tee_sim.exact_split.SplitPop): with r_hi = grid * rint(r / grid) and w_hi
 *   the split's first block, at each output position
 *       pop_hi = L(r_hi, W'_hi)          exact: r_hi and W'_hi have few significant bits (the scheme's
 *                                        proof, converters.exact_split), so every partial sum is exact in
 *                                        double, in any order
 *       pop_lo = L(r, W') - pop_hi       in double, rounded once to float32
 *   out: [n][ho][wo][2m];
 * - a plain one (grid 0; tee_sim.one_time_masks.PopMask): w_full the obfuscated filters composed with the
 *   restore, so out = bias - L(r, w_full), the restore's offset, in double, rounded once: [n][ho][wo][m].
 *
 * Why C: numpy made a strided copy of every position's window, split it, and multiplied two float64
 * matrices of 27 columns: 8 of a MobileNet entry's 9 ms, 13 of yolov4-tiny's 15 (the plain kind, yolov4-
 * tiny's round 1 unsplit: 25 ms a refill). Here each window is gathered (and split) once, and the sums of
 * POP_P output positions by 2 vectors of outputs (a split's, with its two sums each, by 1) stay in registers
 * over their windows: each weight vector loaded serves POP_P positions. One position at a time, 4 vectors of
 * outputs, the kernel was bound by its loads: on an AVX2 core a plain pop 5-6 -> 13-28 GMAC/s, a split one
 * 12 -> 14-16 (old and new builds alternated, minimum of 9 runs; 6 positions spilled).
 */
typedef struct {
    const float *r;
    int64_t n, h, w, c, ho, wo;
    int32_t kh, kw, sh, sw, dh, dw, top, left;
    const double *w_hi, *w_full;
    int64_t m;
    double grid;          /* > 0: an exact split's pop; 0: a plain one, with bias */
    const double *bias;   /* [m], a plain pop's */
    float *out;
    double *window;       /* scratch [2 * POP_P * kh * kw * c]: POP_P positions' r, then their r_hi */
} sn_pop_t;

#define POP_P 4 /* output positions a plain pop sums at once (a split one, 2): tee_sim.one_time_masks.POP_P */

/* rint(x), ties to even, without libm's call (which the baseline build made for every value): below 2^51
 * in magnitude, adding and subtracting 1.5 * 2^52 rounds x to an integer as rint does. */
static inline double round_even(double x) {
    const double shift = 6755399441055744.0;
    return fabs(x) < 2251799813685248.0 ? (x + shift) - shift : rint(x);
}

static inline vd load_vd(const double *p) { vd v; memcpy(&v, p, sizeof v); return v; }

/* One output position's window of r into full (and, split, its r_hi into hi); zero outside the input. */
static inline void pop_window(const sn_pop_t *s, int64_t b, int64_t oy, int64_t ox, int split, double inv,
                              double *full, double *hi) {
    int64_t c = s->c;
    for (int32_t i = 0; i < s->kh; i++) {
        int64_t y = oy * s->sh - s->top + (int64_t)i * s->dh;
        for (int32_t j = 0; j < s->kw; j++) {
            int64_t x = ox * s->sw - s->left + (int64_t)j * s->dw, e = ((int64_t)i * s->kw + j) * c;
            int inside = y >= 0 && y < s->h && x >= 0 && x < s->w;
            const float *px = inside ? s->r + ((b * s->h + y) * s->w + x) * c : NULL;
            for (int64_t ch = 0; ch < c; ch++) {
                double v = px ? px[ch] : 0.0;
                full[e + ch] = v;
                if (split) hi[e + ch] = round_even(v * inv) * s->grid;
            }
        }
    }
}

/* The sums of P positions (windows at full + p * d, hi + p * d) for Q vectors of outputs from o0, kept in
 * registers over d, then stored to o[p]: P, Q and split are constants where it is called, so that the
 * compiler unrolls its loops. */
static inline __attribute__((always_inline)) void pop_block(const sn_pop_t *s, int P, int Q, int split,
                                                             const double *full, const double *hi,
                                                             int64_t d, int64_t o0, float *const *o) {
    int64_t m = s->m;
    vd sh[POP_P][2], sf[POP_P][2];
    memset(sh, 0, sizeof sh);
    memset(sf, 0, sizeof sf);
    for (int64_t e = 0; e < d; e++) {
        const double *f = s->w_full + e * m + o0, *a = split ? s->w_hi + e * m + o0 : NULL;
        for (int q = 0; q < Q; q++) {
            vd wf = load_vd(f + q * DW);
            for (int p = 0; p < P; p++) sf[p][q] += full[p * d + e] * wf;
            if (split) {
                vd wh = load_vd(a + q * DW);
                for (int p = 0; p < P; p++) sh[p][q] += hi[p * d + e] * wh;
            }
        }
    }
    for (int p = 0; p < P; p++)
        for (int q = 0; q < Q; q++) { /* rounded to float a vector at a time: lane by lane */
            vf low;                   /* the stores took a quarter of yolov4-tiny's split pop */
            if (split) {
                vf high = __builtin_convertvector(sh[p][q], vf);
                memcpy(o[p] + o0 + q * DW, &high, sizeof high);
                low = __builtin_convertvector(sf[p][q] - sh[p][q], vf);
                memcpy(o[p] + m + o0 + q * DW, &low, sizeof low);
            } else {
                low = __builtin_convertvector(load_vd(s->bias + o0 + q * DW) - sf[p][q], vf);
                memcpy(o[p] + o0 + q * DW, &low, sizeof low);
            }
        }
}

int sn_pop(const sn_pop_t *s) {
    int64_t m = s->m, d = (int64_t)s->kh * s->kw * s->c;
    int split = s->grid > 0, P = POP_P;  /* positions a block sums; a split's, one vector of outputs each */
    double inv = split ? 1.0 / s->grid : 0.0, *full = s->window, *hi = s->window + POP_P * d;
    for (int64_t b = 0; b < s->n; b++)
        for (int64_t oy = 0; oy < s->ho; oy++)
            for (int64_t ox = 0; ox < s->wo; ox += P) {
                int np = s->wo - ox < P ? (int)(s->wo - ox) : P;
                float *o[POP_P];
                for (int p = 0; p < np; p++) {
                    pop_window(s, b, oy, ox + p, split, inv, full + p * d, hi + p * d);
                    o[p] = s->out + ((b * s->ho + oy) * s->wo + ox + p) * (split ? 2 * m : m);
                }
                int64_t o0 = 0;
                for (; o0 + 2 * DW <= m; o0 += 2 * DW) {
                    if (np == P && split) { /* two chains a position: one vector of outputs at a time */
                        pop_block(s, POP_P, 1, 1, full, hi, d, o0, o);
                        pop_block(s, POP_P, 1, 1, full, hi, d, o0 + DW, o);
                    }
                    else if (np == P) pop_block(s, POP_P, 2, 0, full, hi, d, o0, o);
                    else
                        for (int p = 0; p < np; p++) {
                            if (split) pop_block(s, 1, 2, 1, full + p * d, hi + p * d, d, o0, o + p);
                            else pop_block(s, 1, 2, 0, full + p * d, hi + p * d, d, o0, o + p);
                        }
                }
                for (; o0 + DW <= m; o0 += DW)
                    if (np == P && split) pop_block(s, POP_P, 1, 1, full, hi, d, o0, o);
                    else if (np == P) pop_block(s, POP_P, 1, 0, full, hi, d, o0, o);
                    else for (int p = 0; p < np; p++) {
                        if (split) pop_block(s, 1, 1, 1, full + p * d, hi + p * d, d, o0, o + p);
                        else pop_block(s, 1, 1, 0, full + p * d, hi + p * d, d, o0, o + p);
                    }
                for (int p = 0; p < np; p++)
                    for (int64_t k = o0; k < m; k++) {
                        double h = 0.0, f = 0.0;
                        for (int64_t e = 0; e < d; e++) {
                            if (split) h += hi[p * d + e] * s->w_hi[e * m + k];
                            f += full[p * d + e] * s->w_full[e * m + k];
                        }
                        if (split) {
                            o[p][k] = (float)h;
                            o[p][m + k] = (float)(f - h);
                        } else {
                            o[p][k] = (float)(s->bias[k] - f);
                        }
                    }
            }
    return 0;
}

/* ---------------------------------------------------------------------------------------------------
 * A modular mask's unwrap (tee_sim.modular_masks): the push sent x + r - period * k, k the periods it took
 * off each element (int8, mostly 0), and the restore's offset bias - restore(L(r)) is made right for it
 * here, on the inference's path between the push and the restore: out += period * restore(L(k)), summed
 * only where k is not 0 - for each such input element, every output position whose window reads it gets
 * its tap's row of the layer's weights composed with the restore (e: [kh * kw * c][m], rows tap-major, then
 * channel), times period * k. A conv's geometry as sn_pop's; a dense layer is a 1x1 conv on h = w = 1.
 */
typedef struct {
    const int8_t *k;      /* [n][h][w][c], as the push wrote it: rows y0..y1-1, columns x0..x1-1 (a padded
                             push's interior; what lies outside is not read) */
    int64_t n, h, w, c, ho, wo;
    int64_t y0, y1, x0, x1;
    int32_t kh, kw, sh, sw, dh, dw, top, left;
    const float *e;       /* [kh * kw * c][m] */
    int64_t m;
    const float *period;  /* the push's period now (its mask's power of two moves it) */
    float *out;           /* [n][ho][wo][m], the restore's offset */
} sn_unwrap_t;

/* Whether any of the c bytes at p is not 0: eight at a time. */
static inline int any_set(const int8_t *p, int64_t c) {
    int64_t i = 0;
    uint64_t acc = 0;
    for (; i + 8 <= c; i += 8) {
        uint64_t v;
        memcpy(&v, p + i, sizeof v);
        acc |= v;
    }
    for (; i < c; i++) acc |= (uint8_t)p[i];
    return acc != 0;
}

/* The taps of a kernel along one axis that read input index `at`, and the outputs they make: (tap, output)
 * pairs into `pairs`, their count returned. */
static inline int32_t reached(int64_t at, int32_t before, int32_t taps, int32_t stride, int32_t dilation,
                              int64_t outputs, int32_t *pairs) {
    int32_t count = 0;
    for (int32_t i = 0; i < taps; i++) {
        int64_t num = at + before - (int64_t)i * dilation;
        if (num < 0 || num % stride) continue;
        int64_t o = num / stride;
        if (o >= outputs) continue;
        pairs[2 * count] = i;
        pairs[2 * count + 1] = (int32_t)o;
        count++;
    }
    return count;
}

/* Vectors of an output row the unwrap sums in registers at a time: 64 floats with AVX2. */
#define UNWRAP_BLOCK 8
/* Wrapped channels of a pixel it gathers at a time (a dense layer's "pixel" is its whole input). */
#define UNWRAP_CHANNELS 512

/* out[0..m) += sum over n of f[n] * e[chans[n] * m + 0..m): one input pixel's wrapped channels at one tap,
 * summed in registers and added to the output row once (a read-modify-write per wrapped element and tap
 * was a chain of dependent stores into the same row: 1.3-2.2x slower with a fifth of ResNet-44's round
 * shapes' elements wrapped, about as fast with a twentieth - a microbenchmark on a busy machine). */
static inline void unwrap_row(float *restrict out, const float *restrict e, const int32_t *chans,
                              const float *f, int64_t nz, int64_t m) {
    int64_t q = 0;
    for (; q + UNWRAP_BLOCK * SN_VL <= m; q += UNWRAP_BLOCK * SN_VL) {
        vn acc[UNWRAP_BLOCK] = {0};
        for (int64_t n = 0; n < nz; n++) {
            const float *row = e + (int64_t)chans[n] * m + q;
            for (int u = 0; u < UNWRAP_BLOCK; u++) acc[u] += f[n] * loadn(row + u * SN_VL);
        }
        for (int u = 0; u < UNWRAP_BLOCK; u++)
            storen(out + q + u * SN_VL, loadn(out + q + u * SN_VL) + acc[u]);
    }
    for (; q + SN_VL <= m; q += SN_VL) {
        vn acc = {0};
        for (int64_t n = 0; n < nz; n++) acc += f[n] * loadn(e + (int64_t)chans[n] * m + q);
        storen(out + q, loadn(out + q) + acc);
    }
    for (; q < m; q++) {
        float acc = 0.0f;
        for (int64_t n = 0; n < nz; n++) acc += f[n] * e[(int64_t)chans[n] * m + q];
        out[q] += acc;
    }
}

int sn_unwrap(const sn_unwrap_t *s) {
    float period = *s->period;
    int64_t m = s->m, c = s->c;
    /* Which taps an input row and column reach: a row's once per row that wraps, a column's once per pixel
     * that wraps (not per tap and wrapped element); a pixel's wrapped channels once per pixel. The unwrap's
     * time is in its scattered read-modify-writes of the offset (perf: the stores): ~100 ns a wrapped
     * element on yolov4-tiny's round-2 shapes alone, ~250 ns in its inference, where the offset comes from
     * a refill out of cache, before the channels were summed per pixel and tap (unwrap_row). */
    int32_t rows[2 * s->kh], cols[2 * s->kw];
    int32_t chans[UNWRAP_CHANNELS];
    float factor[UNWRAP_CHANNELS];
    for (int64_t b = 0; b < s->n; b++)
        for (int64_t iy = s->y0; iy < s->y1; iy++) {
            int32_t ny = -1;
            for (int64_t ix = s->x0; ix < s->x1; ix++) {
                const int8_t *k = s->k + ((b * s->h + iy) * s->w + ix) * c;
                if (!any_set(k, c)) continue;
                if (ny < 0) ny = reached(iy, s->top, s->kh, s->sh, s->dh, s->ho, rows);
                int32_t nx = reached(ix, s->left, s->kw, s->sw, s->dw, s->wo, cols);
                for (int64_t ch0 = 0; ch0 < c; ch0 += UNWRAP_CHANNELS) {
                    int64_t nz = 0, end = ch0 + UNWRAP_CHANNELS < c ? ch0 + UNWRAP_CHANNELS : c;
                    for (int64_t ch = ch0; ch < end; ch++)
                        if (k[ch]) {
                            chans[nz] = (int32_t)ch;
                            factor[nz++] = period * (float)k[ch];
                        }
                    for (int32_t a = 0; nz && a < ny; a++)
                        for (int32_t c2 = 0; c2 < nx; c2++) {
                            int32_t i = rows[2 * a], oy = rows[2 * a + 1], j = cols[2 * c2], ox = cols[2 * c2 + 1];
                            unwrap_row(s->out + ((b * s->ho + oy) * s->wo + ox) * m,
                                       s->e + ((int64_t)i * s->kw + j) * c * m, chans, factor, nz, m);
                        }
                }
            }
        }
    return 0;
}
