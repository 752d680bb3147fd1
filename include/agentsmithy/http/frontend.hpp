namespace agentsmithy {
namespace detail {

// ===========================================================================
// HTTP front end: cpp-httplib parses requests; we own the connections
// ===========================================================================

// Holds one of max_streams slots until the chat request's generator returns.
class Admission {
 public:
  explicit Admission(Core& core) : core_(&core) {}
  Admission(Admission&& other) noexcept : core_(std::exchange(other.core_, nullptr)) {}
  Admission& operator=(Admission&&) = delete;
  ~Admission() {
    if (core_) core_->release();
  }

 private:
  Core* core_;
};

// A validated chat request, answered after cpp-httplib's request handling
// has returned, so that nothing below touches the HTTP server object (a
// generator may outlive it).
struct ChatJob {
  ChatRequest request;
  Core::Producer producer;
  Admission admission;
  StreamFormat format;
  std::string extra_headers;  // CORS, as complete header lines
  bool store_failed = false;  // the dialog could not be read: store_unavailable
  bool named = false;         // the request gave its dialog_id
};

// The connection the current worker thread is serving.
struct Connection {
  SocketStream* stream;
  bool close_announced = false;  // cpp-httplib adds "Connection: close" itself
  bool close_after = false;
  std::optional<ChatJob> chat;
};
inline thread_local Connection* t_connection = nullptr;

// The CORS headers of an answer to an allowed Origin: every response, and a
// stream's head, which we write ourselves.
inline std::vector<std::pair<const char*, std::string>> cors_headers(const std::string& origin) {
  return {{"Access-Control-Allow-Origin", origin}, {"Vary", "Origin"}};
}

inline const char* reason_phrase(int status) {
  switch (status) {
    case 200: return "OK";
    case 500: return "Internal Server Error";
    case 503: return "Service Unavailable";
    default: return "Unknown";
  }
}

class HttpFrontend final : public HttplibServer {
 public:
  explicit HttpFrontend(std::shared_ptr<Core> core);

  // The bound port, or -1 with the reason in `why`.
  int bind(std::string& why);
  // Stops the waiting room (closing what still waits in it), then the pool.
  void stop_workers();

 private:
  static constexpr std::size_t kMaxRequestsPerConnection = 100;
  enum class Next { read, park, close };

  void on_connection(int sock) override;
  // Serves `sock` on this worker while requests are ready; `served`: how
  // many it already had.
  void serve(int sock, std::size_t served);
  Next next_request(const SocketStream& stream, bool first) const;
  HandlerResponse guard(const httplib::Request& req, httplib::Response& res);
  std::optional<std::string> allowed_origin(const httplib::Request& req) const;
  void handle_chat(const httplib::Request& req, httplib::Response& res);
  void handle_chat_get(const httplib::Request& req, httplib::Response& res);
  void admit_chat(const httplib::Request& req, httplib::Response& res, ChatRequest request,
                  StreamFormat format);
  void handle_health(const httplib::Request& req, httplib::Response& res);
  void handle_metrics(const httplib::Request& req, httplib::Response& res);
  std::string route_label(const httplib::Request& req) const;
  static void close_after_response(httplib::Response& res);
  void respond_shutting_down(httplib::Response& res);
  // The admission decision for a chat or a host route: true when it was
  // refused (503), counted under `outcome` if given.
  bool refuse_while_draining(httplib::Response& res, std::optional<Outcome> outcome = {});

  static void produce(const std::shared_ptr<Core>& core, const ChatJob& job,
                      const std::shared_ptr<Channel>& ch);
  static void run_stream(const std::shared_ptr<Core>& core, int fd, ChatJob job);
  static void run_collect(const std::shared_ptr<Core>& core, SocketStream& stream, ChatJob job);

  // AgentSmithy's dialogs API: the /current routes before the {id} ones.
  void add_dialog_routes();

  std::shared_ptr<Core> core_;
  DialogsApi dialogs_;
  std::vector<std::pair<std::string, std::regex>> host_paths_;  // for route labels
  WorkerPool pool_;
  WaitingRoom room_;  // after pool_, which it feeds
};

inline HttpFrontend::HttpFrontend(std::shared_ptr<Core> core)
    : core_(std::move(core)),
      dialogs_(core_->store, core_->current_dialog_mu, core_->store_health),
      pool_(core_->options.max_streams + 64, std::chrono::milliseconds(2000)),
      room_(*core_, [this](int fd, std::size_t served) {
        pool_.enqueue([this, fd, served] { serve(fd, served); });
      }) {
  const agentsmithy::Options& o = core_->options;
  // The library's defaults add SO_REUSEPORT, which lets a second server bind
  // the same port silently; a taken port must fail instead.
  set_socket_options([](socket_t sock) {
    const int one = 1;
    ::setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  });
  set_payload_max_length(o.max_body_bytes);
  set_read_timeout(o.read_timeout);
  set_write_timeout(o.write_timeout);
  // Only for the Keep-Alive header it writes: the keep-alive loop is ours.
  set_keep_alive_max_count(kMaxRequestsPerConnection);
  set_keep_alive_timeout(std::max<time_t>(
      1, std::chrono::duration_cast<std::chrono::seconds>(o.keep_alive_timeout).count()));
  // The library deletes the queue it gets when its accept loop ends; the
  // pool outlives that, because the waiting room still feeds it.
  new_task_queue = [this] { return new WorkerPool::Ref(pool_); };
  const std::size_t max_body = o.max_body_bytes;
  set_error_handler(
      Server::HandlerWithResponse([max_body](const httplib::Request& req, httplib::Response& res) {
        if (!res.body.empty()) return HandlerResponse::Unhandled;
        std::string message;
        switch (res.status) {
          case 404: message = "Not found: " + req.method + " " + req.path; break;
          case 413: message = "Request body exceeds " + std::to_string(max_body) + " bytes"; break;
          case 400: message = "Bad request"; break;
          case 500: message = "Internal server error"; break;
          default: message = "HTTP error " + std::to_string(res.status); break;
        }
        res.set_content(error_body(message), "application/json");
        return HandlerResponse::Handled;
      }));
  // The library's own answer to an exception puts its text in a header.
  set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr) {
    res.status = 500;
    res.set_content(error_body("Internal server error"), "application/json");
  });
  set_pre_routing_handler(
      [this](const httplib::Request& req, httplib::Response& res) { return guard(req, res); });
  set_post_routing_handler([this](const httplib::Request& req, httplib::Response& res) {
    if (const auto origin = allowed_origin(req)) {
      for (const auto& [name, value] : cors_headers(*origin)) res.set_header(name, value);
    }
  });
  // Called once a request is answered (a stream: once its head is due).
  set_logger([this](const httplib::Request& req, const httplib::Response& res) {
    core_->metrics.count_request(route_label(req), res.status);
  });
  Post("/api/chat",
       [this](const httplib::Request& req, httplib::Response& res) { handle_chat(req, res); });
  Get("/api/chat",
      [this](const httplib::Request& req, httplib::Response& res) { handle_chat_get(req, res); });
  Get("/health",
      [this](const httplib::Request& req, httplib::Response& res) { handle_health(req, res); });
  Get("/metrics",
      [this](const httplib::Request& req, httplib::Response& res) { handle_metrics(req, res); });
  add_dialog_routes();
  std::vector<Core::HostRoute> routes;
  {
    std::lock_guard<std::mutex> lock(core_->mu);
    routes = core_->routes;
  }
  for (Core::HostRoute& r : routes) {
    host_paths_.emplace_back(r.path, std::regex(r.path));
    auto handler = [this, h = std::move(r.handler)](const httplib::Request& req,
                                                    httplib::Response& res) {
      if (refuse_while_draining(res)) return;
      h(req, res);
    };
    if (r.method == "GET") Get(r.path, std::move(handler));
    if (r.method == "POST") Post(r.path, std::move(handler));
    if (r.method == "PUT") Put(r.path, std::move(handler));
    if (r.method == "PATCH") Patch(r.path, std::move(handler));
    if (r.method == "DELETE") Delete(r.path, std::move(handler));
  }
}

