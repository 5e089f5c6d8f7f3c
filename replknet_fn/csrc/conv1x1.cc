// 1x1 convolution (stride 1, no padding, one group), float32 NCHW, on CPU: three matrix products.
//
// Three entry points with MindSpore's `ops.Custom(func_type="aot")` signature (weight: Cout x Cin x 1 x 1):
//   conv1x1_forward      (x, weight)          -> y        y[n] = W x[n]
//   conv1x1_input_grad   (dy, weight)         -> dx       dx[n] = W^T dy[n]
//   conv1x1_weight_grad  (x, dy, weight_like) -> dweight  dW = sum over n of dy[n] x[n]^T
//
// Why: MindSpore 2.8's CPU Conv2D and its gradients ran the small 1x1 convs of the demo (16-512 channels, maps of
// 32x32 down to 2x2, batch 32) at 3-10 GFLOP/s (Zen 3), ~50 of its ~120 ms a step. At RepLKNet-31B's shapes its
// convs run near the machine's matmul rate, so `pointwise_conv.py` picks one or the other by measurement.
//
// Every product's columns are all of the batch's pixels, (image, pixel) pairs: a vector holds pixels of several
// images where a map is smaller than a vector. The operand read as columns is packed tile by tile (`TilePanel`:
// kTileWidth columns a tile, zero-padded), so a register tile reads it in order; a tile's sums are stored straight
// into the output (`Output`: a vector at once where its columns are consecutive there). A register tile is kRows x kVectors accumulators, each multiply-add one
// broadcast float of the row operand times one vector of the column operand.
//
// Single-threaded, as pointwise.cc (see there), and summed in a fixed order: results do not depend on threads.
// Plain C++ with GCC vector extensions: no asm, no intrinsics, so the portable build compiles for any CPU.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

