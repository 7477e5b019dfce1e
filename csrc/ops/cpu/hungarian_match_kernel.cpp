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
#include <string>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <ucontext.h>
#define UF_LSA_WARP_SIM 1
#else
#define UF_LSA_WARP_SIM 0
#endif

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

// _hungarian_match_block_sim with threads > 0 not a multiple of 32 (a block no
// kernel launches): the CUDA block path's work decomposition run on the CPU,
// threads one after another -- the strided Problem view of the input (no copy), the in-solver
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

// ---- The GPU paths, simulated ---------------------------------------------------
//
// threads < 0: the warp path, -threads warps (problems) per block; threads a
// multiple of 32: the block path, one problem per block, or with cluster = K > 1
// the cluster path, one problem per K blocks of `threads` threads (all K * threads
// threads are fibers of one simulated cluster, and a barrier is cluster.sync()).
// lsa::solve_warp, lsa::solve_block or lsa::solve_cluster -- the CUDA kernels'
// bodies, the same source -- runs with
// each lane a fiber (ucontext).  A lane runs until it reaches a warp primitive
// (sync, shfl_xor, any), posts it and yields; when every lane of its warp is
// waiting, the scheduler checks the collective and completes it (shuffles
// exchange the posted values), and the next round resumes all lanes in a fresh
// pseudo-random order, interleaving the lanes (and the warps of the simulated
// block) between primitives.  So shared state is read by the lanes in a
// different order each round: a missing sync lets some lane read a value before
// lane 0 has written it, and the results (or the control flow) change.  The
// scheduler raises when the warp-synchronous rules are broken:
//   * lanes of a warp wait at different primitives, or with different masks
//     (divergence);
//   * a lane executes a collective whose mask leaves it out, or shuffles from a
//     lane outside the mask;
//   * some lanes of a warp exit while others wait at a collective.
//   * (block path) some threads wait at a barrier that others never reach.
// A barrier completes when all threads of the block wait at it.
// Fault injection, to show the tests catch such bugs (test-only environment
// variable, read on every call): UNIT_FAST_LSA_SIM_FAULT=drop_syncwarp makes
// every __syncwarp a no-op, =partial_mask makes every shuffle use 0x0000ffff,
// =drop_barrier makes every block (or cluster) barrier a no-op -- __syncthreads_or
// returns the thread's own flag.  (A fiber scheduler cannot preempt a fiber in a
// loop without primitives; the solver's only such loop over corruptible state,
// augment(), is bounded by the row count, so a broken decomposition ends in a
// wrong answer rather than a hang.)
#if UF_LSA_WARP_SIM
namespace warpsim {

enum Op { kRun, kSync, kShfl, kAny, kBar, kBarOr, kDone };  // kBar, kBarOr: block-wide

struct Lane {
  ucontext_t ctx;
  int op = kRun;
  unsigned mask = 0;
  int src = 0;
  uint64_t payload = 0;
  uint64_t result = 0;
};

struct SimLanes;

struct Sim {
  int warps = 1;  // threads = 32 * warps (of the whole cluster on the cluster path)
  int block_threads = 0;  // the cluster path: threads per block
  bool drop_sync = false;
  bool drop_barrier = false;
  unsigned shfl_mask = lsa::kFullMask;
  std::vector<Lane> lanes;
  std::vector<std::vector<char>> stacks;
  ucontext_t sched;
  std::string error;
  std::function<void(int, SimLanes&)> body;  // body(warp, lanes)
  bool resolve_block();
  uint64_t rng = 0x9E3779B97F4A7C15ull;

