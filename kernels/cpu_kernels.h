/* What kubellm's C kernels share: the pieces of work each entry point runs inside one
 * OpenMP team. Their loops are `omp for` (with its barrier at the end), so one parallel
 * region can run several in a row: `kubellm_decode_layer` runs a whole layer so. */
#include <stdint.h>

/* A group-quantized weight [outputs, inputs] as GroupQuantized stores it, fp16 scales;
 * offsets NULL where it has none. */
typedef struct {
    const uint8_t *codes;
    const uint16_t *scales, *offsets;
    int64_t outputs, inputs, group;
    int bits;
} kubellm_qweight;

/* Rows of x rounded to int8 per 32 inputs, for one weight's product. */
typedef struct {
    int8_t *codes;
    float *scales, *sums;
} kubellm_qrows;

int64_t kubellm_qrows_bytes(int64_t M, int64_t K, int64_t group);
kubellm_qrows kubellm_qrows_at(void *memory, int64_t M, int64_t K, int64_t group);
void kubellm_qgemm_quantize(const float *x, int64_t M, const kubellm_qweight *w,
                            kubellm_qrows *xq);
void kubellm_qgemm_multiply(const kubellm_qweight *w, const kubellm_qrows *xq, int64_t M,
                            float *y);

void kubellm_add_rms_norm_rows(const float *x, float *residual, const float *weight,
                               int64_t M, int64_t H, float eps, float *out);
void kubellm_rotate_rows(float *x, int64_t tokens, int64_t heads, int64_t dim,
                         int64_t stride, const float *cos, const float *sin);
void kubellm_silu_and_mul_rows(const float *x, int64_t M, int64_t I, float *out);
/* kv_cache: fp32, or fp16 where `half` */
void kubellm_write_kv_rows(const float *k, int64_t k_stride, const float *v,
                           int64_t v_stride, const int64_t *slots, int64_t tokens,
                           int64_t width, void *kv_cache, int64_t slots_total, int half);
/* scratch: per thread, `longest` floats then `longest` int64 (see decode_scratch_bytes) */
int64_t kubellm_decode_scratch_bytes(const int64_t *seq_lens, int64_t requests);
void kubellm_decode_attention_heads(const float *q, int64_t q_stride, int64_t heads,
                                    const void *kv_cache, int64_t blocks, int64_t block_size,
                                    int64_t kv_heads, int64_t dim, int half,
                                    const int64_t *rows, const int64_t *seq_lens,
                                    const int64_t *block_tables, int64_t table_stride,
                                    int64_t requests, float scale, float *out, char *scratch,
                                    int64_t scratch_per_thread);
