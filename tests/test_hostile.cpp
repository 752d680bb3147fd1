// Hostile clients, on real sockets: slow loris, a reader that never reads,
// streams aborted by the thousand, malformed and oversized requests, and
// generators that emit broken UTF-8. The server must cut off what is too slow,
// refuse what is malformed, free what is abandoned and keep serving the rest.
#include "support.hpp"

using namespace test;
using agentsmithy::ChatRequest;
using agentsmithy::Server;
using agentsmithy::StreamWriter;

namespace {

// A client that sends `data` one byte every `period` on a thread of its own
// until the server closes the connection, or `limit` passes. Between bytes it
// waits in poll() for the server to answer or close, so it notices the close
// the moment it happens.
class Loris {
 public:
  Loris(int port, std::string data, milliseconds period, milliseconds limit = 10000ms)
      : data_(std::move(data)), period_(period), limit_(limit) {
    client_.connect_to(port);
    thread_ = std::thread([this] { run(); });
  }
  ~Loris() { join(); }

  void join() {
    if (thread_.joinable()) thread_.join();
  }
  bool connected() const { return client_.connected(); }

  std::atomic<std::size_t> bytes_sent{0};
  std::atomic<bool> closed_by_server{false};
  std::atomic<bool> finished{false};
  Clock::time_point first_byte{}, closed_at{};
  std::string response;  // whatever the server wrote before closing

  double ms_to_close() const { return ms_between(first_byte, closed_at); }

 private:
  void run() {
    const int fd = client_.fd();
    const auto start = Clock::now();
    std::size_t next = 0;
    while (fd >= 0 && Clock::now() - start < limit_) {
      if (next < data_.size()) {
        const ssize_t n = ::send(fd, data_.data() + next, 1, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) continue;
        if (next == 0) first_byte = Clock::now();
        if (n <= 0) {  // EPIPE, ECONNRESET: the server has closed
          close_seen();
          break;
        }
        ++next;
        bytes_sent.store(next);
      }
      // Pace the next byte, but wake at once when the server answers or closes.
      const auto until = Clock::now() + period_;
      bool gone = false;
      while (!gone && Clock::now() < until) {
        pollfd p{fd, POLLIN, 0};
        const auto left = std::chrono::duration_cast<milliseconds>(until - Clock::now()).count();
        if (::poll(&p, 1, static_cast<int>(std::max<long long>(left, 0) + 1)) <= 0) continue;
        char buf[4096];
        const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
          gone = true;
        } else {
          response.append(buf, static_cast<std::size_t>(n));
        }
      }
      if (gone) {
        close_seen();
        break;
      }
    }
    finished.store(true);
  }
  void close_seen() {
    closed_at = Clock::now();
    closed_by_server.store(true);
  }

  RawClient client_;
  std::string data_;
  milliseconds period_, limit_;
  std::thread thread_;
};

// test_options() with the given read_timeout.
agentsmithy::Options with_read_timeout(milliseconds read_timeout) {
  agentsmithy::Options o = test_options();
  o.read_timeout = read_timeout;
  return o;
}

const std::string kLorisHeaders =
    "POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    "Accept: text/event-stream\r\nContent-Length: 60\r\n\r\n";

// A raw request on a fresh connection; waits for the whole response or the
// close. Returns the client for inspection.
std::unique_ptr<RawClient> raw_exchange(int port, const std::string& bytes,
                                        milliseconds timeout = 3000ms) {
  auto c = std::make_unique<RawClient>(port);
  REQUIRE(c->connected());
  c->send_all(bytes);  // the server may close before taking it all
  c->read_until([&] { return c->complete || c->eof; }, timeout);
  return c;
}

bool valid_utf8(std::string_view s) {
  std::size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    std::size_t len;
    std::uint32_t cp;
    if (c < 0x80) {
      ++i;
      continue;
    } else if ((c & 0xE0) == 0xC0) {
      len = 2;
      cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3;
      cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      len = 4;
      cp = c & 0x07;
    } else {
      return false;
    }
    if (i + len > s.size()) return false;
    for (std::size_t k = 1; k < len; ++k) {
      const auto cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (cc & 0x3F);
    }
    if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) ||
        cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
      return false;
    }
    i += len;
  }
  return true;
}

const std::string kReplacement = "\xEF\xBF\xBD";  // U+FFFD

}  // namespace

// ---------------------------------------------------------------------------
// Slow loris
// ---------------------------------------------------------------------------

