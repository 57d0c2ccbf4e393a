// Attention around the KV cache in the generation graphs (zq::rope, zq::gqa_attention), one launch each.
//
// zq_rope: rotary embedding (rotate-half form) of the query and key heads together.
//   q: [b, hq, s, d], k: [b, hkv, s, d] in `dt`, any strides (q_stride / k_stride: 4 element strides each,
//   host arrays; typically transposed views of a fused QKV GEMM output). cos, sin: [b, s, d] contiguous in `dt`.
//   q_out: [b, hq, s, d], k_out: [b, hkv, s, d] contiguous. For i < d/2 (x one head's row, h = d/2):
//     out[i] = x[i] * cos[i] - x[i + h] * sin[i],   out[i + h] = x[i + h] * cos[i + h] + x[i] * sin[i + h]
//   in fp32, rounded once to `dt`. d even, d <= 512.
//
// zq_rope_kv: zq_rope with the KV-cache write of a generation step in the same launch: q' goes to q_out as
//   above, the rotated key rows to k_cache[bi, h, slots[pos], :] and the value rows v [b, hkv, s, d] (any
//   strides), unchanged, to v_cache[bi, h, slots[pos], :] (k_cache / v_cache: [>= b, hkv, l, d] in `dt`, 4
//   element strides each; slots: s int64 on the device; a slot outside [0, l) is not written).
//
// zq_decode_attention: one query token per row against the cache, grouped KV heads read in place.
//   q: [b, hq, 1, d] in `dt`, element strides q_sb (batch) and q_sh (head), last stride 1;
//   k, v: [b, hkv, l, d] contiguous in `dt`; mask: [b, l] bytes (nonzero = attend); out: [b, hq, 1, d]
//   contiguous. Query head h reads KV head h / (hq / hkv). Softmax(scale * q.k_t) over the attended slots in
//   fp32, out = sum_t p_t v_t rounded once to `dt`; a row with no attended slot is written as zeros.
//   d % 8 == 0, d <= 256; q, k, v 16-byte aligned with q_sb, q_sh multiples of 8; the l fp32 scores of a row
//   must fit in shared memory next to ~4 KB of the kernel's own (l up to ~56K on sm_90, ~40K on sm_80).
//
// zq_decode_attention_split: the same contract and result for any cache length l (split-L, flash-decoding):
//   grid (split, KV head, batch row), each block scoring `chunk` slots for every query head of its KV head
//   (K and V read once per group), then, when there is more than one split, the splits' (max, sum, output)
//   states merged in split order: on sm_90+ with 2-8 splits inside the kernel (the splits of a (row, KV head)
//   are one thread-block cluster, merging through distributed shared memory), else by a combine kernel through
//   the workspace. splits <= 0: chosen from l and the SM count (about two blocks per SM, splits of >= 32
//   slots; past 512 slots with at most one (row, KV head) pair an SM, four blocks per SM in one wave and >= 16
//   splits of >= 64 slots; splits = -2: the two-blocks rule alone, for A/B); a split takes at most 1024 slots (fewer
//   for groups over 8 heads), so the count may be raised.
//   zq_decode_attention_splits gives the count a call with `splits` uses; the workspace (16-byte aligned) holds
//   zq_decode_attention_workspace_bytes(...) bytes (0 for one split or a merge in the cluster).
//   b, hkv <= 65535. cudaErrorInvalidValue when the workspace is too small.
//
// All return cudaErrorNotSupported, launching nothing, for inputs outside their contract (the caller falls
// back to the reference implementation).
#pragma once
#include "zq/common.h"

ZQ_API cudaError_t zq_rope(const void* q, const int64_t* q_stride, const void* k, const int64_t* k_stride,
                           const void* cos, const void* sin, zq_dtype dt, int64_t b, int64_t hq, int64_t hkv,
                           int64_t s, int64_t d, void* q_out, void* k_out, cudaStream_t stream);

ZQ_API cudaError_t zq_rope_kv(const void* q, const int64_t* q_stride, const void* k, const int64_t* k_stride,
                              const void* v, const int64_t* v_stride, const void* cos, const void* sin, zq_dtype dt,
                              int64_t b, int64_t hq, int64_t hkv, int64_t s, int64_t d, const int64_t* slots,
                              void* k_cache, const int64_t* k_cache_stride, void* v_cache,
                              const int64_t* v_cache_stride, int64_t l, void* q_out, cudaStream_t stream);

ZQ_API cudaError_t zq_decode_attention(const void* q, int64_t q_sb, int64_t q_sh, const void* k, const void* v,
                                       const uint8_t* mask, zq_dtype dt, int64_t b, int64_t hq, int64_t hkv,
                                       int64_t l, int64_t d, float scale, void* out, cudaStream_t stream);

// Where split-L merges 2-8 splits: -1 (default) in the cluster on sm_90+, 0 always the combine kernel (A/B,
// tests); process-wide; read when the workspace is sized and at launch (set it before both).
ZQ_API void zq_set_attention_merge(int mode);
ZQ_API int64_t zq_decode_attention_splits(int64_t b, int64_t hq, int64_t hkv, int64_t l, int64_t splits);
ZQ_API size_t zq_decode_attention_workspace_bytes(int64_t b, int64_t hq, int64_t hkv, int64_t l, int64_t d,
                                                  int64_t splits);
ZQ_API cudaError_t zq_decode_attention_split(const void* q, int64_t q_sb, int64_t q_sh, const void* k, const void* v,
                                             const uint8_t* mask, zq_dtype dt, int64_t b, int64_t hq, int64_t hkv,
                                             int64_t l, int64_t d, float scale, int64_t splits, void* workspace,
                                             size_t workspace_bytes, void* out, cudaStream_t stream);
