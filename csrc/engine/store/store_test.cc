// Tests of the feature store's file format, writer and reader (CTest executable).
#include "engine/store/store.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "engine/testing.h"

using namespace autokd::store;

namespace {

std::string temp_dir() {
  static std::string dir = [] {
    char tmpl[] = "/tmp/autokd_store_test_XXXXXX";
    const char* d = ::mkdtemp(tmpl);
    return std::string(d ? d : "/tmp");
  }();
  return dir;
}

std::vector<unsigned char> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<unsigned char>((std::istreambuf_iterator<char>(in)), {});
}

void write_file(const std::string& path, const std::vector<unsigned char>& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
}

uint64_t get64(const std::vector<unsigned char>& b, size_t off) {
  uint64_t v;
  std::memcpy(&v, b.data() + off, 8);
  return v;
}

void put64(std::vector<unsigned char>& b, size_t off, uint64_t v) { std::memcpy(b.data() + off, &v, 8); }

// Re-seal a mutated header so the parser behind the checksum gets exercised.
void reseal(std::vector<unsigned char>& b) {
  uint64_t h = get64(b, 16);
  if (h < 8 || h > b.size()) return;
  put64(b, h - 8, xxh64(b.data(), h - 8));
}

// Value stored for byte k of field f of record (i, v): lets any read be checked exactly.
unsigned char pattern(uint64_t i, uint64_t v, size_t f, uint64_t k) {
  return static_cast<unsigned char>((i * 131 + v * 71 + f * 29 + k * 7 + 3) & 0xff);
}

struct Spec {
  uint64_t n = 37, views = 3;
  std::vector<Field> fields = {{"layer3", Dtype::fp16, {4, 3, 3}}, {"logits", Dtype::fp32, {10}}};
  uint64_t chunk = 4096;
};

std::string build(const std::string& name, const Spec& s = Spec{}, bool finish = true) {
  WriterOptions o;
  o.path = temp_dir() + "/" + name;
  o.fields = s.fields;
  o.num_samples = s.n;
  o.num_views = s.views;
  o.teacher_hash = "sha256:teacher";
  o.dataset_id = "digits:train:abc";
  o.augment_id = "crop4-flip seed=0";
  o.chunk_bytes = s.chunk;
  Writer w(o);
  uint64_t batch = 5;
  for (uint64_t v = 0; v < s.views; ++v) {
    for (uint64_t i0 = 0; i0 < s.n; i0 += batch) {
      uint64_t m = std::min(batch, s.n - i0);
      std::vector<std::vector<unsigned char>> bufs(s.fields.size());
      std::vector<const void*> ptrs;
      for (size_t f = 0; f < s.fields.size(); ++f) {
        uint64_t fb = s.fields[f].bytes();
        bufs[f].resize(m * fb);
        for (uint64_t b = 0; b < m; ++b)
          for (uint64_t k = 0; k < fb; ++k) bufs[f][b * fb + k] = pattern(i0 + b, v, f, k);
        ptrs.push_back(bufs[f].data());
      }
      w.append(ptrs, m);
    }
  }
  if (finish) w.finish();
  return o.path;
}

bool gathered_ok(const Reader& r, const std::vector<int64_t>& idx, const std::vector<int64_t>& views) {
  std::vector<std::vector<unsigned char>> outs(r.fields().size());
  std::vector<void*> ptrs;
  for (size_t f = 0; f < outs.size(); ++f) {
    outs[f].assign(idx.size() * r.fields()[f].bytes(), 0);
    ptrs.push_back(outs[f].data());
  }
  r.gather(idx.data(), views.data(), idx.size(), ptrs);
  for (size_t f = 0; f < outs.size(); ++f) {
    uint64_t fb = r.fields()[f].bytes();
    for (size_t b = 0; b < idx.size(); ++b)
      for (uint64_t k = 0; k < fb; ++k)
        if (outs[f][b * fb + k] != pattern(uint64_t(idx[b]), uint64_t(views[b]), f, k)) return false;
  }
  return true;
}

template <class Fn>
std::string store_error(Fn fn) {
  try {
    fn();
  } catch (const StoreError& e) {
    return e.check();
  }
  return "";
}

}  // namespace

