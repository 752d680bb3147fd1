// Stream handlers (issue 8): a writer any thread can feed, end(), the last
// reference, stream:false through a handler, on_cancel for every cause, and
// the shutdown with 1,000 handler streams.
#include <poll.h>
#include <sys/socket.h>

#include <algorithm>
#include <set>

#include "support.hpp"

using namespace test;
using agentsmithy::ChatRequest;
using agentsmithy::Server;
using agentsmithy::StreamWriter;

namespace {

// One producer thread for every stream a handler hands it: the shape of an
// inference thread that decodes a batch of sequences. Each writer gets
// `chunks` chat events, one per round over all streams, then end().
class BatchProducer {
 public:
  explicit BatchProducer(int chunks) : chunks_(chunks), thread_([this] { run(); }) {}
  ~BatchProducer() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
  void add(Writer w) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      incoming_.push_back(std::move(w));
    }
    cv_.notify_all();
  }
  // A stream handler that hands each writer to the producer.
  agentsmithy::StreamHandler handler() {
    return [this](const ChatRequest&, Writer w) { add(std::move(w)); };
  }
  std::set<std::thread::id> feeding_threads() {
    std::lock_guard<std::mutex> lock(mu_);
    return threads_;
  }

 private:
  struct Stream {
    Writer writer;
    int sent = 0;
  };
  void run() {
    std::vector<Stream> streams;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait_for(lock, 2ms, [&] { return stop_ || !incoming_.empty(); });
        if (stop_) return;
        for (auto& w : incoming_) streams.push_back(Stream{std::move(w), 0});
        incoming_.clear();
        threads_.insert(std::this_thread::get_id());
      }
      for (auto& s : streams) {
        if (s.sent < chunks_ && s.writer->chat("t" + std::to_string(s.sent) + " ")) ++s.sent;
        if (s.sent == chunks_ || s.writer->cancelled()) {
          s.writer->end();
          s.writer.reset();
        }
      }
      streams.erase(
          std::remove_if(streams.begin(), streams.end(), [](const Stream& s) { return !s.writer; }),
          streams.end());
    }
  }
  const int chunks_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Writer> incoming_;
  std::set<std::thread::id> threads_;
  bool stop_ = false;
  std::thread thread_;
};

// Opens `n` streams, each asking `text`.
std::vector<std::unique_ptr<RawClient>> open_streams(int port, int n, const std::string& text) {
  std::vector<std::unique_ptr<RawClient>> clients;
  for (int i = 0; i < n; ++i) {
    clients.push_back(std::make_unique<RawClient>(port));
    REQUIRE(clients.back()->post_chat(chat_body(text)));
  }
  return clients;
}

// Records when an on_cancel callback ran, and on which thread.
struct CancelProbe {
  std::atomic<int> runs{0};
  std::atomic<Clock::rep> at_ns{0};
  std::mutex mu;
  std::thread::id thread;
  std::function<void()> callback() {
    return [this] {
      at_ns.store(now_rep());
      {
        std::lock_guard<std::mutex> lock(mu);
        thread = std::this_thread::get_id();
      }
      runs.fetch_add(1);
    };
  }
  Clock::time_point at() const { return from_rep(at_ns.load()); }
};

}  // namespace

TEST_CASE("handler: one producer thread feeds 200 streams at once") {
  BatchProducer producer(20);
  RunningServer rs(test_options(), with_handler(producer.handler()));
  REQUIRE(rs.ready());
  constexpr int kStreams = 200;
  auto clients = open_streams(rs.port(), kStreams, "go");
  for (auto& c : clients) {
    REQUIRE(c->read_response(10000ms));
    check_well_formed_stream(*c);
    CHECK(c->count("chat") == 20);
    CHECK(c->joined_chat().rfind("t0 t1 t2 ", 0) == 0);
    CHECK(c->read_to_eof(2000ms));
  }
  CHECK(producer.feeding_threads().size() == 1);
  CHECK(wait_until([&] { return rs.chat().active_streams() == 0; }, 2000ms));
}

TEST_CASE_FIXTURE(ParkedStream,
                  "handler: the stream stays open after the handler returns, until end()") {
  CHECK(c.read_headers());
  CHECK(w->chat("one"));
  CHECK(c.read_count("chat", 1));
  CHECK_FALSE(c.complete);
  CHECK_FALSE(w->cancelled());
  w->end();
  w->end();  // idempotent
  CHECK(w->cancelled());
  CHECK_FALSE(w->chat("after end"));
  CHECK(c.read_response());
  check_well_formed_stream(c);
  CHECK(c.types() == std::vector<std::string>{"chat", "done"});
  {
    std::lock_guard<std::mutex> lock(parked.mu);
    CHECK(parked.handler_threads.count(std::this_thread::get_id()) == 0);  // a server thread
  }
}

