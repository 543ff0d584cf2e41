/* One batch-1 decode step of a GPT-2 in fp32, in one OpenMP parallel region (see tinyllm/fused_decode.py).

   At batch 1 a step reads every weight once, so its speed is how close it streams them to the memory
   bandwidth. Here each thread streams one contiguous run of rows per matrix (one dot product per row, two
   accumulators), computes the LayerNorms it needs itself (768 floats: cheaper than a barrier), and meets the
   other threads at 5 barriers a layer: after q/k/v, attention, the attention projection, the MLP's first
   linear and its second. A thread that finishes its run early takes half of what is left of another's from its
   end (work stealing), so a thread slowed by the memory system does not keep the others waiting at the barrier.
   Plain C with GCC vector extensions (8 floats in the dot products, 16 elsewhere): the compiler emits AVX-512,
   AVX2 or NEON for the machine it is built on (-march=native).

   Shapes: C channels, H heads, D head size, S cache positions, V vocabulary, L layers, T threads.
*/
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float vf __attribute__((vector_size(64), aligned(4))); /* 16 floats; unaligned loads are fine */
typedef float vf8 __attribute__((vector_size(32)));
typedef float vh __attribute__((vector_size(32), aligned(4))); /* 8 floats, for loads */
typedef float vf4 __attribute__((vector_size(16)));

enum { W_WTE, W_WPE, W_LNF_W, W_LNF_B, W_HEAD, W_GLOBAL };
enum { W_LN1_W, W_LN1_B, W_ATTN_W, W_ATTN_B, W_APROJ_W, W_APROJ_B, W_LN2_W, W_LN2_B, W_FC_W, W_FC_B,
       W_MPROJ_W, W_MPROJ_B, W_PER_LAYER };
enum { D_LAYERS, D_HEADS, D_EMBD, D_VOCAB, D_POSITIONS, D_COUNT };
#define MAX_THREADS 256
#define CHUNK_FLOATS 16384 /* the fewest rows taken at a time: 64 KB of weights */

/* Rows [front, back) of one thread's run still to do, in one word: the owner takes from the front, others
   from the back, both by compare-and-swap. One cache line each. */
typedef struct {
    _Alignas(64) uint64_t rows;
    char pad[56];
} run_t;

static inline void run_set(run_t *r, int64_t lo, int64_t hi) {
    __atomic_store_n(&r->rows, ((uint64_t)hi << 32) | (uint64_t)lo, __ATOMIC_RELAXED);
}

/* Take rows from the front (owner: a quarter of what is left) or the back (thief: half of what is left) of a
   run, between `chunk` and 16 chunks; 0 when it is empty. The owner's pieces are large while its run is, so few
   compare-and-swaps (each a locked instruction, which waits for the thread's loads in flight) interrupt its
   stream (measured: +2-3% of the roofline at ~60 GB/s over 64 KB pieces); they shrink as the run does, so a
   thief can even out the end. A thief's pieces are halves so that it takes few: each starts a new stream away
   from its last, which the prefetchers must pick up again (measured: +1.6-1.9 points over 64 KB pieces, at ~33
   and ~60 GB/s). At most 1 MB of rows is held by a thread the OS deschedules. */
