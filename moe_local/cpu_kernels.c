/* moe-local's CPU kernels (`moe_local/native.py` builds them).

   attend: the attention of a decode step, a few queries per KV head over its cached keys and values, for
   `moe_local/cpu_attention.py`. torch's CPU SDPA kernel is built for many queries: for one token's 2 queries
   per KV head over 900 bf16 positions it takes ~170 us a layer where reading the cache takes ~40.

   Work items are (KV head, CHUNK keys); each scores its keys (8 keys by 2 queries at a time, the sums in
   registers), takes their softmax parts (running max, sum of exponentials) and their weighted values; then
   each query's parts are merged, with its sink logit (gpt-oss) in the denominator. Sums are in fp32.

   mxfp4_linear: a decode step's products against MXFP4 experts (gpt-oss), for `moe_local/experts/mxfp4.py`
   (its comment is below).

   experts_swiglu, experts_swiglu_int4(_tc), experts_swiglu_fp8: a decode step's SwiGLU experts of one layer (bf16,
   int8, int4 in the CPU's or CUDA's layout, or FP8 blocks) in one call, for `moe_local/experts/formats.py` (their comments are below);
   the first three take GeGLU experts too (`act`: Gemma 4's). */

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if !defined(__AVX2__) || !defined(__FMA__)
#error "moe-local's CPU kernels need an x86 CPU with AVX2 and FMA"
#endif

#define CHUNK 512 /* keys per work item */
#define AHEAD 64  /* keys read ahead of the one in use (prefetched: each item's stream starts cold) */

static inline __m256 load8(const void* p, long i, const int bf16) {
    if (bf16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)((const uint16_t*)p + i))), 16));
    return _mm256_loadu_ps((const float*)p + i);
}

static inline void prefetch_row(const void* p, long i, int n, const int bf16, int hint) {
    const char* row = (const char*)p + i * (bf16 ? 2 : 4);
    for (int b = 0; b < n * (bf16 ? 2 : 4); b += 64) hint ? _mm_prefetch(row + b, _MM_HINT_T0) : _mm_prefetch(row + b, _MM_HINT_T1);
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline uint16_t to_bf16(float x) { /* to nearest even */
    uint32_t u;
    memcpy(&u, &x, 4);
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

/* [sum of a[0], ..., sum of a[7]] */
static inline __m256 hsum8(const __m256* a) {
    __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]), t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
    __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* e^x for x <= 0 (Cephes' expf: reduction by ln 2, a degree-5 polynomial; ~1e-7 relative), 0 where x is -inf */
static inline __m256 exp8(__m256 x) {
    __m256 valid = _mm256_cmp_ps(x, _mm256_set1_ps(-INFINITY), _CMP_GT_OQ);
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
    __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500E-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
    __m256i n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(n)), valid);
}

/* scores[t] for the kn keys of a block of 8: their sums, or -inf where the mask (if any) hides the key */
static inline void put_scores(float* scores, const float* sums, int kn, const uint8_t* mask) {
    for (int t = 0; t < kn; t++) scores[t] = !mask || mask[t] ? sums[t] : -INFINITY;
}

/* o[j * o_stride + 8 t + i] = sum over n keys of p[j * CHUNK + key] * v[key * row + 8 t + i], j < JN, t < TN:
   JN and TN are constants where this is inlined, so that the sums stay in registers */
static inline __attribute__((always_inline)) void weighted(
    const void* v, long row, int n, const float* p, float* o, int o_stride, const int bf16, const int JN, const int TN) {
    __m256 acc[2][4];
    for (int j = 0; j < JN; j++)
        for (int t = 0; t < TN; t++) acc[j][t] = _mm256_setzero_ps();
    for (int i = 0; i < n; i++) {
        _mm_prefetch((const char*)v + (long)(i + AHEAD) * row * (bf16 ? 2 : 4), _MM_HINT_T0);
        __m256 vv[4];
        for (int t = 0; t < TN; t++) vv[t] = load8(v, (long)i * row + 8 * t, bf16);
        for (int j = 0; j < JN; j++) {
            __m256 pj = _mm256_broadcast_ss(p + j * CHUNK + i);
            for (int t = 0; t < TN; t++) acc[j][t] = _mm256_fmadd_ps(pj, vv[t], acc[j][t]);
        }
    }
    for (int j = 0; j < JN; j++)
        for (int t = 0; t < TN; t++) _mm256_storeu_ps(o + j * o_stride + 8 * t, acc[j][t]);
}

#ifdef __AVX512F__
/* the two 256-bit halves of v added */
static inline __m256 fold512(__m512 v) {
    return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}
#endif

#if defined(__AVX512BF16__) && defined(__AVX512DQ__)
#define BF16_PAIRS 1

/* `weighted` for bf16 values, two keys at a time: their rows interleaved (16 dimensions a vector, in the
   order `order`: the unpacks work within 128-bit lanes) and multiplied by their probabilities' pair, rounded
   to bf16 (pp), with one vdpbf16ps; an odd last key is widened and added with its fp32 probability (p). */
static inline __attribute__((always_inline)) void weighted_pairs(
    const uint16_t* v, long row, int n, const uint32_t* pp, const float* p, float* o, int o_stride, const int JN, const int TN) {
    const __m512i order = _mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15); /* lane k: dimension order[k] */
    __m512 acc[2][4];
    for (int j = 0; j < JN; j++)
        for (int t = 0; t < TN; t++) acc[j][t] = _mm512_setzero_ps();
    int i = 0;
    for (; i + 2 <= n; i += 2) {
        _mm_prefetch((const char*)(v + (long)(i + AHEAD) * row), _MM_HINT_T0);
        _mm_prefetch((const char*)(v + (long)(i + AHEAD + 1) * row), _MM_HINT_T0);
        __m512bh vv[4];
        for (int t = 0; t < TN; t++) {
            __m256i a = _mm256_loadu_si256((const __m256i*)(v + (long)i * row + 16 * t));
            __m256i b = _mm256_loadu_si256((const __m256i*)(v + (long)(i + 1) * row + 16 * t));
            vv[t] = (__m512bh)_mm512_inserti64x4(_mm512_castsi256_si512(_mm256_unpacklo_epi16(a, b)), _mm256_unpackhi_epi16(a, b), 1);
        }
        for (int j = 0; j < JN; j++) {
            __m512bh pj = (__m512bh)_mm512_set1_epi32((int)pp[j * (CHUNK / 2) + i / 2]);
            for (int t = 0; t < TN; t++) acc[j][t] = _mm512_dpbf16_ps(acc[j][t], pj, vv[t]);
        }
    }
    if (i < n)
        for (int t = 0; t < TN; t++) {
            __m256i raw = _mm256_loadu_si256((const __m256i*)(v + (long)i * row + 16 * t));
            __m512 w = _mm512_permutexvar_ps(order, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16)));
            for (int j = 0; j < JN; j++) acc[j][t] = _mm512_fmadd_ps(_mm512_set1_ps(p[j * CHUNK + i]), w, acc[j][t]);
        }
    for (int j = 0; j < JN; j++) /* `order` is its own inverse: dimension d is in lane order[d] */
        for (int t = 0; t < TN; t++) _mm512_storeu_ps(o + j * o_stride + 16 * t, _mm512_permutexvar_ps(order, acc[j][t]));
}
#endif

/* One work item: KV head h, keys s0..s0+n-1. part: per query, the max score, the sum of exponentials and
   the Dv weighted values. */
static inline __attribute__((always_inline)) void item(
    const float* qh, const uint16_t* qb, float scale, int Q, int D, int s0, int n, const void* k, const void* v,
    long k_row, long v_row, int Dv, const int bf16, const uint8_t* mask, long mask_query, float* scores, float* part) {
    (void)qb, (void)scale; /* (the bf16 pairs' scores only) */
    for (int i0 = 0; i0 < n; i0 += 8) { /* scores: 8 keys by 2 queries, each key's 8 lanes summed at the end */
        const int kn = n - i0 < 8 ? n - i0 : 8;
        for (int t = 0; t < 8; t++) {
            prefetch_row(k, (long)(i0 + AHEAD + t) * k_row, D, bf16, 1);
            prefetch_row(v, (long)(i0 + t) * v_row, Dv, bf16, 0); /* the values' pass comes next */
        }
#ifdef BF16_PAIRS
        if (bf16 && D % 32 == 0) { /* bf16 pairs multiplied and summed in fp32 by one instruction, no widening */
            for (int j0 = 0; j0 < Q; j0 += 2) {
                const int jn = Q - j0 < 2 ? Q - j0 : 2;
                __m512 acc[2][8];
                for (int j = 0; j < 2; j++)
                    for (int t = 0; t < 8; t++) acc[j][t] = _mm512_setzero_ps();
                for (int d = 0; d < D; d += 32) {
                    __m512bh kv[8];
                    for (int t = 0; t < 8; t++)
                        kv[t] = (__m512bh)(t < kn ? _mm512_loadu_si512((const uint16_t*)k + (long)(i0 + t) * k_row + d) : _mm512_setzero_si512());
                    for (int j = 0; j < jn; j++) {
                        __m512bh qv = (__m512bh)_mm512_loadu_si512(qb + (size_t)(j0 + j) * D + d);
                        for (int t = 0; t < 8; t++) acc[j][t] = _mm512_dpbf16_ps(acc[j][t], qv, kv[t]);
                    }
                }
                for (int j = 0; j < jn; j++) {
                    __m256 halves[8];
                    for (int t = 0; t < 8; t++) halves[t] = fold512(acc[j][t]);
                    float sums[8];
                    _mm256_storeu_ps(sums, _mm256_mul_ps(hsum8(halves), _mm256_set1_ps(scale)));
                    put_scores(scores + (j0 + j) * CHUNK + i0, sums, kn, mask ? mask + (j0 + j) * mask_query + s0 + i0 : NULL);
                }
            }
            continue;
        }
#endif
        for (int j0 = 0; j0 < Q; j0 += 2) {
            const int jn = Q - j0 < 2 ? Q - j0 : 2;
            __m256 acc[2][8];
            for (int j = 0; j < 2; j++)
                for (int t = 0; t < 8; t++) acc[j][t] = _mm256_setzero_ps();
            for (int d = 0; d < D; d += 8) {
                __m256 kv[8];
                for (int t = 0; t < 8; t++) kv[t] = t < kn ? load8(k, (long)(i0 + t) * k_row + d, bf16) : _mm256_setzero_ps();
                for (int j = 0; j < jn; j++) {
                    __m256 qv = _mm256_loadu_ps(qh + (size_t)(j0 + j) * D + d);
                    for (int t = 0; t < 8; t++) acc[j][t] = _mm256_fmadd_ps(qv, kv[t], acc[j][t]);
                }
            }
            for (int j = 0; j < jn; j++) {
                float sums[8];
                _mm256_storeu_ps(sums, hsum8(acc[j]));
                put_scores(scores + (j0 + j) * CHUNK + i0, sums, kn, mask ? mask + (j0 + j) * mask_query + s0 + i0 : NULL);
            }
        }
    }
    for (int j = 0; j < Q; j++) { /* the softmax's parts, the scores replaced by their exponentials */
        float *sj = scores + j * CHUNK, m = -INFINITY, l = 0.f;
        for (int i = 0; i < n; i++) m = sj[i] > m ? sj[i] : m;
        if (m > -INFINITY) {
            int i = 0;
            __m256 mv = _mm256_set1_ps(m), lv = _mm256_setzero_ps();
            for (; i + 8 <= n; i += 8) {
                __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(sj + i), mv));
                _mm256_storeu_ps(sj + i, p);
                lv = _mm256_add_ps(lv, p);
            }
            l = hsum(lv);
            for (; i < n; i++) l += sj[i] = sj[i] > -INFINITY ? expf(sj[i] - m) : 0.f;
        } else
            memset(sj, 0, sizeof(float) * n);
        part[j * (2 + Dv)] = m, part[j * (2 + Dv) + 1] = l;
    }
#ifdef BF16_PAIRS
    if (bf16 && Dv % 16 == 0) { /* values: 2 queries by 64 dimensions at a time, keys in pairs */
        for (int j0 = 0; j0 < Q; j0 += 2) {
            const int jn = Q - j0 < 2 ? Q - j0 : 2;
            uint32_t pp[2 * CHUNK / 2];
            for (int j = 0; j < jn; j++)
                for (int i = 0; i + 1 < n; i += 2)
                    pp[j * (CHUNK / 2) + i / 2] = to_bf16(scores[(j0 + j) * CHUNK + i]) | (uint32_t)to_bf16(scores[(j0 + j) * CHUNK + i + 1]) << 16;
            for (int d0 = 0; d0 < Dv; d0 += 64) {
                const uint16_t* vd = (const uint16_t*)v + d0;
                float* o = part + j0 * (2 + Dv) + 2 + d0;
                const float* p = scores + j0 * CHUNK;
                switch (jn * 8 + (Dv - d0 < 64 ? Dv - d0 : 64) / 16) { /* constant counts, so that the sums stay in registers */
                case 9: weighted_pairs(vd, v_row, n, pp, p, o, 2 + Dv, 1, 1); break;
                case 10: weighted_pairs(vd, v_row, n, pp, p, o, 2 + Dv, 1, 2); break;
                case 11: weighted_pairs(vd, v_row, n, pp, p, o, 2 + Dv, 1, 3); break;
                case 12: weighted_pairs(vd, v_row, n, pp, p, o, 2 + Dv, 1, 4); break;
                case 17: weighted_pairs(vd, v_row, n, pp, p, o, 2 + Dv, 2, 1); break;
                case 18: weighted_pairs(vd, v_row, n, pp, p, o, 2 + Dv, 2, 2); break;
                case 19: weighted_pairs(vd, v_row, n, pp, p, o, 2 + Dv, 2, 3); break;
                default: weighted_pairs(vd, v_row, n, pp, p, o, 2 + Dv, 2, 4); break;
                }
            }
        }
        return;
    }
#endif
    for (int j0 = 0; j0 < Q; j0 += 2) { /* values: 2 queries by 32 dimensions at a time */
        const int jn = Q - j0 < 2 ? Q - j0 : 2;
        for (int d0 = 0; d0 < Dv; d0 += 32) {
            const int tn = (Dv - d0 < 32 ? Dv - d0 : 32) / 8;
            const void* vd = (const char*)v + d0 * (bf16 ? 2 : 4);
            float* o = part + j0 * (2 + Dv) + 2 + d0;
            const float* p = scores + j0 * CHUNK;
            if (jn == 2 && tn == 4) weighted(vd, v_row, n, p, o, 2 + Dv, bf16, 2, 4);
            else if (tn == 4) weighted(vd, v_row, n, p, o, 2 + Dv, bf16, 1, 4);
            else
                for (int t = 0; t < tn; t++)
                    jn == 2 ? weighted((const char*)vd + 8 * t * (bf16 ? 2 : 4), v_row, n, p, o + 8 * t, 2 + Dv, bf16, 2, 1)
                            : weighted((const char*)vd + 8 * t * (bf16 ? 2 : 4), v_row, n, p, o + 8 * t, 2 + Dv, bf16, 1, 1);
        }
    }
}

/* out [H, Q, Dv] (bf16 if bf16, else fp32) = softmax(scale * q k^T (masked), sink) v, for q [H, Q, D], and keys
   and values whose element (h, s, d) is at h * head + s * row + d, all in bf16 or all in fp32; mask: bytes
   (nonzero: attend), query j of head h's at h * mask_head + j * mask_query (a stride of 0: shared), or NULL;
   sinks [H, Q] fp32 or NULL. 0, or 1 for sizes it cannot take, 2 out of memory. */
int attend(const void* q, int H, int Q, int D, int S, const void* k, long k_head, long k_row, const void* v,
           long v_head, long v_row, int Dv, int bf16, float scale, const uint8_t* mask, long mask_head, long mask_query, const float* sinks, void* out,
           int threads) {
    if (D % 8 || Dv % 8 || Q < 1 || S < 1 || H < 1) return 1;
    const int chunks = (S + CHUNK - 1) / CHUNK, items = H * chunks;
    float* qs = malloc(sizeof(float) * (size_t)H * Q * D);
    float* part = malloc(sizeof(float) * (size_t)items * Q * (2 + Dv));
    if (!qs || !part) return free(qs), free(part), 2;
    for (size_t i = 0; i < (size_t)H * Q * D; i += 8) _mm256_storeu_ps(qs + i, _mm256_mul_ps(load8(q, i, bf16), _mm256_set1_ps(scale)));
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float* scores = malloc(sizeof(float) * (size_t)Q * CHUNK);
        if (!scores) failed = 1;
#pragma omp for schedule(static)
        for (int it = 0; it < items; it++) {
            if (!scores) continue;
            const int h = it / chunks, s0 = (it % chunks) * CHUNK, n = S - s0 < CHUNK ? S - s0 : CHUNK;
            const float* qh = qs + (size_t)h * Q * D;
            float* pi = part + (size_t)it * Q * (2 + Dv);
            if (bf16)
                item(qh, (const uint16_t*)q + (size_t)h * Q * D, scale, Q, D, s0, n, (const uint16_t*)k + h * k_head + s0 * k_row,
                     (const uint16_t*)v + h * v_head + s0 * v_row, k_row, v_row, Dv, 1, mask ? mask + h * mask_head : NULL, mask_query, scores, pi);
            else
                item(qh, NULL, scale, Q, D, s0, n, (const float*)k + h * k_head + s0 * k_row, (const float*)v + h * v_head + s0 * v_row,
                     k_row, v_row, Dv, 0, mask ? mask + h * mask_head : NULL, mask_query, scores, pi);
        }
        free(scores);
    }
    if (!failed)
        for (int h = 0; h < H; h++) /* each query's parts into one softmax */
            for (int j = 0; j < Q; j++) {
                float m = sinks ? sinks[h * Q + j] : -INFINITY, o[Dv];
                for (int c = 0; c < chunks; c++) {
                    float mc = part[((size_t)(h * chunks + c) * Q + j) * (2 + Dv)];
                    m = mc > m ? mc : m;
                }
                float l = sinks && m > -INFINITY ? expf(sinks[h * Q + j] - m) : 0.f;
                memset(o, 0, sizeof(o));
                for (int c = 0; c < chunks; c++) {
                    const float* pc = part + ((size_t)(h * chunks + c) * Q + j) * (2 + Dv);
                    if (pc[1] == 0.f) continue; /* every key of the chunk masked */
                    float w = expf(pc[0] - m);
                    l += pc[1] * w;
                    for (int d = 0; d < Dv; d++) o[d] += pc[2 + d] * w;
                }
                float inv = l > 0.f ? 1.f / l : 0.f;
                size_t at = ((size_t)h * Q + j) * Dv;
                for (int d = 0; d < Dv; d++) {
                    float x = o[d] * inv;
                    if (bf16) ((uint16_t*)out)[at + d] = to_bf16(x);
                    else ((float*)out)[at + d] = x;
                }
            }
    free(qs), free(part);
    return failed ? 2 : 0;
}

/* mxfp4_linear: y [M, N] fp32 = x [M, K] @ W.T for MXFP4 weights (gpt-oss's: blocks [N, K/32, 16] bytes of two
   E2M1 values, the low nibble first; scales [N, K/32], E8M0) and bf16 activations, K a multiple of 64. Each
   nibble becomes its bf16 weight through two 16-entry byte tables (the high and the low byte: one shuffle
   each, 32 at a time), vdpbf16ps multiplies the weights by the activations (arranged beforehand in the
   order the unpacks leave the weights in) and each block's sum is scaled by 2^(scale - 127), exactly as
   `mxfp4.dequantize` widens them. Without AVX512-BF16 the bf16 pairs are widened to fp32 for FMAs. 0, or 1
   for sizes it cannot take, 2 out of memory. */
static const uint8_t FP4_HIGH[16] = {0x00, 0x3F, 0x3F, 0x3F, 0x40, 0x40, 0x40, 0x40, 0x80, 0xBF, 0xBF, 0xBF, 0xC0, 0xC0, 0xC0, 0xC0};
static const uint8_t FP4_LOW[16] = {0x00, 0x00, 0x80, 0xC0, 0x00, 0x40, 0x80, 0xC0, 0x00, 0x00, 0x80, 0xC0, 0x00, 0x40, 0x80, 0xC0};

static inline float e8m0(uint8_t s) { /* 2^(s - 127); s = 0 is the subnormal 2^-127 */
    uint32_t u = s ? (uint32_t)s << 23 : 0x00400000u;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Where activation k of a 64-k run goes: the order of the weights after the unpacks below (per 128-bit
   lane, i.e. per block of 32: its even elements 0-14, then 16-30, its odd 1-15, then 17-31) */
static inline int mxfp4_slot(int k) {
    int run = k & ~63, block = (k >> 5) & 1, e = k & 31;
    int vec = (e & 1) * 2 + (e >> 4); /* even 0-14: 0, even 16-30: 1, odd 1-15: 2, odd 17-31: 3 */
    return run + vec * 16 + block * 8 + ((e & 15) >> 1);
}

/* sum + the products of the 16 bf16 weights w and activations a, summed in pairs into 8 fp32 lanes (lane k:
   elements 2k and 2k + 1 of the 256 bits, which keeps each 128-bit lane's sums in its half) */
static inline __m256 dot_bf16(__m256 sum, __m256i w, __m256i a) {
#ifdef BF16_PAIRS
    return _mm256_dpbf16_ps(sum, (__m256bh)w, (__m256bh)a);
#else
    const __m256i zero = _mm256_setzero_si256();
    sum = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, w)), _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, a)), sum);
    return _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, w)), _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, a)), sum);
#endif
}

