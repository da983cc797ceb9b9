#include "engine/store/store.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <functional>
#include <cstring>
#include <limits>
#include <sstream>
#include <thread>

namespace autokd::store {
namespace {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the store format is little-endian");

constexpr size_t kMaxFields = 64, kMaxDims = 8, kMaxName = 255, kMaxString = 64 << 10;
constexpr uint64_t kMaxHeader = 256ULL << 20;
constexpr uint64_t kMaxBytes = uint64_t(std::numeric_limits<int64_t>::max());
constexpr uint64_t kBytesPerThread = 256 << 10;  // below this a thread costs more than it saves

uint64_t round_up(uint64_t x, uint64_t m) { return (x + m - 1) / m * m; }

// a * b, or false when it would not fit in 63 bits.
bool mul_ok(uint64_t a, uint64_t b, uint64_t* out) {
  if (a != 0 && b > kMaxBytes / a) return false;
  *out = a * b;
  return true;
}

std::string hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%016llx", static_cast<unsigned long long>(v));
  return buf;
}

std::string printable(const unsigned char* p, size_t n) {
  std::string s = "'";
  for (size_t i = 0; i < n; ++i) {
    if (p[i] >= 32 && p[i] < 127) {
      s += char(p[i]);
    } else {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", p[i]);
      s += buf;
    }
  }
  return s + "'";
}

// Strict UTF-8 (no overlong forms, surrogates or code points past U+10FFFF): names and ids
// become Python str, so a header must not hold bytes that cannot decode.
bool utf8_valid(const std::string& s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  for (size_t i = 0; i < n;) {
    unsigned c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len;
    uint32_t cp;
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2, cp = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3, cp = c & 0x0F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4, cp = c & 0x07;
    } else {
      return false;
    }
    if (len > n - i) return false;
    for (size_t k = 1; k < len; ++k) {
      if ((p[i + k] & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (p[i + k] & 0x3F);
    }
    if (len == 3 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) return false;
    if (len == 4 && (cp < 0x10000 || cp > 0x10FFFF)) return false;
    i += len;
  }
  return true;
}

void write_all(int fd, const unsigned char* p, uint64_t n, uint64_t offset, const std::string& path) {
  while (n > 0) {
    ssize_t w = ::pwrite(fd, p, n, static_cast<off_t>(offset));
    if (w < 0) {
      if (errno == EINTR) continue;
      throw StoreIOError(path, "pwrite", errno);
    }
    p += w;
    n -= uint64_t(w);
    offset += uint64_t(w);
  }
}

// Header encoding in one place so writer and tests agree with the documented layout.
struct Encoder {
  std::vector<unsigned char>& out;
  template <class T>
  void put(T v) {
    bytes(&v, sizeof(T));
  }
  // resize + memcpy rather than insert: GCC 12 warns falsely on vector<uchar>::insert.
  void bytes(const void* p, size_t n) {
    size_t at = out.size();
    out.resize(at + n);
    if (n) std::memcpy(out.data() + at, p, n);
  }
  void str(const std::string& s) {
    put<uint32_t>(uint32_t(s.size()));
    bytes(s.data(), s.size());
  }
};

// Bounds-checked reads of the header: every read is checked against `end` before it happens.
struct Cursor {
  const unsigned char* base;
  uint64_t pos, end;
  const std::string& path;
  void need(uint64_t n, const char* what) {
    if (n > end - pos) {
      throw StoreError(path, std::string("header field ") + what + " inside the header",
                       "at most " + std::to_string(end - pos) + " bytes left at offset " +
                           std::to_string(pos),
                       std::to_string(n) + " bytes");
    }
  }
  template <class T>
  T get(const char* what) {
    need(sizeof(T), what);
    T v;
    std::memcpy(&v, base + pos, sizeof(T));
    pos += sizeof(T);
    return v;
  }
  std::string str(const char* what, uint64_t max_len) {
    uint32_t n = get<uint32_t>(what);
    if (n > max_len) {
      throw StoreError(path, std::string("length of ") + what,
                       "at most " + std::to_string(max_len), std::to_string(n));
    }
    need(n, what);
    std::string s(reinterpret_cast<const char*>(base + pos), n);
    if (!utf8_valid(s))
      throw StoreError(path, std::string("text of ") + what + " at offset " + std::to_string(pos),
                       "UTF-8", "invalid UTF-8 bytes");
    pos += n;
    return s;
  }
};

template <class T>
T load(const unsigned char* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

}  // namespace

struct Reader::Pool {
  explicit Pool(unsigned workers) : owner(::getpid()) {
    for (unsigned w = 0; w < workers; ++w) threads.emplace_back([this] { loop(); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(mu);
      stop = true;
    }
    wake.notify_all();
    for (auto& t : threads) t.join();
  }
  // Runs job(p) for p in [0, parts): part 0 on the caller, the rest on whichever workers wake.
  void run(unsigned parts, const std::function<void(unsigned)>& job) {
    {
      std::lock_guard<std::mutex> lk(mu);
      current = &job;
      next = 1;
      total = parts;
      pending = parts - 1;
      ++generation;
    }
    wake.notify_all();
    job(0);
    std::unique_lock<std::mutex> lk(mu);
    done.wait(lk, [&] { return pending == 0; });
    current = nullptr;
  }
  void loop() {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lk(mu);
    for (;;) {
      wake.wait(lk, [&] { return stop || generation != seen; });
      if (stop) return;
      seen = generation;
      while (current && next < total) {
        unsigned p = next++;
        const auto* job = current;
        lk.unlock();
        (*job)(p);
        lk.lock();
        if (--pending == 0) done.notify_one();
      }
    }
  }

  const pid_t owner;
  std::vector<std::thread> threads;
  std::mutex mu;
  std::condition_variable wake, done;
  const std::function<void(unsigned)>* current = nullptr;
  unsigned next = 0, total = 0, pending = 0;
  uint64_t generation = 0;
  bool stop = false;
};

template <class Fn>
void Reader::parallel_for(uint64_t n, unsigned parts, Fn fn) const {
  parts = unsigned(std::min<uint64_t>(parts, n));
  if (parts <= 1) {
    fn(uint64_t(0), n);
    return;
  }
  std::unique_lock<std::mutex> lk(pool_mu_, std::try_to_lock);
  if (!lk.owns_lock()) {  // another thread's call has the workers (and the cores)
    fn(uint64_t(0), n);
    return;
  }
  if (pool_ && pool_->owner != ::getpid()) pool_ = nullptr;  // inherited via fork: no threads here
  if (!pool_) pool_ = new Pool(options_.num_threads - 1);
  const uint64_t step = (n + parts - 1) / parts;
  pool_->run(parts, [&](unsigned p) {
    uint64_t b = p * step, e = std::min(n, b + step);
    if (b < e) fn(b, e);
  });
}

size_t dtype_size(Dtype d) {
  switch (d) {
    case Dtype::fp16:
    case Dtype::bf16:
      return 2;
    case Dtype::fp32:
      return 4;
  }
  return 0;
}

std::string dtype_name(Dtype d) {
  switch (d) {
    case Dtype::fp16:
      return "fp16";
    case Dtype::bf16:
      return "bf16";
    case Dtype::fp32:
      return "fp32";
  }
  return "dtype#" + std::to_string(int(d));
}

Dtype dtype_from_name(const std::string& name) {
  if (name == "fp16") return Dtype::fp16;
  if (name == "bf16") return Dtype::bf16;
  if (name == "fp32") return Dtype::fp32;
  throw std::invalid_argument("autokd store: expected dtype fp16, bf16 or fp32, got '" + name + "'");
}

uint64_t Field::elements() const {
  uint64_t n = 1;
  for (uint64_t d : shape) {
    if (!mul_ok(n, d, &n)) return 0;  // rejected by validation as an empty/oversized field
  }
  return n;
}

std::string Field::describe() const {
  std::string s = name + ":" + dtype_name(dtype) + "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? "," : "") + std::to_string(shape[i]);
  return s + "]";
}

std::string describe(const std::vector<Field>& fields) {
  std::string s;
  for (size_t i = 0; i < fields.size(); ++i) s += (i ? " " : "") + fields[i].describe();
  return s;
}

StoreError::StoreError(const std::string& path, const std::string& what_checked,
                       const std::string& expected, const std::string& found,
                       const std::string& hint)
    : std::runtime_error("autokd store " + path + ": " + what_checked + ": expected " + expected +
                         ", found " + found + (hint.empty() ? "" : "; " + hint)),
      path_(path), check_(what_checked), expected_(expected), found_(found) {}

StoreIOError::StoreIOError(const std::string& path, const std::string& call, int error)
    : std::runtime_error("autokd store " + path + ": " + call + ": " + std::strerror(error)),
      path_(path), call_(call), error_(error) {}

const char* const kRebuildHint =
    "the file is damaged: rebuild it with `autokd-cli cache` (the options of the run that built "
    "it), which replaces a damaged store";

Verify verify_from_name(const std::string& name) {
  if (name == "touch") return Verify::kOnTouch;
  if (name == "open") return Verify::kOnOpen;
  if (name == "none") return Verify::kNone;
  throw std::invalid_argument("autokd store: expected verify 'touch', 'open' or 'none', got '" +
                              name + "'");
}

Layout Layout::of(const std::vector<Field>& fields) {
  Layout l;
  uint64_t off = 0;
  for (const auto& f : fields) {
    l.offsets.push_back(off);
    off = round_up(off + f.bytes(), kFieldAlign);
  }
  l.record_bytes = off;
  return l;
}

void WriterOptions::validate() const {
  auto bad = [](const std::string& what) {
    throw std::invalid_argument("autokd store WriterOptions: expected " + what);
  };
  if (path.empty()) bad("path non-empty, got ''");
  if (fields.empty() || fields.size() > kMaxFields)
    bad("1 to 64 fields, got " + std::to_string(fields.size()));
  for (size_t i = 0; i < fields.size(); ++i) {
    const auto& f = fields[i];
    if (f.name.empty() || f.name.size() > kMaxName || !utf8_valid(f.name))
      bad("field name of 1 to 255 bytes of UTF-8, got '" + f.name + "'");
    for (size_t j = 0; j < i; ++j)
      if (fields[j].name == f.name) bad("unique field names, got '" + f.name + "' twice");
    if (dtype_size(f.dtype) == 0) bad("field dtype fp16, bf16 or fp32 for '" + f.name + "'");
    if (f.shape.size() > kMaxDims || f.elements() == 0 || f.bytes() > (kMaxBytes >> 8))
      bad("field shape of at most 8 positive dims for '" + f.name + "', got " + f.describe());
  }
  if (num_samples == 0) bad("num_samples >= 1, got 0");
  if (num_views == 0) bad("num_views >= 1, got 0");
  uint64_t records, bytes;
  if (!mul_ok(num_samples, num_views, &records) ||
      !mul_ok(records, Layout::of(fields).record_bytes, &bytes))
    bad("num_samples * num_views * record bytes to fit in 63 bits");
  if (chunk_bytes < 4096 || chunk_bytes > (1ULL << 32))
    bad("chunk_bytes in [4096, 2^32], got " + std::to_string(chunk_bytes));
  if (bytes / chunk_bytes > (kMaxHeader >> 4))
    bad("at most " + std::to_string(kMaxHeader >> 4) + " chunks; raise chunk_bytes");
  for (const std::string* s : {&teacher_hash, &dataset_id, &augment_id})
    if (s->size() > kMaxString || !utf8_valid(*s)) bad("identity strings of at most 64 KiB of UTF-8");
}

Writer::Writer(WriterOptions options) : options_(std::move(options)) {
  options_.validate();
  layout_ = Layout::of(options_.fields);
  uint64_t data_bytes = total_records() * layout_.record_bytes;
  num_chunks_ = (data_bytes + options_.chunk_bytes - 1) / options_.chunk_bytes;
  header_bytes_ = encode_header().size();
  data_offset_ = round_up(header_bytes_, kPageBytes);
  partial_path_ = options_.path + ".partial";
  // No O_TRUNC before the lock: a live build holding the lock must not lose its data.
  fd_ = ::open(partial_path_.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd_ < 0) throw StoreIOError(partial_path_, "open", errno);
  if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
    ::close(fd_);
    fd_ = -1;
    throw StoreError(options_.path, "build lock on " + partial_path_, "no other build running",
                     "the lock held by another live process");
  }
  if (::ftruncate(fd_, 0) != 0) {
    int e = errno;
    ::close(fd_);
    fd_ = -1;
    throw StoreIOError(partial_path_, "ftruncate", e);
  }
}

Writer::~Writer() {
  if (fd_ >= 0) abort();
}

void Writer::abort() {
  if (fd_ < 0) return;
  ::unlink(partial_path_.c_str());  // unlink before close: no window where another build sees it
  ::close(fd_);
  fd_ = -1;
}

std::vector<unsigned char> Writer::encode_header() const {
  std::vector<unsigned char> out;
  Encoder e{out};
  e.bytes(kMagic, 8);
  e.put<uint32_t>(kFormatVersion);
  e.put<uint32_t>(0);
  uint64_t records = total_records();
  uint64_t data_bytes = records * layout_.record_bytes;
  e.put<uint64_t>(header_bytes_);
  e.put<uint64_t>(data_offset_);
  e.put<uint64_t>(data_offset_ + data_bytes);
  e.put<uint64_t>(options_.num_samples);
  e.put<uint64_t>(options_.num_views);
  e.put<uint64_t>(layout_.record_bytes);
  e.put<uint64_t>(options_.chunk_bytes);
  e.put<uint64_t>(num_chunks_);
  e.put<uint32_t>(uint32_t(options_.fields.size()));
  e.put<uint32_t>(0);
  e.str(options_.teacher_hash);
  e.str(options_.dataset_id);
  e.str(options_.augment_id);
  for (size_t i = 0; i < options_.fields.size(); ++i) {
    const Field& f = options_.fields[i];
    e.str(f.name);
    e.put<uint8_t>(uint8_t(f.dtype));
    e.put<uint8_t>(uint8_t(f.shape.size()));
    e.put<uint16_t>(0);
    for (uint64_t d : f.shape) e.put<uint64_t>(d);
    e.put<uint64_t>(layout_.offsets[i]);
  }
  for (uint64_t j = 0; j < num_chunks_; ++j)
    e.put<uint64_t>(j < chunk_sums_.size() ? chunk_sums_[j] : 0);
  e.put<uint64_t>(xxh64(out.data(), out.size()));
  return out;
}

void Writer::feed_checksums(const unsigned char* data, uint64_t size) {
  while (size > 0) {
    uint64_t take = std::min(size, options_.chunk_bytes - chunk_filled_);
    chunk_stream_.update(data, take);
    chunk_filled_ += take;
    data += take;
    size -= take;
    if (chunk_filled_ == options_.chunk_bytes) {
      chunk_sums_.push_back(chunk_stream_.digest());
      chunk_stream_.reset();
      chunk_filled_ = 0;
    }
  }
}

void Writer::append(const std::vector<const void*>& field_data, uint64_t n) {
  if (fd_ < 0) throw std::runtime_error("autokd store " + options_.path + ": writer is closed");
  if (field_data.size() != options_.fields.size())
    throw std::invalid_argument("autokd store append: expected " +
                                std::to_string(options_.fields.size()) + " field buffers, got " +
                                std::to_string(field_data.size()));
  if (n > total_records() - next_record_)
    throw std::invalid_argument("autokd store append: expected at most " +
                                std::to_string(total_records() - next_record_) +
                                " more records, got " + std::to_string(n));
  const uint64_t R = layout_.record_bytes;
  // Bounded staging: interleave fields into records a slice at a time.
  const uint64_t per_slice = std::max<uint64_t>(1, (8ULL << 20) / R);
  for (uint64_t first = 0; first < n; first += per_slice) {
    uint64_t m = std::min(per_slice, n - first);
    staging_.assign(m * R, 0);
    for (size_t f = 0; f < field_data.size(); ++f) {
      const uint64_t fb = options_.fields[f].bytes();
      auto src = static_cast<const unsigned char*>(field_data[f]) + first * fb;
      for (uint64_t b = 0; b < m; ++b)
        std::memcpy(staging_.data() + b * R + layout_.offsets[f], src + b * fb, fb);
    }
    write_all(fd_, staging_.data(), m * R, data_offset_ + next_record_ * R, partial_path_);
    feed_checksums(staging_.data(), m * R);
    next_record_ += m;
  }
}

void Writer::finish() {
  if (fd_ < 0) throw std::runtime_error("autokd store " + options_.path + ": writer is closed");
  if (next_record_ != total_records())
    throw std::runtime_error("autokd store " + options_.path + ": finish() expected " +
                             std::to_string(total_records()) + " records, got " +
                             std::to_string(next_record_));
  if (chunk_filled_ > 0) {
    chunk_sums_.push_back(chunk_stream_.digest());
    chunk_filled_ = 0;
  }
  std::vector<unsigned char> header = encode_header();
  header.resize(data_offset_, 0);
  write_all(fd_, header.data(), header.size(), 0, partial_path_);
  if (::fsync(fd_) != 0) throw StoreIOError(partial_path_, "fsync", errno);
  if (::rename(partial_path_.c_str(), options_.path.c_str()) != 0)
    throw StoreIOError(options_.path, "rename", errno);
  ::close(fd_);  // after rename: the lock covers the whole window
  fd_ = -1;
  // The rename is durable only once the directory entry is on disk.
  std::string dir = options_.path;
  size_t slash = dir.find_last_of('/');
  dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : dir.substr(0, slash));
  int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

void ReaderOptions::validate() const {
  if (path.empty()) throw std::invalid_argument("autokd store ReaderOptions: expected path non-empty, got ''");
  if (num_threads > 256)
    throw std::invalid_argument("autokd store ReaderOptions: expected num_threads in [0, 256], got " +
                                std::to_string(num_threads));
}

Reader::Reader(ReaderOptions options) : options_(std::move(options)) {
  options_.validate();
  if (options_.num_threads == 0) options_.num_threads = std::max(1u, std::thread::hardware_concurrency());
  const std::string& path = options_.path;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    std::string found = std::strerror(errno);
    if (::access((path + ".partial").c_str(), F_OK) == 0)
      found += " (only " + path + ".partial exists: a build was interrupted or is running)";
    throw StoreError(path, "open", "a complete store file", found);
  }
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    throw StoreError(path, "stat", "a readable file", std::strerror(errno));
  }
  mapped_bytes_ = uint64_t(st.st_size);
  if (mapped_bytes_ < kFixedHeaderBytes + 8) {
    ::close(fd);
    throw StoreError(path, "truncated file", "at least " + std::to_string(kFixedHeaderBytes + 8) +
                     " bytes", std::to_string(mapped_bytes_) + " bytes");
  }
  void* p = ::mmap(nullptr, mapped_bytes_, PROT_READ, MAP_SHARED, fd, 0);
  ::close(fd);  // the mapping keeps the file alive
  if (p == MAP_FAILED) throw StoreError(path, "mmap", "a mappable file", std::strerror(errno));
  base_ = static_cast<const unsigned char*>(p);
  try {
    parse();
    check_expectations();
    checked_.reset(new std::atomic<uint8_t>[chunk_sums_.size()]);
    for (uint64_t j = 0; j < chunk_sums_.size(); ++j) checked_[j].store(0, std::memory_order_relaxed);
    if (options_.verify == Verify::kOnOpen) verify();
  } catch (...) {
    ::munmap(const_cast<unsigned char*>(base_), mapped_bytes_);
    base_ = nullptr;
    throw;
  }
}

