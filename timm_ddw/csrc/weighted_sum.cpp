// Per-sample weighted sums of K same-layout feature maps in one pass: out = sum_k w[:, k] * xs[k].
// Each output tile is accumulated in registers/L1 while the K inputs stream through once, so a sum
// with K inputs moves K + 1 maps (an addcmul_ chain moves 3K). See timm_ddw/fused.py.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kTile = 2048;  // elements per parallel job
constexpr int64_t kLane = 16;  // elements held in registers while the K inputs stream through
constexpr int64_t kManyInputs = 12;  // above this many inputs, vector lanes of two registers instead of four

template <typename scalar_t, typename acc_t, int64_t kWidth>
inline void sum_run(const scalar_t* const* src, const acc_t* w, int64_t k_count, int64_t at, scalar_t* out) {
  acc_t acc[kWidth];
  for (int64_t t = 0; t < kWidth; ++t) acc[t] = w[0] * static_cast<acc_t>(src[0][at + t]);
  for (int64_t k = 1; k < k_count; ++k) {
    const scalar_t* q = src[k] + at;
    const acc_t c = w[k];
    for (int64_t t = 0; t < kWidth; ++t) acc[t] += c * static_cast<acc_t>(q[t]);
  }
  for (int64_t t = 0; t < kWidth; ++t) out[at + t] = static_cast<scalar_t>(acc[t]);
}

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// float32 with torch's own vector types (the build defines the capability torch dispatches to):
// kWidth / vector-size independent accumulators, so the multiply-adds of one lane do not wait on
// each other. Wide lanes win while the inputs fit in cache, narrow ones with many inputs
// (benchmarks/README.md, "Compiled sums as one operator").
template <int64_t kWidth>
inline void sum_run_vec(const float* const* src, const float* w, int64_t k_count, int64_t at, float* out) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int64_t n = kWidth / Vec::size();
  Vec acc[n];
  const Vec c0(w[0]);
  for (int64_t t = 0; t < n; ++t) acc[t] = Vec::loadu(src[0] + at + t * Vec::size()) * c0;
  for (int64_t k = 1; k < k_count; ++k) {
    const float* q = src[k] + at;
    const Vec c(w[k]);
    for (int64_t t = 0; t < n; ++t) acc[t] = at::vec::fmadd(Vec::loadu(q + t * Vec::size()), c, acc[t]);
  }
  for (int64_t t = 0; t < n; ++t) acc[t].store(out + at + t * Vec::size());
}

template <int64_t kWidth>
inline int64_t sum_span_vec(const float* const* src, const float* w, int64_t k_count, int64_t at, int64_t hi,
                            float* out) {
  for (; at + kWidth <= hi; at += kWidth) sum_run_vec<kWidth>(src, w, k_count, at, out);
  return at;
}
#endif

template <typename scalar_t, typename acc_t>
inline int64_t sum_span(const scalar_t* const* src, const acc_t* w, int64_t k_count, int64_t at, int64_t hi,
                        scalar_t* out) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<scalar_t, float>) {
    constexpr int64_t kWide = 4 * at::vec::Vectorized<float>::size();
    constexpr int64_t kNarrow = 2 * at::vec::Vectorized<float>::size();
    return k_count <= kManyInputs ? sum_span_vec<kWide>(src, w, k_count, at, hi, out)
                                  : sum_span_vec<kNarrow>(src, w, k_count, at, hi, out);
  }
#endif
  for (; at + kLane <= hi; at += kLane) sum_run<scalar_t, acc_t, kLane>(src, w, k_count, at, out);
  return at;
}

template <typename scalar_t, typename acc_t>
void sum_tiles(const std::vector<const scalar_t*>& src, const acc_t* w, int64_t w_stride, scalar_t* out,
               int64_t batch, int64_t per_sample) {
  const int64_t k_count = static_cast<int64_t>(src.size());
  const int64_t tiles = (per_sample + kTile - 1) / kTile;
  at::parallel_for(0, batch * tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const int64_t b = job / tiles;
      const int64_t lo = b * per_sample + (job % tiles) * kTile;
      const int64_t hi = std::min(lo + kTile, (b + 1) * per_sample);
      const acc_t* wb = w + b * w_stride;
      int64_t at = sum_span<scalar_t, acc_t>(src.data(), wb, k_count, lo, hi, out);
      for (; at < hi; ++at) sum_run<scalar_t, acc_t, 1>(src.data(), wb, k_count, at, out);
    }
  });
}

// The caller (fused.py) checks that every input is dense with xs[0]'s strides and w is B x K, K >= len(xs).
at::Tensor weighted_sum(at::TensorList xs, const at::Tensor& w) {
  const at::Tensor& x0 = xs[0];
  at::Tensor out = at::empty_like(x0);
  const int64_t batch = x0.size(0);
  const int64_t per_sample = batch ? x0.numel() / batch : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "timm_ddw_weighted_sum", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor wa = w.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    std::vector<const scalar_t*> src;
    src.reserve(xs.size());
    for (const at::Tensor& x : xs) src.push_back(x.const_data_ptr<scalar_t>());
    sum_tiles<scalar_t, acc_t>(src, wa.const_data_ptr<acc_t>(), wa.size(1), out.mutable_data_ptr<scalar_t>(), batch,
                               per_sample);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(timm_ddw_kernels, m) { m.def("weighted_sum(Tensor[] xs, Tensor w) -> Tensor"); }

TORCH_LIBRARY_IMPL(timm_ddw_kernels, CPU, m) { m.impl("weighted_sum", &weighted_sum); }