static inline __attribute__((always_inline)) void mxfp4_row(
    const uint8_t* bn, const uint8_t* sn, int K, const uint16_t* xa, const int MB, float* y, int N) {
    const __m256i high = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)FP4_HIGH));
    const __m256i low = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)FP4_LOW));
    const __m256i nibble = _mm256_set1_epi8(0x0f);
    __m256 acc[4];
    for (int m = 0; m < MB; m++) acc[m] = _mm256_setzero_ps();
    for (int k = 0; k < K; k += 64) { /* two blocks: one 128-bit lane each */
        __m256i v = _mm256_loadu_si256((const __m256i*)(bn + k / 2));
        __m256i even = _mm256_and_si256(v, nibble), odd = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
        __m256i even_h = _mm256_shuffle_epi8(high, even), even_l = _mm256_shuffle_epi8(low, even);
        __m256i odd_h = _mm256_shuffle_epi8(high, odd), odd_l = _mm256_shuffle_epi8(low, odd);
        __m256i w[4] = {_mm256_unpacklo_epi8(even_l, even_h), _mm256_unpackhi_epi8(even_l, even_h),
                        _mm256_unpacklo_epi8(odd_l, odd_h), _mm256_unpackhi_epi8(odd_l, odd_h)};
        __m256 scale = _mm256_set_m128(_mm_set1_ps(e8m0(sn[k / 32 + 1])), _mm_set1_ps(e8m0(sn[k / 32])));
        for (int m = 0; m < MB; m++) {
            const uint16_t* a = xa + (size_t)m * K + k;
            __m256 sum = _mm256_setzero_ps();
            for (int t = 0; t < 4; t++) sum = dot_bf16(sum, w[t], _mm256_loadu_si256((const __m256i*)(a + 16 * t)));
            acc[m] = _mm256_fmadd_ps(sum, scale, acc[m]);
        }
    }
    for (int m = 0; m < MB; m++) y[(size_t)m * N] = hsum(acc[m]);
}

int mxfp4_linear(const uint16_t* x, int M, int K, const uint8_t* blocks, const uint8_t* scales, int N, float* y, int threads) {
    if (M < 1 || K % 64) return 1;
    uint16_t* xa = malloc(sizeof(uint16_t) * (size_t)M * K);
    if (!xa) return 2;
    for (int m = 0; m < M; m++)
        for (int k = 0; k < K; k++) xa[(size_t)m * K + mxfp4_slot(k)] = x[(size_t)m * K + k];
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int n = 0; n < N; n++) {
        const uint8_t *bn = blocks + (size_t)n * (K / 2), *sn = scales + (size_t)n * (K / 32);
        for (int m0 = 0; m0 < M; m0 += 4) { /* up to four rows share each widening of the weights */
            const uint16_t* a = xa + (size_t)m0 * K;
            float* out = y + (size_t)m0 * N + n;
            switch (M - m0 < 4 ? M - m0 : 4) {
            case 1: mxfp4_row(bn, sn, K, a, 1, out, N); break;
            case 2: mxfp4_row(bn, sn, K, a, 2, out, N); break;
            case 3: mxfp4_row(bn, sn, K, a, 3, out, N); break;
            default: mxfp4_row(bn, sn, K, a, 4, out, N); break;
            }
        }
    }
    free(xa);
    return 0;
}

/* experts_swiglu: a layer's SwiGLU experts (Mixtral's, Qwen3's, ...) for the few tokens of a decode step, in
   one call. Expert e (of E) takes rows starts[e] .. starts[e + 1] - 1 of x [R, D] (bf16) through
   h = silu(x Wg.T) * (x Wu.T) and y = h Wd.T, where gate_up[e] is [2F, D] (Wg's rows, then Wu's) and down[e]
   is [D, F]; y [R, D] is fp32. The weights are bf16, or int8 with one bf16 scale per row (gate_up_scale[e]
   [2F], down_scale[e] [D]) where those are given; then each activation row is taken as int16 times one
   scale (2^-15 of its largest value: finer than its bf16) and multiplied by VNNI's int16 pair products, so
   that the int8 weights need one instruction to widen. Each product, silu's result and h round to bf16
   where torch's bf16 path rounds them, so the order of the sums (and for int8, the int16 activations) is
   all that differs from it. Work items are (expert, 8 outputs) in both passes; each reads its weight rows
   once for all of its expert's rows (bf16 weights of an expert of two rows or more: wide_products, above, where the
   CPU has AVX512 without bf16 arithmetic). D and F multiples of 32, at most 16 rows an expert with int8 weights
   (bf16: any number); `act` ACT_GELU_TANH
   for GeGLU experts (h = gelu_tanh(x Wg.T) * (x Wu.T), Gemma 4's); 0, or 1 for sizes or an `act` it cannot take
   (or int8 without AVX512-VNNI), 2 out of memory. */
#define EXPERT_MAX_ROWS 16
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define INT8_PAIRS 1
#endif

/* x rounded to bf16 and back, 8 at a time (to nearest even, as to_bf16) */
static inline __m256 round_bf16_8(__m256 x) {
    __m256i u = _mm256_castps_si256(x);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb));
    return _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32((int)0xffff0000u)));
}

/* the experts' activation of the gate: SwiGLU's silu (Mixtral's, Qwen3's, ...) or GeGLU's GELU in its tanh form (Gemma 4's) */
enum { ACT_SILU = 0, ACT_GELU_TANH = 1 };

/* h[0..7] = act(g) * u (bf16) from 8 gate and up products, each rounded to bf16 where torch's bf16 path
   rounds: the products, the activation's result and h */
static inline void glu8(int act, __m256 g, __m256 u, uint16_t* h) {
    g = round_bf16_8(g), u = round_bf16_8(u);
    const __m256 one = _mm256_set1_ps(1.f), sign_bit = _mm256_set1_ps(-0.f);
    __m256 a;
    if (act == ACT_GELU_TANH) {
        /* gelu(g) = g (1 + tanh(y)) / 2 with y = sqrt(2 / pi) (g + 0.044715 g^3), as torch computes it in fp32;
           tanh(y) = sign(y) (1 - z) / (1 + z) with z = e^-2|y| */
        const __m256 y = _mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f), _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), g), _mm256_mul_ps(g, g), g));
        const __m256 z = exp8(_mm256_mul_ps(_mm256_set1_ps(-2.f), _mm256_andnot_ps(sign_bit, y)));
        const __m256 tanh_y = _mm256_or_ps(_mm256_and_ps(y, sign_bit), _mm256_div_ps(_mm256_sub_ps(one, z), _mm256_add_ps(one, z)));
        a = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), g), _mm256_add_ps(one, tanh_y));
    } else {
        /* silu(g) = g sigmoid(g); with z = e^-|g|, sigmoid(g) is 1 / (1 + z) for g >= 0, z / (1 + z) below */
        const __m256 z = exp8(_mm256_or_ps(g, sign_bit));
        const __m256 below = _mm256_cmp_ps(g, _mm256_setzero_ps(), _CMP_LT_OQ);
        a = _mm256_mul_ps(g, _mm256_div_ps(_mm256_blendv_ps(one, z, below), _mm256_add_ps(one, z)));
    }
    float hv[8];
    _mm256_storeu_ps(hv, _mm256_mul_ps(round_bf16_8(a), u));
    for (int j = 0; j < 8; j++) h[j] = to_bf16(hv[j]);
}

/* the 8 sums of w[j * K ..] . a over k < K, j < 8: bf16 weights and activations, 16 of each row at a time, in pairs */
static inline __m256 dot8(const uint16_t* w, const uint16_t* a, int K) {
    __m256 sums[8];
    for (int j = 0; j < 8; j++) { /* one row at a time: each a sequential read (8 rows at once read slower) */
        const uint16_t* wj = w + (size_t)j * K;
        __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
        int k = 0;
        for (; k + 32 <= K; k += 32)
            for (int t = 0; t < 2; t++)
                acc[t] = dot_bf16(acc[t], _mm256_loadu_si256((const __m256i*)(wj + k + 16 * t)), _mm256_loadu_si256((const __m256i*)(a + k + 16 * t)));
        for (; k < K; k += 16)
            acc[0] = dot_bf16(acc[0], _mm256_loadu_si256((const __m256i*)(wj + k)), _mm256_loadu_si256((const __m256i*)(a + k)));
        sums[j] = _mm256_add_ps(acc[0], acc[1]);
    }
    return hsum8(sums);
}

static inline float from_bf16(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

#ifdef INT8_PAIRS
#define INT_RUN 1024 /* k summed in int32 before fp32: 1024 products of |127 * 32767| stay far below 2^31 per lane */

/* the same for int8 weights and int16 activations: 32 of each at a time, the weights widened to int16 and
   multiplied in pairs into int32 (vpdpwssd), the int32 sums taken to fp32 every INT_RUN */
static inline __m256 dot8_i8(const int8_t* w, const int16_t* a, int K) {
    __m256 halves[8];
    for (int j = 0; j < 8; j++) { /* one row at a time: each a sequential read (8 rows at once read slower) */
        const int8_t* wj = w + (size_t)j * K;
        __m512 sum = _mm512_setzero_ps();
        for (int k0 = 0; k0 < K; k0 += INT_RUN) {
            __m512i acc[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
            int k = k0;
            for (; k + 64 <= k0 + INT_RUN && k + 64 <= K; k += 64)
                for (int t = 0; t < 2; t++)
                    acc[t] = _mm512_dpwssd_epi32(acc[t], _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(wj + k + 32 * t))),
                                                 _mm512_loadu_si512((const void*)(a + k + 32 * t)));
            for (; k < k0 + INT_RUN && k < K; k += 32)
                acc[0] = _mm512_dpwssd_epi32(acc[0], _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(wj + k))), _mm512_loadu_si512((const void*)(a + k)));
            sum = _mm512_add_ps(sum, _mm512_cvtepi32_ps(_mm512_add_epi32(acc[0], acc[1])));
        }
        halves[j] = fold512(sum);
    }
    return hsum8(halves);
}

/* row [K] of bf16 values -> q [K] int16 with row ~ q * (returned scale) */
static float to_int16(const uint16_t* row, int K, int16_t* q) {
    float top = 0.f;
    for (int k = 0; k < K; k++) top = fmaxf(top, fabsf(from_bf16(row[k])));
    const float scale = top > 0.f ? top / 32767.f : 1.f;
    for (int k = 0; k < K; k++) q[k] = (int16_t)lrintf(from_bf16(row[k]) / scale);
    return scale;
}
#endif

/* 8 outputs n.. of the product with rows starting at w, for activation row a (bf16), or its int16 form aq
   times as (int8 weights: then scale holds the weight rows' scales) */
static inline __m256 product8(const void* w, const uint16_t* scale, int n, int K, const uint16_t* a, const int16_t* aq, float as) {
#ifdef INT8_PAIRS
    if (scale) return _mm256_mul_ps(_mm256_mul_ps(dot8_i8((const int8_t*)w + (size_t)n * K, aq, K), _mm256_set1_ps(as)), load8(scale, n, 1));
#endif
    (void)scale, (void)aq, (void)as;
    return dot8((const uint16_t*)w + (size_t)n * K, a, K);
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && !defined(BF16_PAIRS)
/* experts_swiglu's bf16 products for an expert of several rows (a prefill's ~16 rows an expert, or more): the
   same sums as product8 (dot8's), each weight widened once for all of the expert's rows. dot8 widens a
   weight row for each activation row it meets (this CPU has no bf16 arithmetic), so that a prefill spent
   most of its time widening; here a block of BF16_TILE_K k of the activation rows is widened once into the
   core's cache, and each weight row's 32 k are widened once in registers and multiplied into the
   accumulators of up to BF16_TILE_R rows, BF16_TILE_J weight rows at a time. Each (row, output) keeps the
   512-bit accumulator that dot8's two 256-bit ones are the halves of (the same unpack of each 16 k into two
   fp32 vectors, the same FMAs in the same order, the halves added and summed by hsum8 as there): the bits
   are dot8's, whatever the number of rows. */
#define BF16_WIDE 1
#define BF16_TILE_K 256 /* k widened at a time: a tile's rows and its weight rows stay in L1 */
#define BF16_TILE_R 8   /* activation rows a tile */
#define BF16_TILE_J 2   /* weight rows a tile: BF16_TILE_R x BF16_TILE_J accumulators in registers */
#define BF16_MAX_J 16   /* weight rows a work item (experts_swiglu's gate and up rows of 8 outputs) */
#define BF16_WIDE_MIN_ROWS 2 /* an expert's rows from which its products take this path (one, a decode step's, stays on dot8) */

/* rows a[r * K + k0 ..] (bf16), r < RN, kn k of each, as out[r * BF16_TILE_K ..] in fp32: each 32 k as dot_bf16's
   unpacks take them (unpacklo's 16, then unpackhi's) */
static inline void widen_rows(const uint16_t* a, int K, int RN, int k0, int kn, float* out) {
    const __m512i zero = _mm512_setzero_si512();
    for (int r = 0; r < RN; r++)
        for (int k = 0; k < kn; k += 32) {
            const __m512i v = _mm512_loadu_si512((const void*)(a + (size_t)r * K + k0 + k));
            _mm512_storeu_ps(out + r * BF16_TILE_K + k, _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, v)));
            _mm512_storeu_ps(out + r * BF16_TILE_K + k + 16, _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, v)));
        }
}

/* acc[r * BF16_MAX_J + j] += the products of weight rows w[j] + k0 (j < JN) with the widened rows xt (r < RN),
   kn k: JN and RN constants where inlined, so that the sums stay in registers */
static inline __attribute__((always_inline)) void wide_tile(const uint16_t* const* w, int k0, const float* xt, int kn, __m512* acc,
                                                            const int JN, const int RN) {
    const __m512i zero = _mm512_setzero_si512();
    __m512 s[BF16_TILE_J][BF16_TILE_R];
    for (int j = 0; j < JN; j++)
        for (int r = 0; r < RN; r++) s[j][r] = acc[r * BF16_MAX_J + j];
    for (int k = 0; k < kn; k += 32) {
        __m512 lo[BF16_TILE_J], hi[BF16_TILE_J];
        for (int j = 0; j < JN; j++) {
            const __m512i v = _mm512_loadu_si512((const void*)(w[j] + k0 + k));
            lo[j] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, v)), hi[j] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, v));
        }
        for (int r = 0; r < RN; r++) { /* per accumulator as dot_bf16: the unpacklo products, then the unpackhi ones */
            const __m512 xl = _mm512_loadu_ps(xt + r * BF16_TILE_K + k), xh = _mm512_loadu_ps(xt + r * BF16_TILE_K + k + 16);
            for (int j = 0; j < JN; j++) s[j][r] = _mm512_fmadd_ps(hi[j], xh, _mm512_fmadd_ps(lo[j], xl, s[j][r]));
        }
    }
    for (int j = 0; j < JN; j++)
        for (int r = 0; r < RN; r++) acc[r * BF16_MAX_J + j] = s[j][r];
}

static void wide_tile_rows(const uint16_t* const* w, int k0, const float* xt, int kn, __m512* acc, int RN) {
    switch (RN) {
    case 1: wide_tile(w, k0, xt, kn, acc, BF16_TILE_J, 1); break;
    case 2: wide_tile(w, k0, xt, kn, acc, BF16_TILE_J, 2); break;
    case 3: wide_tile(w, k0, xt, kn, acc, BF16_TILE_J, 3); break;
    case 4: wide_tile(w, k0, xt, kn, acc, BF16_TILE_J, 4); break;
    case 5: wide_tile(w, k0, xt, kn, acc, BF16_TILE_J, 5); break;
    case 6: wide_tile(w, k0, xt, kn, acc, BF16_TILE_J, 6); break;
    case 7: wide_tile(w, k0, xt, kn, acc, BF16_TILE_J, 7); break;
    default: wide_tile(w, k0, xt, kn, acc, BF16_TILE_J, BF16_TILE_R); break;
    }
}

/* the sums of weight rows w[j] (j < J: a multiple of 8, at most BF16_MAX_J; each K bf16) with activation rows
   a[r * K ..] (bf16, r < RN <= BF16_TILE_R): out[r * BF16_MAX_J / 8 + j / 8] holds outputs j / 8 * 8 .. + 7 of
   row r, as product8 gives them */
static void wide_products(const uint16_t* const* w, int J, const uint16_t* a, int K, int RN, __m256* out) {
    float xt[BF16_TILE_R * BF16_TILE_K] __attribute__((aligned(64)));
    __m512 acc[BF16_TILE_R * BF16_MAX_J];
    for (int i = 0; i < RN * BF16_MAX_J; i++) acc[i] = _mm512_setzero_ps();
    for (int k0 = 0; k0 < K; k0 += BF16_TILE_K) {
        const int kn = K - k0 < BF16_TILE_K ? K - k0 : BF16_TILE_K;
        widen_rows(a, K, RN, k0, kn, xt);
        for (int j = 0; j < J; j += BF16_TILE_J) wide_tile_rows(w + j, k0, xt, kn, acc + j, RN);
    }
    for (int r = 0; r < RN; r++)
        for (int g = 0; g < J / 8; g++) {
            __m256 sums[8];
            for (int j = 0; j < 8; j++) sums[j] = fold512(acc[r * BF16_MAX_J + 8 * g + j]);
            out[r * (BF16_MAX_J / 8) + g] = hsum8(sums);
        }
}

/* rows r0 .. r1 - 1 of x [., D] through 8 units n.. of the expert's h (gate_up [2F, D] bf16): the gate and up
   products as product8 gives them, then glu8 into h [., F] */
static void wide_gate_up(const void* gate_up, const uint16_t* x, int D, int F, int n, int r0, int r1, int act, uint16_t* h) {
    const uint16_t* w[16];
    for (int j = 0; j < 8; j++) w[j] = (const uint16_t*)gate_up + (size_t)(n + j) * D, w[8 + j] = (const uint16_t*)gate_up + (size_t)(F + n + j) * D;
    for (int r = r0; r < r1; r += BF16_TILE_R) {
        const int rn = r1 - r < BF16_TILE_R ? r1 - r : BF16_TILE_R;
        __m256 out[BF16_TILE_R * 2];
        wide_products(w, 16, x + (size_t)r * D, D, rn, out);
        for (int i = 0; i < rn; i++) glu8(act, out[2 * i], out[2 * i + 1], h + (size_t)(r + i) * F + n);
    }
}

/* rows r0 .. r1 - 1 of h [., F] through 8 outputs d.. of the expert's down [D, F] (bf16) into y [., D] */
static void wide_down(const void* down, const uint16_t* h, int D, int F, int d, int r0, int r1, float* y) {
    const uint16_t* w[8];
    for (int j = 0; j < 8; j++) w[j] = (const uint16_t*)down + (size_t)(d + j) * F;
    for (int r = r0; r < r1; r += BF16_TILE_R) {
        const int rn = r1 - r < BF16_TILE_R ? r1 - r : BF16_TILE_R;
        __m256 out[BF16_TILE_R * 2];
        wide_products(w, 8, h + (size_t)r * F, F, rn, out);
        for (int i = 0; i < rn; i++) _mm256_storeu_ps(y + (size_t)(r + i) * D + d, out[2 * i]);
    }
}
#endif

int experts_swiglu(const uint16_t* x, int D, int F, int E, const int* starts, const void* const* gate_up,
                   const void* const* down, const uint16_t* const* gate_up_scale, const uint16_t* const* down_scale,
                   float* y, int threads, int act) {
    const int int8 = gate_up_scale != NULL;
#ifndef INT8_PAIRS
    if (int8) return 1;
#endif
    if (D % 32 || F % 32 || E < 1 || (act != ACT_SILU && act != ACT_GELU_TANH)) return 1;
    for (int e = 0; e < E; e++)
        if (starts[e + 1] < starts[e] || (int8 && starts[e + 1] - starts[e] > EXPERT_MAX_ROWS)) return 1;
    const int R = starts[E], rows = R ? R : 1;
    uint16_t* h = malloc(sizeof(uint16_t) * (size_t)rows * F); /* [R, F] bf16 */
    int16_t *xq = NULL, *hq = NULL; /* int8 weights: the activations as int16, times xs[r], hs[r] */
    float *xs = NULL, *hs = NULL;
    if (int8) {
        xq = malloc(sizeof(int16_t) * (size_t)rows * D), hq = malloc(sizeof(int16_t) * (size_t)rows * F);
        xs = malloc(sizeof(float) * rows), hs = malloc(sizeof(float) * rows);
    }
    if (!h || (int8 && (!xq || !hq || !xs || !hs))) {
        free(h), free(xq), free(hq), free(xs), free(hs);
        return 2;
    }
    const int fb = F / 8, db = D / 8;
#pragma omp parallel num_threads(threads)
    {
#ifdef INT8_PAIRS
        if (int8) {
#pragma omp for schedule(static)
            for (int r = 0; r < R; r++) xs[r] = to_int16(x + (size_t)r * D, D, xq + (size_t)r * D);
        }
#endif
#pragma omp for schedule(static)
        for (long item = 0; item < (long)E * fb; item++) { /* 8 units of h: their gate and up rows */
            const int e = (int)(item / fb), n = (int)(item % fb) * 8;
#ifdef BF16_WIDE
            if (!int8 && starts[e + 1] - starts[e] >= BF16_WIDE_MIN_ROWS) {
                wide_gate_up(gate_up[e], x, D, F, n, starts[e], starts[e + 1], act, h);
                continue;
            }
#endif
            const uint16_t* scale = int8 ? gate_up_scale[e] : NULL;
            for (int r = starts[e]; r < starts[e + 1]; r++) {
                const uint16_t* a = x + (size_t)r * D;
                const int16_t* aq = int8 ? xq + (size_t)r * D : NULL;
                const float as = int8 ? xs[r] : 0.f;
                glu8(act, product8(gate_up[e], scale, n, D, a, aq, as), product8(gate_up[e], scale, F + n, D, a, aq, as), h + (size_t)r * F + n);
            }
        }
#ifdef INT8_PAIRS
        if (int8) {
#pragma omp for schedule(static)
            for (int r = 0; r < R; r++) hs[r] = to_int16(h + (size_t)r * F, F, hq + (size_t)r * F);
        }
#endif
#pragma omp for schedule(static)
        for (long item = 0; item < (long)E * db; item++) { /* 8 outputs */
            const int e = (int)(item / db), d = (int)(item % db) * 8;
#ifdef BF16_WIDE
            if (!int8 && starts[e + 1] - starts[e] >= BF16_WIDE_MIN_ROWS) {
                wide_down(down[e], h, D, F, d, starts[e], starts[e + 1], y);
                continue;
            }
#endif
            const uint16_t* scale = int8 ? down_scale[e] : NULL;
            for (int r = starts[e]; r < starts[e + 1]; r++)
                _mm256_storeu_ps(y + (size_t)r * D + d,
                                 product8(down[e], scale, d, F, h + (size_t)r * F, int8 ? hq + (size_t)r * F : NULL, int8 ? hs[r] : 0.f));
        }
    }
    free(h), free(xq), free(hq), free(xs), free(hs);
    return 0;
}

