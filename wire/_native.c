/* kivi4 payloads -> llama.cpp cache rows, in one pass over the data; and f16 byte planes for the lossless
   codec (wire/native.py loads this).

   The numpy path (wire/codecs.py: kivi4_dequantize, then quantize_rows or a float16 cast) makes up to
   five passes over float32 copies of the matrix. These kernels do the same arithmetic, in the same
   order, on pieces held in L1.

   kivi4_to_f16: dequantize, round to f16 (to nearest even).
   kivi4_to_q8_0, one run of n elements (one head's rotation block) at a time:
     1. dequantize it: K: x = q * scale[g, c] + zero[g, c] (g = the token's group of 32, the last group
        longer); V: x = q * d + m (q4_1 blocks);
     2. H_n: scale by 1/sqrt(n) first, then butterflies of stride 1, 2, 4 (inside each 8-lane vector:
        a shuffle, a sign flip and an add each), then 8, 16, ... (between vectors):
        ggml_compute_forward_fwht's order, so the float32 bits agree;
     3. q8_0 per block of 32: d = amax / 127 stored as f16, q = round-half-even(x * (127 / amax)),
        as ggml's x86 quantize_row_q8_0.

   Built with -ffp-contract=off: a fused multiply-add would round q * scale + zero once, numpy twice.
   tests/wire/test_native.py pins every byte to the numpy path. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
/* x86 (GCC): the kernels are built for x86-64-v3 (AVX2, FMA, F16C; 2013 on) and used only on such a CPU
   (kivi4_kernels_vectorized); the library itself loads anywhere. Widening bytes to floats and rounding
   floats to f16 are intrinsics: GCC 12 turns both, written as vector extensions, into one scalar
   conversion per element (the f16 rounding alone took 2/3 of kivi4_to_f16's time). */
#include <immintrin.h>
#define X86_V3 1
#define KERNEL __attribute__((target("arch=x86-64-v3")))
#else
#define X86_V3 0
#define KERNEL
#endif

enum { GROUP = 32, MAX_RUN = 512, Q8_0_BYTES = 34, Q4_1_BYTES = 20 };

typedef _Float16 f16;
/* GCC/clang vector extensions: 8 lanes, one AVX register on x86 */
typedef float v8f __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
#if defined(__clang__)
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, (v8i){__VA_ARGS__})
#endif
#define UMAX8(a, b) (((a) & (v8u)((a) > (b))) | ((b) & ~(v8u)((a) > (b))))  /* lane-wise max */
#define SIGN 0x80000000u
#define INLINE static inline __attribute__((always_inline)) KERNEL

/* 8 nibbles as floats: the low ones of bytes[0..7], or their high ones. A group's 32 elements are the
   low nibbles of its 16 bytes, then their high nibbles: elements 8h .. 8h + 7 are
   nibbles(bytes + 8 * (h % 2), h / 2). */
INLINE v8f nibbles(const uint8_t *bytes, int high) {
#if X86_V3
    __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)bytes));
    w = high ? _mm256_srli_epi32(w, 4) : _mm256_and_si256(w, _mm256_set1_epi32(15));
    return (v8f)_mm256_cvtepi32_ps(w);
#else
    v8f x;
    for (int j = 0; j < 8; j++) x[j] = (float)(high ? bytes[j] >> 4 : bytes[j] & 15);
    return x;
#endif
}

