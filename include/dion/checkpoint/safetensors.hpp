// Bounds-checked safetensors reader and writer.
//
// Format: an 8-byte little-endian u64 header length N, N bytes of a JSON object
//   {"__metadata__": {"key": "value", ...},
//    "<name>": {"dtype": "F32", "shape": [d0, d1, ...], "data_offsets": [begin, end]}, ...}
// then the data region; offsets are relative to the start of the data region.
//
// Threat model (RELIABILITY.md §1.7, C5, C9, C10): the input is hostile. Every size the file claims
// is checked against the bytes that are really there before anything proportional to it is
// allocated; the checks mirror Python safetensors' SafeTensorError list (HeaderTooLarge,
// HeaderTooSmall, InvalidHeaderLength, InvalidOffset, TensorInvalidInfo, MetadataIncompleteBuffer,
// ValidationOverflow). Every rejection is a dion::CheckpointError naming the problem and the tensor;
// a well-formed file that uses a dtype this library does not know is a dion::CheckpointIncompatible.
// The parsing functions (parse_header, File::view) are pure functions of a byte span, so the
// libFuzzer harness calls exactly the code that File::load runs.
//
// Writing is deterministic (RELIABILITY C2): tensors sorted by name, data in the same order, header
// padded with spaces to a multiple of 8 bytes, no uninitialized bytes. write_file() is atomic
// (RELIABILITY §1.7, C4, C18): temp file in the same directory, fsync, rename, fsync(directory);
// on failure the temp file is removed and the previous file is left untouched.
#pragma once

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <tuple>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "dion/core/bf16.hpp"
#include "dion/core/error.hpp"
#include "dion/core/view.hpp"

namespace dion::safetensors {

// safetensors is little-endian on disk; tensor bytes are handed out and converted without swapping.
static_assert(std::endian::native == std::endian::little,
              "dion::safetensors supports little-endian hosts only");

using ::dion::detail::concat;

/// Largest accepted JSON header (Python safetensors' MAX_HEADER_SIZE is 100 MB; we use 100 MiB).
inline constexpr std::uint64_t kMaxHeaderBytes = std::uint64_t{100} << 20;
/// Smallest possible header: "{}".
inline constexpr std::uint64_t kMinHeaderBytes = 2;

/// Element types of the safetensors format that this library can size. Unknown dtype strings are
/// rejected with CheckpointIncompatible (RELIABILITY C7).
enum class Dtype : std::uint8_t { BOOL, U8, I8, F8_E5M2, F8_E4M3, I16, U16, F16, BF16, I32, U32, F32, I64, U64, F64 };

namespace detail {
struct DtypeInfo {
  Dtype dtype;
  std::string_view name;
  std::size_t size;
};
inline constexpr std::array<DtypeInfo, 15> kDtypes{{
    {Dtype::BOOL, "BOOL", 1},   {Dtype::U8, "U8", 1},   {Dtype::I8, "I8", 1},
    {Dtype::F8_E5M2, "F8_E5M2", 1}, {Dtype::F8_E4M3, "F8_E4M3", 1}, {Dtype::I16, "I16", 2},
    {Dtype::U16, "U16", 2},     {Dtype::F16, "F16", 2}, {Dtype::BF16, "BF16", 2},
    {Dtype::I32, "I32", 4},     {Dtype::U32, "U32", 4}, {Dtype::F32, "F32", 4},
    {Dtype::I64, "I64", 8},     {Dtype::U64, "U64", 8}, {Dtype::F64, "F64", 8},
}};
}  // namespace detail

/// Bytes per element of `t`.
inline constexpr std::size_t dtype_size(Dtype t) {
  for (const auto& d : detail::kDtypes)
    if (d.dtype == t) return d.size;
  return 0;
}
/// The format's spelling of `t` ("F32", "BF16", ...).
inline constexpr std::string_view dtype_name(Dtype t) {
  for (const auto& d : detail::kDtypes)
    if (d.dtype == t) return d.name;
  return "?";
}
/// Parse a dtype string; nullopt if unknown.
inline constexpr std::optional<Dtype> dtype_from_name(std::string_view s) {
  for (const auto& d : detail::kDtypes)
    if (d.name == s) return d.dtype;
  return std::nullopt;
}
/// The safetensors dtype of a dion element type.
inline constexpr Dtype to_safetensors(DType t) { return t == DType::f32 ? Dtype::F32 : Dtype::BF16; }
/// A dion::Shape as the dims vector used here.
inline std::vector<std::int64_t> shape_dims(const Shape& s) {
  return std::vector<std::int64_t>(s.dims.begin(), s.dims.begin() + s.ndim);
}

namespace detail {

/// Quote an untrusted string for an error message: printable ASCII kept, other bytes as \xNN, long
/// names cut (a hostile name may be megabytes long).
inline std::string quote(std::string_view s, std::size_t max_chars = 120) {
  static constexpr char hex[] = "0123456789abcdef";
  std::string r = "'";
  std::size_t i = 0;
  for (; i < s.size() && r.size() < max_chars; ++i) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c >= 0x20 && c < 0x7f && c != '\\' && c != '\'') {
      r += static_cast<char>(c);
    } else {
      r += "\\x";
      r += hex[c >> 4];
      r += hex[c & 15];
    }
  }
  r += "'";
  if (i < s.size()) r += concat("...(", s.size(), " bytes)");
  return r;
}

inline std::string tensor_label(std::string_view name) { return "tensor " + quote(name); }

template <class... Args>
[[noreturn]] void fail(Args&&... args) {
  throw CheckpointError(concat("safetensors: ", std::forward<Args>(args)...));
}

