/* kivi4 payloads -> llama.cpp cache rows, in one pass over the data; and f16 byte planes for the lossless
   codec (wire/native.py loads this).

   The numpy path (wire/codecs.py: kivi4_dequantize, then quantize_rows or a float16 cast) makes up to
   five passes over float32 copies of the matrix: about 0.3 GB/s of f16 on one core into a q8_0 cache.
   These kernels do the same arithmetic, in the same order, on pieces held in L1.

   kivi4_to_f16: dequantize, round to f16 (to nearest even).
   kivi4_to_q8_0, one run of n elements (one head's rotation block) at a time:
     1. dequantize it: K: x = q * scale[g, c] + zero[g, c] (g = the token's group of 32, the last group
        longer); V: x = q * d + m (q4_1 blocks);
     2. H_n: scale by 1/sqrt(n) first, then butterflies of stride 1, 2, 4 (inside each 8-lane vector,
        by shuffles), then 8, 16, ... (between vectors): ggml_compute_forward_fwht's order, so the
        float32 bits agree;
     3. q8_0 per block of 32: d = amax / 127 stored as f16, q = round-half-even(x * (127 / amax)),
        as ggml's x86 quantize_row_q8_0.

   Built with -ffp-contract=off: a fused multiply-add would round q * scale + zero once, numpy twice.
   tests/wire/test_native.py pins every byte to the numpy path. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
/* an AVX2 + F16C build next to the baseline one, picked at load time by the CPU */
#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#define X86_CLONES 1
#else
#define MULTIVERSION
#define X86_CLONES 0
#endif

enum { GROUP = 32, MAX_RUN = 512, Q8_0_BYTES = 34, Q4_1_BYTES = 20 };

typedef _Float16 f16;
/* GCC/clang vector extensions: 8 lanes, one AVX register in the x86-64-v3 build, two SSE ones otherwise */
typedef float v8f __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
#if defined(__clang__)
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, (v8i){__VA_ARGS__})
#endif
/* lane-wise max of two v8u variables (a macro: a function passing AVX vectors by value would change
   the calling convention between the two builds) */
#define UMAX8(a, b) (((a) & (v8u)((a) > (b))) | ((b) & ~(v8u)((a) > (b))))

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

/* one K or V matrix ([num_tokens, row_elems]) -> f16 rows. Returns 0, or -1 on arguments it cannot take. */
MULTIVERSION
int kivi4_to_f16(const uint8_t *payload, f16 *rows, int64_t num_tokens, int64_t row_elems, int is_key) {
    if (row_elems % GROUP || num_tokens <= 0) return -1;
    const int64_t num_elems = num_tokens * row_elems;
    const int64_t num_groups = num_groups_of(num_tokens);
    float *scale = is_key ? key_params(payload, num_tokens, row_elems) : NULL;
    if (is_key && !scale) return -1;
    const float *zero = is_key ? scale + num_groups * row_elems : NULL;
    enum { CHUNK = 4096 };
    float tmp[CHUNK];
    for (int64_t e0 = 0; e0 < num_elems; e0 += CHUNK) {
        const int64_t count = num_elems - e0 < CHUNK ? num_elems - e0 : CHUNK;
        if (is_key)
            dequant_k(payload, scale, zero, e0, count, row_elems, num_groups, tmp);
        else
            dequant_v(payload, e0, count, tmp);
        for (int64_t i = 0; i < count; i++) rows[e0 + i] = (f16)tmp[i];
    }
    free(scale);
    return 0;
}

/* round half to even for |x| < 2^22, as rintf and _mm256_round_ps do: adding 1.5 * 2^23 leaves no bits
   below the units, and the add rounds as the FPU does (to nearest even); no libm call on any target */
static inline float round_even(float x) { return (x + 0x1.8p23f) - 0x1.8p23f; }

/* max |x| over a block of 32 floats (4 vectors): the largest bit pattern with the sign cleared, since
   for floats >= 0 the order of the patterns is the order of the values */
static inline __attribute__((always_inline)) float block_amax(const v8f *x) {
    const v8u a = (v8u)x[0] & 0x7fffffffu, b = (v8u)x[1] & 0x7fffffffu;
    const v8u c = (v8u)x[2] & 0x7fffffffu, d = (v8u)x[3] & 0x7fffffffu;
    const v8u ab = UMAX8(a, b), cd = UMAX8(c, d);
    v8u m = UMAX8(ab, cd), t;
    t = SHUFFLE(m, m, 4, 5, 6, 7, 0, 1, 2, 3), m = UMAX8(m, t);
    t = SHUFFLE(m, m, 2, 3, 0, 1, 6, 7, 4, 5), m = UMAX8(m, t);
    t = SHUFFLE(m, m, 1, 0, 3, 2, 5, 4, 7, 6), m = UMAX8(m, t);
    float amax;
    memcpy(&amax, &m, sizeof amax);
    return amax;
}

