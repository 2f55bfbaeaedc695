// CUDA kernels for the ONNX Attention op (opset 23/24; reference: src/ops/nn2/attention.cpp).
// Covered: 3-D ([B, S, H*D] with q_num_heads / kv_num_heads) and 4-D ([B, H, S, D]) Q/K/V, GQA
// (kv heads dividing q heads), `scale` (default 1/sqrt(head_size), rounded like the reference),
// `is_causal`, attn_mask (bool or any float dtype, right-aligned broadcast to [B, Hq, S, T], last
// dim padded with -inf up to T), past_key/past_value with present_key/present_value, softcap,
// nonpad_kv_seqlen (opset 24), qk_matmul_output (modes 0..3). `softmax_precision` is accepted
// and ignored: the softmax always runs in float32, as the reference runs it in double.
// Element types: float32, float16, bfloat16 (math in float; probabilities rounded to the element
// type before P*V, as the reference does).
//
// Four kernels:
// - attn_row_kernel: a block of 128 threads per query row (any sizes, every feature). Scores
//   live in shared memory when they fit, else in a global scratch row.
// - attn_mma_kernel: float16/bfloat16 on sm_80+, head size 32/64/128, at most 512 keys, no
//   qk_matmul_output, K and V of a head fitting in shared memory (16-byte aligned operands):
//   mma.sync with the scores kept in registers, 16 query rows per warp, 1-4 warps per CTA (see
//   the kernel). The default fast path; KILN_CUDA_ATTENTION_WMMA=1 uses the next one instead.
// - attn_fast_kernel: float16/bfloat16, head size 32/64/128 (Q, K and V), at most 512 keys, no
//   qk_matmul_output. A CTA computes 64 query rows of one (batch, head) with tensor cores (wmma,
//   fp32 accumulation): scores for all keys in shared memory, softmax per row by one warp, the
//   probabilities written back as T over the scores, then P*V and the output written straight
//   into the op's layout (for 3-D outputs [B, S, H*D]: the head merge is free).
// - attn_f32_kernel: the float32 counterpart on CUDA cores (same limits, 32 query rows per CTA,
//   register-blocked 4 x 4 scores and 4 x D/16 outputs per thread).
#include <cuda_runtime.h>
#include <math_constants.h>
#include <mma.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>
#include <type_traits>

#include "backends/cuda/cuda_env.h"
#include "backends/cuda/cudnn_graph.h"
#include "backends/cuda/cuda_types.cuh"
#include "kiln/half.h"

namespace kiln::cuda {
namespace {

constexpr unsigned kFull = 0xffffffffu;

// ------------------------------------------------------------------ geometry
// Element (b, h, s, d) of a Q/K/V/Y operand sits at b*st[0] + h*st[1] + s*st[2] + d.
struct AttnGeom {
  int64_t B = 0, Hq = 0, Hkv = 0, S = 0, T = 0, P = 0, Dh = 0, Dv = 0;
  int64_t qs[3] = {}, ks[3] = {}, vs[3] = {}, ys[3] = {};
  float scale = 1.f, softcap = 0.f;
  int causal = 0, has_past = 0, mode = 0;
  // attn_mask: code 0 none, 1 bool, 2 f32, 3 f16, 4 bf16, 5 f64; strides over [B, Hq, S, T].
  const void* mask = nullptr;
  int mask_code = 0;
  int64_t mstr[4] = {};
  int64_t mlen = 0;             // the mask's last dim (<= T); keys beyond it are masked
  const int64_t* nonpad = nullptr;  // device [B] or nullptr
};

__device__ __forceinline__ float neg_inf() { return -CUDART_INF_F; }

// Additive bias of score (b, h, i, j): mask, causal and nonpad terms, as the reference adds them.
__device__ __forceinline__ float attn_bias(const AttnGeom& g, int64_t b, int64_t h, int64_t i,
                                           int64_t j, int64_t np_len) {
  float bj = 0.f;
  if (g.mask_code != 0) {
    if (j >= g.mlen) {
      bj = neg_inf();
    } else {
      const int64_t o = b * g.mstr[0] + h * g.mstr[1] + i * g.mstr[2] + j * g.mstr[3];
      switch (g.mask_code) {
        case 1: bj = static_cast<const bool*>(g.mask)[o] ? 0.f : neg_inf(); break;
        case 2: bj = static_cast<const float*>(g.mask)[o]; break;
        case 3: bj = __half2float(static_cast<const __half*>(g.mask)[o]); break;
        case 4: bj = __bfloat162float(static_cast<const __nv_bfloat16*>(g.mask)[o]); break;
        default: bj = static_cast<float>(static_cast<const double*>(g.mask)[o]); break;
      }
    }
  }
  if (g.causal) {
    const int64_t offset = g.has_past ? g.P : (g.nonpad ? np_len - g.S : 0);
    if (j > i + offset) bj += neg_inf();
  }
  if (g.nonpad && j >= np_len) bj += neg_inf();
  return bj;
}
__device__ __forceinline__ bool is_neg_inf(float v) { return isinf(v) && v < 0.f; }

__device__ __forceinline__ float capped(const AttnGeom& g, float raw) {
  return g.softcap > 0.f ? g.softcap * tanhf(raw / g.softcap) : raw;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, m));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(kFull, v, m);
  return v;
}

// Block-wide reductions for the 128-thread row kernel (4 warps). `red` holds 4 floats.
constexpr int kRowThreads = 128;
__device__ float block_max(float v, float* red) {
  v = warp_max(v);
  const int w = threadIdx.x >> 5, l = threadIdx.x & 31;
  __syncthreads();
  if (l == 0) red[w] = v;
  __syncthreads();
  return fmaxf(fmaxf(red[0], red[1]), fmaxf(red[2], red[3]));
}
__device__ float block_sum(float v, float* red) {
  v = warp_sum(v);
  const int w = threadIdx.x >> 5, l = threadIdx.x & 31;
  __syncthreads();
  if (l == 0) red[w] = v;
  __syncthreads();
  return (red[0] + red[1]) + (red[2] + red[3]);
}

// ------------------------------------------------------------------ present K/V
// out [B, H, P+L, D] = concat(past [B, H, P, D] (may be null when P == 0), cur (strided)).
template <class T>
__global__ void concat_kv_kernel(const T* __restrict__ past, const T* __restrict__ cur,
                                 T* __restrict__ out, int64_t B, int64_t H, int64_t P, int64_t L,
                                 int64_t D, int64_t c0, int64_t c1, int64_t c2) {
  const int64_t Tt = P + L, total = B * H * Tt * D;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = e % D;
    int64_t r = e / D;
    const int64_t t = r % Tt;
    r /= Tt;
    const int64_t h = r % H, b = r / H;
    out[e] = t < P ? past[((b * H + h) * P + t) * D + d]
                   : cur[b * c0 + h * c1 + (t - P) * c2 + d];
  }
}

