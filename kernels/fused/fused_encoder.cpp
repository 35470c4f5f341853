// Fused pruned INT8 BERT / RoBERTa encoder forward: one Python -> C++ call per batch.
//
// Same computation as modeling/pruned_encoder.py `forward_packed` on a deployable checkpoint's
// INT8 model (the reference), on packed rows [T, d] (the surviving tokens of every sequence of
// the batch, sequence after sequence, no padding):
//   embeddings (word + token type, + position; LayerNorm), then per layer:
//   quantise x once -> QKV GEMM ([3d, d] fused when the three projections share one activation
//   scale) -> per (sequence, head): scores, softmax, token scores (attention received, summed over
//   present queries, averaged over heads), P.V -> keep decision (threshold or top-k; position 0
//   always kept) -> quantise the kept context rows (read in place by row index) -> output projection ->
//   residual (the kept rows of x, by row index) + LayerNorm -> quantise -> FFN up (+ erf-GELU and the quantisation for FFN down in the
//   GEMM epilogue: no float [T, d_ff] rows) -> FFN down -> residual + LayerNorm.
// A batch runs in spans of consecutive sequences of at most kSpanTokens tokens, each through every
// layer before the next (a layer's buffers stay in cache), each layer on groups of at most kGroupTokens
// entering tokens (FusedEncoder::set_schedule; benchmarks/fused_schedule.py measures the choices: running
// the deep layers' few surviving rows of the whole batch as one GEMM does not pay). Threads: torch's OpenMP pool (at::parallel_for;
// the extension is compiled with -fopenmp) over
// GEMM items, (sequence, head) pairs and rows.
// The last layer never prunes and only its [CLS] rows are read by the classifier; every op after
// attention is row-wise (static per-tensor activation scales), so after the last layer's attention
// only the [CLS] rows go on (and only their attention rows are computed): the logits are the same.
// The head: BERT pooler dense + tanh + classifier, RoBERTa classifier.dense + tanh + out_proj.
#include "attention_ops.h"
#include "int8_gemm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <map>
#include <mutex>
#include <memory>
#include <numeric>
#include <string>
#include <tuple>
#include <vector>

namespace ltp {

// Blocks a thread's forward() calls reuse: a forward allocates a few buffers per layer (up to
// megabytes at batch 32), and fresh large allocations are fresh pages (mmap: a page fault per 4 KB
// on first touch, ~150 per example at batch 32). A destroyed buffer's block goes back to the cache
// of the thread that destroys it; the smallest cached block that fits is reused; at most
// kCacheBytes stay cached per thread.
class BlockCache {
 public:
  static constexpr size_t kCacheBytes = size_t{512} << 20;
  static BlockCache& local() {
    thread_local BlockCache cache;
    return cache;
  }
  char* take(size_t bytes, size_t* cap) {
    size_t best = free_.size();
    for (size_t i = 0; i < free_.size(); ++i)
      if (free_[i].cap >= bytes && (best == free_.size() || free_[i].cap < free_[best].cap)) best = i;
    if (best < free_.size()) {
      Block b = free_[best];
      free_[best] = free_.back();
      free_.pop_back();
      cached_ -= b.cap;
      *cap = b.cap;
      return b.p;
    }
    *cap = std::max<size_t>(bytes, 64);
    return new char[*cap];
  }
  void give(char* p, size_t cap) {
    if (cached_ + cap > kCacheBytes) {
      delete[] p;
      return;
    }
    free_.push_back({p, cap});
    cached_ += cap;
  }
  ~BlockCache() {
    for (auto& b : free_) delete[] b.p;
  }

