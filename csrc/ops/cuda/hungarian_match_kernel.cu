// CUDA kernel of unit_fast::hungarian_match: two paths over the one driver of
// hungarian_match_core.h (read its "One warp per problem" notes first).
//
// Warp path (hungarian_match_warp_kernel), the default while 16 warps' slices
// -- each the staged cost tile plus the solver state -- fit in one SM's shared
// memory, so at least 25% of the SM's warps can be resident (DETR's 100 x 20,
// 11.7 KB a warp; not DETR-dense 100 x 50 at 24 KB or RT-DETR's 300 x 100 at
// 131 KB, which take the block path):
//   * one warp per problem, W warps (problems) per block; a warp past the end
//     of the batch returns as a whole, and no block barrier is ever executed, so
//     warps of a block never wait for one another;
//   * the warp copies its (transposed) problem into shared memory with
//     coalesced reads along the input's smaller stride, checking NaN / -inf on
//     the way; every later read of the cost is a shared-memory read, where the
//     old block path re-read a transposed problem from global memory with
//     column stride M (32 sectors per warp load) on every scan;
//   * each Dijkstra step scans only the still-unsettled columns (rem[], lane l
//     takes entries l, l + 32, ...), merges with a 5-step xor butterfly
//     (every lane gets the result; no shared-memory broadcast, no barrier), and
//     lane 0 settles the column, followed by one __syncwarp;
//   * W = clamp(ceil(B / SMs), 1, 4), limited by shared memory: problems are
//     spread over SMs first (a lone warp per SM has the whole SM's bandwidth to
//     itself) and packed 2-4 per block once the batch exceeds the SM count.
//
// Block path (hungarian_match_forward_kernel_impl, lsa::solve_block), for
// the rest (RT-DETR's 300 x 100, DINO's 900 x 100, 1000 x 1000): one block
// of 32-256 threads per problem, every row/column loop strided across the
// block, scans over the unsettled columns only, reductions as a butterfly per
// warp plus one barrier across warps (lsa::ThreadBlock); the solver state lives in
// dynamic shared memory when it fits the device's opt-in limit, otherwise in a
// global workspace with the same layout.  This is how several warps share one
// large problem.  A problem with more rows than columns (DINO's 900 x 100 is
// solved transposed) is first copied to a contiguous transposed buffer, so the
// scans read unit-stride rows instead of 32 sectors per warp load.
//
// Cluster path (hungarian_match_cluster_kernel, lsa::solve_cluster), sm_90+,
// for few large problems: K blocks (a thread-block cluster, K <= 16) share
// each problem, so 8 x 1000 x 1000 runs on 8 * 16 = 128 SMs instead of 8.
// Chosen when the block path would use at most a quarter of the SMs and the
// problem has at least kClusterMinCols columns; UNIT_FAST_LSA_CLUSTER=0 turns
// it off (and =K caps K), so a GPU run can compare both paths.
//
// No host synchronisation: errors are written into the output as codes
// (kInvalid, kInfeasible) instead of being raised.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>

#include <cooperative_groups.h>

#include "../hungarian_match.h"
#include "../hungarian_match_core.h"

