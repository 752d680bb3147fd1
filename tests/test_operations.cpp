// Operations (issue 11): HTTP/1.0 clients, the lame duck, /metrics and the
// shutdown report.
#include <regex>
#include <sstream>

#include "support.hpp"

using namespace test;
using agentsmithy::ChatRequest;
using agentsmithy::Server;
using agentsmithy::ShutdownReport;
using agentsmithy::StreamWriter;

namespace {

// One sample's value from a Prometheus text exposition, or -1.
double sample(const std::string& text, const std::string& series) {
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(series + " ", 0) == 0) return std::stod(line.substr(series.size() + 1));
  }
  return -1;
}

std::string get_metrics(int port) {
  RawClient c(port);
  REQUIRE(c.get("/metrics"));
  REQUIRE(c.read_response());
  CHECK(c.status == 200);
  CHECK(c.header("content-type") == "text/plain; version=0.0.4");
  return c.body;
}

}  // namespace

TEST_CASE("HTTP/1.0: a stream is delimited by the close, other answers by Content-Length") {
  RunningServer rs(test_options(), [](Server& s) {
    s.chat_service().set_generator([](const ChatRequest&, StreamWriter& out) {
      out.chat("one");
      out.chat("two");
    });
  });
  REQUIRE(rs.ready());
  {
    RawClient c;
    REQUIRE(c.connect_to(rs.port()));
    const std::string body = chat_body("hi").dump();
    REQUIRE(
        c.send_all("POST /api/chat HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: "
                   "application/json\r\nContent-Length: " +
                   std::to_string(body.size()) + "\r\n\r\n" + body));
    REQUIRE(c.read_to_eof());
    INFO(c.summary());
    CHECK(c.status == 200);
    CHECK_FALSE(c.chunked);
    CHECK_FALSE(c.has_header("transfer-encoding"));
    CHECK(lower(c.header("connection")) == "close");
    CHECK(c.types() == std::vector<std::string>{"chat", "chat", "done"});
    CHECK(c.body.find("\r\n0\r\n") == std::string::npos);  // no chunk framing anywhere
    CHECK(c.malformed.empty());
  }
  {
    RawClient c;
    REQUIRE(c.connect_to(rs.port()));
    REQUIRE(c.send_all("GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"));
    REQUIRE(c.read_response());
    CHECK(c.status == 200);
    CHECK_FALSE(c.chunked);
    REQUIRE(c.content_length);
    CHECK(*c.content_length == c.body.size());
  }
  {
    RawClient c;
    REQUIRE(c.connect_to(rs.port()));
    const std::string body = chat_body("hi", json::object(), false).dump();
    REQUIRE(
        c.send_all("POST /api/chat HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: "
                   "application/json\r\nContent-Length: " +
                   std::to_string(body.size()) + "\r\n\r\n" + body));
    REQUIRE(c.read_response());
    CHECK_FALSE(c.chunked);
    REQUIRE(c.content_length);
    CHECK(c.body_json().value("content", std::string()) == "onetwo");
  }
}

