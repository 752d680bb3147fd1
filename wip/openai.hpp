// wip/openai.hpp - the OpenAI-compatible upstream generator (issue 9), kept
// apart until it is pasted into agentsmithy.hpp. Everything between the two
// "paste" markers goes into agentsmithy.hpp: the public part after the
// Generator/demo_generator declarations, the detail part and the definition
// next to the other implementation sections.
#pragma once

#include "agentsmithy.hpp"

#include <map>

namespace agentsmithy {

// ---- paste: public part ----------------------------------------------------

// ===========================================================================
// OpenAI-compatible upstream
// ===========================================================================

// Where and how openai_generator reaches an OpenAI-compatible
// /chat/completions endpoint: OpenAI, llama.cpp's llama-server, Ollama (/v1),
// vLLM, LM Studio, OpenRouter, DeepSeek.
struct OpenAIOptions {
  // Scheme (http or https), host, optional port and path prefix, e.g.
  // "http://127.0.0.1:8080/v1" or "https://api.openai.com/v1";
  // "/chat/completions" is appended to the path.
  std::string base_url;
  // Sent as "Authorization: Bearer <api_key>"; empty: no header. Never
  // appears in an event, a log line or an exception.
  std::string api_key;
  // The "model" field; empty: left out (llama-server serves one model).
  std::string model;
  // Prepended as a system message when the request has none.
  std::string system_prompt;
  // Merged into the request body (RFC 7386 merge patch: a null removes a
  // field, e.g. {"stream_options": null} for a server that rejects it).
  nlohmann::json extra_body = nlohmann::json::object();
  // Bounds the DNS-free part of connecting (TCP connect, then TLS handshake).
  std::chrono::milliseconds connect_timeout{10000};
  // The longest silence: no byte for this long, prompt processing included,
  // fails the stream.
  std::chrono::milliseconds read_timeout{120000};
  // HTTPS: a PEM bundle of the CAs to trust; empty: the system's store.
  std::string ca_cert_path;
};

// Returns a generator that streams each request from the upstream and maps
// the answer onto AgentSmithy's events: chat_start, chat per content delta,
// reasoning_start / reasoning / reasoning_end, one tool_call per complete
// call, chat_end with finish_reason and usage. Every failure (connect, TLS,
// timeout, HTTP status, an error or invalid chunk in the stream) is one error
// event. When the stream is cancelled (client gone, shutdown) the upstream
// connection is closed at once. The generator is copyable and serves many
// requests at once. Throws std::invalid_argument naming the problem when
// base_url or a timeout is not valid.
//
// The generator blocks SIGPIPE on its own thread while it talks to the
// upstream (cpp-httplib writes without MSG_NOSIGNAL), so the process needs no
// SIG_IGN.
Generator openai_generator(OpenAIOptions options);

// ---- end of public part ----------------------------------------------------

// ---- paste: detail part ----------------------------------------------------

namespace detail {

// ===========================================================================
// OpenAI upstream: base URL
// ===========================================================================

struct UpstreamUrl {
  bool tls = false;
  std::string host;   // as cpp-httplib wants it: no brackets around IPv6
  int port = 0;
  std::string path;   // prefix + "/chat/completions"
  std::string shown;  // scheme://host:port/prefix, for messages (no credentials)
};

inline bool url_host_char(char c) {
  return std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '-' || c == '_';
}

// Splits base_url into what cpp-httplib needs; throws std::invalid_argument
// naming the problem. The URL is echoed in messages only when it cannot carry
// credentials (no '@').
inline UpstreamUrl parse_base_url(const std::string& url) {
  const auto fail = [&](const std::string& why) -> UpstreamUrl {
    const bool showable = url.find('@') == std::string::npos && url.size() <= 200;
    throw std::invalid_argument("openai_generator: base_url " +
                                (showable ? "\"" + url + "\" " : std::string()) + why);
  };
  if (url.empty()) return fail("is empty; expected e.g. http://127.0.0.1:8080/v1");
  for (const char c : url) {
    if (static_cast<unsigned char>(c) <= 0x20 || c == 0x7f)
      return fail("contains a space or control character");
  }
  const auto sep = url.find("://");
  if (sep == std::string::npos) return fail("has no scheme; expected http:// or https://");
  std::string scheme = url.substr(0, sep);
  for (auto& c : scheme) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  UpstreamUrl out;
  if (scheme == "https") {
#ifndef CPPHTTPLIB_OPENSSL_SUPPORT
    return fail("is https, but cpp-httplib was built without CPPHTTPLIB_OPENSSL_SUPPORT");
#endif
    out.tls = true;
  } else if (scheme != "http") {
    return fail("has scheme \"" + scheme + "\"; use http or https");
  }
  const std::string rest = url.substr(sep + 3);
  const auto path_at = rest.find_first_of("/?#");
  const std::string authority = rest.substr(0, path_at);
  std::string path = path_at == std::string::npos ? std::string() : rest.substr(path_at);
  if (authority.find('@') != std::string::npos)
    return fail("contains credentials (user@host); put the key in api_key instead");
  if (path.find_first_of("?#") != std::string::npos)
    return fail("has a query or fragment; give only scheme, host, port and path");
  std::string port_text;
  if (!authority.empty() && authority.front() == '[') {
    const auto close = authority.find(']');
    if (close == std::string::npos) return fail("has an unterminated IPv6 address");
    out.host = authority.substr(1, close - 1);
    if (out.host.empty() ||
        out.host.find_first_not_of("0123456789abcdefABCDEF:.") != std::string::npos)
      return fail("has an invalid IPv6 address");
    const std::string after = authority.substr(close + 1);
    if (!after.empty() && after.front() != ':') return fail("has junk after the IPv6 address");
    if (!after.empty()) port_text = after.substr(1);
    if (after == ":") return fail("has an empty port");
  } else {
    const auto colon = authority.find(':');
    out.host = authority.substr(0, colon);
    if (colon != std::string::npos) {
      port_text = authority.substr(colon + 1);
      if (port_text.empty()) return fail("has an empty port");
    }
    if (out.host.empty()) return fail("has no host");
    for (const char c : out.host) {
      if (!url_host_char(c)) return fail("has an invalid host name");
    }
  }
  out.port = out.tls ? 443 : 80;
  if (!port_text.empty()) {
    if (port_text.size() > 5 || port_text.find_first_not_of("0123456789") != std::string::npos)
      return fail("has an invalid port \"" + port_text + "\"");
    out.port = std::stoi(port_text);
    if (out.port < 1 || out.port > 65535) return fail("has port " + port_text + " out of range");
  }
  while (!path.empty() && path.back() == '/') path.pop_back();
  const bool v6 = out.host.find(':') != std::string::npos;
  out.shown = scheme + "://" + (v6 ? "[" + out.host + "]" : out.host) + ":" +
              std::to_string(out.port) + path;
  out.path = path + "/chat/completions";
  return out;
}

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
      if (has_data_ || !event_.error.empty()) go_on = on_event(static_cast<const SseEvent&>(event_));
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
    if (!choice.is_object()) return fail("Upstream sent an invalid chunk: a choice is not an object");
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
        if (!call.is_object()) return fail("Upstream sent an invalid chunk: a tool call is not an object");
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

// ===========================================================================
// OpenAI upstream: cancellation and the HTTP call
// ===========================================================================

// Stops an upstream request from another thread, closing the holes of
// cpp-httplib 0.11.4's Client::stop(): the request's sockets are captured
// (duplicated, so the number cannot be reused under us) when they are
// created, before connect(); cancel() shuts them down, which aborts a
// connect() under way, a TLS handshake and any blocked read, and makes a
// socket not yet connected useless. A cancel before the socket exists is kept
// in the flag and applied when it appears.
class UpstreamCancel {
 public:
  ~UpstreamCancel() { release(); }

