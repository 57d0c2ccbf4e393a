// The Hopper GEMMs as CUTLASS 3.x kernels (TMA loads, wgmma, warp-specialized persistent schedules), one template
// for INT8 x INT8 (int32 accumulate) and FP8 E4M3 x FP8 E4M3 (fp32 accumulate), whose epilogue is an epilogue
// visitor tree (EVT) computing ZeroQuant's dequantization in registers:
//   D = act(acc * x_scale[m] * w_scale[n] + bias[n]) (+ C = residual)
// The activation is a runtime argument of one visitor node, so one kernel serves every zq_act; the residual
// is a template flag because it changes what the epilogue loads.
#pragma once
#include <tuple>
#include <utility>

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

// Whether CUTLASS's kernels hold griddepcontrol.wait (compiled with CUTLASS_ENABLE_GDC_FOR_SM90 for sm_90a, as
// CMake builds them): only then may they be launched with PDL.
#ifdef CUTLASS_ENABLE_GDC_FOR_SM90
constexpr bool kGdc = true;
#else
constexpr bool kGdc = false;
#endif

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

// The epilogue tree. kWScaleFirst: the order of the two scale products, which changes the fp32 rounding (the INT8
// kernel keeps (acc * x_scale) * w_scale, as measured; FP8 takes quant_math.fp8_gemm_dequant's (acc * w_scale) *
// x_scale).
template <class ElementOut, bool kResidual, class TileShape, bool kWScaleFirst>
struct DequantEpilogue {
  static constexpr auto RS = cutlass::FloatRoundStyle::round_to_nearest;
  template <class... T> using EVT = cutlass::epilogue::fusion::Sm90EVT<T...>;
  template <template <class> class Fn, class Out>
  using Compute = cutlass::epilogue::fusion::Sm90Compute<Fn, Out, float, RS>;
  using XScale = cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, float, float, Stride<_1, _0, int64_t>>;
  using WScale = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, float, float, Stride<_0, _1, int64_t>>;
  using Bias = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, ElementOut, float, Stride<_0, _1, int64_t>>;
  using First = std::conditional_t<kWScaleFirst, WScale, XScale>;
  using Second = std::conditional_t<kWScaleFirst, XScale, WScale>;
  using AccScaled = EVT<Compute<cutlass::multiplies, float>, cutlass::epilogue::fusion::Sm90AccFetch, First>;
  using Affine = EVT<Compute<cutlass::homogeneous_multiply_add, float>, AccScaled, Second, Bias>;
  using Act = EVT<Compute<RuntimeAct, std::conditional_t<kResidual, float, ElementOut>>, Affine>;
  using Tree = std::conditional_t<
      kResidual,
      EVT<Compute<cutlass::plus, ElementOut>, Act, cutlass::epilogue::fusion::Sm90SrcFetch<ElementOut>>, Act>;

  template <class Node>
  static typename Node::Arguments pick(const typename XScale::Arguments& xs, const typename WScale::Arguments& ws) {
    if constexpr (std::is_same_v<Node, XScale>) return xs;
    else return ws;
  }

  static typename Tree::Arguments args(const zq_gemm_args& a) {
    const typename XScale::Arguments xs{a.x_scale, 0.f, {}};
    const typename WScale::Arguments ws{a.w_scale, 0.f, {}};
    typename AccScaled::Arguments scaled{{}, pick<First>(xs, ws), {}};
    typename Affine::Arguments affine{scaled, pick<Second>(xs, ws),
                                      {static_cast<const ElementOut*>(a.bias), ElementOut(0), {}}, {}};
    typename Act::Arguments act{affine, {a.act}};
    if constexpr (kResidual) return {act, {}, {}};
    else return act;
  }
};

// One tile configuration: CTA tile, cluster, mainloop and epilogue schedules.
template <class Tile, class Cluster, class KSched, class ESched>
struct Config {
  using TileShape = Tile;
  using ClusterShape = Cluster;
  using KernelSchedule = KSched;
  using EpilogueSchedule = ESched;
};

using PingPong = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using Coop = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using EpiPP = cutlass::epilogue::TmaWarpSpecialized;
using EpiCoop = cutlass::epilogue::TmaWarpSpecializedCooperative;

// Per input element: the accumulator, the scale order, and the tile configurations in one table each (index =
// the cfg of zq_gemm_sm90_config / zq_gemm_sm90_fp8_config).
template <class ElementIn>
struct Input;

template <>
struct Input<int8_t> {
  using Acc = int32_t;
  static constexpr bool kWScaleFirst = false;
  using Configs = std::tuple<Config<Shape<_64, _128, _128>, Shape<_1, _1, _1>, PingPong, EpiPP>,
                             Config<Shape<_128, _128, _128>, Shape<_2, _1, _1>, PingPong, EpiPP>,
                             Config<Shape<_256, _128, _128>, Shape<_2, _1, _1>, Coop, EpiCoop>>;
};