/* experts_swiglu_int4: the same for int4 experts in torch's CPU layout (`_convert_weight_to_int4pack_for_cpu`),
   where `_weight_int4pack_mm_for_cpu` widens every weight to fp32 for its FMAs. A matrix [N, K] is N / 64
   blocks of 64 rows, each K * 32 bytes in a row: byte (k, i) holds row i's k-th weight in its low nibble and
   row i + 32's in its high one; its (scale, zero) pairs are [K / G, N, 2] bf16, w = (nibble - 8) * scale +
   zero. Each activation row is taken as int8 in blocks of 32, one scale each (as llama.cpp's q8_0), and
   multiplied by the nibbles as bytes (VNNI's vpdpbusd), four k a lane: vpermt2b gathers a lane's four bytes
   from the four k's rows of 32 bytes, so each block is read as one sequential stream. Work items are
   (expert, 64 outputs). The rounding to bf16 is torch's, as above; the sums' order and the int8 activations
   (2^-8 of their block's largest value) differ from it. D and F multiples of 64 and of G, G a multiple of 32;
   0, 1 for sizes it cannot take (or a CPU without AVX512-VNNI and VBMI), 2 out of memory. */
#ifdef INT8_PAIRS
typedef struct {
    int8_t* q;
    float *scale, *sum;
    int32_t* bias;
} Int8Rows; /* R rows of K in to_int8_blocks' form */

/* row [K] bf16 -> row r of a: q [K] int8 with row[k] ~ q[k] * scale[k / 32]; bias[k / 32] = 8 x the sum of the
   block's q (what the weights' offset of 8 takes away), sum[k / G] = the sum of the group's q[k] * scale[k / 32]
   (what the zeros meet: so that the product is the int4 weights' with the int8 row, whatever the zeros) */
static void to_int8_blocks(const uint16_t* row, int K, int G, Int8Rows* a, int r) {
    int8_t* q = a->q + (size_t)r * K;
    float *scale = a->scale + (size_t)r * (K / 32), *sum = a->sum + (size_t)r * (K / G);
    int32_t* bias = a->bias + (size_t)r * (K / 32);
    for (int b = 0; b < K / 32; b++) {
        __m512 v[2];
        for (int t = 0; t < 2; t++)
            v[t] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(row + 32 * b + 16 * t))), 16));
        const float top = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
        const float s = top > 0.f ? top / 127.f : 1.f;
        __m512i total = _mm512_setzero_si512();
        for (int t = 0; t < 2; t++) { /* to nearest even, as lrintf */
            const __m512i qi = _mm512_cvtps_epi32(_mm512_div_ps(v[t], _mm512_set1_ps(s)));
            _mm_storeu_si128((__m128i*)(q + 32 * b + 16 * t), _mm512_cvtepi32_epi8(qi));
            total = _mm512_add_epi32(total, qi);
        }
        const int n = _mm512_reduce_add_epi32(total);
        scale[b] = s, bias[b] = 8 * n;
        if (b % (G / 32) == 0) sum[b / (G / 32)] = 0.f;
        sum[b / (G / 32)] += s * (float)n;
    }
}

static int int8_rows(Int8Rows* a, int R, int K, int G) {
    a->q = malloc((size_t)R * K), a->scale = malloc(sizeof(float) * R * (K / 32));
    a->bias = malloc(sizeof(int32_t) * R * (K / 32)), a->sum = malloc(sizeof(float) * R * (K / G));
    return a->q && a->scale && a->bias && a->sum;
}

static void free_int8_rows(Int8Rows* a) { free(a->q), free(a->scale), free(a->bias), free(a->sum); }

#endif

#if defined(INT8_PAIRS) && defined(__AVX512VBMI__)
#define INT4_BYTES 1


/* out[0..63] = the 64 rows of one block (blk; sz its first row's (scale, zero) pair in group 0, N rows a
   group) times activation row r of a */
static inline void dot64_i4(const uint8_t* blk, const uint16_t* sz, int N, int K, int G, const Int8Rows* a, int r, float* out) {
    const int8_t* q = a->q + (size_t)r * K;
    const float *scale = a->scale + (size_t)r * (K / 32), *sum = a->sum + (size_t)r * (K / G);
    const int32_t* bias = a->bias + (size_t)r * (K / 32);
    uint8_t lanes[2][64]; /* byte 4j + t of part p: k + t's byte for row 16p + j, of the 128 bytes of k .. k + 3 */
    for (int p = 0; p < 2; p++)
        for (int j = 0; j < 16; j++)
            for (int t = 0; t < 4; t++) lanes[p][4 * j + t] = (uint8_t)(32 * t + 16 * p + j);
    const __m512i gather[2] = {_mm512_loadu_si512(lanes[0]), _mm512_loadu_si512(lanes[1])}, nibble = _mm512_set1_epi8(0x0f);
    __m512 y[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()}; /* rows 16i .. */
    for (int g = 0; g < K / G; g++) {
        __m512 f[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int b = g * G / 32; b < (g + 1) * G / 32; b++) {
            __m512i acc[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
            for (int k = 32 * b; k < 32 * b + 32; k += 4) {
                const __m512i lo = _mm512_loadu_si512(blk + (size_t)k * 32), hi = _mm512_loadu_si512(blk + (size_t)k * 32 + 64);
                int32_t four;
                memcpy(&four, q + k, 4);
                const __m512i x = _mm512_set1_epi32(four);
                for (int p = 0; p < 2; p++) {
                    const __m512i w = _mm512_permutex2var_epi8(lo, gather[p], hi);
                    acc[p] = _mm512_dpbusd_epi32(acc[p], _mm512_and_si512(w, nibble), x);
                    acc[2 + p] = _mm512_dpbusd_epi32(acc[2 + p], _mm512_and_si512(_mm512_srli_epi16(w, 4), nibble), x);
                }
            }
            const __m512i offset = _mm512_set1_epi32(bias[b]);
            const __m512 s = _mm512_set1_ps(scale[b]);
            for (int i = 0; i < 4; i++) f[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[i], offset)), s, f[i]);
        }
        const uint16_t* pairs = sz + (size_t)g * N * 2;
        const __m512 xs = _mm512_set1_ps(sum[g]);
        for (int i = 0; i < 4; i++) {
            const __m512i sz16 = _mm512_loadu_si512(pairs + 32 * i); /* row 16i + j's scale | zero << 16 */
            const __m512 ws = _mm512_castsi512_ps(_mm512_slli_epi32(sz16, 16));
            const __m512 wz = _mm512_castsi512_ps(_mm512_and_si512(sz16, _mm512_set1_epi32((int)0xffff0000u)));
            y[i] = _mm512_fmadd_ps(ws, f[i], _mm512_fmadd_ps(wz, xs, y[i]));
        }
    }
    for (int i = 0; i < 4; i++) _mm512_storeu_ps(out + 16 * i, y[i]);
}
#endif

/* experts_swiglu_int4_tc: the same for int4 experts in CUDA's layout (`_convert_weight_to_int4pack` with 8
   inner k-tiles, what the GPU's tinygemm kernel reads), from their pinned host buffers: the CPU channel beside
   a GPU. torch's CUDA kernel lays each 8 rows out as K / 128 super-tiles of 512 bytes, each row's 128 k one
   64-byte piece of them: 16 int32, word 4m + j holding k 32j + 2m + {0, 1, 16, 17} (its bytes' low nibbles)
   and the same + 8 (high nibbles), j, m < 4 (int4mm.cu, `matrix_to_m16n8k16_Bint4_layout`). So each
   activation row is rearranged once into that order, and a row's super-tile is two vpdpbusd of its masked
   nibbles against it: no shuffle of the weights. Work items are (expert, 8 outputs), the 8 rows one stream of
   K / 2 x 8 bytes, and each prefetches the next item's (4 KB for K = 1024: the hardware's prefetcher stops
   at each page, and without this the kernel read 18-25 GB/s where it now reads 31-41 on 2 cores); the rows'
   scale and zero lines, N pairs apart, are read all at once first. Rows an expert: any. D and F multiples of 128 and of G; 0, 1 for sizes it cannot take (or
   without AVX512-VNNI), 2 out of memory. */
#ifdef INT8_PAIRS
typedef struct {
    int8_t *low, *high; /* [R, K / 128, 64]: the int8 row in the order of the weights' low and high nibbles */
    int32_t* bias;      /* [R, K / 128, 16]: 8 x the sum of each word's 8 activations */
} TileRows;

static int tile_rows(TileRows* t, int R, int K) {
    t->low = malloc((size_t)R * K / 2), t->high = malloc((size_t)R * K / 2), t->bias = malloc(sizeof(int32_t) * R * (K / 128) * 16);
    return t->low && t->high && t->bias;
}

static void free_tile_rows(TileRows* t) { free(t->low), free(t->high), free(t->bias); }

/* row r of a (to_int8_blocks' q) in the weights' order */
static void to_tiles(const Int8Rows* a, int r, int K, TileRows* t) {
    const int8_t* q = a->q + (size_t)r * K;
    int8_t *low = t->low + (size_t)r * K / 2, *high = t->high + (size_t)r * K / 2;
    int32_t* bias = t->bias + (size_t)r * (K / 128) * 16;
    static const int at[4] = {0, 16, 1, 17}; /* byte b of word 4m + j: k 32j + 2m + at[b] (+ 8 in the high nibble) */
    uint8_t order[64]; /* byte 4(4m + j) + b of a super-tile's low part: its k */
    for (int m = 0; m < 4; m++)
        for (int j = 0; j < 4; j++)
            for (int b = 0; b < 4; b++) order[4 * (4 * m + j) + b] = (uint8_t)(32 * j + 2 * m + at[b]);
#ifdef __AVX512VBMI__ /* one byte permutation of the super-tile's 128 activations each, and the words' sums by VNNI */
    const __m512i lows = _mm512_loadu_si512(order), highs = _mm512_add_epi8(lows, _mm512_set1_epi8(8)), ones = _mm512_set1_epi8(1);
    for (int s = 0; s < K / 128; s++) {
        const __m512i first = _mm512_loadu_si512(q + 128 * s), second = _mm512_loadu_si512(q + 128 * s + 64);
        const __m512i l = _mm512_permutex2var_epi8(first, lows, second), h = _mm512_permutex2var_epi8(first, highs, second);
        _mm512_storeu_si512(low + 64 * s, l);
        _mm512_storeu_si512(high + 64 * s, h);
        const __m512i total = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, l), ones, h);
        _mm512_storeu_si512(bias + 16 * s, _mm512_slli_epi32(total, 3));
    }
#else
    for (int s = 0; s < K / 128; s++)
        for (int w = 0; w < 16; w++) {
            int total = 0;
            for (int b = 0; b < 4; b++) {
                total += low[64 * s + 4 * w + b] = q[128 * s + order[4 * w + b]];
                total += high[64 * s + 4 * w + b] = q[128 * s + order[4 * w + b] + 8];
            }
            bias[16 * s + w] = 8 * total;
        }
#endif
}

/* the 8 rows of a tile times activation row r over super-tiles s0 .. s1 - 1, each row's lanes summed in f[i]
   in fp32 with the activations' scales; scaled by the weights' (scales [K / G][8], fp32) here where a
   super-tile holds several groups (G 32 or 64: lane 4m + j's group is (128s + 32j) / G), else by the caller,
   once a group */
static inline void tiles8(const uint8_t* tile, size_t ahead, const float* scales, int G, const int8_t* low, const int8_t* high,
                          const int32_t* bias, const float* scale, int s0, int s1, __m512* f) {
    const __m512i nibble = _mm512_set1_epi8(0x0f);
    for (int s = s0; s < s1; s++) {
        const __m512i xl = _mm512_loadu_si512(low + 64 * s), xh = _mm512_loadu_si512(high + 64 * s), b = _mm512_loadu_si512(bias + 16 * s);
        const __m512 as = _mm512_broadcast_f32x4(_mm_loadu_ps(scale + 4 * s)); /* lane 4m + j: block 4s + j's scale */
        for (int i = 0; i < 8; i++) {
            const __m512i w = _mm512_loadu_si512(tile + (size_t)512 * s + 64 * i);
            _mm_prefetch((const char*)tile + ahead + (size_t)512 * s + 64 * i, _MM_HINT_T0);
            __m512i acc = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(w, nibble), xl);
            acc = _mm512_dpbusd_epi32(acc, _mm512_and_si512(_mm512_srli_epi16(w, 4), nibble), xh);
            __m512 c = as;
            if (G < 128) {
                float ws[4];
                for (int j = 0; j < 4; j++) ws[j] = scales[8 * ((128 * s + 32 * j) / G) + i];
                c = _mm512_mul_ps(as, _mm512_broadcast_f32x4(_mm_loadu_ps(ws)));
            }
            f[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc, b)), c, f[i]);
        }
    }
}

/* out[0..7] = the 8 rows of one tile (sz: its first row's (scale, zero) pair in group 0, N rows a group) times
   activation row r */
static inline void dot8_tiles(const uint8_t* tile, const uint16_t* sz, int N, int K, int G, const Int8Rows* a, const TileRows* t, int r, float* out) {
    const int8_t *low = t->low + (size_t)r * K / 2, *high = t->high + (size_t)r * K / 2;
    const int32_t* bias = t->bias + (size_t)r * (K / 128) * 16;
    const float *scale = a->scale + (size_t)r * (K / 32), *sum = a->sum + (size_t)r * (K / G);
    /* the rows' (scale, zero) pairs first, all their lines (N pairs apart: no stream the prefetcher follows)
       read at once rather than one group after another: row i's at 32 bits i of a group's 256 */
    const int groups = K / G;
    float scales[groups * 8];
    __m256 zeros = _mm256_setzero_ps(); /* the 8 rows' zeros times each group's activation sum */
    for (int g = 0; g < groups; g++) {
        const __m256i pairs = _mm256_loadu_si256((const __m256i*)(sz + (size_t)g * N * 2));
        _mm256_storeu_ps(scales + 8 * g, _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16)));
        zeros = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(pairs, _mm256_set1_epi32((int)0xffff0000u))), _mm256_set1_ps(sum[g]), zeros);
    }
    __m512 f[8];
    for (int i = 0; i < 8; i++) f[i] = _mm512_setzero_ps();
    if (G < 128)
        tiles8(tile, (size_t)4 * K, scales, G, low, high, bias, scale, 0, K / 128, f);
    else
        for (int g = 0; g < groups; g++) { /* G / 128 super-tiles, one weight scale a row */
            __m512 fg[8];
            for (int i = 0; i < 8; i++) fg[i] = _mm512_setzero_ps();
            tiles8(tile, (size_t)4 * K, scales, G, low, high, bias, scale, g * G / 128, (g + 1) * G / 128, fg);
            for (int i = 0; i < 8; i++) f[i] = _mm512_fmadd_ps(fg[i], _mm512_set1_ps(scales[8 * g + i]), f[i]);
        }
    __m256 sums[8];
    for (int i = 0; i < 8; i++) sums[i] = fold512(f[i]);
    _mm256_storeu_ps(out, _mm256_add_ps(hsum8(sums), zeros));
}

/* out[0 .. W - 1] = rows n .. n + W - 1 of int4 matrix w [N, K] (sz its (scale, zero) pairs) times activation row r:
   a block of the CPU's layout (W 64) or a tile of CUDA's (W 8); either starts n * K / 2 bytes in */
static inline void int4_rows(int cuda, const uint8_t* w, const uint16_t* sz, int n, int N, int K, int G, const Int8Rows* a,
                             const TileRows* t, int r, float* out) {
    (void)cuda; /* only CUDA's layout where the CPU lacks VBMI */
#ifdef INT4_BYTES
    if (!cuda) {
        dot64_i4(w + (size_t)n * K / 2, sz + 2 * n, N, K, G, a, r, out);
        return;
    }
#endif
    dot8_tiles(w + (size_t)n * K / 2, sz + 2 * n, N, K, G, a, t, r, out);
}

/* experts_swiglu_int4 (cuda 0) and experts_swiglu_int4_tc (cuda 1), as their comments above say */
static int int4_swiglu(int cuda, const uint16_t* x, int D, int F, int E, const int* starts, const uint8_t* const* gate_up,
                       const uint8_t* const* down, const uint16_t* const* gate_up_sz, const uint16_t* const* down_sz, int G,
                       float* y, int threads, int act) {
    const int W = cuda ? 8 : 64, multiple = cuda ? 128 : 64; /* rows a work item; D and F are multiples of this */
    if (D % multiple || F % multiple || G < 32 || G % 32 || D % G || F % G || E < 1 || (act != ACT_SILU && act != ACT_GELU_TANH)) return 1;
    for (int e = 0; e < E; e++)
        if (starts[e + 1] < starts[e] || (!cuda && starts[e + 1] - starts[e] > EXPERT_MAX_ROWS)) return 1;
    const int R = starts[E], rows = R ? R : 1;
    uint16_t* h = malloc(sizeof(uint16_t) * (size_t)rows * F); /* [R, F] bf16 */
    Int8Rows xq, hq;
    TileRows xt = {0}, ht = {0}; /* CUDA's layout: the int8 rows in its tiles' order */
    int ok = int8_rows(&xq, rows, D, G) & int8_rows(&hq, rows, F, G);
    if (cuda) ok &= tile_rows(&xt, rows, D) & tile_rows(&ht, rows, F);
    if (!h || !ok) {
        free(h), free_int8_rows(&xq), free_int8_rows(&hq), free_tile_rows(&xt), free_tile_rows(&ht);
        return 2;
    }
    const int fb = F / W, db = D / W;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int r = 0; r < R; r++) {
            to_int8_blocks(x + (size_t)r * D, D, G, &xq, r);
            if (cuda) to_tiles(&xq, r, D, &xt);
        }
#pragma omp for schedule(static)
        for (long item = 0; item < (long)E * fb; item++) { /* W units of h: their gate and up rows */
            const int e = (int)(item / fb), n = (int)(item % fb) * W;
            for (int r = starts[e]; r < starts[e + 1]; r++) {
                float g[64], u[64];
                int4_rows(cuda, gate_up[e], gate_up_sz[e], n, 2 * F, D, G, &xq, &xt, r, g);
                int4_rows(cuda, gate_up[e], gate_up_sz[e], F + n, 2 * F, D, G, &xq, &xt, r, u);
                for (int j = 0; j < W; j += 8) glu8(act, _mm256_loadu_ps(g + j), _mm256_loadu_ps(u + j), h + (size_t)r * F + n + j);
            }
        }
#pragma omp for schedule(static)
        for (int r = 0; r < R; r++) {
            to_int8_blocks(h + (size_t)r * F, F, G, &hq, r);
            if (cuda) to_tiles(&hq, r, F, &ht);
        }
#pragma omp for schedule(static)
        for (long item = 0; item < (long)E * db; item++) { /* W outputs */
            const int e = (int)(item / db), d = (int)(item % db) * W;
            for (int r = starts[e]; r < starts[e + 1]; r++) int4_rows(cuda, down[e], down_sz[e], d, D, F, G, &hq, &ht, r, y + (size_t)r * D + d);
        }
    }
    free(h), free_int8_rows(&xq), free_int8_rows(&hq), free_tile_rows(&xt), free_tile_rows(&ht);
    return 0;
}
#endif

int experts_swiglu_int4(const uint16_t* x, int D, int F, int E, const int* starts, const uint8_t* const* gate_up,
                        const uint8_t* const* down, const uint16_t* const* gate_up_sz, const uint16_t* const* down_sz, int G,
                        float* y, int threads, int act) {
#ifndef INT4_BYTES
    (void)x, (void)D, (void)F, (void)E, (void)starts, (void)gate_up, (void)down, (void)gate_up_sz, (void)down_sz, (void)G, (void)y, (void)threads, (void)act;
    return 1;
#else
    return int4_swiglu(0, x, D, F, E, starts, gate_up, down, gate_up_sz, down_sz, G, y, threads, act);
#endif
}

int experts_swiglu_int4_tc(const uint16_t* x, int D, int F, int E, const int* starts, const uint8_t* const* gate_up,
                           const uint8_t* const* down, const uint16_t* const* gate_up_sz, const uint16_t* const* down_sz, int G,
                           float* y, int threads, int act) {
#ifndef INT8_PAIRS
    (void)x, (void)D, (void)F, (void)E, (void)starts, (void)gate_up, (void)down, (void)gate_up_sz, (void)down_sz, (void)G, (void)y, (void)threads, (void)act;
    return 1;
#else
    return int4_swiglu(1, x, D, F, E, starts, gate_up, down, gate_up_sz, down_sz, G, y, threads, act);
#endif
}