static inline int run_take(run_t *r, int64_t chunk, int from_back, int64_t *s, int64_t *e) {
    uint64_t cur = __atomic_load_n(&r->rows, __ATOMIC_RELAXED), next;
    for (;;) {
        int64_t front = (int64_t)(cur & 0xffffffffu), back = (int64_t)(cur >> 32);
        if (front >= back) return 0;
        if (from_back) {
            int64_t take = (back - front) / 2 > chunk ? (back - front) / 2 : chunk;
            take = take < 16 * chunk ? take : 16 * chunk;
            *e = back;
            *s = back - take > front ? back - take : front;
            next = ((uint64_t)*s << 32) | (uint64_t)front;
        } else {
            int64_t take = (back - front) / 4 > chunk ? (back - front) / 4 : chunk;
            take = take < 16 * chunk ? take : 16 * chunk;
            *s = front;
            *e = front + take < back ? front + take : back;
            next = ((uint64_t)back << 32) | (uint64_t)*e;
        }
        if (__atomic_compare_exchange_n(&r->rows, &cur, next, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) return 1;
    }
}

/* Whether logit `v` at `i` beats the best so far: larger, or equal at a smaller index; NaN beats numbers (as
   torch.argmax: the first NaN, else the first largest) */
static inline int better(float v, int64_t i, float top, int64_t at) {
    if (v != v) return top == top || i < at;
    if (top != top) return 0;
    return v > top || (v == top && i < at);
}

static inline vf load(const float *p) { return *(const vf *)p; }
static inline vh load8(const float *p) { return *(const vh *)p; }

static inline float hsum8(vh a) {
    vf4 lo, hi;
    memcpy(&lo, &a, 16);
    memcpy(&hi, (const char *)&a + 16, 16);
    vf4 s4 = lo + hi;
    return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

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

/* The dot products that stream the weights load 8 floats (256 bits) at a time, not 16: on Zen 4, which splits a
   512-bit load in two, a 2-thread read of 512 MB in 256-bit loads kept up with torch's `sum` at ~60 GB/s and in
   512-bit loads reached 92% of it (both at ~33 GB/s); the step: +2.0 / +2.7 points of the roofline at ~60 GB/s. */
static inline float dot(const float *w, const float *x, int64_t n) {
    vh a = {0}, b = {0};
    int64_t k = 0;
    for (; k + 16 <= n; k += 16) {
        a += load8(w + k) * load8(x + k);
        b += load8(w + k + 8) * load8(x + k + 8);
    }
    float s = hsum8(a + b);
    for (; k < n; k++) s += w[k] * x[k];
    return s;
}

/* Rows [lo, hi) of n for thread t of T: contiguous runs, so each thread streams one run of each matrix. */
static inline void share(int64_t n, int t, int T, int64_t *lo, int64_t *hi) {
    int64_t per = (n + T - 1) / T;
    *lo = t * per < n ? t * per : n;
    *hi = *lo + per < n ? *lo + per : n;
}

/* Sum of n floats, 16 lanes at a time (a scalar loop would wait on each add: the compiler may not reorder it) */
static inline float sum(const float *x, int64_t n) {
    vf a = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) a += load(x + i);
    float s = hsum(a);
    for (; i < n; i++) s += x[i];
    return s;
}

static void layer_norm(float *out, const float *x, const float *w, const float *b, int64_t C, float eps) {
    const float mean = sum(x, C) / (float)C;
    for (int64_t i = 0; i < C; i++) out[i] = x[i] - mean;
    float var = 0.0f;
    vf a = {0};
    int64_t i = 0;
    for (; i + 16 <= C; i += 16) a += load(out + i) * load(out + i);
    var = hsum(a);
    for (; i < C; i++) var += out[i] * out[i];
    const float rstd = 1.0f / sqrtf(var / (float)C + eps);
    for (i = 0; i < C; i++) out[i] = out[i] * rstd * w[i] + (b ? b[i] : 0.0f);
}

typedef int32_t vi __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));

static inline vf vselect(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }

/* exp of 16 floats: 2^n e^r with |r| <= ln2/2 and a degree-6 polynomial (within 4 ulp); 0 below -87, inputs
   above 88 taken as 88, NaN kept */
