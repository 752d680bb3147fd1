// Issue 17: the dialog store (memory_store), AgentSmithy's history paging
// (the reference's test vectors) and the /api/dialogs handlers, driven
// directly with httplib::Request/Response objects.
#include <doctest/doctest.h>

#include <atomic>
#include <regex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "agentsmithy.hpp"

namespace {

using dlg_json = nlohmann::json;
namespace dlg_d = agentsmithy::detail;
using agentsmithy::DialogInfo;
using agentsmithy::DialogStore;
using agentsmithy::StoreError;
using agentsmithy::TurnOutcome;
using agentsmithy::TurnRecord;

dlg_json dlg_user(const std::string& text) { return {{"type", "user"}, {"content", text}}; }
dlg_json dlg_chat(const std::string& text) { return {{"type", "chat"}, {"content", text}}; }

// One whole turn in `store`: the user's message, the reply in one chat event.
void dlg_store_turn(DialogStore& store, const std::string& dialog, const std::string& turn_id,
                    const std::string& user, const std::string& reply,
                    TurnOutcome outcome = TurnOutcome::completed) {
  store.begin_turn(dialog, turn_id, dlg_user(user));
  if (!reply.empty()) store.append(turn_id, 1, {dlg_chat(reply)});
  store.end_turn(turn_id, outcome, "");
}

// A TurnRecord for history_page: the user event, then `events`.
TurnRecord dlg_record(const std::string& user, std::vector<dlg_json> events,
                      TurnOutcome outcome = TurnOutcome::completed, std::string code = "") {
  TurnRecord t;
  t.turn_id = "t-" + user;
  t.dialog_id = "D";
  t.outcome = outcome;
  t.error_code = std::move(code);
  t.events.push_back(dlg_user(user));
  for (auto& e : events) t.events.push_back(std::move(e));
  return t;
}

// U0 A1 U2 A3 ... U44: 22 answered turns and a last unanswered one.
std::vector<TurnRecord> dlg_45_messages() {
  std::vector<TurnRecord> turns;
  for (int i = 0; i < 44; i += 2) {
    turns.push_back(dlg_record("U" + std::to_string(i), {dlg_chat("A" + std::to_string(i + 1))}));
  }
  turns.push_back(dlg_record("U44", {}, TurnOutcome::completed));
  return turns;
}

std::vector<long long> dlg_idxs(const dlg_json& page) {
  std::vector<long long> out;
  for (const auto& e : page["events"]) {
    if (e.contains("idx")) out.push_back(e["idx"].get<long long>());
  }
  return out;
}

std::vector<long long> dlg_range(long long first, long long last) {
  std::vector<long long> out;
  for (long long i = first; i <= last; ++i) out.push_back(i);
  return out;
}

std::vector<std::string> dlg_ids(const std::vector<DialogInfo>& dialogs) {
  std::vector<std::string> out;
  for (const auto& d : dialogs) out.push_back(d.id);
  return out;
}

// A request as cpp-httplib hands it to a regex route: req.matches[1] is the
// dialog id of /api/dialogs/{id}[/...].
struct DlgCall {
  httplib::Request req;
  httplib::Response res;
  DlgCall(const std::string& method, const std::string& path, const std::string& body = "") {
    req.method = method;
    req.path = path;
    req.body = body;
    static const std::regex route(R"(/api/dialogs/([^/]+)(?:/[a-z]+)?)");
    std::regex_match(req.path, req.matches, route);
  }
  DlgCall& param(const std::string& key, const std::string& value) {
    req.params.emplace(key, value);
    return *this;
  }
  dlg_json body() const { return dlg_json::parse(res.body); }
};

// A store whose every call fails, as a database that went away.
class DlgBrokenStore final : public DialogStore {
 public:
  std::vector<DialogInfo> list_dialogs() override { throw StoreError("disk gone"); }
  std::optional<DialogInfo> find_dialog(const std::string&) override {
    throw StoreError("disk gone");
  }
  DialogInfo create_dialog(const std::string&, const std::optional<std::string>&) override {
    throw StoreError("disk gone");
  }
  std::optional<DialogInfo> rename_dialog(const std::string&, const std::string&) override {
    throw StoreError("disk gone");
  }
  bool delete_dialog(const std::string&) override { throw StoreError("disk gone"); }
  std::optional<std::string> current_dialog() override { throw StoreError("disk gone"); }
  void set_current_dialog(const std::optional<std::string>&) override {
    throw StoreError("disk gone");
  }
  void begin_turn(const std::string&, const std::string&, const dlg_json&) override {
    throw StoreError("disk gone");
  }
  void append(const std::string&, std::uint64_t, const std::vector<dlg_json>&) override {
    throw StoreError("disk gone");
  }
  void end_turn(const std::string&, TurnOutcome, const std::string&) override {
    throw StoreError("disk gone");
  }
  void sync() override { throw StoreError("disk gone"); }
  std::vector<TurnRecord> turns(const std::string&, std::size_t) override {
    throw StoreError("disk gone");
  }
  std::optional<TurnRecord> turn(const std::string&) override { throw StoreError("disk gone"); }
};

}  // namespace