// ------------------------------------------------------------------ general kernel
// A block per query row (b, h, i). Dynamic shared memory: Q row (Dh floats), then the T scores
// when `smem_scores`; else the scores use `work` + row * T (global scratch).
template <class T>
__global__ void __launch_bounds__(kRowThreads)
    attn_row_kernel(AttnGeom g, const T* __restrict__ q, const T* __restrict__ k,
                    const T* __restrict__ v, T* __restrict__ y, T* __restrict__ qk,
                    float* __restrict__ work, int smem_scores) {
  extern __shared__ float attn_smem[];
  __shared__ float red[4];
  float* sq = attn_smem;
  const int64_t rows = g.B * g.Hq * g.S;
  const int64_t reps = g.Hq / g.Hkv;
  const int tid = threadIdx.x;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t i = row % g.S, bh = row / g.S, h = bh % g.Hq, b = bh / g.Hq, hk = h / reps;
    float* sc = smem_scores ? attn_smem + g.Dh : work + row * g.T;
    const int64_t np_len = g.nonpad ? g.nonpad[b] : 0;
    __syncthreads();  // the previous row is done with sq / sc
    const T* qr = q + b * g.qs[0] + h * g.qs[1] + i * g.qs[2];
    for (int64_t d = tid; d < g.Dh; d += kRowThreads) sq[d] = convert<float>(qr[d]);
    __syncthreads();
    const T* kb = k + b * g.ks[0] + hk * g.ks[1];
    T* qkr = qk ? qk + row * g.T : nullptr;
    float mx = neg_inf();
    float any = 0.f;
    for (int64_t j = tid; j < g.T; j += kRowThreads) {
      const T* kr = kb + j * g.ks[2];
      float dot = 0.f;
      for (int64_t d = 0; d < g.Dh; ++d) dot = fmaf(sq[d], convert<float>(kr[d]), dot);
      const float raw = dot * g.scale;
      const float cq = capped(g, raw);
      const float bj = attn_bias(g, b, h, i, j, np_len);
      if (!is_neg_inf(bj)) any = 1.f;
      const float l = cq + bj;
      sc[j] = l;
      if (qkr && g.mode < 3) qkr[j] = convert<T>(g.mode == 0 ? raw : g.mode == 1 ? cq : l);
      mx = fmaxf(mx, l);
    }
    mx = block_max(mx, red);
    any = block_max(any, red);
    if (is_neg_inf(mx)) mx = 0.f;
    float s = 0.f;
    for (int64_t j = tid; j < g.T; j += kRowThreads) {
      const float e = expf(sc[j] - mx);
      sc[j] = e;
      s += e;
    }
    s = block_sum(s, red);
    if (s == 0.f) s = 1.f;
    for (int64_t j = tid; j < g.T; j += kRowThreads) {
      // The reference rounds the probabilities to the element type before P*V.
      const float p = convert<float>(convert<T>(any > 0.f ? sc[j] / s : 0.f));
      sc[j] = p;
      if (qkr && g.mode == 3) qkr[j] = convert<T>(p);
    }
    __syncthreads();
    const T* vb = v + b * g.vs[0] + hk * g.vs[1];
    T* yr = y + b * g.ys[0] + h * g.ys[1] + i * g.ys[2];
    for (int64_t d = tid; d < g.Dv; d += kRowThreads) {
      float acc = 0.f;
      for (int64_t j = 0; j < g.T; ++j) acc = fmaf(sc[j], convert<float>(vb[j * g.vs[2] + d]), acc);
      yr[d] = convert<T>(acc);
    }
  }
}

// ------------------------------------------------------------------ fast kernel (wmma)
// Head sizes D of 32, 64 or 128 (Q, K and V alike). Shared tiles have rows of D + 8 elements
// (wmma needs ldm % 8 == 0 and 32-byte aligned fragment starts: 16 rows of (D + 8) * 2 bytes
// are a multiple of 32 for these D).
constexpr int kFM = 64;      // query rows per CTA (4 warps x 16)
constexpr int kFN = 64;      // keys per K/V chunk
constexpr int kFMaxT = 512;  // keys covered (scores of a row kept in registers: 16 per lane)
constexpr int kFThreads = 128;

static_assert(kFM == kFN, "Q and K/V tiles share load_tile");

// Copies rows [r0, r0 + 64) x D columns of a row-strided operand into a shared tile, zeros for
// rows >= n (ragged S / T: never read past the end). `vec`: 16-byte aligned rows.
template <class T, int D>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int64_t stride, int64_t r0,
                                          int64_t n, bool vec) {
  constexpr int kLd = D + 8;
  for (int idx = threadIdx.x; idx < kFN * (D / 8); idx += kFThreads) {
    const int r = idx / (D / 8), c = (idx % (D / 8)) * 8;
    T* dp = dst + r * kLd + c;
    const int64_t row = r0 + r;
    if (row < n) {
      const T* sp = src + row * stride + c;
      if (vec) {
        *reinterpret_cast<uint4*>(dp) = *reinterpret_cast<const uint4*>(sp);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) dp[e] = sp[e];
      }
    } else {
      *reinterpret_cast<uint4*>(dp) = make_uint4(0u, 0u, 0u, 0u);  // +0.0 in half and bf16
    }
  }
}

// Softmax of one score row (query i) by one warp, 16 values per lane (Tp = 32 * nt <= 512
// scores): scale, softcap, bias; keys >= T and fully masked rows get 0; rows i >= S too. The
// probabilities, rounded to T, overwrite the row's first Tp elements as T (after every lane has
// read the row: for T narrower than float they alias the scores).
template <class T>
__device__ __forceinline__ void softmax_row_warp(const AttnGeom& g, float* srow, int64_t b,
                                                 int64_t h, int64_t i, int64_t np_len, int nt,
                                                 int lane) {
  float vals[kFMaxT / 32];
  if (i < g.S) {
    float mx = neg_inf();
    bool any = false;
#pragma unroll
    for (int t = 0; t < kFMaxT / 32; ++t) {
      vals[t] = neg_inf();
      const int64_t j = lane + 32 * t;
      if (t < nt && j < g.T) {
        const float bj = attn_bias(g, b, h, i, j, np_len);
        if (!is_neg_inf(bj)) any = true;
        vals[t] = capped(g, srow[j] * g.scale) + bj;
        mx = fmaxf(mx, vals[t]);
      }
    }
    mx = warp_max(mx);
    any = __any_sync(kFull, any);
    if (is_neg_inf(mx)) mx = 0.f;
    float s = 0.f;
#pragma unroll
    for (int t = 0; t < kFMaxT / 32; ++t) {
      const int64_t j = lane + 32 * t;
      const float e = (t < nt && j < g.T) ? expf(vals[t] - mx) : 0.f;
      vals[t] = e;
      s += e;
    }
    s = warp_sum(s);
    if (s == 0.f) s = 1.f;
#pragma unroll
    for (int t = 0; t < kFMaxT / 32; ++t) vals[t] = any ? vals[t] / s : 0.f;
  } else {
#pragma unroll
    for (int t = 0; t < kFMaxT / 32; ++t) vals[t] = 0.f;
  }
  __syncwarp();
  T* prow = reinterpret_cast<T*>(srow);
#pragma unroll
  for (int t = 0; t < kFMaxT / 32; ++t)
    if (t < nt) prow[lane + 32 * t] = convert<T>(vals[t]);
  __syncwarp();
}

// Float row stride of a CTA's scores rows: room for Tp scores and later for D outputs; a
// multiple of 4 (wmma float ldm), so 2 * lds T elements (the probabilities) is one of 8.
int fast_lds(int64_t Tp, int D) { return static_cast<int>(std::max<int64_t>(Tp, D) + 4); }
size_t fast_smem_bytes(int64_t Tp, int D, size_t elem) {
  return static_cast<size_t>(2 * kFM * (D + 8)) * elem +
         static_cast<size_t>(kFM) * static_cast<size_t>(fast_lds(Tp, D)) * sizeof(float);
}

template <class T, int D>
__global__ void __launch_bounds__(kFThreads)
    attn_fast_kernel(AttnGeom g, const T* __restrict__ q, const T* __restrict__ k,
                     const T* __restrict__ v, T* __restrict__ y, int Tp, int lds, int vec) {
  namespace wm = nvcuda::wmma;
  constexpr int kLd = D + 8;
  extern __shared__ __align__(128) unsigned char attn_fast_smem[];
  T* sQ = reinterpret_cast<T*>(attn_fast_smem);
  T* sKV = sQ + kFM * kLd;
  float* sS = reinterpret_cast<float*>(sKV + kFN * kLd);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kFM;
  const int64_t h = blockIdx.y, b = blockIdx.z;
  const int64_t hk = h / (g.Hq / g.Hkv);
  const T* qb = q + b * g.qs[0] + h * g.qs[1];
  const T* kb = k + b * g.ks[0] + hk * g.ks[1];
  const T* vb = v + b * g.vs[0] + hk * g.vs[1];
  const int64_t np_len = g.nonpad ? g.nonpad[b] : 0;
  const int nchunks = Tp / kFN;

  load_tile<T, D>(sQ, qb, g.qs[2], i0, g.S, vec != 0);
  __syncthreads();
  wm::fragment<wm::matrix_a, 16, 16, 16, T, wm::row_major> qa[D / 16];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk)
    wm::load_matrix_sync(qa[kk], sQ + warp * 16 * kLd + kk * 16, kLd);

  // Scores: warp w owns rows [16w, 16w + 16) of sS.
  float* srows = sS + warp * 16 * lds;
  for (int c = 0; c < nchunks; ++c) {
    __syncthreads();  // everyone is done with the previous chunk
    load_tile<T, D>(sKV, kb, g.ks[2], static_cast<int64_t>(c) * kFN, g.T, vec != 0);
    __syncthreads();
#pragma unroll
    for (int n = 0; n < kFN / 16; ++n) {
      wm::fragment<wm::accumulator, 16, 16, 16, float> acc;
      wm::fill_fragment(acc, 0.f);
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        // B = K^T (d x j): the K tile [j][d] read column-major.
        wm::fragment<wm::matrix_b, 16, 16, 16, T, wm::col_major> kf;
        wm::load_matrix_sync(kf, sKV + n * 16 * kLd + kk * 16, kLd);
        wm::mma_sync(acc, qa[kk], kf, acc);
      }
      wm::store_matrix_sync(srows + c * kFN + n * 16, acc, lds, wm::mem_row_major);
    }
  }
  __syncwarp();

  // Softmax of each owned row (a warp per row); probabilities overwrite the rows as T.
  const int nt = Tp / 32;
  for (int r = 0; r < 16; ++r)
    softmax_row_warp<T>(g, srows + r * lds, b, h, i0 + warp * 16 + r, np_len, nt, lane);

  // O = P V, accumulated over the key chunks.
  wm::fragment<wm::accumulator, 16, 16, 16, float> oacc[D / 16];
