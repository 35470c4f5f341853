// Small-M u8 x s8 -> s32 GEMMs with a fused float epilogue, for the fused pruned encoder.
//
//   x_q[m, k] = clamp(round_half_even(x[m, k] / x_scale), act_qmin, 127)      (int8, per-tensor)
//   acc[m, n] = sum_k x_q[m, k] * w_q[n, k]                                   (exact int32)
//   y[m, n]   = acc[m, n] * (x_scale * w_scale[n]) + bias[n]   [then erf-GELU]   (float32)
//
// Two kernels, chosen explicitly per weight (never by probing in the hot path):
//   * "avx512_vnni": hand-written vpdpbusd micro-kernel. The activation is fed as u8 = x_q + 128
//     (vpdpbusd multiplies unsigned by signed bytes) and the 128 * sum_k w[n, k] the offset adds is
//     subtracted afterwards (`comp`), in int32: exact. Weights are pre-packed once into panels of
//     up to 64 output channels: [panel][k/4][block of 16 channels][16 x 4 bytes], so one k-step of
//     a panel is one contiguous 256-byte stream. Register tile: up to 6 rows x 64 columns (24 zmm
//     accumulators; the k-loop of full panels in inline assembly, see vnni_accumulate_asm). Work is split into (row block of at most 48 rows, panel) items, row blocks outer, their count a multiple of the threads. The epilogue
//     writes float rows, or (FFN up -> FFN down) the next GEMM's u8 input directly. This kernel
//     uses no AMX tiles, even where the CPU has them ("onednn_brgemm" does).
//   * "onednn_brgemm": the same u8 x s8 -> s32 products by oneDNN's batch-reduce GEMM micro-kernel
//     (the brgemm ukernel torch links and exports as at::native::cpublas::brgemm): oneDNN generates
//     it for the CPU at run time, with AMX tiles (tdpbusd) where the CPU has amx_int8 and AVX-512
//     VNNI otherwise. Same panels and work items as "avx512_vnni"; each item's int32 block [rows,
//     panel] goes to a per-thread buffer and the same epilogue arithmetic runs on it. The panel's B
//     is the VNNI layout [k/4][panel channels][4] the "avx512_vnni" kernel packs, or, where oneDNN
//     packs int8 B itself (AMX), its own packing (at::native::cpublas::pack) of the panel.
//   * "reference": plain C++ int32 loops over the unpacked w_q (the test oracle next to it).
#pragma once

#include <torch/extension.h>
#include <ATen/native/CPUBlas.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define LTP_HAVE_VNNI 1
#include <immintrin.h>
#else
#define LTP_HAVE_VNNI 0
#endif

namespace ltp {

constexpr int kPanelBlocks = 4;   // 16-channel blocks per panel (64 channels)
constexpr int kMaxRows = 6;       // rows per register tile

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// ----------------------------------------------------------------------------- scalar math

// erf-GELU of one float, the plain reference the vector version is tested against (in float64).
inline float gelu_erf_scalar(float x) { return static_cast<float>(0.5 * x * (1.0 + std::erf(x * 0.70710678118654752440))); }

inline float quantize_one(float x, float scale, int qmin) {
  float v = x / scale;  // IEEE float32 division, as torch.div and ONNX QuantizeLinear
  v = v < qmin ? static_cast<float>(qmin) : (v > 127.f ? 127.f : v);
  return std::nearbyint(v);  // round half to even (default rounding mode)
}

#if LTP_HAVE_VNNI
// exp(x) for float32 lanes: Cephes-style range reduction x = n ln2 + r, degree-6 polynomial on
// |r| <= ln2/2, scaled by 2^n (scalef). Relative error ~2 ulp over [-87, 88].
inline __m512 exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.3f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  __m512 r2 = _mm512_mul_ps(r, r);
  p = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

// erf-GELU: 0.5 x (1 + erf(x / sqrt 2)), erf by Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7).
inline __m512 gelu_erf512(__m512 x) {
  const __m512 z = _mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752440f));
  const __m512 a = _mm512_abs_ps(z);
  // t = 1 / (1 + 0.3275911 |z|): rcp14 and one Newton step (~23 bits) instead of a division
  const __m512 den = _mm512_fmadd_ps(_mm512_set1_ps(0.3275911f), a, _mm512_set1_ps(1.f));
  __m512 t = _mm512_rcp14_ps(den);
  t = _mm512_mul_ps(t, _mm512_fnmadd_ps(den, t, _mm512_set1_ps(2.f)));
  __m512 p = _mm512_set1_ps(1.061405429f);
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453152027f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
  p = _mm512_mul_ps(p, t);
  const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(a, a)));
  __m512 erf_abs = _mm512_fnmadd_ps(p, e, _mm512_set1_ps(1.f));  // 1 - p e
  __m512 erf = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(erf_abs),
      _mm512_and_si512(_mm512_castps_si512(z), _mm512_set1_epi32(0x80000000))));
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x), _mm512_add_ps(_mm512_set1_ps(1.f), erf));
}
#endif

