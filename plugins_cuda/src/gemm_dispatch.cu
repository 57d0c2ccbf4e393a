// The GEMM dispatcher (gemm.h, second half): runs the kernel a plan chose, for the torch binding and the TensorRT
// plugin alike, and parses the plans the TensorRT plugin gets as text. Host code only; the choice itself is made
// once, in zqcompile/plugins/gemm_kernels.py, and recorded in the compile plan.
#include <climits>
#include <cstdlib>
#include <cstring>

#include "zq/gemm.h"

namespace {

const char* const kNames[ZQ_GEMM_NUM_KERNELS] = {"simt", "mma", "sm90", "skinny", "sm90_fp8", "wgmma"};

// Compute capability of the current device, read once per device.
bool current_cc(int* major, int* minor) {
  static int cache[64][2];  // {0, 0}: not read yet
  int d = 0;
  if (cudaGetDevice(&d) != cudaSuccess || d < 0 || d >= 64) return false;
  if (cache[d][0] == 0) {
    int ma = 0, mi = 0;
    if (cudaDeviceGetAttribute(&ma, cudaDevAttrComputeCapabilityMajor, d) != cudaSuccess ||
        cudaDeviceGetAttribute(&mi, cudaDevAttrComputeCapabilityMinor, d) != cudaSuccess)
      return false;
    cache[d][0] = ma, cache[d][1] = mi;
  }
  *major = cache[d][0], *minor = cache[d][1];
  return true;
}

// The kernel id named at *s (followed by ',', '/' or the end), advancing *s past it; -1 when none is.
int parse_kernel(const char** s) {
  for (int i = 0; i < ZQ_GEMM_NUM_KERNELS; ++i) {
    const size_t len = std::strlen(kNames[i]);
    const char after = (*s)[len];
    if (std::strncmp(*s, kNames[i], len) == 0 && (after == '\0' || after == ',' || after == '/')) {
      *s += len;
      return i;
    }
  }
  return -1;
}

}  // namespace

ZQ_API const char* zq_gemm_kernel_name(int kernel) {
  return kernel >= 0 && kernel < ZQ_GEMM_NUM_KERNELS ? kNames[kernel] : nullptr;
}

ZQ_API int zq_gemm_kernel_available(int kernel) {
  int major = 0, minor = 0;
  switch (kernel) {
    case ZQ_GEMM_SIMT: return 1;
    case ZQ_GEMM_MMA:
    case ZQ_GEMM_SKINNY: return current_cc(&major, &minor) && major >= 8;
    case ZQ_GEMM_WGMMA: return current_cc(&major, &minor) && major == 9 && minor == 0;
    case ZQ_GEMM_SM90:
    case ZQ_GEMM_SM90_FP8: return zq_has_sm90_gemm() && current_cc(&major, &minor) && major == 9 && minor == 0;
    default: return 0;
  }
}

ZQ_API size_t zq_gemm_workspace_bytes(int kernel, int64_t n, int64_t k, int w_bits) {
  return kernel == ZQ_GEMM_SM90 && w_bits == 4 && n > 0 && k > 0 ? static_cast<size_t>(n * k) : 0;
}

ZQ_API cudaError_t zq_gemm_run(int kernel, const zq_gemm_args* a, void* workspace, size_t workspace_bytes,
                               cudaStream_t stream) {
  if (a == nullptr || kernel < 0 || kernel >= ZQ_GEMM_NUM_KERNELS) return cudaErrorInvalidValue;
  // FP8 operands are the FP8 kernel's and the decode kernel's alone (the other integer kernels would read the codes
  // as int8), and the FP8 kernel takes no other.
  const bool fp8 = a->w_fp8 || a->x_dt == ZQ_FP8_E4M3;
  if (fp8 ? kernel != ZQ_GEMM_SM90_FP8 && kernel != ZQ_GEMM_SKINNY : kernel == ZQ_GEMM_SM90_FP8)
    return cudaErrorNotSupported;
  switch (kernel) {
    case ZQ_GEMM_SIMT: return zq_gemm_simt(a, stream);
    case ZQ_GEMM_MMA: return zq_gemm_mma(a, stream);
    case ZQ_GEMM_SKINNY: return zq_gemm_skinny(a, stream);
    case ZQ_GEMM_WGMMA: return zq_gemm_wgmma(a, stream);
    default: break;
  }
  // sm90, sm90_fp8: the sm_90a code runs on compute capability 9.0 only, so say no (and let the fallback run)
  // elsewhere.
  if (!zq_gemm_kernel_available(kernel)) return cudaErrorNotSupported;
  if (kernel == ZQ_GEMM_SM90_FP8) return zq_gemm_sm90_fp8(a, stream);
  if (a->w_bits != 4) return zq_gemm_sm90(a, stream);
  // INT4 weights: unpacked to int8 into the workspace first (the Hopper kernel reads int8 weights). A problem
  // the kernel then declines was outside its contract, which the plan does not choose it for.
  if (a->m == 0 || a->n == 0) return cudaSuccess;
  if (workspace == nullptr || workspace_bytes < zq_gemm_workspace_bytes(kernel, a->n, a->k, 4))
    return cudaErrorInvalidValue;
  const cudaError_t e = zq_unpack_int4(static_cast<const uint8_t*>(a->wq), a->n, a->k,
                                       static_cast<int8_t*>(workspace), stream);
  if (e != cudaSuccess) return e;
  zq_gemm_args t = *a;
  t.wq = workspace;
  t.w_bits = 8;
  return zq_gemm_sm90(&t, stream);
}

ZQ_API int zq_gemm_plan_parse(const char* text, zq_gemm_plan* plan) {
  if (text == nullptr || plan == nullptr) return -1;
  zq_gemm_plan p;
  std::memset(&p, 0, sizeof p);
  const char* s = text;
  int64_t prev = -1;
  while (true) {
    if (p.count == ZQ_GEMM_PLAN_MAX) return -1;
    int64_t max_m = INT64_MAX;
    if (std::strncmp(s, "inf:", 4) == 0) {
      s += 4;
    } else {
      char* end = nullptr;
      const long long v = std::strtoll(s, &end, 10);
      if (end == s || *end != ':' || v <= prev || v < 0 || v == LLONG_MAX) return -1;
      max_m = v;
      s = end + 1;
    }
    const int kernel = parse_kernel(&s);
    if (kernel < 0) return -1;
    int fallback = -1;
    if (*s == '/') {
      ++s;
      fallback = parse_kernel(&s);
      if (fallback < 0) return -1;
    }
    p.max_m[p.count] = max_m, p.kernel[p.count] = kernel, p.fallback[p.count] = fallback;
    ++p.count;
    if (max_m == INT64_MAX) break;
    if (*s != ',') return -1;
    ++s;
    prev = max_m;
  }
  if (*s != '\0') return -1;
  *plan = p;
  return 0;
}

ZQ_API int zq_gemm_plan_find(const zq_gemm_plan* plan, int64_t m) {
  for (int i = 0; plan != nullptr && i < plan->count; ++i)
    if (m <= plan->max_m[i]) return i;
  return -1;
}