  void cancel() {
    std::lock_guard<std::mutex> lock(mu_);
    cancelled_ = true;
    for (const int fd : fds_) ::shutdown(fd, SHUT_RDWR);
  }
  bool cancelled() const { return cancelled_.load(); }

  // cpp-httplib's socket_options callback: runs after socket(), before connect().
  void adopt(int sock) {
    std::lock_guard<std::mutex> lock(mu_);
    sockets_seen_ = true;
    const int dup = ::fcntl(sock, F_DUPFD_CLOEXEC, 0);
    if (dup >= 0) fds_.push_back(dup);
    if (cancelled_) ::shutdown(sock, SHUT_RDWR);
  }
  bool sockets_seen() const {
    std::lock_guard<std::mutex> lock(mu_);
    return sockets_seen_;
  }
  // After the request: closes the duplicates (the connection closes with them).
  void release() {
    std::lock_guard<std::mutex> lock(mu_);
    for (const int fd : fds_) ::close(fd);
    fds_.clear();
  }

 private:
  mutable std::mutex mu_;
  std::atomic<bool> cancelled_{false};
  std::vector<int> fds_;
  bool sockets_seen_ = false;
};

// Blocks SIGPIPE on this thread while alive; one raised meanwhile (a write to
// a reset upstream) is consumed before the mask is restored.
class SigpipeBlock {
 public:
  SigpipeBlock() {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGPIPE);
    ::pthread_sigmask(SIG_BLOCK, &set, &old_);
    sigset_t pending;
    sigpending(&pending);
    was_pending_ = sigismember(&pending, SIGPIPE) == 1;
  }
  ~SigpipeBlock() {
    sigset_t pending;
    sigpending(&pending);
    if (!was_pending_ && sigismember(&pending, SIGPIPE) == 1) {
      sigset_t set;
      sigemptyset(&set);
      sigaddset(&set, SIGPIPE);
      const timespec zero{0, 0};
      while (::sigtimedwait(&set, nullptr, &zero) < 0 && errno == EINTR) {
      }
    }
    ::pthread_sigmask(SIG_SETMASK, &old_, nullptr);
  }
  SigpipeBlock(const SigpipeBlock&) = delete;
  SigpipeBlock& operator=(const SigpipeBlock&) = delete;

