// CPU kernels for memjax's embedding bag and product-key top-k, called from JAX through the XLA FFI
// (see cpu.py; the top-k's contract is in topk.py and at its handler at the end of this file).
//
// Shapes (flattened bags, as in embedding_bag.py):
//   values [M, D] f32 or bf16, idx [B, L] s32, w [B, L] f32, dout [B, D] f32, N = B * L lookups.
//
// Handlers:
//   MemjaxBagForward      out [B, D] f32      out[b] = sum_l w[b, l] * values[idx[b, l]]
//   MemjaxBagWeightGrad   dw [B, L] f32       dw[b, l] = <dout[b], values[idx[b, l]]>
//   MemjaxBagValueGrad    dv [M, D] f32|bf16  dv[r] = sum_{idx[b, l] = r} w[b, l] * dout[b]  (dense)
//   MemjaxBagRowGrads     rows [N] s32, grads [N, D] f32: the distinct rows ascending (then padding
//                         equal to num_slots) and their summed gradients (zero on padding)
//   MemjaxProductTopK     s1, s2 [..., n] f32 -> scores [..., k] f32, i [..., k] s32, j [..., k] s32:
//                         the product-key top-k from the two halves' sub-key scores
//
// Forward and value gradient are the same computation, a weighted sum over sets of gathered rows
// (a bag's value rows; a table row's list of d_out rows), done by SumSets below: the set's
// [16 * NB]-column block is accumulated in NB vector registers (fp32), rows are prefetched
// Ahead(row bytes) lookups in advance, and each output block is stored once.
//
// The value gradient is atomic-free and deterministic: the lookups are sorted by row stably (a
// counting sort, or an LSD radix sort for tables much larger than the lookups), then each row sums
// its own run of lookups in lookup order; every output element is written by exactly one thread.
// Indices are clamped to [0, M) so that a bad index reads a valid row instead of faulting (the op's
// contract leaves out-of-range indices undefined).
// Work is split over XLA's intra-op thread pool; the calling thread takes chunks too, so a call
// completes even when no pool thread is free.

#include <sys/mman.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <condition_variable>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// Aliases keep template commas out of the handler macros at the end.
using F32R2 = ffi::Buffer<ffi::F32, 2>;
using S32R1 = ffi::Buffer<ffi::S32, 1>;
using S32R2 = ffi::Buffer<ffi::S32, 2>;
using F32Any = ffi::Buffer<ffi::F32>;  // any rank
using S32Any = ffi::Buffer<ffi::S32>;

namespace {

// Lookups prefetched ahead of the one being summed: about kBytesInFlight of rows, 4 to 128 rows.
constexpr int64_t kBytesInFlight = 64 << 10;
inline int64_t Ahead(int64_t row_bytes) {
  return std::clamp<int64_t>(kBytesInFlight / std::max<int64_t>(row_bytes, 1), 4, 128);
}
constexpr int kMaxVec = 16;     // vector registers of accumulator: columns per block = 16 * kMaxVec

// ----- scalars, vectors, memory -------------------------------------------------------------------

inline float ToF32(float x) { return x; }
inline float ToF32(uint16_t x) {  // bf16 bits -> f32
  const uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline void FromF32(float f, float* dst) { *dst = f; }
inline void FromF32(float f, uint16_t* dst) {  // round to nearest even; NaN stays NaN
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    *dst = static_cast<uint16_t>((bits >> 16) | 0x40);
    return;
  }
  bits += 0x7fffu + ((bits >> 16) & 1u);
  *dst = static_cast<uint16_t>(bits >> 16);
}

inline int64_t Clamp(int32_t i, int64_t m) {
  return i < 0 ? 0 : (i >= m ? m - 1 : static_cast<int64_t>(i));
}

// 16 floats; GCC lowers it to one zmm, two ymm or four xmm registers, whatever the target has.
typedef float Vec __attribute__((vector_size(64)));
typedef uint16_t VecH __attribute__((vector_size(32)));
typedef uint32_t VecU __attribute__((vector_size(64)));

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline Vec Load(const uint16_t* p) {  // 16 bf16 -> 16 f32: widen to 32 bits, shift into the high half
#if defined(__AVX512F__)
  const __m512i u = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
#else
  VecH h;
  std::memcpy(&h, p, sizeof(h));
  const VecU u = __builtin_convertvector(h, VecU) << 16;
#endif
  Vec v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}
inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof(v)); }
inline void Store(uint16_t* p, Vec v) {
  for (int j = 0; j < 16; ++j) FromF32(v[j], p + j);
}
inline float Sum(Vec v) {
  float s = 0.f;
  for (int j = 0; j < 16; ++j) s += v[j];
  return s;
}

// Asks for transparent huge pages on a large output buffer before its first write: far fewer page
// faults (XLA hands out fresh mmap-backed buffers). Advisory; errors are ignored.
inline void AdviseHugePages(void* data, int64_t bytes) {
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  if (bytes < static_cast<int64_t>(4 * kHuge)) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
}

// ----- threads ------------------------------------------------------------------------------------

// Runs fn(begin, end) over [0, n) in chunks of at least min_chunk, on the caller and the pool.
// Chunks are taken dynamically (16 per thread), so a thread that loses its core delays little.
void ParallelFor(ffi::ThreadPool& pool, int64_t n, int64_t min_chunk,
                 const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t chunks = std::min<int64_t>(threads * 16, (n + min_chunk - 1) / min_chunk);
  if (threads == 1 || chunks <= 1) {
    fn(0, n);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    int64_t chunks = 0, n = 0;
    const std::function<void(int64_t, int64_t)>* fn = nullptr;
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  state->chunks = chunks;
  state->n = n;
  state->fn = &fn;  // dereferenced only while chunks remain, i.e. before this call returns
  auto work = [](State* s) {
    for (int64_t c; (c = s->next.fetch_add(1, std::memory_order_relaxed)) < s->chunks;) {
      (*s->fn)(c * s->n / s->chunks, (c + 1) * s->n / s->chunks);
      if (s->done.fetch_add(1, std::memory_order_acq_rel) + 1 == s->chunks) {
        std::lock_guard<std::mutex> lock(s->mu);
        s->cv.notify_all();
      }
    }
  };
  for (int64_t t = 1; t < threads; ++t) pool.Schedule([state, work] { work(state.get()); });
  work(state.get());
  // Sleep rather than spin: on a busy machine a spinning caller steals the core a worker needs.
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load(std::memory_order_acquire) == chunks; });
}

