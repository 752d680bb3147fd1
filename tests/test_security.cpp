// Security defaults: bound to loopback, the DNS-rebinding Host guard, the
// optional bearer token (in the library and in the example server), and CORS
// that is off unless origins are listed.
#include "support.hpp"

#include <ifaddrs.h>

#include <fstream>

using namespace test;

namespace {

// One request, written exactly as given (the Host header too), on a fresh
// connection; waits for the whole response.
std::unique_ptr<RawClient> exchange(int port, const std::string& method, const std::string& path,
                                    const Headers& headers, const std::string& body = "") {
  std::string req = method + " " + path + " HTTP/1.1\r\n";
  for (const auto& h : headers) req += h.first + ": " + h.second + "\r\n";
  if (!body.empty() || method == "POST") {
    req +=
        "Content-Type: application/json\r\nContent-Length: " + std::to_string(body.size()) + "\r\n";
  }
  req += "Connection: close\r\n\r\n" + body;
  auto c = std::make_unique<RawClient>(port);
  REQUIRE(c->connected());
  REQUIRE(c->send_all(req));
  c->read_until([&] { return c->complete || c->eof; }, 5000ms);
  return c;
}

Headers with_host(const std::string& host, Headers extra = {}) {
  extra.insert(extra.begin(), {"Host", host});
  return extra;
}

const std::string kChat = R"({"messages":[{"role":"user","content":"hi"}]})";

// The addresses listening on TCP `port` (from /proc/net/tcp and tcp6).
std::vector<std::string> listening_addresses(int port) {
  std::vector<std::string> out;
  for (const char* file : {"/proc/net/tcp", "/proc/net/tcp6"}) {
    std::ifstream in(file);
    std::string line;
    std::getline(in, line);  // the column titles
    while (std::getline(in, line)) {
      std::istringstream fields(line);
      std::string slot, local, remote, state;
      fields >> slot >> local >> remote >> state;
      if (state != "0A") continue;  // LISTEN
      const auto colon = local.find(':');
      if (colon == std::string::npos) continue;
      if (std::stoi(local.substr(colon + 1), nullptr, 16) != port) continue;
      const std::string hex = local.substr(0, colon);
      char text[INET6_ADDRSTRLEN] = {};
      if (hex.size() == 8) {
        const std::uint32_t v = static_cast<std::uint32_t>(std::stoul(hex, nullptr, 16));
        in_addr a{};
        a.s_addr = v;  // printed as the host-order int of the network-order bytes
        ::inet_ntop(AF_INET, &a, text, sizeof text);
      } else if (hex.size() == 32) {
        in6_addr a{};
        for (int w = 0; w < 4; ++w) {
          const std::uint32_t v =
              static_cast<std::uint32_t>(std::stoul(hex.substr(w * 8, 8), nullptr, 16));
          std::memcpy(reinterpret_cast<char*>(&a) + w * 4, &v, 4);
        }
        ::inet_ntop(AF_INET6, &a, text, sizeof text);
      }
      out.emplace_back(text);
    }
  }
  return out;
}

// An IPv4 address of this machine that is not loopback, if it has one.
std::optional<in_addr> non_loopback_ipv4() {
  ifaddrs* list = nullptr;
  if (::getifaddrs(&list) != 0) return std::nullopt;
  std::optional<in_addr> found;
  for (ifaddrs* i = list; i && !found; i = i->ifa_next) {
    if (!i->ifa_addr || i->ifa_addr->sa_family != AF_INET) continue;
    const in_addr a = reinterpret_cast<sockaddr_in*>(i->ifa_addr)->sin_addr;
    if ((ntohl(a.s_addr) >> 24) != 127) found = a;
  }
  ::freeifaddrs(list);
  return found;
}

// connect() to addr:port; returns errno (0 on success).
int try_connect(in_addr addr, int port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(static_cast<std::uint16_t>(port));
  sa.sin_addr = addr;
  const int rc = ::connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa);
  const int err = rc == 0 ? 0 : errno;
  ::close(fd);
  return err;
}

bool has_cors_headers(const RawClient& c) {
  for (const auto& h : c.headers)
    if (h.first.rfind("access-control-", 0) == 0) return true;
  return false;
}

}  // namespace

// ---------------------------------------------------------------------------
// Bound to loopback
// ---------------------------------------------------------------------------

