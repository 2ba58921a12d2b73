// Runs kernels/decode_attention.cu on the CPU (tq_emu.h) over the cases written by
// tests/emu_cases.rs and compares with the CPU reference's output they carry: both split
// kernels (the tensor-core one where it takes the layout), several split plans, each also
// through shuffled tile tables of 64 and of 7 slots per tile (bit-equal to its contiguous
// run; tiles no query reads are absent, −1). The exact rows (sinks and windows) are repacked
// from the case's ring into shuffled tiles of 3 positions, as a cache's arena holds them.
// Outputs and workspace start poisoned (NaN), so an element a kernel fails to write fails.
//
//   scripts/emulate-kernels.sh (g++ -DTQ_EMU -I tests/emu -I kernels -I $CUDA_ROOT/include …)
#include "../../kernels/decode_attention.cu"
#include "../../kernels/tile_rows.cu"

#include <map>
#include <string>

// The runtime's error query, declared by the CUDA headers: launches cannot fail here.
cudaError_t cudaGetLastError(void) { return cudaSuccess; }

struct Arr {
  int kind = 0;
  uint64_t count = 0;
  std::vector<unsigned char> data;
  template <typename T>
  const T* as() const { return reinterpret_cast<const T*>(data.data()); }
};

static std::map<std::string, Arr> load(const char* path) {
  FILE* f = fopen(path, "rb");
  if (!f) {
    fprintf(stderr, "cannot open %s\n", path);
    exit(2);
  }
  char magic[7];
  if (fread(magic, 1, 7, f) != 7 || memcmp(magic, "TQEMU1\n", 7) != 0) {
    fprintf(stderr, "%s: not a case file\n", path);
    exit(2);
  }
  std::map<std::string, Arr> m;
  for (;;) {
    uint32_t n;
    if (fread(&n, 4, 1, f) != 1) break;
    std::string name(n, '\0');
    Arr a;
    unsigned char kind;
    if (fread(&name[0], 1, n, f) != n || fread(&kind, 1, 1, f) != 1 || fread(&a.count, 8, 1, f) != 1) exit(2);
    a.kind = kind;
    const size_t width = kind == 2 ? 1 : kind == 3 ? 2 : 4;
    a.data.resize(a.count * width);
    if (a.count && fread(a.data.data(), width, a.count, f) != a.count) exit(2);
    m[name] = std::move(a);
  }
  fclose(f);
  return m;
}

static const Arr& get(const std::map<std::string, Arr>& m, const std::string& k) {
  auto it = m.find(k);
  if (it == m.end()) {
    fprintf(stderr, "case lacks %s\n", k.c_str());
    exit(2);
  }
  return it->second;
}

static const float* fptr(const std::map<std::string, Arr>& m, const std::string& k) {
  const Arr& a = get(m, k);
  return a.count ? a.as<float>() : nullptr;
}

static TqSpec spec_of(const std::map<std::string, Arr>& m, const std::string& name) {
  const int* s = get(m, name + ".spec").as<int>();
  TqSpec sp{};
  sp.head_dim = s[0];
  sp.num_groups = s[1];
  sp.record_bytes = s[2];
  sp.norm_format = s[3];
  sp.norm_rule = s[4];
  for (int g = 0; g < sp.num_groups; ++g) {
    const std::string p = name + ".g" + std::to_string(g);
    const int* v = get(m, p).as<int>();
    TqGroup& gg = sp.groups[g];
    gg.dim = v[0];
    gg.mse_bits = v[1];
    gg.m = v[2];
    gg.rot_kind = v[3];
    gg.had_block = v[4];
    gg.norm_off = v[5];
    gg.gamma_off = v[6];
    gg.codes_off = v[7];
    gg.signs_off = v[8];
    gg.qjl_scale = get(m, p + ".qjl").as<float>()[0];
    gg.rot = fptr(m, p + ".rot");
    gg.rot_t = fptr(m, p + ".rot_t");
    gg.boundaries = fptr(m, p + ".boundaries");
    gg.centroids = fptr(m, p + ".centroids");
    gg.sketch = fptr(m, p + ".sketch");
  }
  return sp;
}

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint64_t next_u64() {
  rng_state ^= rng_state << 13;
  rng_state ^= rng_state >> 7;
  rng_state ^= rng_state << 17;
  return rng_state;
}

