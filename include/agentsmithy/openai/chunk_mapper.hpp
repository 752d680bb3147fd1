namespace agentsmithy {
namespace detail {

// ===========================================================================
// OpenAI upstream: chunks to events
// ===========================================================================

// The message an upstream's error object carries, whichever provider's shape:
// {"error":{"message":...,"code":"..."|null|500}}, {"error":"text"}, vLLM's
// old flat {"object":"error","message":...}, or a bare {"message":...}.
inline std::string upstream_error_message(const nlohmann::json& body) {
  const auto text_of = [](const nlohmann::json& v) -> std::string {
    if (v.is_string()) return v.get<std::string>();
    if (v.is_object()) {
      const auto m = v.find("message");
      if (m != v.end() && m->is_string()) return m->get<std::string>();
      const auto d = v.find("detail");
      if (d != v.end() && d->is_string()) return d->get<std::string>();
    }
    return {};
  };
  if (!body.is_object()) return body.is_string() ? body.get<std::string>() : std::string();
  if (const auto e = body.find("error"); e != body.end()) {
    std::string m = text_of(*e);
    if (!m.empty()) return m;
    if (e->is_object() || e->is_array()) return e->dump();
  }
  return text_of(body);
}

// Cuts `text` to at most `max` bytes without splitting a UTF-8 character.
inline std::string clip_utf8(std::string_view text, std::size_t max) {
  if (text.size() <= max) return std::string(text);
  std::size_t n = max;
  while (n > 0 && (static_cast<unsigned char>(text[n]) & 0xC0) == 0x80) --n;
  return std::string(text.substr(0, n)) + "...";
}

// Turns the data of each upstream SSE event (a chat.completion.chunk, an
// error object or [DONE]) into AgentSmithy events. Pure: no I/O; the caller
// sends what lands in `out`. After a step that returns end or error, the
// stream is over.
class ChunkMapper {
 public:
  enum class Step { more, end, error };

  Step on_data(std::string_view data, std::vector<nlohmann::json>& out) {
    if (data.empty()) return Step::more;  // an empty "data:" event: nothing to map
    if (data.substr(0, 6) == "[DONE]") return finish_stream(out);
    auto chunk = nlohmann::json::parse(data, nullptr, false);
    if (chunk.is_discarded() || !chunk.is_object())
      return fail("Upstream sent an invalid chunk (not a JSON object): " + clip_utf8(data, 200));
    const auto err = chunk.find("error");
    if ((err != chunk.end() && !err->is_null() && *err != false) ||
        chunk.value("object", std::string()) == "error") {
      return fail_upstream(chunk);
    }
    if (const auto usage = chunk.find("usage"); usage != chunk.end() && usage->is_object())
      usage_ = *usage;
    const auto choices = chunk.find("choices");
    if (choices == chunk.end() || !choices->is_array() || choices->empty()) return Step::more;
    const nlohmann::json& choice = choices->front();
    if (!choice.is_object())
      return fail("Upstream sent an invalid chunk: a choice is not an object");
    if (const auto delta = choice.find("delta"); delta != choice.end() && delta->is_object()) {
      if (const Step s = on_delta(*delta, out); s != Step::more) return s;
    }
    const auto reason = choice.find("finish_reason");
    if (reason != choice.end() && reason->is_string()) {
      if (*reason == "error") {
        const auto e = choice.find("error");
        return fail_upstream(e != choice.end() ? nlohmann::json{{"error", *e}} : chunk);
      }
      finish_reason_ = *reason;
      close_reasoning(out);
      flush_tool_calls(out);
    }
    return Step::more;
  }

  // The value of an "error:" SSE field (old llama-server).
  Step on_error_field(std::string_view value) {
    auto body = nlohmann::json::parse(value, nullptr, false);
    if (body.is_discarded()) return fail("Upstream error: " + clip_utf8(value, 500));
    return fail_upstream(body);
  }

  // The upstream closed the stream: a normal end after a finish_reason,
  // otherwise an error.
  Step on_eof(std::vector<nlohmann::json>& out) {
    if (finish_reason_.is_null())
      return fail("Upstream closed the stream before it finished (no finish_reason, no [DONE])");
    return finish_stream(out);
  }

  const std::string& error() const { return error_; }
  // "upstream_error" (the upstream reported one) or "upstream_protocol".
  const char* error_code() const { return error_code_; }
  bool finished() const { return state_ != State::streaming; }

 private:
  enum class State { streaming, ended, failed };
  struct ToolCall {
    long long index = 0;
    std::string id, name, args;
  };

  Step on_delta(const nlohmann::json& delta, std::vector<nlohmann::json>& out) {
    // reasoning_content (DeepSeek, llama-server, LM Studio, old vLLM) wins
    // over reasoning (vLLM, Ollama, OpenRouter): some send both, the same text.
    std::string_view reasoning = string_field(delta, "reasoning_content");
    if (reasoning.empty()) reasoning = string_field(delta, "reasoning");
    if (!reasoning.empty()) {
      start(out);
      if (!reasoning_open_) {
        out.push_back({{"type", "reasoning_start"}});
        reasoning_open_ = true;
      }
      out.push_back({{"type", "reasoning"}, {"content", reasoning}});
    }
    for (const char* field : {"content", "refusal"}) {
      const std::string_view text = string_field(delta, field);
      if (text.empty()) continue;
      start(out);
      close_reasoning(out);
      out.push_back({{"type", "chat"}, {"content", text}});
    }
    const auto calls = delta.find("tool_calls");
    if (calls != delta.end() && calls->is_array()) {
      for (const auto& call : *calls) {
        if (!call.is_object())
          return fail("Upstream sent an invalid chunk: a tool call is not an object");
        start(out);
        close_reasoning(out);
        add_tool_call_piece(call);
      }
    }
    return Step::more;
  }

  // Merges one tool_calls[] delta into its call: by index, as OpenAI's SDK
  // does, except that a new id at a used index (Ollama reuses index 0 for
  // parallel calls) starts a new call. Names and arguments are concatenated.
  void add_tool_call_piece(const nlohmann::json& piece) {
    const auto idx = piece.find("index");
    const long long index = idx != piece.end() && idx->is_number_integer()
                                ? idx->get<long long>()
                                : static_cast<long long>(tool_calls_.size());
    const std::string_view id = string_field(piece, "id");
    ToolCall* call = nullptr;
    for (auto it = tool_calls_.rbegin(); it != tool_calls_.rend(); ++it) {
      if (it->index == index) {
        call = &*it;
        break;
      }
    }
    if (!call || (!id.empty() && !call->id.empty() && call->id != id)) {
      tool_calls_.push_back(ToolCall{index, {}, {}, {}});
      call = &tool_calls_.back();
    }
    if (call->id.empty()) call->id = std::string(id);
    if (const auto fn = piece.find("function"); fn != piece.end() && fn->is_object()) {
      call->name += string_field(*fn, "name");
      const auto args = fn->find("arguments");
      if (args != fn->end()) {
        if (args->is_string()) {
          call->args += args->get<std::string>();
        } else if (args->is_object()) {
          call->args += args->dump();  // some servers send the object itself
        }
      }
    }
  }

  void flush_tool_calls(std::vector<nlohmann::json>& out) {
    for (const ToolCall& call : tool_calls_) {
      nlohmann::json args = nlohmann::json::object();
      if (call.args.find_first_not_of(" \t\r\n") != std::string::npos) {
        args = nlohmann::json::parse(call.args, nullptr, false);
        if (args.is_discarded()) args = nlohmann::json{{"_raw", call.args}};
      }
      out.push_back({{"type", "tool_call"}, {"id", call.id}, {"name", call.name}, {"args", args}});
    }
    tool_calls_.clear();
  }

  Step finish_stream(std::vector<nlohmann::json>& out) {
    start(out);
    close_reasoning(out);
    flush_tool_calls(out);
    nlohmann::json end = {{"type", "chat_end"}, {"finish_reason", finish_reason_}};
    if (!usage_.is_null()) end["usage"] = usage_;
    out.push_back(std::move(end));
    state_ = State::ended;
    return Step::end;
  }

  void start(std::vector<nlohmann::json>& out) {
    if (started_) return;
    started_ = true;
    out.push_back({{"type", "chat_start"}});
  }
  void close_reasoning(std::vector<nlohmann::json>& out) {
    if (!reasoning_open_) return;
    reasoning_open_ = false;
    out.push_back({{"type", "reasoning_end"}});
  }

  Step fail(std::string message, const char* code = "upstream_protocol") {
    error_ = std::move(message);
    error_code_ = code;
    state_ = State::failed;
    return Step::error;
  }
  Step fail_upstream(const nlohmann::json& body) {
    std::string m = upstream_error_message(body);
    if (m.empty()) m = clip_utf8(body.dump(), 300);
    return fail("Upstream error: " + clip_utf8(m, 1000), "upstream_error");
  }

  static std::string_view string_field(const nlohmann::json& obj, const char* name) {
    const auto it = obj.find(name);
    if (it == obj.end() || !it->is_string()) return {};
    return it->get_ref<const std::string&>();
  }

  State state_ = State::streaming;
  bool started_ = false;
  bool reasoning_open_ = false;
  nlohmann::json finish_reason_;  // null until the finish chunk
  nlohmann::json usage_;
  std::vector<ToolCall> tool_calls_;
  std::string error_;
  const char* error_code_ = "";
};

}  // namespace detail
}  // namespace agentsmithy