namespace {

#ifndef REPLKNET_LANES
#define REPLKNET_LANES 4
#endif
constexpr int kLanes = REPLKNET_LANES;
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

// Accumulators, the column operand's vectors and a broadcast must fit the vector registers (dwconv.cc).
#if REPLKNET_LANES == 16 || defined(__aarch64__)
constexpr int kRows = 6, kVectors = 3;  // 32 registers
#else
constexpr int kRows = 6, kVectors = 2;  // 16 registers
#endif
constexpr int kTileWidth = kVectors * kLanes;

#define UNROLLED _Pragma("GCC unroll 32")

int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

// A matrix of `inner` rows and `width` columns (a multiple of kTileWidth; columns past the real ones are zeros),
// stored tile by tile: column q of row k at ((q / kTileWidth) * inner + k) * kTileWidth + q % kTileWidth.
struct TilePanel {
  int64_t inner, columns, width;
  std::unique_ptr<float[]> data;  // not zeroed: every element is written by the packing functions
  TilePanel(int64_t inner_, int64_t columns_)
      : inner(inner_), columns(columns_), width(round_up(columns_, kTileWidth)), data(new float[inner_ * width]) {
    const int64_t last = width / kTileWidth - 1, padding = width - columns;
    for (int64_t k = 0; k < inner && padding > 0; ++k) {
      std::fill_n(row(k, last) + kTileWidth - padding, padding, 0.0f);
    }
  }
  float *row(int64_t k, int64_t tile) { return data.get() + (tile * inner + k) * kTileWidth; }
  const float *tile(int64_t t) const { return data.get() + t * inner * kTileWidth; }
  // Writes n floats from `source` to row k from column q on.
  void write(int64_t k, int64_t q, const float *source, int64_t n) {
    while (n > 0) {
      const int64_t lane = q % kTileWidth, count = std::min(n, kTileWidth - lane);
      float *target = row(k, q / kTileWidth) + lane;
      for (int64_t i = 0; i < count; ++i) target[i] = source[i];
      source += count, q += count, n -= count;
    }
  }
};

// Rows = channels, columns = (image, pixel): of an NCHW tensor of `channels` channels and `plane` pixels.
TilePanel pixels_as_columns(const float *x, int64_t batch, int64_t channels, int64_t plane) {
  TilePanel panel(channels, batch * plane);
  for (int64_t n = 0; n < batch; ++n) {
    for (int64_t k = 0; k < channels; ++k) panel.write(k, n * plane, x + (n * channels + k) * plane, plane);
  }
  return panel;
}

// Rows = (image, pixel), columns = channels: the transpose of pixels_as_columns.
TilePanel channels_as_columns(const float *x, int64_t batch, int64_t channels, int64_t plane) {
  TilePanel panel(batch * plane, channels);
  for (int64_t n = 0; n < batch; ++n) {
    for (int64_t k = 0; k < channels; ++k) {
      const float *source = x + (n * channels + k) * plane;
      for (int64_t j = 0; j < plane; ++j) panel.row(n * plane + j, k / kTileWidth)[k % kTileWidth] = source[j];
    }
  }
  return panel;
}

// Where a product's elements go: element (r, q) at base + offsets[q] + r * row_stride, for the real columns q.
struct Output {
  float *base;
  int64_t row_stride;
  std::vector<int64_t> offsets;
  // An NCHW tensor whose columns are (image, pixel) and rows channels (of `channels`).
  static Output nchw(float *y, int64_t batch, int64_t channels, int64_t plane) {
    Output out{y, plane, std::vector<int64_t>(batch * plane)};
    for (int64_t n = 0; n < batch; ++n) {
      for (int64_t j = 0; j < plane; ++j) out.offsets[n * plane + j] = n * channels * plane + j;
    }
    return out;
  }
  // A row-major matrix of `columns` columns.
  static Output row_major(float *y, int64_t columns) {
    Output out{y, columns, std::vector<int64_t>(columns)};
    for (int64_t q = 0; q < columns; ++q) out.offsets[q] = q;
    return out;
  }
  // Stores one vector of row r from column q on: in one piece where its columns are consecutive in memory.
  void store(int64_t r, int64_t q, const Vec &v) {
    const int64_t *at = offsets.data() + q;
    float *row = base + r * row_stride;
    const int64_t real = std::min<int64_t>(kLanes, static_cast<int64_t>(offsets.size()) - q);
    if (real == kLanes && at[kLanes - 1] == at[0] + kLanes - 1) {
      std::memcpy(row + at[0], &v, sizeof(Vec));
    } else {
      for (int64_t lane = 0; lane < real; ++lane) row[at[lane]] = v[lane];
    }
  }
};

// Rows r0 .. r0 + R - 1 of the product of a (row-major, `lda` a row, from row r0) and column tile t of b.
template <int R>
void multiply_tile(const float *a, int64_t lda, const TilePanel &b, int64_t t, int64_t r0, Output *out) {
  Vec sums[R][kVectors] = {};
  const float *columns = b.tile(t);
  for (int64_t k = 0; k < b.inner; ++k) {
    Vec column[kVectors];
    UNROLLED for (int v = 0; v < kVectors; ++v) {
      std::memcpy(&column[v], columns + k * kTileWidth + v * kLanes, sizeof(Vec));
    }
    UNROLLED for (int r = 0; r < R; ++r) {
      const float weight = a[r * lda + k];
      UNROLLED for (int v = 0; v < kVectors; ++v) sums[r][v] += weight * column[v];
    }
  }
  UNROLLED for (int r = 0; r < R; ++r) {
    UNROLLED for (int v = 0; v < kVectors; ++v) {
      const int64_t q = t * kTileWidth + v * kLanes;
      if (q < b.columns) out->store(r0 + r, q, sums[r][v]);
    }
  }
}

// The last rows % kRows rows of a column tile.
template <int R>
void multiply_last_rows(int rows, const float *a, int64_t lda, const TilePanel &b, int64_t t, int64_t r0,
                        Output *out) {
  if constexpr (R > 0) {
    if (rows == R) return multiply_tile<R>(a, lda, b, t, r0, out);
    multiply_last_rows<R - 1>(rows, a, lda, b, t, r0, out);
  }
}

// out = a (rows x b.inner, row-major, `lda` a row) times b.
void multiply(const float *a, int64_t lda, int64_t rows, const TilePanel &b, Output *out) {
  for (int64_t t = 0; t * kTileWidth < b.width; ++t) {
    int64_t r = 0;
    for (; r + kRows <= rows; r += kRows) multiply_tile<kRows>(a + r * lda, lda, b, t, r, out);
    multiply_last_rows<kRows - 1>(static_cast<int>(rows - r), a + r * lda, lda, b, t, r, out);
  }
}

struct Shape {
  int64_t batch, in_channels, out_channels, plane;
};

bool float32(const char *dtype) { return std::strcmp(dtype, "float32") == 0; }

// `nparam` 4-D float32 tensors; params[activation] is N x C x H x W (the input for `input_channels`, else the
// output gradient), params[weight] Cout x Cin x 1 x 1, and every N C H W tensor has the right channels.
bool valid(int nparam, int expected, int *ndims, int64_t **shapes, const char **dtypes, int weight, Shape *s) {
  if (nparam != expected) return false;
  for (int i = 0; i < nparam; ++i) {
    if (ndims[i] != 4 || !float32(dtypes[i])) return false;
  }
  const int64_t *w = shapes[weight];
  if (w[2] != 1 || w[3] != 1) return false;
  *s = {shapes[0][0], w[1], w[0], shapes[0][2] * shapes[0][3]};
  return s->batch * s->plane > 0 && s->in_channels > 0 && s->out_channels > 0;
}

bool is_nchw(const int64_t *shape, const Shape &s, int64_t channels) {
  return shape[0] == s.batch && shape[1] == channels && shape[2] * shape[3] == s.plane;
}

}  // namespace

