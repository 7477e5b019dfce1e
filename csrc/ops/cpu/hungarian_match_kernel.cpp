// CPU kernel of unit_fast::hungarian_match: the batch is spread over threads,
// one problem at a time (see run_batch).  Each problem is first copied into a
// contiguous buffer (sign applied, transposed when N > num_cols) so the column
// scans run over unit-stride memory, as scipy's own copy does.  Float, half and
// bfloat16 inputs without scipy_ties then take the float path (float duals,
// vector loops: lsa_float_path.h), built twice and chosen per CPU
// (hungarian_match_avx2.cpp); double inputs and scipy_ties solve in double.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

#include "../hungarian_match.h"
#include "../hungarian_match_core.h"
#include "hungarian_match_avx2.h"
#include "lsa_float_path.h"
#include "lsa_transpose.h"

namespace unit_fast {
namespace ops {
namespace {

// Below this many cost entries in the whole batch, helpers cost more than
// they save (waking a thread is several microseconds).
constexpr int64_t kSerialWork = 1 << 15;

// Runs solve_one(b) for every b in [0, B) on the calling thread plus up to
// at::get_num_threads() - 1 helpers from ATen's inter-op pool.  Problems are
// claimed one at a time from a shared counter, and the caller waits only for
// problems already claimed -- not for helpers to start.  A static split (as
// at::parallel_for does) waits for every thread to be scheduled: with one core
// busy elsewhere (a data-loader worker) that stalled a 0.3 ms batch for 12 ms.
// solve_one(b, scratch) gets a per-thread scratch object made by make_scratch.
template <typename Scratch>
void run_batch(int64_t B, int64_t work, const std::function<Scratch()>& make_scratch,
               const std::function<void(int64_t, Scratch&)>& solve_one) {
  const int64_t helpers = std::min<int64_t>(at::get_num_threads(), B) - 1;
  if (helpers <= 0 || work < kSerialWork) {
    Scratch scratch = make_scratch();
    for (int64_t b = 0; b < B; ++b) solve_one(b, scratch);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    int64_t finished = 0;
    int64_t total = 0;
    std::mutex m;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  state->total = B;
  // A late helper only touches `state` (kept alive by its shared_ptr) and sees
  // no problem left to claim, so the references below are never used after
  // this function returns.
  auto work_loop = [state, &make_scratch, &solve_one]() {
    if (state->next.load() >= state->total) return;
    Scratch scratch = make_scratch();
    int64_t done = 0;
    for (int64_t b = state->next.fetch_add(1); b < state->total; b = state->next.fetch_add(1)) {
      solve_one(b, scratch);
      ++done;
    }
    if (done) {
      std::lock_guard<std::mutex> lock(state->m);
      state->finished += done;
      if (state->finished == state->total) state->cv.notify_all();
    }
  };
  for (int64_t h = 0; h < helpers; ++h) at::launch(work_loop);
  work_loop();
  std::unique_lock<std::mutex> lock(state->m);
  state->cv.wait(lock, [&] { return state->finished == state->total; });
}

enum class Isa { kGeneric, kAvx2 };

Isa detect_isa() {
  const char* want = std::getenv("UNIT_FAST_CPU_ISA");
  if (want && std::strcmp(want, "generic") == 0) return Isa::kGeneric;
#if UF_LSA_HAVE_AVX2_TU
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kGeneric;
}

Isa cpu_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

// The fast float path on one working copy, in the build this CPU runs.
void solve_float(const float* cost, int nr, int nc, bool transposed, int n_out, void* ws, int64_t R, int64_t C,
                 int64_t* out) {
#if UF_LSA_HAVE_AVX2_TU
  if (cpu_isa() == Isa::kAvx2) return lsa_solve_float_avx2(cost, nr, nc, transposed, n_out, ws, R, C, out);
#endif
  lsa::solve_float(cost, nr, nc, transposed, n_out, ws, R, C, out);
}

// Storage of the CPU kernel's working copy: float for every input narrower
// than double (exact), double for double.
template <typename scalar_t>
using copy_t = typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type;

template <typename scalar_t>
void hungarian_match_forward_kernel_impl(const at::Tensor& cost, const int64_t* num_cols, bool maximize,
                                         bool scipy_ties, int64_t* out) {
  const int64_t B = cost.size(0), N = cost.size(1), M = cost.size(2);
  const int64_t sB = cost.stride(0), sN = cost.stride(1), sM = cost.stride(2);
  const scalar_t* base = cost.data_ptr<scalar_t>();
  const double sign = maximize ? -1.0 : 1.0;
  const int64_t R = std::min(N, M), C = std::max(N, M);

  using T = copy_t<scalar_t>;
  constexpr bool kFloatCopy = std::is_same<T, float>::value;
  const bool float_path = kFloatCopy && !scipy_ties;
  const size_t ws_bytes = float_path ? lsa::workspace_bytes<float>(R, C) : lsa::workspace_bytes(R, C);
  struct Scratch {
    std::vector<T> buf;
    std::vector<double> ws_store;  // doubles: 8-byte alignment; its offsets are 16-aligned
  };
  const std::function<Scratch()> make_scratch = [&] {
    return Scratch{{}, std::vector<double>(ws_bytes / sizeof(double) + 2)};
  };
  const std::function<void(int64_t, Scratch&)> solve_one = [&](int64_t b, Scratch& scratch) {
    int64_t* o = out + b * N;
    const lsa::Shape shape = lsa::problem_shape(N, M, num_cols, b);
    if (!shape.valid) {
      std::fill(o, o + N, lsa::kInvalid);
      return;
    }
    const bool transposed = shape.transposed;
    const int nr = shape.nr, nc = shape.nc;
    const int64_t nc_b = transposed ? nr : nc;  // active source columns
    scratch.buf.resize(static_cast<size_t>(nr) * nc);
    const scalar_t* src = base + b * sB;
    T* dst = scratch.buf.data();
    int bad = 0;  // validated while copying: the copy reads every cost anyway
    if (transposed) {
      bad = transpose_copy(src, sN, sM, N, nc_b, sign, dst, nc);
    } else {
      for (int64_t n = 0; n < N; ++n) {
        T* drow = dst + n * nc;
        const scalar_t* srow = src + n * sN;
        for (int64_t m = 0; m < nc_b; ++m) {
          const T c = static_cast<T>(sign) * static_cast<T>(srow[m * sM]);
          drow[m] = c;
          bad |= lsa::invalid_cost(c);
        }
      }
    }
    if (bad) {
      std::fill(o, o + N, lsa::kInvalid);
      return;
    }
    if constexpr (kFloatCopy) {
      if (float_path) {
        solve_float(dst, nr, nc, transposed, static_cast<int>(N), scratch.ws_store.data(), R, C, o);
        return;
      }
    }
    lsa::Workspace w = lsa::carve_workspace(scratch.ws_store.data(), R, C);
    const lsa::DenseProblem<T> p{dst, nr, nc};
    lsa::SerialBlock blk;
    lsa::ArrState st{};
    const int status = lsa::solve(p, w, /*use_jv_start=*/!scipy_ties, /*check_invalid=*/false, blk, &st);
    lsa::write_result(w, status, transposed, static_cast<int>(N), o, 0, 1);
  };
  run_batch<Scratch>(B, B * N * M, make_scratch, solve_one);
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
    const lsa::Shape shape = lsa::problem_shape(N, M, num_cols, b);
    if (!shape.valid) {
      std::fill(o, o + N, lsa::kInvalid);
      continue;
    }
    const bool transposed = shape.transposed;
    const lsa::Problem<scalar_t> p{cost.data_ptr<scalar_t>() + b * cost.stride(0),
                                   transposed ? cost.stride(2) : cost.stride(1),
                                   transposed ? cost.stride(1) : cost.stride(2), shape.nr, shape.nc,
                                   maximize ? -1.0 : 1.0};
    lsa::SimBlock blk{threads};
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

std::string lsa_cpu_isa() { return cpu_isa() == Isa::kAvx2 ? "avx2" : "generic"; }

TORCH_LIBRARY_IMPL(unit_fast, CPU, m) {
  m.impl("hungarian_match", &hungarian_match_forward_kernel);
  m.impl("_hungarian_match_block_sim", &hungarian_match_block_sim_kernel);
}

}  // namespace ops
}  // namespace unit_fast