#pragma unroll
  for (int n = 0; n < D / 16; ++n) wm::fill_fragment(oacc[n], 0.f);
  const T* prows = reinterpret_cast<const T*>(srows);
  const int ldp = 2 * lds;  // T elements per score row
  for (int c = 0; c < nchunks; ++c) {
    __syncthreads();
    load_tile<T, D>(sKV, vb, g.vs[2], static_cast<int64_t>(c) * kFN, g.T, vec != 0);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kFN / 16; ++kk) {
      wm::fragment<wm::matrix_a, 16, 16, 16, T, wm::row_major> pa;
      wm::load_matrix_sync(pa, prows + c * kFN + kk * 16, ldp);
#pragma unroll
      for (int n = 0; n < D / 16; ++n) {
        wm::fragment<wm::matrix_b, 16, 16, 16, T, wm::row_major> vf;
        wm::load_matrix_sync(vf, sKV + kk * 16 * kLd + n * 16, kLd);
        wm::mma_sync(oacc[n], pa, vf, oacc[n]);
      }
    }
  }
  __syncwarp();
#pragma unroll
  for (int n = 0; n < D / 16; ++n)
    wm::store_matrix_sync(srows + n * 16, oacc[n], lds, wm::mem_row_major);
  __syncwarp();
  T* yb = y + b * g.ys[0] + h * g.ys[1];
  for (int idx = lane; idx < 16 * D; idx += 32) {
    const int r = idx / D, d = idx % D;
    const int64_t i = i0 + warp * 16 + r;
    if (i < g.S) yb[i * g.ys[2] + d] = convert<T>(srows[r * lds + d]);
  }
}

// ------------------------------------------------------------------ mma kernel (sm_80+)
// float16/bfloat16, head size 32/64/128 (Q, K and V alike), at most 512 keys, no
// qk_matmul_output, whole K and V of a (batch, kv head) fitting in shared memory. A CTA of W
// warps (W = 1, 2 or 4, fewer when the grid would leave SMs idle) covers 16 W query rows of one
// (batch, head); each warp owns 16 rows and works alone after K/V are staged (cp.async, one
// barrier). With mma.sync m16n8k16 the scores live in registers in the accumulator layout:
// - pass 1, per 64-key chunk: S = Q K^T, logits (scale, softcap, bias), running row max and sum
//   of exponentials (online rescaling; a row is shared by the 4 lanes of a quad);
// - pass 2, per 16 keys: S again, p = exp(l - max) / sum rounded to T (as the reference rounds the
//   probabilities), packed straight into the A fragment of O += P V (V via ldmatrix.trans).
// The additive bias is read from a per-CTA row of Tp floats when it does not depend on the query
// row (no causal, mask broadcast over queries: BERT's [B, 1, 1, T]), else computed per score.
// Fragment layouts (PTX ISA, mma.m16n8k16 .f16/.bf16): g = lane / 4, t = lane % 4;
// A regs {(g, 2t..2t+1), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..)}; B regs {(k 2t..2t+1, n g),
// (k 2t+8.., n g)}; C {(g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)}.
constexpr int kMmaMaxWarps = 4;

__device__ __forceinline__ unsigned smem_u32(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(dst)), "l"(src));
#else
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
#endif
}
__device__ __forceinline__ void cp_async_wait_all() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
#endif
}
// ldmatrix x4: lanes 8m..8m+7 address the rows of 8x8 matrix m; r[m] is this lane's part.
__device__ __forceinline__ void ldsm_x4(unsigned (&r)[4], const void* p) {
#if __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
#else
  __trap();
#endif
}
__device__ __forceinline__ void ldsm_x4_trans(unsigned (&r)[4], const void* p) {
#if __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
#else
  __trap();
#endif
}
// c += a * b (16x8x16, fp32 accumulation).
template <class T>
__device__ __forceinline__ void mma16816(float (&c)[4], const unsigned (&a)[4], unsigned b0,
                                         unsigned b1) {
#if __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __half>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#else
  __trap();
#endif
}
// Two floats rounded to T, the first in the low half.
template <class T>
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const unsigned*>(&h);
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const unsigned*>(&h);
  }
}
template <class T>
__device__ __forceinline__ unsigned ld_pair(const T* p) {
  return __ldg(reinterpret_cast<const unsigned*>(p));
}

// The bias row of a CTA whose bias does not depend on the query row (no causal, mask broadcast
// over queries): attn_bias(g, b, h, 0, j) for j < T, -inf for the padding keys j >= T; `any`
// set when some j < T is not masked. The mask's element type is resolved once, outside the loop,
// so the loads of a thread's keys are independent (no per-element switch).
template <class M>
__device__ __forceinline__ float mask_value(const M* p, int64_t o) {
  if constexpr (std::is_same_v<M, bool>) return p[o] ? 0.f : neg_inf();
  else return convert<float>(p[o]);
}
template <class M>
__device__ __forceinline__ void fill_col_bias(const AttnGeom& g, int64_t b, int64_t h,
                                              int64_t np_len, float* sBias, int Tp, int& any) {
  const bool has_mask = g.mask_code != 0;
  const M* mrow = g.mask ? static_cast<const M*>(g.mask) + b * g.mstr[0] + h * g.mstr[1] : nullptr;
#pragma unroll 4
  for (int j = threadIdx.x; j < Tp; j += blockDim.x) {
    float bj = neg_inf();
    if (j < g.T) {
      bj = 0.f;
      if (has_mask) bj = j < g.mlen ? mask_value(mrow, j * g.mstr[3]) : neg_inf();
      if (g.nonpad && j >= np_len) bj += neg_inf();
      if (!is_neg_inf(bj)) any = 1;
    }
    sBias[j] = bj;
  }
}

size_t mma_smem_bytes(int64_t Tp, int D, size_t elem) {
  return 2 * static_cast<size_t>(Tp) * static_cast<size_t>(D + 8) * elem +
         static_cast<size_t>(Tp) * sizeof(float);
}

