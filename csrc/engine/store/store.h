// Feature store: one memory-mapped file holding a teacher's features and logits for every
// (sample, augmentation view) of a data set, so distillation search never runs the teacher again.
// Torch-free; bound to Python by csrc/bindings/store.cc, used through autokd.store (which also
// defines the replayable augmentation whose identity string the header stores).
//
// FILE FORMAT (version 1; every integer little-endian; offsets are bytes from file start)
//   0    char[8]  magic "AUTOKDFS"
//   8    u32      format version (1)
//   12   u32      reserved, 0
//   16   u64      H  header bytes, including the trailing header checksum
//   24   u64      D  data offset: a multiple of 4096, D >= H; bytes [H, D) are zero
//   32   u64      file bytes = D + N * K * R
//   40   u64      N  samples            48  u64  K  views
//   56   u64      R  record bytes (stride)
//   64   u64      C  chunk bytes        72  u64  number of chunks = ceil(N * K * R / C)
//   80   u32      F  fields             84  u32  reserved, 0
//   88   strings  teacher hash, data set id, augmentation id: each u32 length + UTF-8 bytes
//        fields   F times: u32 name length, name, u8 dtype (1 fp16, 2 bf16, 3 fp32), u8 ndim,
//                 u16 reserved 0, u64 dims[ndim], u64 offset of the field inside a record
//        u64      checksum of each chunk of the data region, in order
//   H-8  u64      header checksum: XXH64 (seed 0) of bytes [0, H-8)
//   D    data     record (sample i, view v) occupies [D + (v * N + i) * R, ... + R)
// Records are view-major: one training epoch reads one view, a contiguous 1/K of the data, so
// the page cache needs to hold only that slice. Inside a record the fields sit in schema order,
// each at an offset rounded up to 64 bytes; R is rounded up to 64; padding is zero. Chunk j
// covers data bytes [j*C, min((j+1)*C, N*K*R)) and its checksum is XXH64 (seed 0) of them.
// Layout is fully determined by the schema: the reader recomputes offsets, R and the chunk
// table and refuses a header that disagrees.
//
// GUARANTEES
// - Atomic build: the writer streams records to "<path>.partial" (header bytes still zero),
//   then writes the header, fsyncs the file, renames it to <path> and fsyncs the directory.
//   A killed build leaves only the .partial file, which never opens (its magic is zero), and
//   <path> keeps whatever complete store it held before. Building again RESTARTS: the new
//   writer takes an exclusive flock on the .partial file (the kernel drops a dead process's
//   lock) and truncates it. A second live build of the same path fails instead of interleaving.
// - Opening validates everything but the data: size, magic, version, header checksum, every
//   length and offset against the header and the file (no read outside the mapping, whatever
//   the header says), the layout against the schema, and the caller's expectations (teacher
//   hash, data set id, schema). verify() additionally checksums every data chunk.
// - No damaged byte is ever returned: a Reader checks every data chunk once before any of its
//   bytes leave gather() (ReaderOptions::verify: kOnTouch checks the chunks a gather touches
//   the first time it touches them, kOnOpen checks them all in the constructor; kNone is for
//   benchmarks and tests only). The file is read-only after its build (a rebuild renames a
//   new file over it; a mapped reader keeps the old inode), so a chunk checked once stays
//   good for the life of the mapping. A chunk that fails gives a StoreError naming the chunk,
//   its file byte range, the expected and found checksum and how to rebuild. Costs (measured,
//   benchmarks/results/store.md): on touch, one checksum per chunk per process spread over the
//   first epoch, then one relaxed atomic load per record and batch.
// - Every failure is a StoreError naming the path, what was checked, what was expected and
//   what was found; bad arguments (options, indices, buffers) are std::invalid_argument.
// - Readers map the file read-only (MAP_SHARED); all methods are const and safe to call from
//   several threads. gather/verify split their work over a persistent pool of num_threads - 1
//   workers plus the caller, started on first use (starting threads per call costs ~0.1 ms
//   under some sandboxes, as much as a whole batch). A call that finds the pool busy with
//   another thread's call runs on its own thread. After fork() the child sees the parent's
//   pool is not its own (owner pid), abandons it without touching it and starts its own, so a
//   Reader inherited by DataLoader workers keeps working.
//
// LIMITS: up to 64 fields of at most 8 dims, distinct UTF-8 names of up to 255 bytes, UTF-8
// strings up to 64 KiB, header up to 256 MiB; little-endian hosts only; N * K * R must fit in
// 63 bits. Building restarts rather than resumes: a killed build's records are discarded.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "engine/store/checksum.h"