 private:
  sigset_t old_;
  bool was_pending_ = false;
};

// Replaces every occurrence of `secret` in `text` (the API key in an upstream's
// message, e.g. OpenAI's 401 "Incorrect API key provided: ...").
inline std::string redact(std::string text, const std::string& secret) {
  if (secret.size() < 4) return text;
  for (auto p = text.find(secret); p != std::string::npos; p = text.find(secret, p + 3))
    text.replace(p, secret.size(), "***");
  return text;
}

struct OpenAIConfig {
  OpenAIOptions options;
  UpstreamUrl url;
};

// The body of the upstream request: model, the messages in order (with the
// system prompt first when none is there), stream and include_usage, then
// extra_body merged in. "stream" stays true: the answer is parsed as SSE.
inline nlohmann::json openai_request_body(const OpenAIOptions& o, const ChatRequest& request) {
  nlohmann::json messages = nlohmann::json::array();
  const bool has_system =
      std::any_of(request.messages.begin(), request.messages.end(),
                  [](const Message& m) { return m.role == "system"; });
  if (!o.system_prompt.empty() && !has_system)
    messages.push_back({{"role", "system"}, {"content", o.system_prompt}});
  for (const Message& m : request.messages)
    messages.push_back({{"role", m.role}, {"content", m.content}});
  nlohmann::json body = nlohmann::json::object();
  if (!o.model.empty()) body["model"] = o.model;
  body["messages"] = std::move(messages);
  body["stream"] = true;
  body["stream_options"] = {{"include_usage", true}};
  if (o.extra_body.is_object()) body.merge_patch(o.extra_body);
  body["stream"] = true;
  return body;
}

inline std::string ms_text(std::chrono::milliseconds d) {
  return std::to_string(d.count()) + " ms";
}

// One upstream request, on the generator's thread: cpp-httplib's client
// (created, used and destroyed here), the SSE parser and the mapper; events
// go straight to the writer.
class OpenAICall {
 public:
  OpenAICall(const OpenAIConfig& config, const ChatRequest& request, StreamWriter& out,
             std::shared_ptr<UpstreamCancel> cancel)
      : config_(config), request_(request), out_(out), cancel_(std::move(cancel)) {}

  void run() {
    std::unique_ptr<httplib::ClientImpl> client = make_client();
    httplib::Request req;
    req.method = "POST";
    req.path = config_.url.path;
    req.set_header("Content-Type", "application/json");
    req.set_header("Accept", "text/event-stream");
    req.set_header("User-Agent", "agentsmithy");
    req.body = dump_json(openai_request_body(config_.options, request_));
    req.response_handler = [this](const httplib::Response& res) { return on_head(res); };
    req.content_receiver = [this](const char* data, std::size_t n, std::uint64_t, std::uint64_t) {
      return on_body(std::string_view(data, n));
    };
    httplib::Response res;
    httplib::Error error = httplib::Error::Success;
    last_byte_ = Clock::now();
    client->send(req, res, error);
    client.reset();  // closes cpp-httplib's socket
    cancel_->release();
    if (cancel_->cancelled() || done_) return;  // a cancel can look like a clean EOF
    conclude(error);
  }

 private:
  enum class Mode { sse, error_body, wrong_type };

