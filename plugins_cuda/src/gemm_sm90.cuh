// The Hopper INT8 GEMM as a CUTLASS 3.x kernel (TMA loads, wgmma, warp-specialized persistent schedule) whose
// epilogue is an epilogue visitor tree (EVT) computing ZeroQuant's dequantization in registers:
//   D = act((acc * x_scale[m]) * w_scale[n] + bias[n]) (+ C = residual)
// The activation is a runtime argument of one visitor node, so one kernel serves every zq_act; the residual
// is a template flag because it changes what the epilogue loads.
#pragma once
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"
#include "zq/device_math.cuh"
#include "zq/gemm.h"

namespace zq::sm90 {

using namespace cute;

struct ActArgs { int act = ZQ_ACT_NONE; };

// Sm90Compute passes a functor's `Arguments` back to it at run time.
template <class T>
struct RuntimeAct {
  using Arguments = ActArgs;
  CUTLASS_HOST_DEVICE T operator()(T const& x, Arguments const& a) const { return apply_act(x, a.act); }
};
template <class T, int N>
struct RuntimeAct<cutlass::Array<T, N>> {
  using Arguments = ActArgs;
  CUTLASS_HOST_DEVICE cutlass::Array<T, N> operator()(cutlass::Array<T, N> const& x, Arguments const& a) const {
    switch (a.act) {  // one branch per fragment, not per element
      case ZQ_ACT_GELU: return map<ZQ_ACT_GELU>(x);
      case ZQ_ACT_GELU_TANH: return map<ZQ_ACT_GELU_TANH>(x);
      case ZQ_ACT_RELU: return map<ZQ_ACT_RELU>(x);
      case ZQ_ACT_SILU: return map<ZQ_ACT_SILU>(x);
      default: return x;
    }
  }
  template <int kAct>
  CUTLASS_HOST_DEVICE static cutlass::Array<T, N> map(cutlass::Array<T, N> const& x) {
    cutlass::Array<T, N> y;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) y[i] = apply_act(x[i], kAct);
    return y;
  }
};

template <class ElementOut, bool kResidual, class TileShape>
struct DequantEpilogue {
  static constexpr auto RS = cutlass::FloatRoundStyle::round_to_nearest;
  template <class... T> using EVT = cutlass::epilogue::fusion::Sm90EVT<T...>;
  template <template <class> class Fn, class Out>
  using Compute = cutlass::epilogue::fusion::Sm90Compute<Fn, Out, float, RS>;
  using XScale = cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, float, float, Stride<_1, _0, int64_t>>;
  using WScale = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, float, float, Stride<_0, _1, int64_t>>;
  using Bias = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, ElementOut, float, Stride<_0, _1, int64_t>>;
  using AccX = EVT<Compute<cutlass::multiplies, float>, cutlass::epilogue::fusion::Sm90AccFetch, XScale>;
  using Affine = EVT<Compute<cutlass::homogeneous_multiply_add, float>, AccX, WScale, Bias>;
  using Act = EVT<Compute<RuntimeAct, std::conditional_t<kResidual, float, ElementOut>>, Affine>;
  using Tree = std::conditional_t<
      kResidual,
      EVT<Compute<cutlass::plus, ElementOut>, Act, cutlass::epilogue::fusion::Sm90SrcFetch<ElementOut>>, Act>;

  static typename Tree::Arguments args(const zq_gemm_args& a) {
    typename AccX::Arguments accx{{}, {a.x_scale, 0.f, {}}, {}};
    typename Affine::Arguments affine{accx, {a.w_scale, 0.f, {}},
                                      {static_cast<const ElementOut*>(a.bias), ElementOut(0), {}}, {}};
    typename Act::Arguments act{affine, {a.act}};
    if constexpr (kResidual) return {act, {}, {}};
    else return act;
  }
};

template <class ElementOut, bool kResidual, class TileShape, class ClusterShape, class KernelSchedule,
          class EpilogueSchedule>
