// Optimizer checkpoints (dion/checkpoint/checkpoint.hpp; SPEC §4; RELIABILITY C1–C18, N4):
// exact resume for every optimizer, deterministic files, crash and disk-full safety, and the strong
// guarantee of load() on truncated, bit-flipped, incompatible and incomplete checkpoints.
#include "dion/checkpoint/checkpoint.hpp"

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "backend_env.hpp"
#include "../fuzz/fuzz_fixture.hpp"
#include "catch_compat.hpp"
#include "test_data.hpp"
#include "test_util.hpp"

namespace ck = dion::checkpoint;
namespace st = dion::safetensors;
namespace fs = std::filesystem;
using dion::Algorithm;
using dion::GroupOptions;
using dion::Options;
using dion::Shape;

namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

/// A fresh, empty directory under the temp dir, removed at scope exit.
struct TempDir {
  fs::path path;
  TempDir() {
    static int n = 0;
    path = fs::temp_directory_path() / ("dion-ckpt-test-" + std::to_string(::getpid()) + "-" + std::to_string(n++));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  fs::path operator/(const std::string& s) const { return path / s; }
};

std::vector<std::byte> read_file(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::vector<char> c((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  std::vector<std::byte> v(c.size());
  if (!c.empty()) std::memcpy(v.data(), c.data(), c.size());
  return v;
}
void write_file(const fs::path& p, std::span<const std::byte> b) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}
void write_text(const fs::path& p, const std::string& s) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f << s;
}
std::string read_text(const fs::path& p) {
  const auto b = read_file(p);
  return std::string(reinterpret_cast<const char*>(b.data()), b.size());
}
const std::string kRank0 = "rank-00000-of-00001.safetensors";

/// A small model: two same-shape tall matrices and a wide one in the default group, a bias in an
/// adamw group and a scale vector in a lion group; deterministic gradients per step.
template <class Opt, class B>
struct Model {
  dion_test::BackendEnv<B>& env;
  Opt opt;
  std::vector<std::string> names{"w1", "w2", "w3", "bias", "scale"};
  std::vector<Shape> shapes{{24, 16}, {16, 40}, {24, 16}, {16}, {8}};
  std::vector<dion_test::DeviceBuffer<float, B>> x, g;
  int nan_at = -1;  // step index whose gradient of w1 holds a NaN (skipped step)

  Model(dion_test::BackendEnv<B>& e, const Options& o, std::uint32_t seed = 3,
        const std::vector<std::vector<float>>* init = nullptr)
      : env(e), opt(e.backend(), o) {
    for (std::size_t i = 0; i < names.size(); ++i) {
      const auto n = static_cast<std::size_t>(shapes[i].numel());
      x.push_back(init ? e.upload((*init)[i]) : e.upload(dion_test::randn(n, seed * 31 + static_cast<std::uint32_t>(i), 0.1f)));
      g.push_back(e.template alloc<float>(n));
    }
    auto grp = opt.add_group();
    for (std::size_t i = 0; i < 3; ++i) grp.add(names[i], e.view(x[i], shapes[i]), e.view(g[i], shapes[i]));
    opt.add_group({.algorithm = Algorithm::adamw, .lr = 0.003f}).add("bias", e.view(x[3], shapes[3]), e.view(g[3], shapes[3]));
    opt.add_group({.algorithm = Algorithm::lion, .lr = 0.001f}).add("scale", e.view(x[4], shapes[4]), e.view(g[4], shapes[4]));
  }
  void step(int k) {
    for (std::size_t i = 0; i < names.size(); ++i) {
      auto v = dion_test::randn(static_cast<std::size_t>(shapes[i].numel()), 1000u + 17u * static_cast<std::uint32_t>(k) + static_cast<std::uint32_t>(i));
      if (k == nan_at && i == 0) v[5] = kNaN;
      env.write(g[i], v);
    }
    opt.step();
  }
  std::vector<std::vector<float>> params() {
    std::vector<std::vector<float>> r;
    for (auto& b : x) r.push_back(env.download(b));
    return r;
  }
};

/// Everything observable about an optimizer, for bitwise before/after comparisons.
template <class Opt>
struct Snapshot {
  std::map<std::string, std::vector<float>> state;
  std::vector<std::int64_t> steps;
  std::vector<float> lr, wd;
  std::int64_t skipped = 0;
  std::vector<std::byte> image;  // save_bytes: every tensor's bits and the metadata
  explicit Snapshot(Opt& o)
      : state(dion_test::state_snapshot(o)), steps(dion_test::step_counts(o)), skipped(o.skipped_steps()),
        image(ck::save_bytes(o)) {
    for (int gi = 0; gi < o.num_groups(); ++gi) {
      lr.push_back(o.lr(gi));
      wd.push_back(o.weight_decay(gi));
    }
  }
  bool operator==(const Snapshot& b) const {
    return dion_test::snapshots_equal(state, b.state) && steps == b.steps && dion_test::bits_equal(lr, b.lr) &&
           dion_test::bits_equal(wd, b.wd) && skipped == b.skipped && image == b.image;
  }
};

/// C1 / C16: N steps, save, load into a fresh optimizer (over a copy of the parameters), M steps ==
/// N+M uninterrupted steps, bitwise (parameters, every state tensor, counters, the whole file).
template <class Opt, class B>
void check_exact_resume(dion_test::BackendEnv<B>& env, const Options& o, const char* what, int n = 3, int m = 3) {
  INFO(what);
  TempDir dir;
  Model<Opt, B> a(env, o);
  a.nan_at = 1;
  for (int k = 0; k < n + m; ++k) {
    if (k == n) a.opt.set_lr(0, 0.5f * a.opt.lr(0));  // a schedule step just before the save point
    a.step(k);
  }

  Model<Opt, B> b(env, o);
  b.nan_at = 1;
  for (int k = 0; k < n; ++k) b.step(k);
  b.opt.set_lr(0, 0.5f * b.opt.lr(0));
  ck::save(b.opt, dir.path);
  const auto saved_params = b.params();

  Model<Opt, B> c(env, o, /*seed=*/99, &saved_params);  // the restarted process: fresh optimizer
  ck::load(c.opt, dir.path);
  CHECK(c.opt.skipped_steps() == 1);
  CHECK(dion_test::step_counts(c.opt) == dion_test::step_counts(b.opt));
  for (int k = n; k < n + m; ++k) c.step(k);

  const auto pa = a.params(), pc = c.params();
  for (std::size_t i = 0; i < pa.size(); ++i) {
    INFO("parameter " << a.names[i]);
    CHECK(dion_test::bits_equal(pa[i], pc[i]));
  }
  CHECK(Snapshot<Opt>(a.opt) == Snapshot<Opt>(c.opt));
}

template <class Opt>
void check_unchanged(Opt& opt, const std::function<void()>& f, const std::string& expect_substring) {
  const Snapshot<Opt> before(opt);
  bool threw = false;
  try {
    f();
  } catch (const dion::CheckpointError& e) {
    threw = true;
    INFO("message: " << e.what());
    CHECK_THAT(std::string(e.what()), DION_CONTAINS(expect_substring));
  }
  CHECK(threw);
  CHECK(Snapshot<Opt>(opt) == before);
}

/// A rank file image rebuilt from `img` with metadata edited by `edit` (checksums kept consistent).
std::vector<std::byte> remake(const std::vector<std::byte>& img,
                              const std::function<void(std::map<std::string, std::string>&, nlohmann::json&)>& edit,
                              const std::function<void(st::Writer&, const st::File&)>& tensors = {}) {
  const auto f = st::File::parse(std::span<const std::byte>(img));
  auto meta = f.metadata();
  auto state = nlohmann::json::parse(meta.at("dion.state"));
  edit(meta, state);
  st::Writer w;
  if (tensors) {
    tensors(w, f);
  } else {
    for (const auto& t : f.tensors()) w.add(t.name, t.dtype, t.shape, f.bytes(t));
  }
  const std::string text = state.dump();
  meta["dion.state"] = text;
  if (!meta.count("keep-crc")) meta["dion.state.crc32c"] = ck::crc_hex(ck::crc32c(text));
  meta.erase("keep-crc");
  for (const auto& [k, v] : meta) w.set_metadata(k, v);
  return w.to_bytes();
}

}  // namespace

