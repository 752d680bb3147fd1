// Dialogs that outlive a stream (issue 17), end to end through a server with
// a store: memory through a scripted OpenAI-compatible upstream, the REST
// routes over HTTP, every turn recorded as its client received it with its
// outcome, superseded turns, a failing store, and the default store.
#include "support.hpp"
#include "upstream.hpp"

using namespace test;

namespace {

// A server whose store the test keeps, to read what it recorded. Its grace
// period is short: a test's held writers keep its listen() until then.
struct DlgServer {
  std::shared_ptr<agentsmithy::DialogStore> store = agentsmithy::memory_store();
  std::unique_ptr<RunningServer> srv;
  explicit DlgServer(const RunningServer::Setup& setup = {},
                     agentsmithy::Options o = test_options()) {
    o.store = store;
    o.grace_period = std::min<std::chrono::milliseconds>(o.grace_period, 500ms);
    srv = std::make_unique<RunningServer>(std::move(o), setup);
    REQUIRE(srv->ready());
  }
};

json dlg_chat_body(const std::string& text, const std::string& dialog_id = {}) {
  json body = chat_body(text);
  if (!dialog_id.empty()) body["dialog_id"] = dialog_id;
  return body;
}

// A REST call; the response's JSON body (null when none).
json dlg_call(int port, const std::string& method, const std::string& path, int expect_status,
              const std::string& body = "") {
  RawClient c(port);
  Headers headers = {{"Accept", "application/json"}};
  if (!body.empty()) headers.push_back({"Content-Type", "application/json"});
  // As fetch sends them: a PATCH or DELETE without a body says so.
  if (body.empty() && method != "GET") headers.push_back({"Content-Length", "0"});
  INFO(method << " " << path);
  REQUIRE(c.request(method, path, body, headers));
  REQUIRE(c.read_response());
  INFO(c.summary());
  CHECK(c.status == expect_status);
  return c.body_json();
}

// The upstream's answer: `text` as two content deltas.
std::string dlg_answer(const std::string& text) {
  const std::string half = text.substr(0, text.size() / 2);
  return sse(chunk_json({{"role", "assistant"}, {"content", ""}})) + sse_content(half) +
         sse_content(text.substr(half.size())) + sse_finish("stop") + kSseDone;
}

// A stream handler that sends `first` at once, then holds the writer until
// the test releases it (or the stream is cancelled).
struct DlgHeld {
  std::mutex mu;
  std::vector<std::shared_ptr<agentsmithy::StreamWriter>> writers;
  agentsmithy::StreamHandler handler(const std::string& first) {
    return [this, first](const agentsmithy::ChatRequest&,
                         std::shared_ptr<agentsmithy::StreamWriter> w) {
      w->chat(first);
      std::lock_guard<std::mutex> lock(mu);
      writers.push_back(std::move(w));
    };
  }
  std::size_t count() {
    std::lock_guard<std::mutex> lock(mu);
    return writers.size();
  }
};

// A store whose every call fails while `down` is set.
class DlgFailingStore final : public agentsmithy::DialogStore {
 public:
  std::atomic<bool> down{true};
  std::shared_ptr<agentsmithy::DialogStore> inner = agentsmithy::memory_store();

