// The HTTP protocol: SSE framing and headers, event rules, non-streaming mode,
// bad input, /health, heartbeats and the demo generator.
#include "support.hpp"

#include <regex>

using namespace test;
using agentsmithy::ChatRequest;
using agentsmithy::StreamWriter;

namespace {

// What a generator saw, shared with the test.
struct Seen {
  std::mutex mutex;
  int calls = 0;
  std::string request_dialog_id;
  std::string writer_dialog_id;
  json context;
  bool stream = true;
  std::vector<agentsmithy::Message> messages;
  std::vector<bool> results;  // return values of send()/chat()
  std::vector<std::string> notes;

  // Records a call: the request and the writer's dialog_id.
  void record(const ChatRequest& req, StreamWriter& out) {
    std::lock_guard<std::mutex> lock(mutex);
    ++calls;
    request_dialog_id = req.dialog_id;
    writer_dialog_id = out.dialog_id();
    context = req.context;
    stream = req.stream;
    messages = req.messages;
  }
};

RawClient& stream_request(RawClient& c, int port, const json& body) {
  REQUIRE(c.connect_to(port));
  REQUIRE(c.post_chat(body));
  c.read_response(10000ms);
  c.read_to_eof(2000ms);
  return c;
}

}  // namespace

TEST_CASE("stream: SSE headers, framing, dialog_id echoed on every event, done last") {
  auto seen = std::make_shared<Seen>();
  RunningServer rs(test_options(), [&](agentsmithy::Server& s) {
    s.chat_service().set_generator([seen](const ChatRequest& req, StreamWriter& out) {
      seen->record(req, out);
      const bool a = out.chat("Hello");
      const bool b = out.chat(", world");
      const bool c =
          out.send({{"type", "tool_call"}, {"name", "read_file"}, {"args", {{"path", "a.txt"}}}});
      std::lock_guard<std::mutex> lock(seen->mutex);
      seen->results = {a, b, c};
    });
  });
  REQUIRE(rs.ready());

  json body = chat_body("hi there", {{"file", "main.cpp"}});
  body["messages"] = json::array(
      {{{"role", "system"}, {"content", "be brief"}}, {{"role", "user"}, {"content", "hi there"}}});
  body["dialog_id"] = "dlg-123_x";
  RawClient c;
  stream_request(c, rs.port(), body);
  INFO(c.summary());

  CHECK(c.status == 200);
  CHECK(c.header("content-type").rfind("text/event-stream", 0) == 0);
  CHECK(lower(c.header("cache-control")).find("no-cache") != std::string::npos);
  CHECK(lower(c.header("x-accel-buffering")) == "no");
  CHECK(c.chunked);
  CHECK_FALSE(c.has_header("content-length"));
  check_well_formed_stream(c, "dlg-123_x");
  CHECK(c.eof);  // the connection closes after the stream

  REQUIRE(c.events.size() == 4);
  CHECK(c.events[0]["type"] == "chat");
  CHECK(c.events[0]["content"] == "Hello");
  CHECK(c.events[1]["content"] == ", world");
  CHECK(c.events[2]["type"] == "tool_call");
  CHECK(c.events[2]["name"] == "read_file");
  CHECK(c.events[2]["args"] == json({{"path", "a.txt"}}));
  CHECK(c.events[3]["type"] == "done");
  CHECK(c.events[3]["done"] == true);
  CHECK(c.events[3]["dialog_id"] == "dlg-123_x");

  // Each event is exactly "data: <json>\n\n" with nothing else on the wire.
  std::string expected;
  for (const auto& e : c.events) expected += "data: " + e.dump() + "\n\n";
  CHECK(json::parse(c.body.substr(6, c.body.find('\n') - 6)) == c.events[0]);
  CHECK(c.comments.empty());
  CHECK(c.body.size() == expected.size());

  std::lock_guard<std::mutex> lock(seen->mutex);
  CHECK(seen->calls == 1);
  CHECK(seen->request_dialog_id == "dlg-123_x");
  CHECK(seen->writer_dialog_id == "dlg-123_x");
  CHECK(seen->context == json({{"file", "main.cpp"}}));
  CHECK(seen->stream == true);
  REQUIRE(seen->messages.size() == 2);
  CHECK(seen->messages[0].role == "system");
  CHECK(seen->messages[1].content == "hi there");
  CHECK(seen->results == std::vector<bool>{true, true, true});
}

