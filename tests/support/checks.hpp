// Test support: the rules every stream obeys, and checks that a server still
// answers.
#pragma once

#include "client.hpp"

namespace test {

// The rules every stream obeys: 200, SSE, terminating chunk, only JSON events,
// each an object with a string type and the same string dialog_id, done
// exactly once and last with done:true, every error followed at once by done.
inline void check_well_formed_stream(const RawClient& c, const std::string& dialog_id = "") {
  INFO(c.summary());
  CHECK(c.status == 200);
  CHECK(c.terminating_chunk);
  CHECK_FALSE(c.framing_error);
  CHECK(c.malformed.empty());
  CHECK(c.other_lines.empty());
  CHECK(c.bytes_after_end == 0);
  REQUIRE_FALSE(c.events.empty());
  CHECK(c.count("done") == 1);
  CHECK(c.events.back().value("type", std::string()) == "done");
  CHECK(c.events.back().value("done", false) == true);
  const std::string first_id = c.events.front().value("dialog_id", std::string());
  CHECK_FALSE(first_id.empty());
  if (!dialog_id.empty()) CHECK(first_id == dialog_id);
  for (std::size_t i = 0; i < c.events.size(); ++i) {
    const json& e = c.events[i];
    INFO("event " << i << ": " << e.dump());
    REQUIRE(e.is_object());
    CHECK(e.contains("type"));
    CHECK(e["type"].is_string());
    CHECK(e.contains("dialog_id"));
    CHECK(e.value("dialog_id", std::string("<missing>")) == first_id);
    if (e.value("type", std::string()) == "error") {
      CHECK(e.contains("error"));
      CHECK(e["error"].is_string());
      CHECK(i + 1 < c.events.size());
      if (i + 1 < c.events.size()) CHECK(c.events[i + 1].value("type", std::string()) == "done");
    }
  }
}

// A stream that the shutdown ended: well formed, and its last two events are
// the shutdown error and done.
inline void check_ended_by_shutdown(const RawClient& c) {
  check_well_formed_stream(c);
  INFO(c.summary());
  REQUIRE(c.events.size() >= 2);
  const json& err = c.events[c.events.size() - 2];
  CHECK(err.value("type", std::string()) == "error");
  CHECK(err.value("error", std::string()) == std::string(agentsmithy::kShutdownMessage));
  CHECK(c.count("error") == 1);
}

// Reads `c` to EOF within `timeout`: a stream that the shutdown ended.
inline void check_reads_to_shutdown_end(RawClient& c, milliseconds timeout) {
  CHECK(c.read_to_eof(timeout));
  check_ended_by_shutdown(c);
}

// POSTs `body` to /api/chat on a fresh connection: the whole answer arrives
// within 5 s, with `status` and a JSON object. Returns the client.
inline std::unique_ptr<RawClient> check_chat_refused(int port, const std::string& body,
                                                     int status) {
  auto c = std::make_unique<RawClient>(port);
  REQUIRE(c->post_raw(body));
  CHECK(c->read_response(5000ms));
  INFO(c->summary());
  CHECK(c->status == status);
  CHECK(c->body_json().is_object());
  return c;
}

// GET /health on a fresh connection is answered 200 within `timeout`.
inline void check_health(int port, milliseconds timeout = 5000ms) {
  RawClient h(port);
  REQUIRE(h.get("/health"));
  CHECK(h.read_response(timeout));
  CHECK(h.status == 200);
}

// A request, a health check and a short stream, each answered promptly.
inline void check_still_serving(int port, const char* when) {
  CAPTURE(when);
  const auto t0 = Clock::now();
  check_health(port, 2000ms);
  RawClient s(port);
  REQUIRE(s.post_chat(chat_body("hi")));
  CHECK(s.read_to_eof(2000ms));
  check_well_formed_stream(s);
  const double ms = ms_since(t0);
  CHECK(ms < 1000.0);
}

}  // namespace test