// ---------------------------------------------------------------------------
// memory_store
// ---------------------------------------------------------------------------

TEST_CASE("dialogs store: dialogs are listed newest first, renamed, deleted, made current") {
  auto store = agentsmithy::memory_store();
  const DialogInfo a = store->create_dialog("a", std::nullopt);
  store->create_dialog("b", std::nullopt);
  store->create_dialog("c", std::string("C"));

  SUBCASE("timestamps are ISO 8601 UTC with microseconds and Z; a new dialog has no title") {
    const std::regex iso(R"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z)");
    CHECK(std::regex_match(a.created_at, iso));
    CHECK(a.created_at == a.updated_at);
    CHECK_FALSE(a.title.has_value());
    CHECK(store->find_dialog("c")->title == std::optional<std::string>("C"));
  }
  SUBCASE("list: updated_at, newest first; a turn and a rename bump updated_at") {
    CHECK(dlg_ids(store->list_dialogs()) == std::vector<std::string>{"c", "b", "a"});
    dlg_store_turn(*store, "a", "t1", "hi", "hello");
    CHECK(dlg_ids(store->list_dialogs()) == std::vector<std::string>{"a", "c", "b"});
    const auto renamed = store->rename_dialog("b", "Bee");
    REQUIRE(renamed);
    CHECK(renamed->title == std::optional<std::string>("Bee"));
    CHECK(dlg_ids(store->list_dialogs()) == std::vector<std::string>{"b", "a", "c"});
    CHECK(store->find_dialog("a")->updated_at > a.updated_at);
    CHECK_FALSE(store->rename_dialog("nope", "x"));
  }
  SUBCASE("create_dialog of an existing id returns it unchanged") {
    const DialogInfo again = store->create_dialog("a", std::string("other"));
    CHECK(again.id == "a");
    CHECK_FALSE(again.title.has_value());
    CHECK(again.updated_at == a.updated_at);
    CHECK(store->list_dialogs().size() == 3);
  }
  SUBCASE("delete removes the dialog and its turns; deleting the current one leaves none") {
    dlg_store_turn(*store, "a", "t1", "hi", "hello");
    store->set_current_dialog(std::string("a"));
    CHECK(store->current_dialog() == std::optional<std::string>("a"));
    CHECK(store->delete_dialog("a"));
    CHECK_FALSE(store->delete_dialog("a"));
    CHECK_FALSE(store->find_dialog("a"));
    CHECK_FALSE(store->turn("t1"));
    CHECK(store->turns("a", 10).empty());
    CHECK_FALSE(store->current_dialog());
    CHECK(dlg_ids(store->list_dialogs()) == std::vector<std::string>{"c", "b"});
  }
  SUBCASE("set_current_dialog: an unknown id throws, nullopt clears") {
    store->set_current_dialog(std::string("b"));
    CHECK_THROWS_AS(store->set_current_dialog(std::string("zz")), std::invalid_argument);
    CHECK(store->current_dialog() == std::optional<std::string>("b"));
    store->set_current_dialog(std::nullopt);
    CHECK_FALSE(store->current_dialog());
  }
}

TEST_CASE("dialogs store: a turn is an append-only log with a cursor and one final outcome") {
  auto store = agentsmithy::memory_store();
  store->begin_turn("d", "t1", dlg_user("hi"));  // an unknown dialog is adopted
  REQUIRE(store->find_dialog("d"));
  const std::string before_append = store->find_dialog("d")->updated_at;

  store->append("t1", 1, {dlg_chat("a"), dlg_chat("b")});
  CHECK(store->find_dialog("d")->updated_at == before_append);  // moves when a turn begins, ends
  store->append("t1", 2, {dlg_chat("b"), dlg_chat("c")});       // position 2 again: a replay
  store->append("t1", 4, {});
  CHECK_THROWS_AS(store->append("t1", 9, {dlg_chat("x")}), std::invalid_argument);
  store->append("unknown-turn", 1, {dlg_chat("x")});  // ignored

  auto t = store->turn("t1");
  REQUIRE(t);
  CHECK(t->dialog_id == "d");
  CHECK(t->outcome == TurnOutcome::running);
  CHECK(t->events ==
        std::vector<dlg_json>{dlg_user("hi"), dlg_chat("a"), dlg_chat("b"), dlg_chat("c")});
  CHECK_FALSE(t->started_at.empty());
  CHECK(t->ended_at.empty());

  store->end_turn("t1", TurnOutcome::error, "generator_error");
  store->end_turn("t1", TurnOutcome::completed, "");  // the first end is final
  t = store->turn("t1");
  CHECK(t->outcome == TurnOutcome::error);
  CHECK(t->error_code == "generator_error");
  CHECK_FALSE(t->ended_at.empty());
  CHECK_THROWS_AS(store->begin_turn("d", "t1", dlg_user("again")), std::invalid_argument);

  dlg_store_turn(*store, "d", "t2", "q2", "r2", TurnOutcome::shutdown);
  dlg_store_turn(*store, "d", "t3", "q3", "r3");
  const auto last_two = store->turns("d", 2);
  REQUIRE(last_two.size() == 2);
  CHECK(last_two[0].turn_id == "t2");
  CHECK(last_two[0].outcome == TurnOutcome::shutdown);
  CHECK(last_two[1].turn_id == "t3");
  CHECK(store->turns("d", 100).size() == 3);
  CHECK(store->turns("d", 0).empty());
  CHECK_FALSE(store->turn("nope"));

  CHECK(std::string(agentsmithy::turn_outcome_name(TurnOutcome::client_gone)) == "client_gone");
  CHECK(std::string(agentsmithy::turn_outcome_name(TurnOutcome::superseded)) == "superseded");
}