Reader::~Reader() {
  if (pool_ && pool_->owner == ::getpid()) delete pool_;
  if (base_) ::munmap(const_cast<unsigned char*>(base_), mapped_bytes_);
}

void Reader::parse() {
  const std::string& path = options_.path;
  const uint64_t size = mapped_bytes_;
  if (std::memcmp(base_, kMagic, 8) != 0)
    throw StoreError(path, "magic", printable(reinterpret_cast<const unsigned char*>(kMagic), 8),
                     printable(base_, 8));
  uint32_t version = load<uint32_t>(base_ + 8);
  if (version != kFormatVersion)
    throw StoreError(path, "format version", std::to_string(kFormatVersion), std::to_string(version));
  header_bytes_ = load<uint64_t>(base_ + 16);
  const uint64_t recorded_size = load<uint64_t>(base_ + 32);
  if (header_bytes_ > size) {
    if (recorded_size > size)
      throw StoreError(path, "truncated file", std::to_string(recorded_size) + " bytes",
                       std::to_string(size) + " bytes", kRebuildHint);
    throw StoreError(path, "header length inside the file", "at most " + std::to_string(size),
                     std::to_string(header_bytes_));
  }
  if (header_bytes_ < kFixedHeaderBytes + 8 || header_bytes_ > kMaxHeader)
    throw StoreError(path, "header length", "in [96, " + std::to_string(kMaxHeader) + "]",
                     std::to_string(header_bytes_));
  uint64_t stored_sum = load<uint64_t>(base_ + header_bytes_ - 8);
  uint64_t actual_sum = xxh64(base_, header_bytes_ - 8);
  if (stored_sum != actual_sum)
    throw StoreError(path, "header checksum", hex(stored_sum), hex(actual_sum), kRebuildHint);
  file_bytes_ = recorded_size;
  if (size < file_bytes_)
    throw StoreError(path, "truncated file", std::to_string(file_bytes_) + " bytes",
                     std::to_string(size) + " bytes", kRebuildHint);
  if (size > file_bytes_)
    throw StoreError(path, "file size", std::to_string(file_bytes_) + " bytes",
                     std::to_string(size) + " bytes (trailing data)", kRebuildHint);

  Cursor c{base_, 40, header_bytes_ - 8, path};
  num_samples_ = c.get<uint64_t>("num_samples");
  num_views_ = c.get<uint64_t>("num_views");
  const uint64_t record_bytes = c.get<uint64_t>("record_bytes");
  chunk_bytes_ = c.get<uint64_t>("chunk_bytes");
  const uint64_t num_chunks = c.get<uint64_t>("num_chunks");
  const uint32_t num_fields = c.get<uint32_t>("num_fields");
  c.get<uint32_t>("reserved");
  data_offset_ = load<uint64_t>(base_ + 24);
  if (num_samples_ == 0 || num_views_ == 0)
    throw StoreError(path, "samples and views", ">= 1 each",
                     std::to_string(num_samples_) + " samples, " + std::to_string(num_views_) + " views");
  if (num_fields == 0 || num_fields > kMaxFields)
    throw StoreError(path, "number of fields", "1 to 64", std::to_string(num_fields));
  teacher_hash_ = c.str("teacher_hash", kMaxString);
  dataset_id_ = c.str("dataset_id", kMaxString);
  augment_id_ = c.str("augment_id", kMaxString);
  std::vector<uint64_t> stored_offsets;
  for (uint32_t i = 0; i < num_fields; ++i) {
    Field f;
    f.name = c.str("field name", kMaxName);
    uint8_t code = c.get<uint8_t>("field dtype");
    if (code < 1 || code > 3)
      throw StoreError(path, "dtype of field '" + f.name + "'", "1 (fp16), 2 (bf16) or 3 (fp32)",
                       std::to_string(code));
    f.dtype = Dtype(code);
    uint8_t ndim = c.get<uint8_t>("field ndim");
    c.get<uint16_t>("field reserved");
    if (ndim > kMaxDims)
      throw StoreError(path, "ndim of field '" + f.name + "'", "at most 8", std::to_string(ndim));
    for (uint8_t d = 0; d < ndim; ++d) f.shape.push_back(c.get<uint64_t>("field dim"));
    if (f.elements() == 0 || f.bytes() > (kMaxBytes >> 8))
      throw StoreError(path, "shape of field '" + f.name + "'", "positive dims of sane size", f.describe());
    stored_offsets.push_back(c.get<uint64_t>("field offset"));
    for (const Field& g : fields_)
      if (g.name == f.name) throw StoreError(path, "field names", "distinct names", "'" + f.name + "' twice");
    fields_.push_back(std::move(f));
  }
  layout_ = Layout::of(fields_);
  if (record_bytes != layout_.record_bytes || stored_offsets != layout_.offsets)
    throw StoreError(path, "record layout", std::to_string(layout_.record_bytes) + "-byte records for " +
                     describe(fields_), std::to_string(record_bytes) + "-byte records or other field offsets");
  uint64_t records, data_bytes;
  if (!mul_ok(num_samples_, num_views_, &records) || !mul_ok(records, record_bytes, &data_bytes))
    throw StoreError(path, "data size", "samples * views * record bytes < 2^63", "an overflow");
  if (data_offset_ % kPageBytes != 0 || data_offset_ < header_bytes_ || data_offset_ > file_bytes_ ||
      file_bytes_ - data_offset_ != data_bytes)
    throw StoreError(path, "data region inside the file",
                     "a page-aligned offset >= " + std::to_string(header_bytes_) + " followed by " +
                         std::to_string(data_bytes) + " bytes ending at " + std::to_string(file_bytes_),
                     "data offset " + std::to_string(data_offset_));
  if (chunk_bytes_ == 0 || num_chunks != (data_bytes + chunk_bytes_ - 1) / chunk_bytes_)
    throw StoreError(path, "chunk table",
                     "ceil(" + std::to_string(data_bytes) + " / chunk bytes) chunks",
                     std::to_string(num_chunks) + " chunks of " + std::to_string(chunk_bytes_) + " bytes");
  uint64_t table_bytes;
  if (!mul_ok(num_chunks, 8, &table_bytes)) table_bytes = kMaxBytes;
  c.need(table_bytes, "chunk checksums");
  chunk_sums_.resize(num_chunks);
  if (num_chunks) std::memcpy(chunk_sums_.data(), base_ + c.pos, table_bytes);
  c.pos += table_bytes;
  if (c.pos != c.end)
    throw StoreError(path, "header length", std::to_string(c.pos + 8) + " bytes from its contents",
                     std::to_string(header_bytes_));
}

