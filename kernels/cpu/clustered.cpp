// Clustered attention on the CPU: Hamming k-means on packed codes, per-cluster means and broadcasts,
// and the improved-clustered top-k products (forward and backward).
//
// Every op works on one (batch, head) sequence at a time and splits the sequences over threads, so
// no two threads ever write the same row (the top-k backward scatters into shared keys of one
// sequence only). Floating point work accumulates in float32 for float32/bfloat16/float16 inputs and
// in float64 for float64 inputs.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#ifdef __AVX2__
#include <immintrin.h>
#endif

#include <algorithm>
#include <functional>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using Acc = typename AccOf<T>::type;

inline int64_t popcount(uint64_t x) { return static_cast<int64_t>(__builtin_popcountll(x)); }

#ifdef __AVX2__
// Set bits of each 64-bit lane: a 16-entry table per nibble (vpshufb), then byte sums per lane (vpsadbw).
// AVX2 has no vector popcount; this counts four words in about as many instructions as one scalar popcount.
inline __m256i popcount4(__m256i v) {
  const __m256i table = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                         0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i nibble = _mm256_set1_epi8(0x0f);
  const __m256i lo = _mm256_shuffle_epi8(table, _mm256_and_si256(v, nibble));
  const __m256i hi = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble));
  return _mm256_sad_epu8(_mm256_add_epi8(lo, hi), _mm256_setzero_si256());
}
#endif

// --------------------------------------------------------------------------- Hamming k-means
// Same algorithm, start and tie rules as hf_efficient.attention.hashing.hamming_kmeans:
// * start: farthest-first: the first real query, then repeatedly the one farthest from its closest
//   chosen centre (the lowest rank on ties);
// * assign: the centre with the fewest differing bits, the lowest index on ties;
// * update: bit b of a centre is 1 when more than half of its members have it (a tie gives 0); the j-th
//   empty cluster takes the code of the j-th farthest query from its own centre (lowest rank first on
//   ties) unless that distance is 0; stop after `iterations` updates or at a fixed point.
// spread[v][j] = bit j of byte v: the counters of a byte's 8 bits in one 8-lane addition
inline const std::array<std::array<int32_t, 8>, 256>& byte_bits() {
  static const auto table = [] {
    std::array<std::array<int32_t, 8>, 256> t{};
    for (int v = 0; v < 256; ++v)
      for (int j = 0; j < 8; ++j) t[v][j] = (v >> j) & 1;
    return t;
  }();
  return table;
}

struct KMeans {
  int64_t C, W;
  std::vector<uint64_t> centres;  // word-major: centres[w * C + c], so the inner loop runs over centres
  std::vector<int64_t> dist;
  std::vector<int32_t> ones;  // (C, 64 W) members with the bit set
  std::vector<int64_t> count;
  std::vector<int64_t> best;   // (n) distance of each query to its assigned centre
  std::vector<int64_t> order;  // (n) queries by decreasing distance, for re-seeding

  KMeans(int64_t C_, int64_t W_) : C(C_), W(W_), centres(C_ * W_), dist(C_), ones(C_ * 64 * W_), count(C_) {}

  static int64_t distance(const uint64_t* x, const uint64_t* y, int64_t W) {
    int64_t d = 0;
    for (int64_t w = 0; w < W; ++w) d += popcount(x[w] ^ y[w]);
    return d;
  }

  void set_centre(int64_t c, const uint64_t* x) {
    for (int64_t w = 0; w < W; ++w) centres[w * C + c] = x[w];
  }

  // Farthest-first start on the n codes (n > C, n < 2^32). Each round lowers every query's distance to its
  // closest chosen centre and finds the next pick in the same pass: the largest key (distance << 32 |
  // (2^32 - 1 - i)) is the farthest query, the lowest rank on ties; one branch-free loop that vectorises.
  std::vector<int64_t> far;
  void start(const uint64_t* codes, int64_t n) {
    far.assign(n, std::numeric_limits<int64_t>::max());
    const uint64_t* x = codes;  // centre 0: the first query
    for (int64_t c = 0; c < C; ++c) {
      set_centre(c, x);
      if (c + 1 == C) break;
      uint64_t best = 0;
      int64_t* f = far.data();
      if (W == 1) {
        const uint64_t x0 = x[0];
        for (int64_t i = 0; i < n; ++i) {
          const int64_t dd = popcount(codes[i] ^ x0);
          const int64_t m = dd < f[i] ? dd : f[i];
          f[i] = m;
          const uint64_t key = (static_cast<uint64_t>(m) << 32) | (0xffffffffu - static_cast<uint64_t>(i));
          best = key > best ? key : best;
        }
      } else {
        for (int64_t i = 0; i < n; ++i) {
          const int64_t m = std::min(f[i], distance(codes + i * W, x, W));
          f[i] = m;
          best = std::max(best, (static_cast<uint64_t>(m) << 32) | (0xffffffffu - static_cast<uint64_t>(i)));
        }
      }
      x = codes + static_cast<int64_t>(0xffffffffu - (best & 0xffffffffu)) * W;
    }
  }

  int64_t nearest(const uint64_t* x, int64_t* best_dist) {
    const uint64_t* c0 = centres.data();
    if (W == 1) {  // one word (up to 64 bits, the default 63): distance and minimum in one pass, no stores
      // four independent running minima: one chain of compare-and-moves would wait on each step
      constexpr uint64_t kMax = std::numeric_limits<uint64_t>::max();
      uint64_t b0 = kMax, b1 = kMax, b2 = kMax, b3 = kMax;
      const uint64_t x0 = x[0];
      auto key = [&](int64_t c) {
        return (static_cast<uint64_t>(popcount(x0 ^ c0[c])) << 32) | static_cast<uint64_t>(c);
      };
      int64_t c = 0;
#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__)
      {  // eight centres per step with the native 64-bit popcount; the last partial step under a lane mask
        const __m512i x8 = _mm512_set1_epi64(static_cast<int64_t>(x0));
        const __m512i step = _mm512_set1_epi64(8);
        __m512i index = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
        __m512i best8 = _mm512_set1_epi64(-1);  // all ones: the largest unsigned key
        for (; c < C; c += 8) {
          const __mmask8 lanes = C - c >= 8 ? __mmask8(0xff) : static_cast<__mmask8>((1u << (C - c)) - 1);
          const __m512i centre = _mm512_maskz_loadu_epi64(lanes, c0 + c);
          const __m512i k8 = _mm512_or_si512(_mm512_slli_epi64(_mm512_popcnt_epi64(_mm512_xor_si512(x8, centre)), 32), index);
          best8 = _mm512_mask_min_epu64(best8, lanes, best8, k8);
          index = _mm512_add_epi64(index, step);
        }
        b0 = _mm512_reduce_min_epu64(best8);
      }
#elif defined(__AVX2__)
      {  // keys (distance << 32 | index) < 2^39: the signed 64-bit compare orders them
        const __m256i x4 = _mm256_set1_epi64x(static_cast<int64_t>(x0));
        __m256i index = _mm256_setr_epi64x(0, 1, 2, 3), best4 = _mm256_set1_epi64x(std::numeric_limits<int64_t>::max());
        const __m256i step = _mm256_set1_epi64x(4);
        for (; c + 4 <= C; c += 4) {
          const __m256i centre = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c0 + c));
          const __m256i k4 = _mm256_or_si256(_mm256_slli_epi64(popcount4(_mm256_xor_si256(x4, centre)), 32), index);
          best4 = _mm256_blendv_epi8(best4, k4, _mm256_cmpgt_epi64(best4, k4));
          index = _mm256_add_epi64(index, step);
        }
        alignas(32) uint64_t lanes[4];
        _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), best4);
        b0 = std::min(std::min(lanes[0], lanes[1]), std::min(lanes[2], lanes[3]));
      }