TEST_CASE("dialogs store: bounded in bytes, the oldest dialogs are evicted first") {
  const std::string text(200, 'x');
  const std::size_t turn_bytes =
      dlg_d::json_bytes(dlg_user(text)) + dlg_d::json_bytes(dlg_chat(text));
  auto shared = agentsmithy::memory_store(2 * turn_bytes + 10);
  auto& store = dynamic_cast<dlg_d::MemoryDialogStore&>(*shared);

  SUBCASE("bytes count the events (about their JSON) and the titles") {
    store.create_dialog("t", std::string("12345"));
    CHECK(store.bytes_used() == 5);
    dlg_store_turn(store, "t", "t1", text, text);
    CHECK(store.bytes_used() == 5 + turn_bytes);
    store.rename_dialog("t", "123");
    CHECK(store.bytes_used() == 3 + turn_bytes);
    store.delete_dialog("t");
    CHECK(store.bytes_used() == 0);
  }
  SUBCASE("the oldest goes first") {
    dlg_store_turn(store, "a", "ta", text, text);
    dlg_store_turn(store, "b", "tb", text, text);
    CHECK(store.list_dialogs().size() == 2);
    dlg_store_turn(store, "c", "tc", text, text);
    CHECK(dlg_ids(store.list_dialogs()) == std::vector<std::string>{"c", "b"});
    CHECK_FALSE(store.turn("ta"));
    CHECK(store.bytes_used() <= 2 * turn_bytes + 10);
  }
  SUBCASE("never the current dialog") {
    dlg_store_turn(store, "a", "ta", text, text);
    store.set_current_dialog(std::string("a"));
    dlg_store_turn(store, "b", "tb", text, text);
    dlg_store_turn(store, "c", "tc", text, text);
    CHECK(dlg_ids(store.list_dialogs()) == std::vector<std::string>{"c", "a"});
  }
  SUBCASE("never a dialog with a running turn; it goes once the turn ends and it is oldest") {
    store.begin_turn("a", "ta", dlg_user(text));
    store.append("ta", 1, {dlg_chat(text)});
    dlg_store_turn(store, "b", "tb", text, text);
    dlg_store_turn(store, "c", "tc", text, text);  // over: b goes, a is running
    CHECK(dlg_ids(store.list_dialogs()) == std::vector<std::string>{"c", "a"});
    store.end_turn("ta", TurnOutcome::completed, "");  // a is now the newest
    dlg_store_turn(store, "d", "td", text, text);
    CHECK(dlg_ids(store.list_dialogs()) == std::vector<std::string>{"d", "a"});
  }
}

TEST_CASE("dialogs store: concurrent turns, renames and listings from several threads") {
  auto shared = agentsmithy::memory_store(1 << 20);
  auto& store = dynamic_cast<dlg_d::MemoryDialogStore&>(*shared);
  constexpr int kThreads = 6, kTurns = 30, kChunks = 8;
  std::atomic<bool> stop{false};
  std::thread reader([&] {
    while (!stop.load()) {
      for (const auto& d : store.list_dialogs()) (void)store.turns(d.id, 5);
    }
  });
  std::vector<std::thread> writers;
  for (int w = 0; w < kThreads; ++w) {
    writers.emplace_back([&store, w] {
      const std::string dialog = "dlg" + std::to_string(w);
      store.create_dialog(dialog, std::nullopt);
      for (int t = 0; t < kTurns; ++t) {
        const std::string turn_id = dialog + "-" + std::to_string(t);
        store.begin_turn(dialog, turn_id, dlg_user("q"));
        for (int c = 0; c < kChunks; ++c) {
          store.append(turn_id, 1 + static_cast<std::uint64_t>(c), {dlg_chat("x")});
        }
        store.end_turn(turn_id, TurnOutcome::completed, "");
        store.rename_dialog(dialog, "title " + std::to_string(t));
        store.set_current_dialog(dialog);
      }
    });
  }
  for (auto& t : writers) t.join();
  stop = true;
  reader.join();

  std::size_t bytes = 0;
  REQUIRE(store.list_dialogs().size() == static_cast<std::size_t>(kThreads));
  for (const auto& d : store.list_dialogs()) {
    bytes += d.title->size();
    const auto turns = store.turns(d.id, 1000);
    REQUIRE(turns.size() == static_cast<std::size_t>(kTurns));
    for (const auto& t : turns) {
      CHECK(t.events.size() == static_cast<std::size_t>(1 + kChunks));
      CHECK(t.outcome == TurnOutcome::completed);
      for (const auto& e : t.events) bytes += dlg_d::json_bytes(e);
    }
  }
  CHECK(store.bytes_used() == bytes);
}