inline void HttpFrontend::add_dialog_routes() {
  using Handler = void (DialogsApi::*)(const httplib::Request&, httplib::Response&);
  // Served like the chat: the Host guard, auth and CORS run before; a drain
  // refuses them.
  const auto route = [this](Handler handler) {
    return [this, handler](const httplib::Request& req, httplib::Response& res) {
      if (refuse_while_draining(res)) return;
      (dialogs_.*handler)(req, res);
    };
  };
  const std::string id = "/api/dialogs/([A-Za-z0-9_-]+)";
  Get("/api/dialogs/current", route(&DialogsApi::get_current));
  Patch("/api/dialogs/current", route(&DialogsApi::set_current));
  Get("/api/dialogs", route(&DialogsApi::list_dialogs));
  Post("/api/dialogs", route(&DialogsApi::create_dialog));
  Get(id + "/history", route(&DialogsApi::history));
  Get(id + "/session", route(&DialogsApi::session));
  // Any other last segment: the handlers answer 422 for an id that is not valid.
  const std::string any = "/api/dialogs/([^/]+)";
  Get(any, route(&DialogsApi::get_dialog));
  Patch(any, route(&DialogsApi::patch_dialog));
  Delete(any, route(&DialogsApi::delete_dialog));
}

inline std::string HttpFrontend::route_label(const httplib::Request& req) const {
  for (const char* known :
       {"/api/chat", "/health", "/metrics", "/api/dialogs", "/api/dialogs/current"}) {
    if (req.path == known) return known;
  }
  if (req.path.rfind("/api/dialogs/", 0) == 0) {
    const auto slash = req.path.rfind('/');
    const std::string last = req.path.substr(slash + 1);
    if (slash > 12 && (last == "history" || last == "session")) return "/api/dialogs/{id}/" + last;
    return "/api/dialogs/{id}";
  }
  for (const auto& [path, pattern] : host_paths_) {
    if (std::regex_match(req.path, pattern)) return path;
  }
  return "other";
}

