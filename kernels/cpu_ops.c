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

static inline int64_t value_bytes(int half) { return half ? sizeof(uint16_t) : sizeof(float); }

/* Where V's rows begin in a cache of `rows` K rows then as many V rows. */
static inline void *v_rows(const void *kv_cache, int64_t rows, int64_t width, int half) {
    return (char *)kv_cache + value_bytes(half) * rows * width;
}

/* New K and V rows (`width` floats each, token rows `k_stride` / `v_stride` apart) into
 * their cache slots; slot -1 is skipped. The cache: K's `slots_total` rows, then V's. */
void kubellm_write_kv_rows(const float *k, int64_t k_stride, const float *v,
                           int64_t v_stride, const int64_t *slots, int64_t tokens,
                           int64_t width, void *kv_cache, int64_t slots_total, int half) {
    void *v_cache = v_rows(kv_cache, slots_total, width, half);
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

/* Positions ahead whose K rows scores_of asks for (a request's rows are scattered over
 * its blocks, which the hardware's prefetcher does not follow across). */
#define AHEAD 16

/* Asks for the cache lines of `values` cache values from element `at` on. */
static inline __attribute__((always_inline)) void prefetch(const void *cache, int64_t at,
                                                          int64_t values, const int half) {
    const char *from = (const char *)cache + value_bytes(half) * at;
    for (int64_t byte = 0; byte < value_bytes(half) * values; byte += 64)
        _mm_prefetch(from + byte, _MM_HINT_T0);
}

static inline __attribute__((always_inline)) float dot(const float *q, const void *cache,
                                                       int64_t at, int64_t dim, const int half) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < dim; i += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(cache, at + i, half), acc);
    return hsum(acc);
}

/* Query heads of one KV head attended together: each K and V row is then loaded (and
 * from fp16 converted) once for all of them. Three keep a pass's sums in registers. */
#define HEADS_TOGETHER 3

/* Lane i: the sum of the lanes of a[i], each in the order ((0+1)+(2+3))+((4+5)+(6+7)). */
static inline __m128 sums4(const __m256 *a) {
    __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

/* scores[c * len + t] = q_c . k_t * scale for the `heads` (a constant once inlined) query
 * heads q_c = q + c * dim and t < len, four positions at a time; top[c]: head c's max.
 * K of position t starts at element rows[t] * kv_width + head of k_cache. */
static inline __attribute__((always_inline)) void scores_of(
    const float *q, const int heads, const void *k_cache, int64_t head, const int64_t *rows,
    int64_t len, int64_t kv_width, int64_t dim, float scale, float *scores, float *top,
    const int half) {
    const __m128 scaled = _mm_set1_ps(scale);
    __m128 peak[HEADS_TOGETHER];
    for (int c = 0; c < heads; c++) peak[c] = _mm_set1_ps(-INFINITY);
    int64_t t = 0;
    for (; t + 4 <= len; t += 4) {
        for (int j = 0; j < 4 && t + AHEAD + j < len; j++)
            prefetch(k_cache, rows[t + AHEAD + j] * kv_width + head, dim, half);
        __m256 acc[HEADS_TOGETHER][4];
        for (int c = 0; c < heads; c++)
            for (int j = 0; j < 4; j++) acc[c][j] = _mm256_setzero_ps();
        for (int64_t i = 0; i < dim; i += 8) {
            __m256 qi[HEADS_TOGETHER];
            for (int c = 0; c < heads; c++) qi[c] = _mm256_loadu_ps(q + c * dim + i);
            for (int j = 0; j < 4; j++) {
                __m256 k = load8(k_cache, rows[t + j] * kv_width + head + i, half);
                for (int c = 0; c < heads; c++) acc[c][j] = _mm256_fmadd_ps(qi[c], k, acc[c][j]);
            }
        }
        for (int c = 0; c < heads; c++) {
            __m128 s = _mm_mul_ps(sums4(acc[c]), scaled);
            _mm_storeu_ps(scores + c * len + t, s);
            peak[c] = _mm_max_ps(peak[c], s);
        }
    }
    for (int c = 0; c < heads; c++) {
        float m = -INFINITY;
        for (int j = 0; j < 4; j++) m = fmaxf(m, ((float *)&peak[c])[j]);
        for (int64_t u = t; u < len; u++) {
            float *s = scores + c * len + u;
            *s = dot(q + c * dim, k_cache, rows[u] * kv_width + head, dim, half) * scale;
            m = fmaxf(m, *s);
        }
        top[c] = m;
    }
}

/* p[:len] = e^(p - top) in place; returns their sum. */
static inline float exponentiate(float *p, int64_t len, float top) {
    __m256 peak = _mm256_set1_ps(top), sum = _mm256_setzero_ps();
    int64_t t = 0;
    for (; t + 8 <= len; t += 8) {
        __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(p + t), peak));
        _mm256_storeu_ps(p + t, e);
        sum = _mm256_add_ps(sum, e);
    }
    float total = hsum(sum);
    for (; t < len; t++) total += p[t] = exp1(p[t] - top);
    return total;
}