// ================================================================================================

TEST_CASE("checkpoint: CRC32C check value and rank file names", "[checkpoint]") {
  CHECK(ck::crc32c(std::string_view("123456789")) == 0xE3069283u);
  CHECK(ck::crc32c(std::string_view("")) == 0u);
  CHECK(ck::crc32c(std::string_view("6789"), ck::crc32c(std::string_view("12345"))) == 0xE3069283u);
  CHECK(ck::crc_hex(0xE3069283u) == "e3069283");
  CHECK(ck::rank_file_name(0, 1) == kRank0);
  CHECK(ck::rank_file_name(3, 16) == "rank-00003-of-00016.safetensors");
}

TEMPLATE_TEST_CASE("checkpoint: exact resume, bitwise, for every optimizer (C1, C16)", "[checkpoint][resume]",
                   DION_TEST_BACKENDS) {
  using B = TestType;
  dion_test::BackendEnv<B> env;
  check_exact_resume<dion::Muon<B>>(env, {}, "muon");
  check_exact_resume<dion::Muon<B>>(env, {.cautious_wd = true, .nesterov = true}, "muon nesterov cautious");
  check_exact_resume<dion::NorMuon<B>>(env, {}, "normuon");
  check_exact_resume<dion::Dion2<B>>(env, {.fraction = 0.5}, "dion2");
  check_exact_resume<dion::NorDion2<B>>(env, {}, "nordion2");
  check_exact_resume<dion::Lion<B>>(env, {}, "lion");
  check_exact_resume<dion::AdamW<B>>(env, {}, "adamw");
  // Dion: Q, the random sketches (seeded by (seed, name, step)), and the AdamW group's device
  // step counter (restored by set_step_count), for every orthonormalization.
  check_exact_resume<dion::Dion<B>>(env, {.qr_method = dion::QrMethod::rcqr, .seed = 7}, "dion rcqr");
  check_exact_resume<dion::Dion<B>>(env, {.rank_fraction = 0.5, .qr_method = dion::QrMethod::qr}, "dion qr r/2");
  check_exact_resume<dion::Dion<B>>(env, {.qr_method = dion::QrMethod::cqr, .cqr_warmup_steps = 2},
                                    "dion cqr across the warmup boundary", 2, 4);
  check_exact_resume<dion::Dion<B>>(env, {.rank_fraction = 0.25, .power_iters = 2}, "dion r/4, 2 power iters");
  // bf16 state: raw BF16 tensors in the file (Q, momentum, variances)
  using SP = dion::SingleProcess;
  check_exact_resume<dion::Muon<B, SP, dion::precision::Bf16States>>(env, {}, "muon bf16 states");
  check_exact_resume<dion::Dion<B, SP, dion::precision::Bf16States>>(env, {}, "dion bf16 states");
}

TEMPLATE_TEST_CASE("checkpoint: Dion with an AdamW group resumes its bias correction (device step counter)",
                   "[checkpoint][resume][dion]", DION_TEST_BACKENDS) {
  using B = TestType;
  dion_test::BackendEnv<B> env;
  // Long enough that a counter restarting at t = 1 would change the AdamW update visibly.
  check_exact_resume<dion::Dion<B>>(env, {}, "dion + adamw", 5, 2);
  // Through the public API alone (the documented "own format" path): write_state + set_step_count.
  TempDir dir;
  Model<dion::Dion<B>, B> a(env, {}), b(env, {});
  for (int k = 0; k < 6; ++k) a.step(k);
  for (int k = 0; k < 4; ++k) b.step(k);
  const auto pb = b.params();
  Model<dion::Dion<B>, B> c(env, {}, 5, &pb);
  for (const auto& s : b.opt.state()) c.opt.write_state(s.name, b.opt.read_state(s.name));
  for (int g = 0; g < b.opt.num_groups(); ++g) c.opt.set_step_count(g, b.opt.step_count(g));
  for (int k = 4; k < 6; ++k) c.step(k);
  const auto pa = a.params(), pc = c.params();
  for (std::size_t i = 0; i < pa.size(); ++i) {
    INFO("parameter " << a.names[i]);
    CHECK(dion_test::bits_equal(pa[i], pc[i]));
  }
}

TEMPLATE_TEST_CASE("checkpoint: save -> load -> save gives byte-identical files (C2); edge cases (C17)",
                   "[checkpoint]", DION_TEST_BACKENDS) {
  using B = TestType;
  dion_test::BackendEnv<B> env;
  TempDir d1, d2, d3;
  Model<dion::Dion<B>, B> a(env, {.rank_fraction = 0.5});
  // C17: save at step 0 (state as registered: zeros and the initial Q), load it back
  ck::save(a.opt, d1 / "step0");
  {
    Model<dion::Dion<B>, B> z(env, {.rank_fraction = 0.5});
    ck::load(z.opt, d1 / "step0");
    CHECK(Snapshot<dion::Dion<B>>(z.opt) == Snapshot<dion::Dion<B>>(a.opt));
  }
  for (int k = 0; k < 3; ++k) a.step(k);
  ck::save(a.opt, d1 / "c");
  Model<dion::Dion<B>, B> b(env, {.rank_fraction = 0.5}, 8);
  ck::load(b.opt, d1 / "c");
  ck::save(b.opt, d2 / "c");  // immediate load-then-save
  CHECK(read_file(d1 / "c" / kRank0) == read_file(d2 / "c" / kRank0));
  CHECK(read_file(d1 / "c" / "manifest.json") == read_file(d2 / "c" / "manifest.json"));
  // the same state saved twice, and saved over an existing checkpoint: identical bytes
  ck::save(b.opt, d2 / "c");
  CHECK(read_file(d1 / "c" / kRank0) == read_file(d2 / "c" / kRank0));
  // saving "in the middle of gradient accumulation": gradients are not optimizer state
  a.env.write(a.g[0], dion_test::randn(24 * 16, 4242));
  ck::save(a.opt, d3 / "c");
  CHECK(read_file(d1 / "c" / kRank0) == read_file(d3 / "c" / kRank0));
  // The directory holds exactly the checkpoint's files (no temp files, no staging directory).
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(d2.path)) files.push_back(e.path().filename().string());
  CHECK(files == std::vector<std::string>{"c"});
  files.clear();
  for (const auto& e : fs::directory_iterator(d2 / "c")) files.push_back(e.path().filename().string());
  std::sort(files.begin(), files.end());
  CHECK(files == std::vector<std::string>{"manifest.json", kRank0});
}