  void set_fault(const char* fault) {
    const auto is = [fault](const char* name) { return fault && std::strcmp(fault, name) == 0; };
    drop_sync = is("drop_syncwarp");
    drop_barrier = is("drop_barrier");
    shfl_mask = is("partial_mask") ? 0x0000ffffu : lsa::kFullMask;
  }
  uint64_t next_random() {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
  }
  void run_block();
};

// lsa::WarpBlock's Lanes and lsa::ThreadBlock's Threads on a fiber of Sim.
struct SimLanes {
  Sim* sim;
  int g;  // thread of the block
  int lane() const { return g % lsa::kWarpSize; }
  int tid() const { return g; }
  int size() const { return sim->warps * lsa::kWarpSize; }
  uint64_t post(int op, unsigned mask, int src, uint64_t payload) {
    Lane& me = sim->lanes[g];
    me.op = op;
    me.mask = mask;
    me.src = src;
    me.payload = payload;
    swapcontext(&me.ctx, &sim->sched);
    return me.result;
  }
  void sync() {
    if (!sim->drop_sync) post(kSync, lsa::kFullMask, lane(), 0);
  }
  double shfl_xor(double x, int off) {
    uint64_t u;
    std::memcpy(&u, &x, sizeof u);
    u = post(kShfl, sim->shfl_mask, lane() ^ off, u);
    double r;
    std::memcpy(&r, &u, sizeof r);
    return r;
  }
  int shfl_xor(int x, int off) {
    return static_cast<int>(static_cast<uint32_t>(post(kShfl, sim->shfl_mask, lane() ^ off, static_cast<uint32_t>(x))));
  }
  bool any(bool p) { return post(kAny, lsa::kFullMask, lane(), p ? 1 : 0) != 0; }
  void barrier() {
    if (!sim->drop_barrier) post(kBar, 0, 0, 0);
  }
  // lsa::ClusterThreads' Prims: thread g is thread g % T of block g / T.
  int rank() const { return g / sim->block_threads; }
  int ranks() const { return size() / sim->block_threads; }
  int block_tid() const { return g % sim->block_threads; }
  int block_size() const { return sim->block_threads; }
  void cluster_sync() { barrier(); }
  bool barrier_or(bool p) { return sim->drop_barrier ? p : post(kBarOr, 0, 0, p ? 1 : 0) != 0; }
};

thread_local Sim* tl_sim = nullptr;

void lane_entry(int g) {
  Sim* sim = tl_sim;
  SimLanes ln{sim, g};
  sim->body(g / lsa::kWarpSize, ln);
  sim->lanes[g].op = kDone;
  swapcontext(&sim->lanes[g].ctx, &sim->sched);  // never resumed
}

constexpr size_t kStack = 256 * 1024;

void Sim::run_block() {
  const int n = warps * lsa::kWarpSize;
  lanes.assign(n, Lane{});
  stacks.resize(n);
  tl_sim = this;
  for (int g = 0; g < n; ++g) {
    stacks[g].resize(kStack);
    getcontext(&lanes[g].ctx);
    lanes[g].ctx.uc_stack.ss_sp = stacks[g].data();
    lanes[g].ctx.uc_stack.ss_size = kStack;
    lanes[g].ctx.uc_link = nullptr;
    makecontext(&lanes[g].ctx, reinterpret_cast<void (*)()>(lane_entry), 1, g);
  }
  std::vector<int> ready(n);
  for (int g = 0; g < n; ++g) ready[g] = g;
  while (!ready.empty()) {
    for (size_t k = ready.size(); k > 1; --k) std::swap(ready[k - 1], ready[next_random() % k]);
    for (const int g : ready) swapcontext(&sched, &lanes[g].ctx);  // to its next primitive
    ready.clear();
    if (resolve_block()) {
      for (int g = 0; g < n; ++g) ready.push_back(g);
      continue;
    }
    if (!error.empty()) return;
    int done_all = 0;
    for (int wp = 0; wp < warps; ++wp) {
      Lane* L = &lanes[wp * lsa::kWarpSize];
      int done = 0, at_block = 0;
      for (int l = 0; l < lsa::kWarpSize; ++l) {
        done += L[l].op == kDone;
        at_block += L[l].op == kBar || L[l].op == kBarOr;
      }
      done_all += done;
      if (done == lsa::kWarpSize || at_block > 0) continue;  // finished, or (partly) at a barrier
      const std::string where = "warp " + std::to_string(wp) + ": ";
      if (done > 0) {
        error = where + std::to_string(done) + " lanes exited while the others wait at a warp primitive";
        return;
      }
      for (int l = 0; l < lsa::kWarpSize; ++l) {
        if (L[l].op != L[0].op || L[l].mask != L[0].mask) {
          error = where + "lanes 0 and " + std::to_string(l) + " wait at different warp primitives or masks " +
                  "(divergent warp)";
          return;
        }
        if (!((L[l].mask >> l) & 1u)) {
          error = where + "lane " + std::to_string(l) + " executes a collective whose mask leaves it out";
          return;
        }
        if (L[l].op == kShfl && !((L[l].mask >> L[l].src) & 1u)) {
          error = where + "lane " + std::to_string(l) + " shuffles from lane " + std::to_string(L[l].src) +
                  ", outside the mask";
          return;
        }
      }
      uint64_t any = 0;
      for (int l = 0; l < lsa::kWarpSize; ++l) any |= L[l].payload;
      for (int l = 0; l < lsa::kWarpSize; ++l) {
        L[l].result = L[0].op == kShfl ? L[L[l].src].payload : (L[0].op == kAny ? (any != 0) : 0);
        ready.push_back(wp * lsa::kWarpSize + l);
      }
    }
    if (ready.empty() && done_all < n) {
      error = "deadlock: threads wait at a barrier that the others do not reach (divergent block, or a lane "
              "at a warp primitive while its warp waits at a barrier)";
      return;
    }
  }
}

// A barrier completes when every thread of the block waits at it (a thread that
// has exited counts as missing: on the GPU the others would hang).
bool Sim::resolve_block() {
  const int n = warps * lsa::kWarpSize;
  const int op = lanes[0].op;
  if (op != kBar && op != kBarOr) return false;
  uint64_t any = 0;
  for (int g = 0; g < n; ++g) {
    if (lanes[g].op != op) return false;
    any |= lanes[g].payload;
  }
  for (int g = 0; g < n; ++g) lanes[g].result = op == kBarOr ? (any != 0) : 0;
  return true;
}

}  // namespace warpsim