#endif
      for (; c + 4 <= C; c += 4) {
        b0 = std::min(b0, key(c));
        b1 = std::min(b1, key(c + 1));
        b2 = std::min(b2, key(c + 2));
        b3 = std::min(b3, key(c + 3));
      }
      for (; c < C; ++c) b0 = std::min(b0, key(c));
      const uint64_t best = std::min(std::min(b0, b1), std::min(b2, b3));
      *best_dist = static_cast<int64_t>(best >> 32);
      return static_cast<int64_t>(best & 0xffffffffu);
    }
    int64_t* d = dist.data();
    for (int64_t c = 0; c < C; ++c) d[c] = popcount(x[0] ^ c0[c]);
    for (int64_t w = 1; w < W; ++w) {
      const uint64_t* cw = c0 + w * C;
      for (int64_t c = 0; c < C; ++c) d[c] += popcount(x[w] ^ cw[c]);
    }
    // (distance, index) packed in one integer: its minimum is the first nearest centre
    uint64_t best = std::numeric_limits<uint64_t>::max();
    for (int64_t c = 0; c < C; ++c) best = std::min(best, (static_cast<uint64_t>(d[c]) << 32) | static_cast<uint64_t>(c));
    *best_dist = static_cast<int64_t>(best >> 32);
    return static_cast<int64_t>(best & 0xffffffffu);
  }

  // returns whether any assignment changed
  bool assign_all(const uint64_t* codes, int64_t n, int64_t* assign) {
    bool changed = false;
    best.resize(n);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t a = nearest(codes + i * W, &best[i]);
      changed |= a != assign[i];
      assign[i] = a;
    }
    return changed;
  }

  // After an update, reassign only against what changed: a query whose centre kept its code keeps its
  // distance to it, and every other unchanged centre is still no nearer (nor equally near with a lower
  // index), so its nearest centre is the best of its own and the moved ones; a query whose centre moved
  // is assigned afresh. The result is that of assign_all. Returns whether any assignment changed.
  std::vector<uint64_t> before;  // centres before the update (word-major, as centres)
  std::vector<char> moved;
  std::vector<int64_t> moved_list;
  std::vector<uint64_t> moved_codes, moved_index;
  bool reassign(const uint64_t* codes, int64_t n, int64_t* assign) {
    moved.assign(C, 0);
    moved_list.clear();
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t w = 0; w < W; ++w) moved[c] |= centres[w * C + c] != before[w * C + c];
      if (moved[c]) moved_list.push_back(c);
    }
    if (moved_list.empty()) return false;  // same centres: same assignment (a fixed point)
    const int64_t m = static_cast<int64_t>(moved_list.size());
#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__)
    const bool vector = W == 1;  // the moved centres' codes and indices side by side, eight per step
    if (vector) {
      moved_codes.resize(m);
      moved_index.resize(m);
      for (int64_t j = 0; j < m; ++j) {
        moved_codes[j] = centres[moved_list[j]];
        moved_index[j] = static_cast<uint64_t>(moved_list[j]);
      }
    }
#else
    if (m * 8 > C) return assign_all(codes, n, assign);  // scalar: worth it for a few moved centres only
#endif
    bool changed = false;
    for (int64_t i = 0; i < n; ++i) {
      const uint64_t* x = codes + i * W;
      int64_t a;
      if (moved[assign[i]]) {
        a = nearest(x, &best[i]);
      }
#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__)
      else if (vector) {
        const __m512i x8 = _mm512_set1_epi64(static_cast<int64_t>(x[0]));
        __m512i best8 = _mm512_set1_epi64(static_cast<int64_t>((static_cast<uint64_t>(best[i]) << 32) |
                                                               static_cast<uint64_t>(assign[i])));
        for (int64_t j = 0; j < m; j += 8) {
          const __mmask8 lanes = m - j >= 8 ? __mmask8(0xff) : static_cast<__mmask8>((1u << (m - j)) - 1);
          const __m512i centre = _mm512_maskz_loadu_epi64(lanes, moved_codes.data() + j);
          const __m512i index = _mm512_maskz_loadu_epi64(lanes, moved_index.data() + j);
          const __m512i k8 = _mm512_or_si512(_mm512_slli_epi64(_mm512_popcnt_epi64(_mm512_xor_si512(x8, centre)), 32), index);
          best8 = _mm512_mask_min_epu64(best8, lanes, best8, k8);
        }
        const uint64_t key = _mm512_reduce_min_epu64(best8);
        best[i] = static_cast<int64_t>(key >> 32);
        a = static_cast<int64_t>(key & 0xffffffffu);
      }
#endif
      else {
        uint64_t key = (static_cast<uint64_t>(best[i]) << 32) | static_cast<uint64_t>(assign[i]);
        for (const int64_t c : moved_list) {
          int64_t dd = 0;
          for (int64_t w = 0; w < W; ++w) dd += popcount(x[w] ^ centres[w * C + c]);
          key = std::min(key, (static_cast<uint64_t>(dd) << 32) | static_cast<uint64_t>(c));
        }
        best[i] = static_cast<int64_t>(key >> 32);
        a = static_cast<int64_t>(key & 0xffffffffu);
      }
      changed |= a != assign[i];
      assign[i] = a;
    }
    return changed;
  }

  void update(const uint64_t* codes, int64_t n, const int64_t* assign) {
    before = centres;
    std::fill(ones.begin(), ones.end(), 0);
    std::fill(count.begin(), count.end(), 0);
    const int64_t nb = 64 * W;
    const auto& spread = byte_bits();
    for (int64_t i = 0; i < n; ++i) {
      int32_t* o = ones.data() + assign[i] * nb;
      count[assign[i]] += 1;
      for (int64_t w = 0; w < W; ++w) {
        const uint64_t x = codes[i * W + w];
#ifdef __AVX512F__
        // 16 counters per step: add 1 under the code's 16 bits as a lane mask
        const __m512i one = _mm512_set1_epi32(1);
        for (int quarter = 0; quarter < 4; ++quarter) {
          int32_t* oq = o + w * 64 + 16 * quarter;
          const __m512i cnt16 = _mm512_loadu_si512(oq);
          const auto lanes = static_cast<__mmask16>((x >> (16 * quarter)) & 0xffffu);
          _mm512_storeu_si512(oq, _mm512_mask_add_epi32(cnt16, lanes, cnt16, one));
        }
        continue;
#endif
        // byte by byte: add the byte's 8 bits as 8 counters at once (a vectorisable loop of 8)
        for (int byte = 0; byte < 8; ++byte) {
          const int32_t* bits8 = spread[(x >> (8 * byte)) & 0xffu].data();
          int32_t* ob = o + w * 64 + 8 * byte;
          for (int j = 0; j < 8; ++j) ob[j] += bits8[j];
        }
      }
    }
    int64_t empty = 0;
    for (int64_t c = 0; c < C; ++c) {
      if (count[c] == 0) {
        ++empty;
        continue;
      }
      const int32_t* o = ones.data() + c * nb;
      for (int64_t w = 0; w < W; ++w) {
        uint64_t word = 0;
#ifdef __AVX512F__
        if (count[c] <= std::numeric_limits<int32_t>::max() / 2) {  // 2 * ones fits int32: 16 compares at once
          const __m512i half = _mm512_set1_epi32(static_cast<int32_t>(count[c]));
          for (int quarter = 0; quarter < 4; ++quarter) {
            const __m512i twice = _mm512_slli_epi32(_mm512_loadu_si512(o + w * 64 + 16 * quarter), 1);
            word |= static_cast<uint64_t>(_mm512_cmpgt_epi32_mask(twice, half)) << (16 * quarter);
          }
          centres[w * C + c] = word;
          continue;
        }
#endif
        for (int b = 0; b < 64; ++b) word |= static_cast<uint64_t>(2 * static_cast<int64_t>(o[w * 64 + b]) > count[c]) << b;
        centres[w * C + c] = word;
      }
    }
    if (empty == 0) return;
    order.resize(n);
    for (int64_t i = 0; i < n; ++i) order[i] = i;
    // only the `empty` farthest queries are needed: a partial sort, ties to the lowest rank (as a stable sort)
    std::partial_sort(order.begin(), order.begin() + std::min(empty, n), order.end(), [&](int64_t x, int64_t y) {
      return best[x] > best[y] || (best[x] == best[y] && x < y);
    });
    int64_t j = 0;  // empty clusters seen so far; n > C, so order[j] exists
    for (int64_t c = 0; c < C; ++c) {
      if (count[c] != 0) continue;
      const int64_t i = order[j++];
      if (best[i] > 0) set_centre(c, codes + i * W);
    }
  }
};