TEMPLATE_TEST_CASE("checkpoint: the rank file is plain safetensors with documented metadata", "[checkpoint]",
                   DION_TEST_BACKENDS) {
  using B = TestType;
  dion_test::BackendEnv<B> env;
  using Opt = dion::Muon<B, dion::SingleProcess, dion::precision::Bf16States>;
  Model<Opt, B> a(env, {});
  a.step(0);
  TempDir dir;
  ck::save(a.opt, dir / "c");
  const auto f = st::File::load(dir / "c" / kRank0);
  CHECK(f.metadata("format") == std::optional<std::string>("dion.checkpoint"));
  CHECK(f.metadata("format_version") == std::optional<std::string>("1.0"));
  CHECK(f.dtype("w1/momentum") == st::Dtype::BF16);
  CHECK(f.shape("w2/momentum") == std::vector<std::int64_t>{16, 40});
  CHECK(f.dtype("bias/step_dev") == st::Dtype::F32);
  CHECK(f.shape("bias/step_dev").empty());
  const auto state = nlohmann::json::parse(*f.metadata("dion.state"));
  CHECK(state["optimizer"] == "muon");
  CHECK(state["layout"]["world_size"] == 1);
  CHECK(state["groups"].size() == 3);
  CHECK(state["groups"][1]["algorithm"] == "adamw");
  CHECK(state["groups"][1]["step"] == 1);
  CHECK(state["groups"][0]["hyperparameters"]["seed"] == 0);
  CHECK(state["params"]["w2"]["shard"]["dim"] == 0);
  CHECK(state["tensors"]["w1/momentum"]["crc32c"] == ck::crc_hex(ck::crc32c(f.bytes("w1/momentum"))));
  const auto m = ck::read_manifest(dir / "c");
  CHECK(m.world_size == 1);
  CHECK(m.files.at(0).name == kRank0);
  CHECK(m.files.at(0).crc32c == ck::crc32c(f.buffer()));
  // Every state tensor is in the file, by its stable name, and nothing else is.
  std::vector<std::string> names;
  for (const auto& s : a.opt.state()) names.push_back(s.name);
  std::sort(names.begin(), names.end());
  CHECK(f.sorted_names() == names);
}

// ------------------------------------------------------------------------------------------------
// Strong guarantee on bad input

TEMPLATE_TEST_CASE("checkpoint: truncation at every prefix length is rejected, state unchanged (C5)",
                   "[checkpoint][corrupt]", DION_TEST_BACKENDS) {
  using B = TestType;
  dion_test::BackendEnv<B> env;
  Model<dion::Dion<B>, B> a(env, {.rank_fraction = 0.5});
  for (int k = 0; k < 2; ++k) a.step(k);
  const auto img = ck::save_bytes(a.opt);
  Model<dion::Dion<B>, B> b(env, {.rank_fraction = 0.5}, 5);
  b.step(0);
  const Snapshot<dion::Dion<B>> before(b.opt);
  for (std::size_t n = 0; n < img.size(); ++n) {
    INFO("prefix " << n << " of " << img.size());
    REQUIRE_THROWS_AS(ck::load_bytes(b.opt, std::span<const std::byte>(img.data(), n)), dion::CheckpointError);
  }
  CHECK(Snapshot<dion::Dion<B>>(b.opt) == before);
  // Through the directory: the manifest's size names the truncation.
  TempDir dir;
  ck::save(a.opt, dir / "c");
  for (const std::size_t n : {std::size_t{0}, std::size_t{7}, std::size_t{100}, img.size() / 2, img.size() - 1}) {
    write_file(dir / "c" / kRank0, std::span<const std::byte>(img.data(), n));
    check_unchanged(b.opt, [&] { ck::load(b.opt, dir / "c"); }, "truncated");
  }
}

TEMPLATE_TEST_CASE("checkpoint: single-bit flips in header and payload are detected, state unchanged (C6)",
                   "[checkpoint][corrupt]", DION_TEST_BACKENDS) {
  using B = TestType;
  dion_test::BackendEnv<B> env;
  using Opt = dion::NorMuon<B>;
  Model<Opt, B> a(env, {});
  for (int k = 0; k < 2; ++k) a.step(k);
  TempDir dir;
  ck::save(a.opt, dir / "c");
  const auto img = read_file(dir / "c" / kRank0);
  const auto hdr = st::parse_header(img);
  const std::size_t data0 = static_cast<std::size_t>(hdr.data_offset);
  Model<Opt, B> b(env, {}, 5);
  b.step(0);
  const Snapshot<Opt> before(b.opt);
  // Every bit of the length prefix and the header, through load_bytes (no manifest: the file's own
  // structure and checksums must catch it) ...
  std::size_t caught = 0, flips = 0;
  for (std::size_t i = 0; i < data0; ++i) {
    for (int bit = 0; bit < 8; ++bit) {
      auto m = img;
      m[i] ^= static_cast<std::byte>(1u << bit);
      ++flips;
      try {
        ck::load_bytes(b.opt, m);
        const auto* c = reinterpret_cast<const char*>(img.data());
        UNSCOPED_INFO("flip not detected at byte " << i << " bit " << bit << ": ..."
                      << std::string(c + (i > 40 ? i - 40 : 0), c + std::min(i + 40, data0)) << "...");
      } catch (const dion::CheckpointError&) {
        ++caught;
      }
    }
  }
  CHECK(caught == flips);
  // ... and every 97th payload byte, each bit, through load_bytes: the tensor is named.
  for (std::size_t i = data0; i < img.size(); i += 97) {
    for (int bit = 0; bit < 8; bit += 3) {
      auto m = img;
      m[i] ^= static_cast<std::byte>(1u << bit);
      const auto off = i - data0;
      std::string name;
      for (const auto& t : hdr.tensors)
        if (off >= t.begin && off < t.end) name = t.name;
      check_unchanged(b.opt, [&] { ck::load_bytes(b.opt, m); }, "checksum mismatch in tensor '" + name + "'");
    }
  }
  // Through the directory (manifest + whole-file checksum) on a sample of header and payload bits.
  for (std::size_t i = 0; i < img.size(); i += 61) {
    auto m = img;
    m[i] ^= std::byte{0x10};
    write_file(dir / "c" / kRank0, m);
    INFO("byte " << i);
    check_unchanged(b.opt, [&] { ck::load(b.opt, dir / "c"); }, "");
  }
  // A flip in the manifest's checksum
  write_file(dir / "c" / kRank0, img);
  auto man = read_text(dir / "c" / "manifest.json");
  const auto pos = man.find("\"crc32c\": \"") + 11;
  man[pos] = man[pos] == '0' ? '1' : '0';
  write_text(dir / "c" / "manifest.json", man);
  check_unchanged(b.opt, [&] { ck::load(b.opt, dir / "c"); }, "checksum mismatch of the whole rank file");
  CHECK(Snapshot<Opt>(b.opt) == before);
}

