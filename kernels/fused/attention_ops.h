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
// chain over dh (no horizontal sums).
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

inline void head_attention(const HeadAttention& a, AttentionScratch& scratch) {
  const int64_t n = a.n, dh = a.dh;
  const int64_t n16 = (n + 15) / 16 * 16;
  scratch.kt.assign(dh * n16, 0.f);
  scratch.p.assign(n16, 0.f);
  float* kt = scratch.kt.data();
  float* p = scratch.p.data();
  for (int64_t j = 0; j < n; ++j) {
    const float* k = a.qkv + (a.r0 + j) * a.ld + a.kc;
    for (int64_t e = 0; e < dh; ++e) kt[e * n16 + j] = k[e];
  }
  for (int64_t qi = 0; qi < a.nq; ++qi) {
    const float* q = a.qkv + (a.r0 + qi) * a.ld + a.qc;
    float* c = a.ctx + (a.ctx_r0 + qi) * a.ctx_ld + a.cc;
#if LTP_HAVE_VNNI
    // scores, 16 keys at a time; the padding lanes (j >= n) are masked out of max / sum
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    const __m512 vscale = _mm512_set1_ps(a.score_scale);
    // four key blocks per pass: four independent FMA chains over dh (one chain is latency-bound)
    for (int64_t j0 = 0; j0 < n16; j0 += 64) {
      const int nb = static_cast<int>(std::min<int64_t>(4, (n16 - j0) / 16));
      __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      for (int64_t e = 0; e < dh; ++e) {
        const __m512 qe = _mm512_set1_ps(q[e]);
        const float* row = kt + e * n16 + j0;
        for (int bl = 0; bl < nb; ++bl) acc[bl] = _mm512_fmadd_ps(qe, _mm512_loadu_ps(row + 16 * bl), acc[bl]);
      }
      for (int bl = 0; bl < nb; ++bl) {
        const int64_t j = j0 + 16 * bl;
        const __m512 sc = _mm512_mul_ps(acc[bl], vscale);
        const __mmask16 live = n - j >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - j)) - 1);
        _mm512_storeu_ps(p + j, sc);
        vmax = _mm512_mask_max_ps(vmax, live, vmax, sc);
      }
    }
    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
    __m512 vsum = _mm512_setzero_ps();
    for (int64_t j = 0; j < n16; j += 16) {
      const __mmask16 live = n - j >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - j)) - 1);
      const __m512 e = _mm512_maskz_mov_ps(live, exp512(_mm512_sub_ps(_mm512_loadu_ps(p + j), mx)));
      _mm512_storeu_ps(p + j, e);
      vsum = _mm512_add_ps(vsum, e);
    }
    const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(vsum));
    for (int64_t j = 0; j < n16; j += 16) {
      __m512 v = _mm512_mul_ps(_mm512_loadu_ps(p + j), inv);
      if (a.hs) {
        const __mmask16 live = n - j >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - j)) - 1);
        _mm512_mask_storeu_ps(a.hs + j, live, _mm512_add_ps(_mm512_maskz_loadu_ps(live, a.hs + j), v));
      }
      if (a.int8_attention) {  // p / (1/255) in float32, as the scalar form and the torch reference
        v = _mm512_div_ps(v, _mm512_set1_ps(1.0f / 255.0f));
        v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm512_min_ps(_mm512_max_ps(v, _mm512_setzero_ps()), _mm512_set1_ps(255.f));
      }
      _mm512_storeu_ps(p + j, v);
    }
    // context, 16 output columns at a time, even and odd keys in two chains (p[j] = 0 beyond n)
    for (int64_t e0 = 0; e0 < dh; e0 += 16) {
      const __mmask16 cols = dh - e0 >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (dh - e0)) - 1);
      __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
      const float* vcol = a.qkv + a.r0 * a.ld + a.vc + e0;
      int64_t j = 0;
      for (; j + 2 <= n; j += 2) {
        acc0 = _mm512_fmadd_ps(_mm512_set1_ps(p[j]), _mm512_maskz_loadu_ps(cols, vcol + j * a.ld), acc0);
        acc1 = _mm512_fmadd_ps(_mm512_set1_ps(p[j + 1]), _mm512_maskz_loadu_ps(cols, vcol + (j + 1) * a.ld), acc1);
      }
      if (j < n) acc0 = _mm512_fmadd_ps(_mm512_set1_ps(p[j]), _mm512_maskz_loadu_ps(cols, vcol + j * a.ld), acc0);
      __m512 acc = _mm512_add_ps(acc0, acc1);
      if (a.int8_attention) acc = _mm512_mul_ps(acc, _mm512_set1_ps(a.ctx_scale));
      _mm512_mask_storeu_ps(c + e0, cols, acc);
    }
#else
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
#endif
  }
}

}  // namespace ltp