/* experts_swiglu_fp8: the same for FP8 experts as DeepSeek-V3, Qwen3-FP8, GLM-4.5-FP8 and MiniMax-M2 publish them
   (`formats.Fp8`, `moe_local/weights/fp8.py`): e4m3 weights [N, K] with one fp32 scale per block of BN rows by BK
   columns, [ceil(M / BN), ceil(K / BK)] per matrix of M rows (gate_up: its gate rows' blocks, then its up rows'),
   the last blocks ragged. An e4m3 byte becomes an fp16 by two instructions (sign-extended to 16 bits and shifted
   left by 7, bit 14 cleared: the same sign, exponent and mantissa under fp16's exponent bias, so the value times
   2^-8, subnormals included), fp16 becomes fp32 by F16C, and FMAs meet the activations in fp32 (AVX512F, 16
   lanes, where the CPU has it, else AVX2's 8); with AVX512BW, 64 bytes without a zero or subnormal (most) go to
   fp32 directly (e4m3x16_normal), two rows at a time, the rows prefetched ahead. Each block's sums are scaled by
   its scale, the row's by 2^-8 (or 2^8 where all went by F16C). The
   rounding to bf16 is torch's, as above (the products, silu, h); the sums' order differs from a matmul on the
   dequantized weights, and a weight meets its block's scale after the block's sum instead of before. D and F
   multiples of 32, BK of 16, at most 16 rows an expert; 0, 1 for sizes it cannot take, 2 out of memory. */
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define FP8_512 1
#endif

#ifdef FP8_512
static inline __m512 e4m3x16(const uint8_t* p) { /* 16 e4m3 values times 2^-8 */
    const __m256i h = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)p));
    return _mm512_cvtph_ps(_mm256_and_si256(_mm256_slli_epi16(h, 7), _mm256_set1_epi16((short)0xBFFF)));
}
#else
static inline __m256 e4m3x8(const uint8_t* p) { /* 8 e4m3 values times 2^-8 */
    const __m128i h = _mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i*)p));
    return _mm256_cvtph_ps(_mm_and_si128(_mm_slli_epi16(h, 7), _mm_set1_epi16((short)0xBFFF)));
}
#endif

#ifdef FP8_512
/* 16 e4m3 values times 2^8, where none is zero or subnormal: three instructions where e4m3x16 takes five. The byte
   sign-extended to 32 bits and shifted left by 20 has its sign, exponent and mantissa at fp32's bits 27..20 and the
   sign's copies above; keeping bit 31 and bits 26..20 and setting bit 30 (one ternary-logic instruction) makes
   fp32's exponent 128 + e: 2^(e + 1) (1 + m / 8), the value times 2^8. (An exponent of 0 would be read as 1.) */
static inline __m512 e4m3x16_normal(const uint8_t* p) {
    const __m512i v = _mm512_slli_epi32(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)), 20);
    return _mm512_castsi512_ps(_mm512_ternarylogic_epi32(v, _mm512_set1_epi32((int)0x87F00000), _mm512_set1_epi32(0x40000000), 0xEA));
}
#endif

#ifndef FP8_512
/* w [K] e4m3 . a [K] fp32, the sum of each block of BK columns times its scale s[c] */
static inline float dot_fp8(const uint8_t* w, const float* a, int K, const float* s, int BK) {
    __m256 total = _mm256_setzero_ps();
    for (int k0 = 0, c = 0; k0 < K; k0 += BK, c++) {
        const int end = k0 + BK < K ? k0 + BK : K;
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        for (int k = k0; k < end; k += 16) {
            acc0 = _mm256_fmadd_ps(e4m3x8(w + k), _mm256_loadu_ps(a + k), acc0);
            acc1 = _mm256_fmadd_ps(e4m3x8(w + k + 8), _mm256_loadu_ps(a + k + 8), acc1);
        }
        total = _mm256_fmadd_ps(_mm256_add_ps(acc0, acc1), _mm256_set1_ps(s[c]), total);
    }
    return hsum(total) * 256.f;
}
#endif

#ifdef FP8_512
#define FP8_AHEAD 512 /* bytes of a row prefetched ahead of the 64 read: 1.1-1.2x faster a call, measured */

/* w0 [K] and w1 [K] e4m3 . a [K] fp32 (two rows at once: each activation read once for both), each block of BK
   columns' sum times its scale (s0[c], s1[c]); out[0], out[1]. 64 weights of a row at a time by e4m3x16_normal where
   none of the 128 has exponent 0 (zeros and subnormals: one in a few thousand of a published matrix's weights), else
   by e4m3x16 times 2^16: the same values times 2^8, exactly */
static inline void dot2_fp8(const uint8_t* w0, const uint8_t* w1, const float* a, int K, const float* s0, const float* s1, int BK, float* out) {
    const __m512 up = _mm512_set1_ps(65536.f);
    const __m512i exponent = _mm512_set1_epi8(0x78);
    __m512 total0 = _mm512_setzero_ps(), total1 = _mm512_setzero_ps();
    for (int k0 = 0, c = 0; k0 < K; k0 += BK, c++) {
        const int end = k0 + BK < K ? k0 + BK : K;
        __m512 acc0[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()}, acc1[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
        int k = k0;
        for (; k + 64 <= end; k += 64) {
            _mm_prefetch((const char*)(w0 + k + FP8_AHEAD), _MM_HINT_T0), _mm_prefetch((const char*)(w1 + k + FP8_AHEAD), _MM_HINT_T0);
            const __mmask64 sub = _mm512_testn_epi8_mask(_mm512_loadu_si512((const void*)(w0 + k)), exponent) |
                                  _mm512_testn_epi8_mask(_mm512_loadu_si512((const void*)(w1 + k)), exponent);
            for (int t = 0; t < 4; t++) {
                const __m512 x = _mm512_loadu_ps(a + k + 16 * t);
                const __m512 v0 = sub ? _mm512_mul_ps(e4m3x16(w0 + k + 16 * t), up) : e4m3x16_normal(w0 + k + 16 * t);
                const __m512 v1 = sub ? _mm512_mul_ps(e4m3x16(w1 + k + 16 * t), up) : e4m3x16_normal(w1 + k + 16 * t);
                acc0[t & 1] = _mm512_fmadd_ps(v0, x, acc0[t & 1]);
                acc1[t & 1] = _mm512_fmadd_ps(v1, x, acc1[t & 1]);
            }
        }
        for (; k < end; k += 16) {
            const __m512 x = _mm512_loadu_ps(a + k);
            acc0[0] = _mm512_fmadd_ps(_mm512_mul_ps(e4m3x16(w0 + k), up), x, acc0[0]);
            acc1[0] = _mm512_fmadd_ps(_mm512_mul_ps(e4m3x16(w1 + k), up), x, acc1[0]);
        }
        total0 = _mm512_fmadd_ps(_mm512_add_ps(acc0[0], acc0[1]), _mm512_set1_ps(s0[c]), total0);
        total1 = _mm512_fmadd_ps(_mm512_add_ps(acc1[0], acc1[1]), _mm512_set1_ps(s1[c]), total1);
    }
    out[0] = _mm512_reduce_add_ps(total0) * (1.f / 256.f), out[1] = _mm512_reduce_add_ps(total1) * (1.f / 256.f);
}
#endif

/* 8 outputs n.. of an FP8 matrix of K columns whose sub-matrices have M rows each (gate_up: F; down: D) */
static inline __m256 product8_fp8(const uint8_t* w, const float* scale, int n, int K, int M, int BN, int BK, const float* a) {
    const int sk = (K + BK - 1) / BK, sm = (M + BN - 1) / BN;
    float out[8];
#ifdef FP8_512
    for (int j = 0; j < 8; j += 2) {
        const int row = n + j, srow0 = row / M * sm + row % M / BN, srow1 = (row + 1) / M * sm + (row + 1) % M / BN;
        dot2_fp8(w + (size_t)row * K, w + (size_t)(row + 1) * K, a, K, scale + (size_t)srow0 * sk, scale + (size_t)srow1 * sk, BK, out + j);
    }
#else
    for (int j = 0; j < 8; j++) {
        const int row = n + j, srow = row / M * sm + row % M / BN;
        out[j] = dot_fp8(w + (size_t)row * K, a, K, scale + (size_t)srow * sk, BK);
    }
#endif
    return _mm256_loadu_ps(out);
}

int experts_swiglu_fp8(const uint16_t* x, int D, int F, int E, const int* starts, const uint8_t* const* gate_up,
                       const uint8_t* const* down, const float* const* gate_up_scale, const float* const* down_scale,
                       int BN, int BK, float* y, int threads) {
    if (D % 32 || F % 32 || BN < 1 || BK < 16 || BK % 16 || E < 1) return 1;
    for (int e = 0; e < E; e++)
        if (starts[e + 1] < starts[e] || starts[e + 1] - starts[e] > EXPERT_MAX_ROWS) return 1;
    const int R = starts[E], rows = R ? R : 1;
    float *xf = malloc(sizeof(float) * (size_t)rows * D), *hf = malloc(sizeof(float) * (size_t)rows * F); /* [R, D], [R, F] */
    uint16_t* h = malloc(sizeof(uint16_t) * (size_t)rows * F);                                           /* [R, F] bf16 */
    if (!xf || !hf || !h) return free(xf), free(hf), free(h), 2;
    const int fb = F / 8, db = D / 8;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (long i = 0; i < (long)R * D; i++) xf[i] = from_bf16(x[i]);
#pragma omp for schedule(static)
        for (long item = 0; item < (long)E * fb; item++) { /* 8 units of h: their gate and up rows */
            const int e = (int)(item / fb), n = (int)(item % fb) * 8;
            for (int r = starts[e]; r < starts[e + 1]; r++) {
                const float* a = xf + (size_t)r * D;
                glu8(ACT_SILU, product8_fp8(gate_up[e], gate_up_scale[e], n, D, F, BN, BK, a),
                        product8_fp8(gate_up[e], gate_up_scale[e], F + n, D, F, BN, BK, a), h + (size_t)r * F + n);
            }
        }
#pragma omp for schedule(static)
        for (long i = 0; i < (long)R * F; i++) hf[i] = from_bf16(h[i]);
#pragma omp for schedule(static)
        for (long item = 0; item < (long)E * db; item++) { /* 8 outputs */
            const int e = (int)(item / db), d = (int)(item % db) * 8;
            for (int r = starts[e]; r < starts[e + 1]; r++)
                _mm256_storeu_ps(y + (size_t)r * D + d, product8_fp8(down[e], down_scale[e], d, F, D, BN, BK, hf + (size_t)r * F));
        }
    }
    free(xf), free(hf), free(h);
    return 0;
}

/* experts_decode: one decode token through k of a layer's SwiGLU (or GeGLU: `act`) experts (ids [k], routing weights w [k] fp32)
   by experts_swiglu or experts_swiglu_int4, mixed as `runtime.weigh` mixes them: each expert's output rounded to
   bf16, times its weight, rounded, the k summed in fp32 and rounded: y [D] bf16. For `InPlaceExperts`
   (`formats.DecodeTable`), where building the k experts' pointer arrays in Python and mixing their outputs by
   torch operations took ~35 us a layer. The layer's experts are a table by expert id. */
typedef struct {
    int kind, D, F, G, E;                  /* kind: 0 bf16, 1 int8, 2 int4 in the CPU's layout (groups of G), 3 fp8 (blocks of BN x G),
                                              4 a GGUF's ggml blocks (experts_ggml) */
    const void* const* gate_up;            /* [E] */
    const void* const* down;               /* [E] */
    const uint16_t* const* gate_up_scale;  /* [E]: int8, the rows' scales; int4, the (scale, zero) pairs; fp8, the blocks' fp32 scales; bf16, NULL */
    const uint16_t* const* down_scale;
    int BN;                                /* fp8: the rows of a block */
    int act;                               /* ACT_SILU, or ACT_GELU_TANH (not fp8) */
    const uint8_t* const* types;           /* [E]: ggml, each expert's two type codes */
} ExpertTable;

int experts_ggml(const float* x, int D, int F, int E, const int* starts, const uint8_t* const* gate_up, const uint8_t* const* down,
                 const uint8_t* const* types, float* y, int threads, int act);

#define DECODE_MAX_K 64

/* experts_decode: R tokens' k experts each (ids [R, k], weights w [R, k] fp32) through the layer's table, each expert
   once for all the tokens that chose it (its rows together, in runs of at most EXPERT_MAX_ROWS; the experts in the
   order the tokens first chose them, as `runtime.mix` runs them), then each token's outputs mixed as `runtime.weigh`
   does: y [R, D] bf16. A token's sums do not depend on the others, so a batch's rows are its single rows bit for
   bit. 0, 1 for sizes, ids or a kind it cannot take (as its kernel), 2 out of memory */
int experts_decode(const ExpertTable* t, const uint16_t* x, int R, const int64_t* ids, const float* w, int k, uint16_t* y, int threads) {
    const int D = t->D, P = R * k; /* P (token, choice) pairs, pair p = r * k + j */
    if (R < 1 || k < 1 || k > DECODE_MAX_K || t->kind < 0 || t->kind > 4 || (t->kind == 3 && t->act != ACT_SILU)) return 1;
    for (int p = 0; p < P; p++)
        if (ids[p] < 0 || ids[p] >= t->E) return 1;
    int *first = malloc(sizeof(int) * t->E), *count = calloc(t->E, sizeof(int)), *slot = malloc(sizeof(int) * P), *starts = malloc(sizeof(int) * (P + 1));
    const void **gate_up = malloc(sizeof(void*) * P), **down = malloc(sizeof(void*) * P);
    const uint16_t **gate_up_scale = malloc(sizeof(void*) * P), **down_scale = malloc(sizeof(void*) * P);
    const uint8_t** types = malloc(sizeof(void*) * P);
    uint16_t* xs = malloc(sizeof(uint16_t) * (size_t)P * D); /* each pair's token row, grouped by expert */
    float* out = malloc(sizeof(float) * (size_t)P * D);
    float* xf = t->kind == 4 ? malloc(sizeof(float) * (size_t)P * D) : NULL; /* ggml: the rows in fp32 */
    int code = !first || !count || !slot || !starts || !gate_up || !down || !gate_up_scale || !down_scale || !types || !xs || !out || (t->kind == 4 && !xf) ? 2 : 0;
    if (!code) {
        int n = 0, experts = 0; /* rows placed; entries */
        for (int e = 0; e < t->E; e++) first[e] = -1;
        for (int p = 0; p < P; p++) count[ids[p]]++;
        for (int p = 0; p < P; p++) { /* an expert's rows at its first choice, in the pairs' order, split into runs */
            const int e = (int)ids[p];
            if (first[e] >= 0) continue;
            first[e] = n;
            for (int at = 0; at < count[e]; at += EXPERT_MAX_ROWS) {
                gate_up[experts] = t->gate_up[e], down[experts] = t->down[e], starts[experts] = n + at;
                gate_up_scale[experts] = t->gate_up_scale ? t->gate_up_scale[e] : NULL;
                down_scale[experts] = t->down_scale ? t->down_scale[e] : NULL;
                types[experts++] = t->types ? t->types[e] : NULL;
            }
            n += count[e];
        }
        starts[experts] = n;
        for (int e = 0; e < t->E; e++) count[e] = 0;
        for (int p = 0; p < P; p++) {
            slot[p] = first[ids[p]] + count[ids[p]]++;
            memcpy(xs + (size_t)slot[p] * D, x + (size_t)(p / k) * D, sizeof(uint16_t) * D);
        }
        if (xf)
            for (size_t i = 0; i < (size_t)P * D; i++) xf[i] = from_bf16(xs[i]);
        code = t->kind == 4 ? experts_ggml(xf, D, t->F, experts, starts, (const uint8_t* const*)gate_up, (const uint8_t* const*)down, types, out, threads, t->act)
             : t->kind == 3 ? experts_swiglu_fp8(xs, D, t->F, experts, starts, (const uint8_t* const*)gate_up, (const uint8_t* const*)down,
                                                 (const float* const*)gate_up_scale, (const float* const*)down_scale, t->BN, t->G, out, threads)
             : t->kind == 2 ? experts_swiglu_int4(xs, D, t->F, experts, starts, (const uint8_t* const*)gate_up, (const uint8_t* const*)down,
                                                  gate_up_scale, down_scale, t->G, out, threads, t->act)
                            : experts_swiglu(xs, D, t->F, experts, starts, gate_up, down, t->kind ? gate_up_scale : NULL,
                                             t->kind ? down_scale : NULL, out, threads, t->act);
    }
    if (!code)
        for (int r = 0; r < R; r++)
            for (int d = 0; d < D; d++) {
                float sum = 0.f;
                for (int j = 0; j < k; j++) sum += from_bf16(to_bf16(from_bf16(to_bf16(out[(size_t)slot[r * k + j] * D + d])) * w[r * k + j]));
                y[(size_t)r * D + d] = to_bf16(sum);
            }
    free(first), free(count), free(slot), free(starts), free(gate_up), free(down), free(gate_up_scale), free(down_scale), free(types);
    free(xs), free(out), free(xf);
    return code;
}

/* attention_step: a decode step's R tokens (one per sequence) through a layer's resident attention block, for
   `moe_local/cpu_attention.py` (`Fused`): x' = x + o(attention(rope(qkv(norm(x))))) and h = ffn_norm(x'), the
   MoE's input, in one call where torch takes ~25 operations a layer (and the interpreter between them most of
   the time: ~100 us a layer of the llama.cpp comparison's model, docs/measurements.md). Each value is rounded to
   bf16 where the model's torch operations round it: the norms (computed in fp32, rounded, then times the
   weight), each projection (once; an int8 or int4 projection's bias is added after, as `Int8Linear` and
   `Int4Linear` add it), rope's two products and their sum, the residual sum. int8 and int4 projections take
   the activations as `int8_linear` and `int4_linear` do, and the attention is `attend` (the kernels those steps
   call): so the norms' and bf16 projections' orders of sums are all that differs from the torch operations.
   The projections read each weight once for the R rows. Row r's key and value are written at position pos[r]
   of its sequence's caches k_cache[r], v_cache[r] (head h's position s at h * head + s * head_dim), and it
   attends to their positions 0 .. pos[r]; a sliding layer's cache of `positions` < its context is a ring
   (`model.Attention._ring`): position p in slot p % positions, and the token attends to every slot written,
   its window (in the slots' order, where the torch operations take the positions' order: the order of the
   attention's sums differs). Gemma 4's block (`model.QKNorm`'s v norm, `model.Attention.values_from_keys`, `Block`'s
   sandwich norms) as the layer's record says: the values RMS-normalised per head without a weight (v_norm); no value
   rows in the projection, the values the keys' projection before their norm and rope (values_from_keys); the
   output projection normalised (out_norm) before the residual sum; no ffn_norm: the MoE takes x' itself (h_out
   is not written). */
typedef struct {
    const void* w;         /* [N, K]: bf16; int8 with one bf16 scale per row (scale [N]); int4 in groups of `group`
                              in the CPU's layout (scale: the (scale, zero) pairs [K / group, N, 2], as int4_linear) */
    const uint16_t* scale; /* NULL: bf16 */
    const uint16_t* bias;  /* [N] bf16, or NULL */
    int N, K, group;       /* group 0: not int4 */
} Proj;

typedef struct {
    int dim, heads, kv_heads, head_dim, rot_dim, qk_norm; /* qk_norm: 0 none, 1 per head, 2 over the whole q and k */
    int window;                                           /* a sliding layer's window, or 0 */
    int v_norm, values_from_keys;                         /* Gemma 4's: 1 where the layer has them */
    float eps, scale;
    const uint16_t *attention_norm, *ffn_norm, *q_norm, *k_norm; /* ffn_norm NULL: the MoE takes x' (Gemma 4) */
    const uint16_t* out_norm;                                    /* the output projection's norm (Gemma 4), or NULL */
    const float* sinks;                                          /* [heads] (gpt-oss), or NULL */
    Proj qkv, o;
} AttentionLayer;

/* out [n] = w * rms_norm(x [n]) as `RMSNorm` computes it: in fp32, rounded to bf16, then times w (rounded); w NULL:
   rms_norm(x) rounded once (Gemma 4's v norm, `F.rms_norm` without a weight). out may be x */
static void rms_norm(const uint16_t* x, int n, const uint16_t* w, float eps, uint16_t* out) {
    __m256 acc = _mm256_setzero_ps();
    for (int i = 0; i < n; i += 8) {
        const __m256 v = load8(x, i, 1);
        acc = _mm256_fmadd_ps(v, v, acc);
    }
    const float r = 1.f / sqrtf(hsum(acc) / (float)n + eps);
    if (!w)
        for (int i = 0; i < n; i++) out[i] = to_bf16(from_bf16(x[i]) * r);
    else
        for (int i = 0; i < n; i++) out[i] = to_bf16(from_bf16(to_bf16(from_bf16(x[i]) * r)) * from_bf16(w[i]));
}

/* what a projection's kernel takes of activation rows a [R, K]: a itself (bf16 weights), their int16 forms q
   times scale[r] (int8), or their int8 blocks (int4: an Int8Rows of R rows) */
typedef struct {
    const uint16_t* a;
    int16_t* q;
    float* scale;
    void* blocks;
} Act;