TEST_CASE("dialogs store: concurrent writers stay within the bound once their turns end") {
  const std::size_t bound = 4000;
  auto shared = agentsmithy::memory_store(bound);
  auto& store = dynamic_cast<dlg_d::MemoryDialogStore&>(*shared);
  std::vector<std::thread> writers;
  for (int w = 0; w < 4; ++w) {
    writers.emplace_back([&store, w] {
      for (int t = 0; t < 40; ++t) {
        const std::string dialog = "w" + std::to_string(w) + "d" + std::to_string(t);
        dlg_store_turn(store, dialog, dialog + "t", std::string(100, 'q'), std::string(100, 'a'));
      }
    });
  }
  for (auto& t : writers) t.join();
  CHECK(store.bytes_used() <= bound);
  CHECK_FALSE(store.list_dialogs().empty());
}

// ---------------------------------------------------------------------------
// history_page: the reference's section 4 and its test vectors
// ---------------------------------------------------------------------------

TEST_CASE("dialogs history: one turn and an empty dialog, exactly as the reference shows") {
  const dlg_json one =
      dlg_d::history_page("D", {dlg_record("hi", {dlg_chat("Hello!")})}, 20, std::nullopt);
  CHECK(one == dlg_json::parse(R"({"dialog_id":"D","events":[
      {"type":"user","content":"hi","idx":0},{"type":"chat","content":"Hello!","idx":1}],
      "total_events":2,"has_more":false,"first_idx":0,"last_idx":1})"));

  const dlg_json empty = dlg_d::history_page("D", {}, 20, std::nullopt);
  CHECK(empty == dlg_json::parse(R"({"dialog_id":"D","events":[],"total_events":0,
      "has_more":false,"first_idx":0,"last_idx":0})"));
}

TEST_CASE("dialogs history: paging 45 visible messages (the reference's vectors)") {
  const auto turns = dlg_45_messages();
  const auto page = [&](std::optional<long long> before) {
    return dlg_d::history_page("D", turns, 20, before);
  };

  SUBCASE("limit=20: idx 25..44, has_more") {
    const dlg_json p = page(std::nullopt);
    CHECK(dlg_idxs(p) == dlg_range(25, 44));
    CHECK(p["events"].size() == 20);
    CHECK(p["first_idx"] == 25);
    CHECK(p["last_idx"] == 44);
    CHECK(p["has_more"] == true);
    CHECK(p["total_events"] == 45);
    CHECK(p["events"][0] == dlg_json::parse(R"({"type":"chat","content":"A25","idx":25})"));
    CHECK(p["events"][19] == dlg_json::parse(R"({"type":"user","content":"U44","idx":44})"));
    CHECK(dlg_d::history_page("D", turns, std::nullopt, std::nullopt) == p);  // default 20
  }
  SUBCASE("before=25: idx 5..24, has_more") {
    const dlg_json p = page(25);
    CHECK(dlg_idxs(p) == dlg_range(5, 24));
    CHECK(p["first_idx"] == 5);
    CHECK(p["last_idx"] == 24);
    CHECK(p["has_more"] == true);
  }
  SUBCASE("before=5: idx 0..4, no more") {
    const dlg_json p = page(5);
    CHECK(dlg_idxs(p) == dlg_range(0, 4));
    CHECK(p["first_idx"] == 0);
    CHECK(p["has_more"] == false);
  }
  SUBCASE("before=37 (a cursor after pruning): idx 17..36, has_more") {
    const dlg_json p = page(37);
    CHECK(dlg_idxs(p) == dlg_range(17, 36));
    CHECK(p["first_idx"] == 17);
    CHECK(p["has_more"] == true);
  }
  SUBCASE("before=0: no events, first_idx 0, no more") {
    const dlg_json p = page(0);
    CHECK(p["events"].empty());
    CHECK(p["first_idx"] == 0);
    CHECK(p["last_idx"] == 0);
    CHECK(p["has_more"] == false);
    CHECK(p["total_events"] == 45);
  }
  SUBCASE("before=999 is clamped to N: idx 25..44 as without before") {
    const dlg_json p = page(999);
    CHECK(dlg_idxs(p) == dlg_range(25, 44));
    CHECK(p["has_more"] == true);
    CHECK(p == page(std::nullopt));
  }
  SUBCASE("a limit larger than N answers everything") {
    const dlg_json p = dlg_d::history_page("D", turns, 1000, std::nullopt);
    CHECK(dlg_idxs(p) == dlg_range(0, 44));
    CHECK(p["has_more"] == false);
  }
}

