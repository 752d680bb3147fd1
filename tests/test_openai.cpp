// openai_generator (issue 9): URL validation, the SSE parser and the chunk
// mapper on their own, then end to end through a server in front of the
// scripted upstream (tests/upstream.hpp): each provider's wire format, every
// failure as one error event, and the upstream connection closed within
// 100 ms of a cancellation in every phase.
#include "support.hpp"
#include "upstream.hpp"

#include <sys/resource.h>

using namespace test;
using agentsmithy::OpenAIOptions;
using Framing = ScriptedUpstream::Framing;
using Conn = ScriptedUpstream::Conn;

namespace {

const std::string kKey = "sk-test-SECRET-0123456789abcdef";

// A server whose generator is openai_generator(options).
std::unique_ptr<RunningServer> proxy_server(OpenAIOptions options,
                                            agentsmithy::Options o = test_options()) {
  auto gen = agentsmithy::openai_generator(std::move(options));
  return std::make_unique<RunningServer>(
      o, [gen](agentsmithy::Server& s) { s.chat_service().set_generator(gen); });
}
OpenAIOptions options_for(const ScriptedUpstream& up) {
  OpenAIOptions o;
  o.base_url = up.url();
  o.api_key = kKey;
  o.model = "test-model";
  o.connect_timeout = 2000ms;
  o.read_timeout = 3000ms;
  return o;
}

// Options for `hang`, an upstream whose connects hang (a full backlog).
OpenAIOptions hanging_connect_options(const ScriptedUpstream& hang, milliseconds connect_timeout) {
  OpenAIOptions o;
  o.base_url = hang.url();
  o.connect_timeout = connect_timeout;
  return o;
}

std::unique_ptr<RawClient> chat(RunningServer& srv, const json& body = chat_body("hi")) {
  auto c = std::make_unique<RawClient>(srv.port());
  c->post_chat(body);
  c->read_to_eof(10000ms);
  return c;
}

// Streams `answer` (SSE body text) as one write per call of `write`.
ScriptedUpstream::Script replay(std::string answer, bool bytewise = false,
                                Framing framing = Framing::chunked) {
  return [answer, bytewise, framing](Conn& c) {
    c.head(200, "text/event-stream", framing);
    if (bytewise) {
      c.body_bytewise(answer);
    } else {
      c.body(answer);
    }
    c.end();
  };
}

std::string basic_answer() {
  return sse(chunk_json({{"role", "assistant"}, {"content", ""}})) + sse_content("Hel") +
         sse_content("lo") + sse_finish("stop") + sse_usage(5, 2) + kSseDone;
}

// No event, no log line mentions the key.
void check_no_key(const RawClient& c, const RunningServer& srv) {
  CHECK(c.body.find(kKey) == std::string::npos);
  CHECK(srv.logs->text().find(kKey) == std::string::npos);
}

// Exactly one error, then done; returns the error's text.
std::string single_error(const RawClient& c) {
  check_well_formed_stream(c);
  INFO(c.summary());
  CHECK(c.count("error") == 1);
  REQUIRE(c.events.size() >= 2);
  const json& e = c.events[c.events.size() - 2];
  CHECK(e.value("type", std::string()) == "error");
  return e.value("error", std::string());
}

// A failure is an error event, and the server then serves the next request.
// The machine-readable code of the stream's error event.
std::string error_code(const RawClient& c) {
  for (const auto& e : c.events)
    if (e.value("type", std::string()) == "error") return e.value("code", std::string());
  return {};
}

void check_failure(ScriptedUpstream::Script script, const std::string& needle,
                   const std::string& code, std::function<void(OpenAIOptions&)> tweak = {}) {
  ScriptedUpstream up(std::move(script));
  ScriptedUpstream good(replay(basic_answer()));
  auto o = options_for(up);
  if (tweak) tweak(o);
  auto srv = proxy_server(o);
  auto c = chat(*srv);
  const std::string error = single_error(*c);
  INFO("error: " << error);
  CHECK(error.find(needle) != std::string::npos);
  CHECK(error_code(*c) == code);
  check_no_key(*c, *srv);
  auto again = chat(*srv);  // the same generator on a broken upstream fails again, cleanly
  CHECK(again->saw_done.load());
  srv->chat().set_generator(agentsmithy::openai_generator(options_for(good)));
  auto ok = chat(*srv);
  check_well_formed_stream(*ok);
  CHECK(ok->joined_chat() == "Hello");
}

std::vector<agentsmithy::detail::SseEvent> parse_all(const std::vector<std::string>& pieces) {
  agentsmithy::detail::SseParser p;
  std::vector<agentsmithy::detail::SseEvent> out;
  for (const auto& s : pieces)
    p.feed(s, [&](const agentsmithy::detail::SseEvent& e) {
      out.push_back(e);
      return true;
    });
  return out;
}

std::vector<json> map_all(const std::vector<std::string>& datas, bool eof = false,
                          std::string* error = nullptr) {
  agentsmithy::detail::ChunkMapper m;
  std::vector<json> out;
  for (const auto& d : datas) {
    const auto step = m.on_data(d, out);
    if (step == agentsmithy::detail::ChunkMapper::Step::error && error) *error = m.error();
    if (step != agentsmithy::detail::ChunkMapper::Step::more) return out;
  }
  if (eof) {
    if (m.on_eof(out) == agentsmithy::detail::ChunkMapper::Step::error && error) *error = m.error();
  }
  return out;
}
std::vector<std::string> types_of(const std::vector<json>& events) {
  std::vector<std::string> t;
  for (const auto& e : events) t.push_back(e.value("type", std::string()));
  return t;
}

// Whether a TCP socket of this host is in SYN_SENT towards 127.0.0.1:port.
bool syn_sent_to(int port) {
  std::ifstream in("/proc/net/tcp");
  std::string line;
  char want[16];
  std::snprintf(want, sizeof want, "0100007F:%04X", port);
  while (std::getline(in, line)) {
    std::istringstream f(line);
    std::string sl, local, remote, state;
    f >> sl >> local >> remote >> state;
    if (remote == want && state == "02") return true;
  }
  return false;
}

}  // namespace