TEMPLATE_TEST_CASE("checkpoint: wrong format, future version, unknown dtype, wrong endianness (C7)",
                   "[checkpoint][incompatible]", DION_TEST_BACKENDS) {
  using B = TestType;
  dion_test::BackendEnv<B> env;
  using Opt = dion::Muon<B>;
  Model<Opt, B> a(env, {});
  a.step(0);
  const auto img = ck::save_bytes(a.opt);
  Model<Opt, B> b(env, {}, 5);
  b.step(0);
  auto incompatible = [&](const std::vector<std::byte>& m, const std::string& sub) {
    const Snapshot<Opt> before(b.opt);
    REQUIRE_THROWS_AS(ck::load_bytes(b.opt, m), dion::CheckpointIncompatible);
    REQUIRE_THROWS_WITH(ck::load_bytes(b.opt, m), DION_CONTAINS(sub));
    CHECK(Snapshot<Opt>(b.opt) == before);
  };
  SECTION("format magic") {
    incompatible(remake(img, [](auto& meta, auto&) { meta["format"] = "other.format"; }), "'other.format'");
    incompatible(remake(img, [](auto& meta, auto&) { meta.erase("format"); }), "not a dion checkpoint");
    incompatible(remake(img, [](auto&, auto& s) { s["format"] = "nope"; }), "'nope'");
  }
  SECTION("future major version: found vs supported") {
    incompatible(remake(img, [](auto& meta, auto&) { meta["format_version"] = "2.0"; }), "version 2.0");
    incompatible(remake(img, [](auto&, auto& s) { s["format_version"] = "7.3"; }), "reads version 1.x");
  }
  SECTION("a newer minor version is accepted") {
    const auto m = remake(img, [](auto& meta, auto& s) {
      meta["format_version"] = "1.9";
      s["format_version"] = "1.9";
    });
    ck::load_bytes(b.opt, m);
    CHECK(Snapshot<Opt>(b.opt) == Snapshot<Opt>(a.opt));
  }
  SECTION("unknown dtype tag") {
    std::string h(reinterpret_cast<const char*>(img.data()) + 8, static_cast<std::size_t>(st::parse_header(img).header_bytes));
    const auto p = h.find("\"F32\"");
    REQUIRE(p != std::string::npos);
    auto m = img;
    std::memcpy(m.data() + 8 + p, "\"F31\"", 5);
    incompatible(m, "unknown dtype 'F31'");
  }
  SECTION("wrong endianness (big-endian length prefix)") {
    auto m = img;
    std::reverse(m.begin(), m.begin() + 8);
    REQUIRE_THROWS_AS(ck::load_bytes(b.opt, m), dion::CheckpointError);
    REQUIRE_THROWS_WITH(ck::load_bytes(b.opt, m), DION_CONTAINS("header length"));
  }
  SECTION("manifest version and format") {
    TempDir dir;
    ck::save(a.opt, dir / "c");
    const auto man = read_text(dir / "c" / "manifest.json");
    auto edit = [&](const std::string& from, const std::string& to) {
      auto t = man;
      t.replace(t.find(from), from.size(), to);
      write_text(dir / "c" / "manifest.json", t);
    };
    edit("\"format_version\": \"1.0\"", "\"format_version\": \"3.1\"");
    const Snapshot<Opt> before(b.opt);
    REQUIRE_THROWS_AS(ck::load(b.opt, dir / "c"), dion::CheckpointIncompatible);
    REQUIRE_THROWS_WITH(ck::load(b.opt, dir / "c"), DION_CONTAINS("format version 3.1"));
    edit("\"format\": \"dion.checkpoint\"", "\"format\": \"torch.dcp\"");
    REQUIRE_THROWS_AS(ck::load(b.opt, dir / "c"), dion::CheckpointIncompatible);
    edit("\"checksum\": \"crc32c\"", "\"checksum\": \"sha256\"");
    REQUIRE_THROWS_WITH(ck::load(b.opt, dir / "c"), DION_CONTAINS("sha256"));
    CHECK(Snapshot<Opt>(b.opt) == before);
  }
}

