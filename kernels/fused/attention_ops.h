// Float32 row kernels of the fused encoder besides the integer GEMMs: residual + LayerNorm, and the
// attention of one (sequence, head). AVX-512 where compiled (LTP_HAVE_VNNI implies AVX-512F/BW),
// plain loops otherwise; both compute the same formulas (only the summation order differs), and
// the fused runtime's tests compare either against the torch reference runtime.
//
// Attention of one head over the n present tokens of one sequence (rows r0 .. r0+n-1 of qkv, row
// stride ld; q at column qc, k at kc, v at vc), for the first nq query rows:
//   s[j]  = (q_i · k_j) * score_scale                     (int8 attention: integer-valued q, k: exact)
//   p     = softmax(s)                                      (max-subtracted, exp, normalised)
//   hs[j] += p[j]                                           (token scores: attention received, if hs)
//   p_q   = clamp(round_half_even(p / (1/255)), 0, 255)     (int8 attention only: the 8-bit P grid)
//   c_i   = Σ_j p[j] v_j   (* ctx_scale for int8 attention)  -> ctx row ctx_row(i), columns [cc, cc+dh)
// Keys are transposed once per (sequence, head) into kt [dh][n16] so that 16 scores are one FMA
// chain over dh (no horizontal sums); with AVX-512 the queries go in blocks of 8, and scores and
// P.V are small register-blocked GEMMs (8 queries x 32 keys, 8 queries x 32 columns: 16
// independent FMA chains instead of one per query).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "int8_gemm.h"

namespace ltp {

// y[r] = LayerNorm(a[r] + res[r]) over d columns (res may be null: no residual). y may alias a
// (never res): v = a + res is written into y first.
inline void add_layernorm_rows(const float* a, const float* res, int64_t M, int64_t d, const float* w, const float* b, float eps,
                               float* y) {
  for (int64_t m = 0; m < M; ++m) {
    const float* ar = a + m * d;
    const float* rr = res ? res + m * d : nullptr;
    float* yr = y + m * d;
    int64_t i = 0;
    float mean, var;
#if LTP_HAVE_VNNI
    __m512 vs = _mm512_setzero_ps();
    for (; i + 16 <= d; i += 16) {
      __m512 v = _mm512_loadu_ps(ar + i);
      if (rr) v = _mm512_add_ps(v, _mm512_loadu_ps(rr + i));
      _mm512_storeu_ps(yr + i, v);
      vs = _mm512_add_ps(vs, v);
    }
    float s = _mm512_reduce_add_ps(vs);
    for (; i < d; ++i) {
      yr[i] = ar[i] + (rr ? rr[i] : 0.f);
      s += yr[i];
    }
    mean = s / static_cast<float>(d);
    const __m512 vm = _mm512_set1_ps(mean);
    __m512 vq = _mm512_setzero_ps();
    for (i = 0; i + 16 <= d; i += 16) {
      const __m512 c = _mm512_sub_ps(_mm512_loadu_ps(yr + i), vm);
      vq = _mm512_fmadd_ps(c, c, vq);
    }
    float ss = _mm512_reduce_add_ps(vq);
    for (; i < d; ++i) ss += (yr[i] - mean) * (yr[i] - mean);
    var = ss / static_cast<float>(d);
    const float rstd = 1.f / std::sqrt(var + eps);
    const __m512 vr = _mm512_set1_ps(rstd);
    for (i = 0; i + 16 <= d; i += 16) {
      const __m512 c = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(yr + i), vm), vr);
      _mm512_storeu_ps(yr + i, _mm512_fmadd_ps(c, _mm512_loadu_ps(w + i), _mm512_loadu_ps(b + i)));
    }
    for (; i < d; ++i) yr[i] = (yr[i] - mean) * rstd * w[i] + b[i];
#else
    double s = 0;
    for (; i < d; ++i) {
      yr[i] = ar[i] + (rr ? rr[i] : 0.f);
      s += yr[i];
    }
    mean = static_cast<float>(s / d);
    double ss = 0;
    for (i = 0; i < d; ++i) ss += (yr[i] - mean) * (yr[i] - mean);
    var = static_cast<float>(ss / d);
    const float rstd = 1.f / std::sqrt(var + eps);
    for (i = 0; i < d; ++i) yr[i] = (yr[i] - mean) * rstd * w[i] + b[i];
#endif
  }
}

struct HeadAttention {
  const float* qkv;  // [rows, ld]
  int64_t ld, r0, n, nq, dh, qc, kc, vc;
  float score_scale;
  bool int8_attention;
  float ctx_scale;
  float* hs;          // [n] token-score accumulator of this head (null: not needed)
  float* ctx;         // output rows
  int64_t ctx_ld, ctx_r0, cc;  // query i writes ctx[(ctx_r0 + i) * ctx_ld + cc ...]
};

// Scratch reused across heads by one thread.
struct AttentionScratch {
  std::vector<float> kt, p;
};

