/* A Llama-style decode step's small operators fused, for x86-64 CPUs with AVX-512 (fp32 and bf16 tensors).

   Built by deltatune/serving/cpu_kernels.py with the machine's C compiler (-O3 -march=native -fopenmp
   -ffp-contract=off) and called through ctypes, one call where the eager step runs 10-30 operators:
   - add_rms_norm: the residual add and the RMSNorm after it (Zhang & Sennrich 2019), rounded as transformers'
     LlamaRMSNorm rounds (the sum, then x * rsqrt(mean(x^2) + eps) to the input dtype, then times the weight);
   - rope_attend: rotary position embedding (Su et al. 2021, RoFormer §3.4.2, transformers' rotate_half form) on one
     new token's query and key per row, rounded as the eager operators round; the key and value written into the
     row's cache slot; then that token's attention over the row's cached positions, grouped-query heads sharing their
     key/value head (Ainslie et al. 2023), scores and softmax in fp32;
   - prefill_attend: the same for the tokens of one prompt joining the batch (prefilled inside a decode step): keys
     rotated and written with the values into the prompt's cache slot, each token attending causally to its own
     and the earlier ones;
   - silu_mul: the gated MLP's silu(gate) * up (Shazeer 2020), rounded as the eager operators round.
   Every function returns 0, or -1 for a shape it does not handle (the caller then runs the eager operators).
   Work is split over rows (and key/value heads) with OpenMP: the process's libgomp, which PyTorch loaded.
   Rounding a float to bfloat16 is round-to-nearest-even, as PyTorch's cast; NaN is not expected here. */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

static inline __m512 load16(const void *base, long offset, int bf16) {
    if (bf16) {
        __m256i half = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + offset));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
    }
    return _mm512_loadu_ps((const float *)base + offset);
}

static inline __m512 round_bf16(__m512 value) {  /* to the nearest bfloat16, kept as a float */
    __m512i bits = _mm512_castps_si512(value);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    bits = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
    return _mm512_castsi512_ps(_mm512_and_si512(bits, _mm512_set1_epi32((int)0xffff0000u)));
}

static inline __m512 rounded(__m512 value, int bf16) { return bf16 ? round_bf16(value) : value; }

static inline void store16(void *base, long offset, __m512 value, int bf16) {
    if (bf16) {
        __m512i bits = _mm512_srli_epi32(_mm512_castps_si512(round_bf16(value)), 16);
        _mm256_storeu_si256((__m256i *)((uint16_t *)base + offset), _mm512_cvtepi32_epi16(bits));
    } else {
        _mm512_storeu_ps((float *)base + offset, value);
    }
}

/* exp(x), Cephes' expf: x = n ln2 + r, a degree-6 polynomial in r, scaled by 2^n; below -87 it gives 0 (so -inf
   gives 0), above 88 it is clamped there. */
static inline __m512 exp16(__m512 x) {
    __mmask16 vanish = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_LT_OQ);
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_maskz_mov_ps(~vanish, _mm512_scalef_ps(y, n));
}

/* residual_out = residual + delta (delta may be NULL: residual as it is); normed = weight * rms_norm(residual_out).
   Rows of `hidden` values, contiguous; `hidden` a multiple of 16. */
int add_rms_norm(int bf16, const void *residual, const void *delta, void *residual_out, const void *weight,
                 void *normed, int tokens, int hidden, float eps) {
    if (hidden % 16 || hidden > 16 * 1024) return -1;
    const int chunks = hidden / 16;
#pragma omp parallel for schedule(static) if (tokens > 4)
    for (long token = 0; token < tokens; token++) {
        __m512 x[1024];  /* the row, kept in fp32 between the two passes (up to 16,384 values) */
        __m512 squares = _mm512_setzero_ps();
        for (int c = 0; c < chunks; c++) {
            long at = token * hidden + 16 * c;
            __m512 value = load16(residual, at, bf16);
            if (delta) {
                value = rounded(_mm512_add_ps(value, load16(delta, at, bf16)), bf16);
                store16(residual_out, at, value, bf16);
            }
            x[c] = value;
            squares = _mm512_add_ps(squares, _mm512_mul_ps(value, value));
        }
        float variance = _mm512_reduce_add_ps(squares) / (float)hidden;
        __m512 inverse = _mm512_set1_ps(1.0f / sqrtf(variance + eps));
        for (int c = 0; c < chunks; c++) {
            __m512 scaled = rounded(_mm512_mul_ps(x[c], inverse), bf16);
            store16(normed, token * hidden + 16 * c, _mm512_mul_ps(load16(weight, 16 * c, bf16), scaled), bf16);
        }
    }
    return 0;
}

