// Decode attention on CPU: a few query rows per K/V head against a long KV cache, one pass over K/V.
//
// A decode step (after GQA packing: the G query heads of a group are rows of one problem) does
// about one multiply-add per byte of K/V it reads, so on a CPU it is bound by how fast a core can
// turn cache lines into scores, not by memory, unless every part of the inner loop is vector
// code. ATen's CPU flash kernel is built for long query blocks (GEMMs on 32x512 tiles) and reaches
// ~11-12 GB/s on such calls on 2 cores here; this kernel, ~20-27. It streams each key once for all
// its rows:
//
//   scores  s[r][j] = scale * q_r . k_j (+ mask[r][j])   for a block of BLOCK keys
//   softmax block max, one rescale per row and block, p = exp(s - m) in 16-lane vector code
//   values  acc[r] += p[r][j] * v_j
//
// Split-K: each problem's keys are cut into `splits` chunks, the (problem, chunk) items are spread
// over the threads, and the chunks' partial results are merged by their log-sum-exps.
//
// K/V are float32 or bfloat16 (widened on load); the query, the mask and all arithmetic are float32.
//
// NaN and infinities propagate as in eager's `softmax(scores) @ V` over the keys read: a NaN
// score (query, key or mask) makes its row NaN, and a NaN or infinite value makes every row NaN
// (a hidden key's weight is an exact 0 and 0 * NaN is NaN). Rows that see no key get lse -inf.

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int LANES = 16;
constexpr int BLOCK = 256;     // keys per block: one rescale per row and block, and long runs of each stream
constexpr int MAX_ROWS = 16;   // rows per problem the Python side hands over at most
typedef float vec __attribute__((vector_size(LANES * sizeof(float))));
typedef int ivec __attribute__((vector_size(LANES * sizeof(int))));

inline vec load(const float* p) { vec v; std::memcpy(&v, p, sizeof(vec)); return v; }
inline void store(float* p, vec v) { std::memcpy(p, &v, sizeof(vec)); }
inline vec splat(float x) { return vec{} + x; }
// A cache element type's 16 lanes as float32: bfloat16 is the high half of a float32.
inline vec load_kv(const float* p) { return load(p); }
inline vec load_kv(const at::BFloat16* p) {
  typedef uint16_t halves __attribute__((vector_size(LANES * sizeof(uint16_t))));
  halves h;
  std::memcpy(&h, p, sizeof(halves));
  const ivec bits = __builtin_convertvector(h, ivec) << 16;
  vec f;
  std::memcpy(&f, &bits, sizeof(vec));
  return f;
}

// The sum of a vector's lanes, halving it twice (the halves taken by memcpy, which compilers turn
// into lane extracts: portable to GCC before 12, which lacks __builtin_shufflevector).
inline float hsum(vec v) {
  typedef float half __attribute__((vector_size(LANES / 2 * sizeof(float))));
  typedef float quarter __attribute__((vector_size(LANES / 4 * sizeof(float))));
  half lo, hi;
  std::memcpy(&lo, &v, sizeof(half));
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(half), sizeof(half));
  const half h = lo + hi;
  quarter qlo, qhi;
  std::memcpy(&qlo, &h, sizeof(quarter));
  std::memcpy(&qhi, reinterpret_cast<const char*>(&h) + sizeof(quarter), sizeof(quarter));
  const quarter q = qlo + qhi;
  return (q[0] + q[2]) + (q[1] + q[3]);
}

// exp in float32 to ~2 ulp (Cephes' polynomial on a range-reduced argument): exactly 0 below
// -87.3 (where float32's normal range ends; -inf included), NaN for NaN. Arguments here are
// s - max <= 0, or NaN.
inline vec vexp(vec x) {
  const vec log2e = splat(1.44269504088896341f);
  vec xc = x < -87.3f ? splat(-87.3f) : x;
  xc = xc > 88.0f ? splat(88.0f) : xc;
  vec fx = xc * log2e + 0.5f;
  ivec n = __builtin_convertvector(fx, ivec);            // truncation toward zero
  vec fn = __builtin_convertvector(n, vec);
  vec adjust = fn > fx ? splat(1.0f) : splat(0.0f);      // floor
  fn -= adjust;
  n = __builtin_convertvector(fn, ivec);
  vec r = xc - fn * 0.693359375f + fn * 2.12194440e-4f;
  vec r2 = r * r;
  vec p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  ivec bits = (n + 127) << 23;
  vec two_n;
  std::memcpy(&two_n, &bits, sizeof(vec));
  vec y = p * two_n;
  y = x < -87.3f ? splat(0.0f) : y;
  return x != x ? x : y;
}

