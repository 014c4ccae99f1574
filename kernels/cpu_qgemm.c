/* Group-quantized weight times fp32 activations on x86 CPUs with AVX2, FMA and F16C.
 *
 * The weight is GroupQuantized's layout (runtime/model/quantized.py): W[n, k] =
 * q[n, k] * s[n, g] + o[n, g] with g = k / group, 4-bit codes two to a byte (the even k
 * in the low nibble) or signed 8-bit codes, and here fp16 scales and offsets. Each row of
 * x is rounded to int8 per block of 32 inputs with its own scale (llama.cpp's Q8 form),
 * so a block's products are integer dot products (maddubs); the offsets multiply the
 * exact fp32 sums of x over each group. y = sum_b s * dx_b * (q . xq)_b + sum_g o_g * xs_g.
 * Built for a CPU with VNNI (AVX-VNNI, or AVX-512 VNNI), a block's integer dot product is
 * one instruction per 32 codes (vpdpbusd) instead of maddubs and a pair sum: the same
 * integers (maddubs cannot saturate on these operands). The AVX-VNNI build gives the
 * AVX2 build's bits; the AVX-512 build ("wide") takes codes four blocks per pass in
 * 512-bit vectors (x's int8 quads laid out to match), so its partial sums are added in
 * another order (its bits are its own, the same alone or in a batch).
 * Offsets may be NULL: a weight without them (GGUF's Q8_0) skips their share. Every
 * output's sum is taken in one order however many rows share its pass, so a row's
 * result is the same alone or in a batch. The pure-torch reference is
 * `cpu_qgemm_reference` in reference.py.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_kernels.h"

#define BLOCK 32 /* inputs per activation scale */
#define ROWS 4   /* activation rows multiplied per pass over a weight row */
/* Weight rows a thread takes together: each pass's rows of x are then read from L1 for
 * all of them, and each row of x's eight outputs are reduced and stored at once. */
#define TILE 8

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define WIDE 1 /* codes four blocks per pass, in 512-bit vectors */
#else
#define WIDE 0
#endif

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline float hmax(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

/* A row's group sums take a whole number of 8-float vectors, zero past the last. */
static inline int64_t sums_stride(int64_t groups) { return (groups + 7) & ~(int64_t)7; }

/* A block's 32 int32 codes (in -127..127) as int8 in input order. */
static inline __m256i pack_block(const __m256i *q) {
    __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]),
                                       _mm256_packs_epi32(q[2], q[3]));
    return _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

/* Blocks read four at a time: the whole quads, in a wide build. */
static inline int64_t quad_blocks(int64_t blocks) { return WIDE ? blocks & ~(int64_t)3 : 0; }

/* A block's codes where the kernel reads them (xq + b * BLOCK is `out`). The 4-bit
 * kernel reads inputs in two halves, even then odd (a byte's low nibble then its high
 * one), the 8-bit kernel 0-15 then 16-31. A pair of blocks (b even, b + 1) is read as
 * both blocks' first halves, then both second halves: block b's halves at bytes 0 and
 * 32 of the pair, block b + 1's at 16 and 48. A quad (wide builds) likewise: its four
 * first halves in bytes 0-63, then its four second halves. A last unpaired block is as
 * it is. */
static inline void put_block(__m256i codes, int64_t b, int64_t blocks, int bits,
                             int8_t *out) {
    if (bits == 4) { /* evens, then odds, in each 16-input lane; then the lanes' halves */
        const __m256i split = _mm256_setr_epi8(
            0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
            0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
        codes = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(codes, split), 0xD8);
    }
    if (b < quad_blocks(blocks)) {
        int8_t *first = out - 16 * (b & 3);
        _mm_storeu_si128((__m128i *)first, _mm256_castsi256_si128(codes));
        _mm_storeu_si128((__m128i *)(first + 64), _mm256_extracti128_si256(codes, 1));
        return;
    }
    if ((b | 1) >= blocks) {
        _mm256_storeu_si256((__m256i *)out, codes);
        return;
    }
    int8_t *first = out - 16 * (b & 1);
    _mm_storeu_si128((__m128i *)first, _mm256_castsi256_si128(codes));
    _mm_storeu_si128((__m128i *)(first + 32), _mm256_extracti128_si256(codes, 1));
}