TEST_CASE("stream: a keep-alive request still gets a complete stream, then the connection closes") {
  RunningServer rs(test_options(), [](agentsmithy::Server& s) {
    s.chat_service().set_generator([](const ChatRequest&, StreamWriter& out) { out.chat("x"); });
  });
  REQUIRE(rs.ready());
  RawClient c(rs.port());
  json body = chat_body("hi");
  body["dialog_id"] = std::string(128, 'z');  // the longest allowed (design.md)
  REQUIRE(c.post_chat(body, true));
  CHECK(c.read_response());
  check_well_formed_stream(c, std::string(128, 'z'));
  // No "Connection: close": Node's fetch would then take a cut for an end
  // (issue 12). The terminating chunk ends the body; then the server closes.
  CHECK(c.header("connection").empty());
  CHECK(c.read_to_eof(2000ms));
}

TEST_CASE("stream: absent or null, the dialog_id is the current dialog's; context defaults to {}") {
  auto seen = std::make_shared<Seen>();
  RunningServer rs(test_options(), [&](agentsmithy::Server& s) {
    s.chat_service().set_generator([seen](const ChatRequest& req, StreamWriter& out) {
      seen->record(req, out);
      out.chat("x");
    });
  });
  REQUIRE(rs.ready());

  json body = chat_body("hello");
  SUBCASE("absent") {}
  SUBCASE("null") { body["dialog_id"] = nullptr; }
  body.erase("stream");  // stream defaults to true

  RawClient a, b;
  stream_request(a, rs.port(), body);
  check_well_formed_stream(a);
  const std::string id_a = a.events.front().value("dialog_id", std::string());
  {
    std::lock_guard<std::mutex> lock(seen->mutex);
    CHECK(seen->request_dialog_id == id_a);
    CHECK(seen->writer_dialog_id == id_a);
    CHECK(seen->context.is_object());
    CHECK(seen->context.empty());
  }
  // design: 32 hex characters
  CHECK(std::regex_match(id_a, std::regex("[0-9a-f]{32}")));
  // AgentSmithy's rule: the server's current dialog, the same for both.
  stream_request(b, rs.port(), body);
  check_well_formed_stream(b);
  CHECK(b.events.front().value("dialog_id", std::string()) == id_a);
  RawClient current(rs.port());
  REQUIRE(current.request("GET", "/api/dialogs/current", "", {{"Accept", "application/json"}}));
  REQUIRE(current.read_response());
  CHECK(current.body_json().value("id", std::string()) == id_a);
}

TEST_CASE("stream: a generator that returns without writing gets done appended") {
  RunningServer rs(test_options(), [](agentsmithy::Server& s) {
    s.chat_service().set_generator([](const ChatRequest&, StreamWriter&) {});
  });
  REQUIRE(rs.ready());
  RawClient c;
  stream_request(c, rs.port(), chat_body("hi"));
  check_well_formed_stream(c);
  CHECK(c.types() == std::vector<std::string>{"done"});
}