template <typename scalar_t>
void warp_sim_impl(const at::Tensor& cost, const int64_t* num_cols, bool maximize, bool scipy_ties, int warps,
                   int64_t* out) {
  const int64_t B = cost.size(0), N = cost.size(1), M = cost.size(2);
  const int64_t R = std::min(N, M), C = std::max(N, M);
  const size_t slice = lsa::warp_slice_bytes<scalar_t>(R, C);  // a multiple of 16
  std::vector<double> smem(slice / sizeof(double) * warps + 2);
  char* smem_base = reinterpret_cast<char*>(smem.data());
  warpsim::Sim sim;
  sim.warps = warps;
  sim.set_fault(std::getenv("UNIT_FAST_LSA_SIM_FAULT"));
  const scalar_t* base = cost.data_ptr<scalar_t>();
  const double sign = maximize ? -1.0 : 1.0;
  for (int64_t blk = 0; blk * warps < B; ++blk) {
    sim.body = [&](int wp, warpsim::SimLanes& ln) {
      const int64_t b = blk * warps + wp;
      if (b >= B) return;  // the whole warp, as in the kernel
      lsa::solve_warp<scalar_t>(ln, base + b * cost.stride(0), cost.stride(1), cost.stride(2), static_cast<int>(N),
                                static_cast<int>(M), num_cols, b, sign, !scipy_ties, out + b * N,
                                smem_base + wp * slice, R, C);
    };
    sim.run_block();
    TORCH_CHECK(sim.error.empty(), "hungarian_match warp simulation, block ", blk, ": ", sim.error);
  }
}

