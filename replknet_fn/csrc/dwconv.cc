// Depthwise convolution, stride 1, "same" padding (K // 2 on each side), odd K, float32 NCHW, on CPU.
//
// Three entry points with MindSpore's `ops.Custom(func_type="aot")` signature:
//   dwconv_forward      (x, weight)          -> y       y = conv(x, weight)
//   dwconv_input_grad   (dy, weight)         -> dx      dx = conv(dy, weight flipped in both axes)
//   dwconv_weight_grad  (x, dy, weight_like) -> dweight
//                       dweight[i, j] = sum_{b, h, w} dy[h, w] x[h + i - p, w + j - p]
//
// The SIMD dimension is the planes: one vector holds the same pixel of kLanes (b, c) planes, so every lane does
// useful work at any map size, and each multiply-add is a tap that meets a real pixel, up to the edges of a
// register tile. The kernels copy a vector's planes into one interleaved buffer ([row][column][lane]; the input
// zero-padded by K // 2, so shifted loads stay in bounds and the padding adds exact zeros), with a vector of
// per-lane weights for each tap. A work unit is whole channels (one channel and all its batch items, or as many
// channels as fill a vector when the batch is smaller), so a channel's weight gradient is summed by one thread in
// a fixed order: results do not depend on the thread count. Units are shared over OpenMP threads.
//   forward: a tile of output pixels (rows x columns) stays in registers; each tap loads its weight vector once
//            for the whole tile.
//   weight gradient: a tile of taps (kernel rows x columns) stays in registers; each output-gradient vector is
//            loaded once for the whole tile.
// Either way a multiply-add reads one vector from memory (the input pixel), which the x86 FMA takes as an operand.
// Plain C++ with GCC vector extensions: no asm, no intrinsics, so the portable build compiles for any CPU.
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

// Register tiles (rows x columns of accumulators) per target: the accumulators, the shared operand (a weight or
// output-gradient vector) and, without fused multiply-add, a product must fit the vector registers, or the
// compiler spills them to memory (only speed is lost, never correctness).
//   AVX-512: 32 registers of 16 floats. AVX2: 16 of 8. NEON: 32 of 4, with fused multiply-add.
//   SSE (the portable build on x86): 16 of 4, no fused multiply-add.
#if REPLKNET_LANES == 16 || defined(__aarch64__)
constexpr int kTileRows = 4, kTileColumns = 6;
#else
constexpr int kTileRows = 3, kTileColumns = 4;
#endif

// Loops over a register tile must be unrolled, or the accumulators they index live in memory.
#define UNROLLED _Pragma("GCC unroll 32")
// GCC's predictive commoning (-O3) keeps input vectors a tile loads again at the next tap in registers: with 16
// registers that spills accumulators.
#pragma GCC optimize("no-predictive-commoning")

// Multiply-adds per thread below which another thread costs more than it saves (waking it, sharing the cores
// with other processes).
constexpr double kWorkPerThread = 4e6;

int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Splits [first, last] into equal blocks of at most `most`: returns the block size.
int balanced_block(int first, int last, int most) {
  return ceil_div(last - first + 1, ceil_div(last - first + 1, most));
}

struct Geometry {
  int batch, channels, height, width, kernel, pad;
  int padded_height, padded_width;  // of the zero-padded input buffer: pixel (h, w) is at (h + pad, w + pad)
  int channels_per_unit;            // one, or as many as fill a vector when the batch is smaller
  Geometry(const int64_t *shape, int kernel_size)
      : batch(shape[0]), channels(shape[1]), height(shape[2]), width(shape[3]), kernel(kernel_size),
        pad(kernel_size / 2), padded_height(height + 2 * pad), padded_width(width + 2 * pad),
        channels_per_unit(std::max(1, kLanes / batch)) {}
  int64_t plane() const { return int64_t(height) * width; }
  int units() const { return ceil_div(channels, channels_per_unit); }
};

// The planes of one work unit: plane q is channel first_channel + q / batch, batch item q % batch; vector (group)
// n holds planes n * kLanes ... n * kLanes + kLanes - 1 (lanes past `planes` hold zeros).
struct Unit {
  int first_channel, channels, planes, groups;
  Unit(const Geometry &g, int u)
      : first_channel(u * g.channels_per_unit), channels(std::min(g.channels_per_unit, g.channels - first_channel)),
        planes(channels * g.batch), groups(ceil_div(planes, kLanes)) {}
  int lanes(int group) const { return std::min(kLanes, planes - group * kLanes); }
};