void Reader::check_expectations() const {
  const std::string& path = options_.path;
  if (!options_.expect_teacher_hash.empty() && options_.expect_teacher_hash != teacher_hash_)
    throw StoreError(path, "teacher hash", "'" + options_.expect_teacher_hash + "'", "'" + teacher_hash_ + "'");
  if (!options_.expect_dataset_id.empty() && options_.expect_dataset_id != dataset_id_)
    throw StoreError(path, "data set id", "'" + options_.expect_dataset_id + "'", "'" + dataset_id_ + "'");
  if (options_.expect_fields && *options_.expect_fields != fields_)
    throw StoreError(path, "schema", describe(*options_.expect_fields), describe(fields_));
}

unsigned Reader::threads_for(uint64_t bytes) const {
  return unsigned(std::max<uint64_t>(1, std::min<uint64_t>(options_.num_threads, bytes / kBytesPerThread)));
}


void Reader::gather(const int64_t* samples, const int64_t* views, uint64_t n,
                    const std::vector<void*>& outs) const {
  if (outs.size() != fields_.size())
    throw std::invalid_argument("autokd store gather: expected " + std::to_string(fields_.size()) +
                                " output buffers, got " + std::to_string(outs.size()));
  for (size_t f = 0; f < outs.size(); ++f)
    if (n > 0 && outs[f] == nullptr)
      throw std::invalid_argument("autokd store gather: expected a buffer for field '" +
                                  fields_[f].name + "', got null");
  for (uint64_t b = 0; b < n; ++b) {
    if (samples[b] < 0 || uint64_t(samples[b]) >= num_samples_)
      throw std::invalid_argument("autokd store gather: expected indices[" + std::to_string(b) +
                                  "] in [0, " + std::to_string(num_samples_) + "), got " +
                                  std::to_string(samples[b]));
    if (views[b] < 0 || uint64_t(views[b]) >= num_views_)
      throw std::invalid_argument("autokd store gather: expected views[" + std::to_string(b) +
                                  "] in [0, " + std::to_string(num_views_) + "), got " +
                                  std::to_string(views[b]));
  }
  // Before any byte is copied: a damaged chunk must not reach the caller's buffers.
  if (options_.verify != Verify::kNone &&
      checked_count_.load(std::memory_order_relaxed) < chunk_sums_.size())
    check_records(samples, views, n);
  const uint64_t R = layout_.record_bytes;
  const unsigned char* data = base_ + data_offset_;
  parallel_for(n, threads_for(n * R), [&](uint64_t begin, uint64_t end) {
    for (uint64_t b = begin; b < end; ++b) {
      const unsigned char* rec = data + (uint64_t(views[b]) * num_samples_ + uint64_t(samples[b])) * R;
      for (size_t f = 0; f < fields_.size(); ++f) {
        const uint64_t fb = fields_[f].bytes();
        std::memcpy(static_cast<unsigned char*>(outs[f]) + b * fb, rec + layout_.offsets[f], fb);
      }
    }
  });
}

