// Depthwise convolution, stride 1, "same" padding (K // 2 on each side), odd K, float32 NCHW, on CPU.
//
// Three entry points with MindSpore's `ops.Custom(func_type="aot")` signature:
//   dwconv_forward      (x, weight)          -> y       y = conv(x, weight)
//   dwconv_input_grad   (dy, weight)         -> dx      dx = conv(dy, weight flipped in both axes)
//   dwconv_weight_grad  (x, dy, weight_like) -> dweight
//                       dweight[i, j] = sum_{b, h, w} dy[h, w] x[h + i - p, w + j - p]
// and the same at stride 2 (the stem's and the transitions' 3x3), whose output is the stride-1 output's even rows
// and columns (same padding, same taps); its gradients spread dy onto the even pixels of a zeroed full-size map:
//   dwconv_stride2_forward      (x, weight)          -> y (B, C, ceil(H / 2), ceil(W / 2))
//   dwconv_stride2_input_grad   (dy, weight, x_like) -> dx
//   dwconv_stride2_weight_grad  (x, dy, weight_like) -> dweight
// 4x the multiply-adds of a stride-2 kernel, yet 1.6-6.7x faster forward+backward than MindSpore's stride-2
// depthwise conv at the demo's shapes (Zen 3); auto measures it per shape like the rest.
//
// The SIMD dimension is the planes: one vector holds the same pixel of kLanes (b, c) planes, so every lane does
// useful work at any map size, and each multiply-add is a tap that meets a real pixel, up to the edges of a
// register tile. The kernels copy a vector's planes into one interleaved buffer ([row][column][lane], transposed
// kLanes pixels at a time in registers), with a vector of per-lane weights for each tap. A work unit is whole
// channels (one channel and all its batch items, or as many channels as fill a vector when the batch is smaller),
// so a channel's weight gradient is summed by one thread in a fixed order: results do not depend on the thread
// count. Units are shared over OpenMP threads a few at a time, each thread prefetching its next unit's small planes.
//   forward: a tile of output pixels (rows x columns) stays in registers, computed by taps (each tap's weight
//            vector loaded once for the tile, the input zero-padded by K // 2 so that shifted loads stay in bounds
//            and the padding adds exact zeros) or, where that does fewer multiply-adds (maps no larger than the
//            kernel's reach), by input pixels (each loaded once for the tile; `forward_tile_by_inputs`).
//   weight gradient: a tile of taps (kernel rows x columns) stays in registers; each output-gradient vector is
//            loaded once for the whole tile; or, on maps narrow enough for a kernel row's reach to cover them (7x7 at
//            K13), a whole kernel row, summed over the row pairs that meet (`weight_grad_by_row_pairs`). Lanes are
//            summed per channel once per unit (`sum_lanes`).
// Either way a multiply-add reads one vector from memory, which the x86 FMA takes as an operand.
// On AVX2, maps of rows 6-8 pixels wide that the kernel reaches across both ways (7x7 at K13) are computed by output
// rows instead: a vector holds an output row, and planes are read and written where they lie (`convolve_by_rows`,
// `weight_grad_by_rows`), where interleaving them had taken about as long as the multiply-adds.
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
constexpr int kTileRows = 4, kTileColumns = 6, kRowTileAccumulators = 24;
#elif REPLKNET_LANES == 8
constexpr int kTileRows = 3, kTileColumns = 4, kRowTileAccumulators = 14;
#else
constexpr int kTileRows = 3, kTileColumns = 4, kRowTileAccumulators = 12;
#endif
// Maps at most kNarrowWidth wide: the forward by input pixels tiles them in whole rows (up to kRowTileAccumulators
// accumulators: 2 x 7 on AVX2, where 3 x 4 tiles leave a 1 x 4 and a 1 x 3 one on a 7x7 map, too few accumulators to
// hide the multiply-add's latency), and the weight gradient sums them by row pairs (2W - 1 accumulators).
constexpr int kNarrowWidth = 7;

// `value` in every lane, one broadcast read from memory: value - 0 is value for every float (GCC drops the
// subtraction), where Vec{} + value is kept as an addition first (-0 + 0 is +0), and a lane-by-lane fill compiles to
// inserts.
inline Vec splat(float value) { return value - Vec{}; }

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

// Units a thread takes at a time (fewer where that would leave a thread without 4 chunks): its next unit is then
// most often the one after, which prefetch_unit fetches.
constexpr int kUnitsPerChunk = 8;
int units_per_chunk(const Geometry &g, int threads) { return std::clamp(g.units() / (4 * threads), 1, kUnitsPerChunk); }
// Units whose planes (of one tensor) are at most this many bytes are prefetched a unit ahead (prefetch_unit).
constexpr int64_t kPrefetchBytes = 16 << 10;

// __builtin_prefetch's second argument must be a constant.
void prefetch(const float *address, bool write) {
  if (write) {
    __builtin_prefetch(address, 1);
  } else {
    __builtin_prefetch(address, 0);
  }
}

// Asks the cache for the planes of `channels` channels from `first` of `map` (all their batch items; for writing when
// `write`).
void prefetch_channels(const float *map, const Geometry &g, int first, int channels, bool write) {
  constexpr int kLineFloats = 64 / sizeof(float);
  for (int b = 0; b < g.batch; ++b)
    for (int c = first; c < first + channels; ++c) {
      const float *plane = map + (int64_t(b) * g.channels + c) * g.plane();
      for (int64_t i = 0; i < g.plane(); i += kLineFloats) prefetch(plane + i, write);
      prefetch(plane + g.plane() - 1, write);
    }
}