// ----- weighted sums over sets of gathered rows ---------------------------------------------------
//
// A problem P describes the sets: P::begin(s) .. P::begin(s + 1) are the items of set s (items are
// numbered consecutively over all sets), P::row(i) points at item i's row (D elements of P::In),
// P::weight(i) is its weight, and P::out(s) is where set s's D sums go (P::Out: float or uint16_t).

template <int NB, typename P>
void SumSetsBlock(const P& p, int64_t d0, int64_t s0, int64_t s1, int64_t last_item) {
  using In = typename P::In;
  constexpr int kVecPerLine = 64 / static_cast<int>(16 * sizeof(In));
  const int64_t ahead = Ahead(p.d * static_cast<int64_t>(sizeof(In)));
  for (int64_t s = s0; s < s1; ++s) {
    Vec acc[NB];
    for (int k = 0; k < NB; ++k) acc[k] = Vec{};
    for (int64_t i = p.begin(s), e = p.begin(s + 1); i < e; ++i) {
      const In* row = p.row(i) + d0;
      const In* next = p.row(std::min(i + ahead, last_item)) + d0;
      const float w = p.weight(i);
#pragma GCC unroll 16
      for (int k = 0; k < NB; ++k) {
        acc[k] += w * Load(row + 16 * k);
        if (k % kVecPerLine == 0) __builtin_prefetch(next + 16 * k, 0, 1);
      }
    }
    for (int k = 0; k < NB; ++k) Store(p.out(s) + d0 + 16 * k, acc[k]);
  }
}

template <int NB, typename P>
void SumSetsDispatch(int nb, const P& p, int64_t d0, int64_t s0, int64_t s1, int64_t last_item) {
  if constexpr (NB > 0) {
    if (nb == NB) return SumSetsBlock<NB>(p, d0, s0, s1, last_item);
    return SumSetsDispatch<NB - 1>(nb, p, d0, s0, s1, last_item);
  }
}

// Sums the sets [s0, s1) over all D columns.
template <typename P>
void SumSets(const P& p, int64_t d, int64_t s0, int64_t s1, int64_t last_item) {
  int64_t d0 = 0;
  while (d - d0 >= 16) {
    const int nb = static_cast<int>(std::min<int64_t>(kMaxVec, (d - d0) / 16));
    SumSetsDispatch<kMaxVec>(nb, p, d0, s0, s1, last_item);
    d0 += 16 * nb;
  }
  for (int64_t s = s0; s < s1 && d0 < d; ++s) {  // fewer than 16 columns left
    float acc[16] = {};
    for (int64_t i = p.begin(s), e = p.begin(s + 1); i < e; ++i)
      for (int64_t j = d0; j < d; ++j) acc[j - d0] += p.weight(i) * ToF32(p.row(i)[j]);
    for (int64_t j = d0; j < d; ++j) FromF32(acc[j - d0], p.out(s) + j);
  }
}

// Bags of the forward pass: set b = bag b, items = its lookups.
template <typename T>
struct BagSets {
  using In = T;
  using Out = float;
  const T* values;
  int64_t m, d, bag;
  const int32_t* idx;
  const float* w;
  float* dst;
  int64_t begin(int64_t b) const { return b * bag; }
  const T* row(int64_t i) const { return values + Clamp(idx[i], m) * d; }
  float weight(int64_t i) const { return w[i]; }
  float* out(int64_t b) const { return dst + b * d; }
};

// Runs of sorted lookups of the value gradient: set u = the u-th distinct row, items = its lookups.
template <typename T>
struct RunSets {
  using In = float;
  using Out = T;
  const uint64_t* sorted;  // row << 32 | lookup, ascending
  const int64_t* starts;   // first sorted position of each run, then N
  int64_t d, bag;
  const float* w;
  const float* dout;
  T* dst;
  bool dense;  // store run u at row (sorted >> 32), else at u
  int64_t begin(int64_t u) const { return starts[u]; }
  const float* row(int64_t p) const { return dout + (static_cast<uint32_t>(sorted[p]) / bag) * d; }
  float weight(int64_t p) const { return w[static_cast<uint32_t>(sorted[p])]; }
  int64_t table_row(int64_t u) const { return static_cast<int64_t>(sorted[starts[u]] >> 32); }
  T* out(int64_t u) const { return dst + (dense ? table_row(u) : u) * d; }
};

// The lookups sorted by (clamped) row, stably (keys row << 32 | lookup, ascending), and where each
// run of one row starts (then n). While the table has at most 4 rows per lookup: a counting sort,
// split over the pool in fixed chunks of lookups (a histogram per chunk, one prefix over (row,
// chunk), each chunk scattering its own lookups: stable, and the same result on any thread count);
// else a stable LSD radix sort on 11-bit digits of the row (two or more passes).
struct RowRuns {
  std::vector<uint64_t> sorted;
  std::vector<int64_t> starts;
};

RowRuns SortByRow(ffi::ThreadPool& pool, const int32_t* idx, int64_t n, int64_t m) {
  RowRuns out;
  std::vector<uint64_t>& a = out.sorted;
  a.resize(n);
  if (m <= 4 * std::max<int64_t>(n, 1024)) {
    // Chunks of >= 32k lookups, at most 8, and histograms of at most 2n entries in all.
    const int64_t chunks = std::clamp<int64_t>(std::min<int64_t>(n / 32768, 2 * n / m), 1, 8);
    std::vector<int32_t> hist(chunks * m, 0);  // [chunk][row]: counts, then write offsets
    const auto bounds = [&](int64_t c) { return std::pair<int64_t, int64_t>(c * n / chunks, (c + 1) * n / chunks); };
    ParallelFor(pool, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        int32_t* h = hist.data() + c * m;
        for (int64_t i = bounds(c).first; i < bounds(c).second; ++i) ++h[Clamp(idx[i], m)];
      }
    });
    int64_t offset = 0;
    for (int64_t r = 0; r < m; ++r) {
      const int64_t first = offset;
      for (int64_t c = 0; c < chunks; ++c) {
        const int32_t count = hist[c * m + r];
        hist[c * m + r] = static_cast<int32_t>(offset);
        offset += count;
      }
      if (offset > first) out.starts.push_back(first);
    }
    out.starts.push_back(n);
    ParallelFor(pool, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        int32_t* next = hist.data() + c * m;
        for (int64_t i = bounds(c).first; i < bounds(c).second; ++i) {
          const int64_t r = Clamp(idx[i], m);
          a[next[r]++] = (static_cast<uint64_t>(r) << 32) | static_cast<uint64_t>(i);
        }
      }
    });
    return out;
  }
  std::vector<uint64_t> b(n);
  for (int64_t i = 0; i < n; ++i)
    a[i] = (static_cast<uint64_t>(Clamp(idx[i], m)) << 32) | static_cast<uint64_t>(i);
  int bits = 1;
  while ((int64_t{1} << bits) < m) ++bits;
  constexpr int kDigit = 11;
  constexpr int kBuckets = 1 << kDigit;
  std::vector<int64_t> count(kBuckets);
  for (int shift = 0; shift < bits; shift += kDigit) {
    std::fill(count.begin(), count.end(), 0);
    for (int64_t i = 0; i < n; ++i) ++count[(a[i] >> (32 + shift)) & (kBuckets - 1)];
    int64_t sum = 0;
    for (auto& c : count) {
      const int64_t t = c;
      c = sum;
      sum += t;
    }
    for (int64_t i = 0; i < n; ++i) b[count[(a[i] >> (32 + shift)) & (kBuckets - 1)]++] = a[i];
    a.swap(b);
  }
  out.starts.reserve(n + 1);
  for (int64_t p = 0; p < n; ++p)
    if (p == 0 || (a[p] >> 32) != (a[p - 1] >> 32)) out.starts.push_back(p);
  out.starts.push_back(n);
  return out;
}