// ---------------------------------------------------------------------------
// base_url validation
// ---------------------------------------------------------------------------

TEST_CASE("openai: base_url is validated at once and std::invalid_argument names the problem") {
  const auto why = [](const std::string& url) -> std::string {
    OpenAIOptions o;
    o.base_url = url;
    try {
      agentsmithy::openai_generator(o);
    } catch (const std::invalid_argument& e) {
      return e.what();
    }
    return "<accepted>";
  };
  CHECK(why("").find("empty") != std::string::npos);
  CHECK(why("127.0.0.1:8080/v1").find("scheme") != std::string::npos);
  CHECK(why("ftp://host/v1").find("ftp") != std::string::npos);
  CHECK(why("http:///v1").find("no host") != std::string::npos);
  CHECK(why("http://host:/v1").find("empty port") != std::string::npos);
  CHECK(why("http://host:99999/v1").find("range") != std::string::npos);
  CHECK(why("http://host:8a/v1").find("invalid port") != std::string::npos);
  CHECK(why("http://ho st/v1").find("space") != std::string::npos);
  CHECK(why("http://host/v1?x=1").find("query") != std::string::npos);
  const std::string creds = why("http://user:hunter2@host/v1");
  CHECK(creds.find("credentials") != std::string::npos);
  CHECK(creds.find("hunter2") == std::string::npos);
  CHECK(why("http://[::1/v1").find("IPv6") != std::string::npos);
  CHECK(why("http://127.0.0.1:8080/v1") == "<accepted>");
  CHECK(why("https://api.openai.com/v1") == "<accepted>");
  CHECK(why("HTTP://localhost:11434/v1/") == "<accepted>");
  CHECK(why("http://[::1]:8000") == "<accepted>");

  const auto u = agentsmithy::detail::parse_base_url("https://api.openai.com/v1/");
  CHECK(u.tls);
  CHECK(u.host == "api.openai.com");
  CHECK(u.port == 443);
  CHECK(u.path == "/v1/chat/completions");
  CHECK(agentsmithy::detail::parse_base_url("http://h:8080").path == "/chat/completions");
  CHECK(agentsmithy::detail::parse_base_url("http://[::1]:8000/v1").host == "::1");

  OpenAIOptions o;
  o.base_url = "http://127.0.0.1:1/v1";
  o.read_timeout = 0ms;
  CHECK_THROWS_AS(agentsmithy::openai_generator(o), std::invalid_argument);
}

// ---------------------------------------------------------------------------
// The SSE parser, without sockets
// ---------------------------------------------------------------------------

TEST_CASE("openai: SSE parser takes LF, CRLF and lone CR, split anywhere") {
  const std::string stream =
      "\xEF\xBB\xBF: comment\r\ndata: {\"a\":\"\xC3\xA9\"}\r\n\r\nevent: x\rid: 7\rdata:b1\rdata:  "
      "b2\r\r"
      "retry: 5\nunknown\ndata\n\ndata: c\n\ndata: cut off";
  const auto whole = parse_all({stream});
  REQUIRE(whole.size() == 4);
  CHECK(whole[0].data == "{\"a\":\"\xC3\xA9\"}");
  CHECK(whole[1].data == "b1\n b2");
  CHECK(whole[2].data.empty());  // "data" with no colon: an empty data line
  CHECK(whole[3].data == "c");
  for (std::size_t cut = 0; cut <= stream.size(); ++cut) {
    const auto split = parse_all({stream.substr(0, cut), stream.substr(cut)});
    INFO("cut at " << cut);
    REQUIRE(split.size() == whole.size());
    for (std::size_t i = 0; i < split.size(); ++i) CHECK(split[i].data == whole[i].data);
  }
  std::vector<std::string> bytes;
  for (const char ch : stream) bytes.emplace_back(1, ch);
  CHECK(parse_all(bytes).size() == 4);
  const auto err = parse_all({"error: {\"message\":\"boom\"}\n\n"});
  REQUIRE(err.size() == 1);
  CHECK(err[0].error == "{\"message\":\"boom\"}");
}