at::Tensor hamming_kmeans(const at::Tensor& bits_in, const at::Tensor& valid_in, int64_t clusters, int64_t iterations) {
  TORCH_CHECK(bits_in.dim() == 3 && bits_in.scalar_type() == at::kBool,
              "hamming_kmeans: bits must be a bool (sequences, n, n_bits) tensor");
  TORCH_CHECK(valid_in.dim() == 2 && valid_in.scalar_type() == at::kBool && valid_in.size(0) == bits_in.size(0) &&
                  valid_in.size(1) == bits_in.size(1),
              "hamming_kmeans: valid must be a bool (sequences, n) tensor");
  TORCH_CHECK(clusters >= 1 && iterations >= 0, "hamming_kmeans: clusters >= 1 and iterations >= 0");
  // nearest() packs the centre index into 32 bits
  TORCH_CHECK(clusters <= std::numeric_limits<int32_t>::max(), "hamming_kmeans: clusters must be < 2^31");
  // start() packs the query rank into 32 bits
  TORCH_CHECK(bits_in.size(1) <= std::numeric_limits<int32_t>::max(), "hamming_kmeans: n must be < 2^31");
  const auto bits = bits_in.contiguous();
  const auto valid = valid_in.contiguous();
  const int64_t S = bits.size(0), n = bits.size(1), nb = bits.size(2), W = (nb + 63) / 64;
  auto out = at::empty({S, n}, bits.options().dtype(at::kLong));
  const bool* pb = bits.data_ptr<bool>();
  const bool* pv = valid.data_ptr<bool>();
  int64_t* po = out.data_ptr<int64_t>();
  at::parallel_for(0, S, 1, [&](int64_t lo, int64_t hi) {
    KMeans km(clusters, W);
    std::vector<uint64_t> codes;
    std::vector<int64_t> pos, assign;
    for (int64_t s = lo; s < hi; ++s) {
      const bool* vs = pv + s * n;
      int64_t* os = po + s * n;
      pos.clear();
      for (int64_t i = 0; i < n; ++i) {
        os[i] = -1;
        if (vs[i]) pos.push_back(i);
      }
      const int64_t nr = static_cast<int64_t>(pos.size());
      if (nr <= clusters) {  // each real query is its own cluster (exact attention)
        for (int64_t r = 0; r < nr; ++r) os[pos[r]] = r;
        continue;
      }
      codes.assign(nr * W, 0);
      for (int64_t r = 0; r < nr; ++r) {
        const bool* x = pb + (s * n + pos[r]) * nb;
        uint64_t* cw = codes.data() + r * W;
        int64_t b = 0;
        for (; b + 8 <= nb; b += 8) {  // eight bools (bytes) at a time: one multiply gathers their low bits
          uint64_t eight;
          std::memcpy(&eight, x + b, 8);
          eight &= 0x0101010101010101ull;
          cw[b >> 6] |= ((eight * 0x0102040810204080ull) >> 56) << (b & 63);
        }
        for (; b < nb; ++b) cw[b >> 6] |= static_cast<uint64_t>(reinterpret_cast<const uint8_t*>(x)[b] & 1u) << (b & 63);
      }
      km.start(codes.data(), nr);
      assign.assign(nr, -1);
      km.assign_all(codes.data(), nr, assign.data());
      for (int64_t it = 0; it < iterations; ++it) {
        km.update(codes.data(), nr, assign.data());
        if (!km.reassign(codes.data(), nr, assign.data())) break;
      }
      for (int64_t r = 0; r < nr; ++r) os[pos[r]] = assign[r];
    }
  });
  return out;
}

// --------------------------------------------------------------------------- aggregate / broadcast
void check_assign(const at::Tensor& x, const at::Tensor& assign, const char* name) {
  TORCH_CHECK(x.dim() == 4, name, ": expected a (batch, heads, rows, dim) tensor");
  TORCH_CHECK(assign.dim() == 3 && assign.scalar_type() == at::kLong && assign.size(0) == x.size(0) &&
                  assign.size(1) == x.size(1),
              name, ": assign must be an int64 (batch, heads, n) tensor");
}

// Per-sequence member counts of each cluster.
// Every index that comes from data is checked before it addresses memory.
void counts(const int64_t* a, int64_t n, int64_t C, std::vector<int64_t>& cnt) {
  cnt.assign(C, 0);
  for (int64_t i = 0; i < n; ++i) {
    if (a[i] < 0) continue;
    TORCH_CHECK(a[i] < C, "clustered: assignment ", a[i], " out of range for ", C, " clusters");
    cnt[a[i]] += 1;
  }
}

// out[b, h, c] = sum (or mean) of x[b, h, i] over the queries i with assign == c (zero when empty).
at::Tensor cluster_sum(const at::Tensor& x_in, const at::Tensor& assign_in, int64_t C, bool mean) {
  check_assign(x_in, assign_in, "cluster_sum");
  TORCH_CHECK(x_in.size(2) == assign_in.size(2), "cluster_sum: x and assign must have the same n");
  const auto x = x_in.contiguous();
  const auto assign = assign_in.contiguous();
  const int64_t B = x.size(0), H = x.size(1), n = x.size(2), d = x.size(3);
  auto out = at::empty({B, H, C, d}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "cluster_sum", [&] {
    using T = Acc<scalar_t>;
    const scalar_t* px = x.data_ptr<scalar_t>();
    const int64_t* pa = assign.data_ptr<int64_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * H, 1, [&](int64_t lo, int64_t hi) {
      std::vector<T> acc(C * d);
      std::vector<int64_t> cnt;
      for (int64_t bh = lo; bh < hi; ++bh) {
        std::fill(acc.begin(), acc.end(), T(0));
        const int64_t* a = pa + bh * n;
        const scalar_t* xs = px + bh * n * d;
        for (int64_t i = 0; i < n; ++i) {
          if (a[i] < 0) continue;
          TORCH_CHECK(a[i] < C, "cluster_sum: assignment ", a[i], " out of range for ", C, " clusters");
          T* row = acc.data() + a[i] * d;
          const scalar_t* xr = xs + i * d;
          for (int64_t j = 0; j < d; ++j) row[j] += static_cast<T>(xr[j]);
        }
        if (mean) counts(a, n, C, cnt);
        scalar_t* os = po + bh * C * d;
        for (int64_t c = 0; c < C; ++c) {
          const T f = mean && cnt[c] > 0 ? T(1) / static_cast<T>(cnt[c]) : T(1);
          for (int64_t j = 0; j < d; ++j) os[c * d + j] = static_cast<scalar_t>(acc[c * d + j] * f);
        }
      }
    });
  });
  return out;
}

// out[b, h, i] = y[b, h, assign[i]] (divided by that cluster's size when `divide`); zero where assign < 0.
at::Tensor cluster_gather(const at::Tensor& y_in, const at::Tensor& assign_in, bool divide) {
  check_assign(y_in, assign_in, "cluster_gather");
  const auto y = y_in.contiguous();
  const auto assign = assign_in.contiguous();
  const int64_t B = y.size(0), H = y.size(1), C = y.size(2), e = y.size(3), n = assign.size(2);
  auto out = at::empty({B, H, n, e}, y.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "cluster_gather", [&] {
    using T = Acc<scalar_t>;
    const scalar_t* py = y.data_ptr<scalar_t>();
    const int64_t* pa = assign.data_ptr<int64_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * H, 1, [&](int64_t lo, int64_t hi) {
      std::vector<int64_t> cnt;
      for (int64_t bh = lo; bh < hi; ++bh) {
        const int64_t* a = pa + bh * n;
        if (divide) counts(a, n, C, cnt);
        const scalar_t* ys = py + bh * C * e;
        scalar_t* os = po + bh * n * e;
        for (int64_t i = 0; i < n; ++i) {
          scalar_t* orow = os + i * e;
          if (a[i] < 0) {
            std::fill(orow, orow + e, scalar_t(0));
            continue;
          }
          TORCH_CHECK(a[i] < C, "cluster_gather: assignment ", a[i], " out of range for ", C, " clusters");
          const scalar_t* yr = ys + a[i] * e;
          if (divide) {
            const T f = T(1) / static_cast<T>(cnt[a[i]]);
            for (int64_t j = 0; j < e; ++j) orow[j] = static_cast<scalar_t>(static_cast<T>(yr[j]) * f);
          } else {
            std::copy(yr, yr + e, orow);
          }
        }
      }
    });
  });
  return out;
}

// --------------------------------------------------------------------------- top-k products
// For query i of cluster c with top keys T = top[c] (t of them):
//   w_i = softmax_j(scale * q_i . k_{T_j}) over the real keys of T,  out_i = sum_j w_ij v_{T_j}.
// Queries are visited cluster by cluster (a counting sort per sequence): the cluster's t keys and values
// are copied once into small zero-padded buffers, and its member queries are processed R at a time, so
// that every product is a small matrix product whose R x L accumulators stay in registers.
struct Sequence {
  std::vector<int64_t> start, order;  // queries of cluster c: order[start[c] .. start[c + 1])
  void build(const int64_t* a, int64_t n, int64_t C) {
    start.assign(C + 1, 0);
    for (int64_t i = 0; i < n; ++i) {
      if (a[i] < 0) continue;
      TORCH_CHECK(a[i] < C, "clustered_topk: assignment ", a[i], " out of range for ", C, " clusters");
      start[a[i] + 1] += 1;
    }
    for (int64_t c = 0; c < C; ++c) start[c + 1] += start[c];
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    order.resize(start[C]);
    for (int64_t i = 0; i < n; ++i)
      if (a[i] >= 0) order[fill[a[i]]++] = i;
  }
};