TEST_CASE("stream: a generator's own done or error ends the stream") {
  auto seen = std::make_shared<Seen>();
  RunningServer rs(test_options(), [&](agentsmithy::Server& s) {
    s.chat_service().set_generator([seen](const ChatRequest& req, StreamWriter& out) {
      const std::string what = req.messages.back().content;
      std::vector<bool> r;
      r.push_back(out.chat("first"));
      if (what == "done") {
        r.push_back(out.send({{"type", "done"}, {"done", true}}));
      } else {
        r.push_back(out.send({{"type", "error"}, {"error", "the model is unavailable"}}));
      }
      r.push_back(out.chat("after the end"));
      r.push_back(out.cancelled());
      std::lock_guard<std::mutex> lock(seen->mutex);
      seen->results = r;
    });
  });
  REQUIRE(rs.ready());
  const auto generator_returned = [&] {
    return wait_until([&] {
      std::lock_guard<std::mutex> lock(seen->mutex);
      return !seen->results.empty();
    });
  };

  SUBCASE("done") {
    RawClient c;
    stream_request(c, rs.port(), chat_body("done"));
    check_well_formed_stream(c);
    CHECK(c.types() == std::vector<std::string>{"chat", "done"});
    REQUIRE(generator_returned());  // the stream ended before the generator did
    std::lock_guard<std::mutex> lock(seen->mutex);
    REQUIRE(seen->results.size() == 4);
    CHECK(seen->results[0]);
    CHECK_FALSE(seen->results[2]);  // nothing after done
  }
  SUBCASE("error") {
    RawClient c;
    stream_request(c, rs.port(), chat_body("error"));
    check_well_formed_stream(c);
    CHECK(c.types() == std::vector<std::string>{"chat", "error", "done"});
    REQUIRE(c.events.size() == 3);
    CHECK(c.events[1]["error"] == "the model is unavailable");
    REQUIRE(generator_returned());
    std::lock_guard<std::mutex> lock(seen->mutex);
    REQUIRE(seen->results.size() == 4);
    CHECK_FALSE(seen->results[2]);  // nothing after error + done
  }
}

TEST_CASE("stream: send() rejects an event that is not an object with a string type") {
  auto seen = std::make_shared<Seen>();
  RunningServer rs(test_options(), [&](agentsmithy::Server& s) {
    s.chat_service().set_generator([seen](const ChatRequest&, StreamWriter& out) {
      std::vector<std::string> notes;
      const json bad[] = {json::array({1, 2}), json("chat"), json({{"content", "no type"}}),
                          json({{"type", 5}})};
      for (const auto& e : bad) {
        try {
          out.send(e);
          notes.push_back("accepted " + e.dump());
        } catch (const std::invalid_argument&) {
          notes.push_back("rejected");
        } catch (...) {
          notes.push_back("other exception for " + e.dump());
        }
      }
      out.chat("still fine");
      std::lock_guard<std::mutex> lock(seen->mutex);
      seen->notes = notes;
    });
  });
  REQUIRE(rs.ready());
  RawClient c;
  stream_request(c, rs.port(), chat_body("hi"));
  check_well_formed_stream(c);
  CHECK(c.types() == std::vector<std::string>{"chat", "done"});
  std::lock_guard<std::mutex> lock(seen->mutex);
  CHECK(seen->notes == std::vector<std::string>(4, "rejected"));
}

TEST_CASE("stream: a throwing generator yields error{what()} then done") {
  RunningServer rs(test_options(), [](agentsmithy::Server& s) {
    s.chat_service().set_generator([](const ChatRequest& req, StreamWriter& out) {
      const std::string how = req.messages.back().content;
      if (how == "after one chunk") {
        out.chat("partial");
        throw std::runtime_error("boom: the model fell over");
      }
      if (how == "at once") throw std::logic_error("no tokens today");
      throw 42;  // not a std::exception
    });
  });
  REQUIRE(rs.ready());

  RawClient c;
  // Asks `how`: a well-formed stream of these event types.
  const auto check_stream = [&](const std::string& how, const std::vector<std::string>& types) {
    stream_request(c, rs.port(), chat_body(how));
    check_well_formed_stream(c);
    CHECK(c.types() == types);
  };
  SUBCASE("after one chunk") {
    check_stream("after one chunk", {"chat", "error", "done"});
    REQUIRE(c.events.size() == 3);
    CHECK(c.events[1]["error"] == "boom: the model fell over");
  }
  SUBCASE("before any event") {
    check_stream("at once", {"error", "done"});
    REQUIRE(c.events.size() == 2);
    CHECK(c.events[0]["error"] == "no tokens today");
  }
  SUBCASE("not a std::exception") { check_stream("int", {"error", "done"}); }
  // and the server serves on
  auto cli = http_client(rs.port());
  auto res = cli->Get("/health");
  REQUIRE(res);
  CHECK(res->status == 200);
}

