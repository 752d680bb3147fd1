namespace agentsmithy {

// ===========================================================================
// Chat service: the /api/chat endpoint's state
// ===========================================================================

class ChatService {
 public:
  // set_generator and set_stream_handler replace each other: the last one set
  // serves the requests that arrive from then on. Neither set: the demo,
  // through demo_stream_handler().
  void set_generator(Generator generator);
  void set_stream_handler(StreamHandler handler);
  // Chat requests in flight whose client is still connected.
  std::size_t active_streams() const;
  bool is_shutting_down() const;

  ChatService(const ChatService&) = delete;
  ChatService& operator=(const ChatService&) = delete;

 private:
  friend class Server;
  explicit ChatService(detail::Core& core) : core_(core) {}
  detail::Core& core_;
};

// ===========================================================================
// Server
// ===========================================================================

// A host's own endpoint on the chat server's port (see Server::route).
using RouteHandler = std::function<void(const httplib::Request&, httplib::Response&)>;

// What the last shutdown did (Server::shutdown_report).
struct ShutdownReport {
  enum class Cause { signal, shutdown, forced };
  Cause cause = Cause::shutdown;                  // how it started (forced: by a second signal or
                                                  // force_shutdown() before it started)
  bool forced = false;                            // the drain was cut short by force_shutdown()
  std::chrono::system_clock::time_point started;  // when it was asked for
  std::chrono::milliseconds lame_duck{0};         // how long the lame duck lasted
  std::chrono::milliseconds drain{0};             // from the drain's start to the end of waiting
  std::chrono::milliseconds last_done{0};         // from the start to the last final event written
  std::size_t streams_notified = 0;               // open streams that got the shutdown error + done
  std::size_t streams_ended_in_grace = 0;   // ... whose producer then ended within the grace period
  std::size_t streams_cut = 0;              // connections still open at the deadline, closed
  std::size_t clients_gone = 0;             // streams whose client had left before the drain
  std::size_t generators_running = 0;       // producers still running when listen() returned
  std::size_t idle_connections_closed = 0;  // keep-alive connections closed at the drain
  std::size_t requests_refused = 0;         // requests answered 503 while stopping
};

class Server {
 public:
  explicit Server(Options options = {});
  // Shuts down and waits for listen() to return if it is still running.
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  ChatService& chat_service() { return chat_service_; }
  const Options& options() const;

  // Binds and serves; blocks until the graceful shutdown has completed (true)
  // or returns false at once when it cannot bind. A Server serves once.
  bool listen();
  // True once accepting connections; false on timeout or once listen() failed.
  bool wait_until_ready(std::chrono::milliseconds timeout) const;
  // The bound port (the real one when 0 was asked); 0 before binding.
  int port() const;

  // Starts the graceful shutdown and returns at once. Thread-safe, idempotent,
  // safe from inside a generator. Before listen(), listen() returns at once.
  void shutdown();
  // Like shutdown(), but closes every remaining connection at once instead of
  // waiting for the drain (Go's Server.Close). listen() returns promptly.
  void force_shutdown();
  bool is_shutting_down() const;
  // Hooks run in order once the streams have drained, before listen()
  // returns. A throwing hook is logged; the rest still run.
  void on_shutdown(std::function<void()> hook);
  // Empty until a shutdown has completed (listen() returned).
  std::optional<ShutdownReport> shutdown_report() const;

  // Serves `handler` for `method` (GET, POST, PUT, PATCH, DELETE) and `path`
  // (cpp-httplib's pattern syntax) on this server's port, under the same
  // Host guard and CORS; bearer auth applies under /api/. Once the drain has
  // begun, host routes are answered 503 like new chats. Call before listen();
  // throws std::logic_error after it, std::invalid_argument for a method it
  // does not know or a path the server serves itself.
  void route(const std::string& method, const std::string& path, RouteHandler handler);

 private:
  friend SignalHook install_signal_handlers(Server& server);
  std::shared_ptr<detail::Core> core_;
  ChatService chat_service_;
};

}  // namespace agentsmithy