 private:
  struct Block {
    char* p;
    size_t cap;
  };
  std::vector<Block> free_;
  size_t cached_ = 0;
};

template <typename T>
class Buf {  // uninitialised buffer of n T, its block from the thread's BlockCache
 public:
  Buf() = default;
  explicit Buf(int64_t n) : n_(n) { p_ = BlockCache::local().take(sizeof(T) * static_cast<size_t>(std::max<int64_t>(1, n)), &cap_); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  Buf(Buf&& o) noexcept : p_(o.p_), cap_(o.cap_), n_(o.n_) { o.p_ = nullptr; }
  Buf& operator=(Buf&& o) noexcept {
    if (this != &o) {
      release();
      p_ = o.p_, cap_ = o.cap_, n_ = o.n_;
      o.p_ = nullptr;
    }
    return *this;
  }
  ~Buf() { release(); }
  T* data() { return reinterpret_cast<T*>(p_); }
  const T* data() const { return reinterpret_cast<const T*>(p_); }
  T& operator[](int64_t i) { return data()[i]; }

 private:
  void release() {
    if (p_) BlockCache::local().give(p_, cap_);
    p_ = nullptr;
  }
  char* p_ = nullptr;
  size_t cap_ = 0;
  int64_t n_ = 0;
};

struct LayerNormParams {
  std::vector<float> w, b;
  float eps = 1e-12f;
};

static std::vector<float> to_vec(const at::Tensor& t) {
  auto c = t.to(at::kFloat).contiguous();
  return std::vector<float>(c.data_ptr<float>(), c.data_ptr<float>() + c.numel());
}

static LayerNormParams make_ln(const at::Tensor& w, const at::Tensor& b, double eps) {
  return LayerNormParams{to_vec(w), to_vec(b), static_cast<float>(eps)};
}

// y[r] = LayerNorm(a[r] + res[r]) for M rows of width d (y may alias a; res may be null).
// Row-parallel above kRowGrain rows (below, one thread: the pool costs more than the rows).
constexpr int64_t kRowGrain = 128;
// forward()'s default schedule (FusedEncoder::set_schedule): spans of at most kSpanTokens tokens through
// every layer, each layer on groups of at most kGroupTokens of the tokens entering it
constexpr int64_t kSpanTokens = 256;
constexpr int64_t kGroupTokens = 256;
// res_rows (may be null): row m's residual is res[res_rows[m]] (the kept rows of the layer's input, read
// in place instead of gathered into a copy)
static void add_layernorm(const float* a, const float* res, int64_t M, int64_t d, const LayerNormParams& ln, float* y,
                          const int64_t* res_rows = nullptr) {
  at::parallel_for(0, M, kRowGrain, [&](int64_t m0, int64_t m1) {
    if (!res_rows) {
      add_layernorm_rows(a + m0 * d, res ? res + m0 * d : nullptr, m1 - m0, d, ln.w.data(), ln.b.data(), ln.eps, y + m0 * d);
      return;
    }
    for (int64_t m = m0; m < m1; ++m)
      add_layernorm_rows(a + m * d, res + res_rows[m] * d, 1, d, ln.w.data(), ln.b.data(), ln.eps, y + m * d);
  });
}

struct Layer {
  std::vector<std::shared_ptr<Int8Weight>> qkv;  // one [3d, d] or three [d, d] (query, key, value)
  std::shared_ptr<Int8Weight> attn_out, ffn_up, ffn_down;
  std::string ffn_act;  // "none" (GELU fused into ffn_up) | "gelu" | "relu"
  LayerNormParams ln1, ln2;
  float score_scale;    // scores = acc * score_scale (1/sqrt(dh), or q_scale * k_scale / sqrt(dh) for INT8 attention)
  bool int8_attention;
  float q_scale, k_scale, v_scale, ctx_scale;  // INT8 attention grids; ctx_scale = v_scale / 255
};

enum class PruneMode { None, Threshold, TopK };

// x [M, K] float (row stride ldx) -> w's u8 input [M, w.Kp], row-parallel above kRowGrain rows;
// with x_rows, input row m is x's row x_rows[m] (a gather folded into the quantiser)
static void quantize_rows(const Int8Weight& w, const float* x, int64_t ldx, int64_t M, uint8_t* xq, const int64_t* x_rows = nullptr) {
  at::parallel_for(0, M, kRowGrain, [&](int64_t m0, int64_t m1) {
    if (!x_rows) {
      quantize_u8(x + m0 * ldx, ldx, m1 - m0, w.K, w.Kp, w.x_scale, w.act_qmin, xq + m0 * w.Kp);
      return;
    }
    for (int64_t m = m0; m < m1; ++m) quantize_u8(x + x_rows[m] * ldx, ldx, 1, w.K, w.Kp, w.x_scale, w.act_qmin, xq + m * w.Kp);
  });
}

static int64_t run_linear(const Int8Weight& w, const float* x, int64_t ldx, int64_t M, float* y, int64_t ldy,
                          const int64_t* x_rows = nullptr) {
  Buf<uint8_t> xq(M * w.Kp);
  quantize_rows(w, x, ldx, M, xq.data(), x_rows);
  gemm_u8(xq.data(), M, w, y, ldy);
  return M;
}

// Wall time per phase of forward(), summed over calls until reset (the runtime's own profile:
// which part of a layer the time goes to). Phases: embed, qkv (quantise + QKV GEMM), attention,
// select (keep decision: the kept row indices), out (output projection + LayerNorm), ffn, head.
constexpr int kPhases = 7;
static const char* const kPhaseNames[kPhases] = {"embed", "qkv", "attention", "select", "out", "ffn", "head"};

class PhaseClock {
 public:
  explicit PhaseClock(std::array<double, kPhases>* acc) : acc_(acc), t_(std::chrono::steady_clock::now()) {}
  void lap(int phase) {
    const auto now = std::chrono::steady_clock::now();
    (*acc_)[phase] += std::chrono::duration<double>(now - t_).count();
    t_ = now;
  }

 private:
  std::array<double, kPhases>* acc_;
  std::chrono::steady_clock::time_point t_;
};

class FusedEncoder {
 public:
  FusedEncoder(const at::Tensor& word, const at::Tensor& pos, const at::Tensor& type, const at::Tensor& ln_w, const at::Tensor& ln_b,
               double ln_eps, bool roberta_positions, int64_t padding_idx, bool use_token_types, int64_t heads)
      : word_(to_vec(word)), pos_(to_vec(pos)), type_(to_vec(type)), emb_ln_(make_ln(ln_w, ln_b, ln_eps)),
        roberta_positions_(roberta_positions), padding_idx_(padding_idx), use_token_types_(use_token_types), heads_(heads) {
    d_ = word.size(1);
    vocab_ = word.size(0);
    max_pos_ = pos.size(0);
    num_types_ = type.size(0);
    TORCH_CHECK(d_ % heads_ == 0, "hidden size ", d_, " not divisible by ", heads_, " heads");
    dh_ = d_ / heads_;
  }