TEST_CASE("dialogs history: reasoning before the chat message, tool calls and edits after") {
  const dlg_json tool_call = {
      {"type", "tool_call"}, {"id", "c1"}, {"name", "read_file"}, {"args", {{"path", "a"}}}};
  const dlg_json file_edit = {{"type", "file_edit"}, {"file", "a"}, {"diff", "+x"}};
  const TurnRecord turn = dlg_record("hi", {{{"type", "reasoning_start"}},
                                            {{"type", "reasoning"}, {"content", "think "}},
                                            {{"type", "reasoning"}, {"content", "hard"}},
                                            {{"type", "reasoning_end"}},
                                            {{"type", "chat_start"}},
                                            dlg_chat("Hel"),
                                            tool_call,
                                            {{"type", "reasoning"}, {"content", "again"}},
                                            file_edit,
                                            dlg_chat("lo"),
                                            {{"type", "chat_end"}}});
  const dlg_json p = dlg_d::history_page("D", {turn}, 20, std::nullopt);
  CHECK(p["events"] == dlg_json::parse(R"([
      {"type":"user","content":"hi","idx":0},
      {"type":"reasoning","content":"think hard"},
      {"type":"reasoning","content":"again"},
      {"type":"chat","content":"Hello","idx":1},
      {"type":"tool_call","id":"c1","name":"read_file","args":{"path":"a"}},
      {"type":"file_edit","file":"a","diff":"+x"}])"));
  CHECK(p["total_events"] == 2 + 2 + 1 + 1);
  CHECK(p["first_idx"] == 0);
  CHECK(p["last_idx"] == 1);
}

TEST_CASE("dialogs history: a tool-only turn has no idx and its events travel with its user") {
  const dlg_json tool_call = {
      {"type", "tool_call"}, {"id", "c1"}, {"name", "ls"}, {"args", dlg_json::object()}};
  const std::vector<TurnRecord> turns = {
      dlg_record("list", {{{"type", "reasoning"}, {"content", "hm"}}, tool_call, dlg_chat("  ")}),
      dlg_record("q", {dlg_chat("a")})};

  const dlg_json all = dlg_d::history_page("D", turns, 20, std::nullopt);
  CHECK(all["events"] == dlg_json::parse(R"([
      {"type":"user","content":"list","idx":0},
      {"type":"reasoning","content":"hm"},
      {"type":"tool_call","id":"c1","name":"ls","args":{}},
      {"type":"user","content":"q","idx":1},
      {"type":"chat","content":"a","idx":2}])"));
  CHECK(all["total_events"] == 3 + 2);

  const dlg_json last = dlg_d::history_page("D", turns, 2, std::nullopt);
  CHECK(dlg_idxs(last) == std::vector<long long>{1, 2});
  CHECK(last["events"].size() == 2);
  CHECK(last["has_more"] == true);

  const dlg_json first = dlg_d::history_page("D", turns, 2, 1);
  CHECK(first["events"].size() == 3);
  CHECK(first["events"][2]["type"] == "tool_call");
  CHECK(first["has_more"] == false);
  CHECK(first["first_idx"] == 0);
  CHECK(first["last_idx"] == 0);
}

TEST_CASE("dialogs history: a turn that did not complete shows its outcome on its chat event") {
  const std::vector<TurnRecord> turns = {
      dlg_record("a", {dlg_chat("partial"), {{"type", "error"}, {"error", "boom"}}},
                 TurnOutcome::error, "generator_error"),
      dlg_record("b", {dlg_chat("cut")}, TurnOutcome::shutdown),
      dlg_record("c", {dlg_chat("done")}, TurnOutcome::completed),
      dlg_record("d", {}, TurnOutcome::client_gone),  // no text: nothing to carry it
      dlg_record("e", {dlg_chat("so far")}, TurnOutcome::running)};
  const dlg_json p = dlg_d::history_page("D", turns, 20, std::nullopt);
  CHECK(p["events"] == dlg_json::parse(R"([
      {"type":"user","content":"a","idx":0},
      {"type":"chat","content":"partial","idx":1,"outcome":"error","outcome_code":"generator_error"},
      {"type":"user","content":"b","idx":2},
      {"type":"chat","content":"cut","idx":3,"outcome":"shutdown"},
      {"type":"user","content":"c","idx":4},
      {"type":"chat","content":"done","idx":5},
      {"type":"user","content":"d","idx":6},
      {"type":"user","content":"e","idx":7},
      {"type":"chat","content":"so far","idx":8,"outcome":"running"}])"));
}

