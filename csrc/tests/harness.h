// The dependency-free harness every csrc/tests/test_*.cpp shares: EXPECT(cond) fails the current
// test, run(name, body) prints one PASS/FAIL line per test, finish() prints the totals and gives
// the exit status (non-zero when any test failed).
#pragma once

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <functional>
#include <stdexcept>

namespace lk_test {

inline int g_failed = 0;
inline int g_passed = 0;

#define EXPECT(cond)                                                                     \
  do {                                                                                   \
    if (!(cond)) {                                                                       \
      std::fprintf(stderr, "  check failed at %s:%d: %s\n", __FILE__, __LINE__, #cond); \
      throw std::runtime_error("check failed");                                          \
    }                                                                                    \
  } while (0)

inline void run(const char* name, const std::function<void()>& body) {
  try {
    body();
    ++g_passed;
    std::printf("PASS %s\n", name);
  } catch (const std::exception& e) {
    ++g_failed;
    std::printf("FAIL %s: %s\n", name, e.what());
  }
}

inline int finish() {
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

}  // namespace lk_test