TEST_CASE_FIXTURE(ParkedStream,
                  "handler: releasing the last reference without end() appends done") {
  Writer copy = w;
  CHECK(w->chat("a"));
  w.reset();  // another reference is left: the stream goes on
  CHECK(copy->chat("b"));
  CHECK(c.read_count("chat", 2));
  CHECK_FALSE(c.complete);
  copy.reset();
  CHECK(c.read_response());
  check_well_formed_stream(c);
  CHECK(c.types() == std::vector<std::string>{"chat", "chat", "done"});
}

TEST_CASE_FIXTURE(ParkedStream, "handler: an error event ends the stream and done follows") {
  CHECK(w->send({{"type", "error"}, {"error", "model exploded"}}));
  CHECK_FALSE(w->chat("late"));
  w->end();
  CHECK(c.read_response());
  check_well_formed_stream(c);
  CHECK(c.types() == std::vector<std::string>{"error", "done"});
  CHECK(c.events[0].value("error", std::string()) == "model exploded");
}

TEST_CASE(
    "handler: a handler that throws ends the stream with an error, and the server serves on") {
  RunningServer rs(test_options(), [](Server& s) {
    s.chat_service().set_stream_handler([](const ChatRequest& req, Writer w) {
      if (req.messages.back().content == "throw") throw std::runtime_error("no model loaded");
      w->chat("fine");
    });
  });
  REQUIRE(rs.ready());
  RawClient c(rs.port());
  REQUIRE(c.post_chat(chat_body("throw")));
  CHECK(c.read_response());
  check_well_formed_stream(c);
  REQUIRE(c.count("error") == 1);
  CHECK(c.events[c.events.size() - 2].value("code", std::string()) == "generator_error");
  RawClient d(rs.port());
  REQUIRE(d.post_chat(chat_body("ok")));
  CHECK(d.read_response());
  CHECK(d.joined_chat() == "fine");
}

TEST_CASE_FIXTURE(ParkedServer, "handler: stream:false is answered once the writer ends") {
  RawClient c;
  Writer w = open(c, chat_body("hi", json::object(), false));
  std::thread feeder([w] {
    w->chat("Hello, ");
    w->chat("world");
    w->end();
  });
  CHECK(c.read_response());
  feeder.join();
  CHECK(c.status == 200);
  const json body = c.body_json();
  CHECK(body.value("content", std::string()) == "Hello, world");
  CHECK(body.value("done", false));
}

TEST_CASE_FIXTURE(
    ParkedStream,
    "handler: several threads on one writer keep every event whole and in call order") {
  constexpr int kThreads = 4, kPerThread = 500;
  // Each thread numbers its own events; a thread's events must arrive in its
  // order, and every event whole (a torn frame fails the parser).
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([w = w, t] {
      const std::string pad(100 + 37 * t, 'a' + t);
      for (int i = 0; i < kPerThread; ++i) {
        w->send({{"type", "chat"}, {"content", pad}, {"thread", t}, {"seq", i}});
      }
    });
  }
  for (auto& t : threads) t.join();
  w.reset();
  CHECK(c.read_response(10000ms));
  check_well_formed_stream(c);
  REQUIRE(c.count("chat") == kThreads * kPerThread);
  std::vector<int> next(kThreads, 0);
  bool in_order = true;
  for (const json& e : c.events) {
    if (e.value("type", std::string()) != "chat") continue;
    const int t = e.value("thread", -1);
    REQUIRE(t >= 0);
    REQUIRE(t < kThreads);
    if (e.value("seq", -1) != next[static_cast<std::size_t>(t)]) in_order = false;
    ++next[static_cast<std::size_t>(t)];
    CHECK(e.value("content", std::string()).size() == static_cast<std::size_t>(100 + 37 * t));
  }
  CHECK(in_order);
}

TEST_CASE("handler: the max_streams slot is held until the writer ends") {
  agentsmithy::Options o = test_options();
  o.max_streams = 1;
  ParkedServer ps(o);
  auto& rs = ps.rs;
  RawClient a;
  Writer w = ps.open(a, chat_body("a"));
  a.abort();  // the client is gone, but the producer still holds the writer
  REQUIRE(wait_until([&] { return w->cancelled(); }, 2000ms));
  RawClient b(rs.port());
  REQUIRE(b.post_chat(chat_body("b")));
  CHECK(b.read_response());
  CHECK(b.status == 503);
  CHECK(b.body_json().value("code", std::string()) == "capacity");
  w.reset();  // the stream ends: its slot is free
  RawClient c;
  Writer w2 = ps.open(c, chat_body("c"));
  CHECK(c.read_headers());
  CHECK(c.status == 200);
}

