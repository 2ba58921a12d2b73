// Runs kernels/decode_attention.cu on the CPU (tq_emu.h) over the cases written by
// tests/emu_cases.rs and compares with the CPU reference's output they carry: both split
// kernels (the tensor-core one where it takes the layout), several split plans, the
// tensor-core kernel also through a shuffled tile table (bit-equal to its contiguous run).
// Outputs and workspace start poisoned (NaN), so an element a kernel fails to write fails.
//
//   scripts/emulate-kernels.sh (g++ -DTQ_EMU -I tests/emu -I kernels -I $CUDA_ROOT/include …)
#include "../../kernels/decode_attention.cu"

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
  sp.projected_norm = s[4];
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

int main(int argc, char** argv) {
  int failures = 0, runs = 0;
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
    TqExact ex{};
    if (has_exact) {
      ex.format = dm[11];
      if (ex.format == 1) {
        ex.kq = get(m, "ekq").as<uint8_t>();
        ex.kqs = get(m, "eks").as<__half>();
        ex.vq = get(m, "evq").as<uint8_t>();
        ex.vqs = get(m, "evs").as<__half>();
      } else {
        ex.k = get(m, "ek").as<__half>();
        ex.v = get(m, "ev").as<__half>();
      }
      ex.packed_end = packed_end;
      ex.sinks = sinks;
      ex.ring = ring;
      const int positions = min(sinks, maxvis) + max(0, maxvis - lo);
      ex.splits = max(1, min(64, (positions + 255) / 256));
    }
    // A shuffled pool of 64-slot tiles for the table runs.
    const int per_seq = (cap + TQ_TC_TILE - 1) / TQ_TC_TILE, n_tiles = B * per_seq + 3;
    std::vector<int> order(n_tiles);
    for (int i = 0; i < n_tiles; ++i) order[i] = i;
    for (int i = n_tiles - 1; i > 0; --i) std::swap(order[i], order[next_u64() % (i + 1)]);
    std::vector<int> table(order.begin(), order.begin() + B * per_seq);
    auto pool = [&](const Arr& c, int rb) {
      std::vector<unsigned char> p((size_t)n_tiles * Hkv * TQ_TC_TILE * rb);
      for (auto& x : p) x = (unsigned char)next_u64();
      for (int b = 0; b < B; ++b)
        for (int l = 0; l < per_seq; ++l)
          for (int h = 0; h < Hkv; ++h)
            for (int s = l * TQ_TC_TILE; s < min(cap, (l + 1) * TQ_TC_TILE); ++s)
              memcpy(&p[(((size_t)table[b * per_seq + l] * Hkv + h) * TQ_TC_TILE + s % TQ_TC_TILE) * rb],
                     &c.data[(((size_t)b * Hkv + h) * cap + s) * rb], rb);
      return p;
    };
    const auto kp = pool(kc, rbk), vp = pool(vc, rbv);
    const TqTiles tt{table.data(), per_seq, (long)Hkv * TQ_TC_TILE * rbk, (long)TQ_TC_TILE * rbk,
                     (long)Hkv * TQ_TC_TILE * rbv, (long)TQ_TC_TILE * rbv};
    int status = 0;
    std::vector<float> tc_plain;
    for (int kernel = 0; kernel < 2; ++kernel) {
      if (!tqkv_decode_attention_supported(kernel, ks.data(), vs.data(), cycle)) {
        printf("%-36s kernel %d: layout not taken (skipped)\n", argv[a], kernel);
        continue;
      }
      const double tol = kernel == 0 ? 1e-3 : 4e-3;
      // Plans: small chunks (many splits), and one split.
      const int chunks[2] = {kernel == 1 ? 64 : 50, max(64, (maxvis + 63) / 64 * 64)};
      for (int pi = 0; pi < 2; ++pi)
        for (int use_table = 0; use_table < (kernel == 1 ? 2 : 1); ++use_table) {
          const int chunk = chunks[pi];
          const int splits = max(1, (max(1, maxvis) + chunk - 1) / chunk);
          const int total = splits + (has_exact ? ex.splits : 0);
          const long wsf = tqkv_decode_attention_workspace(kernel, &vs[0], cycle, B, Hq, Hkv, T, total);
          std::vector<float> ws(wsf, NAN), out(nq, NAN);
          const int rc = tqkv_decode_attention(
              kernel, q, qd, use_table ? kp.data() : kc.data.data(), use_table ? vp.data() : vc.data.data(), visible,
              kch, vch, ks.data(), vs.data(), cycle, B, Hq, Hkv, T, cap, use_table ? &tt : nullptr, scale, splits,
              chunk, has_exact ? &ex : nullptr, ws.data(), &status, out.data(), 0, nullptr);
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
          if (pi == 0 && !use_table) {
            // The same plan with f16 output: the f32 output rounded, element for element.
            std::vector<__half> o16(nq, __float2half_rn(NAN));
            std::vector<float> ws2(wsf, NAN);
            const int rc2 = tqkv_decode_attention(kernel, q, qd, kc.data.data(), vc.data.data(), visible, kch, vch,
                                                  ks.data(), vs.data(), cycle, B, Hq, Hkv, T, cap, nullptr, scale,
                                                  splits, chunk, has_exact ? &ex : nullptr, ws2.data(), &status,
                                                  o16.data(), 1, nullptr);
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
          if (kernel == 1 && pi == 0 && !use_table) tc_plain = out;
          bool same = true;
          if (kernel == 1 && pi == 0 && use_table)
            for (long i = 0; i < nq; ++i) same &= memcmp(&out[i], &tc_plain[i], 4) == 0;
          const bool ok = bad_rows == 0 && same;
          printf("%-36s kernel %d chunk %4d splits %3d%s: max rel %.2e (tol %.0e)%s%s\n", argv[a], kernel, chunk,
                 splits, use_table ? " table" : "      ", worst, tol, same ? "" : " DIFFERS FROM CONTIGUOUS",
                 ok ? "" : "  FAIL");
          if (!ok) ++failures;
        }
    }
  }
  printf("%d runs, %d failures\n", runs, failures);
  return failures ? 1 : 0;
}