// gelu over n floats in place (vector version where compiled; used by the reference kernel too,
// so both kernels share one GELU and differ only in the integer GEMM).
#if LTP_HAVE_VNNI
// y[i] = F(y[i]) over n floats, 16 at a time, the tail masked
template <__m512 (*F)(__m512)>
inline void map512_inplace(float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, F(_mm512_loadu_ps(y + i)));
  if (i < n) {
    __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(y + i, m, F(_mm512_maskz_loadu_ps(m, y + i)));
  }
}
#endif

inline void gelu_inplace(float* y, int64_t n) {
#if LTP_HAVE_VNNI
  map512_inplace<gelu_erf512>(y, n);
#else
  for (int64_t i = 0; i < n; ++i) y[i] = gelu_erf_scalar(y[i]);
#endif
}

// tanh over n floats in place (the classifier head's pooler activation). AVX-512 where compiled:
// tanh|x| = (1 - e) / (1 + e) with e = exp(-2|x|) (exp512, so e in (0, 1]: no overflow), the sign of x
// put back, and tanh|x| = |x| below 4e-4 (error < |x|^3 / 3 < 3e-11, where 1 - e would lose the digits); absolute error
// a few float ulps of 1 (tests: within 2e-7 of torch.tanh). Scalar std::tanh
// otherwise.
#if LTP_HAVE_VNNI
inline __m512 tanh512(__m512 x) {
  const __m512 a = _mm512_abs_ps(x);
  const __m512 e = exp512(_mm512_mul_ps(a, _mm512_set1_ps(-2.f)));
  __m512 t = _mm512_div_ps(_mm512_sub_ps(_mm512_set1_ps(1.f), e), _mm512_add_ps(_mm512_set1_ps(1.f), e));
  t = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, _mm512_set1_ps(4e-4f), _CMP_LT_OQ), t, a);  // tanh a = a - a^3/3 + ...
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(t),
      _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x80000000))));
}
#endif

inline void tanh_inplace(float* y, int64_t n) {
#if LTP_HAVE_VNNI
  map512_inplace<tanh512>(y, n);
#else
  for (int64_t i = 0; i < n; ++i) y[i] = std::tanh(y[i]);
#endif
}

// ----------------------------------------------------------------------------- weight

enum class Kernel { Vnni, Brgemm, Reference };

inline bool vnni_compiled() { return LTP_HAVE_VNNI != 0; }

inline const char* kernel_name(Kernel k) {
  return k == Kernel::Vnni ? "avx512_vnni" : (k == Kernel::Brgemm ? "onednn_brgemm" : "reference");
}

// Whether oneDNN packs int8 B itself on this CPU (torch's could_pack: AMX); else B is the VNNI layout.
inline bool brgemm_packs_int8() { return at::native::cpublas::could_pack(at::kChar); }

// None ("") if torch's oneDNN brgemm runs u8 x s8 -> s32 here, else its refusal: one 1 x 16 x 4 product
// checked against its known result (torch raises where its oneDNN has no such ukernel for this CPU).
inline std::string brgemm_unavailable_reason() {
  static const std::string reason = [] {
    alignas(64) uint8_t a[4] = {1, 2, 3, 4};
    alignas(64) int8_t b[64];
    alignas(64) int32_t c[16] = {0};
    for (int n = 0; n < 16; ++n)
      for (int t = 0; t < 4; ++t) b[n * 4 + t] = static_cast<int8_t>(n - 8);
    try {
      if (brgemm_packs_int8()) {
        alignas(64) int8_t plain[64];
        for (int k = 0; k < 4; ++k)
          for (int n = 0; n < 16; ++n) plain[k * 16 + n] = static_cast<int8_t>(n - 8);
        at::native::cpublas::pack(4, 16, 16, 16, at::kChar, at::kChar, plain, b);
      }
      at::native::cpublas::brgemm(1, 16, 4, 4, 16, 16, false, a, b, c, true);
      at::native::cpublas::brgemm_release(true);
    } catch (const std::exception& e) {
      return std::string("torch's oneDNN brgemm refused u8 x s8 -> s32: ") + e.what();
    }
    for (int n = 0; n < 16; ++n)
      if (c[n] != 10 * (n - 8)) return std::string("torch's oneDNN brgemm gave a wrong u8 x s8 product in its self-check");
    return std::string();
  }();
  return reason;
}

