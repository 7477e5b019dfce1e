// Shortest-augmenting-path linear-sum assignment: the algorithm core shared by
// the CPU kernel (one thread per problem) and the CUDA kernel (one warp per
// problem, several per block, for problems whose cost tile fits in shared
// memory; one block per problem above that).
//
// Algorithm: Crouse, "On implementing 2D rectangular assignment algorithms",
// IEEE TAES 2016 -- the family scipy.optimize.linear_sum_assignment uses.  For a
// working problem with nr <= nc rows/columns, each row in turn is added by a
// Dijkstra search over reduced costs c(i,j) - u[i] - v[j] >= 0 from that row to
// the nearest free column, followed by a dual update and an augmentation along
// the path.  O(nr^2 nc) worst case.
//
// Every loop over rows or columns takes (start, stride): the CPU calls it with
// (0, 1), a CUDA block with (threadIdx.x, blockDim.x), a warp with (lane, 32),
// and then combines the per-thread results.  solve() at the bottom is the one
// driver for all of them (see the Block policies there, and WarpBlock for the
// one-warp-per-problem path).
//
// Tie-breaking: the column chosen in each Dijkstra step is the one scipy's
// implementation chooses (smallest reduced cost; among equal costs a free
// column, the free one latest in scipy's "remaining" list, else the assigned
// one earliest in it).  The "remaining" list is kept as rem[] plus its inverse
// pos[], so any scan order -- sequential or strided across threads -- picks the
// same column.  With scipy_ties the solution is bit-identical to scipy's for the
// same double-precision costs (same operations in the same order; there are no
// multiplications, so FMA contraction cannot change anything).
//
// Without scipy_ties, a Jonker-Volgenant start (Jonker & Volgenant, Computing
// 1987) runs first: column reduction and reduction transfer (square problems),
// then two passes of augmenting row reduction -- an auction-like step that
// assigns a free row to its cheapest reduced column and lowers that column's
// dual to the row's second-cheapest.  Each step keeps a partial assignment with
// feasible duals satisfying complementary slackness, so the search that follows
// stays exact; for rectangular problems (nr < nc) the duals start at v = 0 and
// only assigned columns are ever lowered, which keeps v <= 0 with v = 0 on free
// columns, the rectangular optimality condition.  This leaves only a few rows
// for the Dijkstra phase.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define UF_HD __host__ __device__ __forceinline__
#else
#define UF_HD inline
#endif

// Everything below lives in an inline namespace named after the instruction
// set it is compiled for (UF_LSA_ISA, "generic" unless a translation unit
// says otherwise): the CPU kernel compiles this header a second time for AVX2
// (hungarian_match_avx2.cpp), and distinct mangled names keep the linker from
// merging those inline functions with the generic ones.
#ifndef UF_LSA_ISA
#define UF_LSA_ISA generic
#endif