#if LTP_HAVE_VNNI
constexpr int kQueryBlock = 8;  // queries per register block (scores: 8 x 32 keys, P.V: 8 x 32 columns = 16 chains)

inline __mmask16 live_lanes(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
}

// S[q][j] = (Q_q . K_j) * scale for QB queries and keys [j0, j0 + 16 * KB): a QB x KB register
// block of 16-key vectors, one FMA chain each over dh (QB * KB independent chains).
template <int QB, int KB>
inline void score_block(const float* const* q, const float* kt, int64_t n16, int64_t j0, int64_t dh, float scale, float* P,
                        int64_t ldp) {
  __m512 acc[QB][KB];
#pragma GCC unroll 8
  for (int r = 0; r < QB; ++r)
#pragma GCC unroll 2
    for (int b = 0; b < KB; ++b) acc[r][b] = _mm512_setzero_ps();
  for (int64_t e = 0; e < dh; ++e) {
    __m512 kv[KB];
#pragma GCC unroll 2
    for (int b = 0; b < KB; ++b) kv[b] = _mm512_loadu_ps(kt + e * n16 + j0 + 16 * b);
#pragma GCC unroll 8
    for (int r = 0; r < QB; ++r) {
      const __m512 qe = _mm512_set1_ps(q[r][e]);
#pragma GCC unroll 2
      for (int b = 0; b < KB; ++b) acc[r][b] = _mm512_fmadd_ps(qe, kv[b], acc[r][b]);
    }
  }
  const __m512 vs = _mm512_set1_ps(scale);
#pragma GCC unroll 8
  for (int r = 0; r < QB; ++r)
#pragma GCC unroll 2
    for (int b = 0; b < KB; ++b) _mm512_storeu_ps(P + r * ldp + j0 + 16 * b, _mm512_mul_ps(acc[r][b], vs));
}

// C[q][e0 .. e0 + 16 * CB) = sum_j P[q][j] V_j for QB queries: a QB x CB register block of
// 16-column vectors, one FMA chain each over the n keys.
template <int QB, int CB>
inline void context_block(const float* P, int64_t ldp, const float* V, int64_t ldv, int64_t n, int64_t e0, int64_t dh, float out_scale,
                          bool scaled, float* const* c) {
  __m512 acc[QB][CB];
  __mmask16 cols[CB];
#pragma GCC unroll 2
  for (int b = 0; b < CB; ++b) cols[b] = live_lanes(dh - e0 - 16 * b);
#pragma GCC unroll 8
  for (int r = 0; r < QB; ++r)
#pragma GCC unroll 2
    for (int b = 0; b < CB; ++b) acc[r][b] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    __m512 vv[CB];
#pragma GCC unroll 2
    for (int b = 0; b < CB; ++b) vv[b] = _mm512_maskz_loadu_ps(cols[b], V + j * ldv + e0 + 16 * b);
#pragma GCC unroll 8
    for (int r = 0; r < QB; ++r) {
      const __m512 pj = _mm512_set1_ps(P[r * ldp + j]);
#pragma GCC unroll 2
      for (int b = 0; b < CB; ++b) acc[r][b] = _mm512_fmadd_ps(pj, vv[b], acc[r][b]);
    }
  }
  const __m512 os = _mm512_set1_ps(out_scale);
#pragma GCC unroll 8
  for (int r = 0; r < QB; ++r)
#pragma GCC unroll 2
    for (int b = 0; b < CB; ++b) _mm512_mask_storeu_ps(c[r] + e0 + 16 * b, cols[b], scaled ? _mm512_mul_ps(acc[r][b], os) : acc[r][b]);
}

