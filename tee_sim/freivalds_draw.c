/* Freivalds' projections of one layer for one pool entry (tee_sim.freivalds.LayerCheck.draw): off an
 * inference's path, when the TA refills its pool, once per checked layer and entry.
 *
 * From fresh projections u (double [m][kp], zero past k) and the layer's obfuscated weights w (float32 [m][taps * c]:
 * LiteRT's CONV_2D [M, kh, kw, C] or FULLY_CONNECTED [M, C] layout) it computes the projected filters
 * F[e][j] = sum_i u[i][j] w[i][e] in double, then packs u and F for fv_prepare / fv_check (the layout
 * ta_shadownet_kernels.c describes: lane l of a vector holds projection l / G of channel l % G of its
 * group, G = 16 / kp; zero where the projection or the channel does not exist).
 *
 * Why C: numpy spent about 100 us of calls per layer and entry (a float64 copy of the weights, a tensordot,
 * two packings through padded temporaries), ResNet-404's 406 checked layers 40 ms of a 60 ms refill; this
 * keeps the kp sums of four weights in registers over the whole column of weights.
 *
 * Kept out of ta_shadownet_kernels.c (which is long enough); built into the same libraries.
 */
#include <stdint.h>
#include <string.h>

#define LANES 16

typedef struct {
    const double *u;      /* [m][kp], the projections (columns k..kp-1 zero) */
    const float *w;       /* [m][taps * c], the weights; NULL: pack u only (a layer the TEE computes) */
    double *acc;          /* scratch [taps * c][kp] */
    int64_t m, taps, c;
    int32_t k, kp;
    float *u_packed;      /* [ceil(m / G)][16] */
    float *f_packed;      /* [taps][ceil(c / G)][16] */
} fv_draw_t;

typedef double v4d __attribute__((vector_size(4 * sizeof(double))));
typedef float v4f __attribute__((vector_size(4 * sizeof(float))));

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

/* acc[e][j] = sum_i u[i][j] w[i][e]: four weights at a time, the kp sums in registers over every row i
 * (kp broadcasts of u[i] and kp FMAs per four weights; a store per multiply-add, as an axpy per projection
 * makes, capped it at a third of this). */
#define PROJECT(KP)                                                                                \
    do {                                                                                           \
        int64_t e0 = 0;                                                                            \
        for (; e0 + 4 <= d; e0 += 4) {                                                             \
            v4d sum[KP];                                                                           \
            for (int j = 0; j < KP; j++) sum[j] = (v4d){0, 0, 0, 0};                               \
            for (int64_t i = 0; i < s->m; i++) {                                                   \
                v4f w4;                                                                            \
                memcpy(&w4, s->w + i * d + e0, sizeof w4);                                         \
                v4d wv = __builtin_convertvector(w4, v4d);                                         \
                const double *ui = s->u + i * KP;                                                  \
                for (int j = 0; j < KP; j++) sum[j] += ui[j] * wv;                                 \
            }                                                                                      \
            for (int q = 0; q < 4; q++)                                                            \
                for (int j = 0; j < KP; j++) s->acc[(e0 + q) * KP + j] = sum[j][q];                \
        }                                                                                          \
        for (; e0 < d; e0++) {                                                                     \
            double sum[KP] = {0};                                                                  \
            for (int64_t i = 0; i < s->m; i++)                                                     \
                for (int j = 0; j < KP; j++) sum[j] += s->u[i * KP + j] * (double)s->w[i * d + e0]; \
            for (int j = 0; j < KP; j++) s->acc[e0 * KP + j] = sum[j];                             \
        }                                                                                          \
    } while (0)

int fv_draw(const fv_draw_t *s) {
    if (s->k < 1 || s->kp < s->k || s->kp > LANES || LANES % s->kp) return -1;
    pack(s->u, 1, s->m, s->k, s->kp, s->u_packed);
    if (!s->w) return 0;
    int64_t d = s->taps * s->c;
    switch (s->kp) {
    case 1: PROJECT(1); break;
    case 2: PROJECT(2); break;
    case 4: PROJECT(4); break;
    case 8: PROJECT(8); break;
    default: PROJECT(16); break;
    }
    pack(s->acc, s->taps, s->c, s->k, s->kp, s->f_packed);
    return 0;
}