inline int HttpFrontend::bind(std::string& why) {
  const agentsmithy::Options& o = core_->options;
  return bind_port(o.host, o.port, o.port_attempts, why);
}

inline void HttpFrontend::stop_workers() {
  room_.stop();
  pool_.shutdown();
}

// Whether the next request can be read now without waiting for it: waiting
// is the waiting room's job, not a worker's.
inline HttpFrontend::Next HttpFrontend::next_request(const SocketStream& stream, bool first) const {
  if (stream.buffered() > 0) return Next::read;  // a pipelined request
  pollfd fd{stream.socket(), POLLIN, 0};
  int n;
  do {
    // A new connection's request usually follows its handshake at once:
    // waiting a moment for it saves the round trip through the waiting room.
    n = ::poll(&fd, 1, first ? 2 : 0);
  } while (n < 0 && errno == EINTR);
  if (n > 0) return Next::read;
  if (n < 0) return Next::close;
  if (!first && admission_decision(core_->life, Arrival::next_request) == Admit::close) {
    ++core_->idle_closed;
    return Next::close;
  }
  return Next::park;
}

inline void HttpFrontend::on_connection(int sock) {
  core_->add_connection(sock);
  const int one = 1;
  ::setsockopt(sock, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  serve(sock, 0);
}

inline void HttpFrontend::serve(int sock, std::size_t served) {
  // A copy: if a generator outlives the Server, this frame must not reach
  // back into `this` once the generator returns.
  const std::shared_ptr<Core> core = core_;
  SocketStream stream(sock, core->options);
  Connection conn{&stream, false, false, std::nullopt};
  t_connection = &conn;
  Next next = Next::close;
  for (; served < kMaxRequestsPerConnection; ++served) {
    next = next_request(stream, served == 0);
    if (next != Next::read) break;
    stream.begin_request();
    conn.close_announced = core->life.refusing() || served + 1 == kMaxRequestsPerConnection;
    bool client_closes = false;
    const bool ok = read_and_answer(stream, conn.close_announced, client_closes);
    next = Next::close;
    if (conn.chat || !ok || client_closes || conn.close_announced || conn.close_after ||
        stream.failed()) {
      break;
    }
  }
  t_connection = nullptr;
  if (next == Next::park) return room_.park(sock, served);
  stream.set_muted(false);
  if (conn.chat && conn.chat->request.stream) {
    core->remove_connection(sock);  // the hub owns the socket from here
    run_stream(core, sock, std::move(*conn.chat));
    return;
  }
  if (conn.chat) run_collect(core, stream, std::move(*conn.chat));
  core->remove_connection(sock);
  ::close(sock);
}

inline void HttpFrontend::close_after_response(httplib::Response& res) {
  if (!t_connection) return;
  if (!t_connection->close_announced) res.set_header("Connection", "close");
  t_connection->close_after = true;
}

inline void HttpFrontend::respond_shutting_down(httplib::Response& res) {
  ++core_->refused;
  res.status = 503;
  res.set_header("Retry-After", kRetryAfterSeconds);
  close_after_response(res);
  res.set_content(error_body(kShutdownMessage, "shutdown"), "application/json");
}

inline bool HttpFrontend::refuse_while_draining(httplib::Response& res,
                                                std::optional<Outcome> outcome) {
  if (admission_decision(core_->life, Arrival::request) != Admit::refuse_503) return false;
  if (outcome) core_->metrics.count_end(*outcome);
  respond_shutting_down(res);
  return true;
}

inline std::optional<std::string> HttpFrontend::allowed_origin(const httplib::Request& req) const {
  const auto& origins = core_->options.cors_origins;
  if (origins.empty() || !req.has_header("Origin")) return std::nullopt;
  const std::string origin = req.get_header_value("Origin");
  if (std::find(origins.begin(), origins.end(), origin) == origins.end()) return std::nullopt;
  return origin;
}

// Runs before routing, so a rejected request's body is never read: the
// connection closes after the answer.
inline httplib::Server::HandlerResponse HttpFrontend::guard(const httplib::Request& req,
                                                            httplib::Response& res) {
  const agentsmithy::Options& o = core_->options;
  const auto reject = [&](int status, const std::string& message) {
    res.status = status;
    res.set_content(error_body(message), "application/json");
    close_after_response(res);
    return HandlerResponse::Handled;
  };
  if (is_loopback_host(o.host) && req.has_header("Host") &&
      !is_loopback_host_header(req.get_header_value("Host"), core_->port)) {
    return reject(403,
                  "Host not allowed: a server bound to loopback answers only localhost, "
                  "127.0.0.1 or [::1]");
  }
  if (req.method == "OPTIONS") {  // CORS preflight: no credentials are sent with it
    if (req.has_header("Origin") && !allowed_origin(req)) {
      return reject(403, "Origin not allowed: " + req.get_header_value("Origin"));
    }
    res.status = 204;
    res.set_header("Allow", "GET, POST, PATCH, DELETE, OPTIONS");
    if (req.has_header("Origin")) {
      res.set_header("Access-Control-Allow-Methods", "GET, POST, PATCH, DELETE, OPTIONS");
      res.set_header("Access-Control-Allow-Headers", "Content-Type, Authorization, Accept");
      res.set_header("Access-Control-Max-Age", "600");
    }
    return HandlerResponse::Handled;
  }
  if (!o.auth_token.empty() && req.path.rfind("/api/", 0) == 0) {
    bool ok = constant_time_equal(req.get_header_value("Authorization"), "Bearer " + o.auth_token);
    // EventSource cannot send headers: the GET chat route (only) also takes
    // the token as ?access_token= (RFC 6750 2.3). The server never logs a
    // request's URL, and the stream answer says Referrer-Policy: no-referrer.
    if (!ok && req.method == "GET" && req.path == "/api/chat" && req.has_param("access_token")) {
      ok = constant_time_equal(req.get_param_value("access_token"), o.auth_token);
    }
    if (!ok) {
      res.set_header("WWW-Authenticate", "Bearer");
      return reject(401, "Missing or invalid bearer token");
    }
  }
  return HandlerResponse::Unhandled;
}

inline void HttpFrontend::handle_chat(const httplib::Request& req, httplib::Response& res) {
  if (refuse_while_draining(res, Outcome::rejected_stopping)) return;
  ChatRequest request;
  if (const auto error = parse_chat_request(req.body, request)) {
    res.status = error->status;
    res.set_content(error_body(error->message), "application/json");
    return;
  }
  admit_chat(req, res, std::move(request), StreamFormat{req.version != "HTTP/1.0", false});
}

// GET /api/chat?message=TEXT[&dialog_id=ID][&context=JSON]: the stream POST
// answers for {"messages":[{"role":"user","content":TEXT}],"stream":true},
// for EventSource, with an `id:` line per event.
inline void HttpFrontend::handle_chat_get(const httplib::Request& req, httplib::Response& res) {
  if (refuse_while_draining(res, Outcome::rejected_stopping)) return;
  // An EventSource reconnecting after its stream ended: 204 tells it to stop,
  // and the answer is never generated twice.
  if (req.has_header("Last-Event-ID")) {
    res.status = 204;
    return;
  }
  json body = {{"stream", true}};
  if (!req.has_param("message")) {
    res.status = 422;
    res.set_content(error_body("message: query parameter required"), "application/json");
    return;
  }
  body["messages"] = json::array({{{"role", "user"}, {"content", req.get_param_value("message")}}});
  if (req.has_param("dialog_id")) body["dialog_id"] = req.get_param_value("dialog_id");
  if (req.has_param("context")) {
    // Bounded and checked like a POST body's JSON, and reported against the
    // parameter.
    const std::string context = req.get_param_value("context");
    if (json_nesting_depth(context) > kMaxJsonDepth || context.find('\0') != std::string::npos) {
      res.status = 400;
      res.set_content(error_body("context: Invalid JSON: too deep or contains a NUL byte"),
                      "application/json");
      return;
    }
    try {
      body["context"] = json::parse(context);
    } catch (const json::exception& e) {
      res.status = 400;
      res.set_content(error_body(std::string("context: Invalid JSON: ") + e.what()),
                      "application/json");
      return;
    }
  }
  const std::string text = dump_json(body);
  ChatRequest request;
  if (const auto error = parse_chat_request(text, request)) {
    res.status = error->status;
    res.set_content(error_body(error->message), "application/json");
    return;
  }
  admit_chat(req, res, std::move(request), StreamFormat{req.version != "HTTP/1.0", true});
}

inline void HttpFrontend::admit_chat(const httplib::Request& req, httplib::Response& res,
                                     ChatRequest request, StreamFormat format) {
  Core& core = *core_;
  if (!core.try_admit()) {
    core.metrics.count_end(Outcome::rejected_capacity);
    core.log(LogLevel::warning, "at capacity (" + std::to_string(core.options.max_streams) +
                                    " streams): answering 503");
    res.status = 503;
    res.set_header("Retry-After", kRetryAfterSeconds);
    res.set_content(error_body("Too many concurrent streams (max " +
                                   std::to_string(core.options.max_streams) + ")",
                               "capacity"),
                    "application/json");
    return;
  }
  Admission admission(core);
  if (!t_connection) return respond_shutting_down(res);  // not served by our loop
  bool store_failed = false;
  const bool named = !request.dialog_id.empty();
  try {
    resolve_dialog(core, request);
    remember(core, request, named);
    core.store_health.succeeded();
  } catch (const std::exception& e) {
    core.store_health.failed("reading dialog " + request.dialog_id, e);
    if (request.dialog_id.empty()) request.dialog_id = new_dialog_id();
    store_failed = true;
  }
  t_connection->stream->set_muted(true);
  std::string extra_headers;
  if (const auto origin = allowed_origin(req)) {
    for (const auto& [name, value] : cors_headers(*origin)) {
      extra_headers += std::string(name) + ": " + value + "\r\n";
    }
  }
  if (format.event_ids) extra_headers += "Referrer-Policy: no-referrer\r\n";
  t_connection->chat.emplace(ChatJob{std::move(request), core.current_producer(),
                                     std::move(admission), format, std::move(extra_headers),
                                     store_failed, named});
}

inline void HttpFrontend::handle_health(const httplib::Request&, httplib::Response& res) {
  const Core& core = *core_;
  const bool stopping = core.life.shutdown_requested();
  const auto& errors = core.options.config_errors;
  const json body = {{"status", "ok"},
                     {"service", "agentsmithy-server"},
                     {"server_status", stopping ? "stopping" : "ready"},
                     {"pid", static_cast<long>(::getpid())},
                     {"port", core.port.load()},
                     {"active_streams", core.hub.active()},
                     {"config_valid", errors.empty()},
                     {"store_ok", core.store_health.ok()},
                     {"config_errors", errors.empty() ? json(nullptr) : json(errors)},
                     {"ide", core.options.ide.empty() ? json(nullptr) : json(core.options.ide)}};
  res.status = stopping ? 503 : 200;
  // A balancer's health check, like a client, is told when to come back.
  if (stopping) res.set_header("Retry-After", kRetryAfterSeconds);
  res.set_content(dump_json(body), "application/json");
}

inline void HttpFrontend::handle_metrics(const httplib::Request&, httplib::Response& res) {
  res.set_content(
      core_->metrics.render(core_->hub.active(), core_->life.phase(), core_->store_health.errors()),
      "text/plain; version=0.0.4");
}

// Runs the producer for one chat request: a generator on this thread until it
// returns, or a stream handler that returns at once and leaves the stream to
// whoever holds the writer.
inline void HttpFrontend::produce(const std::shared_ptr<Core>& core, const ChatJob& job,
                                  const std::shared_ptr<Channel>& ch) {
  const std::shared_ptr<StreamWriter> writer(new StreamWriter(core, ch));
  const bool threaded = static_cast<bool>(job.producer.generator);
  const pid_t tid = ::gettid();
  if (threaded) {
    std::lock_guard<std::mutex> lock(core->generator_threads_mu);
    core->generator_threads.insert(tid);
  }
  std::optional<std::string> error;
  try {
    if (threaded) {
      const WorkerPool::Blocking whole_stream;
      job.producer.generator(job.request, *writer);
    } else {
      job.producer.handler(job.request, writer);
    }
  } catch (const std::exception& e) {
    error = e.what();
  } catch (...) {
    error = "generator failed with an unknown exception";
  }
  if (threaded) {
    std::lock_guard<std::mutex> lock(core->generator_threads_mu);
    core->generator_threads.erase(tid);
  }
  if (error) {
    core->log(LogLevel::warning, "dialog " + ch->dialog_id + ": " +
                                     (threaded ? "generator" : "stream handler") +
                                     " threw: " + *error);
    core->hub.finish(*ch, error_event(*error, "generator_error"));
  } else if (threaded) {
    core->hub.finish(*ch, std::nullopt);
  }
  // A handler's stream ends when the last writer reference goes.
}

inline void HttpFrontend::run_stream(const std::shared_ptr<Core>& core, int fd, ChatJob job) {
  ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL, 0) | O_NONBLOCK);
  const auto ch = core->hub.open_stream(fd, job.request.dialog_id, job.format,
                                        stream_response_head(job.format.chunked, job.extra_headers),
                                        std::make_shared<Admission>(std::move(job.admission)));
  core->log(LogLevel::debug, "dialog " + ch->dialog_id + ": stream started");
  const std::string query = user_text(job.request);
  const bool recorded = !job.store_failed && start_turn(*core, ch, query, job.named);
  if (core->options.user_event) {
    const json user{{"type", "user"}, {"content", query}};
    core->hub.send(*ch, &user, 1, false);
  }
  if (!recorded) {
    // A turn the store cannot hold is not answered: the next one would not
    // remember it.
    const json error = error_event(kStoreUnavailable, "store_unavailable");
    core->hub.send(*ch, &error, 1, false);
    return;
  }
  produce(core, job, ch);
}