  std::vector<agentsmithy::DialogInfo> list_dialogs() override {
    check();
    return inner->list_dialogs();
  }
  std::optional<agentsmithy::DialogInfo> find_dialog(const std::string& id) override {
    check();
    return inner->find_dialog(id);
  }
  agentsmithy::DialogInfo create_dialog(const std::string& id,
                                        const std::optional<std::string>& title) override {
    check();
    return inner->create_dialog(id, title);
  }
  std::optional<agentsmithy::DialogInfo> rename_dialog(const std::string& id,
                                                       const std::string& title) override {
    check();
    return inner->rename_dialog(id, title);
  }
  bool delete_dialog(const std::string& id) override {
    check();
    return inner->delete_dialog(id);
  }
  std::optional<std::string> current_dialog() override {
    check();
    return inner->current_dialog();
  }
  void set_current_dialog(const std::optional<std::string>& id) override {
    check();
    inner->set_current_dialog(id);
  }
  void begin_turn(const std::string& d, const std::string& t, const json& u) override {
    check();
    inner->begin_turn(d, t, u);
  }
  void append(const std::string& t, std::uint64_t first, const std::vector<json>& e) override {
    check();
    inner->append(t, first, e);
  }
  void end_turn(const std::string& t, agentsmithy::TurnOutcome o, const std::string& c) override {
    check();
    inner->end_turn(t, o, c);
  }
  void sync() override { check(); }
  std::vector<agentsmithy::TurnRecord> turns(const std::string& d, std::size_t n) override {
    check();
    return inner->turns(d, n);
  }
  std::optional<agentsmithy::TurnRecord> turn(const std::string& t) override {
    check();
    return inner->turn(t);
  }

 private:
  void check() const {
    if (down) throw agentsmithy::StoreError("disk I/O error at /secret/path.db");
  }
};

std::vector<std::string> dlg_types(const agentsmithy::TurnRecord& t) {
  std::vector<std::string> out;
  for (const json& e : t.events) out.push_back(e.value("type", std::string()));
  return out;
}

}  // namespace

TEST_CASE("dialogs: the second turn reaches the model with the first turn before it") {
  ScriptedUpstream up([](ScriptedUpstream::Conn& c) {
    c.head(200, "text/event-stream");
    c.body(dlg_answer(c.request().body_json()["messages"].size() == 1 ? "Hello there!"
                                                                      : "Again, hello."));
    c.end();
  });
  agentsmithy::OpenAIOptions o;
  o.base_url = up.url();
  o.connect_timeout = 2000ms;
  o.read_timeout = 3000ms;
  auto gen = agentsmithy::openai_generator(o);
  DlgServer s(with_generator(gen));

  RawClient first(s.srv->port());
  first.post_chat(dlg_chat_body("hi"));
  REQUIRE(first.read_to_eof(10000ms));
  REQUIRE(first.count("done") == 1);
  const std::string dialog = first.events.back().value("dialog_id", std::string());
  REQUIRE_FALSE(dialog.empty());
  CHECK(first.joined_chat() == "Hello there!");

  RawClient second(s.srv->port());
  second.post_chat(dlg_chat_body("and again", dialog));
  REQUIRE(second.read_to_eof(10000ms));
  CHECK(second.joined_chat() == "Again, hello.");

  REQUIRE(up.wait_requests(2));
  const json messages = up.request(1).body_json()["messages"];
  INFO(messages.dump());
  REQUIRE(messages.size() == 3);
  CHECK(messages[0] == json{{"role", "user"}, {"content", "hi"}});
  CHECK(messages[1] == json{{"role", "assistant"}, {"content", "Hello there!"}});
  CHECK(messages[2] == json{{"role", "user"}, {"content", "and again"}});

  SUBCASE("a request with several messages is taken as given") {
    RawClient third(s.srv->port());
    json body = dlg_chat_body("third", dialog);
    body["messages"] = json::array({{{"role", "user"}, {"content", "own history"}},
                                    {{"role", "assistant"}, {"content", "ok"}},
                                    {{"role", "user"}, {"content", "third"}}});
    third.post_chat(body);
    REQUIRE(third.read_to_eof(10000ms));
    REQUIRE(up.wait_requests(3));
    CHECK(up.request(2).body_json()["messages"].size() == 3);
    CHECK(s.store->turns(dialog, 10).size() == 3);  // still recorded
  }
}

