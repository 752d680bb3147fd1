// The building blocks every part shares: the one event loop and the one
// lifecycle with its admission decision (include/agentsmithy/detail/,
// include/agentsmithy/lifecycle/).
#include <doctest/doctest.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <thread>

#include "agentsmithy.hpp"

namespace {

using agentsmithy::detail::admission_decision;
using agentsmithy::detail::Admit;
using agentsmithy::detail::Arrival;
using agentsmithy::detail::Clock;
using agentsmithy::detail::EventLoop;
using agentsmithy::detail::Lifecycle;
using agentsmithy::detail::Phase;

struct LoopSocketPair {
  int fd[2] = {-1, -1};
  LoopSocketPair() { REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fd) == 0); }
  ~LoopSocketPair() {
    for (const int f : fd)
      if (f >= 0) ::close(f);
  }
};

}  // namespace

TEST_CASE("event loop: a ready descriptor runs its own callback, once per readiness") {
  EventLoop loop;
  LoopSocketPair a, b;
  int a_calls = 0, b_calls = 0;
  REQUIRE(loop.watch(a.fd[0], EPOLLIN, [&](std::uint32_t events) {
    CHECK((events & EPOLLIN) != 0);
    char c;
    CHECK(::read(a.fd[0], &c, 1) == 1);
    ++a_calls;
  }));
  REQUIRE(loop.watch(b.fd[0], EPOLLIN, [&](std::uint32_t) { ++b_calls; }));
  REQUIRE(::write(a.fd[1], "x", 1) == 1);
  CHECK(loop.pass(Clock::now() + std::chrono::seconds(5)));
  CHECK(a_calls == 1);
  CHECK(b_calls == 0);
}

TEST_CASE("event loop: a pass returns at its deadline, at a wake, and not after stop") {
  EventLoop loop;
  SUBCASE("the deadline") {
    const auto start = Clock::now();
    CHECK(loop.pass(start + std::chrono::milliseconds(30)));
    CHECK(Clock::now() - start >= std::chrono::milliseconds(30));
  }
  SUBCASE("a wake from another thread ends a pass without a deadline") {
    std::thread waker([&] { loop.wake(); });
    CHECK(loop.pass(std::nullopt));
    waker.join();
  }
  SUBCASE("stop") {
    std::thread stopper([&] { loop.stop(); });
    stopper.join();
    CHECK_FALSE(loop.pass(std::nullopt));
    CHECK(loop.stopped());
  }
}

TEST_CASE("event loop: an unwatched descriptor's callback never runs, even from a batch in hand") {
  EventLoop loop;
  LoopSocketPair a, b;
  int b_calls = 0;
  EventLoop::Watch* watch_b = nullptr;
  // Both ready in one batch, a first (epoll reports them in the order they
  // became ready): a's callback unwatches b, whose event is then in hand.
  REQUIRE(loop.watch(a.fd[0], EPOLLIN, [&](std::uint32_t) {
    loop.unwatch(watch_b);
    watch_b = nullptr;
  }));
  watch_b = loop.watch(b.fd[0], EPOLLIN, [&](std::uint32_t) { ++b_calls; });
  REQUIRE(watch_b);
  REQUIRE(::write(a.fd[1], "x", 1) == 1);
  REQUIRE(::write(b.fd[1], "x", 1) == 1);
  CHECK(loop.pass(Clock::now() + std::chrono::seconds(5)));
  CHECK(b_calls == 0);
  CHECK(loop.pass(Clock::now() + std::chrono::milliseconds(20)));
  CHECK(b_calls == 0);
}

TEST_CASE("event loop: rearm changes what a watch waits for") {
  EventLoop loop;
  LoopSocketPair p;
  std::uint32_t seen = 0;
  EventLoop::Watch* w = loop.watch(p.fd[0], EPOLLIN, [&](std::uint32_t events) { seen = events; });
  REQUIRE(w);
  CHECK(loop.pass(Clock::now() + std::chrono::milliseconds(10)));
  CHECK(seen == 0);  // nothing to read, and not watching for writable
  REQUIRE(loop.rearm(w, EPOLLOUT));
  CHECK(loop.pass(Clock::now() + std::chrono::seconds(5)));
  CHECK((seen & EPOLLOUT) != 0);
}

TEST_CASE("lifecycle: phases only move forward, each transition observed once") {
  int changes = 0;
  Lifecycle life(false, [&] { ++changes; });
  std::vector<Phase> observed;
  life.observe([&](Phase p, const std::string&) { observed.push_back(p); });
  CHECK(life.phase() == Phase::starting);
  CHECK_FALSE(life.started());
  life.enter(Phase::ready);
  life.enter(Phase::draining);
  life.enter(Phase::ready);  // behind: ignored
  life.enter(Phase::stopped);
  CHECK(life.phase() == Phase::stopped);
  CHECK(life.over());
  CHECK(observed == std::vector<Phase>{Phase::ready, Phase::draining, Phase::stopped});
  CHECK(changes == 3);
}

TEST_CASE("admission decision: serve, refuse with 503, park, close") {
  SUBCASE("without a lame duck, a shutdown request refuses new work at once") {
    Lifecycle life(false, [] {});
    life.enter(Phase::ready);
    CHECK(admission_decision(life, Arrival::request) == Admit::serve);
    CHECK(admission_decision(life, Arrival::next_request) == Admit::park);
    CHECK(life.request_shutdown());
    CHECK_FALSE(life.request_shutdown());  // only the first one counts
    CHECK(life.shutdown_requested());
    CHECK(admission_decision(life, Arrival::request) == Admit::refuse_503);
    CHECK(admission_decision(life, Arrival::next_request) == Admit::close);
    CHECK(admission_decision(life, Arrival::first_request) == Admit::park);
  }
  SUBCASE("with a lame duck, work is served until the drain") {
    Lifecycle life(true, [] {});
    life.enter(Phase::ready);
    life.request_shutdown();
    life.enter(Phase::lame_duck);
    CHECK(life.shutdown_requested());
    CHECK(admission_decision(life, Arrival::request) == Admit::serve);
    life.enter(Phase::draining);
    CHECK(admission_decision(life, Arrival::request) == Admit::refuse_503);
  }
  SUBCASE("forcing refuses at once, lame duck or not") {
    Lifecycle life(true, [] {});
    life.force();
    CHECK(life.forced());
    CHECK(admission_decision(life, Arrival::request) == Admit::refuse_503);
  }
}