  void add_layer(std::vector<std::shared_ptr<Int8Weight>> qkv, std::shared_ptr<Int8Weight> attn_out, const at::Tensor& ln1_w,
                 const at::Tensor& ln1_b, double ln1_eps, std::shared_ptr<Int8Weight> ffn_up, const std::string& ffn_act,
                 std::shared_ptr<Int8Weight> ffn_down, const at::Tensor& ln2_w, const at::Tensor& ln2_b, double ln2_eps,
                 double score_scale, bool int8_attention, double q_scale, double k_scale, double v_scale, double ctx_scale) {
    TORCH_CHECK(qkv.size() == 1 || qkv.size() == 3, "qkv: one fused or three weights");
    int64_t n = 0;
    for (auto& w : qkv) {
      TORCH_CHECK(w->K == d_, "qkv weight K mismatch");
      n += w->N;
    }
    TORCH_CHECK(n == 3 * d_, "qkv weights must give 3d outputs");
    TORCH_CHECK(attn_out->K == d_ && attn_out->N == d_, "attention output weight shape");
    TORCH_CHECK(ffn_up->K == d_ && ffn_down->N == d_ && ffn_down->K == ffn_up->N, "FFN weight shapes");
    TORCH_CHECK(ffn_act == "none" || ffn_act == "gelu" || ffn_act == "relu", "ffn_act must be none | gelu | relu");
    TORCH_CHECK(ffn_act != "none" || ffn_up->gelu, "ffn_act 'none' needs the GELU fused into ffn_up");
    Layer L{std::move(qkv), std::move(attn_out), std::move(ffn_up), std::move(ffn_down), ffn_act, make_ln(ln1_w, ln1_b, ln1_eps),
            make_ln(ln2_w, ln2_b, ln2_eps), static_cast<float>(score_scale), int8_attention, static_cast<float>(q_scale),
            static_cast<float>(k_scale), static_cast<float>(v_scale), static_cast<float>(ctx_scale)};
    layers_.push_back(std::move(L));
  }

  void set_head(std::shared_ptr<Int8Weight> pre, std::shared_ptr<Int8Weight> final_) {
    if (pre) {
      TORCH_CHECK(pre->K == d_ && final_->K == pre->N, "head weight shapes");
    } else {
      TORCH_CHECK(final_->K == d_, "classifier weight shape");
    }
    head_pre_ = std::move(pre);
    head_final_ = std::move(final_);
  }

  void set_pruning(const std::string& mode, std::vector<double> thresholds, std::vector<double> keep_ratios) {
    const size_t L = layers_.size();
    if (mode == "none") {
      mode_ = PruneMode::None;
    } else if (mode == "threshold") {
      TORCH_CHECK(thresholds.size() == L, "need one threshold per layer");
      mode_ = PruneMode::Threshold;
    } else if (mode == "topk") {
      TORCH_CHECK(keep_ratios.size() == L, "need one keep ratio per layer");
      mode_ = PruneMode::TopK;
    } else {
      TORCH_CHECK(false, "unknown pruning mode ", mode);
    }
    thresholds_.clear();
    for (double t : thresholds) thresholds_.push_back(static_cast<float>(t));  // compared in float32, as torch does
    keep_ratios_ = std::move(keep_ratios);
  }

  // -> (logits [b, C] float32, tokens entering each layer [b, L] int64)
  std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& input_ids, const at::Tensor& attention_mask,
                                             const c10::optional<at::Tensor>& token_type_ids, int64_t threads) {
    TORCH_CHECK(head_final_, "set_head was not called");
    TORCH_CHECK(!layers_.empty(), "no layers");
    if (threads > 0 && at::get_num_threads() != threads) at::set_num_threads(static_cast<int>(threads));
    auto ids = input_ids.to(at::kLong).contiguous();
    auto mask = attention_mask.to(at::kLong).contiguous();
    TORCH_CHECK(ids.dim() == 2 && mask.sizes() == ids.sizes(), "input_ids / attention_mask must be [b, s]");
    const int64_t b = ids.size(0), s = ids.size(1), d = d_, L = static_cast<int64_t>(layers_.size());
    at::Tensor tt;
    if (use_token_types_ && token_type_ids.has_value() && token_type_ids->defined()) {
      tt = token_type_ids->to(at::kLong).contiguous();
      TORCH_CHECK(tt.sizes() == ids.sizes(), "token_type_ids must be [b, s]");
    }
    const int64_t* idp = ids.data_ptr<int64_t>();
    const int64_t* mp = mask.data_ptr<int64_t>();
    const int64_t* ttp = tt.defined() ? tt.data_ptr<int64_t>() : nullptr;

    // sequences: right-padded rows of real tokens (every row checked before any compute)
    std::vector<int64_t> lens(b);
    for (int64_t i = 0; i < b; ++i) {
      int64_t n = 0;
      for (int64_t j = 0; j < s; ++j) n += mp[i * s + j] != 0;
      for (int64_t j = 0; j < s; ++j)
        TORCH_CHECK((mp[i * s + j] != 0) == (j < n), "attention_mask row ", i, " is not right-padded (real tokens first)");
      TORCH_CHECK(n > 0, "attention_mask row ", i, " has no real token");
      lens[i] = n;
    }
    const int64_t C = head_final_->N;
    auto logits = at::empty({b, C}, at::kFloat);
    auto kept = at::empty({b, L}, at::kLong);
    std::array<double, kPhases> phases{};  // this call's, added to the totals at the end (calls may run concurrently)
    // the batch in spans of consecutive sequences of at most span_tokens_ tokens (at least one sequence),
    // each run through every layer before the next (see set_schedule)
    for (int64_t i0 = 0; i0 < b;) {
      int64_t i1 = i0, tokens = 0;
      while (i1 < b && (i1 == i0 || tokens + lens[i1] <= span_tokens_)) tokens += lens[i1++];
      encode_span(idp + i0 * s, ttp ? ttp + i0 * s : nullptr, s, std::vector<int64_t>(lens.begin() + i0, lens.begin() + i1),
                  logits.data_ptr<float>() + i0 * C, kept.data_ptr<int64_t>() + i0 * L, phases);
      i0 = i1;
    }
    {
      std::lock_guard<std::mutex> guard(profile_mutex_);
      for (int i = 0; i < kPhases; ++i) phase_seconds_[i] += phases[i];
      ++calls_;
    }
    return {logits, kept};
  }

