#include "engine/store/checksum.h"

#include <cstring>

namespace autokd::store {
namespace {

constexpr uint64_t P1 = 0x9E3779B185EBCA87ULL;
constexpr uint64_t P2 = 0xC2B2AE3D27D4EB4FULL;
constexpr uint64_t P3 = 0x165667B19E3779F9ULL;
constexpr uint64_t P4 = 0x85EBCA77C2B2AE63ULL;
constexpr uint64_t P5 = 0x27D4EB2F165667C5ULL;

inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

// The store's files are defined little-endian; memcpy keeps unaligned loads legal.
inline uint64_t load64(const unsigned char* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}
inline uint32_t load32(const unsigned char* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

inline uint64_t round_(uint64_t acc, uint64_t lane) { return rotl(acc + lane * P2, 31) * P1; }
inline uint64_t merge(uint64_t h, uint64_t acc) { return (h ^ round_(0, acc)) * P1 + P4; }

// Length, tail bytes and avalanche: shared by the one-shot and streaming forms.
uint64_t finish(uint64_t h, const unsigned char* p, size_t rem) {
  while (rem >= 8) {
    h = rotl(h ^ round_(0, load64(p)), 27) * P1 + P4;
    p += 8;
    rem -= 8;
  }
  if (rem >= 4) {
    h = rotl(h ^ (uint64_t(load32(p)) * P1), 23) * P2 + P3;
    p += 4;
    rem -= 4;
  }
  while (rem > 0) {
    h = rotl(h ^ (uint64_t(*p) * P5), 11) * P1;
    ++p;
    --rem;
  }
  h ^= h >> 33;
  h *= P2;
  h ^= h >> 29;
  h *= P3;
  h ^= h >> 32;
  return h;
}

inline void stripes(uint64_t acc[4], const unsigned char*& p, size_t& rem) {
  while (rem >= 32) {
    acc[0] = round_(acc[0], load64(p));
    acc[1] = round_(acc[1], load64(p + 8));
    acc[2] = round_(acc[2], load64(p + 16));
    acc[3] = round_(acc[3], load64(p + 24));
    p += 32;
    rem -= 32;
  }
}

uint64_t converge(const uint64_t acc[4]) {
  uint64_t h = rotl(acc[0], 1) + rotl(acc[1], 7) + rotl(acc[2], 12) + rotl(acc[3], 18);
  for (int i = 0; i < 4; ++i) h = merge(h, acc[i]);
  return h;
}

}  // namespace

uint64_t xxh64(const void* data, size_t size, uint64_t seed) {
  Xxh64Stream s(seed);
  s.update(data, size);
  return s.digest();
}

void Xxh64Stream::reset(uint64_t seed) {
  seed_ = seed;
  acc_[0] = seed + P1 + P2;
  acc_[1] = seed + P2;
  acc_[2] = seed;
  acc_[3] = seed - P1;
  total_ = 0;
  buffered_ = 0;
}

void Xxh64Stream::update(const void* data, size_t size) {
  auto p = static_cast<const unsigned char*>(data);
  total_ += size;
  if (buffered_ > 0) {
    size_t take = size < 32 - buffered_ ? size : 32 - buffered_;
    std::memcpy(buf_ + buffered_, p, take);
    buffered_ += take;
    p += take;
    size -= take;
    if (buffered_ < 32) return;
    const unsigned char* b = buf_;
    size_t n = 32;
    stripes(acc_, b, n);
    buffered_ = 0;
  }
  stripes(acc_, p, size);
  if (size > 0) {
    std::memcpy(buf_, p, size);
    buffered_ = size;
  }
}

uint64_t Xxh64Stream::digest() const {
  uint64_t h = total_ >= 32 ? converge(acc_) : seed_ + P5;
  return finish(h + total_, buf_, buffered_);
}

}  // namespace autokd::store