TEST_CASE("hostile: slow loris headers are cut off at the read timeout; others are served") {
  CountingServer rs(with_read_timeout(1000ms));

  Loris loris(rs.port(), kLorisHeaders, 200ms);
  REQUIRE(loris.connected());
  REQUIRE(wait_until([&] { return loris.bytes_sent.load() >= 2; }, 2000ms));
  check_still_serving(rs.port(), "while the loris dribbles");
  REQUIRE(wait_until([&] { return loris.finished.load(); }, 5000ms));
  loris.join();
  INFO("the loris sent " << loris.bytes_sent.load() << " of " << kLorisHeaders.size()
                         << " bytes; the server wrote: " << loris.response);
  CHECK(loris.closed_by_server.load());
  CHECK(loris.bytes_sent.load() < kLorisHeaders.size());
  note("slow loris (headers, a byte per 200 ms, read_timeout 1000 ms): closed " +
       std::to_string(loris.ms_to_close()) + " ms after its first byte");
  CHECK(loris.ms_to_close() >= 900.0);
  CHECK(loris.ms_to_close() < 1700.0);
  CHECK(rs.calls() == 1);  // only check_still_serving's stream
  check_still_serving(rs.port(), "after the loris");
}

TEST_CASE("hostile: a request body that never completes is cut off at the read timeout") {
  CountingServer rs(with_read_timeout(1000ms));
  const std::string head =
      "POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
      "Content-Length: 1000\r\n\r\n{\"messages\":[";

  SUBCASE("the body stops arriving") {
    // The connection must close at the deadline: whatever is left of the body
    // cannot be told from a next request, and its thread must be let go.
    RawClient c(rs.port());
    REQUIRE(c.send_all(head));
    const auto t0 = Clock::now();
    CHECK(c.read_until([&] { return c.eof; }, 3000ms));
    const double ms = ms_since(t0);
    INFO(c.summary());
    note("a body that stops: closed after " + std::to_string(ms) + " ms (read_timeout 1000 ms)");
    CHECK(ms >= 900.0);
    CHECK(ms < 1700.0);
    CHECK(c.status != 200);
  }
  SUBCASE("the body is dribbled a byte every 200 ms") {
    std::string body = std::string(997, ' ') + "]}";
    Loris loris(rs.port(), head + body, 200ms);
    REQUIRE(wait_until([&] { return loris.finished.load(); }, 5000ms));
    loris.join();
    INFO("the server wrote: " << loris.response);
    CHECK(loris.closed_by_server.load());
    note("a dribbled body: closed " + std::to_string(loris.ms_to_close()) +
         " ms after the first byte (read_timeout 1000 ms)");
    // The headers go out byte by byte too, so the deadline runs from the first.
    CHECK(loris.ms_to_close() >= 900.0);
    CHECK(loris.ms_to_close() < 1700.0);
  }
  CHECK(rs.calls() == 0);
  check_still_serving(rs.port(), "after the incomplete body");
}

TEST_CASE("hostile: a shutdown during a slow loris completes by grace_period") {
  agentsmithy::Options o = test_options();
  double limit_ms = 0;
  std::string what;
  SUBCASE("read_timeout longer than grace_period: the grace deadline cuts it") {
    o.read_timeout = 10000ms;
    o.grace_period = 1000ms;
    limit_ms = 1000.0 + 500.0;
    what = "read_timeout 10 s, grace 1 s";
  }
  SUBCASE("read_timeout shorter than grace_period: the read deadline cuts it") {
    o.read_timeout = 1000ms;
    o.grace_period = 5000ms;
    limit_ms = 1000.0 + 500.0;
    what = "read_timeout 1 s, grace 5 s";
  }
  CAPTURE(what);
  RunningServer rs(o);
  REQUIRE(rs.ready());
  Loris headers(rs.port(), kLorisHeaders, 200ms, 15000ms);
  RawClient body(rs.port());  // and one whose body never completes
  REQUIRE(body.send_all(
      "POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 500\r\n\r\n{\"messa"));
  REQUIRE(wait_until([&] { return headers.bytes_sent.load() >= 2; }, 2000ms));

  const auto t0 = Clock::now();
  rs.server().shutdown();
  REQUIRE(rs.wait_returned(milliseconds(static_cast<long long>(limit_ms) + 3000)));
  const double ms = ms_between(t0, rs.listen_returned_at());
  note("shutdown during a slow loris (" + what + "): listen() returned after " +
       std::to_string(ms) + " ms");
  CHECK(rs.listen_result());
  CHECK(ms < limit_ms);
  CHECK(wait_until([&] { return headers.finished.load(); }, 2000ms));
  CHECK(headers.closed_by_server.load());
  CHECK(body.read_to_eof(2000ms));
}