/* one K or V matrix ([num_tokens, row_elems], rotated in runs of n elements, n = 0 for no rotation) ->
   q8_0 rows. Returns 0, or -1 on arguments it cannot take. */
MULTIVERSION
int kivi4_to_q8_0(const uint8_t *payload, uint8_t *rows, int64_t num_tokens, int64_t row_elems, int is_key,
                  int64_t n) {
    const int rotate = n > 0;
    if (!rotate) n = GROUP;
    if (n > MAX_RUN || n % GROUP || row_elems % n || num_tokens <= 0) return -1;
    const int64_t num_groups = num_groups_of(num_tokens);
    float *scale = is_key ? key_params(payload, num_tokens, row_elems) : NULL;
    if (is_key && !scale) return -1;
    const float *zero = is_key ? scale + num_groups * row_elems : NULL;

    v8f run[MAX_RUN / 8];  /* one run, 8 elements per vector */
    float *x = (float *)run;
    const float unit = rotate ? 1.0f / sqrtf((float)n) : 1.0f;
    const int64_t num_vectors = n / 8;

    for (int64_t r = 0; r < num_tokens * row_elems / n; r++) {
        if (is_key)
            dequant_k(payload, scale, zero, r * n, n, row_elems, num_groups, x);
        else
            dequant_v(payload, r * n, n, x);
        if (rotate) {
            /* strides 1, 2, 4 inside each vector: `p` holds each lane's partner, lane i takes
               u + v (from `sum`) where i % 2h < h, else u - v (from `diff`) */
            for (int64_t i = 0; i < num_vectors; i++) {
                v8f a = run[i] * unit, p, sum, diff;
                p = SHUFFLE(a, a, 1, 0, 3, 2, 5, 4, 7, 6), sum = a + p, diff = p - a;
                a = SHUFFLE(sum, diff, 0, 9, 2, 11, 4, 13, 6, 15);
                p = SHUFFLE(a, a, 2, 3, 0, 1, 6, 7, 4, 5), sum = a + p, diff = p - a;
                a = SHUFFLE(sum, diff, 0, 1, 10, 11, 4, 5, 14, 15);
                p = SHUFFLE(a, a, 4, 5, 6, 7, 0, 1, 2, 3), sum = a + p, diff = p - a;
                run[i] = SHUFFLE(sum, diff, 0, 1, 2, 3, 12, 13, 14, 15);
            }
            for (int64_t h = 1; h < num_vectors; h *= 2)  /* strides 8h */
                for (int64_t i = 0; i < num_vectors; i += 2 * h)
                    for (int64_t o = i; o < i + h; o++) {
                        const v8f u = run[o], v = run[o + h];
                        run[o] = u + v;
                        run[o + h] = u - v;
                    }
        }
        for (int64_t k = 0; k < n / GROUP; k++) {
            const float amax = block_amax(run + k * GROUP / 8), *b = x + k * GROUP;
            const float inv = amax != 0.0f ? 127.0f / amax : 0.0f;
            uint8_t *block = rows + (r * n / GROUP + k) * Q8_0_BYTES;
            const f16 d = (f16)(amax / 127.0f);
            memcpy(block, &d, 2);
            int8_t *q = (int8_t *)block + 2;
            for (int j = 0; j < GROUP; j++) q[j] = (int8_t)round_even(b[j] * inv);
        }
    }
    free(scale);
    return 0;
}

/* f16 values [n] -> their high bytes [n] and low bytes [n] (the lossless codec's byte planes; wire/lossless.py).
   A loop GCC and clang vectorize by themselves: about 20 GB/s of f16 on one dev-box core, numpy's two
   strided copies about 4. */
MULTIVERSION
void f16_split_planes(const uint8_t *restrict f16s, int64_t n, uint8_t *restrict hi, uint8_t *restrict lo) {
    for (int64_t i = 0; i < n; i++) {
        lo[i] = f16s[2 * i];
        hi[i] = f16s[2 * i + 1];
    }
}

/* the inverse: high bytes [n] and low bytes [n] -> f16 values [n] */
MULTIVERSION
void f16_join_planes(const uint8_t *restrict hi, const uint8_t *restrict lo, int64_t n, uint8_t *restrict f16s) {
    for (int64_t i = 0; i < n; i++) {
        f16s[2 * i] = lo[i];
        f16s[2 * i + 1] = hi[i];
    }
}

/* 1 where the kernels run as vectors. On an x86 CPU older than x86-64-v3 (before AVX2 and F16C, 2013),
   or from a compiler without GCC's target_clones, the x86 build's 8-lane shuffles and f16 conversions
   become scalar code slower than numpy (0.2 GB/s on the dev box): wire/native.py then leaves the work
   to numpy. Elsewhere (aarch64: NEON, native f16) the kernels are taken to be fast; not measured. */
int kivi4_kernels_vectorized(void) {
#if X86_CLONES
    __builtin_cpu_init();
    return __builtin_cpu_supports("x86-64-v3");
#elif defined(__x86_64__)
    return 0;
#else
    return 1;
#endif
}