TEMPLATE_TEST_CASE("checkpoint: optimizer, algorithm, group, shape, dtype and key mismatches (C8, C16)",
                   "[checkpoint][incompatible]", DION_TEST_BACKENDS) {
  using B = TestType;
  dion_test::BackendEnv<B> env;
  TempDir dir;
  Model<dion::Muon<B>, B> muon(env, {});
  muon.step(0);
  ck::save(muon.opt, dir / "muon");
  const auto img = ck::save_bytes(muon.opt);

  SECTION("Muon checkpoint into Dion") {
    Model<dion::Dion<B>, B> d(env, {});
    d.step(0);
    check_unchanged(d.opt, [&] { ck::load(d.opt, dir / "muon"); }, "optimizer mismatch");
    check_unchanged(d.opt, [&] { ck::load_bytes(d.opt, img); }, "was saved by a 'muon' optimizer, this one is 'dion'");
  }
  SECTION("64x128 into 128x64") {
    dion::Muon<B> o1{env.backend()}, o2{env.backend()};
    auto x1 = env.template alloc<float>(64 * 128), x2 = env.template alloc<float>(64 * 128);
    o1.add_group().add("w", env.view(x1, {64, 128}));
    o2.add_group().add("w", env.view(x2, {128, 64}));
    const auto m = ck::save_bytes(o1);
    check_unchanged(o2, [&] { ck::load_bytes(o2, m); }, "parameter 'w' shape mismatch: checkpoint [64,128], optimizer [128,64]");
  }
  SECTION("group count, group algorithm, parameter names and count") {
    dion::Muon<B> o{env.backend()};
    auto x1 = env.template alloc<float>(24 * 16);
    o.add_group().add("w1", env.view(x1, {24, 16}));
    check_unchanged(o, [&] { ck::load_bytes(o, img); }, "group count mismatch: the checkpoint has 3 groups, the optimizer 1");

    Model<dion::Muon<B>, B> swapped(env, {});
    // same names, lion and adamw groups exchanged
    dion::Muon<B> s{env.backend()};
    auto ys = std::vector<dion_test::DeviceBuffer<float, B>>{};
    for (const auto& sh : swapped.shapes) ys.push_back(env.template alloc<float>(static_cast<std::size_t>(sh.numel())));
    auto g0 = s.add_group();
    for (std::size_t i = 0; i < 3; ++i) g0.add(swapped.names[i], env.view(ys[i], swapped.shapes[i]));
    s.add_group({.algorithm = Algorithm::lion}).add("bias", env.view(ys[3], swapped.shapes[3]));
    s.add_group({.algorithm = Algorithm::adamw}).add("scale", env.view(ys[4], swapped.shapes[4]));
    check_unchanged(s, [&] { ck::load_bytes(s, img); }, "group 1 algorithm mismatch: checkpoint 'adamw', optimizer 'lion'");

    dion::Muon<B> r{env.backend()};
    auto g1 = r.add_group();
    g1.add("w1", env.view(ys[0], swapped.shapes[0])).add("w2", env.view(ys[1], swapped.shapes[1]))
        .add("renamed", env.view(ys[2], swapped.shapes[2]));
    r.add_group({.algorithm = Algorithm::adamw}).add("bias", env.view(ys[3], swapped.shapes[3]));
    r.add_group({.algorithm = Algorithm::lion}).add("scale", env.view(ys[4], swapped.shapes[4]));
    check_unchanged(r, [&] { ck::load_bytes(r, img); }, "group 0 parameter 2 mismatch: checkpoint 'w3', optimizer 'renamed'");
  }
  SECTION("state dtype (bf16 states into an fp32-state optimizer)") {
    Model<dion::Muon<B, dion::SingleProcess, dion::precision::Bf16States>, B> bf(env, {});
    bf.step(0);
    check_unchanged(muon.opt, [&] { ck::load_bytes(muon.opt, ck::save_bytes(bf.opt)); },
                    "state tensor 'w1/momentum' dtype mismatch: checkpoint BF16, optimizer F32");
  }
  SECTION("missing and extra state tensors") {
    const auto missing = remake(img, [](auto&, auto& s) { s["tensors"].erase("w2/momentum"); },
                                [](st::Writer& w, const st::File& f) {
                                  for (const auto& t : f.tensors())
                                    if (t.name != "w2/momentum") w.add(t.name, t.dtype, t.shape, f.bytes(t));
                                });
    check_unchanged(muon.opt, [&] { ck::load_bytes(muon.opt, missing); }, "missing state tensor 'w2/momentum'");
    const std::vector<float> extra_v(3, 1.0f);
    const auto extra = remake(
        img, [&](auto&, auto& s) { s["tensors"]["w2/extra"]["crc32c"] = ck::crc_hex(ck::crc32c(std::as_bytes(std::span<const float>(extra_v)))); },
        [&](st::Writer& w, const st::File& f) {
          for (const auto& t : f.tensors()) w.add(t.name, t.dtype, t.shape, f.bytes(t));
          w.add_f32("w2/extra", {3}, extra_v);
        });
    check_unchanged(muon.opt, [&] { ck::load_bytes(muon.opt, extra); }, "unexpected state tensor 'w2/extra'");
    // a tensor in the file without a checksum, and a checksum without a tensor
    const auto nocrc = remake(img, [](auto&, auto& s) { s["tensors"].erase("w1/momentum"); });
    check_unchanged(muon.opt, [&] { ck::load_bytes(muon.opt, nocrc); }, "has no checksum");
  }
  SECTION("hyperparameters: structural ones always, the others unless keep_current; lr and wd restored") {
    Model<dion::Muon<B>, B> other(env, {.mu = 0.9f});
    check_unchanged(other.opt, [&] { ck::load_bytes(other.opt, img); }, "hyperparameter 'mu' mismatch: checkpoint 0.949999988, optimizer 0.899999976");
    ck::load_bytes(other.opt, img, {.hyperparameters = ck::HyperparameterCheck::keep_current});
    CHECK(other.opt.options(0).mu == 0.9f);
    CHECK(dion_test::snapshots_equal(dion_test::state_snapshot(other.opt), dion_test::state_snapshot(muon.opt)));

    Model<dion::Muon<B>, B> seeded(env, {.seed = 5});
    check_unchanged(seeded.opt, [&] { ck::load_bytes(seeded.opt, img); }, "hyperparameter 'seed' mismatch");

    Model<dion::Dion2<B>, B> d2a(env, {.fraction = 0.5}), d2b(env, {.fraction = 0.25});
    d2a.step(0);
    const auto d2img = ck::save_bytes(d2a.opt);
    check_unchanged(d2b.opt,
                    [&] { ck::load_bytes(d2b.opt, d2img, {.hyperparameters = ck::HyperparameterCheck::keep_current}); },
                    "hyperparameter 'fraction' mismatch");

    Model<dion::Muon<B>, B> lr(env, {});
    lr.opt.set_lr(0, 0.125f);
    lr.opt.set_weight_decay(2, 0.5f);
    ck::load_bytes(lr.opt, img);
    CHECK(lr.opt.lr(0) == muon.opt.lr(0));
    CHECK(lr.opt.weight_decay(2) == muon.opt.weight_decay(2));
    lr.opt.set_lr(0, 0.125f);
    ck::load_bytes(lr.opt, img, {.restore_lr_wd = false});
    CHECK(lr.opt.lr(0) == 0.125f);
  }
  SECTION("layout: a rank file of another world size (C12)") {
    const auto w4 = remake(img, [](auto&, auto& s) {
      s["layout"]["world_size"] = 4;
      s["layout"]["rank"] = 2;
    });
    check_unchanged(muon.opt, [&] { ck::load_bytes(muon.opt, w4); }, "saved at world size 4 (rank 2)");
    const auto bad = remake(img, [](auto&, auto& s) { s["layout"]["rank"] = 1; });
    check_unchanged(muon.opt, [&] { ck::load_bytes(muon.opt, bad); }, "rank = 1 is out of range [0, 0]");
  }
  SECTION("corrupt metadata with consistent checksums is refused by the schema") {
    const auto neg = remake(img, [](auto&, auto& s) { s["groups"][0]["step"] = -3; });
    check_unchanged(muon.opt, [&] { ck::load_bytes(muon.opt, neg); }, "step = -3 is out of range");
    const auto nan = remake(img, [](auto&, auto& s) { s["groups"][0]["hyperparameters"]["lr"] = "fast"; });
    check_unchanged(muon.opt, [&] { ck::load_bytes(muon.opt, nan); }, "lr must be a number");
    const auto deep = remake(img, [](auto&, auto& s) {
      nlohmann::json j = 1;
      for (int i = 0; i < 50; ++i) j = nlohmann::json::array({j});
      s["deep"] = j;
    });
    check_unchanged(muon.opt, [&] { ck::load_bytes(muon.opt, deep); }, "nesting");
    const auto badcrc = remake(img, [](auto& meta, auto& s) {
      s["skipped_steps"] = 7;
      meta["keep-crc"] = "1";
    });
    check_unchanged(muon.opt, [&] { ck::load_bytes(muon.opt, badcrc); }, "checksum mismatch in the rank file's 'dion.state'");
  }
}

