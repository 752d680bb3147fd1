// libFuzzer target: AgentSmithy's dialogs API as a client drives it, through
// agentsmithy::detail::DialogsApi on a memory store: the dialogs' JSON bodies
// (POST, PATCH), the history's query (limit, before), ids of any bytes, in
// any order, and the turn log that the history pages through.
//
// The input is a script of lines; each line is one call:
//   P <json>            POST /api/dialogs with that body
//   R <id> <json>       PATCH /api/dialogs/<id> with that body
//   C <id>              PATCH /api/dialogs/current?id=<id>
//   D <id>              DELETE /api/dialogs/<id>
//   H <id> <limit> <before>   GET .../history?limit=&before= ("-": absent)
//   T <id> <json>       a turn of dialog <id>: the user event, then <json>
//                       (an array of events) appended, then an outcome
// Checked for every call:
// - nothing throws out of a handler (a throw would answer 500);
// - every answer is 200, 400, 404 or 422, with a JSON object body;
// - a history page obeys the paging rules: dense idx between first_idx and
//   last_idx, has_more exactly when the page does not start at 0;
// - there is always a current dialog that exists, after any call.
//
//   make fuzz          (corpus in tests/fuzz/corpus_fuzz_dialogs/)
#include <agentsmithy.hpp>

#include "fuzz_check.hpp"

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <sstream>
#include <string>

namespace {

using nlohmann::json;
namespace detail = agentsmithy::detail;

struct Call {
  httplib::Request req;
  httplib::Response res;
  Call(const std::string& method, const std::string& path, const std::string& body,
       const std::string& id) {
    req.method = method;
    req.path = path;
    req.body = body;
    // What cpp-httplib's regex routes set: matches[1] is the id.
    static const std::regex any("/api/dialogs/(.*)");
    std::regex_match(req.path, req.matches, any);
    (void)id;
  }
  json body() const { return json::parse(res.body, nullptr, false); }
};

void check_answer(const Call& c) {
  FUZZ_CHECK(c.res.status == 200 || c.res.status == 400 || c.res.status == 404 ||
             c.res.status == 422);
  FUZZ_CHECK(c.body().is_object());
}

void check_page(const json& page) {
  if (!page.is_object() || !page.contains("events")) return;
  long long expected = -1, first = -1, last = -1;
  for (const json& e : page["events"]) {
    if (!e.contains("idx")) continue;
    const long long idx = e["idx"].get<long long>();
    if (expected >= 0) FUZZ_CHECK(idx == expected);
    if (first < 0) first = idx;
    last = idx;
    expected = idx + 1;
  }
  if (first >= 0) {
    FUZZ_CHECK(page["first_idx"] == first);
    FUZZ_CHECK(page["last_idx"] == last);
    FUZZ_CHECK(page["has_more"] == (first > 0));
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string input(reinterpret_cast<const char*>(data), size);
  auto store = agentsmithy::memory_store(1 << 16);
  std::mutex current_mu;
  detail::StoreHealth health([](const std::string&) {});
  detail::DialogsApi api(store, current_mu, health);
  std::istringstream lines(input);
  std::string line;
  int turn = 0;
  try {
    while (std::getline(lines, line)) {
      std::istringstream in(line);
      std::string op, id, a, b;
      in >> op;
      if (op == "P") {
        std::getline(in, a);
        Call c("POST", "/api/dialogs", a, "");
        api.create_dialog(c.req, c.res);
        check_answer(c);
      } else if (op == "R" || op == "D" || op == "C") {
        in >> id;
        std::getline(in, a);
        if (op == "C") {
          Call c("PATCH", "/api/dialogs/current", "", "");
          c.req.params.emplace("id", id);
          api.set_current(c.req, c.res);
          check_answer(c);
        } else {
          Call c(op == "R" ? "PATCH" : "DELETE", "/api/dialogs/" + id, a, id);
          if (op == "R") {
            api.patch_dialog(c.req, c.res);
          } else {
            api.delete_dialog(c.req, c.res);
          }
          check_answer(c);
        }
      } else if (op == "H") {
        in >> id >> a >> b;
        Call c("GET", "/api/dialogs/" + id + "/history", "", id);
        std::regex_match(c.req.path, c.req.matches, std::regex("/api/dialogs/(.*)/history"));
        if (!a.empty() && a != "-") c.req.params.emplace("limit", a);
        if (!b.empty() && b != "-") c.req.params.emplace("before", b);
        api.history(c.req, c.res);
        check_answer(c);
        if (c.res.status == 200) check_page(c.body());
      } else if (op == "T") {
        in >> id;
        std::getline(in, a);
        if (!detail::valid_dialog_id(id)) continue;
        const json events = json::parse(a, nullptr, false);
        const std::string t = "fuzz-turn-" + std::to_string(turn++);
        store->begin_turn(id, t, json{{"type", "user"}, {"content", id}});
        if (events.is_array()) {
          std::vector<json> batch;
          for (const json& e : events)
            if (e.is_object()) batch.push_back(e);
          store->append(t, 1, batch);
        }
        store->end_turn(
            t, turn % 2 ? agentsmithy::TurnOutcome::completed : agentsmithy::TurnOutcome::shutdown,
            "");
      }
      Call current("GET", "/api/dialogs/current", "", "");
      api.get_current(current.req, current.res);
      FUZZ_CHECK(current.res.status == 200);
      const json cur = current.body();
      FUZZ_CHECK(cur.contains("id") && cur["id"].is_string());
      FUZZ_CHECK(store->find_dialog(cur["id"].get<std::string>()).has_value());
    }
  } catch (const std::exception& e) {
    fuzz::unexpected_exception("the dialogs API", &e);
  }
  return 0;
}