static inline vf vexp(vf x) {
    const vf lo = (vf){0} - 87.0f, hi = (vf){0} + 88.0f, shifter = (vf){0} + 12582912.0f; /* 1.5 * 2^23 */
    const vi underflow = x < lo, nan = x != x;
    x = vselect(underflow | nan, lo, x);
    x = vselect(x > hi, hi, x);
    vf n = (x * 1.44269504088896341f + shifter) - shifter; /* round(x / ln2) */
    vf r = x - n * 0.693359375f - n * -2.12194440e-4f;      /* x - n ln2, in two parts */
    vf p = (vf){0} + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    vu bits = (vu)(__builtin_convertvector(n, vi) + 127) << 23; /* 2^n, n in [-126, 127] */
    return vselect(nan, (vf){0} + NAN, vselect(underflow, (vf){0}, p * (vf)bits));
}

/* GPT-2's GELU, tanh approximation, on 16 floats: 0.5 u (1 + tanh(z)) = u e / (e + 1) with e = exp(2z) (no
   cancellation where tanh(z) is near -1; e is at most exp(88), so e / (e + 1) is 1 where z is large) */
static inline vf vgelu(vf u) {
    vf z = 0.7978845608028654f * (u + 0.044715f * u * u * u);
    vf e = vexp(2.0f * z);
    return u * (e / (e + 1.0f));
}

enum { P_QKV, P_ATTN, P_APROJ, P_FC, P_MPROJ, P_HEAD };

typedef struct {
    int64_t L, H, C, D, S, V, pos, n;
    float scale;
    const float *const *weights;
    float *const *kv;
    float *x, *q, *y, *f, *d, *logits;
} step_t;

/* The residual stream after layer l - 1 (the embeddings at l == 0) into `z`: x plus the MLP's output, whose
   4 partial sums per row wait in d (see P_MPROJ); the same values in every thread (each computes it for itself,
   like its LayerNorms: cheaper than a phase), written to x by the next attention projection. */
static void residual(const step_t *st, int64_t l, float *z) {
    const int64_t C = st->C;
    if (l == 0) {
        memcpy(z, st->x, (size_t)C * sizeof(float));
        return;
    }
    const float *bias = st->weights[W_GLOBAL + (l - 1) * W_PER_LAYER + W_MPROJ_B], *d = st->d;
    for (int64_t r = 0; r < C; r++)
        z[r] = st->x[r] + ((((d[r] + d[C + r]) + d[2 * C + r]) + d[3 * C + r]) + (bias ? bias[r] : 0.0f));
}

/* One head's attention for one query: out (D) = softmax(q keys^T scale) values over positions 0 .. n-1, keys and
   values (n, D) contiguous; `scores` n floats of scratch. Not inlined, so that its code does not move the
   matrix loops'; at head size 64 the weighted sum of the values stays in 4 registers (the same sums in the same
   order). Together +0.5 points of the roofline at ~60 GB/s (58 rounds), +0.9 / +0.5 at ~33 (ab_decode_step.py;
   the registers alone, inlined, had measured 3-4.5 points slower). */
__attribute__((noinline)) static void attend(const float *q, const float *keys, const float *values, int64_t n,
                                             int64_t D, float scale, float *scores, float *out) {
    float most = -INFINITY, total = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        scores[i] = dot(q, keys + i * D, D) * scale;
        most = scores[i] > most ? scores[i] : most;
    }
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) { /* scores -> exp(score - max), 16 at a time */
        vf p = vexp(load(scores + i) - most);
        memcpy(scores + i, &p, sizeof p);
        total += hsum(p);
    }
    for (; i < n; i++) total += scores[i] = expf(scores[i] - most);
    if (D == 64) { /* the weighted sum in 4 registers: the same sums, in the same order */
        vf o0 = {0}, o1 = {0}, o2 = {0}, o3 = {0};
        for (i = 0; i < n; i++) {
            const float p = scores[i], *v = values + i * 64;
            o0 += p * load(v), o1 += p * load(v + 16), o2 += p * load(v + 32), o3 += p * load(v + 48);
        }
        o0 /= total, o1 /= total, o2 /= total, o3 /= total;
        memcpy(out, &o0, 64), memcpy(out + 16, &o1, 64), memcpy(out + 32, &o2, 64), memcpy(out + 48, &o3, 64);
        return;
    }
    for (int64_t d = 0; d < D; d++) out[d] = 0.0f;
    for (i = 0; i < n; i++)
        for (int64_t d = 0; d < D; d++) out[d] += scores[i] * values[i * D + d];
    for (int64_t d = 0; d < D; d++) out[d] /= total;
}