template <class T, int D, bool kColBias>
__global__ void __launch_bounds__(32 * kMmaMaxWarps)
    attn_mma_kernel(AttnGeom g, const T* __restrict__ q, const T* __restrict__ k,
                    const T* __restrict__ v, T* __restrict__ y, int Tp) {
  constexpr int kLd = D + 8;  // smem row pitch: 16-byte aligned rows, conflict-free ldmatrix
  constexpr int kCh = D / 8;  // 16-byte chunks per row
  constexpr float kLog2e = 1.4426950408889634f;
  extern __shared__ __align__(128) unsigned char attn_mma_smem[];
  T* sK = reinterpret_cast<T*>(attn_mma_smem);
  T* sV = sK + static_cast<size_t>(Tp) * kLd;
  float* sBias = reinterpret_cast<float*>(sV + static_cast<size_t>(Tp) * kLd);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int gq = lane >> 2, t4 = lane & 3;
  const int64_t h = blockIdx.y, b = blockIdx.z;
  const int64_t hk = h / (g.Hq / g.Hkv);
  const T* kb = k + b * g.ks[0] + hk * g.ks[1];
  const T* vb = v + b * g.vs[0] + hk * g.vs[1];
  const int64_t np_len = g.nonpad ? g.nonpad[b] : 0;

  // Stage K and V (rows >= T zero: their scores get -inf bias, their V rows weight 0).
  for (int idx = tid; idx < Tp * kCh; idx += blockDim.x) {
    const int r = idx / kCh, c = (idx % kCh) * 8;
    T* dk = sK + r * kLd + c;
    T* dv = sV + r * kLd + c;
    if (r < g.T) {
      cp_async16(dk, kb + r * g.ks[2] + c);
      cp_async16(dv, vb + r * g.vs[2] + c);
    } else {
      *reinterpret_cast<uint4*>(dk) = make_uint4(0u, 0u, 0u, 0u);
      *reinterpret_cast<uint4*>(dv) = make_uint4(0u, 0u, 0u, 0u);
    }
  }
  int any_col = 0;
  if constexpr (kColBias) {
    switch (g.mask_code) {
      case 1: fill_col_bias<bool>(g, b, h, np_len, sBias, Tp, any_col); break;
      case 2: fill_col_bias<float>(g, b, h, np_len, sBias, Tp, any_col); break;
      case 3: fill_col_bias<__half>(g, b, h, np_len, sBias, Tp, any_col); break;
      case 4: fill_col_bias<__nv_bfloat16>(g, b, h, np_len, sBias, Tp, any_col); break;
      case 5: fill_col_bias<double>(g, b, h, np_len, sBias, Tp, any_col); break;
      default: fill_col_bias<float>(g, b, h, np_len, sBias, Tp, any_col); break;  // no mask
    }
  }
  // This lane's query rows iA (g) and iB (g + 8) of the warp's 16; Q as A fragments.
  const int64_t iA = static_cast<int64_t>(blockIdx.x) * (16 * (blockDim.x >> 5)) + warp * 16 + gq;
  const int64_t iB = iA + 8;
  const bool okA = iA < g.S, okB = iB < g.S;
  const int64_t iAc = okA ? iA : g.S - 1, iBc = okB ? iB : g.S - 1;  // bias rows (in bounds)
  unsigned qa[D / 16][4];
  {
    const T* qA = q + b * g.qs[0] + h * g.qs[1] + iAc * g.qs[2] + 2 * t4;
    const T* qB = q + b * g.qs[0] + h * g.qs[1] + iBc * g.qs[2] + 2 * t4;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      qa[kk][0] = okA ? ld_pair(qA + kk * 16) : 0u;
      qa[kk][1] = okB ? ld_pair(qB + kk * 16) : 0u;
      qa[kk][2] = okA ? ld_pair(qA + kk * 16 + 8) : 0u;
      qa[kk][3] = okB ? ld_pair(qB + kk * 16 + 8) : 0u;
    }
  }
  cp_async_wait_all();
  const int any_cta = __syncthreads_or(any_col);  // also: K, V and the bias row are visible

  // Logits of this lane's two scores at key j (j even; j, j+1) for rows A and B, in place.
  auto logits = [&](float (&s)[4], int j, int& anyA, int& anyB) {
    float bA0, bA1, bB0, bB1;
    if constexpr (kColBias) {
      const float2 bb = *reinterpret_cast<const float2*>(sBias + j);
      bA0 = bB0 = bb.x;
      bA1 = bB1 = bb.y;
    } else {
      bA0 = j < g.T ? attn_bias(g, b, h, iAc, j, np_len) : neg_inf();
      bA1 = j + 1 < g.T ? attn_bias(g, b, h, iAc, j + 1, np_len) : neg_inf();
      bB0 = j < g.T ? attn_bias(g, b, h, iBc, j, np_len) : neg_inf();
      bB1 = j + 1 < g.T ? attn_bias(g, b, h, iBc, j + 1, np_len) : neg_inf();
      anyA |= (j < g.T && !is_neg_inf(bA0)) || (j + 1 < g.T && !is_neg_inf(bA1));
      anyB |= (j < g.T && !is_neg_inf(bB0)) || (j + 1 < g.T && !is_neg_inf(bB1));
    }
    s[0] = capped(g, s[0] * g.scale) + bA0;
    s[1] = capped(g, s[1] * g.scale) + bA1;
    s[2] = capped(g, s[2] * g.scale) + bB0;
    s[3] = capped(g, s[3] * g.scale) + bB1;
  };
  // Pointer of this lane's ldmatrix row for K keys [j0, j0 + 8) x dims [32 k2, 32 k2 + 32).
  const int krow = lane & 7, kcol = (lane >> 3) * 8;

  // Pass 1: row max and sum of exponentials.
  float mA = neg_inf(), mB = neg_inf(), sumA = 0.f, sumB = 0.f;
  int anyA = 0, anyB = 0;
#pragma unroll 1
  for (int c0 = 0; c0 < Tp; c0 += 64) {
    float s[8][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
      const T* kr = sK + (c0 + nt * 8 + krow) * kLd + kcol;
#pragma unroll
      for (int k2 = 0; k2 < D / 32; ++k2) {
        unsigned bf[4];
        ldsm_x4(bf, kr + k2 * 32);
        mma16816<T>(s[nt], qa[2 * k2], bf[0], bf[1]);
        mma16816<T>(s[nt], qa[2 * k2 + 1], bf[2], bf[3]);
      }
    }
    float cmA = neg_inf(), cmB = neg_inf();
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      logits(s[nt], c0 + nt * 8 + 2 * t4, anyA, anyB);
      cmA = fmaxf(cmA, fmaxf(s[nt][0], s[nt][1]));
      cmB = fmaxf(cmB, fmaxf(s[nt][2], s[nt][3]));
    }
    cmA = fmaxf(cmA, __shfl_xor_sync(kFull, cmA, 1));
    cmA = fmaxf(cmA, __shfl_xor_sync(kFull, cmA, 2));
    cmB = fmaxf(cmB, __shfl_xor_sync(kFull, cmB, 1));
    cmB = fmaxf(cmB, __shfl_xor_sync(kFull, cmB, 2));
    const float nA = fmaxf(mA, cmA), nB = fmaxf(mB, cmB);
    if (!is_neg_inf(nA)) {  // else every logit so far is -inf: nothing to add
      float acc = sumA * exp2f((mA - nA) * kLog2e);
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
        acc += exp2f((s[nt][0] - nA) * kLog2e) + exp2f((s[nt][1] - nA) * kLog2e);
      sumA = acc;
      mA = nA;
    }
    if (!is_neg_inf(nB)) {
      float acc = sumB * exp2f((mB - nB) * kLog2e);
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
        acc += exp2f((s[nt][2] - nB) * kLog2e) + exp2f((s[nt][3] - nB) * kLog2e);
      sumB = acc;
      mB = nB;
    }
  }
  sumA += __shfl_xor_sync(kFull, sumA, 1);
  sumA += __shfl_xor_sync(kFull, sumA, 2);
  sumB += __shfl_xor_sync(kFull, sumB, 1);
  sumB += __shfl_xor_sync(kFull, sumB, 2);
  if constexpr (kColBias) {
    anyA = anyB = any_cta;
  } else {
    anyA |= __shfl_xor_sync(kFull, anyA, 1);
    anyA |= __shfl_xor_sync(kFull, anyA, 2);
    anyB |= __shfl_xor_sync(kFull, anyB, 1);
    anyB |= __shfl_xor_sync(kFull, anyB, 2);
  }
  // As the reference: max -inf -> 0; sum 0 -> 1; rows without an unmasked key -> 0.
  const float mxA = is_neg_inf(mA) ? 0.f : mA, mxB = is_neg_inf(mB) ? 0.f : mB;
  const float rA = anyA ? 1.f / (sumA == 0.f ? 1.f : sumA) : 0.f;
  const float rB = anyB ? 1.f / (sumB == 0.f ? 1.f : sumB) : 0.f;

  // Pass 2: O = P V, 16 keys at a time.
  float o[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  // ldmatrix.trans rows for V keys [j0, j0 + 16) x dims [16 dn, 16 dn + 16): matrices
  // (keys +0, dims +0), (keys +8, dims +0), (keys +0, dims +8), (keys +8, dims +8).
  const int vrow = ((lane >> 3) & 1) * 8 + (lane & 7), vcol = (lane >> 4) * 8;
  int dummyA = 0, dummyB = 0;
#pragma unroll 1
  for (int j0 = 0; j0 < Tp; j0 += 16) {
    float s[2][4];
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      s[u][0] = s[u][1] = s[u][2] = s[u][3] = 0.f;
      const T* kr = sK + (j0 + u * 8 + krow) * kLd + kcol;
#pragma unroll
      for (int k2 = 0; k2 < D / 32; ++k2) {
        unsigned bf[4];
        ldsm_x4(bf, kr + k2 * 32);
        mma16816<T>(s[u], qa[2 * k2], bf[0], bf[1]);
        mma16816<T>(s[u], qa[2 * k2 + 1], bf[2], bf[3]);
      }
      logits(s[u], j0 + u * 8 + 2 * t4, dummyA, dummyB);
      s[u][0] = exp2f((s[u][0] - mxA) * kLog2e) * rA;
      s[u][1] = exp2f((s[u][1] - mxA) * kLog2e) * rA;
      s[u][2] = exp2f((s[u][2] - mxB) * kLog2e) * rB;
      s[u][3] = exp2f((s[u][3] - mxB) * kLog2e) * rB;
    }
    const unsigned pa[4] = {pack2<T>(s[0][0], s[0][1]), pack2<T>(s[0][2], s[0][3]),
                            pack2<T>(s[1][0], s[1][1]), pack2<T>(s[1][2], s[1][3])};
    const T* vr = sV + (j0 + vrow) * kLd + vcol;
#pragma unroll
    for (int dn = 0; dn < D / 16; ++dn) {
      unsigned bf[4];
      ldsm_x4_trans(bf, vr + dn * 16);
      mma16816<T>(o[2 * dn], pa, bf[0], bf[1]);
      mma16816<T>(o[2 * dn + 1], pa, bf[2], bf[3]);
    }
  }
  T* yb = y + b * g.ys[0] + h * g.ys[1] + 2 * t4;
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
    if (okA) *reinterpret_cast<unsigned*>(yb + iA * g.ys[2] + n * 8) = pack2<T>(o[n][0], o[n][1]);
    if (okB) *reinterpret_cast<unsigned*>(yb + iB * g.ys[2] + n * 8) = pack2<T>(o[n][2], o[n][3]);
  }
}