struct Strides { int64_t b, h, row; };

typedef float Scores[MAX_ROWS][BLOCK];

// Scores of keys [0, nb) of a block for every row: s[r][j] = scale * q_r . k_j. Keys go in pairs
// held in registers (DV vectors each), so each query vector loaded serves two keys.
template <int DV, typename T>
void block_scores(const float* q, int64_t rows, const T* k, int64_t k_row, int64_t nb, float scale, Scores& s) {
  constexpr int PAIR = DV <= 8 ? 2 : 1;  // two keys' vectors fit in the 32 vector registers
  int64_t j = 0;
  for (; j + PAIR <= nb; j += PAIR) {
    vec kv[PAIR][DV];
    for (int t = 0; t < PAIR; ++t)
      for (int d = 0; d < DV; ++d) kv[t][d] = load_kv(k + (j + t) * k_row + d * LANES);
    for (int64_t r = 0; r < rows; ++r) {
      vec a[PAIR] = {};
      for (int d = 0; d < DV; ++d) {
        const vec qv = load(q + r * DV * LANES + d * LANES);
        for (int t = 0; t < PAIR; ++t) a[t] += qv * kv[t][d];
      }
      for (int t = 0; t < PAIR; ++t) s[r][j + t] = hsum(a[t]) * scale;
    }
  }
  for (; j < nb; ++j) {
    for (int64_t r = 0; r < rows; ++r) {
      vec a = {};
      for (int d = 0; d < DV; ++d) a += load(q + r * DV * LANES + d * LANES) * load_kv(k + j * k_row + d * LANES);
      s[r][j] = hsum(a) * scale;
    }
  }
}

// acc[r0 + r][e0·16 ...] += sum_j p[r0 + r][j] * v_j for RB rows and EB vectors of the value
// dim: RB·EB accumulators stay in registers over the block's keys.
template <int RB, int EB, typename T>
void block_values_tile(const Scores& p, int64_t r0, const T* v, int64_t v_row, int64_t nb, int64_t e0,
                       float* acc, int64_t dv) {
  vec a[RB][EB];
  for (int r = 0; r < RB; ++r)
    for (int e = 0; e < EB; ++e) a[r][e] = load(acc + (r0 + r) * dv + (e0 + e) * LANES);
  for (int64_t j = 0; j < nb; ++j) {
    vec x[EB];
    for (int e = 0; e < EB; ++e) x[e] = load_kv(v + j * v_row + (e0 + e) * LANES);
    for (int r = 0; r < RB; ++r) {
      const vec w = splat(p[r0 + r][j]);
      for (int e = 0; e < EB; ++e) a[r][e] += w * x[e];
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int e = 0; e < EB; ++e) store(acc + (r0 + r) * dv + (e0 + e) * LANES, a[r][e]);
}

// Tiles of 16 accumulators: up to 8 vectors of the value dim (one pass over a key's values) by
// 2 rows, 4 rows where the value dim is 4 vectors.
constexpr int value_tile_vecs(int vv) { return vv < 8 ? vv : 8; }
constexpr int value_tile_rows(int vv) { return 16 / value_tile_vecs(vv) < 4 ? 16 / value_tile_vecs(vv) : 4; }

template <int RB, int VV, typename T>
void block_values_rows(const Scores& p, int64_t r0, const T* v, int64_t v_row, int64_t nb, float* acc) {
  constexpr int EB = value_tile_vecs(VV);
  int64_t e0 = 0;
  for (; e0 + EB <= VV; e0 += EB) block_values_tile<RB, EB>(p, r0, v, v_row, nb, e0, acc, VV * LANES);
  if constexpr (VV % EB != 0) block_values_tile<RB, VV % EB>(p, r0, v, v_row, nb, e0, acc, VV * LANES);
}

template <int VV, typename T>
void block_values(const Scores& p, int64_t rows, const T* v, int64_t v_row, int64_t nb, float* acc) {
  constexpr int RB = value_tile_rows(VV);
  int64_t r0 = 0;
  for (; r0 + RB <= rows; r0 += RB) block_values_rows<RB, VV>(p, r0, v, v_row, nb, acc);
  switch (rows - r0) {
    case 3: block_values_rows<3, VV>(p, r0, v, v_row, nb, acc); break;
    case 2: block_values_rows<2, VV>(p, r0, v, v_row, nb, acc); break;
    case 1: block_values_rows<1, VV>(p, r0, v, v_row, nb, acc); break;
    default: break;
  }
}

// Online softmax over a block: per row, the new running max, one rescale of acc and l, and the
// scores turned into weights p = exp(s - max) in place (padding keys past nb get weight 0).
void block_softmax(Scores& s, int64_t rows, int64_t nb, float* acc, int64_t dv, float* m, float* l) {
  const float inf = std::numeric_limits<float>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = nb; j < BLOCK; ++j) s[r][j] = -inf;
    vec bm = splat(-inf);
    for (int j = 0; j < BLOCK; j += LANES) {
      const vec x = load(s[r] + j);
      bm = x > bm ? x : bm;  // NaN skipped here; exp(NaN - max) carries it below
    }
    float block_max = -inf;
    for (int i = 0; i < LANES; ++i) block_max = bm[i] > block_max ? bm[i] : block_max;
    const float m_new = block_max > m[r] ? block_max : m[r];
    const float m_safe = m_new == -inf ? 0.0f : m_new;  // a row that saw nothing yet
    const float alpha = std::exp(m[r] - m_safe);
    vec sum = {};
    for (int j = 0; j < BLOCK; j += LANES) {
      const vec p = vexp(load(s[r] + j) - m_safe);
      store(s[r] + j, p);
      sum += p;
    }
    l[r] = l[r] * alpha + hsum(sum);
    m[r] = m_new;
    if (alpha != 1.0f) {
      float* ar = acc + r * dv;
      for (int64_t e = 0; e < dv; ++e) ar[e] *= alpha;
    }
  }
}