// ---------------------------------------------------------------------------
// The chunk mapper, without sockets
// ---------------------------------------------------------------------------

TEST_CASE("openai: mapper emits chat_start, chat per non-empty delta, chat_end with usage") {
  const auto ev = map_all(
      {chunk_json({{"role", "assistant"}, {"content", nullptr}}), chunk_json({{"content", ""}}),
       chunk_json({{"content", "a"}}), chunk_json({{"content", "b"}}),
       chunk_json(json::object(), "length"),
       json{{"choices", json::array()}, {"usage", {{"total_tokens", 3}}}}.dump(), "[DONE]"});
  CHECK(types_of(ev) == std::vector<std::string>{"chat_start", "chat", "chat", "chat_end"});
  CHECK(ev[1]["content"] == "a");
  CHECK(ev[3]["finish_reason"] == "length");
  CHECK(ev[3]["usage"]["total_tokens"] == 3);
}

TEST_CASE("openai: mapper reads reasoning_content or reasoning, never the same text twice") {
  const auto ev =
      map_all({chunk_json({{"reasoning_content", "think"}, {"reasoning", "think"}}),
               chunk_json({{"reasoning", " more"}}), chunk_json({{"content", "answer"}}),
               sse_finish().substr(6, sse_finish().size() - 8)},
              true);
  CHECK(types_of(ev) == std::vector<std::string>{"chat_start", "reasoning_start", "reasoning",
                                                 "reasoning", "reasoning_end", "chat", "chat_end"});
  CHECK(ev[2]["content"] == "think");
  CHECK(ev[3]["content"] == " more");
}

TEST_CASE("openai: mapper joins split tool calls, parallel ones and Ollama's reused index") {
  const auto tc = [](json call) { return chunk_json({{"tool_calls", json::array({call})}}); };
  const auto ev = map_all(
      {tc({{"index", 0},
           {"id", "call_a"},
           {"type", "function"},
           {"function", {{"name", "get_weather"}, {"arguments", ""}}}}),
       tc({{"index", 1},
           {"id", "call_b"},
           {"function", {{"name", "get_time"}, {"arguments", "{\"tz\""}}}}),
       tc({{"index", 0}, {"function", {{"arguments", "{\"city\":"}}}}),
       tc({{"index", 0}, {"function", {{"arguments", "\"Par\\u00eds\"}"}}}}),
       tc({{"index", 1}, {"function", {{"arguments", ":\"UTC\"}"}}}}),
       tc({{"index", 0}, {"id", "call_c"}, {"function", {{"name", "noop"}, {"arguments", "{}"}}}}),
       chunk_json(json::object(), "tool_calls"), "[DONE]"});
  REQUIRE(types_of(ev) == std::vector<std::string>{"chat_start", "tool_call", "tool_call",
                                                   "tool_call", "chat_end"});
  CHECK(ev[1]["id"] == "call_a");
  CHECK(ev[1]["name"] == "get_weather");
  CHECK(ev[1]["args"] == json{{"city", "París"}});
  CHECK(ev[2]["id"] == "call_b");
  CHECK(ev[2]["args"] == json{{"tz", "UTC"}});
  CHECK(ev[3]["id"] == "call_c");
  CHECK(ev[3]["args"] == json::object());
  CHECK(ev[4]["finish_reason"] == "tool_calls");
}

TEST_CASE("openai: mapper turns every provider's error shape into its message") {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {R"({"error":{"message":"The server had an error","type":"server_error"}})",
       "The server had an error"},
      {R"({"error":{"code":500,"message":"llama failed","type":"server_error"}})", "llama failed"},
      {R"({"object":"error","message":"vllm flat","type":"BadRequestError","code":400})",
       "vllm flat"},
      {R"({"error":"plain text"})", "plain text"},
      {R"({"choices":[{"index":0,"delta":{},"finish_reason":"error","error":{"message":"router"}}]})",
       "router"},
  };
  for (const auto& item : cases) {
    const std::string& data = item.first;
    const std::string& message = item.second;
    std::string error;
    const auto ev = map_all({chunk_json({{"content", "x"}}), data, "[DONE]"}, false, &error);
    INFO(data);
    CHECK(error.find(message) != std::string::npos);
    CHECK(types_of(ev) == std::vector<std::string>{"chat_start", "chat"});
  }
  std::string error;
  map_all({"{not json"}, false, &error);
  CHECK(error.find("invalid chunk") != std::string::npos);
  error.clear();
  map_all({chunk_json({{"content", "x"}})}, true, &error);
  CHECK(error.find("before it finished") != std::string::npos);
  error.clear();
  const auto ev =
      map_all({chunk_json({{"content", "x"}}), chunk_json(json::object(), "stop")}, true, &error);
  CHECK(error.empty());
  CHECK(types_of(ev).back() == "chat_end");
}

// ---------------------------------------------------------------------------
// End to end: wire formats
// ---------------------------------------------------------------------------