/* One row of x: int8 codes per block (where the kernel reads them), each block's scale
 * four times (a pair of blocks' scales is then one 8-float load), and each group's sum. */
static void quantize_row(const float *x, int64_t K, int64_t group, int bits, int8_t *xq,
                         float *dx, float *xs) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    int64_t blocks = K / BLOCK;
    int64_t groups = K / group;
    for (int64_t g = groups; g < sums_stride(groups); g++) xs[g] = 0.f;
    for (int64_t g = 0; g < groups; g++) {
        __m256 s = _mm256_setzero_ps();
        for (int64_t k = g * group; k < (g + 1) * group; k += 8)
            s = _mm256_add_ps(s, _mm256_loadu_ps(x + k));
        xs[g] = hsum(s);
    }
    for (int64_t b = 0; b < blocks; b++) {
        const float *v = x + b * BLOCK;
        __m256 m = _mm256_setzero_ps();
        for (int i = 0; i < BLOCK; i += 8)
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(v + i)));
        float d = hmax(m) / 127.f;
        __m256 inv = _mm256_set1_ps(d > 0 ? 1.f / d : 0.f);
        __m256i q[BLOCK / 8];
        for (int i = 0; i < BLOCK / 8; i++)
            q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + 8 * i), inv));
        _mm_storeu_ps(dx + 4 * b, _mm_set1_ps(d));
        put_block(pack_block(q), b, blocks, bits, xq + b * BLOCK);
    }
}

/* [sum of a[0], ..., sum of a[7]]: eight partial-sum vectors reduced at once, each in
 * the same order ((0+1)+(2+3))+((4+5)+(6+7)) wherever it sits. */
static inline __m256 reduce8(const __m256 *a) {
    __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),
                         _mm256_permute2f128_ps(u0, u1, 0x31));
}

static inline __m256 to_float(__m256i pairs16) {
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs16, _mm256_set1_epi16(1)));
}

#if defined(__AVXVNNI__)
#define VNNI 1
#define dot4(acc, u, s) _mm256_dpbusd_avx_epi32(acc, u, s)
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define VNNI 1
#define dot4(acc, u, s) _mm256_dpbusd_epi32(acc, u, s)
#else
#define VNNI 0
#endif

/* Unsigned u times signed s, 32 bytes: each int32 lane the sum of its four products. */
static inline __m256 dot32(__m256i u, __m256i s) {
#if VNNI
    return _mm256_cvtepi32_ps(dot4(_mm256_setzero_si256(), u, s));
#else
    return to_float(_mm256_maddubs_epi16(u, s));
#endif
}

/* u0 . s0 + u1 . s1 in int32 lanes, as dot32 (int16 pair sums that cannot saturate
 * added before the pair sum where there is no VNNI: at most 2 * 2 * 15 * 127, 4-bit). */
static inline __m256 dot64(__m256i u0, __m256i s0, __m256i u1, __m256i s1, int bits) {
#if VNNI
    (void)bits;
    return _mm256_cvtepi32_ps(dot4(dot4(_mm256_setzero_si256(), u0, s0), u1, s1));
#else
    const __m256i ones = _mm256_set1_epi16(1);
    if (bits == 4)
        return to_float(_mm256_add_epi16(_mm256_maddubs_epi16(u0, s0),
                                         _mm256_maddubs_epi16(u1, s1)));
    /* 8-bit: each half's pair sums (up to 2 * 128 * 127) added as int32 */
    return _mm256_cvtepi32_ps(_mm256_add_epi32(
        _mm256_madd_epi16(_mm256_maddubs_epi16(u0, s0), ones),
        _mm256_madd_epi16(_mm256_maddubs_epi16(u1, s1), ones)));
#endif
}

/* The weight scales of blocks b and b + 1 (b even), each four times. With groups of 32
 * they are adjacent: one 4-byte load; with groups of 64, 128, ... (`shift` = log2(group /
 * 32) > 0) both blocks are in one group; else (`shift` -1) divide. */