TEST_CASE("dialogs history: the cache's pages equal pages read afresh as turns run, end, go") {
  auto store = agentsmithy::memory_store();
  dlg_d::HistoryCache cache(4096);  // small: evictions happen too
  const auto fresh = [&](std::optional<long long> limit, std::optional<long long> before) {
    return dlg_d::history_page("D", store->turns("D", static_cast<std::size_t>(-1)), limit, before);
  };
  const auto same = [&](const char* when) {
    INFO(when);
    for (const auto& [limit, before] :
         std::vector<std::pair<std::optional<long long>, std::optional<long long>>>{
             {std::nullopt, std::nullopt}, {3, std::nullopt}, {2, 5}, {100, 1}, {1, 0}}) {
      CHECK(cache.page(*store, "D", limit, before) == fresh(limit, before));
    }
  };
  store->create_dialog("D", std::nullopt);
  same("empty");
  for (int i = 0; i < 12; ++i) {
    dlg_store_turn(*store, "D", "t" + std::to_string(i), "q" + std::to_string(i),
                   i % 3 == 0 ? "" : std::string(300, 'a' + i % 26));
  }
  same("twelve ended turns");
  same("again, from the cache");
  CHECK(cache.bytes() <= 4096);

  store->begin_turn("D", "run", dlg_user("running"));
  store->append("run", 1, {dlg_chat("so far")});
  same("a running turn");
  store->append("run", 2, {dlg_chat(", and more")});
  same("the running turn grew");
  store->end_turn("run", TurnOutcome::shutdown, "");
  same("the running turn ended");

  store->delete_dialog("D");
  store->create_dialog("D", std::nullopt);
  dlg_store_turn(*store, "D", "t-new", "new", "answer");
  same("the dialog deleted and made again");
}

TEST_CASE("dialogs history: dialog JSON has a null title until named") {
  DialogInfo d{"x", std::nullopt, "2026-12-07T11:09:20.123456Z", "2026-12-07T11:09:21.000000Z"};
  CHECK(dlg_d::dialog_json(d) == dlg_json::parse(R"({"id":"x","title":null,
      "created_at":"2026-12-07T11:09:20.123456Z","updated_at":"2026-12-07T11:09:21.000000Z"})"));
  d.title = "T";
  const dlg_json list = dlg_d::dialog_list_json({d}, std::string("x"));
  CHECK(list["current_dialog_id"] == "x");
  CHECK(list["dialogs"][0]["title"] == "T");
  CHECK(dlg_d::dialog_list_json({}, std::nullopt) ==
        dlg_json::parse(R"({"current_dialog_id":null,"dialogs":[]})"));
}

// ---------------------------------------------------------------------------
// DialogsApi: the handlers, driven directly
// ---------------------------------------------------------------------------

TEST_CASE("dialogs api: there is always a current dialog") {
  auto store = agentsmithy::memory_store();
  std::mutex dlg_current_mu;
  dlg_d::StoreHealth dlg_health([](const std::string&) {});
  dlg_d::DialogsApi api(store, dlg_current_mu, dlg_health);
  api.ensure_current_dialog();
  const auto current = store->current_dialog();
  REQUIRE(current);
  CHECK(dlg_d::valid_dialog_id(*current));
  CHECK(store->list_dialogs().size() == 1);
  api.ensure_current_dialog();  // nothing to do
  CHECK(store->list_dialogs().size() == 1);

  DlgCall get("GET", "/api/dialogs/current");
  api.get_current(get.req, get.res);
  CHECK(get.res.status == 200);
  CHECK(get.res.get_header_value("Content-Type") == "application/json");
  CHECK(get.body()["id"] == *current);
  CHECK(get.body()["meta"]["id"] == *current);

  DlgCall list("GET", "/api/dialogs");
  api.list_dialogs(list.req, list.res);
  CHECK(list.res.status == 200);
  CHECK(list.body()["current_dialog_id"] == *current);
  CHECK(list.body()["dialogs"].size() == 1);
  CHECK(list.body()["dialogs"][0]["title"].is_null());
}

TEST_CASE("dialogs api: POST returns the full dialog and makes it current") {
  auto store = agentsmithy::memory_store();
  std::mutex dlg_current_mu;
  dlg_d::StoreHealth dlg_health([](const std::string&) {});
  dlg_d::DialogsApi api(store, dlg_current_mu, dlg_health);
  api.ensure_current_dialog();

  DlgCall post("POST", "/api/dialogs", "{}");
  api.create_dialog(post.req, post.res);
  REQUIRE(post.res.status == 200);
  const dlg_json made = post.body();
  CHECK(made["id"].get<std::string>().size() == 32);
  CHECK(made["title"].is_null());
  CHECK(made["created_at"].is_string());
  CHECK(made["updated_at"].is_string());
  CHECK(store->current_dialog() == std::optional<std::string>(made["id"].get<std::string>()));

  DlgCall list("GET", "/api/dialogs");
  api.list_dialogs(list.req, list.res);
  CHECK(list.body()["dialogs"][0]["id"] == made["id"]);  // newest first
  CHECK(list.body()["current_dialog_id"] == made["id"]);

  SUBCASE("with a title, trimmed; without a body; set_current false") {
    DlgCall titled("POST", "/api/dialogs", R"({"title":"  Fix login  "})");
    api.create_dialog(titled.req, titled.res);
    CHECK(titled.res.status == 200);
    CHECK(titled.body()["title"] == "Fix login");
    DlgCall bare("POST", "/api/dialogs");
    api.create_dialog(bare.req, bare.res);
    CHECK(bare.res.status == 200);
    DlgCall quiet("POST", "/api/dialogs", R"({"set_current":false})");
    api.create_dialog(quiet.req, quiet.res);
    CHECK(quiet.res.status == 200);
    CHECK(store->current_dialog() ==
          std::optional<std::string>(bare.body()["id"].get<std::string>()));
  }
  SUBCASE("bad bodies: 400 for invalid JSON, 422 naming the field") {
    DlgCall bad("POST", "/api/dialogs", "{nope");
    api.create_dialog(bad.req, bad.res);
    CHECK(bad.res.status == 400);
    CHECK(bad.body()["error"].get<std::string>().rfind("Invalid JSON", 0) == 0);
    DlgCall array("POST", "/api/dialogs", "[]");
    api.create_dialog(array.req, array.res);
    CHECK(array.res.status == 422);
    DlgCall number("POST", "/api/dialogs", R"({"title":5})");
    api.create_dialog(number.req, number.res);
    CHECK(number.res.status == 422);
    CHECK(number.body()["error"] == "title: must be a string");
    DlgCall flag("POST", "/api/dialogs", R"({"set_current":"yes"})");
    api.create_dialog(flag.req, flag.res);
    CHECK(flag.res.status == 422);
    CHECK(store->list_dialogs().size() == 2);
  }
}