/* floats [n] (n a multiple of 8) -> f16, rounded to nearest even */
INLINE void store_f16(const float *x, int64_t n, f16 *out) {
#if X86_V3
    for (int64_t i = 0; i < n; i += 8)
        _mm_storeu_si128((__m128i *)(out + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
#else
    for (int64_t i = 0; i < n; i++) out[i] = (f16)x[i];
#endif
}

INLINE float f16_at(const uint8_t *p) {
    f16 h;
    memcpy(&h, p, 2);
    return (float)h;
}

/* K's groups of 32 tokens; the T % 32 tokens past the last full group join it */
static inline int64_t num_groups_of(int64_t num_tokens) { return num_tokens / GROUP > 0 ? num_tokens / GROUP : 1; }

/* elements [e0, e0 + count) of a K payload (count a multiple of 32) -> out, in flat order */
INLINE void dequant_k(const uint8_t *payload, const float *scale, const float *zero, int64_t e0, int64_t count,
                      int64_t row_elems, int64_t num_groups, float *out) {
    for (int64_t e = e0; e < e0 + count; e += GROUP) {
        const uint8_t *nib = payload + e / GROUP * 16;
        int64_t g = e / row_elems / GROUP;
        if (g > num_groups - 1) g = num_groups - 1;
        const int64_t at = g * row_elems + e % row_elems;
        const float *s = scale + at, *z = zero + at;
        for (int h = 0; h < 4; h++) {  /* elements 8h .. 8h + 7 */
            v8f s8, z8;
            memcpy(&s8, s + 8 * h, sizeof s8);
            memcpy(&z8, z + 8 * h, sizeof z8);
            const v8f x = nibbles(nib + 8 * (h & 1), h >> 1) * s8 + z8;
            memcpy(out + (e - e0) + 8 * h, &x, sizeof x);
        }
    }
}

/* elements [e0, e0 + count) of a V payload (q4_1 blocks) -> out */
INLINE void dequant_v(const uint8_t *payload, int64_t e0, int64_t count, float *out) {
    for (int64_t e = e0; e < e0 + count; e += GROUP) {
        const uint8_t *b = payload + e / GROUP * Q4_1_BYTES;
        const float d = f16_at(b), m = f16_at(b + 2);
        for (int h = 0; h < 4; h++) {  /* elements 8h .. 8h + 7 */
            const v8f x = nibbles(b + 4 + 8 * (h & 1), h >> 1) * d + m;
            memcpy(out + (e - e0) + 8 * h, &x, sizeof x);
        }
    }
}

/* K's f16 scales [G, C] then zeros [G, C] (after the nibbles) as one float32 array [2, G, C], or NULL */
KERNEL static float *key_params(const uint8_t *payload, int64_t num_tokens, int64_t row_elems) {
    const int64_t count = 2 * num_groups_of(num_tokens) * row_elems;
    float *params = malloc(count * sizeof(float));
    if (!params) return NULL;
    const uint8_t *p = payload + num_tokens * row_elems / GROUP * 16;
    for (int64_t i = 0; i < count; i++) params[i] = f16_at(p + 2 * i);
    return params;
}

/* one K or V matrix ([num_tokens, row_elems]) -> f16 rows. Returns 0, or -1 on arguments it cannot take. */
KERNEL
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
        store_f16(tmp, count, rows + e0);
    }
    free(scale);
    return 0;
}

/* round half to even for |x| < 2^22, as rintf and _mm256_round_ps do: adding 1.5 * 2^23 leaves no bits
   below the units, and the add rounds as the FPU does (to nearest even); no libm call on any target */
static inline float round_even(float x) { return (x + 0x1.8p23f) - 0x1.8p23f; }

/* max |x| over a block of 32 floats (4 vectors): the largest bit pattern with the sign cleared, since
   for floats >= 0 the order of the patterns is the order of the values */
INLINE float block_amax(const v8f *x) {
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
KERNEL
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
            /* strides h = 1, 2, 4 inside each vector: lane i's partner p (lane i ^ h) plus lane i, its
               sign flipped where i % 2h >= h: p + u = u + v below the stride, p - v = u - v above it
               (the same floats: addition commutes, and x - y is x + (-y)) */
            for (int64_t i = 0; i < num_vectors; i++) {
                v8f a = run[i] * unit;
                a = SHUFFLE(a, a, 1, 0, 3, 2, 5, 4, 7, 6) + (v8f)((v8u)a ^ (v8u){0, SIGN, 0, SIGN, 0, SIGN, 0, SIGN});
                a = SHUFFLE(a, a, 2, 3, 0, 1, 6, 7, 4, 5) + (v8f)((v8u)a ^ (v8u){0, 0, SIGN, SIGN, 0, 0, SIGN, SIGN});
                a = SHUFFLE(a, a, 4, 5, 6, 7, 0, 1, 2, 3) + (v8f)((v8u)a ^ (v8u){0, 0, 0, 0, SIGN, SIGN, SIGN, SIGN});
                run[i] = a;
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
KERNEL
void f16_split_planes(const uint8_t *restrict f16s, int64_t n, uint8_t *restrict hi, uint8_t *restrict lo) {
    for (int64_t i = 0; i < n; i++) {
        lo[i] = f16s[2 * i];
        hi[i] = f16s[2 * i + 1];
    }
}

/* the inverse: high bytes [n] and low bytes [n] -> f16 values [n] */
KERNEL
void f16_join_planes(const uint8_t *restrict hi, const uint8_t *restrict lo, int64_t n, uint8_t *restrict f16s) {
    for (int64_t i = 0; i < n; i++) {
        f16s[2 * i] = lo[i];
        f16s[2 * i + 1] = hi[i];
    }
}

/* 1 where the kernels may run: on x86, a CPU of x86-64-v3 or later, and a GCC build (a baseline x86
   build's 8-lane shuffles and f16 conversions became scalar code slower than numpy, 0.2 GB/s on the dev
   box). wire/native.py otherwise leaves the work to numpy. Elsewhere (aarch64: NEON, native f16) the
   generic vector code is taken to be fast; not measured. */
int kivi4_kernels_vectorized(void) {
#if X86_V3
    __builtin_cpu_init();
    return __builtin_cpu_supports("x86-64-v3");
#elif defined(__x86_64__)
    return 0;
#else
    return 1;
#endif
}