TEST_CASE("security: bound to 127.0.0.1 by default (the library and the example server)") {
  CHECK(agentsmithy::Options{}.host == "127.0.0.1");
  const auto other = non_loopback_ipv4();
  if (!other) note("no non-loopback IPv4 address here: the connect check is skipped");

  SUBCASE("the library") {
    agentsmithy::Options o;  // host left at its default
    o.port = 0;
    auto logs = std::make_shared<LogStore>();
    o.logger = make_logger(logs);
    RunningServer rs(o);
    REQUIRE(rs.ready());
    CHECK(listening_addresses(rs.port()) == std::vector<std::string>{"127.0.0.1"});
    if (other) CHECK(try_connect(*other, rs.port()) == ECONNREFUSED);
    check_health(rs.port());
  }
  SUBCASE("the example server without --host") {
    ServerProcess p({{"--port", "0"}, {}, "", false});
    const int port = p.require_ready();
    INFO(p.output());
    CHECK(p.count("ready on 127.0.0.1:") == 1);
    CHECK(listening_addresses(port) == std::vector<std::string>{"127.0.0.1"});
    if (other) CHECK(try_connect(*other, port) == ECONNREFUSED);
    check_exits_on_sigterm(p);
  }
}

// ---------------------------------------------------------------------------
// DNS rebinding
// ---------------------------------------------------------------------------

TEST_CASE("security: a loopback-bound server answers 403 to a foreign Host (DNS rebinding)") {
  CountingServer rs;
  const std::string p = std::to_string(rs.port());
  const std::string other_port = std::to_string(rs.port() == 65535 ? 1 : rs.port() + 1);

  const std::vector<std::string> allowed = {"localhost:" + p, "127.0.0.1:" + p, "[::1]:" + p,
                                            "localhost",      "127.0.0.1",      "[::1]",
                                            "LocalHost:" + p};
  const std::vector<std::string> refused = {
      "evil.com",
      "evil.com:" + p,
      "localhost:" + other_port,
      "127.0.0.1:" + other_port,
      "localhost.evil.com",
      "localhost.evil.com:" + p,
      "127.0.0.1.nip.io:" + p,
      "evil.localhost.com:" + p,
      "127.0.0.2:" + p,
      "0.0.0.0:" + p,
      "[::2]:" + p,
      "evil.com:" + p + "@localhost",
  };
  int expected_calls = 0;
  for (const auto& host : allowed) {
    CAPTURE(host);
    auto h = exchange(rs.port(), "GET", "/health", with_host(host));
    INFO(h->summary());
    CHECK(h->status == 200);
    auto c = exchange(rs.port(), "POST", "/api/chat", with_host(host), kChat);
    INFO(c->summary());
    CHECK(c->status == 200);
    check_well_formed_stream(*c);
    ++expected_calls;
  }
  for (const auto& host : refused) {
    CAPTURE(host);
    for (const std::string path : {"/health", "/api/chat"}) {
      CAPTURE(path);
      auto c = path == "/health" ? exchange(rs.port(), "GET", path, with_host(host))
                                 : exchange(rs.port(), "POST", path, with_host(host), kChat);
      INFO(c->summary());
      CHECK(c->status == 403);
      CHECK(c->body_json().value("error", std::string()).find("Host") != std::string::npos);
      CHECK_FALSE(has_cors_headers(*c));
    }
  }
  CHECK(rs.calls() == expected_calls);  // no refused request reached the generator
}

TEST_CASE("security: the Host guard applies only while bound to loopback") {
  agentsmithy::Options o = test_options();
  o.host = "0.0.0.0";  // all interfaces: names other than localhost are expected
  RunningServer rs(o);
  REQUIRE(rs.ready());
  auto c = exchange(rs.port(), "GET", "/health",
                    with_host("agent.example.com:" + std::to_string(rs.port())));
  INFO(c->summary());
  CHECK(c->status == 200);
}

// ---------------------------------------------------------------------------
// Bearer token
// ---------------------------------------------------------------------------

