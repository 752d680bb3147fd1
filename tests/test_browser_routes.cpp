// Browser clients (issue 10) and AgentSmithy's own clients (issue 12): the
// GET chat route for EventSource, its id:/retry: lines, 204 on reconnect, the
// token as a query parameter, host routes, the opening user event, /health's
// config fields, the status file and the port fallback.
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "support.hpp"

using namespace test;
using agentsmithy::ChatRequest;
using agentsmithy::Server;
using agentsmithy::StreamWriter;

namespace {

std::string url_encode(const std::string& text) {
  std::string out;
  char buf[4];
  for (const unsigned char c : text) {
    if (std::isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~') {
      out += static_cast<char>(c);
    } else {
      std::snprintf(buf, sizeof buf, "%%%02X", c);
      out += buf;
    }
  }
  return out;
}

// The raw SSE blocks of a response body: "id: 3\ndata: {...}" etc.
std::vector<std::string> sse_blocks(const std::string& body) {
  std::vector<std::string> blocks;
  std::size_t start = 0;
  for (;;) {
    const std::size_t end = body.find("\n\n", start);
    if (end == std::string::npos) break;
    blocks.push_back(body.substr(start, end - start));
    start = end + 2;
  }
  return blocks;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

struct Counted {
  std::atomic<int> requests{0};
};

}  // namespace

TEST_CASE("GET /api/chat streams what POST streams, with an id: line per event") {
  auto counted = std::make_shared<Counted>();
  RunningServer rs(test_options(), [&](Server& s) {
    s.chat_service().set_generator([counted](const ChatRequest& req, StreamWriter& out) {
      counted->requests.fetch_add(1);
      REQUIRE(req.messages.size() == 1);
      out.chat(req.messages[0].role + ":" + req.messages[0].content);
      out.chat(req.context.value("lang", std::string("none")));
      CHECK(req.stream);
    });
  });
  REQUIRE(rs.ready());
  RawClient c(rs.port());
  REQUIRE(c.get("/api/chat?message=" + url_encode("hé llo&x=1") +
                "&dialog_id=abc_1&context=" + url_encode(R"({"lang":"cpp"})")));
  CHECK(c.read_response());
  check_well_formed_stream(c, "abc_1");
  CHECK(c.joined_chat() == "user:hé llo&x=1cpp");
  CHECK(c.header("content-type").find("text/event-stream") == 0);
  CHECK(c.header("referrer-policy") == "no-referrer");
  const auto blocks = sse_blocks(c.body);
  REQUIRE(blocks.size() == c.events.size());
  for (std::size_t i = 0; i < blocks.size(); ++i) {
    INFO(blocks[i]);
    CHECK(blocks[i].rfind("id: " + std::to_string(i + 1) + "\ndata: ", 0) == 0);
  }
  CHECK(counted->requests.load() == 1);
}

TEST_CASE("POST /api/chat keeps data-only frames (no id:, no retry:)") {
  RunningServer rs(test_options(), [](Server& s) {
    s.chat_service().set_generator([](const ChatRequest&, StreamWriter& out) { out.chat("x"); });
  });
  REQUIRE(rs.ready());
  RawClient c(rs.port());
  REQUIRE(c.post_chat(chat_body("hi")));
  CHECK(c.read_response());
  for (const auto& block : sse_blocks(c.body)) CHECK(block.rfind("data: {", 0) == 0);
  CHECK(c.body.find("id:") == std::string::npos);
}

TEST_CASE("GET /api/chat validates its parameters like POST validates its body") {
  RunningServer rs(test_options());
  REQUIRE(rs.ready());
  struct Case {
    std::string query;
    int status;
    std::string names;
  };
  const Case cases[] = {
      {"", 422, "message"},
      {"?dialog_id=x", 422, "message"},
      {"?message=hi&dialog_id=" + url_encode("no spaces"), 422, "dialog_id"},
      {"?message=hi&context=" + url_encode("{oops"), 400, "context"},
      {"?message=hi&context=" + url_encode("[1,2]"), 422, "context"},
      {"?message=hi&context=" + url_encode(std::string(100, '[') + std::string(100, ']')), 400,
       "context"},
  };
  for (const Case& k : cases) {
    INFO(k.query);
    RawClient c(rs.port());
    REQUIRE(c.get("/api/chat" + k.query));
    CHECK(c.read_response());
    CHECK(c.status == k.status);
    CHECK(c.body_json().value("error", std::string()).find(k.names) != std::string::npos);
  }
  check_still_serving(rs.port(), "after bad GET requests");
}

TEST_CASE("GET /api/chat with Last-Event-ID answers 204 and generates nothing") {
  auto counted = std::make_shared<Counted>();
  RunningServer rs(test_options(), [&](Server& s) {
    s.chat_service().set_generator([counted](const ChatRequest&, StreamWriter& out) {
      counted->requests.fetch_add(1);
      out.chat("x");
    });
  });
  REQUIRE(rs.ready());
  RawClient c(rs.port());
  REQUIRE(c.request("GET", "/api/chat?message=hi", "", {{"Last-Event-ID", "4"}}));
  CHECK(c.read_response());
  CHECK(c.status == 204);
  CHECK(counted->requests.load() == 0);
  CHECK(rs.chat().active_streams() == 0);
}

TEST_CASE("the shutdown on the GET route: retry: 1000-5000 before the error, code shutdown") {
  std::set<int> retries;
  for (int round = 0; round < 6; ++round) {
    RunningServer rs(test_options());  // the demo: a long story
    REQUIRE(rs.ready());
    RawClient c(rs.port());
    REQUIRE(c.get("/api/chat?message=" + url_encode("Tell me a long story")));
    REQUIRE(c.read_count("chat", 2));
    rs.server().shutdown();
    CHECK(c.read_response());
    check_ended_by_shutdown(c);
    const json& err = c.events[c.events.size() - 2];
    CHECK(err.value("code", std::string()) == "shutdown");
    const auto blocks = sse_blocks(c.body);
    REQUIRE(blocks.size() >= 2);
    const std::string& error_block = blocks[blocks.size() - 2];
    INFO(error_block);
    REQUIRE(error_block.rfind("retry: ", 0) == 0);
    const int retry = std::stoi(error_block.substr(7));
    CHECK(retry >= 1000);
    CHECK(retry <= 5000);
    retries.insert(retry);
    for (std::size_t i = 0; i + 2 < blocks.size(); ++i)
      CHECK(blocks[i].find("retry:") == std::string::npos);
  }
  CHECK(retries.size() > 1);  // random, not one value for every browser
}

TEST_CASE("the shutdown's 503 carries the new text and code shutdown") {
  agentsmithy::Options o = test_options();
  o.grace_period = 2000ms;
  Gate release;
  RunningServer rs(o, [&](Server& s) {
    s.chat_service().set_generator([&](const ChatRequest&, StreamWriter& out) {
      out.chat("holding");
      release.wait();
    });
  });
  REQUIRE(rs.ready());
  RawClient holder(rs.port());
  REQUIRE(holder.post_chat(chat_body("hold")));
  REQUIRE(holder.read_count("chat", 1));
  rs.start_shutdown();
  RawClient late(rs.port());
  REQUIRE(late.post_chat(chat_body("late")));
  CHECK(late.read_response());
  CHECK(late.status == 503);
  CHECK(late.body_json().value("error", std::string()) ==
        "Server is shutting down (graceful shutdown)");
  CHECK(late.body_json().value("code", std::string()) == "shutdown");
  CHECK(std::string(agentsmithy::kShutdownMessage).find("shutdown") != std::string::npos);
  CHECK(std::string(agentsmithy::kShutdownMessage).find("shutting down") != std::string::npos);
  release.open();
}

TEST_CASE("auth: the GET route takes ?access_token=, POST does not") {
  agentsmithy::Options o = test_options();
  o.auth_token = "s3cret";
  RunningServer rs(o, [](Server& s) {
    s.chat_service().set_generator([](const ChatRequest&, StreamWriter& out) { out.chat("ok"); });
  });
  REQUIRE(rs.ready());
  {
    RawClient c(rs.port());
    REQUIRE(c.get("/api/chat?message=hi&access_token=s3cret"));
    CHECK(c.read_response());
    CHECK(c.status == 200);
    CHECK(c.joined_chat() == "ok");
  }
  {
    RawClient c(rs.port());
    REQUIRE(c.get("/api/chat?message=hi&access_token=wrong"));
    CHECK(c.read_response());
    CHECK(c.status == 401);
  }
  {
    RawClient c(rs.port());
    REQUIRE(c.request("POST", "/api/chat?access_token=s3cret", chat_body("hi").dump(),
                      {{"Content-Type", "application/json"}}));
    CHECK(c.read_response());
    CHECK(c.status == 401);
  }
  {
    RawClient c(rs.port());
    REQUIRE(c.request("GET", "/api/chat?message=hi", "", {{"Authorization", "Bearer s3cret"}}));
    CHECK(c.read_response());
    CHECK(c.status == 200);
  }
  CHECK_FALSE(rs.logs->contains("s3cret"));
}

TEST_CASE("host routes: served on the same port, under the Host guard and auth, 503 in the drain") {
  agentsmithy::Options o = test_options();
  o.auth_token = "tok";
  o.cors_origins = {"http://app.example"};
  o.grace_period = 2000ms;
  Gate release;
  RunningServer rs(o, [&](Server& s) {
    s.route("GET", "/hello", [](const httplib::Request&, httplib::Response& res) {
      res.set_content("hello from the host", "text/plain");
    });
    s.route("POST", "/api/host/echo", [](const httplib::Request& req, httplib::Response& res) {
      res.set_content(req.body, "text/plain");
    });
    s.route("GET", R"(/items/(\d+))", [](const httplib::Request& req, httplib::Response& res) {
      res.set_content("item " + req.matches[1].str(), "text/plain");
    });
    CHECK_THROWS_AS(s.route("BREW", "/tea", [](const httplib::Request&, httplib::Response&) {}),
                    std::invalid_argument);
    CHECK_THROWS_AS(s.route("GET", "/health", [](const httplib::Request&, httplib::Response&) {}),
                    std::invalid_argument);
    s.chat_service().set_generator([&](const ChatRequest&, StreamWriter& out) {
      out.chat("holding");
      release.wait();
    });
  });
  REQUIRE(rs.ready());
  CHECK_THROWS_AS(
      rs.server().route("GET", "/late", [](const httplib::Request&, httplib::Response&) {}),
      std::logic_error);
  {
    RawClient c(rs.port());
    REQUIRE(c.request("GET", "/hello", "", {{"Origin", "http://app.example"}}));
    CHECK(c.read_response());
    CHECK(c.status == 200);
    CHECK(c.body == "hello from the host");
    CHECK(c.header("access-control-allow-origin") == "http://app.example");
  }
  {
    RawClient c(rs.port());
    REQUIRE(c.get("/items/42"));
    CHECK(c.read_response());
    CHECK(c.body == "item 42");
  }
  {
    RawClient c(rs.port());  // under /api/: the token is needed
    REQUIRE(c.request("POST", "/api/host/echo", "ping", {{"Content-Type", "text/plain"}}));
    CHECK(c.read_response());
    CHECK(c.status == 401);
  }
  {
    RawClient c(rs.port());
    REQUIRE(c.request("POST", "/api/host/echo", "ping",
                      {{"Content-Type", "text/plain"}, {"Authorization", "Bearer tok"}}));
    CHECK(c.read_response());
    CHECK(c.body == "ping");
  }
  {
    RawClient c;
    REQUIRE(c.connect_to(rs.port()));
    REQUIRE(c.send_all("GET /hello HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n"));
    CHECK(c.read_response());
    CHECK(c.status == 403);
  }
  RawClient holder(rs.port());
  REQUIRE(holder.request("POST", "/api/chat", chat_body("hold").dump(),
                         {{"Content-Type", "application/json"}, {"Authorization", "Bearer tok"}}));
  REQUIRE(holder.read_count("chat", 1));
  rs.start_shutdown();
  {
    RawClient c(rs.port());
    REQUIRE(c.get("/hello"));
    CHECK(c.read_response());
    CHECK(c.status == 503);
  }
  release.open();
}

TEST_CASE("every stream opens with the user event, on both routes; stream:false is unchanged") {
  agentsmithy::Options o = test_options();
  o.user_event = true;
  RunningServer rs(o, [](Server& s) {
    s.chat_service().set_generator([](const ChatRequest&, StreamWriter& out) { out.chat("a"); });
  });
  REQUIRE(rs.ready());
  {
    RawClient c(rs.port());
    json body = {{"messages", json::array({{{"role", "user"}, {"content", "first"}},
                                           {{"role", "assistant"}, {"content", "answer"}},
                                           {{"role", "user"}, {"content", "second"}}})}};
    REQUIRE(c.post_chat(body));
    CHECK(c.read_response());
    check_well_formed_stream(c);
    REQUIRE(c.types() == std::vector<std::string>{"user", "chat", "done"});
    CHECK(c.events[0].value("content", std::string()) == "second");
  }
  {
    RawClient c(rs.port());
    REQUIRE(c.get("/api/chat?message=from%20get"));
    CHECK(c.read_response());
    REQUIRE(c.types() == std::vector<std::string>{"user", "chat", "done"});
    CHECK(c.events[0].value("content", std::string()) == "from get");
  }
  {
    RawClient c(rs.port());
    REQUIRE(c.post_chat(chat_body("quiet", json::object(), false)));
    CHECK(c.read_response());
    CHECK(c.body_json().value("content", std::string()) == "a");
    CHECK(c.body_json()["metadata"].value("events", 0) == 1);
  }
}

TEST_CASE("/health: config_valid, config_errors and ide") {
  // What /health answers on a server with the options `o`.
  const auto health_with = [](agentsmithy::Options o) {
    RunningServer rs(std::move(o));
    REQUIRE(rs.ready());
    RawClient c(rs.port());
    REQUIRE(c.get("/health"));
    CHECK(c.read_response());
    return c.body_json();
  };
  agentsmithy::Options o = test_options();
  SUBCASE("a valid configuration") {
    o.ide = "vscode";
    const json h = health_with(o);
    CHECK(h.value("config_valid", false) == true);
    CHECK(h["config_errors"].is_null());
    CHECK(h.value("ide", std::string()) == "vscode");
  }
  SUBCASE("errors the host found") {
    o.config_errors = {"--upstream: scheme must be http or https"};
    const json h = health_with(o);
    CHECK(h.value("config_valid", true) == false);
    CHECK(h["config_errors"] == json::array({"--upstream: scheme must be http or https"}));
    CHECK(h["ide"].is_null());
  }
}

TEST_CASE("Options::status_file writes status.json through the lifecycle") {
  char dir[] = "/tmp/agentsmithy-status-XXXXXX";
  REQUIRE(::mkdtemp(dir));
  agentsmithy::Options o = test_options();
  o.workdir = dir;
  o.status_file = true;
  const std::string path = std::string(dir) + "/.agentsmithy/status.json";
  {
    RunningServer rs(o);
    REQUIRE(rs.ready());
    const json ready = json::parse(read_file(path), nullptr, false);
    CHECK(ready.value("server_status", std::string()) == "ready");
    CHECK(ready.value("port", 0) == rs.port());
    CHECK(ready.value("server_pid", 0) == ::getpid());
    // A second server for the same workdir (this process is alive) is refused.
    agentsmithy::Server second(o);
    CHECK_FALSE(second.listen());
    CHECK(json::parse(read_file(path), nullptr, false).value("server_status", std::string()) ==
          "ready");
  }
  const json stopped = json::parse(read_file(path), nullptr, false);
  CHECK(stopped.value("server_status", std::string()) == "stopped");
  CHECK_FALSE(stopped.contains("server_pid"));
  CHECK_FALSE(stopped.contains("port"));
  std::filesystem::remove_all(dir);
}

TEST_CASE("Options::port_attempts takes the next free port when the first is taken") {
  int taken_port = 0;
  const int fd = bind_listener(0, &taken_port);
  REQUIRE(fd >= 0);
  agentsmithy::Options o = test_options();
  o.port = taken_port;
  SUBCASE("one attempt: the taken port fails") {
    o.port_attempts = 1;
    Server s(o);
    CHECK_FALSE(s.listen());
  }
  SUBCASE("several: the next free one") {
    o.port_attempts = 20;
    RunningServer rs(o);
    REQUIRE(rs.ready());
    CHECK(rs.port() > taken_port);
    CHECK(rs.port() <= taken_port + 19);
    // Logged just after the state turns ready: wait for it rather than race it.
    CHECK(wait_until(
        [&] { return rs.logs->contains("ready on 127.0.0.1:" + std::to_string(rs.port())); },
        2000ms));
  }
  ::close(fd);
}

TEST_CASE("example server: --cors-origin, AGENTSMITHY_CORS_ORIGINS and .env fill cors_origins") {
  const auto preflight = [](int port, const std::string& origin) {
    RawClient c(port);
    REQUIRE(c.request("OPTIONS", "/api/chat", "",
                      {{"Origin", origin}, {"Access-Control-Request-Method", "POST"}}));
    REQUIRE(c.read_response());
    return c.status;
  };
  // The example server's options, and the preflight status each origin gets.
  ServerProcess::Spec spec{{"--port", "0"}, {}, "", false};
  std::vector<std::pair<std::string, int>> expected;
  SUBCASE("repeated flags") {
    spec.args = {"--port", "0", "--cors-origin", "http://a.test", "--cors-origin", "http://b.test"};
    expected = {{"http://a.test", 204}, {"http://b.test", 204}, {"http://c.test", 403}};
  }
  SUBCASE("the environment, comma-separated") {
    spec.env = {{"AGENTSMITHY_CORS_ORIGINS", "http://a.test, http://b.test"}};
    expected = {{"http://b.test", 204}, {"http://c.test", 403}};
  }
  SUBCASE(".env") {
    spec.dotenv = "AGENTSMITHY_CORS_ORIGINS=http://a.test\n";
    expected = {{"http://a.test", 204}, {"http://b.test", 403}};
  }
  ServerProcess p(spec);
  const int port = p.require_ready();
  for (const auto& origin_status : expected) {
    CAPTURE(origin_status.first);
    CHECK(preflight(port, origin_status.first) == origin_status.second);
  }
}
