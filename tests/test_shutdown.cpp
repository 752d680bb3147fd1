// Graceful shutdown: the seed's scenario and each numbered point of the
// issue's shutdown sequence, capacity, hooks and the Server's lifecycle.
#include "support.hpp"

using namespace test;
using agentsmithy::ChatRequest;
using agentsmithy::Server;
using agentsmithy::StreamWriter;

namespace {

// What a send_until_refused() generator did.
struct SendCount {
  std::atomic<std::size_t> sent{0};  // chat events send() accepted
  std::atomic<bool> finished{false};
  std::atomic<Clock::rep> finished_at{0};
};

// Sends `chunk` as chat events as fast as send() takes them, until it refuses
// one or `limit` were sent, counting them in `st`.
agentsmithy::Generator send_until_refused(std::shared_ptr<SendCount> st, std::string chunk,
                                          std::size_t limit) {
  return [st, chunk, limit](const ChatRequest&, StreamWriter& out) {
    while (st->sent.load() < limit && out.chat(chunk)) st->sent.fetch_add(1);
    st->finished_at.store(now_rep());
    st->finished.store(true);
  };
}

// A RunningServer whose generator is send_until_refused(st, chunk, limit).
class FloodServer : public RunningServer {
 public:
  FloodServer(agentsmithy::Options o, std::string chunk, std::size_t limit)
      : FloodServer(std::move(o), std::make_shared<SendCount>(), std::move(chunk), limit) {}
  std::shared_ptr<SendCount> st;

 private:
  FloodServer(agentsmithy::Options o, std::shared_ptr<SendCount> count, std::string chunk,
              std::size_t limit)
      : RunningServer(std::move(o), with_generator(send_until_refused(count, chunk, limit))),
        st(std::move(count)) {
    REQUIRE(ready());
  }
};

// test_options() with this write_timeout and grace_period.
agentsmithy::Options write_and_grace(milliseconds write_timeout, milliseconds grace_period) {
  agentsmithy::Options o = test_options();
  o.write_timeout = write_timeout;
  o.grace_period = grace_period;
  return o;
}

}  // namespace

TEST_CASE(
    "shutdown: the seed's scenario (a long story, shutdown, error then done, listen() returns)") {
  std::atomic<int> hook_runs{0};
  RunningServer rs(test_options(),
                   [&](Server& s) { s.on_shutdown([&hook_runs] { hook_runs.fetch_add(1); }); });
  REQUIRE(rs.ready());

  // curl -X POST .../api/chat -H "Content-Type: application/json" -H "Accept: text/event-stream"
  //      -d '{"messages": [{"role": "user", "content": "Tell me a long story"}], "stream": true}'
  RawClient c(rs.port());
  REQUIRE(c.request(
      "POST", "/api/chat",
      R"({"messages": [{"role": "user", "content": "Tell me a long story"}], "stream": true})",
      {{"Content-Type", "application/json"}, {"Accept", "text/event-stream"}}));
  REQUIRE(c.read_count("chat", 3, 5000ms));
  CHECK(rs.chat().active_streams() == 1);
  CHECK_FALSE(rs.server().is_shutting_down());

  // Ctrl+C
  const auto t0 = Clock::now();
  rs.server().shutdown();
  const double call_ms = ms_since(t0);
  CHECK(rs.server().is_shutting_down());
  CHECK(rs.chat().is_shutting_down());
  CHECK(call_ms < 100.0);  // returns at once

  check_reads_to_shutdown_end(c, 5000ms);
  CHECK(c.types().front() == "chat_start");
  CHECK(c.count("chat") >= 3);
  CHECK(c.eof);
  const std::string err = c.events[c.events.size() - 2].value("error", std::string());
  CHECK(lower(err).find("shutting down") !=
        std::string::npos);  // clients look for "shutdown"/"shutting down"
  const double done_ms = ms_between(t0, c.done_at);
  note("seed scenario: done " + std::to_string(done_ms) + " ms after shutdown()");
  CHECK(done_ms < 250.0);  // the issue asks for 50 ms; generous on a loaded 2-core box

  REQUIRE(rs.wait_returned(5000ms));
  CHECK(rs.listen_result());
  note("seed scenario: listen() returned " +
       std::to_string(ms_between(t0, rs.listen_returned_at())) + " ms after shutdown()");
  CHECK(ms_between(t0, rs.listen_returned_at()) < 1000.0);
  CHECK(hook_runs.load() == 1);

  // the lifecycle log lines of design.md
  INFO(rs.logs->text());
  CHECK(rs.logs->contains("ready on 127.0.0.1:" + std::to_string(rs.port())));
  CHECK(rs.logs->contains("shutdown requested"));
  CHECK(rs.logs->contains("1 stream notified"));  // singular for one (issue 12)
  CHECK(rs.logs->contains("drained in"));
  CHECK(rs.logs->contains("stopped"));
}

