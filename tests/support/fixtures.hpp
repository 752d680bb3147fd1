// Test support: servers that many tests set up the same way, as fixtures. A
// generator stuck past any cancellation (StuckServer), one that counts its
// calls (CountingServer), and a stream handler that parks each writer for the
// test to hold (ParkedServer, ParkedStream). Each constructor requires that
// its server is ready.
#pragma once

#include "checks.hpp"
#include "server.hpp"

#include <deque>
#include <set>

namespace test {

// ---------------------------------------------------------------------------
// A generator that ignores cancellation
// ---------------------------------------------------------------------------

// A generator that writes one chat event and then blocks on a gate, ignoring
// cancellation (a model call that cannot be interrupted). The state is shared
// so it outlives the test's locals if the server leaves the generator running.
struct StuckState {
  Gate gate;
  std::atomic<int> entered{0};
  std::atomic<int> finished{0};
  std::atomic<int> late_send_true{0};   // sends after the gate that returned true
  std::atomic<int> late_send_false{0};  // ... and false
  std::atomic<int> late_cancelled{0};   // cancelled() true after the gate
};

inline agentsmithy::Generator stuck_generator(std::shared_ptr<StuckState> st) {
  return [st](const agentsmithy::ChatRequest&, agentsmithy::StreamWriter& out) {
    st->entered.fetch_add(1);
    out.chat("before the stall");
    st->gate.wait();
    if (out.cancelled()) st->late_cancelled.fetch_add(1);
    const bool sent = out.chat("after the stall");
    (sent ? st->late_send_true : st->late_send_false).fetch_add(1);
    st->finished.fetch_add(1);
  };
}

// Opens the gate when it goes out of scope (also when a REQUIRE fails) and
// waits a bounded time for the stuck generators to return. Declare it after
// the RunningServer so that it runs first.
struct StuckRelease {
  std::shared_ptr<StuckState> st;
  ~StuckRelease() {
    st->gate.open();
    wait_until([&] { return st->finished.load() >= st->entered.load(); }, 5000ms);
  }
};

// A server whose generator is stuck_generator(st), with a grace period of
// GraceMs milliseconds, and a StuckRelease that lets the generators go when
// the fixture goes away, before the server is stopped. A doctest fixture:
// TEST_CASE_FIXTURE(StuckServer<400>, "...").
template <int GraceMs>
struct StuckServer {
  StuckServer() : rs(options(), with_generator(stuck_generator(st))) { REQUIRE(rs.ready()); }
  // Sends a chat request from `c` (connecting it first if need be), reads
  // the generator's one event and requires that the generator is stuck.
  void open_stuck(RawClient& c) {
    if (!c.connected()) REQUIRE(c.connect_to(rs.port()));
    REQUIRE(c.post_chat(chat_body("hi")));
    REQUIRE(c.read_events(1));
    ++opened_;
    REQUIRE(wait_until([&] { return st->entered.load() == opened_; }));
  }
  // Destroys the Server while its `n` generators are stuck, then lets them
  // go: nothing they touch has been freed (the sanitizer runs check this),
  // their sends are refused and they see the cancellation.
  void destroy_then_release(int n) {
    rs.destroy();
    st->gate.open();
    REQUIRE(wait_until([&] { return st->finished.load() == n; }, 3000ms));
    CHECK(st->late_send_false.load() == n);
    CHECK(st->late_send_true.load() == 0);
    CHECK(st->late_cancelled.load() == n);
  }

  std::shared_ptr<StuckState> st = std::make_shared<StuckState>();
  RunningServer rs;
  StuckRelease release{st};  // destroyed before rs

 private:
  static agentsmithy::Options options() {
    agentsmithy::Options o = test_options();
    o.grace_period = milliseconds(GraceMs);
    return o;
  }
  int opened_ = 0;
};

// ---------------------------------------------------------------------------
// A generator that counts its calls
// ---------------------------------------------------------------------------

// Counts each call in `calls` and answers "ok".
inline agentsmithy::Generator counting_generator(std::shared_ptr<std::atomic<int>> calls) {
  return [calls](const agentsmithy::ChatRequest&, agentsmithy::StreamWriter& out) {
    calls->fetch_add(1);
    out.chat("ok");
  };
}

// A RunningServer whose generator counts its calls and answers "ok".
class CountingServer : public RunningServer {
 public:
  explicit CountingServer(agentsmithy::Options o = test_options())
      : CountingServer(std::move(o), std::make_shared<std::atomic<int>>(0)) {}
  // How many chat requests reached the generator.
  int calls() const { return calls_->load(); }

 private:
  CountingServer(agentsmithy::Options o, std::shared_ptr<std::atomic<int>> calls)
      : RunningServer(std::move(o), with_generator(counting_generator(calls))),
        calls_(std::move(calls)) {
    REQUIRE(ready());
  }
  std::shared_ptr<std::atomic<int>> calls_;
};

// ---------------------------------------------------------------------------
// A stream handler that parks every writer
// ---------------------------------------------------------------------------

using Writer = std::shared_ptr<agentsmithy::StreamWriter>;

// Hands each request's writer to the test, which keeps or drops it, and
// records the threads the handler ran on.
struct Parked {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<Writer> writers;
  std::set<std::thread::id> handler_threads;

  agentsmithy::StreamHandler handler() {
    return [this](const agentsmithy::ChatRequest&, Writer w) {
      std::lock_guard<std::mutex> lock(mu);
      handler_threads.insert(std::this_thread::get_id());
      writers.push_back(std::move(w));
      cv.notify_all();
    };
  }
  Writer take(milliseconds timeout = 5000ms) {
    std::unique_lock<std::mutex> lock(mu);
    if (!cv.wait_for(lock, timeout, [&] { return !writers.empty(); })) return nullptr;
    Writer w = std::move(writers.front());
    writers.pop_front();
    return w;
  }
};

// A server whose handler parks every writer for the test to take.
struct ParkedServer {
  explicit ParkedServer(agentsmithy::Options options = test_options())
      : rs(std::move(options), with_handler(parked.handler())) {
    REQUIRE(rs.ready());
  }
  // Sends `body` from `c` (connecting it first if need be) and takes its writer.
  Writer open(RawClient& c, const json& body = chat_body("hi")) {
    if (!c.connected()) c.connect_to(rs.port());
    REQUIRE(c.post_chat(body));
    Writer w = parked.take();
    REQUIRE(w);
    return w;
  }
  Parked parked;  // before rs: the handler refers to it
  RunningServer rs;
};

// A ParkedServer with one stream open: `c` asked "hi", `w` is its writer.
struct ParkedStream : ParkedServer {
  RawClient c;
  Writer w = open(c);
};

}  // namespace test
