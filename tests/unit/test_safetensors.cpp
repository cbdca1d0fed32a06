// safetensors reader/writer: round trips, determinism (RELIABILITY C2), the golden files, hostile
// input (C5, C9, a small in-process mutation fuzz for C10) and the atomic writer (C18).
#include "dion/checkpoint/safetensors.hpp"

#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "catch_compat.hpp"
#include "test_data.hpp"  // dion_test::data_path: DION_TEST_DATA_DIR (macro or env) or ./tests/data

namespace st = dion::safetensors;
namespace fs = std::filesystem;

namespace {

std::vector<std::byte> bytes_of(std::string_view s) {
  std::vector<std::byte> v(s.size());
  if (!s.empty()) std::memcpy(v.data(), s.data(), s.size());
  return v;
}

// A file image: 8-byte length (the header's own length unless overridden), header, `data` zero bytes.
std::vector<std::byte> make_file(std::string_view header, std::size_t data = 0,
                                 std::uint64_t len = std::numeric_limits<std::uint64_t>::max()) {
  if (len == std::numeric_limits<std::uint64_t>::max()) len = header.size();
  std::vector<std::byte> v(8 + header.size() + data, std::byte{0});
  std::memcpy(v.data(), &len, 8);
  std::memcpy(v.data() + 8, header.data(), header.size());
  return v;
}

// "" if the image parses; the CheckpointError message otherwise. Any other exception escapes and
// fails the test.
std::string parse_error(std::span<const std::byte> img) {
  try {
    (void)st::File::parse(img);
    return "";
  } catch (const dion::CheckpointError& e) {
    const std::string w = e.what();
    return w.empty() ? "(empty message)" : w;
  }
}

bool contains(const std::string& s, std::string_view part) { return s.find(part) != std::string::npos; }

std::vector<std::byte> read_all(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::vector<char> c((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  std::vector<std::byte> v(c.size());
  if (!c.empty()) std::memcpy(v.data(), c.data(), c.size());
  return v;
}

// A small valid file used by the truncation, bit-flip and mutation tests.
std::vector<std::byte> small_file() {
  st::Writer w;
  const std::vector<float> a{1.f, -2.f, 3.5f, 0.25f, 1e-3f, 7.f};
  const std::vector<dion::bf16> b{dion::bf16(1.5f), dion::bf16(-0.5f), dion::bf16(3.f)};
  w.add_f32("grad/0/p0", {2, 3}, a);
  w.add_bf16("state/p0/momentum", {3}, b);
  w.set_metadata("format", "dion-case-v1");
  return w.to_bytes();
}

struct TempDir {
  fs::path path;
  TempDir() {
    path = fs::temp_directory_path() / ("dion_st_test_" + std::to_string(::getpid()));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::size_t entries() const {
    std::size_t n = 0;
    for ([[maybe_unused]] const auto& e : fs::directory_iterator(path)) ++n;
    return n;
  }
};

}  // namespace

TEST_CASE("safetensors: round trip of f32/bf16 tensors and metadata", "[checkpoint][safetensors]") {
  const std::vector<float> a{1.f, -2.f, 3.5f, 0.25f, 1e-3f, 7.f};
  const std::vector<dion::bf16> b{dion::bf16(1.5f), dion::bf16(-0.5f), dion::bf16(3.f), dion::bf16(1e30f)};
  st::Writer w;
  w.add_f32("z/last", {2, 3}, a);
  w.add_bf16("a/first", {2, 1, 2}, b);
  w.add_f32("scalar", {}, std::span<const float>(a.data(), 1));
  w.add_f32("empty", {0, 5}, {});
  w.set_metadata("optimizer", "muon");
  w.set_metadata("hyperparams", "{\"lr\": 0.01, \"note\": \"quotes \\\" and \\\\ and é\"}");
  const auto img = w.to_bytes();
  REQUIRE(img.size() == w.file_size());

  const auto f = st::File::parse(img);
  REQUIRE(f.size() == 4);
  CHECK(f.sorted_names() == std::vector<std::string>{"a/first", "empty", "scalar", "z/last"});
  CHECK(f.names() == f.sorted_names());  // the writer emits sorted names
  CHECK(f.has("z/last"));
  CHECK_FALSE(f.has("z/las"));
  CHECK(f.dtype("z/last") == st::Dtype::F32);
  CHECK(f.dtype_name("a/first") == "BF16");
  CHECK(f.shape("a/first") == std::vector<std::int64_t>{2, 1, 2});
  CHECK(f.shape("scalar").empty());
  CHECK(f.numel("scalar") == 1);
  CHECK(f.numel("empty") == 0);
  CHECK(f.bytes("z/last").size() == 24);
  CHECK(f.read_f32("z/last") == a);
  const auto bf = f.read_f32("a/first");
  REQUIRE(bf.size() == 4);
  for (std::size_t i = 0; i < 4; ++i) CHECK(bf[i] == static_cast<float>(b[i]));
  CHECK(f.read_f32("empty").empty());
  CHECK(f.metadata().size() == 2);
  CHECK(f.metadata().at("optimizer") == "muon");
  CHECK(f.metadata("hyperparams").value() == "{\"lr\": 0.01, \"note\": \"quotes \\\" and \\\\ and é\"}");
  CHECK_FALSE(f.metadata("missing").has_value());

  std::vector<float> into(6);
  f.read_f32_into("z/last", into);
  CHECK(into == a);
  std::vector<float> wrong(5);
  REQUIRE_THROWS_AS(f.read_f32_into("z/last", wrong), dion::ShapeMismatch);
  REQUIRE_THROWS_AS(f.info("nope"), dion::CheckpointError);

  // Copies share the bytes; the span stays valid after the original is gone.
  std::optional<st::File> g;
  {
    const auto tmp = st::File::parse(img);
    g = tmp;
  }
  CHECK(g->read_f32("z/last") == a);
}

TEST_CASE("safetensors: deterministic, byte-identical re-serialization", "[checkpoint][safetensors]") {
  const auto img = small_file();
  // Header length is a multiple of 8 and padded with spaces.
  std::uint64_t n;
  std::memcpy(&n, img.data(), 8);
  CHECK(n % 8 == 0);
  CHECK(static_cast<char>(img[8]) == '{');

  // Insertion order does not matter.
  st::Writer w2;
  const std::vector<dion::bf16> b{dion::bf16(1.5f), dion::bf16(-0.5f), dion::bf16(3.f)};
  const std::vector<float> a{1.f, -2.f, 3.5f, 0.25f, 1e-3f, 7.f};
  w2.set_metadata("format", "dion-case-v1");
  w2.add_bf16("state/p0/momentum", {3}, b);
  w2.add_view("grad/0/p0", st::Dtype::F32, {2, 3}, std::as_bytes(std::span<const float>(a)));
  CHECK(w2.to_bytes() == img);

  // save -> load -> save is byte-identical (C2).
  const auto f = st::File::parse(img);
  st::Writer w3;
  for (const auto& t : f.tensors()) w3.add_view(t.name, t.dtype, t.shape, f.bytes(t));
  for (const auto& [k, v] : f.metadata()) w3.set_metadata(k, v);
  CHECK(w3.to_bytes() == img);
  CHECK(w3.to_bytes() == w3.to_bytes());
}

TEST_CASE("safetensors: writer rejects inconsistent tensors", "[checkpoint][safetensors]") {
  st::Writer w;
  const std::vector<float> a(6, 1.f);
  w.add_f32("x", {2, 3}, a);
  REQUIRE_THROWS_AS(w.add_f32("x", {2, 3}, a), dion::InvalidArgument);
  REQUIRE_THROWS_AS(w.add_f32("y", {2, 4}, a), dion::ShapeMismatch);
  REQUIRE_THROWS_AS(w.add_f32("y", {-2, -3}, a), dion::InvalidArgument);
  REQUIRE_THROWS_AS(w.add_f32("__metadata__", {6}, a), dion::InvalidArgument);
  REQUIRE_THROWS_AS(w.add_f32(std::string("bad\xff utf8"), {6}, a), dion::InvalidArgument);
  REQUIRE_THROWS_AS(w.set_metadata("k", std::string("\xc3")), dion::InvalidArgument);
  CHECK(w.size() == 1);
}

TEST_CASE("safetensors: F16 and F64 conversion", "[checkpoint][safetensors]") {
  using st::detail::f16_to_f32;
  CHECK(f16_to_f32(0x0000) == 0.f);
  CHECK(std::signbit(f16_to_f32(0x8000)));
  CHECK(f16_to_f32(0x3c00) == 1.f);
  CHECK(f16_to_f32(0xc000) == -2.f);
  CHECK(f16_to_f32(0x7bff) == 65504.f);
  CHECK(f16_to_f32(0x0400) == std::ldexp(1.f, -14));           // smallest normal
  CHECK(f16_to_f32(0x0001) == std::ldexp(1.f, -24));           // smallest subnormal
  CHECK(f16_to_f32(0x03ff) == std::ldexp(1023.f, -24));        // largest subnormal
  CHECK(f16_to_f32(0x8201) == -std::ldexp(513.f, -24));
  CHECK(std::isinf(f16_to_f32(0x7c00)));
  CHECK(f16_to_f32(0xfc00) < 0);
  CHECK(std::isnan(f16_to_f32(0x7e00)));
  // Exhaustive: every finite half equals mant * 2^(e) computed in double.
  for (std::uint32_t h = 0; h < 0x10000; ++h) {
    const std::uint32_t e = (h >> 10) & 31, m = h & 1023;
    if (e == 31) continue;
    const double mag = e == 0 ? std::ldexp(static_cast<double>(m), -24)
                              : std::ldexp(static_cast<double>(1024 + m), static_cast<int>(e) - 25);
    const double want = (h & 0x8000) ? -mag : mag;
    if (static_cast<double>(f16_to_f32(static_cast<std::uint16_t>(h))) != want) {
      FAIL("f16 0x" << std::hex << h);
    }
  }

  using st::detail::f64_to_f32;
  const double fmax = static_cast<double>(std::numeric_limits<float>::max());
  CHECK(f64_to_f32(1.5) == 1.5f);
  CHECK(f64_to_f32(1e300) == std::numeric_limits<float>::infinity());
  CHECK(f64_to_f32(-1e300) == -std::numeric_limits<float>::infinity());
  CHECK(f64_to_f32(fmax) == std::numeric_limits<float>::max());
  CHECK(f64_to_f32(fmax + 0x1p102) == std::numeric_limits<float>::max());
  CHECK(f64_to_f32(fmax + 0x1p103) == std::numeric_limits<float>::infinity());
  CHECK(std::isnan(f64_to_f32(std::nan(""))));

  // Through a file.
  const std::vector<std::uint16_t> h{0x3c00, 0x0001, 0xfc00};
  const std::vector<double> d{0.5, -1e300, 3.0};
  st::Writer w;
  w.add("h", st::Dtype::F16, {3}, std::as_bytes(std::span<const std::uint16_t>(h)));
  w.add("d", st::Dtype::F64, {3}, std::as_bytes(std::span<const double>(d)));
  const std::vector<std::int32_t> ints{1, 2};
  w.add("i", st::Dtype::I32, {2}, std::as_bytes(std::span<const std::int32_t>(ints)));
  const auto f = st::File::parse(w.to_bytes());
  const auto hf = f.read_f32("h");
  CHECK(hf[0] == 1.f);
  CHECK(hf[1] == std::ldexp(1.f, -24));
  CHECK(hf[2] == -std::numeric_limits<float>::infinity());
  const auto df = f.read_f32("d");
  CHECK(df == std::vector<float>{0.5f, -std::numeric_limits<float>::infinity(), 3.f});
  REQUIRE_THROWS_AS(f.read_f32("i"), dion::CheckpointIncompatible);
  CHECK(f.bytes("i").size() == 8);
}

TEST_CASE("safetensors: dtype table", "[checkpoint][safetensors]") {
  CHECK(st::dtype_size(st::Dtype::F32) == 4);
  CHECK(st::dtype_size(st::Dtype::BF16) == 2);
  CHECK(st::dtype_size(st::Dtype::F16) == 2);
  CHECK(st::dtype_size(st::Dtype::F64) == 8);
  CHECK(st::dtype_size(st::Dtype::I64) == 8);
  CHECK(st::dtype_size(st::Dtype::U64) == 8);
  CHECK(st::dtype_size(st::Dtype::I32) == 4);
  CHECK(st::dtype_size(st::Dtype::U32) == 4);
  CHECK(st::dtype_size(st::Dtype::I16) == 2);
  CHECK(st::dtype_size(st::Dtype::U16) == 2);
  CHECK(st::dtype_size(st::Dtype::I8) == 1);
  CHECK(st::dtype_size(st::Dtype::U8) == 1);
  CHECK(st::dtype_size(st::Dtype::BOOL) == 1);
  for (const auto& d : st::detail::kDtypes) CHECK(st::dtype_from_name(d.name) == d.dtype);
  CHECK_FALSE(st::dtype_from_name("F4").has_value());
  CHECK(st::to_safetensors(dion::DType::bf16) == st::Dtype::BF16);
  CHECK(st::shape_dims(dion::Shape{3, 4}) == std::vector<std::int64_t>{3, 4});
}

TEST_CASE("safetensors: every golden file parses", "[checkpoint][safetensors][golden]") {
  const fs::path dir = dion_test::data_path("golden");
  REQUIRE(fs::is_directory(dir));
  std::size_t files = 0;
  for (const auto& entry : fs::directory_iterator(dir)) {
    if (entry.path().extension() != ".safetensors") continue;
    ++files;
    INFO(entry.path().string());
    const auto f = st::File::load(entry.path());
    CHECK(f.metadata().at("format") == "dion-case-v1");
    CHECK(f.metadata().count("optimizer") == 1);
    REQUIRE(f.size() > 0);
    bool has_init = false, has_expect = false;
    for (const auto& name : f.names()) {
      const auto& t = f.info(name);
      CHECK(t.dtype == st::Dtype::F32);
      CHECK(f.read_f32(name).size() == static_cast<std::size_t>(t.numel));
      has_init = has_init || name.rfind("init/", 0) == 0;
      has_expect = has_expect || name.rfind("expect/", 0) == 0;
    }
    CHECK(has_init);
    CHECK(has_expect);
    // Our re-serialization of a Python-written file parses back to the same tensors and metadata.
    st::Writer w;
    for (const auto& t : f.tensors()) w.add_view(t.name, t.dtype, t.shape, f.bytes(t));
    for (const auto& [k, v] : f.metadata()) w.set_metadata(k, v);
    const auto g = st::File::parse(w.to_bytes());
    CHECK(g.sorted_names() == f.sorted_names());
    CHECK(g.metadata() == f.metadata());
    for (const auto& t : f.tensors()) {
      const auto x = f.bytes(t);
      const auto y = g.bytes(t.name);
      REQUIRE(x.size() == y.size());
      CHECK(std::memcmp(x.data(), y.data(), x.size()) == 0);
      CHECK(g.shape(t.name) == t.shape);
    }
    // The in-memory parse agrees with the file load.
    const auto img = read_all(entry.path());
    const auto m = st::File::view(img);
    CHECK(m.names() == f.names());
  }
  CHECK(files >= 14);
}

TEST_CASE("safetensors: valid edge cases are accepted", "[checkpoint][safetensors]") {
  CHECK(parse_error(make_file("{}")) == "");
  CHECK(parse_error(make_file("{}      ")) == "");
  CHECK(parse_error(make_file("{\"__metadata__\":{}}")) == "");
  CHECK(parse_error(make_file(R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}})")) == "");
  // Zero-size tensors at a boundary may share an offset: they own no bytes.
  CHECK(parse_error(make_file(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                              R"("b":{"dtype":"F32","shape":[0,3],"data_offsets":[4,4]},)"
                              R"("c":{"dtype":"U8","shape":[0],"data_offsets":[4,4]}})",
                              4)) == "");
  // Key order inside an entry is free; "-0" is an integer zero.
  CHECK(parse_error(make_file(R"({"a":{"data_offsets":[0,2],"shape":[2],"dtype":"I8"},)"
                              R"("b":{"dtype":"U8","shape":[-0],"data_offsets":[2,2]}})", 2)) == "");
}

TEST_CASE("safetensors: truncation at every prefix length is rejected", "[checkpoint][safetensors]") {
  const auto img = small_file();
  REQUIRE(parse_error(img) == "");
  for (std::size_t len = 0; len < img.size(); ++len) {
    // A fresh allocation of exactly `len` bytes, so ASan sees any read past the end.
    std::vector<std::byte> prefix(img.begin(), img.begin() + static_cast<std::ptrdiff_t>(len));
    const auto msg = parse_error(prefix);
    INFO("prefix length " << len << ": " << msg);
    CHECK(contains(msg, "truncated"));
  }
}

TEST_CASE("safetensors: hostile headers are rejected", "[checkpoint][safetensors]") {
  auto rejects = [](const std::vector<std::byte>& img, std::string_view part) {
    const auto msg = parse_error(img);
    INFO("message: " << msg << "\nexpected to contain: " << part);
    CHECK(!msg.empty());
    CHECK(contains(msg, part));
    CHECK(contains(msg, "safetensors: "));
  };
  const std::string ok_entry = R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";

  SECTION("header length") {
    rejects(make_file(ok_entry, 8, 0), "too small");
    rejects(make_file(ok_entry, 8, 1), "too small");
    rejects(make_file(ok_entry, 8, (std::uint64_t{100} << 20) + 1), "exceeds the limit");
    rejects(make_file(ok_entry, 8, std::numeric_limits<std::uint64_t>::max() - 1), "exceeds the limit");
    rejects(make_file(ok_entry, 8, std::uint64_t{1} << 63), "exceeds the limit");
    rejects(make_file(ok_entry, 0, 1000), "truncated");
    rejects(make_file(ok_entry, 8, ok_entry.size() + 9), "truncated");
  }
  SECTION("not a JSON object") {
    rejects(make_file("not json"), "not a JSON object");
    rejects(make_file("[1, 2, 3]"), "not a JSON object");
    rejects(make_file("\"str\""), "not a JSON object");
    rejects(make_file(" {}"), "not a JSON object");
    rejects(make_file("{not json}"), "not valid JSON");
    rejects(make_file("{\"a\":"), "not valid JSON");
    rejects(make_file("{} x"), "not valid JSON");
    rejects(make_file("{}{}"), "not valid JSON");
    rejects(make_file(std::string("{\"a\0\":1}", 8)), "not valid JSON");
    // nlohmann's lexer stops at a NUL: a NUL in the padding (a flipped space) must not hide the rest
    rejects(make_file(std::string("{}\0      ", 9)), "raw NUL byte");
    rejects(make_file(std::string("{} \0x", 5)), "raw NUL byte");
    rejects(make_file(std::string("{\"\xff\xfe\":1}")), "not valid JSON");
    rejects(make_file(R"({"t":5})"), "tensor 't' must be an object");
    rejects(make_file(R"({"t":[]})"), "tensor 't' must be an object");
    // Deep nesting is refused at the first level past the schema, without recursion.
    rejects(make_file("{\"t\":{\"shape\":" + std::string(100000, '[')), "tensor 't' shape dimensions must be");
    rejects(make_file("{\"__metadata__\":{\"k\":" + std::string(100000, '[')), "must be a string");
  }
  SECTION("entry fields") {
    rejects(make_file(R"({"t":{"dtype":"F32","shape":[2]}})", 8), "tensor 't' is missing 'data_offsets'");
    rejects(make_file(R"({"t":{"shape":[2],"data_offsets":[0,8]}})", 8), "tensor 't' is missing 'dtype'");
    rejects(make_file(R"({"t":{"dtype":"F32","data_offsets":[0,8]}})", 8), "tensor 't' is missing 'shape'");
    rejects(make_file(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":1}})", 8), "unknown field 'x'");
    rejects(make_file(R"({"t":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 8),
            "duplicate field");
    rejects(make_file(R"({"t":{"dtype":32,"shape":[2],"data_offsets":[0,8]}})", 8), "dtype must be a string");
    rejects(make_file(R"({"t":{"dtype":"F32","shape":2,"data_offsets":[0,8]}})", 8), "shape must be an array");
    rejects(make_file(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", 8), "exactly 2");
    rejects(make_file(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8,8]}})", 8), "exactly 2");
    rejects(make_file(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":{"a":0}}})", 8), "data_offsets must be");
    rejects(make_file(R"({"t":{"dtype":"F32","shape":[[2]],"data_offsets":[0,8]}})", 8), "non-negative integers");
    rejects(make_file(R"({"t":{"dtype":"F32","shape":[null],"data_offsets":[0,8]}})", 8), "non-negative integers");
    rejects(make_file(R"({"t":{"dtype":"F32","shape":[true],"data_offsets":[0,8]}})", 8), "non-negative integers");
  }
  SECTION("negative and non-integer numbers") {
    rejects(make_file(R"({"t":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8), "negative integer -2");
    rejects(make_file(R"({"t":{"dtype":"F32","shape":[-2,-1],"data_offsets":[0,8]}})", 8), "negative");
    rejects(make_file(R"({"t":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", 8), "non-integer");
    rejects(make_file(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0.0,8]}})", 8), "non-integer");
    rejects(make_file(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8e0]}})", 8), "non-integer");
    rejects(make_file(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[-8,0]}})", 8), "negative");
    rejects(make_file(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,18446744073709551616]}})", 8),
            "non-integer");
    rejects(make_file(R"({"t":{"dtype":"F32","shape":[9223372036854775808,0],"data_offsets":[0,0]}})", 0),
            "exceeds the int64 range");
  }
  SECTION("size overflow") {
    rejects(make_file(R"({"t":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,16]}})", 16),
            "overflows 64 bits");
    rejects(make_file(R"({"t":{"dtype":"F32","shape":[4294967296,4294967296,0],"data_offsets":[0,0]}})", 0),
            "overflows 64 bits");
    rejects(make_file(R"({"t":{"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,0]}})", 0),
            "byte size overflows");
    // Wraps to 4 in 64-bit arithmetic without checks (the safetensors-cpp PoC shape).
    rejects(make_file(R"({"t":{"dtype":"U8","shape":[4,4611686018427387905],"data_offsets":[0,4]}})", 4),
            "overflows 64 bits");
  }
  SECTION("offsets") {
    rejects(make_file(R"({"grad/0/p0":{"dtype":"F32","shape":[10],"data_offsets":[0,40]}})", 32),
            "tensor 'grad/0/p0' data_offsets [0, 40) exceed the data region of 32 bytes");
    rejects(make_file(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[18446744073709551608,0]}})", 8),
            "begin > end");
    rejects(make_file(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[18446744073709551608,18446744073709551615]}})", 8),
            "exceed the data region");
    rejects(make_file(R"({"t":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8), "needs 12 bytes");
    rejects(make_file(R"({"t":{"dtype":"BF16","shape":[2],"data_offsets":[0,8]}})", 8), "needs 4 bytes");
    rejects(make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                      R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12),
            "overlap tensor 'a'");
    rejects(make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                      R"("b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 8),
            "overlap");
    // A zero-size entry inside another entry's bytes aliases it.
    rejects(make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                      R"("b":{"dtype":"F32","shape":[0],"data_offsets":[4,4]}})", 8),
            "overlap");
    rejects(make_file(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                      R"("b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})", 12),
            "hole in the data region: bytes [4, 8) before tensor 'b'");
    rejects(make_file(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8), "hole");
    rejects(make_file(ok_entry, 12), "trailing bytes [8, 12)");
    rejects(make_file("{}", 1), "trailing bytes");
  }
  SECTION("metadata") {
    rejects(make_file(R"({"__metadata__":{"k":1}})"), "__metadata__ value for key 'k' must be a string");
    rejects(make_file(R"({"__metadata__":{"k":null}})"), "must be a string");
    rejects(make_file(R"({"__metadata__":{"k":{"x":"y"}}})"), "must be a string");
    rejects(make_file(R"({"__metadata__":{"k":["v"]}})"), "must be a string");
    rejects(make_file(R"({"__metadata__":"v"})"), "__metadata__ must be an object");
    rejects(make_file(R"({"__metadata__":{"k":"a","k":"b"}})"), "duplicate __metadata__ key 'k'");
    rejects(make_file(R"({"__metadata__":{},"__metadata__":{}})"), "duplicate key '__metadata__'");
  }
  SECTION("duplicate tensor names") {
    rejects(make_file(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                      R"("a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8),
            "duplicate tensor name 'a'");
  }
  SECTION("unknown dtype is incompatible, not corrupt") {
    const auto img = make_file(R"({"t":{"dtype":"F4","shape":[2],"data_offsets":[0,1]}})", 1);
    REQUIRE_THROWS_AS(st::File::parse(img), dion::CheckpointIncompatible);
    CHECK(contains(parse_error(img), "unknown dtype 'F4'"));
  }
  SECTION("hostile names are quoted and cut in messages") {
    const std::string name(10000, 'n');
    const auto msg = parse_error(make_file("{\"" + name + "\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}"));
    CHECK(contains(msg, "(10000 bytes)"));
    CHECK(msg.size() < 400);
  }
}

