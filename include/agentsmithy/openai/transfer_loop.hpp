namespace agentsmithy {
namespace detail {

// ===========================================================================
// OpenAI upstream: the HTTP transfers, all on one libcurl thread
// ===========================================================================

// The client is libcurl's multi interface, one event-loop thread for every
// upstream transfer of the process, chosen by measurement on 2 cores with
// bench/upstream.cpp (N = 1,000 streams, a token every 20 ms): cpp-httplib's
// blocking Client, a thread per stream woken per token, cost ~55 us of CPU per
// proxied event, 1.1-1.3 cores, and delivered 40-46% of the pace; the loop
// costs 10-17 us per event, under 1 core, and keeps the pace (102-104%). The
// loop drives libcurl's multi_socket API from an epoll set: a wake costs what
// the ready sockets cost, whereas curl_multi_poll() polls, and
// curl_multi_perform() visits, every transfer on every wake. Cancellation is a
// queue and an eventfd: the loop removes the transfer at once, which closes
// its connection, in whatever phase it is (resolving, connecting, TLS, waiting
// for the headers, streaming, stalled); 1,000 at a SIGTERM take ~40 ms, most
// of it the kernel's TCP closes.

#if LIBCURL_VERSION_NUM < 0x075700
#error "agentsmithy needs libcurl 7.87 or later (CURLOPT_QUICK_EXIT)"
#endif

// libcurl's global state, set up once (a function-local static: curl_global_init
// itself is not safe to race). Never cleaned up: the loop thread may still be
// closing a transfer when the process exits.
inline CURLcode curl_global() {
  static const CURLcode rc = curl_global_init(CURL_GLOBAL_DEFAULT);
  return rc;
}

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
  const bool has_system = std::any_of(request.messages.begin(), request.messages.end(),
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

class CurlLoop;
struct CurlRunner;

// One upstream request: a libcurl easy handle set up on the generator's
// thread, then driven by the loop thread, whose callbacks parse each received
// chunk (SseParser, ChunkMapper) and write the events straight to the writer;
// when the loop lets go of it, the generator's thread sends the error of a
// failed transfer, if any.
class OpenAICall {
 public:
  OpenAICall(const OpenAIConfig& config, const ChatRequest& request, StreamWriter& out)
      : config_(config), request_(request), out_(out) {}
  ~OpenAICall() {
    if (easy_) curl_easy_cleanup(easy_);
    curl_slist_free_all(headers_);
  }
  OpenAICall(const OpenAICall&) = delete;
  OpenAICall& operator=(const OpenAICall&) = delete;

  // Sets up the transfer; false (and the error sent) if libcurl cannot.
  bool prepare() {
    easy_ = curl_easy_init();
    if (!easy_) {
      fail("Cannot start the upstream request: libcurl could not make a handle",
           "upstream_unreachable");
      return false;
    }
    const OpenAIOptions& o = config_.options;
    request_body_ = dump_json(openai_request_body(o, request_));
    // No "Expect: 100-continue": it would hold the body back for a second.
    for (const char* h : {"Content-Type: application/json", "Accept: text/event-stream", "Expect:"})
      headers_ = curl_slist_append(headers_, h);
    if (!o.api_key.empty())
      headers_ = curl_slist_append(headers_, ("Authorization: Bearer " + o.api_key).c_str());
    CURL* e = easy_;
    bool ok = headers_ != nullptr;
    const auto set = [&ok](CURLcode rc) { ok = ok && rc == CURLE_OK; };
    set(curl_easy_setopt(e, CURLOPT_URL, config_.url.target.c_str()));
    set(curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https"));
    set(curl_easy_setopt(e, CURLOPT_HTTP_VERSION, static_cast<long>(CURL_HTTP_VERSION_1_1)));
    set(curl_easy_setopt(e, CURLOPT_PROXY, ""));  // as before: never an environment proxy
    set(curl_easy_setopt(e, CURLOPT_HTTPHEADER, headers_));
    set(curl_easy_setopt(e, CURLOPT_USERAGENT, "agentsmithy"));
    set(curl_easy_setopt(e, CURLOPT_POSTFIELDS, request_body_.data()));
    set(curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE,
                         static_cast<curl_off_t>(request_body_.size())));
    set(curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L));
    // A resolver thread still running at a cancellation is left to finish on
    // its own instead of being waited for on the loop thread.
    set(curl_easy_setopt(e, CURLOPT_QUICK_EXIT, 1L));
    // One connection per request, closed when it ends.
    set(curl_easy_setopt(e, CURLOPT_FORBID_REUSE, 1L));
    set(curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS,
                         static_cast<long>(o.connect_timeout.count())));
    if (!o.ca_cert_path.empty()) set(curl_easy_setopt(e, CURLOPT_CAINFO, o.ca_cert_path.c_str()));
    set(curl_easy_setopt(e, CURLOPT_ERRORBUFFER, errbuf_));
    set(curl_easy_setopt(e, CURLOPT_PRIVATE, static_cast<void*>(this)));
    set(curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, &OpenAICall::header_cb));
    set(curl_easy_setopt(e, CURLOPT_HEADERDATA, static_cast<void*>(this)));
    set(curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, &OpenAICall::write_cb));
    set(curl_easy_setopt(e, CURLOPT_WRITEDATA, static_cast<void*>(this)));
    set(curl_easy_setopt(e, CURLOPT_PREREQFUNCTION, &OpenAICall::prereq_cb));
    set(curl_easy_setopt(e, CURLOPT_PREREQDATA, static_cast<void*>(this)));
    if (config_.url.tls) {  // not every TLS backend has it: then no "TLS" in a timeout's message
      curl_easy_setopt(e, CURLOPT_SSL_CTX_FUNCTION, &OpenAICall::tls_cb);
      curl_easy_setopt(e, CURLOPT_SSL_CTX_DATA, static_cast<void*>(this));
    }
    if (!ok) fail("Cannot set up the upstream request with libcurl", "upstream_unreachable");
    return ok;
  }

  // After the loop let go of the transfer (not cancelled), on the generator's
  // thread: the end of a stream cut short, or the error of a failed request.
  void conclude() {
    if (outcome_ != Outcome::open) return;  // ended, failed or cancelled on the loop
    const OpenAIOptions& o = config_.options;
    if (timed_out_) {
      fail(status_ == 0 ? "Upstream sent no response within " + ms_text(o.read_timeout) +
                              " (read_timeout; " + config_.url.shown + ")"
                        : "Upstream stalled: nothing received for " + ms_text(o.read_timeout) +
                              " (read_timeout; " + config_.url.shown + ")",
           "upstream_timeout");
      return;
    }
    if (mode_ == Mode::error_body) {
      fail(http_status_message(), "upstream_status");
      return;
    }
    if (mode_ == Mode::wrong_type) {
      fail("Upstream answered HTTP " + std::to_string(status_) + " with Content-Type \"" +
               clip_utf8(content_type_, 100) + "\", not an event stream (is " + config_.url.shown +
               " an OpenAI-compatible API?)",
           "upstream_protocol");
      return;
    }
    if (status_ != 0 && (result_ == CURLE_OK || result_ == CURLE_PARTIAL_FILE ||
                         result_ == CURLE_RECV_ERROR || result_ == CURLE_GOT_NOTHING)) {
      // The body ended, or the connection was cut after the headers: a normal
      // end after a finish_reason, an error before one.
      if (mapper_.on_eof(events_) == ChunkMapper::Step::error)
        events_.push_back(error_json(mapper_.error(), mapper_.error_code()));
      flush();
      return;
    }
    const bool not_http =
        result_ == CURLE_WEIRD_SERVER_REPLY || result_ == CURLE_UNSUPPORTED_PROTOCOL;
    fail(transport_message(), not_http ? "upstream_protocol" : "upstream_unreachable");
  }

 private:
  friend class CurlLoop;
  friend struct CurlRunner;
  enum class Mode { sse, error_body, wrong_type };
  enum class Outcome { open, ended, failed, cancelled };

  static constexpr std::size_t kMaxErrorBody = 64 * 1024;
  // A client this far behind pauses its transfer (the upstream's TCP window
  // fills) instead of blocking the loop in send(); it resumes once drained.
  static constexpr std::size_t kPauseAt = 256 * 1024;

  static std::size_t header_cb(char* data, std::size_t size, std::size_t n, void* self) {
    return static_cast<OpenAICall*>(self)->on_header(std::string_view(data, size * n));
  }
  static std::size_t write_cb(char* data, std::size_t size, std::size_t n, void* self) {
    return static_cast<OpenAICall*>(self)->on_body(std::string_view(data, size * n));
  }
  // After the connection (TCP, and TLS) is up, before the request is sent:
  // from here read_timeout counts.
  static int prereq_cb(void* self, char*, char*, int, int) {
    static_cast<OpenAICall*>(self)->on_connected();
    return CURL_PREREQFUNC_OK;
  }

  // The TCP connection is up and the TLS handshake begins.
  static CURLcode tls_cb(CURL*, void*, void* self) {
    static_cast<OpenAICall*>(self)->tls_started_ = true;
    return CURLE_OK;
  }

  void on_connected();  // needs CurlRunner

  std::size_t on_header(std::string_view line) {
    last_byte_ = Clock::now();
    if (status_ == 0 && (line == "\r\n" || line == "\n")) {  // the end of a header block
      long code = 0;
      curl_easy_getinfo(easy_, CURLINFO_RESPONSE_CODE, &code);
      if (code >= 200) {  // not an interim 1xx
        status_ = static_cast<int>(code);
        const char* type = nullptr;
        curl_easy_getinfo(easy_, CURLINFO_CONTENT_TYPE, &type);
        content_type_ = type ? type : "";
        std::string lower = content_type_;
        for (auto& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
        if (status_ > 299) {
          mode_ = Mode::error_body;
        } else if (lower.rfind("text/event-stream", 0) != 0) {
          mode_ = Mode::wrong_type;
        }
      }
    }
    return line.size();
  }

  std::size_t on_body(std::string_view bytes);  // needs CurlRunner

  // Sends what the mapper produced, in one write; false once cancelled.
  bool flush() {
    if (events_.empty()) return true;
    const bool ok = out_.send_batch(events_);
    events_.clear();
    return ok;
  }

  // The one error event of a failed request. `code` (machine-readable):
  // upstream_unreachable (DNS, refused, connect timeout, TLS), upstream_timeout
  // (read_timeout), upstream_status (an HTTP error; "upstream_status" holds
  // it), upstream_error (an error sent in the stream), upstream_protocol (not
  // an event stream, an invalid chunk, a close before the finish).
  nlohmann::json error_json(const std::string& message, const char* code) const {
    nlohmann::json e = {
        {"type", "error"}, {"error", redact(message, config_.options.api_key)}, {"code", code}};
    if (std::string_view(code) == "upstream_status") e["upstream_status"] = status_;
    return e;
  }
  void fail(const std::string& message, const char* code) {
    outcome_ = Outcome::failed;
    out_.send(error_json(message, code));
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

  // libcurl's own words, when it has any: "(...)" after our message.
  std::string curl_detail() const {
    const std::string text = errbuf_[0] ? std::string(errbuf_) : curl_easy_strerror(result_);
    return text.empty() ? std::string() : " (" + clip_utf8(text, 300) + ")";
  }

  std::string transport_message() const {
    const OpenAIOptions& o = config_.options;
    const std::string& where = config_.url.shown;
    switch (result_) {
      case CURLE_COULDNT_RESOLVE_HOST:
        return "Cannot resolve the upstream host \"" + config_.url.host + "\" (" + where + ")";
      case CURLE_COULDNT_CONNECT:
        return "Cannot connect to the upstream at " + where +
               ": connection refused or unreachable (is the model server running?)";
      case CURLE_OPERATION_TIMEDOUT:  // only the connect timeout is libcurl's
        if (tls_started_)
          return "TLS handshake with the upstream at " + where + " failed: no answer within " +
                 ms_text(o.connect_timeout) + " (connect_timeout)";
        return "Timed out connecting to the upstream at " + where + " after " +
               ms_text(o.connect_timeout);
      case CURLE_GOT_NOTHING:
      case CURLE_RECV_ERROR:
        return "Upstream closed the connection before answering (" + where + ")";
      case CURLE_SEND_ERROR: return "Could not send the request to the upstream at " + where;
      case CURLE_SSL_CONNECT_ERROR:
        return "TLS handshake with the upstream at " + where + " failed" + curl_detail();
      case CURLE_SSL_CACERT_BADFILE:
        return "Cannot load the CA certificates" +
               (o.ca_cert_path.empty() ? std::string(" of the system") : " from " + o.ca_cert_path);
      case CURLE_PEER_FAILED_VERIFICATION:
        return "The upstream's TLS certificate at " + where + " could not be verified" +
               (o.ca_cert_path.empty() ? std::string(" (set ca_cert_path for a private CA)")
                                       : " against " + o.ca_cert_path) +
               curl_detail();
      case CURLE_UNSUPPORTED_PROTOCOL:  // "Received HTTP/0.9 when not allowed"
      case CURLE_WEIRD_SERVER_REPLY:
        return "Upstream at " + where + " did not answer in HTTP/1.1" + curl_detail();
      default: return "Upstream request to " + where + " failed" + curl_detail();
    }
  }

  const OpenAIConfig& config_;
  const ChatRequest& request_;
  StreamWriter& out_;
  CURL* easy_ = nullptr;
  curl_slist* headers_ = nullptr;
  std::string request_body_;
  char errbuf_[CURL_ERROR_SIZE] = {};

  // Guarded by CurlLoop::mu_.
  bool submitted_ = false, cancel_requested_ = false, finished_ = false;
  std::condition_variable finished_cv_;

  // The loop thread's while submitted; the generator's before and after.
  CurlRunner* runner_ = nullptr;
  bool written_ = false;  // in runner_->written: events_ wait for its flush
  SseParser parser_;
  ChunkMapper mapper_;
  std::vector<nlohmann::json> events_;
  Mode mode_ = Mode::sse;
  Outcome outcome_ = Outcome::open;
  int status_ = 0;
  std::string content_type_;
  std::string body_;  // an error body, bounded
  bool connected_ = false, paused_ = false, timed_out_ = false, tls_started_ = false;
  CURLcode result_ = CURLE_OK;
  Clock::time_point last_byte_;
};

// The loop thread's state, on its stack: it lives as long as the thread, and a
// thread started after this one exits has its own.
struct CurlRunner {
  CURLM* multi = nullptr;
  std::unique_ptr<EventLoop> loop;  // libcurl's sockets, and the wake for queued work
  std::unordered_map<OpenAICall*, std::shared_ptr<OpenAICall>> active;
  std::vector<OpenAICall*> paused;
  std::vector<OpenAICall*> written;                        // events to send when the pass is over
  std::optional<Clock::time_point> curl_timer;             // when libcurl wants its timeout action
  Clock::time_point next_scan = Clock::time_point::max();  // the earliest read deadline

  CurlRunner() = default;
  CurlRunner(const CurlRunner&) = delete;
  CurlRunner& operator=(const CurlRunner&) = delete;
  ~CurlRunner() {
    if (multi) curl_multi_cleanup(multi);
  }

  // False (errno set) if the kernel or libcurl refuses.
  bool open() {
    try {
      loop = std::make_unique<EventLoop>();
    } catch (const std::system_error& e) {
      errno = e.code().value();
      return false;
    }
    multi = curl_multi_init();
    if (!multi) {
      errno = ENOMEM;
      return false;
    }
    curl_multi_setopt(multi, CURLMOPT_SOCKETFUNCTION, &CurlRunner::socket_cb);
    curl_multi_setopt(multi, CURLMOPT_SOCKETDATA, static_cast<void*>(this));
    curl_multi_setopt(multi, CURLMOPT_TIMERFUNCTION, &CurlRunner::timer_cb);
    curl_multi_setopt(multi, CURLMOPT_TIMERDATA, static_cast<void*>(this));
    return true;
  }

  // libcurl tells which of a transfer's sockets to watch, and for what.
  // The socket's registration is its EventLoop::Watch, kept by libcurl
  // (curl_multi_assign) and handed back here as `known`.
  static int socket_cb(CURL*, curl_socket_t fd, int what, void* self, void* known) {
    auto& r = *static_cast<CurlRunner*>(self);
    auto* watch = static_cast<EventLoop::Watch*>(known);
    if (what == CURL_POLL_REMOVE) {
      r.loop->unwatch(watch);
      curl_multi_assign(r.multi, fd, nullptr);
      return 0;
    }
    std::uint32_t events = 0;
    if (what & CURL_POLL_IN) events |= EPOLLIN;
    if (what & CURL_POLL_OUT) events |= EPOLLOUT;
    if (watch) {
      r.loop->rearm(watch, events);
    } else if ((watch = r.loop->watch(fd, events,
                                      [&r, fd](std::uint32_t ready) { r.on_socket(fd, ready); }))) {
      curl_multi_assign(r.multi, fd, watch);
    }
    return 0;
  }
  void on_socket(curl_socket_t fd, std::uint32_t ev) {
    const int mask = ((ev & (EPOLLIN | EPOLLHUP)) ? CURL_CSELECT_IN : 0) |
                     ((ev & EPOLLOUT) ? CURL_CSELECT_OUT : 0) |
                     ((ev & EPOLLERR) ? CURL_CSELECT_ERR : 0);
    int running = 0;
    curl_multi_socket_action(multi, fd, mask, &running);
  }
  static int timer_cb(CURLM*, long ms, void* self) {
    auto& r = *static_cast<CurlRunner*>(self);
    if (ms < 0) {
      r.curl_timer.reset();
    } else {
      r.curl_timer = Clock::now() + std::chrono::milliseconds(ms);
    }
    return 0;
  }

  void note_deadline(Clock::time_point at) { next_scan = std::min(next_scan, at); }

  void start(std::shared_ptr<OpenAICall> call);
  // Takes the transfer out of libcurl (closing its connection unless it
  // completed) and hands it back to its generator.
  void release(OpenAICall* call);
  void flush_written();  // sends what the last pass over the sockets mapped
  void step();           // waits for sockets, timers or the wake; runs what is due
};

// The event loop: one thread at a time, started by the first transfer and
// gone once none is open or queued, so it holds nothing at exit while idle.
// The object itself is never destroyed (a detached thread may use it until
// the process exits).
class CurlLoop {
 public:
  static CurlLoop& get() {
    static CurlLoop* const loop = new CurlLoop();
    return *loop;
  }

  // Hands `call` to the loop and waits until the loop lets go of it. False
  // when it was cancelled (before it started, or while it ran).
  bool run(const std::shared_ptr<OpenAICall>& call) {
    std::unique_lock<std::mutex> lock(mu_);
    if (call->cancel_requested_) return false;
    call->submitted_ = true;
    adds_.push_back(call);
    if (running_) {
      wake_locked();
    } else {
      running_ = true;
      try {
        std::thread([this] { loop(); }).detach();
      } catch (...) {
        running_ = false;
        adds_.clear();  // only this call: no loop ran, so none was queued before it
        call->finished_ = true;
        throw;
      }
    }
    call->finished_cv_.wait(lock, [&] { return call->finished_; });
    return !call->cancel_requested_;
  }

  // From on_cancel (any thread, also the loop's own inside a send()): the
  // loop removes the transfer at once.
  void cancel(const std::shared_ptr<OpenAICall>& call) {
    std::lock_guard<std::mutex> lock(mu_);
    if (call->cancel_requested_ || call->finished_) return;
    call->cancel_requested_ = true;
    if (!call->submitted_) return;  // run() sees the flag
    cancels_.push_back(call);
    wake_locked();
  }

  // The loop thread hands a call back to its generator.
  void finish(OpenAICall& call) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      call.finished_ = true;
    }
    call.finished_cv_.notify_all();
  }

 private:
  CurlLoop() = default;

  void wake_locked() {
    if (!loop_ || wake_pending_) return;  // a starting loop reads the queues first
    wake_pending_ = true;
    loop_->wake();
  }

  void loop() {
    // SIGPIPE: a write to a reset upstream (libcurl sends with MSG_NOSIGNAL,
    // but OpenSSL's writes are its own). Blocked for good on this thread.
    sigset_t pipe;
    sigemptyset(&pipe);
    sigaddset(&pipe, SIGPIPE);
    ::pthread_sigmask(SIG_BLOCK, &pipe, nullptr);
    name_thread("as-upstream");
    // Started by a generator thread that a shutdown demoted to SCHED_IDLE,
    // this thread would inherit the class; it serves every server.
    if (::sched_getscheduler(0) == SCHED_IDLE) {
      const sched_param normal{0};
      ::sched_setscheduler(0, SCHED_OTHER, &normal);
    }
    CurlRunner r;
    if (!r.open()) {
      const std::string why = std::strerror(errno);
      std::vector<std::shared_ptr<OpenAICall>> orphans;
      {
        std::lock_guard<std::mutex> lock(mu_);
        running_ = false;
        orphans.swap(adds_);
        cancels_.clear();
      }
      for (auto& call : orphans) {
        call->result_ = CURLE_FAILED_INIT;
        std::snprintf(call->errbuf_, sizeof call->errbuf_, "cannot start the HTTP client: %s",
                      why.c_str());
        finish(*call);
      }
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      loop_ = r.loop.get();
    }
    for (;;) {
      std::vector<std::shared_ptr<OpenAICall>> adds, cancels;
      {
        std::lock_guard<std::mutex> lock(mu_);
        adds.swap(adds_);
        cancels.swap(cancels_);
        wake_pending_ = false;
        if (adds.empty() && cancels.empty() && r.active.empty()) {
          running_ = false;
          loop_ = nullptr;
          break;
        }
      }
      for (auto& call : adds) r.start(std::move(call));
      for (auto& call : cancels) r.release(call.get());
      if (!r.active.empty()) r.step();  // else: the check above ends the thread
    }
  }

  std::mutex mu_;
  std::vector<std::shared_ptr<OpenAICall>> adds_, cancels_;
  bool running_ = false;
  bool wake_pending_ = false;
  EventLoop* loop_ = nullptr;  // the running loop's
};