TEST_CASE("security: with auth_token, /api/* needs the bearer token (401); /health stays open") {
  agentsmithy::Options o = test_options();
  o.auth_token = "s3cret-T0ken_value";
  CountingServer rs(o);
  const std::string host = "127.0.0.1:" + std::to_string(rs.port());
  const std::string token = o.auth_token;

  const std::vector<std::pair<std::string, Headers>> refused = {
      {"no Authorization", with_host(host)},
      {"empty", with_host(host, {{"Authorization", ""}})},
      {"the scheme only", with_host(host, {{"Authorization", "Bearer"}})},
      {"the token without a scheme", with_host(host, {{"Authorization", token}})},
      {"a wrong token", with_host(host, {{"Authorization", "Bearer wrong"}})},
      {"a prefix of the token",
       with_host(host, {{"Authorization", "Bearer " + token.substr(0, token.size() - 1)}})},
      {"the token and more", with_host(host, {{"Authorization", "Bearer " + token + "x"}})},
      {"Basic", with_host(host, {{"Authorization", "Basic " + token}})},
      {"two spaces", with_host(host, {{"Authorization", "Bearer  " + token}})},
      {"as another header", with_host(host, {{"X-Auth-Token", token}})},
  };
  for (const auto& named : refused) {
    const std::string& name = named.first;
    const Headers& headers = named.second;
    CAPTURE(name);
    auto c = exchange(rs.port(), "POST", "/api/chat", headers, kChat);
    INFO(c->summary());
    CHECK(c->status == 401);
    CHECK(c->header("www-authenticate").rfind("Bearer", 0) == 0);
    CHECK_FALSE(c->body_json().value("error", std::string()).empty());
    CHECK(c->body.find(token) == std::string::npos);
  }
  // Other ways of spelling the path do not get around it.
  for (const std::string path : {"/api/chat?x=1", "/api/nope", "/api/", "/%61pi/chat",
                                 "/api/./chat", "//api/chat", "/api%2Fchat"}) {
    CAPTURE(path);
    auto c = exchange(rs.port(), "POST", path, with_host(host), kChat);
    INFO(c->summary());
    CHECK(c->status != 200);
    CHECK(c->status >= 400);
  }
  CHECK(rs.calls() == 0);

  auto ok = exchange(rs.port(), "POST", "/api/chat",
                     with_host(host, {{"Authorization", "Bearer " + token}}), kChat);
  check_well_formed_stream(*ok);
  auto collected = exchange(rs.port(), "POST", "/api/chat",
                            with_host(host, {{"Authorization", "Bearer " + token}}),
                            R"({"messages":[{"role":"user","content":"hi"}],"stream":false})");
  INFO(collected->summary());
  CHECK(collected->status == 200);
  CHECK(rs.calls() == 2);

  auto health = exchange(rs.port(), "GET", "/health", with_host(host));
  INFO(health->summary());
  CHECK(health->status == 200);
  CHECK(health->body_json().value("server_status", std::string()) == "ready");
}

TEST_CASE("security: agentsmithy-server takes AGENTSMITHY_TOKEN from the environment or .env") {
  ServerProcess::Spec spec{{"--port", "0"}, {}, "", false};
  std::string token;
  SUBCASE("environment") {
    token = "from-the-environment";
    spec.env = {{"AGENTSMITHY_TOKEN", token}};
  }
  SUBCASE(".env") {
    token = "from-dotenv";
    spec.dotenv = "# settings\nAGENTSMITHY_TOKEN=" + token + "\n";
  }
  SUBCASE("the environment beats .env") {
    token = "env-wins";
    spec.env = {{"AGENTSMITHY_TOKEN", token}};
    spec.dotenv = "AGENTSMITHY_TOKEN=dotenv-loses\n";
  }
  CAPTURE(token);
  ServerProcess p(spec);
  const int port = p.require_ready();
  INFO(p.output());
  CHECK(p.output().find(token) == std::string::npos);  // never logged
  const std::string host = "127.0.0.1:" + std::to_string(port);

  auto none = exchange(port, "POST", "/api/chat", with_host(host), kChat);
  CHECK(none->status == 401);
  auto wrong = exchange(port, "POST", "/api/chat",
                        with_host(host, {{"Authorization", "Bearer dotenv-loses"}}), kChat);
  CHECK(wrong->status == 401);
  auto ok = exchange(port, "POST", "/api/chat",
                     with_host(host, {{"Authorization", "Bearer " + token}}), kChat);
  INFO(ok->summary());
  check_well_formed_stream(*ok);
  auto health = exchange(port, "GET", "/health", with_host(host));
  CHECK(health->status == 200);
  check_exits_on_sigterm(p);
}

TEST_CASE("security: agentsmithy-server without AGENTSMITHY_TOKEN needs no token") {
  ServerProcess p({{"--port", "0"}, {}, "", false});
  const int port = p.require_ready();
  INFO(p.output());
  auto ok =
      exchange(port, "POST", "/api/chat", with_host("localhost:" + std::to_string(port)), kChat);
  INFO(ok->summary());
  check_well_formed_stream(*ok);
  check_exits_on_sigterm(p);
}

// ---------------------------------------------------------------------------
// CORS
// ---------------------------------------------------------------------------

