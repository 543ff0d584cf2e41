/* One batch-1 decode step of a GPT-2 in fp32, in one OpenMP parallel region (see tinyllm/fused_decode.py).

   At batch 1 a step reads every weight once, so its speed is how close it streams them to the memory
   bandwidth. Here each thread streams one contiguous run of rows per matrix (one dot product per row, two
   accumulators), computes the LayerNorms it needs itself (768 floats: cheaper than a barrier), and meets the
   other threads at 5 barriers a layer: after q/k/v, attention, the attention projection, the MLP's first
   linear and its second. Plain C with GCC vector extensions (16 floats): the compiler emits AVX-512, AVX2 or
   NEON for the machine it is built on (-march=native).

   Shapes: C channels, H heads, D head size, S cache positions, V vocabulary, L layers, T threads.
*/
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

typedef float vf __attribute__((vector_size(64), aligned(4))); /* 16 floats; unaligned loads are fine */
typedef float vf8 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));

enum { W_WTE, W_WPE, W_LNF_W, W_LNF_B, W_HEAD, W_GLOBAL };
enum { W_LN1_W, W_LN1_B, W_ATTN_W, W_ATTN_B, W_APROJ_W, W_APROJ_B, W_LN2_W, W_LN2_B, W_FC_W, W_FC_B,
       W_MPROJ_W, W_MPROJ_B, W_PER_LAYER };
enum { D_LAYERS, D_HEADS, D_EMBD, D_VOCAB, D_POSITIONS, D_COUNT };
#define MAX_THREADS 256

static inline vf load(const float *p) { return *(const vf *)p; }