inline bool mul_overflows(std::uint64_t a, std::uint64_t b, std::uint64_t* out) {
  if (a != 0 && b > std::numeric_limits<std::uint64_t>::max() / a) return true;
  *out = a * b;
  return false;
}

inline std::string dims_str(const std::vector<std::int64_t>& d) {
  std::string s = "[";
  for (std::size_t i = 0; i < d.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(d[i]);
  }
  return s + "]";
}

inline std::uint64_t load_le_u64(const std::byte* p) {
  std::uint64_t v;
  std::memcpy(&v, p, 8);  // little-endian host (static_assert above); memcpy: p may be unaligned
  return v;
}

inline std::string errno_text(int err) { return std::generic_category().message(err); }

}  // namespace detail

/// One tensor entry of a validated header.
struct TensorInfo {
  std::string name;
  Dtype dtype = Dtype::F32;
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0;  // offsets into the data region (not the file)
  std::uint64_t end = 0;
  std::int64_t numel = 0;

  std::uint64_t nbytes() const { return end - begin; }
  std::string_view dtype_name() const { return safetensors::dtype_name(dtype); }
};

/// A parsed and fully validated header: every entry lies inside the data region, sizes agree with
/// shapes, and the entries tile the data region exactly (no overlap, no hole).
struct Header {
  std::vector<TensorInfo> tensors;  // in file (JSON) order
  std::map<std::string, std::string> metadata;
  std::uint64_t header_bytes = 0;  // N, the JSON length including padding
  std::uint64_t data_offset = 0;   // 8 + N: where the data region starts in the file
  std::uint64_t data_bytes = 0;    // size of the data region
};

namespace detail {

/// SAX handler for the header JSON. A SAX parse (rather than a DOM) lets us reject off-schema input
/// at the first wrong token, keep the file order of entries, detect duplicate keys (a DOM silently
/// keeps one), and never build deep structures: the schema has depth 3, anything deeper is refused.
class HeaderSax final : public nlohmann::json_sax<nlohmann::json> {
 public:
  explicit HeaderSax(Header& out) : out_(out) {}

  bool done() const { return where_ == Where::Done; }