TEST_CASE("stream: newlines and unicode in content stay inside one data line") {
  const std::string tricky =
      "line one\nline two\r\n\ndata: not an event\n\n: not a comment \xE2\x9C\x93 h\xC3\xA9llo";
  RunningServer rs(test_options(), [&](agentsmithy::Server& s) {
    s.chat_service().set_generator(
        [tricky](const ChatRequest&, StreamWriter& out) { out.chat(tricky); });
  });
  REQUIRE(rs.ready());
  RawClient c;
  stream_request(c, rs.port(), chat_body("hi"));
  check_well_formed_stream(c);
  CHECK(c.comments.empty());
  REQUIRE(c.events.size() == 2);
  CHECK(c.events[0]["content"] == tricky);
}

TEST_CASE("stream: events reach the client as they are sent (no buffering)") {
  struct Times {
    std::mutex m;
    std::vector<Clock::time_point> sent;
  };
  auto times = std::make_shared<Times>();
  RunningServer rs(test_options(), [&](agentsmithy::Server& s) {
    s.chat_service().set_generator([times](const ChatRequest&, StreamWriter& out) {
      for (int i = 0; i < 6; ++i) {
        {
          std::lock_guard<std::mutex> lock(times->m);
          times->sent.push_back(Clock::now());
        }
        if (!out.chat("tok" + std::to_string(i) + " ")) return;
        if (!out.sleep_for(60ms)) return;
      }
    });
  });
  REQUIRE(rs.ready());
  RawClient c;
  stream_request(c, rs.port(), chat_body("hi"));
  check_well_formed_stream(c);
  REQUIRE(c.count("chat") == 6);
  std::lock_guard<std::mutex> lock(times->m);
  REQUIRE(times->sent.size() == 6);
  double worst = 0;
  for (std::size_t i = 0; i < 6; ++i)
    worst = std::max(worst, ms_between(times->sent[i], c.event_times[i]));
  note("worst send()-to-client latency of a chat event: " + std::to_string(worst) + " ms");
  CHECK(worst < 100.0);  // Nagle + delayed ACK would show as ~40 ms per event, buffering as 300 ms
  // sleep_for paced the generator
  CHECK(ms_between(times->sent.front(), times->sent.back()) >= 5 * 60 * 0.9);
}

TEST_CASE("non-streaming: stream:false answers one JSON object") {
  RunningServer rs(test_options(), [](agentsmithy::Server& s) {
    s.chat_service().set_generator([](const ChatRequest& req, StreamWriter& out) {
      if (req.stream) throw std::runtime_error("expected stream == false");
      if (req.messages.back().content == "throw") throw std::runtime_error("generator exploded");
      out.send({{"type", "chat_start"}});
      out.chat("Hello");
      out.send({{"type", "reasoning"}, {"content", "(not part of the answer)"}});
      out.chat(", world");
      out.send({{"type", "chat_end"}});
    });
  });
  REQUIRE(rs.ready());
  auto cli = http_client(rs.port());

  SUBCASE("joined chat chunks") {
    json body = chat_body("hi", json::object(), false);
    body["dialog_id"] = "nd-1";
    auto res = cli->Post("/api/chat", body.dump(), "application/json");
    REQUIRE(res);
    INFO(res->body);
    CHECK(res->status == 200);
    CHECK(res->get_header_value("Content-Type").rfind("application/json", 0) == 0);
    const json j = json::parse(res->body, nullptr, false);
    REQUIRE(j.is_object());
    CHECK(j["content"] == "Hello, world");
    CHECK(j["done"] == true);
    REQUIRE(j.contains("metadata"));
    CHECK(j["metadata"].is_object());
    CHECK(j["metadata"].value("dialog_id", std::string()) == "nd-1");  // design.md
  }
  SUBCASE("a throwing generator: 500 with its message") {  // design.md
    auto res = cli->Post("/api/chat", chat_body("throw", json::object(), false).dump(),
                         "application/json");
    REQUIRE(res);
    INFO(res->body);
    CHECK(res->status == 500);
    const json j = json::parse(res->body, nullptr, false);
    CHECK(j.value("error", std::string()) == "generator exploded");
  }
  SUBCASE("the demo generator") {
    agentsmithy::Options o = test_options();
    RunningServer demo(o);
    REQUIRE(demo.ready());
    auto dc = http_client(demo.port());
    auto res =
        dc->Post("/api/chat", demo_body("What is 2+2?", 5, 0, false).dump(), "application/json");
    REQUIRE(res);
    INFO(res->body);
    CHECK(res->status == 200);
    const json j = json::parse(res->body, nullptr, false);
    REQUIRE(j.is_object());
    CHECK(j["content"].is_string());
    CHECK_FALSE(j.value("content", std::string()).empty());
    CHECK(j["done"] == true);
    CHECK(j["metadata"].is_object());
  }
}

