// Fashion-MNIST in IDX format (https://github.com/zalandoresearch/fashion-mnist), as Debian's
// `dataset-fashion-mnist` installs it: /usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,
// labels-idx1}-ubyte.gz. Files are read through zlib, which also reads uncompressed files, so a
// directory with the unpacked IDX files works too.
//
// An IDX file is a big-endian header (magic: 0x0000 0x08 <ndim>, then ndim uint32 dims) followed by
// the uint8 data. Every field is checked: a truncated or foreign file is an error, never a crash.
#pragma once

#include <zlib.h>

#include <cstdint>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <vector>

namespace fmnist {

/// One split: `count` images of 28x28 = 784 pixels, normalized to zero mean and unit variance over
/// the training set, row-major (image i starts at pixels[i * 784]); labels in 0..9.
struct Split {
  std::int64_t count = 0;
  std::vector<float> pixels;
  std::vector<std::uint8_t> labels;
};

inline constexpr int kImageSize = 28 * 28;
inline constexpr int kClasses = 10;
inline constexpr const char* kClassNames[kClasses] = {"T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                                      "Sandal",      "Shirt",   "Sneaker",  "Bag",   "Ankle boot"};

namespace detail {

class GzFile {
 public:
  explicit GzFile(const std::string& path) : f_(gzopen(path.c_str(), "rb")) {
    if (!f_) throw std::runtime_error("cannot open " + path);
    gzbuffer(f_, 1 << 20);
  }
  ~GzFile() { gzclose(f_); }
  GzFile(const GzFile&) = delete;
  GzFile& operator=(const GzFile&) = delete;

  void read(void* dst, std::size_t bytes, const std::string& what) {
    auto* p = static_cast<unsigned char*>(dst);
    while (bytes > 0) {
      const unsigned chunk = bytes > (1u << 30) ? (1u << 30) : static_cast<unsigned>(bytes);
      const int got = gzread(f_, p, chunk);
      if (got <= 0) throw std::runtime_error(what + ": file is truncated or not gzip/IDX");
      p += got;
      bytes -= static_cast<std::size_t>(got);
    }
  }
  std::uint32_t read_be32(const std::string& what) {
    unsigned char b[4];
    read(b, 4, what);
    return (std::uint32_t{b[0]} << 24) | (std::uint32_t{b[1]} << 16) | (std::uint32_t{b[2]} << 8) | b[3];
  }

 private:
  gzFile f_;
};

/// Reads an IDX file of unsigned bytes with `ndim` dims; returns the dims and fills `data`.
inline std::vector<std::uint32_t> read_idx(const std::string& path, int ndim, std::vector<std::uint8_t>& data) {
  GzFile f(path);
  const std::uint32_t magic = f.read_be32(path);
  if (magic != (0x0800u | static_cast<std::uint32_t>(ndim)))
    throw std::runtime_error(path + ": not an IDX file of uint8 with " + std::to_string(ndim) + " dims");
  std::vector<std::uint32_t> dims(static_cast<std::size_t>(ndim));
  std::uint64_t n = 1;
  for (auto& d : dims) {
    d = f.read_be32(path);
    n *= d;
  }
  if (n > (std::uint64_t{1} << 32)) throw std::runtime_error(path + ": implausible size");
  data.resize(static_cast<std::size_t>(n));
  f.read(data.data(), data.size(), path);
  return dims;
}

inline std::string find_file(const std::filesystem::path& dir, const std::string& stem) {
  for (const char* ext : {".gz", ""}) {
    const auto p = dir / (stem + ext);
    if (std::filesystem::exists(p)) return p.string();
  }
  throw std::runtime_error("Fashion-MNIST file " + stem + "[.gz] not found in " + dir.string() +
                           " (Debian: apt-get install dataset-fashion-mnist)");
}

}  // namespace detail

/// True when `dir` holds the four files.
inline bool available(const std::filesystem::path& dir) {
  for (const char* stem : {"train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                           "t10k-labels-idx1-ubyte"}) {
    if (!std::filesystem::exists(dir / (std::string(stem) + ".gz")) && !std::filesystem::exists(dir / stem))
      return false;
  }
  return true;
}

/// Loads split "train" or "t10k", keeping the first `limit` examples (all if limit <= 0).
inline Split load(const std::filesystem::path& dir, const std::string& split, std::int64_t limit = 0) {
  std::vector<std::uint8_t> img, lab;
  const auto idims = detail::read_idx(detail::find_file(dir, split + "-images-idx3-ubyte"), 3, img);
  const auto ldims = detail::read_idx(detail::find_file(dir, split + "-labels-idx1-ubyte"), 1, lab);
  if (idims[1] != 28 || idims[2] != 28 || idims[0] != ldims[0])
    throw std::runtime_error("Fashion-MNIST " + split + ": unexpected shapes");
  Split s;
  s.count = idims[0];
  if (limit > 0 && limit < s.count) s.count = limit;
  // Mean and standard deviation of the training pixels (0.2860, 0.3530), the usual normalization.
  constexpr float mean = 0.2860f, stddev = 0.3530f;
  s.pixels.resize(static_cast<std::size_t>(s.count) * kImageSize);
  for (std::size_t i = 0; i < s.pixels.size(); ++i) s.pixels[i] = (static_cast<float>(img[i]) / 255.0f - mean) / stddev;
  s.labels.assign(lab.begin(), lab.begin() + s.count);
  for (auto l : s.labels)
    if (l >= kClasses) throw std::runtime_error("Fashion-MNIST " + split + ": label out of range");
  return s;
}

}  // namespace fmnist