  bool null() override { unexpected("null"); }
  bool boolean(bool) override { unexpected("a boolean"); }
  bool number_integer(number_integer_t v) override {
    if (v >= 0) return number_unsigned(static_cast<number_unsigned_t>(v));  // "-0"
    unexpected(concat("the negative integer ", v));
  }
  bool number_unsigned(number_unsigned_t v) override {
    if (where_ == Where::Shape) {
      if (v > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
        fail(tensor_label(cur_.name), " shape dimension ", v, " exceeds the int64 range");
      cur_.shape.push_back(static_cast<std::int64_t>(v));
      return true;
    }
    if (where_ == Where::Offsets) {
      if (noffsets_ >= 2) fail(tensor_label(cur_.name), " data_offsets must hold exactly 2 integers, got more");
      offsets_[noffsets_++] = v;
      return true;
    }
    unexpected(concat("the integer ", v));
  }
  bool number_float(number_float_t, const string_t& s) override {
    // Also reached for integers beyond u64, which nlohmann parses as doubles.
    unexpected("the non-integer number " + quote(s, 40));
  }
  bool string(string_t& v) override {
    if (where_ == Where::Metadata) {
      out_.metadata.emplace(meta_key_, std::move(v));
      return true;
    }
    if (where_ == Where::Entry && field_ == Field::Dtype) {
      const auto d = dtype_from_name(v);
      if (!d)
        throw CheckpointIncompatible(concat("safetensors: ", tensor_label(cur_.name), " has unknown dtype ",
                                            quote(v, 40), " (supported: BOOL, U8, I8, F8_E5M2, F8_E4M3, I16, "
                                            "U16, F16, BF16, I32, U32, F32, I64, U64, F64)"));
      cur_.dtype = *d;
      return true;
    }
    unexpected("a string");
  }
  bool binary(binary_t&) override { unexpected("binary data"); }

  bool start_object(std::size_t) override {
    if (where_ == Where::Top) {
      where_ = Where::Root;
      return true;
    }
    if (where_ == Where::Root) {
      if (key_ == "__metadata__") {
        where_ = Where::Metadata;
      } else {
        cur_ = TensorInfo{};
        cur_.name = key_;
        seen_fields_ = 0;
        noffsets_ = 0;
        where_ = Where::Entry;
      }
      return true;
    }
    unexpected("an object");
  }
  bool key(string_t& k) override {
    switch (where_) {
      case Where::Root:
        if (k == "__metadata__") {
          if (have_metadata_) fail("duplicate key '__metadata__' in the header");
          have_metadata_ = true;
        } else if (!names_.emplace(k).second) {
          fail("duplicate tensor name ", quote(k), " in the header");
        }
        key_ = std::move(k);
        return true;
      case Where::Metadata:
        if (out_.metadata.count(k)) fail("duplicate __metadata__ key ", quote(k));
        meta_key_ = std::move(k);
        return true;
      case Where::Entry: {
        if (k == "dtype") field_ = Field::Dtype;
        else if (k == "shape") field_ = Field::Shape;
        else if (k == "data_offsets") field_ = Field::Offsets;
        else fail(tensor_label(cur_.name), " has unknown field ", quote(k, 40),
                  " (allowed: dtype, shape, data_offsets)");
        const unsigned bit = 1u << static_cast<unsigned>(field_);
        if (seen_fields_ & bit) fail(tensor_label(cur_.name), " has a duplicate field ", quote(k));
        seen_fields_ |= bit;
        return true;
      }
      default:
        fail("internal: key outside an object");  // the JSON grammar makes this unreachable
    }
  }
  bool end_object() override {
    switch (where_) {
      case Where::Metadata:
        where_ = Where::Root;
        return true;
      case Where::Entry:
        if (!(seen_fields_ & 1u)) fail(tensor_label(cur_.name), " is missing 'dtype'");
        if (!(seen_fields_ & 2u)) fail(tensor_label(cur_.name), " is missing 'shape'");
        if (!(seen_fields_ & 4u)) fail(tensor_label(cur_.name), " is missing 'data_offsets'");
        cur_.begin = offsets_[0];
        cur_.end = offsets_[1];
        out_.tensors.push_back(std::move(cur_));
        where_ = Where::Root;
        return true;
      case Where::Root:
        where_ = Where::Done;
        return true;
      default:
        fail("internal: unbalanced object");
    }
  }
  bool start_array(std::size_t) override {
    if (where_ == Where::Entry && field_ == Field::Shape) {
      where_ = Where::Shape;
      return true;
    }
    if (where_ == Where::Entry && field_ == Field::Offsets) {
      where_ = Where::Offsets;
      return true;
    }
    unexpected("an array");
  }
  bool end_array() override {
    if (where_ == Where::Shape) {
      where_ = Where::Entry;
      return true;
    }
    if (where_ == Where::Offsets) {
      if (noffsets_ != 2)
        fail(tensor_label(cur_.name), " data_offsets must hold exactly 2 integers, got ", noffsets_);
      where_ = Where::Entry;
      return true;
    }
    fail("internal: unbalanced array");
  }
  bool parse_error(std::size_t pos, const std::string&, const nlohmann::detail::exception& ex) override {
    // ex.what() quotes the last token, which a hostile header can make huge: cut it.
    std::string msg = ex.what();
    if (msg.size() > 300) msg = msg.substr(0, 300) + "...";
    fail("header is not valid JSON (at byte ", pos, "): ", msg);
  }

 private:
  enum class Where { Top, Root, Metadata, Entry, Shape, Offsets, Done };
  enum class Field : unsigned { Dtype = 0, Shape = 1, Offsets = 2 };

  [[noreturn]] void unexpected(const std::string& what) const {
    switch (where_) {
      case Where::Top:
        fail("header is not a JSON object (found ", what, ")");
      case Where::Root:
        if (key_ == "__metadata__") fail("__metadata__ must be an object of string values, found ", what);
        fail(tensor_label(key_), " must be an object {dtype, shape, data_offsets}, found ", what);
      case Where::Metadata:
        fail("__metadata__ value for key ", quote(meta_key_), " must be a string, found ", what);
      case Where::Entry:
        if (field_ == Field::Dtype) fail(tensor_label(cur_.name), " dtype must be a string, found ", what);
        if (field_ == Field::Shape)
          fail(tensor_label(cur_.name), " shape must be an array of non-negative integers, found ", what);
        fail(tensor_label(cur_.name), " data_offsets must be an array of 2 non-negative integers, found ", what);
      case Where::Shape:
        fail(tensor_label(cur_.name), " shape dimensions must be non-negative integers, found ", what);
      case Where::Offsets:
        fail(tensor_label(cur_.name), " data_offsets must be non-negative integers, found ", what);
      case Where::Done:
        break;
    }
    fail("unexpected ", what, " after the header object");
  }

  Header& out_;
  Where where_ = Where::Top;
  std::string key_;       // current root key
  std::string meta_key_;  // current __metadata__ key
  bool have_metadata_ = false;
  std::set<std::string, std::less<>> names_;  // tensor names seen (duplicate detection)
  TensorInfo cur_;
  Field field_ = Field::Dtype;
  unsigned seen_fields_ = 0;
  std::array<std::uint64_t, 2> offsets_{};
  std::size_t noffsets_ = 0;
};

}  // namespace detail

/// Validate the 8-byte length prefix of a file of `file_size` bytes (`prefix` holds its first
/// min(8, file_size) bytes) and return the header length N.
inline std::uint64_t parse_header_length(std::span<const std::byte> prefix, std::uint64_t file_size) {
  if (file_size < 8 || prefix.size() < 8)
    detail::fail("truncated at ", std::min<std::uint64_t>(file_size, prefix.size()),
                 " bytes: a file starts with an 8-byte header length");
  const std::uint64_t n = detail::load_le_u64(prefix.data());
  if (n < kMinHeaderBytes) detail::fail("header length ", n, " is too small (at least 2 bytes: \"{}\")");
  if (n > kMaxHeaderBytes) detail::fail("header length ", n, " exceeds the limit of ", kMaxHeaderBytes, " bytes");
  if (n > file_size - 8)
    detail::fail("truncated at ", file_size, " bytes: the header length ", n, " exceeds the ", file_size - 8,
                 " bytes after the length prefix");
  return n;
}

/// Parse and validate the JSON header `json` (exactly N bytes) for a data region of `data_bytes`.
/// Pure: no I/O, allocations bounded by the size of `json`.
inline Header parse_header_json(std::string_view json, std::uint64_t data_bytes) {
  Header h;
  h.header_bytes = json.size();
  h.data_offset = 8 + json.size();
  h.data_bytes = data_bytes;
  // Python safetensors rejects a header that does not start with '{' (InvalidHeaderStart).
  if (json.empty() || json.front() != '{')
    detail::fail("header is not a JSON object (it must start with '{')");
  // nlohmann's lexer ends the input at a NUL byte, so a NUL in the padding (or anywhere) would hide
  // what follows it; JSON has no raw NUL (inside strings it is escaped), so refuse it outright.
  if (const auto z = json.find('\0'); z != std::string_view::npos)
    detail::fail("header is not valid JSON (at header byte ", z, "): a raw NUL byte (padding must be spaces)");
  {
    detail::HeaderSax sax(h);
    const bool ok = nlohmann::json::sax_parse(json.data(), json.data() + json.size(), &sax,
                                              nlohmann::json::input_format_t::json, /*strict=*/true);
    if (!ok || !sax.done()) detail::fail("header is not a complete JSON object");
  }

  // Per-entry checks, with overflow-checked u64 arithmetic (safetensors-cpp's shape product once
  // wrapped to 4: RELIABILITY C9).
  for (auto& t : h.tensors) {
    const auto label = detail::tensor_label(t.name);
    std::uint64_t numel = 1;
    for (const auto d : t.shape)
      if (detail::mul_overflows(numel, static_cast<std::uint64_t>(d), &numel))
        detail::fail(label, " shape ", detail::dims_str(t.shape), " element count overflows 64 bits");
    std::uint64_t nbytes = 0;
    if (detail::mul_overflows(numel, dtype_size(t.dtype), &nbytes))
      detail::fail(label, " shape ", detail::dims_str(t.shape), " of ", t.dtype_name(),
                   " byte size overflows 64 bits");
    if (t.begin > t.end)
      detail::fail(label, " data_offsets [", t.begin, ", ", t.end, ") have begin > end");
    if (t.end > data_bytes)
      detail::fail(label, " data_offsets [", t.begin, ", ", t.end, ") exceed the data region of ", data_bytes,
                   " bytes (file truncated?)");
    if (t.end - t.begin != nbytes)
      detail::fail(label, " shape ", detail::dims_str(t.shape), " of ", t.dtype_name(), " needs ", nbytes,
                   " bytes but data_offsets [", t.begin, ", ", t.end, ") hold ", t.end - t.begin);
    t.numel = static_cast<std::int64_t>(numel);  // <= nbytes <= data_bytes, so it fits
  }

  // The entries must tile the data region exactly: sorted by offsets, each begins where the previous
  // ended (overlap = aliasing, hole = unaccounted bytes; Python safetensors: InvalidOffset and
  // MetadataIncompleteBuffer). Zero-size entries are allowed where they touch no other entry's bytes.
  std::vector<std::size_t> order(h.tensors.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    const auto& x = h.tensors[a];
    const auto& y = h.tensors[b];
    return std::tie(x.begin, x.end, x.name) < std::tie(y.begin, y.end, y.name);
  });
  std::uint64_t expect = 0;
  const TensorInfo* prev = nullptr;
  for (const auto i : order) {
    const auto& t = h.tensors[i];
    if (t.begin < expect)
      detail::fail(detail::tensor_label(t.name), " data_offsets [", t.begin, ", ", t.end, ") overlap ",
                   detail::tensor_label(prev->name), " [", prev->begin, ", ", prev->end, ")");
    if (t.begin > expect)
      detail::fail("hole in the data region: bytes [", expect, ", ", t.begin, ") before ",
                   detail::tensor_label(t.name), " belong to no tensor");
    expect = t.end;
    prev = &t;
  }
  if (expect != data_bytes)
    detail::fail("the data region holds ", data_bytes, " bytes but the tensors cover only ", expect,
                 " (trailing bytes [", expect, ", ", data_bytes, ") belong to no tensor)");
  return h;
}

