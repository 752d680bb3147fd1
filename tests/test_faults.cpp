// Faults: generators that throw anything or never return, shutdown() from many
// threads, storms of signals against the real agentsmithy-server process, a
// signal before it is ready, a port already in use, and many server lifetimes
// in one process without growth in threads, descriptors or memory.
#include "support.hpp"

using namespace test;
using agentsmithy::ChatRequest;
using agentsmithy::Server;
using agentsmithy::StreamWriter;

namespace {

struct NotAnException {
  int code;
};

// (kSanitized, tests/support: sanitizer runtimes keep freed memory in
// quarantine and add shadow memory, so RSS says nothing about leaks there;
// AddressSanitizer's leak check does.)

}  // namespace

// ---------------------------------------------------------------------------
// Generators that misbehave
// ---------------------------------------------------------------------------

TEST_CASE("fault: a generator that throws a non-std::exception yields an error event, then done") {
  std::function<void()> thrower;
  std::string what;
  SUBCASE("an int") {
    thrower = [] { throw 42; };
    what = "int";
  }
  SUBCASE("a std::string") {
    thrower = [] { throw std::string("not derived from std::exception"); };
    what = "std::string";
  }
  SUBCASE("a struct") {
    thrower = [] { throw NotAnException{7}; };
    what = "struct";
  }
  SUBCASE("a const char*") {
    thrower = [] { throw "a C string"; };
    what = "const char*";
  }
  CAPTURE(what);
  RunningServer rs(test_options(), [&](Server& s) {
    s.chat_service().set_generator([thrower](const ChatRequest& req, StreamWriter& out) {
      out.send({{"type", "chat_start"}});
      out.chat("partial ");
      if (req.messages.back().content != "fine") thrower();
    });
  });
  REQUIRE(rs.ready());

  RawClient c(rs.port());
  REQUIRE(c.post_chat(chat_body("boom")));
  CHECK(c.read_to_eof(5000ms));
  check_well_formed_stream(c);
  CHECK(c.types() == std::vector<std::string>{"chat_start", "chat", "error", "done"});
  const json& err = c.events[c.events.size() - 2];
  CHECK_FALSE(err.value("error", std::string()).empty());

  RawClient n(rs.port());
  REQUIRE(n.post_chat(chat_body("boom", json::object(), false)));
  CHECK(n.read_response(5000ms));
  INFO(n.summary());
  CHECK(n.status == 500);
  CHECK_FALSE(n.body_json().value("error", std::string()).empty());

  // The server serves on, and the stream count is back to zero.
  CHECK(wait_until([&] { return rs.chat().active_streams() == 0; }, 1000ms));
  RawClient ok(rs.port());
  REQUIRE(ok.post_chat(chat_body("fine")));
  CHECK(ok.read_to_eof(5000ms));
  check_well_formed_stream(ok);
  CHECK(ok.count("error") == 0);
  INFO(rs.logs->text());
  CHECK(rs.logs->contains("generator threw", agentsmithy::LogLevel::warning));
}

TEST_CASE_FIXTURE(
    StuckServer<1000>,
    "fault: a generator that never returns and ignores cancellation: shutdown ends at the "
    "grace deadline and listen() returns") {
  std::vector<std::unique_ptr<RawClient>> clients;
  for (int i = 0; i < 3; ++i) {
    clients.push_back(std::make_unique<RawClient>(rs.port()));
    open_stuck(*clients.back());
  }

  const auto t0 = Clock::now();
  rs.server().shutdown();
  for (auto& c : clients) {
    check_reads_to_shutdown_end(*c, 2000ms);
    CHECK(ms_between(t0, c->done_at) < 250.0);
  }
  REQUIRE(rs.wait_returned(3000ms));
  const double ms = ms_between(t0, rs.listen_returned_at());
  note("three generators that never return: listen() returned " + std::to_string(ms) +
       " ms after shutdown() (grace 1000 ms)");
  CHECK(rs.listen_result());
  CHECK(ms >= 900.0);
  CHECK(ms < 1000.0 + 500.0);
  CHECK(st->finished.load() == 0);  // still stuck: left to finish on its own
  INFO(rs.logs->text());
  CHECK(rs.logs->contains("grace period over", agentsmithy::LogLevel::warning));

  // The Server object goes away while they are still stuck.
  destroy_then_release(3);
}