TEST_CASE("dialogs: the REST routes over HTTP, /current before {id}") {
  DlgServer s;
  const int port = s.srv->port();
  // A current dialog exists from the start.
  const json current = dlg_call(port, "GET", "/api/dialogs/current", 200);
  REQUIRE(current.contains("id"));
  const std::string first = current["id"].get<std::string>();
  json list = dlg_call(port, "GET", "/api/dialogs", 200);
  CHECK(list["current_dialog_id"] == first);
  CHECK(list["dialogs"].size() == 1);

  const json created = dlg_call(port, "POST", "/api/dialogs", 200, "{}");
  const std::string second = created.value("id", std::string());
  REQUIRE_FALSE(second.empty());
  CHECK(created.contains("created_at"));
  CHECK(dlg_call(port, "GET", "/api/dialogs/current", 200)["id"] == second);

  dlg_call(port, "PATCH", "/api/dialogs/current?id=" + first, 200);
  CHECK(dlg_call(port, "GET", "/api/dialogs/current", 200)["id"] == first);
  dlg_call(port, "PATCH", "/api/dialogs/current?id=nope", 404);

  dlg_call(port, "PATCH", "/api/dialogs/" + second, 200, R"({"title":"Renamed"})");
  CHECK(dlg_call(port, "GET", "/api/dialogs/" + second, 200)["title"] == "Renamed");
  dlg_call(port, "PATCH", "/api/dialogs/" + second, 422, R"({"title":42})");
  dlg_call(port, "GET", "/api/dialogs/bad%20id", 422);
  dlg_call(port, "GET", "/api/dialogs/unknown-dialog", 404);
  CHECK(dlg_call(port, "GET", "/api/dialogs/" + second + "/session", 200) ==
        json{{"has_unapproved", false}, {"changed_files", json::array()}});
  const json empty = dlg_call(port, "GET", "/api/dialogs/" + second + "/history", 200);
  CHECK(empty["events"].empty());
  CHECK(empty["has_more"] == false);

  // A turn shows in the history as user + chat with dense idx.
  RawClient c(port);
  c.post_chat(dlg_chat_body("hello", second));
  REQUIRE(c.read_to_eof(10000ms));
  const json history = dlg_call(port, "GET", "/api/dialogs/" + second + "/history?limit=20", 200);
  INFO(history.dump());
  REQUIRE(history["events"].size() >= 2);
  CHECK(history["events"][0]["type"] == "user");
  CHECK(history["events"][0]["idx"] == 0);
  CHECK(history["last_idx"] == 1);
  // The dialog with a turn is the most recently updated.
  list = dlg_call(port, "GET", "/api/dialogs", 200);
  CHECK(list["dialogs"][0]["id"] == second);

  // Deleting every dialog leaves a fresh current one.
  dlg_call(port, "DELETE", "/api/dialogs/" + second, 200);
  dlg_call(port, "DELETE", "/api/dialogs/" + first, 200);
  list = dlg_call(port, "GET", "/api/dialogs", 200);
  REQUIRE(list["dialogs"].size() == 1);
  CHECK(list["current_dialog_id"] == list["dialogs"][0]["id"]);
  dlg_call(port, "DELETE", "/api/dialogs/" + second, 404);
}

TEST_CASE("dialogs: a PATCH or POST without Content-Length (as Chromium sends it) has no body") {
  DlgServer s;
  const int port = s.srv->port();
  const std::string first =
      dlg_call(port, "GET", "/api/dialogs/current", 200)["id"].get<std::string>();
  RawClient c(port);
  // Two requests on one connection, neither with Content-Length or
  // Transfer-Encoding: each answered at once, the second read as a request.
  REQUIRE(c.send_all("POST /api/dialogs HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"));
  REQUIRE(c.read_response(2000ms));
  INFO(c.summary());
  CHECK(c.status == 200);
  const std::string created = c.body_json().value("id", std::string());
  CHECK(created != first);
  c.next_response();
  REQUIRE(c.send_all("PATCH /api/dialogs/current?id=" + first +
                     " HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"));
  REQUIRE(c.read_response(2000ms));
  CHECK(c.status == 200);
  CHECK(dlg_call(port, "GET", "/api/dialogs/current", 200)["id"] == first);
}