TEMPLATE_TEST_CASE("checkpoint: incomplete checkpoints (manifest missing, rank file missing) (C15)",
                   "[checkpoint][corrupt]", DION_TEST_BACKENDS) {
  using B = TestType;
  dion_test::BackendEnv<B> env;
  using Opt = dion::Lion<B>;
  Model<Opt, B> a(env, {});
  a.step(0);
  TempDir dir;
  ck::save(a.opt, dir / "c");
  Model<Opt, B> b(env, {}, 4);
  const auto man = read_text(dir / "c" / "manifest.json");
  fs::remove(dir / "c" / "manifest.json");
  check_unchanged(b.opt, [&] { ck::load(b.opt, dir / "c"); }, "incomplete checkpoint");
  write_text(dir / "c" / "manifest.json", man);
  fs::remove(dir / "c" / kRank0);
  check_unchanged(b.opt, [&] { ck::load(b.opt, dir / "c"); }, "names 'rank-00000-of-00001.safetensors', which is missing");
  // A two-rank manifest listing one file
  auto two = man;
  two.replace(two.find("\"world_size\": 1"), 15, "\"world_size\": 2");
  write_text(dir / "c" / "manifest.json", two);
  check_unchanged(b.opt, [&] { ck::load(b.opt, dir / "c"); }, "lists 1 rank files for world size 2");
  CHECK_THROWS_AS(ck::load(b.opt, dir / "does-not-exist"), dion::IoError);
  CHECK_THROWS_AS(ck::parse_manifest("{\"format\": "), dion::CheckpointError);
  CHECK_THROWS_AS(ck::parse_manifest("[]"), dion::CheckpointError);
}

TEMPLATE_TEST_CASE("checkpoint: disk full or I/O error during save leaves the previous checkpoint (C18)",
                   "[checkpoint][io]", DION_TEST_BACKENDS) {
  using B = TestType;
  dion_test::BackendEnv<B> env;
  using Opt = dion::Dion<B>;
  Model<Opt, B> a(env, {});
  a.step(0);
  TempDir dir;
  ck::save(a.opt, dir / "c");
  const auto old_rank = read_file(dir / "c" / kRank0);
  const auto old_man = read_file(dir / "c" / "manifest.json");
  a.step(1);
  const auto size = ck::save_bytes(a.opt).size();
  for (const int err : {ENOSPC, EIO}) {
    for (const std::uint64_t after : {std::uint64_t{0}, std::uint64_t{1}, std::uint64_t{8}, std::uint64_t{size / 2},
                                      std::uint64_t{size - 1}}) {
      INFO("errno " << err << " after " << after << " bytes");
      ck::SaveOptions so;
      so.decorate_rank_file = [&](st::Sink& s) { return std::make_unique<st::FaultInjectionSink>(s, after, err); };
      REQUIRE_THROWS_AS(ck::save(a.opt, dir / "c", so), dion::IoError);
      CHECK(read_file(dir / "c" / kRank0) == old_rank);
      CHECK(read_file(dir / "c" / "manifest.json") == old_man);
      std::size_t entries = 0;
      for (const auto& e : fs::directory_iterator(dir.path)) entries += e.path().filename() == "c" ? 0 : 1;
      CHECK(entries == 0);  // no staging directory left behind
    }
  }
  // the old checkpoint still loads; a new save then succeeds
  Model<Opt, B> b(env, {}, 6);
  ck::load(b.opt, dir / "c");
  CHECK(b.opt.step_count(0) == 1);
  ck::save(a.opt, dir / "c");
  ck::load(b.opt, dir / "c");
  CHECK(b.opt.step_count(0) == 2);
  // save() refuses to replace a directory that holds other files, and a file
  write_text(dir / "c" / "notes.txt", "mine");
  CHECK_THROWS_AS(ck::save(a.opt, dir / "c"), dion::InvalidArgument);
  CHECK(read_text(dir / "c" / "notes.txt") == "mine");
  write_text(dir / "plain", "x");
  CHECK_THROWS_AS(ck::save(a.opt, dir / "plain"), dion::InvalidArgument);
  CHECK_THROWS_AS(ck::save(a.opt, dir / "no" / "such" / "parent"), dion::IoError);
}

TEMPLATE_TEST_CASE("checkpoint: a process killed during save leaves the previous checkpoint loadable (C3)",
                   "[checkpoint][io][crash]", DION_TEST_BACKENDS) {
  using B = TestType;
  if (std::string_view(B::name) != "eigen") {
    // A forked child cannot use its parent's CUDA context; what is tested is the filesystem
    // protocol, which does not depend on the backend (the Eigen run covers it).
    WARN("skipped on the " << B::name << " backend: a forked child cannot use the parent's device context");
    return;
  }
  dion_test::BackendEnv<B> env;
  using Opt = dion::Muon<B>;
  Model<Opt, B> a(env, {});
  a.step(0);
  TempDir dir;
  ck::save(a.opt, dir / "c");
  const auto old_rank = read_file(dir / "c" / kRank0);
  a.step(1);
  const auto size = ck::save_bytes(a.opt).size();
  for (const std::uint64_t kill_at : {std::uint64_t{0}, std::uint64_t{5}, std::uint64_t{size / 3}, std::uint64_t{size}}) {
    INFO("killed after " << kill_at << " bytes");
    std::fflush(nullptr);
    const pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      // The child dies like kill -9 at that byte (no unwinding, no cleanup); at `size` it dies after
      // the whole rank file was written, before the manifest and the publish.
      ck::SaveOptions so;
      struct Die final : st::Sink {
        st::Sink& in;
        std::uint64_t left;
        Die(st::Sink& s, std::uint64_t n) : in(s), left(n) {}
        void write(std::span<const std::byte> b) override {
          if (b.size() >= left) {
            if (left) in.write(b.first(static_cast<std::size_t>(left)));
            ::_exit(9);
          }
          in.write(b);
          left -= b.size();
        }
      };
      so.decorate_rank_file = [&](st::Sink& s) { return std::make_unique<Die>(s, kill_at); };
      try {
        ck::save(a.opt, dir / "c", so);
      } catch (...) {
      }
      ::_exit(0);
    }
    int status = 0;
    REQUIRE(::waitpid(pid, &status, 0) == pid);
    REQUIRE(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 9);
    CHECK(read_file(dir / "c" / kRank0) == old_rank);
    Model<Opt, B> b(env, {}, 6);
    ck::load(b.opt, dir / "c");  // a stale staging directory next to it is ignored
    CHECK(b.opt.step_count(0) == 1);
  }
  std::size_t stale = 0;
  for (const auto& e : fs::directory_iterator(dir.path)) stale += e.path().filename() == "c" ? 0 : 1;
  CHECK(stale > 0);
  ck::save(a.opt, dir / "c");  // cleans up the dead processes' staging directories
  stale = 0;
  for (const auto& e : fs::directory_iterator(dir.path)) stale += e.path().filename() == "c" ? 0 : 1;
  CHECK(stale == 0);
}

