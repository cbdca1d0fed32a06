// Shared by dion's benchmarks (bench/cuda_bench.cu, bench/cpu_bench.cpp): the shape sets of
// PERFORMANCE.md, the FLOP / byte model of each optimizer step, the floors of PERFORMANCE.md §1,
// order statistics and JSON-lines output. Backend-agnostic; no timing here.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

namespace dion_bench {

/// One kind of hidden matrix of a model: `count` matrices of rows × cols (nn.Linear.weight: out × in).
struct MatKind {
  std::string name;
  std::int64_t rows, cols, count;
};
struct ShapeSet {
  std::string name;
  std::vector<MatKind> kinds;
  std::int64_t params() const {
    std::int64_t n = 0;
    for (const auto& k : kinds) n += k.rows * k.cols * k.count;
    return n;
  }
  std::int64_t matrices() const {
    std::int64_t n = 0;
    for (const auto& k : kinds) n += k.count;
    return n;
  }
};

/// PERFORMANCE.md's shape sets, plus reduced ones for the CPU ("mini") and smoke runs ("tiny").
inline ShapeSet shape_set(const std::string& name) {
  const auto transformer = [&](std::int64_t d, std::int64_t layers, std::int64_t ff) {
    return ShapeSet{name, {{"qkvo", d, d, 4 * layers}, {"fc", ff, d, layers}, {"proj", d, ff, layers}}};
  };
  if (name == "gpt160m") return transformer(768, 12, 3072);
  if (name == "mini") return transformer(256, 4, 1024);
  if (name == "tiny") return transformer(64, 1, 256);
  if (name == "llama1b")
    return ShapeSet{name, {{"qo", 2048, 2048, 32}, {"kv", 512, 2048, 32}, {"gateup", 8192, 2048, 32}, {"down", 2048, 8192, 16}}};
  if (name == "llama8b")
    return ShapeSet{name,
                    {{"qo", 4096, 4096, 64}, {"kv", 1024, 4096, 64}, {"gateup", 14336, 4096, 64}, {"down", 4096, 14336, 32}}};
  std::fprintf(stderr, "unknown shape set %s\n", name.c_str());
  std::exit(2);
}

/// FLOPs of one Polar Express / Newton–Schulz orthogonalization (5 iterations) of an m×n matrix:
/// every product counted in full (20s²l + 10s³), or symmetric outputs once (15s²l + 5s³).
inline double ns_flops(double m, double n, bool symmetric = false) {
  const double s = std::min(m, n), l = std::max(m, n);
  return symmetric ? 5.0 * (3.0 * s * s * l + s * s * s) : 5.0 * (4.0 * s * s * l + 2.0 * s * s * s);
}

/// The model of one optimizer step (PERFORMANCE.md §1): FLOPs (full count), compulsory HBM bytes,
/// the GEMM rate that applies, and the floor (the larger of the two times).
struct Model {
  double flops = 0, flops_sym = 0, bytes = 0, rate = 785e12;
  double floor_ms(double bw = 3.02e12) const { return 1e3 * std::max(flops / rate, bytes / bw); }
  double floor_sym_ms(double bw = 3.02e12) const { return 1e3 * std::max(flops_sym / rate, bytes / bw); }
};

/// opt: muon, normuon, dion2, nordion2, dion (with rank fraction rf), lion, adamw. elem: bytes of a
/// parameter (4 fp32, 2 bf16; states default to the parameter's dtype).
inline Model step_model(const ShapeSet& set, const std::string& opt, int elem, double fraction = 0.25, double rf = 0.25) {
  Model md;
  const double P = static_cast<double>(set.params()), e = elem / 4.0;
  for (const auto& k : set.kinds) {
    const double m = static_cast<double>(k.rows), n = static_cast<double>(k.cols), c = static_cast<double>(k.count);
    if (opt == "muon" || opt == "normuon") {
      md.flops += c * ns_flops(m, n);
      md.flops_sym += c * ns_flops(m, n, true);
    } else if (opt == "dion2" || opt == "nordion2") {
      // the selected slices: rows (nordion2 always; dion2 when rows ≤ cols), else columns
      const bool rows = opt == "nordion2" || m <= n;
      const double kk = std::ceil(fraction * (rows ? m : n));
      md.flops += c * (rows ? ns_flops(kk, n) : ns_flops(m, kk));
      md.flops_sym += c * (rows ? ns_flops(kk, n, true) : ns_flops(m, kk, true));
    } else if (opt == "dion") {
      const double a = std::max(m, n), b = std::min(m, n);
      const double r = std::max(1.0, std::floor(rf * b));
      const double ks = std::ceil(1.25 * r / 128.0) * 128.0;
      md.flops += c * (8.0 * a * b * r + 4.0 * a * r * r + 2.0 * ks * r * r);
    }
  }
  if (opt != "dion") md.flops_sym = md.flops_sym > 0 ? md.flops_sym : md.flops;
  else md.flops_sym = md.flops;
  // element-wise bytes per parameter at fp32 (PERFORMANCE.md §1), scaled by the element size
  double bpp = 20;
  if (opt == "adamw") bpp = 28;
  else if (opt == "dion2" || opt == "nordion2") bpp = 24;
  else if (opt == "dion") bpp = 36;
  md.bytes = P * bpp * e;
  md.rate = (opt == "dion" && elem == 4) ? 51e12 : 785e12;  // Dion's GEMMs run in the state dtype (fp32: no TF32)
  return md;
}

/// The floors PERFORMANCE.md §1 tabulates (ms), where it has one; else -1.
inline double table_floor(const std::string& set, int elem, const std::string& opt, double rf) {
  struct Row {
    const char* set;
    int elem;
    double muon, dion2, dion1, dion4, dion16, adamw, lion;
  };
  static const Row rows[] = {{"gpt160m", 4, 2.07, 0.65, 14.9, 2.65, 0.97, 0.79, 0.57},
                             {"llama1b", 4, 57.9, 7.5, 467, 78.3, 17.2, 9.1, 6.5},
                             {"llama8b", 2, 843, 46, 2350, 198, 39.7, 32.6, 23.3}};
  for (const auto& r : rows) {
    if (set != r.set || elem != r.elem) continue;
    if (opt == "muon" || opt == "normuon") return r.muon;
    if (opt == "dion2") return r.dion2;
    if (opt == "adamw") return r.adamw;
    if (opt == "lion") return r.lion;
    if (opt == "dion") return rf >= 0.99 ? r.dion1 : rf >= 0.2 ? r.dion4 : r.dion16;
  }
  return -1;
}

struct Stats {
  double first_ms = 0, min_ms = 0, median_ms = 0, p90_ms = 0;
  int reps = 0;
};
inline Stats stats_of(std::vector<double> t, double first) {
  Stats s;
  s.first_ms = first;
  s.reps = static_cast<int>(t.size());
  if (t.empty()) return s;
  std::sort(t.begin(), t.end());
  s.min_ms = t.front();
  s.median_ms = t.size() % 2 ? t[t.size() / 2] : 0.5 * (t[t.size() / 2 - 1] + t[t.size() / 2]);
  s.p90_ms = t[std::min(t.size() - 1, static_cast<std::size_t>(std::ceil(0.9 * static_cast<double>(t.size()))) - 1)];
  return s;
}

/// A JSON object built field by field (numbers, strings, booleans).
class Json {
 public:
  Json& s(const std::string& k, const std::string& v) {
    add(k, "\"" + esc(v) + "\"");
    return *this;
  }
  Json& n(const std::string& k, double v, const char* f = "%.6g") {
    char buf[64];
    if (!std::isfinite(v)) std::snprintf(buf, sizeof buf, "null");
    else std::snprintf(buf, sizeof buf, f, v);
    add(k, buf);
    return *this;
  }
  Json& i(const std::string& k, long long v) {
    add(k, std::to_string(v));
    return *this;
  }
  Json& b(const std::string& k, bool v) {
    add(k, v ? "true" : "false");
    return *this;
  }
  Json& raw(const std::string& fields) {  // ",\"a\":1,..." fragments (the environment)
    body_ += fields;
    return *this;
  }
  Json& stats(const Stats& st) {
    return n("first_ms", st.first_ms).n("min_ms", st.min_ms).n("median_ms", st.median_ms).n("p90_ms", st.p90_ms).i("reps", st.reps);
  }
  std::string str() const { return "{" + (body_.empty() ? std::string() : body_.substr(1)) + "}"; }

