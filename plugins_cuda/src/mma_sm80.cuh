// The sm_80+ warp-level instructions of the INT8 tensor-core GEMM (gemm_mma.cu) as inline PTX: cp.async
// (global -> shared, 16 bytes, zero-fill), ldmatrix, mma.sync m16n8k32 s8 x s8 -> s32 (and E4M3 x E4M3 -> f32,
// sm_89+, for the decode kernel's FP8 weights), and the INT4 -> int8 fragment unpack. Fragment layouts are the
// PTX ISA's for mma.m16n8k32 with .s8 operands (the same as CUTLASS's SM80_16x8x32_S32S8S8S32_TN traits); with
// g = lane / 4 and t = lane % 4:
//   A (16x32, row-major, 4 regs of 4 int8): a0 = A[g][4t..4t+3], a1 = A[g+8][4t..], a2 = A[g][16+4t..],
//     a3 = A[g+8][16+4t..]
//   B (32x8, "col": each column n holds 32 consecutive k, 2 regs): b0 = B[4t..4t+3][g], b1 = B[16+4t..][g]
//   C (16x8 s32, 4 regs): c0 = C[g][2t], c1 = C[g][2t+1], c2 = C[g+8][2t], c3 = C[g+8][2t+1]
// Both operands sit in shared memory as rows of consecutive k (x rows for A, weight rows for B), so one
// ldmatrix.x4 (four 8x8 matrices of b16 = 8 rows x 16 bytes; lane l receives bytes 4(l%4).. of row l/4) returns
// exactly these registers.
#pragma once
#include <stdint.h>

namespace zq::mma {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, bypassing L1; src_bytes 0 writes zeros (and reads nothing).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Wait until at most N of this thread's committed groups are still in flight.
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&d)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
               : "r"(addr));
}

// c += A (16x32 s8) * B (32x8 s8), s32 accumulation (wraps on overflow; see the K bound in gemm.h).
__device__ __forceinline__ void mma_s8(int (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// c += A (16x32 FP8 E4M3) * B (32x8 FP8 E4M3), fp32 accumulation: the same A / B fragment layouts as the s8 MMA
// above (PTX ISA, mma.m16n8k32 with 8-bit types) and C in its four registers; sm_89 and later (elsewhere a trap:
// the entry points check the device first).
__device__ __forceinline__ void mma_e4m3(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();
#endif
}

// The k32 MMA of a fragment's accumulator type: int (s8 x s8) or float (E4M3 x E4M3).
__device__ __forceinline__ void mma_k32(int (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) { mma_s8(c, a, b); }
__device__ __forceinline__ void mma_k32(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  mma_e4m3(c, a, b);
}

// Eight packed INT4 weights -> two B registers of four int8 each, every value multiplied by 16: nibble q becomes
// the byte q << 4, which read as int8 is exactly 16 * (q as signed 4-bit). That takes 5 instructions per 8 weights
// instead of a per-nibble sign extension; the 16 is divided out of the int32 accumulator through the weight
// scale (exact: a power of two). `w` is two 16-bit pieces of a packed weight row, four consecutive k each (even
// k in the low nibble of each byte, as quant_math.pack_int4 packs them): the low piece becomes b[0], the high b[1].
__device__ __forceinline__ void unpack_int4x16(uint32_t w, uint32_t (&b)[2]) {
  const uint32_t odd = w & 0xF0F0F0F0u;           // bytes: k1, k3, k5, k7 (each << 4)
  const uint32_t even = (w << 4) & 0xF0F0F0F0u;   // bytes: k0, k2, k4, k6 (each << 4)
  b[0] = __byte_perm(even, odd, 0x5140);          // low piece: k0 k1 k2 k3
  b[1] = __byte_perm(even, odd, 0x7362);          // high piece: k4 k5 k6 k7
}

}  // namespace zq::mma
