// Depthwise convolution, stride 1, "same" padding (K // 2 on each side), odd K, float32 NCHW, on CPU.
//
// Three entry points with MindSpore's `ops.Custom(func_type="aot")` signature:
//   dwconv_forward      (x, weight)          -> y       y = conv(x, weight)
//   dwconv_input_grad   (dy, weight)         -> dx      dx = conv(dy, weight flipped in both axes)
//   dwconv_weight_grad  (x, dy, weight_like) -> dweight dweight[i, j] = sum_{b, h, w} dy[h, w] x[h + i - p, w + j - p]
//
// Work is split over channels (OpenMP), so each channel's kernel is prepared once and reused over the batch, and
// every output element is written by exactly one thread (results do not depend on the thread count). Output
// columns are the SIMD dimension: one vector holds kLanes (16, 8 or 4) neighbouring columns of one output row. Input rows are
// copied into zero-padded rows, so every shifted load is in bounds and the padding contributes exact zeros; taps
// whose rows or columns see only padding are skipped. The forward pass keeps a tile of R output rows x NV vectors
// in registers and loads each shifted input vector once for all R rows; the weight gradient keeps a tile of
// kernel rows x kernel columns in registers, so each loaded input vector serves a column of the tile and each
// output-gradient vector a row of it.
#include <omp.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

