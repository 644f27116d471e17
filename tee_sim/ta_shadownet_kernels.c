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
 * A modular mask's (tee_sim.modular_masks): dst = b + mask modulo its period (split: the high half modulo
 * it), the periods taken off stored.
 * A restore whose fused push's mask follows its input (tee_sim.mask_spread) also measures the restored
 * tensor's spread as it makes it (`spread`), and says when the mask must move.
 * A push is the same with A, the offset and the activation left out. Every intermediate value lives in the
 * caller's scratch (secure memory), a tile of pixels of one row at a time: nothing before its transform
 * and mask reaches `dst`, which may be shared memory. On a verified model the same pass copies each tile
 * of an accelerator's result into secure memory, checks it there (Freivalds: ta_shadownet_freivalds_check.c)
 * and restores it from there, and writes the secure copy of what it sends next to `dst`: no extra pass
 * over either tensor.
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

#include "ta_shadownet_kernels.h"
#include "ta_shadownet_linear_map.h"

typedef struct {
    const float *p;   /* NULL: absent */
    int64_t row, pix; /* strides in floats; 0, 0: one vector for every pixel */
} sn_tensor;


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
    double *spread;    /* a restore's fused push whose mask follows its input (tee_sim.mask_spread):
                          [lo, hi, peak_weight, measured]; the restored tensor's squared spread - the larger
                          of its mean square and peak_weight times its largest square - is measured as it
                          is made, stored in [3], and sn_run returns 2 when it lies outside (lo, hi] (NaN:
                          outside): the mask must move, and the step be run again; NULL: none */
    fv_check_t *popped; /* a restore's, with pop on a verified model: the check of (y_hi - pop_hi) + (y_lo -
                           pop_lo), made tile by tile after check's (tee_sim.freivalds); NULL: none */
    float *plain;       /* a push's, with grid on a verified model: where the input x itself goes (dst's
                           grid, its channels), for the popped check's prepare; NULL: nowhere */
    int64_t plain_row, plain_pix;
    int8_t *wraps;      /* a push's modular mask (tee_sim.modular_masks): x + r is sent modulo *period,
                           into [-period / 2, period / 2), and how many periods came off each element is
                           stored here (the mask's grid: its row and pixel strides); NULL: none */
    const float *period;
} sn_step;

#define MAX_STACK_BIAS 16384 /* floats: wider per-channel offsets take the unfused path */

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

/* A modular mask's send (tee_sim.modular_masks): w = x + r, k = floor(w / period + 1/2), dst = w - k period
 * (exact: period is a power of two) within [-period / 2, period / 2), k into wraps, saturated at +-127
 * (beyond ~127 periods, which the followed mask's band keeps the input far from, the restore would be off;
 * NaN: 0, the step fails on it). The interval is half-open: with both ends sent, which end a value on the
 * boundary took would depend on the input (a split's grid puts 1 in 64 of them there, and a fit over 1,600
 * inferences took 5 of ResNet-44's 16 first-layer filters from it). Rounded by adding and taking off
 * 1.5 * 2^23 (to nearest even, exact below 2^22: past it, saturated anyway) and the upper end moved down, a
 * vector at a time: rintf and an int8 store per element ran at a third of a plain send's speed. */
typedef int8_t vnb __attribute__((vector_size(SN_VL)));
typedef int8_t vnb4 __attribute__((vector_size(4 * SN_VL)));
#if SN_VL == 16
#define LOW_BYTES {0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60, \
                   0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60, \
                   0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60, \
                   0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60}
#elif SN_VL == 8
#define LOW_BYTES {0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28, \
                   0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28}