// One vector register: 64 bytes with AVX-512, 32 bytes otherwise. Wider GCC vectors than the hardware's
// are split by the compiler into pieces shuffled through memory, several times slower than native ones.
#ifdef __AVX512F__
constexpr int64_t kVecBytes = 64;
#else
constexpr int64_t kVecBytes = 32;
#endif
template <typename T>
constexpr int64_t kLanes = kVecBytes / static_cast<int64_t>(sizeof(T));
constexpr int64_t kRows = 8;  // queries per block: 8 accumulators + one row of B fit 16 registers

inline int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

// One vector register of T (GCC vector extension; unaligned loads and stores are allowed).
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(kVecBytes), aligned(sizeof(T))));
};

// C[r, n] (+)= sum_k A[r * rsa + k * csa] B[k * ldb + n] for r < MR, n < N (N a multiple of the lanes).
// Written with explicit vectors: left to itself the compiler vectorises across r with shuffles.
template <typename T, int64_t MR>
inline void small_gemm(int64_t K, int64_t N, const T* A, int64_t rsa, int64_t csa, const T* B, int64_t ldb, T* Cm,
                       int64_t ldc, bool accumulate) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = kLanes<T>;
  for (int64_t n0 = 0; n0 < N; n0 += L) {
    V acc[MR];
    for (int64_t r = 0; r < MR; ++r) acc[r] = accumulate ? *reinterpret_cast<const V*>(Cm + r * ldc + n0) : V{};
    for (int64_t k = 0; k < K; ++k) {
      const V b = *reinterpret_cast<const V*>(B + k * ldb + n0);
      for (int64_t r = 0; r < MR; ++r) acc[r] += A[r * rsa + k * csa] * b;
    }
    for (int64_t r = 0; r < MR; ++r) *reinterpret_cast<V*>(Cm + r * ldc + n0) = acc[r];
  }
}

// Any row count: blocks of kRows rows, then of 4, then single rows.
template <typename T>
void gemm(int64_t M, int64_t K, int64_t N, const T* A, int64_t rsa, int64_t csa, const T* B, int64_t ldb, T* Cm,
          int64_t ldc, bool accumulate) {
  int64_t r = 0;
  for (; r + kRows <= M; r += kRows)
    small_gemm<T, kRows>(K, N, A + r * rsa, rsa, csa, B, ldb, Cm + r * ldc, ldc, accumulate);
  for (; r + 4 <= M; r += 4) small_gemm<T, 4>(K, N, A + r * rsa, rsa, csa, B, ldb, Cm + r * ldc, ldc, accumulate);
  for (; r < M; ++r) small_gemm<T, 1>(K, N, A + r * rsa, rsa, csa, B, ldb, Cm + r * ldc, ldc, accumulate);
}

// e^f for |f| <= ln 2 / 2 by its degree-7 Taylor polynomial (Horner), for a float or a vector of floats.
template <typename F>
inline F exp_reduced(F f) {
  F p = F{} + 1.0f / 5040.0f;
  p = p * f + 1.0f / 720.0f;
  p = p * f + 1.0f / 120.0f;
  p = p * f + 1.0f / 24.0f;
  p = p * f + 1.0f / 6.0f;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  return p;
}

// exp(x) for x <= 0 by 2^(x log2 e): round to the nearest integer n, a degree-7 Taylor polynomial of
// 2^f on |f| <= 1/2 (relative error about 1e-8, below float rounding) and n added to the exponent
// bits. Branch-free so that the loop over the keys vectorises. x is clamped to [-87, 0] first, so the
// float-to-int conversion and the exponent addition cannot overflow whatever x is (a pad lane may pass
// a large positive x; its weight is zeroed by the caller); NaN stays NaN, as in std::exp.
inline float exp_nonpositive(float x_in) {
  float x = x_in > -87.0f ? x_in : -87.0f;  // NaN -> -87 here, restored below
  x = x < 0.0f ? x : 0.0f;
  const float t = x * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23 trick)
  const float f = (t - n) * 0.693147180559945309f;  // e^f, |f| <= ln 2 / 2
  float p = exp_reduced(f);
  int32_t bits;
  std::memcpy(&bits, &p, sizeof(bits));
  bits += static_cast<int32_t>(n) * (1 << 23);
  std::memcpy(&p, &bits, sizeof(p));
  return x_in == x_in ? p : x_in;
}
inline double exp_nonpositive(double x) { return std::exp(std::min(x, 0.0)); }  // NaN stays NaN

// exp_nonpositive on a whole vector of floats (same steps, lane by lane, min(x, 0) included): the
// scalar function is not vectorised by the compiler inside loops that also accumulate.
inline Vec<float>::type exp_nonpositive_vec(Vec<float>::type x_in) {
  using V = Vec<float>::type;
  using I = Vec<int32_t>::type;
  const V lo = V{} - 87.0f, zero = V{};
  V x = x_in > lo ? x_in : lo;  // NaN -> -87 here, restored below
  x = x < zero ? x : zero;
  const V t = x * 1.44269504088896341f;
  const V n = (t + 12582912.0f) - 12582912.0f;
  const V f = (t - n) * 0.693147180559945309f;
  V p = exp_reduced(f);
  I bits;
  std::memcpy(&bits, &p, sizeof(bits));
  bits += __builtin_convertvector(n, I) * (1 << 23);
  std::memcpy(&p, &bits, sizeof(p));
  return x_in == x_in ? p : x_in;
}

template <typename In, typename T>
struct TopBuffers {
  int64_t t, d, e, tp, dp, ep;
  // keys transposed kt (d, tp) and values vr (t, ep) for the forward; values transposed vt (e, tp) and
  // keys kr (t, dp) for the backward; padding columns stay zero
  std::vector<T> kt, vr, vt, kr;
  std::vector<T> ok;  // 1 for a real key, 0 for a padded one (or a pad lane)
  TopBuffers(int64_t t_, int64_t d_, int64_t e_)
      : t(t_), d(d_), e(e_), tp(round_up(t_, kLanes<T>)), dp(round_up(d_, kLanes<T>)), ep(round_up(e_, kLanes<T>)),
        kt(d * tp, T(0)), vr(t * ep, T(0)), vt(e * tp, T(0)), kr(t * dp, T(0)), ok(tp, T(0)), rows(t_) {}

  // Load the cluster's keys and values; returns the number of real keys among them.
  int64_t load(const In* ks, const In* vs, const int64_t* top, const bool* kmask, int64_t nk, bool forward) {
    int64_t real = 0;
    for (int64_t j = 0; j < t; ++j) {
      const int64_t key = top[j];
      TORCH_CHECK(key >= 0 && key < nk, "clustered_topk: top index ", key, " out of range for ", nk, " keys");
      ok[j] = (kmask == nullptr || kmask[key]) ? T(1) : T(0);
      real += ok[j] != T(0);
      const In* krow = ks + key * d;
      const In* vrow = vs + key * e;
      if (forward) {  // keys: transposed below, eight rows at a time
        rows[j] = krow;
        for (int64_t x = 0; x < e; ++x) vr[j * ep + x] = static_cast<T>(vrow[x]);
      } else {
        for (int64_t x = 0; x < d; ++x) kr[j * dp + x] = static_cast<T>(krow[x]);
        for (int64_t x = 0; x < e; ++x) vt[x * tp + j] = static_cast<T>(vrow[x]);
      }
    }
    if (forward) transpose_keys();
    return real;
  }

  // kt (d, tp) = the t key rows transposed, eight rows at a time: contiguous stores along each kt row.
  std::vector<const In*> rows;
  void transpose_keys() {
    constexpr int64_t B = 8;
    for (int64_t j0 = 0; j0 < t; j0 += B) {
      const int64_t jn = std::min(B, t - j0);
      for (int64_t x = 0; x < d; ++x) {
        T* dst = kt.data() + x * tp + j0;
        for (int64_t j = 0; j < jn; ++j) dst[j] = static_cast<T>(rows[j0 + j][x]);
      }
    }
  }
};