struct Int8Weight {
  Kernel kernel;
  int64_t N, K, Kp;  // Kp: K rounded up to 4 (zero weights in the padding)
  float x_scale;
  int act_qmin;
  bool gelu;
  std::vector<int8_t> w_q;        // [N, K] as given
  std::vector<int32_t> w_q32;     // [N, K] widened (reference kernel only)
  std::vector<int8_t> packed;     // VNNI panels
  std::vector<int32_t> comp;      // [N] 128 * sum_k w_q[n, k]
  std::vector<float> out_scale;   // [N] x_scale * w_scale[n] (float32 product)
  std::vector<float> bias;        // [N] (zeros when the Linear has none)

  Int8Weight(const at::Tensor& w_q_, const at::Tensor& w_scale, const c10::optional<at::Tensor>& bias_, double x_scale_,
             int64_t act_qmin_, bool gelu_, const std::string& kernel_name) {
    TORCH_CHECK(w_q_.dim() == 2 && w_q_.scalar_type() == at::kChar, "w_q must be int8 [N, K]");
    if (kernel_name == "avx512_vnni") {
      TORCH_CHECK(vnni_compiled(), "kernel 'avx512_vnni' was not compiled in (the build machine's CPU lacks AVX-512 VNNI)");
      kernel = Kernel::Vnni;
    } else if (kernel_name == "onednn_brgemm") {
      // its epilogue is the AVX-512 one; AMX CPUs have AVX-512 VNNI
      TORCH_CHECK(vnni_compiled(), "kernel 'onednn_brgemm' was not compiled in (its epilogue needs AVX-512; the build machine's CPU lacks AVX-512 VNNI)");
      const std::string why = brgemm_unavailable_reason();
      TORCH_CHECK(why.empty(), "kernel 'onednn_brgemm': ", why);
      kernel = Kernel::Brgemm;
    } else if (kernel_name == "reference") {
      kernel = Kernel::Reference;
    } else {
      TORCH_CHECK(false, "unknown int8 gemm kernel '", kernel_name, "' (avx512_vnni | onednn_brgemm | reference)");
    }
    auto wq = w_q_.contiguous();
    N = wq.size(0);
    K = wq.size(1);
    Kp = round_up(K, 4);
    x_scale = static_cast<float>(x_scale_);
    act_qmin = static_cast<int>(act_qmin_);
    TORCH_CHECK(act_qmin == -127 || act_qmin == -128, "act_qmin must be -127 or -128");
    gelu = gelu_;
    w_q.assign(wq.data_ptr<int8_t>(), wq.data_ptr<int8_t>() + N * K);
    auto ws = w_scale.to(at::kFloat).contiguous();
    TORCH_CHECK(ws.numel() == N, "w_scale must have N elements");
    out_scale.resize(N);
    for (int64_t n = 0; n < N; ++n) out_scale[n] = x_scale * ws.data_ptr<float>()[n];
    bias.assign(N, 0.f);
    if (bias_.has_value() && bias_->defined()) {
      auto b = bias_->to(at::kFloat).contiguous();
      TORCH_CHECK(b.numel() == N, "bias must have N elements");
      std::memcpy(bias.data(), b.data_ptr<float>(), N * sizeof(float));
    }
    comp.assign(N, 0);
    for (int64_t n = 0; n < N; ++n) {
      int32_t s = 0;
      for (int64_t k = 0; k < K; ++k) s += w_q[n * K + k];
      comp[n] = 128 * s;
    }
    if (kernel == Kernel::Vnni) pack();
    else if (kernel == Kernel::Brgemm) pack_brgemm();
    else w_q32.assign(w_q.begin(), w_q.end());
  }

  int64_t num_blocks() const { return (N + 15) / 16; }
  int64_t num_panels() const { return (num_blocks() + kPanelBlocks - 1) / kPanelBlocks; }
  int64_t panel_offset(int64_t p) const { return p * kPanelBlocks * 16 * Kp; }
  int blocks_in_panel(int64_t p) const { return static_cast<int>(std::min<int64_t>(kPanelBlocks, num_blocks() - p * kPanelBlocks)); }

  // onednn_brgemm: the VNNI panels of pack(), or where oneDNN packs int8 B itself (AMX) its packing of
  // each panel given as plain [Kp, panel channels] rows (zeros beyond N and K). A panel's storage is
  // the same size either way (VNNI-4 of Kp x panel channels).
  void pack_brgemm() {
    pack();
    if (!brgemm_packs_int8()) return;
    for (int64_t p = 0; p < num_panels(); ++p) {
      const int64_t cols = blocks_in_panel(p) * 16;
      std::vector<int8_t> plain(Kp * cols, 0);
      for (int64_t k = 0; k < K; ++k)
        for (int64_t c = 0; c < cols; ++c) {
          const int64_t n = p * kPanelBlocks * 16 + c;
          plain[k * cols + c] = n < N ? w_q[n * K + k] : 0;
        }
      at::native::cpublas::pack(Kp, cols, cols, cols, at::kChar, at::kChar, plain.data(), packed.data() + panel_offset(p));
    }
  }