  // How forward() walks a batch (every choice gives the same numbers: each op is row-wise or per
  // sequence, and the integer GEMM sums are exact whatever the rows around a row):
  // - spans of consecutive sequences of at most span_tokens tokens go through every layer one after
  //   the other (a span's activations stay in cache from layer to layer; the weights are re-read per span);
  // - inside a span, each layer runs on groups of consecutive sequences of at most group_tokens of the
  //   tokens entering that layer, re-formed at every layer: as pruning shrinks the sequences, the deep
  //   layers' groups hold more sequences, so their GEMMs get more rows per weight read.
  void set_schedule(int64_t span_tokens, int64_t group_tokens) {
    TORCH_CHECK(span_tokens >= 1 && group_tokens >= 1, "span_tokens and group_tokens must be >= 1");
    span_tokens_ = span_tokens;
    group_tokens_ = group_tokens;
  }
  std::pair<int64_t, int64_t> schedule() const { return {span_tokens_, group_tokens_}; }

 private:
  // The whole encoder and head for b consecutive sequences (ids / token types [b, s], right-padded,
  // lens[i] real tokens): logits [b, C] and the tokens entering each layer [b, L] (row stride L).
  void encode_span(const int64_t* idp, const int64_t* ttp, int64_t s, const std::vector<int64_t>& lens, float* logits_out,
                   int64_t* keptp, std::array<double, kPhases>& phases) {
    const int64_t b = static_cast<int64_t>(lens.size()), d = d_, L = static_cast<int64_t>(layers_.size());
    std::vector<int64_t> len(lens), new_len(b);
    const std::vector<int64_t>& n0 = lens;
    int64_t T = 0;
    for (int64_t i = 0; i < b; ++i) T += len[i];

    PhaseClock clock(&phases);
    // embeddings [T, d]: packed rows, sequence after sequence. Every row's (word, position, type) is
    // checked first, then each row is summed and LayerNormed while in cache, row-parallel above
    // kRowGrain rows, the next row's word vector (a random row of the table: a cache and TLB miss)
    // prefetched while this one is summed.
    std::vector<std::array<int64_t, 3>> emb_rows(T);  // (word id, position, token type) per packed row
    for (int64_t i = 0, row = 0; i < b; row += len[i], ++i) {
      int64_t nonpad = 0;
      for (int64_t j = 0; j < len[i]; ++j) {
        const int64_t id = idp[i * s + j];
        TORCH_CHECK(id >= 0 && id < vocab_, "token id ", id, " outside the vocabulary");
        int64_t p = j;
        if (roberta_positions_) {  // create_position_ids_from_input_ids: cumsum(ids != pad) * (ids != pad) + pad
          const bool real = id != padding_idx_;
          nonpad += real;
          p = (real ? nonpad : 0) + padding_idx_;
        }
        TORCH_CHECK(p < max_pos_, "position ", p, " beyond max_position_embeddings");
        const int64_t ty = ttp ? ttp[i * s + j] : 0;
        TORCH_CHECK(ty >= 0 && ty < num_types_, "token type ", ty, " out of range");
        emb_rows[row + j] = {id, p, ty};
      }
    }
    Buf<float> x(T * d);
    at::parallel_for(0, T, kRowGrain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        if (r + 1 < r1) {
          const char* nxt = reinterpret_cast<const char*>(word_.data() + emb_rows[r + 1][0] * d);
          for (int64_t off = 0; off < d * static_cast<int64_t>(sizeof(float)); off += 64) __builtin_prefetch(nxt + off);
        }
        float* xr = x.data() + r * d;
        const float *we = word_.data() + emb_rows[r][0] * d, *pe = pos_.data() + emb_rows[r][1] * d,
                    *te = type_.data() + emb_rows[r][2] * d;
        for (int64_t c = 0; c < d; ++c) xr[c] = (we[c] + te[c]) + pe[c];
        add_layernorm_rows(xr, nullptr, 1, d, emb_ln_.w.data(), emb_ln_.b.data(), emb_ln_.eps, xr);
      }
    });
    clock.lap(0);