// Asks the cache for the planes of unit u of `map`, if they are small: on small maps a unit's multiply-adds take
// about as long as fetching its planes, which lie a channel stack apart (K13 on 7x7 maps: 8 planes of 196 bytes).
// Called a unit ahead, so that the fetch overlaps the unit before.
void prefetch_unit(const float *map, const Geometry &g, int u, bool write) {
  if (u >= g.units()) return;
  const Unit unit(g, u);
  if (int64_t(unit.planes) * g.plane() * int64_t(sizeof(float)) > kPrefetchBytes) return;
  prefetch_channels(map, g, unit.first_channel, unit.channels, write);
}

// Transposes kLanes x kLanes floats in registers: rows[r][e] becomes rows[e][r]. Each of log2(kLanes) rounds
// interleaves row i with row i + kLanes / 2, which moves the row index's top bit to the bottom of the element index
// and the element index's top bit to the bottom of the row index; after all rounds the two indices have swapped.
// (Vector shuffles: a scalar copy per float cost more than the multiply-adds on small maps, 7x7 at K13.)
void transpose(Vec rows[kLanes]) {
  typedef int32_t Index __attribute__((vector_size(kLanes * sizeof(int32_t))));
#if REPLKNET_LANES == 16
  const Index low = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23};
  const Index high = {8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
#elif REPLKNET_LANES == 8
  const Index low = {0, 8, 1, 9, 2, 10, 3, 11}, high = {4, 12, 5, 13, 6, 14, 7, 15};
#elif REPLKNET_LANES == 4
  const Index low = {0, 4, 1, 5}, high = {2, 6, 3, 7};
#else
#error "REPLKNET_LANES must be 4, 8 or 16"
#endif
  UNROLLED for (int round = 1; round < kLanes; round *= 2) {
    Vec interleaved[kLanes];
    UNROLLED for (int i = 0; i < kLanes / 2; ++i) {
      interleaved[2 * i] = __builtin_shuffle(rows[i], rows[i + kLanes / 2], low);
      interleaved[2 * i + 1] = __builtin_shuffle(rows[i], rows[i + kLanes / 2], high);
    }
    UNROLLED for (int i = 0; i < kLanes; ++i) rows[i] = interleaved[i];
  }
}

// kLanes floats from `from` (aligned to a float only) into a vector, or the first `count` and zeros after them.
// A partial vector moves in pieces of fixed sizes (4, 2, 1 floats for 7 on AVX2): a memcpy of a variable size is a
// library call, and GCC turns a float-by-float loop into `rep movs`, both of which cost more than the multiply-adds of
// a 7x7 map's last, partial vector.
Vec load_partial(const float *from, int count);

Vec load(const float *from, int count) {
  if (count < kLanes) return load_partial(from, count);
  Vec v;
  std::memcpy(&v, from, sizeof(Vec));  // a fixed size: one unaligned vector load
  return v;
}

// Out of line, so that a whole load's vector stays in a register where a caller's count is not known when compiled:
// shared with the pieces' path, it went through memory and stalled.
__attribute__((noinline)) Vec load_partial(const float *from, int count) {
  float lanes[kLanes] = {};
  int done = 0;
  UNROLLED for (int piece = kLanes / 2; piece >= 1; piece /= 2) {
    if (count & piece) {
      std::memcpy(lanes + done, from + done, piece * sizeof(float));
      done += piece;
    }
  }
  Vec v;
  std::memcpy(&v, lanes, sizeof(Vec));
  return v;
}

// The first `count` floats of `v` to `to`.
void store(const Vec &v, int count, float *to) {
  if (count == kLanes) {
    std::memcpy(to, &v, sizeof(Vec));
    return;
  }
  float lanes[kLanes];
  std::memcpy(lanes, &v, sizeof(Vec));
  int done = 0;
  UNROLLED for (int piece = kLanes / 2; piece >= 1; piece /= 2) {
    if (count & piece) {
      std::memcpy(to + done, lanes + done, piece * sizeof(float));
      done += piece;
    }
  }
}

// A plane's last `count` floats (count <= kLanes; `from` is `count` floats before the end of a plane of `plane`
// floats) in a vector, zeros after them: load, but where a part vector follows a whole one, one read ending at the
// plane's last pixel, shifted down. load's pieces reach the vector through memory, and reading it whole after storing
// them in pieces stalls (~50 cycles a vector: ~14% of the weight gradient of 7x7 maps at K13).
Vec load_plane_end(const float *from, int count, int64_t plane) {
  if (count == kLanes || plane < kLanes) return load(from, count);
  typedef int32_t Index __attribute__((vector_size(kLanes * sizeof(int32_t))));
  Index lane;
  UNROLLED for (int k = 0; k < kLanes; ++k) lane[k] = k;
  Vec v;
  std::memcpy(&v, from + count - kLanes, sizeof(Vec));
  const Vec shifted = __builtin_shuffle(v, (lane + (kLanes - count)) & (kLanes - 1));
  return (Vec)((Index)shifted & (lane < count));
}

// The inverse of gather without padding: writes each plane of the group whole (a thread writing scattered pixels of
// planes next to another thread's would share their cache lines).
void scatter(const Vec *interleaved, const Geometry &g, const GroupPlanes &planes, float *out) {
  for (int64_t first = 0; first < g.plane(); first += kLanes) {
    const int pixels = int(std::min<int64_t>(kLanes, g.plane() - first));
    Vec block[kLanes];  // element by element, not `= {}`: that zeroing was a memset call per block
    UNROLLED for (int k = 0; k < kLanes; ++k) block[k] = k < pixels ? interleaved[first + k] : Vec{};
    transpose(block);
    for (int lane = 0; lane < planes.count; ++lane) store(block[lane], pixels, out + planes.offset[lane] + first);
  }
}

