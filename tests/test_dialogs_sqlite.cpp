// Dialogs kept in SQLite across restarts (issue 17), with the example server
// as a real process: a restart keeps every dialog; streams cut by SIGTERM are
// in the history exactly as their clients received them; a SIGKILL loses at
// most the last moments and never the file; a file locked by another process
// at run time holds neither the streams nor the shutdown; a file that is no
// store stops the server at start.
#include "support.hpp"

#ifdef AGENTSMITHY_SQLITE_SUPPORT
#include <sqlite3.h>

using namespace test;

namespace {

// A directory of the test's own for the SQLite file, removed at the end.
struct SqlDir {
  std::string path;
  SqlDir() {
    char tmpl[] = "/tmp/agentsmithy-sqlite-XXXXXX";
    REQUIRE(::mkdtemp(tmpl));
    path = tmpl;
  }
  ~SqlDir() { std::system(("rm -rf '" + path + "'").c_str()); }
  std::string file() const { return path + "/dialogs.sqlite3"; }
};

ServerProcess::Spec sql_spec(const std::string& file) {
  return ServerProcess::Spec{
      {"--port", "0", "--store", "sqlite", "--store-path", file}, {}, "", false};
}

json sql_get(int port, const std::string& path) {
  RawClient c(port);
  REQUIRE(c.get(path));
  REQUIRE(c.read_response());
  INFO(path << ": " << c.summary());
  REQUIRE(c.status == 200);
  return c.body_json();
}

// The history's assistant text and the outcome of its last chat event.
std::pair<std::string, std::string> sql_assistant(int port, const std::string& dialog) {
  const json page = sql_get(port, "/api/dialogs/" + dialog + "/history?limit=20");
  std::string text, outcome = "completed";
  for (const json& e : page["events"]) {
    if (e.value("type", std::string()) != "chat") continue;
    text += e.value("content", std::string());
    outcome = e.value("outcome", std::string("completed"));
  }
  return {text, outcome};
}

json sql_chat(const std::string& dialog, int tokens, int interval_ms) {
  json body = demo_body("Tell me a long story", tokens, interval_ms);
  body["dialog_id"] = dialog;
  return body;
}

}  // namespace

TEST_CASE("sqlite store: a restart of the example server keeps every dialog") {
  SqlDir dir;
  std::string dialog, current, text;
  {
    ServerProcess p(sql_spec(dir.file()));
    const int port = p.require_ready();
    RawClient c(port);
    c.post_chat(sql_chat("kept-dialog", 5, 0));
    REQUIRE(c.read_to_eof(10000ms));
    text = c.joined_chat();
    REQUIRE_FALSE(text.empty());
    current = sql_get(port, "/api/dialogs/current")["id"].get<std::string>();
    check_exits_on_sigterm(p);
  }
  ServerProcess again(sql_spec(dir.file()));
  const int port = again.require_ready();
  const json list = sql_get(port, "/api/dialogs");
  INFO(list.dump());
  CHECK(list["current_dialog_id"] == current);
  bool found = false;
  for (const json& d : list["dialogs"]) found = found || d["id"] == "kept-dialog";
  CHECK(found);
  const auto [stored, outcome] = sql_assistant(port, "kept-dialog");
  CHECK(stored == text);
  CHECK(outcome == "completed");
}

TEST_CASE("sqlite store: 200 streams cut by SIGTERM are in the history as their clients got them") {
  constexpr int kStreams = 200;
  SqlDir dir;
  std::vector<std::unique_ptr<RawClient>> clients;
  {
    ServerProcess p(sql_spec(dir.file()));
    const int port = p.require_ready();
    for (int i = 0; i < kStreams; ++i) {
      auto c = std::make_unique<RawClient>(port);
      REQUIRE(c->post_chat(sql_chat("cut-" + std::to_string(i), 100000, 20)));
      clients.push_back(std::move(c));
    }
    for (auto& c : clients) REQUIRE(c->read_count("chat", 2, 10000ms));
    for (auto& c : clients) c->start_background_read(20000ms);
    REQUIRE(p.signal(SIGTERM));
    for (auto& c : clients) c->join_background();
    CHECK(p.wait_exit(10000ms));
    CHECK(p.exit_code() == 0);
  }
  ServerProcess again(sql_spec(dir.file()));
  const int port = again.require_ready();
  int exact = 0;
  for (int i = 0; i < kStreams; ++i) {
    const RawClient& c = *clients[i];
    REQUIRE(c.count("done") == 1);
    const auto [stored, outcome] = sql_assistant(port, "cut-" + std::to_string(i));
    INFO("dialog cut-" << i);
    CHECK(outcome == "shutdown");
    CHECK(stored == c.joined_chat());
    exact += stored == c.joined_chat() && outcome == "shutdown";
  }
  CHECK(exact == kStreams);
}