/* Positions whose V rows a pass of weighted_sum reads for every width of the head
 * (they then come from L1 after the first). */
#define SPAN 16

/* acc_c[:width] += sum_{t in [from, to)} p_c[t] v_t[:width] (p_c = p + c * len, acc_c =
 * acc + c * dim / 8), width 8 or 32; v_t starts at element rows[t] * kv_width + head. */
static inline __attribute__((always_inline)) void weigh_span(
    const float *p, const int heads, const void *v_cache, int64_t head, const int64_t *rows,
    int64_t from, int64_t to, int64_t len, int64_t kv_width, int64_t dim, const int width,
    __m256 *acc, const int half) {
    __m256 sums[HEADS_TOGETHER][4];
    for (int c = 0; c < heads; c++)
        for (int i = 0; i < width / 8; i++) sums[c][i] = acc[c * dim / 8 + i];
    for (int64_t t = from; t < to; t++) {
        int64_t at = rows[t] * kv_width + head;
        __m256 w[HEADS_TOGETHER];
        for (int c = 0; c < heads; c++) w[c] = _mm256_set1_ps(p[c * len + t]);
        for (int i = 0; i < width / 8; i++) {
            __m256 v = load8(v_cache, at + 8 * i, half);
            for (int c = 0; c < heads; c++) sums[c][i] = _mm256_fmadd_ps(w[c], v, sums[c][i]);
        }
    }
    for (int c = 0; c < heads; c++)
        for (int i = 0; i < width / 8; i++) acc[c * dim / 8 + i] = sums[c][i];
}

/* out_c = sum_t p_c[t] v_t / total[c] for the `heads` heads (out_c = out + c * dim), each
 * lane's sum in position order; SPAN positions at a time, 32 values of each at a time. */
static inline __attribute__((always_inline)) void weighted_sum(
    const float *p, const int heads, const void *v_cache, int64_t head, const int64_t *rows,
    int64_t len, int64_t kv_width, int64_t dim, const float *total, float *out,
    const int half) {
    __m256 acc[HEADS_TOGETHER * 32]; /* [head][dim / 8], dim at most 256 */
    for (int64_t i = 0; i < heads * dim / 8; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t from = 0; from < len; from += SPAN) {
        int64_t to = from + SPAN < len ? from + SPAN : len, d = 0;
        for (int64_t t = to; t < to + SPAN && t < len; t++) /* the next span's rows */
            prefetch(v_cache, rows[t] * kv_width + head, dim, half);
        for (; d + 32 <= dim; d += 32)
            weigh_span(p, heads, v_cache, head + d, rows, from, to, len, kv_width, dim, 32,
                       acc + d / 8, half);
        for (; d < dim; d += 8)
            weigh_span(p, heads, v_cache, head + d, rows, from, to, len, kv_width, dim, 8,
                       acc + d / 8, half);
    }
    for (int c = 0; c < heads; c++) {
        __m256 inverse = _mm256_set1_ps(1.f / total[c]);
        for (int64_t i = 0; i < dim / 8; i++)
            _mm256_storeu_ps(out + c * dim + 8 * i, _mm256_mul_ps(acc[c * dim / 8 + i], inverse));
    }
}