/// Parse and validate the header of a whole file image. Pure and bounds-checked: the entry point a
/// fuzzer calls. The returned offsets are guaranteed to lie inside `file`.
inline Header parse_header(std::span<const std::byte> file) {
  const std::uint64_t n = parse_header_length(file.first(std::min<std::size_t>(8, file.size())), file.size());
  const std::string_view json(reinterpret_cast<const char*>(file.data()) + 8, static_cast<std::size_t>(n));
  return parse_header_json(json, file.size() - 8 - n);
}

namespace detail {
/// IEEE half -> float, exact for every input (subnormals normalized, NaN payload kept).
inline float f16_to_f32(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  std::uint32_t exp = (h >> 10) & 0x1fu;
  std::uint32_t mant = h & 0x3ffu;
  std::uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);  // rebias 15 -> 127
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal: mant * 2^-24; shift the leading 1 into the implicit position
    int e = -14;
    while (!(mant & 0x400u)) {
      mant <<= 1;
      --e;
    }
    bits = sign | (static_cast<std::uint32_t>(e + 127) << 23) | ((mant & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
/// double -> float with IEEE round-to-nearest overflow to +-inf. A plain cast of an out-of-range
/// double is undefined behaviour in C++ (UBSan float-cast-overflow), and file data is untrusted.
inline float f64_to_f32(double d) {
  if (std::isnan(d)) return std::copysign(std::numeric_limits<float>::quiet_NaN(), static_cast<float>(std::signbit(d) ? -1 : 1));
  constexpr double kMax = static_cast<double>(std::numeric_limits<float>::max());
  constexpr double kOverflow = kMax + 0x1p103;  // halfway between FLT_MAX and 2^128: ties go to inf
  const double a = std::fabs(d);
  if (a > kMax) {
    const float r = a >= kOverflow ? std::numeric_limits<float>::infinity() : std::numeric_limits<float>::max();
    return d < 0 ? -r : r;
  }
  return static_cast<float>(d);
}
}  // namespace detail

/// A validated safetensors file in memory. Cheap to copy (the bytes are shared); spans returned by
/// bytes() stay valid while any copy of the File, or the caller's buffer for File::view, is alive.
class File {
 public:
  File() = default;

  /// Validate `bytes`, then copy them (the File owns its copy).
  static File parse(std::span<const std::byte> bytes) {
    Header h = parse_header(bytes);
    auto owned = std::make_shared<const std::vector<std::byte>>(bytes.begin(), bytes.end());
    return File(std::move(h), std::move(owned));
  }
  static File parse(std::string_view bytes) {
    return parse(std::span<const std::byte>(reinterpret_cast<const std::byte*>(bytes.data()), bytes.size()));
  }
  /// Validate and take ownership without copying.
  static File parse(std::vector<std::byte>&& bytes) {
    Header h = parse_header(bytes);
    auto owned = std::make_shared<const std::vector<std::byte>>(std::move(bytes));
    return File(std::move(h), std::move(owned));
  }
  /// Validate without copying: `bytes` must outlive the File and its copies (fuzzer, mmap).
  static File view(std::span<const std::byte> bytes) {
    File f;
    f.header_ = parse_header(bytes);
    f.buf_ = bytes;
    f.build_index();
    return f;
  }

  /// Read and validate a file. The header is read and validated first, so a hostile length or offset
  /// is refused before the data region is allocated; the file is then read whole. `max_file_bytes`
  /// optionally caps the file size (default: no cap beyond what the header validates).
  static File load(const std::filesystem::path& path,
                   std::uint64_t max_file_bytes = std::numeric_limits<std::uint64_t>::max()) {
    const std::string p = path.string();
    Fd fd;
    std::uint64_t size = 0;
    std::array<std::byte, 8> prefix{};
    std::string json;
    Header h = open_header(path, max_file_bytes, fd, size, prefix, json);
    const std::uint64_t n = json.size();
    auto buf = std::make_shared<std::vector<std::byte>>(static_cast<std::size_t>(size));
    std::memcpy(buf->data(), prefix.data(), 8);
    std::memcpy(buf->data() + 8, json.data(), json.size());
    const std::uint64_t rest = size - 8 - n;
    if (read_at(fd.fd, buf->data() + 8 + n, rest, 8 + n, p) != rest)
      detail::fail("'", p, "' is truncated: it shrank while being read");
    return File(std::move(h), std::move(buf));
  }

  /// Read and validate only the header of a file (length prefix and JSON: tensor entries, metadata,
  /// offsets against the file's size); the data region is not read. For indexes of large files.
  static Header load_header(const std::filesystem::path& path,
                            std::uint64_t max_file_bytes = std::numeric_limits<std::uint64_t>::max()) {
    Fd fd;
    std::uint64_t size = 0;
    std::array<std::byte, 8> prefix{};
    std::string json;
    return open_header(path, max_file_bytes, fd, size, prefix, json);
  }

  const Header& header() const { return header_; }
  /// All entries, in file order.
  const std::vector<TensorInfo>& tensors() const { return header_.tensors; }
  std::size_t size() const { return header_.tensors.size(); }
  /// Tensor names in file (JSON header) order.
  std::vector<std::string> names() const {
    std::vector<std::string> r;
    r.reserve(header_.tensors.size());
    for (const auto& t : header_.tensors) r.push_back(t.name);
    return r;
  }
  /// Tensor names sorted (byte order).
  std::vector<std::string> sorted_names() const {
    std::vector<std::string> r;
    r.reserve(index_.size());
    for (const auto& [name, i] : index_) r.push_back(name);
    return r;
  }
  bool has(std::string_view name) const { return index_.find(name) != index_.end(); }
  /// The entry for `name`; CheckpointError if absent.
  const TensorInfo& info(std::string_view name) const {
    const auto it = index_.find(name);
    if (it == index_.end())
      detail::fail("no tensor named ", detail::quote(name), " (the file has ", index_.size(), " tensors)");
    return header_.tensors[it->second];
  }
  Dtype dtype(std::string_view name) const { return info(name).dtype; }
  std::string_view dtype_name(std::string_view name) const { return info(name).dtype_name(); }
  const std::vector<std::int64_t>& shape(std::string_view name) const { return info(name).shape; }
  std::int64_t numel(std::string_view name) const { return info(name).numel; }
  /// The raw little-endian bytes of a tensor (not necessarily aligned: copy with memcpy).
  std::span<const std::byte> bytes(std::string_view name) const { return bytes(info(name)); }
  std::span<const std::byte> bytes(const TensorInfo& t) const {
    return buf_.subspan(static_cast<std::size_t>(header_.data_offset + t.begin), static_cast<std::size_t>(t.nbytes()));
  }
  const std::map<std::string, std::string>& metadata() const { return header_.metadata; }
  /// The metadata value for `key`, or nullopt.
  std::optional<std::string> metadata(std::string_view key) const {
    const auto it = header_.metadata.find(std::string(key));
    if (it == header_.metadata.end()) return std::nullopt;
    return it->second;
  }
  /// The whole file image.
  std::span<const std::byte> buffer() const { return buf_; }

  /// A tensor's values as float, converted from F32, BF16, F16 (exact) or F64 (rounded).
  std::vector<float> read_f32(std::string_view name) const {
    const auto& t = info(name);
    std::vector<float> out(static_cast<std::size_t>(t.numel));  // numel <= bytes present: bounded
    convert_f32(t, out);
    return out;
  }
  /// As read_f32, into caller memory of exactly numel floats.
  void read_f32_into(std::string_view name, std::span<float> out) const {
    const auto& t = info(name);
    if (out.size() != static_cast<std::size_t>(t.numel))
      throw ShapeMismatch(concat("safetensors: ", detail::tensor_label(t.name), " has ", t.numel,
                                 " elements, the destination holds ", out.size()));
    convert_f32(t, out);
  }

 private:
  struct Fd {
    int fd = -1;
    ~Fd() {
      if (fd >= 0) ::close(fd);
    }
  };

  // Open `path`, check its size, read and validate the length prefix and the JSON header.
  static Header open_header(const std::filesystem::path& path, std::uint64_t max_file_bytes, Fd& fd,
                            std::uint64_t& size, std::array<std::byte, 8>& prefix, std::string& json) {
    const std::string p = path.string();
    fd.fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd.fd < 0) throw IoError(concat("safetensors: cannot open '", p, "': ", detail::errno_text(errno)));
    struct stat st {};
    if (::fstat(fd.fd, &st) != 0)
      throw IoError(concat("safetensors: cannot stat '", p, "': ", detail::errno_text(errno)));
    if (!S_ISREG(st.st_mode)) throw IoError(concat("safetensors: '", p, "' is not a regular file"));
    size = static_cast<std::uint64_t>(st.st_size);
    if (size > max_file_bytes)
      detail::fail("'", p, "' is ", size, " bytes, over the limit of ", max_file_bytes);
    if (size > std::numeric_limits<std::size_t>::max() / 2)
      detail::fail("'", p, "' is ", size, " bytes, too large for this address space");
    const std::size_t got = read_at(fd.fd, prefix.data(), std::min<std::uint64_t>(8, size), 0, p);
    std::uint64_t n;
    try {
      n = parse_header_length(std::span<const std::byte>(prefix.data(), got), size);
    } catch (const CheckpointError& e) {
      throw CheckpointError(concat(e.what(), " (file '", p, "')"));
    }
    json.assign(static_cast<std::size_t>(n), '\0');
    if (read_at(fd.fd, json.data(), n, 8, p) != n) detail::fail("'", p, "' shrank while being read");
    try {
      return parse_header_json(json, size - 8 - n);
    } catch (const CheckpointIncompatible& e) {
      throw CheckpointIncompatible(concat(e.what(), " (file '", p, "')"));
    } catch (const CheckpointError& e) {
      throw CheckpointError(concat(e.what(), " (file '", p, "')"));
    }
  }

  File(Header h, std::shared_ptr<const std::vector<std::byte>> owned) : header_(std::move(h)), owned_(std::move(owned)) {
    buf_ = std::span<const std::byte>(owned_->data(), owned_->size());
    build_index();
  }

  void build_index() {
    index_.clear();
    for (std::size_t i = 0; i < header_.tensors.size(); ++i) index_.emplace(header_.tensors[i].name, i);
  }

  // pread until n bytes or EOF; returns bytes read. EINTR retried; errors throw IoError.
  static std::uint64_t read_at(int fd, void* dst, std::uint64_t n, std::uint64_t off, const std::string& p) {
    std::uint64_t done = 0;
    auto* d = static_cast<char*>(dst);
    while (done < n) {
      const std::size_t chunk = static_cast<std::size_t>(std::min<std::uint64_t>(n - done, std::uint64_t{1} << 30));
      const ssize_t r = ::pread(fd, d + done, chunk, static_cast<off_t>(off + done));
      if (r < 0) {
        if (errno == EINTR) continue;
        throw IoError(concat("safetensors: reading '", p, "' failed: ", detail::errno_text(errno)));
      }
      if (r == 0) break;
      done += static_cast<std::uint64_t>(r);
    }
    return done;
  }

  void convert_f32(const TensorInfo& t, std::span<float> out) const {
    const auto src = bytes(t);
    const std::byte* s = src.data();
    const std::size_t n = out.size();
    switch (t.dtype) {
      case Dtype::F32:
        if (n) std::memcpy(out.data(), s, n * 4);
        return;
      case Dtype::BF16:
        for (std::size_t i = 0; i < n; ++i) {
          std::uint16_t b;
          std::memcpy(&b, s + 2 * i, 2);
          out[i] = bf16::to_float(b);
        }
        return;
      case Dtype::F16:
        for (std::size_t i = 0; i < n; ++i) {
          std::uint16_t b;
          std::memcpy(&b, s + 2 * i, 2);
          out[i] = detail::f16_to_f32(b);
        }
        return;
      case Dtype::F64:
        for (std::size_t i = 0; i < n; ++i) {
          double d;
          std::memcpy(&d, s + 8 * i, 8);
          out[i] = detail::f64_to_f32(d);
        }
        return;
      default:
        throw CheckpointIncompatible(concat("safetensors: ", detail::tensor_label(t.name), " has dtype ",
                                            t.dtype_name(), "; read_f32 converts F32, BF16, F16 and F64 only"));
    }
  }

  Header header_;
  std::map<std::string, std::size_t, std::less<>> index_;  // name -> position in header_.tensors
  std::shared_ptr<const std::vector<std::byte>> owned_;    // null for File::view
  std::span<const std::byte> buf_;
};

// ---------------------------------------------------------------------------------------------
// Writing

/// Destination of serialized bytes: write() consumes all of `bytes` or throws IoError. The writer
/// goes through this interface so tests can inject failures (FaultInjectionSink).
class Sink {
 public:
  virtual ~Sink() = default;
  virtual void write(std::span<const std::byte> bytes) = 0;
};

/// Appends to a byte vector.
class MemorySink final : public Sink {
 public:
  explicit MemorySink(std::vector<std::byte>& out) : out_(out) {}
  void write(std::span<const std::byte> b) override { out_.insert(out_.end(), b.begin(), b.end()); }