void Reader::check_chunks(std::vector<uint64_t>& chunks) const {
  if (chunks.empty()) return;
  std::sort(chunks.begin(), chunks.end());
  chunks.erase(std::unique(chunks.begin(), chunks.end()), chunks.end());
  const uint64_t data_bytes = file_bytes_ - data_offset_;
  std::vector<uint64_t> found(chunks.size());
  // Workers must not throw (an exception on a pool thread would end the process): they only
  // hash; the comparison and the error happen here, on the caller's thread.
  parallel_for(chunks.size(), threads_for(chunks.size() * chunk_bytes_), [&](uint64_t begin, uint64_t end) {
    for (uint64_t i = begin; i < end; ++i) {
      uint64_t off = chunks[i] * chunk_bytes_;
      found[i] = xxh64(base_ + data_offset_ + off, std::min(chunk_bytes_, data_bytes - off));
    }
  });
  for (uint64_t i = 0; i < chunks.size(); ++i) {
    const uint64_t j = chunks[i];
    if (found[i] != chunk_sums_[j]) {
      uint64_t a = data_offset_ + j * chunk_bytes_;
      uint64_t b = std::min(a + chunk_bytes_, file_bytes_);
      throw StoreError(options_.path,
                       "data checksum of chunk " + std::to_string(j) + " (file bytes [" +
                           std::to_string(a) + ", " + std::to_string(b) + "))",
                       hex(chunk_sums_[j]), hex(found[i]), kRebuildHint);
    }
    uint8_t unchecked = 0;
    if (checked_[j].compare_exchange_strong(unchecked, 1, std::memory_order_acq_rel))
      checked_count_.fetch_add(1, std::memory_order_relaxed);
  }
}

void Reader::check_records(const int64_t* samples, const int64_t* views, uint64_t n) const {
  const uint64_t R = layout_.record_bytes;
  std::vector<uint64_t> todo;
  for (uint64_t b = 0; b < n; ++b) {
    const uint64_t first = (uint64_t(views[b]) * num_samples_ + uint64_t(samples[b])) * R;
    for (uint64_t j = first / chunk_bytes_, last = (first + R - 1) / chunk_bytes_; j <= last; ++j)
      if (!checked_[j].load(std::memory_order_acquire)) todo.push_back(j);
  }
  check_chunks(todo);
}

void Reader::verify() const {
  std::vector<uint64_t> all(chunk_sums_.size());
  for (uint64_t j = 0; j < all.size(); ++j) all[j] = j;
  check_chunks(all);
}

}  // namespace autokd::store
