// How the CPU channels-first LayerNorm and fused UX MLP kernels cut the voxels into tiles and chunks (no torch
// headers).
//
// Both ops work per voxel over the C channels. The UX MLP cuts the voxels of each batch item into tiles of
// kTile voxels, copies a tile into a channel-major float scratch buffer [C][kTile] (whatever the tensor layout),
// and computes with every inner loop running over the kTile voxels of the tile: per-voxel reductions over C
// become element-wise vector adds and per-channel parameter gradients accumulate lane-wise.
// The LayerNorm uses wide tiles ("row blocks", row_block_voxels() voxels) and no scratch copy: in NCDHW its
// passes stream each channel's contiguous row of the block instead of gathering C short rows a plane apart; in
// channels_last_3d a block is one contiguous run of voxels, processed voxel by voxel.
//
// Tiles are grouped into chunks; a chunk is the unit of parallel work and of the deterministic reduction of
// parameter gradients: each chunk writes its own partial sums, which are then added in chunk order. The chunk
// partition depends only on the tensor shape, never on the number of threads (nor on the ISA variant).
#pragma once

#include <algorithm>
#include <cstdint>

namespace uxnet {
namespace cpu {
namespace voxel_tiling {

constexpr int64_t kTile = 16;                 // voxels per tile (one AVX-512 float vector)
constexpr int64_t kTilesPerFlush = 16;        // tiles whose lane sums are flushed into the chunk's double sums
constexpr int64_t kMaxChunks = 512;           // bounds the memory of the per-chunk partial sums
constexpr int64_t kMaxRowBlockVoxels = 1024;  // LayerNorm (NCDHW): per-voxel state of a block stays in L1

struct VoxelTiling {
  int64_t batch = 0;
  int64_t channels = 0;
  int64_t voxels = 0;  // D * H * W
  bool channels_last = false;
  int64_t tile_voxels = kTile;  // a multiple of kTile
  int64_t tiles_per_batch = 0;
  int64_t num_tiles = 0;
  int64_t tiles_per_chunk = 0;
  int64_t num_chunks = 0;
};

// A tile: batch item n, voxels [v0, v0 + count) of that item.
struct TileRef {
  int64_t n;
  int64_t v0;
  int64_t count;
};

// Voxels per LayerNorm row block: a quarter of a batch item's voxels (so that small volumes still split across
// threads), in whole kTile groups, between kTile and kMaxRowBlockVoxels. Depends on the shape only: row blocks
// are also the unit of the deterministic parameter-gradient reduction.
inline int64_t row_block_voxels(int64_t voxels) {
  const int64_t quarter = (voxels + 4 * kTile - 1) / (4 * kTile) * kTile;
  return std::max<int64_t>(kTile, std::min<int64_t>(quarter, kMaxRowBlockVoxels));
}

// batch items of `channels` x `voxels`; row_blocks: LayerNorm's row blocks instead of kTile tiles.
inline VoxelTiling make_tiling(int64_t batch, int64_t channels, int64_t voxels, bool channels_last,
                               bool row_blocks) {
  VoxelTiling t;
  t.batch = batch;
  t.channels = channels;
  t.voxels = voxels;
  t.channels_last = channels_last;
  t.tile_voxels = row_blocks ? row_block_voxels(t.voxels) : kTile;
  t.tiles_per_batch = (t.voxels + t.tile_voxels - 1) / t.tile_voxels;
  t.num_tiles = t.batch * t.tiles_per_batch;
  // kTile tiles: a chunk spans at least one flush of the float lane sums; row blocks keep their sums in double.
  const int64_t min_chunk = row_blocks ? 1 : kTilesPerFlush;
  const int64_t even_split = (t.num_tiles + kMaxChunks - 1) / kMaxChunks;
  t.tiles_per_chunk = even_split > min_chunk ? even_split : min_chunk;
  t.num_chunks = (t.num_tiles + t.tiles_per_chunk - 1) / t.tiles_per_chunk;
  return t;
}

inline TileRef tile_ref(const VoxelTiling& t, int64_t tile) {
  const int64_t n = tile / t.tiles_per_batch;
  const int64_t v0 = (tile - n * t.tiles_per_batch) * t.tile_voxels;
  const int64_t left = t.voxels - v0;
  return {n, v0, left < t.tile_voxels ? left : t.tile_voxels};
}

// fn(voxel, base) for every voxel of chunk `chunk`, in order: voxel = n * voxels + v indexes its per-voxel
// statistics, base is the offset of its channel 0 (the channels step by 1 in channels_last, by voxels otherwise).
template <typename Fn>
inline void for_each_chunk_voxel(const VoxelTiling& t, int64_t chunk, Fn fn) {
  const int64_t tile_end = std::min(t.num_tiles, (chunk + 1) * t.tiles_per_chunk);
  for (int64_t i = chunk * t.tiles_per_chunk; i < tile_end; ++i) {
    const TileRef tile = tile_ref(t, i);
    for (int64_t p = 0; p < tile.count; ++p) {
      const int64_t voxel = tile.n * t.voxels + tile.v0 + p;
      fn(voxel, t.channels_last ? voxel * t.channels : tile.n * t.channels * t.voxels + tile.v0 + p);
    }
  }
}

// A chunk kernel: processes chunks [chunk_begin, chunk_end) of args.tiling.
template <typename Args>
using ChunkKernel = void (*)(const Args&, int64_t chunk_begin, int64_t chunk_end);

// The forward and backward chunk kernels an op runs for one layout and channel count.
template <typename ForwardArgs, typename BackwardArgs>
struct ChunkKernels {
  ChunkKernel<ForwardArgs> forward;
  ChunkKernel<BackwardArgs> backward;
};

// Up to this many channels the LayerNorm and UX MLP backwards run in float64 (backward_few_channels).
constexpr int64_t kFewChannels = 4;

}  // namespace voxel_tiling
}  // namespace cpu
}  // namespace uxnet
