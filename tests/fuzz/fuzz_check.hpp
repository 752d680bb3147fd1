// Shared by the libFuzzer targets in tests/fuzz/: a check that reports the
// failed condition and aborts, so libFuzzer saves the input as a crash.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string_view>

#define FUZZ_CHECK(cond)                                                                 \
  do {                                                                                   \
    if (!(cond)) {                                                                       \
      std::fprintf(stderr, "%s:%d: FUZZ_CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      std::abort();                                                                      \
    }                                                                                    \
  } while (0)

namespace fuzz {

// Any exception escaping the code under test is a finding: name it, then abort.
[[noreturn]] inline void unexpected_exception(const char* where, const std::exception* e) {
  std::fprintf(stderr, "%s threw %s\n", where, e ? e->what() : "a non-std::exception");
  std::abort();
}

}  // namespace fuzz
