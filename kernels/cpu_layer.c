/* A whole decoder layer of a decode step (every request one new token) in one call and
 * one OpenMP team: RMSNorm with the residual add, the QKV product (+ bias), rotary
 * embeddings, the KV writes, decode attention, the output product, RMSNorm, gate/up,
 * SiLU * up and down, each piece the same code the separate calls run (cpu_qgemm.c,
 * cpu_ops.c), so the result is theirs bit for bit. What it saves is the host work
 * between them: ~100 us of Python, views and thread wake-ups per layer. */
#include <omp.h>
#include <stdlib.h>

#include "cpu_kernels.h"

typedef struct {
    kubellm_qweight qkv, o, gate_up, down;
    const float *qkv_bias; /* NULL: none */
    const float *input_norm, *post_attention_norm;
    float eps, scale;
    int64_t hidden, heads, kv_heads, head_dim;
} kubellm_layer;

typedef struct {
    int64_t tokens; /* one per request */
    const float *cos, *sin; /* [tokens, head_dim] */
    const int64_t *slots, *rows, *seq_lens, *block_tables;
    int64_t table_stride, blocks, block_size;
    int half_kv; /* the KV cache is fp16 (else fp32) */
} kubellm_decode_step;

static int64_t most(int64_t a, int64_t b) { return a > b ? a : b; }

/* out = the layer's MLP output for x; the residual stream (NULL at the first layer:
 * x itself) gains the attention output, as the separate calls do it. Returns 0, or -1
 * when the scratch could not be allocated. */
int kubellm_decode_layer(const kubellm_layer *L, const kubellm_decode_step *S,
                         void *kv_cache, float *x, float *residual, float *out, int threads) {
    int64_t M = S->tokens, H = L->hidden, q_size = L->heads * L->head_dim;
    int64_t kv_size = L->kv_heads * L->head_dim, qkv_width = L->qkv.outputs;
    int64_t inner = L->down.inputs;
    int64_t quantized = most(most(kubellm_qrows_bytes(M, H, L->qkv.group),
                                  kubellm_qrows_bytes(M, q_size, L->o.group)),
                             most(kubellm_qrows_bytes(M, H, L->gate_up.group),
                                  kubellm_qrows_bytes(M, inner, L->down.group)));
    int64_t floats = M * (H + qkv_width + q_size + H + 2 * inner + inner);
    int64_t per_thread = kubellm_decode_scratch_bytes(S->seq_lens, M);
    char *scratch = malloc(sizeof(float) * floats + quantized + per_thread * threads + 1);
    if (!scratch) return -1;
    float *normed = (float *)scratch, *qkv = normed + M * H, *attended = qkv + M * qkv_width;
    float *projected = attended + M * q_size, *gate_up = projected + M * H;
    float *activated = gate_up + M * 2 * inner;
    char *rounded = (char *)(activated + M * inner), *attention_scratch = rounded + quantized;
    float *stream = residual ? residual : x;
#pragma omp parallel num_threads(threads)
    {
        kubellm_qrows xq = kubellm_qrows_at(rounded, M, H, L->qkv.group);
        kubellm_add_rms_norm_rows(x, residual, L->input_norm, M, H, L->eps, normed);
        kubellm_qgemm_quantize(normed, M, &L->qkv, &xq);
        kubellm_qgemm_multiply(&L->qkv, &xq, M, qkv);
        if (L->qkv_bias) {
#pragma omp for schedule(static)
            for (int64_t m = 0; m < M; m++)
                for (int64_t i = 0; i < qkv_width; i++) qkv[m * qkv_width + i] += L->qkv_bias[i];
        }
        kubellm_rotate_rows(qkv, M, L->heads + L->kv_heads, L->head_dim, qkv_width, S->cos,
                            S->sin);
        kubellm_write_kv_rows(qkv + q_size, qkv_width, qkv + q_size + kv_size, qkv_width,
                              S->slots, M, kv_size, kv_cache, S->blocks * S->block_size,
                              S->half_kv);
        kubellm_decode_attention_heads(qkv, qkv_width, L->heads, kv_cache, S->blocks,
                                       S->block_size, L->kv_heads, L->head_dim, S->half_kv, S->rows,
                                       S->seq_lens, S->block_tables, S->table_stride, M,
                                       L->scale, attended, attention_scratch, per_thread);
        xq = kubellm_qrows_at(rounded, M, q_size, L->o.group);
        kubellm_qgemm_quantize(attended, M, &L->o, &xq);
        kubellm_qgemm_multiply(&L->o, &xq, M, projected);
        kubellm_add_rms_norm_rows(projected, stream, L->post_attention_norm, M, H, L->eps,
                                  normed);
        xq = kubellm_qrows_at(rounded, M, H, L->gate_up.group);
        kubellm_qgemm_quantize(normed, M, &L->gate_up, &xq);
        kubellm_qgemm_multiply(&L->gate_up, &xq, M, gate_up);
        kubellm_silu_and_mul_rows(gate_up, M, inner, activated);
        xq = kubellm_qrows_at(rounded, M, inner, L->down.group);
        kubellm_qgemm_quantize(activated, M, &L->down, &xq);
        kubellm_qgemm_multiply(&L->down, &xq, M, out);
    }
    free(scratch);
    return 0;
}