/* Rows [s, e) of phase `phase` of layer `l` (heads, for attention); `h` the thread's LayerNorm output, `z` its
   copy of the residual stream before this layer (`residual`), `scores` its attention scratch; the head keeps
   the thread's best logit in top/at. */
static void rows(const step_t *st, int phase, int64_t l, int64_t s, int64_t e, const float *h, const float *z,
                 float *scores, float *top, int64_t *at) {
    const int64_t C = st->C, D = st->D, S = st->S, pos = st->pos;
    /* the layer's weights and cache (none for the head, where l == L) */
    const float *const *w = l < st->L ? st->weights + W_GLOBAL + l * W_PER_LAYER : NULL;
    float *k_cache = phase <= P_ATTN ? st->kv[2 * l] : NULL, *v_cache = phase <= P_ATTN ? st->kv[2 * l + 1] : NULL;
    switch (phase) {
    case P_QKV: /* q, k, v; k and v go straight to the cache at `pos` */
        for (int64_t r = s; r < e; r++) {
            float value = dot(w[W_ATTN_W] + r * C, h, C) + (w[W_ATTN_B] ? w[W_ATTN_B][r] : 0.0f);
            if (r < C) {
                st->q[r] = value;
            } else {
                int64_t c = r % C;
                float *cache = r < 2 * C ? k_cache : v_cache;
                cache[(c / D) * S * D + pos * D + c % D] = value;
            }
        }
        break;
    case P_ATTN: /* softmax(q k^T / sqrt(D)) v over positions 0..pos, one head at a time */
        for (int64_t hd = s; hd < e; hd++)
            attend(st->q + hd * D, k_cache + hd * S * D, v_cache + hd * S * D, st->n, D, st->scale, scores,
                   st->y + hd * D);
        break;
    case P_APROJ: /* x, with the last layer's MLP output settled (z), plus the attention's projection */
        for (int64_t r = s; r < e; r++)
            st->x[r] = z[r] + (dot(w[W_APROJ_W] + r * C, st->y, C) + (w[W_APROJ_B] ? w[W_APROJ_B][r] : 0.0f));
        break;
    case P_FC: /* 16 rows' sums, then their GELU at once */
        for (int64_t r0 = s; r0 < e; r0 += 16) {
            const int64_t m = e - r0 < 16 ? e - r0 : 16;
            float sums[16] = {0};
            for (int64_t i = 0; i < m; i++)
                sums[i] = dot(w[W_FC_W] + (r0 + i) * C, h, C) + (w[W_FC_B] ? w[W_FC_B][r0 + i] : 0.0f);
            vf g = vgelu(load(sums));
            memcpy(st->f + r0, &g, (size_t)m * sizeof(float));
        }
        break;
    case P_MPROJ: /* the weight (C, 4C) in 4 column blocks, (4, C, C) (see tinyllm_decode_step), read as 4C rows
                     of C: row u of block b = u / C is C of the 4C products of output u % C; `residual` sums
                     each output's 4 in block order. A stretch of rows multiplies C floats of f, not all 4C */
        for (int64_t u = s; u < e; u++) st->d[u] = dot(w[W_MPROJ_W] + u * C, st->f + u / C * C, C);
        break;
    case P_HEAD:
        for (int64_t r = s; r < e; r++) {
            float value = st->logits[r] = dot(st->weights[W_HEAD] + r * C, h, C);
            if (better(value, r, *top, *at)) {
                *top = value;
                *at = r;
            }
        }
        break;
    }
}

