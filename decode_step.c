/* decode_step.c: one decoder block of a one-token decode step, in one call and one parallel region, for every
   family mumoe runs (decode_step.py describes each block to it). A step in eager PyTorch spends more time between
   its products than in them: some sixty small ops a block, each a few microseconds, and each product's own call
   and thread wake-up. Here the block is a handful of phases over torch's OpenMP threads, a barrier between them:

       xn = norm1(x)                                          one thread (d floats)
       qkv = xn [Wq; Wk; Wv]^T + b                            the products, rows over the threads, no barrier between
       q, k = norm(q), norm(k) per head (Qwen3, Gemma 3)      per head; then RoPE on the first rotary_dim features
       q, k turned by RoPE; k, v into the cache at `pos`      (rotate-half: feature i pairs with i + rotary_dim/2)
       a_h = softmax(scale · q_h K_g^T) V_g                   per query head h, its key/value head g (GQA), over
                                                              the keys the window lets it see
       x += post1(a Wo^T + b)                                  post1: Gemma 3's norm after attention, else none
       xn = norm2(x); h = act(xn Wg^T) · (xn Wu^T)             LLaMA's gated MLP, or act(xn W1^T + b) (OPT)
       x += post2(h Wd^T + b)

   A product reads packed experts (packed_experts.c's packed_rows) or a dense W (streamed_rows): the same loops, so
   each product's digits are those of packed_linear / streamed_linear. The norms, softmax and RoPE sum in another
   order than torch does: the logits agree with the eager step's to ~1e-6 (tests/test_decode_step.py). This file
   includes packed_experts.c: one library, one translation unit, the product loops shared. */

#include "packed_experts.c"

enum { RMS_NORM = 0, LAYER_NORM = 1 };
enum { SILU = 0, RELU = 1, GELU = 2, GELU_TANH = 3 };

typedef struct {  /* one Linear of the step: packed experts (bits not NULL) or a dense W (d_out, d_in) */
    const uint16_t *bits;
    const float *values;
    const int64_t *starts;
    const float *W;
    const float *bias;
    int64_t d_out, d_in;  /* d_out 0: absent (Phi-3's fused q/k/v and gate/up fill the first of their parts) */
} linear_t;

typedef struct {  /* one block, as decode_step.py's Block mirrors it field for field */
    int64_t d, n_head, n_kv, head_dim, rotary_dim, ffn, capacity, window;  /* window 0: every earlier key */
    int64_t norm, activation, gated;
    double eps, scale;                         /* the norms' epsilon; the factor of q before q k^T */
    const float *norm1_w, *norm1_b;            /* before attention (a bias: LayerNorm's; NULL weight: none) */
    const float *norm2_w, *norm2_b;            /* before the MLP */
    const float *post1_w, *post2_w;            /* Gemma 3: RMSNorms of the attention's and the MLP's outputs */
    const float *q_norm_w, *k_norm_w;          /* Qwen3, Gemma 3: RMSNorms over each head's features */
    const float *cos, *sin;                    /* (rotary_dim,) at this step's position, filled by the caller */
    float *k_cache, *v_cache;                  /* (n_kv, capacity, head_dim) */
    linear_t qkv[3], o, up[2], down;           /* up: [gate, up] (gated) or [fc1] */
} block_t;

static void norm(const float *x, int64_t d, int64_t kind, double eps, const float *w, const float *b, float *out) {
    float mean = 0.0f, var = 0.0f;
    if (kind == LAYER_NORM) {
        for (int64_t i = 0; i < d; i++) mean += x[i];
        mean /= (float)d;
    }
    for (int64_t i = 0; i < d; i++) var += (x[i] - mean) * (x[i] - mean);
    float inv = 1.0f / sqrtf(var / (float)d + (float)eps);
    for (int64_t i = 0; i < d; i++) out[i] = (x[i] - mean) * inv * (w ? w[i] : 1.0f) + (b ? b[i] : 0.0f);
}

static inline float activate(float v, int64_t kind) {
    switch (kind) {
    case SILU: return v / (1.0f + expf(-v));
    case RELU: return v > 0.0f ? v : 0.0f;
    case GELU: return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    default: return 0.5f * v * (1.0f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
    }
}

static void product(const linear_t *L, const float *x, float *y) {
    if (L->d_out == 0) return;
    if (L->bits) packed_rows(x, 1, L->d_in, L->bits, L->values, L->starts, L->bias, y, L->d_out);
    else streamed_rows(x, 1, L->d_in, L->W, L->bias, y, L->d_out);
}

static float dot(const float *a, const float *b, int64_t n) {
    vec acc = zero();
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES) acc = fma(load_x(a + j, LANES), load_x(b + j, LANES), acc);
    float s = hsum(acc);
    for (; j < n; j++) s += a[j] * b[j];
    return s;
}