// ------------------------------------------------------------------ float32 tiled kernel
// Float32, head size 32/64/128, at most 512 keys, no qk_matmul_output: a CTA computes 32 query
// rows of one (batch, head) on CUDA cores. Q tile and K/V chunks (64 keys) in shared memory
// (rows padded to D + 1 floats: conflict-free column reads); each thread computes a 4 x 4 block
// of scores per chunk, then a warp per row runs the softmax (shared with the wmma kernel), then
// each thread accumulates a 4 x D/16 block of the output.
constexpr int kTM = 32;  // query rows per CTA

size_t f32_smem_bytes(int64_t Tp, int D) {
  return (static_cast<size_t>(kTM + kFN) * static_cast<size_t>(D + 1) +
          static_cast<size_t>(kTM) * static_cast<size_t>(Tp + 1)) *
         sizeof(float);
}

template <int D>
__global__ void __launch_bounds__(kFThreads)
    attn_f32_kernel(AttnGeom g, const float* __restrict__ q, const float* __restrict__ k,
                    const float* __restrict__ v, float* __restrict__ y, int Tp) {
  constexpr int kLd = D + 1;
  extern __shared__ float attn_f32_smem[];
  float* sQ = attn_f32_smem;    // kTM x kLd
  float* sKV = sQ + kTM * kLd;  // kFN x kLd
  float* sS = sKV + kFN * kLd;  // kTM x lds
  const int lds = Tp + 1;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int rg = tid >> 4, cg = tid & 15;  // rows 4rg..4rg+3; columns cg + 16 * jj
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTM;
  const int64_t h = blockIdx.y, b = blockIdx.z;
  const int64_t hk = h / (g.Hq / g.Hkv);
  const float* qb = q + b * g.qs[0] + h * g.qs[1];
  const float* kb = k + b * g.ks[0] + hk * g.ks[1];
  const float* vb = v + b * g.vs[0] + hk * g.vs[1];
  const int64_t np_len = g.nonpad ? g.nonpad[b] : 0;
  const int nchunks = Tp / kFN;

  for (int idx = tid; idx < kTM * D; idx += kFThreads) {
    const int r = idx / D, d = idx % D;
    const int64_t row = i0 + r;
    sQ[r * kLd + d] = row < g.S ? qb[row * g.qs[2] + d] : 0.f;
  }
  for (int c = 0; c < nchunks; ++c) {
    __syncthreads();
    for (int idx = tid; idx < kFN * D; idx += kFThreads) {
      const int r = idx / D, d = idx % D;
      const int64_t key = static_cast<int64_t>(c) * kFN + r;
      sKV[r * kLd + d] = key < g.T ? kb[key * g.ks[2] + d] : 0.f;
    }
    __syncthreads();
    float acc[4][4];
#pragma unroll
    for (int ii = 0; ii < 4; ++ii)
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) acc[ii][jj] = 0.f;
#pragma unroll 8
    for (int d = 0; d < D; ++d) {
      float qv[4], kv[4];
#pragma unroll
      for (int ii = 0; ii < 4; ++ii) qv[ii] = sQ[(rg * 4 + ii) * kLd + d];
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) kv[jj] = sKV[(cg + 16 * jj) * kLd + d];
#pragma unroll
      for (int ii = 0; ii < 4; ++ii)
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) acc[ii][jj] = fmaf(qv[ii], kv[jj], acc[ii][jj]);
    }
#pragma unroll
    for (int ii = 0; ii < 4; ++ii)
#pragma unroll
      for (int jj = 0; jj < 4; ++jj)
        sS[(rg * 4 + ii) * lds + c * kFN + cg + 16 * jj] = acc[ii][jj];
  }
  __syncthreads();
  const int nt = Tp / 32;
  for (int r = 0; r < kTM / 4; ++r) {
    const int row = warp * (kTM / 4) + r;
    softmax_row_warp<float>(g, sS + row * lds, b, h, i0 + row, np_len, nt, lane);
  }
  float o[4][D / 16];
#pragma unroll
  for (int ii = 0; ii < 4; ++ii)
#pragma unroll
    for (int dd = 0; dd < D / 16; ++dd) o[ii][dd] = 0.f;
  for (int c = 0; c < nchunks; ++c) {
    __syncthreads();  // probabilities written; previous V chunk consumed
    for (int idx = tid; idx < kFN * D; idx += kFThreads) {
      const int r = idx / D, d = idx % D;
      const int64_t key = static_cast<int64_t>(c) * kFN + r;
      sKV[r * kLd + d] = key < g.T ? vb[key * g.vs[2] + d] : 0.f;
    }
    __syncthreads();
#pragma unroll 4
    for (int j = 0; j < kFN; ++j) {
      float pv[4];
#pragma unroll
      for (int ii = 0; ii < 4; ++ii) pv[ii] = sS[(rg * 4 + ii) * lds + c * kFN + j];
#pragma unroll
      for (int dd = 0; dd < D / 16; ++dd) {
        const float vv = sKV[j * kLd + cg + 16 * dd];
#pragma unroll
        for (int ii = 0; ii < 4; ++ii) o[ii][dd] = fmaf(pv[ii], vv, o[ii][dd]);
      }
    }
  }
  float* yb = y + b * g.ys[0] + h * g.ys[1];
#pragma unroll
  for (int ii = 0; ii < 4; ++ii) {
    const int64_t i = i0 + rg * 4 + ii;
    if (i < g.S) {
#pragma unroll
      for (int dd = 0; dd < D / 16; ++dd) yb[i * g.ys[2] + cg + 16 * dd] = o[ii][dd];
    }
  }
}