TEST_CASE("dialogs api: switching the current dialog") {
  auto store = agentsmithy::memory_store();
  std::mutex dlg_current_mu;
  dlg_d::StoreHealth dlg_health([](const std::string&) {});
  dlg_d::DialogsApi api(store, dlg_current_mu, dlg_health);
  store->create_dialog("one", std::nullopt);
  store->create_dialog("two", std::nullopt);
  store->set_current_dialog(std::string("two"));

  DlgCall ok("PATCH", "/api/dialogs/current");
  ok.param("id", "one");
  api.set_current(ok.req, ok.res);
  CHECK(ok.res.status == 200);
  CHECK(ok.body()["ok"] == true);
  CHECK(store->current_dialog() == std::optional<std::string>("one"));

  DlgCall unknown("PATCH", "/api/dialogs/current");
  unknown.param("id", "nope");
  api.set_current(unknown.req, unknown.res);
  CHECK(unknown.res.status == 404);
  CHECK(unknown.body()["error"] == "Dialog not found: nope");

  DlgCall missing("PATCH", "/api/dialogs/current");
  api.set_current(missing.req, missing.res);
  CHECK(missing.res.status == 422);
  CHECK(missing.body()["error"] == "id: query parameter required");

  DlgCall bad("PATCH", "/api/dialogs/current");
  bad.param("id", "no spaces");
  api.set_current(bad.req, bad.res);
  CHECK(bad.res.status == 422);
  CHECK(store->current_dialog() == std::optional<std::string>("one"));
}

TEST_CASE("dialogs api: get, rename and delete by id") {
  auto store = agentsmithy::memory_store();
  std::mutex dlg_current_mu;
  dlg_d::StoreHealth dlg_health([](const std::string&) {});
  dlg_d::DialogsApi api(store, dlg_current_mu, dlg_health);
  store->create_dialog("one", std::nullopt);
  store->create_dialog("two", std::nullopt);
  store->set_current_dialog(std::string("one"));

  SUBCASE("get: 200, 404 unknown, 422 bad id") {
    DlgCall get("GET", "/api/dialogs/one");
    api.get_dialog(get.req, get.res);
    CHECK(get.res.status == 200);
    CHECK(get.body()["id"] == "one");
    DlgCall unknown("GET", "/api/dialogs/zzz");
    api.get_dialog(unknown.req, unknown.res);
    CHECK(unknown.res.status == 404);
    CHECK(unknown.body()["error"] == "Dialog not found: zzz");
    DlgCall bad("GET", "/api/dialogs/bad!id");
    api.get_dialog(bad.req, bad.res);
    CHECK(bad.res.status == 422);
  }
  SUBCASE("rename answers the full dialog") {
    DlgCall patch("PATCH", "/api/dialogs/one", R"({"title":"Fix login bug"})");
    api.patch_dialog(patch.req, patch.res);
    CHECK(patch.res.status == 200);
    CHECK(patch.body()["id"] == "one");
    CHECK(patch.body()["title"] == "Fix login bug");
    CHECK(patch.body()["created_at"].is_string());
    CHECK(patch.body()["updated_at"].is_string());
    CHECK(store->list_dialogs()[0].id == "one");
    for (const char* body : {R"({})", R"({"title":""})", R"({"title":"   "})", R"({"title":1})"}) {
      DlgCall bad("PATCH", "/api/dialogs/one", body);
      api.patch_dialog(bad.req, bad.res);
      CHECK(bad.res.status == 422);
      CHECK(bad.body()["error"].get<std::string>().rfind("title: ", 0) == 0);
    }
    DlgCall unknown("PATCH", "/api/dialogs/zzz", R"({"title":"x"})");
    api.patch_dialog(unknown.req, unknown.res);
    CHECK(unknown.res.status == 404);
  }
  SUBCASE("delete: the most recent remaining dialog becomes current; 404 unknown") {
    DlgCall del("DELETE", "/api/dialogs/one");
    api.delete_dialog(del.req, del.res);
    CHECK(del.res.status == 200);
    CHECK(del.body()["ok"] == true);
    CHECK(del.body()["current_dialog_id"] == "two");
    CHECK(store->current_dialog() == std::optional<std::string>("two"));
    DlgCall again("DELETE", "/api/dialogs/one");
    api.delete_dialog(again.req, again.res);
    CHECK(again.res.status == 404);
  }
  SUBCASE("deleting the last dialog creates a fresh current one") {
    DlgCall a("DELETE", "/api/dialogs/one");
    api.delete_dialog(a.req, a.res);
    DlgCall b("DELETE", "/api/dialogs/two");
    api.delete_dialog(b.req, b.res);
    CHECK(b.res.status == 200);
    const auto dialogs = store->list_dialogs();
    REQUIRE(dialogs.size() == 1);
    CHECK(dialogs[0].id != "one");
    CHECK(dialogs[0].id != "two");
    CHECK(store->current_dialog() == std::optional<std::string>(dialogs[0].id));
    CHECK(b.body()["current_dialog_id"] == dialogs[0].id);
  }
}