inline void OpenAICall::on_connected() {
  connected_ = true;
  last_byte_ = Clock::now();
  runner_->note_deadline(last_byte_ + config_.options.read_timeout);
}

inline std::size_t OpenAICall::on_body(std::string_view bytes) {
  if (outcome_ != Outcome::open) return CURL_WRITEFUNC_ERROR;
  last_byte_ = Clock::now();
  if (mode_ == Mode::wrong_type) return CURL_WRITEFUNC_ERROR;  // the headers said all
  if (mode_ == Mode::error_body) {
    body_.append(bytes.data(), std::min(bytes.size(), kMaxErrorBody - body_.size()));
    return body_.size() < kMaxErrorBody ? bytes.size() : CURL_WRITEFUNC_ERROR;
  }
  if (out_.buffered() > kPauseAt) {
    paused_ = true;
    runner_->paused.push_back(this);
    return CURL_WRITEFUNC_PAUSE;  // libcurl keeps these bytes for the resume
  }
  const bool fed = parser_.feed(bytes, [&](const SseEvent& e) {
    const ChunkMapper::Step step =
        e.error.empty() ? mapper_.on_data(e.data, events_) : mapper_.on_error_field(e.error);
    if (step == ChunkMapper::Step::error) {
      events_.push_back(error_json(mapper_.error(), mapper_.error_code()));
      outcome_ = Outcome::failed;
    } else if (step == ChunkMapper::Step::end) {
      outcome_ = Outcome::ended;
    }
    return step == ChunkMapper::Step::more;
  });
  if (!fed && parser_.overflow()) {
    events_.push_back(error_json(
        "Upstream sent an SSE line or event over " + std::to_string(SseParser::kMaxLine) + " bytes",
        "upstream_protocol"));
    outcome_ = Outcome::failed;
  }
  // libcurl hands over a chunked body one chunk at a time, and a late loop
  // finds several of a stream's tokens waiting: they go out in one write
  // when this pass over the sockets is over (CurlRunner::flush_written).
  if (!events_.empty() && !written_) {
    written_ = true;
    runner_->written.push_back(this);
  }
  if (out_.cancelled() && outcome_ == Outcome::open) outcome_ = Outcome::cancelled;
  return outcome_ == Outcome::open ? bytes.size() : CURL_WRITEFUNC_ERROR;
}