#else
#define LOW_BYTES {0, 4, 8, 12, 0, 4, 8, 12, 0, 4, 8, 12, 0, 4, 8, 12}
#endif
INLINE vn modular(vn w, float inverse, float period, vnb *k) {
    const vn magic = (vn){0} + 12582912.0f, top = (vn){0} + 127.0f;
    vn n = (w * inverse + magic) - magic;
    n = select(w - n * period >= 0.5f * period, n + 1.0f, n); /* the upper end: half-open */
    vni keep = (n == n) & (n <= top) & (n >= -top);
    n = select(keep, n, select(n > top, top, select(n < -top, -top, (vn){0})));
    /* Each int32's low byte (little-endian: the int8 of a value within +-127), gathered by one shuffle: a
     * conversion to int8 went element by element. */
    vnb4 bytes = __builtin_shuffle((vnb4)__builtin_convertvector(n, vni), (vnb4)LOW_BYTES);
    memcpy(k, &bytes, sizeof *k);
    return w - n * period;
}

INLINE void send_modular(float *dst, int64_t dst_pix, const float *x, int64_t x_pix, const float *mask,
                         int64_t mask_pix, int8_t *wraps, int64_t t, int32_t c, float period) {
    float inverse = 1.0f / period;
    for (int64_t p = 0; p < t; p++) {
        const float *a = x + p * x_pix, *r = mask + p * mask_pix;
        float *o = dst + p * dst_pix;
        int8_t *k = wraps + p * mask_pix;
        int32_t i = 0;
        vnb kv;
        for (; i + SN_VL <= c; i += SN_VL) {
            storen(o + i, modular(loadn(a + i) + loadn(r + i), inverse, period, &kv));
            memcpy(k + i, &kv, sizeof kv);
        }
        if (i < c) { /* the rest through a vector's worth of stack */
            float wa[SN_VL] = {0}, wo[SN_VL];
            int8_t ka[SN_VL];
            for (int32_t j = i; j < c; j++) wa[j - i] = a[j] + r[j];
            storen(wo, modular(loadn(wa), inverse, period, &kv));
            memcpy(ka, &kv, sizeof kv);
            for (int32_t j = i; j < c; j++) {
                o[j] = wo[j - i];
                k[j] = ka[j - i];
            }
        }
    }
}