// tile_rows.cu: rows scattered into shuffled tiles land where tqkv::paged::TileRows puts them
// and gather back unchanged (rows of 7 and 8 bytes: the byte and the word paths).
static int check_copy_rows() {
  int failures = 0;
  for (int rb : {7, 8}) {
    const int heads = 3, per_tile = 5, first = 4, n = 13;
    const long slot_stride = (long)heads * rb, tile_bytes = ((long)per_tile * slot_stride + 5 + 15) / 16 * 16;
    const int t0 = first / per_tile, t1 = (first + n - 1) / per_tile + 1;
    std::vector<int> table;
    for (int j = t0; j < t1; ++j) table.push_back((j * 7 + 3) % (t1 - t0 + 2));
    std::vector<unsigned char> arena((size_t)(t1 - t0 + 2) * tile_bytes, 0xAB), dense((size_t)heads * n * rb);
    for (auto& x : dense) x = (unsigned char)next_u64();
    const TqRows r{table.data(), per_tile, heads, tile_bytes, 5, slot_stride, (long)rb, (long)rb};
    int rc = tqkv_copy_rows(arena.data(), dense.data(), &r, first, n, 1, nullptr);
    long wrong = 0;
    for (int h = 0; h < heads; ++h)
      for (int i = 0; i < n; ++i) {
        const int s = first + i;
        const long at = (long)table[s / per_tile - t0] * tile_bytes + 5 + (s % per_tile) * slot_stride + h * rb;
        wrong += memcmp(&arena[at], &dense[((size_t)h * n + i) * rb], rb) != 0;
      }
    std::vector<unsigned char> back(dense.size(), 0);
    rc |= tqkv_copy_rows(arena.data(), back.data(), &r, first, n, 0, nullptr);
    wrong += back != dense;
    printf("copy rows of %d bytes: %ld rows misplaced (rc %d)%s\n", rb, wrong, rc, wrong || rc ? "  FAIL" : "");
    failures += wrong || rc;
  }
  return failures;
}