namespace unit_fast {
namespace lsa {
inline namespace UF_LSA_ISA {

// Output codes written over a whole problem's row of the result.
constexpr int64_t kUnassigned = -1;
constexpr int64_t kInvalid = -2;     // NaN or -inf in the active costs, or bad num_cols
constexpr int64_t kInfeasible = -3;  // no complete assignment with finite cost

constexpr int kStatusOk = 0;
constexpr int kStatusInvalid = 1;
constexpr int kStatusInfeasible = 2;

// Working view of one problem: rows are the smaller side.  Element (i, j) is
// sign * cost[i * s_row + j * s_col] in double precision.
template <typename scalar_t>
struct Problem {
  const scalar_t* cost;
  int64_t s_row;
  int64_t s_col;
  int nr;
  int nc;
  double sign;
  UF_HD double at(int i, int j) const {
    return sign * static_cast<double>(static_cast<float>(cost[i * s_row + j * s_col]));
  }
};

// Doubles are read without the float hop (it would round them).
template <>
UF_HD double Problem<double>::at(int i, int j) const {
  return sign * cost[i * s_row + j * s_col];
}

// Problem b of a batch: N rows, num_cols[b] (or M) active columns.  Working
// rows are the smaller side, so the problem is transposed when it has fewer
// columns than rows (as scipy does).  valid is false for num_cols outside [0, M].
struct Shape {
  bool valid;
  bool transposed;
  int nr;
  int nc;
};

UF_HD Shape problem_shape(int64_t N, int64_t M, const int64_t* num_cols, int64_t b) {
  const int64_t cols = num_cols ? num_cols[b] : M;
  if (cols < 0 || cols > M) return Shape{false, false, 0, 0};
  const bool transposed = cols < N;
  return Shape{true, transposed, static_cast<int>(transposed ? cols : N), static_cast<int>(transposed ? N : cols)};
}

// A contiguous row-major problem: the CPU kernel's copy, sign applied, stored
// as float for float/half/bfloat16 inputs (exact, and half the cache traffic)
// and as double for double inputs.  Arithmetic is in double either way.
template <typename T>
struct DenseProblem {
  const T* cost;
  int nr;
  int nc;
  UF_HD double at(int i, int j) const { return static_cast<double>(cost[static_cast<int64_t>(i) * nc + j]); }
};

// Solver state, duals and path costs of type V.  Sizes: rows R = max nr,
// columns C = max nc of any problem that will use this workspace.  V is double
// everywhere except the CPU kernel's fast float path (lsa_simd.h), whose
// vector loops need float lanes.
template <typename V>
struct WorkspaceT {
  using value_t = V;
  V* u;              // [R] row duals
  V* v;              // [C] column duals
  V* spc;            // [C] shortest path cost to each column in this search
  int32_t* col4row;  // [R] column assigned to each row, -1 if none
  int32_t* row4col;  // [C] row assigned to each column, -1 if none
  int32_t* path;     // [C] predecessor row of each column in the search tree
  int32_t* rem;      // [C] scipy's "remaining" column list
  int32_t* pos;      // [C] inverse of rem: position of column j in rem
  uint8_t* SR;       // [R] row reached in this search
  uint8_t* SC;       // [C] column settled in this search
};
using Workspace = WorkspaceT<double>;

UF_HD size_t align16(size_t n) { return (n + 15) & ~static_cast<size_t>(15); }

template <typename V = double>
UF_HD size_t workspace_bytes(int64_t R, int64_t C) {
  return align16(sizeof(V) * (R + 2 * C)) + align16(sizeof(int32_t) * (R + 4 * C)) +
         align16(R + C);
}

template <typename V = double>
UF_HD WorkspaceT<V> carve_workspace(void* base, int64_t R, int64_t C) {
  WorkspaceT<V> w;
  char* p = static_cast<char*>(base);
  w.u = reinterpret_cast<V*>(p);
  w.v = w.u + R;
  w.spc = w.v + C;
  p += align16(sizeof(V) * (R + 2 * C));
  w.col4row = reinterpret_cast<int32_t*>(p);
  w.row4col = w.col4row + R;
  w.path = w.row4col + C;
  w.rem = w.path + C;
  w.pos = w.rem + C;
  p += align16(sizeof(int32_t) * (R + 4 * C));
  w.SR = reinterpret_cast<uint8_t*>(p);
  w.SC = w.SR + R;
  return w;
}

// A candidate column in a Dijkstra step; j < 0 means none.
struct Key {
  double val;
  int j;
};

// True when a is chosen over b (see the tie-breaking note above).
template <typename W>
UF_HD bool better(const W& w, Key a, Key b) {
  if (a.j < 0) return false;
  if (b.j < 0) return true;
  if (a.val != b.val) return a.val < b.val;
  const bool fa = w.row4col[a.j] < 0;
  const bool fb = w.row4col[b.j] < 0;
  if (fa != fb) return fa;
  return fa ? w.pos[a.j] > w.pos[b.j] : w.pos[a.j] < w.pos[b.j];
}

// (val, j) lexicographic order, no column (j < 0) last: the JV start's
// "first minimum" rule.
UF_HD bool lex_less(double a, int ja, double b, int jb) {
  if (ja < 0) return false;
  if (jb < 0) return true;
  return a < b || (a == b && ja < jb);
}

// The two smallest (val, j) of a set under lex_less, (v1, j1) <= (v2, j2).
struct TwoMin {
  double v1;
  int j1;
  double v2;
  int j2;
};

UF_HD TwoMin two_min_empty() { return TwoMin{INFINITY, -1, INFINITY, -1}; }

// Scans that visit j in increasing order use two_min_scan: strict < then keeps
// the first index on ties, which is lex_less's order, without its branches.
UF_HD void two_min_scan(TwoMin& t, double h, int j) {
  if (h < t.v2) {
    if (h < t.v1) {
      t.v2 = t.v1;
      t.j2 = t.j1;
      t.v1 = h;
      t.j1 = j;
    } else {
      t.v2 = h;
      t.j2 = j;
    }
  }
}

UF_HD void two_min_push(TwoMin& t, double h, int j) {
  if (lex_less(h, j, t.v1, t.j1)) {
    t.v2 = t.v1;
    t.j2 = t.j1;
    t.v1 = h;
    t.j1 = j;
  } else if (lex_less(h, j, t.v2, t.j2)) {
    t.v2 = h;
    t.j2 = j;
  }
}

UF_HD TwoMin two_min_merge(TwoMin a, const TwoMin& b) {
  two_min_push(a, b.v1, b.j1);
  two_min_push(a, b.v2, b.j2);
  return a;
}

// NaN or -inf: the one test !(c > -inf) catches both, and vectorises.
UF_HD bool invalid_cost(double c) { return !(c > -INFINITY); }

template <typename P>
UF_HD bool has_invalid(const P& p, int start, int stride) {
  int bad = 0;
  for (int i = 0; i < p.nr; ++i) {
    for (int j = start; j < p.nc; j += stride) bad |= invalid_cost(p.at(i, j));
  }
  return bad != 0;
}

template <typename W>
UF_HD void init(W& w, int nr, int nc, int start, int stride) {
  for (int i = start; i < nr; i += stride) {
    w.u[i] = 0.0;
    w.col4row[i] = -1;
  }
  for (int j = start; j < nc; j += stride) {
    w.v[j] = 0.0;
    w.row4col[j] = -1;
  }
}

// Clears the search state before each new row, as scipy does.
template <typename W>
UF_HD void reset_search(W& w, int nr, int nc, int start, int stride) {
  for (int i = start; i < nr; i += stride) w.SR[i] = 0;
  for (int j = start; j < nc; j += stride) {
    w.SC[j] = 0;
    w.spc[j] = INFINITY;
    // scipy fills "remaining" in reverse so a constant matrix gives the identity.
    w.rem[j] = nc - 1 - j;
    w.pos[j] = nc - 1 - j;
  }
}

// ---- Jonker-Volgenant start (fast mode only) --------------------------------

// Column reduction, parallel part: v[j] = min_i c(i, j), path[j] = its first
// argmin row (-1 for an all-forbidden column, whose v stays 0).
template <typename P, typename W>
UF_HD void column_min(const P& p, W& w, int start, int stride) {
  for (int j = start; j < p.nc; j += stride) {
    double best = INFINITY;
    int arg = -1;
    for (int i = 0; i < p.nr; ++i) {
      const double c = p.at(i, j);
      if (c < best) {
        best = c;
        arg = i;
      }
    }
    w.v[j] = arg >= 0 ? best : 0.0;
    w.path[j] = arg;
  }
}

// Column reduction, serial part (JV's order: last column first).  SR[i] counts
// the columns whose minimum is row i, saturating at 2.
template <typename W>
UF_HD void column_assign(W& w, int nc) {
  for (int j = nc - 1; j >= 0; --j) {
    const int i = w.path[j];
    if (i < 0) continue;
    if (w.SR[i] == 0) {
      w.SR[i] = 1;
      w.col4row[i] = j;
      w.row4col[j] = i;
      continue;
    }
    w.SR[i] = 2;
    const int j1 = w.col4row[i];
    if (w.v[j] < w.v[j1]) {
      w.col4row[i] = j;
      w.row4col[j] = i;
      w.row4col[j1] = -1;
    }
  }
}

// Reduction transfer for row i (assigned to j1 by exactly one column): its
// cheapest other reduced column, as a TwoMin over j != j1 (v1 is used).
template <typename P, typename W>
UF_HD TwoMin transfer_min(const P& p, const W& w, int i, int j1, int start, int stride) {
  TwoMin t = two_min_empty();
  for (int j = start; j < p.nc; j += stride) {
    if (j != j1) two_min_scan(t, p.at(i, j) - w.v[j], j);
  }
  return t;
}

// Lowers v[j1] so row i's dual rises to its second-best reduced cost.
template <typename W>
UF_HD void transfer_apply(W& w, int j1, const TwoMin& t) {
  if (t.v1 < INFINITY) w.v[j1] -= t.v1;
}

// Augmenting row reduction, parallel part: row i's two cheapest reduced columns.
template <typename P, typename W>
UF_HD TwoMin row_two_min(const P& p, const W& w, int i, int start, int stride) {
  TwoMin t = two_min_empty();
  for (int j = start; j < p.nc; j += stride) two_min_scan(t, p.at(i, j) - w.v[j], j);
  return t;
}

// Augmenting row reduction, serial part, for free row i.  Returns the row it
// displaced (>= 0), -1 for none, or -2 when the row is left for the search
// (no finite column, or a transfer would need an infinite dual).  *again tells
// JV's rule: a displaced row whose column became dearer is retried at once.
template <typename W>
UF_HD int arr_step(W& w, int i, const TwoMin& t, bool* again) {
  *again = false;
  if (!(t.v1 < INFINITY)) return -2;
  int j1 = t.j1;
  int i0 = w.row4col[j1];
  if (t.v1 < t.v2) {
    if (t.v2 < INFINITY) {
      w.v[j1] -= t.v2 - t.v1;
      *again = true;
    } else if (i0 >= 0) {
      return -2;
    }
  } else if (i0 >= 0) {
    j1 = t.j2;  // equal best two: take the second, displace its row instead
    i0 = w.row4col[j1];
  }
  if (i0 >= 0) w.col4row[i0] = -1;
  w.col4row[i] = j1;
  w.row4col[j1] = i;
  return i0;
}

// After the start: the dual of each assigned row is its reduced cost on its
// column (0 for free rows; the search overwrites those).
template <typename P, typename W>
UF_HD void set_row_duals(const P& p, W& w, int start, int stride) {
  for (int i = start; i < p.nr; i += stride) {
    const int j = w.col4row[i];
    w.u[i] = j >= 0 ? p.at(i, j) - w.v[j] : 0.0;
  }
}

// JV's two passes over the free-row list rem[0..n_free), serial bookkeeping
// around a caller-supplied row_two_min (block-reduced on CUDA).  The retry
// budget bounds the auction's worst case; rows it leaves free go to the search.
struct ArrState {
  int pass;
  int k;
  int prev;
  int n_free;
  int budget;
  int row;  // the row being reduced now, -1 when done (read by every thread)
};

UF_HD ArrState arr_begin(int n_free, int budget) { return ArrState{0, 0, n_free, 0, budget, -1}; }

#ifndef UF_ARR_BUDGET
#define UF_ARR_BUDGET(nr) (2 * (nr) + 16)
#endif
UF_HD int arr_budget(int nr) { return UF_ARR_BUDGET(nr); }

// Next free row to reduce, or -1 when both passes are done.
template <typename W>
UF_HD int arr_next(W& w, ArrState& s) {
  while (s.k >= s.prev) {
    if (++s.pass >= 2 || s.n_free == 0) return -1;
    s.prev = s.n_free;
    s.n_free = 0;
    s.k = 0;
  }
  return w.rem[s.k++];
}

template <typename W>
UF_HD void arr_done(W& w, ArrState& s, int i, const TwoMin& t) {
  bool again = false;
  const int i0 = arr_step(w, i, t, &again);
  if (i0 < 0) return;
  if (again && s.budget > 0) {
    --s.budget;
    w.rem[--s.k] = i0;
  } else {
    w.rem[s.n_free++] = i0;
  }
}

// Free rows after column reduction (or all rows), in row order, into rem[].
template <typename W>
UF_HD int collect_free_rows(W& w, int nr) {
  int n = 0;
  for (int i = 0; i < nr; ++i)
    if (w.col4row[i] < 0) w.rem[n++] = i;
  return n;
}

// One Dijkstra relaxation from row i over the unsettled columns; returns this
// thread's best column.  Expression order matches scipy's for bit-equality.
template <typename P, typename W>
UF_HD Key scan(const P& p, W& w, int i, double min_val, int start, int stride) {
  Key best{INFINITY, -1};
  const double ui = w.u[i];
  for (int j = start; j < p.nc; j += stride) {
    if (w.SC[j]) continue;
    const double r = min_val + p.at(i, j) - ui - w.v[j];
    if (r < w.spc[j]) {
      w.path[j] = i;
      w.spc[j] = r;
    }
    const double s = w.spc[j];
    if (s < best.val || best.j < 0) {
      best = Key{s, j};
    } else if (s == best.val && better(w, Key{s, j}, best)) {
      best = Key{s, j};  // ties are rare with real costs: the full order only here
    }
  }
  return best;
}

// The same relaxation over rem[0..n_rem) (scipy's loop): it visits only the
// unsettled columns, half as many as scan() on average over a search, at the
// price of a gather -- the better trade on a CPU.  Same result as scan().
template <typename P, typename W>
UF_HD Key scan_remaining(const P& p, W& w, int i, double min_val, int n_rem) {
  Key best{INFINITY, -1};
  const double ui = w.u[i];
  for (int k = 0; k < n_rem; ++k) {
    const int j = w.rem[k];
    const double r = min_val + p.at(i, j) - ui - w.v[j];
    double s = w.spc[j];
    if (r < s) {
      w.path[j] = i;
      w.spc[j] = s = r;
    }
    if (s < best.val || best.j < 0) {
      best = Key{s, j};
    } else if (s == best.val && better(w, Key{s, j}, best)) {
      best = Key{s, j};
    }
  }
  return best;
}

// scan_remaining with the list rem[0..n_rem) strided across workers (lane l of
// a warp takes k = l, l + 32, ...): the GPU scan.  Only unsettled columns are
// visited -- the scan shrinks by one column per step, where scan() re-reads
// every column and skips the settled ones -- and the worker's local minimum
// under better() is merged by the caller.  On the GPU the gather rem[k] is a
// shared-memory read; rem starts as nc-1, nc-2, ... and settle() moves one
// entry per step, so consecutive lanes still read mostly adjacent columns.
template <typename P, typename W>
UF_HD Key scan_remaining_strided(const P& p, W& w, int i, double min_val, int n_rem, int start, int stride) {
  Key best{INFINITY, -1};
  const double ui = w.u[i];
  for (int k = start; k < n_rem; k += stride) {
    const int j = w.rem[k];
    const double r = min_val + p.at(i, j) - ui - w.v[j];
    double s = w.spc[j];
    if (r < s) {
      w.path[j] = i;
      w.spc[j] = s = r;
    }
    if (s < best.val || best.j < 0) {
      best = Key{s, j};
    } else if (s == best.val && better(w, Key{s, j}, best)) {
      best = Key{s, j};
    }
  }
  return best;
}

// Settles column j, chosen by a search step: removes it from rem[] (n_rem is
// the count after removal) and marks the row it leads to (next >= 0) reached.
template <typename W>
UF_HD void settle(W& w, int j, int n_rem, int next) {
  w.SC[j] = 1;
  const int p = w.pos[j];
  const int last = w.rem[n_rem];
  w.rem[p] = last;
  w.pos[last] = p;
  if (next >= 0) w.SR[next] = 1;
}

template <typename W>
UF_HD void update_duals(W& w, int nr, int nc, int cur, double min_val, int start,
                        int stride) {
  for (int i = start; i < nr; i += stride) {
    if (i == cur)
      w.u[i] += min_val;
    else if (w.SR[i])
      w.u[i] += min_val - w.spc[w.col4row[i]];
  }
  for (int j = start; j < nc; j += stride) {
    if (w.SC[j]) w.v[j] -= min_val - w.spc[j];
  }
}

// Flips the search tree's path from sink back to row cur.  That path meets each reached row
// once, so it has at most nr steps: the bound never binds in a correct solve, and it turns a
// corrupted tree (a broken decomposition under the CPU simulation, which cannot preempt a
// fiber caught in a loop) into a wrong answer the tests see instead of a hang.
template <typename W>
UF_HD void augment(W& w, int nr, int cur, int sink) {
  int j = sink;
  for (int step = 0; step < nr && j >= 0; ++step) {
    const int i = w.path[j];
    if (i < 0 || i >= nr) break;
    w.row4col[j] = i;
    const int prev = w.col4row[i];
    w.col4row[i] = j;
    j = prev;
    if (i == cur) break;
  }
}

// out[0..N) for one problem: the column of each original row.  In a transposed
// problem the working columns are the original rows.
template <typename W>
UF_HD void write_result(const W& w, int status, bool transposed, int n_out, int64_t* out,
                        int start, int stride) {
  for (int k = start; k < n_out; k += stride) {
    if (status == kStatusInvalid)
      out[k] = kInvalid;
    else if (status == kStatusInfeasible)
      out[k] = kInfeasible;
    else
      out[k] = transposed ? w.row4col[k] : w.col4row[k];
  }
}

// ---- The driver ---------------------------------------------------------------
//
// One solve, written once for every execution policy.  A Block provides:
//   all(f)      every thread runs f(start, stride), then a barrier;
//   single(f)   one thread runs f(), then a barrier;
//   any(f)      OR over threads of f(start, stride), seen by every thread;
//   two_min(f)  two_min_merge over threads of f(start, stride), seen by all;
//   scan(p, w, i, min_val, n_rem)
//               one Dijkstra relaxation from row i: the better() minimum over
//               threads, seen by all.
// Values every thread computes from those results (i, min_val, n_rem) stay
// uniform, so control flow never diverges inside a block.  SerialBlock below
// is the CPU kernel, SimBlock a sequential model of a block's decomposition;
// WarpBlock and ThreadBlock (further down) are the CUDA paths, templated on the
// warp/block primitives so that the CPU simulation runs the same code on
// interleaved fibers.

template <typename P, typename Block, typename W>
UF_HD void jv_start(const P& p, W& w, Block& blk, ArrState* st) {
  const int nr = p.nr, nc = p.nc;
  blk.all([&](int s, int t) {
    for (int i = s; i < nr; i += t) w.SR[i] = 0;
  });
  if (nr == nc) {
    blk.all([&](int s, int t) { column_min(p, w, s, t); });
    blk.single([&] { column_assign(w, nc); });
    for (int i = 0; i < nr; ++i) {
      if (w.SR[i] != 1) continue;  // SR is not written again until the search
      const int j1 = w.col4row[i];
      const TwoMin m = blk.two_min([&](int s, int t) { return transfer_min(p, w, i, j1, s, t); });
      blk.single([&] { transfer_apply(w, j1, m); });
    }
  }
  blk.single([&] {
    *st = arr_begin(collect_free_rows(w, nr), arr_budget(nr));
    st->row = arr_next(w, *st);
  });
  while (st->row >= 0) {
    const int i = st->row;
    const TwoMin m = blk.two_min([&](int s, int t) { return row_two_min(p, w, i, s, t); });
    blk.single([&] {
      arr_done(w, *st, i, m);
      st->row = arr_next(w, *st);
    });
  }
  blk.all([&](int s, int t) { set_row_duals(p, w, s, t); });
}

// Solves one working problem.  check_invalid: scan the costs for NaN / -inf
// first (the CPU kernel checks while copying instead).  st: scratch for the JV
// start that every thread can read (shared memory on CUDA).  Returns a status.
template <typename P, typename Block, typename W>
UF_HD int solve(const P& p, W& w, bool use_jv_start, bool check_invalid, Block& blk, ArrState* st) {
  const int nr = p.nr, nc = p.nc;
  blk.all([&](int s, int t) { init(w, nr, nc, s, t); });
  if (nr == 0 || nc == 0) return kStatusOk;
  if (check_invalid && blk.any([&](int s, int t) { return has_invalid(p, s, t); })) return kStatusInvalid;
  if (use_jv_start) jv_start(p, w, blk, st);
  for (int cur = 0; cur < nr; ++cur) {
    if (w.col4row[cur] >= 0) continue;
    blk.all([&](int s, int t) { reset_search(w, nr, nc, s, t); });
    blk.single([&] { w.SR[cur] = 1; });
    int i = cur, n_rem = nc, sink = -1;
    double min_val = 0.0;
    while (sink < 0) {
      const Key k = blk.scan(p, w, i, min_val, n_rem);
      if (k.j < 0 || !(k.val < INFINITY)) return kStatusInfeasible;
      min_val = k.val;
      --n_rem;
      const int next = w.row4col[k.j];  // settle() does not change row4col
      blk.single([&] { settle(w, k.j, n_rem, next); });
      if (next < 0)
        sink = k.j;
      else
        i = next;
    }
    blk.all([&](int s, int t) { update_duals(w, nr, nc, cur, min_val, s, t); });
    blk.single([&] { augment(w, nr, cur, sink); });
  }
  return kStatusOk;
}

// Host execution policy of the CPU kernel: one thread.  The constant (0, 1)
// start/stride lets every loop compile to a plain unit-stride loop.
struct SerialBlock {
  template <typename F>
  void all(F f) {
    f(0, 1);
  }
  template <typename F>
  void single(F f) {
    f();
  }
  template <typename F>
  bool any(F f) {
    return f(0, 1);
  }
  template <typename F>
  TwoMin two_min(F f) {
    return f(0, 1);
  }
  template <typename P, typename W>
  Key scan(const P& p, W& w, int i, double min_val, int n_rem) {
    return scan_remaining(p, w, i, min_val, n_rem);
  }
};

// A CUDA block of T threads simulated on the host, one thread after another.
// Between barriers the algorithm's threads touch disjoint columns or only read
// shared state, so running them in sequence computes exactly what the block
// computes.  Only the work decomposition is modelled (any T, also T that no
// kernel launches); ThreadBlock below, run on interleaved fibers, is the CPU
// model of the CUDA block path itself, warps and barriers included.
struct SimBlock {
  int T;
  template <typename F>
  void all(F f) {
    for (int t = 0; t < T; ++t) f(t, T);
  }
  template <typename F>
  void single(F f) {
    f();
  }
  template <typename F>
  bool any(F f) {
    bool r = false;
    for (int t = 0; t < T; ++t) r = f(t, T) || r;
    return r;
  }
  template <typename F>
  TwoMin two_min(F f) {
    TwoMin m = two_min_empty();
    for (int t = 0; t < T; ++t) m = two_min_merge(m, f(t, T));
    return m;
  }
  template <typename P, typename W>
  Key scan(const P& p, W& w, int i, double min_val, int n_rem) {
    Key best{INFINITY, -1};
    for (int t = 0; t < T; ++t) {
      const Key k = scan_remaining_strided(p, w, i, min_val, n_rem, t, T);
      if (better(w, k, best)) best = k;
    }
    return best;
  }
};

// ---- One warp per problem ------------------------------------------------------
//
// The small-problem GPU path: each warp of a block owns one problem, so a
// block of W warps solves W problems and no block barrier is ever needed.  The
// same driver (solve) runs under WarpBlock, whose collectives are warp
// primitives of a Lanes type:
//   lane()           this lane, 0..31;
//   sync()           __syncwarp(kFullMask): the memory fence between lanes;
//   shfl_xor(x, o)   __shfl_xor_sync(kFullMask, x, o) for double and int;
//   any(p)           __any_sync(kFullMask, p).
// CudaLanes (cuda/hungarian_match_kernel.cu) maps them to the intrinsics;
// the CPU test-only simulation (cpu/hungarian_match_kernel.cpp, SimLanes) runs
// the 32 lanes as interleaved fibers that meet at each primitive, so a missing
// sync() or a wrong mask changes what the CPU tests see.
//
// Warp-synchronous rules this code keeps (and the simulation checks):
//   * control flow is warp-uniform: every value a branch depends on is either
//     a butterfly result (identical in all lanes) or shared state read after
//     a sync();
//   * every collective names all 32 lanes (kFullMask), and every lane reaches
//     it: a warp never exits early, problems past the batch skip as a whole;
//   * shared state written by lane 0 (single) or by each lane for its own
//     columns (all) is read by other lanes only after sync().
// Reductions are butterflies (shfl_xor), so every lane ends with the result and
// nothing is broadcast through shared memory.  better() and lex_less are total
// orders on distinct columns, so every lane computes the same minimum whatever
// the pairing order.
//
// What was taken from the two designs the issue names:
//   * torch-linear-assignment 0.1.0 (Triton): one program per problem with
//     no barriers, and a contiguous transposed copy so scans are unit stride.
//     Taken: one warp per problem, no barriers, the transposed copy -- made in
//     shared memory by the warp itself (coalesced reads of the input in its own
//     layout), so there is no extra kernel and no global scratch.  Not taken:
//     its state in registers (that is why it recompiles for every new shape) and
//     its two host syncs per call; here shapes are runtime values and errors are
//     codes in the output, so a call never syncs.  For problems too large to
//     stage (DINO's 900 x 100), the launcher makes its contiguous transposed
//     copy in global memory instead, so the block and cluster paths' scans are
//     unit stride too.
//   * HyLAC (Kawtikwar & Nagi, JPDC 2024): a granularity per problem size --
//     a tiled "stream" solver for many small problems, a block per problem, and
//     a many-block solver for one large problem; coalesced access and few host
//     syncs.  Taken: the size-based choice between the warp, block and cluster
//     paths (launch() in the .cu), and several blocks on one large problem --
//     as a thread-block cluster (ClusterThreads, below) rather than HyLAC's
//     blocks meeting in global memory.
//
// Precision (FP32 where exact, FP64 where needed):
//   * the staged cost tile is float for float, half and bfloat16 inputs:
//     converting those to float and flipping the sign are exact, so nothing is
//     lost and the tile takes half the shared memory of doubles (DETR's 20 x 100
//     is 8 KB); double inputs keep a double tile (rounding them would change the
//     problem);
//   * duals u, v and path costs spc stay FP64: they accumulate a sum of O(nr)
//     cost differences per search, and the contract is scipy's total (and, with
//     scipy_ties, scipy's exact assignment, which depends on double rounding of
//     the same expressions).  Float duals would make reduced costs of ~1e-7
//     relative error look like ties and return a near-optimal assignment.  The
//     CPU float path (lsa_simd.h) accepts that at rel 1e-5 to run 8 float lanes
//     per instruction; on the GPU the scan is latency bound, and H100-class FP64
//     runs at half the FP32 rate, so FP64 state costs little;
//   * indices are int32 and flags bytes (exact).

#ifndef UF_LSA_FULL_MASK
#define UF_LSA_FULL_MASK 0xffffffffu
#endif
constexpr unsigned kFullMask = UF_LSA_FULL_MASK;
constexpr int kWarpSize = 32;

template <typename Lanes>
struct WarpBlock {
  Lanes& ln;
  template <typename F>
  UF_HD void all(F f) {
    f(ln.lane(), kWarpSize);
    ln.sync();
  }
  template <typename F>
  UF_HD void single(F f) {
    if (ln.lane() == 0) f();
    ln.sync();
  }
  template <typename F>
  UF_HD bool any(F f) {
    return ln.any(f(ln.lane(), kWarpSize));
  }
  template <typename F>
  UF_HD TwoMin two_min(F f) {
    TwoMin t = f(ln.lane(), kWarpSize);
    for (int off = kWarpSize / 2; off > 0; off >>= 1) {
      TwoMin o;
      o.v1 = ln.shfl_xor(t.v1, off);
      o.j1 = ln.shfl_xor(t.j1, off);
      o.v2 = ln.shfl_xor(t.v2, off);
      o.j2 = ln.shfl_xor(t.j2, off);
      t = two_min_merge(t, o);
    }
    return t;
  }
  template <typename P, typename W>
  UF_HD Key scan(const P& p, W& w, int i, double min_val, int n_rem) {
    Key k = scan_remaining_strided(p, w, i, min_val, n_rem, ln.lane(), kWarpSize);
    for (int off = kWarpSize / 2; off > 0; off >>= 1) {
      Key o;
      o.val = ln.shfl_xor(k.val, off);
      o.j = ln.shfl_xor(k.j, off);
      if (better(w, o, k)) k = o;
    }
    // The last better() above reads pos[] and row4col[], which lane 0's
    // settle() writes next: without this sync lane 0 can run ahead and settle
    // while another lane still compares (found by the interleaved simulation).
    ln.sync();
    return k;
  }
};

// The staged tile: float for inputs narrower than double, double for double.
template <typename scalar_t>
struct TileType {
  using type = float;
};
template <>
struct TileType<double> {
  using type = double;
};

// A working problem in shared memory, row-major with an odd leading dimension
// ld = nc | 1: the transposing writes of the staging loop (stride ld) then hit
// 32 different banks.
template <typename T>
struct TileProblem {
  const T* tile;
  int ld;
  int nr;
  int nc;
  UF_HD double at(int i, int j) const { return static_cast<double>(tile[i * ld + j]); }
};

UF_HD int tile_ld(int64_t C) { return static_cast<int>(C | 1); }

// Shared memory of one warp: [workspace | ArrState | tile], each 16-aligned.
template <typename scalar_t>
UF_HD size_t warp_slice_bytes(int64_t R, int64_t C) {
  using T = typename TileType<scalar_t>::type;
  return workspace_bytes(R, C) + align16(sizeof(ArrState)) + align16(sizeof(T) * R * tile_ld(C));
}

// One problem on one warp (the CUDA warp kernel's body, and the CPU
// simulation's): stage, solve, write.  cost points at problem b ([N, M] with
// strides sN, sM), out at its N outputs, slice at warp_slice_bytes(R, C) bytes.
// Staging reads the input in its own memory order -- lane l takes element
// l, l + 32, ... along the smaller stride -- so each warp load is one or two
// 128-byte lines, and checks for NaN / -inf on the way (no second pass).
template <typename scalar_t, typename Lanes>
UF_HD void solve_warp(Lanes& ln, const scalar_t* cost, int64_t sN, int64_t sM, int N, int M,
                      const int64_t* num_cols, int64_t b, double sign, bool jv, int64_t* out, void* slice,
                      int64_t R, int64_t C) {
  using T = typename TileType<scalar_t>::type;
  const int lane = ln.lane();
  const Shape shape = problem_shape(N, M, num_cols, b);
  if (!shape.valid) {  // warp-uniform
    WorkspaceT<double> none{};
    write_result(none, kStatusInvalid, false, N, out, lane, kWarpSize);
    return;
  }
  char* base = static_cast<char*>(slice);
  Workspace w = carve_workspace(base, R, C);
  ArrState* st = reinterpret_cast<ArrState*>(base + workspace_bytes(R, C));
  T* tile = reinterpret_cast<T*>(base + workspace_bytes(R, C) + align16(sizeof(ArrState)));
  const bool tr = shape.transposed;
  const int nr = shape.nr, nc = shape.nc, ld = tile_ld(nc);
  const int64_t cols = tr ? nr : nc;  // active source columns
  const int64_t count = static_cast<int64_t>(N) * cols;
  const bool n_fast = sN < sM;  // walk the source along its smaller stride
  const T s = static_cast<T>(sign);
  int bad = 0;
  for (int64_t e = lane; e < count; e += kWarpSize) {
    const int64_t n = n_fast ? e % N : e / cols;
    const int64_t m = n_fast ? e / N : e % cols;
    const T c = s * static_cast<T>(cost[n * sN + m * sM]);
    bad |= invalid_cost(static_cast<double>(c));
    tile[tr ? m * ld + n : n * ld + m] = c;
  }
  ln.sync();
  if (ln.any(bad != 0)) {
    write_result(w, kStatusInvalid, tr, N, out, lane, kWarpSize);
    return;
  }
  const TileProblem<T> p{tile, ld, nr, nc};
  WarpBlock<Lanes> blk{ln};
  const int status = solve(p, w, jv, /*check_invalid=*/false, blk, st);
  write_result(w, status, tr, N, out, lane, kWarpSize);
}

// ---- One block per problem ---------------------------------------------------
//
// The large-problem GPU path: T = 32 * nw threads (nw warps) share one problem.
// Its Threads type adds block primitives to the warp ones of WarpBlock:
//   tid(), size()     threadIdx.x, blockDim.x (a multiple of 32);
//   barrier()         __syncthreads();
//   barrier_or(p)     __syncthreads_or(p).
// A reduction is an xor butterfly in each warp, then -- with more than one
// warp -- lane 0 of each warp writes its warp's result to a slot, one barrier,
// and every thread merges the nw slots in the same order, so every thread has
// the result with no broadcast step.  The slots alternate between two buffers:
// a thread writes buffer A again only two reductions later, after a barrier
// that every thread passes only once done reading A.  The scan ends with one
// more barrier, because its tie-break reads state that settle() writes next;
// so a Dijkstra step costs two barriers in the scan and one after settle(),
// where the previous version spent three in the scan.
constexpr int kMaxBlockWarps = 32;

struct BlockScratch {  // __shared__ on CUDA
  Key key[2][kMaxBlockWarps];
  TwoMin two[2][kMaxBlockWarps];
  uint8_t flag[2][kMaxBlockWarps];  // ClusterThreads::barrier_or's slots
  ArrState arr;
};

template <typename Threads>
struct ThreadBlock {
  Threads& th;
  BlockScratch* sh;
  int parity;  // uniform: every thread runs the same sequence of reductions

  template <typename F>
  UF_HD void all(F f) {
    f(th.tid(), th.size());
    th.barrier();
  }
  template <typename F>
  UF_HD void single(F f) {
    if (th.tid() == 0) f();
    th.barrier();
  }
  template <typename F>
  UF_HD bool any(F f) {
    return th.barrier_or(f(th.tid(), th.size()));
  }
  template <typename F>
  UF_HD TwoMin two_min(F f) {
    TwoMin t = f(th.tid(), th.size());
    for (int off = kWarpSize / 2; off > 0; off >>= 1) {
      TwoMin o;
      o.v1 = th.shfl_xor(t.v1, off);
      o.j1 = th.shfl_xor(t.j1, off);
      o.v2 = th.shfl_xor(t.v2, off);
      o.j2 = th.shfl_xor(t.j2, off);
      t = two_min_merge(t, o);
    }
    const int nw = th.size() / kWarpSize;
    if (nw == 1) return t;
    TwoMin* slot = sh->two[parity];
    parity ^= 1;
    if (th.lane() == 0) slot[th.tid() / kWarpSize] = t;
    th.barrier();
    t = slot[0];
    for (int q = 1; q < nw; ++q) t = two_min_merge(t, slot[q]);
    return t;
  }
  template <typename P, typename W>
  UF_HD Key scan(const P& p, W& w, int i, double min_val, int n_rem) {
    Key k = scan_remaining_strided(p, w, i, min_val, n_rem, th.tid(), th.size());
    for (int off = kWarpSize / 2; off > 0; off >>= 1) {
      Key o;
      o.val = th.shfl_xor(k.val, off);
      o.j = th.shfl_xor(k.j, off);
      if (better(w, o, k)) k = o;
    }
    const int nw = th.size() / kWarpSize;
    if (nw > 1) {
      Key* slot = sh->key[parity];
      parity ^= 1;
      if (th.lane() == 0) slot[th.tid() / kWarpSize] = k;
      th.barrier();
      k = slot[0];
      for (int q = 1; q < nw; ++q) {
        if (better(w, slot[q], k)) k = slot[q];
      }
    }
    // As in WarpBlock::scan: better() reads pos[] / row4col[], which thread 0's
    // settle() writes next.
    th.barrier();
    return k;
  }
};

// One problem on one block (the CUDA block kernel's body, and the CPU
// simulation's): the strided view of the input (no staging: these problems do
// not fit in shared memory), the NaN / -inf check inside the solver.  ws is
// workspace_bytes(R, C) bytes (shared or global memory).
template <typename scalar_t, typename Threads>
UF_HD void solve_block(Threads& th, BlockScratch* sh, const scalar_t* cost, int64_t sN, int64_t sM, int N, int M,
                       const int64_t* num_cols, int64_t b, double sign, bool jv, int64_t* out, void* ws, int64_t R,
                       int64_t C) {
  const Shape shape = problem_shape(N, M, num_cols, b);
  if (!shape.valid) {  // uniform over the block
    WorkspaceT<double> none{};
    write_result(none, kStatusInvalid, false, N, out, th.tid(), th.size());
    return;
  }
  const bool tr = shape.transposed;
  const Problem<scalar_t> p{cost, tr ? sM : sN, tr ? sN : sM, shape.nr, shape.nc, sign};
  Workspace w = carve_workspace(ws, R, C);
  ThreadBlock<Threads> blk{th, sh, 0};
  const int status = solve(p, w, jv, /*check_invalid=*/true, blk, &sh->arr);
  write_result(w, status, tr, N, out, th.tid(), th.size());
}

// ---- Several blocks per problem: a thread-block cluster -------------------------
//
// Few large problems (8 x 1000 x 1000, 16 x DINO's 900 x 100) would leave most SMs idle with
// one block each.  On sm_90 a cluster of K blocks (on K SMs of one GPC) shares one problem:
// the K * T threads of the cluster are one ThreadBlock, the same driver and the same
// reductions, with
//   * tid() = rank * T + threadIdx.x and size() = K * T, so every strided row/column loop
//     and every scan is spread over K SMs' load bandwidth (the JV start's column
//     reduction reads all nr * nc costs; a Dijkstra step scans every unsettled column);
//   * barrier() = cluster.sync() (barrier.cluster arrive.release / wait.acquire: it orders
//     the shared, distributed-shared and global accesses of the whole cluster);
//   * the solver state and the reduction slots in the leader's (rank 0's) shared memory,
//     which the other blocks address through distributed shared memory (DSMEM), or in a
//     global workspace when the state exceeds one block's shared memory;
//   * barrier_or as a slot reduction (there is no cluster-wide __syncthreads_or);
//   * one cluster.sync() before the first remote access (every block has started) and
//     one after the last (the leader's shared memory outlives the other blocks' reads).
// This is HyLAC's many-block idea for one large problem, in the form Hopper offers cheaply:
// HyLAC synchronises its blocks through global memory and grid-wide barriers, a cluster
// through the SM-to-SM network.  A Dijkstra step still costs three cluster barriers, so the
// gain is the wider scan and the spread column reduction, not a shorter critical path; the
// launcher uses it only for large problems on an otherwise idle GPU (see launch() in the .cu).
//
// Prims adds cluster primitives to the warp ones of WarpBlock:
//   rank(), ranks()           this block's rank in the cluster, the cluster size K;
//   block_tid(), block_size() threadIdx.x, blockDim.x (a multiple of 32);
//   cluster_sync()            cluster.sync().
// The CPU simulation runs the K * T threads as interleaved fibers of one simulated
// cluster (cpu/hungarian_match_kernel.cpp), so the decomposition and every cluster barrier
// are exercised by CPU tests.
template <typename Prims>
struct ClusterThreads {
  Prims& pr;
  BlockScratch* sh;  // the leader's scratch (barrier_or's slots live there)
  int parity;

  UF_HD int lane() const { return pr.lane(); }
  UF_HD int tid() const { return pr.rank() * pr.block_size() + pr.block_tid(); }
  UF_HD int size() const { return pr.ranks() * pr.block_size(); }
  UF_HD void barrier() { pr.cluster_sync(); }
  UF_HD bool barrier_or(bool p) {
    const bool w = pr.any(p);
    uint8_t* slot = sh->flag[parity];
    parity ^= 1;
    if (lane() == 0) slot[tid() / kWarpSize] = w ? 1 : 0;
    pr.cluster_sync();
    int r = 0;
    for (int q = 0; q < size() / kWarpSize; ++q) r |= slot[q];
    return r != 0;
  }
  UF_HD double shfl_xor(double x, int off) { return pr.shfl_xor(x, off); }
  UF_HD int shfl_xor(int x, int off) { return pr.shfl_xor(x, off); }
};

// One problem on one cluster (the CUDA cluster kernel's body, and the CPU simulation's).
// sh0 and ws0 are the leader's scratch and workspace (DSMEM or global addresses); the
// other arguments as solve_block.  K * T <= 32 * kMaxBlockWarps.
template <typename scalar_t, typename Prims>
UF_HD void solve_cluster(Prims& pr, BlockScratch* sh0, const scalar_t* cost, int64_t sN, int64_t sM, int N,
                         int M, const int64_t* num_cols, int64_t b, double sign, bool jv, int64_t* out, void* ws0,
                         int64_t R, int64_t C) {
  pr.cluster_sync();  // every block of the cluster runs before any touches the leader's memory
  ClusterThreads<Prims> th{pr, sh0, 0};
  solve_block<scalar_t>(th, sh0, cost, sN, sM, N, M, num_cols, b, sign, jv, out, ws0, R, C);
  pr.cluster_sync();  // no block reads the leader's memory after the leader exits
}

}  // inline namespace UF_LSA_ISA
}  // namespace lsa
}  // namespace unit_fast