  void pack() {
    const int64_t K4 = Kp / 4;
    packed.assign(num_blocks() * 16 * Kp, 0);
    for (int64_t p = 0; p < num_panels(); ++p) {
      const int nb = blocks_in_panel(p);
      int8_t* dst = packed.data() + panel_offset(p);
      for (int64_t k4 = 0; k4 < K4; ++k4)
        for (int b = 0; b < nb; ++b)
          for (int c = 0; c < 16; ++c)
            for (int t = 0; t < 4; ++t) {
              const int64_t n = (p * kPanelBlocks + b) * 16 + c, k = k4 * 4 + t;
              dst[((k4 * nb + b) * 16 + c) * 4 + t] = (n < N && k < K) ? w_q[n * K + k] : 0;
            }
    }
  }
};

// ----------------------------------------------------------------------------- quantise

// x [M, K] float (row stride ldx) -> u8 [M, Kp] = x_q + 128 (padding columns 128, i.e. x_q = 0).
inline void quantize_u8(const float* x, int64_t ldx, int64_t M, int64_t K, int64_t Kp, float scale, int qmin, uint8_t* out) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * ldx;
    uint8_t* o = out + m * Kp;
    int64_t k = 0;
#if LTP_HAVE_VNNI
    const __m512 s = _mm512_set1_ps(scale), lo = _mm512_set1_ps(static_cast<float>(qmin)), hi = _mm512_set1_ps(127.f);
    const __m512i off = _mm512_set1_epi32(128);
    for (; k + 16 <= K; k += 16) {
      __m512 v = _mm512_min_ps(_mm512_max_ps(_mm512_div_ps(_mm512_loadu_ps(xr + k), s), lo), hi);
      __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)), off);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o + k), _mm512_cvtepi32_epi8(q));
    }
#endif
    for (; k < K; ++k) o[k] = static_cast<uint8_t>(static_cast<int>(quantize_one(xr[k], scale, qmin)) + 128);
    for (; k < Kp; ++k) o[k] = 128;
  }
}

// ----------------------------------------------------------------------------- kernels

// Where a GEMM's epilogue writes: float rows y [M, N] (stride ldy), or — for a GEMM whose output
// only feeds the next integer GEMM (FFN up -> FFN down) — that GEMM's u8 input directly,
// q[m, n] = clamp(round_half_even(y[m, n] / q_scale), q_qmin, 127) + 128 (stride ldq), the same
// arithmetic as quantize_u8 on the float rows, so the result is bitwise the same.
struct GemmOut {
  float* y = nullptr;
  int64_t ldy = 0;
  uint8_t* q = nullptr;
  int64_t ldq = 0;
  float q_scale = 1.f;
  int q_qmin = -128;
};

#if LTP_HAVE_VNNI
// The epilogue both fast kernels run on their exact int32 sums: y = (acc - comp[n]) * out_scale[n] + bias[n],
// erf-GELU if the weight has it, then float rows or the next GEMM's u8 input (quantize_u8's arithmetic).
// EpilogueOut: the output's quantiser constants, once per tile; EpilogueBlock: one 16-channel block's constants.
struct EpilogueOut {
  __m512 qs, qlo, qhi;
  __m512i off;
  explicit EpilogueOut(const GemmOut& out)
      : qs(_mm512_set1_ps(out.q_scale)), qlo(_mm512_set1_ps(static_cast<float>(out.q_qmin))), qhi(_mm512_set1_ps(127.f)),
        off(_mm512_set1_epi32(128)) {}
};

struct EpilogueBlock {
  int64_t n;
  __mmask16 mask;
  __m512i comp;
  __m512 scale, bias;
  __attribute__((always_inline)) EpilogueBlock(const Int8Weight& w, int64_t n_) : n(n_) {
    const int64_t left = w.N - n;
    mask = left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
    comp = _mm512_maskz_loadu_epi32(mask, w.comp.data() + n);
    scale = _mm512_maskz_loadu_ps(mask, w.out_scale.data() + n);
    bias = _mm512_maskz_loadu_ps(mask, w.bias.data() + n);
  }
  // row m of the output from its 16 int32 sums
  __attribute__((always_inline)) void store(__m512i acc, bool gelu, const GemmOut& out, const EpilogueOut& e, int64_t m) const {
    __m512 y = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc, comp));
    y = _mm512_add_ps(_mm512_mul_ps(y, scale), bias);
    if (gelu) y = gelu_erf512(y);
    if (out.q) {  // quantize_u8's arithmetic on the float value
      const __m512 v = _mm512_min_ps(_mm512_max_ps(_mm512_div_ps(y, e.qs), e.qlo), e.qhi);
      const __m512i qv = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)), e.off);
      _mm_mask_storeu_epi8(out.q + m * out.ldq + n, mask, _mm512_cvtepi32_epi8(qv));
    } else {
      _mm512_mask_storeu_ps(out.y + m * out.ldy + n, mask, y);
    }
  }
};