/* act for p's product with a [R, K]; 0, or 2 out of memory (then `release` it all the same) */
static int prepare(const Proj* p, const uint16_t* a, int R, Act* act) {
    (void)p, (void)R;
    act->a = a, act->q = NULL, act->scale = NULL, act->blocks = NULL;
#ifdef INT4_BYTES
    if (p->group) {
        Int8Rows* b = act->blocks = calloc(1, sizeof(Int8Rows));
        if (!b || !int8_rows(b, R, p->K, p->group)) return 2;
        for (int r = 0; r < R; r++) to_int8_blocks(a + (size_t)r * p->K, p->K, p->group, b, r);
        return 0;
    }
#endif
#ifdef INT8_PAIRS
    if (p->scale) {
        if (!(act->q = malloc(sizeof(int16_t) * (size_t)R * p->K)) || !(act->scale = malloc(sizeof(float) * R))) return 2;
        for (int r = 0; r < R; r++) act->scale[r] = to_int16(a + (size_t)r * p->K, p->K, act->q + (size_t)r * p->K);
    }
#endif
    return 0;
}

static void release(Act* act) {
#ifdef INT4_BYTES
    if (act->blocks) free_int8_rows(act->blocks);
#endif
    free(act->blocks), free(act->q), free(act->scale);
}

/* y[n .. n + W - 1] from the products out[0 .. W - 1]: rounded once, or (int8, int4) rounded and the bias added as
   `Int8Linear` and `Int4Linear` add it; bf16 weights add theirs before the rounding, as torch's linear */
static inline void finish(const Proj* p, const float* out, int n, int W, uint16_t* y) {
    for (int j = 0; j < W; j++) {
        if (!p->bias) y[n + j] = to_bf16(out[j]);
        else if (p->scale) y[n + j] = to_bf16(from_bf16(to_bf16(out[j])) + from_bf16(p->bias[n + j]));
        else y[n + j] = to_bf16(out[j] + from_bf16(p->bias[n + j]));
    }
}

/* y [R, N] = act's rows times p, each weight read once for the R rows, the outputs split between the threads of
   the enclosing parallel region */
static void project(const Proj* p, const Act* act, int R, uint16_t* y) {
    const size_t K = p->K, N = p->N;
#ifdef INT4_BYTES
    if (p->group) {
#pragma omp for schedule(static)
        for (int n = 0; n < p->N; n += 64)
            for (int r = 0; r < R; r++) {
                float out[64];
                dot64_i4((const uint8_t*)p->w + n * K / 2, p->scale + 2 * n, p->N, p->K, p->group, act->blocks, r, out);
                finish(p, out, n, 64, y + r * N);
            }
        return;
    }
#endif
#ifdef BF16_WIDE
    if (!p->scale && R >= BF16_WIDE_MIN_ROWS) { /* bf16 weights and a batch step's rows: each weight widened once for them all */
#pragma omp for schedule(static)
        for (int n = 0; n < p->N; n += 8) {
            const uint16_t* w[8];
            for (int j = 0; j < 8; j++) w[j] = (const uint16_t*)p->w + (n + j) * K;
            for (int r0 = 0; r0 < R; r0 += BF16_TILE_R) {
                const int rn = R - r0 < BF16_TILE_R ? R - r0 : BF16_TILE_R;
                __m256 sums[BF16_TILE_R * 2];
                float out[8];
                wide_products(w, 8, act->a + r0 * K, p->K, rn, sums);
                for (int r = 0; r < rn; r++) {
                    _mm256_storeu_ps(out, sums[2 * r]);
                    finish(p, out, n, 8, y + (r0 + r) * N);
                }
            }
        }
        return;
    }
#endif
#pragma omp for schedule(static)
    for (int n = 0; n < p->N; n += 8)
        for (int r = 0; r < R; r++) {
            float out[8];
            _mm256_storeu_ps(out, product8(p->w, p->scale, n, p->K, act->a + r * K, act->q ? act->q + r * K : NULL, act->scale ? act->scale[r] : 0.f));
            finish(p, out, n, 8, y + r * N);
        }
}

/* 1 where the kernel cannot take p: sizes, or a kind this build has no kernel for */
static int unusable(const Proj* p) {
    if (p->group) {
#ifndef INT4_BYTES
        return 1;
#endif
        return p->N % 64 || p->group % 32 || p->K % p->group;
    }
#ifndef INT8_PAIRS
    if (p->scale) return 1;
#endif
    return p->N % 8 || p->K % 32;
}

/* y [R, N] = x [R, K] times p, rounded (and its bias added) as `project` does: a few rows through one
   projection, for int8_linear, int4_linear and attention_step. 0, 1 for sizes or a kind it cannot take, 2 out of
   memory */
static int linear_rows(const Proj* p, const uint16_t* x, int R, uint16_t* y, int threads) {
    if (R < 1 || unusable(p)) return 1;
    Act act = {0};
    int code = prepare(p, x, R, &act);
    if (!code) {
#pragma omp parallel num_threads(threads)
        project(p, &act, R, y);
    }
    release(&act);
    return code;
}

/* int8_linear: y [R, N] = x [R, K] times the int8 rows w [N, K] times their bf16 scales (`--resident-dtype
   int8`'s projections, `moe_local/int8.py`), for a decode step's few rows, where torch's `_weight_int8pack_mm`
   widens each weight to fp32: x (bf16) as int16 as experts_swiglu takes it, 8 outputs a work item, each row
   read once for all of x's rows; y in bf16, rounded once as torch's. K a multiple of 32, N of 8; 0, 1 for sizes
   it cannot take (or without AVX512-VNNI), 2 out of memory. */
int int8_linear(const uint16_t* x, int R, int K, const int8_t* w, const uint16_t* scale, int N, uint16_t* y, int threads) {
    const Proj p = {w, scale, NULL, N, K, 0};
    return scale ? linear_rows(&p, x, R, y, threads) : 1;
}

/* int4_linear: y [R, N] (bf16, rounded once) = x [R, K] times int4 matrix w [N, K] in the CPU's layout, sz its
   (scale, zero) pairs [K / G, N, 2], read as experts_swiglu_int4 reads them (`--resident-dtype int4`'s
   projections, `moe_local/int4.py`), where `_weight_int4pack_mm_for_cpu` widens every weight to fp32: 64
   outputs a work item. N a multiple of 64, K of G, G of 32; 0, 1 for sizes it cannot take (or a CPU without
   AVX512-VNNI and VBMI), 2 out of memory. */
int int4_linear(const uint16_t* x, int R, int K, const uint8_t* w, const uint16_t* sz, int N, int G, uint16_t* y, int threads) {
    const Proj p = {w, sz, NULL, N, K, G};
    return G >= 32 ? linear_rows(&p, x, R, y, threads) : 1;
}

/* bf16_linear: y [R, N] (bf16, rounded once, after the bias [N] where there is one) = x [R, K] times the bf16 matrix
   w [N, K], for a step's few rows (lm_head, routers: `cpu_matmul.rows_linear`): each weight row read once for all
   R rows (and widened once for them, `wide_products`, where the CPU has AVX512 without bf16 arithmetic), 8 outputs
   a work item, and row r's sums the same whatever R is (dot8's), so that a batch's rows equal single rows bit for
   bit. N a multiple of 8, K of 32; 0, 1 for sizes it cannot take, 2 out of memory. */
int bf16_linear(const uint16_t* x, int R, int K, const uint16_t* w, const uint16_t* bias, int N, uint16_t* y, int threads) {
    const Proj p = {w, NULL, bias, N, K, 0};
    return linear_rows(&p, x, R, y, threads);
}

/* the first rd of v's dimensions rotated as `apply_rope` does: v * cos + roll(v, rd / 2) * sin, each term and
   their sum rounded */
static void rope(uint16_t* v, int rd, const uint16_t* cos, const uint16_t* sin) {
    uint16_t t[rd];
    memcpy(t, v, sizeof(t));
    for (int i = 0; i < rd; i++) {
        const float a = from_bf16(to_bf16(from_bf16(t[i]) * from_bf16(cos[i])));
        const float b = from_bf16(to_bf16(from_bf16(t[(i + rd / 2) % rd]) * from_bf16(sin[i])));
        v[i] = to_bf16(a + b);
    }
}

/* x, x_out, h_out [R, D]; cos, sin [R, rot_dim]. 0, 1 for sizes it cannot take (or int8 or int4 projections on a
   CPU without their kernels), 2 out of memory */
int attention_step(const AttentionLayer* L, int R, const uint16_t* x, const uint16_t* cos, const uint16_t* sin, uint16_t* const* k_cache,
                   uint16_t* const* v_cache, long head, int positions, const int* pos, uint16_t* x_out, uint16_t* h_out, int threads) {
    const int D = L->dim, H = L->heads, Hkv = L->kv_heads, hd = L->head_dim, rd = L->rot_dim, Nq = H * hd, N = L->qkv.N;
    const int shared = L->values_from_keys; /* no value rows: the values are the keys before their norm and rope */
    if (R < 1 || D % 32 || hd % 8 || rd % 2 || rd > hd || H % Hkv || unusable(&L->qkv) || unusable(&L->o) ||
        N != (H + (2 - shared) * Hkv) * hd || L->qkv.K != D || L->o.N != D || L->o.K != Nq)
        return 1;
    for (int r = 0; r < R; r++)
        if (pos[r] < 0 || (pos[r] >= positions && !L->window)) return 1;
    uint16_t *a = malloc(sizeof(uint16_t) * R * D), *qkv = malloc(sizeof(uint16_t) * R * N), *att = malloc(sizeof(uint16_t) * R * Nq);
    int code = !a || !qkv || !att ? 2 : 0;
    if (!code) {
        for (int r = 0; r < R; r++) rms_norm(x + r * D, D, L->attention_norm, L->eps, a + r * D);
        code = linear_rows(&L->qkv, a, R, qkv, threads);
    }
    for (int r = 0; r < R && !code; r++) {
        uint16_t *q = qkv + r * N, *k = q + Nq, *v = k + Hkv * hd, keys[shared ? Hkv * hd : 1];
        if (shared) v = memcpy(keys, k, sizeof(keys));
        if (L->qk_norm == 1)
            for (int i = 0; i < H + Hkv; i++) rms_norm(q + i * hd, hd, i < H ? L->q_norm : L->k_norm, L->eps, q + i * hd);
        else if (L->qk_norm == 2)
            rms_norm(q, Nq, L->q_norm, L->eps, q), rms_norm(k, Hkv * hd, L->k_norm, L->eps, k);
        if (L->v_norm)
            for (int i = 0; i < Hkv; i++) rms_norm(v + i * hd, hd, NULL, L->eps, v + i * hd);
        for (int i = 0; i < H + Hkv; i++) rope(q + i * hd, rd, cos + r * rd, sin + r * rd);
        const long slot = pos[r] % positions; /* pos[r] itself, but in a ring */
        for (int i = 0; i < Hkv; i++) {
            memcpy(k_cache[r] + i * head + slot * hd, k + i * hd, sizeof(uint16_t) * hd);
            memcpy(v_cache[r] + i * head + slot * hd, v + i * hd, sizeof(uint16_t) * hd);
        }
        const int seen = pos[r] < positions ? pos[r] + 1 : positions;
        code = attend(q, Hkv, H / Hkv, hd, seen, k_cache[r], head, hd, v_cache[r], head, hd, hd, 1, L->scale, NULL, 0, 0, L->sinks,
                      att + r * Nq, threads);
    }
    if (!code) code = linear_rows(&L->o, att, R, a, threads);
    if (!code) {
        for (int r = 0; r < R; r++) {
            if (L->out_norm) rms_norm(a + r * D, D, L->out_norm, L->eps, a + r * D);
            for (int i = 0; i < D; i++) x_out[r * D + i] = to_bf16(from_bf16(x[r * D + i]) + from_bf16(a[r * D + i]));
            if (L->ffn_norm) rms_norm(x_out + r * D, D, L->ffn_norm, L->eps, h_out + r * D);
        }
    }
    free(a), free(qkv), free(att);
    return code;
}

/* 1 where experts_swiglu_int4 runs (AVX512-VNNI and VBMI) */
int experts_int4(void) {
#ifdef INT4_BYTES
    return 1;
#else
    return 0;
#endif
}

/* 1 where experts_swiglu takes int8 weights (AVX512-VNNI) */
int experts_int8(void) {
#ifdef INT8_PAIRS
    return 1;
#else
    return 0;
#endif
}

/* 1 where bf16 keys are multiplied as bf16 pairs (AVX512-BF16), which keeps the kernel the faster for more queries */
int attend_bf16_pairs(void) {
#ifdef BF16_PAIRS
    return 1;
#else
    return 0;
#endif
}

/* deltanet_step: a decode step's R tokens (one per sequence) through the recurrent core of a Gated DeltaNet layer
   (Qwen3.5/3.6-MoE's and Qwen3-Next's linear attention), for `moe_local/cpu_deltanet.py`, as transformers'
   `torch_causal_conv1d_update`, `torch_recurrent_gated_delta_rule` and gated RMSNorm compute it, where those take
   ~30 torch operations a layer. Row r's inputs are its projections: qkv [C] (C = 2 Hk dk + Hv dv), z [Hv dv], b
   and a [Hv]; its output out [Hv dv] goes to out_proj. Per row:
   - the causal conv1d step (kernel K, depthwise, no bias) over its conv state [C, S] (the last K - 1 of its S >= K -
     1 columns are the previous inputs; all S shift left by one and the input enters last), summed in fp32, rounded,
     then SiLU, rounded;
   - per value head h (query and key head h / (Hv / Hk), as transformers' repeat_interleave), in fp32: q and k
     L2-normalised (eps 1e-6), q divided by sqrt(dk); beta = sigmoid(b) (rounded); decay = exp(g), g = -exp(A_log)
     softplus(a + dt_bias); then the gated delta rule on the state S [dk, dv]: S = decay S, delta = (v - S^T k) beta,
     S = S + k delta^T, o = S^T q, o rounded;
   - the gated RMSNorm: w * rms_norm(o) (rounded, then times w, rounded) times silu(z) in fp32, rounded.
   "Rounded" is to bf16 where the activations are bf16 (bf16 1: qkv, z, b, a, the conv state, the conv and norm
   weights and out are bf16; 0: fp32), as the torch operations round. Every column j of S is its own computation
   (S^T k, delta, the update and S^T q read column j only), so each 16-column strip of a head's state is read once
   from memory and updated while it is in L1: the step is one pass over the state, which is what it costs (2 MiB
   a layer and sequence for Qwen3.6-35B-A3B's 32 value heads of 128 x 128). */
typedef struct {
    int k_heads, v_heads, k_dim, v_dim, kernel, state_len; /* Hk, Hv, dk, dv, K, S */
    int bf16;
    float eps;                /* the gated RMSNorm's */
    const void* conv_weight;  /* [C, K] */
    const float* neg_a;       /* [Hv]: -exp(A_log) */
    const float* dt_bias;     /* [Hv] */
    const void* norm_weight;  /* [dv] */
} DeltaNetLayer;

static inline float get(const void* p, long i, int bf16) { return bf16 ? from_bf16(((const uint16_t*)p)[i]) : ((const float*)p)[i]; }
static inline float rounded(float x, int bf16) { return bf16 ? from_bf16(to_bf16(x)) : x; }
static inline void put(void* p, long i, float x, int bf16) {
    if (bf16) ((uint16_t*)p)[i] = to_bf16(x);
    else ((float*)p)[i] = x;
}

/* one value head's gated delta rule over its state s [dk, dv] (fp32, updated in place): o [dv] = the new S^T q */
static void delta_rule(float* s, int dk, int dv, const float* q, const float* k, const float* v, float decay, float beta, float* o) {
    const __m256 d = _mm256_set1_ps(decay);
    for (int j = 0; j < dv; j += 16) {
        __m256 m0 = _mm256_setzero_ps(), m1 = _mm256_setzero_ps();
        for (int i = 0; i < dk; i++) { /* S^T k over the decayed state */
            const float* row = s + (size_t)i * dv + j;
            const __m256 ki = _mm256_set1_ps(k[i]);
            m0 = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(row), d), ki, m0);
            m1 = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(row + 8), d), ki, m1);
        }
        const __m256 b = _mm256_set1_ps(beta);
        const __m256 e0 = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(v + j), m0), b), e1 = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(v + j + 8), m1), b);
        __m256 o0 = _mm256_setzero_ps(), o1 = _mm256_setzero_ps();
        for (int i = 0; i < dk; i++) { /* S = decay S + k delta^T, and S^T q */
            float* row = s + (size_t)i * dv + j;
            const __m256 ki = _mm256_set1_ps(k[i]), qi = _mm256_set1_ps(q[i]);
            const __m256 s0 = _mm256_fmadd_ps(ki, e0, _mm256_mul_ps(_mm256_loadu_ps(row), d));
            const __m256 s1 = _mm256_fmadd_ps(ki, e1, _mm256_mul_ps(_mm256_loadu_ps(row + 8), d));
            _mm256_storeu_ps(row, s0), _mm256_storeu_ps(row + 8, s1);
            o0 = _mm256_fmadd_ps(s0, qi, o0), o1 = _mm256_fmadd_ps(s1, qi, o1);
        }
        _mm256_storeu_ps(o + j, o0), _mm256_storeu_ps(o + j + 8, o1);
    }
}

/* x [n] (fp32) times 1 / sqrt(sum x^2 + eps) times scale, in place */
static void l2_normalise(float* x, int n, float scale) {
    float sum = 0.f;
    for (int i = 0; i < n; i++) sum += x[i] * x[i];
    const float r = 1.f / sqrtf(sum + 1e-6f);
    for (int i = 0; i < n; i++) x[i] = x[i] * r * scale;
}

static inline float silu(float x) { return x / (1.f + expf(-x)); }

/* in: qkv, z, b, a ([R, ...] rows in_row[i] elements apart); conv_state[r] [C, S] (the activations' dtype) and
   state[r] [Hv, dk, dv] (fp32) row r's states, updated in place; out [R, Hv dv]. 0, 1 for sizes it cannot take, 2
   out of memory */
int deltanet_step(const DeltaNetLayer* L, int R, const void* const* in, const long* in_row, void* const* conv_state, float* const* state,
                  void* out, int threads) {
    const int Hk = L->k_heads, Hv = L->v_heads, dk = L->k_dim, dv = L->v_dim, K = L->kernel, S = L->state_len, bf16 = L->bf16;
    const int C = 2 * Hk * dk + Hv * dv, size = bf16 ? 2 : 4;
    if (R < 1 || Hk < 1 || Hv % Hk || dk < 1 || dk > 1024 || dv % 16 || dv > 1024 || K < 1 || S < K - 1 || S < 1) return 1;
    float* x = malloc(sizeof(float) * (size_t)R * C); /* the conv's outputs, after SiLU */
    if (!x) return 2;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (long rc = 0; rc < (long)R * C; rc++) {
            const int r = rc / C, c = rc % C;
            char* st = (char*)conv_state[r] + (size_t)c * S * size;
            const float input = get(in[0], r * in_row[0] + c, bf16);
            float sum = 0.f;
            for (int j = 0; j < K - 1; j++) sum += get(L->conv_weight, (long)c * K + j, bf16) * get(st, S - K + 1 + j, bf16);
            sum += get(L->conv_weight, (long)c * K + K - 1, bf16) * input;
            x[rc] = rounded(silu(rounded(sum, bf16)), bf16);
            memmove(st, st + size, (size_t)(S - 1) * size);
            memcpy(st + (size_t)(S - 1) * size, (const char*)in[0] + (r * in_row[0] + c) * size, size);
        }
#pragma omp for schedule(static)
        for (int rh = 0; rh < R * Hv; rh++) {
            const int r = rh / Hv, h = rh % Hv, kh = h / (Hv / Hk);
            float q[dk], k[dk], o[dv];
            memcpy(q, x + (size_t)r * C + kh * dk, sizeof(q));
            memcpy(k, x + (size_t)r * C + (Hk + kh) * dk, sizeof(k));
            l2_normalise(q, dk, 1.f / sqrtf((float)dk)), l2_normalise(k, dk, 1.f);
            const float beta = rounded(1.f / (1.f + expf(-get(in[2], r * in_row[2] + h, bf16))), bf16);
            const float a = get(in[3], r * in_row[3] + h, bf16) + L->dt_bias[h];
            const float decay = expf(L->neg_a[h] * (a > 20.f ? a : log1pf(expf(a))));
            delta_rule(state[r] + (size_t)h * dk * dv, dk, dv, q, k, x + (size_t)r * C + 2 * Hk * dk + h * dv, decay, beta, o);
            float sum = 0.f;
            for (int j = 0; j < dv; j++) o[j] = rounded(o[j], bf16), sum += o[j] * o[j];
            const float inv = 1.f / sqrtf(sum / (float)dv + L->eps);
            for (int j = 0; j < dv; j++) {
                const float n = rounded(rounded(o[j] * inv, bf16) * get(L->norm_weight, j, bf16), bf16);
                put(out, (long)r * Hv * dv + h * dv + j, n * silu(get(in[1], r * in_row[1] + h * dv + j, bf16)), bf16);
            }
        }
    }
    free(x);
    return 0;
}

/* deltanet_block: the same for a layer's whole linear-attention block after its input norm, for
   `cpu_deltanet.Fused`: x [R, D] (bf16) through the input projection (one matrix whose rows give qkv, z, b and a,
   in that order: `model.LinearAttention.in_proj`; bf16, int8 or int4 as attention_step's), deltanet_step, and
   out_proj -> y [R, D], each projection reading its weights once for the R rows and rounding once, as the torch
   operations round. 0, 1 for sizes it cannot take (or int8 or int4 projections on a CPU without their kernels),
   2 out of memory */
typedef struct {
    DeltaNetLayer core;
    Proj in, out;
} DeltaNetBlock;

