// The packed int4 weight layout (see the top of int4_gemm.cpp), shared by the matmul and dequantize kernels.
#pragma once

#include <cstdint>

namespace optistack_cpu {

// Natural k (within a block of `bytes` bytes) of the low nibble of byte b; the high nibble is +bytes.
inline int64_t block_k_lo(int64_t b, int64_t bytes) {
  int64_t w = bytes / 2, lane = b / 16, within = b % 16;
  return (within / 8) * w + lane * 8 + within % 8;
}

// Where row n lives: base pointer of its 4-row group (or of itself), interleave il and slot j.
// Its block starting at input channel k is at base + (k / 2) * il + j * (block bytes).
struct RowRef {
  const uint8_t* base;
  int il, j;
};
inline RowRef row_ref(const uint8_t* qw, int64_t n, int64_t N, int64_t K) {
  if (n < N / 4 * 4) return {qw + (n / 4) * 4 * (K / 2), 4, int(n % 4)};
  return {qw + n * (K / 2), 1, 0};
}

// Codes of one row in natural order (the portable path, without AVX-512 BF16).
inline void decode_row(RowRef row, int64_t K, uint8_t* codes) {
  for (int64_t k0 = 0; k0 < K; k0 += 128) {
    int64_t bytes = (K - k0 >= 128) ? 64 : 32;
    const uint8_t* q = row.base + (k0 / 2) * row.il + row.j * bytes;
    for (int64_t b = 0; b < bytes; ++b) {
      int64_t k = k0 + block_k_lo(b, bytes);
      codes[k] = q[b] & 0x0F;
      codes[k + bytes] = q[b] >> 4;
    }
  }
}

}  // namespace optistack_cpu