// The k-loop of a partial-panel tile (NB < 4 blocks: the last panel when N is not a multiple of
// 64) with intrinsics; rows beyond MR / blocks beyond NB compile away.
#define LTP_ACC_ROW(r) __m512i c##r##0 = z, c##r##1 = z, c##r##2 = z, c##r##3 = z;
#define LTP_DP_ROW(r)                                                                         \
  if constexpr (MR > r) {                                                                     \
    const __m512i a = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(A + r * lda + 4 * k4)); \
    c##r##0 = _mm512_dpbusd_epi32(c##r##0, a, w0);                                            \
    if constexpr (NB > 1) c##r##1 = _mm512_dpbusd_epi32(c##r##1, a, w1);                      \
    if constexpr (NB > 2) c##r##2 = _mm512_dpbusd_epi32(c##r##2, a, w2);                      \
    if constexpr (NB > 3) c##r##3 = _mm512_dpbusd_epi32(c##r##3, a, w3);                      \
  }
#define LTP_STORE_ROW(r)        \
  if constexpr (MR > r) {       \
    acc[r][0] = c##r##0;        \
    if constexpr (NB > 1) acc[r][1] = c##r##1; \
    if constexpr (NB > 2) acc[r][2] = c##r##2; \
    if constexpr (NB > 3) acc[r][3] = c##r##3; \
  }

template <int MR, int NB>
static inline void vnni_accumulate(const uint8_t* A, int64_t lda, const int8_t* W, int64_t K4, __m512i (&acc)[MR][NB]) {
  const __m512i z = _mm512_setzero_si512();
  LTP_ACC_ROW(0) LTP_ACC_ROW(1) LTP_ACC_ROW(2) LTP_ACC_ROW(3) LTP_ACC_ROW(4) LTP_ACC_ROW(5)
  for (int64_t k4 = 0; k4 < K4; ++k4) {
    const int8_t* wk = W + k4 * NB * 64;
    const __m512i w0 = _mm512_loadu_si512(wk);
    const __m512i w1 = NB > 1 ? _mm512_loadu_si512(wk + 64) : z;
    const __m512i w2 = NB > 2 ? _mm512_loadu_si512(wk + 128) : z;
    const __m512i w3 = NB > 3 ? _mm512_loadu_si512(wk + 192) : z;
    LTP_DP_ROW(0) LTP_DP_ROW(1) LTP_DP_ROW(2) LTP_DP_ROW(3) LTP_DP_ROW(4) LTP_DP_ROW(5)
  }
  LTP_STORE_ROW(0) LTP_STORE_ROW(1) LTP_STORE_ROW(2) LTP_STORE_ROW(3) LTP_STORE_ROW(4) LTP_STORE_ROW(5)
}
#undef LTP_ACC_ROW
#undef LTP_DP_ROW
#undef LTP_STORE_ROW

// The k-loop of a full-panel tile (4 blocks = 64 channels) in inline assembly. GCC 12 does not keep
// 24 vpdpbusd accumulators in registers when they are written with intrinsics (it spills them: a load
// and a store around every vpdpbusd, about half the CPU's int8 rate); here they are pinned: rows r
// in zmm(8+4r) .. zmm(11+4r), the panel's four weight vectors of one k-step in zmm0-3, the row's
// broadcast 4 activation bytes in zmm4-7. MR rows (1..6) by assembler .if on the constant; the
// 24 accumulators go to acc [MR][4] (64 B each) at the end. K4 >= 1.
#define LTP_DP4(a, r0, r1, r2, r3)                 \
  "vpdpbusd %%zmm0, %%" a ", %%" r0 "\n\t"          \
  "vpdpbusd %%zmm1, %%" a ", %%" r1 "\n\t"          \
  "vpdpbusd %%zmm2, %%" a ", %%" r2 "\n\t"          \
  "vpdpbusd %%zmm3, %%" a ", %%" r3 "\n\t"