/* `heads` consecutive query heads (q, `dim` apart) of one request over its `len`
 * positions (cache rows `rows`), their KV head's values from element `head` of each row,
 * into out (`dim` apart); `scores` holds HEADS_TOGETHER * len floats. A head's values
 * are the same however many heads share its pass. */
static inline __attribute__((always_inline)) void attend_heads(
    const float *q, const int heads, const void *k_cache, const void *v_cache, int64_t head,
    const int64_t *rows, int64_t len, int64_t kv_width, int64_t dim, float scale,
    float *scores, float *out, const int half) {
    float top[HEADS_TOGETHER], total[HEADS_TOGETHER];
    scores_of(q, heads, k_cache, head, rows, len, kv_width, dim, scale, scores, top, half);
    for (int c = 0; c < heads; c++) total[c] = exponentiate(scores + c * len, len, top[c]);
    weighted_sum(scores, heads, v_cache, head, rows, len, kv_width, dim, total, out, half);
}

typedef void attend_fn(const float *q, const void *k_cache, const void *v_cache,
                       int64_t head, const int64_t *rows, int64_t len, int64_t kv_width,
                       int64_t dim, float scale, float *scores, float *out);

#define ATTEND(heads, half)                                                                \
    static void attend_##heads##_##half(const float *q, const void *k_cache,              \
                                        const void *v_cache, int64_t head,                 \
                                        const int64_t *rows, int64_t len, int64_t kv_width, \
                                        int64_t dim, float scale, float *scores, float *out) { \
        attend_heads(q, heads, k_cache, v_cache, head, rows, len, kv_width, dim, scale,    \
                     scores, out, half);                                                   \
    }
ATTEND(1, 0) ATTEND(2, 0) ATTEND(3, 0) ATTEND(1, 1) ATTEND(2, 1) ATTEND(3, 1)

/* [half][heads - 1]: the instantiation for a pass of `heads` heads over a cache. */
static attend_fn *const ATTEND_FOR[2][HEADS_TOGETHER] = {
    {attend_1_0, attend_2_0, attend_3_0}, {attend_1_1, attend_2_1, attend_3_1}};

int64_t kubellm_decode_scratch_bytes(const int64_t *seq_lens, int64_t requests) {
    int64_t longest = 0;
    for (int64_t r = 0; r < requests; r++) longest = seq_lens[r] > longest ? seq_lens[r] : longest;
    return (HEADS_TOGETHER * sizeof(float) + sizeof(int64_t)) * longest;
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
    const void *v_cache = v_rows(kv_cache, blocks * block_size, kv_width, half);
    char *mine = scratch + omp_get_thread_num() * scratch_per_thread;
    int64_t longest = scratch_per_thread / (HEADS_TOGETHER * sizeof(float) + sizeof(int64_t));
    float *scores = (float *)mine;
    int64_t *cache_rows = (int64_t *)(mine + HEADS_TOGETHER * sizeof(float) * longest);
    /* An item is a KV head's query heads (attended HEADS_TOGETHER at a time), unless
     * that leaves a thread idle: then a single query head. */
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
        for (int64_t h = first, together; h < first + per_item; h += together) {
            together = first + per_item - h < HEADS_TOGETHER ? first + per_item - h : HEADS_TOGETHER;
            ATTEND_FOR[half != 0][together - 1](
                q + row * q_stride + h * dim, k_cache, v_cache, h / group * dim, cache_rows,
                seq_lens[r], kv_width, dim, scale, scores, out + (row * heads + h) * dim);
        }
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