 private:
  std::vector<std::byte>& out_;
};

/// Writes to a POSIX file descriptor (not owned), looping over short writes and EINTR.
class FdSink final : public Sink {
 public:
  FdSink(int fd, std::string path) : fd_(fd), path_(std::move(path)) {}
  void write(std::span<const std::byte> b) override {
    std::size_t done = 0;
    while (done < b.size()) {
      const std::size_t chunk = std::min<std::size_t>(b.size() - done, std::size_t{1} << 30);
      const ssize_t r = ::write(fd_, b.data() + done, chunk);
      if (r < 0) {
        if (errno == EINTR) continue;
        throw IoError(concat("write to '", path_, "' failed after ", written_ + done, " bytes: ",
                             detail::errno_text(errno)));
      }
      if (r == 0)  // no progress and no errno: treat as device full rather than spin
        throw IoError(concat("write to '", path_, "' made no progress after ", written_ + done, " bytes: ",
                             detail::errno_text(ENOSPC)));
      done += static_cast<std::size_t>(r);
    }
    written_ += done;
  }
  std::uint64_t written() const { return written_; }

 private:
  int fd_;
  std::string path_;
  std::uint64_t written_ = 0;
};

/// Test hook: forwards to `inner` until `fail_after` bytes have passed, writes the bytes up to that
/// point, then throws IoError with strerror(`err`) (ENOSPC models a full disk, EIO a failing one).
class FaultInjectionSink final : public Sink {
 public:
  FaultInjectionSink(Sink& inner, std::uint64_t fail_after, int err = ENOSPC)
      : inner_(inner), limit_(fail_after), err_(err) {}
  void write(std::span<const std::byte> b) override {
    const std::uint64_t room = limit_ - passed_;
    if (b.size() <= room) {
      inner_.write(b);
      passed_ += b.size();
      return;
    }
    if (room) inner_.write(b.first(static_cast<std::size_t>(room)));
    passed_ = limit_;
    throw IoError(concat("write failed after ", limit_, " bytes: ", detail::errno_text(err_), " (injected)"));
  }