static inline float hsum(vf a) {
    vf8 lo, hi;
    memcpy(&lo, &a, 32);
    memcpy(&hi, (const char *)&a + 32, 32);
    vf8 s8 = lo + hi;
    vf4 a4, b4;
    memcpy(&a4, &s8, 16);
    memcpy(&b4, (const char *)&s8 + 16, 16);
    vf4 s4 = a4 + b4;
    return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

static inline float dot(const float *w, const float *x, int64_t n) {
    vf a = {0}, b = {0};
    int64_t k = 0;
    for (; k + 32 <= n; k += 32) {
        a += load(w + k) * load(x + k);
        b += load(w + k + 16) * load(x + k + 16);
    }
    float s = hsum(a + b);
    for (; k < n; k++) s += w[k] * x[k];
    return s;
}

/* Rows [lo, hi) of n for thread t of T: contiguous runs, so each thread streams one run of each matrix. */
static inline void share(int64_t n, int t, int T, int64_t *lo, int64_t *hi) {
    int64_t per = (n + T - 1) / T;
    *lo = t * per < n ? t * per : n;
    *hi = *lo + per < n ? *lo + per : n;
}

static void layer_norm(float *out, const float *x, const float *w, const float *b, int64_t C, float eps) {
    float mean = 0.0f, var = 0.0f;
    for (int64_t i = 0; i < C; i++) mean += x[i];
    mean /= (float)C;
    for (int64_t i = 0; i < C; i++) var += (x[i] - mean) * (x[i] - mean);
    float rstd = 1.0f / sqrtf(var / (float)C + eps);
    for (int64_t i = 0; i < C; i++) out[i] = (x[i] - mean) * rstd * w[i] + (b ? b[i] : 0.0f);
}

/* GPT-2's GELU, tanh approximation, with tanh(u) = 1 - 2 / (exp(2u) + 1) (exact at the limits) */
static inline float gelu(float u) {
    float z = 0.7978845608028654f * (u + 0.044715f * u * u * u);
    return 0.5f * u * (1.0f + (1.0f - 2.0f / (expf(2.0f * z) + 1.0f)));
}

/* Token `token` at position `pos` of one sequence; returns the argmax of the logits (V,) it writes.
   dims: L, H, C, V, S. weights: W_GLOBAL pointers then W_PER_LAYER per layer (a missing bias is NULL).
   kv: L pairs (keys, values), each (H, S, D) contiguous. scratch: 9C + T (C + S) floats. */
int64_t tinyllm_decode_step(const int64_t *dims, const float *const *weights, float *const *kv, float *scratch,
                            float *logits, int64_t token, int64_t pos, float eps, int threads) {
    const int64_t L = dims[D_LAYERS], H = dims[D_HEADS], C = dims[D_EMBD], V = dims[D_VOCAB];
    const int64_t S = dims[D_POSITIONS], D = C / H, n = pos + 1;
    const float scale = 1.0f / sqrtf((float)D);
    float *x = scratch, *qkv = x + C, *y = qkv + 3 * C, *f = y + C, *per_thread = f + 4 * C;
    float best_value[MAX_THREADS];
    int64_t best_index[MAX_THREADS];
    int used = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads < 1) threads = 1;

    const float *wte = weights[W_WTE], *wpe = weights[W_WPE];
    for (int64_t i = 0; i < C; i++) x[i] = wte[token * C + i] + wpe[pos * C + i];

#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
        float *h = per_thread + t * (C + S), *scores = h + C;
        int64_t lo, hi;
        for (int64_t l = 0; l < L; l++) {
            const float *const *w = weights + W_GLOBAL + l * W_PER_LAYER;
            float *k_cache = kv[2 * l], *v_cache = kv[2 * l + 1];
            /* q, k, v; k and v go straight to the cache at `pos` */
            layer_norm(h, x, w[W_LN1_W], w[W_LN1_B], C, eps);
            share(3 * C, t, T, &lo, &hi);
            for (int64_t r = lo; r < hi; r++) {
                float value = dot(w[W_ATTN_W] + r * C, h, C) + (w[W_ATTN_B] ? w[W_ATTN_B][r] : 0.0f);
                if (r < C) {
                    qkv[r] = value;
                } else {
                    int64_t c = r % C;
                    float *cache = r < 2 * C ? k_cache : v_cache;
                    cache[(c / D) * S * D + pos * D + c % D] = value;
                }
            }
#pragma omp barrier
            /* attention, heads shared out: softmax(q k^T / sqrt(D)) v over positions 0..pos */
            share(H, t, T, &lo, &hi);
            for (int64_t hd = lo; hd < hi; hd++) {
                const float *q = qkv + hd * D, *keys = k_cache + hd * S * D, *values = v_cache + hd * S * D;
                float top = -INFINITY, total = 0.0f, *out = y + hd * D;
                for (int64_t s = 0; s < n; s++) {
                    scores[s] = dot(q, keys + s * D, D) * scale;
                    top = scores[s] > top ? scores[s] : top;
                }
                for (int64_t d = 0; d < D; d++) out[d] = 0.0f;
                for (int64_t s = 0; s < n; s++) {
                    float p = expf(scores[s] - top);
                    total += p;
                    for (int64_t d = 0; d < D; d++) out[d] += p * values[s * D + d];
                }
                for (int64_t d = 0; d < D; d++) out[d] /= total;
            }
#pragma omp barrier
            share(C, t, T, &lo, &hi);
            for (int64_t r = lo; r < hi; r++)
                x[r] += dot(w[W_APROJ_W] + r * C, y, C) + (w[W_APROJ_B] ? w[W_APROJ_B][r] : 0.0f);
#pragma omp barrier
            layer_norm(h, x, w[W_LN2_W], w[W_LN2_B], C, eps);
            share(4 * C, t, T, &lo, &hi);
            for (int64_t r = lo; r < hi; r++)
                f[r] = gelu(dot(w[W_FC_W] + r * C, h, C) + (w[W_FC_B] ? w[W_FC_B][r] : 0.0f));
#pragma omp barrier
            share(C, t, T, &lo, &hi);
            for (int64_t r = lo; r < hi; r++)
                x[r] += dot(w[W_MPROJ_W] + r * 4 * C, f, 4 * C) + (w[W_MPROJ_B] ? w[W_MPROJ_B][r] : 0.0f);
#pragma omp barrier
        }
        /* final LayerNorm and the head; each thread's first largest logit, then the first of those */
        layer_norm(h, x, weights[W_LNF_W], weights[W_LNF_B], C, eps);
        share(V, t, T, &lo, &hi);
        float top = -INFINITY;
        int64_t at = lo;
        for (int64_t r = lo; r < hi; r++) {
            float value = logits[r] = dot(weights[W_HEAD] + r * C, h, C);
            if (value > top || value != value) { /* NaN counts as the largest, as torch.argmax */
                if (top != top) continue;
                top = value;
                at = r;
            }
        }
        best_value[t] = top;
        best_index[t] = at;
        if (t == 0) used = T;
    }
    int64_t at = best_index[0];
    float top = best_value[0];
    for (int i = 1; i < used; i++) {
        if (top != top) break;
        if (best_value[i] > top || best_value[i] != best_value[i]) {
            top = best_value[i];
            at = best_index[i];
        }
    }
    return at;
}
