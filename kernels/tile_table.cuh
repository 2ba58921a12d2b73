// Where a sequence's records sit: the contiguous layout [B, Hkv, cap, rb], or tiles of an arena
// reached through a per-sequence table (tqkv::paged::RecordTiles, docs/FORMAT.md "Tiles").
// Every kernel that reads or writes records goes through tq_slot_offset / tq_stage_slots.
//
// Layouts (mirrored by tqkv::cuda::TqTiles):
//   table == null: slot s of (b, h) at byte ((b·Hkv + h)·cap + s)·rb of the cache
//   table:         slot s of (b, h) at byte table[b·per_seq + s / slots]·k_tile + h·k_head +
//                  (s % slots)·rb of the key base (values: v_tile, v_head from the value base);
//                  an arena of tiles [keys Hkv × slots × Rk | values Hkv × slots × Rv] has
//                  k_tile = v_tile = tile_bytes, k_head = slots·Rk, v_head = slots·Rv and the
//                  value base Hkv·slots·Rk bytes after the key base
#pragma once
#include "tqkv_common.cuh"

// A per-sequence table of tiles of `slots` positions. table == null: the contiguous layout.
struct TqTiles {
  const int* table;      // [B, per_seq] physical tile of (sequence, logical tile)
  int per_seq;           // logical tiles per sequence
  int slots;             // positions per tile
  long k_tile, k_head;   // key bytes between physical tiles / between the KV heads of a tile
  long v_tile, v_head;   // value bytes, likewise
};
static_assert(sizeof(TqTiles) == 48 && offsetof(TqTiles, slots) == 12 && offsetof(TqTiles, k_tile) == 16,
              "TqTiles layout differs from src/cuda.rs");

// Byte offset of slot s of (b, h) in a cache of `rb`-byte records (keys or values).
__device__ __forceinline__ long tq_slot_offset(const TqTiles& tt, bool keys, int b, int h, int Hkv, int cap, int rb,
                                               int s) {
  if (!tt.table) return (((long)b * Hkv + h) * cap + s) * rb;
  const long tile = tt.table[(long)b * tt.per_seq + s / tt.slots];
  return tile * (keys ? tt.k_tile : tt.v_tile) + (long)h * (keys ? tt.k_head : tt.v_head) +
         (long)(s % tt.slots) * rb;
}

// Copies the records of slots t0 .. t0 + n of (b, h) from `base` to dst (n · rb bytes, slot
// order) with copy(dst, src, bytes), in runs that stay inside one tile; the slots of a tile the
// sequence does not hold (−1: positions it has no record of) are left as they were.
template <typename Copy>
__device__ __forceinline__ void tq_stage_slots(uint8_t* dst, const uint8_t* base, const TqTiles& tt, bool keys, int b,
                                               int h, int Hkv, int cap, int rb, int t0, int n, Copy copy) {
  for (int i = 0; i < n;) {
    const int s = t0 + i;
    const int run = tt.table ? min(n - i, tt.slots - s % tt.slots) : n - i;
    if (!tt.table || tt.table[(long)b * tt.per_seq + s / tt.slots] >= 0)
      copy(dst + (long)i * rb, base + tq_slot_offset(tt, keys, b, h, Hkv, cap, rb, s), run * rb);
    i += run;
  }
}