TEST_CASE("hostile: more slow lorises than serving threads delay others at most a read timeout") {
  // max_streams 4: the pool has at most 4 + 64 threads. 90 connections that
  // send a byte or nothing take all of them; every one must be let go at its
  // read deadline, and a health check queued behind them answered by then.
  agentsmithy::Options o = test_options();
  o.max_streams = 4;
  o.read_timeout = 1000ms;
  RunningServer rs(o);
  REQUIRE(rs.ready());
  std::vector<std::unique_ptr<RawClient>> lorises;
  for (int i = 0; i < 90; ++i) {
    auto c = std::make_unique<RawClient>(rs.port());
    REQUIRE(c->connected());
    if (i % 2 == 0) REQUIRE(c->send_all("P"));  // half say one byte, half nothing
    lorises.push_back(std::move(c));
  }
  const auto t0 = Clock::now();
  check_health(rs.port());
  const double health_ms = ms_since(t0);
  std::size_t closed = 0;
  for (auto& c : lorises) {
    if (c->read_to_eof(4000ms)) ++closed;
  }
  const double all_ms = ms_since(t0);
  note("90 lorises on a 68-thread pool (read_timeout 1000 ms): /health answered after " +
       std::to_string(health_ms) + " ms; all lorises closed after " + std::to_string(all_ms) +
       " ms");
  CHECK(health_ms < 1000.0 + 1000.0);
  CHECK(closed == lorises.size());
  CHECK(all_ms < 2 * 1000.0 + 1000.0);
  check_still_serving(rs.port(), "after the lorises");
}

// ---------------------------------------------------------------------------
// A client that never reads
// ---------------------------------------------------------------------------

namespace {

// "flood": 8 KiB chat events as fast as send() takes them, recording when a
// send() blocks (the backpressure point once the client stops reading).
// Anything else: a "tick" every 20 ms until cancelled.
struct FloodState {
  std::atomic<long long> in_send_since_ns{0};  // 0: not inside send()
  std::atomic<std::size_t> flood_events{0};
  std::atomic<int> flood_returned{0};
  std::atomic<bool> flood_send_false{false};
  std::atomic<int> running{0};
};

agentsmithy::Generator flood_generator(std::shared_ptr<FloodState> st) {
  return [st](const ChatRequest& req, StreamWriter& out) {
    st->running.fetch_add(1);
    if (req.messages.back().content == "flood") {
      const std::string payload(8192, 'x');
      for (;;) {
        st->in_send_since_ns.store(Clock::now().time_since_epoch().count());
        const bool ok = out.chat(payload);
        st->in_send_since_ns.store(0);
        if (!ok) {
          st->flood_send_false.store(true);
          break;
        }
        st->flood_events.fetch_add(1);
      }
      st->flood_returned.fetch_add(1);
    } else {
      while (out.chat("tick") && out.sleep_for(20ms)) {
      }
    }
    st->running.fetch_sub(1);
  };
}

// True once the flood generator has been blocked in one send() for 100 ms.
bool flood_blocked(const FloodState& st) {
  const long long since = st.in_send_since_ns.load();
  return since != 0 && Clock::now().time_since_epoch().count() - since >
                           std::chrono::duration_cast<Clock::duration>(100ms).count();
}

}  // namespace