extern "C" int conv1x1_forward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                               void *, void *) {
  Shape s;
  if (!valid(nparam, 3, ndims, shapes, dtypes, 1, &s) || !is_nchw(shapes[0], s, s.in_channels) ||
      !is_nchw(shapes[2], s, s.out_channels)) {
    return 1;
  }
  const float *x = static_cast<const float *>(params[0]), *weight = static_cast<const float *>(params[1]);
  const TilePanel pixels = pixels_as_columns(x, s.batch, s.in_channels, s.plane);
  Output y = Output::nchw(static_cast<float *>(params[2]), s.batch, s.out_channels, s.plane);
  multiply(weight, s.in_channels, s.out_channels, pixels, &y);
  return 0;
}

extern "C" int conv1x1_input_grad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                  void *, void *) {
  Shape s;
  if (!valid(nparam, 3, ndims, shapes, dtypes, 1, &s) || !is_nchw(shapes[0], s, s.out_channels) ||
      !is_nchw(shapes[2], s, s.in_channels)) {
    return 1;
  }
  const float *dy = static_cast<const float *>(params[0]), *weight = static_cast<const float *>(params[1]);
  std::vector<float> transposed(s.in_channels * s.out_channels);
  for (int64_t o = 0; o < s.out_channels; ++o) {
    for (int64_t i = 0; i < s.in_channels; ++i) transposed[i * s.out_channels + o] = weight[o * s.in_channels + i];
  }
  const TilePanel pixels = pixels_as_columns(dy, s.batch, s.out_channels, s.plane);
  Output dx = Output::nchw(static_cast<float *>(params[2]), s.batch, s.in_channels, s.plane);
  multiply(transposed.data(), s.out_channels, s.in_channels, pixels, &dx);
  return 0;
}

extern "C" int conv1x1_weight_grad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                   void *, void *) {
  Shape s;
  if (!valid(nparam, 4, ndims, shapes, dtypes, 2, &s) || !is_nchw(shapes[0], s, s.in_channels) ||
      !is_nchw(shapes[1], s, s.out_channels) || std::memcmp(shapes[3], shapes[2], 4 * sizeof(int64_t)) != 0) {
    return 1;
  }
  const float *x = static_cast<const float *>(params[0]), *dy = static_cast<const float *>(params[1]);
  // dy as rows = output channels, columns = (image, pixel), row-major
  const int64_t pixels = s.batch * s.plane;
  std::vector<float> rows(s.out_channels * pixels);
  for (int64_t n = 0; n < s.batch; ++n) {
    for (int64_t o = 0; o < s.out_channels; ++o) {
      std::memcpy(rows.data() + o * pixels + n * s.plane, dy + (n * s.out_channels + o) * s.plane,
                  s.plane * sizeof(float));
    }
  }
  const TilePanel channels = channels_as_columns(x, s.batch, s.in_channels, s.plane);
  Output dweight = Output::row_major(static_cast<float *>(params[3]), s.in_channels);
  multiply(rows.data(), pixels, s.out_channels, channels, &dweight);
  return 0;
}
