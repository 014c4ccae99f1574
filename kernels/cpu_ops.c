/* A decoder layer's small fp32 operations on x86 CPUs with AVX2 and FMA, each one call
 * where torch makes several: RMSNorm with its residual add, rotary embeddings in place,
 * SiLU(gate) * up, and the paged KV cache's writes and one-token (decode) attention read
 * in place from the blocks. At decode sizes a layer's time is mostly torch's per-op
 * host overhead (an RMSNorm is 11 aten ops), not arithmetic. Their torch forms:
 * `TorchOps` (runtime/model/layer_ops.py) and kernels/reference.py's KV and attention
 * references. Compiled with -ffp-contract=off: a * b + c written in C rounds as torch's
 * separate products and sums do. The KV cache is fp32 or fp16 (`half`: F16C's
 * conversions, round to nearest even, as torch's); the arithmetic is fp32 either way.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_kernels.h"

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* e^x, within ~2 ulp (Cephes' expf polynomial); inputs below -87 give ~1e-38, not 0. */
static inline __m256 exp256(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3f)), _mm256_set1_ps(-87.3f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static inline float exp1(float x) { return _mm256_cvtss_f32(exp256(_mm256_set1_ps(x))); }

/* Rows [M, H] of x: with `residual`, residual += x first and the sum is normalized;
 * out = weight * (v / sqrt(mean(v^2) + eps)). */
void kubellm_add_rms_norm_rows(const float *x, float *residual, const float *weight,
                               int64_t M, int64_t H, float eps, float *out) {
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; m++) {
        const float *v = x + m * H;
        if (residual) {
            float *r = residual + m * H;
            for (int64_t i = 0; i < H; i++) r[i] += v[i];
            v = r;
        }
        __m256 squares = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 8 <= H; i += 8) {
            __m256 a = _mm256_loadu_ps(v + i);
            squares = _mm256_fmadd_ps(a, a, squares);
        }
        float sum = hsum(squares);
        for (; i < H; i++) sum += v[i] * v[i];
        float inverse = 1.f / sqrtf(sum / (float)H + eps);
        float *o = out + m * H;
        for (i = 0; i < H; i++) o[i] = weight[i] * (v[i] * inverse);
    }
}

void kubellm_add_rms_norm(const float *x, float *residual, const float *weight, int64_t M,
                          int64_t H, float eps, float *out, int threads) {
#pragma omp parallel num_threads(threads) if (M > 4)
    kubellm_add_rms_norm_rows(x, residual, weight, M, H, eps, out);
}

/* Heads [tokens, heads, dim] of x (token rows `stride` floats apart) rotated in place by
 * their token's cos and signed sin rows [tokens, dim]: x * cos + roll(x, dim / 2) * sin. */
void kubellm_rotate_rows(float *x, int64_t tokens, int64_t heads, int64_t dim,
                         int64_t stride, const float *cos, const float *sin) {
    int64_t half = dim / 2;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tokens; t++) {
        const float *c = cos + t * dim, *s = sin + t * dim;
        for (int64_t h = 0; h < heads; h++) {
            float *v = x + t * stride + h * dim, first[half];
            memcpy(first, v, sizeof first);
            for (int64_t i = 0; i < half; i++) v[i] = v[i] * c[i] + v[i + half] * s[i];
            for (int64_t i = half; i < dim; i++)
                v[i] = v[i] * c[i] + first[i - half] * s[i];
        }
    }
}

void kubellm_rotate(float *x, int64_t tokens, int64_t heads, int64_t dim, int64_t stride,
                    const float *cos, const float *sin, int threads) {
#pragma omp parallel num_threads(threads) if (tokens > 4)
    kubellm_rotate_rows(x, tokens, heads, dim, stride, cos, sin);
}