// ------------------------------------------------------------------ host side
bool attn_float_dt(DataType d) {
  return d == DataType::kFloat || d == DataType::kFloat16 || d == DataType::kBFloat16;
}
DataType in_dt(const Node& n, const TypeLookup& types, size_t i) {
  return i < n.inputs.size() && !n.inputs[i].empty() ? value_dtype(types, n.inputs[i])
                                                      : DataType::kUndefined;
}
bool want_out(const OpContext& ctx, std::span<Value> out, size_t i) {
  return i < out.size() && i < ctx.node.outputs.size() && !ctx.node.outputs[i].empty();
}
Status need_device(const OpContext& ctx, const Tensor& t, const char* what) {
  if (t.numel() > 0 && !t.on_device())
    return ctx.fail(std::string(what) + " is not in device memory");
  return Status::ok();
}
float round_like(DataType dt, double v) {
  if (dt == DataType::kFloat16) return static_cast<float>(Half(static_cast<float>(v)));
  if (dt == DataType::kBFloat16) return static_cast<float>(BFloat16(static_cast<float>(v)));
  return static_cast<float>(v);
}
bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

bool supports_attention(const Node& n, const TypeLookup& types) {
  const DataType q = in_dt(n, types, 0);
  if (q != DataType::kUndefined && !attn_float_dt(q)) return false;
  for (size_t i : {1, 2, 4, 5}) {
    const DataType d = in_dt(n, types, i);
    if (d != DataType::kUndefined && q != DataType::kUndefined && d != q) return false;
  }
  const DataType m = in_dt(n, types, 3);
  if (m != DataType::kUndefined && m != DataType::kBool && m != DataType::kFloat &&
      m != DataType::kFloat16 && m != DataType::kBFloat16 && m != DataType::kDouble)
    return false;
  const DataType np = in_dt(n, types, 6);
  if (np != DataType::kUndefined && np != DataType::kInt64) return false;
  const int64_t mode = n.attr_int("qk_matmul_output_mode", 0);
  return mode >= 0 && mode <= 3;
}

// Strides of a 4-D [B, H, S, D] or 3-D [B, S, H*D] operand viewed as (b, h, s).
void strides_of(const Tensor& t, int64_t H, int64_t D, int64_t st[3]) {
  if (t.rank() == 4) {
    st[0] = t.dim(1) * t.dim(2) * t.dim(3), st[1] = t.dim(2) * t.dim(3), st[2] = t.dim(3);
  } else {
    st[0] = t.dim(1) * t.dim(2), st[1] = D, st[2] = H * D;
  }
}

template <class T, int D>
Status launch_fast(Env& env, const AttnGeom& g, const T* qp, const T* kp, const T* vp, T* yp,
                   int64_t Tp) {
  const size_t smem = fast_smem_bytes(Tp, D, sizeof(T));
  const int lds = fast_lds(Tp, D);
  const bool vec = aligned16(qp) && aligned16(kp) && aligned16(vp);
  KILN_CUDA_CHECK(cudaFuncSetAttribute(attn_fast_kernel<T, D>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(smem)),
                  "attention: shared memory size");
  const dim3 grid(static_cast<unsigned>((g.S + kFM - 1) / kFM), static_cast<unsigned>(g.Hq),
                  static_cast<unsigned>(g.B));
  attn_fast_kernel<T, D><<<grid, kFThreads, smem, env.stream>>>(g, qp, kp, vp, yp,
                                                                 static_cast<int>(Tp), lds, vec);
  KILN_CUDA_LAUNCHED("attention fast kernel");
  return Status::ok();
}

int device_attr(cudaDeviceAttr a, int device, int fallback) {
  int v = 0;
  return cudaDeviceGetAttribute(&v, a, device) == cudaSuccess && v > 0 ? v : fallback;
}

template <class T, int D>
Status launch_mma(Env& env, const AttnGeom& g, const T* qp, const T* kp, const T* vp, T* yp,
                  int64_t Tp, size_t smem, int sms) {
  // 4 warps (64 query rows) per CTA share one staging of K/V; fewer when that leaves SMs idle.
  const int64_t heads = g.B * g.Hq;
  int warps = 1;
  for (int w : {4, 2}) {
    if ((g.S + 16 * w - 1) / (16 * w) * heads >= sms) {
      warps = w;
      break;
    }
  }
  // The bias as one row per CTA when it does not depend on the query row.
  const bool colbias = !g.causal && (g.mask_code == 0 || g.mstr[2] == 0);
  auto kernel = colbias ? attn_mma_kernel<T, D, true> : attn_mma_kernel<T, D, false>;
  if (smem > 48 * 1024) {
    KILN_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem)),
                    "attention: shared memory size");
  }
  const dim3 grid(static_cast<unsigned>((g.S + 16 * warps - 1) / (16 * warps)),
                  static_cast<unsigned>(g.Hq), static_cast<unsigned>(g.B));
  kernel<<<grid, 32 * warps, smem, env.stream>>>(g, qp, kp, vp, yp, static_cast<int>(Tp));
  KILN_CUDA_LAUNCHED("attention mma kernel");
  return Status::ok();
}

template <int D>
Status launch_f32(Env& env, const AttnGeom& g, const float* qp, const float* kp, const float* vp,
                  float* yp, int64_t Tp) {
  const size_t smem = f32_smem_bytes(Tp, D);
  if (smem > 48 * 1024) {
    KILN_CUDA_CHECK(cudaFuncSetAttribute(attn_f32_kernel<D>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem)),
                    "attention: shared memory size");
  }
  const dim3 grid(static_cast<unsigned>((g.S + kTM - 1) / kTM), static_cast<unsigned>(g.Hq),
                  static_cast<unsigned>(g.B));
  attn_f32_kernel<D><<<grid, kFThreads, smem, env.stream>>>(g, qp, kp, vp, yp,
                                                            static_cast<int>(Tp));
  KILN_CUDA_LAUNCHED("attention f32 kernel");
  return Status::ok();
}