template <int QB>
inline void attention_query_block(const HeadAttention& a, const float* kt, int64_t n16, int64_t q0, float* P) {
  const int64_t n = a.n, dh = a.dh;
  const float* q[QB];
  float* c[QB];
  for (int r = 0; r < QB; ++r) {
    q[r] = a.qkv + (a.r0 + q0 + r) * a.ld + a.qc;
    c[r] = a.ctx + (a.ctx_r0 + q0 + r) * a.ctx_ld + a.cc;
  }
  // scores, 32 keys per register block (the last block 16 keys when n16 is an odd number of 16s)
  int64_t j0 = 0;
  for (; j0 + 32 <= n16; j0 += 32) score_block<QB, 2>(q, kt, n16, j0, dh, a.score_scale, P, n16);
  if (j0 < n16) score_block<QB, 1>(q, kt, n16, j0, dh, a.score_scale, P, n16);
  // softmax per query row; the padding lanes (j >= n) are masked out and left 0
  for (int r = 0; r < QB; ++r) {
    float* pr = P + r * n16;
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < n16; j += 16) vmax = _mm512_mask_max_ps(vmax, live_lanes(n - j), vmax, _mm512_loadu_ps(pr + j));
    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
    __m512 vsum = _mm512_setzero_ps();
    for (int64_t j = 0; j < n16; j += 16) {
      const __m512 e = _mm512_maskz_mov_ps(live_lanes(n - j), exp512(_mm512_sub_ps(_mm512_loadu_ps(pr + j), mx)));
      _mm512_storeu_ps(pr + j, e);
      vsum = _mm512_add_ps(vsum, e);
    }
    const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(vsum));
    for (int64_t j = 0; j < n16; j += 16) {
      __m512 v = _mm512_mul_ps(_mm512_loadu_ps(pr + j), inv);
      if (a.hs) {
        const __mmask16 live = live_lanes(n - j);
        _mm512_mask_storeu_ps(a.hs + j, live, _mm512_add_ps(_mm512_maskz_loadu_ps(live, a.hs + j), v));
      }
      if (a.int8_attention) {  // p / (1/255) in float32, as the scalar form and the torch reference
        v = _mm512_div_ps(v, _mm512_set1_ps(1.0f / 255.0f));
        v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm512_min_ps(_mm512_max_ps(v, _mm512_setzero_ps()), _mm512_set1_ps(255.f));
      }
      _mm512_storeu_ps(pr + j, v);
    }
  }
  // context, 32 output columns per register block
  const float* V = a.qkv + a.r0 * a.ld + a.vc;
  int64_t e0 = 0;
  for (; e0 + 16 < dh; e0 += 32) context_block<QB, 2>(P, n16, V, a.ld, n, e0, dh, a.ctx_scale, a.int8_attention, c);
  if (e0 < dh) context_block<QB, 1>(P, n16, V, a.ld, n, e0, dh, a.ctx_scale, a.int8_attention, c);
}
#endif

inline void head_attention(const HeadAttention& a, AttentionScratch& scratch) {
  const int64_t n = a.n, dh = a.dh;
  const int64_t n16 = (n + 15) / 16 * 16;
  scratch.kt.assign(dh * n16, 0.f);
  float* kt = scratch.kt.data();
  for (int64_t j = 0; j < n; ++j) {
    const float* k = a.qkv + (a.r0 + j) * a.ld + a.kc;
    for (int64_t e = 0; e < dh; ++e) kt[e * n16 + j] = k[e];
  }
#if LTP_HAVE_VNNI
  // queries in blocks of kQueryBlock: scores and P.V as small register-blocked GEMMs
  scratch.p.assign(kQueryBlock * n16, 0.f);
  float* P = scratch.p.data();
  int64_t q0 = 0;
  for (; q0 + kQueryBlock <= a.nq; q0 += kQueryBlock) attention_query_block<kQueryBlock>(a, kt, n16, q0, P);
  switch (a.nq - q0) {
    case 0: break;
    case 1: attention_query_block<1>(a, kt, n16, q0, P); break;
    case 2: attention_query_block<2>(a, kt, n16, q0, P); break;
    case 3: attention_query_block<3>(a, kt, n16, q0, P); break;
    case 4: attention_query_block<4>(a, kt, n16, q0, P); break;
    case 5: attention_query_block<5>(a, kt, n16, q0, P); break;
    case 6: attention_query_block<6>(a, kt, n16, q0, P); break;
    default: attention_query_block<7>(a, kt, n16, q0, P); break;
  }
#else
  scratch.p.assign(n16, 0.f);
  float* p = scratch.p.data();
  for (int64_t qi = 0; qi < a.nq; ++qi) {
    const float* q = a.qkv + (a.r0 + qi) * a.ld + a.qc;
    float* c = a.ctx + (a.ctx_r0 + qi) * a.ctx_ld + a.cc;
    float mx = -INFINITY;
    for (int64_t j = 0; j < n; ++j) {
      float s = 0.f;
      for (int64_t e = 0; e < dh; ++e) s += q[e] * kt[e * n16 + j];
      p[j] = s * a.score_scale;
      mx = std::max(mx, p[j]);
    }
    float sum = 0.f;
    for (int64_t j = 0; j < n; ++j) {
      p[j] = std::exp(p[j] - mx);
      sum += p[j];
    }
    const float inv = 1.f / sum;
    for (int64_t j = 0; j < n; ++j) {
      p[j] *= inv;
      if (a.hs) a.hs[j] += p[j];
      if (a.int8_attention) p[j] = std::min(255.f, std::max(0.f, std::nearbyint(p[j] / (1.0f / 255.0f))));
    }
    std::fill(c, c + dh, 0.f);
    for (int64_t j = 0; j < n; ++j) {
      const float* v = a.qkv + (a.r0 + j) * a.ld + a.vc;
      for (int64_t e = 0; e < dh; ++e) c[e] += p[j] * v[e];
    }
    if (a.int8_attention)
      for (int64_t e = 0; e < dh; ++e) c[e] *= a.ctx_scale;
  }
#endif
}

}  // namespace ltp
