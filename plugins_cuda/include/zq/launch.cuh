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
// the ordering stays transitive). tests/plugins/test_cuda_build.py checks the sources for it.
#pragma once
#include <cuda_runtime.h>

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

// Host: whether launches on the current device carry the PDL attribute (zq_set_pdl: -1 = on where the device
// is sm_90+, 0 = never, 1 = on sm_90+ too; the attribute needs compute capability 9.0).
bool pdl_enabled();

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