// Interleaves a group's planes into `out`, rows of `row_length` vectors, pixel (h, w) at (h + pad, w + pad); the
// lanes past the group's planes get zeros. What lies outside the map in `out` is never written (stays zero).
void gather(const float *in, const Geometry &g, const GroupPlanes &planes, int pad, int row_length, Vec *out) {
  int h = 0, w = 0;  // of pixel `first + k` below
  for (int64_t first = 0; first < g.plane(); first += kLanes) {
    const int pixels = int(std::min<int64_t>(kLanes, g.plane() - first));
    Vec block[kLanes];
    UNROLLED for (int lane = 0; lane < kLanes; ++lane)  // a part block only at the planes' end
      block[lane] = lane < planes.count ? load_plane_end(in + planes.offset[lane] + first, pixels, g.plane()) : Vec{};
    transpose(block);
    for (int k = 0; k < pixels; ++k) {
      out[int64_t(h + pad) * row_length + w + pad] = block[k];
      if (++w == g.width) w = 0, ++h;
    }
  }
}

// weights[i * row_length + j] = the tap (i, j) of each lane's channel (flipped in both axes when `flip`); the lanes
// past the planes hold the first plane's taps (their inputs are zeros and their outputs are never written).
// A channel's lanes are neighbours (its batch items), so each tap is a few broadcasts merged by lane masks rather
// than one scalar store per lane (at K13 on 7x7 maps the latter cost a third of the multiply-adds' time).
void gather_weights(const float *kernel, const Geometry &g, const GroupPlanes &planes, bool flip, int row_length,
                    Vec *weights) {
  typedef int32_t Mask __attribute__((vector_size(kLanes * sizeof(int32_t))));
  const int K = g.kernel;
  int run_channel[kLanes], runs = 0;
  Mask in_run[kLanes] = {};
  for (int lane = 0; lane < planes.count; ++lane) {
    if (lane == 0 || planes.channel[lane] != run_channel[runs - 1]) run_channel[runs++] = planes.channel[lane];
    in_run[runs - 1][lane] = -1;
  }
  // Run by run, each a broadcast per tap merged into the lanes of the run (the first run fills every lane).
  for (int run = 0; run < runs; ++run) {
    const float *taps = kernel + int64_t(run_channel[run]) * K * K;
    const Mask mask = in_run[run];
    for (int i = 0; i < K; ++i)
      for (int j = 0; j < K; ++j) {
        const Vec broadcast = Vec{} + taps[flip ? (K - 1 - i) * K + K - 1 - j : i * K + j];
        Vec &weight = weights[i * row_length + j];
        weight = run == 0 ? broadcast : (mask ? broadcast : weight);
      }
  }
}

// Two ways to compute a register tile of output pixels h0 .. h0 + RH - 1 x w0 .. w0 + RW - 1 of a group, both one
// memory operand per multiply-add, which differ in the multiply-adds that meet the map's padding:
//   by taps: each tap's weight vector is loaded once for the tile, and multiplies the input pixels under it; taps
//            whose rows (columns) meet no real input row (column) of the tile are skipped, the rest read zeros where
//            they leave the map. On large maps nearly every multiply-add is real.
//   by input pixels: each real input pixel the tile sees is loaded once, and multiplies the taps that join it to
//            each output of the tile. On a map no larger than the kernel's reach (every output sees every input:
//            7x7 at K13, 14x14 at K27) every multiply-add is real, where by taps a 4x4 tile does ~2x too many.
// `weights` points at tap (0, 0) of rows `weight_row` vectors long; by input pixels it reads the taps around the
// kernel too, up to RH - 1 rows and RW - 1 columns away, which hold zeros (`PaddedWeights`).
template <int RH, int RW>
void forward_tile_by_taps(const Vec *padded, const Vec *weights, int weight_row, const Geometry &g, int h0, int w0,
                          Vec *out) {
  Vec acc[RH][RW] = {};
  const int K = g.kernel, p = g.pad, row_length = g.padded_width;
  const int i_first = std::max(0, p - h0 - RH + 1), i_last = std::min(K - 1, g.height - 1 + p - h0);
  const int j_first = std::max(0, p - w0 - RW + 1), j_last = std::min(K - 1, g.width - 1 + p - w0);
  for (int i = i_first; i <= i_last; ++i) {
    const Vec *in = padded + int64_t(h0 + i) * row_length + w0;  // padded row h0 + i is input row h0 + i - p
    const Vec *tap = weights + i * weight_row;
    for (int j = j_first; j <= j_last; ++j) {
      const Vec weight = tap[j];
      UNROLLED for (int a = 0; a < RH; ++a)
        UNROLLED for (int b = 0; b < RW; ++b) acc[a][b] += weight * in[a * row_length + b + j];
    }
  }
  UNROLLED for (int a = 0; a < RH; ++a)
    UNROLLED for (int b = 0; b < RW; ++b) out[int64_t(h0 + a) * g.width + w0 + b] = acc[a][b];
}

template <int RH, int RW>
void forward_tile_by_inputs(const Vec *x, const Vec *weights, int weight_row, const Geometry &g, int h0, int w0,
                            Vec *out) {
  Vec acc[RH][RW] = {};
  const int p = g.pad;
  const int h_first = std::max(0, h0 - p), h_last = std::min(g.height - 1, h0 + RH - 1 + p);
  const int w_first = std::max(0, w0 - p), w_last = std::min(g.width - 1, w0 + RW - 1 + p);
  for (int h = h_first; h <= h_last; ++h) {
    // Input (h, w) meets output (h0 + a, w0 + b) at tap (h - h0 - a + p, w - w0 - b + p).
    const Vec *taps = weights + (h - h0 + p) * weight_row - w0 + p;
    const Vec *in = x + int64_t(h) * g.width;
    for (int w = w_first; w <= w_last; ++w) {
      const Vec pixel = in[w];
      UNROLLED for (int a = 0; a < RH; ++a)
        UNROLLED for (int b = 0; b < RW; ++b) acc[a][b] += pixel * taps[w - a * weight_row - b];
    }
  }
  UNROLLED for (int a = 0; a < RH; ++a)
    UNROLLED for (int b = 0; b < RW; ++b) out[int64_t(h0 + a) * g.width + w0 + b] = acc[a][b];
}