TEST_CASE("lame duck: /health says 503 at once, everything else is served, then the drain") {
  agentsmithy::Options o = test_options();
  o.lame_duck = 400ms;
  RunningServer rs(o);  // the demo
  REQUIRE(rs.ready());
  RawClient open_stream(rs.port());
  REQUIRE(open_stream.post_chat(demo_body("long", 100000, 20)));
  REQUIRE(open_stream.read_count("chat", 2));
  const auto t0 = Clock::now();
  rs.start_shutdown();
  {
    RawClient h(rs.port());
    REQUIRE(h.get("/health"));
    REQUIRE(h.read_response());
    CHECK(h.status == 503);
    CHECK(h.header("retry-after") == agentsmithy::detail::kRetryAfterSeconds);
    CHECK(h.body_json().value("server_status", std::string()) == "stopping");
  }
  {
    RawClient c(rs.port());  // a new chat is still admitted and runs to its end
    REQUIRE(c.post_chat(demo_body("short", 3, 10)));
    REQUIRE(c.read_response());
    check_well_formed_stream(c);
    CHECK(c.count("error") == 0);
    CHECK(c.count("chat") == 3);
  }
  const std::size_t before = open_stream.count("chat");
  REQUIRE(open_stream.read_count("chat", before + 3));  // the open stream goes on
  CHECK(open_stream.count("error") == 0);
  CHECK(ms_since(t0) < 400.0);
  REQUIRE(open_stream.read_response(3000ms));  // then the drain ends it
  check_ended_by_shutdown(open_stream);
  const double ended = ms_between(t0, open_stream.done_at);
  note("lame duck 400 ms: the open stream got done " + std::to_string(ended) +
       " ms after shutdown()");
  CHECK(ended >= 390.0);
  REQUIRE(rs.wait_returned(3000ms));
  const auto report = rs.server().shutdown_report();
  REQUIRE(report);
  CHECK(report->lame_duck.count() >= 390);
  CHECK(report->streams_notified == 1);
}

TEST_CASE("lame duck: force_shutdown() during it ends it at once") {
  agentsmithy::Options o = test_options();
  o.lame_duck = 10s;
  RunningServer rs(o);
  REQUIRE(rs.ready());
  RawClient c(rs.port());
  REQUIRE(c.post_chat(demo_body("long", 100000, 20)));
  REQUIRE(c.read_count("chat", 1));
  rs.start_shutdown();
  const auto t0 = Clock::now();
  rs.server().force_shutdown();
  REQUIRE(rs.wait_returned(2000ms));
  note("force during a 10 s lame duck: listen() returned " +
       std::to_string(ms_between(t0, rs.listen_returned_at())) + " ms later");
  CHECK(ms_between(t0, rs.listen_returned_at()) < 1000.0);
  CHECK(c.read_response(2000ms));
  check_ended_by_shutdown(c);
  const auto report = rs.server().shutdown_report();
  REQUIRE(report);
  CHECK(report->forced);
}

TEST_CASE("shutdown report: empty until the shutdown completes, then what it did") {
  agentsmithy::Options o = test_options();
  o.grace_period = 300ms;
  Gate release;
  std::atomic<bool> stuck_returned{false};
  RunningServer rs(o, [&](Server& s) {
    s.chat_service().set_generator([&](const ChatRequest& req, StreamWriter& out) {
      out.chat("x");
      if (req.messages.back().content == "stuck") {
        release.wait();  // ignores the cancellation
        stuck_returned = true;
      } else {
        while (out.sleep_for(10ms)) {
        }
      }
    });
  });
  REQUIRE(rs.ready());
  CHECK_FALSE(rs.server().shutdown_report());
  RawClient a(rs.port()), b(rs.port()), idle(rs.port());
  REQUIRE(a.post_chat(chat_body("polite")));
  REQUIRE(b.post_chat(chat_body("stuck")));
  REQUIRE(a.read_count("chat", 1));
  REQUIRE(b.read_count("chat", 1));
  REQUIRE(idle.get("/health", true));  // then idles on its keep-alive connection
  REQUIRE(idle.read_response());
  const auto before = std::chrono::system_clock::now();
  rs.server().shutdown();
  CHECK_FALSE(rs.server().shutdown_report());  // not completed yet
  REQUIRE(wait_until(
      [&] {
        return sample(get_metrics(rs.port()), R"(agentsmithy_lifecycle_state{state="draining"})") ==
               1;
      },
      1000ms));
  RawClient refused(rs.port());
  REQUIRE(refused.post_chat(chat_body("late")));
  REQUIRE(refused.read_response());
  CHECK(refused.status == 503);
  REQUIRE(rs.wait_returned(3000ms));
  const auto report = rs.server().shutdown_report();
  REQUIRE(report);
  CHECK(report->cause == ShutdownReport::Cause::shutdown);
  CHECK_FALSE(report->forced);
  CHECK(report->started >= before - 1s);
  CHECK(report->streams_notified == 2);
  CHECK(report->streams_ended_in_grace == 1);  // the polite one
  CHECK(report->generators_running == 1);      // the stuck one
  // Every client got its final events at the drain's start, so nothing was
  // left to cut at the deadline but the stuck producer, which is left to run.
  CHECK(report->idle_connections_closed >= 1);
  CHECK(report->requests_refused >= 1);
  CHECK(report->drain.count() >= 290);
  CHECK(report->last_done.count() < 250);
  CHECK(rs.logs->contains("shutdown report {"));
  release.open();
  // listen() did not wait for it: let it go before `release` goes away.
  CHECK(wait_until([&] { return stuck_returned.load(); }, 2000ms));
}