// In place: each of the `rows` score rows (stride tp) becomes the softmax over its real keys.
template <typename T>
void softmax_rows(T* s, int64_t rows, int64_t tp, const T* ok, int64_t real) {
  for (int64_t r = 0; r < rows; ++r) {
    T* row = s + r * tp;
    if (real == 0) {  // no real key: zero weights, as the PyTorch path gives
      std::fill(row, row + tp, T(0));
      continue;
    }
    T mx = -std::numeric_limits<T>::infinity();
    for (int64_t j = 0; j < tp; ++j)
      if (ok[j] != T(0)) mx = std::max(mx, row[j]);
    T sum = 0;
    for (int64_t j = 0; j < tp; ++j) {
      row[j] = exp_nonpositive(row[j] - mx) * ok[j];
      sum += row[j];
    }
    const T inv = T(1) / sum;
    for (int64_t j = 0; j < tp; ++j) row[j] *= inv;
  }
}

// The float rows one vector at a time (tp is a multiple of the lanes); same steps as the generic loop.
template <>
void softmax_rows<float>(float* s, int64_t rows, int64_t tp, const float* ok, int64_t real) {
  using V = Vec<float>::type;
  constexpr int64_t L = kLanes<float>;
  const V minus_inf = V{} - std::numeric_limits<float>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    float* row = s + r * tp;
    if (real == 0) {
      std::fill(row, row + tp, 0.0f);
      continue;
    }
    V mv = minus_inf;
    for (int64_t j = 0; j < tp; j += L) {
      const V x = *reinterpret_cast<const V*>(row + j);
      const V keep = *reinterpret_cast<const V*>(ok + j);
      const V y = keep != 0.0f ? x : minus_inf;
      mv = y > mv ? y : mv;
    }
    float mx = mv[0];
    for (int64_t l = 1; l < L; ++l) mx = std::max(mx, static_cast<float>(mv[l]));
    V sv = V{};
    for (int64_t j = 0; j < tp; j += L) {
      V& x = *reinterpret_cast<V*>(row + j);
      x = exp_nonpositive_vec(x - mx) * *reinterpret_cast<const V*>(ok + j);
      sv += x;
    }
    float sum = 0.0f;
    for (int64_t l = 0; l < L; ++l) sum += sv[l];
    const float inv = 1.0f / sum;
    for (int64_t j = 0; j < tp; j += L) *reinterpret_cast<V*>(row + j) *= inv;
  }
}

void check_topk(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& assign,
                const at::Tensor& top, const std::optional<at::Tensor>& key_mask) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "clustered_topk: q, k, v must be 4-d");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3) &&
                  k.sizes().slice(0, 3) == v.sizes().slice(0, 3),
              "clustered_topk: expected q (b, h, n, d), k (b, h, n_k, d), v (b, h, n_k, e)");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "clustered_topk: q, k, v must share a dtype");
  TORCH_CHECK(assign.dim() == 3 && assign.scalar_type() == at::kLong && assign.sizes() == q.sizes().slice(0, 3),
              "clustered_topk: assign must be int64 (b, h, n)");
  TORCH_CHECK(top.dim() == 4 && top.scalar_type() == at::kLong && top.size(0) == q.size(0) && top.size(1) == q.size(1),
              "clustered_topk: top must be int64 (b, h, C, t)");
  if (key_mask.has_value() && key_mask->defined())
    TORCH_CHECK(key_mask->dim() == 2 && key_mask->scalar_type() == at::kBool && key_mask->size(0) == k.size(0) &&
                    key_mask->size(1) == k.size(2),
                "clustered_topk: key_mask must be bool (b, n_k)");
}

// Zero the rows of padded queries (assign < 0) and check the assignment range.
template <typename X>
void zero_padded(const int64_t* a, int64_t n, int64_t C, X* rows, int64_t width) {
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(a[i] < C, "clustered_topk: assignment ", a[i], " out of range for ", C, " clusters");
    if (a[i] < 0) std::fill(rows + i * width, rows + (i + 1) * width, X(0));
  }
}

// The forward of the top-k products; with mass (b, h, C) and rest (b, h, C, e) given it writes the
// improved-clustered output itself, out_i = mass_c out_i + rest_c for query i of cluster c, and keeps no
// weights (inference: no (b, h, n, t) weights, no per-query copies of mass and rest).
std::vector<at::Tensor> topk_forward(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                     const at::Tensor& assign_in, const at::Tensor& top_in,
                                     const std::optional<at::Tensor>& key_mask, double scale, const at::Tensor* mass_in,
                                     const at::Tensor* rest_in) {
  check_topk(q_in, k_in, v_in, assign_in, top_in, key_mask);
  const auto q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const auto assign = assign_in.contiguous(), top = top_in.contiguous();
  at::Tensor km;
  if (key_mask.has_value() && key_mask->defined()) km = key_mask->contiguous();
  const int64_t B = q.size(0), H = q.size(1), n = q.size(2), d = q.size(3), nk = k.size(2), e = v.size(3);
  const int64_t C = top.size(2), t = top.size(3);
  const bool combine = mass_in != nullptr;
  at::Tensor mass, rest;
  if (combine) {
    TORCH_CHECK(mass_in->dim() == 3 && mass_in->size(0) == B && mass_in->size(1) == H && mass_in->size(2) == C &&
                    rest_in->dim() == 4 && rest_in->size(0) == B && rest_in->size(1) == H && rest_in->size(2) == C &&
                    rest_in->size(3) == e,
                "improved_topk: expected mass (b, h, C) and rest (b, h, C, e) matching top and v");
    TORCH_CHECK(mass_in->scalar_type() == q.scalar_type() && rest_in->scalar_type() == q.scalar_type(),
                "improved_topk: mass and rest must have q's dtype");
    mass = mass_in->contiguous();
    rest = rest_in->contiguous();
  }
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto out = at::empty({B, H, n, e}, q.options());
  auto w = at::empty({combine ? 0 : B, H, n, t}, q.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "clustered_topk_forward", [&] {
    using In = scalar_t;
    using T = Acc<In>;
    const In *pq = q.data_ptr<In>(), *pk = k.data_ptr<In>(), *pv = v.data_ptr<In>();
    const int64_t *pa = assign.data_ptr<int64_t>(), *pt = top.data_ptr<int64_t>();
    const bool* pm = km.defined() ? km.data_ptr<bool>() : nullptr;
    const In* pmass = combine ? mass.data_ptr<In>() : nullptr;
    const In* prest = combine ? rest.data_ptr<In>() : nullptr;
    In* po = out.data_ptr<In>();
    T* pw = combine ? nullptr : w.data_ptr<T>();
    at::parallel_for(0, B * H, 1, [&](int64_t lo, int64_t hi) {
      TopBuffers<In, T> buf(t, d, e);
      const int64_t tp = buf.tp, ep = buf.ep;
      Sequence seq;
      std::vector<T> qb(kRows * d), s(kRows * tp), o(kRows * ep), rc(e);
      for (int64_t bh = lo; bh < hi; ++bh) {
        const int64_t* a = pa + bh * n;
        zero_padded(a, n, C, po + bh * n * e, e);
        if (!combine) zero_padded(a, n, C, pw + bh * n * t, t);
        seq.build(a, n, C);
        const bool* mask = pm ? pm + (bh / H) * nk : nullptr;
        for (int64_t c = 0; c < C; ++c) {
          if (seq.start[c] == seq.start[c + 1]) continue;
          const int64_t real = buf.load(pk + bh * nk * d, pv + bh * nk * e, pt + (bh * C + c) * t, mask, nk, true);
          T mc = T(1);
          if (combine) {
            mc = static_cast<T>(pmass[bh * C + c]);
            for (int64_t x = 0; x < e; ++x) rc[x] = static_cast<T>(prest[(bh * C + c) * e + x]);
          }
          for (int64_t r0 = seq.start[c]; r0 < seq.start[c + 1]; r0 += kRows) {
            const int64_t rows = std::min(kRows, seq.start[c + 1] - r0);
            for (int64_t r = 0; r < rows; ++r) {
              const In* qi = pq + (bh * n + seq.order[r0 + r]) * d;
              for (int64_t x = 0; x < d; ++x) qb[r * d + x] = static_cast<T>(qi[x]) * static_cast<T>(scale);
            }
            gemm<T>(rows, d, tp, qb.data(), d, 1, buf.kt.data(), tp, s.data(), tp, false);
            softmax_rows<T>(s.data(), rows, tp, buf.ok.data(), real);
            gemm<T>(rows, t, ep, s.data(), tp, 1, buf.vr.data(), ep, o.data(), ep, false);
            for (int64_t r = 0; r < rows; ++r) {
              const int64_t i = seq.order[r0 + r];
              In* orow = po + (bh * n + i) * e;
              const T* orr = o.data() + r * ep;
              if (combine) {
                for (int64_t x = 0; x < e; ++x) orow[x] = static_cast<In>(mc * orr[x] + rc[x]);
              } else {
                for (int64_t x = 0; x < e; ++x) orow[x] = static_cast<In>(orr[x]);
                std::copy(s.data() + r * tp, s.data() + r * tp + t, pw + (bh * n + i) * t);
              }
            }
          }
        }
      }
    });
  });
  if (combine) return {out};
  return {out, w};
}