 private:
  Sink& inner_;
  std::uint64_t limit_;
  std::uint64_t passed_ = 0;
  int err_;
};

/// Wraps the temp file's sink in write_file (tests: return a FaultInjectionSink around it).
using SinkDecorator = std::function<std::unique_ptr<Sink>(Sink& file_sink)>;

/// Atomically replace `target` with the bytes `produce` writes: temp file in the same directory,
/// fsync, rename over the target, fsync the directory (RELIABILITY §1.7, C4). On any failure the
/// temp file is removed, the previous `target` is left untouched, and IoError names the path and
/// the system error.
inline void atomic_write_file(const std::filesystem::path& target, const std::function<void(Sink&)>& produce,
                              const SinkDecorator& decorate = {}) {
  namespace fs = std::filesystem;
  const std::string tpath = target.string();
  if (!target.has_filename()) throw InvalidArgument(concat("safetensors: '", tpath, "' names no file"));
  const fs::path dir = target.has_parent_path() ? target.parent_path() : fs::path(".");
  static std::atomic<unsigned> counter{0};

  std::string tmp;
  int fd = -1;
  for (int attempt = 0; attempt < 100 && fd < 0; ++attempt) {
    tmp = (dir / concat(".", target.filename().string(), ".tmp.", ::getpid(), ".", counter.fetch_add(1))).string();
    fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0 && errno != EEXIST) break;
  }
  if (fd < 0)
    throw IoError(concat("safetensors: saving '", tpath, "' failed: cannot create temp file '", tmp,
                         "': ", detail::errno_text(errno)));