int deltanet_block(const DeltaNetBlock* L, int R, const uint16_t* x, void* const* conv_state, float* const* state, uint16_t* y, int threads) {
    const DeltaNetLayer* c = &L->core;
    const int C = 2 * c->k_heads * c->k_dim + c->v_heads * c->v_dim, V = c->v_heads * c->v_dim, N = L->in.N;
    if (!c->bf16 || N != C + V + 2 * c->v_heads || L->out.K != V || L->out.N != L->in.K || unusable(&L->in) || unusable(&L->out)) return 1;
    uint16_t *mixed = malloc(sizeof(uint16_t) * (size_t)R * N), *o = malloc(sizeof(uint16_t) * (size_t)R * V);
    int code = !mixed || !o ? 2 : linear_rows(&L->in, x, R, mixed, threads);
    if (!code) {
        const void* in[4] = {mixed, mixed + C, mixed + C + V, mixed + C + V + c->v_heads};
        const long in_row[4] = {N, N, N, N};
        code = deltanet_step(c, R, in, in_row, conv_state, state, o, threads);
    }
    if (!code) code = linear_rows(&L->out, o, R, y, threads);
    free(mixed), free(o);
    return code;
}

/* deltanet_chunked: a prompt's T positions of one sequence through a Gated DeltaNet layer's gated delta rule, in
   chunks of DELTA_CHUNK positions, for `moe_local/cpu_deltanet.py` (`chunked`): what `model.chunked_delta_rule`
   (transformers' torch_chunk_gated_delta_rule) computes in ~40 torch operations a layer whose copies, pads and
   small batched products took 3-5x its arithmetic (docs/measurements.md). Inputs: q and k [T, Hk, dk], v
   [T, Hv, dv] (bf16 or fp32: `bf16`; any strides, in elements: q_s[0] between positions, q_s[1] between heads,
   q_s[2] between dimensions; likewise k_s, v_s), g [T, Hv] (the log decay) and beta [T, Hv], fp32 and
   contiguous; state [Hv, dk, dv] fp32, the state before the first position, updated in place to the one after
   the last; y [T, Hv, dv] fp32. Value head h (query and key head h / (Hv / Hk)), in fp32, per chunk of n
   positions: q and k L2-normalised (eps 1e-6), q divided by sqrt(dk); G the cumulative sum of g within the chunk;
   the system (I + A) X = [beta v | beta exp(G) k] with A[i][j] = beta_i k_i . k_j exp(G_i - G_j), j < i, solved
   by forward substitution (X = [the new values | the decayed keys]); then v_new = X_v - X_k S, y = exp(G) q S +
   sum over j <= i of q_i . k_j exp(G_i - G_j) v_new_j, and S = exp(G_n) S + sum of exp(G_n - G_i) k_i v_new_i^T.
   The same arithmetic as the reference in another order of sums: equal to the step-by-step rule within fp32's
   rounding (the tests). Work items are value heads. dk, dv multiples of 16; 0, 1 for sizes it cannot take, 2
   out of memory. */
#define DELTA_CHUNK 64

#ifdef __AVX512F__
#define DN_VL 16
typedef __m512 dn_vec;
#define dn_load _mm512_loadu_ps
#define dn_store _mm512_storeu_ps
#define dn_fma _mm512_fmadd_ps
#define dn_mul _mm512_mul_ps
#define dn_sub _mm512_sub_ps
#define dn_fnmadd _mm512_fnmadd_ps
#define dn_set1 _mm512_set1_ps
#define dn_zero _mm512_setzero_ps
#define dn_sum _mm512_reduce_add_ps
#else
#define DN_VL 8
typedef __m256 dn_vec;
#define dn_load _mm256_loadu_ps
#define dn_store _mm256_storeu_ps
#define dn_fma _mm256_fmadd_ps
#define dn_mul _mm256_mul_ps
#define dn_sub _mm256_sub_ps
#define dn_fnmadd _mm256_fnmadd_ps
#define dn_set1 _mm256_set1_ps
#define dn_zero _mm256_setzero_ps
#define dn_sum hsum
#endif

/* C[m * ldc + n] (+)= sum over k < K of A(m, k) B[k * ldb + n], m < MR, n < NV vectors from n0: A(m, k) at
   a[m * am + k * ak]; `add` keeps C's values, else they are replaced. MR and NV constants where inlined. */
static inline __attribute__((always_inline)) void dn_mm_tile(const float* a, long am, long ak, const float* b, int ldb, float* c, int ldc,
                                                          int K, int add, const int MR, const int NV) {
    dn_vec acc[4][4];
    for (int m = 0; m < MR; m++)
        for (int v = 0; v < NV; v++) acc[m][v] = add ? dn_load(c + (long)m * ldc + v * DN_VL) : dn_zero();
    for (int k = 0; k < K; k++) {
        dn_vec bv[4];
        for (int v = 0; v < NV; v++) bv[v] = dn_load(b + (long)k * ldb + v * DN_VL);
        for (int m = 0; m < MR; m++) {
            const dn_vec am_k = dn_set1(a[m * am + k * ak]);
            for (int v = 0; v < NV; v++) acc[m][v] = dn_fma(am_k, bv[v], acc[m][v]);
        }
    }
    for (int m = 0; m < MR; m++)
        for (int v = 0; v < NV; v++) dn_store(c + (long)m * ldc + v * DN_VL, acc[m][v]);
}

/* C [M, N] (+)= A [M, K] B [K, N] (B's and C's rows contiguous, N a multiple of DN_VL; A(m, k) at a[m * am + k * ak]) */
static void dn_mm(const float* a, long am, long ak, const float* b, int ldb, float* c, int ldc, int M, int N, int K, int add) {
    for (int n = 0; n < N;) {
        const int wide = N - n >= 4 * DN_VL;
        int m = 0;
        for (; m + 4 <= M; m += 4)
            wide ? dn_mm_tile(a + m * am, am, ak, b + n, ldb, c + (long)m * ldc + n, ldc, K, add, 4, 4)
                 : dn_mm_tile(a + m * am, am, ak, b + n, ldb, c + (long)m * ldc + n, ldc, K, add, 4, 1);
        for (; m < M; m++)
            wide ? dn_mm_tile(a + m * am, am, ak, b + n, ldb, c + (long)m * ldc + n, ldc, K, add, 1, 4)
                 : dn_mm_tile(a + m * am, am, ak, b + n, ldb, c + (long)m * ldc + n, ldc, K, add, 1, 1);
        n += wide ? 4 * DN_VL : DN_VL;
    }
}

static inline float dn_dot(const float* x, const float* y, int n) { /* n a multiple of DN_VL */
    dn_vec s = dn_zero();
    for (int i = 0; i < n; i += DN_VL) s = dn_fma(dn_load(x + i), dn_load(y + i), s);
    return dn_sum(s);
}

int deltanet_chunked(const void* q, const long* q_s, const void* k, const long* k_s, const void* v, const long* v_s, int bf16,
                     const float* g, const float* beta, int T, int Hk, int Hv, int dk, int dv, float* state, float* y, int threads) {
    if (T < 1 || Hk < 1 || Hv % Hk || dk % 16 || dv % 16 || dk < 16 || dv < 16 || dk > 1024 || dv > 1024) return 1;
    const int C = DELTA_CHUNK, W = dv + dk; /* X's rows: the new values, then the decayed keys */
    const size_t per_thread = (size_t)C * (3 * dk + dv + 2 * W + 2 * C + 2) + (size_t)2 * C * dv;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float* buf = malloc(sizeof(float) * per_thread);
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        }
        float *Q = buf, *K = Q + C * dk, *KE = K + C * dk, *V = KE + C * dk, *X = V + C * dv, *P = X + C * W, *A = P + C * W,
              *I = A + C * C, *G = I + C * C, *B = G + C, *VN = B + C, *O = VN + C * dv; /* O [C, dv] */
#pragma omp for schedule(static)
        for (int h = 0; h < Hv; h++) {
            if (!buf) continue;
            const int hk = h / (Hv / Hk);
            float* S = state + (size_t)h * dk * dv;
            for (int t0 = 0; t0 < T; t0 += C) {
                const int n = T - t0 < C ? T - t0 : C;
                for (int i = 0; i < n; i++) { /* the chunk's normalised q and k, v, beta and cumulative log decay */
                    const long t = t0 + i;
                    for (int d = 0; d < dk; d++) {
                        Q[i * dk + d] = get(q, t * q_s[0] + hk * q_s[1] + d * q_s[2], bf16);
                        K[i * dk + d] = get(k, t * k_s[0] + hk * k_s[1] + d * k_s[2], bf16);
                    }
                    for (int d = 0; d < dv; d++) V[i * dv + d] = get(v, t * v_s[0] + h * v_s[1] + d * v_s[2], bf16);
                    l2_normalise(Q + i * dk, dk, 1.f / sqrtf((float)dk));
                    l2_normalise(K + i * dk, dk, 1.f);
                    B[i] = beta[t * Hv + h];
                    G[i] = (i ? G[i - 1] : 0.f) + g[t * Hv + h];
                }
                for (int i = 0; i < n; i++) /* A (j < i) and the queries' scores I (j <= i), each with its decay */
                    for (int j = 0; j <= i; j++) {
                        const float decay = expf(G[i] - G[j]);
                        A[i * C + j] = j < i ? B[i] * dn_dot(K + i * dk, K + j * dk, dk) * decay : 0.f;
                        I[i * C + j] = dn_dot(Q + i * dk, K + j * dk, dk) * decay;
                    }
                for (int i = 0; i < n; i++)
                    for (int j = i + 1; j < n; j++) I[i * C + j] = 0.f;
                for (int i = 0; i < n; i++) { /* (I + A) X = [beta v | beta exp(G) k], row by row */
                    float* x = X + (size_t)i * W;
                    const float e = expf(G[i]);
                    for (int d = 0; d < dv; d++) x[d] = B[i] * V[i * dv + d];
                    for (int d = 0; d < dk; d++) x[dv + d] = B[i] * K[i * dk + d] * e;
                    for (int j = 0; j < i; j++) {
                        const dn_vec aij = dn_set1(A[i * C + j]);
                        const float* xj = X + (size_t)j * W;
                        for (int d = 0; d < W; d += DN_VL) dn_store(x + d, dn_fnmadd(aij, dn_load(xj + d), dn_load(x + d)));
                    }
                }
                /* v_new = new values - decayed keys S; the output starts as exp(G) q S */
                dn_mm(X + dv, W, 1, S, dv, P, dv, n, dv, dk, 0);
                for (int i = 0; i < n; i++)
                    for (int d = 0; d < dv; d += DN_VL) dn_store(VN + i * dv + d, dn_sub(dn_load(X + (size_t)i * W + d), dn_load(P + i * dv + d)));
                for (int i = 0; i < n; i++) {
                    const float e = expf(G[i]);
                    for (int d = 0; d < dk; d++) KE[i * dk + d] = Q[i * dk + d] * e;
                }
                dn_mm(KE, dk, 1, S, dv, O, dv, n, dv, dk, 0);
                dn_mm(I, C, 1, VN, dv, O, dv, n, dv, n, 1); /* + the chunk's own scores times v_new (I is 0 above the diagonal) */
                for (int i = 0; i < n; i++) memcpy(y + ((size_t)(t0 + i) * Hv + h) * dv, O + i * dv, sizeof(float) * dv);
                /* S = exp(G_n) S + sum over i of exp(G_n - G_i) k_i v_new_i^T */
                const float last = G[n - 1], e = expf(last);
                for (int i = 0; i < n; i++) {
                    const float f = expf(last - G[i]);
                    for (int d = 0; d < dk; d++) KE[i * dk + d] = K[i * dk + d] * f;
                }
                for (long i = 0; i < (long)dk * dv; i += DN_VL) dn_store(S + i, dn_mul(dn_load(S + i), dn_set1(e)));
                dn_mm(KE, 1, dk, VN, dv, S, dv, dk, dv, n, 1);
            }
        }
        free(buf);
    }
    return failed ? 2 : 0;
}

/* experts_ggml: a layer's SwiGLU experts whose weights are a GGUF's own ggml blocks (`formats.Ggml`), with
   llama.cpp's arithmetic. Each activation row is rounded as llama.cpp rounds it for the weights' type (its
   `vec_dot_type`): for Q8_0, Q4_0 and Q5_0 to Q8_0 blocks (32 values, d = max |x| / 127 kept as fp16, q = x * 127 /
   max |x| rounded to nearest even, as its AVX2 quantize_row_q8_0), for the K-quants (Q4_K, Q5_K, Q6_K) to Q8_K
   blocks for the K-quants and IQ4_XS (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS: 256 values, d = -max / 127 in fp32 for the value of largest magnitude, q = round(x / d) at most
   127, the sums of each 16 q kept: quantize_row_q8_K_ref). Each block's integer dot products with the weights'
   integer values are exact; the scales (fp16 in the weights, with 6- or 8-bit sub-block scales and minimums)
   multiply them in fp32, as ggml's vec_dot_*_q8_* do, in another order of fp32 sums.
   Expert e (of E) takes rows starts[e] .. starts[e + 1] - 1 of x [R, D] (fp32); types[e] is its two type codes
   (gate_up's, down's: ggml's numbers, 8 Q8_0, 2 Q4_0, 6 Q5_0, 10 Q2_K, 11 Q3_K, 12 Q4_K, 13 Q5_K, 14 Q6_K, 23 IQ4_XS,
   16 IQ2_XXS, 18 IQ3_XXS: the last two once `ggml_lattices` has their tables), gate_up[e] [2F rows of D]
   (gate's rows, then up's), down[e] [D rows of F]; h = silu(gate) * up in fp32 (act ACT_GELU_TANH: GELU's tanh form,
   Gemma 4's), rounded again for down; y [R, D]
   fp32. Work items are (expert, one weight row), each row read once for all of its expert's rows (any number:
   a prefill chunk's, EXPERT_MAX_ROWS at a time from the core's cache). D and F multiples of 32 (of 256 for a
   K-quant); 0, 1 for what it cannot take
   (or a CPU without AVX2 and F16C), 2 out of memory. */
#define GGML_Q4_0 2
#define GGML_Q5_0 6
#define GGML_Q8_0 8
#define GGML_Q2_K 10
#define GGML_Q3_K 11
#define GGML_Q4_K 12
#define GGML_Q5_K 13
#define GGML_Q6_K 14
#define GGML_IQ4_XS 23
#define GGML_IQ2_XXS 16
#define GGML_IQ3_XXS 18

/* IQ2_XXS's and IQ3_XXS's lattices, data of the format (gguf-py's quants.py holds them; `weights/ggml.py`
   hands them over once the library is loaded): a grid point's 8 (IQ2_XXS) or 4 (IQ3_XXS) unsigned values as the
   bytes of one integer, and each 7-bit sign index's 8 signs as bytes of 1 or -1 (the eighth sign is the one that
   makes the count of minus signs even: ggml's ksigns_iq2xs) */
static uint64_t IQ2XXS_GRID[256], IQ_SIGNS[128];
static uint32_t IQ3XXS_GRID[256];
static int lattices_set;

/* iq2xxs [256 * 8] and iq3xxs [256 * 4]: the grids' values; ksigns [128]: the sign bytes (bit j set: value j negative) */
int ggml_lattices(const uint8_t* iq2xxs, const uint8_t* iq3xxs, const uint8_t* ksigns) {
    memcpy(IQ2XXS_GRID, iq2xxs, sizeof(IQ2XXS_GRID)), memcpy(IQ3XXS_GRID, iq3xxs, sizeof(IQ3XXS_GRID));
    for (int i = 0; i < 128; i++) {
        uint64_t signs = 0;
        for (int j = 0; j < 8; j++) signs |= (uint64_t)((ksigns[i] >> j) & 1 ? 0xFF : 0x01) << (8 * j);
        IQ_SIGNS[i] = signs;
    }
    lattices_set = 1;
    return 0;
}

#if defined(__AVX2__) && defined(__F16C__)
static inline float half_to_float(const uint8_t* p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

static int ggml_block_values(int type) { return type == GGML_Q8_0 || type == GGML_Q4_0 || type == GGML_Q5_0 ? 32 : 256; }
static int ggml_block_bytes(int type) {
    switch (type) {
        case GGML_Q8_0: return 34;
        case GGML_Q4_0: return 18;
        case GGML_Q5_0: return 22;
        case GGML_Q2_K: return 84;
        case GGML_Q3_K: return 110;
        case GGML_Q4_K: return 144;
        case GGML_Q5_K: return 176;
        case GGML_Q6_K: return 210;
        case GGML_IQ4_XS: return 136;
        case GGML_IQ2_XXS: return lattices_set ? 66 : 0;
        case GGML_IQ3_XXS: return lattices_set ? 98 : 0;
        default: return 0;
    }
}
static inline int k_quant(int type) { return type >= GGML_Q2_K; } /* rounded to Q8_K: the K-quants and the IQ types */
static inline int iq_xxs(int type) { return type == GGML_IQ2_XXS || type == GGML_IQ3_XXS; }

typedef struct {
    int8_t* q;      /* [R, K] */
    float* d;       /* [R, K / 32] (Q8_0) or [R, K / 256] (Q8_K) */
    int16_t* sums;  /* [R, K / 16]: Q8_K's sums of each 16 q */
} Q8Rows;

static int q8_rows(Q8Rows* a, int R, int K) {
    a->q = malloc((size_t)R * K), a->d = malloc(sizeof(float) * R * (K / 32)), a->sums = malloc(sizeof(int16_t) * R * (K / 16));
    return a->q && a->d && a->sums;
}
static void free_q8_rows(Q8Rows* a) { free(a->q), free(a->d), free(a->sums); }

/* x [32] * m rounded to nearest even (as lrintf: the default rounding mode), as 32 int8 at q; their 4 int32 vectors
   in v (for sums); the products are within 127.x, so min(127) is the only clamp q8_K needs (q8_0's never meet it) */
static inline void round32(const float* x, __m256 m, int8_t* q, __m256i v[4]) {
    for (int i = 0; i < 4; i++) v[i] = _mm256_min_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 8 * i), m)), _mm256_set1_epi32(127));
    const __m256i words = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3])); /* in 128-bit lanes' order */
    _mm256_storeu_si256((__m256i*)q, _mm256_permutevar8x32_epi32(words, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
}

/* max |x| of x [n] (n a multiple of 8) */
static inline float abs_max(const float* x, int n) {
    const __m256 sign = _mm256_set1_ps(-0.f);
    __m256 top = _mm256_setzero_ps();
    for (int k = 0; k < n; k += 8) top = _mm256_max_ps(top, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + k)));
    __m128 t = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
    t = _mm_max_ps(t, _mm_movehl_ps(t, t));
    return _mm_cvtss_f32(_mm_max_ss(t, _mm_movehdup_ps(t)));
}

/* a row [K] (fp32) -> row r of a as K / 32 Q8_0 blocks: scales d (the fp16 value, as fp32) and q */
static void quantize_q8_0(const float* x, int K, Q8Rows* a, int r) {
    float* d = a->d + (size_t)r * (K / 32);
    int8_t* q = a->q + (size_t)r * K;
    for (int b = 0; b < K / 32; b++) {
        const float top = abs_max(x + 32 * b, 32), inverse = top != 0.f ? 127.f / top : 0.f;
        d[b] = _cvtsh_ss(_cvtss_sh(top / 127.f, 0)); /* ggml keeps the scale as fp16 (to nearest even) */
        __m256i v[4];
        round32(x + 32 * b, _mm256_set1_ps(inverse), q + 32 * b, v);
    }
}

/* a row [K] (fp32) -> row r of a as K / 256 Q8_K blocks: d (fp32), q and the sums of each 16 q */
static void quantize_q8_K(const float* x, int K, Q8Rows* a, int r) {
    float* d = a->d + (size_t)r * (K / 32);
    int8_t* q = a->q + (size_t)r * K;
    int16_t* sums = a->sums + (size_t)r * (K / 16);
    for (int b = 0; b < K / 256; b++) {
        const float* v = x + 256 * b;
        const float top = abs_max(v, 256);
        if (top == 0.f) {
            d[b] = 0.f, memset(q + 256 * b, 0, 256), memset(sums + 16 * b, 0, 32);
            continue;
        }
        int first = 0; /* the first value of largest magnitude (its sign sets d's; a NaN row finds none) */
        while (first < 255 && fabsf(v[first]) != top) first++;
        const float inverse = -127.f / v[first];
        for (int c = 0; c < 8; c++) {
            __m256i n[4];
            round32(v + 32 * c, _mm256_set1_ps(inverse), q + 256 * b + 32 * c, n);
            for (int h = 0; h < 2; h++) {
                const __m256i s8 = _mm256_add_epi32(n[2 * h], n[2 * h + 1]);
                __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1));
                s4 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
                sums[16 * b + 2 * c + h] = (int16_t)(_mm_cvtsi128_si32(s4) + _mm_extract_epi32(s4, 1));
            }
        }
        d[b] = 1.f / inverse;
    }
}

/* the 32 weights of one Q8_0 / Q4_0 / Q5_0 block as int8 (Q5_0: d, 4 bytes whose bit i is value i's fifth
   bit, 16 bytes of nibbles as Q4_0's; values - 16) */
static inline __m256i block_values(const uint8_t* block, int type) {
    if (type == GGML_Q8_0) return _mm256_loadu_si256((const __m256i*)(block + 2));
    const int q5 = type == GGML_Q5_0;
    const __m128i packed = _mm_loadu_si128((const __m128i*)(block + (q5 ? 6 : 2))), low4 = _mm_set1_epi8(15);
    __m256i values = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(packed, 4), low4), _mm_and_si128(packed, low4));
    if (!q5) return _mm256_sub_epi8(values, _mm256_set1_epi8(8)); /* the low nibbles are values 0..15, the high ones 16..31 */
    uint32_t bits;
    memcpy(&bits, block + 2, 4);
    const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), /* byte i: the byte holding bit i */
                                               _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0));
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    const __m256i fifth = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit), _mm256_set1_epi8(16));
    return _mm256_sub_epi8(_mm256_or_si256(values, fifth), _mm256_set1_epi8(16));
}