    for (int64_t l = 0; l < L; ++l) {
      const bool last = l == L - 1;
      for (int64_t i = 0; i < b; ++i) keptp[i * L + l] = len[i];
      // x [T, d] -> xo [Tn, d]: the layer on groups of consecutive sequences of at most group_tokens_ tokens
      Buf<float> xo((last ? b : T) * d);
      int64_t in_row = 0, out_row = 0;
      for (int64_t i0 = 0; i0 < b;) {
        int64_t i1 = i0, tokens = 0;
        while (i1 < b && (i1 == i0 || tokens + len[i1] <= group_tokens_)) tokens += len[i1++];
        out_row += run_layer(l, x.data() + in_row * d, len.data() + i0, n0.data() + i0, i1 - i0, xo.data() + out_row * d,
                             new_len.data() + i0, clock);
        in_row += tokens;
        i0 = i1;
      }
      x = std::move(xo);
      len = new_len;
      T = out_row;
    }

    // head on the [CLS] rows: x is [b, d] after the last layer
    const int64_t C = head_final_->N;
    if (head_pre_) {
      Buf<float> pooled(b * head_pre_->N);
      run_linear(*head_pre_, x.data(), d, b, pooled.data(), head_pre_->N);
      tanh_inplace(pooled.data(), b * head_pre_->N);
      run_linear(*head_final_, pooled.data(), head_pre_->N, b, logits_out, C);
    } else {
      run_linear(*head_final_, x.data(), d, b, logits_out, C);
    }
    clock.lap(6);
  }

  // Layer l on b consecutive sequences: x [T, d] packed rows (len[i] each; n0[i] before any pruning)
  // -> out [Tn, d] (the rows that go on: kept ones, or only [CLS] after the last layer), new_len[i]
  // of them per sequence; returns Tn.
  int64_t run_layer(int64_t l, const float* x, const int64_t* len, const int64_t* n0, int64_t b, float* out, int64_t* new_len,
                    PhaseClock& clock) {
    const Layer& ly = layers_[l];
    const int64_t d = d_, H = heads_, dh = dh_;
    const bool last = l == static_cast<int64_t>(layers_.size()) - 1;
    const bool prune = mode_ != PruneMode::None;
    std::vector<int64_t> start(b);
    int64_t T = 0;
    for (int64_t i = 0; i < b; ++i) {
      start[i] = T;
      T += len[i];
    }

    // QKV [T, 3d]
    Buf<float> qkv(T * 3 * d);
    {
      int64_t col = 0;
      Buf<uint8_t> xq;
      float prev_scale = -1.f;
      int prev_qmin = 0;
      for (auto& w : ly.qkv) {
        if (w->x_scale != prev_scale || w->act_qmin != prev_qmin) {  // quantise once per distinct activation scale
          xq = Buf<uint8_t>(T * w->Kp);
          quantize_rows(*w, x, d, T, xq.data());
          prev_scale = w->x_scale;
          prev_qmin = w->act_qmin;
        }
        gemm_u8(xq.data(), T, *w, qkv.data() + col, 3 * d);
        col += w->N;
      }
    }
    if (ly.int8_attention) {  // q, k, v on their 8-bit grids (integer-valued floats, exact products)
      const float sc[3] = {ly.q_scale, ly.k_scale, ly.v_scale};
      for (int64_t r = 0; r < T; ++r)
        for (int part = 0; part < 3; ++part) {
          float* v = qkv.data() + r * 3 * d + part * d;
          int64_t c = 0;
#if LTP_HAVE_VNNI
          const __m512 vsc = _mm512_set1_ps(sc[part]), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
          for (; c + 16 <= d; c += 16) {
            const __m512 q = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(v + c), vsc), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            _mm512_storeu_ps(v + c, _mm512_min_ps(_mm512_max_ps(q, lo), hi));
          }
#endif
          for (; c < d; ++c) v[c] = std::min(127.f, std::max(-127.f, std::nearbyint(v[c] / sc[part])));
        }
    }

    clock.lap(1);
    // attention per (sequence, head); the last layer only needs the [CLS] query
    const bool score = prune && !last;
    Buf<float> ctx((last ? b : T) * d);
    Buf<float> head_scores(score ? H * T : 1);
    if (score) std::fill(head_scores.data(), head_scores.data() + H * T, 0.f);
    at::parallel_for(0, b * H, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, (T / b) * (T / b) * dh)), [&](int64_t t0, int64_t t1) {
      AttentionScratch scratch;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t i = t / H, h = t % H;
        HeadAttention a{qkv.data(), 3 * d, start[i], len[i], last ? 1 : len[i], dh, h * dh, d + h * dh, 2 * d + h * dh,
                        ly.score_scale, ly.int8_attention, ly.ctx_scale, score ? head_scores.data() + h * T + start[i] : nullptr,
                        ctx.data(), d, last ? i : start[i], h * dh};
        head_attention(a, scratch);
      }
    });

    clock.lap(2);
    // keep decision: the rows that go on through the output projection and FFN
    std::vector<int64_t> rows;  // row index into x (and into ctx, unless last)
    if (score) {
      std::vector<float> sc(T);
      for (int64_t r = 0; r < T; ++r) {
        float v = 0.f;
        for (int64_t h = 0; h < H; ++h) v += head_scores[h * T + r];
        sc[r] = v / static_cast<float>(H);
      }
      rows.reserve(T);
      std::vector<char> keep;
      std::vector<int64_t> order;
      for (int64_t i = 0; i < b; ++i) {
        const int64_t n = len[i], r0 = start[i];
        keep.assign(n, 0);
        if (mode_ == PruneMode::Threshold) {
          for (int64_t j = 0; j < n; ++j) keep[j] = sc[r0 + j] > thresholds_[l];
        } else {  // top-k: ceil(ratio * n0) best (at least 1, at most the present ones), position 0 first, ties by position
          int64_t k = std::max<int64_t>(1, static_cast<int64_t>(std::ceil(static_cast<double>(n0[i]) * keep_ratios_[l])));
          k = std::min(k, n);
          order.resize(n);
          std::iota(order.begin(), order.end(), 0);
          std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t c) {
            if (a == 0 || c == 0) return a == 0 && c != 0;
            return sc[r0 + a] > sc[r0 + c];
          });
          for (int64_t q = 0; q < k; ++q) keep[order[q]] = 1;
        }
        keep[0] = 1;
        int64_t m = 0;
        for (int64_t j = 0; j < n; ++j)
          if (keep[j]) {
            rows.push_back(r0 + j);
            ++m;
          }
        new_len[i] = m;
      }
    } else if (last) {
      for (int64_t i = 0; i < b; ++i) {
        rows.push_back(start[i]);
        new_len[i] = 1;
      }
    } else {
      for (int64_t i = 0; i < b; ++i) new_len[i] = len[i];
    }
    // the kept rows are not copied: the output projection's quantiser reads them from the context
    // (the last layer's context holds only the [CLS] rows, in order) and the residual from x, by row index
    const bool gathered = score || last;
    const int64_t Tn = gathered ? static_cast<int64_t>(rows.size()) : T;
    const int64_t* x_rows = gathered ? rows.data() : nullptr;
    const int64_t* ctx_rows = gathered && !last ? rows.data() : nullptr;

    clock.lap(3);
    // output projection + residual + LayerNorm, FFN + residual + LayerNorm (on Tn rows) -> out
    Buf<float> hbuf(Tn * d);
    run_linear(*ly.attn_out, ctx.data(), d, Tn, hbuf.data(), d, ctx_rows);
    add_layernorm(hbuf.data(), x, Tn, d, ly.ln1, hbuf.data(), x_rows);
    const int64_t I = ly.ffn_up->N;
    clock.lap(4);
    if (ly.ffn_act == "none") {  // GELU in FFN up's epilogue, which also quantises for FFN down: no float [Tn, I] rows
      Buf<uint8_t> hq(Tn * ly.ffn_up->Kp), fq(Tn * ly.ffn_down->Kp);
      quantize_rows(*ly.ffn_up, hbuf.data(), d, Tn, hq.data());
      gemm_u8_into(hq.data(), Tn, *ly.ffn_up, *ly.ffn_down, fq.data());
      gemm_u8(fq.data(), Tn, *ly.ffn_down, out, d);
    } else {
      Buf<float> f(Tn * I);
      run_linear(*ly.ffn_up, hbuf.data(), d, Tn, f.data(), I);
      if (ly.ffn_act == "gelu") gelu_inplace(f.data(), Tn * I);
      else
        for (int64_t e = 0; e < Tn * I; ++e) f[e] = std::max(0.f, f[e]);
      run_linear(*ly.ffn_down, f.data(), I, Tn, out, d);
    }
    add_layernorm(out, hbuf.data(), Tn, d, ly.ln2, out);
    clock.lap(5);
    return Tn;
  }

 public:
  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

  // {phase: seconds summed over forward() calls since the last reset, "calls": n}
  std::map<std::string, double> phase_profile(bool reset) {
    std::lock_guard<std::mutex> guard(profile_mutex_);
    std::map<std::string, double> out;
    for (int i = 0; i < kPhases; ++i) out[kPhaseNames[i]] = phase_seconds_[i];
    out["calls"] = static_cast<double>(calls_);
    if (reset) {
      phase_seconds_.fill(0.0);
      calls_ = 0;
    }
    return out;
  }

 private:
  std::vector<float> word_, pos_, type_;
  LayerNormParams emb_ln_;
  bool roberta_positions_;
  int64_t padding_idx_;
  bool use_token_types_;
  int64_t heads_, d_ = 0, dh_ = 0, vocab_ = 0, max_pos_ = 0, num_types_ = 0;
  std::vector<Layer> layers_;
  std::shared_ptr<Int8Weight> head_pre_, head_final_;
  PruneMode mode_ = PruneMode::None;
  std::vector<float> thresholds_;
  std::vector<double> keep_ratios_;
  int64_t span_tokens_ = kSpanTokens, group_tokens_ = kGroupTokens;
  std::array<double, kPhases> phase_seconds_{};
  int64_t calls_ = 0;
  std::mutex profile_mutex_;
};