static inline __m256 pair_scales(const uint16_t *s, int64_t b, int shift, int64_t per_group) {
    if (shift == 0) {
        const __m128i spread = _mm_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3, 2, 3);
        int32_t both;
        memcpy(&both, s + b, sizeof both);
        return _mm256_cvtph_ps(_mm_shuffle_epi8(_mm_cvtsi32_si128(both), spread));
    }
    if (shift > 0) return _mm256_set1_ps(_cvtsh_ss(s[b >> shift]));
    int64_t g0 = b / per_group;
    int64_t g1 = (b + 1) / per_group;
    return _mm256_set_m128(_mm_set1_ps(_cvtsh_ss(s[g1])), _mm_set1_ps(_cvtsh_ss(s[g0])));
}

/* Blocks b and b + 1 of `rows` rows of x times one 4-bit weight row, into acc[r]. */
static inline __attribute__((always_inline)) void pair4(
    const uint8_t *w, __m256 ws, const int8_t *xq, int64_t K, const float *dx,
    int64_t blocks, int64_t b, const int rows, __m256 *acc) {
    const __m256i nibble = _mm256_set1_epi8(15);
    __m256i v = _mm256_loadu_si256((const __m256i *)(w + b * 16));
    __m256i lo = _mm256_and_si256(v, nibble);
    __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
    for (int r = 0; r < rows; r++) {
        const int8_t *a = xq + r * K + b * BLOCK;
        __m256 p = dot64(lo, _mm256_loadu_si256((const __m256i *)a), hi,
                         _mm256_loadu_si256((const __m256i *)(a + BLOCK)), 4);
        __m256 dv = _mm256_loadu_ps(dx + 4 * (r * blocks + b));
        acc[r] = _mm256_fmadd_ps(p, _mm256_mul_ps(ws, dv), acc[r]);
    }
}

#if WIDE
/* The weight scales of blocks b to b + 3 (b a multiple of 4), each four times: with
 * groups of 64 two groups' scales, each twice; with groups of 128, 256, ... one group's. */
static inline __m512 quad_scales(const uint16_t *s, int64_t b, int shift, int64_t per_group) {
    __m128 four;
    if (shift == 0) {
        four = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(s + b)));
    } else if (shift == 1) {
        int32_t both;
        memcpy(&both, s + (b >> 1), sizeof both);
        __m128 two = _mm_cvtph_ps(_mm_cvtsi32_si128(both));
        four = _mm_shuffle_ps(two, two, _MM_SHUFFLE(1, 1, 0, 0));
    } else if (shift > 1) {
        return _mm512_set1_ps(_cvtsh_ss(s[b >> shift]));
    } else {
        float f[4];
        for (int i = 0; i < 4; i++)
            f[i] = _cvtsh_ss(s[(b + i) / per_group]);
        four = _mm_loadu_ps(f);
    }
    const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    return _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(four));
}

/* Each row's sixteen lanes of quads' sums into its eight-lane chain (its start). */
static inline __attribute__((always_inline)) void fold(const __m512 *wide, const int rows,
                                                       __m256 *acc) {
    for (int r = 0; r < rows; r++)
        acc[r] = _mm256_add_ps(_mm512_castps512_ps256(wide[r]),
                               _mm512_extractf32x8_ps(wide[r], 1));
}

/* acc plus a quad's int32 sums times their blocks' weight scales (ws) and x's (at dv). */
static inline __m512 add_scaled(__m512 acc, __m512i p, __m512 ws, const float *dv) {
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(ws, _mm512_loadu_ps(dv)), acc);
}

/* Blocks b to b + 3 of `rows` rows of x times one 4-bit weight row, into acc[r]: one
 * 64-byte load of codes, their low nibbles against x's four first halves, the high ones
 * against the second halves; each int32 lane sums four products of one block. */