int main(int argc, char** argv) {
  int failures = check_copy_rows(), runs = 2;
  for (int a = 1; a < argc; ++a) {
    const auto m = load(argv[a]);
    const int* dm = get(m, "dims").as<int>();
    const int B = dm[0], Hq = dm[1], Hkv = dm[2], T = dm[3], cap = dm[4], cycle = dm[5], qd = dm[6];
    const int sinks = dm[7], ring = dm[8], has_exact = dm[9], d = dm[10];
    const float scale = get(m, "scale").as<float>()[0];
    std::vector<TqSpec> ks, vs;
    for (int i = 0; i < cycle; ++i) {
      ks.push_back(spec_of(m, "k" + std::to_string(i)));
      vs.push_back(spec_of(m, "v" + std::to_string(i)));
    }
    const int rbk = ks[0].record_bytes, rbv = vs[0].record_bytes;
    const int* kch = get(m, "kch").as<int>();
    const int* vch = get(m, "vch").as<int>();
    const Arr& kc = get(m, "kc");
    const Arr& vc = get(m, "vc");
    const float* q32 = get(m, "q").as<float>();
    const int* visible = get(m, "visible").as<int>();
    const int* packed_end = get(m, "packed_end").as<int>();
    const float* want = get(m, "want").as<float>();
    const long nq = (long)B * Hq * T * d;
    std::vector<__half> q16(nq);
    std::vector<__nv_bfloat16> qb(nq);
    for (long i = 0; i < nq; ++i) {
      q16[i] = __float2half_rn(q32[i]);
      qb[i] = __float2bfloat16_rn(q32[i]);
    }
    const void* q = qd == 0 ? (const void*)q32 : qd == 1 ? (const void*)q16.data() : (const void*)qb.data();
    int maxvis = 0, lo = 1 << 30;
    for (int i = 0; i < B * T; ++i) {
      maxvis = max(maxvis, visible[i]);
      if (packed_end[i] < visible[i]) lo = min(lo, packed_end[i]);
    }
    if (lo == 1 << 30) lo = maxvis;
    // Per sequence: the records its queries read (lo_rec .. rec_hi[b]) and the exact rows
    // (sinks, then ex_lo[b] .. ex_hi[b]).
    std::vector<int> rec_hi(B, 0), ex_lo(B, 1 << 30), ex_hi(B, 0);
    for (int b = 0; b < B; ++b)
      for (int t = 0; t < T; ++t) {
        const int i = b * T + t;
        rec_hi[b] = max(rec_hi[b], has_exact ? packed_end[i] : visible[i]);
        ex_hi[b] = max(ex_hi[b], visible[i]);
        if (packed_end[i] < visible[i]) ex_lo[b] = min(ex_lo[b], packed_end[i]);
      }
    const int lo_rec = has_exact ? sinks : 0;
    TqExact ex{};
    std::vector<unsigned char> earena;
    std::vector<int> etable;
    if (has_exact) {
      ex.format = dm[11];
      // The ring's rows repacked into tiles of ER positions [ER, Hkv, key | value], shuffled;
      // tiles holding no row a query reads are absent (−1).
      const int ER = 3;
      const int vb = ex.format == 0 ? 2 * d : d + d / 16, rowb = 2 * vb, slots = sinks + ring;
      const long etb = ((long)ER * Hkv * rowb + 15) / 16 * 16;
      const int eper = (cap + ER - 1) / ER;
      std::vector<int> order(B * eper);
      for (int i = 0; i < B * eper; ++i) order[i] = i;
      for (int i = B * eper - 1; i > 0; --i) std::swap(order[i], order[next_u64() % (i + 1)]);
      earena.resize((size_t)B * eper * etb);
      for (auto& x : earena) x = (unsigned char)next_u64();
      etable.assign(B * eper, -1);
      const __half* ek = get(m, "ek").as<__half>();
      const __half* ev = get(m, "ev").as<__half>();
      const uint8_t* ekq = get(m, "ekq").as<uint8_t>();
      const __half* eks = get(m, "eks").as<__half>();
      const uint8_t* evq = get(m, "evq").as<uint8_t>();
      const __half* evs = get(m, "evs").as<__half>();
      for (int b = 0; b < B; ++b)
        for (int p = 0; p < ex_hi[b]; ++p) {
          if (!(p < sinks || p >= ex_lo[b])) continue;
          int& tile = etable[b * eper + p / ER];
          if (tile < 0) tile = order[b * eper + p / ER];
          const int slot = p < sinks ? p : sinks + p % max(1, ring);
          for (int h = 0; h < Hkv; ++h) {
            const long src = ((long)b * Hkv + h) * slots + slot;
            unsigned char* dst = &earena[(size_t)tile * etb + ((size_t)(p % ER) * Hkv + h) * rowb];
            if (ex.format == 0) {
              memcpy(dst, ek + src * d, 2 * d);
              memcpy(dst + vb, ev + src * d, 2 * d);
            } else {
              memcpy(dst, ekq + src * d, d);
              memcpy(dst + d, eks + src * (d / 32), d / 16);
              memcpy(dst + vb, evq + src * d, d);
              memcpy(dst + vb + d, evs + src * (d / 32), d / 16);
            }
          }
        }
      ex.base = earena.data();
      ex.table = etable.data();
      ex.per_seq = eper;
      ex.rows = ER;
      ex.heads = Hkv;
      ex.tile_bytes = etb;
      ex.packed_end = packed_end;
      ex.sinks = sinks;
      const int positions = min(sinks, maxvis) + max(0, maxvis - lo);
      ex.splits = max(1, min(64, (positions + 255) / 256));
    }
    // Record arenas of P slots per tile [keys Hkv × P × rbk | values Hkv × P × rbv], shuffled;
    // tiles holding no record a query reads are absent (−1).
    struct Paged {
      std::vector<unsigned char> arena;
      std::vector<int> table;
      TqTiles tt;
      long voff;
    };
    auto paged = [&](int P) {
      Paged pg;
      const int per_seq = (cap + P - 1) / P, n_tiles = B * per_seq + 3;
      const long tb = ((long)Hkv * P * (rbk + rbv) + 15) / 16 * 16;
      std::vector<int> order(n_tiles);
      for (int i = 0; i < n_tiles; ++i) order[i] = i;
      for (int i = n_tiles - 1; i > 0; --i) std::swap(order[i], order[next_u64() % (i + 1)]);
      pg.table.assign(B * per_seq, -1);
      pg.arena.resize((size_t)n_tiles * tb);
      for (auto& x : pg.arena) x = (unsigned char)next_u64();
      pg.voff = (long)Hkv * P * rbk;
      for (int b = 0; b < B; ++b)
        for (int l = 0; l < per_seq; ++l) {
          if ((l + 1) * P <= lo_rec || l * P >= rec_hi[b]) continue;
          const int tile = order[b * per_seq + l];
          pg.table[b * per_seq + l] = tile;
          for (int h = 0; h < Hkv; ++h)
            for (int s = l * P; s < min(cap, (l + 1) * P); ++s) {
              memcpy(&pg.arena[(size_t)tile * tb + ((size_t)h * P + s % P) * rbk],
                     &kc.data[(((size_t)b * Hkv + h) * cap + s) * rbk], rbk);
              memcpy(&pg.arena[(size_t)tile * tb + pg.voff + ((size_t)h * P + s % P) * rbv],
                     &vc.data[(((size_t)b * Hkv + h) * cap + s) * rbv], rbv);
            }
        }
      pg.tt = TqTiles{pg.table.data(), per_seq, P, tb, (long)P * rbk, tb, (long)P * rbv};
      return pg;
    };
    const Paged pages[2] = {paged(64), paged(7)};
    int status = 0;
    for (int kernel = 0; kernel < 2; ++kernel) {
      if (!tqkv_decode_attention_supported(kernel, ks.data(), vs.data(), cycle)) {
        printf("%-36s kernel %d: layout not taken (skipped)\n", argv[a], kernel);
        continue;
      }
      const double tol = kernel == 0 ? 1e-3 : 4e-3;
      // Plans: small chunks (many splits), and one split.
      const int chunks[2] = {kernel == 1 ? 64 : 50, max(64, (maxvis + 63) / 64 * 64)};
      for (int pi = 0; pi < 2; ++pi) {
        std::vector<float> plain;
        // Layouts: contiguous, then the tile tables of 64 and of 7 slots per tile.
        for (int layout = 0; layout < 3; ++layout) {
          const Paged* pg = layout == 0 ? nullptr : &pages[layout - 1];
          const uint8_t* kbase = pg ? pg->arena.data() : kc.data.data();
          const uint8_t* vbase = pg ? pg->arena.data() + pg->voff : vc.data.data();
          const int chunk = chunks[pi];
          const int splits = max(1, (max(1, maxvis) + chunk - 1) / chunk);
          const int total = splits + (has_exact ? ex.splits : 0);
          const long wsf = tqkv_decode_attention_workspace(kernel, &vs[0], cycle, B, Hq, Hkv, T, total);
          std::vector<float> ws(wsf, NAN), out(nq, NAN);
          const int rc = tqkv_decode_attention(kernel, q, qd, kbase, vbase, visible, kch, vch, ks.data(), vs.data(),
                                               cycle, B, Hq, Hkv, T, cap, pg ? &pg->tt : nullptr, scale, splits, chunk,
                                               has_exact ? &ex : nullptr, ws.data(), &status, out.data(), 0, nullptr);
          ++runs;
          if (rc != 0) {
            printf("%-36s kernel %d chunk %d: launcher returned %d\n", argv[a], kernel, chunk, rc);
            ++failures;
            continue;
          }
          double worst = 0;
          long bad_rows = 0;
          for (int b = 0; b < B; ++b)
            for (int hq = 0; hq < Hq; ++hq)
              for (int t = 0; t < T; ++t) {
                const long o = (((long)b * Hq + hq) * T + t) * d;
                double num = 0, den = 0;
                for (int j = 0; j < d; ++j) {
                  const double e = (double)out[o + j] - want[o + j];
                  num += e * e;
                  den += (double)want[o + j] * want[o + j];
                }
                double rel;
                if (visible[b * T + t] == 0) {
                  rel = num == 0 ? 0 : 1;  // expected zeros
                } else {
                  rel = sqrt(num / max(den, 1e-30));
                }
                if (!(rel <= tol)) {
                  if (bad_rows < 3)
                    printf("  row (b %d, head %d, t %d) sees %d: |want| %.3e |err| %.3e rel %.2e\n", b, hq, t,
                           visible[b * T + t], sqrt(den), sqrt(num), rel);
                  ++bad_rows;
                }
                worst = std::isnan(rel) ? INFINITY : max(worst, rel);
              }
          if (pi == 0 && layout == 0) {
            // The same plan with f16 output: the f32 output rounded, element for element.
            std::vector<__half> o16(nq, __float2half_rn(NAN));
            std::vector<float> ws2(wsf, NAN);
            const int rc2 = tqkv_decode_attention(kernel, q, qd, kbase, vbase, visible, kch, vch, ks.data(),
                                                  vs.data(), cycle, B, Hq, Hkv, T, cap, nullptr, scale, splits, chunk,
                                                  has_exact ? &ex : nullptr, ws2.data(), &status, o16.data(), 1,
                                                  nullptr);
            long diff = 0;
            for (long i = 0; i < nq; ++i) {
              const __half r = __float2half_rn(out[i]);
              diff += memcmp(&r, &o16[i], 2) != 0;
            }
            if (rc2 != 0 || diff != 0) {
              printf("%-36s kernel %d: f16 output differs from the rounded f32 output in %ld elements (rc %d)  FAIL\n",
                     argv[a], kernel, diff, rc2);
              ++failures;
            }
          }
          if (layout == 0) plain = out;
          bool same = true;
          if (layout > 0)
            for (long i = 0; i < nq; ++i) same &= memcmp(&out[i], &plain[i], 4) == 0;
          const bool ok = bad_rows == 0 && same;
          const char* names[3] = {"          ", " tiles 64 ", " tiles 7  "};
          printf("%-36s kernel %d chunk %4d splits %3d%s: max rel %.2e (tol %.0e)%s%s\n", argv[a], kernel, chunk,
                 splits, names[layout], worst, tol, same ? "" : " DIFFERS FROM CONTIGUOUS", ok ? "" : "  FAIL");
          if (!ok) ++failures;
        }
      }
    }
  }
  printf("%d runs, %d failures\n", runs, failures);
  return failures ? 1 : 0;
}