/* Rows (or heads) a phase has, and how many a thread takes at a time. */
static void phase_size(const step_t *st, int phase, int64_t *count, int64_t *chunk) {
    static const int64_t rows_per_c[] = {3, 0, 1, 4, 4, 0};
    if (phase == P_ATTN) {
        *count = st->H, *chunk = 1;
    } else {
        *count = phase == P_HEAD ? st->V : rows_per_c[phase] * st->C;
        *chunk = CHUNK_FLOATS / st->C > 1 ? CHUNK_FLOATS / st->C : 1; /* every matrix has rows of C */
    }
}

/* Token `token` at position `pos` of one sequence; returns the argmax of the logits (V,) it writes.
   dims: L, H, C, V, S. weights: W_GLOBAL pointers then W_PER_LAYER per layer (a missing bias is NULL); the MLP's
   second weight (C, 4C) in column blocks, (4, C, C): block b holds columns b C .. (b + 1) C. Read as rows of
   4C, each row multiplies all 4C floats of the MLP's activations, 12 KB for GPT-2, which L1 cannot keep among
   the streamed weights: that matrix streamed ~5% slower than the others at ~60 GB/s (measured); as rows of C
   from one block a stretch multiplies C of them.
   kv: L pairs (keys, values), each (H, S, D) contiguous. scratch: 16 + 32 T + 13 C + T (2 C + S) floats. */
int64_t tinyllm_decode_step(const int64_t *dims, const float *const *weights, float *const *kv, float *scratch,
                            float *logits, int64_t token, int64_t pos, float eps, int threads) {
    step_t st;
    st.L = dims[D_LAYERS], st.H = dims[D_HEADS], st.C = dims[D_EMBD], st.V = dims[D_VOCAB];
    st.S = dims[D_POSITIONS], st.D = st.C / st.H, st.pos = pos, st.n = pos + 1;
    st.scale = 1.0f / sqrtf((float)st.D);
    st.weights = weights, st.kv = kv, st.logits = logits;
    const int64_t C = st.C;
    float best_value[MAX_THREADS];
    int64_t best_index[MAX_THREADS];
    int used = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads < 1) threads = 1;
    /* the runs of the phase going on and of the next, by phase parity (one phase's are set while the last's
       drain), on their own cache lines; then the activations */
    run_t *runs[2];
    runs[0] = (run_t *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
    runs[1] = runs[0] + threads;
    st.x = (float *)(runs[1] + threads), st.q = st.x + C, st.y = st.q + 3 * C, st.f = st.y + C, st.d = st.f + 4 * C;
    float *per_thread = st.d + 4 * C;

    const float *wte = weights[W_WTE], *wpe = weights[W_WPE];
    for (int64_t i = 0; i < C; i++) st.x[i] = wte[token * C + i] + wpe[pos * C + i];

#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
        float *h = per_thread + t * (2 * C + st.S), *z = h + C, *scores = z + C;
        float top = -INFINITY;
        int64_t at = 0, count, chunk, lo, hi, s, e, step = 0;
        phase_size(&st, P_QKV, &count, &chunk);
        share(count, t, T, &lo, &hi);
        run_set(&runs[0][t], lo, hi);
#pragma omp barrier
        for (int64_t l = 0; l <= st.L; l++) {
            for (int phase = P_QKV; phase <= P_MPROJ; phase++, step++) {
                if (l == st.L && phase != P_QKV) break;
                int kind = l == st.L ? P_HEAD : phase;
                const float *const *w = l < st.L ? weights + W_GLOBAL + l * W_PER_LAYER : NULL;
                if (kind == P_QKV || kind == P_HEAD) residual(&st, l, z);
                if (kind == P_QKV) layer_norm(h, z, w[W_LN1_W], w[W_LN1_B], C, eps);
                if (kind == P_FC) layer_norm(h, st.x, w[W_LN2_W], w[W_LN2_B], C, eps);
                if (kind == P_HEAD) layer_norm(h, z, weights[W_LNF_W], weights[W_LNF_B], C, eps);
                phase_size(&st, kind, &count, &chunk);
                run_t *mine = runs[step & 1];
                while (run_take(&mine[t], chunk, 0, &s, &e)) rows(&st, kind, l, s, e, h, z, scores, &top, &at);
                for (int other = 1; other < T; other++)
                    while (run_take(&mine[(t + other) % T], chunk, 1, &s, &e))
                        rows(&st, kind, l, s, e, h, z, scores, &top, &at);
                if (kind == P_HEAD) break;
                int next = phase == P_MPROJ ? (l + 1 == st.L ? P_HEAD : P_QKV) : phase + 1;
                phase_size(&st, next, &count, &chunk);
                share(count, t, T, &lo, &hi);
                run_set(&runs[(step + 1) & 1][t], lo, hi);
#pragma omp barrier
            }
        }
        best_value[t] = top;
        best_index[t] = at;
        if (t == 0) used = T;
    }
    int64_t at = best_index[0];
    float top = best_value[0];
    for (int i = 1; i < used; i++) {
        if (better(best_value[i], best_index[i], top, at)) {
            top = best_value[i];
            at = best_index[i];
        }
    }
    return at;
}