TEST_CASE(
    "openai: request carries model, messages in order, stream, include_usage, extra_body, key") {
  ScriptedUpstream up(replay(basic_answer()));
  auto o = options_for(up);
  o.system_prompt = "Be brief.";
  o.extra_body = {{"temperature", 0.25}, {"stream_options", {{"include_obfuscation", false}}}};
  auto srv = proxy_server(o);
  json body = {{"messages", json::array({{{"role", "user"}, {"content", "one"}},
                                         {{"role", "assistant"}, {"content", "two"}},
                                         {{"role", "user"}, {"content", "three"}}})}};
  auto c = chat(*srv, body);
  check_well_formed_stream(*c);
  REQUIRE(up.requests() == 1);
  const auto req = up.request(0);
  CHECK(req.method == "POST");
  CHECK(req.path == "/v1/chat/completions");
  CHECK(req.header("authorization") == "Bearer " + kKey);
  CHECK(req.header("content-type") == "application/json");
  const json sent = req.body_json();
  INFO(sent.dump());
  CHECK(sent["model"] == "test-model");
  CHECK(sent["stream"] == true);
  CHECK(sent["stream_options"]["include_usage"] == true);
  CHECK(sent["stream_options"]["include_obfuscation"] == false);
  CHECK(sent["temperature"] == 0.25);
  REQUIRE(sent["messages"].size() == 4);
  CHECK(sent["messages"][0] == json{{"role", "system"}, {"content", "Be brief."}});
  CHECK(sent["messages"][1]["content"] == "one");
  CHECK(sent["messages"][2]["role"] == "assistant");
  CHECK(sent["messages"][3]["content"] == "three");
  check_no_key(*c, *srv);

  // No model, no key, a system message already there: none added.
  o.model.clear();
  o.api_key.clear();
  srv->chat().set_generator(agentsmithy::openai_generator(o));
  body["messages"].insert(body["messages"].begin(),
                          json::object({{"role", "system"}, {"content", "mine"}}));
  chat(*srv, body);
  REQUIRE(up.requests() == 2);
  const auto second = up.request(1);
  CHECK_FALSE(second.has_header("authorization"));
  CHECK_FALSE(second.body_json().contains("model"));
  CHECK(second.body_json()["messages"].size() == 4);
  CHECK(second.body_json()["messages"][0]["content"] == "mine");
}

TEST_CASE("openai: OpenAI, llama-server and Ollama wire formats map onto the same events") {
  const std::string openai = basic_answer();
  const std::string llama = sse(chunk_json({{"role", "assistant"}, {"content", nullptr}}, nullptr,
                                           {{"timings", {{"n", 1}}}})) +
                            sse_content("Hel") + sse_content("lo") +
                            sse(chunk_json(json::object(), "stop")) + sse_usage(5, 2) + kSseDone;
  const std::string ollama = sse(chunk_json({{"role", "assistant"}, {"content", "Hel"}})) +
                             sse_content("lo") + sse_content("") + sse_finish("stop") +
                             sse_usage(5, 2) + kSseDone;
  for (const auto& answer : {openai, llama, ollama}) {
    for (const bool bytewise : {false, true}) {
      for (const Framing framing : {Framing::chunked, Framing::close}) {
        ScriptedUpstream up(replay(answer, bytewise, framing));
        auto srv = proxy_server(options_for(up));
        auto c = chat(*srv);
        INFO("bytewise=" << bytewise << " framing=" << static_cast<int>(framing));
        check_well_formed_stream(*c);
        CHECK(c->types() ==
              std::vector<std::string>{"chat_start", "chat", "chat", "chat_end", "done"});
        CHECK(c->joined_chat() == "Hello");
        REQUIRE(c->count("chat_end") == 1);
        const json end = c->events[3];
        CHECK(end["finish_reason"] == "stop");
        CHECK(end["usage"]["total_tokens"] == 7);
      }
    }
  }
}

TEST_CASE("openai: CRLF, lone CR, comments, no space after colon, split UTF-8, no [DONE]") {
  std::string answer = ": OPENROUTER PROCESSING\r\n\r\n" + std::string("data:") +
                       chunk_json({{"content", "caf\xC3\xA9 "}}) + "\r\n\r\n" + ": keep-alive\r" +
                       "data: " + chunk_json({{"content", "ok"}}) + "\r\r" +
                       "event: message\nid: 3\n" + sse_finish("stop");  // then EOF, no [DONE]
  ScriptedUpstream up([answer](Conn& c) {
    c.head();
    c.body_bytewise(answer);
    c.end();
  });
  auto srv = proxy_server(options_for(up));
  auto c = chat(*srv);
  check_well_formed_stream(*c);
  CHECK(c->joined_chat() == "caf\xC3\xA9 ok");
  CHECK(c->count("chat_end") == 1);
}