// Tables of a tile function's instances for every tile up to Rows x Columns: table[rows - 1][columns - 1].
template <class Family, int RH, int... RWs>
constexpr auto tile_row(std::integer_sequence<int, RWs...>) {
  return std::array{Family::template tile<RH, RWs + 1>()...};
}

template <class Family, int Columns, int... RHs>
constexpr auto tile_table(std::integer_sequence<int, RHs...>) {
  // The element type spelled out: std::array{row} of a single row would deduce a copy of the row, not a table.
  using Row = decltype(tile_row<Family, 1>(std::make_integer_sequence<int, Columns>()));
  return std::array<Row, sizeof...(RHs)>{tile_row<Family, RHs + 1>(std::make_integer_sequence<int, Columns>())...};
}

template <class Family, int Rows = kTileRows, int Columns = kTileColumns>
constexpr auto tile_table() { return tile_table<Family, Columns>(std::make_integer_sequence<int, Rows>()); }

// Forward tiles by input pixels go up to kInputTileColumns wide: whole rows of narrow maps.
constexpr int kInputTileColumns = std::max(kTileColumns, kNarrowWidth);

struct ByTaps {
  template <int RH, int RW> static constexpr auto tile() { return &forward_tile_by_taps<RH, RW>; }
};
struct ByInputs {
  template <int RH, int RW> static constexpr auto tile() { return &forward_tile_by_inputs<RH, RW>; }
};
const auto forward_by_taps = tile_table<ByTaps>();
const auto forward_by_inputs = tile_table<ByInputs, kTileRows, kInputTileColumns>();

// The start of each tile of a map dimension of `size`, tiles of at most `most`.
std::vector<int> tile_starts(int size, int most) {
  std::vector<int> starts;
  for (int start = 0; start < size; start += balanced_block(0, size - 1, most)) starts.push_back(start);
  return starts;
}

// Multiply-adds per vector along one dimension (rows or columns) of the output, by taps or by input pixels: the
// other dimension multiplies it, so the two ways compare dimension by dimension.
int64_t multiply_adds(int size, int kernel, int most, bool by_inputs) {
  const int p = kernel / 2, block = balanced_block(0, size - 1, most);
  int64_t total = 0;
  for (int start : tile_starts(size, most)) {
    const int tile = std::min(block, size - start);
    const int reach = by_inputs ? std::min(size - 1, start + tile - 1 + p) - std::max(0, start - p)
                                : std::min(kernel - 1, size - 1 + p - start) - std::max(0, p - start - tile + 1);
    total += int64_t(reach + 1) * tile;
  }
  return total;
}

// A group's weights with the zero border that forward_tile_by_inputs reads: `origin` is tap (0, 0).
struct PaddedWeights {
  int row_length;
  std::vector<Vec> storage;
  Vec *origin;
  explicit PaddedWeights(int kernel)
      : row_length(kernel + 2 * (kInputTileColumns - 1)),
        storage(int64_t(kernel + 2 * (kTileRows - 1)) * row_length, Vec{}),
        origin(storage.data() + (kTileRows - 1) * row_length + kInputTileColumns - 1) {}
};

// Small maps the kernel reaches across (K >= 2H - 1 and K >= 2W - 1, as 7x7 at K13) by output rows. A vector holds an
// output row (W <= kLanes pixels), so planes are read and written where they lie in NCHW: no interleaving, which took
// about as long as the multiply-adds of the lanes-as-planes kernels on 7x7 maps. Every input pixel meets every output
// row, and the taps joining input pixel (qh, qw) to output row ph lie side by side in a kernel row reversed: output
// row ph gains in[qh][qw] * taps[qh - ph + pad][pad - qw ...]. The lanes past W compute nothing useful (1 of 8 at 7).
//   forward and input gradient: a register tile of batch items x output rows, one broadcast input pixel per batch
//            item and one tap vector (a memory operand) per multiply-add (`row_tile`).
//   weight gradient: for each input column, the 2H - 1 kernel rows' vectors in registers, summed over the batch and
//            the row pairs, then added to the kernel (`row_weight_grad`).
// Only where it was measured faster: AVX2 (K13 on 7x7, one thread: forward 0.73 ms against 0.93 by planes). SSE's
// 4-lane build was slower (forward 2.2 ms against 1.7: a row in two vectors, no fused multiply-add); AVX-512 has 16
// lanes for a 7-pixel row; NEON is not measured.
constexpr bool kRowsMeasuredFaster = kLanes == 8;
constexpr int kRowTileItems = 2, kRowTileRows = 7;  // 2 x 7 accumulators and 2 broadcasts: AVX2's 16 registers
constexpr int kMostRowMapSize = 8;
// Batches from which the taps' copies per channel pay off (K13 on 7x7, AVX2, one thread: forward at batch 2 0.22 ms
// against 0.29 by planes; weight gradient at batch 2 0.35 against 0.29, at batch 4 0.52 against 0.60).
constexpr int kRowsLeastBatch = 2, kRowWeightGradLeastBatch = 4;
// Floats of a reversed kernel row: a 64-byte line, so that a vector read within it never spans two lines (which
// would cost two reads).
constexpr int kTapRow = 16;

// Whether the map is computed by output rows: the kernel reaches across it, a row fills at least 3/4 of a vector,
// its reads fit kTapRow, and the batch (at least `least_batch`) shares the taps' copies.
bool by_rows(const Geometry &g, int least_batch) {
  return kRowsMeasuredFaster && g.kernel >= 2 * g.height - 1 && g.kernel >= 2 * g.width - 1 &&
         g.height <= kMostRowMapSize && g.width <= kLanes && 4 * g.width >= 3 * kLanes &&
         g.pad + kLanes <= kTapRow && g.batch >= least_batch;
}