TEST_CASE(
    "shutdown: 100 concurrent streams all end with the shutdown error, done and the final chunk") {
  const std::size_t n = 100;
  RunningServer rs(test_options());
  REQUIRE(rs.ready());

  std::vector<std::unique_ptr<RawClient>> clients;
  for (std::size_t i = 0; i < n; ++i) {
    auto c = std::make_unique<RawClient>(rs.port());
    REQUIRE(c->connected());
    REQUIRE(c->post_chat(demo_body("Tell me a long story", 1000000, 50)));
    c->start_background_read(30000ms);
    clients.push_back(std::move(c));
  }
  const auto streaming = [&] {
    std::size_t k = 0;
    for (const auto& c : clients)
      if (c->n_events.load() >= 2) ++k;  // chat_start and a chat
    return k;
  };
  const bool all = wait_until([&] { return streaming() == n; }, 15000ms);
  INFO("streams that got events: " << streaming() << " of " << n);
  REQUIRE(all);
  CHECK(wait_until([&] { return rs.chat().active_streams() == n; }, 2000ms));
  CHECK(rs.chat().active_streams() == n);

  const auto t0 = Clock::now();
  rs.server().shutdown();
  const bool ended = wait_until(
      [&] {
        for (const auto& c : clients)
          if (!c->background_done.load()) return false;
        return true;
      },
      10000ms);
  CHECK(ended);
  for (auto& c : clients) c->join_background();

  double worst = 0, sum = 0;
  std::size_t good = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const RawClient& c = *clients[i];
    CAPTURE(i);
    check_ended_by_shutdown(c);
    CHECK(c.eof);
    if (c.saw_done.load()) {
      const double d = ms_between(t0, c.done_at);
      worst = std::max(worst, d);
      sum += d;
      ++good;
    }
  }
  CHECK(good == n);
  note("100 streams: last done " + std::to_string(worst) + " ms after shutdown(), mean " +
       std::to_string(good ? sum / static_cast<double>(good) : 0.0) + " ms");
  CHECK(worst < 250.0);  // the issue asks for 50 ms

  REQUIRE(rs.wait_returned(5000ms));
  CHECK(rs.listen_result());
  note("100 streams: listen() returned " + std::to_string(ms_between(t0, rs.listen_returned_at())) +
       " ms after shutdown()");
  CHECK(rs.chat().active_streams() == 0);
}

TEST_CASE_FIXTURE(
    StuckServer<400>,
    "shutdown rule 3: a stuck generator gets error+done promptly; listen() returns at the grace "
    "deadline") {
  RawClient c;
  open_stuck(c);

  const auto t0 = Clock::now();
  rs.server().shutdown();
  check_reads_to_shutdown_end(c, 3000ms);
  CHECK(c.types() == std::vector<std::string>{"chat", "error", "done"});
  const double done_ms = ms_between(t0, c.done_at);
  note("stuck generator: done " + std::to_string(done_ms) + " ms after shutdown()");
  CHECK(done_ms < 250.0);
  CHECK_FALSE(rs.listen_returned());

  REQUIRE(rs.wait_returned(5000ms));
  const double listen_ms = ms_between(t0, rs.listen_returned_at());
  note("stuck generator, grace 400 ms: listen() returned after " + std::to_string(listen_ms) +
       " ms");
  CHECK(listen_ms >= 400.0 * 0.9);
  CHECK(listen_ms < 400.0 + 600.0);
  CHECK(rs.listen_result());        // a shutdown that ended at the grace deadline is still graceful
  CHECK(st->finished.load() == 0);  // left to finish on its own
  INFO(rs.logs->text());
  CHECK(rs.logs->contains("grace period"));

  // Destroy the Server, then let the generator go on: what it writes reaches
  // nobody, and what it touches (its StreamWriter) is still alive.
  destroy_then_release(1);
}

TEST_CASE("shutdown rule 4: a client that disconnects mid-stream is never written to again") {
  struct State {
    std::atomic<int> started{0};
    std::atomic<int> sends_ok{0};
    std::atomic<bool> saw_false{false};
    std::atomic<bool> cancelled_after{false};
    std::atomic<bool> sleep_returned_false{false};
    std::atomic<bool> finished{false};
    std::atomic<Clock::rep> noticed_at_ns{0};
  };
  auto st = std::make_shared<State>();
  agentsmithy::Options o = test_options();
  o.heartbeat_interval = 30ms;
  RunningServer rs(o, [&](Server& s) {
    s.chat_service().set_generator([st](const ChatRequest& req, StreamWriter& out) {
      st->started.fetch_add(1);
      if (req.messages.back().content == "busy") {
        for (;;) {  // writes every 5 ms until the stream is cancelled
          if (!out.chat("tok ")) break;
          st->sends_ok.fetch_add(1);
          out.sleep_for(5ms);
        }
        st->saw_false.store(true);
      } else {  // quiet: one event, then a long wait that only cancellation ends
        out.chat("thinking...");
        st->sleep_returned_false.store(!out.sleep_for(20000ms));
        st->saw_false.store(!out.chat("late"));
      }
      st->noticed_at_ns.store(Clock::now().time_since_epoch().count());
      st->cancelled_after.store(out.cancelled());
      st->finished.store(true);
    });
  });
  REQUIRE(rs.ready());

  std::string mode;
  bool rst = false;
  SUBCASE("while the generator writes, FIN") { mode = "busy"; }
  SUBCASE("while the generator writes, RST") {
    mode = "busy";
    rst = true;
  }
  SUBCASE("during a quiet period: found by the heartbeat") { mode = "quiet"; }
  CAPTURE(mode);
  CAPTURE(rst);

  {
    RawClient c(rs.port());
    REQUIRE(c.post_chat(chat_body(mode)));
    REQUIRE(c.read_events(mode == "busy" ? 3 : 1));
    REQUIRE(wait_until([&] { return rs.chat().active_streams() == 1; }));
    const auto t0 = Clock::now();
    if (rst)
      c.abort();
    else
      c.close();
    REQUIRE(wait_until([&] { return st->finished.load(); }, 3000ms));
    note("client gone (" + mode + (rst ? ", RST" : ", FIN") + "): generator noticed after " +
         std::to_string(
             ms_between(t0, Clock::time_point(Clock::duration(st->noticed_at_ns.load())))) +
         " ms");
    CHECK(st->saw_false.load());
    CHECK(st->cancelled_after.load());
    if (mode == "quiet") CHECK(st->sleep_returned_false.load());
    CHECK(wait_until([&] { return rs.chat().active_streams() == 0; }, 2000ms));
  }
  CHECK_FALSE(rs.server().is_shutting_down());

  // the server serves on, and nothing is left to hold the drain
  RawClient h(rs.port());
  REQUIRE(h.get("/health"));
  CHECK(h.read_response());
  CHECK(h.status == 200);
  CHECK(h.body_json().value("active_streams", -1) == 0);
  const auto t1 = Clock::now();
  rs.server().shutdown();
  REQUIRE(rs.wait_returned(2000ms));
  CHECK(ms_between(t1, rs.listen_returned_at()) < 1000.0);
}