static inline __attribute__((always_inline)) void quad4(
    const uint8_t *w, __m512 ws, const int8_t *xq, int64_t K, const float *dx,
    int64_t blocks, int64_t b, const int rows, __m512 *acc) {
    const __m512i nibble = _mm512_set1_epi8(15);
    __m512i v = _mm512_loadu_si512((const void *)(w + b * 16));
    __m512i lo = _mm512_and_si512(v, nibble);
    __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
    for (int r = 0; r < rows; r++) {
        const int8_t *a = xq + r * K + b * BLOCK;
        __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo,
                                        _mm512_loadu_si512((const void *)a));
        p = _mm512_dpbusd_epi32(p, hi, _mm512_loadu_si512((const void *)(a + 64)));
        acc[r] = add_scaled(acc[r], p, ws, dx + 4 * (r * blocks + b));
    }
}

/* Blocks b to b + 3 of `rows` rows of x times one signed 8-bit weight row, into acc[r]:
 * the codes' first halves (inputs 0-15 of each block) then second halves gathered from
 * two 64-byte loads; |w| times x negated where w is negative. */
static inline __attribute__((always_inline)) void quad8(
    const int8_t *w, __m512 ws, const int8_t *xq, int64_t K, const float *dx,
    int64_t blocks, int64_t b, const int rows, __m512 *acc) {
    __m512i v0 = _mm512_loadu_si512((const void *)(w + b * BLOCK));
    __m512i v1 = _mm512_loadu_si512((const void *)(w + b * BLOCK + 2 * BLOCK));
    const __m512i halves0 = _mm512_setr_epi64(0, 1, 4, 5, 8, 9, 12, 13);
    const __m512i halves1 = _mm512_setr_epi64(2, 3, 6, 7, 10, 11, 14, 15);
    __m512i first = _mm512_permutex2var_epi64(v0, halves0, v1);
    __m512i second = _mm512_permutex2var_epi64(v0, halves1, v1);
    __mmask64 first_negative = _mm512_movepi8_mask(first);
    __mmask64 second_negative = _mm512_movepi8_mask(second);
    __m512i first_magnitude = _mm512_abs_epi8(first), second_magnitude = _mm512_abs_epi8(second);
    const __m512i zero = _mm512_setzero_si512();
    for (int r = 0; r < rows; r++) {
        const int8_t *a = xq + r * K + b * BLOCK;
        __m512i a0 = _mm512_loadu_si512((const void *)a);
        __m512i a1 = _mm512_loadu_si512((const void *)(a + 64));
        a0 = _mm512_mask_sub_epi8(a0, first_negative, zero, a0);
        a1 = _mm512_mask_sub_epi8(a1, second_negative, zero, a1);
        __m512i p = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, first_magnitude, a0),
                                        second_magnitude, a1);
        acc[r] = add_scaled(acc[r], p, ws, dx + 4 * (r * blocks + b));
    }
}
#endif

/* A row's last `t` (1-7) of `groups` fp16 offsets in lanes 0 to t - 1, zero above: one
 * load ending at the row's end, its halves moved down. */
static inline __m128i offsets_tail(const uint16_t *o, int64_t groups, int64_t t) {
    if (groups < 8) {
        uint16_t lanes[8] = {0};
        memcpy(lanes, o + groups - t, sizeof(uint16_t) * t);
        return _mm_loadu_si128((const __m128i *)lanes);
    }
    static const int8_t down[8][16] = {
        {0}, /* t = 0: not asked for */
        {14, 15, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1},
        {12, 13, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1},
        {10, 11, 12, 13, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1},
        {8, 9, 10, 11, 12, 13, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1},
        {6, 7, 8, 9, 10, 11, 12, 13, 14, 15, -1, -1, -1, -1, -1, -1},
        {4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, -1, -1, -1, -1},
        {2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, -1, -1}};
    return _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(o + groups - 8)),
                            _mm_loadu_si128((const __m128i *)down[t]));
}

/* The offsets' share, into each row's chain: o_g times x's group sums, eight groups per
 * product (the sums are zero past the last group; so are the offsets read for it), in
 * chains of their own beside the products'. */