namespace autokd::store {

inline constexpr char kMagic[8] = {'A', 'U', 'T', 'O', 'K', 'D', 'F', 'S'};
inline constexpr uint32_t kFormatVersion = 1;
inline constexpr uint64_t kPageBytes = 4096;
inline constexpr uint64_t kFieldAlign = 64;
inline constexpr size_t kFixedHeaderBytes = 88;

enum class Dtype : uint8_t { fp16 = 1, bf16 = 2, fp32 = 3 };
size_t dtype_size(Dtype d);
std::string dtype_name(Dtype d);
Dtype dtype_from_name(const std::string& name);  // "fp16" | "bf16" | "fp32"

struct Field {
  std::string name;
  Dtype dtype = Dtype::fp32;
  std::vector<uint64_t> shape;  // per sample, e.g. {64, 8, 8} or {10} for logits
  uint64_t elements() const;
  uint64_t bytes() const { return elements() * dtype_size(dtype); }
  bool operator==(const Field& o) const {
    return name == o.name && dtype == o.dtype && shape == o.shape;
  }
  std::string describe() const;  // "layer3:fp16[64,8,8]"
};
std::string describe(const std::vector<Field>& fields);

// A file that is not a valid, complete store, or one that does not match the caller's
// expectations. Python sees it as autokd.store.StoreError, a subclass of ValueError.
class StoreError : public std::runtime_error {
 public:
  // hint (may be empty): what the user can do, appended to the message after "; ".
  StoreError(const std::string& path, const std::string& what_checked, const std::string& expected,
             const std::string& found, const std::string& hint = "");
  const std::string& path() const { return path_; }
  const std::string& check() const { return check_; }
  const std::string& expected() const { return expected_; }
  const std::string& found() const { return found_; }

 private:
  std::string path_, check_, expected_, found_;
};

// A system call on a store file that failed (no space left, permission denied, I/O error).
// Python sees it as an OSError of that errno (PermissionError, ...) naming the file.
class StoreIOError : public std::runtime_error {
 public:
  StoreIOError(const std::string& path, const std::string& call, int error);
  const std::string& path() const { return path_; }
  const std::string& call() const { return call_; }
  int error() const { return error_; }

 private:
  std::string path_, call_;
  int error_;
};

// Where each field lives inside a record, derived from the schema alone.
struct Layout {
  std::vector<uint64_t> offsets;
  uint64_t record_bytes = 0;
  static Layout of(const std::vector<Field>& fields);
};

struct WriterOptions {
  std::string path;
  std::vector<Field> fields;
  uint64_t num_samples = 0;
  uint64_t num_views = 1;
  std::string teacher_hash;
  std::string dataset_id;
  std::string augment_id;
  uint64_t chunk_bytes = 1 << 20;
  void validate() const;  // std::invalid_argument naming the option
};

// Streams records in order (view-major: all samples of view 0, then view 1, ...).
class Writer {
 public:
  explicit Writer(WriterOptions options);
  ~Writer();  // without finish(): removes the .partial file
  Writer(const Writer&) = delete;
  Writer& operator=(const Writer&) = delete;

  // Appends the next n records; field_data[f] points at n * fields[f].bytes() contiguous bytes.
  void append(const std::vector<const void*>& field_data, uint64_t n);
  // Requires all N*K records; writes the header, fsyncs, renames atomically to options.path.
  void finish();
  void abort();  // removes the .partial file; the writer is then closed
  uint64_t records_written() const { return next_record_; }
  uint64_t total_records() const { return options_.num_samples * options_.num_views; }
  const std::string& partial_path() const { return partial_path_; }

 private:
  void feed_checksums(const unsigned char* data, uint64_t size);
  std::vector<unsigned char> encode_header() const;