namespace unit_fast {
namespace ops {
namespace {

// The warp primitives of lsa::WarpBlock, every one over the full warp.
struct CudaLanes {
  __device__ __forceinline__ int lane() const { return static_cast<int>(threadIdx.x & 31); }
  __device__ __forceinline__ void sync() const { __syncwarp(lsa::kFullMask); }
  __device__ __forceinline__ double shfl_xor(double x, int off) const {
    return __shfl_xor_sync(lsa::kFullMask, x, off);
  }
  __device__ __forceinline__ int shfl_xor(int x, int off) const { return __shfl_xor_sync(lsa::kFullMask, x, off); }
  __device__ __forceinline__ bool any(bool p) const { return __any_sync(lsa::kFullMask, p ? 1 : 0) != 0; }
};

// The block primitives of lsa::ThreadBlock (blockDim.x a multiple of 32).
struct CudaThreads : CudaLanes {
  __device__ __forceinline__ int tid() const { return static_cast<int>(threadIdx.x); }
  __device__ __forceinline__ int size() const { return static_cast<int>(blockDim.x); }
  __device__ __forceinline__ void barrier() const { __syncthreads(); }
  __device__ __forceinline__ bool barrier_or(bool p) const { return __syncthreads_or(p ? 1 : 0) != 0; }
};

// One warp per problem: warp w of block k solves problem k * W + w in its own
// slice of dynamic shared memory (lsa::warp_slice_bytes).  No __syncthreads.
template <typename scalar_t>
__global__ void hungarian_match_warp_kernel(const scalar_t* __restrict__ cost, int64_t sB, int64_t sN, int64_t sM,
                                            int N, int M, const int64_t* __restrict__ num_cols, int64_t B,
                                            double sign, bool jv_start, int64_t* __restrict__ out, int R, int C,
                                            size_t slice_bytes) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int warp = static_cast<int>(threadIdx.x >> 5);
  const int64_t b = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + warp;
  if (b >= B) return;  // the whole warp: nothing in this block waits for it
  CudaLanes ln;
  lsa::solve_warp<scalar_t>(ln, cost + b * sB, sN, sM, N, M, num_cols, b, sign, jv_start, out + b * N,
                            smem + warp * slice_bytes, R, C);
}

// One block per problem (lsa::solve_block); the solver state in dynamic shared
// memory (kSharedWs) or in this problem's slice of the global workspace gws.
template <typename scalar_t, bool kSharedWs>
__global__ void hungarian_match_forward_kernel_impl(const scalar_t* __restrict__ cost, int64_t sB, int64_t sN,
                                                    int64_t sM, int N, int M,
                                                    const int64_t* __restrict__ num_cols, double sign,
                                                    bool jv_start, int64_t* __restrict__ out,
                                                    unsigned char* gws, size_t ws_stride, int R, int C) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ lsa::BlockScratch scratch;
  const int64_t b = blockIdx.x;
  CudaThreads th;
  lsa::solve_block<scalar_t>(th, &scratch, cost + b * sB, sN, sM, N, M, num_cols, b, sign, jv_start, out + b * N,
                             kSharedWs ? static_cast<void*>(smem) : static_cast<void*>(gws + b * ws_stride), R, C);
}

// The cluster primitives of lsa::ClusterThreads.  Cluster groups exist from sm_90 on; the
// kernel body is compiled only there, and launch() checks the loaded binary's architecture
// before it takes this path.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define UF_LSA_HAS_CLUSTER 1
struct CudaClusterPrims : CudaLanes {
  __device__ __forceinline__ int rank() const { return static_cast<int>(cooperative_groups::this_cluster().block_rank()); }
  __device__ __forceinline__ int ranks() const { return static_cast<int>(cooperative_groups::this_cluster().num_blocks()); }
  __device__ __forceinline__ int block_tid() const { return static_cast<int>(threadIdx.x); }
  __device__ __forceinline__ int block_size() const { return static_cast<int>(blockDim.x); }
  __device__ __forceinline__ void cluster_sync() const { cooperative_groups::this_cluster().sync(); }
};
#endif

// One cluster per problem: the blocks of cluster b (blockIdx.x / K) solve problem b with the
// solver state in the leader's shared memory (kSharedWs) or in the global workspace gws.
template <typename scalar_t, bool kSharedWs>
__global__ void hungarian_match_cluster_kernel(const scalar_t* __restrict__ cost, int64_t sB, int64_t sN,
                                               int64_t sM, int N, int M, const int64_t* __restrict__ num_cols,
                                               double sign, bool jv_start, int64_t* __restrict__ out,
                                               unsigned char* gws, size_t ws_stride, int R, int C) {
#if defined(UF_LSA_HAS_CLUSTER)
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ lsa::BlockScratch scratch;
  namespace cg = cooperative_groups;
  cg::cluster_group cl = cg::this_cluster();
  const int64_t b = blockIdx.x / cl.num_blocks();
  lsa::BlockScratch* sh0 = cl.map_shared_rank(&scratch, 0);
  void* ws0 = kSharedWs ? static_cast<void*>(cl.map_shared_rank(smem, 0)) : static_cast<void*>(gws + b * ws_stride);
  CudaClusterPrims pr;
  lsa::solve_cluster<scalar_t>(pr, sh0, cost + b * sB, sN, sM, N, M, num_cols, b, sign, jv_start, out + b * N, ws0,
                               R, C);
#endif
}

int threads_for(int64_t C) { return C <= 128 ? 32 : (C <= 1024 ? 128 : 256); }

// The cluster path's choice (see the file comment): K blocks per problem, a power of two in
// [2, 16], the largest with B * K <= SMs; 1 (no cluster) for small problems (the scan of one
// block is short, and three cluster barriers a step would dominate it) or when the block path
// already occupies a quarter of the SMs.  UNIT_FAST_LSA_CLUSTER caps K (0 or 1: never).
constexpr int64_t kClusterMinCols = 256;
constexpr int kClusterMaxBlocks = 16;  // 8 is portable; 16 needs the non-portable opt-in

int cluster_blocks(int64_t B, int64_t C, int sms) {
  int cap = kClusterMaxBlocks;
  if (const char* env = std::getenv("UNIT_FAST_LSA_CLUSTER")) cap = std::clamp(std::atoi(env), 0, kClusterMaxBlocks);
  if (C < kClusterMinCols || B * 4 > sms) return 1;
  int k = 1;
  while (k * 2 <= cap && B * k * 2 <= sms) k *= 2;
  return k;
}

// Threads per block of a K-block cluster: about one thread per column in all (at most 1024,
// lsa::kMaxBlockWarps warps), at least one warp per block.
int cluster_threads(int64_t C, int k) {
  const int64_t total = std::min<int64_t>(1024, (C + 31) / 32 * 32);
  const int64_t t = ((total + k - 1) / k + 31) / 32 * 32;
  return static_cast<int>(std::clamp<int64_t>(t, 32, 1024 / k));
}

struct Launch {
  const at::Tensor& cost;
  const int64_t* num_cols;
  double sign;
  bool jv;
  at::Tensor& out;
  int64_t B, N, M, R, C;
  int dev;
  int max_optin;
  cudaStream_t stream;
};

// The warp path, when 16 warps' slices fit in one SM's shared memory (the file comment): 25%
// warp occupancy, the floor benchmarks/kernel_report checks.  A slice that merely fits once
// would leave one warp on an SM (RT-DETR's 300 x 100: a 131 KB slice, 1.6% of the warps); the
// block path (global reads, threads_for(C) threads) keeps 6 such problems resident there.
// Returns false when the problem does not fit.
template <typename scalar_t>
bool launch_warp(const Launch& L, int sms) {
  constexpr int64_t kWarpPathMinWarps = 16;
  const size_t slice = lsa::warp_slice_bytes<scalar_t>(L.R, L.C);
  const int64_t budget = static_cast<int64_t>(L.max_optin) - 1024;
  if (static_cast<int64_t>(slice) * kWarpPathMinWarps > budget) return false;
  const int64_t warps = std::min<int64_t>({4, std::max<int64_t>(1, (L.B + sms - 1) / sms),
                                           budget / static_cast<int64_t>(slice)});
  const size_t smem = slice * static_cast<size_t>(warps);
  auto kernel = hungarian_match_warp_kernel<scalar_t>;
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  const int64_t blocks = (L.B + warps - 1) / warps;
  kernel<<<static_cast<unsigned>(blocks), static_cast<unsigned>(32 * warps), smem, L.stream>>>(
      L.cost.data_ptr<scalar_t>(), L.cost.stride(0), L.cost.stride(1), L.cost.stride(2), static_cast<int>(L.N),
      static_cast<int>(L.M), L.num_cols, L.B, L.sign, L.jv, L.out.data_ptr<int64_t>(), static_cast<int>(L.R),
      static_cast<int>(L.C), slice);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

// The cluster path for cost (already in its scan-friendly layout).  Returns false -- having
// launched nothing -- when the device, the loaded binary or the scheduler cannot run a
// cluster of at least 2 blocks.
template <typename scalar_t, bool kSharedWs>
bool launch_cluster(const Launch& L, const at::Tensor& cost, int k, size_t bytes) {
  auto kernel = hungarian_match_cluster_kernel<scalar_t, kSharedWs>;
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, L.dev));
  cudaFuncAttributes fa{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&fa, kernel));
  // The body exists only where __CUDA_ARCH__ >= 900 (UF_LSA_HAS_CLUSTER).  binaryVersion alone
  // is not enough: PTX of an older virtual architecture, JIT-compiled for this sm_90 device,
  // reports binaryVersion 90 with an empty body; ptxVersion is the architecture it was built for.
  if (major < 9 || fa.binaryVersion < 90 || fa.ptxVersion < 90) return false;
  const size_t smem = kSharedWs ? bytes : 0;
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  if (k > 8) C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeClusterDimension;
  cudaLaunchConfig_t cfg{};
  cfg.dynamicSmemBytes = smem;
  cfg.stream = L.stream;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  // A GPC may hold fewer free SMs than 16: halve K until one cluster can be resident.
  for (; k >= 2; k /= 2) {
    attr.val.clusterDim.x = static_cast<unsigned>(k);
    attr.val.clusterDim.y = attr.val.clusterDim.z = 1;
    cfg.gridDim = dim3(static_cast<unsigned>(L.B * k));
    cfg.blockDim = dim3(static_cast<unsigned>(cluster_threads(L.C, k)));
    int clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg) != cudaSuccess) {
      (void)cudaGetLastError();  // clear it: the block path runs instead
      return false;
    }
    if (clusters > 0) break;
  }
  if (k < 2) return false;
  at::Tensor ws;
  if (!kSharedWs) ws = at::empty({L.B * static_cast<int64_t>(bytes)}, cost.options().dtype(at::kByte));
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, cost.data_ptr<scalar_t>(), cost.stride(0), cost.stride(1),
                                    cost.stride(2), static_cast<int>(L.N), static_cast<int>(L.M), L.num_cols, L.sign,
                                    L.jv, L.out.data_ptr<int64_t>(), kSharedWs ? nullptr : ws.data_ptr<uint8_t>(),
                                    kSharedWs ? size_t{0} : bytes, static_cast<int>(L.R), static_cast<int>(L.C)));
  return true;
}