// ----------------------------------------------------------------------------- test hooks

// quantise + GEMM + epilogue on a float input [M, K] -> [M, N]
static at::Tensor int8_linear(const Int8Weight& w, const at::Tensor& x) {
  auto xc = x.to(at::kFloat).contiguous();
  TORCH_CHECK(xc.dim() == 2 && xc.size(1) == w.K, "x must be [M, K]");
  const int64_t M = xc.size(0);
  auto y = at::empty({M, w.N}, at::kFloat);
  run_linear(w, xc.data_ptr<float>(), w.K, M, y.data_ptr<float>(), w.N);
  return y;
}

// quantise + GEMM + epilogue that quantises for `next`: the u8 input of next, [M, next.K]
static at::Tensor int8_linear_into(const Int8Weight& w, const at::Tensor& x, const Int8Weight& next) {
  auto xc = x.to(at::kFloat).contiguous();
  TORCH_CHECK(xc.dim() == 2 && xc.size(1) == w.K, "x must be [M, K]");
  const int64_t M = xc.size(0);
  Buf<uint8_t> xq(M * w.Kp), yq(M * next.Kp);
  quantize_rows(w, xc.data_ptr<float>(), w.K, M, xq.data());
  gemm_u8_into(xq.data(), M, w, next, yq.data());
  auto out = at::empty({M, next.K}, at::kByte);
  for (int64_t m = 0; m < M; ++m) std::memcpy(out.data_ptr<uint8_t>() + m * next.K, yq.data() + m * next.Kp, next.K);
  return out;
}

