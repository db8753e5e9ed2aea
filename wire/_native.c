/* kivi4 payloads -> llama.cpp cache rows, in one pass over the data (wire/native.py loads this).

   The numpy path (wire/codecs.py: kivi4_dequantize, then quantize_rows or a float16 cast) makes up to
   five passes over float32 copies of the matrix: about 0.3 GB/s of f16 on one core into a q8_0 cache.
   These kernels do the same arithmetic, in the same order, on pieces held in L1.

   kivi4_to_f16: dequantize, round to f16 (to nearest even).
   kivi4_to_q8_0, on 8 runs of n elements at a time:
     1. dequantize 8 consecutive runs (8*n contiguous elements of the flattened [T, C] matrix);
     2. transpose them to buf[n][8], so every later step is one loop over the 8 runs (a vector);
     3. H_n down each run: scale by 1/sqrt(n) first, then butterflies of stride 1, 2, 4, ...
        (ggml_compute_forward_fwht's order, so the float32 bits agree);
     4. q8_0 per block of 32: d = amax / 127 stored as f16, q = round-half-even(x * (127 / amax)),
        as ggml's x86 quantize_row_q8_0.
   Dequantizing: K: x = q * scale[g, c] + zero[g, c] (g = the token's group of 32, the last group
   longer); V: x = q * d + m (q4_1 blocks).

   Built with -ffp-contract=off: a fused multiply-add would round q * scale + zero once, numpy twice.
   tests/wire/test_native.py pins every byte to the numpy path. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
/* an AVX2 + F16C build next to the baseline one, picked at load time by the CPU */
#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MULTIVERSION
#endif

enum { GROUP = 32, WIDTH = 8, MAX_RUN = 512, Q8_0_BYTES = 34, Q4_1_BYTES = 20 };

typedef _Float16 f16;
static inline float f16_at(const uint8_t *p) {
    f16 h;
    memcpy(&h, p, 2);
    return (float)h;
}

/* K's groups of 32 tokens; the T % 32 tokens past the last full group join it */
static inline int64_t num_groups_of(int64_t num_tokens) { return num_tokens / GROUP > 0 ? num_tokens / GROUP : 1; }

/* elements [e0, e0 + count) of a K payload (count a multiple of 32) -> out, in flat order */
static inline void dequant_k(const uint8_t *payload, const float *scale, const float *zero, int64_t e0,
                             int64_t count, int64_t row_elems, int64_t num_groups, float *out) {
    for (int64_t e = e0; e < e0 + count; e += GROUP) {
        const uint8_t *nib = payload + e / GROUP * 16;
        int64_t g = e / row_elems / GROUP;
        if (g > num_groups - 1) g = num_groups - 1;
        const int64_t at = g * row_elems + e % row_elems;
        const float *s = scale + at, *z = zero + at;
        float *o = out + (e - e0);
        for (int j = 0; j < 16; j++) {
            o[j] = (float)(nib[j] & 15) * s[j] + z[j];
            o[j + 16] = (float)(nib[j] >> 4) * s[j + 16] + z[j + 16];
        }
    }
}

/* elements [e0, e0 + count) of a V payload (q4_1 blocks) -> out */
static inline void dequant_v(const uint8_t *payload, int64_t e0, int64_t count, float *out) {
    for (int64_t e = e0; e < e0 + count; e += GROUP) {
        const uint8_t *b = payload + e / GROUP * Q4_1_BYTES;
        const float d = f16_at(b), m = f16_at(b + 2);
        float *o = out + (e - e0);
        for (int j = 0; j < 16; j++) {
            o[j] = (float)(b[4 + j] & 15) * d + m;
            o[j + 16] = (float)(b[4 + j] >> 4) * d + m;
        }
    }
}

/* K's f16 scales [G, C] then zeros [G, C] (after the nibbles) as one float32 array [2, G, C], or NULL */
static float *key_params(const uint8_t *payload, int64_t num_tokens, int64_t row_elems) {
    const int64_t count = 2 * num_groups_of(num_tokens) * row_elems;
    float *params = malloc(count * sizeof(float));
    if (!params) return NULL;
    const uint8_t *p = payload + num_tokens * row_elems / GROUP * 16;
    for (int64_t i = 0; i < count; i++) params[i] = f16_at(p + 2 * i);
    return params;
}