  std::unique_ptr<httplib::ClientImpl> make_client() {
    const OpenAIOptions& o = config_.options;
    std::unique_ptr<httplib::ClientImpl> client;
#ifdef CPPHTTPLIB_OPENSSL_SUPPORT
    if (config_.url.tls) {
      auto tls = std::make_unique<httplib::SSLClient>(config_.url.host, config_.url.port);
      if (!o.ca_cert_path.empty()) tls->set_ca_cert_path(o.ca_cert_path);
      tls->enable_server_certificate_verification(true);
      client = std::move(tls);
    }
#endif
    if (!client) client = std::make_unique<httplib::ClientImpl>(config_.url.host, config_.url.port);
    client->set_connection_timeout(o.connect_timeout);
    client->set_read_timeout(o.read_timeout);
    client->set_write_timeout(o.connect_timeout);
    client->set_keep_alive(false);
    if (!o.api_key.empty()) client->set_bearer_token_auth(o.api_key);
    std::weak_ptr<UpstreamCancel> weak = cancel_;
    client->set_socket_options([weak](socket_t sock) {
      if (const auto c = weak.lock()) c->adopt(sock);
    });
    return client;
  }

  bool on_head(const httplib::Response& res) {
    last_byte_ = Clock::now();
    if (cancel_->cancelled()) return false;
    status_ = res.status;
    content_type_ = res.get_header_value("Content-Type");
    std::string type = content_type_;
    for (auto& c : type) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    if (status_ < 200 || status_ > 299) {
      mode_ = Mode::error_body;
    } else if (type.rfind("text/event-stream", 0) != 0) {
      mode_ = Mode::wrong_type;
    }
    return true;
  }

  bool on_body(std::string_view bytes) {
    last_byte_ = Clock::now();
    if (cancel_->cancelled()) return false;
    if (mode_ != Mode::sse) {
      constexpr std::size_t kKeep = 16 * 1024;
      body_.append(bytes.data(), std::min(bytes.size(), kKeep - std::min(kKeep, body_.size())));
      return body_.size() < kKeep;
    }
    bool go_on = true;
    const bool fed = parser_.feed(bytes, [&](const SseEvent& e) {
      ChunkMapper::Step step = ChunkMapper::Step::more;
      if (!e.error.empty()) {
        step = mapper_.on_error_field(e.error);
      } else {
        step = mapper_.on_data(e.data, events_);
      }
      go_on = deliver(step);
      return go_on;
    });
    if (!fed && parser_.overflow()) {
      fail("Upstream sent an SSE line or event over " + std::to_string(SseParser::kMaxLine) +
               " bytes",
           "upstream_protocol");
      return false;
    }
    return go_on;
  }

  // Sends what the mapper produced; false when the stream is over.
  bool deliver(ChunkMapper::Step step) {
    for (auto& event : events_) {
      if (!out_.send(event)) {
        events_.clear();
        done_ = true;  // cancelled: the server ends the stream
        return false;
      }
    }
    events_.clear();
    if (step == ChunkMapper::Step::error) {
      fail(mapper_.error(), mapper_.error_code());
      return false;
    }
    if (step == ChunkMapper::Step::end) {
      done_ = true;
      return false;
    }
    return true;
  }

  // The one error event of a failed request. `code` (machine-readable):
  // upstream_unreachable (DNS, refused, connect timeout, TLS), upstream_timeout
  // (read_timeout), upstream_status (an HTTP error; "upstream_status" holds
  // it), upstream_error (an error sent in the stream), upstream_protocol (not
  // an event stream, an invalid chunk, a close before the finish).
  void fail(const std::string& message, const char* code) {
    done_ = true;
    nlohmann::json e = {
        {"type", "error"}, {"error", redact(message, config_.options.api_key)}, {"code", code}};
    if (std::string_view(code) == "upstream_status") e["upstream_status"] = status_;
    out_.send(e);
  }

  void conclude(httplib::Error error) {
    if (mode_ == Mode::error_body && status_ != 0) {
      fail(http_status_message(), "upstream_status");
      return;
    }
    if (mode_ == Mode::wrong_type && status_ != 0) {
      fail("Upstream answered HTTP " + std::to_string(status_) + " with Content-Type \"" +
           clip_utf8(content_type_, 100) + "\", not an event stream (is " + config_.url.shown +
           " an OpenAI-compatible API?)",
           "upstream_protocol");
      return;
    }
    if (status_ != 0 && (error == httplib::Error::Success ||
                         (error == httplib::Error::Read && !timed_out()))) {
      // The body ended, or the connection was cut after the headers: a normal
      // end after a finish_reason, an error before one.
      deliver(mapper_.on_eof(events_));
      return;
    }
    const bool timeout = error == httplib::Error::Read && timed_out();
    fail(transport_message(error), timeout ? "upstream_timeout" : "upstream_unreachable");
  }

  bool timed_out() const {
    const auto silent = Clock::now() - last_byte_;
    return silent + std::chrono::milliseconds(50) >= config_.options.read_timeout;
  }

