// Brigade's native CPU kernels (float32): paged decode attention that reads KV blocks in place, and the fused
// pointwise steps of a llama layer (residual add + RMSNorm, rotary, SiLU-and-multiply).
//
// Plain C ABI over raw pointers, loaded with ctypes (kernels/native.py builds it with the system compiler): no
// torch headers, so a cold build takes about a second instead of the ~35 s a torch extension takes here. OpenMP
// is torch's own libgomp (the loader reuses the copy torch loaded), and every entry point takes its thread count,
// so these loops share torch's thread pool instead of oversubscribing the cores.
#include <cmath>
#include <cstdint>
#include <vector>

// exp(x) for float32 within ~2 ulp (Cephes' polynomial on x = n ln2 + r), eight lanes at a time with GCC's
// vector extensions: std::exp is a scalar libm call, which made silu_mul 6x slower than torch's SiLU, and a
// scalar version of this function did not vectorize either (the float/int bit cast stops GCC's vectorizer).
// Inputs are clamped to the finite range, so exp(-inf) gives ~1e-38 rather than 0.
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

static inline v8f exp8(v8f x) {
    const v8f lo = v8f{} - 87.3f, hi = v8f{} + 88.7f;
    x = x < lo ? lo : x;
    x = x > hi ? hi : x;
    v8f t = x * 1.44269504088896341f + 0.5f;
    v8i ni = __builtin_convertvector(t, v8i);
    v8f n = __builtin_convertvector(ni, v8f);
    ni = n > t ? ni - 1 : ni;  // floor: the conversion truncates toward zero
    n = __builtin_convertvector(ni, v8f);
    const v8f r = x - n * 0.693359375f + n * 2.12194440e-4f;
    v8f p = v8f{} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    return p * (v8f)((ni + 127) << 23);
}

// dst[i] = exp(src[i] - shift) for i < n; returns their sum.
static inline float exp_shifted(const float* src, float* dst, int64_t n, float shift) {
    v8f acc = v8f{};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        v8f v;
        __builtin_memcpy(&v, src + i, sizeof v);
        v = exp8(v - shift);
        __builtin_memcpy(dst + i, &v, sizeof v);
        acc += v;
    }
    float sum = 0.f;
    for (int k = 0; k < 8; ++k) sum += acc[k];
    if (i < n) {
        v8f v = v8f{} - 1e30f;  // padding lanes: exp underflows to ~0 and is not stored
        __builtin_memcpy(&v, src + i, (n - i) * sizeof(float));
        v = exp8(v - shift);
        for (int64_t k = 0; k < n - i; ++k) {
            dst[i + k] = v[k];
            sum += v[k];
        }
    }
    return sum;
}