TEST_CASE("hostile: a client that never reads its stream is dropped; others are not delayed") {
  auto st = std::make_shared<FloodState>();
  agentsmithy::Options o = test_options();
  std::string what;
  bool shutdown_while_stalled = true;
  double listen_min = 0, listen_max = 0;
  SUBCASE("write_timeout drops it without a shutdown") {
    o.write_timeout = 1000ms;
    o.grace_period = 5000ms;
    shutdown_while_stalled = false;
    what = "write_timeout 1 s, no shutdown";
  }
  SUBCASE("shutdown while it is stalled: write_timeout (1 s) before grace_period (5 s)") {
    o.write_timeout = 1000ms;
    o.grace_period = 5000ms;
    listen_min = 0;
    listen_max = 1000.0 + 700.0;  // the write timeout, from the last byte it took
    what = "write_timeout 1 s, grace 5 s";
  }
  SUBCASE("shutdown while it is stalled: grace_period (1 s) before write_timeout (30 s)") {
    o.write_timeout = 30000ms;
    o.grace_period = 1000ms;
    listen_min = 1000.0 * 0.9;
    listen_max = 1000.0 + 600.0;
    what = "write_timeout 30 s, grace 1 s";
  }
  CAPTURE(what);
  RunningServer rs(o, [&](Server& s) { s.chat_service().set_generator(flood_generator(st)); });
  REQUIRE(rs.ready());

  std::vector<std::unique_ptr<RawClient>> good;
  for (int i = 0; i < 4; ++i) {
    good.push_back(std::make_unique<RawClient>(rs.port()));
    REQUIRE(good.back()->post_chat(chat_body("tick")));
    REQUIRE(good.back()->read_events(1));
    good.back()->start_background_read(20000ms);
  }
  RawClient stalled;
  REQUIRE(stalled.connect_to(rs.port(), 4096));  // a small window, and it never reads
  REQUIRE(stalled.post_chat(chat_body("flood")));
  REQUIRE(wait_until([&] { return flood_blocked(*st); }, 5000ms));
  const auto stalled_at = Clock::now();
  note("never-reading client: the generator blocked after " +
       std::to_string(st->flood_events.load()) + " events of 8 KiB");
  CHECK(rs.chat().active_streams() == 5);

  if (!shutdown_while_stalled) {
    REQUIRE(wait_until([&] { return st->flood_returned.load() == 1; }, 3000ms));
    const double ms = ms_since(stalled_at);
    note("never-reading client dropped " + std::to_string(ms) +
         " ms after its generator blocked (write_timeout 1000 ms)");
    CHECK(st->flood_send_false.load());
    CHECK(ms < 1000.0 + 700.0);
    CHECK(wait_until([&] { return rs.chat().active_streams() == 4; }, 1000ms));
    for (auto& c : good) CHECK_FALSE(c->background_done.load());  // the others stream on
  }

  const auto t0 = Clock::now();
  rs.server().shutdown();
  for (auto& c : good) {
    CHECK(wait_until([&] { return c->saw_done.load(); }, 2000ms));
  }
  double slowest = 0;
  for (auto& c : good) {
    c->join_background();
    check_ended_by_shutdown(*c);
    slowest = std::max(slowest, ms_between(t0, c->done_at));
  }
  note("never-reading client (" + what + "): the other streams' done arrived within " +
       std::to_string(slowest) + " ms of shutdown()");
  CHECK(slowest < 250.0);
  REQUIRE(rs.wait_returned(8000ms));
  CHECK(rs.listen_result());
  const double listen_ms = ms_between(t0, rs.listen_returned_at());
  note("never-reading client (" + what + "): listen() returned " + std::to_string(listen_ms) +
       " ms after shutdown()");
  if (shutdown_while_stalled) {
    CHECK(listen_ms >= listen_min);
    CHECK(listen_ms < listen_max);
    CHECK(ms_between(stalled_at, rs.listen_returned_at()) < o.grace_period.count() + 700.0);
  } else {
    CHECK(listen_ms < 500.0);
  }
  CHECK(wait_until([&] { return st->running.load() == 0; }, 2000ms));
}

// ---------------------------------------------------------------------------
// 1,000 aborted streams
// ---------------------------------------------------------------------------

TEST_CASE("hostile: 1,000 streams aborted mid-stream (RST and FIN) leave nothing behind") {
  struct Counts {
    std::atomic<int> started{0}, running{0}, saw_false{0};
  };
  auto counts = std::make_shared<Counts>();
  const long threads_before = settle_threads();
  if (threads_before > g_threads_at_start + kRuntimeThreads)
    note("threads left by earlier tests: " +
         std::to_string(threads_before - g_threads_at_start - kRuntimeThreads));

  agentsmithy::Options o = test_options();
  o.log_level = agentsmithy::LogLevel::info;
  RunningServer rs(o, [&](Server& s) {
    s.chat_service().set_generator([counts](const ChatRequest& req, StreamWriter& out) {
      if (req.messages.back().content == "hi") {  // check_still_serving's request
        out.chat("ok");
        return;
      }
      counts->started.fetch_add(1);
      counts->running.fetch_add(1);
      while (out.chat("x") && out.sleep_for(20ms)) {
      }
      if (out.cancelled()) counts->saw_false.fetch_add(1);
      counts->running.fetch_sub(1);
    });
  });
  REQUIRE(rs.ready());
  const std::size_t fds0 = open_fd_count();
  const long threads0 = thread_count();
  note("1,000 aborted streams: baseline " + std::to_string(fds0) + " fds, " +
       std::to_string(threads0) + " threads");

  constexpr int kBatches = 10, kPerBatch = 100;
  int rst = 0, fin = 0, fin_closed_by_server = 0;
  const auto t0 = Clock::now();
  for (int b = 0; b < kBatches; ++b) {
    std::vector<std::unique_ptr<RawClient>> batch;
    for (int i = 0; i < kPerBatch; ++i) {
      batch.push_back(std::make_unique<RawClient>(rs.port()));
      REQUIRE(batch.back()->connected());
      REQUIRE(batch.back()->post_chat(chat_body("go")));
    }
    for (auto& c : batch) REQUIRE(c->read_count("chat", 1, 5000ms));  // mid-stream
    for (int i = 0; i < kPerBatch; ++i) {
      RawClient& c = *batch[static_cast<std::size_t>(i)];
      if (i % 2 == 0) {
        c.abort();  // RST
        ++rst;
      } else {
        ::shutdown(c.fd(), SHUT_WR);  // FIN; the server must close its side
        ++fin;
      }
    }
    for (int i = 1; i < kPerBatch; i += 2) {
      if (batch[static_cast<std::size_t>(i)]->read_to_eof(3000ms)) ++fin_closed_by_server;
    }
  }
  const double abort_ms = ms_since(t0);

  const auto t1 = Clock::now();
  const bool clean = wait_until(
      [&] {
        return rs.chat().active_streams() == 0 && counts->running.load() == 0 &&
               open_fd_count() == fds0 && thread_count() == threads0;
      },
      10000ms, 5ms);
  const double settle_ms = ms_since(t1);
  note("1,000 aborted streams (" + std::to_string(rst) + " RST, " + std::to_string(fin) +
       " FIN) in " + std::to_string(abort_ms) + " ms; back to baseline after " +
       std::to_string(settle_ms) + " ms: active_streams " +
       std::to_string(rs.chat().active_streams()) + ", fds " + std::to_string(open_fd_count()) +
       "/" + std::to_string(fds0) + ", threads " + std::to_string(thread_count()) + "/" +
       std::to_string(threads0));
  CHECK(clean);
  CHECK(counts->started.load() == kBatches * kPerBatch);
  CHECK(fin_closed_by_server == fin);
  CHECK(rs.chat().active_streams() == 0);
  CHECK(counts->running.load() == 0);
  CHECK(counts->saw_false.load() == kBatches * kPerBatch);
  CHECK(open_fd_count() == fds0);
  CHECK(thread_count() == threads0);
  check_still_serving(rs.port(), "after 1,000 aborted streams");
}