  auto fail_io = [&](const std::string& what) {
    if (fd >= 0) ::close(fd);
    fd = -1;
    ::unlink(tmp.c_str());
    throw IoError(concat("safetensors: saving '", tpath, "' failed: ", what, "; the previous file is unchanged"));
  };
  try {
    FdSink fsink(fd, tmp);
    if (decorate) {
      const auto s = decorate(fsink);
      produce(*s);
    } else {
      produce(fsink);
    }
  } catch (const IoError& e) {
    fail_io(e.what());
  } catch (...) {
    ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  while (::fsync(fd) != 0) {
    if (errno != EINTR) fail_io(concat("fsync of '", tmp, "': ", detail::errno_text(errno)));
  }
  const int rc = ::close(fd);  // NFS and some others report write errors only at close
  fd = -1;
  if (rc != 0 && errno != EINTR) fail_io(concat("close of '", tmp, "': ", detail::errno_text(errno)));
  if (::rename(tmp.c_str(), tpath.c_str()) != 0)
    fail_io(concat("rename of '", tmp, "' to '", tpath, "': ", detail::errno_text(errno)));

  // Without this the new directory entry can be lost on a crash on some filesystems.
  const int dfd = ::open(dir.string().c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0)
    throw IoError(concat("safetensors: '", tpath, "' was written but its directory could not be opened "
                         "for fsync: ", detail::errno_text(errno)));
  int drc;
  while ((drc = ::fsync(dfd)) != 0 && errno == EINTR) {
  }
  const int derr = errno;
  ::close(dfd);
  if (drc != 0 && derr != EINVAL)  // EINVAL: the filesystem does not support fsync on directories
    throw IoError(concat("safetensors: '", tpath, "' was written but fsync of its directory failed: ",
                         detail::errno_text(derr)));
}

/// Collects tensors and metadata and serializes them deterministically: `__metadata__` first (keys
/// sorted), then tensors sorted by name with their data in the same order, header padded with
/// spaces to a multiple of 8 bytes. Identical inputs give byte-identical output (RELIABILITY C2).
class Writer {
 public:
  /// Add a tensor, copying `data` (little-endian element bytes; size must be numel * dtype size).
  Writer& add(std::string name, Dtype dtype, std::vector<std::int64_t> shape, std::span<const std::byte> data) {
    Entry& e = insert(std::move(name), dtype, std::move(shape), data.size());
    e.owned.assign(data.begin(), data.end());
    e.owns = true;
    return *this;
  }
  /// Add a tensor by reference: `data` must stay alive and unchanged until the last serialization.
  Writer& add_view(std::string name, Dtype dtype, std::vector<std::int64_t> shape, std::span<const std::byte> data) {
    Entry& e = insert(std::move(name), dtype, std::move(shape), data.size());
    e.external = data;
    return *this;
  }
  Writer& add_f32(std::string name, std::vector<std::int64_t> shape, std::span<const float> data) {
    return add(std::move(name), Dtype::F32, std::move(shape), std::as_bytes(data));
  }
  Writer& add_bf16(std::string name, std::vector<std::int64_t> shape, std::span<const bf16> data) {
    return add(std::move(name), Dtype::BF16, std::move(shape), std::as_bytes(data));
  }
  /// Set (or replace) a `__metadata__` string.
  Writer& set_metadata(std::string key, std::string value) {
    check_utf8(key, "metadata key");
    check_utf8(value, "metadata value");
    metadata_[std::move(key)] = std::move(value);
    return *this;
  }
  bool has(std::string_view name) const { return entries_.find(name) != entries_.end(); }
  std::size_t size() const { return entries_.size(); }