// One (problem, key chunk) item: unnormalized acc [rows][dv], running max m and sum l per row.
template <int DV, int VV, typename T>
void attend_chunk(const float* q, int64_t rows, const T* k, int64_t k_row, const T* v, int64_t v_row,
                  const float* mask, int64_t mask_row, int64_t key0, int64_t key1, float scale, float* acc, float* m,
                  float* l) {
  alignas(64) Scores s;
  constexpr int64_t dv = VV * LANES;
  for (int64_t r = 0; r < rows; ++r) {
    m[r] = -std::numeric_limits<float>::infinity();
    l[r] = 0.0f;
  }
  std::fill(acc, acc + rows * dv, 0.0f);
  for (int64_t j0 = key0; j0 < key1; j0 += BLOCK) {
    const int64_t nb = std::min<int64_t>(BLOCK, key1 - j0);
    block_scores<DV>(q, rows, k + j0 * k_row, k_row, nb, scale, s);
    if (mask != nullptr) {
      for (int64_t r = 0; r < rows; ++r) {
        const float* mr = mask + r * mask_row + j0;
        for (int64_t j = 0; j < nb; ++j) s[r][j] += mr[j];
      }
    }
    block_softmax(s, rows, nb, acc, dv, m, l);
    block_values<VV>(s, rows, v + j0 * v_row, v_row, nb, acc);
  }
}

template <typename T>
using ChunkFn = void (*)(const float*, int64_t, const T*, int64_t, const T*, int64_t, const float*, int64_t,
                         int64_t, int64_t, float, float*, float*, float*);

template <int DV, typename T>
ChunkFn<T> chunk_fn_for_value_dim(int64_t dv) {
  switch (dv / LANES) {
    case 2: return &attend_chunk<DV, 2, T>;
    case 4: return &attend_chunk<DV, 4, T>;
    case 5: return &attend_chunk<DV, 5, T>;
    case 6: return &attend_chunk<DV, 6, T>;
    case 8: return &attend_chunk<DV, 8, T>;
    case 16: return &attend_chunk<DV, 16, T>;
    default: return nullptr;
  }
}

