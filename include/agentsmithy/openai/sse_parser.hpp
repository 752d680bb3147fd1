namespace agentsmithy {
namespace detail {

// ===========================================================================
// OpenAI upstream: SSE parser
// ===========================================================================

// One dispatched server-sent event: its data lines joined with "\n", and the
// value of a non-standard "error:" field (old llama-server sent its errors
// so). Other fields (event, id, retry, unknown) do not matter here.
struct SseEvent {
  std::string data;
  std::string error;
};

// An incremental parser of text/event-stream (WHATWG HTML "Parsing an event
// stream"): lines end in LF, CRLF or a lone CR, also when a CRLF is split
// between two feeds; a UTF-8 BOM at the start is dropped; ":" lines are
// comments; one space after the field's colon is dropped; a blank line
// dispatches; an event cut off by the end of the stream is never dispatched.
// Pure: bytes in, events out; no I/O.
class SseParser {
 public:
  static constexpr std::size_t kMaxLine = 4u << 20;  // bytes in one line or one event

  // Feeds bytes; calls on_event(const SseEvent&) per dispatched event, which
  // returns false to stop. Returns false once on_event asked to stop or a
  // line or event exceeded kMaxLine (then overflow() is true).
  template <class OnEvent>
  bool feed(std::string_view bytes, OnEvent&& on_event) {
    while (!bytes.empty()) {
      if (after_cr_) {
        after_cr_ = false;
        if (bytes.front() == '\n') {
          bytes.remove_prefix(1);
          continue;
        }
      }
      const auto eol = bytes.find_first_of("\r\n");
      const auto take = eol == std::string_view::npos ? bytes.size() : eol;
      if (line_.size() + take > kMaxLine) return overflow_ = true, false;
      line_.append(bytes.data(), take);
      if (eol == std::string_view::npos) break;
      after_cr_ = bytes[eol] == '\r';
      bytes.remove_prefix(eol + 1);
      if (!end_line(on_event)) return false;
    }
    return true;
  }
  bool overflow() const { return overflow_; }
  // Comment lines seen (": keep-alive", ": OPENROUTER PROCESSING").
  std::size_t comments() const { return comments_; }

 private:
  template <class OnEvent>
  bool end_line(OnEvent& on_event) {
    std::string_view line(line_);
    if (first_line_) {
      first_line_ = false;
      if (line.substr(0, 3) == "\xEF\xBB\xBF") line.remove_prefix(3);
    }
    bool go_on = true;
    if (line.empty()) {
      if (has_data_ || !event_.error.empty())
        go_on = on_event(static_cast<const SseEvent&>(event_));
      event_.data.clear();
      event_.error.clear();
      has_data_ = false;
    } else if (line.front() == ':') {
      ++comments_;
    } else {
      const auto colon = line.find(':');
      const std::string_view name = line.substr(0, colon);
      std::string_view value;
      if (colon != std::string_view::npos) {
        value = line.substr(colon + 1);
        if (!value.empty() && value.front() == ' ') value.remove_prefix(1);
      }
      if (name == "data") {
        if (event_.data.size() + value.size() + 1 > kMaxLine) {
          overflow_ = true;
          go_on = false;
        } else {
          if (has_data_) event_.data += '\n';
          event_.data.append(value.data(), value.size());
          has_data_ = true;
        }
      } else if (name == "error") {
        if (!event_.error.empty()) event_.error += '\n';
        event_.error.append(value.data(), std::min(value.size(), kMaxLine));
      }
    }
    line_.clear();
    return go_on;
  }

  std::string line_;
  SseEvent event_;
  bool has_data_ = false;
  bool after_cr_ = false;
  bool first_line_ = true;
  bool overflow_ = false;
  std::size_t comments_ = 0;
};

}  // namespace detail
}  // namespace agentsmithy