TEST_CASE("safetensors: bit flips and mutations never crash", "[checkpoint][safetensors]") {
  const auto img = small_file();
  std::uint64_t hlen;
  std::memcpy(&hlen, img.data(), 8);
  std::size_t parsed = 0, rejected = 0;
  auto exercise = [&](const std::vector<std::byte>& m) {
    try {
      const auto f = st::File::view(m);
      ++parsed;
      for (const auto& t : f.tensors()) {
        REQUIRE(f.bytes(t).size() == t.nbytes());
        try {
          (void)f.read_f32(t.name);
        } catch (const dion::CheckpointIncompatible&) {  // a dtype read_f32 does not convert
        }
      }
    } catch (const dion::CheckpointError&) {
      ++rejected;
    }
  };
  // Every single-bit flip of the length prefix and header.
  for (std::size_t byte = 0; byte < 8 + hlen; ++byte) {
    for (int bit = 0; bit < 8; ++bit) {
      auto m = img;
      m[byte] ^= static_cast<std::byte>(1u << bit);
      exercise(m);
    }
  }
  // Flipped payload bits parse fine: the format has no checksum (the dion container adds one).
  for (std::size_t byte = 8 + hlen; byte < img.size(); byte += 3) {
    auto m = img;
    m[byte] ^= std::byte{0x40};
    CHECK(parse_error(m) == "");
  }
  // A small deterministic mutation fuzz: random byte overwrites, inserts and deletes.
  std::uint64_t s = 0x9e3779b97f4a7c15ull;
  auto rnd = [&s]() {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    return s;
  };
  const char* tokens[] = {"-", "1e9", "[", "]", "{", "}", "\"", ",", "0", "99999999999999999999", "null"};
  for (int iter = 0; iter < 20000; ++iter) {
    auto m = img;
    const int edits = 1 + static_cast<int>(rnd() % 4);
    for (int e = 0; e < edits && !m.empty(); ++e) {
      const std::size_t pos = static_cast<std::size_t>(rnd() % m.size());
      switch (rnd() % 4) {
        case 0:
          m[pos] = static_cast<std::byte>(rnd());
          break;
        case 1:
          m.erase(m.begin() + static_cast<std::ptrdiff_t>(pos));
          break;
        case 2: {
          const std::string_view tok = tokens[rnd() % std::size(tokens)];
          const auto tb = bytes_of(tok);
          m.insert(m.begin() + static_cast<std::ptrdiff_t>(pos), tb.begin(), tb.end());
          break;
        }
        default: {  // keep the length prefix consistent so the mutation reaches the JSON parser
          const std::uint64_t n = m.size() >= 8 ? std::min<std::uint64_t>(hlen, m.size() - 8) : 0;
          if (m.size() >= 8) std::memcpy(m.data(), &n, 8);
        }
      }
    }
    exercise(m);
  }
  CHECK(parsed + rejected == 8 * (8 + hlen) + 20000);
  CHECK(rejected > 0);
  CHECK(parsed > 0);
}

