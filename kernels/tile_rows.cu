// Rows between a dense buffer and an arena's tiles (tqkv::paged::TileRows): the writes and reads
// of the exact rows of a TurboQuant cache and of a paged full-precision cache. The CPU
// reference is tqkv::paged::TileRows::scatter / gather.
//
// Layouts:
//   dense    [heads, n, row_bytes] u8 (any element type, as bytes), row-major, contiguous
//   arena    row (i, h) — slot first + i of head h — at byte
//            table[(first + i) / per_tile − t0]·tile_bytes + offset + ((first + i) % per_tile)·slot_stride
//            + h·head_stride, where t0 = first / per_tile (the table covers the rows' tiles only)
// Grid (ceil(heads · n / 4)), 128 threads: one warp per row.
#include "tqkv_common.cuh"

// Where the rows of one part sit (mirrored by tqkv::cuda::TqRows).
struct TqRows {
  const int* table;   // tiles of the rows, from tile first / per_tile on
  int per_tile;       // positions per tile
  int heads;          // heads per position
  long tile_bytes;    // bytes between tiles
  long offset;        // bytes of the part's first row from a tile's start
  long slot_stride;   // bytes between consecutive positions of one head
  long head_stride;   // bytes between the heads of one position
  long row_bytes;     // bytes of one row
};
static_assert(sizeof(TqRows) == 56 && offsetof(TqRows, tile_bytes) == 16, "TqRows layout differs from src/cuda.rs");

__global__ void tq_copy_rows_kernel(uint8_t* __restrict__ arena, uint8_t* __restrict__ dense, TqRows r, int first,
                                    int n, int to_tiles) {
  const long row = (long)blockIdx.x * 4 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= (long)r.heads * n) return;
  const int h = (int)(row / n), i = (int)(row % n);
  const int s = first + i, t0 = first / r.per_tile;
  const long at = (long)r.table[s / r.per_tile - t0] * r.tile_bytes + r.offset + (long)(s % r.per_tile) * r.slot_stride +
                  (long)h * r.head_stride;
  uint8_t* a = arena + at;
  uint8_t* d = dense + row * r.row_bytes;
  uint8_t* dst = to_tiles ? a : d;
  const uint8_t* src = to_tiles ? d : a;
  if ((((uintptr_t)dst | (uintptr_t)src) & 3) == 0 && (r.row_bytes & 3) == 0) {
    for (long w = lane; w < r.row_bytes / 4; w += 32)
      reinterpret_cast<uint32_t*>(dst)[w] = reinterpret_cast<const uint32_t*>(src)[w];
  } else {
    for (long w = lane; w < r.row_bytes; w += 32) dst[w] = src[w];
  }
}

// Copies rows first .. first + n of every head between `dense` and the tiles of `arena`:
// to_tiles 1 writes the tiles, 0 reads them.
extern "C" int tqkv_copy_rows(uint8_t* arena, uint8_t* dense, const TqRows* rows, int first, int n, int to_tiles,
                              cudaStream_t stream) {
  if (!rows || !rows->table || rows->per_tile < 1 || rows->heads < 1 || rows->row_bytes < 1 || first < 0 || n < 0)
    return (int)cudaErrorInvalidValue;
  if (n == 0) return 0;
  const long total = (long)rows->heads * n;
  auto k = tq_copy_rows_kernel;
  TQ_LAUNCH(k, dim3((unsigned)((total + 3) / 4)), TQ_THREADS, 0, stream, arena, dense, *rows, first, n, to_tiles);
  return (int)cudaGetLastError();
}