TEST_CASE("dialogs: a chat without dialog_id joins the current dialog") {
  DlgServer s;
  const std::string current =
      dlg_call(s.srv->port(), "GET", "/api/dialogs/current", 200)["id"].get<std::string>();
  RawClient c(s.srv->port());
  c.post_chat(chat_body("hi"));
  REQUIRE(c.read_to_eof(10000ms));
  REQUIRE_FALSE(c.events.empty());
  for (const json& e : c.events) CHECK(e.value("dialog_id", std::string()) == current);
  CHECK(s.store->turns(current, 10).size() == 1);
}

TEST_CASE("dialogs: the turn holds every event its client received, with the outcome") {
  SUBCASE("a graceful shutdown: outcome shutdown, the shutdown error included") {
    DlgHeld held;
    DlgServer s(with_handler(held.handler("part of an answer")));
    RawClient c(s.srv->port());
    c.post_chat(dlg_chat_body("tell me", "dlg-shutdown"));
    REQUIRE(c.read_count("chat", 1));
    s.srv->stop();
    REQUIRE(c.read_to_eof());
    const auto turns = s.store->turns("dlg-shutdown", 10);
    REQUIRE(turns.size() == 1);
    CHECK(turns[0].outcome == agentsmithy::TurnOutcome::shutdown);
    CHECK(dlg_types(turns[0]) == std::vector<std::string>{"user", "chat", "error"});
    CHECK(turns[0].events[1]["content"] == "part of an answer");
    CHECK(turns[0].events[2]["code"] == "shutdown");
    // What the client received, but done: the same events in the same order.
    std::vector<std::string> received;
    for (const json& e : c.events) {
      if (e.value("type", std::string()) != "done") received.push_back(e.value("type", ""));
    }
    CHECK(received == std::vector<std::string>{"chat", "error"});  // no user event in tests
  }
  SUBCASE("a client that leaves: outcome client_gone") {
    DlgHeld held;
    DlgServer s(with_handler(held.handler("half")));
    {
      RawClient c(s.srv->port());
      c.post_chat(dlg_chat_body("go", "dlg-gone"));
      REQUIRE(c.read_count("chat", 1));
      c.abort();
    }
    REQUIRE(wait_until(
        [&] {
          const auto t = s.store->turns("dlg-gone", 10);
          return t.size() == 1 && t[0].outcome == agentsmithy::TurnOutcome::client_gone;
        },
        5000ms));
  }
  SUBCASE("a completed turn is stored before its done reaches the client") {
    DlgServer s;
    RawClient c(s.srv->port());
    c.post_chat(dlg_chat_body("hi", "dlg-done"));
    REQUIRE(c.read_count("done", 1, 10000ms));
    // Read at the moment done arrived: nothing may be missing.
    const auto turns = s.store->turns("dlg-done", 10);
    REQUIRE(turns.size() == 1);
    CHECK(turns[0].outcome == agentsmithy::TurnOutcome::completed);
    std::string stored_text;
    for (const json& e : turns[0].events) {
      if (e.value("type", std::string()) == "chat") stored_text += e.value("content", "");
    }
    CHECK(stored_text == c.joined_chat());
  }
}

TEST_CASE("dialogs: a new turn of a dialog supersedes its running turn") {
  DlgHeld held;
  DlgServer s(with_handler(held.handler("first answer")));
  RawClient a(s.srv->port());
  a.post_chat(dlg_chat_body("one", "dlg-super"));
  REQUIRE(a.read_count("chat", 1));
  RawClient b(s.srv->port());
  b.post_chat(dlg_chat_body("two", "dlg-super"));
  REQUIRE(a.read_to_eof());
  REQUIRE(a.count("error") == 1);
  CHECK(a.events[a.events.size() - 2].value("code", std::string()) == "superseded");
  CHECK(a.events.back().value("type", std::string()) == "done");
  REQUIRE(b.read_count("chat", 1));
  const auto turns = s.store->turns("dlg-super", 10);
  REQUIRE(turns.size() == 2);
  CHECK(turns[0].outcome == agentsmithy::TurnOutcome::superseded);
  CHECK(turns[1].outcome == agentsmithy::TurnOutcome::running);
}