std::vector<at::Tensor> clustered_topk_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               const at::Tensor& assign, const at::Tensor& top,
                                               const std::optional<at::Tensor>& key_mask, double scale) {
  return topk_forward(q, k, v, assign, top, key_mask, scale, nullptr, nullptr);
}

// Improved clustered attention's output from the centroid half (mass, rest) and the top-k products, in one
// pass; forward only.
at::Tensor improved_topk(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& assign,
                         const at::Tensor& top, const std::optional<at::Tensor>& key_mask, double scale,
                         const at::Tensor& mass, const at::Tensor& rest) {
  return topk_forward(q, k, v, assign, top, key_mask, scale, &mass, &rest)[0];
}

// Gradients of clustered_topk_forward w.r.t. q, k and v, from the saved softmax weights w.
//   dW_ij = g_i . v_{T_j};  dS_ij = w_ij (dW_ij - sum_l w_il dW_il);
//   dq_i = scale sum_j dS_ij k_{T_j};  dk_{T_j} += scale sum_i dS_ij q_i;  dv_{T_j} += sum_i w_ij g_i.
// dk and dv are accumulated per cluster, then added into float buffers of the sequence (a key may be in
// the top of several clusters).
std::vector<at::Tensor> clustered_topk_backward(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                                const at::Tensor& assign_in, const at::Tensor& top_in,
                                                const at::Tensor& w_in, const at::Tensor& grad_in, double scale) {
  check_topk(q_in, k_in, v_in, assign_in, top_in, std::nullopt);
  const auto q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const auto assign = assign_in.contiguous(), top = top_in.contiguous();
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto wts = w_in.to(acc).contiguous();
  const auto grad = grad_in.to(q.scalar_type()).contiguous();
  const int64_t B = q.size(0), H = q.size(1), n = q.size(2), d = q.size(3), nk = k.size(2), e = v.size(3);
  const int64_t C = top.size(2), t = top.size(3);
  TORCH_CHECK(wts.numel() == B * H * n * t && grad.numel() == B * H * n * e,
              "clustered_topk_backward: weights or grad do not match the inputs");
  auto dq = at::empty_like(q);
  auto dk = at::zeros({B, H, nk, d}, q.options().dtype(acc));
  auto dv = at::zeros({B, H, nk, e}, q.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "clustered_topk_backward", [&] {
    using In = scalar_t;
    using T = Acc<In>;
    const In *pq = q.data_ptr<In>(), *pk = k.data_ptr<In>(), *pv = v.data_ptr<In>(), *pg = grad.data_ptr<In>();
    const int64_t *pa = assign.data_ptr<int64_t>(), *pt = top.data_ptr<int64_t>();
    const T* pw = wts.data_ptr<T>();
    In* pdq = dq.data_ptr<In>();
    T *pdk = dk.data_ptr<T>(), *pdv = dv.data_ptr<T>();
    at::parallel_for(0, B * H, 1, [&](int64_t lo, int64_t hi) {
      TopBuffers<In, T> buf(t, d, e);
      const int64_t tp = buf.tp, dp = buf.dp, ep = buf.ep;
      Sequence seq;
      // per block: queries qb (R, dp), grads gb (R, ep), weights wb and score grads ds (R, tp), dq (R, dp);
      // per cluster: dkt (tp, dp), dvt (tp, ep)
      std::vector<T> qb(kRows * dp), gb(kRows * ep), wb(kRows * tp), ds(kRows * tp), dqb(kRows * dp);
      std::vector<T> dkt(tp * dp), dvt(tp * ep);
      for (int64_t bh = lo; bh < hi; ++bh) {
        const int64_t* a = pa + bh * n;
        zero_padded(a, n, C, pdq + bh * n * d, d);
        seq.build(a, n, C);
        for (int64_t c = 0; c < C; ++c) {
          if (seq.start[c] == seq.start[c + 1]) continue;
          const int64_t* tc = pt + (bh * C + c) * t;
          buf.load(pk + bh * nk * d, pv + bh * nk * e, tc, nullptr, nk, false);
          std::fill(dkt.begin(), dkt.end(), T(0));
          std::fill(dvt.begin(), dvt.end(), T(0));
          for (int64_t r0 = seq.start[c]; r0 < seq.start[c + 1]; r0 += kRows) {
            const int64_t rows = std::min(kRows, seq.start[c + 1] - r0);
            // unused rows and pad columns stay zero, so they add nothing to dk and dv
            std::fill(qb.begin(), qb.end(), T(0));
            std::fill(gb.begin(), gb.end(), T(0));
            std::fill(wb.begin(), wb.end(), T(0));
            for (int64_t r = 0; r < rows; ++r) {
              const int64_t i = seq.order[r0 + r];
              const In* qi = pq + (bh * n + i) * d;
              const In* gi = pg + (bh * n + i) * e;
              for (int64_t x = 0; x < d; ++x) qb[r * dp + x] = static_cast<T>(qi[x]);
              for (int64_t x = 0; x < e; ++x) gb[r * ep + x] = static_cast<T>(gi[x]);
              std::copy(pw + (bh * n + i) * t, pw + (bh * n + i + 1) * t, wb.data() + r * tp);
            }
            gemm<T>(kRows, e, tp, gb.data(), ep, 1, buf.vt.data(), tp, ds.data(), tp, false);  // dW
            for (int64_t r = 0; r < kRows; ++r) {
              T* dsr = ds.data() + r * tp;
              const T* wr = wb.data() + r * tp;
              T dot = 0;
              for (int64_t j = 0; j < tp; ++j) dot += wr[j] * dsr[j];
              for (int64_t j = 0; j < tp; ++j) dsr[j] = wr[j] * (dsr[j] - dot) * static_cast<T>(scale);
            }
            gemm<T>(rows, t, dp, ds.data(), tp, 1, buf.kr.data(), dp, dqb.data(), dp, false);       // dq
            gemm<T>(t, kRows, dp, ds.data(), 1, tp, qb.data(), dp, dkt.data(), dp, true);          // dk_T
            gemm<T>(t, kRows, ep, wb.data(), 1, tp, gb.data(), ep, dvt.data(), ep, true);          // dv_T
            for (int64_t r = 0; r < rows; ++r) {
              In* dqrow = pdq + (bh * n + seq.order[r0 + r]) * d;
              for (int64_t x = 0; x < d; ++x) dqrow[x] = static_cast<In>(dqb[r * dp + x]);
            }
          }
          for (int64_t j = 0; j < t; ++j) {
            T* dkrow = pdk + (bh * nk + tc[j]) * d;
            T* dvrow = pdv + (bh * nk + tc[j]) * e;
            for (int64_t x = 0; x < d; ++x) dkrow[x] += dkt[j * dp + x];
            for (int64_t x = 0; x < e; ++x) dvrow[x] += dvt[j * ep + x];
          }
        }
      }
    });
  });
  return {dq, dk.to(q.scalar_type()), dv.to(q.scalar_type())};
}

// --------------------------------------------------------------------------- centroid attention + top-k
// For each centroid c (a row of cent) of a sequence: p = softmax over the real keys of scale * cent_c . k,
// its t largest weights T_c, their mass m_c = sum_{j in T_c} p_j and the rest of its output,
// rest_c = sum_{j not in T_c} p_j v_j. This is the centroid half of improved clustered attention without
// the (C, n_k) weight tensor ever leaving the thread (one buffer reused for every sequence). Forward only.
template <typename T>
struct TopSet {  // the t largest (value, index) pairs seen: candidates, cut back to the t best when 2t are held
  std::vector<std::pair<T, int64_t>> heap;  // the t best are heap[0 .. t) after finish()
  int64_t t;
  explicit TopSet(int64_t t_) : t(t_) { heap.reserve(2 * t_); }
  void clear() { heap.clear(); }
  static bool greater(const std::pair<T, int64_t>& a, const std::pair<T, int64_t>& b) { return a.first > b.first; }
  // Keep the t largest; returns the smallest value kept (nothing at or below it can enter any more).
  T cut() {
    std::nth_element(heap.begin(), heap.begin() + (t - 1), heap.end(), greater);
    heap.resize(t);
    return heap[t - 1].first;
  }
  // NaN counts as -inf: the comparisons stay a strict weak order. Returns the new entry threshold when a
  // cut happened, else `thr` unchanged. Amortised O(1) per entry (one nth_element per t entries).
  T offer(T value, int64_t index, T thr) {
    if (value != value) value = -std::numeric_limits<T>::infinity();
    heap.emplace_back(value, index);
    return static_cast<int64_t>(heap.size()) == 2 * t ? cut() : thr;
  }
  // The smallest value held (called once t entries are held).
  T minimum() const {
    T m = heap[0].first;
    for (const auto& x : heap) m = x.first < m ? x.first : m;
    return m;
  }
  void finish() {
    if (static_cast<int64_t>(heap.size()) > t) cut();
  }
};