TEST_CASE("security: CORS preflight for a listed origin; 403 for others") {
  agentsmithy::Options o = test_options();
  const std::string listed = "https://app.example.com";
  o.cors_origins = {listed, "http://localhost:3000"};
  bool with_token = false;
  SUBCASE("without a token") {}
  SUBCASE("with a token: the preflight carries none and still succeeds") {
    with_token = true;
    o.auth_token = "tok";
  }
  CAPTURE(with_token);
  CountingServer rs(o);
  const std::string host = "127.0.0.1:" + std::to_string(rs.port());
  // A preflight for a POST with these headers, from `origin`.
  const auto preflight = [&](const std::string& origin) {
    return exchange(
        rs.port(), "OPTIONS", "/api/chat",
        with_host(host, {{"Access-Control-Request-Method", "POST"},
                         {"Access-Control-Request-Headers", "content-type, authorization"},
                         {"Origin", origin}}));
  };

  // The listed origin: 204 with what the browser needs.
  auto pre = preflight(listed);
  {
    INFO(pre->summary());
    CHECK(pre->status == 204);
    CHECK(pre->header("access-control-allow-origin") == listed);
    CHECK(pre->header("access-control-allow-methods").find("POST") != std::string::npos);
    const std::string allow_headers = lower(pre->header("access-control-allow-headers"));
    CHECK(allow_headers.find("content-type") != std::string::npos);
    CHECK(allow_headers.find("authorization") != std::string::npos);
    CHECK(lower(pre->header("vary")).find("origin") != std::string::npos);
    CHECK(pre->header("access-control-allow-origin") != "*");
  }

  // An unlisted origin: refused, with no CORS headers.
  for (const std::string origin : {"https://evil.example.com", "https://app.example.com.evil.com",
                                   "http://app.example.com", "null"}) {
    CAPTURE(origin);
    auto bad = preflight(origin);
    INFO(bad->summary());
    CHECK(bad->status == 403);
    CHECK_FALSE(has_cors_headers(*bad));
  }

  // The actual requests: the listed origin may read the answer (streaming and
  // not), an unlisted one gets no CORS headers (the browser hides the answer).
  Headers auth;
  if (with_token) auth = {{"Authorization", "Bearer tok"}};
  Headers from_listed = with_host(host, auth);
  from_listed.emplace_back("Origin", listed);
  auto stream = exchange(rs.port(), "POST", "/api/chat", from_listed, kChat);
  {
    INFO(stream->summary());
    check_well_formed_stream(*stream);
    CHECK(stream->header("access-control-allow-origin") == listed);
    CHECK(lower(stream->header("vary")).find("origin") != std::string::npos);
  }
  auto collected = exchange(rs.port(), "POST", "/api/chat", from_listed,
                            R"({"messages":[{"role":"user","content":"hi"}],"stream":false})");
  {
    INFO(collected->summary());
    CHECK(collected->status == 200);
    CHECK(collected->header("access-control-allow-origin") == listed);
  }
  auto health = exchange(rs.port(), "GET", "/health", from_listed);
  CHECK(health->header("access-control-allow-origin") == listed);

  Headers from_evil = with_host(host, auth);
  from_evil.emplace_back("Origin", "https://evil.example.com");
  auto evil = exchange(rs.port(), "POST", "/api/chat", from_evil, kChat);
  {
    INFO(evil->summary());
    CHECK_FALSE(has_cors_headers(*evil));
  }
}

TEST_CASE("security: no CORS headers by default") {
  CountingServer rs;
  CHECK(agentsmithy::Options{}.cors_origins.empty());
  const std::string host = "127.0.0.1:" + std::to_string(rs.port());
  const Headers origin = with_host(
      host, {{"Origin", "https://app.example.com"}, {"Access-Control-Request-Method", "POST"}});

  auto pre = exchange(rs.port(), "OPTIONS", "/api/chat", origin);
  {
    INFO(pre->summary());
    CHECK(pre->status != 200);
    CHECK(pre->status != 204);
    CHECK_FALSE(has_cors_headers(*pre));
  }
  auto stream = exchange(rs.port(), "POST", "/api/chat", origin, kChat);
  {
    INFO(stream->summary());
    check_well_formed_stream(*stream);
    CHECK_FALSE(has_cors_headers(*stream));
  }
  auto collected = exchange(rs.port(), "POST", "/api/chat", origin,
                            R"({"messages":[{"role":"user","content":"hi"}],"stream":false})");
  CHECK(collected->status == 200);
  CHECK_FALSE(has_cors_headers(*collected));
  auto health = exchange(rs.port(), "GET", "/health", origin);
  CHECK(health->status == 200);
  CHECK_FALSE(has_cors_headers(*health));
  auto bad = exchange(rs.port(), "POST", "/api/chat", origin, "{not json");
  CHECK(bad->status == 400);
  CHECK_FALSE(has_cors_headers(*bad));
}