static inline __attribute__((always_inline)) void add_offsets(
    const uint16_t *o, int64_t groups, const float *xs, const int rows, __m256 *acc) {
    int64_t stride = sums_stride(groups);
    __m256 share[ROWS];
    for (int r = 0; r < rows; r++) share[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < stride; g += 8) {
        __m128i halves = g + 8 <= groups ? _mm_loadu_si128((const __m128i *)(o + g))
                                         : offsets_tail(o, groups, groups - g);
        __m256 ov = _mm256_cvtph_ps(halves);
        for (int r = 0; r < rows; r++)
            share[r] = _mm256_fmadd_ps(ov, _mm256_loadu_ps(xs + r * stride + g), share[r]);
    }
    for (int r = 0; r < rows; r++) acc[r] = _mm256_add_ps(acc[r], share[r]);
}

/* Blocks b and b + 1 of `rows` rows of x times one signed 8-bit weight row, into acc[r]:
 * the dot products want one unsigned side, so |w| times x carrying w's sign. */
static inline __attribute__((always_inline)) void pair8(
    const int8_t *w, __m256 ws, const int8_t *xq, int64_t K, const float *dx,
    int64_t blocks, int64_t b, const int rows, __m256 *acc) {
    __m256i v0 = _mm256_loadu_si256((const __m256i *)(w + b * BLOCK));
    __m256i v1 = _mm256_loadu_si256((const __m256i *)(w + b * BLOCK + BLOCK));
    __m256i first = _mm256_permute2x128_si256(v0, v1, 0x20); /* both blocks' inputs 0-15 */
    __m256i second = _mm256_permute2x128_si256(v0, v1, 0x31);
    __m256i first_magnitude = _mm256_sign_epi8(first, first);
    __m256i second_magnitude = _mm256_sign_epi8(second, second);
    for (int r = 0; r < rows; r++) {
        const int8_t *a = xq + r * K + b * BLOCK;
        __m256i a0 = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)a), first);
        __m256i a1 = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(a + BLOCK)), second);
        __m256 p = dot64(first_magnitude, a0, second_magnitude, a1, 8);
        __m256 dv = _mm256_loadu_ps(dx + 4 * (r * blocks + b));
        acc[r] = _mm256_fmadd_ps(p, _mm256_mul_ps(ws, dv), acc[r]);
    }
}

/* An odd count's last block of `rows` rows of x times one weight row, into acc[r]: 4-bit
 * (16 bytes, even inputs low) or signed 8-bit (|w| times x carrying w's sign). */
static inline __attribute__((always_inline)) void last_block(
    const uint8_t *w, __m256 sb, const int8_t *xq, int64_t K, const float *dx, int64_t blocks,
    int64_t b, const int bits, const int rows, __m256 *acc) {
    __m256i q;
    if (bits == 4) {
        const __m128i n = _mm_set1_epi8(15);
        __m128i v = _mm_loadu_si128((const __m128i *)(w + b * 16));
        q = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), n), _mm_and_si128(v, n));
    } else {
        q = _mm256_loadu_si256((const __m256i *)(w + b * BLOCK));
    }
    for (int r = 0; r < rows; r++) {
        __m256i a = _mm256_loadu_si256((const __m256i *)(xq + r * K + b * BLOCK));
        __m256 p = bits == 4 ? dot32(q, a) : dot32(_mm256_sign_epi8(q, q), _mm256_sign_epi8(a, q));
        __m256 scale = _mm256_mul_ps(sb, _mm256_broadcast_ss(dx + 4 * (r * blocks + b)));
        acc[r] = _mm256_fmadd_ps(p, scale, acc[r]);
    }
}

/* `rows` rows of x times one weight row of `bits`-bit codes (both constants once inlined):
 * each row's partial sums (eight lanes) into out[r * TILE]. */