TEST_CASE("sqlite store: a SIGKILL mid-stream loses at most the last moments, never the file") {
  SqlDir dir;
  std::string received;
  {
    ServerProcess p(sql_spec(dir.file()));
    const int port = p.require_ready();
    RawClient c(port);
    REQUIRE(c.post_chat(sql_chat("killed", 100000, 10)));
    REQUIRE(c.read_count("chat", 50, 10000ms));
    REQUIRE(p.signal(SIGKILL));
    c.read_to_eof(5000ms);
    received = c.joined_chat();
    CHECK(p.wait_exit(5000ms));
  }
  ServerProcess again(sql_spec(dir.file()));
  const int port = again.require_ready();
  const auto [stored, outcome] = sql_assistant(port, "killed");
  // A prefix of what the client got, short of it by at most ~100 ms of
  // chunks (10 ms apart; a margin for a loaded machine).
  REQUIRE(received.compare(0, stored.size(), stored) == 0);
  const std::string missing = received.substr(stored.size());
  std::size_t chunks = 0;
  for (const char ch : missing) chunks += ch == ' ';
  MESSAGE("SIGKILL: " << missing.size() << " bytes (" << chunks << " words) not stored");
  CHECK(chunks <= 3 * 20);  // a chunk is about 3 words; 20 chunks = 200 ms
  CHECK(outcome == "running");
}

TEST_CASE(
    "sqlite store: a file locked by another process: streams finish, health says so, "
    "the shutdown is not held") {
  SqlDir dir;
  ServerProcess::Spec spec = sql_spec(dir.file());
  spec.args.insert(spec.args.end(), {"--grace-period", "1"});
  ServerProcess p(spec);
  const int port = p.require_ready();
  {
    RawClient c(port);
    REQUIRE(c.post_chat(sql_chat("before", 3, 10)));
    REQUIRE(c.read_to_eof(10000ms));
    REQUIRE(c.count("done") == 1);
  }
  CHECK(sql_get(port, "/health")["store_ok"] == true);

  // Another process takes the file's write lock and keeps it.
  sqlite3* other = nullptr;
  REQUIRE(sqlite3_open(dir.file().c_str(), &other) == SQLITE_OK);
  REQUIRE(sqlite3_exec(other, "BEGIN EXCLUSIVE", nullptr, nullptr, nullptr) == SQLITE_OK);

  RawClient during(port);
  REQUIRE(during.post_chat(sql_chat("during", 3, 10)));
  REQUIRE(during.read_to_eof(15000ms));  // it finishes, unrecorded
  CHECK(during.count("done") == 1);
  const auto asked = Clock::now();
  const json health = sql_get(port, "/health");
  CHECK(Clock::now() - asked < 1000ms);  // served while the store is stuck
  CHECK(health["store_ok"] == false);
  {
    RawClient m(port);
    REQUIRE(m.get("/metrics"));
    REQUIRE(m.read_response());
    CHECK(m.body.find("agentsmithy_store_errors_total 0\n") == std::string::npos);
    CHECK(m.body.find("agentsmithy_store_errors_total ") != std::string::npos);
  }

  // A SIGTERM with a stream running and the file still locked: the client
  // gets its end, and the exit waits for neither the lock nor the store.
  // (A new turn may first be refused: the failed commit is reported to the
  // next write, which is that turn's start: store_unavailable, then done.)
  std::unique_ptr<RawClient> cut;
  for (int attempt = 0; attempt < 3 && !cut; ++attempt) {
    auto c = std::make_unique<RawClient>(port);
    REQUIRE(c->post_chat(sql_chat("cut", 100000, 20)));
    REQUIRE(c->read_until([&] { return c->count("chat") >= 2 || c->count("done") == 1; }, 10000ms));
    if (c->count("done") == 1) {
      REQUIRE(c->count("error") == 1);
      CHECK(c->events[c->events.size() - 2].value("code", std::string()) == "store_unavailable");
    } else {
      cut = std::move(c);
    }
  }
  REQUIRE(cut);
  cut->start_background_read(20000ms);
  const auto signalled = Clock::now();
  REQUIRE(p.signal(SIGTERM));
  cut->join_background();
  CHECK(cut->count("error") == 1);
  CHECK(cut->count("done") == 1);
  REQUIRE(p.wait_exit(15000ms));
  const auto exit_ms = std::chrono::duration_cast<milliseconds>(Clock::now() - signalled);
  MESSAGE("locked store: exit " << exit_ms.count() << " ms after SIGTERM (grace 1 s)");
  CHECK(exit_ms < 6000ms);
  CHECK(p.exit_code() == 0);
  CHECK(p.output().find("store") != std::string::npos);  // logged

  sqlite3_exec(other, "ROLLBACK", nullptr, nullptr, nullptr);
  sqlite3_close(other);
  ServerProcess again(sql_spec(dir.file()));
  const int port2 = again.require_ready();
  CHECK(sql_assistant(port2, "before").second == "completed");
  CHECK(sql_get(port2, "/health")["store_ok"] == true);
}

TEST_CASE("sqlite store: a file that is not a store stops the server at start, naming it") {
  SqlDir dir;
  {
    std::FILE* f = std::fopen(dir.file().c_str(), "w");
    REQUIRE(f);
    std::fputs("this is not an SQLite database, just some text that is long enough", f);
    std::fclose(f);
  }
  ServerProcess p(sql_spec(dir.file()));
  REQUIRE(p.wait_exit(10000ms));
  CHECK(p.exit_code() == 1);
  CHECK(p.output().find(dir.file()) != std::string::npos);
}

#endif  // AGENTSMITHY_SQLITE_SUPPORT
