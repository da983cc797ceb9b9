// A tiny test harness for the engine's C++ tests (run by CTest): no third-party framework, so
// the tests build anywhere the engine builds.
//   AUTOKD_TEST(name) { AUTOKD_EXPECT(cond); AUTOKD_EXPECT_THROWS(expr, std::invalid_argument); }
//   int main() { return autokd::testing::run_all(); }
#pragma once

#include <cstdio>
#include <functional>
#include <string>
#include <vector>

namespace autokd::testing {

struct Case {
  const char* name;
  std::function<void()> fn;
};

inline std::vector<Case>& cases() {
  static std::vector<Case> all;
  return all;
}

inline int& failures() {
  static int n = 0;
  return n;
}

struct Add {
  Add(const char* name, std::function<void()> fn) { cases().push_back({name, std::move(fn)}); }
};

inline int run_all() {
  int failed_cases = 0;
  for (auto& c : cases()) {
    int before = failures();
    try {
      c.fn();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "  uncaught exception: %s\n", e.what());
      ++failures();
    }
    bool ok = failures() == before;
    failed_cases += !ok;
    std::printf("[%s] %s\n", ok ? " OK " : "FAIL", c.name);
  }
  std::printf("%zu cases, %d failed\n", cases().size(), failed_cases);
  return failed_cases == 0 ? 0 : 1;
}

}  // namespace autokd::testing

#define AUTOKD_TEST(name)                                             \
  static void autokd_test_##name();                                   \
  static ::autokd::testing::Add autokd_add_##name(#name, autokd_test_##name); \
  static void autokd_test_##name()

#define AUTOKD_EXPECT(cond)                                                              \
  do {                                                                                   \
    if (!(cond)) {                                                                       \
      std::fprintf(stderr, "  %s:%d: expected %s\n", __FILE__, __LINE__, #cond);         \
      ++::autokd::testing::failures();                                                   \
    }                                                                                    \
  } while (0)

#define AUTOKD_EXPECT_THROWS(expr, exc)                                                  \
  do {                                                                                   \
    bool thrown = false;                                                                 \
    try {                                                                                \
      (void)(expr);                                                                      \
    } catch (const exc&) {                                                               \
      thrown = true;                                                                     \
    }                                                                                    \
    if (!thrown) {                                                                       \
      std::fprintf(stderr, "  %s:%d: expected %s to throw %s\n", __FILE__, __LINE__, #expr, \
                   #exc);                                                                \
      ++::autokd::testing::failures();                                                   \
    }                                                                                    \
  } while (0)