// Threads for one call: about the multiply-adds of the taps that see real pixels, over kWorkPerThread.
int threads_for(const Geometry &g) {
  const double work = double(g.batch) * g.channels * g.height * g.width * std::min(g.kernel, g.height) *
                      std::min(g.kernel, g.width);
  return std::max(1, std::min({omp_get_max_threads(), g.units(), int(work / kWorkPerThread)}));
}

// Element offsets of a group's planes in an NCHW tensor, and their channels.
struct GroupPlanes {
  int count;
  int64_t offset[kLanes];
  int channel[kLanes];
  GroupPlanes(const Geometry &g, const Unit &u, int group) : count(u.lanes(group)) {
    for (int lane = 0; lane < count; ++lane) {
      const int q = group * kLanes + lane, c = u.first_channel + q / g.batch, b = q % g.batch;
      channel[lane] = c;
      offset[lane] = (int64_t(b) * g.channels + c) * g.plane();
    }
  }
};

// The inverse of gather without padding: writes each plane of the group whole (a thread writing scattered pixels of
// planes next to another thread's would share their cache lines).
void scatter(const Vec *interleaved, const Geometry &g, const GroupPlanes &planes, float *out) {
  const float *in = reinterpret_cast<const float *>(interleaved);
  for (int lane = 0; lane < planes.count; ++lane) {
    float *plane = out + planes.offset[lane];
    for (int64_t pixel = 0; pixel < g.plane(); ++pixel) plane[pixel] = in[pixel * kLanes + lane];
  }
}

// Interleaves a group's planes into `out`, rows of `row_length` vectors, pixel (h, w) at (h + pad, w + pad); the
// lanes past the group's planes get zeros. What lies outside the map in `out` is never written (stays zero).
void gather(const float *in, const Geometry &g, const GroupPlanes &planes, int pad, int row_length, Vec *out) {
  for (int h = 0; h < g.height; ++h) {
    float *row = reinterpret_cast<float *>(out + int64_t(h + pad) * row_length + pad);
    for (int lane = 0; lane < kLanes; ++lane) {
      if (lane < planes.count) {
        const float *source = in + planes.offset[lane] + int64_t(h) * g.width;
        for (int w = 0; w < g.width; ++w) row[w * kLanes + lane] = source[w];
      } else {
        for (int w = 0; w < g.width; ++w) row[w * kLanes + lane] = 0.0f;
      }
    }
  }
}

// weights[i * K + j] = the tap (i, j) of each lane's channel (flipped in both axes when `flip`); zero past the
// planes.
// A channel's lanes are neighbours (its batch items), so each tap is a few broadcasts merged by lane masks rather
// than one scalar store per lane (at K13 on 7x7 maps the latter cost a third of the multiply-adds' time).
void gather_weights(const float *kernel, const Geometry &g, const GroupPlanes &planes, bool flip, Vec *weights) {
  typedef int32_t Mask __attribute__((vector_size(kLanes * sizeof(int32_t))));
  const int K = g.kernel;
  int run_channel[kLanes], runs = 0;
  Mask in_run[kLanes] = {};
  for (int lane = 0; lane < planes.count; ++lane) {
    if (lane == 0 || planes.channel[lane] != run_channel[runs - 1]) run_channel[runs++] = planes.channel[lane];
    in_run[runs - 1][lane] = -1;
  }
  for (int i = 0; i < K; ++i)
    for (int j = 0; j < K; ++j) {
      const int tap = flip ? (K - 1 - i) * K + (K - 1 - j) : i * K + j;
      Vec v = {};
      for (int run = 0; run < runs; ++run) {
        const Vec broadcast = Vec{} + kernel[int64_t(run_channel[run]) * K * K + tap];
        v = in_run[run] ? broadcast : v;
      }
      weights[i * K + j] = v;
    }
}