/* x * cos + rotate_half(x) * sin for one head of 16 * CHUNKS values, each product and the sum rounded to the
   tensors' dtype as the eager operators round them (no fused multiply-add). */
static inline __attribute__((always_inline)) void rotate(const int CHUNKS, int bf16, const void *x, long at,
                                                        const void *cos, const void *sin, long angle, __m512 *out) {
    const int half = CHUNKS / 2;
    for (int c = 0; c < CHUNKS; c++) {
        __m512 value = load16(x, at + 16 * c, bf16);
        __m512 partner = load16(x, at + 16 * (c < half ? c + half : c - half), bf16);
        if (c < half) partner = _mm512_sub_ps(_mm512_setzero_ps(), partner);
        __m512 first = rounded(_mm512_mul_ps(value, load16(cos, angle + 16 * c, bf16)), bf16);
        __m512 second = rounded(_mm512_mul_ps(partner, load16(sin, angle + 16 * c, bf16)), bf16);
        out[c] = rounded(_mm512_add_ps(first, second), bf16);
    }
}

/* One (row, key/value head): rotate and cache its new key, cache its new value (unless write_new is 0: written
   already), then its GROUPS query heads' attention over the LENGTH cached positions (the new one last). */
static inline __attribute__((always_inline)) void rope_attend_one(
        const int GROUPS, const int CHUNKS, const int BF16, int write_new, const void *query, long query_at,
        long query_head,
        const void *key, long key_at, const void *value, long value_at, const void *cos, const void *sin, long angle,
        void *key_cache, void *value_cache, long cache_at, long cache_position, const float *mask, void *out,
        long out_at, int length, float scale, float *scores) {
    __m512 q[GROUPS][CHUNKS], acc[GROUPS][CHUNKS], rotated[CHUNKS];
    if (write_new) {
        rotate(CHUNKS, BF16, key, key_at, cos, sin, angle, rotated);
        long last = cache_at + (long)(length - 1) * cache_position;
        for (int c = 0; c < CHUNKS; c++) {
            store16(key_cache, last + 16 * c, rotated[c], BF16);
            store16(value_cache, last + 16 * c, load16(value, value_at + 16 * c, BF16), BF16);
        }
    }
    for (int g = 0; g < GROUPS; g++) {
        rotate(CHUNKS, BF16, query, query_at + g * query_head, cos, sin, angle, rotated);
        for (int c = 0; c < CHUNKS; c++) q[g][c] = _mm512_mul_ps(rotated[c], _mm512_set1_ps(scale));
    }
    for (int j = 0; j < length; j++) {
        __m512 k[CHUNKS];
        for (int c = 0; c < CHUNKS; c++) k[c] = load16(key_cache, cache_at + j * cache_position + 16 * c, BF16);
        float bias = mask ? mask[j] : 0.0f;
        for (int g = 0; g < GROUPS; g++) {
            __m512 dot = _mm512_mul_ps(q[g][0], k[0]);
            for (int c = 1; c < CHUNKS; c++) dot = _mm512_fmadd_ps(q[g][c], k[c], dot);
            scores[g * length + j] = _mm512_reduce_add_ps(dot) + bias;
        }
    }
    float inverse[GROUPS];
    for (int g = 0; g < GROUPS; g++) {  /* softmax over the positions, in fp32 */
        float *row = scores + g * length;
        __m512 best = _mm512_set1_ps(-INFINITY), total = _mm512_setzero_ps();
        for (int j = 0; j < length; j += 16) {
            __mmask16 lanes = length - j >= 16 ? 0xffff : (__mmask16)((1u << (length - j)) - 1);
            best = _mm512_max_ps(best, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), lanes, row + j));
        }
        __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(best));
        for (int j = 0; j < length; j += 16) {
            __mmask16 lanes = length - j >= 16 ? 0xffff : (__mmask16)((1u << (length - j)) - 1);
            __m512 e = _mm512_maskz_mov_ps(lanes, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, row + j), top)));
            _mm512_mask_storeu_ps(row + j, lanes, e);
            total = _mm512_add_ps(total, e);
        }
        inverse[g] = 1.0f / _mm512_reduce_add_ps(total);
        for (int c = 0; c < CHUNKS; c++) acc[g][c] = _mm512_setzero_ps();
    }
    for (int j = 0; j < length; j++) {
        __m512 v[CHUNKS];
        for (int c = 0; c < CHUNKS; c++) v[c] = load16(value_cache, cache_at + j * cache_position + 16 * c, BF16);
        for (int g = 0; g < GROUPS; g++) {
            __m512 p = _mm512_set1_ps(scores[g * length + j]);
            for (int c = 0; c < CHUNKS; c++) acc[g][c] = _mm512_fmadd_ps(p, v[c], acc[g][c]);
        }
    }
    for (int g = 0; g < GROUPS; g++)
        for (int c = 0; c < CHUNKS; c++)
            store16(out, out_at + g * CHUNKS * 16 + 16 * c, _mm512_mul_ps(acc[g][c], _mm512_set1_ps(inverse[g])), BF16);
}