// Order-preserving integer key of a float: a larger float has a larger key; NaN gets 0, below -inf (a NaN
// weight counts as the smallest, as in the PyTorch path's topk of a NaN-free row).
inline Vec<uint32_t>::type order_keys(Vec<float>::type w) {
  using VU = Vec<uint32_t>::type;
  using VI = Vec<int32_t>::type;
  VI s;
  std::memcpy(&s, &w, sizeof(s));
  VU u;
  std::memcpy(&u, &w, sizeof(u));
  u ^= reinterpret_cast<VU>(s >> 31) | 0x80000000u;  // negative: all bits flipped; positive: the sign bit set
  return u & reinterpret_cast<VU>(w == w);
}

struct Selection {  // buffers of normalise_and_select, reused across sequences
  std::vector<uint32_t> gmax, tau;
  std::vector<std::vector<uint64_t>> cand;
};

// Float weights: scale each row of st (nk, Cp) by inv (Cp) in place and write each centroid's t largest
// weights' key indices to top (C, t); padded keys (ok 0, weight 0) rank as -1, after every real key.
// Exact and without a heap: the keys are dealt into G = 2t groups (key j to group j mod G); the t-th
// largest of the G group maxima is at most the t-th largest weight (those t maxima are t distinct keys), so
// only keys at or above it are candidates (about 1.3 t of nk for random scores), and one selection among
// them gives the top t, ties to the lowest key index. The passes run across centroids, a vector at a time.
// (A template so that the float-only body is compiled for float alone; the caller uses it for float.)
template <typename F>
void normalise_and_select(F* st, const char* ok, const std::vector<F>& inv, int64_t nk, int64_t C, int64_t Cp,
                          int64_t t, Selection& sel, int64_t* top) {
  if constexpr (!std::is_same_v<F, float>) {
    TORCH_CHECK(false, "normalise_and_select: float weights only");
  } else {
  using V = Vec<float>::type;
  using VU = Vec<uint32_t>::type;
  constexpr int64_t L = kLanes<float>;
  const int64_t G = std::min(2 * t, nk);  // groups, each with at least one key (t <= nk)
  sel.gmax.assign(G * Cp, 0u);
  sel.tau.assign(Cp, 0u);
  const V minus_one = V{} - 1.0f;
  for (int64_t j = 0, g = 0; j < nk; ++j, g = g + 1 == G ? 0 : g + 1) {
    float* __restrict row = st + j * Cp;
    uint32_t* __restrict gm = sel.gmax.data() + g * Cp;
    for (int64_t c = 0; c < Cp; c += L) {
      const V w = *reinterpret_cast<const V*>(row + c) * *reinterpret_cast<const V*>(inv.data() + c);
      *reinterpret_cast<V*>(row + c) = w;
      const VU key = order_keys(ok[j] ? w : minus_one);
      VU& m = *reinterpret_cast<VU*>(gm + c);
      m = key > m ? key : m;
    }
  }
  // tau: the t-th largest of the G group maxima, bit by bit from the top (the largest T with at least t
  // maxima >= T), for a vector of centroids at once
  for (int64_t c = 0; c < Cp; c += L) {
    VU T = VU{};
    for (int bit = 31; bit >= 0; --bit) {
      const VU trial = T | (1u << bit);
      VU count = VU{};
      for (int64_t g = 0; g < G; ++g)
        count -= reinterpret_cast<VU>(*reinterpret_cast<const VU*>(sel.gmax.data() + g * Cp + c) >= trial);
      T = count >= static_cast<uint32_t>(t) ? trial : T;
    }
    *reinterpret_cast<VU*>(sel.tau.data() + c) = T;
  }
  sel.cand.resize(C);
  for (int64_t c = 0; c < C; ++c) sel.cand[c].clear();
  for (int64_t j = 0; j < nk; ++j) {
    const float* row = st + j * Cp;
    const uint64_t rank = 0xffffffffu - static_cast<uint64_t>(j);  // ties: the lower index is the larger
    for (int64_t c = 0; c < Cp; c += L) {
      alignas(64) uint32_t key[L];
      const VU k = order_keys(ok[j] ? *reinterpret_cast<const V*>(row + c) : minus_one);
      std::memcpy(key, &k, sizeof(key));
#ifdef __AVX512F__
      static_assert(L == 16, "one mask bit per float lane");
      __mmask16 hit = _mm512_cmpge_epu32_mask(_mm512_load_si512(key), _mm512_loadu_si512(sel.tau.data() + c));
      if (C - c < 16) hit &= static_cast<__mmask16>((1u << (C - c)) - 1);  // pad lanes
      while (hit) {
        const int lane = __builtin_ctz(hit);
        hit &= hit - 1;
        sel.cand[c + lane].push_back((static_cast<uint64_t>(key[lane]) << 32) | rank);
      }
#else
      for (int64_t lane = 0; lane < L && c + lane < C; ++lane)
        if (key[lane] >= sel.tau[c + lane]) sel.cand[c + lane].push_back((static_cast<uint64_t>(key[lane]) << 32) | rank);
#endif
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    auto& cs = sel.cand[c];
    TORCH_CHECK(static_cast<int64_t>(cs.size()) >= t, "centroid_topk: internal error, ", cs.size(), " candidates for ",
                t, " top keys");
    std::nth_element(cs.begin(), cs.begin() + (t - 1), cs.end(), std::greater<uint64_t>());
    for (int64_t i = 0; i < t; ++i) top[c * t + i] = static_cast<int64_t>(0xffffffffu - (cs[i] & 0xffffffffu));
  }
  }
}

std::vector<at::Tensor> centroid_topk(const at::Tensor& cent_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                      const std::optional<at::Tensor>& key_mask, double scale, int64_t t) {
  TORCH_CHECK(cent_in.dim() == 4 && k_in.dim() == 4 && v_in.dim() == 4, "centroid_topk: cent, k, v must be 4-d");
  TORCH_CHECK(cent_in.size(0) == k_in.size(0) && cent_in.size(1) == k_in.size(1) && cent_in.size(3) == k_in.size(3) &&
                  k_in.sizes().slice(0, 3) == v_in.sizes().slice(0, 3),
              "centroid_topk: expected cent (b, h, C, d), k (b, h, n_k, d), v (b, h, n_k, e)");
  TORCH_CHECK(cent_in.scalar_type() == k_in.scalar_type() && cent_in.scalar_type() == v_in.scalar_type(),
              "centroid_topk: cent, k, v must share a dtype");
  TORCH_CHECK(t >= 1 && t <= k_in.size(2), "centroid_topk: need 1 <= t <= n_k");
  // the selection packs a key index into 32 bits
  TORCH_CHECK(k_in.size(2) <= std::numeric_limits<int32_t>::max(), "centroid_topk: n_k must be < 2^31");
  const auto cent = cent_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  at::Tensor km;
  if (key_mask.has_value() && key_mask->defined()) {
    km = key_mask->contiguous();
    TORCH_CHECK(km.dim() == 2 && km.scalar_type() == at::kBool && km.size(0) == k.size(0) && km.size(1) == k.size(2),
                "centroid_topk: key_mask must be bool (b, n_k)");
  }
  const int64_t B = cent.size(0), H = cent.size(1), C = cent.size(2), d = cent.size(3), nk = k.size(2), e = v.size(3);
  auto top = at::empty({B, H, C, t}, cent.options().dtype(at::kLong));
  auto mass = at::empty({B, H, C}, cent.options());
  auto rest = at::empty({B, H, C, e}, cent.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, cent.scalar_type(), "centroid_topk", [&] {
    using In = scalar_t;
    using T = Acc<In>;
    constexpr int64_t L = kLanes<T>;
    // Scores are computed transposed, keys x centroids, so that the key rows are read in place and every
    // per-centroid reduction (max, sum) is a vector operation across centroids.
    const int64_t Cp = round_up(C, L);
    const In *pc = cent.data_ptr<In>(), *pk = k.data_ptr<In>(), *pv = v.data_ptr<In>();
    const bool* pm = km.defined() ? km.data_ptr<bool>() : nullptr;
    int64_t* ptop = top.data_ptr<int64_t>();
    In *pmass = mass.data_ptr<In>(), *prest = rest.data_ptr<In>();
    constexpr bool direct = std::is_same_v<In, T>;  // float/double keys are read in place
    at::parallel_for(0, B * H, 1, [&](int64_t lo, int64_t hi) {
      // st (nk, Cp): scores, then weights; csT (d, Cp): scaled centroids transposed; kf (nk, d) and
      // vp (nk, ep): keys and values in the accumulation type where a copy is needed
      std::vector<T> st(nk * Cp), csT(d * Cp, T(0)), kf(direct ? 0 : nk * d), vp(direct ? 0 : nk * e), out(C * e);
      std::vector<T> mx(Cp), sum(Cp), thr(Cp);
      std::vector<char> ok(nk);
      std::vector<TopSet<T>> best(std::is_same_v<T, float> ? 0 : C, TopSet<T>(t));
      Selection sel;
      const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
      // views of the buffers above (no copies; from_blob never owns or frees them)
      auto st_t = at::from_blob(st.data(), {nk, Cp}, opts), csT_t = at::from_blob(csT.data(), {d, Cp}, opts);
      auto out_t = at::from_blob(out.data(), {C, e}, opts);
      for (int64_t bh = lo; bh < hi; ++bh) {
        const In* ks = pk + bh * nk * d;
        const In* vs = pv + bh * nk * e;
        const T* keys;
        if constexpr (direct) {
          keys = reinterpret_cast<const T*>(ks);  // In is T here
        } else {
          for (int64_t r = 0; r < nk * d; ++r) kf[r] = static_cast<T>(ks[r]);
          keys = kf.data();
        }
        const T* values;  // (nk, e): BLAS reads float/double values in place
        if constexpr (direct) {
          values = reinterpret_cast<const T*>(vs);
        } else {
          for (int64_t r = 0; r < nk * e; ++r) vp[r] = static_cast<T>(vs[r]);
          values = vp.data();
        }
        const bool* mask = pm ? pm + (bh / H) * nk : nullptr;
        int64_t real = 0;
        for (int64_t j = 0; j < nk; ++j) {
          ok[j] = mask == nullptr || mask[j];
          real += ok[j];
        }
        for (int64_t c = 0; c < C; ++c)
          for (int64_t x = 0; x < d; ++x) csT[x * Cp + c] = static_cast<T>(pc[(bh * C + c) * d + x]) * static_cast<T>(scale);
        // the two products are most of the work: BLAS (single-threaded inside this parallel region) runs
        // them several times faster than the register-blocked loops used for the small top-k products
        at::mm_out(st_t, at::from_blob(const_cast<T*>(keys), {nk, d}, opts), csT_t);
        std::fill(mx.begin(), mx.end(), -std::numeric_limits<T>::infinity());
        for (int64_t j = 0; j < nk; ++j) {
          if (!ok[j]) continue;
          const T* row = st.data() + j * Cp;
          for (int64_t c = 0; c < Cp; ++c) mx[c] = row[c] > mx[c] ? row[c] : mx[c];
        }
        std::fill(sum.begin(), sum.end(), T(0));
        T* __restrict psum = sum.data();  // restrict: lets the compiler vectorise across centroids
        const T* __restrict pmx = mx.data();
        for (int64_t j = 0; j < nk; ++j) {
          T* __restrict row = st.data() + j * Cp;
          if (!ok[j]) {  // padded key: zero weight
            std::fill(row, row + Cp, T(0));
            continue;
          }
          if constexpr (std::is_same_v<T, float>) {
            using V = typename Vec<float>::type;
            for (int64_t c = 0; c < Cp; c += L) {  // Cp is a multiple of the lanes
              V x = *reinterpret_cast<const V*>(row + c) - *reinterpret_cast<const V*>(pmx + c);
              const V p = exp_nonpositive_vec(x);
              *reinterpret_cast<V*>(row + c) = p;
              *reinterpret_cast<V*>(psum + c) += p;
            }
          } else {
            for (int64_t c = 0; c < Cp; ++c) {
              const T p = exp_nonpositive(std::min(row[c] - pmx[c], T(0)));
              row[c] = p;
              psum[c] += p;
            }
          }
        }
        for (int64_t c = 0; c < Cp; ++c) psum[c] = real > 0 ? T(1) / psum[c] : T(0);
        if constexpr (std::is_same_v<T, float>) {
          normalise_and_select(st.data(), ok.data(), sum, nk, C, Cp, t, sel, ptop + bh * C * t);
        } else {
          for (int64_t j = 0; j < nk; ++j) {
            T* __restrict row = st.data() + j * Cp;
            for (int64_t c = 0; c < Cp; ++c) row[c] *= psum[c];
          }
          // top-t per centroid: a heap each. The first t keys enter every heap (even a -inf or NaN weight),
          // so from key t on every heap is full and a key enters only above its current t-th largest, one
          // compare per (key, centroid). Padded keys (weight 0 shifted to -1) come after every real key, as
          // in the PyTorch path.
          for (int64_t c = 0; c < C; ++c) best[c].clear();
          for (int64_t j = 0; j < nk; ++j) {
            const T* row = st.data() + j * Cp;
            const T shift = ok[j] ? T(0) : T(1);
            if (j < t) {
              for (int64_t c = 0; c < C; ++c) best[c].offer(row[c] - shift, j, T(0));
              if (j == t - 1)
                for (int64_t c = 0; c < C; ++c) thr[c] = best[c].minimum();
              continue;
            }
            for (int64_t c = 0; c < C; ++c) {
              const T value = row[c] - shift;
              // false for NaN: a NaN counts as -inf, never above the t-th largest of t held values
              if (value > thr[c]) thr[c] = best[c].offer(value, j, thr[c]);
            }
          }
          for (int64_t c = 0; c < C; ++c) {
            best[c].finish();
            TORCH_CHECK(static_cast<int64_t>(best[c].heap.size()) == t, "centroid_topk: internal error, ",
                        best[c].heap.size(), " of ", t, " top keys");
            int64_t* tc = ptop + (bh * C + c) * t;
            for (int64_t j = 0; j < t; ++j) tc[j] = best[c].heap[j].second;
          }
        }
        for (int64_t c = 0; c < C; ++c) {
          T m = 0;
          const int64_t* tc = ptop + (bh * C + c) * t;
          for (int64_t j = 0; j < t; ++j) {
            const int64_t key = tc[j];
            m += st[key * Cp + c];
            st[key * Cp + c] = T(0);  // the rest leaves the top keys out
          }
          pmass[bh * C + c] = static_cast<In>(m);
        }
        // rest (C, ep) = weights^T (C, nk) . values (nk, ep)
        at::mm_out(out_t, st_t.narrow(1, 0, C).t(), at::from_blob(const_cast<T*>(values), {nk, e}, opts));
        for (int64_t c = 0; c < C; ++c)
          for (int64_t x = 0; x < e; ++x) prest[(bh * C + c) * e + x] = static_cast<In>(out[c * e + x]);
      }
    });
  });
  return {top, mass, rest};
}

}  // namespace