// Output pixels h0 .. h0 + RH - 1 x w0 .. w0 + RW - 1 of a group. Taps whose rows (columns) meet no real input row
// (column) of the tile are skipped; the rest read zeros where they leave the map.
template <int RH, int RW>
void forward_tile(const Vec *padded, const Vec *weights, const Geometry &g, int h0, int w0, Vec *out) {
  Vec acc[RH][RW] = {};
  const int K = g.kernel, p = g.pad, row_length = g.padded_width;
  const int i_first = std::max(0, p - h0 - RH + 1), i_last = std::min(K - 1, g.height - 1 + p - h0);
  const int j_first = std::max(0, p - w0 - RW + 1), j_last = std::min(K - 1, g.width - 1 + p - w0);
  for (int i = i_first; i <= i_last; ++i) {
    const Vec *in = padded + int64_t(h0 + i) * row_length + w0;  // padded row h0 + i is input row h0 + i - p
    const Vec *tap = weights + i * K;
    for (int j = j_first; j <= j_last; ++j) {
      const Vec weight = tap[j];
      UNROLLED for (int a = 0; a < RH; ++a)
        UNROLLED for (int b = 0; b < RW; ++b) acc[a][b] += weight * in[a * row_length + b + j];
    }
  }
  UNROLLED for (int a = 0; a < RH; ++a)
    UNROLLED for (int b = 0; b < RW; ++b) out[int64_t(h0 + a) * g.width + w0 + b] = acc[a][b];
}

using ForwardTile = void (*)(const Vec *, const Vec *, const Geometry &, int, int, Vec *);

template <int RH, int... RWs>
constexpr std::array<ForwardTile, kTileColumns> forward_row(std::integer_sequence<int, RWs...>) {
  return {&forward_tile<RH, RWs + 1>...};
}

template <int... RHs>
constexpr std::array<std::array<ForwardTile, kTileColumns>, kTileRows> forward_tables(
    std::integer_sequence<int, RHs...>) {
  return {forward_row<RHs + 1>(std::make_integer_sequence<int, kTileColumns>())...};
}

// forward_table[RH - 1][RW - 1]
const auto forward_table = forward_tables(std::make_integer_sequence<int, kTileRows>());

// out[b, c] = conv(in[b, c], kernel[c]) (kernel flipped in both axes when `flip`), for all b, c.
void convolve(const float *in, const float *kernel, float *out, const Geometry &g, bool flip) {
  const int tile_rows = balanced_block(0, g.height - 1, kTileRows);
  const int tile_columns = balanced_block(0, g.width - 1, kTileColumns);
#pragma omp parallel num_threads(threads_for(g))
  {
    std::vector<Vec> padded(int64_t(g.padded_height) * g.padded_width, Vec{});
    std::vector<Vec> weights(g.kernel * g.kernel), interleaved_out(g.plane());
#pragma omp for schedule(dynamic, 1)
    for (int u = 0; u < g.units(); ++u) {
      const Unit unit(g, u);
      for (int group = 0; group < unit.groups; ++group) {
        const GroupPlanes planes(g, unit, group);
        gather(in, g, planes, g.pad, g.padded_width, padded.data());
        gather_weights(kernel, g, planes, flip, weights.data());
        for (int h0 = 0; h0 < g.height; h0 += tile_rows)
          for (int w0 = 0; w0 < g.width; w0 += tile_columns) {
            const int rows = std::min(tile_rows, g.height - h0), columns = std::min(tile_columns, g.width - w0);
            forward_table[rows - 1][columns - 1](padded.data(), weights.data(), g, h0, w0, interleaved_out.data());
          }
        scatter(interleaved_out.data(), g, planes, out);
      }
    }
  }
}