TEST_CASE(
    "bad input: each gets its status and a JSON error naming the problem; the server serves on") {
  agentsmithy::Options o = test_options();
  o.max_body_bytes = 4096;
  CountingServer rs(o);

  struct Case {
    std::string name;
    std::string method, path, body;
    int status;
    std::vector<std::string> error_mentions;  // words the error text must contain
  };
  const json user = {{"role", "user"}, {"content", "hi"}};
  const auto with = [&](const char* key, json value) {
    json b = {{"messages", json::array({user})}};
    b[key] = std::move(value);
    return b.dump();
  };
  const std::vector<Case> cases = {
      {"invalid JSON", "POST", "/api/chat", "{\"messages\": [", 400, {}},
      {"empty body", "POST", "/api/chat", "", 400, {}},
      {"not JSON at all", "POST", "/api/chat", "hello", 400, {}},
      {"top level not an object", "POST", "/api/chat", "[1,2,3]", 422, {}},
      {"no messages", "POST", "/api/chat", "{}", 422, {"messages"}},
      {"messages not an array", "POST", "/api/chat", R"({"messages":"hi"})", 422, {"messages"}},
      {"messages an object",
       "POST",
       "/api/chat",
       R"({"messages":{"role":"user","content":"hi"}})",
       422,
       {"messages"}},
      {"entry not an object", "POST", "/api/chat", R"({"messages":["hi"]})", 422, {"messages"}},
      {"entry without role",
       "POST",
       "/api/chat",
       R"({"messages":[{"content":"hi"}]})",
       422,
       {"role"}},
      {"entry without content",
       "POST",
       "/api/chat",
       R"({"messages":[{"role":"user"}]})",
       422,
       {"content"}},
      {"role not a string",
       "POST",
       "/api/chat",
       R"({"messages":[{"role":1,"content":"hi"}]})",
       422,
       {"role"}},
      {"content not a string",
       "POST",
       "/api/chat",
       R"({"messages":[{"role":"user","content":5}]})",
       422,
       {"content"}},
      {"content null",
       "POST",
       "/api/chat",
       R"({"messages":[{"role":"user","content":null}]})",
       422,
       {"content"}},
      {"stream a string", "POST", "/api/chat", with("stream", "yes"), 422, {"stream"}},
      {"stream a number", "POST", "/api/chat", with("stream", 1), 422, {"stream"}},
      {"context an array", "POST", "/api/chat", with("context", json::array()), 422, {"context"}},
      {"context a string", "POST", "/api/chat", with("context", "file.cpp"), 422, {"context"}},
      {"dialog_id a number", "POST", "/api/chat", with("dialog_id", 5), 422, {"dialog_id"}},
      {"dialog_id an object",
       "POST",
       "/api/chat",
       with("dialog_id", json::object()),
       422,
       {"dialog_id"}},
      {"dialog_id with bad characters",
       "POST",
       "/api/chat",
       with("dialog_id", "a b/../c\n"),
       422,
       {"dialog_id"}},
      {"dialog_id too long",
       "POST",
       "/api/chat",
       with("dialog_id", std::string(129, 'a')),
       422,
       {"dialog_id"}},
      {"dialog_id empty", "POST", "/api/chat", with("dialog_id", ""), 422, {"dialog_id"}},
      {"no messages at all",
       "POST",
       "/api/chat",
       R"({"messages":[]})",
       400,
       {"No user message found"}},
      {"no user message",
       "POST",
       "/api/chat",
       R"({"messages":[{"role":"system","content":"x"},{"role":"assistant","content":"y"}]})",
       400,
       {"No user message found"}},
      {"body over max_body_bytes",
       "POST",
       "/api/chat",
       json({{"messages", json::array({{{"role", "user"}, {"content", std::string(5000, 'x')}}})}})
           .dump(),
       413,
       {}},
      {"deeply nested JSON", "POST", "/api/chat", std::string(3000, '['), 400, {}},
      {"unknown path", "GET", "/nope", "", 404, {"/nope"}},
      {"unknown API path", "POST", "/api/nope", R"({"messages":[]})", 404, {"/api/nope"}},
  };

  for (const auto& tc : cases) {
    CAPTURE(tc.name);
    RawClient c(rs.port());
    REQUIRE(c.connected());
    if (tc.method == "POST")
      REQUIRE(c.request("POST", tc.path, tc.body, {{"Content-Type", "application/json"}}));
    else
      REQUIRE(c.get(tc.path));
    const bool got = c.read_response(5000ms);
    INFO(c.summary());
    CHECK(got);
    CHECK(c.status == tc.status);
    CHECK(c.header("content-type").rfind("application/json", 0) == 0);
    const json j = c.body_json();
    CHECK(j.is_object());
    CHECK(j.contains("error"));
    const std::string err = j.is_object() && j.contains("error") && j["error"].is_string()
                                ? j["error"].get<std::string>()
                                : std::string();
    CHECK_FALSE(err.empty());
    for (const auto& word : tc.error_mentions) {
      INFO("the error should mention \"" << word << "\"");
      CHECK(err.find(word) != std::string::npos);
    }
    // still serving
    check_health(rs.port());
  }
  CHECK(rs.calls() == 0);

  // and a good request still works at the end
  RawClient ok;
  stream_request(ok, rs.port(), chat_body("hi"));
  check_well_formed_stream(ok);
  CHECK(ok.types() == std::vector<std::string>{"chat", "done"});
}