// Raw ops; kernels/ops.py wraps them as hf_efficient::* custom ops with fake kernels and autograd.
TORCH_LIBRARY(hf_efficient_clustered_cpu, lib) {
  lib.def("hamming_kmeans(Tensor bits, Tensor valid, int clusters, int iterations) -> Tensor", &hamming_kmeans);
  lib.def("cluster_sum(Tensor x, Tensor assign, int clusters, bool mean) -> Tensor", &cluster_sum);
  lib.def("cluster_gather(Tensor y, Tensor assign, bool divide) -> Tensor", &cluster_gather);
  lib.def(
      "clustered_topk_forward(Tensor q, Tensor k, Tensor v, Tensor assign, Tensor top, Tensor? key_mask, "
      "float scale) -> Tensor[]",
      &clustered_topk_forward);
  lib.def(
      "clustered_topk_backward(Tensor q, Tensor k, Tensor v, Tensor assign, Tensor top, Tensor weights, "
      "Tensor grad, float scale) -> Tensor[]",
      &clustered_topk_backward);
  lib.def("centroid_topk(Tensor cent, Tensor k, Tensor v, Tensor? key_mask, float scale, int t) -> Tensor[]",
          &centroid_topk);
  lib.def(
      "improved_topk(Tensor q, Tensor k, Tensor v, Tensor assign, Tensor top, Tensor? key_mask, float scale, "
      "Tensor mass, Tensor rest) -> Tensor",
      &improved_topk);
}
