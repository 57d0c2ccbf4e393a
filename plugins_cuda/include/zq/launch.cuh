// Kernel launches of the library, with programmatic dependent launch (PDL) on sm_90+.
//
// A kernel launched with cudaLaunchAttributeProgrammaticStreamSerialization may start before the kernel ahead of
// it on the stream has finished: its blocks are scheduled once every block of that kernel has issued
// griddepcontrol.launch_dependents (or exited), and `griddepcontrol.wait` holds it until that kernel has finished
// and its memory is visible. A decode step is hundreds of short kernels in a CUDA graph, and the launch of each
// (about 1-1.5 us on the H200 between dependent kernels) then overlaps the one before it.
//
// The contract, for every kernel of the library: `zq::pdl_begin()` is its first statement, on every path (before
// any early return), so no kernel reads or writes global memory before the kernels ahead of it have finished, and
// no kernel finishes before them either (a later kernel that waits on this one therefore also waits on those:
// the ordering stays transitive). tests/plugins/test_cuda_build.py checks the sources for it. The one thing a
// kernel may do before the wait is ask L2 to prefetch bytes it will read (pdl_begin(L2Prefetch)): a prefetch
// moves no data into the kernel, and L2 is the device's point of coherence, so a line prefetched before the
// kernel ahead writes it is updated by that write; nothing read can be stale.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#include <utility>

namespace zq {

// Device: wait for the kernels ahead of this one on the stream, then let the next one be scheduled. Without
// the launch attribute (or below sm_90) the wait returns at once.
__device__ __forceinline__ void pdl_begin() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Bytes of global memory (16-byte aligned, a multiple of 16 long) a kernel will read; none when bytes == 0.
struct L2Prefetch {
  const void* p;
  uint32_t bytes;
};

// Device: the block's threads ask L2 for `pf` in pieces of 16 KB (cp.async.bulk.prefetch, no registers or
// shared memory held), then pdl_begin(). With PDL the prefetch overlaps the kernel ahead (a decode GEMM's weight
// streams in while the row kernel before it runs). Measured no faster for the decode GEMMs (launch.cu), so their
// budget is 0 unless set.
__device__ __forceinline__ void pdl_begin(L2Prefetch pf) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr uint32_t kPiece = 16384;
  const uint32_t threads = blockDim.x * blockDim.y * blockDim.z;
  const uint32_t t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  for (uint64_t off = (uint64_t)t * kPiece; off < pf.bytes; off += (uint64_t)threads * kPiece) {
    const uint32_t size = pf.bytes - off < kPiece ? (uint32_t)(pf.bytes - off) : kPiece;
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(static_cast<const char*>(pf.p) + off), "r"(size)
                 : "memory");
  }
#endif
  pdl_begin();
}

// Host: whether launches on the current device carry the PDL attribute (zq_set_pdl: -1 = on where the device
// is sm_90+, 0 = never, 1 = on sm_90+ too; the attribute needs compute capability 9.0).
bool pdl_enabled();

// Host: whether the current device is sm_90+ and runs the library's sm_90 code (not an older architecture's
// build of it): the kernels' thread-block-cluster paths are compiled for sm_90 only, so their hosts ask this,
// not the device's compute capability alone.
bool sm90_code();

// Host: how many bytes from the start of a weight the decode GEMMs prefetch into L2 before their wait
// (zq_set_gemm_prefetch: -1 = the library's choice, 0 = none, n = the blocks whose rows end within n bytes).
int64_t gemm_prefetch_bytes();

// Launch `kernel` with the given geometry in thread-block clusters of shape `cluster` (1 x 1 x 1: none).
// Returns the launch error (cudaSuccess when the launch was queued).
template <class... KArgs, class... Args>
cudaError_t launch_cluster(void (*kernel)(KArgs...), dim3 grid, dim3 block, dim3 cluster, size_t smem,
                           cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute at[2];
  unsigned n = 0;
  if (cluster.x * cluster.y * cluster.z > 1) {
    at[n].id = cudaLaunchAttributeClusterDimension;
    at[n].val.clusterDim.x = cluster.x, at[n].val.clusterDim.y = cluster.y, at[n].val.clusterDim.z = cluster.z;
    ++n;
  }
  if (pdl_enabled()) {
    at[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    at[n].val.programmaticStreamSerializationAllowed = 1;
    ++n;
  }
  cfg.attrs = at;
  cfg.numAttrs = n;
  const cudaError_t e = cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
  return e != cudaSuccess ? e : cudaGetLastError();
}

// The common case: no clusters.
template <class... KArgs, class... Args>
cudaError_t launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   Args&&... args) {
  return launch_cluster(kernel, grid, block, dim3(1, 1, 1), smem, stream, std::forward<Args>(args)...);
}

}  // namespace zq