TEST_CASE("openai: reasoning (both field names) and tool calls end to end; stream:false joins") {
  const std::string answer =
      sse(chunk_json({{"reasoning_content", "Let me"}, {"reasoning", "Let me"}})) +
      sse(chunk_json({{"reasoning", " think"}})) + sse_content("Sure.") +
      sse(chunk_json({{"tool_calls",
                       json::array({{{"index", 0},
                                     {"id", "c1"},
                                     {"function", {{"name", "f"}, {"arguments", "{\"x\""}}}}})}})) +
      sse(chunk_json(
          {{"tool_calls", json::array({{{"index", 0}, {"function", {{"arguments", ":1}"}}}}})}})) +
      sse_finish("tool_calls") + kSseDone;
  ScriptedUpstream up(replay(answer));
  auto srv = proxy_server(options_for(up));
  auto c = chat(*srv);
  check_well_formed_stream(*c);
  CHECK(c->types() == std::vector<std::string>{"chat_start", "reasoning_start", "reasoning",
                                               "reasoning", "reasoning_end", "chat", "tool_call",
                                               "chat_end", "done"});
  CHECK(c->events[6]["args"] == json{{"x", 1}});
  CHECK(c->events[6]["name"] == "f");
  CHECK(c->events[6]["id"] == "c1");

  auto nc = chat(*srv, chat_body("hi", json::object(), false));
  INFO(nc->summary());
  CHECK(nc->status == 200);
  CHECK(nc->body_json()["content"] == "Sure.");
}

TEST_CASE("openai: HTTPS with a self-signed certificate through ca_cert_path") {
  SelfSignedCert cert;
  REQUIRE(cert.ok);
  httplib::SSLServer tls(cert.cert.c_str(), cert.key.c_str());
  REQUIRE(tls.is_valid());
  tls.Post("/v1/chat/completions", [](const httplib::Request&, httplib::Response& res) {
    res.set_chunked_content_provider("text/event-stream", [](size_t, httplib::DataSink& sink) {
      const std::string a = basic_answer();
      sink.write(a.data(), a.size());
      sink.done();
      return true;
    });
  });
  const int port = tls.bind_to_any_port("127.0.0.1");
  std::thread t([&] { tls.listen_after_bind(); });
  REQUIRE(wait_until([&] { return tls.is_running(); }));
  OpenAIOptions o;
  o.base_url = "https://127.0.0.1:" + std::to_string(port) + "/v1";
  o.api_key = kKey;
  o.ca_cert_path = cert.cert;
  auto srv = proxy_server(o);
  auto c = chat(*srv);
  check_well_formed_stream(*c);
  CHECK(c->joined_chat() == "Hello");

  // Without the CA: a verification error that says what to do.
  o.ca_cert_path.clear();
  srv->chat().set_generator(agentsmithy::openai_generator(o));
  auto bad = chat(*srv);
  const std::string error = single_error(*bad);
  CHECK(error.find("certificate") != std::string::npos);
  CHECK(error.find("ca_cert_path") != std::string::npos);
  tls.stop();
  t.join();
}

// ---------------------------------------------------------------------------
// End to end: failures
// ---------------------------------------------------------------------------

TEST_CASE("openai: connection refused, DNS failure and TLS failure are one error each") {
  int port = 0;
  const int fd = bind_listener(0, &port);
  ::close(fd);  // nothing listens there now
  OpenAIOptions o;
  o.base_url = "http://127.0.0.1:" + std::to_string(port) + "/v1";
  o.api_key = kKey;
  auto srv = proxy_server(o);
  CHECK(single_error(*chat(*srv)).find("Cannot connect") != std::string::npos);
  o.base_url = "http://no-such-host.invalid/v1";
  srv->chat().set_generator(agentsmithy::openai_generator(o));
  CHECK(single_error(*chat(*srv)).find("resolve") != std::string::npos);
  ScriptedUpstream plain(replay(basic_answer()));
  o.base_url = "https://127.0.0.1:" + std::to_string(plain.port()) + "/v1";
  o.connect_timeout = 500ms;  // the plain upstream waits for a request that never comes
  srv->chat().set_generator(agentsmithy::openai_generator(o));
  CHECK(single_error(*chat(*srv)).find("TLS") != std::string::npos);
  CHECK(srv->logs->text().find(kKey) == std::string::npos);
}

TEST_CASE("openai: HTTP error statuses carry the status and each provider's message") {
  const auto status = [](int code, std::string body) {
    return [code, body](Conn& c) { c.head(code, "application/json", Framing::length, body); };
  };
  check_failure(
      status(401,
             R"({"error":{"message":"Incorrect API key provided: )" + kKey +
                 R"(","type":"invalid_request_error","param":null,"code":"invalid_api_key"}})"),
      "HTTP 401: Incorrect API key provided: ***", "upstream_status");
  check_failure(
      status(
          404,
          R"({"error":{"message":"model \"x\" not found","type":"not_found_error","param":null,"code":null}})"),
      "HTTP 404: model \"x\" not found", "upstream_status");
  check_failure(
      status(500, R"({"error":{"code":500,"message":"llama broke","type":"server_error"}})"),
      "HTTP 500: llama broke", "upstream_status");
  check_failure(
      status(
          400,
          R"({"object":"error","message":"vllm says no","type":"BadRequestError","param":null,"code":400})"),
      "HTTP 400: vllm says no", "upstream_status");
  check_failure(
      [](Conn& c) {
        c.head(503, "text/plain", Framing::close);
        c.body("overloaded\n");
      },
      "HTTP 503: overloaded", "upstream_status");
}