// One channel's taps in K rows of kTapRow floats, each row at the start of a 64-byte line, zeros past column K:
// the forward's kernel rows reversed (`fill_reversed`), the weight gradient's sums in the kernel's own order.
struct TapRows {
  std::vector<Vec> storage;
  float *origin;
  explicit TapRows(const Geometry &g)
      : storage(int64_t(g.kernel + 1) * kTapRow / kLanes + 64 / sizeof(Vec), Vec{}) {
    const auto address = reinterpret_cast<uintptr_t>(storage.data());
    origin = reinterpret_cast<float *>((address + 63) / 64 * 64);
  }
  // Tap (i, j) of the kernel (flipped in both axes when `flip`) at row i, column K - 1 - j.
  void fill_reversed(const float *kernel, const Geometry &g, bool flip) {
    const int K = g.kernel;
    for (int i = 0; i < K; ++i) {
      float *row = origin + i * kTapRow;
      for (int j = 0; j < K; ++j) row[j] = flip ? kernel[(K - 1 - i) * K + j] : kernel[i * K + K - 1 - j];
    }
  }
};

// Output rows ph0 .. ph0 + RH - 1 of RB planes: out[r][ph] = sum over input pixels (qh, qw) of
// in[r][qh][qw] * taps[qh - ph + pad][pad - qw ...]. A row is stored as a whole vector but in the plane's last row,
// its lanes past W spilling into the next row, which is written after.
template <int RB, int RH>
void row_tile(const float *const *in, const float *taps, const Geometry &g, int ph0, float *const *out) {
  Vec acc[RB][RH] = {};
  const int W = g.width;
  for (int qh = 0; qh < g.height; ++qh) {
    const float *row = taps + (qh - ph0 + g.pad) * kTapRow + g.pad;  // tap row of output row ph0, column pad
    for (int qw = 0; qw < W; ++qw) {
      const float *t = row - qw;
      Vec x[RB];
      UNROLLED for (int r = 0; r < RB; ++r) x[r] = splat(in[r][qh * W + qw]);
      UNROLLED for (int a = 0; a < RH; ++a) {
        Vec tap;
        std::memcpy(&tap, t - a * kTapRow, sizeof(Vec));
        UNROLLED for (int r = 0; r < RB; ++r) acc[r][a] += x[r] * tap;
      }
    }
  }
  UNROLLED for (int r = 0; r < RB; ++r)
    UNROLLED for (int a = 0; a < RH; ++a) store(acc[r][a], ph0 + a + 1 < g.height ? kLanes : W, out[r] + (ph0 + a) * W);
}

struct RowTiles {
  template <int RB, int RH> static constexpr auto tile() { return &row_tile<RB, RH>; }
};
const auto row_tiles = tile_table<RowTiles, kRowTileItems, kRowTileRows>();

// The forward (or, flipped, the input gradient) by output rows, channel by channel.
void convolve_by_rows(const float *in, const float *kernel, float *out, const Geometry &g, bool flip) {
  const int K = g.kernel;
  const int tile_items = balanced_block(0, g.batch - 1, kRowTileItems);
  const int tile_rows = balanced_block(0, g.height - 1, kRowTileRows);
  const int threads = threads_for(g);  // at most one a channel: units are channels or fewer
#pragma omp parallel num_threads(threads)
  {
    TapRows taps(g);
#pragma omp for schedule(dynamic, kUnitsPerChunk)
    for (int c = 0; c < g.channels; ++c) {
      if (c + 1 < g.channels) {  // the next channel's planes, small
        prefetch_channels(in, g, c + 1, 1, false);
        prefetch_channels(out, g, c + 1, 1, true);
      }
      taps.fill_reversed(kernel + int64_t(c) * K * K, g, flip);
      for (int b0 = 0; b0 < g.batch; b0 += tile_items) {
        const int items = std::min(tile_items, g.batch - b0);
        const float *planes[kRowTileItems];
        float *out_planes[kRowTileItems];
        for (int r = 0; r < items; ++r) {
          planes[r] = in + (int64_t(b0 + r) * g.channels + c) * g.plane();
          out_planes[r] = out + (int64_t(b0 + r) * g.channels + c) * g.plane();
        }
        for (int h0 = 0; h0 < g.height; h0 += tile_rows)
          row_tiles[items - 1][std::min(tile_rows, g.height - h0) - 1](planes, taps.origin, g, h0, out_planes);
      }
    }
  }
}

// One batch item's part of row_weight_grad: the row pairs' products added to acc, the centre row pair's (d = 0) to
// `centre` when Centre (every other item: the centre's chain of multiply-adds, one per row pair and item, was the
// longest, its latency longer than the tile's multiply-adds at 2 a cycle).
template <int H, bool Centre>
inline __attribute__((always_inline)) void row_weight_grad_item(const float *x, const Vec *d, int W, Vec *acc,
                                                                Vec &centre) {
  UNROLLED for (int qh = 0; qh < H; ++qh) {
    const Vec pixel = splat(x[qh * W]);
    UNROLLED for (int ph = 0; ph < H; ++ph) {
      Vec &sum = Centre && qh == ph ? centre : acc[qh - ph + H - 1];
      sum += pixel * d[ph];
    }
  }
}