// the u8 (x_q + 128) activation quantise_u8 gives, [M, K]
static at::Tensor quantize_u8_tensor(const at::Tensor& x, double scale, int64_t qmin) {
  auto xc = x.to(at::kFloat).contiguous();
  const int64_t M = xc.size(0), K = xc.size(1);
  auto out = at::empty({M, K}, at::kByte);
  quantize_u8(xc.data_ptr<float>(), K, M, K, K, static_cast<float>(scale), static_cast<int>(qmin), out.data_ptr<uint8_t>());
  return out;
}

static at::Tensor gelu_tensor(const at::Tensor& x) {
  auto y = x.to(at::kFloat).contiguous().clone();
  gelu_inplace(y.data_ptr<float>(), y.numel());
  return y;
}

static at::Tensor tanh_tensor(const at::Tensor& x) {
  auto y = x.to(at::kFloat).contiguous().clone();
  tanh_inplace(y.data_ptr<float>(), y.numel());
  return y;
}

// whether at::parallel_for runs on torch's thread pool here (compiled with OpenMP; without it the
// header template runs every loop on the calling thread), and how many distinct threads one
// parallel loop of `items` items used with `threads` threads requested
static bool parallel_compiled() {
#ifdef INTRA_OP_PARALLEL
  return true;
#else
  return false;
#endif
}

static int64_t threads_used(int64_t items, int64_t threads) {
  if (threads > 0) at::set_num_threads(static_cast<int>(threads));
  std::vector<int> who(items, -1);
  at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) who[i] = at::get_thread_num();
  });
  std::sort(who.begin(), who.end());
  return std::unique(who.begin(), who.end()) - who.begin();
}

// The CPU's int8 roofline as this build sees it: `threads` threads each run a register-only loop of
// independent vpdpbusd (12 accumulators, no memory traffic) for ~`seconds`; returns int8 GOP/s in all
// (2 ops per multiply-accumulate, 64 per instruction). What the GEMM phases' GOP/s is a fraction of.
static double vnni_peak_gops(int64_t threads, double seconds) {
#if LTP_HAVE_VNNI
  if (threads > 0) at::set_num_threads(static_cast<int>(threads));
  const int nt = at::get_num_threads();
  std::vector<double> rate(nt, 0.0);
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      __m512i acc[12];
      for (int i = 0; i < 12; ++i) acc[i] = _mm512_set1_epi32(i);
      const __m512i a = _mm512_set1_epi32(0x01010101), b = _mm512_set1_epi32(0x01020304);
      const auto start = std::chrono::steady_clock::now();
      int64_t iters = 0;
      double el = 0.0;
      do {
        for (int rep = 0; rep < 4096; ++rep) {
#pragma GCC unroll 12
          for (int i = 0; i < 12; ++i) acc[i] = _mm512_dpbusd_epi32(acc[i], a, b);
          // every accumulator is an asm operand: the compiler can neither drop nor merge the chains
          __asm__ volatile("" : "+v"(acc[0]), "+v"(acc[1]), "+v"(acc[2]), "+v"(acc[3]), "+v"(acc[4]), "+v"(acc[5]));
          __asm__ volatile("" : "+v"(acc[6]), "+v"(acc[7]), "+v"(acc[8]), "+v"(acc[9]), "+v"(acc[10]), "+v"(acc[11]));
        }
        iters += 4096;
        el = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      } while (el < seconds);
      rate[t] = 12.0 * 64.0 * 2.0 * static_cast<double>(iters) / el / 1e9;
    }
  });
  double total = 0.0;
  for (double r : rate) total += r;
  return total;
#else
  TORCH_CHECK(false, "vnni_peak_gops: avx512_vnni not compiled in");
  return 0.0;
#endif
}

static bool cpu_has_avx512_vnni() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw");
}