inline void CurlRunner::start(std::shared_ptr<OpenAICall> call) {
  call->runner_ = this;
  call->last_byte_ = Clock::now();
  if (curl_multi_add_handle(multi, call->easy_) != CURLM_OK) {
    call->result_ = CURLE_FAILED_INIT;
    CurlLoop::get().finish(*call);
    return;
  }
  active.emplace(call.get(), std::move(call));
}

inline void CurlRunner::flush_written() {
  // A flush may cancel (the client is gone) and so queue a release: never
  // one of this list's calls from under it, since cancels wait for loop().
  std::vector<OpenAICall*> calls;
  calls.swap(written);
  for (OpenAICall* c : calls) {
    c->written_ = false;
    if (!c->flush() && c->outcome_ == OpenAICall::Outcome::open)
      c->outcome_ = OpenAICall::Outcome::cancelled;
  }
}

inline void CurlRunner::release(OpenAICall* call) {
  const auto it = active.find(call);
  if (it == active.end()) return;  // already released
  const std::shared_ptr<OpenAICall> keep = std::move(it->second);
  active.erase(it);
  if (call->paused_) paused.erase(std::remove(paused.begin(), paused.end(), call), paused.end());
  if (call->written_) {
    written.erase(std::remove(written.begin(), written.end(), call), written.end());
    call->written_ = false;
    call->flush();
  }
  curl_multi_remove_handle(multi, call->easy_);
  call->runner_ = nullptr;
  CurlLoop::get().finish(*call);
}