// ------------------------------------------------------------------------------------------------
// Non-finite gradients and checkpoints (N4 beyond test_validation.cpp: every optimizer variant's
// complete state, as the bytes a checkpoint would hold, and the skip counter's round trip)

TEMPLATE_TEST_CASE("checkpoint: a skipped step (NaN or Inf gradient) leaves every byte of the state unchanged (N4, N5)",
                   "[checkpoint][nonfinite]", DION_TEST_BACKENDS) {
  using B = TestType;
  dion_test::BackendEnv<B> env;
  auto run = [&]<class Opt>(const Options& o, const char* what) {
    for (const float bad : {kNaN, std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity()}) {
      INFO(what << ", bad value " << bad);
      Model<Opt, B> m(env, o);
      m.step(0);
      m.step(1);
      const auto img = ck::save_bytes(m.opt);
      const auto params = m.params();
      for (std::size_t which = 0; which < m.names.size(); ++which) {
        auto v = dion_test::randn(static_cast<std::size_t>(m.shapes[which].numel()), 77);
        v.back() = bad;
        for (std::size_t i = 0; i < m.names.size(); ++i)
          m.env.write(m.g[i], i == which ? v : dion_test::randn(static_cast<std::size_t>(m.shapes[i].numel()), 78));
        m.opt.step();
        CHECK(m.opt.last_step_skipped());
      }
      CHECK(m.opt.skipped_steps() == static_cast<std::int64_t>(m.names.size()));
      // Everything but the skip counter is byte-identical: compare with the counter reset.
      Model<Opt, B> r(m.env, o, 9);
      ck::load_bytes(r.opt, ck::save_bytes(m.opt));
      CHECK(r.opt.skipped_steps() == static_cast<std::int64_t>(m.names.size()));
      m.opt.set_skipped_steps(0);
      CHECK(ck::save_bytes(m.opt) == img);
      const auto after = m.params();
      for (std::size_t i = 0; i < params.size(); ++i) CHECK(dion_test::bits_equal(params[i], after[i]));
    }
  };
  run.template operator()<dion::Muon<B>>({}, "muon");
  run.template operator()<dion::NorMuon<B>>({}, "normuon");
  run.template operator()<dion::Dion2<B>>({}, "dion2");
  run.template operator()<dion::NorDion2<B>>({}, "nordion2");
  run.template operator()<dion::Dion<B>>({.qr_method = dion::QrMethod::cqr, .cqr_warmup_steps = 0}, "dion cqr");
  run.template operator()<dion::Dion<B>>({}, "dion rcqr");
  run.template operator()<dion::Lion<B>>({}, "lion");
  run.template operator()<dion::AdamW<B>>({}, "adamw");
  run.template operator()<dion::Muon<B, dion::SingleProcess, dion::precision::Bf16States>>({}, "muon bf16 states");
}

TEMPLATE_TEST_CASE("checkpoint: under raise, NonFinite leaves the state bytes unchanged; propagate reaches the state",
                   "[checkpoint][nonfinite]", DION_TEST_BACKENDS) {
  using B = TestType;
  dion_test::BackendEnv<B> env;
  auto run = [&]<class Opt>(const char* what) {
    INFO(what);
    {
      Model<Opt, B> m(env, {.non_finite = dion::NonFinitePolicy::raise});
      m.step(0);
      const auto img = ck::save_bytes(m.opt);
      const auto params = m.params();
      m.nan_at = 1;
      REQUIRE_THROWS_AS(m.step(1), dion::NonFinite);
      CHECK(ck::save_bytes(m.opt) == img);
      const auto after = m.params();
      for (std::size_t i = 0; i < params.size(); ++i) CHECK(dion_test::bits_equal(params[i], after[i]));
    }
    {
      Model<Opt, B> m(env, {.non_finite = dion::NonFinitePolicy::propagate});
      m.nan_at = 0;
      m.step(0);
      CHECK_FALSE(dion_test::all_finite(m.opt.read_state("w1/momentum")));
      // a NaN state saves and loads as is (the file does not judge values)
      Model<Opt, B> r(env, {.non_finite = dion::NonFinitePolicy::propagate}, 2);
      ck::load_bytes(r.opt, ck::save_bytes(m.opt));
      CHECK(ck::save_bytes(r.opt) == ck::save_bytes(m.opt));
    }
  };
  run.template operator()<dion::Muon<B>>("muon");
  run.template operator()<dion::NorMuon<B>>("normuon");
  run.template operator()<dion::Dion2<B>>("dion2");
  run.template operator()<dion::NorDion2<B>>("nordion2");
  run.template operator()<dion::Dion<B>>("dion");
  run.template operator()<dion::Lion<B>>("lion");
  run.template operator()<dion::AdamW<B>>("adamw");
}

// ------------------------------------------------------------------------------------------------
// C13 (format stability): the committed v1.0 rank files of the fuzz corpus still load, and saving
// the loaded state reproduces them byte for byte. A format change that breaks this needs a version
// bump and a compatibility path.
TEST_CASE("checkpoint: committed format 1.0 files load and re-save byte-identically (C13)", "[checkpoint][golden]") {
  const fs::path corpus = dion_test::data_dir() / ".." / "fuzz" / "corpus";
  dion_fuzz::Fixture fx;
  const auto muon = read_file(corpus / "valid-muon.safetensors");
  const auto dion = read_file(corpus / "valid-dion.safetensors");
  REQUIRE(!muon.empty());
  REQUIRE(!dion.empty());
  ck::load_bytes(fx.muon, muon);
  ck::load_bytes(fx.dion, dion);
  CHECK(fx.muon.step_count(0) == 1);
  CHECK(fx.dion.step_count(1) == 1);
  CHECK(ck::save_bytes(fx.muon) == muon);
  CHECK(ck::save_bytes(fx.dion) == dion);
  // and the other way round: a Muon file into Dion is refused
  CHECK_THROWS_AS(ck::load_bytes(fx.dion, muon), dion::CheckpointIncompatible);
}

