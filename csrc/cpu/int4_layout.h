// The packed int4 weight layout (see the top of int4_gemm.cpp), shared by the matmul and dequantize kernels.
#pragma once

#include <algorithm>
#include <cstdint>

namespace optistack_cpu {

// Input channels per chunk. A weight with K > kChunkK is stored as ceil(K / kChunkK) matrices of
// [N, width / 2] bytes one after the other (chunk c covers k in [c * kChunkK, c * kChunkK + width)),
// each in the row layout below. The matmul runs every row over one chunk before the next, so its
// 8 KB slice of a bfloat16 activation row stays in L1 beside the weight stream; with whole rows a
// 14336-wide activation (28 KB) fell out of L1 and the kernel ran at 2/3 of its bandwidth. Must match
// CHUNK_K in optistack/passes/kernels/cpu.py.
constexpr int64_t kChunkK = 4096;

inline int64_t chunk_width(int64_t K, int64_t k0) { return std::min(kChunkK, K - k0); }
inline const uint8_t* chunk_base(const uint8_t* qw, int64_t N, int64_t k0) { return qw + N * (k0 / 2); }

// Natural k (within a block of `bytes` bytes) of the low nibble of byte b; the high nibble is +bytes.
inline int64_t block_k_lo(int64_t b, int64_t bytes) {
  int64_t w = bytes / 2, lane = b / 16, within = b % 16;
  return (within / 8) * w + lane * 8 + within % 8;
}

// Where row n of a chunk of width Kc lives: base pointer of its 4-row group (or of itself),
// interleave il and slot j. Its block starting at chunk-local channel k is at base + (k / 2) * il + j * (block bytes).
struct RowRef {
  const uint8_t* base;
  int il, j;
};
inline RowRef row_ref(const uint8_t* chunk, int64_t n, int64_t N, int64_t Kc) {
  if (n < N / 4 * 4) return {chunk + (n / 4) * 4 * (Kc / 2), 4, int(n % 4)};
  return {chunk + n * (Kc / 2), 1, 0};
}

// Codes of row n in natural order (the portable paths, without AVX-512 BF16).
inline void decode_row(const uint8_t* qw, int64_t n, int64_t N, int64_t K, uint8_t* codes) {
  for (int64_t c0 = 0; c0 < K; c0 += kChunkK) {
    const int64_t Kc = chunk_width(K, c0);
    const RowRef row = row_ref(chunk_base(qw, N, c0), n, N, Kc);
    for (int64_t k0 = 0; k0 < Kc; k0 += 128) {
      int64_t bytes = (Kc - k0 >= 128) ? 64 : 32;
      const uint8_t* q = row.base + (k0 / 2) * row.il + row.j * bytes;
      for (int64_t b = 0; b < bytes; ++b) {
        int64_t k = c0 + k0 + block_k_lo(b, bytes);
        codes[k] = q[b] & 0x0F;
        codes[k + bytes] = q[b] >> 4;
      }
    }
  }
}

}  // namespace optistack_cpu