// The weight gradient of one channel at input column qw: the sum over the batch and the input rows qh of
// in[qh][qw] * dy[qh - d], dy's rows as vectors reversed (lane l is column W - 1 - l, zero past the row), added to the
// taps of kernel row d + pad from column pad + qw - (W - 1) on: `taps` points at that column of kernel row
// pad - (H - 1), rows kTapRow floats apart.
template <int H>
void row_weight_grad(const float *const *in, const Vec *dy, int batch, int W, int qw, float *taps) {
  Vec acc[2 * H - 1] = {}, centre = {};
  int b = 0;
  for (; b + 1 < batch; b += 2) {
    row_weight_grad_item<H, false>(in[b] + qw, dy + int64_t(b) * H, W, acc, centre);
    row_weight_grad_item<H, true>(in[b + 1] + qw, dy + int64_t(b + 1) * H, W, acc, centre);
  }
  if (b < batch) row_weight_grad_item<H, false>(in[b] + qw, dy + int64_t(b) * H, W, acc, centre);
  acc[H - 1] += centre;
  UNROLLED for (int t = 0; t < 2 * H - 1; ++t) {
    Vec sum;
    std::memcpy(&sum, taps + t * kTapRow, sizeof(Vec));
    sum += acc[t];
    std::memcpy(taps + t * kTapRow, &sum, sizeof(Vec));
  }
}

template <int... Hs>
constexpr auto row_weight_grad_table(std::integer_sequence<int, Hs...>) {
  return std::array{&row_weight_grad<Hs + 1>...};
}
const auto row_weight_grads = row_weight_grad_table(std::make_integer_sequence<int, kMostRowMapSize>());

// Row h of a plane, reversed into a vector (lane l is pixel W - 1 - l; zeros past the row) by `column` and `real`.
typedef int32_t LaneIndex __attribute__((vector_size(kLanes * sizeof(int32_t))));
Vec reversed_row(const float *plane, const Geometry &g, int h, const LaneIndex &column, const LaneIndex &real) {
  const float *from = plane + h * g.width;
  // A whole vector where it stays within the plane (a row's spill is the next row's start).
  const Vec pixels = h + 1 < g.height ? load(from, kLanes) : load_plane_end(from, g.width, g.plane());
  return (Vec)((LaneIndex)__builtin_shuffle(pixels, column) & real);
}

void weight_grad_by_rows(const float *x, const float *dy, float *dweight, const Geometry &g) {
  const int K = g.kernel, H = g.height, W = g.width, p = g.pad;
  const int threads = threads_for(g);  // at most one a channel: units are channels or fewer
  LaneIndex column, real;
  for (int l = 0; l < kLanes; ++l) {
    column[l] = std::max(0, W - 1 - l);
    real[l] = l < W ? -1 : 0;
  }
#pragma omp parallel num_threads(threads)
  {
    TapRows taps(g);
    std::vector<Vec> rows(int64_t(g.batch) * H);
    std::vector<const float *> planes(g.batch);
#pragma omp for schedule(dynamic, kUnitsPerChunk)
    for (int c = 0; c < g.channels; ++c) {
      if (c + 1 < g.channels) {
        prefetch_channels(x, g, c + 1, 1, false);
        prefetch_channels(dy, g, c + 1, 1, false);
      }
      for (int b = 0; b < g.batch; ++b) {
        planes[b] = x + (int64_t(b) * g.channels + c) * g.plane();
        const float *gradient = dy + (int64_t(b) * g.channels + c) * g.plane();
        for (int h = 0; h < H; ++h) rows[int64_t(b) * H + h] = reversed_row(gradient, g, h, column, real);
      }
      std::fill(taps.storage.begin(), taps.storage.end(), Vec{});
      for (int qw = 0; qw < W; ++qw)
        row_weight_grads[H - 1](planes.data(), rows.data(), g.batch, W, qw,
                                taps.origin + (p - (H - 1)) * kTapRow + p + qw - (W - 1));
      // Kernel rows by whole vectors, each spilling into the next row's start, which is written after; the channel's
      // last row exactly (the next channel may be another thread's).
      float *out = dweight + int64_t(c) * K * K;
      for (int i = 0; i < K; ++i)
        for (int j = 0; j < K; j += kLanes) {
          Vec v;
          std::memcpy(&v, taps.origin + i * kTapRow + j, sizeof(Vec));
          store(v, i + 1 < K ? kLanes : std::min(kLanes, K - j), out + i * K + j);
        }
    }
  }
}

// out[b, c] = conv(in[b, c], kernel[c]) (kernel flipped in both axes when `flip`), for all b, c.
void convolve(const float *in, const float *kernel, float *out, const Geometry &g, bool flip) {
  if (by_rows(g, kRowsLeastBatch)) return convolve_by_rows(in, kernel, out, g, flip);
  const bool by_inputs = multiply_adds(g.height, g.kernel, kTileRows, true) *
                             multiply_adds(g.width, g.kernel, kTileColumns, true) <
                         multiply_adds(g.height, g.kernel, kTileRows, false) *
                             multiply_adds(g.width, g.kernel, kTileColumns, false);
  const bool whole_rows = by_inputs && g.width <= kNarrowWidth;
  const int most_rows = whole_rows ? std::clamp(kRowTileAccumulators / g.width, 1, kTileRows) : kTileRows;
  const int tile_rows = balanced_block(0, g.height - 1, most_rows);
  const int tile_columns = whole_rows ? g.width : balanced_block(0, g.width - 1, kTileColumns);
  // By taps the input is read zero-padded by K // 2, by input pixels as it is.
  const int pad = by_inputs ? 0 : g.pad, row_length = g.width + 2 * pad;
  const int threads = threads_for(g), chunk = units_per_chunk(g, threads);
#pragma omp parallel num_threads(threads)
  {
    std::vector<Vec> input(int64_t(g.height + 2 * pad) * row_length, Vec{}), interleaved_out(g.plane());
    PaddedWeights weights(g.kernel);
#pragma omp for schedule(dynamic, chunk)
    for (int u = 0; u < g.units(); ++u) {
      const Unit unit(g, u);
      prefetch_unit(in, g, u + 1, false);
      prefetch_unit(out, g, u + 1, true);
      for (int group = 0; group < unit.groups; ++group) {
        const GroupPlanes planes(g, unit, group);
        gather(in, g, planes, pad, row_length, input.data());
        gather_weights(kernel, g, planes, flip, weights.row_length, weights.origin);
        for (int h0 = 0; h0 < g.height; h0 += tile_rows)
          for (int w0 = 0; w0 < g.width; w0 += tile_columns) {
            const int rows = std::min(tile_rows, g.height - h0), columns = std::min(tile_columns, g.width - w0);
            const auto tile = by_inputs ? forward_by_inputs[rows - 1][columns - 1]
                                        : forward_by_taps[rows - 1][columns - 1];
            tile(input.data(), weights.origin, weights.row_length, g, h0, w0, interleaved_out.data());
          }
        scatter(interleaved_out.data(), g, planes, out);
      }
    }
  }
}