  WriterOptions options_;
  Layout layout_;
  std::string partial_path_;
  int fd_ = -1;
  uint64_t header_bytes_ = 0, data_offset_ = 0, num_chunks_ = 0;
  uint64_t next_record_ = 0;
  std::vector<uint64_t> chunk_sums_;
  Xxh64Stream chunk_stream_;
  uint64_t chunk_filled_ = 0;
  std::vector<unsigned char> staging_;
};

// When a Reader checks the data chunks against their checksums (see GUARANTEES).
enum class Verify : uint8_t { kNone = 0, kOnTouch = 1, kOnOpen = 2 };
Verify verify_from_name(const std::string& name);  // "none" | "touch" | "open"

// The advice every damaged-file error carries.
extern const char* const kRebuildHint;

struct ReaderOptions {
  std::string path;
  Verify verify = Verify::kOnTouch;
  // Empty / nullopt: not checked. Otherwise a mismatch raises StoreError.
  std::string expect_teacher_hash;
  std::string expect_dataset_id;
  std::optional<std::vector<Field>> expect_fields;
  unsigned num_threads = 4;  // gather / verify threads; 0 = hardware concurrency
  void validate() const;
};

class Reader {
 public:
  explicit Reader(ReaderOptions options);
  ~Reader();
  Reader(const Reader&) = delete;
  Reader& operator=(const Reader&) = delete;

  // Copies record (samples[b], views[b]) field f into outs[f] + b * fields[f].bytes().
  // outs[f] must hold n * fields[f].bytes() bytes. Out-of-range indices: std::invalid_argument.
  void gather(const int64_t* samples, const int64_t* views, uint64_t n,
              const std::vector<void*>& outs) const;
  void verify() const;  // StoreError naming the first bad chunk and its byte range
  uint64_t num_chunks() const { return chunk_sums_.size(); }
  uint64_t chunks_checked() const { return checked_count_.load(std::memory_order_relaxed); }

  const std::string& path() const { return options_.path; }
  const std::vector<Field>& fields() const { return fields_; }
  const Layout& layout() const { return layout_; }
  uint64_t num_samples() const { return num_samples_; }
  uint64_t num_views() const { return num_views_; }
  uint64_t chunk_bytes() const { return chunk_bytes_; }
  uint64_t data_offset() const { return data_offset_; }
  uint64_t file_bytes() const { return file_bytes_; }
  const std::string& teacher_hash() const { return teacher_hash_; }
  const std::string& dataset_id() const { return dataset_id_; }
  const std::string& augment_id() const { return augment_id_; }

 private:
  void parse();
  void check_expectations() const;
  unsigned threads_for(uint64_t bytes) const;
  // Checksums the chunks in `chunks` not yet checked, marks the good ones, and throws a
  // StoreError for the lowest damaged one.
  void check_chunks(std::vector<uint64_t>& chunks) const;
  // The chunks the records (samples[b], views[b]) overlap that are not checked yet, checked.
  void check_records(const int64_t* samples, const int64_t* views, uint64_t n) const;
  // Runs fn(begin, end) over [0, n) split in up to `parts` contiguous ranges.
  template <class Fn>
  void parallel_for(uint64_t n, unsigned parts, Fn fn) const;

  struct Pool;  // persistent workers, store.cc
  mutable std::mutex pool_mu_;
  mutable Pool* pool_ = nullptr;  // raw: a pool inherited through fork() is leaked, never joined

  ReaderOptions options_;
  const unsigned char* base_ = nullptr;
  uint64_t mapped_bytes_ = 0;
  std::vector<Field> fields_;
  Layout layout_;
  uint64_t num_samples_ = 0, num_views_ = 0, chunk_bytes_ = 0;
  uint64_t header_bytes_ = 0, data_offset_ = 0, file_bytes_ = 0;
  std::vector<uint64_t> chunk_sums_;
  std::string teacher_hash_, dataset_id_, augment_id_;
  // 1 once chunk j has matched its checksum in this process (a forked child inherits the
  // parent's marks, which stay true: the mapping is read-only).
  std::unique_ptr<std::atomic<uint8_t>[]> checked_;
  mutable std::atomic<uint64_t> checked_count_{0};
};

}  // namespace autokd::store