#define ROPE_ATTEND_CASE(G, C, B)                                                                                  \
    case (G) * 1000 + (C) * 10 + (B):                                                                              \
        rope_attend_one(G, C, B, write_new, query, query_at, query_strides[1], key, key_at, value, value_at,      \
                        cos, sin, angle, key_cache, value_cache, cache_at, cache_strides[2], mask_row, out, out_at,\
                        length, scale, scores);                                                                    \
        break;
#define ROPE_ATTEND_CASES(C, B)                                                                                    \
    ROPE_ATTEND_CASE(1, C, B) ROPE_ATTEND_CASE(2, C, B) ROPE_ATTEND_CASE(3, C, B) ROPE_ATTEND_CASE(4, C, B)        \
    ROPE_ATTEND_CASE(5, C, B) ROPE_ATTEND_CASE(6, C, B) ROPE_ATTEND_CASE(7, C, B) ROPE_ATTEND_CASE(8, C, B)

/* rows: one new token each. query (rows, heads, dim), key and value (rows, kv_heads, dim), each with its strides
   (elements; dim contiguous); cos and sin (rows, dim), rows `angle_row` apart; the caches from their window's first
   column, strides (row, head, position), `length` columns wide, the last one written here; mask: additive, fp32,
   (rows, length) rows `mask_row` apart, or NULL; out (rows, heads * dim), contiguous. */
/* Whether the attention kernels take these heads: head size 64 or 128, at most 8 query heads per key/value head. */
static int attention_takes(int heads, int kv_heads, int dim) {
    return kv_heads >= 1 && heads % kv_heads == 0 && heads / kv_heads <= 8 && (dim == 64 || dim == 128);
}

int rope_attend(int bf16, const void *query, const long *query_strides, const void *key, const long *key_strides,
                const void *value, const long *value_strides, const void *cos, const void *sin, long angle_row,
                void *key_cache, void *value_cache, const long *cache_strides, const float *mask,
                long mask_row_stride, void *out, int rows, int heads, int kv_heads, int length, int dim,
                float scale) {
    if (!attention_takes(heads, kv_heads, dim) || length < 1) return -1;
    int groups = heads / kv_heads, chunks = dim / 16;
#pragma omp parallel for schedule(static)
    for (long task = 0; task < (long)rows * kv_heads; task++) {
        long row = task / kv_heads, head = task % kv_heads;
        float *scores = malloc(sizeof(float) * (size_t)groups * (size_t)length);
        long query_at = row * query_strides[0] + head * groups * query_strides[1];
        long key_at = row * key_strides[0] + head * key_strides[1], angle = row * angle_row;
        long value_at = row * value_strides[0] + head * value_strides[1];
        long cache_at = row * cache_strides[0] + head * cache_strides[1];
        long out_at = row * (long)heads * dim + head * groups * dim;
        const float *mask_row = mask ? mask + row * mask_row_stride : NULL;
        const int write_new = 1;
        switch (groups * 1000 + chunks * 10 + (bf16 != 0)) {
            ROPE_ATTEND_CASES(4, 0) ROPE_ATTEND_CASES(4, 1) ROPE_ATTEND_CASES(8, 0) ROPE_ATTEND_CASES(8, 1)
        }
        free(scores);
    }
    return 0;
}

