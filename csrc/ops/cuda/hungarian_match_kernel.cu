// CUDA kernel of unit_fast::hungarian_match: one thread block per problem.
//
// Decomposition: the block runs hungarian_match_core.h's algorithm with every
// row/column loop strided across its threads; each Dijkstra step is one
// strided column scan (coalesced along the cost row when not transposed),
// a warp-shuffle + shared-memory argmin under the core's tie-break order, and
// one thread settling the chosen column.  The search stops at the first free
// column reached (early exit), so most steps on DETR-shaped problems are one
// scan.  The solver state lives in dynamic shared memory when it fits the
// device's opt-in limit (up to about 6,500 columns on H100), otherwise in a
// global workspace with the same layout.
//
// No host synchronisation: errors are written into the output as codes
// (kInvalid, kInfeasible) instead of being raised.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../hungarian_match.h"
#include "../hungarian_match_core.h"

namespace unit_fast {
namespace ops {
namespace {

constexpr int kMaxWarps = 8;

__device__ __forceinline__ lsa::Key shfl_key(lsa::Key k, int offset) {
  lsa::Key o;
  o.val = __shfl_down_sync(0xffffffffu, k.val, offset);
  o.j = __shfl_down_sync(0xffffffffu, k.j, offset);
  return o;
}

// Block-wide reduction under a strict order `first` (a beats b).  The result
// is valid in thread 0 only.  Ends with no pending shared-memory hazards for
// `red` beyond the caller's next __syncthreads.
template <typename Less>
__device__ lsa::Key block_reduce(lsa::Key k, lsa::Key* red, Less first) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int off = 16; off > 0; off >>= 1) {
    const lsa::Key o = shfl_key(k, off);
    if (first(o, k)) k = o;
  }
  if (blockDim.x <= 32) return k;
  if (lane == 0) red[warp] = k;
  __syncthreads();
  if (warp == 0) {
    const int n_warps = blockDim.x >> 5;
    k = lane < n_warps ? red[lane] : lsa::Key{INFINITY, -1};
    for (int off = 16; off > 0; off >>= 1) {
      const lsa::Key o = shfl_key(k, off);
      if (first(o, k)) k = o;
    }
  }
  return k;
}

__device__ __forceinline__ lsa::TwoMin shfl_two_min(const lsa::TwoMin& t, int offset) {
  lsa::TwoMin o;
  o.v1 = __shfl_down_sync(0xffffffffu, t.v1, offset);
  o.j1 = __shfl_down_sync(0xffffffffu, t.j1, offset);
  o.v2 = __shfl_down_sync(0xffffffffu, t.v2, offset);
  o.j2 = __shfl_down_sync(0xffffffffu, t.j2, offset);
  return o;
}

// Block-wide two-smallest reduction (two_min_merge is order independent); the
// result is valid in thread 0 only.
__device__ lsa::TwoMin block_two_min(lsa::TwoMin t, lsa::TwoMin* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int off = 16; off > 0; off >>= 1) t = lsa::two_min_merge(t, shfl_two_min(t, off));
  if (blockDim.x <= 32) return t;
  if (lane == 0) red[warp] = t;
  __syncthreads();
  if (warp == 0) {
    t = lane < static_cast<int>(blockDim.x >> 5) ? red[lane] : lsa::two_min_empty();
    for (int off = 16; off > 0; off >>= 1) t = lsa::two_min_merge(t, shfl_two_min(t, off));
  }
  return t;
}

// The execution policy of hungarian_match_core.h's driver for one thread block.
// Every reduction result is broadcast through shared memory and followed by a
// barrier, so the next reduction cannot overwrite it before all threads read it.
struct CudaBlock {
  lsa::Key* red;
  lsa::TwoMin* red2;
  lsa::Key* key_out;
  lsa::TwoMin* two_out;

  template <typename F>
  __device__ void all(F f) {
    f(static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x));
    __syncthreads();
  }
  template <typename F>
  __device__ void single(F f) {
    if (threadIdx.x == 0) f();
    __syncthreads();
  }
  template <typename F>
  __device__ bool any(F f) {
    return __syncthreads_or(f(static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x)) ? 1 : 0) != 0;
  }
  template <typename F>
  __device__ lsa::TwoMin two_min(F f) {
    const lsa::TwoMin m = block_two_min(f(static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x)), red2);
    if (threadIdx.x == 0) *two_out = m;
    __syncthreads();
    const lsa::TwoMin r = *two_out;
    __syncthreads();
    return r;
  }
  template <typename P>
  __device__ lsa::Key scan(const P& p, lsa::Workspace& w, int i, double min_val, int /*n_rem*/) {
    // Natural column order across threads: coalesced loads of the cost row.
    const lsa::Key local = lsa::scan(p, w, i, min_val, static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x));
    const lsa::Key k = block_reduce(local, red, [&w](lsa::Key a, lsa::Key b) { return lsa::better(w, a, b); });
    if (threadIdx.x == 0) *key_out = k;
    __syncthreads();
    const lsa::Key r = *key_out;
    __syncthreads();
    return r;
  }
};

