// libFuzzer target: an arbitrary POST /api/chat body through
// agentsmithy::detail::parse_chat_request, the server's only parser of what a
// client sends in a body.
//
// Checked for every input:
// - nothing throws (a throw would reach cpp-httplib and answer 500);
// - the nesting guard: json_nesting_depth() equals the real depth of any body
//   that parses, and a body deeper than kMaxJsonDepth is refused with 400
//   before it is parsed;
// - the outcome agrees with a reference validator written from the rules in
//   design.md: 400 for bodies that are not JSON, 422 for a wrong shape, 400
//   without a user message, success otherwise, and on success every field is
//   the body's (dialog_id valid or empty, context an object);
// - the error body built from any error message is valid JSON;
// - the demo generator's reading of context.demo throws nothing but
//   std::invalid_argument and returns values in range.
//
//   make fuzz          (60 s; corpus in tests/fuzz/corpus_fuzz_request/)
#include <agentsmithy.hpp>

#include "fuzz_check.hpp"

#include <cstddef>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>

namespace {

using agentsmithy::ChatRequest;
using nlohmann::json;
namespace detail = agentsmithy::detail;

std::size_t real_depth(const json& v) {
  if (!v.is_structured()) return 0;
  std::size_t deepest = 0;
  for (const auto& child : v) deepest = std::max(deepest, real_depth(child));
  return deepest + 1;
}

// What design.md says about a parsed body: the status of the answer, or
// nullopt when the request is accepted.
std::optional<int> reference_status(const json& doc) {
  if (!doc.is_object()) return 422;
  const auto messages = doc.find("messages");
  if (messages == doc.end() || !messages->is_array()) return 422;
  bool has_user = false;
  for (const auto& m : *messages) {
    if (!m.is_object()) return 422;
    const auto role = m.find("role");
    const auto content = m.find("content");
    if (role == m.end() || !role->is_string()) return 422;
    if (content == m.end() || !content->is_string()) return 422;
    if (*role == "user") has_user = true;
  }
  if (const auto s = doc.find("stream"); s != doc.end() && !s->is_boolean()) return 422;
  if (const auto c = doc.find("context"); c != doc.end() && !c->is_null() && !c->is_object()) {
    return 422;
  }
  if (const auto id = doc.find("dialog_id"); id != doc.end() && !id->is_null()) {
    if (!id->is_string()) return 422;
    const auto& text = id->get_ref<const std::string&>();
    if (text.empty() || text.size() > 128) return 422;
    for (const char ch : text) {
      const bool ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
                      (ch >= '0' && ch <= '9') || ch == '-' || ch == '_';
      if (!ok) return 422;
    }
  }
  if (!has_user) return 400;
  return std::nullopt;
}

void check_demo_setting(const json& context, const char* field, long long low, long long high) {
  try {
    const long long v = detail::demo_setting(context, field, low, high, -7);
    FUZZ_CHECK(v == -7 || (v >= low && v <= high));
  } catch (const std::invalid_argument&) {
    // the documented answer to an out-of-range or non-integer value
  } catch (const std::exception& e) {
    fuzz::unexpected_exception("demo_setting", &e);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view body(reinterpret_cast<const char*>(data), size);

  // The guard against deep nesting, checked against the parsed depth.
  const std::size_t guard_depth = detail::json_nesting_depth(body);
  const json doc = json::parse(body.begin(), body.end(), nullptr, /*allow_exceptions=*/false);
  // A NUL is never valid JSON; the server refuses the body rather than let
  // the parser stop there and ignore the rest.
  const bool is_json = !doc.is_discarded() && body.find('\0') == std::string_view::npos;
  if (!doc.is_discarded()) {
    // nlohmann_json stops reading at a NUL byte outside a string (none can be
    // inside one), so it parsed the text before the first NUL; the guard reads
    // the whole body and may only count more.
    const std::string_view parsed = body.substr(0, body.find('\0'));
    FUZZ_CHECK(real_depth(doc) == detail::json_nesting_depth(parsed));
    FUZZ_CHECK(guard_depth >= detail::json_nesting_depth(parsed));
  }

  ChatRequest req;
  req.dialog_id = "stale";  // parse_chat_request must overwrite every field
  req.stream = false;
  std::optional<detail::HttpError> err;
  try {
    err = detail::parse_chat_request(body, req);
  } catch (const std::exception& e) {
    fuzz::unexpected_exception("parse_chat_request", &e);
  } catch (...) {
    fuzz::unexpected_exception("parse_chat_request", nullptr);
  }

  if (err) {
    FUZZ_CHECK(err->status == 400 || err->status == 422);
    FUZZ_CHECK(!err->message.empty());
    // The answer's body is built from the message, which may quote raw input.
    std::string error_body;
    try {
      error_body = detail::error_body(err->message);
    } catch (const std::exception& e) {
      fuzz::unexpected_exception("error_body", &e);
    }
    const json parsed = json::parse(error_body, nullptr, false);
    FUZZ_CHECK(!parsed.is_discarded());
    FUZZ_CHECK(parsed.is_object() && parsed.size() == 1 && parsed["error"].is_string());
  }

  if (guard_depth > detail::kMaxJsonDepth) {
    FUZZ_CHECK(err && err->status == 400);
    return 0;
  }
  if (!is_json) {
    FUZZ_CHECK(err && err->status == 400);
    FUZZ_CHECK(err->message.rfind("Invalid JSON", 0) == 0);
    return 0;
  }

  const std::optional<int> expected = reference_status(doc);
  if (expected) {
    FUZZ_CHECK(err && err->status == *expected);
    return 0;
  }
  FUZZ_CHECK(!err);

  // Accepted: every field is the body's.
  const json& messages = doc["messages"];
  FUZZ_CHECK(req.messages.size() == messages.size());
  for (std::size_t i = 0; i < messages.size(); ++i) {
    FUZZ_CHECK(req.messages[i].role == messages[i]["role"].get<std::string>());
    FUZZ_CHECK(req.messages[i].content == messages[i]["content"].get<std::string>());
  }
  const auto stream = doc.find("stream");
  FUZZ_CHECK(req.stream == (stream == doc.end() ? true : stream->get<bool>()));
  FUZZ_CHECK(req.context.is_object());
  const auto context = doc.find("context");
  if (context == doc.end() || context->is_null()) {
    FUZZ_CHECK(req.context.empty());
  } else {
    FUZZ_CHECK(req.context == *context);
  }
  FUZZ_CHECK(req.dialog_id.empty() || detail::valid_dialog_id(req.dialog_id));
  const auto id = doc.find("dialog_id");
  FUZZ_CHECK(req.dialog_id == (id == doc.end() || id->is_null() ? "" : id->get<std::string>()));

  // What the generator is handed is valid UTF-8: a strict dump does not throw.
  try {
    for (const auto& m : req.messages) (void)json(m.content).dump();
    (void)req.context.dump();
  } catch (const std::exception& e) {
    fuzz::unexpected_exception("strict dump of accepted request", &e);
  }

  check_demo_setting(req.context, "tokens", 1, 1000000);
  check_demo_setting(req.context, "interval_ms", 0, 60000);
  return 0;
}
