namespace agentsmithy {
namespace detail {

// ===========================================================================
// Request validation
// ===========================================================================

struct HttpError {
  int status;
  std::string message;
};

// Every 503 (draining, at capacity, a failing store) tells a client or a
// balancer when to retry.
inline constexpr const char* kRetryAfterSeconds = "1";

inline std::string error_body(std::string_view message, std::string_view code = {}) {
  json body{{"error", message}};
  if (!code.empty()) body["code"] = code;
  return dump_json(body);
}

inline bool valid_dialog_id(std::string_view id) {
  if (id.empty() || id.size() > 128) return false;
  for (const char c : id) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '-' || c == '_';
    if (!ok) return false;
  }
  return true;
}

inline std::string new_dialog_id() {
  thread_local std::mt19937_64 rng{std::random_device{}()};
  char buf[33];
  std::snprintf(buf, sizeof buf, "%016llx%016llx", static_cast<unsigned long long>(rng()),
                static_cast<unsigned long long>(rng()));
  return buf;
}

// Deepest nesting of arrays/objects in a JSON text, ignoring brackets inside
// strings. nlohmann_json parses deep input iteratively but copies and
// destroys it recursively, so depth is bounded before parsing.
inline std::size_t json_nesting_depth(std::string_view text) {
  std::size_t depth = 0, deepest = 0;
  bool in_string = false, escaped = false;
  for (const char c : text) {
    if (in_string) {
      if (escaped)
        escaped = false;
      else if (c == '\\')
        escaped = true;
      else if (c == '"')
        in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      deepest = std::max(deepest, ++depth);
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    }
  }
  return deepest;
}

inline constexpr std::size_t kMaxJsonDepth = 64;

// Fills `out` from a POST /api/chat body, or says what is wrong with it.
inline std::optional<HttpError> parse_chat_request(std::string_view body, ChatRequest& out) {
  if (json_nesting_depth(body) > kMaxJsonDepth) {
    return HttpError{
        400, "Invalid JSON: nested deeper than " + std::to_string(kMaxJsonDepth) + " levels"};
  }
  // The parser would stop at a NUL and ignore whatever follows it.
  if (body.find('\0') != std::string_view::npos) {
    return HttpError{400, "Invalid JSON: the body contains a NUL byte"};
  }
  json doc;
  try {
    doc = json::parse(body.begin(), body.end());
  } catch (const json::exception& e) {  // parse_error, and out_of_range for 1e999
    return HttpError{400, std::string("Invalid JSON: ") + e.what()};
  }
  if (!doc.is_object()) return HttpError{422, "body: must be a JSON object"};

  const auto messages = doc.find("messages");
  if (messages == doc.end()) return HttpError{422, "messages: field required"};
  if (!messages->is_array()) return HttpError{422, "messages: must be an array"};
  out.messages.clear();
  out.messages.reserve(messages->size());
  for (std::size_t i = 0; i < messages->size(); ++i) {
    const json& entry = (*messages)[i];
    const std::string where = "messages[" + std::to_string(i) + "]";
    if (!entry.is_object()) return HttpError{422, where + ": must be an object"};
    const auto role = entry.find("role");
    if (role == entry.end() || !role->is_string()) {
      return HttpError{422, where + ".role: must be a string"};
    }
    const auto content = entry.find("content");
    if (content == entry.end() || !content->is_string()) {
      return HttpError{422, where + ".content: must be a string"};
    }
    out.messages.push_back(Message{role->get<std::string>(), content->get<std::string>()});
  }

  out.stream = true;
  if (const auto stream = doc.find("stream"); stream != doc.end()) {
    if (!stream->is_boolean()) return HttpError{422, "stream: must be a boolean"};
    out.stream = stream->get<bool>();
  }

  out.context = json::object();
  if (const auto context = doc.find("context"); context != doc.end() && !context->is_null()) {
    if (!context->is_object()) return HttpError{422, "context: must be an object"};
    out.context = std::move(*context);
  }

  out.dialog_id.clear();
  if (const auto id = doc.find("dialog_id"); id != doc.end() && !id->is_null()) {
    if (!id->is_string()) return HttpError{422, "dialog_id: must be a string"};
    const auto& text = id->get_ref<const std::string&>();
    if (!valid_dialog_id(text)) {
      return HttpError{422, "dialog_id: must be 1 to 128 characters of [A-Za-z0-9_-]"};
    }
    out.dialog_id = text;
  }

  const bool has_user = std::any_of(out.messages.begin(), out.messages.end(),
                                    [](const Message& m) { return m.role == "user"; });
  if (!has_user) return HttpError{400, "No user message found"};
  return std::nullopt;
}

}  // namespace detail
}  // namespace agentsmithy