TEST_CASE("openai: errors mid-stream, an invalid chunk, a close before the finish, non-SSE") {
  const auto stream = [](std::string answer) { return replay(std::move(answer)); };
  check_failure(
      stream(
          sse_content("a") +
          sse(R"({"error":{"message":"The server had an error while processing your request.","type":"server_error"}})")),
      "The server had an error", "upstream_error");
  check_failure(
      stream(sse_content("a") +
             sse(R"({"error":{"code":500,"message":"llama mid","type":"server_error"}})")),
      "llama mid", "upstream_error");
  check_failure(stream(sse_content("a") + "error: {\"code\":500,\"message\":\"old llama\"}\n\n"),
                "old llama", "upstream_error");
  check_failure(stream(sse_content("a") +
                       sse(R"({"object":"error","message":"vllm mid","code":500})") + kSseDone),
                "vllm mid", "upstream_error");
  check_failure(stream(sse_content("a") + sse("{\"choices\":[{\"delta\":")), "invalid chunk",
                "upstream_protocol");
  check_failure(stream(sse_content("a")), "before it finished", "upstream_protocol");
  check_failure(
      [](Conn& c) { c.head(200, "application/json", Framing::length, R"({"choices":[]})"); },
      "not an event stream", "upstream_protocol");
}

TEST_CASE("openai: read timeout while waiting for headers and when stalled mid-stream") {
  const auto tweak = [](OpenAIOptions& o) { o.read_timeout = 300ms; };
  check_failure([](Conn& c) { c.wait_closed(); }, "no response within 300 ms", "upstream_timeout",
                tweak);
  check_failure(
      [](Conn& c) {
        c.head();
        c.body(sse_content("a"));
        c.wait_closed();
      },
      "nothing received for 300 ms", "upstream_timeout", tweak);
}

TEST_CASE("openai: connect timeout bounds a connect that hangs") {
  ScriptedUpstream hang(nullptr, /*backlog_only=*/true);
  auto srv = proxy_server(hanging_connect_options(hang, 300ms));
  const auto t0 = Clock::now();
  auto c = chat(*srv);
  const double ms = ms_since(t0);
  note("connect timeout 300 ms: error after " + std::to_string(ms) + " ms");
  CHECK(single_error(*c).find("Timed out connecting") != std::string::npos);
  CHECK(ms >= 250);
  CHECK(ms < 1500);
}

// ---------------------------------------------------------------------------
// Cancellation: the upstream sees its connection closed within 100 ms
// ---------------------------------------------------------------------------

namespace {

enum class UpstreamPhase { headers, streaming, stalled };
enum class Cancel { client_gone, shutdown, force };

ScriptedUpstream::Script phase_script(UpstreamPhase phase) {
  return [phase](Conn& c) {
    if (phase == UpstreamPhase::headers) {
      c.wait_closed();
      return;
    }
    c.head();
    c.body(sse_content("first"));
    if (phase == UpstreamPhase::streaming) {
      c.drip(sse_content("x"), 5ms);
    } else {
      c.wait_closed();
    }
  };
}

void check_cancel(UpstreamPhase phase, Cancel how) {
  ScriptedUpstream up(phase_script(phase));
  auto srv = proxy_server(options_for(up));
  RawClient c(srv->port());
  c.post_chat(chat_body("hi"));
  REQUIRE(up.wait_requests(1));
  if (phase != UpstreamPhase::headers)
    REQUIRE(c.read_count("chat", phase == UpstreamPhase::streaming ? 3 : 1));
  if (how != Cancel::client_gone) c.start_background_read(5000ms);  // stamps done as it comes
  const auto t0 = Clock::now();
  switch (how) {
    case Cancel::client_gone: c.close(); break;
    case Cancel::shutdown: srv->server().shutdown(); break;
    case Cancel::force: srv->server().force_shutdown(); break;
  }
  REQUIRE(up.wait_closed(0, 2000ms));
  const double closed_ms = ms_between(t0, *up.closed_at(0));
  note("cancel phase " + std::to_string(static_cast<int>(phase)) + " by " +
       std::to_string(static_cast<int>(how)) + ": upstream closed after " +
       std::to_string(closed_ms) + " ms");
  CHECK(closed_ms <= 100);
  if (how != Cancel::client_gone) c.join_background();
  if (how == Cancel::shutdown) {
    check_ended_by_shutdown(c);
    note("  done after " + std::to_string(ms_between(t0, c.done_at)) + " ms");
    CHECK(ms_between(t0, c.done_at) <= 50);
  }
  if (how != Cancel::client_gone) {
    REQUIRE(srv->wait_returned(2000ms));
    CHECK(ms_between(t0, srv->listen_returned_at()) <= 500);
  } else {
    CHECK(wait_until([&] { return srv->chat().active_streams() == 0; }, 1000ms));
  }
}

}  // namespace