// ---------------------------------------------------------------------------
// shutdown() from many threads; signal storms
// ---------------------------------------------------------------------------

TEST_CASE("fault: shutdown() from 8 threads x 100 times at once: one clean shutdown") {
  auto log = std::make_shared<LogStore>();
  agentsmithy::Options o = test_options();
  o.logger = make_logger(log);
  std::atomic<int> hook_runs{0};
  bool during_startup = false;
  SUBCASE("while streams are open") {}
  SUBCASE("racing listen()'s start") { during_startup = true; }
  CAPTURE(during_startup);

  auto server = std::make_unique<Server>(o);
  server->on_shutdown([&hook_runs] { hook_runs.fetch_add(1); });
  std::atomic<bool> go{false}, returned{false}, result{false};
  std::vector<std::thread> threads;
  const auto storm = [&] {
    for (int i = 0; i < 8; ++i)
      threads.emplace_back([&] {
        while (!go.load()) std::this_thread::yield();
        for (int k = 0; k < 100; ++k) {
          server->shutdown();
          (void)server->is_shutting_down();
          (void)server->chat_service().active_streams();
        }
      });
  };
  std::vector<std::unique_ptr<RawClient>> clients;
  if (during_startup) storm();
  std::thread listener([&] {
    if (during_startup) go.store(true);
    result.store(server->listen());
    returned.store(true);
  });
  if (!during_startup) {
    REQUIRE(server->wait_until_ready(5000ms));
    for (int i = 0; i < 5; ++i) {
      clients.push_back(std::make_unique<RawClient>(server->port()));
      REQUIRE(clients.back()->post_chat(demo_body("hello", 100000, 10)));
      REQUIRE(clients.back()->read_count("chat", 1));
    }
    storm();
    go.store(true);
  }
  for (auto& t : threads) t.join();
  const bool ok = wait_until([&] { return returned.load(); }, 5000ms);
  if (!ok) {
    std::fprintf(stderr, "listen() did not return after the shutdown storm; abort\n%s",
                 log->text().c_str());
    std::_Exit(3);
  }
  listener.join();
  CHECK(result.load());
  for (auto& c : clients) {
    check_reads_to_shutdown_end(*c, 2000ms);
  }
  INFO(log->text());
  CHECK(log->count("shutdown requested") == 1);
  CHECK(log->count("streams notified") == 1);
  CHECK(log->count("stopped") == 1);
  CHECK(hook_runs.load() == 1);
  server->shutdown();  // after listen() returned: harmless
  server.reset();
  CHECK(hook_runs.load() == 1);
}

TEST_CASE(
    "fault: 10 SIGTERMs within a millisecond to agentsmithy-server: one clean shutdown, "
    "exit 0") {
  ServerProcess p({{"--port", "0", "--grace-period", "3"}, {}, "", false});
  const int port = p.require_ready();
  INFO(p.output());
  RawClient c(port);
  REQUIRE(c.post_chat(demo_body("Tell me a long story", 100000, 20)));
  REQUIRE(c.read_count("chat", 2));

  const auto t0 = Clock::now();
  for (int i = 0; i < 10; ++i) REQUIRE(p.signal(SIGTERM));
  const double spread = ms_since(t0);
  check_reads_to_shutdown_end(c, 3000ms);
  REQUIRE(p.wait_exit(5000ms));
  const double ms = ms_between(t0, p.exited_at());
  note("10 SIGTERMs sent within " + std::to_string(spread) + " ms: the server exited after " +
       std::to_string(ms) + " ms, " + p.describe());
  // Typically a few microseconds apart. Any spread under the 20 ms burst
  // window must give one shutdown; past it a second signal may force one.
  CHECK(spread < 15.0);
  CHECK(p.exited());
  CHECK(p.exit_code() == 0);
  CHECK(p.count("signal received: SIGTERM") == 1);
  CHECK(p.count("second signal") == 0);
  CHECK(p.count("shutdown requested") == 1);
  CHECK(p.count("stopped") == 1);
  CHECK(ms < 1000.0);
}