TEST_CASE("safetensors: file round trip and atomic writer", "[checkpoint][safetensors][io]") {
  TempDir tmp;
  const fs::path target = tmp.path / "ckpt.safetensors";

  st::Writer old_w;
  const std::vector<float> old_vals{1.f, 2.f, 3.f};
  old_w.add_f32("w", {3}, old_vals);
  old_w.set_metadata("version", "old");
  old_w.write_file(target);
  const auto old_bytes = read_all(target);
  REQUIRE(old_bytes == old_w.to_bytes());
  CHECK(tmp.entries() == 1);
  {
    const auto f = st::File::load(target);
    CHECK(f.read_f32("w") == old_vals);
    CHECK(f.metadata().at("version") == "old");
  }

  st::Writer new_w;
  std::vector<float> big(1000);
  for (std::size_t i = 0; i < big.size(); ++i) big[i] = static_cast<float>(i);
  new_w.add_f32("w", {10, 100}, big);
  new_w.add_f32("v", {3}, old_vals);
  new_w.set_metadata("version", "new");
  const auto new_size = new_w.file_size();

  SECTION("failure after N bytes leaves the old file intact and no temp file") {
    for (const std::uint64_t n : {std::uint64_t{0}, std::uint64_t{1}, std::uint64_t{7}, std::uint64_t{8},
                                  std::uint64_t{100}, new_size / 2, new_size - 1}) {
      for (const int err : {ENOSPC, EIO}) {
        INFO("fail after " << n << " bytes, errno " << err);
        std::string msg;
        try {
          new_w.write_file(target, [&](st::Sink& file) -> std::unique_ptr<st::Sink> {
            return std::make_unique<st::FaultInjectionSink>(file, n, err);
          });
        } catch (const dion::IoError& e) {
          msg = e.what();
        }
        REQUIRE(!msg.empty());
        CHECK(contains(msg, target.string()));
        CHECK(contains(msg, std::generic_category().message(err)));
        CHECK(read_all(target) == old_bytes);
        CHECK(tmp.entries() == 1);
      }
    }
  }
  SECTION("a non-I/O exception from the sink also cleans up") {
    struct Boom : st::Sink {
      void write(std::span<const std::byte>) override { throw std::runtime_error("boom"); }
    };
    REQUIRE_THROWS_AS(new_w.write_file(target, [](st::Sink&) -> std::unique_ptr<st::Sink> {
      return std::make_unique<Boom>();
    }),
                      std::runtime_error);
    CHECK(read_all(target) == old_bytes);
    CHECK(tmp.entries() == 1);
  }
  SECTION("a successful write replaces the file") {
    // An injected limit beyond the file size does not trigger.
    new_w.write_file(target, [&](st::Sink& file) -> std::unique_ptr<st::Sink> {
      return std::make_unique<st::FaultInjectionSink>(file, new_size, ENOSPC);
    });
    CHECK(read_all(target) == new_w.to_bytes());
    CHECK(tmp.entries() == 1);
    const auto f = st::File::load(target);
    CHECK(f.read_f32("w") == big);
    CHECK(f.metadata().at("version") == "new");
    // Determinism on disk: writing again gives the same bytes.
    new_w.write_file(target);
    CHECK(read_all(target) == new_w.to_bytes());
  }
  SECTION("I/O errors on paths") {
    REQUIRE_THROWS_AS(new_w.write_file(tmp.path / "missing_dir" / "x.safetensors"), dion::IoError);
    REQUIRE_THROWS_AS(st::File::load(tmp.path / "missing.safetensors"), dion::IoError);
    REQUIRE_THROWS_AS(st::File::load(tmp.path), dion::IoError);
    CHECK(tmp.entries() == 1);
  }
  SECTION("load validates before reading the data") {
    const fs::path bad = tmp.path / "bad.safetensors";
    {
      auto img = make_file(R"({"t":{"dtype":"F32","shape":[1000000000],"data_offsets":[0,4000000000]}})", 16);
      std::ofstream(bad, std::ios::binary).write(reinterpret_cast<const char*>(img.data()),
                                                  static_cast<std::streamsize>(img.size()));
    }
    std::string msg;
    try {
      (void)st::File::load(bad);
    } catch (const dion::CheckpointError& e) {
      msg = e.what();
    }
    CHECK(contains(msg, "exceed the data region of 16 bytes"));
    CHECK(contains(msg, bad.string()));
    // Truncated files.
    for (const std::size_t len : {std::size_t{0}, std::size_t{5}, std::size_t{8}, std::size_t{20}, old_bytes.size() - 1}) {
      std::ofstream(bad, std::ios::binary | std::ios::trunc)
          .write(reinterpret_cast<const char*>(old_bytes.data()), static_cast<std::streamsize>(len));
      INFO("length " << len);
      REQUIRE_THROWS_AS(st::File::load(bad), dion::CheckpointError);
    }
    REQUIRE_THROWS_AS(st::File::load(target, 10), dion::CheckpointError);  // over the caller's cap
  }
}