TEST_CASE("bad input: very deeply nested JSON neither crashes nor hangs the server") {
  RunningServer rs(test_options());
  REQUIRE(rs.ready());
  const int depth = 100000;  // 200 KB, under the default max_body_bytes
  const std::string valid_deep = std::string(depth, '[') + std::string(depth, ']');
  SUBCASE("unterminated") {
    RawClient c(rs.port());
    REQUIRE(c.post_raw(std::string(depth, '[')));
    CHECK(c.read_response(5000ms));
    INFO(c.summary());
    CHECK(c.status == 400);
  }
  SUBCASE("as the whole body") {
    RawClient c(rs.port());
    REQUIRE(c.post_raw(valid_deep));
    CHECK(c.read_response(5000ms));
    INFO(c.summary());
    CHECK((c.status == 400 || c.status == 422));
  }
  SUBCASE("inside context") {
    RawClient c(rs.port());
    REQUIRE(c.post_raw(R"({"messages":[{"role":"user","content":"hi"}],"context":{"deep":)" +
                       valid_deep + "}}"));
    CHECK(c.read_response(5000ms));
    INFO(c.summary());
    CHECK(c.status != 0);
    CHECK(c.status != 500);
  }
  SUBCASE("inside a message") {
    RawClient c(rs.port());
    REQUIRE(c.post_raw(R"({"messages":[{"role":"user","content":)" + valid_deep + "}]}"));
    CHECK(c.read_response(5000ms));
    INFO(c.summary());
    CHECK((c.status == 400 || c.status == 422));  // refused as too deep, or content not a string
  }
  check_health(rs.port());
}