template <class T>
Status launch_attention(OpContext& ctx, Env& env, AttnGeom g, const Tensor& q, const T* kp,
                        const T* vp, Tensor& y, T* qkp) {
  const int64_t rows = g.B * g.Hq * g.S;
  if (rows == 0 || g.Dv == 0) return Status::ok();
  const T* qp = q.data<T>();
  T* yp = y.data<T>();
  constexpr bool kHalfType = !std::is_same_v<T, float>;
  const int64_t Tp = ((g.T + kFN - 1) / kFN) * kFN;
  // KILN_CUDA_ATTENTION_GENERAL=1 forces the general kernel (to bisect a fast-path problem).
  static const bool force_general = [] {
    const char* e = std::getenv("KILN_CUDA_ATTENTION_GENERAL");
    return e != nullptr && e[0] == '1';
  }();
  // KILN_CUDA_ATTENTION_WMMA=1 skips the mma kernel for the older wmma one (A/B checks).
  static const bool force_wmma = [] {
    const char* e = std::getenv("KILN_CUDA_ATTENTION_WMMA");
    return e != nullptr && e[0] == '1';
  }();
  // cuDNN's fused SDPA engines first, where the op's features allow (no past, softcap, nonpad
  // lengths or qk output; float masks only: a bool mask may mask a whole row, which the
  // reference answers with zeros and the flash engines with NaN).
  if constexpr (kHalfType) {
    if (!force_general && !force_wmma && qkp == nullptr && g.Dh == g.Dv && !g.has_past &&
        g.softcap == 0.f && g.nonpad == nullptr && (g.mask_code == 0 || (g.mask_code >= 2 &&
        g.mask_code <= 4 && g.mlen > 0))) {
      fe::SdpaCall c;
      c.dt = std::is_same_v<T, __half> ? DataType::kFloat16 : DataType::kBFloat16;
      c.B = g.B, c.Hq = g.Hq, c.Hkv = g.Hkv, c.S = g.S, c.T = g.T, c.D = g.Dh;
      for (int d = 0; d < 3; ++d) c.qs[d] = g.qs[d], c.ks[d] = g.ks[d], c.vs[d] = g.vs[d], c.os[d] = g.ys[d];
      c.scale = g.scale;
      c.causal = g.causal != 0;
      c.q = qp, c.k = kp, c.v = vp, c.o = yp;
      if (g.mask_code != 0) {
        c.mask = g.mask;
        c.mask_dt = g.mask_code == 2 ? DataType::kFloat
                                     : (g.mask_code == 3 ? DataType::kFloat16 : DataType::kBFloat16);
        for (int d = 0; d < 4; ++d) c.mstr[d] = g.mstr[d];
        c.mask_len = g.mlen;
      }
      KILN_ASSIGN_OR_RETURN(const bool ran, fe::try_sdpa(env, c));
      if (ran) return Status::ok();
    }
  }
  if constexpr (kHalfType) {
    if (!force_general && !force_wmma && qkp == nullptr && g.Dh == g.Dv &&
        (g.Dh == 32 || g.Dh == 64 || g.Dh == 128) && g.T > 0 && g.T <= kFMaxT &&
        g.Hq <= 65535 && g.B <= 65535 && (g.S + 15) / 16 <= 0x7fffffff && aligned16(qp) &&
        aligned16(kp) && aligned16(vp) && aligned16(yp)) {
      const size_t smem = mma_smem_bytes(Tp, static_cast<int>(g.Dh), sizeof(T));
      const int major = device_attr(cudaDevAttrComputeCapabilityMajor, env.device, 0);
      const int optin =
          device_attr(cudaDevAttrMaxSharedMemoryPerBlockOptin, env.device, 48 * 1024);
      if (major >= 8 && smem <= static_cast<size_t>(optin)) {
        const int sms = device_attr(cudaDevAttrMultiProcessorCount, env.device, 132);
        switch (g.Dh) {
          case 32: return launch_mma<T, 32>(env, g, qp, kp, vp, yp, Tp, smem, sms);
          case 64: return launch_mma<T, 64>(env, g, qp, kp, vp, yp, Tp, smem, sms);
          default: return launch_mma<T, 128>(env, g, qp, kp, vp, yp, Tp, smem, sms);
        }
      }
    }
  }
  if (!force_general && kHalfType && qkp == nullptr && g.Dh == g.Dv && (g.Dh == 32 || g.Dh == 64 || g.Dh == 128) &&
      g.T > 0 && g.T <= kFMaxT && g.Hq <= 65535 && g.B <= 65535 &&
      (g.S + kFM - 1) / kFM <= 0x7fffffff) {
    if constexpr (kHalfType) {
      switch (g.Dh) {
        case 32: return launch_fast<T, 32>(env, g, qp, kp, vp, yp, Tp);
        case 64: return launch_fast<T, 64>(env, g, qp, kp, vp, yp, Tp);
        default: return launch_fast<T, 128>(env, g, qp, kp, vp, yp, Tp);
      }
    }
  }
  if constexpr (!kHalfType) {
    if (!force_general && qkp == nullptr && g.Dh == g.Dv && (g.Dh == 32 || g.Dh == 64 || g.Dh == 128) && g.T > 0 &&
        g.T <= kFMaxT && g.Hq <= 65535 && g.B <= 65535 && (g.S + kTM - 1) / kTM <= 0x7fffffff) {
      switch (g.Dh) {
        case 32: return launch_f32<32>(env, g, qp, kp, vp, yp, Tp);
        case 64: return launch_f32<64>(env, g, qp, kp, vp, yp, Tp);
        default: return launch_f32<128>(env, g, qp, kp, vp, yp, Tp);
      }
    }
  }
  // General path: scores in shared memory up to 40 KB per row, else in global scratch.
  const size_t sbytes = static_cast<size_t>(g.Dh + g.T) * sizeof(float);
  const bool smem_scores = sbytes <= 40 * 1024;
  if (static_cast<size_t>(g.Dh) * sizeof(float) > 40 * 1024)
    return ctx.fail("head size " + std::to_string(g.Dh) + " too large for the CUDA kernel");
  std::shared_ptr<Storage> scratch;
  float* work = nullptr;
  if (!smem_scores) {
    KILN_ASSIGN_OR_RETURN(scratch, env.scratch(static_cast<size_t>(rows) *
                                               static_cast<size_t>(g.T) * sizeof(float)));
    work = reinterpret_cast<float*>(scratch->data());
  }
  const size_t smem = smem_scores ? sbytes : static_cast<size_t>(g.Dh) * sizeof(float);
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(rows, 65535LL * 8));
  attn_row_kernel<T><<<grid, kRowThreads, smem, env.stream>>>(g, qp, kp, vp, yp, qkp, work,
                                                              smem_scores ? 1 : 0);
  KILN_CUDA_LAUNCHED("attention kernel");
  return Status::ok();
}

template <class T>
Status launch_concat(Env& env, const Tensor* past, const T* cur, const int64_t cst[3],
                     Tensor& out, int64_t B, int64_t H, int64_t P, int64_t L, int64_t D) {
  if (out.numel() == 0) return Status::ok();
  concat_kv_kernel<T><<<grid_for(out.numel()), 256, 0, env.stream>>>(
      past ? past->data<T>() : nullptr, cur, out.data<T>(), B, H, P, L, D, cst[0], cst[1],
      cst[2]);
  KILN_CUDA_LAUNCHED("attention present K/V kernel");
  return Status::ok();
}

