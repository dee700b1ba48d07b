// The engine's int4 weights as panels of 16 rows (int4_panel.cpp), beside the row layout they are made from.
//
// Layout, for a projection with N a multiple of 16 (K a multiple of 64, U = K / 64 units): panel nb (rows
// 16 nb .. 16 nb + 15), unit u is kPanelUnitBytes bytes at q + (nb * U + u) * kPanelUnitBytes: 8 vectors of
// 64 bytes, vector v holding, for each row r in bytes 4r..4r+3, that row's unit bytes 4v..4v+3 of the row
// layout (channels 4v..4v+3 in the low nibbles, 32 + 4v.. in the high ones); s and zc [N / 16][U][16] float32.
// The same codes, scales and zero terms as the row layout: only where they lie differs.
#pragma once

#include <cstdint>
#include <tuple>

#include "llama_decode.h"

namespace optistack_cpu {

constexpr int64_t kPanelUnitBytes = 512;

// Writes w's panels (w.N a multiple of 16): qp [w.N * w.K / 2] bytes, sp and zp [w.N * w.K / 64] floats.
void q4_panel_pack(const Q4Weight& w, uint8_t* qp, float* sp, float* zp);

// Python's way to them: (codes, s and zc) tensors for a row-layout projection (llama_setup.cpp).
std::tuple<at::Tensor, at::Tensor> q4_panels(const at::Tensor& q, const at::Tensor& s, const at::Tensor& zc);

// As q4_rows (int8 activations from prep_q8) on w's panels (w.pq, w.ps, w.pzc): rows [n0, n1) in multiples of 16.
void q4_rows_panel(const Q4Weight& w, const XQ* xs, int64_t M, int64_t n0, int64_t n1, float* y,
                   int64_t ystride, bool add);

}  // namespace optistack_cpu
