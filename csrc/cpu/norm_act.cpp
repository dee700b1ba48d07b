// Fused RMSNorm (optionally with the residual add) and fused SwiGLU, one pass over memory per row.
//
// Semantics are those of optistack/passes/kernels/reference.py: float32 math, results rounded to the
// input dtype; with a residual, h = x + residual is rounded to x's dtype before it is normalized.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "simd.h"

namespace optistack_cpu {

// Rows per parallel chunk: enough elements that the fork/join cost (~1-2 us) pays for itself.
static int64_t row_grain(int64_t width) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(width, 1)); }

template <typename T, typename W>
static void rms_norm_row(const T* x, const T* res, T* h_out, const W* w, T* y, int64_t n, float eps) {
#ifdef OPTISTACK_AVX512
  __m512 ss = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    __mmask16 m = tail_mask(n - i);
    __m512 v = load16(x + i, m);
    if (res) {  // h = x + residual, rounded to T, kept for the caller and for the norm
      store16(h_out + i, _mm512_add_ps(v, load16(res + i, m)), m);
      v = load16(h_out + i, m);
    }
    ss = _mm512_fmadd_ps(v, v, ss);
  }
  const T* src = res ? h_out : x;
  __m512 r = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(ss) / float(n) + eps));
  for (int64_t i = 0; i < n; i += 16) {
    __mmask16 m = tail_mask(n - i);
    store16(y + i, _mm512_mul_ps(_mm512_mul_ps(load16(src + i, m), r), load16(w + i, m)), m);
  }
#else
  float ss = 0.f;
  const T* src = x;
  if (res) {
    for (int64_t i = 0; i < n; ++i) h_out[i] = from_f32<T>(to_f32(x[i]) + to_f32(res[i]));
    src = h_out;
  }
  for (int64_t i = 0; i < n; ++i) ss += to_f32(src[i]) * to_f32(src[i]);
  float r = 1.f / std::sqrt(ss / float(n) + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = from_f32<T>(to_f32(src[i]) * r * to_f32(w[i]));
#endif
}

template <typename T, typename W>
static void rms_norm_rows(const at::Tensor& x, const at::Tensor* res, at::Tensor* h, const at::Tensor& w,
                          at::Tensor& y, double eps) {
  const int64_t n = x.size(-1), rows = x.numel() / std::max<int64_t>(n, 1);
  const T* xp = x.data_ptr<T>();
  const T* rp = res ? res->data_ptr<T>() : nullptr;
  T* hp = h ? h->data_ptr<T>() : nullptr;
  const W* wp = w.data_ptr<W>();
  T* yp = y.data_ptr<T>();
  auto body = [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      rms_norm_row<T, W>(xp + r * n, rp ? rp + r * n : nullptr, hp ? hp + r * n : nullptr, wp, yp + r * n, n,
                         float(eps));
  };
  if (rows * n < 32768) body(0, rows);  // no thread pool round trip for decode-sized inputs
  else at::parallel_for(0, rows, row_grain(n), body);
}

static void check_norm_args(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "optistack_cpu.rms_norm: x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16,
              "optistack_cpu.rms_norm: weight must be float32 or bfloat16, got ", w.scalar_type());
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(-1), "optistack_cpu.rms_norm: weight must be [", x.size(-1),
              "], got ", w.sizes());
}

template <typename F>
static void dispatch_norm(const at::Tensor& x, const at::Tensor& w, F&& f) {
  bool xb = x.scalar_type() == at::kBFloat16, wb = w.scalar_type() == at::kBFloat16;
  if (xb && wb) f(bf16{}, bf16{});
  else if (xb) f(bf16{}, float{});
  else if (wb) f(float{}, bf16{});
  else f(float{}, float{});
}

at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& w_in, double eps) {
  check_norm_args(x_in, w_in);
  at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  at::Tensor y = at::empty_like(x);
  dispatch_norm(x, w, [&](auto t, auto wt) {
    rms_norm_rows<decltype(t), decltype(wt)>(x, nullptr, nullptr, w, y, eps);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x_in, const at::Tensor& res_in,
                                                 const at::Tensor& w_in, double eps) {
  check_norm_args(x_in, w_in);
  TORCH_CHECK(res_in.sizes() == x_in.sizes() && res_in.scalar_type() == x_in.scalar_type(),
              "optistack_cpu.add_rms_norm: residual must match x in shape and dtype");
  at::Tensor x = x_in.contiguous(), res = res_in.contiguous(), w = w_in.contiguous();
  at::Tensor y = at::empty_like(x), h = at::empty_like(x);
  dispatch_norm(x, w, [&](auto t, auto wt) {
    rms_norm_rows<decltype(t), decltype(wt)>(x, &res, &h, w, y, eps);
  });
  return {y, h};
}

template <typename T>
static void swiglu_span(const T* g, const T* u, T* y, int64_t n) {
#ifdef OPTISTACK_AVX512
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t i = 0; i < n; i += 16) {
    __mmask16 m = tail_mask(n - i);
    __m512 gv = load16(g + i, m);
    __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv));
    __m512 s = _mm512_mul_ps(gv, recip16(_mm512_add_ps(one, e)));
    store16(y + i, _mm512_mul_ps(s, load16(u + i, m)), m);
  }
#else
  for (int64_t i = 0; i < n; ++i) {
    float gv = to_f32(g[i]);
    y[i] = from_f32<T>(gv / (1.f + std::exp(-gv)) * to_f32(u[i]));
  }
#endif
}

// gate and up may be strided views (e.g. the two halves of one fused gate|up projection): only
// their last dimension must be contiguous.
at::Tensor swiglu(const at::Tensor& gate, const at::Tensor& up) {
  TORCH_CHECK(gate.sizes() == up.sizes() && gate.scalar_type() == up.scalar_type(),
              "optistack_cpu.swiglu: gate and up must have the same shape and dtype");
  TORCH_CHECK(gate.scalar_type() == at::kFloat || gate.scalar_type() == at::kBFloat16,
              "optistack_cpu.swiglu: dtype must be float32 or bfloat16, got ", gate.scalar_type());
  const int64_t n = gate.size(-1);
  at::Tensor g = gate.reshape({-1, n}), u = up.reshape({-1, n});
  if (g.stride(-1) != 1) g = g.contiguous();
  if (u.stride(-1) != 1) u = u.contiguous();
  const int64_t rows = g.size(0);
  at::Tensor y = at::empty(gate.sizes(), gate.options());
  auto run = [&](auto t) {
    using T = decltype(t);
    const T* gp = g.data_ptr<T>();
    const T* up_ = u.data_ptr<T>();
    T* yp = y.data_ptr<T>();
    const int64_t gs = g.stride(0), us = u.stride(0);
    auto body = [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) swiglu_span<T>(gp + r * gs, up_ + r * us, yp + r * n, n);
    };
    if (rows * n < 32768) body(0, rows);
    else if (rows == 1) at::parallel_for(0, n / 16, 1024, [&](int64_t b, int64_t e) {  // one long row
      int64_t lo = b * 16, hi = (e == n / 16) ? n : e * 16;
      swiglu_span<T>(gp + lo, up_ + lo, yp + lo, hi - lo);
    });
    else at::parallel_for(0, rows, row_grain(n), body);
  };
  if (g.scalar_type() == at::kBFloat16) run(bf16{});
  else run(float{});
  return y;
}

}  // namespace optistack_cpu