TEST_CASE("dialogs api: history pages through the stored turns; session is a stub") {
  auto store = agentsmithy::memory_store();
  std::mutex dlg_current_mu;
  dlg_d::StoreHealth dlg_health([](const std::string&) {});
  dlg_d::DialogsApi api(store, dlg_current_mu, dlg_health);
  store->create_dialog("d", std::nullopt);
  for (int i = 0; i < 3; ++i) {
    dlg_store_turn(*store, "d", "t" + std::to_string(i), "q" + std::to_string(i),
                   "a" + std::to_string(i));
  }

  DlgCall page("GET", "/api/dialogs/d/history");
  page.param("limit", "4");
  api.history(page.req, page.res);
  CHECK(page.res.status == 200);
  CHECK(page.body()["dialog_id"] == "d");
  CHECK(dlg_idxs(page.body()) == dlg_range(2, 5));
  CHECK(page.body()["has_more"] == true);

  DlgCall earlier("GET", "/api/dialogs/d/history");
  earlier.param("limit", "20").param("before", "2");
  api.history(earlier.req, earlier.res);
  CHECK(dlg_idxs(earlier.body()) == dlg_range(0, 1));
  CHECK(earlier.body()["has_more"] == false);

  DlgCall plain("GET", "/api/dialogs/d/history");
  api.history(plain.req, plain.res);
  CHECK(dlg_idxs(plain.body()) == dlg_range(0, 5));

  for (const auto& [key, value] :
       std::vector<std::pair<std::string, std::string>>{{"limit", "0"},
                                                        {"limit", "-3"},
                                                        {"limit", "abc"},
                                                        {"limit", ""},
                                                        {"limit", "99999999999999999999999"},
                                                        {"before", "-1"},
                                                        {"before", "x"}}) {
    DlgCall bad("GET", "/api/dialogs/d/history");
    bad.param(key, value);
    api.history(bad.req, bad.res);
    CHECK(bad.res.status == 422);
    CHECK(bad.body()["error"].get<std::string>().rfind(key + ": ", 0) == 0);
  }

  DlgCall unknown("GET", "/api/dialogs/zzz/history");
  api.history(unknown.req, unknown.res);
  CHECK(unknown.res.status == 404);
  CHECK(unknown.body()["error"] == "Dialog not found: zzz");

  DlgCall session("GET", "/api/dialogs/d/session");
  api.session(session.req, session.res);
  CHECK(session.res.status == 200);
  CHECK(session.body() == dlg_json::parse(R"({"has_unapproved":false,"changed_files":[]})"));
  DlgCall no_session("GET", "/api/dialogs/zzz/session");
  api.session(no_session.req, no_session.res);
  CHECK(no_session.res.status == 404);
}

TEST_CASE("dialogs api: a failing store answers 503 store_unavailable") {
  std::mutex dlg_current_mu;
  std::string dlg_logged;
  dlg_d::StoreHealth dlg_health([&](const std::string& m) { dlg_logged = m; });
  dlg_d::DialogsApi api(std::make_shared<DlgBrokenStore>(), dlg_current_mu, dlg_health);
  DlgCall list("GET", "/api/dialogs");
  api.list_dialogs(list.req, list.res);
  CHECK(list.res.status == 503);
  CHECK(list.body()["code"] == "store_unavailable");
  // The store's own message is logged, never sent to a client.
  CHECK(list.body()["error"].get<std::string>().find("disk gone") == std::string::npos);
  CHECK(dlg_logged.find("disk gone") != std::string::npos);
  CHECK_FALSE(dlg_health.ok());
  CHECK(dlg_health.errors() >= 1);
  DlgCall history("GET", "/api/dialogs/d/history");
  api.history(history.req, history.res);
  CHECK(history.res.status == 503);
  DlgCall post("POST", "/api/dialogs", "{}");
  api.create_dialog(post.req, post.res);
  CHECK(post.res.status == 503);
}