  /// The JSON header, padded with spaces to a multiple of 8 bytes.
  std::string header() const {
    std::string h = "{";
    bool need_comma = false;
    if (!metadata_.empty()) {
      h += "\"__metadata__\":{";
      bool first = true;
      for (const auto& [k, v] : metadata_) {
        if (!first) h += ',';
        first = false;
        h += quote_json(k);
        h += ':';
        h += quote_json(v);
      }
      h += '}';
      need_comma = true;
    }
    std::uint64_t off = 0;
    for (const auto& [name, e] : entries_) {
      if (need_comma) h += ',';
      need_comma = true;
      h += quote_json(name);
      h += ":{\"dtype\":\"";
      h += dtype_name(e.dtype);
      h += "\",\"shape\":[";
      for (std::size_t i = 0; i < e.shape.size(); ++i) {
        if (i) h += ',';
        h += std::to_string(e.shape[i]);
      }
      h += "],\"data_offsets\":[";
      h += std::to_string(off);
      h += ',';
      off += e.nbytes;
      h += std::to_string(off);
      h += "]}";
    }
    h += '}';
    h.append((8 - h.size() % 8) % 8, ' ');
    if (h.size() > kMaxHeaderBytes)
      throw InvalidArgument(concat("safetensors: header of ", h.size(), " bytes exceeds the limit of ",
                                   kMaxHeaderBytes, " (too many tensors or metadata)"));
    return h;
  }
  /// Size of the serialized file.
  std::uint64_t file_size() const { return 8 + header().size() + data_bytes(); }

  /// Serialize into `sink`.
  void write_to(Sink& sink) const {
    const std::string h = header();
    std::array<std::byte, 8> len{};
    const std::uint64_t n = h.size();
    std::memcpy(len.data(), &n, 8);  // little-endian host
    sink.write(len);
    sink.write(std::as_bytes(std::span<const char>(h.data(), h.size())));
    for (const auto& [name, e] : entries_)
      if (e.nbytes) sink.write(e.data());
  }
  std::vector<std::byte> to_bytes() const {
    std::vector<std::byte> out;
    out.reserve(static_cast<std::size_t>(file_size()));
    MemorySink s(out);
    write_to(s);
    return out;
  }
  /// Atomically write the file (see atomic_write_file). `decorate` is a test hook.
  void write_file(const std::filesystem::path& path, const SinkDecorator& decorate = {}) const {
    atomic_write_file(path, [this](Sink& s) { write_to(s); }, decorate);
  }

 private:
  struct Entry {
    Dtype dtype = Dtype::F32;
    std::vector<std::int64_t> shape;
    std::uint64_t nbytes = 0;
    bool owns = false;
    std::vector<std::byte> owned;
    std::span<const std::byte> external;
    std::span<const std::byte> data() const { return owns ? std::span<const std::byte>(owned) : external; }
  };

  static std::string quote_json(const std::string& s) {
    return nlohmann::json(s).dump(-1, ' ', /*ensure_ascii=*/false, nlohmann::json::error_handler_t::strict);
  }
  static void check_utf8(const std::string& s, const char* what) {
    try {
      (void)quote_json(s);
    } catch (const nlohmann::json::exception&) {
      throw InvalidArgument(concat("safetensors: ", what, " ", detail::quote(s), " is not valid UTF-8"));
    }
  }

  Entry& insert(std::string name, Dtype dtype, std::vector<std::int64_t> shape, std::size_t nbytes) {
    const auto label = detail::tensor_label(name);
    if (name == "__metadata__") throw InvalidArgument("safetensors: '__metadata__' is reserved, not a tensor name");
    check_utf8(name, "tensor name");
    if (has(name)) throw InvalidArgument(concat("safetensors: duplicate ", label));
    std::uint64_t numel = 1;
    for (const auto d : shape) {
      if (d < 0) throw InvalidArgument(concat("safetensors: ", label, " shape ", detail::dims_str(shape),
                                              " has a negative dimension"));
      if (detail::mul_overflows(numel, static_cast<std::uint64_t>(d), &numel))
        throw InvalidArgument(concat("safetensors: ", label, " shape ", detail::dims_str(shape), " overflows"));
    }
    std::uint64_t want = 0;
    if (detail::mul_overflows(numel, dtype_size(dtype), &want) || want != nbytes)
      throw ShapeMismatch(concat("safetensors: ", label, " shape ", detail::dims_str(shape), " of ",
                                 dtype_name(dtype), " needs ", numel, " x ", dtype_size(dtype),
                                 " bytes, got ", nbytes));
    Entry e;
    e.dtype = dtype;
    e.shape = std::move(shape);
    e.nbytes = nbytes;
    return entries_.emplace(std::move(name), std::move(e)).first->second;
  }

  std::uint64_t data_bytes() const {
    std::uint64_t n = 0;
    for (const auto& [name, e] : entries_) n += e.nbytes;
    return n;
  }

  std::map<std::string, Entry, std::less<>> entries_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace dion::safetensors