/* Up to n greedy steps of one sequence: token at pos, then each step's argmax at the next position, until n
   tokens, one of the `n_stops` ids in `stops` (kept), or `*interrupt` found set after a step (another thread
   asks for the engine back: a new request, a cancel). Writes the tokens to `out` and returns how many; the
   logits left in `logits` are the last step's. One call for several tokens spares the caller's per-token work,
   which runs cold after each step has streamed the weights through the caches. */
int64_t tinyllm_decode_steps(const int64_t *dims, const float *const *weights, float *const *kv, float *scratch,
                             float *logits, int64_t token, int64_t pos, float eps, int threads, int64_t n,
                             const int64_t *stops, int64_t n_stops, int64_t *out, const int32_t *interrupt) {
    int64_t done = 0;
    while (done < n) {
        token = out[done] = tinyllm_decode_step(dims, weights, kv, scratch, logits, token, pos + done, eps, threads);
        done++;
        for (int64_t i = 0; i < n_stops; i++)
            if (token == stops[i]) return done;
        if (interrupt && __atomic_load_n(interrupt, __ATOMIC_ACQUIRE)) return done;
    }
    return done;
}

/* ---- Linears of a few rows (batched decoding) ----

   y = x W^T + bias for R rows x (R, K), the weight read from a copy in panels of 16 outputs, (P, K, 16) with
   P = ceil(N / 16) (the last panel's missing outputs zero): each 64-byte line of a panel holds one input's
   weights for 16 outputs, multiplied by each row's input, broadcast, into one accumulator (16 lanes) per row, so
   every weight loaded serves up to 16 rows from registers. oneDNN's GEMM at 8 rows ran ~1.4x slower here (its
   small-M kernels are compute-bound on these 2 cores). Each output's sum runs over k = 0 .. K-1 in order,
   then adds the bias, whatever R is and whatever thread computes it: a row's result does not depend on the other
   rows of the batch (bit-equal, tested). The panels are split into one contiguous run per thread. */
#define PANEL_ROWS 16 /* rows per pass over the weights: 16 accumulators, one weight and one input register */

static inline __attribute__((always_inline)) void panel_rows(const float *xt, const int R, int64_t K,
                                                              const float *p, float *out) {
    vf a[PANEL_ROWS];
    for (int r = 0; r < R; r++) a[r] = (vf){0};
    for (int64_t k = 0; k < K; k++) {
        const vf w = load(p + 16 * k);
        for (int r = 0; r < R; r++) a[r] += xt[R * k + r] * w;
    }
    for (int r = 0; r < R; r++) memcpy(out + 16 * r, &a[r], 64);
}

#define PANEL_CASE(n) \
    case n: panel_rows(xt, n, K, p, acc); break;