template <typename scalar_t>
void launch(const at::Tensor& cost_in, const int64_t* num_cols, bool maximize, bool scipy_ties, at::Tensor& out) {
  const int64_t B = cost_in.size(0), N = cost_in.size(1), M = cost_in.size(2);
  const int64_t R = std::min(N, M), C = std::max(N, M);
  const int dev = cost_in.get_device();
  int max_optin = 0, sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  const Launch L{cost_in, num_cols, maximize ? -1.0 : 1.0, !scipy_ties, out, B, N, M, R, C, dev, max_optin,
                 c10::cuda::getCurrentCUDAStream()};
  if (launch_warp<scalar_t>(L, sms)) return;

  // With N > M every problem is solved transposed (its columns are at most M < N): scanning a
  // working row then walks the input's column, stride M.  One contiguous transposed copy
  // (torch-linear-assignment's choice; B * N * M elements, a few microseconds) makes every
  // later scan unit stride.  N <= M with num_cols < N transposes only some problems, on
  // values the host does not see without a sync: those keep the strided view.
  at::Tensor cost = cost_in;
  if (N > M && cost.stride(1) != 1) cost = cost_in.transpose(1, 2).contiguous().transpose(1, 2);

  const size_t bytes = lsa::workspace_bytes(R, C);
  static_assert(256 / 32 <= lsa::kMaxBlockWarps, "ThreadBlock needs one slot per warp");
  static_assert(1024 / 32 <= lsa::kMaxBlockWarps, "a cluster's threads are one ThreadBlock");
  // Leave room for the kernels' static shared memory (lsa::BlockScratch).
  const bool shared_ws = bytes + sizeof(lsa::BlockScratch) + 256 <= static_cast<size_t>(max_optin);

  const int k = cluster_blocks(B, C, sms);
  if (k >= 2 && (shared_ws ? launch_cluster<scalar_t, true>(L, cost, k, bytes)
                           : launch_cluster<scalar_t, false>(L, cost, k, bytes))) {
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const int threads = threads_for(C);
  if (shared_ws) {
    auto kernel = hungarian_match_forward_kernel_impl<scalar_t, true>;
    if (bytes > 48 * 1024) {
      C10_CUDA_CHECK(
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
    }
    kernel<<<static_cast<unsigned>(B), threads, bytes, L.stream>>>(
        cost.data_ptr<scalar_t>(), cost.stride(0), cost.stride(1), cost.stride(2), static_cast<int>(N),
        static_cast<int>(M), num_cols, L.sign, L.jv, out.data_ptr<int64_t>(), nullptr, 0, static_cast<int>(R),
        static_cast<int>(C));
  } else {
    at::Tensor ws = at::empty({B * static_cast<int64_t>(bytes)}, cost.options().dtype(at::kByte));
    hungarian_match_forward_kernel_impl<scalar_t, false><<<static_cast<unsigned>(B), threads, 0, L.stream>>>(
        cost.data_ptr<scalar_t>(), cost.stride(0), cost.stride(1), cost.stride(2), static_cast<int>(N),
        static_cast<int>(M), num_cols, L.sign, L.jv, out.data_ptr<int64_t>(), ws.data_ptr<uint8_t>(), bytes,
        static_cast<int>(R), static_cast<int>(C));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor hungarian_match_forward_kernel(const at::Tensor& cost, const c10::optional<at::Tensor>& num_cols,
                                          bool maximize, bool scipy_ties) {
  check_hungarian_match_args(cost, num_cols);
  const c10::cuda::CUDAGuard guard(cost.device());
  at::Tensor out = at::empty({cost.size(0), cost.size(1)}, cost.options().dtype(at::kLong));
  if (out.numel() == 0) return out;
  TORCH_CHECK_VALUE(cost.size(0) <= std::numeric_limits<int32_t>::max(), "hungarian_match: B too large");
  at::Tensor nc = num_cols.has_value() ? num_cols->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cost.scalar_type(), "hungarian_match_cuda", [&] {
    launch<scalar_t>(cost, nc.defined() ? nc.data_ptr<int64_t>() : nullptr, maximize, scipy_ties, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(unit_fast, CUDA, m) {
  m.impl("hungarian_match", &hungarian_match_forward_kernel);
}

}  // namespace ops
}  // namespace unit_fast