#define LTP_ST4(off, r0, r1, r2, r3)                          \
  "vmovdqu64 %%" r0 ", " off "+0(%[acc])\n\t"                 \
  "vmovdqu64 %%" r1 ", " off "+64(%[acc])\n\t"                \
  "vmovdqu64 %%" r2 ", " off "+128(%[acc])\n\t"               \
  "vmovdqu64 %%" r3 ", " off "+192(%[acc])\n\t"
template <int MR>
static inline void vnni_accumulate_asm(const uint8_t* A, int64_t lda, const int8_t* W, int64_t K4, __m512i* acc) {
  const uint8_t* a3 = A + 3 * lda;
  __asm__ volatile(
      "vpxord %%zmm8, %%zmm8, %%zmm8\n\t" "vpxord %%zmm9, %%zmm9, %%zmm9\n\t" "vpxord %%zmm10, %%zmm10, %%zmm10\n\t" "vpxord %%zmm11, %%zmm11, %%zmm11\n\t"
      "vpxord %%zmm12, %%zmm12, %%zmm12\n\t" "vpxord %%zmm13, %%zmm13, %%zmm13\n\t" "vpxord %%zmm14, %%zmm14, %%zmm14\n\t" "vpxord %%zmm15, %%zmm15, %%zmm15\n\t"
      "vpxord %%zmm16, %%zmm16, %%zmm16\n\t" "vpxord %%zmm17, %%zmm17, %%zmm17\n\t" "vpxord %%zmm18, %%zmm18, %%zmm18\n\t" "vpxord %%zmm19, %%zmm19, %%zmm19\n\t"
      "vpxord %%zmm20, %%zmm20, %%zmm20\n\t" "vpxord %%zmm21, %%zmm21, %%zmm21\n\t" "vpxord %%zmm22, %%zmm22, %%zmm22\n\t" "vpxord %%zmm23, %%zmm23, %%zmm23\n\t"
      "vpxord %%zmm24, %%zmm24, %%zmm24\n\t" "vpxord %%zmm25, %%zmm25, %%zmm25\n\t" "vpxord %%zmm26, %%zmm26, %%zmm26\n\t" "vpxord %%zmm27, %%zmm27, %%zmm27\n\t"
      "vpxord %%zmm28, %%zmm28, %%zmm28\n\t" "vpxord %%zmm29, %%zmm29, %%zmm29\n\t" "vpxord %%zmm30, %%zmm30, %%zmm30\n\t" "vpxord %%zmm31, %%zmm31, %%zmm31\n\t"
      "1:\n\t"
      "vmovdqu64 (%[w]), %%zmm0\n\t"
      "vmovdqu64 64(%[w]), %%zmm1\n\t"
      "vmovdqu64 128(%[w]), %%zmm2\n\t"
      "vmovdqu64 192(%[w]), %%zmm3\n\t"
      "vpbroadcastd (%[a0]), %%zmm4\n\t"
      LTP_DP4("zmm4", "zmm8", "zmm9", "zmm10", "zmm11")
      ".if %c[mr] > 1\n\t"
      "vpbroadcastd (%[a0],%[lda],1), %%zmm5\n\t"
      LTP_DP4("zmm5", "zmm12", "zmm13", "zmm14", "zmm15")
      ".endif\n\t"
      ".if %c[mr] > 2\n\t"
      "vpbroadcastd (%[a0],%[lda],2), %%zmm6\n\t"
      LTP_DP4("zmm6", "zmm16", "zmm17", "zmm18", "zmm19")
      ".endif\n\t"
      ".if %c[mr] > 3\n\t"
      "vpbroadcastd (%[a3]), %%zmm7\n\t"
      LTP_DP4("zmm7", "zmm20", "zmm21", "zmm22", "zmm23")
      ".endif\n\t"
      ".if %c[mr] > 4\n\t"
      "vpbroadcastd (%[a3],%[lda],1), %%zmm4\n\t"
      LTP_DP4("zmm4", "zmm24", "zmm25", "zmm26", "zmm27")
      ".endif\n\t"
      ".if %c[mr] > 5\n\t"
      "vpbroadcastd (%[a3],%[lda],2), %%zmm5\n\t"
      LTP_DP4("zmm5", "zmm28", "zmm29", "zmm30", "zmm31")
      ".endif\n\t"
      "add $4, %[a0]\n\t"
      "add $4, %[a3]\n\t"
      "add $256, %[w]\n\t"
      "dec %[k]\n\t"
      "jnz 1b\n\t"
      LTP_ST4("0", "zmm8", "zmm9", "zmm10", "zmm11")
      ".if %c[mr] > 1\n\t" LTP_ST4("256", "zmm12", "zmm13", "zmm14", "zmm15") ".endif\n\t"
      ".if %c[mr] > 2\n\t" LTP_ST4("512", "zmm16", "zmm17", "zmm18", "zmm19") ".endif\n\t"
      ".if %c[mr] > 3\n\t" LTP_ST4("768", "zmm20", "zmm21", "zmm22", "zmm23") ".endif\n\t"
      ".if %c[mr] > 4\n\t" LTP_ST4("1024", "zmm24", "zmm25", "zmm26", "zmm27") ".endif\n\t"
      ".if %c[mr] > 5\n\t" LTP_ST4("1280", "zmm28", "zmm29", "zmm30", "zmm31") ".endif\n\t"
      : [a0] "+r"(A), [a3] "+r"(a3), [w] "+r"(W), [k] "+r"(K4)
      : [lda] "r"(lda), [acc] "r"(acc), [mr] "i"(MR)
      : "memory", "cc", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12",
        "xmm13", "xmm14", "xmm15", "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22", "xmm23", "xmm24", "xmm25",
        "xmm26", "xmm27", "xmm28", "xmm29", "xmm30", "xmm31");
}