AUTOKD_TEST(xxh64_known_vectors) {
  AUTOKD_EXPECT(xxh64("", 0) == 0xEF46DB3751D8E999ULL);
  AUTOKD_EXPECT(xxh64("abc", 3) == 0x44BC2CF5AD770999ULL);
  // Low 32 bits from a zstd frame's content checksum of bytes (7k + 3) mod 256, k < 1000.
  std::vector<unsigned char> pat(1000);
  for (size_t k = 0; k < pat.size(); ++k) pat[k] = static_cast<unsigned char>((k * 7 + 3) % 256);
  AUTOKD_EXPECT((xxh64(pat.data(), pat.size()) & 0xffffffffULL) == 0x33f1a3fbULL);
}

AUTOKD_TEST(xxh64_streaming_matches_one_shot) {
  std::mt19937_64 rng(1);
  std::vector<unsigned char> data(5000);
  for (auto& c : data) c = static_cast<unsigned char>(rng());
  for (size_t piece : {1, 3, 31, 32, 33, 64, 777}) {
    Xxh64Stream s;
    for (size_t off = 0; off < data.size(); off += piece)
      s.update(data.data() + off, std::min(piece, data.size() - off));
    AUTOKD_EXPECT(s.digest() == xxh64(data.data(), data.size()));
  }
}

AUTOKD_TEST(round_trip_every_dtype_and_metadata) {
  Spec s;
  s.fields = {{"a", Dtype::fp16, {3, 5}}, {"b", Dtype::bf16, {7}}, {"logits", Dtype::fp32, {10}}};
  std::string path = build("dtypes.akd", s);
  Reader r({path});
  AUTOKD_EXPECT(r.num_samples() == s.n && r.num_views() == s.views);
  AUTOKD_EXPECT(r.fields() == s.fields);
  AUTOKD_EXPECT(r.teacher_hash() == "sha256:teacher" && r.dataset_id() == "digits:train:abc");
  AUTOKD_EXPECT(r.augment_id() == "crop4-flip seed=0");
  AUTOKD_EXPECT(r.data_offset() % kPageBytes == 0);
  AUTOKD_EXPECT(r.layout().record_bytes % kFieldAlign == 0);
  std::vector<int64_t> idx, views;
  for (uint64_t v = 0; v < s.views; ++v)
    for (uint64_t i = 0; i < s.n; ++i) {
      idx.push_back(int64_t(i));
      views.push_back(int64_t(v));
    }
  AUTOKD_EXPECT(gathered_ok(r, idx, views));
  r.verify();
}

AUTOKD_TEST(gather_random_with_threads) {
  Spec s;
  s.n = 300;
  s.fields = {{"f", Dtype::fp32, {64, 8, 8}}, {"logits", Dtype::fp32, {100}}};
  std::string path = build("threads.akd", s);
  ReaderOptions o{path};
  o.num_threads = 4;
  Reader r(o);
  std::mt19937_64 rng(7);
  std::vector<int64_t> idx(128), views(128);
  for (int t = 0; t < 5; ++t) {
    for (size_t b = 0; b < idx.size(); ++b) {
      idx[b] = int64_t(rng() % s.n);
      views[b] = int64_t(rng() % s.views);
    }
    AUTOKD_EXPECT(gathered_ok(r, idx, views));
  }
  // One reader shared by several threads.
  std::vector<std::thread> pool;
  std::vector<int> ok(4, 0);
  for (int t = 0; t < 4; ++t)
    pool.emplace_back([&, t] {
      std::mt19937_64 g(t);
      std::vector<int64_t> i2(64), v2(64);
      for (size_t b = 0; b < i2.size(); ++b) {
        i2[b] = int64_t(g() % s.n);
        v2[b] = int64_t(g() % s.views);
      }
      ok[t] = gathered_ok(r, i2, v2);
    });
  for (auto& th : pool) th.join();
  for (int v : ok) AUTOKD_EXPECT(v == 1);
}