// Taps i0 .. i0 + RI - 1 x j0 .. j0 + RJ - 1 of a group's weight gradient, summed over its output pixels, added per
// lane to dweight of the lane's channel. Output rows (columns) whose taps of the tile meet no real input are
// skipped; the rest read zeros where they leave the map.
template <int RI, int RJ>
void weight_grad_tile(const Vec *padded_x, const Vec *dy, const Geometry &g, const GroupPlanes &planes,
                      int first_channel, int i0, int j0, float *unit_dweight) {
  Vec acc[RI][RJ] = {};
  const int p = g.pad, row_length = g.padded_width;
  const int h_first = std::max(0, p - i0 - RI + 1), h_last = std::min(g.height - 1, g.height - 1 + p - i0);
  const int w_first = std::max(0, p - j0 - RJ + 1), w_last = std::min(g.width - 1, g.width - 1 + p - j0);
  for (int h = h_first; h <= h_last; ++h) {
    // Padded (h + i, w + j) is input (h + i - p, w + j - p).
    const Vec *x = padded_x + int64_t(h + i0) * row_length + j0;
    const Vec *d = dy + int64_t(h) * g.width;
    for (int w = w_first; w <= w_last; ++w) {
      const Vec gradient = d[w];
      UNROLLED for (int a = 0; a < RI; ++a)
        UNROLLED for (int b = 0; b < RJ; ++b) acc[a][b] += gradient * x[a * row_length + b + w];
    }
  }
  const int K = g.kernel;
  float sums[RI][RJ][kLanes];
  std::memcpy(sums, acc, sizeof(sums));
  for (int lane = 0; lane < planes.count; ++lane) {
    float *dw = unit_dweight + int64_t(planes.channel[lane] - first_channel) * K * K;
    for (int a = 0; a < RI; ++a)
      for (int b = 0; b < RJ; ++b) dw[(i0 + a) * K + j0 + b] += sums[a][b][lane];
  }
}

using WeightGradTile = void (*)(const Vec *, const Vec *, const Geometry &, const GroupPlanes &, int, int, int,
                               float *);

template <int RI, int... RJs>
constexpr std::array<WeightGradTile, kTileColumns> weight_grad_row(std::integer_sequence<int, RJs...>) {
  return {&weight_grad_tile<RI, RJs + 1>...};
}

template <int... RIs>
constexpr std::array<std::array<WeightGradTile, kTileColumns>, kTileRows> weight_grad_tables(
    std::integer_sequence<int, RIs...>) {
  return {weight_grad_row<RIs + 1>(std::make_integer_sequence<int, kTileColumns>())...};
}

// weight_grad_table[RI - 1][RJ - 1]
const auto weight_grad_table = weight_grad_tables(std::make_integer_sequence<int, kTileRows>());

void weight_grad(const float *x, const float *dy, float *dweight, const Geometry &g) {
  const int K = g.kernel, p = g.pad;
  // Kernel rows/columns that see at least one real pixel; the others stay zero.
  const int row_first = std::max(0, p - g.height + 1), row_last = std::min(K - 1, p + g.height - 1);
  const int col_first = std::max(0, p - g.width + 1), col_last = std::min(K - 1, p + g.width - 1);
  const int tile_rows = balanced_block(row_first, row_last, kTileRows);
  const int tile_columns = balanced_block(col_first, col_last, kTileColumns);
#pragma omp parallel num_threads(threads_for(g))
  {
    std::vector<Vec> padded_x(int64_t(g.padded_height) * g.padded_width, Vec{});
    std::vector<Vec> interleaved_dy(g.plane());
    // The unit's weight gradients, summed here and written once (not added into memory other threads write next to).
    std::vector<float> unit_dweight(int64_t(g.channels_per_unit) * K * K);
#pragma omp for schedule(dynamic, 1)
    for (int u = 0; u < g.units(); ++u) {
      const Unit unit(g, u);
      std::fill(unit_dweight.begin(), unit_dweight.end(), 0.0f);
      for (int group = 0; group < unit.groups; ++group) {
        const GroupPlanes planes(g, unit, group);
        gather(x, g, planes, p, g.padded_width, padded_x.data());
        gather(dy, g, planes, 0, g.width, interleaved_dy.data());
        for (int i0 = row_first; i0 <= row_last; i0 += tile_rows)
          for (int j0 = col_first; j0 <= col_last; j0 += tile_columns) {
            const int rows = std::min(tile_rows, row_last + 1 - i0);
            const int columns = std::min(tile_columns, col_last + 1 - j0);
            weight_grad_table[rows - 1][columns - 1](padded_x.data(), interleaved_dy.data(), g, planes,
                                                     unit.first_channel, i0, j0, unit_dweight.data());
          }
      }
      std::copy(unit_dweight.begin(), unit_dweight.begin() + int64_t(unit.channels) * K * K,
                dweight + int64_t(unit.first_channel) * K * K);
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