TEST_CASE("bad input: a body over max_body_bytes gets 413 with a JSON error (httplib client)") {
  agentsmithy::Options o = test_options();
  o.max_body_bytes = 1024;
  RunningServer rs(o);
  REQUIRE(rs.ready());
  auto cli = http_client(rs.port());
  const json big = chat_body(std::string(2000, 'a'));
  auto res = cli->Post("/api/chat", big.dump(), "application/json");
  REQUIRE(res);
  INFO(res->body);
  CHECK(res->status == 413);
  const json j = json::parse(res->body, nullptr, false);
  CHECK(j.is_object());
  CHECK(j.contains("error"));
  auto small = cli->Post("/api/chat", demo_body("hi", 2, 0, false).dump(), "application/json");
  REQUIRE(small);
  CHECK(small->status == 200);
}

TEST_CASE("/health: status, service, server_status, pid, port, active_streams") {
  auto gate = std::make_shared<Gate>();
  RunningServer rs(test_options(), [&](agentsmithy::Server& s) {
    s.chat_service().set_generator([gate](const ChatRequest&, StreamWriter& out) {
      out.chat("waiting");
      while (!gate->is_open() && out.sleep_for(5ms)) {
      }
    });
  });
  REQUIRE(rs.ready());
  CHECK(rs.port() > 0);
  auto cli = http_client(rs.port());
  auto res = cli->Get("/health");
  REQUIRE(res);
  CHECK(res->status == 200);
  CHECK(res->get_header_value("Content-Type").rfind("application/json", 0) == 0);
  json j = json::parse(res->body, nullptr, false);
  INFO(res->body);
  REQUIRE(j.is_object());
  CHECK(j["status"] == "ok");
  CHECK(j["service"] == "agentsmithy-server");
  CHECK(j["server_status"] == "ready");
  CHECK(j["pid"] == static_cast<long>(::getpid()));
  CHECK(j["port"] == rs.port());
  CHECK(j["active_streams"] == 0);

  RawClient c(rs.port());
  REQUIRE(c.post_chat(chat_body("hi")));
  REQUIRE(c.read_events(1));
  REQUIRE(wait_until([&] { return rs.chat().active_streams() == 1; }));
  res = cli->Get("/health");
  REQUIRE(res);
  j = json::parse(res->body, nullptr, false);
  CHECK(j["active_streams"] == 1);
  gate->open();
  CHECK(c.read_to_eof());
  check_well_formed_stream(c);
  CHECK(wait_until([&] { return rs.chat().active_streams() == 0; }));
}

TEST_CASE("heartbeat: ': ping' comment lines on a quiet stream") {
  agentsmithy::Options o = test_options();
  o.heartbeat_interval = 40ms;
  RunningServer rs(o, [](agentsmithy::Server& s) {
    s.chat_service().set_generator([](const ChatRequest&, StreamWriter& out) {
      out.chat("before");
      out.sleep_for(400ms);
      out.chat("after");
    });
  });
  REQUIRE(rs.ready());
  RawClient c;
  stream_request(c, rs.port(), chat_body("hi"));
  check_well_formed_stream(c);
  CHECK(c.types() == std::vector<std::string>{"chat", "chat", "done"});
  note("heartbeat comments in a 400 ms quiet period at 40 ms: " +
       std::to_string(c.comments.size()));
  CHECK(c.comments.size() >= 3);
  CHECK(c.ping_count() == c.comments.size());
}

