// Hopper warpgroup MMA pieces shared by the hand-written wgmma kernels (gemm_skinny_wgmma.cu, gemm_wgmma.cu), sm_90a
// only (ZQ_WGMMA is defined where they compile): the fences and waits of the asynchronous MMA, the async-proxy
// fence after generic shared-memory writes, and the shared-memory matrix descriptor of the no-swizzle K-major
// layout both kernels stage operands in.
//
// That layout (PTX ISA, "Shared memory matrix layout", no swizzling, K-major): a k32 tile of R rows x 32 bytes is
// R / 8 x 2 core matrices of 8 rows x 16 bytes (128 contiguous bytes, row r % 8 at 16 (r % 8)); the two 16-byte
// k halves of a row group sit 128 B apart (the leading-dimension offset) and row groups 256 B apart (the stride
// offset). Byte k of row r: (r / 8) * 256 + ((k / 16) * 128) + (r % 8) * 16 + k % 16.
#pragma once
#include <stdint.h>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define ZQ_WGMMA 1
#endif

namespace zq::wgmma {

// The descriptor of a k32 tile at shared address saddr: no swizzle, leading (k-half) offset 128 B, stride
// (row-group) offset 256 B, both in 16-byte units.
__device__ __forceinline__ uint64_t desc_k32(uint32_t saddr) {
  return (uint64_t)((saddr >> 4) & 0x3FFF) | ((uint64_t)(128 >> 4) << 16) | ((uint64_t)(256 >> 4) << 32);
}

// Byte offset of 16-byte chunk c (k 16c .. 16c + 15) of row r in a 128-byte-swizzled tile.
__host__ __device__ constexpr int sw128_offset(int r, int c) { return r * 128 + ((c ^ (r & 7)) << 4); }

// The descriptor of a 128-byte-swizzled K-major operand whose k32 step starts at shared address saddr.
__device__ __forceinline__ uint64_t desc_sw128(uint32_t saddr) {
  return (uint64_t)((saddr >> 4) & 0x3FFF) | ((uint64_t)1 << 16) | ((uint64_t)(1024 >> 4) << 32) | ((uint64_t)1 << 62);
}

#ifdef ZQ_WGMMA
__device__ __forceinline__ void fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Generic-proxy shared-memory writes (st.shared, cp.async) made visible to the MMAs' async-proxy reads.
__device__ __forceinline__ void proxy_fence() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Keeps the compiler from moving reads or writes of these registers across a wgmma wait / fence.
template <int N>
__device__ __forceinline__ void reg_fence(uint32_t (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}
#endif

}  // namespace zq::wgmma