TEST_CASE("handler: set_generator and set_stream_handler replace each other") {
  RunningServer rs(test_options());
  REQUIRE(rs.ready());
  const auto ask = [&] {
    RawClient c(rs.port());
    REQUIRE(c.post_chat(chat_body("x")));
    REQUIRE(c.read_response());
    return c.joined_chat();
  };
  rs.chat().set_generator([](const ChatRequest&, StreamWriter& out) { out.chat("generator"); });
  CHECK(ask() == "generator");
  rs.chat().set_stream_handler([](const ChatRequest&, Writer w) { w->chat("handler"); });
  CHECK(ask() == "handler");
  rs.chat().set_generator([](const ChatRequest&, StreamWriter& out) { out.chat("again"); });
  CHECK(ask() == "again");
}

// ---------------------------------------------------------------------------
// on_cancel
// ---------------------------------------------------------------------------

TEST_CASE_FIXTURE(ParkedStream,
                  "on_cancel: runs once, on a server thread, within 10 ms of the client leaving") {
  bool reset = true;
  SUBCASE("the client resets the connection") { reset = true; }
  SUBCASE("the client closes its side (FIN)") { reset = false; }
  CancelProbe first, second;
  std::vector<int> order;
  std::mutex order_mu;
  w->on_cancel(first.callback());
  w->on_cancel([&] {
    std::lock_guard<std::mutex> lock(order_mu);
    order.push_back(1);
  });
  w->on_cancel([&] {
    std::lock_guard<std::mutex> lock(order_mu);
    order.push_back(2);
  });
  CHECK(c.read_headers());
  const auto left = Clock::now();
  if (reset) {
    c.abort();
  } else {
    ::shutdown(c.fd(), SHUT_WR);
  }
  REQUIRE(wait_until([&] { return first.runs.load() == 1; }, 2000ms));
  note("on_cancel " + std::to_string(ms_between(left, first.at())) + " ms after the client left");
  CHECK(ms_between(left, first.at()) < 100.0);  // the issue asks 10 ms: bench/ measures it
  CHECK(first.thread != std::this_thread::get_id());
  CHECK(w->cancelled());
  CHECK_FALSE(w->chat("nobody listens"));
  w.reset();
  {
    std::lock_guard<std::mutex> lock(order_mu);
    CHECK(order == std::vector<int>{1, 2});
  }
  CHECK(first.runs.load() == 1);
}

TEST_CASE("on_cancel: runs at shutdown while the generator is blocked in recv()") {
  int pair[2];
  REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM, 0, pair) == 0);
  std::atomic<bool> released{false};
  std::atomic<Clock::rep> released_ns{0};
  CancelProbe probe;
  Gate entered;
  RunningServer rs(test_options(), [&](Server& s) {
    s.chat_service().set_generator([&](const ChatRequest&, StreamWriter& out) {
      out.on_cancel(probe.callback());
      out.on_cancel([&] { ::shutdown(pair[0], SHUT_RDWR); });  // the only way out of recv()
      out.chat("waiting for the model");
      entered.open();
      char byte;
      const ssize_t n = ::recv(pair[0], &byte, 1, 0);  // nothing is ever sent
      (void)n;
      released_ns.store(Clock::now().time_since_epoch().count());
      released = true;
    });
  });
  REQUIRE(rs.ready());
  RawClient c(rs.port());
  REQUIRE(c.post_chat(chat_body("hi")));
  entered.wait();
  CHECK(c.read_count("chat", 1));
  const auto t0 = Clock::now();
  rs.server().shutdown();
  REQUIRE(wait_until([&] { return released.load(); }, 2000ms));
  const auto released_at = Clock::time_point(Clock::duration(released_ns.load()));
  note("blocked recv(): on_cancel " + std::to_string(ms_between(t0, probe.at())) +
       " ms, released " + std::to_string(ms_between(t0, released_at)) + " ms after shutdown()");
  CHECK(probe.runs.load() == 1);
  CHECK(ms_between(t0, probe.at()) < 100.0);  // the issue asks 10 ms: bench/ measures it
  CHECK(ms_between(t0, released_at) < 250.0);
  CHECK(c.read_response());
  check_ended_by_shutdown(c);
  CHECK(rs.wait_returned(2000ms));
  ::close(pair[0]);
  ::close(pair[1]);
}

TEST_CASE("on_cancel: a stream that ends normally never runs its callbacks") {
  CancelProbe probe;
  RunningServer rs(test_options(), [&](Server& s) {
    s.chat_service().set_stream_handler([&](const ChatRequest&, Writer w) {
      w->on_cancel(probe.callback());
      w->chat("done soon");
      w->end();
      w->on_cancel(probe.callback());  // after the end: never runs either
    });
  });
  REQUIRE(rs.ready());
  RawClient c(rs.port());
  REQUIRE(c.post_chat(chat_body("hi")));
  CHECK(c.read_response());
  check_well_formed_stream(c);
  c.close();
  rs.stop();
  CHECK(probe.runs.load() == 0);
}