// ------------------------------------------------------------------------------------------------
// Format 1.1 (distributed layouts) offline, in one process (RELIABILITY C11, C12): a checkpoint cut
// into rank files by hand is what a distributed save writes; the MPI suite (test_checkpoint_dist.cpp)
// covers real distributed saves and loads.
namespace {

/// Write the single-process image `img` as a `world`-rank checkpoint in `dir`: every tensor of one
/// or more dims is cut along dim 0 at `cuts(extent, rank)` = [a, b) (a "shard" piece per rank file),
/// every other tensor (step_dev) goes to rank 0 only, as a distributed save stores replicated state.
void split_checkpoint(const std::vector<std::byte>& img, const fs::path& dir, int world,
                      const std::function<std::pair<std::int64_t, std::int64_t>(std::int64_t, int)>& cuts) {
  fs::create_directories(dir);
  const auto f = st::File::parse(std::span<const std::byte>(img));
  nlohmann::json files = nlohmann::json::array();
  for (int r = 0; r < world; ++r) {
    const auto part = remake(
        img,
        [&](auto& meta, auto& s) {
          meta["format_version"] = "1.1";
          s["format_version"] = "1.1";
          s["layout"] = {{"world_size", world}, {"rank", r}};
          nlohmann::json tensors = nlohmann::json::object();
          for (const auto& t : f.tensors()) {
            if (t.shape.empty()) {
              if (r == 0) tensors[t.name] = s["tensors"][t.name];
              continue;
            }
            const auto [a, b] = cuts(t.shape[0], r);
            const std::size_t row = static_cast<std::size_t>(t.nbytes()) / static_cast<std::size_t>(t.shape[0]);
            const auto bytes = f.bytes(t).subspan(static_cast<std::size_t>(a) * row, static_cast<std::size_t>(b - a) * row);
            std::vector<std::int64_t> offsets(t.shape.size(), 0);
            offsets[0] = a;
            tensors[t.name] = {{"crc32c", ck::crc_hex(ck::crc32c(bytes))},
                               {"shard", {{"offsets", offsets}, {"global_shape", t.shape}}}};
          }
          s["tensors"] = tensors;
        },
        [&](st::Writer& w, const st::File& file) {
          for (const auto& t : file.tensors()) {
            if (t.shape.empty()) {
              if (r == 0) w.add(t.name, t.dtype, t.shape, file.bytes(t));
              continue;
            }
            const auto [a, b] = cuts(t.shape[0], r);
            const std::size_t row = static_cast<std::size_t>(t.nbytes()) / static_cast<std::size_t>(t.shape[0]);
            auto shape = t.shape;
            shape[0] = b - a;
            w.add(t.name, t.dtype, shape,
                  file.bytes(t).subspan(static_cast<std::size_t>(a) * row, static_cast<std::size_t>(b - a) * row));
          }
        });
    const std::string name = ck::rank_file_name(r, world);
    write_file(dir / name, part);
    files.push_back({{"rank", r}, {"name", name}, {"bytes", part.size()}, {"crc32c", ck::crc_hex(ck::crc32c(part))}});
  }
  const nlohmann::json manifest = {{"format", "dion.checkpoint"}, {"format_version", "1.1"}, {"checksum", "crc32c"},
                                   {"optimizer", nlohmann::json::parse(*f.metadata("dion.state"))["optimizer"]},
                                   {"world_size", world}, {"files", files}};
  write_text(dir / "manifest.json", manifest.dump(2) + "\n");
}

}  // namespace

TEMPLATE_TEST_CASE("checkpoint: rank files with uneven, empty and overlapping pieces load in one process (C11)",
                   "[checkpoint][reshard]", DION_TEST_BACKENDS) {
  using B = TestType;
  dion_test::BackendEnv<B> env;
  auto run = [&]<class Opt>(const Options& o, const char* what) {
    INFO(what);
    Model<Opt, B> a(env, o);
    for (int k = 0; k < 3; ++k) a.step(k);
    const auto img = ck::save_bytes(a.opt);
    TempDir dir;
    // 3 ranks: the first half, nothing, the second half (FSDP chunking with an empty shard)
    split_checkpoint(img, dir / "w3", 3, [](std::int64_t e, int r) {
      const std::int64_t h = e / 2;
      return r == 0 ? std::pair<std::int64_t, std::int64_t>{0, h}
                    : r == 1 ? std::pair<std::int64_t, std::int64_t>{h, h} : std::pair<std::int64_t, std::int64_t>{h, e};
    });
    Model<Opt, B> b(env, o, 7);
    ck::load(b.opt, dir / "w3");
    CHECK(Snapshot<Opt>(b.opt) == Snapshot<Opt>(a.opt));  // every bit, the counters, the re-saved image
    // overlapping pieces (a replicated-over-shards save) load as well: any piece that covers a row
    split_checkpoint(img, dir / "overlap", 2, [](std::int64_t e, int r) {
      return r == 0 ? std::pair<std::int64_t, std::int64_t>{0, e - e / 3} : std::pair<std::int64_t, std::int64_t>{e / 3, e};
    });
    Model<Opt, B> c(env, o, 8);
    ck::load(c.opt, dir / "overlap");
    CHECK(Snapshot<Opt>(c.opt) == Snapshot<Opt>(a.opt));
    // a gap: rows no rank file holds -> CheckpointError naming the range, nothing changed
    split_checkpoint(img, dir / "gap", 2, [](std::int64_t e, int r) {
      return r == 0 ? std::pair<std::int64_t, std::int64_t>{0, e / 4} : std::pair<std::int64_t, std::int64_t>{e / 2, e};
    });
    check_unchanged(c.opt, [&] { ck::load(c.opt, dir / "gap"); }, "incomplete checkpoint: no rank file holds the block");
    // load_bytes takes only the file of a world-size-1 checkpoint
    check_unchanged(c.opt, [&] { ck::load_bytes(c.opt, read_file(dir / "w3" / ck::rank_file_name(0, 3))); },
                    "saved at world size 3 (rank 0)");
  };
  run.template operator()<dion::Muon<B>>({}, "muon");
  run.template operator()<dion::NorMuon<B>>({}, "normuon (variance_neuron)");
  run.template operator()<dion::Dion<B>>({.rank_fraction = 0.5, .qr_method = dion::QrMethod::qr}, "dion (Q)");
  run.template operator()<dion::AdamW<B>>({}, "adamw");
}

TEMPLATE_TEST_CASE("checkpoint: a Dion state of the other orientation is refused (C12)", "[checkpoint][incompatible]",
                   DION_TEST_BACKENDS) {
  using B = TestType;
  dion_test::BackendEnv<B> env;
  Model<dion::Dion<B>, B> a(env, {});
  a.step(0);
  const auto img = ck::save_bytes(a.opt);
  // w1 is 24 x 16 (tall): untransposed in one process, transposed when row-sharded (FSDP)
  const auto fsdp = remake(img, [](auto& meta, auto& s) {
    meta["format_version"] = "1.1";
    s["format_version"] = "1.1";
    s["params"]["w1"]["transposed"] = true;
  });
  Model<dion::Dion<B>, B> b(env, {}, 4);
  check_unchanged(b.opt, [&] { ck::load_bytes(b.opt, fsdp); },
                  "parameter 'w1' (Dion, 24 x 16) orientation mismatch: the checkpoint's state is transposed");
  // the same file with the orientation that matches loads
  const auto same = remake(img, [](auto& meta, auto& s) {
    meta["format_version"] = "1.1";
    s["format_version"] = "1.1";
    s["params"]["w1"]["transposed"] = false;
  });
  ck::load_bytes(b.opt, same);
  CHECK(b.opt.step_count(0) == a.opt.step_count(0));
}
