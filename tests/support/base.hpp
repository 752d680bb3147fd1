// Test support, the base of the others: the namespace `test` with its aliases,
// time measurements, bounded waits on a condition, and a one-shot latch.
//
// Nothing here sleeps in place of a condition: waits poll a condition (every
// millisecond) up to a deadline.
#pragma once

#include <doctest/doctest.h>
#include <httplib.h>
#include <agentsmithy.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

namespace test {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;
using namespace std::chrono_literals;

inline double ms_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}
inline double ms_since(Clock::time_point t0) { return ms_between(t0, Clock::now()); }

// A time stored in an atomic (as Clock::rep, e.g. by a generator's thread), and back.
inline Clock::rep now_rep() { return Clock::now().time_since_epoch().count(); }
inline Clock::time_point from_rep(Clock::rep r) { return Clock::time_point(Clock::duration(r)); }

// Prints a measured figure (always, so a run shows where time goes).
inline void note(const std::string& what) {
  std::printf("[measure] %s\n", what.c_str());
  std::fflush(stdout);
}

// Polls pred() every `poll` until it holds or `timeout` passes; returns whether
// it held. A bounded wait on a condition, never a sleep standing in for one.
template <class Pred>
bool wait_until(Pred&& pred, milliseconds timeout = 5000ms, milliseconds poll = 1ms) {
  const auto deadline = Clock::now() + timeout;
  for (;;) {
    if (pred()) return true;
    if (Clock::now() >= deadline) return false;
    std::this_thread::sleep_for(poll);
  }
}

// A one-shot latch: wait() blocks (ignoring everything else) until open().
class Gate {
 public:
  void open() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      open_ = true;
    }
    cv_.notify_all();
  }
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    cv_.wait(lock, [&] { return open_; });
  }
  bool is_open() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return open_;
  }

 private:
  mutable std::mutex mutex_;
  std::condition_variable cv_;
  bool open_ = false;
};

// Counts whitespace-separated words.
inline std::size_t word_count(const std::string& s) {
  std::istringstream in(s);
  std::size_t n = 0;
  std::string w;
  while (in >> w) ++n;
  return n;
}

inline std::string lower(std::string s) {
  for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

}  // namespace test