static inline __attribute__((always_inline)) void row(
    const uint8_t *w, const uint16_t *s, const uint16_t *o, int64_t K, int64_t group,
    const int8_t *xq, const float *dx, const float *xs, const int bits, const int rows,
    __m256 *out) {
    int64_t blocks = K / BLOCK, per_group = group / BLOCK;
    int shift = __builtin_ctzll(per_group);
    if (per_group != (int64_t)1 << shift) shift = -1;
    __m256 acc[ROWS]; /* one chain per row, however many rows share the pass: a row's
                       * sums are then the same alone or in a batch (two chains per row
                       * measured no faster at one row) */
    for (int r = 0; r < rows; r++) acc[r] = _mm256_setzero_ps();
    int64_t b = 0;
#if WIDE
    __m512 wide[ROWS];
    for (int r = 0; r < rows; r++) wide[r] = _mm512_setzero_ps();
    for (; b < quad_blocks(blocks); b += 4) {
        __m512 ws = quad_scales(s, b, shift, per_group);
        if (bits == 4)
            quad4(w, ws, xq, K, dx, blocks, b, rows, wide);
        else
            quad8((const int8_t *)w, ws, xq, K, dx, blocks, b, rows, wide);
    }
    fold(wide, rows, acc);
#endif
    for (; b + 2 <= blocks; b += 2) {
        __m256 ws = pair_scales(s, b, shift, per_group);
        if (bits == 4)
            pair4(w, ws, xq, K, dx, blocks, b, rows, acc);
        else
            pair8((const int8_t *)w, ws, xq, K, dx, blocks, b, rows, acc);
    }
    if (b < blocks)
        last_block(w, _mm256_set1_ps(_cvtsh_ss(s[b / per_group])), xq, K, dx, blocks, b, bits,
                   rows, acc);
    if (o) add_offsets(o, K / group, xs, rows, acc);
    for (int r = 0; r < rows; r++) out[r * TILE] = acc[r];
}

#define ROW(bits, r)                                                                     \
    row(wn, s, o, K, group, xqc + m * K, dx + 4 * m * blocks, xs + m * stride, bits, r, \
        sums + (n - first))
#define ROWS_OF(bits)                \
    switch (rows) {                  \
    case 1: ROW(bits, 1); break;     \
    case 2: ROW(bits, 2); break;     \
    case 3: ROW(bits, 3); break;     \
    default: ROW(bits, 4);           \
    }

int64_t kubellm_qrows_bytes(int64_t M, int64_t K, int64_t group) {
    return M * K + sizeof(float) * (4 * M * (K / BLOCK) + M * sums_stride(K / group));
}

kubellm_qrows kubellm_qrows_at(void *memory, int64_t M, int64_t K, int64_t group) {
    kubellm_qrows q = {(int8_t *)memory, NULL, NULL};
    q.scales = (float *)(q.codes + M * K);
    q.sums = q.scales + 4 * M * (K / BLOCK);
    return q;
}

/* Inside a team: x's M rows rounded for w's product. */
void kubellm_qgemm_quantize(const float *x, int64_t M, const kubellm_qweight *w,
                            kubellm_qrows *xq) {
    int64_t K = w->inputs, blocks = K / BLOCK, stride = sums_stride(K / w->group);
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; m++)
        quantize_row(x + m * K, K, w->group, w->bits, xq->codes + m * K,
                     xq->scales + 4 * m * blocks, xq->sums + m * stride);
}

/* Inside a team: y [M, N] = x W^T, from x's rounded rows; output rows split. */
void kubellm_qgemm_multiply(const kubellm_qweight *w, const kubellm_qrows *xq, int64_t M,
                            float *y) {
    int64_t K = w->inputs, N = w->outputs, group = w->group, blocks = K / BLOCK;
    int64_t groups = K / group, stride = sums_stride(groups), row_bytes = K * w->bits / 8;
    const int8_t *xqc = xq->codes;
    const float *dx = xq->scales, *xs = xq->sums;
#pragma omp for schedule(static)
    for (int64_t first = 0; first < N; first += TILE) {
        int64_t count = first + TILE < N ? TILE : N - first;
        __m256 sums[ROWS * TILE]; /* [row of x][weight row]: each output's partial sums */
        for (int i = 0; count < TILE && i < ROWS * TILE; i++) sums[i] = _mm256_setzero_ps();
        for (int64_t m = 0; m < M; m += ROWS) {
            int rows = M - m < ROWS ? M - m : ROWS;
            for (int64_t n = first; n < first + count; n++) {
                const uint16_t *s = w->scales + n * groups;
                const uint16_t *o = w->offsets ? w->offsets + n * groups : NULL;
                const uint8_t *wn = w->codes + n * row_bytes;
                if (w->bits == 4) {
                    ROWS_OF(4)
                } else {
                    ROWS_OF(8)
                }
            }
            for (int r = 0; r < rows; r++) {
                float *at = y + (m + r) * N + first;
                if (count == TILE) {
                    _mm256_storeu_ps(at, reduce8(sums + r * TILE));
                } else {
                    float lanes[TILE];
                    _mm256_storeu_ps(lanes, reduce8(sums + r * TILE));
                    memcpy(at, lanes, sizeof(float) * count);
                }
            }
        }
    }
}

