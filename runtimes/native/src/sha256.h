// SHA-256 (FIPS 180-4), for the artifact's checksums and the manifest digest.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

namespace edgeloop {

class Sha256 {
 public:
  Sha256();
  void update(const void* data, size_t len);
  std::array<uint8_t, 32> finish();  // the object must be reset before it is used again
  void reset();

  static std::string hex(const std::array<uint8_t, 32>& digest);
  static std::string hex_of(const void* data, size_t len);

 private:
  void block(const uint8_t* p);
  uint32_t h_[8];
  uint8_t buf_[64];
  size_t used_ = 0;
  uint64_t total_ = 0;
};

// sha256 of a file as 64 lowercase hex characters; false (and `error` set) when it cannot be read.
bool sha256_file(const std::string& path, std::string& hex, std::string& error);

}  // namespace edgeloop