TEST_CASE("fault: SIGTERM before agentsmithy-server is ready: a clean exit 0") {
  // SIGTERM, then an exit with status 0 that logged the signal once.
  const auto exits_cleanly_on_sigterm = [](ServerProcess& p) {
    REQUIRE(p.signal(SIGTERM));
    REQUIRE(p.wait_exit(5000ms));
    INFO(p.output());
    CHECK(p.exited());
    CHECK(p.exit_code() == 0);
    CHECK(p.count("signal received: SIGTERM") == 1);
  };
  SUBCASE("while it starts (after its first log line, before it listens)") {
    ServerProcess p({{"--port", "0"}, {}, "", false});
    REQUIRE(p.started());
    REQUIRE(p.wait_for_output("agentsmithy-server starting"));
    const bool was_ready = p.count("ready on") > 0;
    CAPTURE(was_ready);
    exits_cleanly_on_sigterm(p);
  }
  SUBCASE("pending from exec (blocked by the parent)") {
    ServerProcess p({{"--port", "0"}, {}, "", true});
    REQUIRE(p.started());
    exits_cleanly_on_sigterm(p);
  }
  SUBCASE("at once after spawning, 20 times") {
    // Before main() runs, SIGTERM's default action still applies: the process
    // may die of the signal itself. Any other end (a crash, a hang, another
    // status) is a failure.
    int clean = 0, killed_early = 0;
    for (int i = 0; i < 20; ++i) {
      ServerProcess p({{"--port", "0"}, {}, "", false});
      REQUIRE(p.started());
      REQUIRE(p.signal(SIGTERM));
      REQUIRE(p.wait_exit(5000ms));
      INFO(p.output());
      INFO(p.describe());
      const bool ok_exit = p.exited() && p.exit_code() == 0;
      const bool early = p.signaled() && p.term_signal() == SIGTERM && p.output().empty();
      CHECK((ok_exit || early));
      clean += ok_exit;
      killed_early += early;
    }
    note("SIGTERM at once after spawn, 20 times: " + std::to_string(clean) + " exit 0, " +
         std::to_string(killed_early) + " killed before main() ran");
  }
}

TEST_CASE("fault: a signal before listen() makes listen() return promptly (in process)") {
  agentsmithy::Options o = test_options();
  o.logger = make_logger(std::make_shared<LogStore>());
  Server s(o);
  auto hook = agentsmithy::install_signal_handlers(s);
  REQUIRE(::kill(::getpid(), SIGTERM) == 0);
  REQUIRE(wait_until([&] { return s.is_shutting_down(); }, 1000ms));
  const auto t0 = Clock::now();
  std::atomic<bool> returned{false};
  bool result = false;
  std::thread t([&] {
    result = s.listen();
    returned.store(true);
  });
  const bool ok = wait_until([&] { return returned.load(); }, 2000ms);
  if (!ok) {
    s.force_shutdown();
    wait_until([&] { return returned.load(); }, 2000ms);
  }
  t.join();
  CHECK(ok);
  const double ms = ms_since(t0);
  note("SIGTERM before listen(): listen() returned " + std::string(result ? "true" : "false") +
       " after " + std::to_string(ms) + " ms");
  CHECK(ms < 1000.0);
  CHECK_FALSE(hook.forced());
}

// ---------------------------------------------------------------------------
// A port in use
// ---------------------------------------------------------------------------

TEST_CASE("fault: a port already in use: listen() is false; the example exits 1 naming the port") {
  int port = 0;
  const int fd = bind_listener(0, &port);
  REQUIRE(fd >= 0);
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};

  {
    agentsmithy::Options o = test_options();
    o.port = port;
    auto log = std::make_shared<LogStore>();
    o.logger = make_logger(log);
    Server s(o);
    const auto t0 = Clock::now();
    CHECK_FALSE(s.listen());  // returns at once
    CHECK(ms_since(t0) < 1000.0);
    CHECK_FALSE(s.wait_until_ready(100ms));
    INFO(log->text());
    CHECK(log->count(std::to_string(port)) >= 1);
  }

  ServerProcess p({{"--port", std::to_string(port)}, {}, "", false});
  REQUIRE(p.started());
  REQUIRE(p.wait_exit(5000ms));
  const std::string out = p.output();
  INFO(out);
  INFO(p.describe());
  CHECK(p.exited());
  CHECK(p.exit_code() == 1);
  CHECK(out.find(":" + std::to_string(port)) != std::string::npos);
  CHECK(lower(out).find("in use") != std::string::npos);
  CHECK(p.count("ready on") == 0);
}