/* out [M, I] = silu(gate) * up of x [M, 2I] = [gate | up], silu(g) = g / (1 + e^-g). */
void kubellm_silu_and_mul_rows(const float *x, int64_t M, int64_t I, float *out) {
    const __m256 one = _mm256_set1_ps(1.f), sign = _mm256_set1_ps(-0.f);
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; m++) {
        const float *g = x + m * 2 * I, *u = g + I;
        float *o = out + m * I;
        int64_t i = 0;
        for (; i + 8 <= I; i += 8) {
            __m256 a = _mm256_loadu_ps(g + i);
            __m256 silu = _mm256_div_ps(a, _mm256_add_ps(one, exp256(_mm256_xor_ps(a, sign))));
            _mm256_storeu_ps(o + i, _mm256_mul_ps(silu, _mm256_loadu_ps(u + i)));
        }
        for (; i < I; i++) o[i] = g[i] / (1.f + exp1(-g[i])) * u[i];
    }
}

void kubellm_silu_and_mul(const float *x, int64_t M, int64_t I, float *out, int threads) {
#pragma omp parallel num_threads(threads) if (M * I > 16384)
    kubellm_silu_and_mul_rows(x, M, I, out);
}

/* One row of `width` floats into an fp32 or fp16 (`half`) cache row. */
static inline void put_row(void *cache, int64_t slot, const float *row, int64_t width,
                           int half) {
    if (!half) {
        memcpy((float *)cache + slot * width, row, sizeof(float) * width);
        return;
    }
    uint16_t *to = (uint16_t *)cache + slot * width;
    int64_t i = 0;
    for (; i + 8 <= width; i += 8)
        _mm_storeu_si128((__m128i *)(to + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(row + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < width; i++) to[i] = _cvtss_sh(row[i], _MM_FROUND_TO_NEAREST_INT);
}

/* New K and V rows (`width` floats each, token rows `k_stride` / `v_stride` apart) into
 * their cache slots; slot -1 is skipped. The cache: K's `slots_total` rows, then V's. */
void kubellm_write_kv_rows(const float *k, int64_t k_stride, const float *v,
                           int64_t v_stride, const int64_t *slots, int64_t tokens,
                           int64_t width, void *kv_cache, int64_t slots_total, int half) {
    char *v_cache = (char *)kv_cache + (half ? 2 : 4) * slots_total * width;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tokens; t++) {
        if (slots[t] < 0) continue;
        put_row(kv_cache, slots[t], k + t * k_stride, width, half);
        put_row(v_cache, slots[t], v + t * v_stride, width, half);
    }
}

void kubellm_write_kv(const float *k, int64_t k_stride, const float *v, int64_t v_stride,
                      const int64_t *slots, int64_t tokens, int64_t width, void *kv_cache,
                      int64_t slots_total, int half) { /* outside a parallel region */
    kubellm_write_kv_rows(k, k_stride, v, v_stride, slots, tokens, width, kv_cache,
                          slots_total, half);
}

/* Eight cache values from element `at` on, as fp32. */
static inline __attribute__((always_inline)) __m256 load8(const void *cache, int64_t at,
                                                          const int half) {
    if (half) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)cache + at)));
    return _mm256_loadu_ps((const float *)cache + at);
}

static inline __attribute__((always_inline)) float dot(const float *q, const void *cache,
                                                       int64_t at, int64_t dim, const int half) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < dim; i += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(cache, at + i, half), acc);
    return hsum(acc);
}

/* Lane i: the sum of the lanes of a[i]. */
static inline __m256 sums8(const __m256 *a) {
    __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20),
                         _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

/* scores[t] = q . k_t * scale for t < len, eight positions at a time; returns the max.
 * K of position t starts at element rows[t] * kv_width + head of k_cache. */
