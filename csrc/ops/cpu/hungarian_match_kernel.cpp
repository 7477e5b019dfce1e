// CPU kernel of unit_fast::hungarian_match: the batch is spread over threads
// with at::parallel_for, one problem per thread at a time.  Each problem is
// first copied into a contiguous double buffer (sign applied, transposed when
// N > num_cols) so the column scans run over unit-stride doubles, as scipy's
// own copy does.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../hungarian_match.h"
#include "../hungarian_match_core.h"

namespace unit_fast {
namespace ops {
namespace {

template <typename scalar_t>
void hungarian_match_forward_kernel_impl(const at::Tensor& cost, const int64_t* num_cols, bool maximize,
                                         bool scipy_ties, int64_t* out) {
  const int64_t B = cost.size(0), N = cost.size(1), M = cost.size(2);
  const int64_t sB = cost.stride(0), sN = cost.stride(1), sM = cost.stride(2);
  const scalar_t* base = cost.data_ptr<scalar_t>();
  const double sign = maximize ? -1.0 : 1.0;
  const int64_t R = std::min(N, M), C = std::max(N, M);

  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> buf;
    // doubles give the workspace 8-byte alignment; its offsets are 16-aligned.
    std::vector<double> ws_store(lsa::workspace_bytes(R, C) / sizeof(double) + 1);
    lsa::Workspace w = lsa::carve_workspace(ws_store.data(), R, C);
    for (int64_t b = begin; b < end; ++b) {
      int64_t* o = out + b * N;
      const int64_t nc_b = num_cols ? num_cols[b] : M;
      if (nc_b < 0 || nc_b > M) {
        std::fill(o, o + N, lsa::kInvalid);
        continue;
      }
      const bool transposed = nc_b < N;
      const int nr = static_cast<int>(std::min(N, nc_b));
      const int nc = static_cast<int>(std::max(N, nc_b));
      buf.resize(static_cast<size_t>(nr) * nc);
      const scalar_t* src = base + b * sB;
      double* dst = buf.data();
      int bad = 0;  // validated while copying: the copy reads every cost anyway
      // Loop in the source's row order (unit stride when contiguous); a transposed
      // problem scatters into nr destination rows, which stay in L1 for nr <~ 500.
      for (int64_t n = 0; n < N; ++n) {
        const scalar_t* row = src + n * sN;
        for (int64_t m = 0; m < nc_b; ++m) {
          const double c = sign * static_cast<double>(row[m * sM]);
          dst[transposed ? m * nc + n : n * nc + m] = c;
          bad |= lsa::invalid_cost(c);
        }
      }
      if (bad) {
        std::fill(o, o + N, lsa::kInvalid);
        continue;
      }
      const lsa::DenseProblem p{buf.data(), nr, nc};
      lsa::SerialBlock blk{1};
      lsa::ArrState st{};
      const int status = lsa::solve(p, w, /*use_jv_start=*/!scipy_ties, /*check_invalid=*/false, blk, &st);
      lsa::write_result(w, status, transposed, static_cast<int>(N), o, 0, 1);
    }
  });
}

at::Tensor hungarian_match_forward_kernel(const at::Tensor& cost, const c10::optional<at::Tensor>& num_cols,
                                          bool maximize, bool scipy_ties) {
  check_hungarian_match_args(cost, num_cols);
  at::Tensor out = at::empty({cost.size(0), cost.size(1)}, cost.options().dtype(at::kLong));
  if (out.numel() == 0) return out;
  at::Tensor nc = num_cols.has_value() ? num_cols->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cost.scalar_type(), "hungarian_match_cpu", [&] {
    hungarian_match_forward_kernel_impl<scalar_t>(cost, nc.defined() ? nc.data_ptr<int64_t>() : nullptr,
                                                  maximize, scipy_ties, out.data_ptr<int64_t>());
  });
  return out;
}

// _hungarian_match_block_sim: the CUDA kernel's work decomposition run on the
// CPU -- the strided Problem view of the input (no copy), the in-solver
// NaN/-inf check, `threads` strided workers per problem combined exactly as a
// block reduction combines them.  Test-only: it lets CPU-only CI execute the
// code path the CUDA kernel runs (everything but warp shuffles and barriers).
template <typename scalar_t>
void block_sim_impl(const at::Tensor& cost, const int64_t* num_cols, bool maximize, bool scipy_ties,
                    int threads, int64_t* out) {
  const int64_t B = cost.size(0), N = cost.size(1), M = cost.size(2);
  const int64_t R = std::min(N, M), C = std::max(N, M);
  std::vector<double> ws_store(lsa::workspace_bytes(R, C) / sizeof(double) + 1);
  lsa::Workspace w = lsa::carve_workspace(ws_store.data(), R, C);
  for (int64_t b = 0; b < B; ++b) {
    int64_t* o = out + b * N;
    const int64_t nc_b = num_cols ? num_cols[b] : M;
    if (nc_b < 0 || nc_b > M) {
      std::fill(o, o + N, lsa::kInvalid);
      continue;
    }
    const bool transposed = nc_b < N;
    const int nr = static_cast<int>(std::min(N, nc_b));
    const int nc = static_cast<int>(std::max(N, nc_b));
    const lsa::Problem<scalar_t> p{cost.data_ptr<scalar_t>() + b * cost.stride(0),
                                   transposed ? cost.stride(2) : cost.stride(1),
                                   transposed ? cost.stride(1) : cost.stride(2), nr, nc,
                                   maximize ? -1.0 : 1.0};
    lsa::SerialBlock blk{threads};
    lsa::ArrState st{};
    const int status = lsa::solve(p, w, !scipy_ties, /*check_invalid=*/true, blk, &st);
    lsa::write_result(w, status, transposed, static_cast<int>(N), o, 0, 1);
  }
}

at::Tensor hungarian_match_block_sim_kernel(const at::Tensor& cost, const c10::optional<at::Tensor>& num_cols,
                                            bool maximize, bool scipy_ties, int64_t threads) {
  check_hungarian_match_args(cost, num_cols);
  TORCH_CHECK_VALUE(threads >= 1 && threads <= 1024, "threads must be in [1, 1024], got ", threads);
  at::Tensor out = at::empty({cost.size(0), cost.size(1)}, cost.options().dtype(at::kLong));
  if (out.numel() == 0) return out;
  at::Tensor nc = num_cols.has_value() ? num_cols->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cost.scalar_type(), "hungarian_match_block_sim", [&] {
    block_sim_impl<scalar_t>(cost, nc.defined() ? nc.data_ptr<int64_t>() : nullptr, maximize, scipy_ties,
                             static_cast<int>(threads), out.data_ptr<int64_t>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(unit_fast, CPU, m) {
  m.impl("hungarian_match", &hungarian_match_forward_kernel);
  m.impl("_hungarian_match_block_sim", &hungarian_match_block_sim_kernel);
}

}  // namespace ops
}  // namespace unit_fast