// ---------------------------------------------------------------------------
// Many lifetimes in one process
// ---------------------------------------------------------------------------

TEST_CASE("fault: 50 create/listen/shutdown cycles: no growth in threads, descriptors or memory") {
  const long threads_before = settle_threads();
  if (threads_before > g_threads_at_start + kRuntimeThreads)
    note("threads left by earlier tests: " +
         std::to_string(threads_before - g_threads_at_start - kRuntimeThreads));

  // One cycle: a server on a free port, a short stream, a health check, a
  // stream still open at shutdown, shutdown, join, destroy.
  const auto cycle = [](int i) {
    agentsmithy::Options o = test_options();
    o.log_level = agentsmithy::LogLevel::warning;
    o.logger = [](agentsmithy::LogLevel, const std::string&) {};
    auto server = std::make_unique<Server>(o);
    std::atomic<bool> returned{false};
    std::thread t([&] {
      server->listen();
      returned.store(true);
    });
    REQUIRE(server->wait_until_ready(5000ms));
    {
      RawClient s(server->port());
      REQUIRE(s.post_chat(demo_body("hi", 3, 0)));
      CHECK(s.read_to_eof(3000ms));
      RawClient h(server->port());
      REQUIRE(h.get("/health"));
      CHECK(h.read_response(3000ms));
      RawClient open(server->port());
      REQUIRE(open.post_chat(demo_body("hi", 100000, 10)));
      REQUIRE(open.read_count("chat", 1));
      server->shutdown();
      CHECK(open.read_to_eof(3000ms));
    }
    if (!wait_until([&] { return returned.load(); }, 5000ms)) {
      std::fprintf(stderr, "cycle %d: listen() does not return; abort\n", i);
      std::_Exit(3);
    }
    t.join();
    server.reset();
  };

  const std::size_t fds0 = open_fd_count();
  const long threads0 = thread_count();
  // Warm-up: the first cycles fill what is allocated once per process (the
  // demo's story, malloc arenas for new threads, glibc's cache of thread
  // stacks); the baseline for memory is taken after them.
  constexpr int kWarmup = 5, kCycles = 50;
  for (int i = 0; i < kWarmup; ++i) cycle(i);
  REQUIRE(wait_until([&] { return thread_count() == threads0; }, 5000ms));
  const long rss0 = vm_rss_kb();
  long rss_mid = 0;
  const auto t0 = Clock::now();
  for (int i = 0; i < kCycles; ++i) {
    cycle(kWarmup + i);
    if (i == kCycles / 2 - 1) rss_mid = vm_rss_kb();
  }
  const double cycles_ms = ms_since(t0);
  const bool back =
      wait_until([&] { return thread_count() == threads0 && open_fd_count() == fds0; }, 5000ms);
  const long rss1 = vm_rss_kb();
  note("50 server lifetimes in " + std::to_string(cycles_ms) + " ms: threads " +
       std::to_string(thread_count()) + "/" + std::to_string(threads0) + ", fds " +
       std::to_string(open_fd_count()) + "/" + std::to_string(fds0) + ", VmRSS " +
       std::to_string(rss0) + " -> " + std::to_string(rss_mid) + " (25) -> " +
       std::to_string(rss1) + " kB (50)");
  CHECK(back);
  CHECK(thread_count() == threads0);
  CHECK(open_fd_count() == fds0);
  // Memory: a cycle allocates a Server (its state, epoll and eventfd, a 4 KiB
  // read buffer per connection, a few threads with 8 MiB stacks of which some
  // tens of KiB are touched). Leaking any of that per cycle grows RSS by at
  // least ~50 KiB a cycle, 2.5 MiB over 50; allocator noise after the warm-up
  // is well under 1 MiB. The second half must not grow more than noise either:
  // growth that continues is a leak, not a cache filling up.
  if (kSanitized) {
    note("sanitized build: the RSS bound is not checked (LeakSanitizer checks for leaks)");
  } else {
    CHECK(rss1 - rss0 < 2 * 1024);
    CHECK(rss1 - rss_mid < 1024);
  }
}
