namespace agentsmithy {
namespace detail {

// ===========================================================================
// SSE framing
// ===========================================================================

// Generators hand us model output, which may be cut mid-character; replacing
// invalid UTF-8 keeps the stream alive where dump()'s default would throw.
inline std::string dump_json(const json& value) {
  return value.dump(-1, ' ', false, json::error_handler_t::replace);
}

// One HTTP/1.1 chunk carrying `payload`.
inline void append_chunk(std::string& out, std::string_view payload) {
  char size[24];
  const int n = std::snprintf(size, sizeof size, "%zx\r\n", payload.size());
  out.append(size, static_cast<std::size_t>(n));
  out.append(payload);
  out.append("\r\n");
}

inline constexpr std::string_view kHeartbeatComment = ": ping\n\n";
inline constexpr std::string_view kLastChunk = "0\r\n\r\n";

// `chunked`: an HTTP/1.1 client; HTTP/1.0 forbids Transfer-Encoding, so a 1.0
// client's stream is delimited by the connection's close. `extra_headers`:
// complete header lines (CORS).
inline std::string stream_response_head(bool chunked, std::string_view extra_headers) {
  std::string head = chunked ? "HTTP/1.1 200 OK\r\n" : "HTTP/1.0 200 OK\r\n";
  head +=
      "Content-Type: text/event-stream\r\n"
      "Cache-Control: no-cache\r\n"
      "X-Accel-Buffering: no\r\n";
  head += chunked ? "Transfer-Encoding: chunked\r\n" : "Connection: close\r\n";
  head.append(extra_headers);
  head.append("\r\n");
  return head;
}

// An error event; `code` is one of the machine-readable codes in the README.
inline json error_event(std::string_view message, std::string_view code) {
  json e{{"type", "error"}, {"error", message}};
  if (!code.empty()) e["code"] = code;
  return e;
}
inline json done_event() { return json{{"type", "done"}, {"done", true}}; }

// The error a stream ends with when the server shuts down under it.
inline json shutdown_error_event() { return error_event(kShutdownMessage, "shutdown"); }

// `event` as compact JSON with "dialog_id" set (and "done": true on done).
// Splicing the id into the dump saves copying the event on the hot path;
// dialog ids are validated to need no escaping.
inline std::string event_text(const json& event, const std::string& dialog_id, bool is_done) {
  if (event.contains("dialog_id") || (is_done && !event.contains("done"))) {
    json framed = event;
    framed["dialog_id"] = dialog_id;
    if (is_done) framed["done"] = true;
    return dump_json(framed);
  }
  std::string text = dump_json(event);  // "{...}", never empty: it has "type"
  text.insert(text.size() - 1, ",\"dialog_id\":\"" + dialog_id + "\"");
  return text;
}

// A reconnect delay for a browser whose stream the shutdown cuts: random, so
// a fleet of them does not come back in lockstep.
inline int random_retry_ms() {
  thread_local std::mt19937 rng{std::random_device{}()};
  return std::uniform_int_distribution<int>(1000, 5000)(rng);
}

}  // namespace detail
}  // namespace agentsmithy