TEST_CASE("openai cancel: client gone, in each phase") {
  for (const UpstreamPhase p :
       {UpstreamPhase::headers, UpstreamPhase::streaming, UpstreamPhase::stalled})
    check_cancel(p, Cancel::client_gone);
}
TEST_CASE("openai cancel: shutdown, in each phase; final events within 50 ms") {
  for (const UpstreamPhase p :
       {UpstreamPhase::headers, UpstreamPhase::streaming, UpstreamPhase::stalled})
    check_cancel(p, Cancel::shutdown);
}
TEST_CASE("openai cancel: forced shutdown, in each phase") {
  for (const UpstreamPhase p :
       {UpstreamPhase::headers, UpstreamPhase::streaming, UpstreamPhase::stalled})
    check_cancel(p, Cancel::force);
}

TEST_CASE("openai cancel: grace deadline of a non-streaming request") {
  ScriptedUpstream up(phase_script(UpstreamPhase::stalled));
  auto o = test_options();
  o.grace_period = 200ms;
  auto srv = proxy_server(options_for(up), o);
  RawClient c(srv->port());
  c.post_chat(chat_body("hi", json::object(), false));
  REQUIRE(up.wait_requests(1));
  REQUIRE(wait_until([&] { return up.connections() == 1; }));
  const auto t0 = Clock::now();
  srv->server().shutdown();
  REQUIRE(up.wait_closed(0, 2000ms));
  const double closed_ms = ms_between(t0, *up.closed_at(0));
  note("stream:false at shutdown: upstream closed after " + std::to_string(closed_ms) + " ms");
  CHECK(closed_ms <= 250);  // at the latest when the 200 ms grace period ends
  REQUIRE(c.read_to_eof(2000ms));
  CHECK(c.status == 503);
}

TEST_CASE("openai cancel: shutdown while still connecting is not delayed by connect_timeout") {
  ScriptedUpstream hang(nullptr, /*backlog_only=*/true);
  auto srv = proxy_server(hanging_connect_options(hang, 10000ms));
  RawClient c(srv->port());
  c.post_chat(chat_body("hi"));
  REQUIRE(c.read_headers());
  REQUIRE(wait_until([&] { return srv->chat().active_streams() == 1; }));
  // Cancel once the connect is under way: a socket in SYN_SENT to the port.
  REQUIRE(wait_until([&] { return syn_sent_to(hang.port()); }, 2000ms));
  const auto t0 = Clock::now();
  srv->server().shutdown();
  REQUIRE(c.read_to_eof(2000ms));
  check_ended_by_shutdown(c);
  const double done_ms = ms_between(t0, c.done_at);
  REQUIRE(srv->wait_returned(2000ms));
  const double returned_ms = ms_between(t0, srv->listen_returned_at());
  note("shutdown while connecting: done after " + std::to_string(done_ms) +
       " ms, listen() returned after " + std::to_string(returned_ms) + " ms");
  CHECK(done_ms <= 50);
  CHECK(returned_ms <= 500);
}

TEST_CASE("openai: many concurrent streams through one generator") {
  ScriptedUpstream up(replay(basic_answer(), true));
  auto srv = proxy_server(options_for(up));
  std::vector<std::unique_ptr<RawClient>> clients;
  for (int i = 0; i < 32; ++i) {
    clients.push_back(std::make_unique<RawClient>(srv->port()));
    clients.back()->post_chat(chat_body("hi"));
  }
  for (auto& c : clients) {
    REQUIRE(c->read_to_eof(10000ms));
    check_well_formed_stream(*c);
    CHECK(c->joined_chat() == "Hello");
  }
}

// ---------------------------------------------------------------------------
// One event-loop thread for every upstream stream
// ---------------------------------------------------------------------------

namespace {

// The calling thread's voluntary context switches so far: each time it blocked
// and was woken again.
long thread_wakes() {
  rusage u{};
  ::getrusage(RUSAGE_THREAD, &u);
  return u.ru_nvcsw;
}

int process_threads() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("Threads:", 0) == 0) return std::atoi(line.c_str() + 8);
  return -1;
}

// Threads of this process whose name (comm) is `name`.
int threads_named(const std::string& name) {
  int n = 0;
  if (DIR* dir = ::opendir("/proc/self/task")) {
    while (const dirent* e = ::readdir(dir)) {
      if (e->d_name[0] == '.') continue;
      std::ifstream comm(std::string("/proc/self/task/") + e->d_name + "/comm");
      std::string line;
      if (std::getline(comm, line) && line == name) ++n;
    }
    ::closedir(dir);
  }
  return n;
}

}  // namespace