// The block path (threads a multiple of 32): lsa::solve_block -- the CUDA block
// kernel's body -- on `threads` interleaved fibers, one problem per simulated
// block, with the same checks (and faults) as the warp path plus barriers.  With
// cluster > 1, the cluster path: lsa::solve_cluster -- the CUDA cluster kernel's
// body -- on cluster * threads fibers, one problem per simulated cluster; the
// leader's scratch and workspace are the one BlockScratch and buffer every fiber
// addresses (DSMEM on the GPU), and a barrier completes when every thread of
// every block waits at it.
template <typename scalar_t>
void block_fiber_sim_impl(const at::Tensor& cost, const int64_t* num_cols, bool maximize, bool scipy_ties,
                          int threads, int cluster, int64_t* out) {
  const int64_t B = cost.size(0), N = cost.size(1), M = cost.size(2);
  const int64_t R = std::min(N, M), C = std::max(N, M);
  std::vector<double> ws(lsa::workspace_bytes(R, C) / sizeof(double) + 2);
  lsa::BlockScratch scratch{};
  warpsim::Sim sim;
  sim.warps = cluster * threads / lsa::kWarpSize;
  sim.block_threads = threads;
  sim.set_fault(std::getenv("UNIT_FAST_LSA_SIM_FAULT"));
  const scalar_t* base = cost.data_ptr<scalar_t>();
  const double sign = maximize ? -1.0 : 1.0;
  for (int64_t b = 0; b < B; ++b) {
    const scalar_t* cb = base + b * cost.stride(0);
    sim.body = [&](int, warpsim::SimLanes& th) {
      if (cluster > 1)
        lsa::solve_cluster<scalar_t>(th, &scratch, cb, cost.stride(1), cost.stride(2), static_cast<int>(N),
                                     static_cast<int>(M), num_cols, b, sign, !scipy_ties, out + b * N, ws.data(), R,
                                     C);
      else
        lsa::solve_block<scalar_t>(th, &scratch, cb, cost.stride(1), cost.stride(2), static_cast<int>(N),
                                   static_cast<int>(M), num_cols, b, sign, !scipy_ties, out + b * N, ws.data(), R, C);
    };
    sim.run_block();
    TORCH_CHECK(sim.error.empty(), "hungarian_match ", cluster > 1 ? "cluster" : "block", " simulation, problem ", b,
                ": ", sim.error);
  }
}
#endif  // UF_LSA_WARP_SIM

at::Tensor hungarian_match_block_sim_kernel(const at::Tensor& cost, const c10::optional<at::Tensor>& num_cols,
                                            bool maximize, bool scipy_ties, int64_t threads, int64_t cluster) {
  check_hungarian_match_args(cost, num_cols);
  TORCH_CHECK_VALUE(cluster >= 1 && cluster <= 16, "cluster must be in [1, 16] blocks, got ", cluster);
  TORCH_CHECK_VALUE(cluster == 1 || (threads > 0 && threads % lsa::kWarpSize == 0 &&
                                     cluster * threads <= lsa::kWarpSize * lsa::kMaxBlockWarps),
                    "the cluster path needs threads a multiple of 32 with cluster * threads <= ",
                    lsa::kWarpSize * lsa::kMaxBlockWarps, ", got threads ", threads, ", cluster ", cluster);
  TORCH_CHECK_VALUE((threads >= 1 && threads <= 1024) || (threads >= -8 && threads <= -1),
                    "threads must be in [1, 1024] (block path: threads per block) or [-8, -1] (warp path: "
                    "-warps per block), got ", threads);
#if !UF_LSA_WARP_SIM
  TORCH_CHECK(threads > 0 && cluster == 1, "the warp- and cluster-path simulations need ucontext (Linux)");
#endif
  at::Tensor out = at::empty({cost.size(0), cost.size(1)}, cost.options().dtype(at::kLong));
  if (out.numel() == 0) return out;
  at::Tensor nc = num_cols.has_value() ? num_cols->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cost.scalar_type(), "hungarian_match_block_sim", [&] {
    const int64_t* ncp = nc.defined() ? nc.data_ptr<int64_t>() : nullptr;
#if UF_LSA_WARP_SIM
    if (threads < 0)
      return warp_sim_impl<scalar_t>(cost, ncp, maximize, scipy_ties, static_cast<int>(-threads),
                                     out.data_ptr<int64_t>());
    if (threads % lsa::kWarpSize == 0)
      return block_fiber_sim_impl<scalar_t>(cost, ncp, maximize, scipy_ties, static_cast<int>(threads),
                                            static_cast<int>(cluster), out.data_ptr<int64_t>());
#endif
    block_sim_impl<scalar_t>(cost, ncp, maximize, scipy_ties, static_cast<int>(threads), out.data_ptr<int64_t>());
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