// Taps i0 .. i0 + RI - 1 x j0 .. j0 + RJ - 1 of a group's weight gradient, summed over its output pixels and added
// to lane_sums[i * K + j] (per lane). Output rows (columns) whose taps of the tile meet no real input are skipped;
// the rest read zeros where they leave the map.
template <int RI, int RJ>
void weight_grad_tile(const Vec *padded_x, const Vec *dy, const Geometry &g, int i0, int j0, Vec *lane_sums) {
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
  UNROLLED for (int a = 0; a < RI; ++a)
    UNROLLED for (int b = 0; b < RJ; ++b) lane_sums[(i0 + a) * g.kernel + j0 + b] += acc[a][b];
}

// The weight gradient of a map no wider than kNarrowWidth under a kernel that reaches across it (K >= 2W - 1, as
// 7x7 at K13): every input column then meets every output column at some tap, so a kernel row's taps are the full
// correlation of an output-gradient row with the input row it meets -- its 2W - 1 taps stay in registers, and the
// row pairs (h, h + i - p) that meet are the only ones visited: every multiply-add is a real one. (The tiles of
// weight_grad_tile meet the map's edge on a slant here: 1.8x the real multiply-adds at K13 on 7x7 maps.)
// Registers: 2W - 1 accumulators and the output-gradient vector (and a product without fused multiply-add) within
// the 16 of AVX2 and SSE.
template <int W>
void weight_grad_by_row_pairs(const Vec *x, const Vec *dy, const Geometry &g, Vec *lane_sums) {
  const int K = g.kernel, p = g.pad, first_column = p - (W - 1);  // the tap column of accumulator 0
  const int i_first = std::max(0, p - g.height + 1), i_last = std::min(K - 1, p + g.height - 1);
  for (int i = i_first; i <= i_last; ++i) {
    Vec acc[2 * W - 1] = {};
    // Output row h meets input row h + i - p.
    const int h_first = std::max(0, p - i), h_last = std::min(g.height - 1, g.height - 1 + p - i);
    for (int h = h_first; h <= h_last; ++h) {
      const Vec *d = dy + h * W, *in = x + (h + i - p) * W;
      UNROLLED for (int w = 0; w < W; ++w) {
        const Vec gradient = d[w];
        // Input column v meets output column w at tap column v - w + p, accumulator v - w + W - 1.
        UNROLLED for (int v = 0; v < W; ++v) acc[v - w + W - 1] += gradient * in[v];
      }
    }
    UNROLLED for (int t = 0; t < 2 * W - 1; ++t) lane_sums[i * K + first_column + t] += acc[t];
  }
}

template <int... Ws>
constexpr auto row_pair_table(std::integer_sequence<int, Ws...>) {
  return std::array{&weight_grad_by_row_pairs<Ws + 1>...};
}
const auto weight_grad_by_row_pairs_table = row_pair_table(std::make_integer_sequence<int, kNarrowWidth>());

struct WeightGradTiles {
  template <int RI, int RJ> static constexpr auto tile() { return &weight_grad_tile<RI, RJ>; }
};
const auto weight_grad_table = tile_table<WeightGradTiles>();

// Adds up the lanes of each channel of a unit in lane_sums (K * K taps, per lane) and writes the sums to its
// channels' taps in dweight: kLanes taps at a time, transposed so that a lane's taps are one vector. A unit's lanes
// are one channel's batch items (lanes past the planes sum to zero), or, when the batch is smaller than a vector,
// those of its only group, `planes`.
void sum_lanes(const Vec *lane_sums, const Geometry &g, const GroupPlanes &planes, float *dweight) {
  const int taps = g.kernel * g.kernel;
  for (int first = 0; first < taps; first += kLanes) {
    const int count = std::min(kLanes, taps - first);
    Vec block[kLanes];
    UNROLLED for (int k = 0; k < kLanes; ++k) block[k] = k < count ? lane_sums[first + k] : Vec{};
    transpose(block);
    if (g.channels_per_unit == 1) {
      // Every lane is the same channel (or zero): a fixed sum over all lanes, in registers. The loop below, with
      // its data-dependent runs, kept `sum` in memory and cost ~40% of the weight gradient at K13 on 7x7 maps.
      Vec sum = block[0];
      UNROLLED for (int lane = 1; lane < kLanes; ++lane) sum += block[lane];
      store(sum, count, dweight + int64_t(planes.channel[0]) * taps + first);
      continue;
    }
    Vec sum = block[0];
    for (int lane = 1; lane <= planes.count; ++lane) {
      if (lane == planes.count || planes.channel[lane] != planes.channel[lane - 1]) {
        store(sum, count, dweight + int64_t(planes.channel[lane - 1]) * taps + first);
        if (lane < planes.count) sum = block[lane];
      } else {
        sum += block[lane];
      }
    }
  }
}

