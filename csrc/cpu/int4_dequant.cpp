// Dequantize a packed int4 weight (int4_prepack's layout) to bfloat16 [N, K]: w = (q - 8) * s + z.
//
// Why: for prefill (many activation rows) a bf16 GEMM on the dequantized weight is 2-7x faster than
// any int4 dot-product kernel here (measured at M=128 on AVX512_BF16: the GEMM reuses each weight
// tile across rows from registers, the int4 kernels decode every block again per 4 rows), and
// dequantizing costs one pass over N*K outputs. int4_matmul switches to it above kDequantRows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <vector>

#include "int4_layout.h"
#include "kernels.h"
#include "simd.h"

namespace optistack_cpu {

template <typename S>
static void dequant_row(const uint8_t* qw, int64_t n, int64_t N, const S* s, const S* z, int64_t K, int64_t group,
                        bf16* out) {
#ifdef OPTISTACK_AVX512
  const __m512i nib = _mm512_set1_epi8(0x0F), zero8 = _mm512_setzero_si512();
  const __m512 eight = _mm512_set1_ps(8.f);
  // 16 codes (u16 words in natural k order) starting at channel k -> 16 bf16 weights.
  auto emit_at = [&](__m256i words, int64_t k, const S* s, const S* z, bf16* out) {
    const int64_t g = k / group;
    __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(words));
    __m512 w = _mm512_fmadd_ps(_mm512_sub_ps(q, eight), _mm512_set1_ps(to_f32(s[g])), _mm512_set1_ps(to_f32(z[g])));
    store16(out + k, w, __mmask16(0xFFFF));
  };
  for (int64_t c0 = 0; c0 < K; c0 += kChunkK) {  // k below is chunk-local, c0 + k the channel
    const int64_t Kc = chunk_width(K, c0), K128 = Kc / 128 * 128;
    const RowRef row = row_ref(chunk_base(qw, N, c0), n, N, Kc);
    bf16* o = out + c0;
    const S* sc = s + c0 / group;
    const S* zc = z + c0 / group;
    auto emit = [&](__m256i words, int64_t k) { emit_at(words, k, sc, zc, o); };
    for (int64_t k = 0; k < K128; k += 128) {
      __m512i b = _mm512_loadu_si512(row.base + (k / 2) * row.il + row.j * 64);
      __m512i lo = _mm512_and_si512(b, nib), hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), nib);
      __m512i v[4] = {_mm512_unpacklo_epi8(lo, zero8), _mm512_unpackhi_epi8(lo, zero8),
                      _mm512_unpacklo_epi8(hi, zero8), _mm512_unpackhi_epi8(hi, zero8)};
      for (int i = 0; i < 4; ++i) {
        emit(_mm512_castsi512_si256(v[i]), k + 32 * i);
        emit(_mm512_extracti64x4_epi64(v[i], 1), k + 32 * i + 16);
      }
    }
    if (K128 < Kc) {  // one 64-channel tail block of 32 bytes
      __m256i b = _mm256_loadu_si256((const __m256i*)(row.base + (K128 / 2) * row.il + row.j * 32));
      const __m256i nib8 = _mm256_set1_epi8(0x0F), zero = _mm256_setzero_si256();
      __m256i lo = _mm256_and_si256(b, nib8), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), nib8);
      emit(_mm256_unpacklo_epi8(lo, zero), K128);
      emit(_mm256_unpackhi_epi8(lo, zero), K128 + 16);
      emit(_mm256_unpacklo_epi8(hi, zero), K128 + 32);
      emit(_mm256_unpackhi_epi8(hi, zero), K128 + 48);
    }
  }
#else
  std::vector<uint8_t> codes(K);
  decode_row(qw, n, N, K, codes.data());
  for (int64_t k = 0; k < K; ++k) {
    const int64_t g = k / group;
    out[k] = bf16((float(codes[k]) - 8.f) * to_f32(s[g]) + to_f32(z[g]));
  }
#endif
}

void check_int4_packed(const char* op, const at::Tensor& qweight, const at::Tensor& scale, const at::Tensor& zero,
                       int64_t group) {
  TORCH_CHECK(group == 32 || group == 64 || group == 128 || group == 256,
              "optistack_cpu.", op, ": group_size must be 32, 64, 128 or 256, got ", group);
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.dim() == 2 && qweight.is_contiguous(),
              "optistack_cpu.", op, ": qweight must be contiguous uint8 [N, K/2] from int4_prepack");
  const int64_t N = qweight.size(0), K = qweight.size(1) * 2, G = K / group;
  TORCH_CHECK(K % group == 0 && K % 64 == 0, "optistack_cpu.", op, ": K=", K, " must be a multiple of 64 and of group_size");
  TORCH_CHECK(scale.sizes() == zero.sizes() && scale.size(0) == N && scale.size(1) == G &&
                  scale.scalar_type() == zero.scalar_type() && scale.is_contiguous() && zero.is_contiguous() &&
                  (scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kBFloat16),
              "optistack_cpu.", op, ": scale/zero must be contiguous float32 or bfloat16 [N, K/group]");
}

at::Tensor int4_dequant(const at::Tensor& qweight, const at::Tensor& scale, const at::Tensor& zero, int64_t group) {
  check_int4_packed("int4_dequant", qweight, scale, zero, group);
  const int64_t N = qweight.size(0), K = qweight.size(1) * 2, G = K / group;
  at::Tensor w = at::empty({N, K}, qweight.options().dtype(at::kBFloat16));
  const uint8_t* qw = qweight.data_ptr<uint8_t>();
  bf16* wp = w.data_ptr<bf16>();
  auto run = [&](auto tag) {
    using S = decltype(tag);
    const S* sc = scale.data_ptr<S>();
    const S* zr = zero.data_ptr<S>();
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) dequant_row<S>(qw, n, N, sc + n * G, zr + n * G, K, group, wp + n * K);
    });
  };
  if (scale.scalar_type() == at::kBFloat16) run(bf16{});
  else run(float{});
  return w;
}

}  // namespace optistack_cpu