static void rotate(float *v, const float *cos, const float *sin, int64_t rd) {  /* rotate-half, the first rd */
    int64_t half = rd / 2;
    for (int64_t i = 0; i < half; i++) {
        float a = v[i], b = v[i + half];
        v[i] = a * cos[i] - b * sin[i];
        v[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

/* x (d,) leaves the block; `pos`: this token's position, the keys cached before it 0 ... pos - 1; `scratch`:
   decode_step.py's, (d + (n_head + 2 n_kv) head_dim + n_head head_dim + d + 2 ffn + n_head capacity) floats */
void decode_block(const block_t *B, float *x, int64_t pos, float *scratch, int threads) {
    int64_t d = B->d, hs = B->head_dim, nh = B->n_head, nkv = B->n_kv, group = nh / nkv;
    float *xn = scratch, *qkv = xn + d, *att = qkv + (nh + 2 * nkv) * hs, *out = att + nh * hs, *h = out + d;
    float *scores = h + 2 * B->ffn;
    float *q = qkv;
    int64_t first = B->window > 0 && pos - B->window + 1 > 0 ? pos - B->window + 1 : 0;  /* the first key seen */

    #pragma omp parallel num_threads(threads)
    {
        #pragma omp single
        norm(x, d, B->norm, B->eps, B->norm1_w, B->norm1_b, xn);
        for (int p = 0, at = 0; p < 3; at += B->qkv[p].d_out, p++) product(&B->qkv[p], xn, qkv + at);
        #pragma omp barrier
        #pragma omp for schedule(static)
        for (int64_t u = 0; u < nh + 2 * nkv; u++) {  /* the heads of q, of k, of v */
            float *head = qkv + u * hs;
            if (u < nh + nkv) {
                const float *w = u < nh ? B->q_norm_w : B->k_norm_w;
                if (w) norm(head, hs, RMS_NORM, B->eps, w, NULL, head);
                if (B->rotary_dim) rotate(head, B->cos, B->sin, B->rotary_dim);
                if (u < nh)
                    for (int64_t i = 0; i < hs; i++) head[i] *= (float)B->scale;
                else
                    memcpy(B->k_cache + ((u - nh) * B->capacity + pos) * hs, head, hs * sizeof(float));
            } else
                memcpy(B->v_cache + ((u - nh - nkv) * B->capacity + pos) * hs, head, hs * sizeof(float));
        }
        #pragma omp for schedule(static)
        for (int64_t hd = 0; hd < nh; hd++) {
            int64_t g = hd / group;  /* the key/value head this query head reads */
            const float *K = B->k_cache + g * B->capacity * hs, *V = B->v_cache + g * B->capacity * hs;
            float *s = scores + hd * B->capacity, *a = att + hd * hs, top = -INFINITY, sum = 0.0f;
            for (int64_t j = first; j <= pos; j++) {
                s[j] = dot(q + hd * hs, K + j * hs, hs);
                top = s[j] > top ? s[j] : top;
            }
            for (int64_t j = first; j <= pos; j++) sum += (s[j] = expf(s[j] - top));
            for (int64_t i = 0; i < hs; i++) a[i] = 0.0f;
            for (int64_t j = first; j <= pos; j++) {
                float p = s[j] / sum;
                for (int64_t i = 0; i < hs; i++) a[i] += p * V[j * hs + i];
            }
        }
        product(&B->o, att, out);
        #pragma omp barrier
        #pragma omp single
        {
            if (B->post1_w) norm(out, d, RMS_NORM, B->eps, B->post1_w, NULL, out);
            for (int64_t i = 0; i < d; i++) x[i] += out[i];
            norm(x, d, B->norm, B->eps, B->norm2_w, B->norm2_b, xn);
        }
        for (int p = 0, at = 0; p < 2; at += B->up[p].d_out, p++) product(&B->up[p], xn, h + at);
        #pragma omp barrier
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < B->ffn; i++)
            h[i] = B->gated ? activate(h[i], B->activation) * h[B->ffn + i] : activate(h[i], B->activation);
        product(&B->down, h, out);
        #pragma omp barrier
        #pragma omp single nowait
        {
            if (B->post2_w) norm(out, d, RMS_NORM, B->eps, B->post2_w, NULL, out);
            for (int64_t i = 0; i < d; i++) x[i] += out[i];
        }
    }
}