// ----- handlers -----------------------------------------------------------------------------------

template <typename T>
void Forward(ffi::ThreadPool& pool, const T* values, int64_t m, int64_t d, const int32_t* idx,
             const float* w, int64_t nbags, int64_t bag, float* out) {
  const BagSets<T> sets{values, m, d, bag, idx, w, out};
  const int64_t last = nbags * bag - 1;
  ParallelFor(pool, nbags, 16, [&](int64_t b0, int64_t b1) { SumSets(sets, d, b0, b1, last); });
}

ffi::Error BagForward(ffi::ThreadPool pool, ffi::AnyBuffer values, S32R2 idx, F32R2 w,
                      ffi::Result<F32R2> out) {
  const auto vd = values.dimensions();
  const int64_t m = vd[0], d = vd[1];
  const int64_t nbags = idx.dimensions()[0], bag = idx.dimensions()[1];
  float* o = out->typed_data();
  if (m == 0 || bag == 0) {
    std::fill(o, o + nbags * d, 0.f);
    return ffi::Error::Success();
  }
  switch (values.element_type()) {
    case ffi::F32:
      Forward(pool, values.typed_data<float>(), m, d, idx.typed_data(), w.typed_data(), nbags, bag, o);
      return ffi::Error::Success();
    case ffi::BF16:
      Forward(pool, static_cast<const uint16_t*>(values.untyped_data()), m, d, idx.typed_data(),
              w.typed_data(), nbags, bag, o);
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument("memjax embedding bag: values must be f32 or bf16");
  }
}

// dw[b, l] = <dout[b], values[idx[b, l]]>: the bag's d_out block stays in registers.
template <int NB, typename T>
void WeightGradBlock(const T* values, int64_t m, int64_t d, int64_t d0, const int32_t* idx,
                     const float* dout, int64_t b0, int64_t b1, int64_t bag, float* dw) {
  constexpr int kVecPerLine = 64 / static_cast<int>(16 * sizeof(T));
  const int64_t ahead = Ahead(d * static_cast<int64_t>(sizeof(T)));
  const int64_t last = b1 * bag - 1;
  for (int64_t b = b0; b < b1; ++b) {
    Vec g[NB];
    for (int k = 0; k < NB; ++k) g[k] = Load(dout + b * d + d0 + 16 * k);
    for (int64_t i = b * bag; i < (b + 1) * bag; ++i) {
      const T* row = values + Clamp(idx[i], m) * d + d0;
      const T* next = values + Clamp(idx[std::min(i + ahead, last)], m) * d + d0;
      Vec acc = Vec{};
#pragma GCC unroll 16
      for (int k = 0; k < NB; ++k) {
        acc += g[k] * Load(row + 16 * k);
        if (k % kVecPerLine == 0) __builtin_prefetch(next + 16 * k, 0, 1);
      }
      dw[i] = (d0 == 0 ? 0.f : dw[i]) + Sum(acc);
    }
  }
}

template <int NB, typename T>
void WeightGradDispatch(int nb, const T* values, int64_t m, int64_t d, int64_t d0, const int32_t* idx,
                        const float* dout, int64_t b0, int64_t b1, int64_t bag, float* dw) {
  if constexpr (NB > 0) {
    if (nb == NB) return WeightGradBlock<NB>(values, m, d, d0, idx, dout, b0, b1, bag, dw);
    return WeightGradDispatch<NB - 1>(nb, values, m, d, d0, idx, dout, b0, b1, bag, dw);
  }
}

template <typename T>
void WeightGrad(ffi::ThreadPool& pool, const T* values, int64_t m, int64_t d, const int32_t* idx,
                const float* dout, int64_t nbags, int64_t bag, float* dw) {
  ParallelFor(pool, nbags, 16, [&](int64_t b0, int64_t b1) {
    int64_t d0 = 0;
    while (d - d0 >= 16) {
      const int nb = static_cast<int>(std::min<int64_t>(kMaxVec, (d - d0) / 16));
      WeightGradDispatch<kMaxVec>(nb, values, m, d, d0, idx, dout, b0, b1, bag, dw);
      d0 += 16 * nb;
    }
    if (d0 < d) {  // fewer than 16 columns left
      for (int64_t i = b0 * bag; i < b1 * bag; ++i) {
        const T* row = values + Clamp(idx[i], m) * d;
        const float* g = dout + (i / bag) * d;
        float s = d0 == 0 ? 0.f : dw[i];
        for (int64_t j = d0; j < d; ++j) s += g[j] * ToF32(row[j]);
        dw[i] = s;
      }
    }
  });
}

ffi::Error BagWeightGrad(ffi::ThreadPool pool, ffi::AnyBuffer values, S32R2 idx, F32R2 dout,
                         ffi::Result<F32R2> dw) {
  const auto vd = values.dimensions();
  const int64_t m = vd[0], d = vd[1];
  const int64_t nbags = idx.dimensions()[0], bag = idx.dimensions()[1];
  float* o = dw->typed_data();
  if (m == 0 || d == 0) {
    std::fill(o, o + nbags * bag, 0.f);
    return ffi::Error::Success();
  }
  switch (values.element_type()) {
    case ffi::F32:
      WeightGrad(pool, values.typed_data<float>(), m, d, idx.typed_data(), dout.typed_data(), nbags,
                 bag, o);
      return ffi::Error::Success();
    case ffi::BF16:
      WeightGrad(pool, static_cast<const uint16_t*>(values.untyped_data()), m, d, idx.typed_data(),
                 dout.typed_data(), nbags, bag, o);
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument("memjax embedding bag: values must be f32 or bf16");
  }
}