TEST_CASE_FIXTURE(
    ParkedStream,
    "on_cancel: registered after the cancellation, it runs at once on the calling thread") {
  CHECK(c.read_headers());
  c.abort();
  REQUIRE(wait_until([&] { return w->cancelled(); }, 2000ms));
  CancelProbe late;
  w->on_cancel(late.callback());
  CHECK(late.runs.load() == 1);  // before on_cancel returned
  CHECK(late.thread == std::this_thread::get_id());
}

TEST_CASE_FIXTURE(ParkedStream,
                  "on_cancel: a callback that throws is logged and the rest still run") {
  CancelProbe after;
  w->on_cancel([] { throw std::runtime_error("callback bug"); });
  w->on_cancel(after.callback());
  CHECK(c.read_headers());
  rs.server().shutdown();
  REQUIRE(wait_until([&] { return after.runs.load() == 1; }, 2000ms));
  CHECK(rs.logs->contains("callback bug"));
  CHECK(c.read_response());
  check_ended_by_shutdown(c);
  w.reset();
  CHECK(rs.wait_returned(2000ms));
}

TEST_CASE("on_cancel: a producer that ignores the shutdown is cut at the grace deadline") {
  agentsmithy::Options o = test_options();
  o.grace_period = 200ms;
  ParkedServer ps(o);
  auto& rs = ps.rs;
  RawClient c;
  Writer w = ps.open(c);  // held past the grace period
  CancelProbe probe;
  w->on_cancel(probe.callback());
  CHECK(c.read_headers());
  const auto t0 = Clock::now();
  rs.server().shutdown();
  CHECK(c.read_response());
  check_ended_by_shutdown(c);
  CHECK(probe.runs.load() == 1);
  CHECK(ms_between(t0, probe.at()) < 100.0);
  REQUIRE(rs.wait_returned(3000ms));
  const double returned = ms_between(t0, rs.listen_returned_at());
  note("a held writer: listen() returned " + std::to_string(returned) + " ms after shutdown()");
  CHECK(returned >= 190.0);   // the drain waited for the producer...
  CHECK(returned <= 1000.0);  // ... until the deadline, not forever
  CHECK(rs.logs->contains("left to finish"));
  CHECK_FALSE(w->chat("too late"));
  w.reset();
  CHECK(probe.runs.load() == 1);
}

TEST_CASE("handler: shutdown with 1,000 handler streams ends every one within 50 ms") {
  agentsmithy::Options o = test_options();
  o.max_streams = 1200;
  BatchProducer producer(1000000);  // never finishes on its own
  RunningServer rs(o, with_handler(producer.handler()));
  REQUIRE(rs.ready());
  constexpr int kStreams = 1000;
  auto clients = open_streams(rs.port(), kStreams, "go");
  for (auto& c : clients) REQUIRE(c->read_count("chat", 1, 10000ms));
  const auto t0 = Clock::now();
  rs.server().shutdown();
  // One thread reads every client, so that the clients' own scheduling does
  // not add to what is measured.
  const auto deadline = Clock::now() + 10s;
  for (;;) {
    std::vector<pollfd> fds;
    std::vector<RawClient*> open;
    for (auto& c : clients) {
      if (c->eof) continue;
      fds.push_back(pollfd{c->fd(), POLLIN, 0});
      open.push_back(c.get());
    }
    if (open.empty() || Clock::now() >= deadline) break;
    if (::poll(fds.data(), fds.size(), 100) <= 0) continue;
    for (std::size_t i = 0; i < fds.size(); ++i) {
      if (fds[i].revents != 0) open[i]->read_until([] { return false; }, 1ms);
    }
  }
  double last_done = 0;
  int ended = 0;
  for (auto& c : clients) {
    if (c->events.size() >= 2 && c->events.back().value("type", std::string()) == "done" &&
        c->events[c->events.size() - 2].value("code", std::string()) == "shutdown" &&
        c->terminating_chunk) {
      ++ended;
    }
    if (!c->event_times.empty())
      last_done = std::max(last_done, ms_between(t0, c->event_times.back()));
  }
  note("1,000 handler streams: last done " + std::to_string(last_done) + " ms after shutdown()");
  CHECK(ended == kStreams);
  // A timing bound only where timing means something: the sanitizers slow
  // every thread wake and allocation several-fold (bench/ measures the 50 ms
  // target).
  if (!kSanitized) CHECK(last_done < 250.0);  // 50 ms on an idle machine: bench/ measures it
  CHECK(rs.wait_returned(2000ms));
}