/* the 32 products of two int8 blocks, summed into 8 int32 lanes, as llama.cpp's AVX2 path forms them (exact) */
static inline __m256i dot32_i8(__m256i w, __m256i a) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__) /* the same sums in one instruction (no pair of products reaches int16's limit) */
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w));
#else
    const __m256i products = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w)); /* |w| * (a signed as w) */
    return _mm256_madd_epi16(products, _mm256_set1_epi16(1));
#endif
}

/* acc + block (Q8_0, Q4_0 or Q5_0) times q's 32 values (Q8_0, scale d): the integer sums' 8 lanes scaled by the
   two scales into fp32 lanes, as llama.cpp's ggml_vec_dot does */
static inline __m256 block_dot(const uint8_t* block, int type, const int8_t* q, float d, __m256 acc) {
    const __m256i sums = dot32_i8(block_values(block, type), _mm256_loadu_si256((const __m256i*)q));
    return _mm256_fmadd_ps(_mm256_set1_ps(half_to_float(block) * d), _mm256_cvtepi32_ps(sums), acc);
}

/* out[r * stride] = weight row w (K values in Q8_0, Q4_0 or Q5_0 blocks) . row r0 + r of a (Q8_0), r < n; the
   even blocks' terms in one set of 8 fp32 lanes, the odd blocks' in another (as tile32 takes two blocks a 512-bit
   vector), added before the one horizontal sum: the same bits as tile32's */
static inline void row_dot(const uint8_t* w, int type, int K, int n, const Q8Rows* a, int r0, float* out, int stride) {
    const int blocks = K / 32, bytes = ggml_block_bytes(type);
    if (n == 1) { /* a decode step's row: the sums in registers */
        const int8_t* q = a->q + (size_t)r0 * K;
        const float* d = a->d + (size_t)r0 * blocks;
        __m256 even = _mm256_setzero_ps(), odd = _mm256_setzero_ps();
        int b = 0;
        for (; b + 1 < blocks; b += 2) {
            even = block_dot(w + (size_t)b * bytes, type, q + 32 * b, d[b], even);
            odd = block_dot(w + (size_t)(b + 1) * bytes, type, q + 32 * (b + 1), d[b + 1], odd);
        }
        if (b < blocks) even = block_dot(w + (size_t)b * bytes, type, q + 32 * b, d[b], even);
        out[0] = hsum(_mm256_add_ps(even, odd));
        return;
    }
    __m256 acc[EXPERT_MAX_ROWS][2];
    for (int r = 0; r < n; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int b = 0; b < blocks; b++) {
        const uint8_t* block = w + (size_t)b * bytes;
        const __m256i values = block_values(block, type);
        const float dw = half_to_float(block);
        for (int r = 0; r < n; r++) {
            const size_t row = (size_t)(r0 + r);
            const __m256i sums = dot32_i8(values, _mm256_loadu_si256((const __m256i*)(a->q + row * K + 32 * b)));
            acc[r][b & 1] = _mm256_fmadd_ps(_mm256_set1_ps(dw * a->d[row * blocks + b]), _mm256_cvtepi32_ps(sums), acc[r][b & 1]);
        }
    }
    for (int r = 0; r < n; r++) out[(size_t)r * stride] = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
}

/* IQ2_XXS's and IQ3_XXS's sub-block i (32 values) of block b: the grid points' unsigned values (the result), their
   signs as bytes of 1 or -1 (`signs`) and the integer scale 2 * s + 1 of the 4 bits s; w = d * scale * value * sign
   / 8 (IQ2_XXS) or / 4 (IQ3_XXS), the fp16 d the block's first 2 bytes. IQ2_XXS: 8 bytes a sub-block after d, 4
   grid indices (8 values each), then a uint32 of 4 seven-bit sign indices (one per 8 values) and s in its top 4
   bits. IQ3_XXS: 64 bytes of grid indices after d (4 values each, 8 a sub-block), then the sub-blocks' uint32s as
   IQ2_XXS's */
static inline __m256i iq_values(const uint8_t* b, int type, int i, __m256i* signs, int* scale) {
    uint32_t aux;
    __m256i grid;
    const uint8_t* index = b + 2 + 8 * i; /* (table lookups: a gather instruction took 2.2-2.6x as long a decode row; signs from pdep and parity
                                           bits in a mask took 0.9-1.0x the time, not kept) */
    if (type == GGML_IQ2_XXS) {
        grid = _mm256_set_epi64x((long long)IQ2XXS_GRID[index[3]], (long long)IQ2XXS_GRID[index[2]], (long long)IQ2XXS_GRID[index[1]],
                                 (long long)IQ2XXS_GRID[index[0]]);
        memcpy(&aux, index + 4, 4);
    } else {
        grid = _mm256_set_epi32((int)IQ3XXS_GRID[index[7]], (int)IQ3XXS_GRID[index[6]], (int)IQ3XXS_GRID[index[5]], (int)IQ3XXS_GRID[index[4]],
                                (int)IQ3XXS_GRID[index[3]], (int)IQ3XXS_GRID[index[2]], (int)IQ3XXS_GRID[index[1]], (int)IQ3XXS_GRID[index[0]]);
        memcpy(&aux, b + 66 + 4 * i, 4);
    }
    *signs = _mm256_set_epi64x((long long)IQ_SIGNS[(aux >> 21) & 127], (long long)IQ_SIGNS[(aux >> 14) & 127], (long long)IQ_SIGNS[(aux >> 7) & 127],
                               (long long)IQ_SIGNS[aux & 127]);
    *scale = 2 * (int)(aux >> 28) + 1;
    return grid;
}
static inline float iq_d(const uint8_t* b, int type) { return half_to_float(b) * (type == GGML_IQ2_XXS ? 0.125f : 0.25f); }

/* one K-quant block of 256 weights in the form every K-quant's dot product takes: w = d * scale[k / 16] * v[k]
   + dm * offset[k / 16] * (1 / ...): unsigned values v (0..63; IQ2_XXS's and IQ3_XXS's 2..126, pairs of products still within int16), a scale a 16 (int16; sc[i]'s halves: chunk i of
   32 values), and the offsets, such that the block's product with a Q8_K block (d_a, q, sums) is
   d_a * (d * sum_k scale * v * q + dm * sum_j offset[j] * sums[j]) */
typedef struct {
    uint8_t v[256];
    __m256i sc[8];
    __m256i offset; /* int16 [16] */
    float d, dm;
    int sign;       /* IQ4_XS: v are signed (int8 values of its table), met by the sign trick, no offsets */
} KBlock;

/* Q4_K's and Q5_K's 8 six-bit scales and minimums, packed in 12 bytes */
static inline void k4_scales(const uint8_t* q, int* sc, int* m) {
    for (int j = 0; j < 4; j++) sc[j] = q[j] & 63, m[j] = q[j + 4] & 63;
    for (int j = 4; j < 8; j++) sc[j] = (q[j + 4] & 15) | ((q[j - 4] >> 6) << 4), m[j] = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
}

static inline void decode_k(const uint8_t* b, int type, KBlock* k) {
    const __m256i low4 = _mm256_set1_epi8(15);
    k->sign = type == GGML_IQ4_XS;
    if (iq_xxs(type)) { /* the signed grid values + 64 (2..126: unsigned, as the K-quants'), the 64 taken off by the offsets */
        int16_t offset[16];
        for (int i = 0; i < 8; i++) {
            __m256i signs;
            int scale;
            const __m256i grid = iq_values(b, type, i, &signs, &scale);
            _mm256_storeu_si256((__m256i*)(k->v + 32 * i), _mm256_add_epi8(_mm256_sign_epi8(grid, signs), _mm256_set1_epi8(64)));
            k->sc[i] = _mm256_set1_epi16((int16_t)scale);
            offset[2 * i] = offset[2 * i + 1] = (int16_t)(-64 * scale);
        }
        k->offset = _mm256_loadu_si256((const __m256i*)offset);
        k->d = k->dm = iq_d(b, type);
        return;
    }
    if (type == GGML_IQ4_XS) { /* d, scales_h (2 bits a sub-block of 32), scales_l [4] (4 bits one), qs [128]: sub-block i's 16
                                  bytes, low nibbles its first 16 values, high ones the rest, each an index into the
                                  non-linear table; w = d * (scale - 32) * table[index] */
        const __m128i table = _mm_setr_epi8(-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113), low = _mm_set1_epi8(15);
        uint16_t high;
        memcpy(&high, b + 2, 2);
        for (int i = 0; i < 8; i++) {
            const __m128i q = _mm_loadu_si128((const __m128i*)(b + 8 + 16 * i));
            _mm_storeu_si128((__m128i*)(k->v + 32 * i), _mm_shuffle_epi8(table, _mm_and_si128(q, low)));
            _mm_storeu_si128((__m128i*)(k->v + 32 * i + 16), _mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16(q, 4), low)));
            const int scale = (((b[4 + i / 2] >> (4 * (i % 2))) & 15) | (((high >> (2 * i)) & 3) << 4)) - 32;
            k->sc[i] = _mm256_set1_epi16((int16_t)scale);
        }
        k->offset = _mm256_setzero_si256();
        k->d = half_to_float(b), k->dm = 0.f;
        return;
    }
    if (type == GGML_Q2_K) { /* scales [16] (low 4 bits the scale, high 4 the minimum, one a 16 values), qs [64] (2 bits
                                a value: half h's bits 2j..2j+1 of byte l are value 128h + 32j + l), d, dmin */
        for (int half = 0; half < 2; half++) {
            const __m256i bits = _mm256_loadu_si256((const __m256i*)(b + 16 + 32 * half));
            for (int j = 0; j < 4; j++)
                _mm256_storeu_si256((__m256i*)(k->v + 128 * half + 32 * j), _mm256_and_si256(_mm256_srli_epi16(bits, 2 * j), _mm256_set1_epi8(3)));
        }
        int16_t offset[16];
        for (int j = 0; j < 16; j++) offset[j] = (int16_t)(b[j] >> 4);
        for (int i = 0; i < 8; i++) k->sc[i] = _mm256_set_m128i(_mm_set1_epi16(b[2 * i + 1] & 15), _mm_set1_epi16(b[2 * i] & 15));
        k->offset = _mm256_loadu_si256((const __m256i*)offset);
        k->d = half_to_float(b + 80), k->dm = -half_to_float(b + 82);
        return;
    }
    if (type == GGML_Q3_K) { /* hmask [32] (bit 4h + j of byte l: value 128h + 32j + l's third bit), qs [64] (2 bits as
                                Q2_K's), 12 bytes of 16 six-bit scales (stored + 32), d: w = d * scale * (v - 4) */
        const __m256i hmask = _mm256_loadu_si256((const __m256i*)b), one = _mm256_set1_epi8(1);
        for (int half = 0; half < 2; half++) {
            const __m256i bits = _mm256_loadu_si256((const __m256i*)(b + 32 + 32 * half));
            for (int j = 0; j < 4; j++) {
                const __m256i third = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hmask, 4 * half + j), one), 2);
                _mm256_storeu_si256((__m256i*)(k->v + 128 * half + 32 * j), _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(bits, 2 * j), _mm256_set1_epi8(3)), third));
            }
        }
        const uint8_t* packed = b + 96;
        int16_t scale[16], offset[16];
        for (int j = 0; j < 16; j++) {
            scale[j] = (int16_t)((((packed[j % 8] >> (4 * (j / 8))) & 15) | (((packed[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32);
            offset[j] = (int16_t)(-4 * scale[j]);
        }
        for (int i = 0; i < 8; i++) k->sc[i] = _mm256_set_m128i(_mm_set1_epi16(scale[2 * i + 1]), _mm_set1_epi16(scale[2 * i]));
        k->offset = _mm256_loadu_si256((const __m256i*)offset);
        k->d = k->dm = half_to_float(b + 108);
        return;
    }
    if (type == GGML_Q6_K) { /* ql [128], qh [64], scales [16] int8, d: v = low 4 bits | 2 high bits << 4, w = d * scale * (v - 32) */
        const uint8_t *ql = b, *qh = b + 128;
        const int8_t* scales = (const int8_t*)(b + 192);
        const __m256i high2 = _mm256_set1_epi8(0x30);
        for (int half = 0; half < 2; half++) {
            const __m256i l0 = _mm256_loadu_si256((const __m256i*)(ql + 64 * half)), l1 = _mm256_loadu_si256((const __m256i*)(ql + 64 * half + 32));
            const __m256i h = _mm256_loadu_si256((const __m256i*)(qh + 32 * half));
            uint8_t* v = k->v + 128 * half;
            _mm256_storeu_si256((__m256i*)v, _mm256_or_si256(_mm256_and_si256(l0, low4), _mm256_and_si256(_mm256_slli_epi16(h, 4), high2)));
            _mm256_storeu_si256((__m256i*)(v + 32), _mm256_or_si256(_mm256_and_si256(l1, low4), _mm256_and_si256(_mm256_slli_epi16(h, 2), high2)));
            _mm256_storeu_si256((__m256i*)(v + 64), _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), low4), _mm256_and_si256(h, high2)));
            _mm256_storeu_si256((__m256i*)(v + 96), _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), low4), _mm256_and_si256(_mm256_srli_epi16(h, 2), high2)));
        }
        int16_t offset[16];
        for (int j = 0; j < 16; j++) offset[j] = (int16_t)(-32 * scales[j]);
        for (int i = 0; i < 8; i++) k->sc[i] = _mm256_set_m128i(_mm_set1_epi16(scales[2 * i + 1]), _mm_set1_epi16(scales[2 * i]));
        k->offset = _mm256_loadu_si256((const __m256i*)offset);
        k->d = k->dm = half_to_float(b + 208);
        return;
    }
    /* Q4_K: d, dmin, scales [12], qs [128]; Q5_K: d, dmin, scales [12], qh [32], qs [128]. Chunk j of 64 values:
       the low nibbles of qs[32j ..] are sub-block 2j, the high ones 2j + 1 (Q5_K: plus bit 2j or 2j + 1 of qh,
       times 16); w = d * sc[s] * v - dmin * m[s] */
    int sc[8], m[8];
    k4_scales(b + 4, sc, m);
    const uint8_t* qs = b + (type == GGML_Q5_K ? 48 : 16);
    const __m256i qh = type == GGML_Q5_K ? _mm256_loadu_si256((const __m256i*)(b + 16)) : _mm256_setzero_si256(), one = _mm256_set1_epi8(1);
    for (int j = 0; j < 4; j++) {
        const __m256i q = _mm256_loadu_si256((const __m256i*)(qs + 32 * j));
        __m256i lo = _mm256_and_si256(q, low4), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), low4);
        if (type == GGML_Q5_K) {
            lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * j), one), 4));
            hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * j + 1), one), 4));
        }
        _mm256_storeu_si256((__m256i*)(k->v + 64 * j), lo);
        _mm256_storeu_si256((__m256i*)(k->v + 64 * j + 32), hi);
    }
    int16_t offset[16];
    for (int s = 0; s < 8; s++) k->sc[s] = _mm256_set1_epi16((int16_t)sc[s]), offset[2 * s] = offset[2 * s + 1] = (int16_t)m[s];
    k->offset = _mm256_loadu_si256((const __m256i*)offset);
    k->d = half_to_float(b), k->dm = -half_to_float(b + 2);
}

/* chunk c's scales as madd takes them: a 16-lane int16 vector whose lanes 0-7 are byte 2c of s (as int16) and
   lanes 8-15 byte 2c + 1, for 16 scales a block (Q6_K: int8, signed); k4: 8 scales, each for 32 values (both halves
   byte c) */
static inline __m256i chunk_scales(__m128i s, int c, int k4) {
    const __m128i pick = k4 ? _mm_set1_epi8((char)c) : _mm_set_epi64x(0x0101010101010101LL * (2 * c + 1), 0x0101010101010101LL * (2 * c));
    const __m128i bytes = _mm_shuffle_epi8(s, pick);
    return k4 ? _mm256_cvtepu8_epi16(bytes) : _mm256_cvtepi8_epi16(bytes);
}

/* acc + one K-quant block (b, `type`) times one Q8_K block (q [256], sums [16], da), decoded in registers (the
   decode step's one row: nothing to share the decoding with). The integer sums are exact, so the same as
   row_dot_k's for several rows; with AVX512BW two chunks of 32 a vector. */
#ifdef __AVX512BW__
typedef __m512i KSum;
#define KSUM_ZERO _mm512_setzero_si512()
/* sum + chunks c and c + 1 (their 64 values v0, v1) times q's, scaled by chunk_scales(c), chunk_scales(c + 1) */
static inline KSum dot_pair(KSum sum, __m256i v0, __m256i v1, const int8_t* q, __m512i scales) {
    const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(v0), v1, 1);
    return _mm512_add_epi32(sum, _mm512_madd_epi16(_mm512_maddubs_epi16(v, _mm512_loadu_si512(q)), scales));
}
static inline __m512i pair_scales(__m128i s, int c, int k4) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(chunk_scales(s, c, k4)), chunk_scales(s, c + 1, k4), 1);
}
static inline __m256i ksum_256(KSum sum) { return _mm256_add_epi32(_mm512_castsi512_si256(sum), _mm512_extracti64x4_epi64(sum, 1)); }
#else
typedef __m256i KSum;
#define KSUM_ZERO _mm256_setzero_si256()
static inline KSum dot_pair(KSum sum, __m256i v0, __m256i v1, const int8_t* q, __m256i scales[2]) {
    sum = _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_maddubs_epi16(v0, _mm256_loadu_si256((const __m256i*)q)), scales[0]));
    return _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_maddubs_epi16(v1, _mm256_loadu_si256((const __m256i*)(q + 32))), scales[1]));
}
#define pair_scales(s, c, k4) ((__m256i[2]){chunk_scales(s, c, k4), chunk_scales(s, (c) + 1, k4)})
static inline __m256i ksum_256(KSum sum) { return sum; }
#endif

/* dot_k_block's for IQ2_XXS and IQ3_XXS, in decode_k's form (the signed grid values + 64, the offsets -64 times each
   sub-block's scale met by the activations' sums): the same integer lanes and fp32 operations as row_dot_k's for
   several rows and the tiles. (Two sums for alternate sub-blocks took 1.07x the time for IQ3_XXS, not kept.) */
static inline __attribute__((always_inline)) __m256 dot_iq_block(const uint8_t* b, int type, const int8_t* q, const int16_t* sums, float da, __m256 acc) {
    __m256i sum = _mm256_setzero_si256();
    for (int i = 0; i < 8; i++) {
        __m256i signs;
        int scale;
        const __m256i grid = iq_values(b, type, i, &signs, &scale);
        const __m256i v = _mm256_add_epi8(_mm256_sign_epi8(grid, signs), _mm256_set1_epi8(64));
        const __m256i products = _mm256_maddubs_epi16(v, _mm256_loadu_si256((const __m256i*)(q + 32 * i)));
        sum = _mm256_add_epi32(sum, _mm256_madd_epi16(products, _mm256_set1_epi16((int16_t)scale)));
    }
    /* lane i of decode_k's madd(offset, sums): -64 * scale_i * (sums[2i] + sums[2i + 1]), the 8 sub-blocks' uint32s
       (IQ2_XXS: every other one of the 16 after d) in one vector */
    __m256i aux = _mm256_loadu_si256((const __m256i*)(b + 66));
    if (type == GGML_IQ2_XXS) {
        const __m256 odd = _mm256_shuffle_ps(_mm256_castsi256_ps(_mm256_loadu_si256((const __m256i*)(b + 2))),
                                             _mm256_castsi256_ps(_mm256_loadu_si256((const __m256i*)(b + 34))), _MM_SHUFFLE(3, 1, 3, 1));
        aux = _mm256_permute4x64_epi64(_mm256_castps_si256(odd), _MM_SHUFFLE(3, 1, 2, 0)); /* sub-blocks 0 1 4 5 | 2 3 6 7 -> 0 .. 7 */
    }
    const __m256i scales = _mm256_add_epi32(_mm256_slli_epi32(_mm256_srli_epi32(aux, 28), 1), _mm256_set1_epi32(1));
    const __m256i pairs = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i*)sums), _mm256_set1_epi16(1));
    const __m256i offsets = _mm256_mullo_epi32(pairs, _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(scales, 6)));
    const float d = iq_d(b, type);
    acc = _mm256_fmadd_ps(_mm256_set1_ps(d * da), _mm256_cvtepi32_ps(sum), acc);
    return _mm256_fmadd_ps(_mm256_set1_ps(d * da), _mm256_cvtepi32_ps(offsets), acc);
}