// One register tile: rows [0, MR) of A (u8, stride lda) x one panel of NB 16-channel blocks.
template <int MR, int NB>
static void vnni_tile(const uint8_t* A, int64_t lda, const int8_t* W, int64_t K4, const Int8Weight& w, int64_t n0, const GemmOut& out,
                      int64_t m0) {
  static_assert(MR >= 1 && MR <= 6 && NB >= 1 && NB <= 4, "register tile up to 6 x 4 blocks");
  __m512i acc[MR][NB];
  if constexpr (NB == 4) vnni_accumulate_asm<MR>(A, lda, W, K4, &acc[0][0]);
  else vnni_accumulate<MR, NB>(A, lda, W, K4, acc);
  const EpilogueOut e(out);
#pragma GCC unroll 4
  for (int b = 0; b < NB; ++b) {
    const EpilogueBlock blk(w, n0 + b * 16);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) blk.store(acc[r][b], w.gelu, out, e, m0 + r);
  }
}

using TileFn = void (*)(const uint8_t*, int64_t, const int8_t*, int64_t, const Int8Weight&, int64_t, const GemmOut&, int64_t);

template <int MR>
static TileFn tile_for_blocks(int nb) {
  switch (nb) {
    case 1: return vnni_tile<MR, 1>;
    case 2: return vnni_tile<MR, 2>;
    case 3: return vnni_tile<MR, 3>;
    default: return vnni_tile<MR, 4>;
  }
}

static TileFn tile_for(int mr, int nb) {
  switch (mr) {
    case 1: return tile_for_blocks<1>(nb);
    case 2: return tile_for_blocks<2>(nb);
    case 3: return tile_for_blocks<3>(nb);
    case 4: return tile_for_blocks<4>(nb);
    case 5: return tile_for_blocks<5>(nb);
    default: return tile_for_blocks<6>(nb);
  }
}

// onednn_brgemm's epilogue: int32 products C [rows, ldc] of rows m0.. and the panel's nb 16-channel blocks
// from channel n0, through the same EpilogueBlock as vnni_tile.
static void epilogue_i32(const int32_t* C, int64_t ldc, int64_t rows, int nb, const Int8Weight& w, int64_t n0, const GemmOut& out,
                         int64_t m0) {
  const EpilogueOut e(out);
  for (int b = 0; b < nb; ++b) {
    const EpilogueBlock blk(w, n0 + b * 16);
    for (int64_t r = 0; r < rows; ++r) blk.store(_mm512_loadu_si512(C + r * ldc + b * 16), w.gelu, out, e, m0 + r);
  }
}
#endif

constexpr int64_t kRowBlock = 48;  // rows per work item: 8 register tiles; its A rows stay in L1 / L2 across the panels

// out = epilogue(x_u8 [M, Kp] GEMM w). Work items are (row block of at most kRowBlock rows, 64-channel
// panel), row blocks outer: a thread takes a contiguous range of them, so at small M the panels
// are split over the threads and at large M whole row blocks are (their A rows reused from cache
// across every panel, the weight re-read from L2). at::parallel_for (torch's thread pool) only
// when the GEMM is large enough to pay for waking it.
inline void gemm_u8(const uint8_t* A, int64_t M, const Int8Weight& w, const GemmOut& out) {
  if (M == 0) return;
  if (w.kernel == Kernel::Reference) {
    // int32 operands on both sides: GCC 12 -O3 -march=native mis-vectorises the mixed
    // (u8 - 128) x s8 dot-product pattern (seen: wrong sums for negative x_q), int32 x int32 is safe.
    std::vector<int32_t> a(w.K);
    std::vector<float> yr(w.N);
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t k = 0; k < w.K; ++k) a[k] = static_cast<int32_t>(A[m * w.Kp + k]) - 128;
      float* y = out.q ? yr.data() : out.y + m * out.ldy;
      for (int64_t n = 0; n < w.N; ++n) {
        int32_t acc = 0;
        const int32_t* wr = w.w_q32.data() + n * w.K;
        for (int64_t k = 0; k < w.K; ++k) acc += a[k] * wr[k];
        y[n] = static_cast<float>(acc) * w.out_scale[n] + w.bias[n];
      }
      if (w.gelu) gelu_inplace(y, w.N);
      if (out.q)
        for (int64_t n = 0; n < w.N; ++n)
          out.q[m * out.ldq + n] = static_cast<uint8_t>(static_cast<int>(quantize_one(y[n], out.q_scale, out.q_qmin)) + 128);
    }
    return;
  }