inline void CurlRunner::step() {
  std::optional<Clock::time_point> until;
  const auto at_most = [&](Clock::time_point t) { until = until ? std::min(*until, t) : t; };
  if (curl_timer) at_most(*curl_timer);
  if (next_scan != Clock::time_point::max()) at_most(next_scan);
  // A paused client's backlog is polled, as the demo does.
  if (!paused.empty()) at_most(Clock::now() + std::chrono::milliseconds(5));
  loop->pass(until);
  int running = 0;
  if (curl_timer && *curl_timer <= Clock::now()) {
    curl_timer.reset();
    curl_multi_socket_action(multi, CURL_SOCKET_TIMEOUT, 0, &running);
  }
  flush_written();
  // Transfers libcurl has finished (completed, failed, or stopped by a callback).
  int left = 0;
  while (CURLMsg* msg = curl_multi_info_read(multi, &left)) {
    if (msg->msg != CURLMSG_DONE) continue;
    char* call = nullptr;
    curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, &call);
    const CURLcode result = msg->data.result;
    auto* c = static_cast<OpenAICall*>(static_cast<void*>(call));
    c->result_ = result;
    release(c);
  }
  const auto later = Clock::now();
  // read_timeout: the longest silence of each connected, unpaused transfer.
  if (later >= next_scan) {
    next_scan = Clock::time_point::max();
    std::vector<OpenAICall*> expired;
    for (const auto& item : active) {
      OpenAICall* c = item.first;
      if (!c->connected_ || c->paused_) continue;
      const auto deadline = c->last_byte_ + c->config_.options.read_timeout;
      if (deadline <= later) {
        expired.push_back(c);
      } else {
        note_deadline(deadline);
      }
    }
    for (OpenAICall* c : expired) {
      c->timed_out_ = true;
      release(c);
    }
  }
  // Resumes the paused transfers whose clients caught up (or left).
  if (!paused.empty()) {
    std::vector<OpenAICall*> check;
    check.swap(paused);
    for (OpenAICall* c : check) {
      if (c->out_.buffered() > OpenAICall::kPauseAt / 2 && !c->out_.cancelled()) {
        paused.push_back(c);
        continue;
      }
      c->paused_ = false;
      c->last_byte_ = later;
      note_deadline(later + c->config_.options.read_timeout);
      // May deliver the kept bytes at once (and pause again, or end).
      const CURLcode rc = curl_easy_pause(c->easy_, CURLPAUSE_CONT);
      if (rc != CURLE_OK && active.count(c)) {
        c->result_ = rc;
        release(c);
      }
    }
  }
}

inline void run_openai(const OpenAIConfig& config, const ChatRequest& request, StreamWriter& out) {
  if (out.cancelled()) return;
  const auto call = std::make_shared<OpenAICall>(config, request, out);
  if (!call->prepare()) return;
  // May run on a server thread, mid-send(), or at once here if already cancelled.
  const std::weak_ptr<OpenAICall> weak = call;
  out.on_cancel([weak] {
    if (const auto c = weak.lock()) CurlLoop::get().cancel(c);
  });
  if (CurlLoop::get().run(call)) call->conclude();
}

}  // namespace detail
}  // namespace agentsmithy