static inline __attribute__((always_inline)) float scores_of(
    const float *q, const void *k_cache, int64_t head, const int64_t *rows, int64_t len,
    int64_t kv_width, int64_t dim, float scale, float *scores, const int half) {
    __m256 top = _mm256_set1_ps(-INFINITY), scaled = _mm256_set1_ps(scale);
    int64_t t = 0;
    for (; t + 8 <= len; t += 8) {
        __m256 acc[8];
        for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
        for (int64_t i = 0; i < dim; i += 8) {
            __m256 qi = _mm256_loadu_ps(q + i);
            for (int j = 0; j < 8; j++)
                acc[j] = _mm256_fmadd_ps(qi, load8(k_cache, rows[t + j] * kv_width + head + i, half), acc[j]);
        }
        __m256 s = _mm256_mul_ps(sums8(acc), scaled);
        _mm256_storeu_ps(scores + t, s);
        top = _mm256_max_ps(top, s);
    }
    float m = -INFINITY;
    for (int j = 0; j < 8; j++) m = fmaxf(m, ((float *)&top)[j]);
    for (; t < len; t++) {
        scores[t] = dot(q, k_cache, rows[t] * kv_width + head, dim, half) * scale;
        m = fmaxf(m, scores[t]);
    }
    return m;
}

/* out[:width] = sum_t p[t] v_t[:width] / total, width a multiple of 8 up to 64; v_t
 * starts at element rows[t] * kv_width + head of v_cache. */
static inline __attribute__((always_inline)) void weighted_sum(
    const float *p, const void *v_cache, int64_t head, const int64_t *rows, int64_t len,
    int64_t kv_width, const int width, float total, float *out, const int half) {
    __m256 acc[8];
    for (int i = 0; i < width / 8; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t t = 0; t < len; t++) {
        int64_t at = rows[t] * kv_width + head;
        __m256 w = _mm256_set1_ps(p[t]);
        for (int i = 0; i < width / 8; i++) acc[i] = _mm256_fmadd_ps(w, load8(v_cache, at + 8 * i, half), acc[i]);
    }
    __m256 inverse = _mm256_set1_ps(1.f / total);
    for (int i = 0; i < width / 8; i++) _mm256_storeu_ps(out + 8 * i, _mm256_mul_ps(acc[i], inverse));
}

/* One query head of one request over its `len` positions (cache rows `rows`), its KV
 * head's values from element `head` of each row; `scores` holds len floats. */
static inline __attribute__((always_inline)) void attend_head(
    const float *q, const void *k_cache, const void *v_cache, int64_t head,
    const int64_t *rows, int64_t len, int64_t kv_width, int64_t dim, float scale,
    float *scores, float *out, const int half) {
    float top = scores_of(q, k_cache, head, rows, len, kv_width, dim, scale, scores, half);
    __m256 peak = _mm256_set1_ps(top);
    __m256 sum = _mm256_setzero_ps();
    int64_t t = 0;
    for (; t + 8 <= len; t += 8) {
        __m256 p = exp256(_mm256_sub_ps(_mm256_loadu_ps(scores + t), peak));
        _mm256_storeu_ps(scores + t, p);
        sum = _mm256_add_ps(sum, p);
    }
    float total = hsum(sum);
    for (; t < len; t++) total += scores[t] = exp1(scores[t] - top);
    int64_t d = 0;
    for (; d + 64 <= dim; d += 64)
        weighted_sum(scores, v_cache, head + d, rows, len, kv_width, 64, total, out + d, half);
    for (; d < dim; d += 8)
        weighted_sum(scores, v_cache, head + d, rows, len, kv_width, 8, total, out + d, half);
}

static void attend_head_fp32(const float *q, const void *k_cache, const void *v_cache,
                             int64_t head, const int64_t *rows, int64_t len, int64_t kv_width,
                             int64_t dim, float scale, float *scores, float *out) {
    attend_head(q, k_cache, v_cache, head, rows, len, kv_width, dim, scale, scores, out, 0);
}

static void attend_head_fp16(const float *q, const void *k_cache, const void *v_cache,
                             int64_t head, const int64_t *rows, int64_t len, int64_t kv_width,
                             int64_t dim, float scale, float *scores, float *out) {
    attend_head(q, k_cache, v_cache, head, rows, len, kv_width, dim, scale, scores, out, 1);
}