AUTOKD_TEST(reader_works_after_fork) {
  Spec s;
  s.n = 200;
  s.fields = {{"f", Dtype::fp32, {64, 8, 8}}, {"logits", Dtype::fp32, {10}}};
  ReaderOptions o{build("fork.akd", s)};
  o.num_threads = 3;
  Reader r(o);
  std::vector<int64_t> idx(150), views(150);
  for (size_t b = 0; b < idx.size(); ++b) {
    idx[b] = int64_t((b * 37) % s.n);
    views[b] = int64_t(b % s.views);
  }
  AUTOKD_EXPECT(gathered_ok(r, idx, views));  // the parent's worker pool now exists
  for (int child = 0; child < 2; ++child) {
    pid_t pid = ::fork();
    if (pid == 0) {
      std::vector<int64_t> ridx(idx.rbegin(), idx.rend());
      bool ok = gathered_ok(r, idx, views) && gathered_ok(r, ridx, views);
      r.verify();
      ::_exit(ok ? 0 : 3);
    }
    int status = 0;
    ::waitpid(pid, &status, 0);
    AUTOKD_EXPECT(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  }
  AUTOKD_EXPECT(gathered_ok(r, idx, views));
}

AUTOKD_TEST(gather_rejects_bad_indices) {
  Reader r({build("bad_idx.akd")});
  std::vector<unsigned char> a(r.fields()[0].bytes()), b(r.fields()[1].bytes());
  std::vector<void*> outs{a.data(), b.data()};
  int64_t i = 37, v = 0, neg = -1;
  AUTOKD_EXPECT_THROWS(r.gather(&i, &v, 1, outs), std::invalid_argument);
  AUTOKD_EXPECT_THROWS(r.gather(&v, &neg, 1, outs), std::invalid_argument);
  int64_t three = 3;
  AUTOKD_EXPECT_THROWS(r.gather(&v, &three, 1, outs), std::invalid_argument);
  std::vector<void*> one{a.data()};
  AUTOKD_EXPECT_THROWS(r.gather(&v, &v, 1, one), std::invalid_argument);
}

AUTOKD_TEST(options_validated) {
  WriterOptions o;
  o.path = temp_dir() + "/opts.akd";
  o.num_samples = 1;
  AUTOKD_EXPECT_THROWS(Writer{o}, std::invalid_argument);  // no fields
  o.fields = {{"x", Dtype::fp16, {0}}};
  AUTOKD_EXPECT_THROWS(Writer{o}, std::invalid_argument);  // empty shape
  o.fields = {{"x", Dtype::fp16, {2}}, {"x", Dtype::fp32, {2}}};
  AUTOKD_EXPECT_THROWS(Writer{o}, std::invalid_argument);  // duplicate
  o.fields = {{"bad\xff", Dtype::fp16, {2}}};
  AUTOKD_EXPECT_THROWS(Writer{o}, std::invalid_argument);  // not UTF-8
  o.fields = {{"x", Dtype::fp16, {2}}};
  o.num_views = 0;
  AUTOKD_EXPECT_THROWS(Writer{o}, std::invalid_argument);
  o.num_views = 1;
  o.chunk_bytes = 100;
  AUTOKD_EXPECT_THROWS(Writer{o}, std::invalid_argument);
  AUTOKD_EXPECT_THROWS(dtype_from_name("fp64"), std::invalid_argument);
  AUTOKD_EXPECT_THROWS(Reader(ReaderOptions{""}), std::invalid_argument);
}

AUTOKD_TEST(unfinished_build_never_opens) {
  std::string path = temp_dir() + "/unfinished.akd";
  {
    Spec s;
    WriterOptions o;
    o.path = path;
    o.fields = s.fields;
    o.num_samples = 4;
    Writer w(o);
    std::vector<float> logits(40);
    std::vector<uint16_t> f(4 * 36);
    w.append({f.data(), logits.data()}, 2);
    AUTOKD_EXPECT_THROWS(w.finish(), std::runtime_error);  // 2 of 4 records
    // A file left mid-build (as after SIGKILL) has a zero header.
    AUTOKD_EXPECT(store_error([&] { Reader r(ReaderOptions{w.partial_path()}); }) == "magic");
    AUTOKD_EXPECT(store_error([&] { Reader r(ReaderOptions{path}); }) == "open");
    // A second build of the same path is refused while this one holds the lock.
    AUTOKD_EXPECT(store_error([&] { Writer w2(o); }).rfind("build lock", 0) == 0);
  }
  AUTOKD_EXPECT(::access((path + ".partial").c_str(), F_OK) != 0);  // the destructor cleaned up
}

AUTOKD_TEST(corruption_is_detected_and_named) {
  std::string path = build("good.akd");
  const std::vector<unsigned char> good = read_file(path);
  std::string bad = temp_dir() + "/bad.akd";
  auto check = [&](std::vector<unsigned char> bytes, bool verify = false) {
    write_file(bad, bytes);
    return store_error([&] {
      Reader r({bad});
      if (verify) r.verify();
    });
  };
  AUTOKD_EXPECT(check(good, true).empty());
  // Truncated anywhere: inside the data, inside the header, to almost nothing.
  for (size_t keep : {good.size() - 1, size_t(5000), size_t(200), size_t(10)}) {
    auto b = good;
    b.resize(keep);
    AUTOKD_EXPECT(check(b) == "truncated file");
  }
  {
    auto b = good;
    b[3] ^= 0x20;
    AUTOKD_EXPECT(check(b) == "magic");
  }
  {
    auto b = good;
    b[8] = 2;
    AUTOKD_EXPECT(check(b) == "format version");
  }
  {  // any flipped byte of the header after the version field
    uint64_t h = get64(good, 16);
    for (uint64_t k = 40; k < h; k += 7) {
      auto b = good;
      b[k] ^= 0x01;
      AUTOKD_EXPECT(check(b) == "header checksum");
    }
  }
  {  // a flipped data byte opens (data are not read at open) but fails verify
    auto b = good;
    b[get64(good, 24) + 1234] ^= 0x80;
    std::string what = check(b, true);
    AUTOKD_EXPECT(what.rfind("data checksum of chunk 0 ", 0) == 0);
  }
  {  // ... and no gather returns a byte of that chunk; the other chunks still read
    auto b = good;
    b[get64(good, 24) + 6 * 192 + 10] ^= 0x80;  // record 6, field 0 (192-byte records), chunk 0
    write_file(bad, b);
    Reader r({bad});
    AUTOKD_EXPECT(r.chunks_checked() == 0);
    AUTOKD_EXPECT(gathered_ok(r, {30}, {0}));  // record 30: bytes [5760, 5952), chunk 1
    AUTOKD_EXPECT(r.chunks_checked() == 1);
    AUTOKD_EXPECT(gathered_ok(r, {30}, {0}));  // checked once: no second hash
    AUTOKD_EXPECT(r.chunks_checked() == 1);
    AUTOKD_EXPECT(store_error([&] { gathered_ok(r, {30, 6}, {0, 0}); }) ==
                  "data checksum of chunk 0 (file bytes [4096, 8192))");
    // record 21 spans chunks 0 and 1: the damaged half is enough to refuse it
    AUTOKD_EXPECT(store_error([&] { gathered_ok(r, {21}, {0}); }).rfind("data checksum of chunk 0", 0) == 0);
    AUTOKD_EXPECT(store_error([&] { gathered_ok(r, {6}, {0}); }) != "");  // refused every time
    ReaderOptions at_open{bad};
    at_open.verify = Verify::kOnOpen;
    AUTOKD_EXPECT(store_error([&] { Reader r2(at_open); }).rfind("data checksum of chunk 0", 0) == 0);
    ReaderOptions unchecked{bad};
    unchecked.verify = Verify::kNone;
    Reader r3(unchecked);
    AUTOKD_EXPECT(!gathered_ok(r3, {6}, {0}));  // the damage is there, returned when asked for
    ReaderOptions good_open{path};
    good_open.verify = Verify::kOnOpen;
    Reader r4(good_open);
    AUTOKD_EXPECT(r4.chunks_checked() == r4.num_chunks());
  }
  {  // offsets outside the file, with a valid header checksum
    auto b = good;
    put64(b, 24, get64(good, 24) + (1ULL << 40));
    reseal(b);
    AUTOKD_EXPECT(check(b) == "data region inside the file");
    b = good;
    put64(b, 16, 1ULL << 50);  // header length beyond the file
    AUTOKD_EXPECT(check(b) == "header length inside the file");
    b = good;
    put64(b, 40, get64(good, 40) + 1);  // one more sample than the file holds
    reseal(b);
    AUTOKD_EXPECT(check(b) == "data region inside the file");
  }
  {  // a name that is not UTF-8 (it would not decode to a Python str)
    auto b = good;
    size_t at = 88 + 4;  // first byte of the teacher hash string
    b[at] = 0xC0;
    reseal(b);
    AUTOKD_EXPECT(check(b).rfind("text of teacher_hash", 0) == 0);
  }
  {  // trailing bytes
    auto b = good;
    b.push_back(0);
    AUTOKD_EXPECT(check(b) == "file size");
  }
}

AUTOKD_TEST(expectations_checked) {
  std::string path = build("expect.akd");
  ReaderOptions o{path};
  o.expect_teacher_hash = "sha256:other";
  AUTOKD_EXPECT(store_error([&] { Reader r(o); }) == "teacher hash");
  o = ReaderOptions{path};
  o.expect_dataset_id = "cifar10:train";
  AUTOKD_EXPECT(store_error([&] { Reader r(o); }) == "data set id");
  o = ReaderOptions{path};
  o.expect_fields = std::vector<Field>{{"layer3", Dtype::fp32, {4, 3, 3}}, {"logits", Dtype::fp32, {10}}};
  AUTOKD_EXPECT(store_error([&] { Reader r(o); }) == "schema");
  o.expect_fields = Spec{}.fields;
  o.expect_teacher_hash = "sha256:teacher";
  o.expect_dataset_id = "digits:train:abc";
  AUTOKD_EXPECT(store_error([&] { Reader r(o); }).empty());
}

// Random and mutated headers: the reader must answer with StoreError (or open a consistent
// store) and never read outside the file. Run under ASan/valgrind for the strongest check.
AUTOKD_TEST(fuzz_headers) {
  Spec s;
  s.n = 9;
  s.views = 2;
  std::string path = build("fuzz_src.akd", s);
  const std::vector<unsigned char> good = read_file(path);
  const uint64_t h = get64(good, 16);
  std::string bad = temp_dir() + "/fuzz.akd";
  std::mt19937_64 rng(123);
  int opened = 0, rejected = 0;
  for (int t = 0; t < 1500; ++t) {
    std::vector<unsigned char> b;
    int mode = t % 4;
    if (mode == 0) {  // pure noise, sometimes with a valid magic + version
      b.resize(rng() % 6000);
      for (auto& c : b) c = static_cast<unsigned char>(rng());
      if (b.size() >= 16 && (rng() & 1)) {
        std::memcpy(b.data(), kMagic, 8);
        b[8] = 1, b[9] = b[10] = b[11] = 0;
      }
    } else {  // mutate a valid file's header, then (mode >= 2) re-seal its checksum
      b = good;
      int flips = 1 + int(rng() % 6);
      for (int k = 0; k < flips; ++k) {
        uint64_t pos = 8 + rng() % (h - 8);
        if (rng() % 3 == 0 && pos + 8 <= h) {  // plant an extreme integer
          uint64_t vals[] = {0, 1, ~0ULL, 1ULL << 63, uint64_t(rng()), h, b.size()};
          put64(b, pos, vals[rng() % 7]);
        } else {
          b[pos] = static_cast<unsigned char>(rng());
        }
      }
      if (mode >= 2) reseal(b);
      if (mode == 3) b.resize(rng() % (b.size() + 1));
    }
    write_file(bad, b);
    try {
      Reader r({bad});
      r.verify();
      ++opened;
    } catch (const StoreError&) {
      ++rejected;
    }
  }
  AUTOKD_EXPECT(rejected > 1000);
  std::printf("  fuzz: %d rejected, %d opened\n", rejected, opened);
}

int main() { return autokd::testing::run_all(); }