// FP8: the default (not FastAccum) schedules, whose mainloop adds the wgmma partial sums into a second fp32
// accumulator every 4 MMAs (128 of K; the tensor cores' FP8 accumulation keeps fewer mantissa bits than fp32, so
// FastAccum's one long tensor-core sum would round more than the reference allows). That doubles the accumulator
// registers: a warpgroup owning more than 64 x 128 outputs spills (a cooperative 128 x 256 tile did: 852 bytes of
// spill stores), so the table has the INT8 table's shape with warpgroup tiles of 64 x 128 at most: 64 x 128
// ping-pong, then 128 x 128 cooperative with 2x1 and 1x1 clusters.
template <>
struct Input<cutlass::float_e4m3_t> {
  using Acc = float;
  static constexpr bool kWScaleFirst = true;
  using Configs = std::tuple<Config<Shape<_64, _128, _128>, Shape<_1, _1, _1>, PingPong, EpiPP>,
                             Config<Shape<_128, _128, _128>, Shape<_2, _1, _1>, Coop, EpiCoop>,
                             Config<Shape<_128, _128, _128>, Shape<_1, _1, _1>, Coop, EpiCoop>>;
};

template <class ElementIn>
constexpr int kNumConfigs = static_cast<int>(std::tuple_size_v<typename Input<ElementIn>::Configs>);

template <class ElementIn, class ElementOut, bool kResidual, class Cfg>
struct Gemm {
  using In = Input<ElementIn>;
  using TileShape = typename Cfg::TileShape;
  using ClusterShape = typename Cfg::ClusterShape;
  using Epi = DequantEpilogue<ElementOut, kResidual, TileShape, In::kWScaleFirst>;
  using ElementC = std::conditional_t<kResidual, ElementOut, void>;
  static constexpr int kAlignIn = 128 / cutlass::sizeof_bits<ElementIn>::value;
  static constexpr int kAlignOut = 128 / cutlass::sizeof_bits<ElementOut>::value;
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, typename In::Acc, float, ElementC, cutlass::layout::RowMajor,
      kAlignOut, ElementOut, cutlass::layout::RowMajor, kAlignOut, typename Cfg::EpilogueSchedule,
      typename Epi::Tree>::CollectiveOp;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementIn, cutlass::layout::RowMajor, kAlignIn, ElementIn,
      cutlass::layout::ColumnMajor, kAlignIn, typename In::Acc, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      typename Cfg::KernelSchedule>::CollectiveOp;
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
        {static_cast<const ElementIn*>(a.x), sA, static_cast<const ElementIn*>(a.wq), sB},
        {Epi::args(a), static_cast<const ElementOut*>(kResidual ? a.residual : nullptr), sC,
         static_cast<ElementOut*>(a.out), sD}};
    args.hw_info.device_id = device;
    args.hw_info.sm_count = sm_count;
    Adapter gemm;
    if (gemm.can_implement(args) != cutlass::Status::kSuccess) return cudaErrorNotSupported;
    if (Adapter::get_workspace_size(args) != 0) return cudaErrorNotSupported;  // persistent scheduler needs none
    if (gemm.initialize(args, nullptr, stream) != cutlass::Status::kSuccess) return cudaErrorInvalidValue;
    // PDL only where CUTLASS compiled its griddepcontrol.wait in (CUTLASS_ENABLE_GDC_FOR_SM90, sm_90a)
    if (gemm.run(stream, nullptr, kGdc && zq::pdl_enabled()) != cutlass::Status::kSuccess)
      return cudaErrorLaunchFailure;
    return cudaGetLastError();
  }
};

template <class ElementIn, class ElementOut, bool kResidual, size_t... I>
cudaError_t run_indexed(int cfg, const zq_gemm_args& a, int sm_count, int device, cudaStream_t stream,
                        std::index_sequence<I...>) {
  using Configs = typename Input<ElementIn>::Configs;
  cudaError_t rc = cudaErrorInvalidValue;
  ((cfg == static_cast<int>(I) &&
    (rc = Gemm<ElementIn, ElementOut, kResidual, std::tuple_element_t<I, Configs>>::run(a, sm_count, device, stream),
     true)) ||
   ...);
  return rc;
}

// Configuration cfg of the table (cudaErrorInvalidValue past it).
template <class ElementIn, class ElementOut, bool kResidual>
cudaError_t run_config_impl(int cfg, const zq_gemm_args& a, int sm_count, int device, cudaStream_t stream) {
  return run_indexed<ElementIn, ElementOut, kResidual>(cfg, a, sm_count, device, stream,
                                                       std::make_index_sequence<kNumConfigs<ElementIn>>{});
}

// Defined in the instance translation units that CMake generates from gemm_sm90_instance.cu.in, one for each
// input x output x residual, so the heavy CUTLASS templates compile in parallel.
template <class ElementIn, class ElementOut, bool kResidual>
cudaError_t run_config(int cfg, const zq_gemm_args& a, int sm_count, int device, cudaStream_t stream);

}  // namespace zq::sm90