// ---------------------------------------------------------------------------
// Malformed and oversized requests
// ---------------------------------------------------------------------------

TEST_CASE("hostile: malformed HTTP gets a 4xx or a close, never a hang; the server serves on") {
  CountingServer rs(with_read_timeout(500ms));
  const std::string host = "Host: 127.0.0.1\r\n";
  const std::string body = R"({"messages":[{"role":"user","content":"hi"}]})";
  struct Case {
    std::string name, bytes;
  };
  const std::vector<Case> cases = {
      {"garbage request line", "GARBAGE\r\n\r\n"},
      {"method only", "GET\r\n\r\n"},
      {"no version", "GET /health\r\n" + host + "\r\n"},
      {"four parts", "GET /health HTTP/1.1 extra\r\n" + host + "\r\n"},
      {"unknown version", "GET /health HTTP/7.3\r\n" + host + "\r\n"},
      {"unknown method", "BREW /api/chat HTTP/1.1\r\n" + host + "\r\n"},
      {"binary junk", std::string("\x00\x01\x02\xff\xfe\r\n\r\n", 9)},
      {"TLS client hello", std::string("\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03", 11)},
      {"bare LF line ends", "POST /api/chat HTTP/1.1\nHost: 127.0.0.1\nContent-Length: " +
                                std::to_string(body.size()) + "\n\n" + body},
      {"negative Content-Length",
       "POST /api/chat HTTP/1.1\r\n" + host + "Content-Length: -5\r\n\r\n" + body},
      {"non-numeric Content-Length",
       "POST /api/chat HTTP/1.1\r\n" + host + "Content-Length: abc\r\n\r\n" + body},
      {"huge Content-Length",
       "POST /api/chat HTTP/1.1\r\n" + host + "Content-Length: 99999999999999999999999\r\n\r\n"},
      {"bad chunk size",
       "POST /api/chat HTTP/1.1\r\n" + host + "Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n"},
      {"chunk size overflow",
       "POST /api/chat HTTP/1.1\r\n" + host +
           "Transfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFFFF\r\nabc\r\n"},
      {"chunks over max_body_bytes",
       "POST /api/chat HTTP/1.1\r\n" + host + "Transfer-Encoding: chunked\r\n\r\n" +
           std::string("200000\r\n") + std::string(0x200000, 'x') + "\r\n0\r\n\r\n"},
      {"NUL in the path", std::string("GET /hea") + '\0' + "lth HTTP/1.1\r\n" + host + "\r\n"},
  };
  for (const auto& tc : cases) {
    CAPTURE(tc.name);
    const auto t0 = Clock::now();
    auto c = raw_exchange(rs.port(), tc.bytes, 3000ms);
    const double ms = ms_since(t0);
    INFO(c->summary());
    CHECK((c->complete || c->eof));  // answered or closed: no hang
    CHECK(ms < 500.0 + 1000.0);
    if (c->status != 0) {
      CHECK(c->status >= 400);
      CHECK(c->status < 500);
    }
    check_health(rs.port(), 2000ms);
  }
  CHECK(rs.calls() == 0);
  check_still_serving(rs.port(), "after the malformed requests");
}