static inline __m256 dot_k_block(const uint8_t* b, int type, const int8_t* q, const int16_t* sums, float da, __m256 acc) {
    const __m256i low4 = _mm256_set1_epi8(15);
    KSum sum = KSUM_ZERO;
    __m256i offset;
    float d, dm;
    if (type == GGML_IQ2_XXS) return dot_iq_block(b, GGML_IQ2_XXS, q, sums, da, acc); /* (the type a constant in each: 0.91-0.96x the time) */
    if (type == GGML_IQ3_XXS) return dot_iq_block(b, GGML_IQ3_XXS, q, sums, da, acc);
    if (type == GGML_Q6_K) {
        const uint8_t *ql = b, *qh = b + 128;
        const __m128i s = _mm_loadu_si128((const __m128i*)(b + 192));
        const __m256i high2 = _mm256_set1_epi8(0x30);
        for (int half = 0; half < 2; half++) {
            const __m256i l0 = _mm256_loadu_si256((const __m256i*)(ql + 64 * half)), l1 = _mm256_loadu_si256((const __m256i*)(ql + 64 * half + 32));
            const __m256i h = _mm256_loadu_si256((const __m256i*)(qh + 32 * half));
            const int c = 4 * half;
            sum = dot_pair(sum, _mm256_or_si256(_mm256_and_si256(l0, low4), _mm256_and_si256(_mm256_slli_epi16(h, 4), high2)),
                           _mm256_or_si256(_mm256_and_si256(l1, low4), _mm256_and_si256(_mm256_slli_epi16(h, 2), high2)), q + 32 * c, pair_scales(s, c, 0));
            sum = dot_pair(sum, _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), low4), _mm256_and_si256(h, high2)),
                           _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), low4), _mm256_and_si256(_mm256_srli_epi16(h, 2), high2)),
                           q + 32 * (c + 2), pair_scales(s, c + 2, 0));
        }
        offset = _mm256_sub_epi16(_mm256_setzero_si256(), _mm256_slli_epi16(_mm256_cvtepi8_epi16(s), 5)); /* -32 * scale */
        d = dm = half_to_float(b + 208);
    } else {
        uint32_t u[3]; /* the 12 bytes of 6-bit scales and minimums -> bytes 0-7 the scales, 8-15 the minimums */
        memcpy(u, b + 4, 12);
        const uint32_t six = 0x3f3f3f3f, four = 0x0f0f0f0f, two = 0x03030303;
        /* built in registers: 16 bytes loaded over four 4-byte stores would stall on store forwarding */
        const __m128i s = _mm_set_epi32((int)(((u[2] >> 4) & four) | (((u[1] >> 6) & two) << 4)), (int)(u[1] & six),
                                        (int)((u[2] & four) | (((u[0] >> 6) & two) << 4)), (int)(u[0] & six));
        const int q5 = type == GGML_Q5_K;
        const uint8_t* qs = b + (q5 ? 48 : 16);
        const __m256i qh = q5 ? _mm256_loadu_si256((const __m256i*)(b + 16)) : _mm256_setzero_si256(), one = _mm256_set1_epi8(1);
        for (int j = 0; j < 4; j++) {
            const __m256i bits = _mm256_loadu_si256((const __m256i*)(qs + 32 * j));
            __m256i lo = _mm256_and_si256(bits, low4), hi = _mm256_and_si256(_mm256_srli_epi16(bits, 4), low4);
            if (q5) {
                lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * j), one), 4));
                hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * j + 1), one), 4));
            }
            sum = dot_pair(sum, lo, hi, q + 64 * j, pair_scales(s, 2 * j, 1));
        }
        /* each minimum twice, one a 16 values: bytes 8, 8, 9, 9, ... */
        offset = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(s, _mm_set_epi8(15, 15, 14, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8)));
        d = half_to_float(b), dm = -half_to_float(b + 2);
    }
    const __m256i offsets = _mm256_madd_epi16(offset, _mm256_loadu_si256((const __m256i*)sums));
    acc = _mm256_fmadd_ps(_mm256_set1_ps(d * da), _mm256_cvtepi32_ps(ksum_256(sum)), acc);
    return _mm256_fmadd_ps(_mm256_set1_ps(dm * da), _mm256_cvtepi32_ps(offsets), acc);
}

/* out[r * stride] = weight row w (K values in K-quant blocks of `type`) . row r0 + r of a (Q8_K), r < n */
static inline void row_dot_k(const uint8_t* w, int type, int K, int n, const Q8Rows* a, int r0, float* out, int stride) {
    const int blocks = K / 256, bytes = ggml_block_bytes(type);
    if (n == 1 && ((type >= GGML_Q4_K && type <= GGML_Q6_K) || iq_xxs(type))) { /* (Q2_K, Q3_K, IQ4_XS: decoded as for several rows, below) */
        const size_t row = (size_t)r0;
        __m256 acc = _mm256_setzero_ps();
        for (int b = 0; b < blocks; b++)
            acc = dot_k_block(w + (size_t)b * bytes, type, a->q + row * K + 256 * b, a->sums + row * (K / 16) + 16 * b, a->d[row * (K / 32) + b], acc);
        out[0] = hsum(acc);
        return;
    }
    __m256 acc[EXPERT_MAX_ROWS];
    for (int r = 0; r < n; r++) acc[r] = _mm256_setzero_ps();
    KBlock k;
    for (int b = 0; b < blocks; b++) {
        decode_k(w + (size_t)b * bytes, type, &k);
        for (int r = 0; r < n; r++) {
            const size_t row = (size_t)(r0 + r);
            const int8_t* q = a->q + row * K + 256 * b;
            __m256i sum = _mm256_setzero_si256();
            for (int i = 0; i < 8; i++) {
                const __m256i v = _mm256_loadu_si256((const __m256i*)(k.v + 32 * i)), x = _mm256_loadu_si256((const __m256i*)(q + 32 * i));
                const __m256i products = k.sign ? _mm256_maddubs_epi16(_mm256_sign_epi8(v, v), _mm256_sign_epi8(x, v)) : _mm256_maddubs_epi16(v, x);
                sum = _mm256_add_epi32(sum, _mm256_madd_epi16(products, k.sc[i]));
            }
            const __m256i offsets = _mm256_madd_epi16(k.offset, _mm256_loadu_si256((const __m256i*)(a->sums + row * (K / 16) + 16 * b)));
            const float da = a->d[row * (K / 32) + b];
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(k.d * da), _mm256_cvtepi32_ps(sum), acc[r]);
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(k.dm * da), _mm256_cvtepi32_ps(offsets), acc[r]);
        }
    }
    for (int r = 0; r < n; r++) out[(size_t)r * stride] = hsum(acc[r]);
}

/* rows r0 .. r0 + n - 1 (any number: EXPERT_MAX_ROWS at a time, the weight row staying in the core's cache) */
static inline void weight_row_dot(const uint8_t* w, int type, int K, int n, const Q8Rows* q0, const Q8Rows* qk, int r0, float* out, int stride) {
    for (int start = 0; start < n; start += EXPERT_MAX_ROWS) {
        const int m = n - start < EXPERT_MAX_ROWS ? n - start : EXPERT_MAX_ROWS;
        if (k_quant(type)) row_dot_k(w, type, K, m, qk, r0 + start, out + (size_t)start * stride, stride);
        else row_dot(w, type, K, m, q0, r0 + start, out + (size_t)start * stride, stride);
    }
}

static int ggml_takes(int type, int K) { return ggml_block_bytes(type) && K % ggml_block_values(type) == 0; }

/* The many-row path (AVX512-VNNI): an expert with TILE_MIN_ROWS rows or more takes its weight rows TILE_N at a time,
   each group first laid out in a panel (its blocks decoded once for all the expert's rows), then met by the rows a
   few at a time, each weight and activation vector in a register serving several products (llama.cpp's tiled
   GEMMs, tinyBLAS's and ggml's repacked ones, do the same). Each (weight row, activation row) product is the
   one-row path's arithmetic exactly: the same integer lanes, scales, fp32 operations and their order. */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define GGML_TILES 1
#define TILE_N 4        /* weight rows a work item */
#define TILE_MIN_ROWS 2 /* an expert's rows from which it takes the tiles (fewer: row_dot / row_dot_k) */

static inline __m512i join_i(__m256i lo, __m256i hi) { return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1); }
static inline __m512 join_f(__m256 lo, __m256 hi) {
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(lo)), _mm256_castps_pd(hi), 1));
}
static inline __m256 fold_f(__m512 v) { return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))); }

/* two blocks of 32 (an even one in the low half, the next in the high half) of TILE_N weight rows: their values
   (int8), minus 128 times their sums of 4 (the activations meet them as unsigned bytes, q + 128, in vpdpbusd, so
   this begins each sum where the sign trick's would end), and each block's scale over its 8 lanes */
typedef struct {
    __m512i w[TILE_N], neg[TILE_N];
    __m512 dw[TILE_N];
} Pair32;

/* TILE_N weight rows (w, row_bytes apart) of `blocks` blocks of 32 -> (blocks + 1) / 2 pairs; an odd count's last
   pair is zero in its high half */
static void panel32(const uint8_t* w, size_t row_bytes, int type, int blocks, Pair32* p) {
    const int bytes = ggml_block_bytes(type);
    const __m512i top = _mm512_set1_epi8((char)0x80), zero = _mm512_setzero_si512();
    for (int j = 0; j < TILE_N; j++)
        for (int b = 0; b < blocks; b += 2) {
            const uint8_t* block = w + j * row_bytes + (size_t)b * bytes;
            const int two = b + 1 < blocks;
            const __m512i v = join_i(block_values(block, type), two ? block_values(block + bytes, type) : _mm256_setzero_si256());
            p[b / 2].w[j] = v;
            p[b / 2].neg[j] = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, top, v));
            p[b / 2].dw[j] = join_f(_mm256_set1_ps(half_to_float(block)), _mm256_set1_ps(two ? half_to_float(block + bytes) : 0.f));
        }
}

/* acc[i][j] + pair c of the panel's weight row j . activation row `row` + i's blocks 2c and 2c + 1 (`two`: else
   2c alone), i < M, j < TILE_N */
static inline __attribute__((always_inline)) void pair32(const Pair32* p, const Q8Rows* a, int K, size_t row, const int M, int c, const int two,
                                                         __m512 acc[4][TILE_N]) {
    const __m512i top = _mm512_set1_epi8((char)0x80);
    __m512i x[4];
    __m512 da[4];
    for (int i = 0; i < M; i++) {
        const int8_t* q = a->q + (row + i) * K + 64 * c;
        const float* d = a->d + (row + i) * (K / 32) + 2 * c;
        x[i] = _mm512_xor_si512(two ? _mm512_loadu_si512(q) : _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i*)q)), top);
        da[i] = join_f(_mm256_set1_ps(d[0]), two ? _mm256_set1_ps(d[1]) : _mm256_setzero_ps());
    }
    for (int j = 0; j < TILE_N; j++) {
        const __m512i w = _mm512_load_si512(&p[c].w[j]);
        for (int i = 0; i < M; i++) {
            const __m512i sums = _mm512_dpbusd_epi32(_mm512_load_si512(&p[c].neg[j]), x[i], w);
            acc[i][j] = _mm512_fmadd_ps(_mm512_mul_ps(da[i], _mm512_load_ps(&p[c].dw[j])), _mm512_cvtepi32_ps(sums), acc[i][j]);
        }
    }
}

/* out[i * stride + j] = weight row j of the panel . activation row `row` + i (Q8_0), i < M, j < TILE_N */
static inline __attribute__((always_inline)) void tile32(const Pair32* p, int blocks, const Q8Rows* a, int K, size_t row, const int M, float* out, size_t stride) {
    __m512 acc[4][TILE_N];
    for (int i = 0; i < M; i++)
        for (int j = 0; j < TILE_N; j++) acc[i][j] = _mm512_setzero_ps();
    for (int c = 0; c < blocks / 2; c++) pair32(p, a, K, row, M, c, 1, acc);
    if (blocks & 1) pair32(p, a, K, row, M, blocks / 2, 0, acc);
    for (int i = 0; i < M; i++)
        for (int j = 0; j < TILE_N; j++) out[i * stride + j] = hsum(fold_f(acc[i][j]));
}

/* the K-quants whose common form has unsigned values, IQ2_XXS's and IQ3_XXS's too (IQ4_XS's are signed: row_dot_k's sign
   trick, which AVX512 lacks) */
static inline int tile_k_takes(int type) { return (type >= GGML_Q2_K && type <= GGML_Q6_K) || iq_xxs(type); }

/* out[i * stride + j] = weight row j (p + j * blocks: its blocks decoded by decode_k) . activation row `row` + i
   (Q8_K), i < M, j < TILE_N: row_dot_k's integer lanes (two chunks of 32 a vector, folded) and fp32 operations */
static inline __attribute__((always_inline)) void tile_k(const KBlock* p, int blocks, const Q8Rows* a, int K, size_t row, const int M, float* out, size_t stride) {
    __m256 acc[2][TILE_N];
    for (int i = 0; i < M; i++)
        for (int j = 0; j < TILE_N; j++) acc[i][j] = _mm256_setzero_ps();
    for (int b = 0; b < blocks; b++) {
        __m512i sum[2][TILE_N];
        for (int i = 0; i < M; i++)
            for (int j = 0; j < TILE_N; j++) sum[i][j] = _mm512_setzero_si512();
        for (int c = 0; c < 4; c++) { /* chunks 2c and 2c + 1 of 32 values */
            __m512i x[2];
            for (int i = 0; i < M; i++) x[i] = _mm512_loadu_si512(a->q + (row + i) * K + 256 * b + 64 * c);
            for (int j = 0; j < TILE_N; j++) {
                const KBlock* k = p + (size_t)j * blocks + b;
                const __m512i v = _mm512_loadu_si512(k->v + 64 * c), sc = _mm512_loadu_si512(&k->sc[2 * c]);
                for (int i = 0; i < M; i++) sum[i][j] = _mm512_dpwssd_epi32(sum[i][j], _mm512_maddubs_epi16(v, x[i]), sc);
            }
        }
        for (int i = 0; i < M; i++) {
            const __m256i sums = _mm256_loadu_si256((const __m256i*)(a->sums + (row + i) * (K / 16) + 16 * b));
            const float da = a->d[(row + i) * (K / 32) + b];
            for (int j = 0; j < TILE_N; j++) {
                const KBlock* k = p + (size_t)j * blocks + b;
                const __m256i lanes = _mm256_add_epi32(_mm512_castsi512_si256(sum[i][j]), _mm512_extracti64x4_epi64(sum[i][j], 1));
                const __m256i offsets = _mm256_madd_epi16(k->offset, sums);
                acc[i][j] = _mm256_fmadd_ps(_mm256_set1_ps(k->d * da), _mm256_cvtepi32_ps(lanes), acc[i][j]);
                acc[i][j] = _mm256_fmadd_ps(_mm256_set1_ps(k->dm * da), _mm256_cvtepi32_ps(offsets), acc[i][j]);
            }
        }
    }
    for (int i = 0; i < M; i++)
        for (int j = 0; j < TILE_N; j++) out[i * stride + j] = hsum(acc[i][j]);
}

/* panel bytes a thread needs for rows of K values (either kind), a multiple of 64 (each thread's panel 64-byte aligned) */
static size_t panel_bytes(int K) {
    const size_t pairs = sizeof(Pair32) * (size_t)((K / 32 + 1) / 2), k = sizeof(KBlock) * TILE_N * (size_t)(K / 256);
    return ((pairs > k ? pairs : k) + 63) / 64 * 64;
}

/* TILE_N weight rows of `type` (w, row_bytes apart, K values each) . the n activation rows from r0, out[r * stride
   + j]; `panel` is the thread's (panel_bytes(K), 64-byte aligned) */
static void weight_rows_tiled(const uint8_t* w, size_t row_bytes, int type, int K, int n, const Q8Rows* q0, const Q8Rows* qk, int r0,
                              float* out, size_t stride, void* panel) {
    int r = 0;
    if (tile_k_takes(type)) {
        KBlock* p = panel;
        const int blocks = K / 256;
        for (int j = 0; j < TILE_N; j++)
            for (int b = 0; b < blocks; b++) decode_k(w + j * row_bytes + (size_t)b * ggml_block_bytes(type), type, p + (size_t)j * blocks + b);
        for (; r + 2 <= n; r += 2) tile_k(p, blocks, qk, K, (size_t)(r0 + r), 2, out + (size_t)r * stride, stride);
        if (r < n) tile_k(p, blocks, qk, K, (size_t)(r0 + r), 1, out + (size_t)r * stride, stride);
        return;
    }
    Pair32* p = panel;
    const int blocks = K / 32;
    panel32(w, row_bytes, type, blocks, p);
    for (; r + 4 <= n; r += 4) tile32(p, blocks, q0, K, (size_t)(r0 + r), 4, out + (size_t)r * stride, stride);
    switch (n - r) {
        case 3: tile32(p, blocks, q0, K, (size_t)(r0 + r), 3, out + (size_t)r * stride, stride); break;
        case 2: tile32(p, blocks, q0, K, (size_t)(r0 + r), 2, out + (size_t)r * stride, stride); break;
        case 1: tile32(p, blocks, q0, K, (size_t)(r0 + r), 1, out + (size_t)r * stride, stride); break;
    }
}
#endif

#define ITEM_ROWS 4 /* weight rows a work item (TILE_N where the tiles are built) */

/* weight rows n .. n + ITEM_ROWS - 1 of an expert's matrix w (rows of K values in `type`) . its `rows` activation
   rows from r0: out[r * stride + n + j]; panel: the thread's, for the tiles */
static void item_rows(const uint8_t* w, int type, int K, int n, int rows, const Q8Rows* q0, const Q8Rows* qk, int r0, float* out, size_t stride,
                      void* panel) {
    const size_t row_bytes = (size_t)K / ggml_block_values(type) * ggml_block_bytes(type);
#ifdef GGML_TILES
    if (rows >= TILE_MIN_ROWS && (!k_quant(type) || tile_k_takes(type))) {
        weight_rows_tiled(w + n * row_bytes, row_bytes, type, K, rows, q0, qk, r0, out + n, stride, panel);
        return;
    }
#else
    (void)panel;
#endif
    for (int j = 0; j < ITEM_ROWS; j++) weight_row_dot(w + (size_t)(n + j) * row_bytes, type, K, rows, q0, qk, r0, out + n + j, (int)stride);
}
#endif

int experts_ggml(const float* x, int D, int F, int E, const int* starts, const uint8_t* const* gate_up, const uint8_t* const* down,
                 const uint8_t* const* types, float* y, int threads, int act) {
#if defined(__AVX2__) && defined(__F16C__)
    if (D % 32 || F % 32 || E < 1 || (act != ACT_SILU && act != ACT_GELU_TANH)) return 1;
    int quant[2][2] = {{0, 0}, {0, 0}}; /* [matrix][K-quant]: which roundings of x (gate_up) and h (down) are needed */
    for (int e = 0; e < E; e++) {
        if (starts[e + 1] < starts[e]) return 1;
        if (!ggml_takes(types[e][0], D) || !ggml_takes(types[e][1], F)) return 1;
        quant[0][k_quant(types[e][0])] = quant[1][k_quant(types[e][1])] = 1;
    }
    const int R = starts[E], rows = R ? R : 1;
    Q8Rows a[2][2] = {{{0}}}; /* [matrix][K-quant] */
    float* gu = malloc(sizeof(float) * (size_t)rows * 2 * F); /* [R, 2F]: gate then up */
#ifdef GGML_TILES
    const size_t panel = panel_bytes(D > F ? D : F);
    uint8_t* panels = aligned_alloc(64, panel * (size_t)threads); /* one a thread */
#else
    const size_t panel = 0;
    uint8_t* panels = NULL;
#endif
    int ok = gu != NULL && (!panel || panels);
    for (int t = 0; t < 2; t++)
        for (int kq = 0; kq < 2; kq++) ok = ok && (!quant[t][kq] || q8_rows(&a[t][kq], rows, t ? F : D));
    if (!ok) {
        for (int t = 0; t < 2; t++)
            for (int kq = 0; kq < 2; kq++) free_q8_rows(&a[t][kq]);
        free(gu), free(panels);
        return 2;
    }
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int r = 0; r < R; r++) {
            if (quant[0][0]) quantize_q8_0(x + (size_t)r * D, D, &a[0][0], r);
            if (quant[0][1]) quantize_q8_K(x + (size_t)r * D, D, &a[0][1], r);
        }
        void* mine = panels ? panels + panel * (size_t)omp_get_thread_num() : NULL;
        /* each thread takes its part of every expert's weight rows (whatever the experts' rows, the same work),
           one expert after another (its activation rows stay in the core's cache) */
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
        for (int e = 0; e < E; e++)
            for (int n = 2 * F / ITEM_ROWS * t / T * ITEM_ROWS; n < 2 * F / ITEM_ROWS * (t + 1) / T * ITEM_ROWS; n += ITEM_ROWS)
                item_rows(gate_up[e], types[e][0], D, n, starts[e + 1] - starts[e], &a[0][0], &a[0][1], starts[e], gu + (size_t)starts[e] * 2 * F, 2 * F, mine);
#pragma omp barrier
#pragma omp for schedule(static)
        for (int r = 0; r < R; r++) {
            float* g = gu + (size_t)r * 2 * F;
            if (act == ACT_GELU_TANH) /* gelu_tanh(gate) * up (Gemma 4's), over gate */
                for (int f = 0; f < F; f++) g[f] = 0.5f * g[f] * (1.f + tanhf(0.7978845608028654f * (g[f] + 0.044715f * g[f] * g[f] * g[f]))) * g[F + f];
            else
                for (int f = 0; f < F; f++) g[f] = g[f] / (1.f + expf(-g[f])) * g[F + f]; /* silu(gate) * up, over gate */
            if (quant[1][0]) quantize_q8_0(g, F, &a[1][0], r);
            if (quant[1][1]) quantize_q8_K(g, F, &a[1][1], r);
        }
        for (int e = 0; e < E; e++)
            for (int n = D / ITEM_ROWS * t / T * ITEM_ROWS; n < D / ITEM_ROWS * (t + 1) / T * ITEM_ROWS; n += ITEM_ROWS)
                item_rows(down[e], types[e][1], F, n, starts[e + 1] - starts[e], &a[1][0], &a[1][1], starts[e], y + (size_t)starts[e] * D, D, mine);
    }
    for (int t = 0; t < 2; t++)
        for (int kq = 0; kq < 2; kq++) free_q8_rows(&a[t][kq]);
    free(gu), free(panels);
    return 0;
#else
    (void)x, (void)D, (void)F, (void)E, (void)starts, (void)gate_up, (void)down, (void)types, (void)y, (void)threads, (void)act;
    return 1;
#endif
}

/* 1 where experts_ggml runs (AVX2 and F16C) */
int experts_ggml_blocks(void) {
#if defined(__AVX2__) && defined(__F16C__)
    return 1;
#else
    return 0;
#endif
}