TEST_CASE("demo generator (the default)") {
  RunningServer rs(test_options());
  REQUIRE(rs.ready());
  RawClient c;

  SUBCASE("the long story: chat_start, >= 2000 words in chat chunks, chat_end, done") {
    stream_request(c, rs.port(),
                   chat_body("Tell me a long story", {{"demo", {{"interval_ms", 0}}}}));
    check_well_formed_stream(c);
    const auto t = c.types();
    REQUIRE(t.size() >= 4);
    CHECK(t.front() == "chat_start");
    CHECK(t[t.size() - 2] == "chat_end");
    CHECK(c.count("chat") == t.size() - 3);
    const std::size_t words = word_count(c.joined_chat());
    note("long story: " + std::to_string(words) + " words in " + std::to_string(c.count("chat")) +
         " chunks");
    CHECK(words >= 2000);
    // a few words per chunk
    CHECK(static_cast<double>(words) / static_cast<double>(c.count("chat")) <= 10.0);
  }
  SUBCASE("context.demo.tokens sets the number of chat chunks") {
    stream_request(c, rs.port(), demo_body("Tell me a long story", 5, 0));
    check_well_formed_stream(c);
    CHECK(c.count("chat") == 5);
    CHECK(c.types().front() == "chat_start");
  }
  SUBCASE("context.demo.interval_ms sets the pace") {
    stream_request(c, rs.port(), demo_body("hello", 4, 50));
    check_well_formed_stream(c);
    REQUIRE(c.count("chat") == 4);
    std::vector<Clock::time_point> chats;
    for (std::size_t i = 0; i < c.events.size(); ++i)
      if (c.events[i]["type"] == "chat") chats.push_back(c.event_times[i]);
    const double span = ms_between(chats.front(), chats.back());
    note("4 demo chunks at 50 ms: first to last " + std::to_string(span) + " ms");
    CHECK(span >= 3 * 50 * 0.8);
    CHECK(span < 3 * 50 + 1000);
  }
  SUBCASE("the default pace is about 20 ms per chunk") {
    REQUIRE(c.connect_to(rs.port()));
    REQUIRE(c.post_chat(chat_body("Tell me a long story")));
    REQUIRE(c.read_count("chat", 6, 5000ms));
    std::vector<Clock::time_point> chats;
    for (std::size_t i = 0; i < c.events.size(); ++i)
      if (c.events[i]["type"] == "chat") chats.push_back(c.event_times[i]);
    const double span = ms_between(chats[0], chats[5]);
    note("6 default demo chunks: first to sixth " + std::to_string(span) + " ms");
    CHECK(span >= 5 * 20 * 0.7);
    CHECK(span < 5 * 20 + 1000);
    c.close();  // and the server notices
    CHECK(wait_until([&] { return rs.chat().active_streams() == 0; }, 3000ms));
  }
  SUBCASE("another question gets a short reply") {
    stream_request(c, rs.port(), demo_body("What is the capital of France?", 20, 0));
    check_well_formed_stream(c);
    CHECK(c.count("chat_start") == 1);
    CHECK(c.count("chat_end") == 1);
    CHECK_FALSE(c.joined_chat().empty());
  }
  SUBCASE("invalid context.demo values end the stream with an error naming the field") {
    const std::vector<std::pair<json, std::string>> bad = {
        {{{"tokens", 0}}, "tokens"},
        {{{"tokens", -3}}, "tokens"},
        {{{"tokens", "many"}}, "tokens"},
        {{{"tokens", 1000001}}, "tokens"},
        {{{"tokens", 2.5}}, "tokens"},
        {{{"interval_ms", -1}}, "interval_ms"},
        {{{"interval_ms", 60001}}, "interval_ms"},
        {{{"interval_ms", "fast"}}, "interval_ms"},
    };
    for (const auto& b : bad) {
      CAPTURE(b.first.dump());
      RawClient d;
      stream_request(d, rs.port(), chat_body("hello", {{"demo", b.first}}));
      check_well_formed_stream(d);
      REQUIRE(d.events.size() >= 2);
      const json& err = d.events[d.events.size() - 2];
      CHECK(err.value("type", std::string()) == "error");
      CHECK(err.value("error", std::string()).find(b.second) != std::string::npos);
      CHECK(d.count("chat") == 0);
    }
  }
}