template <typename scalar_t, bool kSharedWs>
__global__ void hungarian_match_forward_kernel_impl(const scalar_t* __restrict__ cost, int64_t sB, int64_t sN,
                                                    int64_t sM, int N, int M,
                                                    const int64_t* __restrict__ num_cols, double sign,
                                                    bool jv_start, int64_t* __restrict__ out,
                                                    unsigned char* gws, size_t ws_stride, int R, int C) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ lsa::Key red[kMaxWarps];
  __shared__ lsa::TwoMin red2[kMaxWarps];
  __shared__ lsa::Key key_out;
  __shared__ lsa::TwoMin two_out;
  __shared__ lsa::ArrState arr;

  const int b = blockIdx.x, tid = threadIdx.x, T = blockDim.x;
  int64_t* o = out + static_cast<int64_t>(b) * N;
  const lsa::Shape shape = lsa::problem_shape(N, M, num_cols, b);
  if (!shape.valid) {  // uniform over the block
    lsa::Workspace none{};
    lsa::write_result(none, lsa::kStatusInvalid, false, N, o, tid, T);
    return;
  }
  const bool transposed = shape.transposed;
  const lsa::Problem<scalar_t> p{cost + b * sB, transposed ? sM : sN, transposed ? sN : sM, shape.nr, shape.nc,
                                 sign};
  lsa::Workspace w = lsa::carve_workspace(kSharedWs ? smem : gws + b * ws_stride, R, C);
  CudaBlock blk{red, red2, &key_out, &two_out};
  const int status = lsa::solve(p, w, jv_start, /*check_invalid=*/true, blk, &arr);
  lsa::write_result(w, status, transposed, N, o, tid, T);
}

int threads_for(int64_t C) { return C <= 128 ? 32 : (C <= 1024 ? 128 : 256); }

template <typename scalar_t>
void launch(const at::Tensor& cost, const int64_t* num_cols, bool maximize, bool scipy_ties, at::Tensor& out) {
  const int64_t B = cost.size(0), N = cost.size(1), M = cost.size(2);
  const int64_t R = std::min(N, M), C = std::max(N, M);
  const size_t bytes = lsa::workspace_bytes(R, C);
  const int threads = threads_for(C);
  static_assert(256 / 32 <= kMaxWarps, "block_reduce needs one slot per warp");

  const int dev = cost.get_device();
  int max_optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  // Leave room for the kernel's static shared memory (reduction slots, scalars).
  const bool shared_ws = bytes + 1024 <= static_cast<size_t>(max_optin);
  const double sign = maximize ? -1.0 : 1.0;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (shared_ws) {
    auto kernel = hungarian_match_forward_kernel_impl<scalar_t, true>;
    if (bytes > 48 * 1024) {
      C10_CUDA_CHECK(
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
    }
    kernel<<<static_cast<unsigned>(B), threads, bytes, stream>>>(
        cost.data_ptr<scalar_t>(), cost.stride(0), cost.stride(1), cost.stride(2), static_cast<int>(N),
        static_cast<int>(M), num_cols, sign, !scipy_ties, out.data_ptr<int64_t>(), nullptr, 0,
        static_cast<int>(R), static_cast<int>(C));
  } else {
    at::Tensor ws = at::empty({B * static_cast<int64_t>(bytes)}, cost.options().dtype(at::kByte));
    hungarian_match_forward_kernel_impl<scalar_t, false><<<static_cast<unsigned>(B), threads, 0, stream>>>(
        cost.data_ptr<scalar_t>(), cost.stride(0), cost.stride(1), cost.stride(2), static_cast<int>(N),
        static_cast<int>(M), num_cols, sign, !scipy_ties, out.data_ptr<int64_t>(), ws.data_ptr<uint8_t>(),
        bytes, static_cast<int>(R), static_cast<int>(C));
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