#if LTP_HAVE_VNNI
  const int64_t K4 = w.Kp / 4;
  const bool brgemm = w.kernel == Kernel::Brgemm;
  const int64_t panels = w.num_panels();
  // row blocks of at most kRowBlock rows, as many as a multiple of the threads once there is more
  // than one (M = 49 on 2 threads: 25 + 24 rows, not 48 + 1 with one thread doing nearly all of it),
  // the rows spread evenly over them
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t row_blocks = (M + kRowBlock - 1) / kRowBlock;
  if (row_blocks > 1) row_blocks = (row_blocks + threads - 1) / threads * threads;
  const int64_t items = row_blocks * panels;
  // one thread below ~2^19 MACs (a few µs: waking the pool costs as much); above, the items are
  // split evenly over the threads (grain 1: at::parallel_for gives each thread ceil(items/threads))
  const int64_t grain = M * w.Kp * w.N < (int64_t{1} << 19) ? items : 1;
  at::parallel_for(0, items, grain, [&](int64_t i0, int64_t i1) {
    if (brgemm) {
      // one oneDNN brgemm per item: C [rows, panel channels] int32 (ldc 64), then the epilogue
      alignas(64) int32_t C[kRowBlock * kPanelBlocks * 16];
      for (int64_t it = i0; it < i1; ++it) {
        const int64_t rb = it / panels, p = it % panels;
        const int nb = w.blocks_in_panel(p);
        const int64_t m_begin = rb * M / row_blocks, m_end = (rb + 1) * M / row_blocks;
        if (m_end == m_begin) continue;
        at::native::cpublas::brgemm(m_end - m_begin, nb * 16, w.Kp, w.Kp, nb * 16, kPanelBlocks * 16, false, A + m_begin * w.Kp,
                                    w.packed.data() + w.panel_offset(p), C, true);
        epilogue_i32(C, kPanelBlocks * 16, m_end - m_begin, nb, w, p * kPanelBlocks * 16, out, m_begin);
      }
      at::native::cpublas::brgemm_release(true);  // AMX: give the tile state back (torch's own brgemm users do the same)
      return;
    }
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t rb = it / panels, p = it % panels;
      const int nb = w.blocks_in_panel(p);
      const int8_t* W = w.packed.data() + w.panel_offset(p);
      const int64_t n0 = p * kPanelBlocks * 16;
      const int64_t m_begin = rb * M / row_blocks, m_end = (rb + 1) * M / row_blocks;
      for (int64_t m0 = m_begin; m0 < m_end; m0 += kMaxRows) {
        const int mr = static_cast<int>(std::min<int64_t>(kMaxRows, m_end - m0));
        tile_for(mr, nb)(A + m0 * w.Kp, w.Kp, W, K4, w, n0, out, m0);
      }
    }
  });
#else
  TORCH_CHECK(false, "avx512_vnni kernel not compiled in");
#endif
}

// float rows y [M, N] (row stride ldy)
inline void gemm_u8(const uint8_t* A, int64_t M, const Int8Weight& w, float* Y, int64_t ldy) {
  GemmOut out;
  out.y = Y;
  out.ldy = ldy;
  gemm_u8(A, M, w, out);
}

// the u8 input of `next` (x_q + 128, [M, next.Kp], padding columns 128) straight from w's epilogue
inline void gemm_u8_into(const uint8_t* A, int64_t M, const Int8Weight& w, const Int8Weight& next, uint8_t* Aq) {
  TORCH_CHECK(next.K == w.N, "gemm_u8_into: the next weight's K must be this weight's N");
  GemmOut out;
  out.q = Aq;
  out.ldq = next.Kp;
  out.q_scale = next.x_scale;
  out.q_qmin = next.act_qmin;
  gemm_u8(A, M, w, out);
  if (next.Kp > next.K)
    for (int64_t m = 0; m < M; ++m) std::memset(Aq + m * next.Kp + next.K, 128, next.Kp - next.K);
}

}  // namespace ltp