/* One prompt's tokens (a request joining the batch, prefilled inside a decode step): each token's key rotated and
   written with its value into the prompt's cache slot, position t for token t; then each token's attention over
   positions 0..t (causal), as rope_attend attends. query (tokens, heads, dim), key and value (tokens, kv_heads, dim)
   with their strides; cos and sin (tokens, dim) rows `angle_row` apart; the slot's caches from its first position,
   strides (unused, head, position); out (tokens, heads * dim), contiguous. */
int prefill_attend(int bf16, const void *query, const long *query_strides, const void *key,
                   const long *key_strides, const void *value, const long *value_strides, const void *cos,
                   const void *sin, long angle_row, void *key_cache, void *value_cache, const long *cache_strides,
                   void *out, int tokens, int heads, int kv_heads, int dim, float scale) {
    if (!attention_takes(heads, kv_heads, dim) || tokens < 1) return -1;
    int groups = heads / kv_heads, chunks = dim / 16;
#pragma omp parallel for schedule(static)
    for (long task = 0; task < (long)tokens * kv_heads; task++) {
        long token = task / kv_heads, head = task % kv_heads;
        long key_at = token * key_strides[0] + head * key_strides[1];
        long value_at = token * value_strides[0] + head * value_strides[1];
        long slot_at = head * cache_strides[1] + token * cache_strides[2];
        __m512 rotated[8];
        if (chunks == 4) rotate(4, bf16, key, key_at, cos, sin, token * angle_row, rotated);
        else rotate(8, bf16, key, key_at, cos, sin, token * angle_row, rotated);
        for (int c = 0; c < chunks; c++) {
            store16(key_cache, slot_at + 16 * c, rotated[c], bf16);
            store16(value_cache, slot_at + 16 * c, load16(value, value_at + 16 * c, bf16), bf16);
        }
    }
#pragma omp parallel for schedule(dynamic, 1)
    for (long task = 0; task < (long)tokens * kv_heads; task++) {
        long token = task / kv_heads, head = task % kv_heads;
        int length = (int)token + 1;
        float *scores = malloc(sizeof(float) * (size_t)groups * (size_t)length);
        long query_at = token * query_strides[0] + head * groups * query_strides[1];
        long key_at = 0, value_at = 0, angle = token * angle_row;
        long cache_at = head * cache_strides[1];
        long out_at = token * (long)heads * dim + head * groups * dim;
        const float *mask_row = NULL;
        const int write_new = 0;
        switch (groups * 1000 + chunks * 10 + (bf16 != 0)) {
            ROPE_ATTEND_CASES(4, 0) ROPE_ATTEND_CASES(4, 1) ROPE_ATTEND_CASES(8, 0) ROPE_ATTEND_CASES(8, 1)
        }
        free(scores);
    }
    return 0;
}

/* out = silu(gate) * up, each rounded to the tensors' dtype as the eager operators round: silu(x) = x / (1 + exp(-x)).
   gate and up: (tokens, width) rows `gate_row` / `up_row` apart, out contiguous; `width` a multiple of 16. */
int silu_mul(int bf16, const void *gate, long gate_row, const void *up, long up_row, void *out, int tokens,
             int width) {
    if (width % 16) return -1;
#pragma omp parallel for schedule(static) if (tokens > 4)
    for (long token = 0; token < tokens; token++) {
        for (int c = 0; c < width / 16; c++) {
            __m512 x = load16(gate, token * gate_row + 16 * c, bf16);
            __m512 activated = _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f),
                                                               exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
            activated = rounded(activated, bf16);
            __m512 product = _mm512_mul_ps(activated, load16(up, token * up_row + 16 * c, bf16));
            store16(out, token * (long)width + 16 * c, product, bf16);
        }
    }
    return 0;
}