TEST_CASE("hostile: oversized headers and request lines are refused; the server serves on") {
  RunningServer rs(with_read_timeout(1000ms));
  REQUIRE(rs.ready());
  const std::string host = "Host: 127.0.0.1\r\n";
  SUBCASE("one header line over 8 KiB") {
    auto c = raw_exchange(rs.port(), "GET /health HTTP/1.1\r\n" + host +
                                         "X-Big: " + std::string(16 * 1024, 'a') + "\r\n\r\n");
    INFO(c->summary());
    CHECK((c->complete || c->eof));
    CHECK(c->status != 200);
    if (c->status != 0) CHECK((c->status == 400 || c->status == 431));
  }
  SUBCASE("a request line over 8 KiB") {
    auto c = raw_exchange(
        rs.port(), "GET /health?" + std::string(16 * 1024, 'a') + " HTTP/1.1\r\n" + host + "\r\n");
    INFO(c->summary());
    CHECK((c->complete || c->eof));
    CHECK(c->status != 200);
    if (c->status != 0) CHECK((c->status == 414 || c->status == 400 || c->status == 431));
  }
  SUBCASE("256 KiB of headers in short lines") {
    // Each line is short; the section is 8 times nginx's default limit (32 KiB)
    // and 16 times Node's (16 KiB).
    std::string many;
    for (int i = 0; i < 4096; ++i)
      many += "X-H" + std::to_string(i) + ": " + std::string(56, 'v') + "\r\n";
    auto c = raw_exchange(rs.port(), "GET /health HTTP/1.1\r\n" + host + many + "\r\n");
    INFO(c->summary());
    INFO("header section: " << many.size() << " bytes");
    CHECK((c->complete || c->eof));
    CHECK(c->status != 200);  // a header section this large is refused (431/400) or cut off
    if (c->status != 0) CHECK((c->status == 400 || c->status == 431));
  }
  check_still_serving(rs.port(), "after the oversized headers");
}

TEST_CASE("hostile: an endless header or request line is not buffered without bound") {
  // Out of process, so that the server's peak memory is its own: send up to
  // 32 MiB of one line with no CRLF. A server that refuses lines over 8 KiB
  // stops reading (or closes) long before; one that buffers grows by the
  // whole 32 MiB, or more with string doubling.
  std::string start;
  SUBCASE("a header line") { start = "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Endless: "; }
  SUBCASE("the request line") { start = "GET /health?q="; }
  CAPTURE(start);
  ServerProcess p({{"--port", "0"}, {}, "", false});
  const int port = p.require_ready();
  INFO(p.output());
  const long hwm0 = proc_status("VmHWM", p.pid());
  RawClient c(port);
  REQUIRE(c.connected());
  REQUIRE(c.send_all(start));
  ::fcntl(c.fd(), F_SETFL, ::fcntl(c.fd(), F_GETFL, 0) | O_NONBLOCK);
  constexpr std::size_t kTotal = 32u << 20;
  const std::string block(64 * 1024, 'a');
  std::size_t sent = 0;
  bool closed = false;
  auto stuck_since = Clock::now();
  const auto t0 = Clock::now();
  while (sent < kTotal && ms_since(t0) < 8000.0) {
    const ssize_t n =
        ::send(c.fd(), block.data(), std::min(block.size(), kTotal - sent), MSG_NOSIGNAL);
    if (n > 0) {
      sent += static_cast<std::size_t>(n);
      stuck_since = Clock::now();
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      if (ms_since(stuck_since) > 300.0) break;  // the server has stopped reading
      pollfd pfd{c.fd(), POLLOUT, 0};
      ::poll(&pfd, 1, 50);
      continue;
    }
    closed = true;  // EPIPE / ECONNRESET
    break;
  }
  const long hwm1 = proc_status("VmHWM", p.pid());
  note("endless line (" + start.substr(0, 14) + "...): sent " + std::to_string(sent >> 10) +
       " KiB in " + std::to_string(ms_since(t0)) + " ms" +
       (closed ? " (closed by the server)" : "") + "; server peak RSS " + std::to_string(hwm0) +
       " -> " + std::to_string(hwm1) + " kB");
  CHECK(hwm1 - hwm0 < 8 * 1024);  // kB: far less than what was sent
  CHECK(sent < kTotal);
  c.close();
  check_health(port, 3000ms);
  check_exits_on_sigterm(p);
}