/* elements [elem_begin, elem_end) (multiples of 32) of one K or V matrix -> f16 rows. Returns 0 or -1. */
MULTIVERSION
int kivi4_to_f16(const uint8_t *payload, f16 *rows, int64_t num_tokens, int64_t row_elems, int is_key,
                 int64_t elem_begin, int64_t elem_end) {
    if (row_elems % GROUP || elem_begin % GROUP || elem_end % GROUP || num_tokens <= 0) return -1;
    const int64_t num_groups = num_groups_of(num_tokens);
    float *scale = is_key ? key_params(payload, num_tokens, row_elems) : NULL;
    if (is_key && !scale) return -1;
    const float *zero = is_key ? scale + num_groups * row_elems : NULL;
    enum { CHUNK = 4096 };
    float tmp[CHUNK];
    for (int64_t e0 = elem_begin; e0 < elem_end; e0 += CHUNK) {
        const int64_t count = elem_end - e0 < CHUNK ? elem_end - e0 : CHUNK;
        if (is_key)
            dequant_k(payload, scale, zero, e0, count, row_elems, num_groups, tmp);
        else
            dequant_v(payload, e0, count, tmp);
        for (int64_t i = 0; i < count; i++) rows[e0 + i] = (f16)tmp[i];
    }
    free(scale);
    return 0;
}

/* runs [run_begin, run_end) of one K or V matrix ([num_tokens, row_elems], runs of n elements,
   n = 0 for no rotation) -> their q8_0 blocks in rows. Returns 0, or -1 on arguments it cannot take. */
MULTIVERSION
int kivi4_to_q8_0(const uint8_t *payload, uint8_t *rows, int64_t num_tokens, int64_t row_elems, int is_key,
                  int64_t n, int64_t run_begin, int64_t run_end) {
    const int rotate = n > 0;
    if (!rotate) n = GROUP;
    if (n > MAX_RUN || n % GROUP || row_elems % n || num_tokens <= 0) return -1;
    const int64_t num_groups = num_groups_of(num_tokens);
    float *scale = is_key ? key_params(payload, num_tokens, row_elems) : NULL;
    if (is_key && !scale) return -1;
    const float *zero = is_key ? scale + num_groups * row_elems : NULL;

    float tmp[WIDTH * MAX_RUN];
    float buf[MAX_RUN][WIDTH];
    int8_t qbuf[MAX_RUN][WIDTH];
    const float unit = rotate ? 1.0f / sqrtf((float)n) : 1.0f;

    for (int64_t r0 = run_begin; r0 < run_end; r0 += WIDTH) {
        const int w_count = run_end - r0 < WIDTH ? (int)(run_end - r0) : WIDTH;
        if (is_key)
            dequant_k(payload, scale, zero, r0 * n, w_count * n, row_elems, num_groups, tmp);
        else
            dequant_v(payload, r0 * n, w_count * n, tmp);
        for (int w = w_count; w < WIDTH; w++) memset(tmp + w * n, 0, n * sizeof(float));
        for (int64_t j = 0; j < n; j++)
            for (int w = 0; w < WIDTH; w++) buf[j][w] = tmp[w * n + j];
        if (rotate) {
            for (int64_t j = 0; j < n; j++)
                for (int w = 0; w < WIDTH; w++) buf[j][w] *= unit;
            for (int64_t h = 1; h < n; h *= 2)
                for (int64_t i = 0; i < n; i += 2 * h)
                    for (int64_t o = i; o < i + h; o++)
                        for (int w = 0; w < WIDTH; w++) {
                            const float u = buf[o][w], v = buf[o + h][w];
                            buf[o][w] = u + v;
                            buf[o + h][w] = u - v;
                        }
        }
        float d[MAX_RUN / GROUP][WIDTH];
        for (int64_t k = 0; k < n / GROUP; k++) {
            float amax[WIDTH] = {0}, inv[WIDTH];
            for (int j = 0; j < GROUP; j++)
                for (int w = 0; w < WIDTH; w++) {
                    const float a = fabsf(buf[k * GROUP + j][w]);
                    amax[w] = a > amax[w] ? a : amax[w];
                }
            for (int w = 0; w < WIDTH; w++) {
                d[k][w] = amax[w] / 127.0f;
                inv[w] = amax[w] != 0.0f ? 127.0f / amax[w] : 0.0f;
            }
            for (int j = 0; j < GROUP; j++)
                for (int w = 0; w < WIDTH; w++) qbuf[k * GROUP + j][w] = (int8_t)rintf(buf[k * GROUP + j][w] * inv[w]);
        }
        for (int w = 0; w < w_count; w++)
            for (int64_t k = 0; k < n / GROUP; k++) {
                uint8_t *block = rows + ((r0 + w) * n / GROUP + k) * Q8_0_BYTES;
                const f16 dh = (f16)d[k][w];
                memcpy(block, &dh, 2);
                for (int j = 0; j < GROUP; j++) block[2 + j] = (uint8_t)qbuf[k * GROUP + j][w];
            }
    }
    free(scale);
    return 0;
}