// Dense dv: chunks of runs; each chunk also zeroes the untouched rows before its runs (the last
// chunk: after them too), so every row of dv is written exactly once.
template <typename T>
void ValueGrad(ffi::ThreadPool& pool, const int32_t* idx, const float* w, const float* dout,
               int64_t nbags, int64_t bag, int64_t m, int64_t d, T* dv) {
  AdviseHugePages(dv, m * d * static_cast<int64_t>(sizeof(T)));
  const int64_t n = nbags * bag;
  const RowRuns sorted_runs = SortByRow(pool, idx, n, m);
  const std::vector<uint64_t>& sorted = sorted_runs.sorted;
  const std::vector<int64_t>& starts = sorted_runs.starts;
  const int64_t runs = static_cast<int64_t>(starts.size()) - 1;
  const RunSets<T> sets{sorted.data(), starts.data(), d, bag, w, dout, dv, /*dense=*/true};
  auto zero_rows = [&](int64_t r0, int64_t r1) {
    if (r1 > r0) std::memset(dv + r0 * d, 0, (r1 - r0) * d * sizeof(T));
  };
  if (runs == 0) {
    ParallelFor(pool, m, 1024, zero_rows);
    return;
  }
  ParallelFor(pool, runs, 64, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) zero_rows(u == 0 ? 0 : sets.table_row(u - 1) + 1, sets.table_row(u));
    if (u1 == runs) zero_rows(sets.table_row(runs - 1) + 1, m);
    SumSets(sets, d, u0, u1, n - 1);
  });
}

ffi::Error BagValueGrad(ffi::ThreadPool pool, S32R2 idx, F32R2 w, F32R2 dout,
                        ffi::Result<ffi::AnyBuffer> dv) {
  const auto dd = dv->dimensions();
  const int64_t m = dd[0], d = dd[1];
  const int64_t nbags = idx.dimensions()[0], bag = idx.dimensions()[1];
  if (m == 0 || d == 0) return ffi::Error::Success();
  switch (dv->element_type()) {
    case ffi::F32:
      ValueGrad(pool, idx.typed_data(), w.typed_data(), dout.typed_data(), nbags, bag, m, d,
                dv->typed_data<float>());
      return ffi::Error::Success();
    case ffi::BF16:
      ValueGrad(pool, idx.typed_data(), w.typed_data(), dout.typed_data(), nbags, bag, m, d,
                static_cast<uint16_t*>(dv->untyped_data()));
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument("memjax embedding bag: d_values must be f32 or bf16");
  }
}