namespace {

#ifndef REPLKNET_LANES
#define REPLKNET_LANES 4
#endif
// Floats per vector, set per ISA level by the build (kernels.py): 16 for AVX-512, 8 for AVX2, 4 for the portable
// build (SSE on x86, NEON on ARM). Generic vectors wider than the hardware's compile to near-scalar code.
constexpr int kLanes = REPLKNET_LANES;
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef float UnalignedVec __attribute__((vector_size(kLanes * sizeof(float)), aligned(alignof(float)), may_alias));

// Register tiles per target: accumulators plus the operands loaded for them must fit the vector registers, or the
// compiler spills them to memory (only speed is lost, never correctness).
//   AVX-512: 32 registers of 16 floats. AVX2: 16 of 8. NEON: 32 of 4, with fused multiply-add.
//   SSE (the portable build on x86): 16 of 4, and no fused multiply-add, so each product needs a register too.
// kAccumulators bounds the forward tile (R output rows x NV vectors, plus NV input vectors and a weight);
// the weight-gradient tile is kWeightTileRows x kWeightTileColumns accumulators plus as many operands as rows + 1.
#if REPLKNET_LANES == 16
constexpr int kAccumulators = 24, kMaxVectorsPerTile = 4;
constexpr int kWeightTileRows = 4, kWeightTileColumns = 6;
#elif REPLKNET_LANES == 8
constexpr int kAccumulators = 12, kMaxVectorsPerTile = 3;
constexpr int kWeightTileRows = 3, kWeightTileColumns = 4;
#elif defined(__aarch64__)
constexpr int kAccumulators = 24, kMaxVectorsPerTile = 4;
constexpr int kWeightTileRows = 4, kWeightTileColumns = 6;
#else
constexpr int kAccumulators = 10, kMaxVectorsPerTile = 2;
constexpr int kWeightTileRows = 3, kWeightTileColumns = 3;
#endif

// Multiply-adds per thread below which another thread costs more than it saves (waking it, sharing the cores
// with other processes).
constexpr double kWorkPerThread = 4e6;

inline Vec load(const float *address) { return *reinterpret_cast<const UnalignedVec *>(address); }

// A load the compiler must keep in a register: otherwise it folds the load into each multiply-add that uses the
// value, re-reading memory once per use and undoing the register blocking. An empty asm that claims to change the
// register does that; x86 builds with 8 or 16 lanes only (the portable build has no asm at all).
inline Vec load_to_register(const float *address) {
  Vec v = load(address);
#if (defined(__x86_64__) || defined(__i386__)) && REPLKNET_LANES >= 8
  asm("" : "+v"(v));
#endif
  return v;
}

inline float horizontal_sum(Vec v) {
  float sum = 0.0f;
  for (int lane = 0; lane < kLanes; ++lane) sum += v[lane];
  return sum;
}

int ceil_div(int a, int b) { return (a + b - 1) / b; }

struct Geometry {
  int batch, channels, height, width, kernel, pad;
  int vectors;       // ceil(width / kLanes): vectors per output row
  int padded_width;  // row length of a zero-padded input row: column c of the map is at c + pad
  Geometry(const int64_t *shape, int kernel_size)
      : batch(shape[0]), channels(shape[1]), height(shape[2]), width(shape[3]), kernel(kernel_size),
        pad(kernel_size / 2), vectors(ceil_div(width, kLanes)), padded_width(vectors * kLanes + kernel_size) {}
  int64_t plane() const { return int64_t(height) * width; }
};

// Threads for one call: about the multiply-adds of the taps that see real pixels, over kWorkPerThread.
int threads_for(const Geometry &g) {
  const double work = double(g.batch) * g.channels * g.height * g.width * std::min(g.kernel, g.height) *
                      std::min(g.kernel, g.width);
  return std::max(1, std::min({omp_get_max_threads(), g.channels, int(work / kWorkPerThread)}));
}

// Copies one H x W plane into rows of `row_length` floats starting at column `offset`; the rest of each row must
// already be zero (it is never written).
void copy_plane(const float *plane, const Geometry &g, int row_length, int offset, float *padded) {
  for (int h = 0; h < g.height; ++h)
    std::memcpy(padded + int64_t(h) * row_length + offset, plane + int64_t(h) * g.width, g.width * sizeof(float));
}

// One tile of R output rows starting at h0, NV vectors of columns starting at w0. `kernel_row0` points at kernel
// row 0 of a copy with at least R - 1 zero rows above and below, so a tile row whose kernel row falls outside
// [0, K) multiplies by zero instead of branching.
template <int R, int NV>
void forward_tile(const float *padded, const float *kernel_row0, const Geometry &g, int h0, int w0, float *out) {
  Vec acc[R][NV] = {};
  const int K = g.kernel, p = g.pad;
  const int input_first = std::max(0, h0 - p), input_last = std::min(g.height - 1, h0 + R - 1 + p);
  // Taps j whose shifted columns [w0 + j - p, w0 + j - p + NV * kLanes) overlap the map [0, W).
  const int tap_first = std::max(0, p - w0 - NV * kLanes + 1), tap_last = std::min(K - 1, g.width - 1 - w0 + p);
  for (int hi = input_first; hi <= input_last; ++hi) {
    const float *row = padded + int64_t(hi) * g.padded_width + w0;
    const float *weights = kernel_row0 + (hi - h0 + p) * K;  // kernel row of tile row 0; row r is r rows above
    for (int j = tap_first; j <= tap_last; ++j) {
      Vec x[NV];
      for (int v = 0; v < NV; ++v) x[v] = load(row + j + v * kLanes);
      for (int r = 0; r < R; ++r) {
        const float weight = weights[j - r * K];
        for (int v = 0; v < NV; ++v) acc[r][v] += weight * x[v];
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    float *out_row = out + int64_t(h0 + r) * g.width;
    for (int v = 0; v < NV; ++v) {
      const int column = w0 + v * kLanes, count = std::min(kLanes, g.width - column);
      float lanes[kLanes];
      std::memcpy(lanes, &acc[r][v], sizeof(lanes));
      std::memcpy(out_row + column, lanes, count * sizeof(float));
    }
  }
}

using ForwardTile = void (*)(const float *, const float *, const Geometry &, int, int, float *);

template <int NV, int... Rs>
constexpr std::array<ForwardTile, kAccumulators> forward_tiles(std::integer_sequence<int, Rs...>) {
  return {&forward_tile<Rs + 1, NV>...};  // R = 1 .. kAccumulators / NV; the rest of the array is null
}

template <int NV>
constexpr std::array<ForwardTile, kAccumulators> forward_tiles() {
  return forward_tiles<NV>(std::make_integer_sequence<int, kAccumulators / NV>());
}

template <int... NVs>
constexpr std::array<std::array<ForwardTile, kAccumulators>, kMaxVectorsPerTile> forward_tables(
    std::integer_sequence<int, NVs...>) {
  return {forward_tiles<NVs + 1>()...};
}

// forward_table[NV - 1][R - 1], for R * NV <= kAccumulators.
const auto forward_table = forward_tables(std::make_integer_sequence<int, kMaxVectorsPerTile>());

// out[b, c] = conv(in[b, c], kernel[c]) (kernel flipped in both axes when `flip`), for all b, c.
void convolve(const float *in, const float *kernel, float *out, const Geometry &g, bool flip) {
  const int K = g.kernel;
  const int vectors_per_tile = std::min(g.vectors, kMaxVectorsPerTile);
  const int column_blocks = ceil_div(g.vectors, vectors_per_tile);
  const int row_tiles = ceil_div(g.height, kAccumulators / vectors_per_tile);
  const int tile_rows = ceil_div(g.height, row_tiles);  // balanced tiles: the last one is at most this tall
#pragma omp parallel num_threads(threads_for(g))
  {
    std::vector<float> padded(int64_t(g.height) * g.padded_width, 0.0f);
    std::vector<float> kernel_copy(int64_t(K + 2 * (tile_rows - 1)) * K, 0.0f);
    float *kernel_row0 = kernel_copy.data() + int64_t(tile_rows - 1) * K;
#pragma omp for schedule(dynamic, 1)
    for (int c = 0; c < g.channels; ++c) {
      const float *k = kernel + int64_t(c) * K * K;
      for (int i = 0; i < K; ++i)
        for (int j = 0; j < K; ++j) kernel_row0[i * K + j] = flip ? k[(K - 1 - i) * K + (K - 1 - j)] : k[i * K + j];
      for (int b = 0; b < g.batch; ++b) {
        const int64_t offset = (int64_t(b) * g.channels + c) * g.plane();
        copy_plane(in + offset, g, g.padded_width, g.pad, padded.data());
        for (int block = 0; block < column_blocks; ++block) {
          const int first_vector = block * vectors_per_tile;
          const int nv = std::min(vectors_per_tile, g.vectors - first_vector);
          for (int h0 = 0; h0 < g.height; h0 += tile_rows) {
            const int rows = std::min(tile_rows, g.height - h0);
            forward_table[nv - 1][rows - 1](padded.data(), kernel_row0, g, h0, first_vector * kLanes, out + offset);
          }
        }
      }
    }
  }
}

// dweight[i0 + ii, j0 + jj] = sum over the batch, rows and columns of dy[h, w] * x[h + i - p, w + j - p] for a tile
// of IB kernel rows x JB kernel columns. Each input row is paired with the IB output-gradient rows it meets through
// these kernel rows, so a loaded input vector serves IB accumulators and a loaded dy vector JB. `padded_dy` has
// IB_max - 1 zero rows above and below each plane: pairs whose dy row falls outside the map multiply by zero.
template <int IB, int JB>
void weight_grad_tile(const float *padded_x, const float *padded_dy, const Geometry &g, int dy_margin, int i0,
                      int j0, float *dweight) {
  Vec acc[IB][JB] = {};
  const int p = g.pad, dy_row_length = g.vectors * kLanes;
  const int64_t dy_plane = int64_t(g.height + 2 * dy_margin) * dy_row_length;
  const int input_first = std::max(0, i0 - p), input_last = std::min(g.height - 1, g.height - 1 + i0 + IB - 1 - p);
  for (int b = 0; b < g.batch; ++b) {
    const float *x = padded_x + int64_t(b) * g.height * g.padded_width;
    const float *dy_row0 = padded_dy + b * dy_plane + int64_t(dy_margin) * dy_row_length;
    for (int hi = input_first; hi <= input_last; ++hi) {
      const float *x_row = x + int64_t(hi) * g.padded_width + j0;
      const float *dy_row = dy_row0 + int64_t(hi - i0 + p) * dy_row_length;  // kernel row i0; i0 + ii is ii above
      for (int v = 0; v < g.vectors; ++v) {
        Vec d[IB];
        for (int ii = 0; ii < IB; ++ii) d[ii] = load(dy_row - ii * dy_row_length + v * kLanes);
        for (int jj = 0; jj < JB; ++jj) {
          const Vec xv = load_to_register(x_row + v * kLanes + jj);
          for (int ii = 0; ii < IB; ++ii) acc[ii][jj] += d[ii] * xv;
        }
      }
    }
  }
  for (int ii = 0; ii < IB; ++ii)
    for (int jj = 0; jj < JB; ++jj) dweight[(i0 + ii) * g.kernel + j0 + jj] = horizontal_sum(acc[ii][jj]);
}

using WeightGradTile = void (*)(const float *, const float *, const Geometry &, int, int, int, float *);

template <int IB, int... Js>
constexpr std::array<WeightGradTile, sizeof...(Js)> weight_grad_tiles(std::integer_sequence<int, Js...>) {
  return {&weight_grad_tile<IB, Js + 1>...};
}

template <int... Is>
constexpr std::array<std::array<WeightGradTile, kWeightTileColumns>, kWeightTileRows> weight_grad_tables(
    std::integer_sequence<int, Is...>) {
  return {weight_grad_tiles<Is + 1>(std::make_integer_sequence<int, kWeightTileColumns>())...};
}

// weight_grad_table[IB - 1][JB - 1]
const auto weight_grad_table = weight_grad_tables(std::make_integer_sequence<int, kWeightTileRows>());

// Splits [first, last] into equal blocks of at most `most`: returns the block size.
int balanced_block(int first, int last, int most) { return ceil_div(last - first + 1, ceil_div(last - first + 1, most)); }

void weight_grad(const float *x, const float *dy, float *dweight, const Geometry &g) {
  const int K = g.kernel, p = g.pad, dy_row_length = g.vectors * kLanes;
  // Kernel rows/columns that see at least one real pixel; the others stay zero.
  const int row_first = std::max(0, p - g.height + 1), row_last = std::min(K - 1, p + g.height - 1);
  const int col_first = std::max(0, p - g.width + 1), col_last = std::min(K - 1, p + g.width - 1);
  const int tile_rows = balanced_block(row_first, row_last, kWeightTileRows);
  const int tile_columns = balanced_block(col_first, col_last, kWeightTileColumns);
  const int dy_margin = tile_rows - 1;
  const int64_t x_plane = int64_t(g.height) * g.padded_width;
  const int64_t dy_plane = int64_t(g.height + 2 * dy_margin) * dy_row_length;
#pragma omp parallel num_threads(threads_for(g))
  {
    // The whole batch of one channel, zero-padded, so each accumulator sums over the batch before one reduction.
    std::vector<float> padded_x(g.batch * x_plane, 0.0f), padded_dy(g.batch * dy_plane, 0.0f);
#pragma omp for schedule(dynamic, 1)
    for (int c = 0; c < g.channels; ++c) {
      for (int b = 0; b < g.batch; ++b) {
        const int64_t offset = (int64_t(b) * g.channels + c) * g.plane();
        copy_plane(x + offset, g, g.padded_width, p, padded_x.data() + b * x_plane);
        copy_plane(dy + offset, g, dy_row_length, 0, padded_dy.data() + b * dy_plane + dy_margin * dy_row_length);
      }
      float *dw = dweight + int64_t(c) * K * K;
      std::fill(dw, dw + K * K, 0.0f);
      for (int i0 = row_first; i0 <= row_last; i0 += tile_rows)
        for (int j0 = col_first; j0 <= col_last; j0 += tile_columns) {
          const int rows = std::min(tile_rows, row_last + 1 - i0), columns = std::min(tile_columns, col_last + 1 - j0);
          weight_grad_table[rows - 1][columns - 1](padded_x.data(), padded_dy.data(), g, dy_margin, i0, j0, dw);
        }
    }
  }
}

bool float32(const char *dtype) { return std::strcmp(dtype, "float32") == 0 || std::strcmp(dtype, "float") == 0; }

bool same_shape(const int64_t *a, const int64_t *b) { return std::equal(a, a + 4, b); }

// `expected` float32 4-D tensors; a (B, C, H, W) map at 0 and a (C, 1, K, K) kernel, K odd, at `kernel`.
bool valid(int nparam, int expected, int *ndims, int64_t **shapes, const char **dtypes, int kernel) {
  if (nparam != expected) return false;
  for (int n = 0; n < nparam; ++n)
    if (ndims[n] != 4 || !float32(dtypes[n])) return false;
  const int64_t *m = shapes[0], *k = shapes[kernel];
  return k[0] == m[1] && k[1] == 1 && k[2] == k[3] && k[2] % 2 == 1;
}

}  // namespace

extern "C" int dwconv_forward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                              void *, void *) {
  if (!valid(nparam, 3, ndims, shapes, dtypes, 1) || !same_shape(shapes[2], shapes[0])) return 1;
  const Geometry g(shapes[0], int(shapes[1][2]));
  convolve(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
           static_cast<float *>(params[2]), g, false);
  return 0;
}

extern "C" int dwconv_input_grad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                 void *, void *) {
  if (!valid(nparam, 3, ndims, shapes, dtypes, 1) || !same_shape(shapes[2], shapes[0])) return 1;
  const Geometry g(shapes[0], int(shapes[1][2]));
  convolve(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
           static_cast<float *>(params[2]), g, true);
  return 0;
}

extern "C" int dwconv_weight_grad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                  void *, void *) {
  if (!valid(nparam, 4, ndims, shapes, dtypes, 2) || !same_shape(shapes[1], shapes[0]) ||
      !same_shape(shapes[3], shapes[2]))
    return 1;
  const Geometry g(shapes[0], int(shapes[2][2]));
  weight_grad(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
              static_cast<float *>(params[3]), g);
  return 0;
}