extern "C" {

// out[n, H, D] = softmax(q . K^T * scale) V for each decode query over its paged context.
// k_cache/v_cache: [slots, KVH, D] (slot = block * block_size + offset); tables: [n, max_blocks] int32.
// window > 0: the query (at position len - 1) sees only the last `window` keys; table entries before them are
// never read (their blocks may have gone back to the pool, the entry a placeholder).
// One task per (sequence, kv head): the group's query heads share every K/V row they read.
void paged_decode_attention(const float* q, const float* k_cache, const float* v_cache, const int32_t* tables,
                            const int32_t* lens, float* out, int64_t n, int64_t heads, int64_t kv_heads,
                            int64_t head_dim, int64_t block_size, int64_t max_blocks, int64_t window,
                            float scale, int threads) {
    const int64_t group = heads / kv_heads;
    const int64_t row = kv_heads * head_dim;  // floats between consecutive slots
#pragma omp parallel num_threads(threads)
    {
        std::vector<float> scores;
        std::vector<float> acc(group * head_dim);
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < n * kv_heads; ++task) {
            const int64_t s = task / kv_heads, kh = task % kv_heads;
            const int64_t lo = window > 0 && lens[s] > window ? lens[s] - window : 0;  // first key position
            const int64_t len = lens[s] - lo;  // keys attended, at positions lo + t
            const int32_t* table = tables + s * max_blocks;
            scores.resize(group * len);
            const float* qs = q + (s * heads + kh * group) * head_dim;
            for (int64_t t = 0; t < len; ++t) {
                const int64_t pos = lo + t;
                const float* k = k_cache + ((int64_t)table[pos / block_size] * block_size + pos % block_size) * row +
                                 kh * head_dim;
                for (int64_t g = 0; g < group; ++g) {
                    const float* qg = qs + g * head_dim;
                    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
                    for (int64_t d = 0; d < head_dim; ++d) dot += qg[d] * k[d];
                    scores[g * len + t] = dot * scale;
                }
            }
            for (int64_t g = 0; g < group; ++g) {
                float* sg = scores.data() + g * len;
                float mx = -INFINITY;
                for (int64_t t = 0; t < len; ++t) mx = sg[t] > mx ? sg[t] : mx;
                const float sum = exp_shifted(sg, sg, len, mx);
                const float inv = 1.f / sum;
                for (int64_t t = 0; t < len; ++t) sg[t] *= inv;
            }
            for (int64_t i = 0; i < group * head_dim; ++i) acc[i] = 0.f;
            for (int64_t t = 0; t < len; ++t) {
                const int64_t pos = lo + t;
                const float* v = v_cache + ((int64_t)table[pos / block_size] * block_size + pos % block_size) * row +
                                 kh * head_dim;
                for (int64_t g = 0; g < group; ++g) {
                    const float p = scores[g * len + t];
                    float* a = acc.data() + g * head_dim;
#pragma omp simd
                    for (int64_t d = 0; d < head_dim; ++d) a[d] += p * v[d];
                }
            }
            float* o = out + (s * heads + kh * group) * head_dim;
            for (int64_t i = 0; i < group * head_dim; ++i) o[i] = acc[i];
        }
    }
}

// residual += x (when x is given), then out = RMSNorm(residual) * weight, per row of `hidden` floats.
void add_rms_norm(const float* x, float* residual, const float* weight, float* out, int64_t rows, int64_t hidden,
                  float eps, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        float* h = residual + r * hidden;
        if (x != nullptr) {
            const float* xr = x + r * hidden;
#pragma omp simd
            for (int64_t i = 0; i < hidden; ++i) h[i] += xr[i];
        }
        float ss = 0.f;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < hidden; ++i) ss += h[i] * h[i];
        const float inv = 1.f / std::sqrt(ss / (float)hidden + eps);
        float* o = out + r * hidden;
#pragma omp simd
        for (int64_t i = 0; i < hidden; ++i) o[i] = weight[i] * (h[i] * inv);
    }
}

// Rotary embedding in place, half-split layout, on the first `rot_heads` heads of each token's row of
// `stride` floats (q heads then k heads of a fused qkv row). cos/sin: [tokens, head_dim / 2] (each half repeats).
void rotary(float* x, const float* cos, const float* sin, int64_t tokens, int64_t stride, int64_t rot_heads,
            int64_t head_dim, int threads) {
    const int64_t half = head_dim / 2;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tokens; ++t) {
        const float* c = cos + t * half;
        const float* s = sin + t * half;
        for (int64_t h = 0; h < rot_heads; ++h) {
            float* a = x + t * stride + h * head_dim;
            float* b = a + half;
#pragma omp simd
            for (int64_t i = 0; i < half; ++i) {
                const float x1 = a[i], x2 = b[i];
                a[i] = x1 * c[i] - x2 * s[i];
                b[i] = x2 * c[i] + x1 * s[i];
            }
        }
    }
}

// out[r, i] = silu(gate_up[r, i]) * gate_up[r, inter + i]: the dense MLP's activation.
void silu_mul(const float* gate_up, float* out, int64_t rows, int64_t inter, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const float* g = gate_up + r * 2 * inter;
        const float* u = g + inter;
        float* o = out + r * inter;
        int64_t i = 0;
        for (; i + 8 <= inter; i += 8) {
            v8f gv, uv;
            __builtin_memcpy(&gv, g + i, sizeof gv);
            __builtin_memcpy(&uv, u + i, sizeof uv);
            const v8f ov = gv / (1.f + exp8(v8f{} - gv)) * uv;
            __builtin_memcpy(o + i, &ov, sizeof ov);
        }
        for (; i < inter; ++i) {
            v8f gv = v8f{} + g[i];
            o[i] = (gv / (1.f + exp8(v8f{} - gv)))[0] * u[i];
        }
    }
}

}  // extern "C"