static std::string kernel_description(const std::string& kernel) {
  if (kernel == "reference") return "reference: plain C++ int32 loops (u8 - 128) x s8, float epilogue";
  if (kernel == "onednn_brgemm")
    return std::string("onednn_brgemm: oneDNN's brgemm ukernel (torch's at::native::cpublas::brgemm) u8 x s8 -> s32, generated for ") +
           (brgemm_packs_int8() ? "AMX tiles (oneDNN's effective ISA has amx_int8; B packed by oneDNN)"
                                : "AVX-512 VNNI (oneDNN's effective ISA is below AMX; B in the VNNI panels of avx512_vnni)") +
           ", one call per (row block of at most 48 rows, 64-channel panel), int32 block then the AVX-512 epilogue (compensation, "
           "x_scale * w_scale, bias, erf-GELU, FFN up -> u8 for FFN down); " +
           std::string(parallel_compiled() ? "threads: torch's OpenMP pool (GEMM items, attention heads, rows)" : "threads: none (built without OpenMP)");
  return "avx512_vnni: hand-written vpdpbusd u8 x s8 -> s32 micro-kernel (inline assembly, 24 accumulators in zmm registers), "
         "register tile up to 6 rows x 64 channels, "
         "weights pre-packed in 64-channel panels, epilogue (int32 compensation, x_scale * w_scale, bias, erf-GELU, "
         "FFN up -> u8 for FFN down) in registers; no AMX; " +
         std::string(parallel_compiled() ? "threads: torch's OpenMP pool (GEMM items, attention heads, rows)" : "threads: none (built without OpenMP)");
}

}  // namespace ltp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using namespace ltp;
  py::class_<Int8Weight, std::shared_ptr<Int8Weight>>(m, "Int8Weight")
      .def(py::init<const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, double, int64_t, bool, const std::string&>(),
           py::arg("w_q"), py::arg("w_scale"), py::arg("bias"), py::arg("x_scale"), py::arg("act_qmin"), py::arg("gelu"),
           py::arg("kernel"))
      .def_readonly("out_features", &Int8Weight::N)
      .def_readonly("in_features", &Int8Weight::K)
      .def_readonly("x_scale", &Int8Weight::x_scale)
      .def_property_readonly("kernel", [](const Int8Weight& w) { return std::string(kernel_name(w.kernel)); })
      .def("linear", &int8_linear, py::arg("x"), py::call_guard<py::gil_scoped_release>())
      .def("linear_into", &int8_linear_into, py::arg("x"), py::arg("next"), py::call_guard<py::gil_scoped_release>(),
           "the u8 input (x_q + 128) of weight `next`, quantised in this GEMM's epilogue");
  py::class_<FusedEncoder>(m, "FusedEncoder")
      .def(py::init<const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double, bool, int64_t,
                    bool, int64_t>(),
           py::arg("word_embeddings"), py::arg("position_embeddings"), py::arg("token_type_embeddings"), py::arg("ln_weight"),
           py::arg("ln_bias"), py::arg("ln_eps"), py::arg("roberta_positions"), py::arg("padding_idx"), py::arg("use_token_types"),
           py::arg("heads"))
      .def("add_layer", &FusedEncoder::add_layer)
      .def("set_head", &FusedEncoder::set_head, py::arg("pre"), py::arg("final"))
      .def("set_pruning", &FusedEncoder::set_pruning)
      .def("set_schedule", &FusedEncoder::set_schedule, py::arg("span_tokens"), py::arg("group_tokens"),
           "spans of at most span_tokens tokens through every layer; each layer on groups of at most group_tokens entering tokens")
      .def_property_readonly("schedule", &FusedEncoder::schedule)
      .def_property_readonly("num_layers", &FusedEncoder::num_layers)
      .def("phase_profile", &FusedEncoder::phase_profile, py::arg("reset") = false,
           "seconds per phase (embed, qkv, attention, select, out, ffn, head) summed over forward() calls, and 'calls'")
      .def("forward", &FusedEncoder::forward, py::arg("input_ids"), py::arg("attention_mask"), py::arg("token_type_ids"),
           py::arg("threads"), py::call_guard<py::gil_scoped_release>());
  m.def("quantize_u8", &quantize_u8_tensor);
  m.def("gelu", &gelu_tensor);
  m.def("tanh", &tanh_tensor);
  m.def("vnni_compiled", &vnni_compiled);
  m.def("cpu_has_avx512_vnni", &cpu_has_avx512_vnni);
  m.def("parallel_compiled", &parallel_compiled);
  m.def("vnni_peak_gops", &vnni_peak_gops, py::arg("threads"), py::arg("seconds") = 0.5, py::call_guard<py::gil_scoped_release>());
  m.def("threads_used", &threads_used, py::arg("items"), py::arg("threads"));
  m.def("kernel_description", &kernel_description);
  m.def("brgemm_unavailable_reason", &brgemm_unavailable_reason,
        "'' if torch's oneDNN brgemm runs u8 x s8 -> s32 here (a 1 x 16 x 4 self-check), else why not");
  m.def("brgemm_uses_amx", &brgemm_packs_int8, "whether oneDNN generates the brgemm for AMX tiles here (its effective ISA has amx_int8)");
}