/* x (R, K), panels (P, K, 16), bias (N) or NULL, y (R, N). Returns 0, or -1 when out of memory. */
int64_t tinyllm_panel_linear(const float *x, int64_t R, int64_t K, const float *panels, const float *bias, int64_t N,
                             float *y, int threads) {
    if (R <= 0) return 0;
    const int64_t P = (N + 15) / 16;
    const int64_t pass = R < PANEL_ROWS ? R : PANEL_ROWS;
    float *xt = aligned_alloc(64, ((size_t)(K * pass * sizeof(float)) + 63) & ~(size_t)63);
    if (!xt) return -1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads < 1) threads = 1;
    for (int64_t r0 = 0; r0 < R; r0 += PANEL_ROWS) {
        const int n = R - r0 < PANEL_ROWS ? (int)(R - r0) : PANEL_ROWS;
        for (int64_t k = 0; k < K; k++) /* the pass's inputs, k-major: the n inputs at k are adjacent */
            for (int r = 0; r < n; r++) xt[n * k + r] = x[(r0 + r) * K + k];
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t i = 0; i < P; i++) {
            float acc[PANEL_ROWS * 16];
            const float *p = panels + i * K * 16;
            switch (n) {
                PANEL_CASE(1) PANEL_CASE(2) PANEL_CASE(3) PANEL_CASE(4) PANEL_CASE(5) PANEL_CASE(6) PANEL_CASE(7)
                PANEL_CASE(8) PANEL_CASE(9) PANEL_CASE(10) PANEL_CASE(11) PANEL_CASE(12) PANEL_CASE(13)
                PANEL_CASE(14) PANEL_CASE(15) PANEL_CASE(16)
            }
            const int64_t n0 = i * 16, width = N - n0 < 16 ? N - n0 : 16;
            for (int r = 0; r < n; r++) {
                float *out = y + (r0 + r) * N + n0;
                for (int64_t j = 0; j < width; j++) out[j] = bias ? acc[16 * r + j] + bias[n0 + j] : acc[16 * r + j];
            }
        }
    }
    free(xt);
    return 0;
}

/* ---- Attention of a batched decoding step ----

   B rows of one query each, H heads of D: row b attends to its cached positions 0 .. pos[b * pos_stride] (its
   own last), y (B, H D) = softmax(q k^T / sqrt(D)) v per head, by the C step's code for one head (`attend`).
   q[b, h] at q + b q_row + h q_head; the cache's keys and values of row b, head h at b kv_row + h kv_head,
   positions D apart. Each (row, head) is one task, so a row's result does not depend on the other rows. torch's
   SDPA read the whole masked cache of every row (~420 us a GPT-2 layer at 8 rows, cold: measured). Returns 0,
   -1 when out of memory, -2 when a position is not in 0 .. S - 1. */
int64_t tinyllm_decode_attention(const float *q, int64_t q_row, int64_t q_head, int64_t B, int64_t H, int64_t D,
                                 const float *k, const float *v, int64_t kv_row, int64_t kv_head, const int64_t *pos,
                                 int64_t pos_stride, int64_t S, float *y, int threads) {
    for (int64_t b = 0; b < B; b++)
        if (pos[b * pos_stride] < 0 || pos[b * pos_stride] >= S) return -2;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads < 1) threads = 1;
    float *scratch = malloc((size_t)threads * (size_t)S * sizeof(float));
    if (!scratch) return -1;
    const float scale = 1.0f / sqrtf((float)D);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t task = 0; task < B * H; task++) {
        const int64_t b = task / H, h = task % H;
        attend(q + b * q_row + h * q_head, k + b * kv_row + h * kv_head, v + b * kv_row + h * kv_head,
               pos[b * pos_stride] + 1, D, scale, scratch + (int64_t)omp_get_thread_num() * S, y + (b * H + h) * D);
    }
    free(scratch);
    return 0;
}