TEST_CASE("openai: 200 concurrent streams; no thread per transfer, no generator wake per token") {
  constexpr int kStreams = 200;
  constexpr int kTokens = 50;
  ScriptedUpstream up([](Conn& c) {
    c.head();
    for (int i = 0; i < kTokens; ++i) {
      if (!c.body(sse_content("x")) || c.wait_closed(10ms)) return;  // a token every 10 ms
    }
    c.body(sse_finish("stop") + kSseDone);
    c.end();
  });
  // The generator, wrapped to count how often its thread was woken.
  const auto gen = agentsmithy::openai_generator(options_for(up));
  std::mutex mu;
  std::vector<long> wakes;
  const auto counted = [&](const agentsmithy::ChatRequest& r, agentsmithy::StreamWriter& out) {
    const long before = thread_wakes();
    gen(r, out);
    const long woken = thread_wakes() - before;
    std::lock_guard<std::mutex> lock(mu);
    wakes.push_back(woken);
  };
  const int threads_before = process_threads();
  const int workers_before = threads_named("as-worker");
  RunningServer srv(test_options(),
                    [&](agentsmithy::Server& s) { s.chat_service().set_generator(counted); });
  std::vector<std::unique_ptr<RawClient>> clients;
  for (int i = 0; i < kStreams; ++i) {
    clients.push_back(std::make_unique<RawClient>(srv.port()));
    clients.back()->post_chat(chat_body("hi"));
  }
  REQUIRE(up.wait_requests(kStreams, 10000ms));
  // Per stream: a generator thread in the server and a script thread in the
  // upstream; the transport adds one loop thread for all of them.
  const int rise = process_threads() - threads_before;
  // The server's workers: one per generator, plus the pool's slack (a
  // worker that blocks in a generator starts a thread for each task still
  // queued; idle ones exit after 2 s). Anything else is per transfer.
  const int workers = threads_named("as-worker") - workers_before;
  const int loops = threads_named("as-upstream");
  for (auto& c : clients) {
    REQUIRE(c->read_to_eof(20000ms));
    check_well_formed_stream(*c);
    CHECK(c->count("chat") == static_cast<std::size_t>(kTokens));
  }
  REQUIRE(wait_until(
      [&] {
        std::lock_guard<std::mutex> lock(mu);
        return wakes.size() == static_cast<std::size_t>(kStreams);
      },
      5000ms));
  std::sort(wakes.begin(), wakes.end());
  note("200 upstream streams x 50 tokens: threads +" + std::to_string(rise) + " (workers +" +
       std::to_string(workers) + ", upstream loops " + std::to_string(loops) + ")" +
       "; generator thread wakes median " + std::to_string(wakes[kStreams / 2]) + ", max " +
       std::to_string(wakes.back()));
  // (Workers of earlier tests' servers that exit meanwhile leave both
  // counts short by the same number.)
  CHECK(rise - workers <= kStreams + 32);
  CHECK(loops == 1);
  // A thread reading its own upstream socket is woken at least once a token.
  CHECK(wakes.back() <= kTokens / 5);
}

TEST_CASE("openai: a client that does not read pauses its own upstream, not the loop") {
  // The slow stream's upstream writes 16 KiB chunks without blocking; once the
  // path to our server has been full for 200 ms (no write went through), our
  // server has stopped reading that upstream. Then other streams must still
  // flow, and once the slow client reads, every byte must arrive.
  const std::string piece(16 * 1024, 'p');
  std::atomic<bool> stalled{false}, release{false};
  std::atomic<std::size_t> sent_pieces{0};
  ScriptedUpstream up([&](Conn& c) {
    if (c.request().body_json()["messages"][0]["content"] != "big") {
      replay(basic_answer())(c);
      return;
    }
    c.head();
    std::string frame = sse_content(piece);
    char size[32];
    std::snprintf(size, sizeof size, "%zx\r\n", frame.size());
    frame = size + frame + "\r\n";  // one chunk of the chunked body
    while (!release && sent_pieces < 16384) {
      std::string_view rest = frame;
      while (!rest.empty()) {
        const ssize_t n = ::send(c.fd(), rest.data(), rest.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n > 0) {
          rest.remove_prefix(static_cast<std::size_t>(n));
          continue;
        }
        if (n < 0 && errno != EAGAIN && errno != EINTR) return;
        pollfd p{c.fd(), POLLOUT, 0};
        if (::poll(&p, 1, 200) == 0) stalled = true;  // 200 ms and not a byte taken
        if (release && rest.size() == frame.size()) break;
      }
      if (rest.empty()) ++sent_pieces;
    }
    c.body(sse_finish("stop") + kSseDone);
    c.end();
  });
  auto o = test_options();
  o.write_timeout = 60000ms;  // the slow client is not dropped meanwhile
  auto srv = proxy_server(options_for(up), o);
  RawClient slow;
  REQUIRE(slow.connect_to(srv->port(), 4096));
  slow.post_chat(chat_body("big"));
  REQUIRE(wait_until([&] { return stalled.load(); }, 20000ms));
  for (int i = 0; i < 3; ++i) {
    const auto t0 = Clock::now();
    auto c = chat(*srv);
    check_well_formed_stream(*c);
    CHECK(c->joined_chat() == "Hello");
    CHECK(ms_since(t0) < 2000);  // a loop blocked in the slow client's send() would wait
  }
  release = true;
  REQUIRE(slow.read_to_eof(60000ms));
  check_well_formed_stream(slow);
  note("a client that did not read: its upstream paused, then " +
       std::to_string(sent_pieces.load() * piece.size() >> 20) + " MiB arrived whole");
  CHECK(slow.joined_chat().size() == sent_pieces.load() * piece.size());
  CHECK(slow.count("chat_end") == 1);
}