  std::string http_status_message() const {
    std::string detail;
    const auto body = nlohmann::json::parse(body_, nullptr, false);
    if (!body.is_discarded()) detail = upstream_error_message(body);
    if (detail.empty()) {
      detail = body_;
      while (!detail.empty() && std::isspace(static_cast<unsigned char>(detail.back())))
        detail.pop_back();
    }
    std::string m = "Upstream returned HTTP " + std::to_string(status_);
    if (!detail.empty()) m += ": " + clip_utf8(detail, 1000);
    switch (status_) {
      case 401:
      case 403: m += " (check the API key)"; break;
      case 404: m += " (check the base URL " + config_.url.shown + " and the model name)"; break;
      case 429: m += " (rate limited or out of quota; retry later)"; break;
      default: break;
    }
    return m;
  }

  std::string transport_message(httplib::Error error) const {
    const OpenAIOptions& o = config_.options;
    const std::string& where = config_.url.shown;
    switch (error) {
      case httplib::Error::Connection:
        if (!cancel_->sockets_seen())
          return "Cannot resolve the upstream host \"" + config_.url.host + "\" (" + where + ")";
        return "Cannot connect to the upstream at " + where +
               ": connection refused or unreachable (is the model server running?)";
      case httplib::Error::ConnectionTimeout:
        return "Timed out connecting to the upstream at " + where + " after " +
               ms_text(o.connect_timeout);
      case httplib::Error::Read:
        if (timed_out()) {
          return status_ == 0 ? "Upstream sent no response within " + ms_text(o.read_timeout) +
                                    " (read_timeout; " + where + ")"
                              : "Upstream stalled: nothing received for " +
                                    ms_text(o.read_timeout) + " (read_timeout; " + where + ")";
        }
        return "Upstream closed the connection before answering (" + where + ")";
      case httplib::Error::Write:
        return "Could not send the request to the upstream at " + where;
      case httplib::Error::SSLConnection:
        return "TLS handshake with the upstream at " + where + " failed";
      case httplib::Error::SSLLoadingCerts:
        return "Cannot load the CA certificates" +
               (o.ca_cert_path.empty() ? std::string(" of the system") : " from " + o.ca_cert_path);
      case httplib::Error::SSLServerVerification:
        return "The upstream's TLS certificate at " + where + " could not be verified" +
               (o.ca_cert_path.empty() ? std::string(" (set ca_cert_path for a private CA)")
                                       : " against " + o.ca_cert_path);
      case httplib::Error::Compression:
        return "Upstream sent a body that could not be decompressed (" + where + ")";
      default:
        return "Upstream request to " + where + " failed: " + httplib::to_string(error);
    }
  }

  const OpenAIConfig& config_;
  const ChatRequest& request_;
  StreamWriter& out_;
  std::shared_ptr<UpstreamCancel> cancel_;
  SseParser parser_;
  ChunkMapper mapper_;
  std::vector<nlohmann::json> events_;
  Mode mode_ = Mode::sse;
  int status_ = 0;
  std::string content_type_;
  std::string body_;  // an error or non-SSE body, bounded
  bool done_ = false;
  Clock::time_point last_byte_;
};

inline void run_openai(const OpenAIConfig& config, const ChatRequest& request, StreamWriter& out) {
  SigpipeBlock no_sigpipe;
  auto cancel = std::make_shared<UpstreamCancel>();
  out.on_cancel([cancel] { cancel->cancel(); });  // may run on a server thread, mid-send()
  OpenAICall(config, request, out, cancel).run();
}

}  // namespace detail

// ---- end of detail part ----------------------------------------------------

// ---- paste: definitions ----------------------------------------------------

inline Generator openai_generator(OpenAIOptions options) {
  auto config = std::make_shared<detail::OpenAIConfig>();
  config->url = detail::parse_base_url(options.base_url);
  if (options.connect_timeout.count() <= 0)
    throw std::invalid_argument("openai_generator: connect_timeout must be positive");
  if (options.read_timeout.count() <= 0)
    throw std::invalid_argument("openai_generator: read_timeout must be positive");
  if (!options.extra_body.is_null() && !options.extra_body.is_object())
    throw std::invalid_argument("openai_generator: extra_body must be a JSON object");
  config->options = std::move(options);
  std::shared_ptr<const detail::OpenAIConfig> shared = std::move(config);
  return [shared](const ChatRequest& request, StreamWriter& out) {
    detail::run_openai(*shared, request, out);
  };
}

// ---- end of definitions ----------------------------------------------------

}  // namespace agentsmithy