struct Gemm {
  using Epi = DequantEpilogue<ElementOut, kResidual, TileShape>;
  using ElementC = std::conditional_t<kResidual, ElementOut, void>;
  static constexpr int kAlignOut = 128 / cutlass::sizeof_bits<ElementOut>::value;
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, int32_t, float, ElementC, cutlass::layout::RowMajor,
      kAlignOut, ElementOut, cutlass::layout::RowMajor, kAlignOut, EpilogueSchedule,
      typename Epi::Tree>::CollectiveOp;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, int8_t, cutlass::layout::RowMajor, 16, int8_t,
      cutlass::layout::ColumnMajor, 16, int32_t, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue>;
  using Adapter = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static cudaError_t run(const zq_gemm_args& a, int sm_count, int device, cudaStream_t stream) {
    const int M = (int)a.m, N = (int)a.n, K = (int)a.k;
    auto sA = cutlass::make_cute_packed_stride(typename Kernel::StrideA{}, make_shape(M, K, 1));
    auto sB = cutlass::make_cute_packed_stride(typename Kernel::StrideB{}, make_shape(N, K, 1));
    auto sC = cutlass::make_cute_packed_stride(typename Kernel::StrideC{}, make_shape(M, N, 1));
    auto sD = cutlass::make_cute_packed_stride(typename Kernel::StrideD{}, make_shape(M, N, 1));
    typename Adapter::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {M, N, K, 1},
        {static_cast<const int8_t*>(a.x), sA, static_cast<const int8_t*>(a.wq), sB},
        {Epi::args(a), static_cast<const ElementOut*>(kResidual ? a.residual : nullptr), sC,
         static_cast<ElementOut*>(a.out), sD}};
    args.hw_info.device_id = device;
    args.hw_info.sm_count = sm_count;
    Adapter gemm;
    if (gemm.can_implement(args) != cutlass::Status::kSuccess) return cudaErrorNotSupported;
    if (Adapter::get_workspace_size(args) != 0) return cudaErrorNotSupported;  // persistent scheduler needs none
    if (gemm.initialize(args, nullptr, stream) != cutlass::Status::kSuccess) return cudaErrorInvalidValue;
    if (gemm.run(stream) != cutlass::Status::kSuccess) return cudaErrorLaunchFailure;
    return cudaGetLastError();
  }
};

// The tile configurations, in one table (index = zq_gemm_sm90_config).
using PingPong = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using Coop = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using EpiPP = cutlass::epilogue::TmaWarpSpecialized;
using EpiCoop = cutlass::epilogue::TmaWarpSpecializedCooperative;

#define ZQ_SM90_CONFIGS(X)                                                   \
  X(0, Shape<_64 COMMA _128 COMMA _128>, Shape<_1 COMMA _1 COMMA _1>, PingPong, EpiPP)   \
  X(1, Shape<_128 COMMA _128 COMMA _128>, Shape<_2 COMMA _1 COMMA _1>, PingPong, EpiPP) \
  X(2, Shape<_256 COMMA _128 COMMA _128>, Shape<_2 COMMA _1 COMMA _1>, Coop, EpiCoop)
#define COMMA ,
constexpr int kNumConfigs = 3;

#define ZQ_SM90_CASE(id, Tile, Cluster, KSched, ESched) \
  case id: return Gemm<ElementOut, kResidual, Tile, Cluster, KSched, ESched>::run(a, sm_count, device, stream);

template <class ElementOut, bool kResidual>
cudaError_t run_config_impl(int cfg, const zq_gemm_args& a, int sm_count, int device, cudaStream_t stream) {
  switch (cfg) {
    ZQ_SM90_CONFIGS(ZQ_SM90_CASE)
    default: return cudaErrorInvalidValue;
  }
}

// Defined in gemm_sm90_<type>_r<residual>.cu, one translation unit each.
template <class ElementOut, bool kResidual>
cudaError_t run_config(int cfg, const zq_gemm_args& a, int sm_count, int device, cudaStream_t stream);

}  // namespace zq::sm90
