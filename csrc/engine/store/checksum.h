// XXH64 checksum (Yann Collet's xxHash, 64-bit variant), written here from the published
// algorithm description so the store needs no third-party code.
//
// Algorithm (all arithmetic mod 2^64, rotl = rotate left):
//   primes P1..P5 = 0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9,
//                   0x85EBCA77C2B2AE63, 0x27D4EB2F165667C5
//   round(acc, lane) = rotl(acc + lane * P2, 31) * P1
//   Inputs of >= 32 bytes run four accumulators (seed+P1+P2, seed+P2, seed, seed-P1) over
//   32-byte stripes of four little-endian u64 lanes, then merge them; shorter inputs start from
//   seed+P5. The total length is added, the tail is consumed 8, 4, then 1 byte(s) at a time,
//   and an avalanche (xor-shift-multiply with P2, P3) finishes.
// Speed: one multiply-rotate per 8 bytes per accumulator, several GB/s per core, well above
// the page-cache bandwidth the store checks against. Not cryptographic: it detects accidental
// corruption (torn writes, bit flips, truncation), not tampering.
// Test vectors (tests in store_test.cc): XXH64("", 0) = 0xEF46DB3751D8E999,
// XXH64("abc", 0) = 0x44BC2CF5AD770999; zstd frames carry the low 32 bits of XXH64(content, 0),
// which gives independent vectors for longer inputs.
#pragma once

#include <cstddef>
#include <cstdint>

namespace autokd::store {

// One-shot hash of [data, data + size).
uint64_t xxh64(const void* data, size_t size, uint64_t seed = 0);

// Streaming form: update() in pieces of any size gives the same digest as one xxh64() call over
// the concatenation. Used by the writer, which sees the data region in append order.
class Xxh64Stream {
 public:
  explicit Xxh64Stream(uint64_t seed = 0) { reset(seed); }
  void reset(uint64_t seed = 0);
  void update(const void* data, size_t size);
  uint64_t digest() const;

 private:
  uint64_t acc_[4];
  uint64_t seed_;
  uint64_t total_;
  unsigned char buf_[32];  // partial stripe carried between update() calls
  size_t buffered_;
};

}  // namespace autokd::store
