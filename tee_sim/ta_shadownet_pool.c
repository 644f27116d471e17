/* The ShadowNet trusted app's pool kernels: what a refill computes for a pool entry, off an inference's
 * path - the projections of a verified layer (fv_draw, for tee_sim.freivalds). Kept out of
 * ta_shadownet_kernels.c (the inference's kernels); built into the same libraries and measured with the
 * TA's code.
 */
#include <stdint.h>
#include <string.h>

#define LANES 16

/* ---------------------------------------------------------------------------------------------------
 * Freivalds' projections of one layer (tee_sim.freivalds.LayerCheck.draw), once per checked layer and
 * entry. From fresh projections u (double [m][kp], zero past k) and the layer's obfuscated weights w
 * (float32 [m][taps * c]: LiteRT's CONV_2D [M, kh, kw, C] or FULLY_CONNECTED [M, C] layout) it computes
 * the projected filters F[e][j] = sum_i u[i][j] w[i][e] in double, then packs u and F for fv_prepare /
 * fv_check (the layout ta_shadownet_kernels.c describes: lane l of a vector holds projection l / G of
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

/* SN_VL (setup.py, per build): the target's vector width in floats, as in ta_shadownet_kernels.c; the
 * sums here are doubles, DW to a vector. */
#ifndef SN_VL
#define SN_VL 4
#endif
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