inline void HttpFrontend::run_collect(const std::shared_ptr<Core>& core, SocketStream& stream,
                                      ChatJob job) {
  const auto ch = core->hub.open_collector(job.request.dialog_id,
                                           std::make_shared<Admission>(std::move(job.admission)));
  const bool recorded =
      !job.store_failed && start_turn(*core, ch, user_text(job.request), job.named);
  int status = 200;
  std::string body;
  if (!recorded) {
    core->hub.finish(*ch, std::nullopt);
    status = 503;
    body = error_body(kStoreUnavailable, "store_unavailable");
  } else {
    produce(core, job, ch);
    const WorkerPool::Blocking until_answered;
    std::unique_lock<std::mutex> lock(ch->mu);
    // A stream handler's producer may still be at work.
    ch->cv.wait(lock, [&] { return ch->ended || ch->closed; });
    if (ch->ended_by_shutdown || ch->closed) {
      status = 503;
      body = error_body(kShutdownMessage, "shutdown");
    } else if (!ch->error.empty()) {
      status = 500;
      body = error_body(ch->error, "generator_error");
    } else {
      body = dump_json(json{{"content", ch->collected},
                            {"done", true},
                            {"metadata", {{"dialog_id", ch->dialog_id}, {"events", ch->events}}}});
    }
  }
  std::string response =
      "HTTP/1.1 " + std::to_string(status) + " " + reason_phrase(status) +
      "\r\nContent-Type: application/json\r\nContent-Length: " + std::to_string(body.size()) +
      "\r\nConnection: close\r\n" + job.extra_headers;
  if (status == 503) response += std::string("Retry-After: ") + kRetryAfterSeconds + "\r\n";
  response += "\r\n" + body;
  stream.write(response.data(), response.size());
}

}  // namespace detail
}  // namespace agentsmithy