TEST_CASE("hostile: 100,000-deep nested JSON gets 400; brackets inside strings do not count") {
  RunningServer rs(test_options());
  REQUIRE(rs.ready());
  const int depth = 100000;
  const std::string arrays = std::string(depth, '[') + std::string(depth, ']');
  std::string objects;
  for (int i = 0; i < depth; ++i) objects += "{\"a\":";
  objects += "1" + std::string(depth, '}');
  const std::string prefix = R"({"messages":[{"role":"user","content":"hi"}],)";
  struct Case {
    std::string name, body;
  };
  const std::vector<Case> cases = {
      {"unterminated arrays", std::string(depth, '[')},
      {"arrays as the whole body", arrays},
      {"objects as the whole body", objects},
      {"arrays inside context", prefix + R"("context":{"deep":)" + arrays + "}}"},
      {"objects inside context", prefix + R"("context":)" + objects + "}"},
      {"arrays as a message's content",
       R"({"messages":[{"role":"user","content":)" + arrays + "}]}"},
      {"arrays in an extra field", prefix + R"("extra":)" + arrays + "}"},
  };
  for (const auto& tc : cases) {
    CAPTURE(tc.name);
    auto c = check_chat_refused(rs.port(), tc.body, 400);
    INFO(c->summary());
    CHECK(c->body_json().value("error", std::string()).find("nested") != std::string::npos);
  }
  // 100,000 brackets and braces inside strings (with escaped quotes) are text.
  const std::string text = std::string(depth, '[') + "\\\"{{{" + std::string(depth, '{');
  RawClient ok(rs.port());
  REQUIRE(ok.post_raw(R"({"messages":[{"role":"user","content":")" + text +
                      R"("}],"stream":false,"context":{"note":")" + text + R"("}})"));
  CHECK(ok.read_response(5000ms));
  INFO(ok.summary().substr(0, 2000));
  CHECK(ok.status == 200);
  check_still_serving(rs.port(), "after the deep JSON");
}

TEST_CASE("hostile: invalid UTF-8 in a request gets 400 with a valid UTF-8 JSON error") {
  CountingServer rs;
  const auto with_content = [](const std::string& content) {
    return R"({"messages":[{"role":"user","content":")" + content + R"("}]})";
  };
  struct Case {
    std::string name, body;
  };
  const std::vector<Case> cases = {
      {"a lone 0xFF byte", with_content("hi \xff there")},
      {"a character cut short", with_content("price: 5 \xe2\x82")},
      {"a cut character at the end", with_content("\xf0\x9f\x98")},
      {"a stray continuation byte", with_content("a\x80z")},
      {"an overlong slash", with_content("\xc0\xaf")},
      {"an encoded surrogate", with_content("\xed\xa0\x80")},
      {"above U+10FFFF", with_content("\xf4\x90\x80\x80")},
      {"a lone escaped surrogate", with_content("\\ud800")},
      {"in the role", R"({"messages":[{"role":"us)"
                      "\xff"
                      R"(er","content":"hi"}]})"},
      {"in a context key", R"({"messages":[{"role":"user","content":"hi"}],"context":{")"
                           "\xfe"
                           R"(":1}})"},
      {"in the dialog_id", R"({"messages":[{"role":"user","content":"hi"}],"dialog_id":"ab)"
                           "\xc3"
                           R"("})"},
  };
  for (const auto& tc : cases) {
    CAPTURE(tc.name);
    auto c = check_chat_refused(rs.port(), tc.body, 400);
    INFO(c->summary());
    CHECK(valid_utf8(c->body));
    CHECK(c->body_json().value("error", std::string()).rfind("Invalid JSON", 0) == 0);
  }
  CHECK(rs.calls() == 0);
  // Valid multi-byte text is fine.
  RawClient ok(rs.port());
  REQUIRE(ok.post_raw(with_content("caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80")));
  CHECK(ok.read_to_eof(5000ms));
  check_well_formed_stream(ok);
}

TEST_CASE(
    "hostile: a dialog_id with CR/LF, over 128 characters or outside [A-Za-z0-9_-] gets 422") {
  CountingServer rs;
  const std::vector<std::pair<std::string, std::string>> bad = {
      {"CR LF header injection", "abc\r\nSet-Cookie: injected=1"},
      {"LF", "abc\ndef"},
      {"CR", "abc\rdef"},
      {"129 characters", std::string(129, 'a')},
      {"10,000 characters", std::string(10000, 'b')},
      {"a space", "a b"},
      {"a slash", "../../etc/passwd"},
      {"a dot", "a.b"},
      {"a colon", "a:b"},
      {"markup", "<script>alert(1)</script>"},
      {"percent-encoded CRLF", "abc%0d%0aSet-Cookie:injected=1"},
      {"non-ASCII letter", "caf\xc3\xa9"},
      {"a NUL", std::string("ab\0cd", 5)},
      {"a tab", "ab\tcd"},
      {"empty", ""},
  };
  for (const auto& named : bad) {
    const std::string& name = named.first;
    const std::string& id = named.second;
    CAPTURE(name);
    json body = chat_body("hi");
    body["dialog_id"] = id;
    auto c = check_chat_refused(rs.port(), body.dump(), 422);
    INFO(c->summary());
    CHECK(c->body_json().value("error", std::string()).find("dialog_id") != std::string::npos);
    CHECK_FALSE(c->has_header("set-cookie"));
    if (id.size() > 3) CHECK(c->body.find(id) == std::string::npos);  // never echoed
    CHECK(c->body.find("injected") == std::string::npos);
  }
  CHECK(rs.calls() == 0);

  // Exactly 128 characters of every allowed class: accepted and echoed as is.
  std::string good;
  const std::string alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-";
  while (good.size() < 128) good += alphabet;
  good.resize(128);
  json body = chat_body("hi");
  body["dialog_id"] = good;
  RawClient ok(rs.port());
  REQUIRE(ok.post_raw(body.dump()));
  CHECK(ok.read_to_eof(5000ms));
  check_well_formed_stream(ok, good);
}