TEST_CASE("dialogs: a failing store: store_unavailable then done; the server keeps serving") {
  auto failing = std::make_shared<DlgFailingStore>();
  agentsmithy::Options o = test_options();
  o.store = failing;
  RunningServer srv(o);
  REQUIRE(srv.ready());
  RawClient c(srv.port());
  c.post_chat(dlg_chat_body("hi", "dlg-down"));
  REQUIRE(c.read_to_eof(10000ms));
  REQUIRE(c.events.size() == 2);
  CHECK(c.events[0].value("code", std::string()) == "store_unavailable");
  CHECK(c.body.find("/secret/path.db") == std::string::npos);
  CHECK(c.events[1].value("type", std::string()) == "done");
  json health = dlg_call(srv.port(), "GET", "/health", 200);
  CHECK(health["store_ok"] == false);
  RawClient m(srv.port());
  m.get("/metrics");
  REQUIRE(m.read_response());
  CHECK(m.body.find("agentsmithy_store_errors_total 0") == std::string::npos);
  CHECK(m.body.find("agentsmithy_store_errors_total") != std::string::npos);
  dlg_call(srv.port(), "GET", "/api/dialogs", 503);
  // Back up: the next turn is recorded and the health recovers.
  failing->down = false;
  RawClient d(srv.port());
  d.post_chat(dlg_chat_body("hi", "dlg-down"));
  REQUIRE(d.read_to_eof(10000ms));
  CHECK(d.count("chat") > 0);
  CHECK(dlg_call(srv.port(), "GET", "/health", 200)["store_ok"] == true);
}

TEST_CASE("dialogs: without Options::store the server keeps its dialogs in memory") {
  RunningServer srv;  // test_options(): store left empty
  REQUIRE(srv.ready());
  const json list = dlg_call(srv.port(), "GET", "/api/dialogs", 200);
  REQUIRE(list["dialogs"].size() == 1);
  const std::string current = list["current_dialog_id"].get<std::string>();
  RawClient a(srv.port());
  a.post_chat(dlg_chat_body("first question"));
  REQUIRE(a.read_to_eof(10000ms));
  CHECK(a.events.back().value("dialog_id", std::string()) == current);
  const json history = dlg_call(srv.port(), "GET", "/api/dialogs/" + current + "/history", 200);
  REQUIRE(history["events"].size() >= 2);
  CHECK(history["events"][0]["type"] == "user");
  CHECK(history["events"][0]["content"] == "first question");
  CHECK(history["events"][1]["type"] == "chat");
}

TEST_CASE("dialogs: the memory store keeps its bound when the current dialog holds it all") {
  auto store = agentsmithy::memory_store(4096);
  store->create_dialog("dlg-big", std::nullopt);
  store->set_current_dialog("dlg-big");
  for (int i = 0; i < 100; ++i) {
    const std::string t = "dlg-turn-" + std::to_string(i);
    store->begin_turn("dlg-big", t, json{{"type", "user"}, {"content", std::string(100, 'x')}});
    store->append(t, 1, {json{{"type", "chat"}, {"content", std::string(100, 'y')}}});
    store->end_turn(t, agentsmithy::TurnOutcome::completed, "");
  }
  auto* memory = dynamic_cast<agentsmithy::detail::MemoryDialogStore*>(store.get());
  REQUIRE(memory);
  CHECK(memory->bytes_used() <= 4096);
  const auto turns = store->turns("dlg-big", 1000);
  REQUIRE_FALSE(turns.empty());
  CHECK(turns.size() < 100);
  CHECK(turns.back().turn_id == "dlg-turn-99");  // the newest turns are the ones kept
  CHECK(store->current_dialog() == std::optional<std::string>("dlg-big"));
}