void weight_grad(const float *x, const float *dy, float *dweight, const Geometry &g) {
  if (by_rows(g, kRowWeightGradLeastBatch)) return weight_grad_by_rows(x, dy, dweight, g);
  const int K = g.kernel, p = g.pad;
  // Kernel rows/columns that see at least one real pixel; the others stay zero.
  const int row_first = std::max(0, p - g.height + 1), row_last = std::min(K - 1, p + g.height - 1);
  const int col_first = std::max(0, p - g.width + 1), col_last = std::min(K - 1, p + g.width - 1);
  const int tile_rows = balanced_block(row_first, row_last, kTileRows);
  const int tile_columns = balanced_block(col_first, col_last, kTileColumns);
  const bool by_row_pairs = g.width <= kNarrowWidth && K >= 2 * g.width - 1;
  const int pad = by_row_pairs ? 0 : p;  // the row pairs read the input as it is
  const int threads = threads_for(g), chunk = units_per_chunk(g, threads);
#pragma omp parallel num_threads(threads)
  {
    std::vector<Vec> padded_x(int64_t(g.height + 2 * pad) * (g.width + 2 * pad), Vec{});
    std::vector<Vec> interleaved_dy(g.plane()), lane_sums(K * K);
#pragma omp for schedule(dynamic, chunk)
    for (int u = 0; u < g.units(); ++u) {
      const Unit unit(g, u);
      prefetch_unit(x, g, u + 1, false);
      prefetch_unit(dy, g, u + 1, false);
      std::fill(lane_sums.begin(), lane_sums.end(), Vec{});
      for (int group = 0; group < unit.groups; ++group) {
        const GroupPlanes planes(g, unit, group);
        gather(x, g, planes, pad, g.width + 2 * pad, padded_x.data());
        gather(dy, g, planes, 0, g.width, interleaved_dy.data());
        if (by_row_pairs) {
          weight_grad_by_row_pairs_table[g.width - 1](padded_x.data(), interleaved_dy.data(), g, lane_sums.data());
          continue;
        }
        for (int i0 = row_first; i0 <= row_last; i0 += tile_rows)
          for (int j0 = col_first; j0 <= col_last; j0 += tile_columns) {
            const int rows = std::min(tile_rows, row_last + 1 - i0);
            const int columns = std::min(tile_columns, col_last + 1 - j0);
            weight_grad_table[rows - 1][columns - 1](padded_x.data(), interleaved_dy.data(), g, i0, j0,
                                                     lane_sums.data());
          }
      }
      sum_lanes(lane_sums.data(), g, GroupPlanes(g, unit, 0), dweight);
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

int64_t elements(const int64_t *shape) { return shape[0] * shape[1] * shape[2] * shape[3]; }

// Whether `small` is the stride-2 output shape of a `full` map.
bool is_half_of(const int64_t *small, const int64_t *full) {
  return small[0] == full[0] && small[1] == full[1] && small[2] == (full[2] + 1) / 2 &&
         small[3] == (full[3] + 1) / 2;
}

// For each pixel [b, c, i, j] of the stride-2 map: f(its pixel [b, c, 2i, 2j] in a `full`-shaped map, itself).
template <typename Map, typename Small, typename F>
void even_pixels(const int64_t *full, Map *map, Small *small, F f) {
  const int64_t planes = full[0] * full[1], height = (full[2] + 1) / 2, width = (full[3] + 1) / 2;
  for (int64_t p = 0; p < planes; ++p) {
    for (int64_t i = 0; i < height; ++i) {
      Map *row = map + (p * full[2] + 2 * i) * full[3];
      Small *pixels = small + (p * height + i) * width;
      for (int64_t j = 0; j < width; ++j) f(row[2 * j], pixels[j]);
    }
  }
}

// A zeroed map of `full` shape with small[b, c, i, j] at [b, c, 2i, 2j].
std::vector<float> spread(const float *small, const int64_t *full) {
  std::vector<float> map(elements(full), 0.0f);
  even_pixels(full, map.data(), small, [](float &pixel, float value) { pixel = value; });
  return map;
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

extern "C" int dwconv_stride2_forward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                      void *, void *) {
  if (!valid(nparam, 3, ndims, shapes, dtypes, 1) || !is_half_of(shapes[2], shapes[0])) return 1;
  const Geometry g(shapes[0], int(shapes[1][2]));
  std::vector<float> full(elements(shapes[0]));
  convolve(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]), full.data(), g, false);
  const float *computed = full.data();
  even_pixels(shapes[0], computed, static_cast<float *>(params[2]), [](float pixel, float &y) { y = pixel; });
  return 0;
}

extern "C" int dwconv_stride2_input_grad(int nparam, void **params, int *ndims, int64_t **shapes,
                                         const char **dtypes, void *, void *) {
  if (!valid(nparam, 4, ndims, shapes, dtypes, 1) || !same_shape(shapes[3], shapes[2]) ||
      !is_half_of(shapes[0], shapes[2]))
    return 1;
  const Geometry g(shapes[2], int(shapes[1][2]));
  const std::vector<float> dy = spread(static_cast<const float *>(params[0]), shapes[2]);
  convolve(dy.data(), static_cast<const float *>(params[1]), static_cast<float *>(params[3]), g, true);
  return 0;
}

extern "C" int dwconv_stride2_weight_grad(int nparam, void **params, int *ndims, int64_t **shapes,
                                          const char **dtypes, void *, void *) {
  if (!valid(nparam, 4, ndims, shapes, dtypes, 2) || !is_half_of(shapes[1], shapes[0]) ||
      !same_shape(shapes[3], shapes[2]))
    return 1;
  const Geometry g(shapes[0], int(shapes[2][2]));
  const std::vector<float> dy = spread(static_cast<const float *>(params[1]), shapes[0]);
  weight_grad(static_cast<const float *>(params[0]), dy.data(), static_cast<float *>(params[3]), g);
  return 0;
}