ffi::Error BagRowGrads(ffi::ThreadPool pool, S32R2 idx, F32R2 w, F32R2 dout, ffi::Result<S32R1> rows,
                       ffi::Result<F32R2> grads, int64_t num_slots) {
  const int64_t nbags = idx.dimensions()[0], bag = idx.dimensions()[1], n = nbags * bag;
  const int64_t d = dout.dimensions()[1];
  int32_t* r = rows->typed_data();
  float* g = grads->typed_data();
  AdviseHugePages(g, n * d * static_cast<int64_t>(sizeof(float)));
  if (num_slots <= 0 || n == 0) {
    std::fill(r, r + n, static_cast<int32_t>(num_slots));
    std::fill(g, g + n * d, 0.f);
    return ffi::Error::Success();
  }
  const RowRuns sorted_runs = SortByRow(pool, idx.typed_data(), n, num_slots);
  const std::vector<uint64_t>& sorted = sorted_runs.sorted;
  const std::vector<int64_t>& starts = sorted_runs.starts;
  const int64_t runs = static_cast<int64_t>(starts.size()) - 1;
  const RunSets<float> sets{sorted.data(), starts.data(), d, bag, w.typed_data(), dout.typed_data(),
                            g, /*dense=*/false};
  ParallelFor(pool, n, 256, [&](int64_t u0, int64_t u1) {
    const int64_t split = std::clamp(runs, u0, u1);  // [u0, split) are runs, [split, u1) padding
    for (int64_t u = u0; u < split; ++u) r[u] = static_cast<int32_t>(sets.table_row(u));
    SumSets(sets, d, u0, split, n - 1);
    std::fill(r + split, r + u1, static_cast<int32_t>(num_slots));
    if (u1 > split) std::memset(g + split * d, 0, (u1 - split) * d * sizeof(float));
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MemjaxBagForward, BagForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<S32R2>()
                                  .Arg<F32R2>()
                                  .Ret<F32R2>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MemjaxBagWeightGrad, BagWeightGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<S32R2>()
                                  .Arg<F32R2>()
                                  .Ret<F32R2>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MemjaxBagValueGrad, BagValueGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<S32R2>()
                                  .Arg<F32R2>()
                                  .Arg<F32R2>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MemjaxBagRowGrads, BagRowGrads,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<S32R2>()
                                  .Arg<F32R2>()
                                  .Arg<F32R2>()
                                  .Ret<S32R1>()
                                  .Ret<F32R2>()
                                  .Attr<int64_t>("num_slots"));

// ----- product-key top-k ----------------------------------------------------------------------------
//
// MemjaxProductTopK   s1, s2 [..., n] f32 (R rows = the product of the leading dims; n >= 1)
//                     -> scores [..., k] f32, i [..., k] s32, j [..., k] s32, for 1 <= k <= min(n, 2^16)
// Per row: t1 = top-k of s1 (values v1, positions p1), t2 = top-k of s2, then the top-k of the
// k x k grid of fp32 sums cand[a * k + b] = v1[a] + v2[b]; scores[t] = cand of the t-th best,
// i[t] = p1[a], j[t] = p2[b]. Exactly what topk.py's XLA formulation (three jax.lax.top_k) returns:
//   * order: XLA's TopK total order on f32 bit patterns, -NaN < -inf < ... < -0 < +0 < ... < +inf
//     < +NaN (NaNs ordered by payload), i.e. the integers OrderKey below;
//   * ties: lower position first (in a half: the position in s; in the grid: a * k + b).
// A candidate's Rank packs both into one integer, smaller = better: ~key << 32 | position, and the
// grid position a * k + b is encoded as a << 16 | b, which orders the same (b < k <= 2^16). A sum of
// two NaNs keeps the first (AddNaNFirst), as jitted XLA does here (eager XLA does not always).
//
// Half top-k, O(n): the maxima of k strided groups (vector max) bound the k-th best key from below
// and cut the row to a few k candidates; a histogram of their top 11 bits (sign, exponent, 2 mantissa
// bits) gives the digit of the k-th best key, and the keys of that digit or above (for Gaussian-like
// scores about 1.2 k) are gathered in position order and ranked exactly (counting ranks when there
// are at most 128, else nth_element + sort).
// Grid: when all 2k selected values are finite, fl(x + z) is monotone in x and in z (rounding is
// monotone, and a -0 sum needs both operands -0), so cand[a][b] ranks before cand[a + 1][b] and
// cand[a][b + 1]: a best-first walk over that frontier (a heap of at most k + 1 cells) yields the
// grid's top-k in order after k pops, O(k log k). If any of them is inf or NaN (inf + -inf = NaN
// breaks monotonicity) all k^2 sums are ranked instead, through a buffer of the 2k best so far
// (O(k^2) time, O(k) memory): the same result, only slower.

namespace {

// XLA's TopK order as unsigned integers: larger key = larger in the order.
inline uint32_t OrderKey(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// fp32 x + y where a NaN operand propagates (quietened), the first one if both are: the rule of x86
// and ARM adds, and what XLA's fused add gives here. Written out because a compiler may commute x + y.
inline float AddNaNFirst(float x, float y) {
  const auto quiet = [](float v) {
    uint32_t bits;
    std::memcpy(&bits, &v, sizeof(bits));
    bits |= 0x00400000u;
    std::memcpy(&v, &bits, sizeof(v));
    return v;
  };
  if (std::isnan(x)) return quiet(x);
  if (std::isnan(y)) return quiet(y);
  return x + y;
}

inline uint64_t Rank(uint32_t key, uint32_t pos) { return (static_cast<uint64_t>(~key) << 32) | pos; }
inline uint32_t RankPos(uint64_t rank) { return static_cast<uint32_t>(rank); }

// Scratch of one thread, sized for rows of n and a given k.
struct TopKScratch {
  static constexpr int kDigitBits = 11;  // the cut's digit: sign, exponent and two mantissa bits
  static constexpr int kShift = 32 - kDigitBits;
  std::vector<uint32_t> keys;            // [n]
  std::vector<uint32_t> hist;            // [2^11], all zero between calls
  std::vector<uint32_t> pos;             // [n + 16]: candidate positions
  std::vector<uint64_t> cand;            // [n]: candidate ranks
  std::vector<uint64_t> t1, t2;          // [k]: the halves' top-k as ranks
  std::vector<uint64_t> frontier;        // [2k + 2]: the grid's heap, or its ranking buffer
  TopKScratch(int64_t n, int64_t k)
      : keys(n), hist(size_t{1} << kDigitBits), pos(n + 16), cand(n), t1(k), t2(k),
        frontier(2 * k + 2) {}
};

// The k smallest of the m distinct ranks c (m >= k), ascending, into out; c may be reordered.
constexpr int64_t kCountingMax = 128;  // above it, nth_element + sort
void SmallestRanks(uint64_t* c, int64_t m, int64_t k, uint64_t* out) {
  if (m <= kCountingMax) {  // each rank's place is the number of smaller ones; the x loop vectorises
    int64_t place[kCountingMax] = {};
    for (int64_t y = 0; y < m; ++y) {
      const uint64_t v = c[y];
      for (int64_t x = 0; x < m; ++x) place[x] += c[x] > v;
    }
    for (int64_t x = 0; x < m; ++x)
      if (place[x] < k) out[place[x]] = c[x];
    return;
  }
  if (m > k) std::nth_element(c, c + k - 1, c + m);
  std::sort(c, c + k);
  std::copy(c, c + k, out);
}

// Positions p in [0, n) with key[p] >= cut, ascending, into pos (room for n + 16); returns the count.
int64_t PositionsAtLeast(const uint32_t* key, int64_t n, uint32_t cut, uint32_t* pos) {
  int64_t m = 0, p = 0;
#if defined(__AVX512F__)
  const __m512i vcut = _mm512_set1_epi32(static_cast<int>(cut));
  __m512i vpos = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (; p + 16 <= n; p += 16) {
    const __mmask16 in = _mm512_cmpge_epu32_mask(_mm512_loadu_si512(key + p), vcut);
    _mm512_storeu_si512(pos + m, _mm512_maskz_compress_epi32(in, vpos));  // compress to a register:
    m += __builtin_popcount(in);                                         // fast on AMD and Intel
    vpos = _mm512_add_epi32(vpos, _mm512_set1_epi32(16));
  }
#endif
  for (; p < n; ++p) {
    pos[m] = static_cast<uint32_t>(p);
    m += key[p] >= cut;
  }
  return m;
}

// A lower bound on the k-th best of the n keys, found with vector max alone: with g >= k strided
// groups (key p in group p % g, over the first g * floor(n / g) keys; g = k rounded up to 16), each
// group's maximum is a key, so at least g >= k keys are >= the smallest of the g maxima. 0 (no
// bound) for k > 128 or n < 8g.
uint32_t GroupCut(const uint32_t* key, int64_t n, int64_t k) {
  constexpr int64_t kMaxGroups = 128;
  const int64_t g = (k + 15) / 16 * 16;
  if (g > kMaxGroups || n < 8 * g) return 0;  // fewer than 8 keys a group: a weak bound
  VecU acc[kMaxGroups / 16] = {};  // group c's maximum is lane c % 16 of acc[c / 16]
  for (int64_t r = 0; r + g <= n; r += g)
    for (int64_t v = 0; v < g / 16; ++v) {
      VecU x;
      std::memcpy(&x, key + r + 16 * v, sizeof(x));
      acc[v] = acc[v] > x ? acc[v] : x;
    }
  uint32_t cut = ~0u;  // the smallest of the g >= k maxima
  for (int64_t v = 0; v < g / 16; ++v)
    for (int l = 0; l < 16; ++l) cut = std::min(cut, static_cast<uint32_t>(acc[v][l]));
  return cut;
}

// The k best of s[0, n) as ranks, best first, into out. Candidates are the keys >= GroupCut (for
// Gaussian-like scores 3k to 4k of them); if more than 64, a histogram of their top 11 bits gives
// the digit of the k-th best key and only keys of that digit or above stay (~1.2k). Those are
// ranked exactly.
void HalfTopK(const float* s, int64_t n, int64_t k, TopKScratch& w, uint64_t* out) {
  constexpr int kShift = TopKScratch::kShift;
  uint32_t* key = w.keys.data();
  for (int64_t p = 0; p < n; ++p) key[p] = OrderKey(s[p]);
  uint32_t* pos = w.pos.data();
  int64_t m = PositionsAtLeast(key, n, GroupCut(key, n, k), pos);
  if (m > 64) {
    uint32_t* hist = w.hist.data();
    uint32_t lo = ~0u, hi = 0;
    for (int64_t c = 0; c < m; ++c) {
      const uint32_t d = key[pos[c]] >> kShift;
      ++hist[d];
      lo = std::min(lo, d);
      hi = std::max(hi, d);
    }
    uint32_t digit = hi;
    for (int64_t above = 0; above + hist[digit] < k; above += hist[digit--]) {}
    std::memset(hist + lo, 0, (hi - lo + 1) * sizeof(uint32_t));
    int64_t kept = 0;
    for (int64_t c = 0; c < m; ++c) {  // in place: kept <= c
      const uint32_t p = pos[c];
      pos[kept] = p;
      kept += (key[p] >> kShift) >= digit;
    }
    m = kept;
  }
  uint64_t* cand = w.cand.data();
  for (int64_t c = 0; c < m; ++c) cand[c] = Rank(key[pos[c]], pos[c]);
  SmallestRanks(cand, m, k, out);
}

// Keeps the k smallest of buf[0, m) in buf[0, k) (unordered); returns k.
int64_t KeepBest(uint64_t* buf, int64_t m, int64_t k) {
  if (m > k) std::nth_element(buf, buf + k - 1, buf + m);
  return std::min(m, k);
}

// The grid's top-k (best first) as ranks (a << 16 | b in the low bits) into out, from the halves'
// values v1, v2 [k], each sorted best first.
void GridTopK(const float* v1, const float* v2, int64_t k, TopKScratch& w, uint64_t* out) {
  auto rank = [&](int64_t a, int64_t b) {
    return Rank(OrderKey(v1[a] + v2[b]), static_cast<uint32_t>((a << 16) | b));
  };
  bool finite = true;
  for (int64_t a = 0; a < k; ++a) finite &= std::isfinite(v1[a]) & std::isfinite(v2[a]);
  uint64_t* f = w.frontier.data();
  if (!finite) {  // rank all k^2 sums through a buffer of the 2k best so far
    int64_t m = 0;
    for (int64_t a = 0; a < k; ++a)
      for (int64_t b = 0; b < k; ++b) {
        f[m++] = Rank(OrderKey(AddNaNFirst(v1[a], v2[b])), static_cast<uint32_t>((a << 16) | b));
        if (m == 2 * k) m = KeepBest(f, m, k);
      }
    m = KeepBest(f, m, k);
    std::sort(f, f + m);
    std::copy(f, f + k, out);
    return;
  }
  // Frontier: (a, b) enters when (a, b - 1) leaves, (a, 0) when (a - 1, 0) leaves; each cell's
  // predecessors rank before it, so the t-th pop is the t-th best.
  int64_t size = 1;  // a binary min-heap of ranks in f[0, size)
  f[0] = rank(0, 0);
  const auto sift_down = [&] {  // restores the heap after f[0] changed
    const uint64_t x = f[0];
    int64_t i = 0;
    for (int64_t c; (c = 2 * i + 1) < size; i = c) {
      if (c + 1 < size) c += f[c + 1] < f[c];
      if (f[c] >= x) break;
      f[i] = f[c];
    }
    f[i] = x;
  };
  for (int64_t t = 0; t < k; ++t) {
    const uint64_t best = f[0];
    out[t] = best;
    const int64_t a = RankPos(best) >> 16, b = RankPos(best) & 0xffff;
    f[0] = b + 1 < k ? rank(a, b + 1) : f[--size];  // (a, b) leaves, (a, b + 1) takes its place
    sift_down();
    if (b == 0 && a + 1 < k) {  // (a + 1, 0) enters
      const uint64_t x = rank(a + 1, 0);
      int64_t i = size++;
      for (int64_t p; i > 0 && f[p = (i - 1) / 2] > x; i = p) f[i] = f[p];
      f[i] = x;
    }
  }
}

ffi::Error ProductTopK(ffi::ThreadPool pool, F32Any s1, F32Any s2, ffi::Result<F32Any> scores,
                       ffi::Result<S32Any> i_out, ffi::Result<S32Any> j_out, int64_t k) {
  const auto d1 = s1.dimensions(), d2 = s2.dimensions();
  if (d1.size() < 1 || d1.size() != d2.size() || !std::equal(d1.begin(), d1.end(), d2.begin()))
    return ffi::Error::InvalidArgument("memjax product top-k: s1 and s2 must have one shape [..., n]");
  const int64_t n = d1.back();
  if (k < 1 || k > n || k > (int64_t{1} << 16))
    return ffi::Error::InvalidArgument("memjax product top-k: need 1 <= k <= n and k <= 65536");
  const int64_t rows = n == 0 ? 0 : static_cast<int64_t>(s1.element_count()) / n;
  if (static_cast<int64_t>(scores->element_count()) != rows * k ||
      static_cast<int64_t>(i_out->element_count()) != rows * k ||
      static_cast<int64_t>(j_out->element_count()) != rows * k)
    return ffi::Error::InvalidArgument("memjax product top-k: outputs must have shape [..., k]");
  const float* x1 = s1.typed_data();
  const float* x2 = s2.typed_data();
  float* sc = scores->typed_data();
  int32_t* io = i_out->typed_data();
  int32_t* jo = j_out->typed_data();
  ParallelFor(pool, rows, std::max<int64_t>(1, 4096 / n), [&](int64_t r0, int64_t r1) {
    TopKScratch w(n, k);
    std::vector<float> v1(k), v2(k);
    std::vector<uint64_t> best(k);
    for (int64_t r = r0; r < r1; ++r) {
      HalfTopK(x1 + r * n, n, k, w, w.t1.data());
      HalfTopK(x2 + r * n, n, k, w, w.t2.data());
      for (int64_t a = 0; a < k; ++a) {
        v1[a] = x1[r * n + RankPos(w.t1[a])];
        v2[a] = x2[r * n + RankPos(w.t2[a])];
      }
      GridTopK(v1.data(), v2.data(), k, w, best.data());
      for (int64_t t = 0; t < k; ++t) {
        const int64_t a = RankPos(best[t]) >> 16, b = RankPos(best[t]) & 0xffff;
        sc[r * k + t] = AddNaNFirst(v1[a], v2[b]);
        io[r * k + t] = static_cast<int32_t>(RankPos(w.t1[a]));
        jo[r * k + t] = static_cast<int32_t>(RankPos(w.t2[b]));
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MemjaxProductTopK, ProductTopK,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Any>()
                                  .Arg<F32Any>()
                                  .Ret<F32Any>()
                                  .Ret<S32Any>()
                                  .Ret<S32Any>()
                                  .Attr<int64_t>("k"));

// ----- the value update on one device --------------------------------------------------------------
//
// Two handlers fuse a value table's optimizer step. The XLA formulation makes several whole-table
// passes per step (a dense gradient per reader, their sum, the clip, then one pass each for mu, nu
// and the table); these make one pass over the lookups and one over the table (or its read rows):
//
// MemjaxValueRowSums  idx [N] s32 (any shape), w [N] f32 (same shape), dout [B, D] f32 where each
//                     dout row serves N / B consecutive lookups, attr num_slots = M
//                     -> rows [U] s32, g [U, D] f32, sq [] f32, with U = min(N, M)
//   rows: the distinct rows read, ascending, then padding equal to M; g[u] = the sum of
//   w[p] * dout[p / (N / B)] over the lookups p of rows[u], in lookup order (the value gradient's
//   SortByRow, RunSets and SumSets: deterministic), zero on padding. sq = the sum of squares of g,
//   summed in fixed blocks of rows (deterministic). Like MemjaxBagRowGrads, but U = min(N, M) rows.
//
// MemjaxValueAdam     table, mu, nu [M, D] f32, rows [U] s32 and g [U, D] f32 (as above), lr, div,
//                     mul, bc1, bc2 [] f32; attrs b1, b2, eps, weight_decay (f32), lazy (bool)
//                     -> table, mu, nu (mu and nu aliased to the inputs; the table too when the
//                        caller updates it in place)
//   per row r (lazy: only the rows listed; otherwise every row, with g = 0 where not listed):
//     g' = (g / div) * mul                        (the clip, as the caller states it)
//     mu = (1 - b1) g' + b1 mu                    nu = (1 - b2) g'^2 + b2 nu
//     u  = (mu / bc1) / (sqrt(nu / bc2) + eps) + weight_decay * table
//     table = table + (-lr) u
//   which is optax's clip_by_global_norm + adamw (dense) or optim.sparse_adam_update (lazy), term
//   for term; bc1 = 1 - b1^t and bc2 = 1 - b2^t come from the caller.

namespace {

using F32R0 = ffi::Buffer<ffi::F32, 0>;
constexpr int64_t kRowBlock = 256;  // rows per block of the sum of squares

ffi::Error ValueRowSums(ffi::ThreadPool pool, S32Any idx, F32Any w, F32R2 dout, ffi::Result<S32R1> rows,
                        ffi::Result<F32R2> g, ffi::Result<F32R0> sq, int64_t num_slots) {
  const int64_t n = static_cast<int64_t>(idx.element_count());
  const int64_t b = dout.dimensions()[0], d = dout.dimensions()[1], m = num_slots;
  const int64_t u_max = std::min(n, m);
  if (static_cast<int64_t>(w.element_count()) != n || (b > 0 && n % b != 0) || m <= 0 ||
      rows->dimensions()[0] != u_max || g->dimensions()[0] != u_max || g->dimensions()[1] != d)
    return ffi::Error::InvalidArgument("memjax value row sums: shapes do not match");
  int32_t* r = rows->typed_data();
  float* out = g->typed_data();
  *sq->typed_data() = 0.f;
  if (n == 0) return ffi::Error::Success();
  const RowRuns sorted_runs = SortByRow(pool, idx.typed_data(), n, m);
  const std::vector<uint64_t>& sorted = sorted_runs.sorted;
  const std::vector<int64_t>& starts = sorted_runs.starts;
  const int64_t runs = static_cast<int64_t>(starts.size()) - 1;  // <= u_max
  const RunSets<float> sets{sorted.data(), starts.data(), d, n / b, w.typed_data(), dout.typed_data(), out,
                            /*dense=*/false};
  const int64_t blocks = (u_max + kRowBlock - 1) / kRowBlock;
  std::vector<double> partial(blocks, 0.0);
  ParallelFor(pool, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t u0 = blk * kRowBlock, u1 = std::min(u_max, u0 + kRowBlock);
      const int64_t split = std::clamp(runs, u0, u1);  // [u0, split) are runs, [split, u1) padding
      for (int64_t u = u0; u < split; ++u) r[u] = static_cast<int32_t>(sets.table_row(u));
      SumSets(sets, d, u0, split, n - 1);
      std::fill(r + split, r + u1, static_cast<int32_t>(m));
      if (u1 > split) std::memset(out + split * d, 0, (u1 - split) * d * sizeof(float));
      double acc = 0.0;
      for (int64_t u = u0; u < split; ++u) {
        const float* row = out + u * d;
        float s2 = 0.f;
#pragma omp simd reduction(+ : s2)
        for (int64_t c = 0; c < d; ++c) s2 += row[c] * row[c];
        acc += s2;
      }
      partial[blk] = acc;
    }
  });
  double total = 0.0;
  for (double x : partial) total += x;
  *sq->typed_data() = static_cast<float>(total);
  return ffi::Error::Success();
}

// One row's Adam step; gr == nullptr: a zero gradient.
inline void AdamRow(const float* gr, const float* ti, const float* mi, const float* ni, float* to, float* mo,
                    float* no, int64_t d, float div, float mul, float b1, float b2, float bc1, float bc2,
                    float eps, float wd, float neg_lr) {
  const float c1 = 1.f - b1, c2 = 1.f - b2;
  if (gr == nullptr) {
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) {
      const float m1 = b1 * mi[c], v1 = b2 * ni[c];
      const float u = (m1 / bc1) / (std::sqrt(v1 / bc2) + eps) + wd * ti[c];
      mo[c] = m1;
      no[c] = v1;
      to[c] = ti[c] + neg_lr * u;
    }
    return;
  }
#pragma omp simd
  for (int64_t c = 0; c < d; ++c) {
    const float gc = (gr[c] / div) * mul;
    const float m1 = c1 * gc + b1 * mi[c];
    const float v1 = c2 * (gc * gc) + b2 * ni[c];
    const float u = (m1 / bc1) / (std::sqrt(v1 / bc2) + eps) + wd * ti[c];
    mo[c] = m1;
    no[c] = v1;
    to[c] = ti[c] + neg_lr * u;
  }
}

ffi::Error ValueAdam(ffi::ThreadPool pool, F32R2 table_in, F32R2 mu_in, F32R2 nu_in, S32R1 rows, F32R2 g,
                     F32R0 lr_b, F32R0 div_b, F32R0 mul_b, F32R0 bc1_b, F32R0 bc2_b,
                     ffi::Result<F32R2> table, ffi::Result<F32R2> mu, ffi::Result<F32R2> nu, float b1,
                     float b2, float eps, float weight_decay, bool lazy) {
  const int64_t m = table_in.dimensions()[0], d = table_in.dimensions()[1], u_max = rows.dimensions()[0];
  if (mu_in.dimensions()[0] != m || nu_in.dimensions()[0] != m || mu_in.dimensions()[1] != d ||
      nu_in.dimensions()[1] != d || g.dimensions()[0] != u_max || g.dimensions()[1] != d)
    return ffi::Error::InvalidArgument("memjax value adam: shapes do not match");
  const float lr = *lr_b.typed_data(), div = *div_b.typed_data(), mul = *mul_b.typed_data();
  const float bc1 = *bc1_b.typed_data(), bc2 = *bc2_b.typed_data();
  const int32_t* rw = rows.typed_data();
  const float* gi = g.typed_data();
  const float* ti = table_in.typed_data();
  const float* mi = mu_in.typed_data();
  const float* ni = nu_in.typed_data();
  float* to = table->typed_data();
  float* mo = mu->typed_data();
  float* no = nu->typed_data();
  // The listed rows: ascending, then padding (>= m).
  const int64_t listed = std::lower_bound(rw, rw + u_max, static_cast<int32_t>(std::min<int64_t>(m, INT32_MAX))) - rw;
  if (lazy && to == ti && mo == mi && no == ni) {  // in place: the listed rows only
    ParallelFor(pool, listed, 64, [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t o = static_cast<int64_t>(rw[u]) * d;
        AdamRow(gi + u * d, to + o, mo + o, no + o, to + o, mo + o, no + o, d, div, mul, b1, b2, bc1, bc2, eps,
                weight_decay, -lr);
      }
    });
    return ffi::Error::Success();
  }
  // Every row once: listed rows get their gradient; the others decay (dense) or are copied where
  // the output is not the input's buffer (lazy).
  ParallelFor(pool, m, 256, [&](int64_t r0, int64_t r1) {
    int64_t u = std::lower_bound(rw, rw + listed, static_cast<int32_t>(r0)) - rw;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t o = r * d;
      const float* gr = nullptr;
      if (u < listed && rw[u] == r) {
        gr = gi + (u++) * d;
      } else if (lazy) {
        if (to != ti) std::memcpy(to + o, ti + o, d * sizeof(float));
        if (mo != mi) std::memcpy(mo + o, mi + o, d * sizeof(float));
        if (no != ni) std::memcpy(no + o, ni + o, d * sizeof(float));
        continue;
      }
      AdamRow(gr, ti + o, mi + o, ni + o, to + o, mo + o, no + o, d, div, mul, b1, b2, bc1, bc2, eps, weight_decay,
              -lr);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MemjaxValueRowSums, ValueRowSums,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<S32Any>()
                                  .Arg<F32Any>()
                                  .Arg<F32R2>()
                                  .Ret<S32R1>()
                                  .Ret<F32R2>()
                                  .Ret<F32R0>()
                                  .Attr<int64_t>("num_slots"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MemjaxValueAdam, ValueAdam,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32R2>()
                                  .Arg<F32R2>()
                                  .Arg<F32R2>()
                                  .Arg<S32R1>()
                                  .Arg<F32R2>()
                                  .Arg<F32R0>()
                                  .Arg<F32R0>()
                                  .Arg<F32R0>()
                                  .Arg<F32R0>()
                                  .Arg<F32R0>()
                                  .Ret<F32R2>()
                                  .Ret<F32R2>()
                                  .Ret<F32R2>()
                                  .Attr<float>("b1")
                                  .Attr<float>("b2")
                                  .Attr<float>("eps")
                                  .Attr<float>("weight_decay")
                                  .Attr<bool>("lazy"));

// ----- the product top-k's score gradient ------------------------------------------------------------
//
// MemjaxScatterRows   idx [..., k] s32, v [..., k] f32, attr n -> out [..., n] f32
//   out[r, :] = 0, then out[r, idx[r, c]] += v[r, c] for c = 0 .. k - 1 in order (indices clamped to
//   [0, n)): the transpose of take_along_axis, i.e. the chosen scores' cotangent put back into the
//   dense sub-key scores (product_keys._dense_score_grad). XLA's scatter costs ~3x this on CPU.

namespace {

ffi::Error ScatterRows(ffi::ThreadPool pool, S32Any idx, F32Any v, ffi::Result<F32Any> out, int64_t n) {
  const auto di = idx.dimensions();
  if (di.size() < 1 || v.element_count() != idx.element_count() || n < 1)
    return ffi::Error::InvalidArgument("memjax scatter rows: idx and v must have one shape [..., k]");
  const int64_t k = di.back();
  const int64_t rows = k == 0 ? 0 : static_cast<int64_t>(idx.element_count()) / k;
  if (static_cast<int64_t>(out->element_count()) != rows * n)
    return ffi::Error::InvalidArgument("memjax scatter rows: out must have shape [..., n]");
  const int32_t* ix = idx.typed_data();
  const float* vv = v.typed_data();
  float* o = out->typed_data();
  if (k == 0) {
    std::memset(o, 0, out->element_count() * sizeof(float));
    return ffi::Error::Success();
  }
  ParallelFor(pool, rows, std::max<int64_t>(1, 16384 / n), [&](int64_t r0, int64_t r1) {
    std::memset(o + r0 * n, 0, (r1 - r0) * n * sizeof(float));
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t c = 0; c < k; ++c) o[r * n + Clamp(ix[r * k + c], n)] += vv[r * k + c];
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MemjaxScatterRows, ScatterRows,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<S32Any>()
                                  .Arg<F32Any>()
                                  .Ret<F32Any>()
                                  .Attr<int64_t>("n"));