// ---------------------------------------------------------------------------
// Broken UTF-8 from a generator
// ---------------------------------------------------------------------------

TEST_CASE("hostile: a generator emitting invalid UTF-8: the stream carries on, bytes replaced") {
  const std::vector<std::string> sent = {
      "abc\xe2\x82",        // a token cut mid-character (the euro sign)
      "\xac def",           // ... and the rest of it in the next token
      "lone \xff byte",     //
      "overlong \xc0\xaf",  //
      "surrogate \xed\xa0\x80",
      "fine: caf\xc3\xa9 \xf0\x9f\x98\x80",  // valid text passes untouched
  };
  RunningServer rs(test_options(), [&](Server& s) {
    s.chat_service().set_generator([sent](const ChatRequest& req, StreamWriter& out) {
      for (const auto& t : sent) {
        if (!out.chat(t)) return;
      }
      // Invalid bytes in a key, in the type's neighbour fields and in a nested value.
      out.send({{"type", "tool_call"}, {"name\xff", "x"}, {"args", {{"path", "a\xfe/b"}}}});
      if (req.messages.back().content == "throw") {
        throw std::runtime_error("model said \xe2\x82 and died");
      }
    });
  });
  REQUIRE(rs.ready());

  // Asks `text`, streaming or not, and reads the whole answer: valid UTF-8.
  const auto ask = [&](const std::string& text, bool stream) {
    auto c = std::make_unique<RawClient>(rs.port());
    REQUIRE(c->post_chat(chat_body(text, json::object(), stream)));
    CHECK((stream ? c->read_to_eof(5000ms) : c->read_response(5000ms)));
    INFO(c->summary());
    CHECK(valid_utf8(c->body));
    return c;
  };
  SUBCASE("streaming") {
    auto c = ask("hi", true);
    check_well_formed_stream(*c);
    REQUIRE(c->count("chat") == sent.size());
    std::vector<std::string> got;
    for (const auto& e : c->events)
      if (e.value("type", std::string()) == "chat")
        got.push_back(e.value("content", std::string()));
    CHECK(got[0] == "abc" + kReplacement);
    CHECK(got[1] == kReplacement + " def");
    CHECK(got[2] == "lone " + kReplacement + " byte");
    CHECK(got[3].rfind("overlong ", 0) == 0);
    CHECK(got[3].find(kReplacement) != std::string::npos);
    CHECK(got[4].rfind("surrogate ", 0) == 0);
    CHECK(got[4].find(kReplacement) != std::string::npos);
    CHECK(got[5] == sent[5]);
    CHECK(c->count("tool_call") == 1);
    CHECK(c->count("error") == 0);
  }
  SUBCASE("streaming, then a what() with invalid UTF-8") {
    auto c = ask("throw", true);
    check_well_formed_stream(*c);
    REQUIRE(c->count("error") == 1);
    const json& err = c->events[c->events.size() - 2];
    CHECK(err.value("error", std::string()) == "model said " + kReplacement + " and died");
  }
  SUBCASE("non-streaming") {
    auto c = ask("hi", false);
    INFO(c->summary());
    CHECK(c->status == 200);
    // The chunks are joined before they are serialised: the character cut
    // between the first two comes out whole; the other bytes are replaced.
    const std::string content = c->body_json().value("content", std::string());
    CHECK(content.rfind("abc\xe2\x82\xac def", 0) == 0);
    CHECK(content.find("lone " + kReplacement + " byte") != std::string::npos);
    CHECK(content.find("fine: caf\xc3\xa9") != std::string::npos);
  }
  SUBCASE("non-streaming, then a what() with invalid UTF-8") {
    auto c = ask("throw", false);
    INFO(c->summary());
    CHECK(c->status == 500);
    CHECK(c->body_json().value("error", std::string()) ==
          "model said " + kReplacement + " and died");
  }
  check_still_serving(rs.port(), "after the broken UTF-8");
}