TEST_CASE(
    "a client that stops reading is dropped after write_timeout; it does not hold the drain") {
  // a stalled client must not make the server buffer without bound (the 200 MB
  // cap here is the test's own safety net)
  FloodServer rs(write_and_grace(300ms, 600ms), std::string(4096, 'x'), 50000);
  auto& st = rs.st;
  RawClient c(rs.port());
  const int small = 4096;
  ::setsockopt(c.fd(), SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
  REQUIRE(c.post_chat(chat_body("hi")));
  REQUIRE(c.read_headers());  // and then never reads again

  bool via_shutdown = false;
  SUBCASE("while serving") {}
  SUBCASE("during the drain") { via_shutdown = true; }
  const auto t0 = Clock::now();
  if (via_shutdown) rs.server().shutdown();
  REQUIRE(wait_until([&] { return st->finished.load(); }, 5000ms));
  const double ms = ms_between(t0, from_rep(st->finished_at.load()));
  note(std::string("stalled client") + (via_shutdown ? " at shutdown" : "") +
       ": generator stopped after " + std::to_string(ms) + " ms, " +
       std::to_string(st->sent.load()) + " chunks of 4 KB accepted");
  CHECK(st->sent.load() <
        50000);  // send() returned false: it was dropped, not buffered without end
  CHECK(wait_until([&] { return rs.chat().active_streams() == 0; }, 3000ms));
  if (via_shutdown) {
    REQUIRE(rs.wait_returned(3000ms));
    const double lms = ms_between(t0, rs.listen_returned_at());
    note("stalled client at shutdown: listen() returned after " + std::to_string(lms) +
         " ms (grace 600 ms)");
    CHECK(lms < 600.0 + 1000.0);
  }
}

TEST_CASE(
    "shutdown rule 5: a slow client with a backlog still gets everything, then error and done") {
  FloodServer rs(write_and_grace(5000ms, 3000ms), std::string(1024, 'y'), 200000);
  auto& st = rs.st;
  RawClient c;
  REQUIRE(c.connect_to(rs.port(), 4096));
  REQUIRE(c.post_chat(chat_body("hi")));
  REQUIRE(c.read_headers());
  // the client reads nothing while the server's buffers fill up
  REQUIRE(wait_until([&] { return st->sent.load() >= 300 || st->finished.load(); }, 5000ms));
  const bool stalled = !wait_until([&] { return st->finished.load(); }, 100ms);
  note("slow client: " + std::to_string(st->sent.load()) +
       " chunks of 1 KB accepted before the shutdown" +
       (stalled ? " (generator held back by the backlog)" : ""));

  const auto t0 = Clock::now();
  rs.server().shutdown();
  CHECK(c.read_to_eof(5000ms));  // now it reads it all
  INFO(c.summary());
  check_ended_by_shutdown(c);
  REQUIRE(wait_until([&] { return st->finished.load(); }, 3000ms));
  CHECK(c.count("chat") == st->sent.load());  // every event send() accepted was delivered
  REQUIRE(rs.wait_returned(5000ms));
  const double ms = ms_between(t0, rs.listen_returned_at());
  note("slow client: listen() returned " + std::to_string(ms) +
       " ms after shutdown() (grace 3000 ms)");
  CHECK(ms < 3000.0);
}

TEST_CASE("shutdown rule 6: an idle keep-alive client does not delay the exit") {
  RunningServer rs(test_options());  // keep_alive_timeout 5 s, grace period 3 s
  REQUIRE(rs.ready());
  std::unique_ptr<httplib::Client> cli;
  RawClient raw;

  SUBCASE("cpp-httplib Client after GET /health") {
    cli = http_client(rs.port());
    cli->set_keep_alive(true);
    auto r = cli->Get("/health");
    REQUIRE(r);
    CHECK(r->status == 200);
  }
  SUBCASE("cpp-httplib Client after a non-streaming chat") {
    cli = http_client(rs.port());
    cli->set_keep_alive(true);
    auto r = cli->Post("/api/chat", demo_body("hi", 2, 0, false).dump(), "application/json");
    REQUIRE(r);
    CHECK(r->status == 200);
  }
  SUBCASE("raw socket, keep-alive") {
    REQUIRE(raw.connect_to(rs.port()));
    REQUIRE(raw.get("/health", true));
    REQUIRE(raw.read_response());
    CHECK(raw.status == 200);
    CHECK(lower(raw.header("connection")).find("close") == std::string::npos);
  }

  const auto t0 = Clock::now();
  rs.server().shutdown();
  REQUIRE(rs.wait_returned(6000ms));
  const double ms = ms_between(t0, rs.listen_returned_at());
  note("idle keep-alive client: listen() returned " + std::to_string(ms) + " ms after shutdown()");
  CHECK(ms < 1000.0);  // the issue: well under 200 ms (cpp-httplib alone: ~5 s)
  if (raw.connected()) {
    raw.next_response();
    CHECK(raw.read_to_eof(1000ms));  // and the idle connection was closed
  }
}

TEST_CASE(
    "waiting room: connections without a request yet and idle keep-alive ones hold no thread") {
  // Each one used to hold a worker in poll(): a burst of connects or many idle
  // keep-alive clients grew the pool by a thread per connection.
  constexpr int kSilent = 200, kIdle = 100;
  RunningServer rs(test_options());
  REQUIRE(rs.ready());
  RawClient first(rs.port());
  REQUIRE(first.get("/health"));
  REQUIRE(first.read_response());
  const long threads0 = thread_count();

  std::vector<std::unique_ptr<RawClient>> silent, idle;
  for (int i = 0; i < kSilent; ++i) {
    silent.push_back(std::make_unique<RawClient>(rs.port()));
    REQUIRE(silent.back()->connected());
  }
  for (int i = 0; i < kIdle; ++i) {
    idle.push_back(std::make_unique<RawClient>(rs.port()));
    REQUIRE(idle.back()->get("/health", true));
    REQUIRE(idle.back()->read_response());
    REQUIRE(idle.back()->status == 200);
  }
  // Accepted in order: once a later connection is answered, every silent one
  // has been taken from the listen queue and handed to a worker.
  RawClient probe(rs.port());
  REQUIRE(probe.get("/health"));
  REQUIRE(probe.read_response());
  const long threads = thread_count();
  note("threads with " + std::to_string(kSilent) + " silent and " + std::to_string(kIdle) +
       " idle keep-alive connections: " + std::to_string(threads) +
       " (before: " + std::to_string(threads0) + ")");
  CHECK(threads < threads0 + 32);

  // Every waiting connection is still served when its request comes.
  for (int i = 0; i < kSilent; i += 20) {
    CAPTURE(i);
    REQUIRE(silent[i]->get("/health", true));
    CHECK(silent[i]->read_response());
    CHECK(silent[i]->status == 200);
  }
  for (int i = 0; i < kIdle; i += 10) {
    CAPTURE(i);
    idle[i]->next_response();  // past the first answer
    REQUIRE(idle[i]->get("/health", true));
    CHECK(idle[i]->read_response());
    CHECK(idle[i]->status == 200);
  }

  // The drain closes every idle one at once and does not wait for the silent ones.
  const auto t0 = Clock::now();
  rs.server().shutdown();
  REQUIRE(rs.wait_returned(4000ms));
  const double ms = ms_between(t0, rs.listen_returned_at());
  note("listen() returned " + std::to_string(ms) + " ms after shutdown()");
  CHECK(ms < 1000.0);
  for (auto* group : {&silent, &idle}) {
    for (auto& c : *group) {
      c->next_response();
      CHECK(c->read_to_eof(1000ms));
      CHECK(c->status == 0);  // nothing written to a connection that asked nothing
    }
  }
  const auto report = rs.server().shutdown_report();
  REQUIRE(report);
  CHECK(report->idle_connections_closed == kIdle + kSilent / 20);
}

TEST_CASE("shutdown: a connection accepted before the shutdown but without a request yet") {
  // design (1fc8ec0): a silent new connection gets a short window (50 ms) at
  // shutdown; a request that arrives in it is answered 503, otherwise the
  // connection is closed. Either way it does not hold the drain.
  RunningServer rs(test_options());  // grace period 3 s
  REQUIRE(rs.ready());
  RawClient raw(rs.port());
  REQUIRE(raw.connected());
  // make sure the server has accepted it: a later connection's request is answered
  RawClient h(rs.port());
  REQUIRE(h.get("/health"));
  REQUIRE(h.read_response());

  SUBCASE("the request comes at once during the drain: 503") {
    const auto t0 = Clock::now();
    rs.server().shutdown();
    REQUIRE(raw.post_chat(chat_body("hi")));
    const double sent_after = ms_since(t0);
    raw.read_to_eof(2000ms);
    INFO(raw.summary());
    note("request sent " + std::to_string(sent_after) + " ms after shutdown(): answered " +
         std::to_string(raw.status));
    if (sent_after < 25.0) {  // well inside the window (a loaded box may miss it)
      CHECK(raw.status == 503);
      CHECK(raw.has_header("retry-after"));
      CHECK(raw.body_json().value("error", std::string()) ==
            std::string(agentsmithy::kShutdownMessage));
    }
    CHECK(raw.eof);
    REQUIRE(rs.wait_returned(2000ms));
    CHECK(ms_between(t0, rs.listen_returned_at()) < 1000.0);
  }
  SUBCASE("no request ever comes: the connection is closed and does not hold the drain") {
    const auto t0 = Clock::now();
    rs.server().shutdown();
    REQUIRE(rs.wait_returned(4000ms));
    const double ms = ms_between(t0, rs.listen_returned_at());
    note("connection without a request: listen() returned " + std::to_string(ms) +
         " ms after shutdown() (grace 3000 ms)");
    CHECK(ms < 1000.0);
    CHECK(raw.read_to_eof(1000ms));
    CHECK(raw.status == 0);  // nothing was written to it
  }
}

TEST_CASE_FIXTURE(
    StuckServer<10000>,
    "shutdown rule 2: during the drain /health is 503 stopping, POST /api/chat 503 with "
    "Retry-After") {
  RawClient stream;  // its stuck generator holds the drain open (grace period 10 s)
  open_stuck(stream);
  RawClient keep_alive(rs.port());  // idle keep-alive connection from before the shutdown
  REQUIRE(keep_alive.get("/health", true));
  REQUIRE(keep_alive.read_response());
  CHECK(keep_alive.status == 200);

  const auto t0 = Clock::now();
  rs.server().shutdown();
  check_reads_to_shutdown_end(stream, 3000ms);
  keep_alive.next_response();
  CHECK(keep_alive.read_to_eof(1000ms));  // idle: closed during the drain
  CHECK_FALSE(rs.listen_returned());

  {
    INFO("a new chat request during the drain");
    RawClient c(rs.port());
    REQUIRE(c.connected());
    REQUIRE(c.post_chat(chat_body("hi")));
    CHECK(c.read_response(2000ms));
    INFO(c.summary());
    CHECK(c.status == 503);
    CHECK(c.has_header("retry-after"));
    CHECK(std::atoi(c.header("retry-after").c_str()) >= 1);
    CHECK(lower(c.header("connection")).find("close") != std::string::npos);
    CHECK(c.header("content-type").rfind("application/json", 0) == 0);
    CHECK(c.body_json().value("error", std::string()) ==
          std::string(agentsmithy::kShutdownMessage));
    CHECK(c.read_to_eof(1000ms));
  }
  {
    INFO("a non-streaming chat request during the drain (keep-alive asked for)");
    RawClient c(rs.port());
    REQUIRE(c.post_chat(chat_body("hi", json::object(), false), true));
    CHECK(c.read_response(2000ms));
    INFO(c.summary());
    CHECK(c.status == 503);
    CHECK(c.has_header("retry-after"));
    CHECK(lower(c.header("connection")).find("close") != std::string::npos);
    CHECK(c.read_to_eof(1000ms));
  }
  {
    INFO("/health during the drain");
    RawClient h(rs.port());
    REQUIRE(h.get("/health"));
    CHECK(h.read_response(2000ms));
    INFO(h.summary());
    CHECK(h.status == 503);
    CHECK(h.header("retry-after") == agentsmithy::detail::kRetryAfterSeconds);
    const json j = h.body_json();
    CHECK(j.value("server_status", std::string()) == "stopping");
    CHECK(j.value("service", std::string()) == "agentsmithy-server");
    CHECK(j.value("port", 0) == rs.port());
    CHECK(j.contains("active_streams"));
  }
  {
    INFO("cpp-httplib client during the drain");
    auto cli = http_client(rs.port());
    auto r = cli->Post("/api/chat", chat_body("hi").dump(), "application/json");
    REQUIRE(r);
    CHECK(r->status == 503);
    CHECK(r->has_header("Retry-After"));
  }
  CHECK(st->entered.load() == 1);  // rejected requests never reached the generator
  CHECK_FALSE(rs.listen_returned());
  note("drain held open " + std::to_string(ms_since(t0)) + " ms by the stuck generator");

  // releasing the generator ends the drain long before the 10 s grace period
  const auto t1 = Clock::now();
  st->gate.open();
  REQUIRE(rs.wait_returned(3000ms));
  const double ms = ms_between(t1, rs.listen_returned_at());
  note("drain: listen() returned " + std::to_string(ms) +
       " ms after the stuck generator was released");
  CHECK(ms < 1000.0);
  CHECK(rs.listen_result());
  REQUIRE(wait_until([&] { return st->finished.load() == 1; }));
  CHECK(st->late_send_false.load() == 1);
}

TEST_CASE(
    "capacity: beyond max_streams a chat request gets 503 with Retry-After at once, never a hang") {
  agentsmithy::Options o = test_options();
  o.max_streams = 2;
  RunningServer rs(o, [](Server& s) {
    s.chat_service().set_generator([](const ChatRequest&, StreamWriter& out) {
      while (out.chat(".") && out.sleep_for(20ms)) {
      }
    });
  });
  REQUIRE(rs.ready());

  RawClient a(rs.port()), b(rs.port());
  REQUIRE(a.post_chat(chat_body("a")));
  REQUIRE(b.post_chat(chat_body("b")));
  REQUIRE(a.read_events(1));
  REQUIRE(b.read_events(1));
  REQUIRE(wait_until([&] { return rs.chat().active_streams() == 2; }));

  {
    RawClient c(rs.port());
    REQUIRE(c.post_chat(chat_body("c")));
    const auto t0 = Clock::now();
    CHECK(c.read_response(3000ms));
    const double ms = ms_since(t0);
    INFO(c.summary());
    note("capacity: 3rd stream answered " + std::to_string(c.status) + " after " +
         std::to_string(ms) + " ms");
    CHECK(c.status == 503);
    CHECK(ms < 1000.0);  // the issue: within 100 ms
    CHECK(c.has_header("retry-after"));
    CHECK(std::atoi(c.header("retry-after").c_str()) >= 1);
    const json j = c.body_json();
    CHECK_FALSE(j.value("error", std::string()).empty());
    CHECK(j.value("error", std::string()) != std::string(agentsmithy::kShutdownMessage));
  }
  {
    auto cli = http_client(rs.port());
    auto r =
        cli->Post("/api/chat", chat_body("d", json::object(), false).dump(), "application/json");
    REQUIRE(r);
    CHECK(r->status == 503);  // non-streaming requests count too
    auto h = cli->Get("/health");
    REQUIRE(h);
    CHECK(h->status == 200);  // health is not a chat request
    CHECK(json::parse(h->body, nullptr, false).value("active_streams", -1) == 2);
  }
  // the two streams were not disturbed
  CHECK(a.read_events(a.events.size() + 2));
  CHECK(b.read_events(b.events.size() + 2));

  // freeing a slot lets the next one in (a client retries as Retry-After says)
  a.close();
  CHECK(wait_until([&] { return rs.chat().active_streams() == 1; }, 3000ms));
  int status = 0;
  const bool admitted = wait_until(
      [&] {
        RawClient c(rs.port());
        if (!c.post_chat(chat_body("e")) || !c.read_headers(2000ms)) return false;
        status = c.status;
        return c.status == 200;
      },
      3000ms, 20ms);
  INFO("last status: " << status);
  CHECK(admitted);
  CHECK(wait_until([&] { return rs.chat().active_streams() == 1; }, 3000ms));
  CHECK(!rs.server().is_shutting_down());
}

TEST_CASE("capacity: more concurrent streams than cpp-httplib's default pool of 8") {
  const std::size_t n = 24;
  RunningServer rs(test_options(), [](Server& s) {
    s.chat_service().set_generator([](const ChatRequest&, StreamWriter& out) {
      while (out.chat(".") && out.sleep_for(50ms)) {
      }
    });
  });
  REQUIRE(rs.ready());
  std::vector<std::unique_ptr<RawClient>> clients;
  for (std::size_t i = 0; i < n; ++i) {
    clients.push_back(std::make_unique<RawClient>(rs.port()));
    REQUIRE(clients.back()->post_chat(chat_body("hi")));
  }
  const auto t0 = Clock::now();
  std::size_t first_events = 0;
  for (auto& c : clients)
    if (c->read_events(1, 3000ms)) ++first_events;
  note(std::to_string(first_events) + " of " + std::to_string(n) +
       " concurrent streams started within " + std::to_string(ms_since(t0)) + " ms");
  CHECK(first_events == n);
  CHECK(wait_until([&] { return rs.chat().active_streams() == n; }, 2000ms));
  rs.server().shutdown();
  for (auto& c : clients) {
    check_reads_to_shutdown_end(*c, 3000ms);
  }
}

TEST_CASE("shutdown() from inside a generator") {
  struct State {
    std::atomic<bool> finished{false};
    double call_ms = -1, sleep_ms = -1;
    bool sleep_result = true, cancelled = false, send_after = true;
  };
  auto st = std::make_shared<State>();
  RunningServer rs(test_options(), [&](Server& s) {
    Server* sp = &s;
    s.chat_service().set_generator([st, sp](const ChatRequest&, StreamWriter& out) {
      out.chat("about to stop the server");
      const auto t = Clock::now();
      sp->shutdown();
      sp->shutdown();  // idempotent
      st->call_ms = ms_since(t);
      const auto s0 = Clock::now();
      st->sleep_result = out.sleep_for(5000ms);
      st->sleep_ms = ms_since(s0);
      st->cancelled = out.cancelled();
      st->send_after = out.chat("after shutdown");
      st->finished.store(true);
    });
  });
  REQUIRE(rs.ready());
  RawClient c(rs.port());
  REQUIRE(c.post_chat(chat_body("hi")));
  check_reads_to_shutdown_end(c, 3000ms);
  CHECK(c.types() == std::vector<std::string>{"chat", "error", "done"});
  REQUIRE(rs.wait_returned(3000ms));
  CHECK(rs.listen_result());
  REQUIRE(wait_until([&] { return st->finished.load(); }, 3000ms));
  note("shutdown() inside a generator took " + std::to_string(st->call_ms) + " ms");
  CHECK(st->call_ms < 100.0);
  CHECK_FALSE(st->sleep_result);
  CHECK(st->sleep_ms < 100.0);  // sleep_for() returns at once on a cancelled stream
  CHECK(st->cancelled);
  CHECK_FALSE(st->send_after);
}

TEST_CASE("shutdown cancels a non-streaming request: 503 Server is shutting down") {
  std::atomic<int> entered{0};
  RunningServer rs(test_options(), [&](Server& s) {
    s.chat_service().set_generator([&entered](const ChatRequest&, StreamWriter& out) {
      entered.fetch_add(1);
      out.chat("partial");
      out.sleep_for(20000ms);
    });
  });
  REQUIRE(rs.ready());
  RawClient c(rs.port());
  REQUIRE(c.post_chat(chat_body("hi", json::object(), false)));
  REQUIRE(wait_until([&] { return entered.load() == 1; }));
  const auto t0 = Clock::now();
  rs.server().shutdown();
  CHECK(c.read_response(3000ms));
  INFO(c.summary());
  note("non-streaming request answered " + std::to_string(ms_between(t0, c.complete_at)) +
       " ms after shutdown()");
  CHECK(c.status == 503);
  CHECK(c.body_json().value("error", std::string()) == std::string(agentsmithy::kShutdownMessage));
  CHECK(ms_between(t0, c.complete_at) < 250.0);
  REQUIRE(rs.wait_returned(3000ms));
}

TEST_CASE(
    "on_shutdown: hooks run in order after the drain, before listen() returns; a throwing hook is "
    "logged") {
  struct Record {
    std::mutex m;
    std::vector<std::string> order;
    std::size_t active_at_first = 999;
    bool generator_finished_at_first = false;
    Clock::time_point first_at{};
  };
  auto rec = std::make_shared<Record>();
  auto generator_finished = std::make_shared<std::atomic<bool>>(false);
  RunningServer rs(test_options(), [&](Server& s) {
    Server* sp = &s;
    s.chat_service().set_generator([generator_finished](const ChatRequest&, StreamWriter& out) {
      while (out.chat("tok ") && out.sleep_for(10ms)) {
      }
      generator_finished->store(true);
    });
    s.on_shutdown([rec, sp, generator_finished] {
      std::lock_guard<std::mutex> lock(rec->m);
      rec->order.push_back("first");
      rec->active_at_first = sp->chat_service().active_streams();
      rec->generator_finished_at_first = generator_finished->load();
      rec->first_at = Clock::now();
    });
    s.on_shutdown([] { throw std::runtime_error("hook two failed on purpose"); });
    s.on_shutdown([rec] {
      std::lock_guard<std::mutex> lock(rec->m);
      rec->order.push_back("third");
    });
    s.on_shutdown([] { throw 7; });
  });
  REQUIRE(rs.ready());
  rs.server().on_shutdown([rec] {  // added while serving
    std::lock_guard<std::mutex> lock(rec->m);
    rec->order.push_back("fifth");
  });

  RawClient c(rs.port());
  REQUIRE(c.post_chat(chat_body("hi")));
  REQUIRE(c.read_events(2));
  rs.server().shutdown();
  check_reads_to_shutdown_end(c, 3000ms);
  REQUIRE(rs.wait_returned(3000ms));
  CHECK(rs.listen_result());

  std::lock_guard<std::mutex> lock(rec->m);
  CHECK(rec->order == std::vector<std::string>{"first", "third", "fifth"});
  CHECK(rec->active_at_first == 0);
  CHECK(rec->generator_finished_at_first);
  CHECK(rec->first_at <= rs.listen_returned_at());
  INFO(rs.logs->text());
  CHECK(rs.logs->contains("hook two failed on purpose", agentsmithy::LogLevel::warning));
}

TEST_CASE("shutdown() is idempotent and thread-safe") {
  std::atomic<int> hook_runs{0};
  RunningServer rs(test_options(),
                   [&](Server& s) { s.on_shutdown([&hook_runs] { hook_runs.fetch_add(1); }); });
  REQUIRE(rs.ready());
  RawClient c(rs.port());
  REQUIRE(c.post_chat(demo_body("hello", 100000, 10)));
  REQUIRE(c.read_events(2));
  std::vector<std::thread> threads;
  std::atomic<bool> go{false};
  for (int i = 0; i < 8; ++i)
    threads.emplace_back([&] {
      while (!go.load()) std::this_thread::yield();
      for (int k = 0; k < 50; ++k) {
        rs.server().shutdown();
        (void)rs.server().is_shutting_down();
      }
    });
  go.store(true);
  for (auto& t : threads) t.join();
  check_reads_to_shutdown_end(c, 3000ms);
  REQUIRE(rs.wait_returned(3000ms));
  rs.server().shutdown();  // after listen() returned: harmless
  CHECK(hook_runs.load() == 1);
}

TEST_CASE_FIXTURE(StuckServer<10000>, "force_shutdown() closes what is left at once") {
  RawClient c;
  open_stuck(c);
  rs.server().shutdown();
  check_reads_to_shutdown_end(c, 3000ms);
  CHECK_FALSE(rs.listen_returned());  // held by the stuck generator
  const auto t0 = Clock::now();
  rs.server().force_shutdown();
  REQUIRE(rs.wait_returned(2000ms));
  const double ms = ms_between(t0, rs.listen_returned_at());
  note("force_shutdown(): listen() returned after " + std::to_string(ms) + " ms");
  CHECK(ms < 1000.0);  // header: promptly (the signal path asks for 200 ms)
}

TEST_CASE("a Server serves once: a second listen() returns false") {
  RunningServer rs(test_options());
  REQUIRE(rs.ready());
  SUBCASE("while the first is running") {
    ListenThread second(rs.server());
    CHECK(second.wait(2000ms));
    CHECK_FALSE(second.result());
    auto cli = http_client(rs.port());
    auto r = cli->Get("/health");
    REQUIRE(r);
    CHECK(r->status == 200);  // the first one serves on
  }
  SUBCASE("after the first returned") {
    rs.stop();
    CHECK(rs.listen_result());
    ListenThread second(rs.server());  // on a thread: a wrong answer would block
    CHECK(second.wait(1000ms));
    CHECK_FALSE(second.result());
  }
}

TEST_CASE("listen() returns false, promptly and with a log line, when the port is taken") {
  int port = 0;
  int fd = -1;
  std::unique_ptr<RunningServer> other;
  SUBCASE("by a plain listening socket") {
    fd = bind_listener(0, &port);
    REQUIRE(fd >= 0);
  }
  SUBCASE("by another agentsmithy server (no silent SO_REUSEPORT sharing)") {
    other = std::make_unique<RunningServer>(test_options());
    REQUIRE(other->ready());
    port = other->port();
  }
  agentsmithy::Options o = test_options();
  o.port = port;
  const auto t0 = Clock::now();
  RunningServer rs(o);
  const double ready_ms = ms_since(t0);
  CHECK_FALSE(rs.ready());
  note("port taken: wait_until_ready() answered false after " + std::to_string(ready_ms) + " ms");
  CHECK(ready_ms < 1000.0);
  REQUIRE(rs.wait_returned(1000ms));
  CHECK_FALSE(rs.listen_result());
  INFO(rs.logs->text());
  CHECK(rs.logs->contains(std::to_string(port), agentsmithy::LogLevel::error));
  if (other) {  // the first server still answers, alone
    auto cli = http_client(port);
    auto r = cli->Get("/health");
    REQUIRE(r);
    CHECK(r->status == 200);
  }
  if (fd >= 0) ::close(fd);
}

TEST_CASE("shutdown() before listen() makes listen() return promptly") {
  auto logs = std::make_shared<LogStore>();
  agentsmithy::Options o = test_options();
  o.logger = make_logger(logs);
  Server s(o);
  CHECK(s.port() == 0);
  s.shutdown();
  CHECK(s.is_shutting_down());
  const auto t0 = Clock::now();
  ListenThread lt(s);
  REQUIRE(lt.wait(2000ms));
  const double ms = ms_between(t0, lt.returned_at());
  note("shutdown() before listen(): listen() returned " +
       std::string(lt.result() ? "true" : "false") + " after " + std::to_string(ms) + " ms");
  CHECK(ms < 1000.0);
}

TEST_CASE("~Server while listen() runs: shuts down gracefully and waits for listen()") {
  auto logs = std::make_shared<LogStore>();
  agentsmithy::Options o = test_options();
  o.logger = make_logger(logs);
  auto server = std::make_unique<Server>(o);
  Server* sp = server.get();
  std::atomic<bool> returned{false}, result{false};
  std::thread t([&returned, &result, sp] {
    result.store(sp->listen());
    returned.store(true);
  });
  REQUIRE(server->wait_until_ready(5000ms));
  RawClient c(server->port());
  REQUIRE(c.post_chat(demo_body("Tell me a long story", 100000, 20)));
  REQUIRE(c.read_count("chat", 2));
  c.start_background_read(10000ms);

  const auto t0 = Clock::now();
  server.reset();
  const double ms = ms_since(t0);
  note("~Server with one stream: " + std::to_string(ms) + " ms");
  CHECK(ms < 2000.0);
  CHECK(wait_until([&] { return returned.load(); }, 1000ms));
  if (!returned.load()) {  // the thread would go on using a destroyed Server
    std::fprintf(stderr, "~Server returned while listen() had not: abort\n");
    std::_Exit(3);
  }
  t.join();
  CHECK(result.load());
  c.join_background();
  check_ended_by_shutdown(c);
}

TEST_CASE("~Server without listen(), and after shutdown() without listen()") {
  {
    agentsmithy::Options o = test_options();
    o.logger = [](agentsmithy::LogLevel, const std::string&) {};
    Server s(o);
  }
  {
    agentsmithy::Options o = test_options();
    o.logger = [](agentsmithy::LogLevel, const std::string&) {};
    Server s(o);
    s.shutdown();
  }
  CHECK(true);
}