/* A block's 32 codes as four vectors of eight int32, in input order: 4-bit (16 bytes,
 * input 2j in byte j's low nibble, 2j + 1 in its high one) or signed 8-bit. */
static inline void block_codes(const uint8_t *row, int64_t k, int bits, __m256i *q) {
    if (bits == 4) {
        __m128i packed = _mm_loadu_si128((const __m128i *)(row + k / 2));
        __m128i nibble = _mm_set1_epi8(15);
        __m128i low = _mm_and_si128(packed, nibble);
        __m128i high = _mm_and_si128(_mm_srli_epi16(packed, 4), nibble);
        __m128i first = _mm_unpacklo_epi8(low, high), second = _mm_unpackhi_epi8(low, high);
        q[0] = _mm256_cvtepu8_epi32(first);
        q[1] = _mm256_cvtepu8_epi32(_mm_srli_si128(first, 8));
        q[2] = _mm256_cvtepu8_epi32(second);
        q[3] = _mm256_cvtepu8_epi32(_mm_srli_si128(second, 8));
    } else {
        for (int p = 0; p < 4; p++)
            q[p] = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(row + k + 8 * p)));
    }
}

/* Eight floats rounded to bf16, to nearest even, as torch's .to(torch.bfloat16) rounds
 * a number. */
static inline __m128i bf16x8(__m256 f) {
    __m256i u = _mm256_castps_si256(f);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))),
                          16);
    return _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
}

/* W [N, K] from its codes: q * s + o per group, a product then a sum, as
 * GroupQuantized.dequantize rounds it (the weight of the dense product for large M);
 * into `out` in fp32, or with `bf16` set rounded to bf16 (uint16_t). */
void kubellm_dequantize(const uint8_t *codes, int bits, const uint16_t *scales,
                        const uint16_t *offsets, int64_t N, int64_t K, int64_t group,
                        void *out, int bf16, int threads) {
    int64_t groups = K / group, row_bytes = K * bits / 8;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *row = codes + n * row_bytes;
        for (int64_t g = 0; g < groups; g++) {
            __m256 s = _mm256_set1_ps(_cvtsh_ss(scales[n * groups + g]));
            __m256 o = _mm256_set1_ps(_cvtsh_ss(offsets[n * groups + g]));
            for (int64_t k = g * group; k < (g + 1) * group; k += BLOCK) {
                __m256i q[4];
                block_codes(row, k, bits, q);
                for (int p = 0; p < 4; p++) {
                    __m256 w = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(q[p]), s), o);
                    int64_t at = n * K + k + 8 * p;
                    if (bf16)
                        _mm_storeu_si128((__m128i *)((uint16_t *)out + at), bf16x8(w));
                    else
                        _mm256_storeu_ps((float *)out + at, w);
                }
            }
        }
    }
}

/* y [M, N] = x [M, K] W^T. K and group are multiples of 32, group divides K. Returns 0,
 * or -1 when the scratch space could not be allocated. */
int kubellm_qgemm(const float *x, int64_t M, int64_t K, const uint8_t *codes, int bits,
                  const uint16_t *scales, const uint16_t *offsets, int64_t N, int64_t group,
                  float *y, int threads) {
    kubellm_qweight w = {codes, scales, offsets, N, K, group, bits};
    void *memory = malloc(kubellm_qrows_bytes(M, K, group));
    if (!memory) return -1;
    kubellm_qrows xq = kubellm_qrows_at(memory, M, K, group);
#pragma omp parallel num_threads(threads)
    {
        kubellm_qgemm_quantize(x, M, &w, &xq);
        kubellm_qgemm_multiply(&w, &xq, M, y);
    }
    free(memory);
    return 0;
}