TEST_CASE("/metrics: Prometheus names, outcomes and the lifecycle state") {
  agentsmithy::Options o = test_options();
  o.max_streams = 1;
  Gate release;
  RunningServer rs(o, [&](Server& s) {
    s.chat_service().set_generator([&](const ChatRequest& req, StreamWriter& out) {
      out.chat("x");
      if (req.messages.back().content == "hold") release.wait();
    });
  });
  REQUIRE(rs.ready());
  {
    RawClient c(rs.port());
    REQUIRE(c.post_chat(chat_body("quick")));
    REQUIRE(c.read_response());
  }
  RawClient hold(rs.port());
  REQUIRE(hold.post_chat(chat_body("hold")));
  REQUIRE(hold.read_count("chat", 1));
  {
    RawClient c(rs.port());  // at capacity
    REQUIRE(c.post_chat(chat_body("more")));
    REQUIRE(c.read_response());
    CHECK(c.status == 503);
  }
  REQUIRE(wait_until(
      [&] {
        return sample(get_metrics(rs.port()),
                      R"(agentsmithy_streams_ended_total{outcome="completed"})") == 1;
      },
      2000ms));
  const std::string m = get_metrics(rs.port());
  INFO(m);
  CHECK(sample(m, "agentsmithy_streams_active") == 1);
  CHECK(sample(m, R"(agentsmithy_streams_ended_total{outcome="rejected_capacity"})") == 1);
  CHECK(sample(m, R"(agentsmithy_streams_ended_total{outcome="shutdown"})") == 0);
  CHECK(sample(m, R"(agentsmithy_http_requests_total{route="/api/chat",status="503"})") == 1);
  CHECK(sample(m, R"(agentsmithy_lifecycle_state{state="ready"})") == 1);
  CHECK(sample(m, R"(agentsmithy_lifecycle_state{state="draining"})") == 0);
  CHECK(sample(m, "agentsmithy_events_sent_total") >= 2);
  CHECK(sample(m, "agentsmithy_sent_bytes_total") > 0);
  CHECK(sample(m, "agentsmithy_stream_duration_seconds_count") == 1);
  CHECK(sample(m, R"(agentsmithy_stream_first_event_seconds_bucket{le="+Inf"})") == 2);
  CHECK(m.find("# TYPE agentsmithy_streams_ended_total counter") != std::string::npos);
  CHECK(m.find("# TYPE agentsmithy_stream_duration_seconds histogram") != std::string::npos);
  // Prometheus' naming rules: no colons, counters end in _total.
  const std::regex name(R"(^# TYPE ([a-z_]+) (counter|gauge|histogram)$)");
  std::istringstream in(m);
  std::string line;
  int types = 0;
  while (std::getline(in, line)) {
    std::smatch match;
    if (!std::regex_match(line, match, name)) continue;
    ++types;
    if (match[2] == "counter") CHECK(match[1].str().size() > 6);
    if (match[2] == "counter") CHECK(match[1].str().substr(match[1].str().size() - 6) == "_total");
  }
  CHECK(types >= 8);
  release.open();
}