// The kernel for head dims (dim, dv), or nullptr: 32, 64, 80, 96, 128 and 256 each.
template <typename T>
ChunkFn<T> chunk_fn(int64_t dim, int64_t dv) {
  if (dim % LANES != 0 || dv % LANES != 0) return nullptr;
  switch (dim / LANES) {
    case 2: return chunk_fn_for_value_dim<2, T>(dv);
    case 4: return chunk_fn_for_value_dim<4, T>(dv);
    case 5: return chunk_fn_for_value_dim<5, T>(dv);
    case 6: return chunk_fn_for_value_dim<6, T>(dv);
    case 8: return chunk_fn_for_value_dim<8, T>(dv);
    case 16: return chunk_fn_for_value_dim<16, T>(dv);
    default: return nullptr;
  }
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> decode_attention_typed(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                          const std::optional<at::Tensor>& mask, double scale,
                                                          int64_t splits) {
  const int64_t batch = q.size(0), heads = q.size(1), rows = q.size(2), dim = q.size(3);
  const int64_t keys = k.size(2), dv = v.size(3);
  TORCH_CHECK(k.size(0) == batch && k.size(1) == heads && k.size(3) == dim && v.size(0) == batch &&
                  v.size(1) == heads && v.size(2) == keys,
              "decode_attention: k and v must be [B, H, keys, D] matching q [B, H, rows, D]");
  TORCH_CHECK(rows >= 1 && rows <= MAX_ROWS, "decode_attention: 1 to ", MAX_ROWS, " rows per head, got ", rows);
  const ChunkFn<T> attend = chunk_fn<T>(dim, dv);
  TORCH_CHECK(attend != nullptr, "decode_attention: head dims 32, 64, 80, 96, 128 or 256 only, got ", dim, " and ", dv);
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "decode_attention: k and v must be contiguous in the head dim");
  TORCH_CHECK(splits >= 1, "decode_attention: splits must be >= 1, got ", splits);
  const at::Tensor qc = q.to(at::kFloat).contiguous();
  at::Tensor mk;
  Strides ms{0, 0, 0};
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kFloat && mask->dim() == 4,
                "decode_attention: the mask must be an additive float32 [B|1, H|1, rows|1, keys]");
    mk = mask->expand({batch, heads, rows, keys});
    if (mk.stride(3) != 1) mk = mk.contiguous();
    ms = Strides{mk.stride(0), mk.stride(1), mk.stride(2)};
  }
  const Strides ks{k.stride(0), k.stride(1), k.stride(2)}, vs{v.stride(0), v.stride(1), v.stride(2)};
  const int64_t problems = batch * heads;
  const int64_t chunk = (keys + splits - 1) / splits;
  std::vector<float> acc(problems * splits * rows * dv), m(problems * splits * rows), l(problems * splits * rows);
  const float* qp = qc.data_ptr<float>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const float* mp = mask.has_value() ? mk.data_ptr<float>() : nullptr;
  at::parallel_for(0, problems * splits, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / splits, c = item % splits, b = n / heads, h = n % heads;
      const int64_t key0 = std::min(keys, c * chunk), key1 = std::min(keys, key0 + chunk);
      attend(qp + n * rows * dim, rows, kp + b * ks.b + h * ks.h, ks.row, vp + b * vs.b + h * vs.h, vs.row,
             mp == nullptr ? nullptr : mp + b * ms.b + h * ms.h, ms.row, key0, key1, static_cast<float>(scale),
             acc.data() + item * rows * dv, m.data() + item * rows, l.data() + item * rows);
    }
  });
  at::Tensor out = at::empty({batch, heads, rows, dv}, q.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({batch, heads, rows}, q.options().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  const float inf = std::numeric_limits<float>::infinity();
  for (int64_t n = 0; n < problems; ++n) {
    for (int64_t r = 0; r < rows; ++r) {
      float top = -inf;
      for (int64_t c = 0; c < splits; ++c) top = std::max(top, m[(n * splits + c) * rows + r]);
      const float top_safe = std::isinf(top) ? 0.0f : top;
      float total = 0.0f;
      float* o = op + (n * rows + r) * dv;
      std::fill(o, o + dv, 0.0f);
      for (int64_t c = 0; c < splits; ++c) {
        const int64_t item = n * splits + c;
        const float w = std::exp(m[item * rows + r] - top_safe);
        total += w * l[item * rows + r];
        const float* a = acc.data() + (item * rows + r) * dv;
        for (int64_t e = 0; e < dv; ++e) o[e] += w * a[e];
      }
      const float inv = total == 0.0f ? 0.0f : 1.0f / total;
      for (int64_t e = 0; e < dv; ++e) o[e] *= inv;
      lp[n * rows + r] = top + std::log(total);  // -inf where the row saw no key
    }
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    const std::optional<at::Tensor>& mask, double scale,
                                                    int64_t splits) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "decode_attention: q, k, v must be [B, H, rows|keys, D]");
  const at::ScalarType t = k.scalar_type();
  TORCH_CHECK((t == at::kFloat || t == at::kBFloat16) && q.scalar_type() == t && v.scalar_type() == t,
              "decode_attention: q, k, v all float32 or all bfloat16, got ", q.scalar_type(), ", ", t, ", ",
              v.scalar_type());
  return t == at::kFloat ? decode_attention_typed<float>(q, k, v, mask, scale, splits)
                         : decode_attention_typed<at::BFloat16>(q, k, v, mask, scale, splits);
}

}  // namespace

TORCH_LIBRARY(fa_dynamo_cpp, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, int splits) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fa_dynamo_cpp, CPU, m) {
  m.impl("decode_attention", &decode_attention);
}