template <class T>
Status run_attention_t(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  const Node& n = ctx.node;
  KILN_ASSIGN_OR_RETURN(const Tensor* q, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* k, req_tensor(ctx, in, 1));
  KILN_ASSIGN_OR_RETURN(const Tensor* v, req_tensor(ctx, in, 2));
  const Tensor* mask = opt_tensor(in, 3);
  const Tensor* past_k = opt_tensor(in, 4);
  const Tensor* past_v = opt_tensor(in, 5);
  const Tensor* nonpad = opt_tensor(in, 6);
  const DataType dt = q->dtype();
  if (k->dtype() != dt || v->dtype() != dt || (past_k && past_k->dtype() != dt) ||
      (past_v && past_v->dtype() != dt))
    return ctx.bad_input("Q, K, V and past K/V must have the same element type");
  if (q->rank() != k->rank() || q->rank() != v->rank())
    return ctx.bad_input("Q, K and V must have the same rank");
  if (q->rank() != 3 && q->rank() != 4)
    return ctx.bad_input("Q must be 3-D or 4-D, got " + q->describe());
  if ((past_k == nullptr) != (past_v == nullptr))
    return ctx.bad_input("past_key and past_value must be given together");
  if (nonpad && past_k) return ctx.bad_input("nonpad_kv_seqlen cannot be combined with past_key");
  AttnGeom g;
  int64_t L = 0;
  if (q->rank() == 4) {
    g.B = q->dim(0), g.Hq = q->dim(1), g.S = q->dim(2), g.Dh = q->dim(3);
    g.Hkv = k->dim(1), L = k->dim(2), g.Dv = v->dim(3);
    if (k->dim(0) != g.B || v->dim(0) != g.B || v->dim(1) != g.Hkv || v->dim(2) != L ||
        k->dim(3) != g.Dh)
      return ctx.bad_input("incompatible Q/K/V shapes " + q->describe() + ", " + k->describe() +
                           ", " + v->describe());
  } else {
    g.Hq = n.attr_int("q_num_heads", 0), g.Hkv = n.attr_int("kv_num_heads", 0);
    if (g.Hq <= 0 || g.Hkv <= 0 || q->dim(2) % g.Hq != 0 || k->dim(2) % g.Hkv != 0 ||
        v->dim(2) % g.Hkv != 0)
      return ctx.bad_input("3-D Q/K/V need q_num_heads / kv_num_heads dividing their hidden sizes");
    g.B = q->dim(0), g.S = q->dim(1), g.Dh = q->dim(2) / g.Hq;
    L = k->dim(1), g.Dv = v->dim(2) / g.Hkv;
    if (k->dim(0) != g.B || v->dim(0) != g.B || v->dim(1) != L || k->dim(2) / g.Hkv != g.Dh)
      return ctx.bad_input("incompatible Q/K/V shapes " + q->describe() + ", " + k->describe() +
                           ", " + v->describe());
  }
  if (g.Hkv <= 0 || g.Hq % g.Hkv != 0)
    return ctx.bad_input("q heads (" + std::to_string(g.Hq) + ") must be a multiple of kv heads (" +
                         std::to_string(g.Hkv) + ")");
  if (past_k) {
    if (past_k->rank() != 4 || past_v->rank() != 4 || past_k->dim(0) != g.B ||
        past_k->dim(1) != g.Hkv || past_k->dim(3) != g.Dh || past_v->dim(0) != g.B ||
        past_v->dim(1) != g.Hkv || past_v->dim(2) != past_k->dim(2) || past_v->dim(3) != g.Dv)
      return ctx.bad_input("past_key/past_value shapes " + past_k->describe() + ", " +
                           past_v->describe() + " do not match K/V");
    g.P = past_k->dim(2);
    g.has_past = 1;
  }
  g.T = g.P + L;
  strides_of(*q, g.Hq, g.Dh, g.qs);
  int64_t kst[3], vst[3];
  strides_of(*k, g.Hkv, g.Dh, kst);
  strides_of(*v, g.Hkv, g.Dv, vst);
  // Mask geometry (as the reference: rank 1..4, right-aligned, last dim <= T).
  if (mask) {
    if (mask->rank() < 1 || mask->rank() > 4)
      return ctx.bad_input("attn_mask must have rank 1..4, got " + mask->describe());
    switch (mask->dtype()) {
      case DataType::kBool: g.mask_code = 1; break;
      case DataType::kFloat: g.mask_code = 2; break;
      case DataType::kFloat16: g.mask_code = 3; break;
      case DataType::kBFloat16: g.mask_code = 4; break;
      case DataType::kDouble: g.mask_code = 5; break;
      default: return ctx.bad_input("attn_mask must be bool or float, got " + mask->describe());
    }
    int64_t ms[4] = {1, 1, 1, 1};
    const int off = 4 - static_cast<int>(mask->rank());
    for (int i = 0; i < static_cast<int>(mask->rank()); ++i) ms[off + i] = mask->dim(i);
    const int64_t full[4] = {g.B, g.Hq, g.S, g.T};
    int64_t st = 1;
    for (int d = 3; d >= 0; --d) {
      if (d == 3 ? ms[d] > g.T : (ms[d] != 1 && ms[d] != full[d]))
        return ctx.bad_input("attn_mask shape " + mask->describe() + " does not broadcast to [" +
                             std::to_string(g.B) + ", " + std::to_string(g.Hq) + ", " +
                             std::to_string(g.S) + ", " + std::to_string(g.T) + "]");
      g.mstr[d] = (ms[d] == 1 && d != 3) ? 0 : st;
      st *= ms[d];
    }
    g.mlen = ms[3];
    if (mask->numel() > 0) {
      KILN_RETURN_IF_ERROR(need_device(ctx, *mask, "attn_mask"));
      g.mask = mask->raw_data();
    } else {
      g.mlen = 0;  // an empty mask masks every key (j >= mlen): never dereferenced
    }
  }
  if (nonpad) {
    if (nonpad->rank() != 1 || nonpad->dim(0) != g.B || nonpad->dtype() != DataType::kInt64)
      return ctx.bad_input("nonpad_kv_seqlen must be int64 [batch], got " + nonpad->describe());
    if (g.B > 0) {
      KILN_RETURN_IF_ERROR(need_device(ctx, *nonpad, "nonpad_kv_seqlen"));
      g.nonpad = nonpad->data<int64_t>();
    }
  }
  g.causal = n.attr_int("is_causal", 0) != 0;
  g.softcap = n.attr_float("softcap", 0.0f);
  g.mode = static_cast<int>(n.attr_int("qk_matmul_output_mode", 0));
  if (g.mode < 0 || g.mode > 3)
    return ctx.bad_input("qk_matmul_output_mode must be 0..3, got " + std::to_string(g.mode));
  {
    const double sc = n.has_attr("scale") ? static_cast<double>(n.attr_float("scale", 1.0f))
                                          : 1.0 / std::sqrt(static_cast<double>(g.Dh));
    // The reference scales Q and K each by sqrt(scale), rounded to the element type.
    const double s = round_like(dt, std::sqrt(sc));
    g.scale = static_cast<float>(s * s);
  }
  for (const Tensor* t : {q, k, v}) KILN_RETURN_IF_ERROR(need_device(ctx, *t, "Q/K/V"));
  if (past_k) {
    KILN_RETURN_IF_ERROR(need_device(ctx, *past_k, "past_key"));
    KILN_RETURN_IF_ERROR(need_device(ctx, *past_v, "past_value"));
  }

  Env& env = env_of(ctx);
  const Shape ys = q->rank() == 3 ? Shape{g.B, g.S, g.Hq * g.Dv} : Shape{g.B, g.Hq, g.S, g.Dv};
  KILN_ASSIGN_OR_RETURN(Tensor y, env.alloc(dt, ys));
  if (q->rank() == 3) {
    g.ys[0] = g.S * g.Hq * g.Dv, g.ys[1] = g.Dv, g.ys[2] = g.Hq * g.Dv;
  } else {
    g.ys[0] = g.Hq * g.S * g.Dv, g.ys[1] = g.S * g.Dv, g.ys[2] = g.Dv;
  }
  // Present K/V ([B, Hkv, T, D]): built when asked for or when a past is given (the attention
  // then reads them); else the attention reads K and V in place.
  const bool want_pk = want_out(ctx, out, 1), want_pv = want_out(ctx, out, 2);
  const T* kp = k->data<T>();
  const T* vp = v->data<T>();
  for (int d = 0; d < 3; ++d) g.ks[d] = kst[d], g.vs[d] = vst[d];
  Tensor pk, pv;
  if (past_k || want_pk) {
    KILN_ASSIGN_OR_RETURN(pk, env.alloc(dt, Shape{g.B, g.Hkv, g.T, g.Dh}));
    KILN_RETURN_IF_ERROR(launch_concat<T>(env, past_k, kp, kst, pk, g.B, g.Hkv, g.P, L, g.Dh));
  }
  if (past_k || want_pv) {
    KILN_ASSIGN_OR_RETURN(pv, env.alloc(dt, Shape{g.B, g.Hkv, g.T, g.Dv}));
    KILN_RETURN_IF_ERROR(launch_concat<T>(env, past_v, vp, vst, pv, g.B, g.Hkv, g.P, L, g.Dv));
  }
  if (past_k) {
    kp = pk.data<T>();
    vp = pv.data<T>();
    g.ks[0] = g.Hkv * g.T * g.Dh, g.ks[1] = g.T * g.Dh, g.ks[2] = g.Dh;
    g.vs[0] = g.Hkv * g.T * g.Dv, g.vs[1] = g.T * g.Dv, g.vs[2] = g.Dv;
  }
  Tensor qk;
  T* qkp = nullptr;
  if (want_out(ctx, out, 3)) {
    KILN_ASSIGN_OR_RETURN(qk, env.alloc(dt, Shape{g.B, g.Hq, g.S, g.T}));
    if (qk.numel() > 0) qkp = qk.data<T>();
  }
  KILN_RETURN_IF_ERROR(launch_attention<T>(ctx, env, g, *q, kp, vp, y, qkp));
  out[0] = y;
  if (want_pk) out[1] = pk;
  if (want_pv) out[2] = pv;
  if (qkp || want_out(ctx, out, 3)) out[3] = qk;
  return Status::ok();
}

Status run_attention(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* q, req_tensor(ctx, in, 0));
  switch (q->dtype()) {
    case DataType::kFloat: return run_attention_t<float>(ctx, in, out);
    case DataType::kFloat16: return run_attention_t<__half>(ctx, in, out);
    case DataType::kBFloat16: return run_attention_t<__nv_bfloat16>(ctx, in, out);
    default:
      return ctx.fail(std::string("no CUDA Attention kernel for element type ") +
                      dtype_name(q->dtype()));
  }
}

}  // namespace

void register_attention(Registry& r) {
  r.add({"", "Attention", &run_attention, nullptr, &supports_attention, {}, {}});
}

}  // namespace kiln::cuda
