// Writes the seed corpus of tests/fuzz/corpus/ (committed; regenerate after a format change):
//   g++ -std=c++20 -O1 -Iinclude -Itests/fuzz $(pkg-config --cflags eigen3) tests/fuzz/make_corpus.cpp \
//       -o /tmp/make_corpus && /tmp/make_corpus tests/fuzz/corpus
// Seeds: valid rank files of the fuzz fixture's Muon and Dion (so the fuzzer starts deep inside
// load_bytes), format 1.1 variants with per-tensor "shard" placements (a whole piece, a piece that
// leaves a gap in its global tensor, Dion's "transposed"), a manifest, truncated files, and
// hand-made hostile headers (C9: size product overflow, offsets past EOF, overlapping and aliasing
// offsets, header length over the limit, deep nesting, duplicate keys, a huge claimed shape with no
// data).
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "dion/checkpoint/checkpoint.hpp"
#include "fuzz_fixture.hpp"

namespace fs = std::filesystem;

static void put(const fs::path& dir, const std::string& name, const std::vector<std::byte>& b) {
  std::ofstream f(dir / name, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}
static std::vector<std::byte> text(const std::string& s) {
  std::vector<std::byte> v(s.size());
  std::memcpy(v.data(), s.data(), s.size());
  return v;
}
static std::vector<std::byte> st_file(const std::string& header, std::size_t data, std::uint64_t len = ~0ull) {
  if (len == ~0ull) len = header.size();
  std::vector<std::byte> v(8 + header.size() + data, std::byte{0});
  std::memcpy(v.data(), &len, 8);
  std::memcpy(v.data() + 8, header.data(), header.size());
  return v;
}

/// A rank file rebuilt with its "dion.state" edited by `edit` (which also adds the tensors to the
/// writer); the metadata checksum is recomputed.
static std::vector<std::byte> remake(
    const std::vector<std::byte>& img,
    const std::function<void(nlohmann::json&, dion::safetensors::Writer&, const dion::safetensors::File&)>& edit) {
  const auto file = dion::safetensors::File::parse(std::span<const std::byte>(img));
  auto state = nlohmann::json::parse(*file.metadata("dion.state"));
  dion::safetensors::Writer w;
  edit(state, w, file);
  const std::string t = state.dump();
  w.set_metadata("format", "dion.checkpoint");
  w.set_metadata("format_version", state["format_version"].get<std::string>());
  w.set_metadata("dion.state", t);
  w.set_metadata("dion.state.crc32c", dion::checkpoint::crc_hex(dion::checkpoint::crc32c(t)));
  return w.to_bytes();
}
static void copy_tensors(dion::safetensors::Writer& w, const dion::safetensors::File& f, const std::string& except = "") {
  for (const auto& t : f.tensors())
    if (t.name != except) w.add(t.name, t.dtype, t.shape, f.bytes(t));
}

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: make_corpus <dir>\n");
    return 2;
  }
  const fs::path dir = argv[1];
  fs::create_directories(dir);
  auto& fx = dion_fuzz::fixture();
  fx.muon.step();
  fx.dion.step();
  const auto muon = dion::checkpoint::save_bytes(fx.muon);
  const auto dion = dion::checkpoint::save_bytes(fx.dion);
  put(dir, "valid-muon.safetensors", muon);
  put(dir, "valid-dion.safetensors", dion);
  put(dir, "truncated-muon-half.safetensors", std::vector<std::byte>(muon.begin(), muon.begin() + static_cast<long>(muon.size() / 2)));
  put(dir, "truncated-dion-minus1.safetensors", std::vector<std::byte>(dion.begin(), dion.end() - 1));
  put(dir, "truncated-7.bin", std::vector<std::byte>(muon.begin(), muon.begin() + 7));
  // Format 1.1: "w/momentum" described as a sharded piece covering its whole global tensor (loads),
  // rows [2, 4) of it only (a gap: "incomplete checkpoint"), and Dion's orientation recorded.
  put(dir, "valid-muon-1.1-sharded.safetensors", remake(muon, [](auto& s, auto& w, const auto& f) {
        s["format_version"] = "1.1";
        s["tensors"]["w/momentum"]["shard"] = {{"offsets", {0, 0}}, {"global_shape", {4, 3}}};
        s["tensors"]["v/momentum"]["shard"] = {{"offsets", {0, 0}}, {"global_shape", {3, 5}}};
        copy_tensors(w, f);
      }));
  put(dir, "incomplete-muon-1.1-gap.safetensors", remake(muon, [](auto& s, auto& w, const auto& f) {
        s["format_version"] = "1.1";
        const auto rows = f.bytes("w/momentum").subspan(6 * sizeof(float));  // rows 2 and 3 of 4x3
        w.add("w/momentum", dion::safetensors::Dtype::F32, {2, 3}, rows);
        s["tensors"]["w/momentum"] = {{"crc32c", dion::checkpoint::crc_hex(dion::checkpoint::crc32c(rows))},
                                      {"shard", {{"offsets", {2, 0}}, {"global_shape", {4, 3}}}}};
        copy_tensors(w, f, "w/momentum");
      }));
  put(dir, "valid-dion-1.1-transposed.safetensors", remake(dion, [](auto& s, auto& w, const auto& f) {
        s["format_version"] = "1.1";
        s["params"]["w"]["transposed"] = false;
        s["params"]["v"]["transposed"] = true;
        copy_tensors(w, f);
      }));
  auto flipped = dion;
  flipped[flipped.size() - 3] ^= std::byte{0x40};
  put(dir, "bitflip-payload.safetensors", flipped);
  const auto tmp = fs::temp_directory_path() / "dion-make-corpus";
  fs::remove_all(tmp);
  dion::checkpoint::save(fx.muon, tmp);
  {
    std::ifstream f(tmp / "manifest.json", std::ios::binary);
    std::string m((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    put(dir, "manifest.json", text(m));
  }
  fs::remove_all(tmp);
  put(dir, "manifest-world2.json", text(R"({"format":"dion.checkpoint","format_version":"1.0","checksum":"crc32c",)"
                                        R"("optimizer":"muon","world_size":2,"files":[{"rank":0,"name":"rank-00000-of-00002.safetensors","bytes":9,"crc32c":"00000000"}]})"));
  put(dir, "hostile-shape-overflow.safetensors",
      st_file(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,16]}})", 16));
  put(dir, "hostile-offsets-past-eof.safetensors",
      st_file(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,1099511627776]}})", 16));
  put(dir, "hostile-overlap.safetensors",
      st_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12));
  put(dir, "hostile-zero-size-alias.safetensors",
      st_file(R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[4,4]},"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 8));
  put(dir, "hostile-header-too-large.safetensors", st_file("{}", 0, std::uint64_t{1} << 40));
  put(dir, "hostile-huge-numel-no-data.safetensors",
      st_file(R"({"a":{"dtype":"F64","shape":[1000000000],"data_offsets":[0,8000000000]}})", 0));
  put(dir, "hostile-deep-nesting.safetensors",
      st_file(R"({"__metadata__":{"format":"dion.checkpoint","format_version":"1.0","dion.state.crc32c":"00000000","dion.state":")" +
                  std::string(2000, '[') + R"("}})", 0));
  put(dir, "hostile-duplicate-keys.safetensors",
      st_file(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 4));
  put(dir, "hostile-unknown-dtype.safetensors", st_file(R"({"a":{"dtype":"Q7","shape":[1],"data_offsets":[0,4]}})", 4));
  put(dir, "hostile-future-version.safetensors",
      st_file(R"({"__metadata__":{"format":"dion.checkpoint","format_version":"9.0"}})", 0));
  std::printf("corpus written to %s\n", dir.c_str());
  return 0;
}