/* t pixels of `width` floats from src to dst: one copy when both are dense. */
INLINE void copy_pixels(float *dst, int64_t dst_pix, const float *src, int64_t src_pix, int64_t t,
                        int32_t width) {
    if (dst_pix == width && src_pix == width) {
        copy(dst, src, (int32_t)(t * width));
        return;
    }
    for (int64_t p = 0; p < t; p++) copy(dst + p * dst_pix, src + p * src_pix, width);
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

/* An exact split's send of a modular mask (tee_sim.modular_masks): send_split's, its high half r_hi + q taken
 * modulo the period (a multiple of the grid: exact), the periods taken off into wraps (as send_modular), both
 * halves within half-open intervals, [-period / 2, period / 2) and [-grid / 2, grid / 2) (send_modular says
 * why: here 1 in 2^(x_bits - 1) of the high half's values fall on the boundary). */
INLINE void send_split_modular(float *dst, int64_t dst_pix, const float *x, int64_t x_pix, const float *mask,
                               int64_t mask_pix, int8_t *wraps, int64_t t, int32_t c, float grid,
                               float period) {
    float inverse = 1.0f / grid, turns = 1.0f / period;
    for (int64_t p = 0; p < t; p++) {
        const float *a = x + p * x_pix, *r = mask + p * mask_pix;
        float *o = dst + p * dst_pix;
        int8_t *k = wraps + p * mask_pix;
        for (int32_t i = 0; i < c; i++) {
            float high = rintf(r[i] * inverse) * grid; /* as the pop mask's r_hi (split_mask) */
            float w = a[i] + (r[i] - high);
            float q = floorf(w * inverse + 0.5f) * grid;
            float h = high + q, n = floorf(h * turns + 0.5f);
            n = n > 127.0f ? 127.0f : n < -127.0f ? -127.0f : n == n ? n : 0.0f;
            o[i] = h - n * period;
            o[c + i] = w - q;
            k[i] = (int8_t)n;
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
    fv_check_t *check = s->check, *popped = s->pop.p ? s->popped : NULL;
    vli worst = {{{0}}}, worst_popped = {{{0}}};
    double norm2 = 0.0, norm2_popped = 0.0;
    int measured = s->spread && restored;
    double squares = 0.0;
    float top = 0.0f;
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
    /* With a secure copy (a verified model's) and no mask, a last stage B that writes exactly dst's
     * channels stores into the copy, and the tile goes out from there: no tile in scratch copied to both. */
    int via_copy = !s->mask.p && s->copy && s->b.kind != SN_NONE && exact(&s->b);
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
                int verdict = fv_check_tile(check, x, stride, t * stride, r * s->cols + q0, t, &worst, &norm2);
                if (verdict < 0) return -1;
                if (verdict > 0) { /* wrong: nothing of this tile is used */
                    fv_check_finish(check, &worst, norm2);
                    if (popped) fv_check_finish(popped, &worst_popped, norm2_popped); /* this run's, not a
                                                                                       previous one's */
                    return 1;
                }
            }
            if (s->pop.p) { /* tile_b is free until B */
                const float *pop = s->pop.p + r * s->pop.row + q0 * s->pop.pix;
                pop_halves(x, x_pix, pop, s->pop.pix, tile_b, stride, t, s->a.n_in);
                x = tile_b;
                x_pix = stride;
                if (popped) { /* from the secure copy: what is used is what is checked */
                    int verdict = fv_check_tile(popped, x, stride, t * stride, r * s->cols + q0, t, &worst_popped,
                                                &norm2_popped);
                    if (verdict < 0) return -1;
                    if (verdict > 0) {
                        if (check) fv_check_finish(check, &worst, norm2);
                        fv_check_finish(popped, &worst_popped, norm2_popped);
                        return 1;
                    }
                }
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
            if (measured)
                for (int64_t p = 0; p < t; p++) add_squares(x + p * x_pix, n, &squares, &top);
            if (via_copy) {
                float *secure = s->copy + r * s->copy_row + q0 * s->copy_pix;
                apply(&s->b, x, x_pix, secure, s->copy_pix, tmp, stride, t, NULL, x == src);
                copy_pixels(out, s->dst_pix, secure, s->copy_pix, t, c);
                continue;
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
            /* What is sent is made once: in the secure copy when there is one (from the secure tile), and
             * sent from there; nothing is read back from shared memory. */
            float *secure = s->copy ? s->copy + r * s->copy_row + q0 * s->copy_pix : NULL;
            float *made = secure ? secure : out;
            int64_t made_pix = secure ? s->copy_pix : s->dst_pix;
            int split = s->grid > 0 && m;
            if (split && s->wraps)
                send_split_modular(made, made_pix, x, x_pix, m, s->mask.pix,
                                   s->wraps + r * s->mask.row + q0 * s->mask.pix, t, c, s->grid, *s->period);
            else if (split)
                send_split(made, made_pix, x, x_pix, m, s->mask.pix, t, c, s->grid);
            else if (s->wraps && m)
                send_modular(made, made_pix, x, x_pix, m, s->mask.pix,
                             s->wraps + r * s->mask.row + q0 * s->mask.pix, t, c, *s->period);
            else
                send(made, made_pix, x, x_pix, m, s->mask.pix, t, c);
            if (secure) copy_pixels(out, s->dst_pix, secure, s->copy_pix, t, split ? 2 * c : c);
            if (split && s->plain)
                copy_pixels(s->plain + r * s->plain_row + q0 * s->plain_pix, s->plain_pix, x, x_pix, t, c);
        }
    }
    if (check) fv_check_finish(check, &worst, norm2);
    if (popped) fv_check_finish(popped, &worst_popped, norm2_popped);
    if (measured && !in_band(squares, top, s->rows * s->cols * n, s->spread[2], s->spread[0], s->spread[1],
                             &s->spread[3]))
        return 2;
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