int64_t kubellm_decode_scratch_bytes(const int64_t *seq_lens, int64_t requests) {
    int64_t longest = 0;
    for (int64_t r = 0; r < requests; r++) longest = seq_lens[r] > longest ? seq_lens[r] : longest;
    return (sizeof(float) + sizeof(int64_t)) * longest;
}

/* Inside a team: attention of `requests` one-token queries over their whole contexts,
 * read in place from the paged cache (K's `blocks` [block_size, kv_heads, dim] blocks,
 * then V's). Request r's query is token row rows[r] of q (rows `q_stride` floats apart,
 * heads `dim` apart), its context seq_lens[r] positions in blocks block_tables[r *
 * table_stride + ...]; its output goes to the same row of out ([tokens, heads, dim],
 * contiguous). dim: a multiple of 8, at most 256. Each thread uses its own
 * `scratch_per_thread` bytes of scratch. */
void kubellm_decode_attention_heads(const float *q, int64_t q_stride, int64_t heads,
                                    const void *kv_cache, int64_t blocks, int64_t block_size,
                                    int64_t kv_heads, int64_t dim, int half,
                                    const int64_t *rows, const int64_t *seq_lens,
                                    const int64_t *block_tables, int64_t table_stride,
                                    int64_t requests, float scale, float *out, char *scratch,
                                    int64_t scratch_per_thread) {
    int64_t group = heads / kv_heads, kv_width = kv_heads * dim, last = -1;
    const void *k_cache = kv_cache;
    const void *v_cache = (const char *)kv_cache + (half ? 2 : 4) * blocks * block_size * kv_width;
    char *mine = scratch + omp_get_thread_num() * scratch_per_thread;
    int64_t longest = scratch_per_thread / (sizeof(float) + sizeof(int64_t));
    float *scores = (float *)mine;
    int64_t *cache_rows = (int64_t *)(mine + sizeof(float) * longest);
    /* A KV head's query heads one after another on one thread (its K and V rows then
     * come from that core's cache after the first), unless that leaves a thread idle. */
    int64_t per_item = requests * kv_heads >= 4 * omp_get_num_threads() ? group : 1;
#pragma omp for schedule(dynamic)
    for (int64_t item = 0; item < requests * heads / per_item; item++) {
        int64_t r = item * per_item / heads, first = item * per_item % heads, row = rows[r];
        if (r != last) { /* this request's positions' rows of the cache */
            const int64_t *table = block_tables + r * table_stride;
            for (int64_t t = 0, b = 0, j = 0; t < seq_lens[r]; t++) {
                cache_rows[t] = table[b] * block_size + j;
                if (++j == block_size) j = 0, b++;
            }
            last = r;
        }
        for (int64_t h = first; h < first + per_item; h++)
            (half ? attend_head_fp16 : attend_head_fp32)(
                q + row * q_stride + h * dim, k_cache, v_cache, h / group * dim, cache_rows,
                seq_lens[r], kv_width, dim, scale, scores, out + (row * heads + h) * dim);
    }
}

/* The same as one call; returns 0, or -1 when the scratch could not be allocated. */
int kubellm_decode_attention(const float *q, int64_t q_stride, int64_t heads,
                             const void *kv_cache, int64_t blocks, int64_t block_size,
                             int64_t kv_heads, int64_t dim, int half, const int64_t *rows,
                             const int64_t *seq_lens, const int64_t *block_tables,
                             int64_t table_stride, int64_t requests, float scale, float *out,
                             int threads) {
    int64_t per_thread = kubellm_decode_scratch_bytes(seq_lens, requests);
    char *scratch = malloc(per_thread * threads + 1);
    if (!scratch) return -1;
#pragma omp parallel num_threads(threads)
    kubellm_decode_attention_heads(q, q_stride, heads, kv_cache, blocks, block_size, kv_heads,
                                   dim, half, rows, seq_lens, block_tables, table_stride,
                                   requests, scale, out, scratch, per_thread);
    free(scratch);
    return 0;
}
