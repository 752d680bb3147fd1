namespace agentsmithy {

// ===========================================================================
// Options
// ===========================================================================

enum class LogLevel { debug = 0, info = 1, warning = 2, error = 3 };

// Receives every log record at or above Options::log_level. Called from
// several threads; must be thread-safe.
using Logger = std::function<void(LogLevel level, const std::string& message)>;

class DialogStore;  // see the dialog store below

struct Options {
  std::string host = "127.0.0.1";
  int port = 8765;  // 0 picks a free port; Server::port() tells which
  // Ports tried from `port` on when it is taken (port, port+1, ...); 1: only
  // `port`. AgentSmithy takes the next free port from 8765, 200 tries.
  int port_attempts = 1;
  std::string workdir = ".";
  // When shutdown starts, /health answers 503 "stopping" for this long while
  // everything else is served as before, so that a balancer or readiness
  // probe takes the instance out of rotation before anything is refused.
  // Then the drain begins. 0: the drain begins at once.
  std::chrono::milliseconds lame_duck{0};
  // How long the drain may take before remaining connections are closed.
  std::chrono::milliseconds grace_period{5000};
  // An SSE comment line (": ping") on every stream quiet for this long; finds
  // dead clients and keeps proxies from timing out. 0 disables it.
  std::chrono::milliseconds heartbeat_interval{15000};
  // Concurrent chat requests (streaming or not); the next one gets 503.
  std::size_t max_streams = 256;
  std::size_t max_body_bytes = 1 << 20;
  // A request's headers and body must arrive within this long of its first
  // byte; a client that dribbles them (slow loris) is cut off.
  std::chrono::milliseconds read_timeout{5000};
  // A stream whose client accepts no byte for this long is dropped.
  std::chrono::milliseconds write_timeout{5000};
  // An idle keep-alive connection is closed after this long (and at once on
  // shutdown).
  std::chrono::milliseconds keep_alive_timeout{5000};
  // When set, /api/* needs "Authorization: Bearer <auth_token>" (else 401);
  // /health stays open for probes.
  std::string auth_token;
  // Origins allowed to call the API from a browser (CORS); empty: none.
  std::vector<std::string> cors_origins;
  LogLevel log_level = LogLevel::info;
  Logger logger;  // empty: one line per record on stderr
  // Every stream opens with {"type":"user","content":<the last user message>}
  // as AgentSmithy's server sends it. Off for a host that sends its own.
  bool user_event = true;
  // Writes <workdir>/.agentsmithy/status.json through the server's lifecycle
  // (starting, ready, stopping, stopped; error when it cannot start) as
  // AgentSmithy does, for IDE extensions that launch and watch the server;
  // refuses to start while another live server owns that workdir.
  bool status_file = false;
  // The IDE that launched the server, shown in /health as "ide".
  std::string ide;
  // What the host found wrong with its configuration (say, an upstream URL
  // that failed validation): /health reports config_valid false and these.
  std::vector<std::string> config_errors;
  // Where dialogs and their turns are kept: the server serves AgentSmithy's
  // dialogs API (/api/dialogs...) from it, records every turn as its client
  // receives it, and remembers a dialog's earlier turns. Empty: a
  // memory_store() of the server's own (64 MiB, nothing outlives the
  // process); sqlite_store(path) keeps them across restarts.
  std::shared_ptr<DialogStore> store;
  // A chat request that names its dialog_id and whose messages
  // are exactly one user message reaches the producer with the dialog's
  // earlier turns (user and assistant texts, in order) before it; at most the
  // last 50 turns and 256 KiB of their text.
  bool dialog_memory = true;
};

}  // namespace agentsmithy