 private:
  void add(const std::string& k, const std::string& v) { body_ += ",\"" + esc(k) + "\":" + v; }
  static std::string esc(const std::string& v) {
    std::string o;
    for (char c : v) {
      if (c == '"' || c == '\\') o += '\\';
      o += c;
    }
    return o;
  }
  std::string body_;
};

/// JSON lines to stdout and, if opened, a file.
struct Sink {
  FILE* f = nullptr;
  void emit(const Json& j) {
    const auto s = j.str();
    std::printf("%s\n", s.c_str());
    std::fflush(stdout);
    if (f) {
      std::fprintf(f, "%s\n", s.c_str());
      std::fflush(f);
    }
  }
};

/// Adds the model-derived figures of a timed step to `j`.
inline void add_model(Json& j, const Model& md, double median_ms, double floor_ms) {
  const double sec = median_ms * 1e-3;
  j.n("flops", md.flops).n("bytes", md.bytes);
  if (md.flops > 0) j.n("tflops_full_count", md.flops / sec / 1e12, "%.1f");
  j.n("gbs", md.bytes / sec / 1e9, "%.1f");
  j.n("floor_ms", floor_ms, "%.4g").n("fraction_of_floor", floor_ms / median_ms, "%.4f");
  if (md.flops_sym > 0 && md.flops_sym < md.flops)
    j.n("floor_sym_ms", md.floor_sym_ms(), "%.4g").n("fraction_of_sym_floor", md.floor_sym_ms() / median_ms, "%.4f");
}

}  // namespace dion_bench
