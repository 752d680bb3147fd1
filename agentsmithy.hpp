// agentsmithy.hpp - an embeddable AI-chat HTTP server that streams Server-Sent
// Events and shuts down gracefully.
//
// Single header. The core depends on cpp-httplib 0.11 (compile and link with
// `pkg-config --cflags --libs cpp-httplib`), nlohmann_json and POSIX/Linux.
// Optional parts, each behind a macro defined before the include, as
// cpp-httplib does with CPPHTTPLIB_OPENSSL_SUPPORT:
//   AGENTSMITHY_OPENAI_SUPPORT   openai_generator (links libcurl 7.87+)
//   AGENTSMITHY_SQLITE_SUPPORT   sqlite_store (links libsqlite3)
//
//   agentsmithy::Server server;                       // 127.0.0.1:8765
//   server.chat_service().set_generator(my_llm);      // or keep the demo
//   auto hook = agentsmithy::install_signal_handlers(server);
//   server.listen();                                  // returns after the drain
//
// This file is made by tools/amalgamate.py from include/agentsmithy.hpp and
// the parts under include/agentsmithy/ (`make amalgamate`). Edit the parts.
//
// Layout, in the order of the includes below: the public API (declarations
// only); the building blocks in namespace detail (logging, the event loop,
// SSE framing, request parsing, metrics, the lifecycle); one request's path
// through the server (channels and the stream hub, the worker pool, the
// waiting room, the cpp-httplib adapter and the HTTP front end); the server
// and its shutdown sequence (server/server.hpp); the signal hook; the
// built-in demo and the OpenAI upstream, which use only the public API.
#pragma once

#ifdef AGENTSMITHY_OPENAI_SUPPORT
#include <curl/curl.h>
#endif
#ifdef AGENTSMITHY_SQLITE_SUPPORT
#include <sqlite3.h>
#endif
#include <httplib.h>

#include <nlohmann/json.hpp>

#include <arpa/inet.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/file.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <deque>
#include <functional>
#include <iostream>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <queue>
#include <random>
#include <regex>
#include <set>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

// The parts, in this order (clang-format must not sort them).
// clang-format off

// The public API: what a host includes this header for.
// ---- include/agentsmithy/api/options.hpp
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
// ---- include/agentsmithy/api/chat_request.hpp
namespace agentsmithy {

// ===========================================================================
// Events and requests
// ===========================================================================

struct Message {
  std::string role;
  std::string content;
};

struct ChatRequest {
  std::vector<Message> messages;
  nlohmann::json context = nlohmann::json::object();  // {} when absent
  bool stream = true;
  std::string dialog_id;  // the client's, or one the server assigned
};

// The text every stream ends with when the server shuts down under it, and
// the body of the 503 a request gets once the drain has begun. Both also carry
// "code": "shutdown" (see README, "Error codes").
inline constexpr std::string_view kShutdownMessage = "Server is shutting down (graceful shutdown)";

namespace detail {
struct Channel;
struct Core;
class HttpFrontend;
}  // namespace detail
class SignalHook;

}  // namespace agentsmithy
// ---- include/agentsmithy/api/stream_writer.hpp
namespace agentsmithy {

// ===========================================================================
// Stream writer: what a generator or a stream handler writes its events to
// ===========================================================================

// One chat request's answer. Every method may be called from any thread, also
// concurrently: events are written whole, in the order the calls returned.
//
// The stream ends when an "error" or "done" event is sent ("done" follows an
// error), when end() is called, or when the last reference to the writer is
// released (a generator's writer: when the generator returns). Until it ends
// it holds one of Options::max_streams slots, also after a cancellation.
class StreamWriter {
 public:
  // Writes one event: an object with a string "type"; "dialog_id" is added.
  // Returns false once the stream is cancelled (client gone, shutdown) or
  // ended, and from then on writes nothing. An "error" or "done" event ends
  // the stream. Throws std::invalid_argument for an event that is not such an
  // object. Never blocks unless the client reads slower than events come
  // (then up to Options::write_timeout, after which the client is dropped).
  bool send(const nlohmann::json& event);
  // Like send() for each event in order, in one write to the socket: for a
  // producer that has several events at hand. False once cancelled.
  bool send_batch(const std::vector<nlohmann::json>& events);
  // Shorthand for send({"type":"chat","content":text}).
  bool chat(std::string_view text);
  // Ends the stream: appends "done" unless an error or done was sent.
  // Idempotent; a no-op once cancelled (the server ended the stream).
  void end();
  // True once cancelled or ended: nothing more will be written.
  bool cancelled() const;
  // Bytes written that the client has not taken yet. A producer feeding many
  // streams from one thread skips a stream while this is large, instead of
  // blocking in send() for one slow client.
  std::size_t buffered() const;
  // Waits d on the calling thread; true after the full delay, false at once
  // when cancelled.
  bool sleep_for(std::chrono::milliseconds d);
  // `callback` runs exactly once if the stream is cancelled (client gone,
  // shutdown, grace deadline, forced shutdown), on a server thread, within
  // 10 ms of the cause, while the producer may be blocked in a call it is
  // meant to interrupt (close a socket, abort a decode). Registered after the
  // cancellation, it runs at once on the calling thread. Never runs for a
  // stream that ended normally. Callbacks run in registration order; one that
  // throws is logged and the rest still run. Keep them short; they may call
  // any method of this writer.
  void on_cancel(std::function<void()> callback);
  const std::string& dialog_id() const;

  // Ends the stream as end() does if it has not ended.
  ~StreamWriter();
  StreamWriter(const StreamWriter&) = delete;
  StreamWriter& operator=(const StreamWriter&) = delete;

 private:
  friend class detail::HttpFrontend;
  StreamWriter(std::shared_ptr<detail::Core> core, std::shared_ptr<detail::Channel> channel);
  const std::shared_ptr<detail::Core> core_;  // first: outlives the channel's release
  const std::shared_ptr<detail::Channel> channel_;
};

// Produces the answer to one request by writing events, on a thread of its
// own for the whole stream; may block. Should return soon after send()
// returns false or an on_cancel callback runs. Returning ends the stream with
// "done"; throwing ends it with an "error" event (code "generator_error").
using Generator = std::function<void(const ChatRequest&, StreamWriter&)>;

// Starts the answer to one request and returns at once, typically handing the
// writer to the producer that feeds it (an inference thread batching many
// sequences, an event loop). Called on a server thread; the stream stays open
// until the writer ends (see StreamWriter). Throwing ends the stream with an
// "error" event (code "generator_error").
using StreamHandler = std::function<void(const ChatRequest&, std::shared_ptr<StreamWriter>)>;

// The built-in demo: chat_start, chat chunks of a few words 20 ms apart,
// chat_end. "Tell me a long story" gets a story of over 2,000 words. A request
// sets the pace with context.demo = {"tokens": N, "interval_ms": M}, N in
// [1, 1000000] chunks, M in [0, 60000] ms; other values end the stream with an
// error event (code "invalid_request").
//
// demo_stream_handler() plays it for every stream from one timer thread
// through the public StreamWriter (the server's default); demo_generator()
// plays it as a blocking Generator, one thread per stream.
StreamHandler demo_stream_handler();
void demo_generator(const ChatRequest& request, StreamWriter& out);

}  // namespace agentsmithy
// ---- include/agentsmithy/api/dialog_store.hpp
namespace agentsmithy {

// ===========================================================================
// Dialog store: dialogs, and each turn's events as an append-only log
// ===========================================================================

// A dialog as AgentSmithy's API shows it. Times are ISO 8601 UTC
// ("2026-12-07T11:09:20.123456Z").
struct DialogInfo {
  std::string id;
  std::optional<std::string> title;  // null until named
  std::string created_at;
  std::string updated_at;  // bumped by every turn and by a rename
};

// How a turn ended; `running` while it streams.
enum class TurnOutcome { running, completed, error, shutdown, client_gone, superseded };
const char* turn_outcome_name(TurnOutcome outcome);

// One turn: the user's message and what the assistant streamed, as an
// append-only log. events[i] sits at position i (dense from 0): position 0 is
// {"type":"user","content":...}; then the producer's events as sent
// (without dialog_id): chat, reasoning*, tool_call, file_edit, and the
// turn's error event if it ended with one.
struct TurnRecord {
  std::string turn_id;  // random, never sequential
  std::string dialog_id;
  TurnOutcome outcome = TurnOutcome::running;
  std::string error_code;  // outcome error: the error event's "code"
  std::string started_at, ended_at;
  std::vector<nlohmann::json> events;
};

// Thrown by a store that cannot read or write (disk full, file removed,
// locked, Redis down); the server keeps serving (see README, "Dialogs").
struct StoreError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Where the server keeps dialogs and their turns. A host can implement it
// over its own database; every method may be called from any thread,
// concurrently. The server calls:
//   - begin_turn() when a turn starts, before its `user` event is sent;
//   - append() as the producer's events are sent (from the streams' threads:
//     must not block for long; a store batches writes off that path);
//   - end_turn() and then sync() before a turn's `done` reaches the client
//     (sync: everything appended so far is durable);
//   - the dialog methods for the REST API and for dialog_id resolution;
//   - turns() for memory (the model's input) and for history.
class DialogStore {
 public:
  virtual ~DialogStore() = default;

  virtual std::vector<DialogInfo> list_dialogs() = 0;  // updated_at, newest first
  virtual std::optional<DialogInfo> find_dialog(const std::string& id) = 0;
  // Creates the dialog (an existing id: returned as it is).
  virtual DialogInfo create_dialog(const std::string& id,
                                   const std::optional<std::string>& title) = 0;
  virtual std::optional<DialogInfo> rename_dialog(const std::string& id,
                                                  const std::string& title) = 0;
  // Removes the dialog and its turns; deleting the current dialog leaves none
  // current. A running turn of a deleted dialog is dropped: its later
  // append() and end_turn() are ignored.
  virtual bool delete_dialog(const std::string& id) = 0;  // false: unknown
  virtual std::optional<std::string> current_dialog() = 0;
  // An unknown id throws std::invalid_argument.
  virtual void set_current_dialog(const std::optional<std::string>& id) = 0;

  // The turn log. `user_event` is position 0. An unknown dialog is created
  // (AgentSmithy adopts unknown ids); a turn_id already used throws
  // std::invalid_argument.
  virtual void begin_turn(const std::string& dialog_id, const std::string& turn_id,
                          const nlohmann::json& user_event) = 0;
  // Events at positions first .. first + events.size() - 1. Positions the
  // log already holds are skipped (a replay); a gap throws
  // std::invalid_argument; an unknown turn is ignored.
  virtual void append(const std::string& turn_id, std::uint64_t first,
                      const std::vector<nlohmann::json>& events) = 0;
  virtual void end_turn(const std::string& turn_id, TurnOutcome outcome,
                        const std::string& error_code) = 0;  // the first end is final
  virtual void sync() = 0;
  // The dialog's turns in order, the last `max_turns` of them.
  virtual std::vector<TurnRecord> turns(const std::string& dialog_id, std::size_t max_turns) = 0;
  virtual std::optional<TurnRecord> turn(const std::string& turn_id) = 0;
  // turns() without the events: history reads the events only of turns it
  // has not seen end (an ended turn never changes). The default drops them
  // from turns(); a store that can list turns more cheaply overrides it.
  virtual std::vector<TurnRecord> turn_headers(const std::string& dialog_id,
                                               std::size_t max_turns) {
    std::vector<TurnRecord> out = turns(dialog_id, max_turns);
    for (TurnRecord& t : out) t.events.clear();
    return out;
  }

  // True when other processes share it (issue 18: hand-off at shutdown).
  virtual bool shared() const { return false; }
};

// Keeps everything in this process, at most `max_bytes` of event text; the
// dialogs updated longest ago are evicted first. The default store.
std::shared_ptr<DialogStore> memory_store(std::size_t max_bytes = 64 << 20);

// Keeps dialogs in the SQLite file at `path` (created when missing; WAL
// mode), so that they outlive the process. append() only queues: one writer
// thread commits what is queued in one transaction, within 20 ms, and at
// once when sync() waits; after a crash at most the last ~100 ms of a
// running turn are missing. A file that cannot be opened or is not a valid
// store (not SQLite, another application's database, a newer schema) throws
// StoreError naming the file and the reason; so does a failure at run time
// (disk full, file removed, locked), from the call or the next sync().
// Compiled only with AGENTSMITHY_SQLITE_SUPPORT defined before the include
// (and linked with libsqlite3).
#ifdef AGENTSMITHY_SQLITE_SUPPORT
std::shared_ptr<DialogStore> sqlite_store(const std::string& path);
#else
namespace detail {
template <class T>
inline constexpr bool needs_sqlite_support = false;
}  // namespace detail
// Without the define, a call fails to compile with this message.
template <class Path = std::string>
std::shared_ptr<DialogStore> sqlite_store(const Path&) {
  static_assert(detail::needs_sqlite_support<Path>,
                "sqlite_store needs AGENTSMITHY_SQLITE_SUPPORT: #define it before including "
                "agentsmithy.hpp and link libsqlite3 (pkg-config sqlite3)");
  return {};
}
#endif

}  // namespace agentsmithy
// ---- include/agentsmithy/api/openai.hpp
namespace agentsmithy {

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
  // Bounds the whole connection setup: DNS lookup, TCP connect and TLS
  // handshake together. A cancellation takes effect at once in every step.
  std::chrono::milliseconds connect_timeout{10000};
  // The longest silence once connected: no byte for this long, prompt
  // processing included, fails the stream.
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
// Every upstream transfer, of every openai_generator, runs on one libcurl
// event-loop thread, started on first use and gone while no transfer is open;
// the generator's own thread only waits for its transfer to end, and is not
// woken per token. That thread blocks SIGPIPE, so the process needs no SIG_IGN.
//
// Compiled only with AGENTSMITHY_OPENAI_SUPPORT defined before the include
// (and linked with libcurl 7.87+), as cpp-httplib does for
// CPPHTTPLIB_OPENSSL_SUPPORT: the core needs no libcurl.
#ifdef AGENTSMITHY_OPENAI_SUPPORT
Generator openai_generator(OpenAIOptions options);
#else
namespace detail {
template <class T>
inline constexpr bool needs_openai_support = false;
}  // namespace detail
// Without the define, a call fails to compile with this message.
template <class Options = OpenAIOptions>
Generator openai_generator(Options) {
  static_assert(
      detail::needs_openai_support<Options>,
      "openai_generator needs AGENTSMITHY_OPENAI_SUPPORT: #define it before including "
      "agentsmithy.hpp (or link agentsmithy::openai in CMake, pkg-config agentsmithy-openai) "
      "and link libcurl");
  return {};
}
#endif

}  // namespace agentsmithy
// ---- include/agentsmithy/api/server.hpp
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
// ---- include/agentsmithy/api/signal_hook.hpp
namespace agentsmithy {

// ===========================================================================
// Signal hook
// ===========================================================================

// While alive, SIGINT and SIGTERM start server.shutdown(); a second signal
// during the drain (20 ms or more after the first) forces it. Destroying the
// guard restores the previous handlers. One guard at a time per process.
class SignalHook {
 public:
  SignalHook() noexcept = default;
  SignalHook(SignalHook&& other) noexcept;
  SignalHook& operator=(SignalHook&& other) noexcept;
  ~SignalHook();
  // True once a second signal forced the shutdown.
  bool forced() const;

 private:
  struct State;
  friend SignalHook install_signal_handlers(Server& server);
  explicit SignalHook(std::unique_ptr<State> state) noexcept;
  static void watch(State& state);
  std::unique_ptr<State> state_;
};

// Throws std::logic_error if another SignalHook is alive,
// std::system_error if the handlers cannot be installed.
SignalHook install_signal_handlers(Server& server);

}  // namespace agentsmithy

// Building blocks (namespace detail). Nothing below is part of the API.
// ---- include/agentsmithy/detail/common.hpp
namespace agentsmithy {
namespace detail {

using Clock = std::chrono::steady_clock;

// Names the calling thread (at most 15 characters), for top -H, perf and gdb.
inline void name_thread(const char* name) { ::pthread_setname_np(::pthread_self(), name); }
using nlohmann::json;

// ===========================================================================
// Logging
// ===========================================================================

inline const char* level_name(LogLevel level) {
  switch (level) {
    case LogLevel::debug: return "DEBUG";
    case LogLevel::info: return "INFO";
    case LogLevel::warning: return "WARN";
    case LogLevel::error: return "ERROR";
  }
  return "INFO";
}

// `t` in ISO 8601, UTC, with `fraction_digits` (0, 3 or 6) after the
// seconds and `zone` after that: the one formatter of every timestamp the
// server writes (log lines, status.json, the shutdown report).
inline std::string format_utc(std::chrono::system_clock::time_point t, int fraction_digits,
                              const char* zone) {
  const auto us =
      std::chrono::duration_cast<std::chrono::microseconds>(t.time_since_epoch()).count();
  const std::time_t secs = static_cast<std::time_t>(us / 1000000);
  std::tm tm{};
  gmtime_r(&secs, &tm);
  char buf[80];
  int n = std::snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02d", tm.tm_year + 1900,
                        tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec);
  if (fraction_digits == 3) {
    n += std::snprintf(buf + n, sizeof buf - n, ".%03d", static_cast<int>((us / 1000) % 1000));
  } else if (fraction_digits == 6) {
    n += std::snprintf(buf + n, sizeof buf - n, ".%06d", static_cast<int>(us % 1000000));
  }
  std::snprintf(buf + n, sizeof buf - n, "%s", zone);
  return buf;
}

// 2026-11-25T10:00:00.123Z: a log record's time.
inline std::string utc_timestamp() { return format_utc(std::chrono::system_clock::now(), 3, "Z"); }

inline void log_to_stderr(LogLevel level, const std::string& message) {
  // One write per record so lines from several threads do not interleave.
  char head[64];
  std::snprintf(head, sizeof head, "%s %-5s ", utc_timestamp().c_str(), level_name(level));
  const std::string line = head + message + "\n";
  const ssize_t written = ::write(STDERR_FILENO, line.data(), line.size());
  (void)written;
}

inline void log(const Options& options, LogLevel level, const std::string& message) {
  if (level < options.log_level) return;
  if (options.logger) {
    options.logger(level, message);
  } else {
    log_to_stderr(level, message);
  }
}

inline long long elapsed_ms(Clock::time_point since) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - since).count();
}

}  // namespace detail
}  // namespace agentsmithy
// ---- include/agentsmithy/detail/event_loop.hpp
namespace agentsmithy {
namespace detail {

// ===========================================================================
// Event loop: epoll, a waker, deadlines, a callback per descriptor
// ===========================================================================

// An eventfd that one thread waits on and any thread writes: the wake-up of
// every event loop, and the drain's broadcast (written once and never
// drained, it stays readable for every waiter). wake() is one write(2), so a
// signal handler could call it too.
class Waker {
 public:
  Waker() : fd_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) {
    if (fd_ < 0) throw std::system_error(errno, std::generic_category(), "eventfd");
  }
  ~Waker() { ::close(fd_); }
  Waker(const Waker&) = delete;
  Waker& operator=(const Waker&) = delete;

  int fd() const { return fd_; }
  void wake() const noexcept {
    const std::uint64_t one = 1;
    const ssize_t w = ::write(fd_, &one, sizeof one);
    (void)w;
  }
  void drain() const noexcept {
    std::uint64_t count;
    while (::read(fd_, &count, sizeof count) > 0) {
    }
  }

 private:
  const int fd_;
};

// Milliseconds from now until `at` for epoll_wait, rounded up (a wait of 0
// while not yet due would spin); capped at a minute.
inline int wait_ms_until(Clock::time_point at) {
  const auto now = Clock::now();
  if (at <= now) return 0;
  const auto ms = std::chrono::ceil<std::chrono::milliseconds>(at - now).count();
  return static_cast<int>(std::min<long long>(ms, 60000));
}

// One epoll set and the thread that runs it: the stream hub's, the waiting
// room's and the OpenAI upstream's. Each watched descriptor has its own
// callback, run on the loop's thread by pass(). watch(), rearm(), unwatch()
// and wake() may be called from any thread.
//
// A Watch is the descriptor's registration; epoll hands its address back
// with each event, so dispatch needs no lookup. unwatch() does not free it at
// once, since the event batch the loop is working through may still hold its
// address: it is freed at the start of the next pass, when no batch can.
class EventLoop {
 public:
  using OnReady = std::function<void(std::uint32_t events)>;
  class Watch {
   public:
    int fd() const { return fd_; }

   private:
    friend class EventLoop;
    Watch(int fd, OnReady on_ready) : fd_(fd), on_ready_(std::move(on_ready)) {
      // Publishes the fields to the loop's thread, which epoll alone does not
      // order for the memory model (nor for ThreadSanitizer): it reads
      // retired_ with acquire before it calls on_ready_.
      retired_.store(false, std::memory_order_release);
    }
    const int fd_;
    const OnReady on_ready_;
    std::atomic<bool> retired_{false};  // unwatched: a late event for it is dropped
  };

  EventLoop() : epoll_fd_(::epoll_create1(EPOLL_CLOEXEC)) {
    if (epoll_fd_ < 0) throw std::system_error(errno, std::generic_category(), "epoll_create1");
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.ptr = nullptr;  // the waker
    if (::epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, waker_.fd(), &ev) != 0) {
      const int err = errno;
      ::close(epoll_fd_);
      throw std::system_error(err, std::generic_category(), "epoll_ctl");
    }
  }
  ~EventLoop() { ::close(epoll_fd_); }
  EventLoop(const EventLoop&) = delete;
  EventLoop& operator=(const EventLoop&) = delete;

  // Calls `on_ready(events)` on the loop's thread whenever `fd` is ready for
  // `events` (EPOLLIN, EPOLLOUT, EPOLLRDHUP, EPOLLONESHOT...). Null (errno
  // set) if epoll refuses the descriptor.
  Watch* watch(int fd, std::uint32_t events, OnReady on_ready) {
    auto w = std::unique_ptr<Watch>(new Watch(fd, std::move(on_ready)));
    epoll_event ev{};
    ev.events = events;
    ev.data.ptr = w.get();
    std::lock_guard<std::mutex> lock(mu_);
    if (::epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, fd, &ev) != 0) {
      // Still in the set under this number: a registration whose descriptor
      // was closed while a copy of it lived on (a forked child), or one
      // libcurl never told us to remove. The descriptor is the caller's now.
      if (errno != EEXIST || ::epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, fd, nullptr) != 0 ||
          ::epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, fd, &ev) != 0) {
        return nullptr;
      }
    }
    Watch* raw = w.get();
    live_.emplace(raw, std::move(w));
    return raw;
  }
  // Changes what `w` waits for (and re-arms a one-shot watch).
  bool rearm(Watch* w, std::uint32_t events) {
    epoll_event ev{};
    ev.events = events;
    ev.data.ptr = w;
    if (::epoll_ctl(epoll_fd_, EPOLL_CTL_MOD, w->fd_, &ev) == 0) return true;
    // Dropped from the set meanwhile (its registration was removed under
    // this number): register it again.
    return errno == ENOENT && ::epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, w->fd_, &ev) == 0;
  }
  // Stops watching; `w` is freed once no event batch can refer to it. Call
  // it before closing the descriptor: a closed one stays in the set while a
  // forked child holds a copy of it, and events would name a freed watch.
  // Once per watch; a null one is ignored.
  void unwatch(Watch* w) {
    if (!w) return;
    std::lock_guard<std::mutex> lock(mu_);
    const auto it = live_.find(w);
    if (it == live_.end()) return;
    ::epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, w->fd_, nullptr);
    w->retired_ = true;
    retired_.push_back(std::move(it->second));
    live_.erase(it);
  }

  // Makes the running or the next pass() return (after its callbacks).
  void wake() { waker_.wake(); }
  // pass() returns false from now on.
  void stop() {
    stopped_ = true;
    waker_.wake();
  }
  bool stopped() const { return stopped_; }

  // The loop's thread: waits until a watched descriptor is ready, wake() is
  // called or `until` passes (none: no deadline), and runs the ready
  // descriptors' callbacks. False once stop() was called.
  bool pass(std::optional<Clock::time_point> until) {
    std::vector<std::unique_ptr<Watch>> freeing;
    {
      std::lock_guard<std::mutex> lock(mu_);
      freeing.swap(retired_);
    }
    freeing.clear();
    if (stopped_) return false;
    const int timeout = until ? wait_ms_until(*until) : -1;
    const int n = ::epoll_wait(epoll_fd_, events_, kBatch, timeout);
    for (int i = 0; i < n; ++i) {
      auto* w = static_cast<Watch*>(events_[i].data.ptr);
      if (!w) {
        waker_.drain();
        continue;
      }
      if (!w->retired_.load(std::memory_order_acquire)) w->on_ready_(events_[i].events);
    }
    return !stopped_;
  }

 private:
  static constexpr int kBatch = 256;
  const int epoll_fd_;
  Waker waker_;
  std::atomic<bool> stopped_{false};
  std::mutex mu_;
  std::unordered_map<Watch*, std::unique_ptr<Watch>> live_;  // guarded by mu_
  std::vector<std::unique_ptr<Watch>> retired_;              // guarded by mu_
  epoll_event events_[kBatch];                               // the loop's thread's
};

}  // namespace detail
}  // namespace agentsmithy
// ---- include/agentsmithy/sse/framing.hpp
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
// ---- include/agentsmithy/http/chat_request_parser.hpp
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
// ---- include/agentsmithy/demo/script.hpp
namespace agentsmithy {
namespace detail {

// ===========================================================================
// The demo generator's text
// ===========================================================================

inline const std::vector<std::string>& story_words() {
  static const std::vector<std::string> words = [] {
    static const char* const sentences[] = {
        "In a valley where the rivers ran backwards at dusk, there lived a smith who forged "
        "answers instead of swords.",
        "Every morning travellers climbed the hill to her forge with questions wrapped in cloth, "
        "and every evening they walked home lighter.",
        "She heated each question until it glowed, folded it over and over, and quenched it in "
        "a barrel of cold starlight.",
        "One winter a stranger arrived carrying a question so heavy that the road cracked "
        "under his boots.",
        "He asked how a thing could end well when nobody knew it was ending, and the smith set "
        "down her hammer for the first time in years.",
        "She told him that endings are kind only when they are announced, when every listener "
        "hears the last word before the door is closed.",
        "So together they built a bell that rang once for each traveller still on the road, so "
        "that no one would walk into a dark and silent forge.",
        "When the smith finally grew tired and banked her fire, the bell rang for every "
        "traveller, and each of them turned for home knowing why.",
        "Nobody was left waiting at the door, no question was left half forged, and the valley "
        "slept soundly that night.",
        "Years later children still told the story, and they always ended it the same way, "
        "with the ringing of the bell and a quiet word of goodbye.",
    };
    std::vector<std::string> all;
    for (int chapter = 1; all.size() < 2200; ++chapter) {
      all.push_back("Chapter");
      all.push_back(std::to_string(chapter) + ".");
      for (const char* sentence : sentences) {
        std::string text = sentence;
        std::size_t start = 0;
        while (start < text.size()) {
          const std::size_t end = std::min(text.find(' ', start), text.size());
          all.push_back(text.substr(start, end - start));
          start = end + 1;
        }
      }
    }
    return all;
  }();
  return words;
}

inline std::vector<std::string> split_words(const std::string& text) {
  std::vector<std::string> words;
  std::size_t start = 0;
  while (start < text.size()) {
    const std::size_t end = std::min(text.find(' ', start), text.size());
    if (end > start) words.push_back(text.substr(start, end - start));
    start = end + 1;
  }
  return words;
}

// context.demo.<field> as an integer in [low, high], or `fallback` when absent.
inline long long demo_setting(const json& context, const char* field, long long low, long long high,
                              long long fallback) {
  const auto demo = context.find("demo");
  if (demo == context.end() || !demo->is_object()) return fallback;
  const auto value = demo->find(field);
  if (value == demo->end()) return fallback;
  if (!value->is_number_integer() || value->get<long long>() < low ||
      value->get<long long>() > high) {
    throw std::invalid_argument("context.demo." + std::string(field) + " must be an integer in [" +
                                std::to_string(low) + ", " + std::to_string(high) + "]");
  }
  return value->get<long long>();
}

// The demo's answer as a sequence of events with pauses between them. The
// same script runs as demo_generator() on a generator thread and, for the
// built-in default, directly on the stream hub's timer, where a paced stream
// costs no thread and no wake-up of its own.
class DemoScript {
 public:
  // Throws std::invalid_argument for a bad context.demo.
  explicit DemoScript(const ChatRequest& request)
      : tokens_(demo_setting(request.context, "tokens", 1, 1000000, 0)),
        interval_(demo_setting(request.context, "interval_ms", 0, 60000, 20)) {
    std::string query;
    for (const Message& m : request.messages) {
      if (m.role == "user") query = m.content;
    }
    std::string lowered = query;
    for (char& c : lowered) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    if (tokens_ == 0 && lowered.find("long story") == std::string::npos) {
      reply_ = split_words("You said: \"" + query +
                           "\". This is the agentsmithy demo generator; ask it to \"Tell me a "
                           "long story\" to watch a long answer stream.");
    }
    const std::size_t words = this->words().size();
    // With `tokens` the text repeats as often as needed; otherwise it is told once.
    chunks_ = tokens_ > 0 ? tokens_
                          : static_cast<long long>((words + kWordsPerChunk - 1) / kWordsPerChunk);
  }

  // The next event, or nothing once the answer is complete.
  std::optional<json> next_event() {
    if (step_ == 0) {
      ++step_;
      return json{{"type", "chat_start"}};
    }
    if (step_ <= chunks_) {
      ++step_;
      const auto& all = words();
      std::string text;
      for (std::size_t k = 0; k < kWordsPerChunk && (tokens_ > 0 || word_ < all.size()); ++k) {
        text += all[word_++ % all.size()];
        text += ' ';
      }
      return json{{"type", "chat"}, {"content", std::move(text)}};
    }
    if (step_ == chunks_ + 1) {
      ++step_;
      return json{{"type", "chat_end"}};
    }
    return std::nullopt;
  }

  // How long to wait before the next event: the interval between chunks.
  std::chrono::milliseconds pause_before_next() const {
    return step_ >= 2 && step_ <= chunks_ ? interval_ : std::chrono::milliseconds(0);
  }

 private:
  static constexpr std::size_t kWordsPerChunk = 3;
  const std::vector<std::string>& words() const { return reply_.empty() ? story_words() : reply_; }

  const long long tokens_;
  const std::chrono::milliseconds interval_;
  std::vector<std::string> reply_;  // empty: the story
  long long chunks_ = 0;
  long long step_ = 0;  // 0: chat_start next; 1..chunks_: that chunk next
  std::size_t word_ = 0;
};

}  // namespace detail
}  // namespace agentsmithy
// ---- include/agentsmithy/lifecycle/lifecycle.hpp
namespace agentsmithy {
namespace detail {

// ===========================================================================
// Lifecycle: starting -> ready -> [lame duck] -> draining -> stopped
// ===========================================================================

// The server's phase. `failed`: listen() could not start (taken port, a
// workdir owned by another server).
enum class Phase { starting, ready, lame_duck, draining, stopped, failed };

inline const char* phase_name(Phase phase) {
  switch (phase) {
    case Phase::starting: return "starting";
    case Phase::ready: return "ready";
    case Phase::lame_duck: return "lame_duck";
    case Phase::draining: return "draining";
    case Phase::stopped: return "stopped";
    case Phase::failed: return "failed";
  }
  return "starting";
}

// The one owner of the server's lifecycle. Everything that depends on it
// reads it here: /health (shutdown_requested), /metrics (phase), status.json
// (the observer of each transition), and the admission decision below
// (refusing). Phases only move forward; each transition is one call.
//
// A shutdown is requested from any thread (shutdown(), a signal) and returns
// at once; the listen thread then walks the phases (Server::listen). Without
// a lame duck, or when forced, new work is refused from the request itself,
// not from when the listen thread gets to the drain.
class Lifecycle {
 public:
  // `on_change`: after every change (Core::changed wakes its waiters).
  // `observer`: on the listen thread, after each phase transition, with the
  // reason of a failure (the status file).
  using Observer = std::function<void(Phase, const std::string& why)>;
  Lifecycle(bool has_lame_duck, std::function<void()> on_change)
      : has_lame_duck_(has_lame_duck), on_change_(std::move(on_change)) {}

  void observe(Observer observer) { observer_ = std::move(observer); }

  Phase phase() const { return phase_.load(); }
  // shutdown() was called or a signal came: /health says "stopping".
  bool shutdown_requested() const { return requested_.load(); }
  // force_shutdown() or a second signal: the drain is cut short.
  bool forced() const { return forced_.load(); }
  // New chats and host routes get 503; idle keep-alive connections close.
  bool refusing() const { return refusing_.load(); }
  bool started() const {
    const Phase p = phase();
    return p != Phase::starting && p != Phase::failed;
  }
  bool over() const {
    const Phase p = phase();
    return p == Phase::stopped || p == Phase::failed;
  }

  // Returns true for the first request.
  bool request_shutdown() {
    if (!has_lame_duck_ || forced_) refusing_ = true;
    const bool first = !requested_.exchange(true);
    on_change_();
    return first;
  }
  void force() {
    forced_ = true;
    refusing_ = true;
    request_shutdown();
  }

  // Moves to `next` if it is ahead of the current phase (a shutdown asked
  // before listen() must not be undone by its `ready`).
  void enter(Phase next, const std::string& why = {}) {
    Phase current = phase_.load();
    do {
      if (static_cast<int>(next) <= static_cast<int>(current)) return;
    } while (!phase_.compare_exchange_weak(current, next));
    if (next >= Phase::draining) refusing_ = true;
    if (observer_) observer_(next, why);
    on_change_();
  }

 private:
  const bool has_lame_duck_;
  const std::function<void()> on_change_;
  Observer observer_;  // set before listen() starts the threads
  std::atomic<Phase> phase_{Phase::starting};
  std::atomic<bool> requested_{false};
  std::atomic<bool> forced_{false};
  std::atomic<bool> refusing_{false};
};

// ---------------------------------------------------------------------------
// The admission decision: what a request or a waiting connection gets now.
// The one place where the lifecycle becomes serve / 503 / park / close.
// ---------------------------------------------------------------------------

enum class Arrival {
  request,        // a chat or a host route, its head read
  first_request,  // a new connection, its first request not there yet
  next_request,   // an idle keep-alive connection, between two requests
};
enum class Admit { serve, refuse_503, park, close };

inline Admit admission_decision(const Lifecycle& life, Arrival arrival) {
  switch (arrival) {
    case Arrival::request: return life.refusing() ? Admit::refuse_503 : Admit::serve;
    // It deserves its 503: it waits, for at most WaitingRoom::kFirstRequestGrace.
    case Arrival::first_request: return Admit::park;
    // On shutdown an idle keep-alive connection closes at once.
    case Arrival::next_request: return life.refusing() ? Admit::close : Admit::park;
  }
  return Admit::close;
}

}  // namespace detail
}  // namespace agentsmithy
// ---- include/agentsmithy/observability/metrics.hpp
namespace agentsmithy {
namespace detail {

// ===========================================================================
// Metrics: what GET /metrics reports, in Prometheus' text format
// ===========================================================================

// A histogram whose observations are seconds; counts are cumulative when
// rendered. Lock-free: observe() is called on the streams' hot paths.
class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds)
      : bounds_(std::move(bounds)), counts_(bounds_.size() + 1) {}

  void observe(Clock::duration d) {
    const double seconds = std::chrono::duration<double>(d).count();
    std::size_t i = 0;
    while (i < bounds_.size() && seconds > bounds_[i]) ++i;
    counts_[i].fetch_add(1, std::memory_order_relaxed);
    sum_ns_.fetch_add(static_cast<std::uint64_t>(std::max<Clock::rep>(
                          0, std::chrono::duration_cast<std::chrono::nanoseconds>(d).count())),
                      std::memory_order_relaxed);
  }

  void render(std::string& out, const std::string& name, const std::string& help) const {
    out += "# HELP " + name + " " + help + "\n# TYPE " + name + " histogram\n";
    std::uint64_t cumulative = 0;
    for (std::size_t i = 0; i <= bounds_.size(); ++i) {
      cumulative += counts_[i].load(std::memory_order_relaxed);
      std::string le = "+Inf";
      if (i < bounds_.size()) {
        char buf[32];
        std::snprintf(buf, sizeof buf, "%g", bounds_[i]);
        le = buf;
      }
      out += name + "_bucket{le=\"" + le + "\"} " + std::to_string(cumulative) + "\n";
    }
    char sum[48];
    std::snprintf(sum, sizeof sum, "%.9g", static_cast<double>(sum_ns_.load()) / 1e9);
    out += name + "_sum " + sum + "\n" + name + "_count " + std::to_string(cumulative) + "\n";
  }

 private:
  const std::vector<double> bounds_;
  std::vector<std::atomic<std::uint64_t>> counts_;
  std::atomic<std::uint64_t> sum_ns_{0};
};

// How a chat request ended, for agentsmithy_streams_ended_total.
enum class Outcome {
  completed,
  client_gone,
  shutdown,
  error,
  rejected_capacity,
  rejected_stopping
};
inline constexpr const char* kOutcomeNames[] = {
    "completed", "client_gone", "shutdown", "error", "rejected_capacity", "rejected_stopping"};

struct Metrics {
  std::atomic<std::uint64_t> ended[6] = {};
  std::atomic<std::uint64_t> events_sent{0};
  std::atomic<std::uint64_t> bytes_sent{0};
  Histogram duration{{0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600}};
  Histogram first_event{{0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30}};
  // The last drain (a Server drains once; an embedder may scrape after it).
  std::atomic<bool> drained_once{false};
  std::atomic<std::int64_t> drain_ms{0};
  std::atomic<std::uint64_t> drain_notified{0};
  std::atomic<std::uint64_t> drain_closed{0};

  // Where each metric is counted: the count_* functions below, called from
  // the stream hub (streams, events, bytes), the HTTP front end (requests,
  // refusals) and the shutdown sequence (the last drain).
  void count_end(Outcome outcome) {
    ended[static_cast<int>(outcome)].fetch_add(1, std::memory_order_relaxed);
  }
  void count_stream_end(Outcome outcome, Clock::duration lasted) {
    count_end(outcome);
    duration.observe(lasted);
  }
  void count_first_event(Clock::duration after) { first_event.observe(after); }
  void count_events_sent(std::uint64_t n) { events_sent.fetch_add(n, std::memory_order_relaxed); }
  void count_bytes_sent(std::uint64_t n) { bytes_sent.fetch_add(n, std::memory_order_relaxed); }
  void count_drain(std::chrono::milliseconds took, std::uint64_t notified, std::uint64_t closed) {
    drain_ms = took.count();
    drain_notified = notified;
    drain_closed = closed;
    drained_once = true;
  }

  // Requests by route (a fixed set, so that odd paths cannot grow it) and status.
  void count_request(const std::string& route, int status) {
    std::lock_guard<std::mutex> lock(requests_mu);
    ++requests[{route, status}];
  }

  // `now`: the lifecycle's phase (see Lifecycle); `store_errors`: the dialog
  // store's failures (StoreHealth counts them).
  std::string render(std::size_t active, Phase now, std::uint64_t store_errors = 0) const {
    std::string out;
    const auto gauge = [&](const std::string& name, const std::string& help) {
      out += "# HELP " + name + " " + help + "\n# TYPE " + name + " gauge\n";
    };
    const auto counter = [&](const std::string& name, const std::string& help) {
      out += "# HELP " + name + " " + help + "\n# TYPE " + name + " counter\n";
    };
    gauge("agentsmithy_streams_active", "Chat requests in flight whose client is connected.");
    out += "agentsmithy_streams_active " + std::to_string(active) + "\n";
    counter("agentsmithy_streams_ended_total", "Chat requests ended, by outcome.");
    for (int i = 0; i < 6; ++i) {
      out += std::string("agentsmithy_streams_ended_total{outcome=\"") + kOutcomeNames[i] + "\"} " +
             std::to_string(ended[i].load()) + "\n";
    }
    counter("agentsmithy_http_requests_total", "HTTP requests answered, by route and status.");
    {
      std::lock_guard<std::mutex> lock(requests_mu);
      for (const auto& [key, count] : requests) {
        out += "agentsmithy_http_requests_total{route=\"" + key.first + "\",status=\"" +
               std::to_string(key.second) + "\"} " + std::to_string(count) + "\n";
      }
    }
    counter("agentsmithy_events_sent_total", "SSE events written to streams.");
    out += "agentsmithy_events_sent_total " + std::to_string(events_sent.load()) + "\n";
    counter("agentsmithy_sent_bytes_total", "Bytes of stream responses written to clients.");
    out += "agentsmithy_sent_bytes_total " + std::to_string(bytes_sent.load()) + "\n";
    duration.render(out, "agentsmithy_stream_duration_seconds",
                    "Time from a stream's admission to its end.");
    first_event.render(out, "agentsmithy_stream_first_event_seconds",
                       "Time from a stream's admission to its producer's first event.");
    counter("agentsmithy_store_errors_total", "Dialog store operations that failed.");
    out += "agentsmithy_store_errors_total " + std::to_string(store_errors) + "\n";
    gauge("agentsmithy_lifecycle_state", "The server's lifecycle state (1 for the current one).");
    for (const Phase s :
         {Phase::starting, Phase::ready, Phase::lame_duck, Phase::draining, Phase::stopped}) {
      out += std::string("agentsmithy_lifecycle_state{state=\"") + phase_name(s) + "\"} " +
             (s == now ? "1" : "0") + "\n";
    }
    if (drained_once) {
      char secs[32];
      std::snprintf(secs, sizeof secs, "%.3f", static_cast<double>(drain_ms.load()) / 1000.0);
      gauge("agentsmithy_last_drain_duration_seconds", "How long the last drain took.");
      out += std::string("agentsmithy_last_drain_duration_seconds ") + secs + "\n";
      gauge("agentsmithy_last_drain_streams_notified",
            "Streams that got the shutdown error in the last drain.");
      out +=
          "agentsmithy_last_drain_streams_notified " + std::to_string(drain_notified.load()) + "\n";
      gauge("agentsmithy_last_drain_connections_closed",
            "Connections closed at the last drain's deadline.");
      out +=
          "agentsmithy_last_drain_connections_closed " + std::to_string(drain_closed.load()) + "\n";
    }
    return out;
  }

  mutable std::mutex requests_mu;
  std::map<std::pair<std::string, int>, std::uint64_t> requests;  // guarded by requests_mu
};

}  // namespace detail
}  // namespace agentsmithy
// ---- include/agentsmithy/lifecycle/status_file.hpp
namespace agentsmithy {
namespace detail {

// ===========================================================================
// Status file
// ===========================================================================

// The server's entry in DIR/.agentsmithy/status.json. Lifecycle:
//
//   claim(port)  at start, before binding; a refusal (another live server for
//                DIR) comes back as the message to log before exiting 1
//   ready(port)  once accepting connections
//   stopping()   when the shutdown starts
//   stopped()    when listen() is about to return
//   error(why)   instead of ready when the server cannot start (bind failed)
//
// Thread-safe; nothing throws. A write that fails is logged (warning) and
// reported as false: the server keeps serving without its status file.
class StatusFile {
 public:
  // `log` may be empty (nothing is logged).
  explicit StatusFile(std::string workdir, Logger log = {});
  ~StatusFile();
  StatusFile(const StatusFile&) = delete;
  StatusFile& operator=(const StatusFile&) = delete;

  // Reads the current status (a missing or corrupt file counts as empty).
  // A server_pid that is dead (kill(pid, 0) gives ESRCH) while the status says
  // starting, ready or stopping is first marked crashed. If a live other
  // process (or another claimed StatusFile in this process) is starting, ready
  // or stopping for DIR, returns "another server is running for DIR on port P
  // (pid N)" and this object writes nothing, ever. Otherwise writes starting
  // with our pid, `port` when already known, server_started_at, and returns
  // nullopt (also when that write failed: the failure is logged).
  std::optional<std::string> claim(std::optional<int> port = std::nullopt);

  // Each returns whether the file was written. They write nothing after a
  // refused claim, nor over a status that names another live running server.
  bool ready(int port);
  bool stopping();
  bool stopped();
  bool error(const std::string& message);

  const std::string& path() const { return path_; }
  bool claimed() const;

  // The statuses in which a server_pid is considered to hold the directory.
  static bool running_state(const json& status);
  // kill(pid, 0) != ESRCH, for a pid that is a positive pid_t.
  static bool pid_alive(long long pid);
  // datetime.now(UTC).isoformat(): 2026-11-25T10:00:00.123456+00:00
  static std::string iso_now();

 private:
  // Holds an exclusive flock on the lock file while alive (best effort: if
  // the lock file cannot be opened, the in-process mutex still serialises).
  class FileLock {
   public:
    explicit FileLock(const std::string& path);
    ~FileLock();
    FileLock(const FileLock&) = delete;
    FileLock& operator=(const FileLock&) = delete;

   private:
    int fd_ = -1;
  };

  void warn(const std::string& message) const;
  void info(const std::string& message) const;
  bool ensure_dir();
  json read(bool* corrupt = nullptr) const;
  bool write(const json& doc);
  // The message naming the server that holds DIR, if `doc` names one other
  // than us.
  std::optional<std::string> held_by_other(const json& doc) const;
  // The read-modify-write shared by ready/stopping/stopped/error.
  template <class Change>
  bool update(const char* what, Change&& change);
  void release_registration();

  static std::mutex& registry_mutex();
  static std::set<std::string>& registry();  // canonical workdirs claimed in this process

  const std::string workdir_;
  const std::string dir_;   // workdir_/.agentsmithy
  const std::string path_;  // dir_/status.json
  const std::string lock_path_;
  const Logger log_;
  const long long pid_;
  mutable std::mutex mu_;
  bool claimed_ = false;           // guarded by mu_
  bool refused_ = false;           // guarded by mu_
  std::string registered_;         // the registry key we hold, if any; guarded by mu_
  unsigned long tmp_counter_ = 0;  // guarded by mu_
};

// ---------------------------------------------------------------------------

inline StatusFile::StatusFile(std::string workdir, Logger log)
    : workdir_(workdir.empty() ? std::string(".") : std::move(workdir)),
      dir_(workdir_ + "/.agentsmithy"),
      path_(dir_ + "/status.json"),
      lock_path_(path_ + ".lock"),
      log_(std::move(log)),
      pid_(static_cast<long long>(::getpid())) {}

inline StatusFile::~StatusFile() {
  std::lock_guard<std::mutex> lock(mu_);
  release_registration();
}

inline std::mutex& StatusFile::registry_mutex() {
  static std::mutex mu;
  return mu;
}

inline std::set<std::string>& StatusFile::registry() {
  static std::set<std::string> claimed;
  return claimed;
}

inline void StatusFile::release_registration() {
  if (registered_.empty()) return;
  std::lock_guard<std::mutex> lock(registry_mutex());
  registry().erase(registered_);
  registered_.clear();
}

inline bool StatusFile::claimed() const {
  std::lock_guard<std::mutex> lock(mu_);
  return claimed_;
}

inline void StatusFile::warn(const std::string& message) const {
  if (!log_) return;
  try {
    log_(LogLevel::warning, message);
  } catch (...) {
  }
}

inline void StatusFile::info(const std::string& message) const {
  if (!log_) return;
  try {
    log_(LogLevel::info, message);
  } catch (...) {
  }
}

inline bool StatusFile::running_state(const json& status) {
  const auto it = status.find("server_status");
  if (it == status.end() || !it->is_string()) return false;
  const auto& s = it->get_ref<const std::string&>();
  return s == "starting" || s == "ready" || s == "stopping";
}

inline bool StatusFile::pid_alive(long long pid) {
  // kill(0) and kill(-n) address process groups: never a server's pid.
  if (pid <= 0 || pid > static_cast<long long>(INT_MAX)) return false;
  if (::kill(static_cast<pid_t>(pid), 0) == 0) return true;
  return errno != ESRCH;  // EPERM: alive, owned by another user
}

// As AgentSmithy's server writes it: microseconds, "+00:00".
inline std::string StatusFile::iso_now() {
  return format_utc(std::chrono::system_clock::now(), 6, "+00:00");
}

inline StatusFile::FileLock::FileLock(const std::string& path) {
  fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0666);
  if (fd_ < 0) return;
  while (::flock(fd_, LOCK_EX) != 0) {
    if (errno != EINTR) {
      ::close(fd_);
      fd_ = -1;
      return;
    }
  }
}

inline StatusFile::FileLock::~FileLock() {
  if (fd_ >= 0) ::close(fd_);  // releases the flock
}

inline bool StatusFile::ensure_dir() {
  if (::mkdir(dir_.c_str(), 0777) == 0 || errno == EEXIST) return true;
  warn("status file: cannot create " + dir_ + ": " + std::strerror(errno));
  return false;
}

inline json StatusFile::read(bool* corrupt) const {
  if (corrupt) *corrupt = false;
  const int fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return json::object();  // missing (or unreadable): nothing to keep
  std::string text;
  char buf[8192];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n > 0) {
      text.append(buf, static_cast<std::size_t>(n));
      if (text.size() > (1u << 20)) break;  // not ours; a status is a few hundred bytes
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    break;
  }
  ::close(fd);
  json doc = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (doc.is_object()) return doc;
  if (corrupt) *corrupt = true;
  return json::object();
}

inline bool StatusFile::write(const json& doc) {
  if (!ensure_dir()) return false;
  const std::string text = doc.dump(2, ' ', false, json::error_handler_t::replace) + "\n";
  // A name no other writer uses: our pid and a counter; O_EXCL skips one that
  // a dead process with our pid left behind.
  std::string tmp;
  int fd = -1;
  for (int attempt = 0; attempt < 100 && fd < 0; ++attempt) {
    tmp = path_ + "." + std::to_string(pid_) + "." + std::to_string(++tmp_counter_) + ".tmp";
    fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd < 0 && errno != EEXIST) break;
  }
  if (fd < 0) {
    warn("status file: cannot create a temporary file next to " + path_ + ": " +
         std::strerror(errno));
    return false;
  }
  const char* failed = nullptr;
  int failed_errno = 0;
  for (std::size_t off = 0; off < text.size();) {
    const ssize_t n = ::write(fd, text.data() + off, text.size() - off);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      failed = "write";
      failed_errno = n < 0 ? errno : EIO;
      break;
    }
    off += static_cast<std::size_t>(n);
  }
  // No fsync: the rename makes the change atomic for every reader, which is
  // all a file that describes a running process needs (after a power loss no
  // server is running, whatever the disk kept). Two fsyncs cost the start and
  // the shutdown a few milliseconds each.
  if (::close(fd) != 0 && !failed) {
    failed = "close";
    failed_errno = errno;
  }
  if (!failed && ::rename(tmp.c_str(), path_.c_str()) != 0) {
    failed = "rename";
    failed_errno = errno;
  }
  if (failed) {
    ::unlink(tmp.c_str());
    warn(std::string("status file: ") + failed + " failed for " + path_ + ": " +
         std::strerror(failed_errno));
    return false;
  }
  return true;
}

inline std::optional<std::string> StatusFile::held_by_other(const json& doc) const {
  const auto pid_it = doc.find("server_pid");
  if (pid_it == doc.end() || !pid_it->is_number_integer() || !running_state(doc)) return {};
  const long long pid = pid_it->get<long long>();
  if (pid == pid_ || !pid_alive(pid)) return {};
  std::string port = "unknown";
  const auto port_it = doc.find("port");
  if (port_it != doc.end() && port_it->is_number_integer()) {
    port = std::to_string(port_it->get<long long>());
  }
  return "another server is running for " + workdir_ + " on port " + port + " (pid " +
         std::to_string(pid) + ")";
}

inline std::optional<std::string> StatusFile::claim(std::optional<int> port) {
  try {
    std::lock_guard<std::mutex> lock(mu_);
    if (refused_) return std::string("status file: claim refused earlier");
    if (claimed_) return {};
    // One claim per directory in this process, too (two Servers, one DIR).
    char resolved[PATH_MAX];
    const std::string key =
        ::realpath(workdir_.c_str(), resolved) ? std::string(resolved) : workdir_;
    {
      std::lock_guard<std::mutex> reg(registry_mutex());
      if (registry().count(key) != 0) {
        refused_ = true;
        return "another server is running for " + workdir_ + " in this process (pid " +
               std::to_string(pid_) + ")";
      }
      registry().insert(key);
      registered_ = key;
    }
    ensure_dir();
    FileLock file_lock(lock_path_);
    bool corrupt = false;
    json doc = read(&corrupt);
    if (corrupt) warn("status file: " + path_ + " is not a JSON object; starting it afresh");

    if (auto other = held_by_other(doc)) {
      refused_ = true;
      release_registration();
      return other;
    }
    const auto pid_it = doc.find("server_pid");
    if (pid_it != doc.end() && pid_it->is_number_integer() && running_state(doc)) {
      // Dead, or our own pid left by an earlier process (pid reuse): crashed.
      const std::string old_pid = std::to_string(pid_it->get<long long>());
      const std::string old_status = doc["server_status"].get<std::string>();
      doc["server_status"] = "crashed";
      doc["server_updated_at"] = iso_now();
      doc["server_error"] = "Server process (pid " + old_pid +
                            ") terminated unexpectedly while in '" + old_status + "' state";
      doc.erase("server_pid");
      doc.erase("port");
      write(doc);
      info("status file: the previous server (pid " + old_pid + ", " + old_status +
           ") is gone; marked crashed");
    }

    const std::string now = iso_now();
    doc["server_status"] = "starting";
    doc["server_pid"] = pid_;
    if (port && *port > 0) {
      doc["port"] = *port;
    } else {
      doc.erase("port");
    }
    doc["server_started_at"] = now;
    doc["server_updated_at"] = now;
    doc.erase("server_error");
    claimed_ = true;
    write(doc);
    return {};
  } catch (const std::exception& e) {
    warn(std::string("status file: claim failed: ") + e.what());
  } catch (...) {
    warn("status file: claim failed");
  }
  return {};
}

template <class Change>
bool StatusFile::update(const char* what, Change&& change) {
  try {
    std::lock_guard<std::mutex> lock(mu_);
    if (refused_) return false;
    ensure_dir();
    FileLock file_lock(lock_path_);
    json doc = read();
    if (auto other = held_by_other(doc)) {
      warn(std::string("status file: not writing ") + what + ": " + *other);
      return false;
    }
    doc["server_updated_at"] = iso_now();
    change(doc);
    return write(doc);
  } catch (const std::exception& e) {
    warn(std::string("status file: writing ") + what + " failed: " + e.what());
  } catch (...) {
    warn(std::string("status file: writing ") + what + " failed");
  }
  return false;
}

inline bool StatusFile::ready(int port) {
  return update("ready", [&](json& doc) {
    doc["server_status"] = "ready";
    doc["server_pid"] = pid_;
    doc["port"] = port;
    doc.erase("server_error");
  });
}

inline bool StatusFile::stopping() {
  return update("stopping", [&](json& doc) {
    doc["server_status"] = "stopping";
    doc.erase("server_error");
  });
}

inline bool StatusFile::stopped() {
  const bool ok = update("stopped", [&](json& doc) {
    doc["server_status"] = "stopped";
    doc.erase("server_pid");
    doc.erase("port");
    doc.erase("server_started_at");
    doc.erase("server_error");
  });
  std::lock_guard<std::mutex> lock(mu_);
  release_registration();  // the directory is free for another Server here
  claimed_ = false;
  return ok;
}

inline bool StatusFile::error(const std::string& message) {
  const bool ok = update("error", [&](json& doc) {
    doc["server_status"] = "error";
    doc.erase("server_pid");
    doc.erase("port");
    doc["server_error"] = message;
  });
  std::lock_guard<std::mutex> lock(mu_);
  release_registration();
  claimed_ = false;
  return ok;
}

}  // namespace detail
}  // namespace agentsmithy

// Dialogs: the memory store, the history AgentSmithy's clients page through,
// a turn's recording, the REST API.
// ---- include/agentsmithy/dialogs/memory_store.hpp
namespace agentsmithy {

inline const char* turn_outcome_name(TurnOutcome outcome) {
  switch (outcome) {
    case TurnOutcome::running: return "running";
    case TurnOutcome::completed: return "completed";
    case TurnOutcome::error: return "error";
    case TurnOutcome::shutdown: return "shutdown";
    case TurnOutcome::client_gone: return "client_gone";
    case TurnOutcome::superseded: return "superseded";
  }
  return "running";
}

namespace detail {

// ===========================================================================
// The memory dialog store (the default)
// ===========================================================================

// About the size of `e` dumped as JSON, without dumping it (it is counted for
// every event a stream sends).
inline std::size_t json_bytes(const nlohmann::json& e) {
  switch (e.type()) {
    case nlohmann::json::value_t::object: {
      std::size_t n = 2;
      for (const auto& [key, value] : e.items()) n += key.size() + 4 + json_bytes(value);
      return n;
    }
    case nlohmann::json::value_t::array: {
      std::size_t n = 2;
      for (const auto& value : e) n += 1 + json_bytes(value);
      return n;
    }
    case nlohmann::json::value_t::string: return e.get_ref<const std::string&>().size() + 2;
    default: return 8;
  }
}

// Everything under one mutex. Its size is about the dumped JSON of every
// stored event (json_bytes) plus every title; past `max_bytes` the dialogs updated longest ago
// are evicted (never the current one, nor one with a running turn).
class MemoryDialogStore final : public DialogStore {
 public:
  explicit MemoryDialogStore(std::size_t max_bytes) : max_bytes_(max_bytes) {}

  std::vector<DialogInfo> list_dialogs() override {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<DialogInfo> out;
    out.reserve(dialogs_.size());
    for (auto it = by_updated_.rbegin(); it != by_updated_.rend(); ++it) {
      out.push_back(dialogs_.at(it->second).info);
    }
    return out;
  }

  std::optional<DialogInfo> find_dialog(const std::string& id) override {
    std::lock_guard<std::mutex> lock(mu_);
    const auto it = dialogs_.find(id);
    if (it == dialogs_.end()) return std::nullopt;
    return it->second.info;
  }

  DialogInfo create_dialog(const std::string& id,
                           const std::optional<std::string>& title) override {
    std::lock_guard<std::mutex> lock(mu_);
    const DialogInfo info = create_locked(id, title).info;
    enforce_bound_locked();
    return info;
  }

  std::optional<DialogInfo> rename_dialog(const std::string& id,
                                          const std::string& title) override {
    std::lock_guard<std::mutex> lock(mu_);
    const auto it = dialogs_.find(id);
    if (it == dialogs_.end()) return std::nullopt;
    Dialog& d = it->second;
    const std::size_t old_size = d.info.title ? d.info.title->size() : 0;
    d.info.title = title;
    d.bytes = d.bytes - old_size + title.size();
    bytes_ = bytes_ - old_size + title.size();
    touch_locked(d);
    const DialogInfo info = d.info;
    enforce_bound_locked();
    return info;
  }

  bool delete_dialog(const std::string& id) override {
    std::lock_guard<std::mutex> lock(mu_);
    const auto it = dialogs_.find(id);
    if (it == dialogs_.end()) return false;
    erase_locked(it);
    return true;
  }

  std::optional<std::string> current_dialog() override {
    std::lock_guard<std::mutex> lock(mu_);
    return current_;
  }

  void set_current_dialog(const std::optional<std::string>& id) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (id && dialogs_.count(*id) == 0) {
      throw std::invalid_argument("set_current_dialog: unknown dialog " + *id);
    }
    current_ = id;
    enforce_bound_locked();  // the previous current one may go now
  }

  void begin_turn(const std::string& dialog_id, const std::string& turn_id,
                  const nlohmann::json& user_event) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (turns_.count(turn_id) != 0) {
      throw std::invalid_argument("begin_turn: turn id already used: " + turn_id);
    }
    Dialog& d = create_locked(dialog_id, std::nullopt);
    TurnRecord turn;
    turn.turn_id = turn_id;
    turn.dialog_id = dialog_id;
    turn.started_at = next_stamp_locked();
    turn.events.push_back(user_event);
    const std::size_t size = json_bytes(user_event);
    turns_.emplace(turn_id, std::move(turn));
    d.turn_ids.push_back(turn_id);
    d.bytes += size;
    bytes_ += size;
    ++d.running;
    touch_locked(d);
    enforce_bound_locked();
  }

  void append(const std::string& turn_id, std::uint64_t first,
              const std::vector<nlohmann::json>& events) override {
    std::lock_guard<std::mutex> lock(mu_);
    const auto it = turns_.find(turn_id);
    if (it == turns_.end()) return;
    TurnRecord& turn = it->second;
    const std::uint64_t have = turn.events.size();
    if (first > have) {
      throw std::invalid_argument("append: position " + std::to_string(first) +
                                  " leaves a gap after " + std::to_string(have));
    }
    std::size_t added = 0;
    for (std::uint64_t i = have - first; i < events.size(); ++i) {
      added += json_bytes(events[i]);
      turn.events.push_back(events[i]);
    }
    if (first + events.size() <= have) return;  // all of it a replay
    Dialog& d = dialogs_.at(turn.dialog_id);
    d.bytes += added;
    bytes_ += added;
    enforce_bound_locked();  // updated_at moves when a turn begins and ends
  }

  void end_turn(const std::string& turn_id, TurnOutcome outcome,
                const std::string& error_code) override {
    std::lock_guard<std::mutex> lock(mu_);
    const auto it = turns_.find(turn_id);
    if (it == turns_.end()) return;
    TurnRecord& turn = it->second;
    if (turn.outcome != TurnOutcome::running || outcome == TurnOutcome::running) return;
    turn.outcome = outcome;
    turn.error_code = outcome == TurnOutcome::error ? error_code : std::string();
    turn.ended_at = next_stamp_locked();
    Dialog& d = dialogs_.at(turn.dialog_id);
    --d.running;
    touch_locked(d);
    enforce_bound_locked();
  }

  void sync() override {}

  std::vector<TurnRecord> turns(const std::string& dialog_id, std::size_t max_turns) override {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<TurnRecord> out;
    const auto it = dialogs_.find(dialog_id);
    if (it == dialogs_.end()) return out;
    const auto& ids = it->second.turn_ids;
    const std::size_t n = std::min(max_turns, ids.size());
    out.reserve(n);
    for (std::size_t i = ids.size() - n; i < ids.size(); ++i) out.push_back(turns_.at(ids[i]));
    return out;
  }

  std::vector<TurnRecord> turn_headers(const std::string& dialog_id,
                                       std::size_t max_turns) override {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<TurnRecord> out;
    const auto it = dialogs_.find(dialog_id);
    if (it == dialogs_.end()) return out;
    const auto& ids = it->second.turn_ids;
    const std::size_t n = std::min(max_turns, ids.size());
    out.reserve(n);
    for (std::size_t i = ids.size() - n; i < ids.size(); ++i) {
      const TurnRecord& t = turns_.at(ids[i]);
      out.push_back(TurnRecord{
          t.turn_id, t.dialog_id, t.outcome, t.error_code, t.started_at, t.ended_at, {}});
    }
    return out;
  }

  std::optional<TurnRecord> turn(const std::string& turn_id) override {
    std::lock_guard<std::mutex> lock(mu_);
    const auto it = turns_.find(turn_id);
    if (it == turns_.end()) return std::nullopt;
    return it->second;
  }

  // The bytes counted against the bound (for tests and metrics).
  std::size_t bytes_used() const {
    std::lock_guard<std::mutex> lock(mu_);
    return bytes_;
  }

 private:
  struct Dialog {
    DialogInfo info;
    std::vector<std::string> turn_ids;
    std::size_t bytes = 0;
    int running = 0;
  };
  using DialogMap = std::unordered_map<std::string, Dialog>;

  // A timestamp later than every earlier one, so that updated_at orders the
  // dialogs totally even within one microsecond or if the clock steps back.
  std::string next_stamp_locked() {
    auto now =
        std::chrono::time_point_cast<std::chrono::microseconds>(std::chrono::system_clock::now());
    if (now <= last_stamp_) now = last_stamp_ + std::chrono::microseconds(1);
    last_stamp_ = now;
    return format_utc(now, 6, "Z");
  }

  void touch_locked(Dialog& d) {
    by_updated_.erase(std::make_pair(d.info.updated_at, d.info.id));
    d.info.updated_at = next_stamp_locked();
    by_updated_.emplace(d.info.updated_at, d.info.id);
  }

  Dialog& create_locked(const std::string& id, const std::optional<std::string>& title) {
    const auto it = dialogs_.find(id);
    if (it != dialogs_.end()) return it->second;
    Dialog d;
    d.info.id = id;
    d.info.title = title;
    d.info.created_at = d.info.updated_at = next_stamp_locked();
    d.bytes = title ? title->size() : 0;
    bytes_ += d.bytes;
    by_updated_.emplace(d.info.updated_at, id);
    return dialogs_.emplace(id, std::move(d)).first->second;
  }

  void erase_locked(DialogMap::iterator it) {
    Dialog& d = it->second;
    for (const auto& turn_id : d.turn_ids) turns_.erase(turn_id);
    by_updated_.erase(std::make_pair(d.info.updated_at, d.info.id));
    bytes_ -= d.bytes;
    if (current_ == d.info.id) current_.reset();
    dialogs_.erase(it);
  }

  // Evicts the dialogs updated longest ago until the store fits, skipping the
  // current one and those with a running turn.
  // Still over (the current dialog, or one with a running turn, holds the
  // bytes): their oldest ended turns go, so that no dialog grows the store
  // past its bound.
  void enforce_bound_locked() {
    auto next = by_updated_.begin();
    while (bytes_ > max_bytes_ && next != by_updated_.end()) {
      const auto it = dialogs_.find((next++)->second);
      if (it->second.running > 0 || current_ == it->first) continue;
      erase_locked(it);  // `next` stays valid: only this dialog's entry goes
    }
    for (auto d = by_updated_.begin(); bytes_ > max_bytes_ && d != by_updated_.end(); ++d) {
      Dialog& dialog = dialogs_.at(d->second);
      auto& ids = dialog.turn_ids;
      for (std::size_t k = 0; bytes_ > max_bytes_ && k < ids.size();) {
        const auto turn = turns_.find(ids[k]);
        if (turn->second.outcome == TurnOutcome::running) {
          ++k;
          continue;
        }
        std::size_t size = 0;
        for (const nlohmann::json& e : turn->second.events) size += json_bytes(e);
        size = std::min(size, dialog.bytes);
        dialog.bytes -= size;
        bytes_ -= size;
        turns_.erase(turn);
        ids.erase(ids.begin() + static_cast<std::ptrdiff_t>(k));
      }
    }
  }

  mutable std::mutex mu_;
  const std::size_t max_bytes_;
  std::size_t bytes_ = 0;
  DialogMap dialogs_;
  std::unordered_map<std::string, TurnRecord> turns_;
  std::set<std::pair<std::string, std::string>> by_updated_;  // (updated_at, id), oldest first
  std::optional<std::string> current_;
  std::chrono::time_point<std::chrono::system_clock, std::chrono::microseconds> last_stamp_{};
};

}  // namespace detail

inline std::shared_ptr<DialogStore> memory_store(std::size_t max_bytes) {
  return std::make_shared<detail::MemoryDialogStore>(max_bytes);
}

}  // namespace agentsmithy
#ifdef AGENTSMITHY_SQLITE_SUPPORT
// ---- include/agentsmithy/dialogs/sqlite_store.hpp
namespace agentsmithy {
namespace detail {

// ===========================================================================
// The SQLite dialog store (AGENTSMITHY_SQLITE_SUPPORT)
// ===========================================================================

// One file in WAL mode. The dialogs, the current one and what each turn of
// this process has begun (its dialog, its next position, whether it runs)
// live in memory too, so that append() only checks positions and queues
// its events: one writer thread owns the write connection and commits
// everything queued in one transaction (group commit), kSqliteLinger after
// the first queued write at the latest, at once when a sync() or a read
// waits. Reads of turns wait until what was queued before them is committed,
// then read on their own connection.
//
// Schema (version 1):
//   meta(key PK, value)            application marker, schema_version,
//                                  current_dialog
//   dialogs(id PK, title, created_at, updated_at), index on updated_at
//   turns(seq INTEGER PK, turn_id UNIQUE, dialog_id, outcome, error_code,
//         started_at, ended_at), index on (dialog_id, seq)
//   events(turn_id, pos, json, PK (turn_id, pos)) WITHOUT ROWID
// Deleting a dialog deletes its turns and their events (by hand, in the
// same transaction).
inline constexpr const char* kSqliteStoreMarker = "agentsmithy-dialogs";
inline constexpr int kSqliteSchemaVersion = 1;
inline constexpr std::chrono::milliseconds kSqliteLinger{20};
inline constexpr std::size_t kSqliteMaxBatch = 20000;     // queued writes that start a commit
inline constexpr std::size_t kSqliteEndedCached = 10000;  // ended turns kept in memory

class SqliteDialogStore final : public DialogStore {
 public:
  explicit SqliteDialogStore(std::string path) : path_(std::move(path)) {
    open();
    load();
    writer_ = std::thread([this] { writer_loop(); });
  }

  ~SqliteDialogStore() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    writer_cv_.notify_all();
    if (writer_.joinable()) writer_.join();
    // The statements, then the connections (members, in reverse order).
  }

  SqliteDialogStore(const SqliteDialogStore&) = delete;
  SqliteDialogStore& operator=(const SqliteDialogStore&) = delete;

  const std::string& path() const { return path_; }

  std::vector<DialogInfo> list_dialogs() override {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<DialogInfo> out;
    out.reserve(dialogs_.size());
    for (auto it = by_updated_.rbegin(); it != by_updated_.rend(); ++it) {
      out.push_back(dialogs_.at(it->second));
    }
    return out;
  }

  std::optional<DialogInfo> find_dialog(const std::string& id) override {
    std::lock_guard<std::mutex> lock(mu_);
    const auto it = dialogs_.find(id);
    if (it == dialogs_.end()) return std::nullopt;
    return it->second;
  }

  DialogInfo create_dialog(const std::string& id,
                           const std::optional<std::string>& title) override {
    std::lock_guard<std::mutex> lock(mu_);
    throw_failure_locked();
    return create_locked(id, title);
  }

  std::optional<DialogInfo> rename_dialog(const std::string& id,
                                          const std::string& title) override {
    std::lock_guard<std::mutex> lock(mu_);
    throw_failure_locked();
    const auto it = dialogs_.find(id);
    if (it == dialogs_.end()) return std::nullopt;
    it->second.title = title;
    Op op;
    op.kind = OpKind::rename;
    op.a = id;
    op.b = title;
    touch_locked(it->second, op);
    enqueue_locked(std::move(op));
    return it->second;
  }

  bool delete_dialog(const std::string& id) override {
    std::lock_guard<std::mutex> lock(mu_);
    throw_failure_locked();
    const auto it = dialogs_.find(id);
    if (it == dialogs_.end()) return false;
    by_updated_.erase(std::make_pair(it->second.updated_at, id));
    dialogs_.erase(it);
    Op op;
    op.kind = OpKind::remove;
    op.a = id;
    const std::uint64_t seq = enqueue_locked(std::move(op));
    if (current_ == id) set_current_locked(std::nullopt);
    // Its running turns are dropped: their later append() and end_turn()
    // are ignored.
    for (auto& [turn_id, t] : turns_) {
      if (t.dialog_id != id || t.dropped) continue;
      t.dropped = true;
      if (t.running) ended_.emplace_back(seq, turn_id);
      t.running = false;
    }
    return true;
  }

  std::optional<std::string> current_dialog() override {
    std::lock_guard<std::mutex> lock(mu_);
    return current_;
  }

  void set_current_dialog(const std::optional<std::string>& id) override {
    std::lock_guard<std::mutex> lock(mu_);
    throw_failure_locked();
    if (id && dialogs_.count(*id) == 0) {
      throw std::invalid_argument("set_current_dialog: unknown dialog " + *id);
    }
    set_current_locked(id);
  }

  void begin_turn(const std::string& dialog_id, const std::string& turn_id,
                  const nlohmann::json& user_event) override {
    std::string user = dump_json(user_event);
    std::lock_guard<std::mutex> lock(mu_);
    throw_failure_locked();
    const auto it = turns_.find(turn_id);
    if ((it != turns_.end() && !it->second.dropped) ||
        (it == turns_.end() && turn_in_file(turn_id))) {
      throw std::invalid_argument("begin_turn: turn id already used: " + turn_id);
    }
    create_locked(dialog_id, std::nullopt);
    DialogInfo& d = dialogs_.at(dialog_id);
    TurnState state;
    state.dialog_id = dialog_id;
    turns_[turn_id] = state;
    Op op;
    op.kind = OpKind::begin;
    op.a = turn_id;
    op.b = dialog_id;
    op.n = next_seq_++;
    op.stamp = next_stamp_locked();
    op.events.push_back(std::move(user));
    touch_locked(d, op);
    enqueue_locked(std::move(op));
  }

  void append(const std::string& turn_id, std::uint64_t first,
              const std::vector<nlohmann::json>& events) override {
    std::vector<std::string> dumped;
    dumped.reserve(events.size());
    for (const nlohmann::json& e : events) dumped.push_back(dump_json(e));
    std::unique_lock<std::mutex> lock(mu_);
    throw_failure_locked();
    TurnState* t = find_turn_locked(lock, turn_id);
    if (t == nullptr || t->dropped) return;
    const std::uint64_t have = t->next;
    if (first > have) {
      throw std::invalid_argument("append: position " + std::to_string(first) +
                                  " leaves a gap after " + std::to_string(have));
    }
    if (first + dumped.size() <= have) return;  // all of it a replay
    Op op;
    op.kind = OpKind::events;
    op.a = turn_id;
    op.n = have;
    op.events.assign(
        std::make_move_iterator(dumped.begin() + static_cast<std::ptrdiff_t>(have - first)),
        std::make_move_iterator(dumped.end()));
    t->next = first + dumped.size();
    enqueue_locked(std::move(op));  // updated_at moves when a turn begins and ends
  }

  void end_turn(const std::string& turn_id, TurnOutcome outcome,
                const std::string& error_code) override {
    std::unique_lock<std::mutex> lock(mu_);
    throw_failure_locked();
    TurnState* t = find_turn_locked(lock, turn_id);
    if (t == nullptr || t->dropped) return;
    if (!t->running || outcome == TurnOutcome::running) return;
    t->running = false;
    Op op;
    op.kind = OpKind::end;
    op.a = turn_id;
    op.b = outcome == TurnOutcome::error ? error_code : std::string();
    op.n = static_cast<std::uint64_t>(outcome);
    op.stamp = next_stamp_locked();
    touch_locked(dialogs_.at(t->dialog_id), op);
    ended_.emplace_back(enqueue_locked(std::move(op)), turn_id);
    evict_ended_locked();
  }

  // Everything queued before the call is committed; a failed commit since
  // the last report throws here.
  void sync() override {
    std::unique_lock<std::mutex> lock(mu_);
    wait_committed_locked(lock, queued_seq_);
    throw_failure_locked();
  }

  std::vector<TurnRecord> turns(const std::string& dialog_id, std::size_t max_turns) override {
    return read_turns(dialog_id, max_turns, true);
  }

  std::vector<TurnRecord> turn_headers(const std::string& dialog_id,
                                       std::size_t max_turns) override {
    return read_turns(dialog_id, max_turns, false);
  }

  std::optional<TurnRecord> turn(const std::string& turn_id) override {
    {
      std::unique_lock<std::mutex> lock(mu_);
      wait_committed_locked(lock, queued_seq_);
    }
    std::lock_guard<std::mutex> read(read_mu_);
    ReadSnapshot snapshot(*this);
    std::optional<TurnRecord> out;
    {
      Use q(*this, rdb_.get(), turn_by_id_, "cannot read a turn");
      q.text(1, turn_id);
      if (q.step()) out = q.turn_row();
    }
    if (out) read_events(*out);
    return out;
  }

 private:
  using Stamp = std::chrono::time_point<std::chrono::system_clock, std::chrono::microseconds>;

  // ---- SQLite handles ------------------------------------------------------

  struct DbClose {
    void operator()(sqlite3* db) const { sqlite3_close_v2(db); }
  };
  struct StmtFinalize {
    void operator()(sqlite3_stmt* s) const { sqlite3_finalize(s); }
  };
  using Db = std::unique_ptr<sqlite3, DbClose>;
  using Stmt = std::unique_ptr<sqlite3_stmt, StmtFinalize>;

  [[noreturn]] void fail(sqlite3* db, const std::string& what) const {
    throw StoreError(path_ + ": " + what + ": " + (db ? sqlite3_errmsg(db) : "out of memory"));
  }

  void exec(sqlite3* db, const char* sql, const std::string& what) const {
    if (sqlite3_exec(db, sql, nullptr, nullptr, nullptr) != SQLITE_OK) fail(db, what);
  }

  Stmt prepare(sqlite3* db, const char* sql) const {
    sqlite3_stmt* s = nullptr;
    if (sqlite3_prepare_v3(db, sql, -1, SQLITE_PREPARE_PERSISTENT, &s, nullptr) != SQLITE_OK) {
      fail(db, std::string("cannot prepare \"") + sql + "\"");
    }
    return Stmt(s);
  }

  // One use of a prepared statement: binds (the values must outlive it),
  // steps, and resets it when it goes.
  class Use {
   public:
    Use(const SqliteDialogStore& store, sqlite3* db, const Stmt& stmt, const char* what)
        : store_(store), db_(db), s_(stmt.get()), what_(what) {}
    ~Use() {
      sqlite3_reset(s_);
      sqlite3_clear_bindings(s_);
    }
    Use(const Use&) = delete;
    Use& operator=(const Use&) = delete;

    void text(int i, const std::string& v) {
      check(sqlite3_bind_text(s_, i, v.data(), static_cast<int>(v.size()), SQLITE_STATIC));
    }
    void text(int i, const std::optional<std::string>& v) {
      if (v) return text(i, *v);
      check(sqlite3_bind_null(s_, i));
    }
    void int64(int i, sqlite3_int64 v) { check(sqlite3_bind_int64(s_, i, v)); }
    // True: a row.
    bool step() {
      const int rc = sqlite3_step(s_);
      if (rc == SQLITE_ROW) return true;
      if (rc == SQLITE_DONE) return false;
      store_.fail(db_, what_);
    }
    void run() {
      while (step()) {
      }
    }
    std::string column(int i) const {
      const auto* p = reinterpret_cast<const char*>(sqlite3_column_text(s_, i));
      return p ? std::string(p, static_cast<std::size_t>(sqlite3_column_bytes(s_, i)))
               : std::string();
    }
    std::optional<std::string> nullable(int i) const {
      if (sqlite3_column_type(s_, i) == SQLITE_NULL) return std::nullopt;
      return column(i);
    }
    sqlite3_int64 integer(int i) const { return sqlite3_column_int64(s_, i); }
    // turn_id, dialog_id, outcome, error_code, started_at, ended_at
    TurnRecord turn_row() const {
      TurnRecord t;
      t.turn_id = column(0);
      t.dialog_id = column(1);
      t.outcome = outcome_of(column(2));
      t.error_code = column(3);
      t.started_at = column(4);
      t.ended_at = column(5);
      return t;
    }

   private:
    void check(int rc) {
      if (rc != SQLITE_OK) store_.fail(db_, what_);
    }
    const SqliteDialogStore& store_;
    sqlite3* const db_;
    sqlite3_stmt* const s_;
    const char* const what_;
  };

  // One read transaction on the read connection: a turn and its events as
  // of one commit.
  class ReadSnapshot {
   public:
    explicit ReadSnapshot(const SqliteDialogStore& store) : db_(store.rdb_.get()) {
      store.exec(db_, "BEGIN", "cannot begin a read");
    }
    ~ReadSnapshot() { sqlite3_exec(db_, "COMMIT", nullptr, nullptr, nullptr); }
    ReadSnapshot(const ReadSnapshot&) = delete;
    ReadSnapshot& operator=(const ReadSnapshot&) = delete;

   private:
    sqlite3* const db_;
  };

  static TurnOutcome outcome_of(const std::string& name) {
    for (TurnOutcome o : {TurnOutcome::completed, TurnOutcome::error, TurnOutcome::shutdown,
                          TurnOutcome::client_gone, TurnOutcome::superseded}) {
      if (name == turn_outcome_name(o)) return o;
    }
    return TurnOutcome::running;
  }

  // ---- Opening -------------------------------------------------------------

  Db connect(int flags) const {
    sqlite3* raw = nullptr;
    const int rc = sqlite3_open_v2(path_.c_str(), &raw, flags | SQLITE_OPEN_NOMUTEX, nullptr);
    Db db(raw);
    if (rc != SQLITE_OK) fail(db.get(), "cannot open");
    sqlite3_extended_result_codes(db.get(), 1);
    // Our one writer never waits for itself; another process's lock (the
    // sqlite3 shell) is waited for this long, then the commit fails: a turn's
    // done is held at most that long, and the shutdown not even that.
    if (sqlite3_busy_timeout(db.get(), 1000) != SQLITE_OK)
      fail(db.get(), "cannot set busy_timeout");
    return db;
  }

  void open() {
    wdb_ = connect(SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE);
    if (sqlite3_db_readonly(wdb_.get(), "main") == 1) {
      throw StoreError(path_ + ": cannot open for writing: the file is read-only");
    }
    // The first read of the file: what it is.
    if (sqlite3_exec(wdb_.get(), "PRAGMA journal_mode=WAL", nullptr, nullptr, nullptr) !=
        SQLITE_OK) {
      if ((sqlite3_extended_errcode(wdb_.get()) & 0xff) == SQLITE_NOTADB) {
        fail(wdb_.get(), "not a valid store (not an SQLite database)");
      }
      fail(wdb_.get(), "cannot use WAL mode");
    }
    exec(wdb_.get(), "PRAGMA synchronous=NORMAL", "cannot set synchronous=NORMAL");
    // Every running turn appends to its own pages: with a thousand streams a
    // commit touches a thousand pages, which the default 2 MiB cache would
    // read back from the file each time.
    exec(wdb_.get(), "PRAGMA cache_size=-65536", "cannot set cache_size");
    exec(wdb_.get(), "BEGIN IMMEDIATE", "cannot lock the file to check its schema");
    try {
      check_or_create_schema();
      exec(wdb_.get(), "COMMIT", "cannot commit the schema");
    } catch (...) {
      sqlite3_exec(wdb_.get(), "ROLLBACK", nullptr, nullptr, nullptr);
      throw;
    }

    insert_dialog_ = prepare(wdb_.get(),
                             "INSERT OR IGNORE INTO dialogs(id, title, created_at, updated_at) "
                             "VALUES(?1, ?2, ?3, ?3)");
    rename_dialog_ = prepare(wdb_.get(), "UPDATE dialogs SET title = ?2 WHERE id = ?1");
    touch_dialog_ =
        prepare(wdb_.get(), "UPDATE dialogs SET updated_at = ?2 WHERE id = ?1 AND updated_at < ?2");
    delete_events_ = prepare(wdb_.get(),
                             "DELETE FROM events WHERE turn_id IN "
                             "(SELECT turn_id FROM turns WHERE dialog_id = ?1)");
    delete_turns_ = prepare(wdb_.get(), "DELETE FROM turns WHERE dialog_id = ?1");
    delete_dialog_ = prepare(wdb_.get(), "DELETE FROM dialogs WHERE id = ?1");
    set_current_ =
        prepare(wdb_.get(), "INSERT OR REPLACE INTO meta(key, value) VALUES('current_dialog', ?1)");
    insert_turn_ = prepare(wdb_.get(),
                           "INSERT OR IGNORE INTO turns(seq, turn_id, dialog_id, outcome, "
                           "error_code, started_at, ended_at) "
                           "VALUES(?3, ?1, ?2, 'running', '', ?4, NULL)");
    insert_event_ =
        prepare(wdb_.get(), "INSERT OR IGNORE INTO events(turn_id, pos, json) VALUES(?1, ?2, ?3)");
    end_turn_ = prepare(wdb_.get(),
                        "UPDATE turns SET outcome = ?2, error_code = ?3, ended_at = ?4 "
                        "WHERE turn_id = ?1 AND outcome = 'running'");

    rdb_ = connect(SQLITE_OPEN_READWRITE);
    exec(rdb_.get(), "PRAGMA query_only=1", "cannot set query_only");
    static constexpr const char* kTurnColumns =
        "SELECT turn_id, dialog_id, outcome, error_code, started_at, "
        "coalesce(ended_at, ''), seq FROM turns ";
    turns_of_dialog_ = prepare(
        rdb_.get(),
        (std::string(kTurnColumns) + "WHERE dialog_id = ?1 ORDER BY seq DESC LIMIT ?2").c_str());
    turn_by_id_ = prepare(rdb_.get(), (std::string(kTurnColumns) + "WHERE turn_id = ?1").c_str());
    events_of_turn_ =
        prepare(rdb_.get(), "SELECT json FROM events WHERE turn_id = ?1 ORDER BY pos");
    next_pos_ =
        prepare(rdb_.get(), "SELECT coalesce(max(pos) + 1, 0) FROM events WHERE turn_id = ?1");
  }

  // In the open transaction: an empty file gets the schema; any other must
  // be a store of this version or older.
  void check_or_create_schema() {
    sqlite3* db = wdb_.get();
    Stmt tables = prepare(db, "SELECT count(*) FROM sqlite_master");
    sqlite3_int64 count = 0;
    {
      Use q(*this, db, tables, "cannot read the schema");
      if (q.step()) count = q.integer(0);
    }
    if (count == 0) {
      exec(db,
           "CREATE TABLE meta(key TEXT PRIMARY KEY, value);"
           "CREATE TABLE dialogs(id TEXT PRIMARY KEY, title TEXT, created_at TEXT NOT NULL,"
           " updated_at TEXT NOT NULL);"
           "CREATE INDEX dialogs_by_updated ON dialogs(updated_at);"
           "CREATE TABLE turns(seq INTEGER PRIMARY KEY, turn_id TEXT NOT NULL UNIQUE,"
           " dialog_id TEXT NOT NULL, outcome TEXT NOT NULL, error_code TEXT NOT NULL,"
           " started_at TEXT NOT NULL, ended_at TEXT);"
           "CREATE INDEX turns_by_dialog ON turns(dialog_id, seq);"
           "CREATE TABLE events(turn_id TEXT NOT NULL, pos INTEGER NOT NULL, json TEXT NOT NULL,"
           " PRIMARY KEY(turn_id, pos)) WITHOUT ROWID;",
           "cannot create the schema");
      const std::string meta = std::string("INSERT INTO meta(key, value) VALUES('application', '") +
                               kSqliteStoreMarker + "'), ('schema_version', " +
                               std::to_string(kSqliteSchemaVersion) + ")";
      exec(db, meta.c_str(), "cannot create the schema");
      return;
    }
    const char* invalid =
        "not a valid store (an SQLite database that is not agentsmithy's dialog store)";
    Stmt marker = prepare_or_null(db, "SELECT value FROM meta WHERE key = 'application'");
    if (!marker) throw StoreError(path_ + ": " + invalid);
    {
      Use q(*this, db, marker, "cannot read the schema");
      if (!q.step() || q.column(0) != kSqliteStoreMarker) throw StoreError(path_ + ": " + invalid);
    }
    Stmt version = prepare(db, "SELECT value FROM meta WHERE key = 'schema_version'");
    sqlite3_int64 v = 0;
    {
      Use q(*this, db, version, "cannot read the schema version");
      if (q.step()) v = q.integer(0);
    }
    if (v > kSqliteSchemaVersion) {
      throw StoreError(path_ + ": not a valid store: its schema version " + std::to_string(v) +
                       " is newer than this build's " + std::to_string(kSqliteSchemaVersion));
    }
    if (v < 1) throw StoreError(path_ + ": not a valid store: no schema version");
    for (const char* table : {"dialogs", "turns", "events"}) {
      Stmt probe =
          prepare_or_null(db, (std::string("SELECT 1 FROM ") + table + " LIMIT 1").c_str());
      if (!probe) {
        throw StoreError(path_ + ": not a valid store: table " + table + " is missing");
      }
    }
  }

  Stmt prepare_or_null(sqlite3* db, const char* sql) const {
    sqlite3_stmt* s = nullptr;
    if (sqlite3_prepare_v2(db, sql, -1, &s, nullptr) != SQLITE_OK) return Stmt();
    return Stmt(s);
  }

  // The dialogs, the current one, the next turn's seq, the last stamp.
  void load() {
    sqlite3* db = rdb_.get();
    std::string newest;
    {
      Stmt all = prepare(db, "SELECT id, title, created_at, updated_at FROM dialogs");
      Use q(*this, db, all, "cannot read the dialogs");
      while (q.step()) {
        DialogInfo d;
        d.id = q.column(0);
        d.title = q.nullable(1);
        d.created_at = q.column(2);
        d.updated_at = q.column(3);
        newest = std::max(newest, d.updated_at);
        by_updated_.emplace(d.updated_at, d.id);
        std::string id = d.id;
        dialogs_.emplace(std::move(id), std::move(d));
      }
    }
    {
      Stmt current = prepare(db, "SELECT value FROM meta WHERE key = 'current_dialog'");
      Use q(*this, db, current, "cannot read the current dialog");
      if (q.step()) current_ = q.nullable(0);
      if (current_ && dialogs_.count(*current_) == 0) current_.reset();
    }
    {
      Stmt seq = prepare(db, "SELECT coalesce(max(seq), 0) + 1 FROM turns");
      Use q(*this, db, seq, "cannot read the turns");
      if (q.step()) next_seq_ = static_cast<std::uint64_t>(q.integer(0));
    }
    last_stamp_ = parse_stamp(newest);
  }

  // "2026-12-07T11:09:20.123456Z" back to a time point (epoch if it is not one).
  static Stamp parse_stamp(const std::string& s) {
    int y = 0, mo = 0, d = 0, h = 0, mi = 0, sec = 0, us = 0;
    if (std::sscanf(s.c_str(), "%4d-%2d-%2dT%2d:%2d:%2d.%6d", &y, &mo, &d, &h, &mi, &sec, &us) !=
        7) {
      return Stamp{};
    }
    std::tm tm{};
    tm.tm_year = y - 1900;
    tm.tm_mon = mo - 1;
    tm.tm_mday = d;
    tm.tm_hour = h;
    tm.tm_min = mi;
    tm.tm_sec = sec;
    const std::time_t t = ::timegm(&tm);
    return Stamp{std::chrono::seconds(t) + std::chrono::microseconds(us)};
  }

  // ---- The state in memory ---------------------------------------------------

  struct TurnState {
    std::string dialog_id;
    std::uint64_t next = 1;  // the next position
    bool running = true;
    bool dropped = false;  // its dialog was deleted
  };

  enum class OpKind { create, rename, remove, current, begin, events, end };
  // One queued write. a: the dialog or turn id; b: title, dialog id (begin),
  // error code (end); opt: title (create) or current id; n: seq (begin),
  // first position (events), outcome (end); stamp: created, started or
  // ended; touched/touch: the dialog whose updated_at this write sets.
  struct Op {
    OpKind kind = OpKind::create;
    std::string a, b, stamp;
    std::optional<std::string> opt;
    std::uint64_t n = 0;
    std::vector<std::string> events;
    std::string touched, touch;
  };

  std::string next_stamp_locked() {
    auto now =
        std::chrono::time_point_cast<std::chrono::microseconds>(std::chrono::system_clock::now());
    if (now <= last_stamp_) now = last_stamp_ + std::chrono::microseconds(1);
    last_stamp_ = now;
    return format_utc(now, 6, "Z");
  }

  void touch_locked(DialogInfo& d, Op& op) {
    by_updated_.erase(std::make_pair(d.updated_at, d.id));
    d.updated_at = next_stamp_locked();
    by_updated_.emplace(d.updated_at, d.id);
    op.touched = d.id;
    op.touch = d.updated_at;
  }

  DialogInfo create_locked(const std::string& id, const std::optional<std::string>& title) {
    const auto it = dialogs_.find(id);
    if (it != dialogs_.end()) return it->second;
    DialogInfo d;
    d.id = id;
    d.title = title;
    d.created_at = d.updated_at = next_stamp_locked();
    by_updated_.emplace(d.updated_at, id);
    Op op;
    op.kind = OpKind::create;
    op.a = id;
    op.opt = title;
    op.stamp = d.created_at;
    enqueue_locked(std::move(op));
    dialogs_.emplace(id, d);
    return d;
  }

  void set_current_locked(const std::optional<std::string>& id) {
    current_ = id;
    Op op;
    op.kind = OpKind::current;
    op.opt = id;
    enqueue_locked(std::move(op));
  }

  // The turn's state: from memory, else (after the queue is committed) from
  // the file; null when there is no such turn.
  TurnState* find_turn_locked(std::unique_lock<std::mutex>& lock, const std::string& turn_id) {
    auto it = turns_.find(turn_id);
    if (it != turns_.end()) return &it->second;
    wait_committed_locked(lock, queued_seq_);
    it = turns_.find(turn_id);  // begun while we waited
    if (it != turns_.end()) return &it->second;
    std::lock_guard<std::mutex> read(read_mu_);
    std::optional<TurnRecord> row;
    {
      Use q(*this, rdb_.get(), turn_by_id_, "cannot read a turn");
      q.text(1, turn_id);
      if (q.step()) row = q.turn_row();
    }
    if (!row || dialogs_.count(row->dialog_id) == 0) return nullptr;
    TurnState state;
    state.dialog_id = row->dialog_id;
    state.running = row->outcome == TurnOutcome::running;
    {
      Use q(*this, rdb_.get(), next_pos_, "cannot read a turn");
      q.text(1, turn_id);
      if (q.step()) state.next = static_cast<std::uint64_t>(q.integer(0));
    }
    TurnState& cached = turns_[turn_id] = state;
    if (!state.running) {
      ended_.emplace_back(0, turn_id);
      evict_ended_locked();
    }
    return &cached;
  }

  // A turn in the file (committed; those of this process are in turns_).
  bool turn_in_file(const std::string& turn_id) {
    std::lock_guard<std::mutex> read(read_mu_);
    Use q(*this, rdb_.get(), turn_by_id_, "cannot read a turn");
    q.text(1, turn_id);
    return q.step();
  }

  // Ended turns leave memory once their end is committed and more than
  // kSqliteEndedCached have ended since (append() and end_turn() then read
  // them from the file).
  void evict_ended_locked() {
    while (ended_.size() > kSqliteEndedCached && ended_.front().first <= committed_seq_) {
      const auto it = turns_.find(ended_.front().second);
      if (it != turns_.end() && !it->second.running) turns_.erase(it);
      ended_.pop_front();
    }
  }

  // The last `max_turns` turns of the dialog in order, with their events or
  // without, in one read transaction after what was queued is committed.
  std::vector<TurnRecord> read_turns(const std::string& dialog_id, std::size_t max_turns,
                                     bool with_events) {
    std::vector<TurnRecord> out;
    {
      std::unique_lock<std::mutex> lock(mu_);
      if (max_turns == 0 || dialogs_.count(dialog_id) == 0) return out;
      wait_committed_locked(lock, queued_seq_);
    }
    std::lock_guard<std::mutex> read(read_mu_);
    ReadSnapshot snapshot(*this);
    const auto limit = static_cast<sqlite3_int64>(
        std::min<std::uint64_t>(max_turns, static_cast<std::uint64_t>(INT64_MAX)));
    {
      Use q(*this, rdb_.get(), turns_of_dialog_, "cannot read turns");
      q.text(1, dialog_id);
      q.int64(2, limit);
      while (q.step()) out.push_back(q.turn_row());
    }
    std::reverse(out.begin(), out.end());
    if (with_events) {
      for (TurnRecord& t : out) read_events(t);
    }
    return out;
  }

  void read_events(TurnRecord& t) {
    Use q(*this, rdb_.get(), events_of_turn_, "cannot read a turn's events");
    q.text(1, t.turn_id);
    while (q.step()) {
      const std::string text = q.column(0);
      nlohmann::json e = nlohmann::json::parse(text, nullptr, false);
      if (e.is_discarded()) {
        throw StoreError(path_ + ": read a turn's events: an event is not JSON (turn " + t.turn_id +
                         ")");
      }
      t.events.push_back(std::move(e));
    }
  }

  // ---- The writer -----------------------------------------------------------

  std::uint64_t enqueue_locked(Op op) {
    if (queue_.empty()) first_queued_ = Clock::now();
    queue_.push_back(std::move(op));
    if (queue_.size() == 1 || queue_.size() >= kSqliteMaxBatch) writer_cv_.notify_one();
    return ++queued_seq_;
  }

  void throw_failure_locked() {
    if (failure_.empty()) return;
    std::string message;
    message.swap(failure_);
    throw StoreError(message);
  }

  // Until everything queued up to `seq` is committed (or failed: the
  // failure is kept for the next write call or sync()).
  void wait_committed_locked(std::unique_lock<std::mutex>& lock, std::uint64_t seq) {
    if (committed_seq_ >= seq) return;
    wanted_seq_ = std::max(wanted_seq_, seq);
    writer_cv_.notify_one();
    done_cv_.wait(lock, [&] { return committed_seq_ >= seq; });
  }

  void writer_loop() {
    name_thread("as-sqlite");
    std::unique_lock<std::mutex> lock(mu_);
    std::vector<Op> batch;
    for (;;) {
      writer_cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) break;  // stopping, everything committed
      writer_cv_.wait_until(lock, first_queued_ + kSqliteLinger, [&] {
        return stop_ || wanted_seq_ > committed_seq_ || queue_.size() >= kSqliteMaxBatch;
      });
      batch.swap(queue_);
      const std::uint64_t upto = queued_seq_;
      lock.unlock();
      std::string error = commit(batch);
      batch.clear();
      lock.lock();
      committed_seq_ = upto;
      if (!error.empty()) failure_ = std::move(error);
      evict_ended_locked();
      done_cv_.notify_all();
    }
  }

  // One transaction for the whole batch. Never throws: a failure is rolled
  // back and returned.
  std::string commit(const std::vector<Op>& batch) noexcept {
    sqlite3* db = wdb_.get();
    try {
      exec(db, "BEGIN IMMEDIATE", "cannot begin a transaction");
      std::unordered_map<std::string, std::string> touched;  // dialog -> newest updated_at
      for (const Op& op : batch) {
        apply(db, op);
        if (!op.touched.empty()) {
          std::string& t = touched[op.touched];
          t = std::max(t, op.touch);
        }
      }
      for (const auto& [id, stamp] : touched) {
        Use q(*this, db, touch_dialog_, "cannot update a dialog");
        q.text(1, id);
        q.text(2, stamp);
        q.run();
      }
      exec(db, "COMMIT", "cannot commit");
      return {};
    } catch (const std::exception& e) {
      if (!sqlite3_get_autocommit(db)) sqlite3_exec(db, "ROLLBACK", nullptr, nullptr, nullptr);
      try {
        return e.what();
      } catch (...) {
        return {};
      }
    } catch (...) {
      if (!sqlite3_get_autocommit(db)) sqlite3_exec(db, "ROLLBACK", nullptr, nullptr, nullptr);
      try {
        return path_ + ": cannot commit";
      } catch (...) {
        return {};
      }
    }
  }

  void apply(sqlite3* db, const Op& op) {
    switch (op.kind) {
      case OpKind::create: {
        Use q(*this, db, insert_dialog_, "cannot store a dialog");
        q.text(1, op.a);
        q.text(2, op.opt);
        q.text(3, op.stamp);
        q.run();
        return;
      }
      case OpKind::rename: {
        Use q(*this, db, rename_dialog_, "cannot rename a dialog");
        q.text(1, op.a);
        q.text(2, op.b);
        q.run();
        return;
      }
      case OpKind::remove: {
        for (const Stmt* s : {&delete_events_, &delete_turns_, &delete_dialog_}) {
          Use q(*this, db, *s, "cannot delete a dialog");
          q.text(1, op.a);
          q.run();
        }
        return;
      }
      case OpKind::current: {
        Use q(*this, db, set_current_, "cannot store the current dialog");
        q.text(1, op.opt);
        q.run();
        return;
      }
      case OpKind::begin: {
        {
          Use q(*this, db, insert_turn_, "cannot store a turn");
          q.text(1, op.a);
          q.text(2, op.b);
          q.int64(3, static_cast<sqlite3_int64>(op.n));
          q.text(4, op.stamp);
          q.run();
        }
        insert_events(db, op.a, 0, op.events);
        return;
      }
      case OpKind::events: insert_events(db, op.a, op.n, op.events); return;
      case OpKind::end: {
        const std::string outcome = turn_outcome_name(static_cast<TurnOutcome>(op.n));
        Use q(*this, db, end_turn_, "cannot store a turn's outcome");
        q.text(1, op.a);
        q.text(2, outcome);
        q.text(3, op.b);
        q.text(4, op.stamp);
        q.run();
        return;
      }
    }
  }

  void insert_events(sqlite3* db, const std::string& turn_id, std::uint64_t first,
                     const std::vector<std::string>& events) {
    for (std::size_t i = 0; i < events.size(); ++i) {
      Use q(*this, db, insert_event_, "cannot store an event");
      q.text(1, turn_id);
      q.int64(2, static_cast<sqlite3_int64>(first + i));
      q.text(3, events[i]);
      q.run();
    }
  }

  const std::string path_;
  // The connections first, so that they close after the statements.
  Db wdb_;  // the writer's (and the constructor's)
  Db rdb_;  // reads, under read_mu_
  Stmt insert_dialog_, rename_dialog_, touch_dialog_, delete_events_, delete_turns_, delete_dialog_,
      set_current_, insert_turn_, insert_event_, end_turn_;
  Stmt turns_of_dialog_, turn_by_id_, events_of_turn_, next_pos_;
  std::mutex read_mu_;  // after mu_ when both are held

  std::mutex mu_;
  std::unordered_map<std::string, DialogInfo> dialogs_;
  std::set<std::pair<std::string, std::string>> by_updated_;  // (updated_at, id), oldest first
  std::optional<std::string> current_;
  std::unordered_map<std::string, TurnState> turns_;
  std::deque<std::pair<std::uint64_t, std::string>> ended_;  // (seq of the end, turn id)
  std::uint64_t next_seq_ = 1;
  Stamp last_stamp_{};

  std::vector<Op> queue_;
  Clock::time_point first_queued_{};
  std::uint64_t queued_seq_ = 0, committed_seq_ = 0, wanted_seq_ = 0;
  std::string failure_;  // a failed commit, not yet reported
  bool stop_ = false;
  std::condition_variable writer_cv_, done_cv_;
  std::thread writer_;
};

}  // namespace detail

inline std::shared_ptr<DialogStore> sqlite_store(const std::string& path) {
  return std::make_shared<detail::SqliteDialogStore>(path);
}

}  // namespace agentsmithy
#endif
// ---- include/agentsmithy/dialogs/history.hpp
namespace agentsmithy {
namespace detail {

// ===========================================================================
// Dialogs and history as AgentSmithy's REST API shows them
// ===========================================================================

inline constexpr long long kDefaultHistoryLimit = 20;

// {"id","title" (null until named),"created_at","updated_at"}
inline json dialog_json(const DialogInfo& dialog) {
  return json{{"id", dialog.id},
              {"title", dialog.title ? json(*dialog.title) : json(nullptr)},
              {"created_at", dialog.created_at},
              {"updated_at", dialog.updated_at}};
}

// GET /api/dialogs: {"current_dialog_id": id or null, "dialogs": [...]}, in
// the order given (the store's: updated_at, newest first).
inline json dialog_list_json(const std::vector<DialogInfo>& dialogs,
                             const std::optional<std::string>& current) {
  json list = json::array();
  for (const auto& d : dialogs) list.push_back(dialog_json(d));
  return json{{"current_dialog_id", current ? json(*current) : json(nullptr)},
              {"dialogs", std::move(list)}};
}

// One visible message (a user message, or an assistant text that is not
// blank) with the events that go with it; events[visible] gets the idx.
struct HistoryUnit {
  std::vector<json> events;
  std::size_t visible = 0;
};

inline const std::string& history_text(const json& event) {
  static const std::string empty;
  if (!event.is_object()) return empty;
  const auto it = event.find("content");
  return it != event.end() && it->is_string() ? it->get_ref<const std::string&>() : empty;
}

inline std::size_t units_bytes(const std::vector<HistoryUnit>& units) {
  std::size_t bytes = 64;
  for (const HistoryUnit& u : units) {
    for (const json& e : u.events) bytes += history_text(e).size() + 128;
  }
  return bytes;
}

inline std::string history_type(const json& event) {
  if (!event.is_object()) return {};
  const auto it = event.find("type");
  return it != event.end() && it->is_string() ? it->get<std::string>() : std::string();
}

// What one turn shows in the history: its units and how many events beyond
// the visible messages (reasoning blocks, tool calls, file edits) they hold.
struct TurnUnits {
  std::vector<HistoryUnit> units;
  std::size_t extras = 0;
  std::size_t bytes = 0;  // about what it takes in memory (HistoryCache's bound)
};

// A turn's units: [user, ...] and, when the assistant's text is not blank,
// [reasoning..., chat, tool_call/file_edit...]; with a blank text the
// reasoning, tool_call and file_edit events join the user's unit.
inline TurnUnits turn_units(const TurnRecord& turn) {
  TurnUnits out;
  std::vector<HistoryUnit>& units = out.units;
  if (turn.events.empty()) return out;
  const json& stored_user = turn.events[0];
  json user{{"type", "user"}, {"content", history_text(stored_user)}};
  if (stored_user.is_object()) {
    for (const char* key : {"checkpoint", "session"}) {
      const auto it = stored_user.find(key);
      if (it != stored_user.end() && !it->is_null()) user[key] = *it;
    }
  }

  std::string text;
  std::vector<json> reasoning, after;
  bool in_reasoning = false;
  std::string thought;
  json model_name;
  const auto close_reasoning = [&] {
    if (in_reasoning && !thought.empty()) {
      json block{{"type", "reasoning"}, {"content", thought}};
      if (model_name.is_string()) block["model_name"] = model_name;
      reasoning.push_back(std::move(block));
    }
    in_reasoning = false;
    thought.clear();
    model_name = nullptr;
  };
  for (std::size_t i = 1; i < turn.events.size(); ++i) {
    const json& event = turn.events[i];
    const std::string type = history_type(event);
    if (type == "reasoning_start" || type == "reasoning") {
      if (type == "reasoning_start") close_reasoning();
      in_reasoning = true;
      thought += history_text(event);
      const auto name = event.find("model_name");
      if (name != event.end() && name->is_string()) model_name = *name;
      continue;
    }
    close_reasoning();  // reasoning_end, or any other event, ends a block
    if (type == "chat") {
      text += history_text(event);
    } else if (type == "tool_call" || type == "file_edit") {
      json copy = event;
      copy.erase("dialog_id");
      after.push_back(std::move(copy));
    }
  }
  close_reasoning();
  out.extras = reasoning.size() + after.size();

  HistoryUnit user_unit;
  user_unit.events.push_back(std::move(user));
  const bool chat_visible = std::any_of(text.begin(), text.end(), [](char c) {
    return !std::isspace(static_cast<unsigned char>(c));
  });
  if (!chat_visible) {
    for (auto& e : reasoning) user_unit.events.push_back(std::move(e));
    for (auto& e : after) user_unit.events.push_back(std::move(e));
    units.push_back(std::move(user_unit));
    out.bytes = units_bytes(units);
    return out;
  }
  units.push_back(std::move(user_unit));

  HistoryUnit chat_unit;
  for (auto& e : reasoning) chat_unit.events.push_back(std::move(e));
  json chat{{"type", "chat"}, {"content", std::move(text)}};
  if (turn.outcome != TurnOutcome::completed) {
    chat["outcome"] = turn_outcome_name(turn.outcome);
    if (turn.outcome == TurnOutcome::error && !turn.error_code.empty()) {
      chat["outcome_code"] = turn.error_code;
    }
  }
  chat_unit.visible = chat_unit.events.size();
  chat_unit.events.push_back(std::move(chat));
  for (auto& e : after) chat_unit.events.push_back(std::move(e));
  units.push_back(std::move(chat_unit));
  out.bytes = units_bytes(units);
  return out;
}

// GET /api/dialogs/{id}/history: AgentSmithy's page of the dialog's visible
// messages (user and non-blank assistant texts), `limit` of them (default
// 20) before the exclusive cursor `before` (clamped to their count), or the
// last ones. Callers reject a limit below 1 and a negative before.
inline json history_page_of(const std::string& dialog_id,
                            const std::vector<std::shared_ptr<const TurnUnits>>& turns,
                            std::optional<long long> limit, std::optional<long long> before) {
  std::size_t n = 0, extras = 0;
  for (const auto& t : turns) {
    n += t->units.size();
    extras += t->extras;
  }
  const std::size_t l =
      static_cast<std::size_t>(std::max(0LL, limit.value_or(kDefaultHistoryLimit)));
  std::size_t end = n;
  if (before) end = std::min(n, static_cast<std::size_t>(std::max(0LL, *before)));
  const std::size_t start = end > l ? end - l : 0;

  json events = json::array();
  std::size_t u = 0;  // the idx of the turn's first unit
  for (const auto& t : turns) {
    for (const HistoryUnit& unit : t->units) {
      if (u >= start && u < end) {
        for (std::size_t i = 0; i < unit.events.size(); ++i) {
          events.push_back(unit.events[i]);
          if (i == unit.visible) events.back()["idx"] = u;
        }
      }
      ++u;
    }
  }
  const bool empty = start == end;
  return json{{"dialog_id", dialog_id},         {"events", std::move(events)},
              {"total_events", n + extras},     {"has_more", start > 0},
              {"first_idx", empty ? 0 : start}, {"last_idx", empty ? 0 : end - 1}};
}

inline json history_page(const std::string& dialog_id, const std::vector<TurnRecord>& turns,
                         std::optional<long long> limit, std::optional<long long> before) {
  std::vector<std::shared_ptr<const TurnUnits>> units;
  units.reserve(turns.size());
  for (const auto& turn : turns) units.push_back(std::make_shared<TurnUnits>(turn_units(turn)));
  return history_page_of(dialog_id, units, limit, before);
}

// The history of long dialogs without reading every turn's events on every
// page: each ended turn's units are computed once (an ended turn's log never
// changes, and turn ids are never reused) and kept, the least recently used
// dropped past `max_bytes`. A page then reads the dialog's turn headers and
// the events of the turns not seen ended (usually the last one or none).
class HistoryCache {
 public:
  explicit HistoryCache(std::size_t max_bytes = 32u << 20) : max_bytes_(max_bytes) {}

  json page(DialogStore& store, const std::string& dialog_id, std::optional<long long> limit,
            std::optional<long long> before) {
    const std::vector<TurnRecord> headers =
        store.turn_headers(dialog_id, static_cast<std::size_t>(-1));
    std::vector<std::shared_ptr<const TurnUnits>> turns(headers.size());
    std::size_t first_missing = headers.size();
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (std::size_t i = 0; i < headers.size(); ++i) {
        if (headers[i].outcome != TurnOutcome::running) turns[i] = find_locked(headers[i].turn_id);
        if (!turns[i] && first_missing == headers.size()) first_missing = i;
      }
    }
    if (first_missing < headers.size()) {
      // One read for the tail from the first turn not at hand; a turn that
      // began in between is not on this page, one deleted in between is
      // left out.
      std::unordered_map<std::string, TurnRecord> read;
      for (TurnRecord& t : store.turns(dialog_id, headers.size() - first_missing)) {
        read.emplace(t.turn_id, std::move(t));
      }
      for (std::size_t i = first_missing; i < headers.size(); ++i) {
        if (turns[i]) continue;
        auto it = read.find(headers[i].turn_id);
        std::optional<TurnRecord> record;
        if (it != read.end()) {
          record = std::move(it->second);
        } else {
          record = store.turn(headers[i].turn_id);
        }
        if (!record) continue;
        auto units = std::make_shared<const TurnUnits>(turn_units(*record));
        if (record->outcome != TurnOutcome::running) keep(record->turn_id, units);
        turns[i] = std::move(units);
      }
      turns.erase(std::remove(turns.begin(), turns.end(), nullptr), turns.end());
    }
    return history_page_of(dialog_id, turns, limit, before);
  }

  std::size_t bytes() const {
    std::lock_guard<std::mutex> lock(mu_);
    return bytes_;
  }

 private:
  using Lru = std::list<std::pair<std::string, std::shared_ptr<const TurnUnits>>>;

  std::shared_ptr<const TurnUnits> find_locked(const std::string& turn_id) {
    const auto it = index_.find(turn_id);
    if (it == index_.end()) return nullptr;
    lru_.splice(lru_.begin(), lru_, it->second);
    return it->second->second;
  }

  void keep(const std::string& turn_id, const std::shared_ptr<const TurnUnits>& units) {
    std::lock_guard<std::mutex> lock(mu_);
    if (index_.count(turn_id) != 0 || units->bytes > max_bytes_) return;
    lru_.emplace_front(turn_id, units);
    index_[turn_id] = lru_.begin();
    bytes_ += units->bytes;
    while (bytes_ > max_bytes_ && !lru_.empty()) {
      bytes_ -= lru_.back().second->bytes;
      index_.erase(lru_.back().first);
      lru_.pop_back();
    }
  }

  const std::size_t max_bytes_;
  mutable std::mutex mu_;
  Lru lru_;  // most recently used first
  std::unordered_map<std::string, Lru::iterator> index_;
  std::size_t bytes_ = 0;
};

}  // namespace detail
}  // namespace agentsmithy
// ---- include/agentsmithy/dialogs/turn_log.hpp
namespace agentsmithy {
namespace detail {

// ===========================================================================
// Turn log: what a stream's client is sent, recorded in the dialog store
// ===========================================================================

// The message a client gets (a turn, the dialogs API) when the store cannot be read: no detail
// of the store's (a path, a host) reaches a client.
inline constexpr std::string_view kStoreUnavailable = "The dialog store is unavailable";

// The store's health as /health (store_ok) and /metrics
// (agentsmithy_store_errors_total) show it. A failure is logged at most once
// a minute; the server keeps serving.
class StoreHealth {
 public:
  explicit StoreHealth(std::function<void(const std::string&)> warn) : warn_(std::move(warn)) {}

  void failed(const std::string& what, const std::exception& e) {
    ok_ = false;
    errors_.fetch_add(1, std::memory_order_relaxed);
    const auto now = Clock::now().time_since_epoch().count();
    auto last = last_log_.load();
    const auto minute =
        std::chrono::duration_cast<Clock::duration>(std::chrono::minutes(1)).count();
    if ((last == 0 || now - last >= minute) && last_log_.compare_exchange_strong(last, now)) {
      warn_("dialog store: " + what + " failed: " + e.what() +
            " (streams go on; logged at most once a minute)");
    }
  }
  void succeeded() {
    if (!ok_.load(std::memory_order_relaxed)) ok_ = true;
  }
  bool ok() const { return ok_.load(); }
  std::uint64_t errors() const { return errors_.load(); }

 private:
  const std::function<void(const std::string&)> warn_;
  std::atomic<bool> ok_{true};
  std::atomic<std::uint64_t> errors_{0};
  std::atomic<Clock::rep> last_log_{0};
};

// One turn's recording. The hub calls it under the turn's channel lock, so
// the log has the client's events in the client's order: an event is
// recorded before its bytes are queued, and the outcome (with a sync) before
// `done` is. A store failure is counted and the stream goes on unrecorded.
class TurnLog {
 public:
  TurnLog(std::shared_ptr<DialogStore> store, StoreHealth& health, std::string dialog_id,
          std::string turn_id)
      : store_(std::move(store)),
        health_(health),
        dialog_id_(std::move(dialog_id)),
        turn_id_(std::move(turn_id)) {}

  const std::string& turn_id() const { return turn_id_; }
  const std::shared_ptr<DialogStore>& store() const { return store_; }
  bool ended() const { return ended_; }

  // Position 0: the user's message. False (and nothing more is recorded)
  // when the store fails.
  bool begin(const std::string& user_text) {
    return attempt("begin_turn", [&] {
      store_->begin_turn(dialog_id_, turn_id_, json{{"type", "user"}, {"content", user_text}});
    });
  }

  // The producer's events, as sent (without dialog_id), done excluded.
  void record(const json* events, std::size_t count) {
    if (ended_ || broken_ || count == 0) return;
    std::vector<json> batch;
    batch.reserve(count);
    for (std::size_t i = 0; i < count; ++i) {
      const auto type = events[i].find("type");
      if (type != events[i].end() && *type == "done") continue;
      json e = events[i];
      e.erase("dialog_id");
      batch.push_back(std::move(e));
    }
    if (batch.empty()) return;
    const std::uint64_t first = next_;
    next_ += batch.size();
    attempt("append", [&] { store_->append(turn_id_, first, batch); });
  }

  // The outcome, once. `sync`: durable before returning (before `done` is
  // queued for the client).
  void end(TurnOutcome outcome, const std::string& code, bool sync) {
    if (ended_) return;
    ended_ = true;
    if (broken_) return;
    attempt("end_turn", [&] {
      store_->end_turn(turn_id_, outcome, code);
      if (sync) store_->sync();
    });
  }
  void sync() {
    if (!broken_) attempt("sync", [&] { store_->sync(); });
  }

 private:
  template <class F>
  bool attempt(const char* what, F&& f) {
    try {
      f();
      health_.succeeded();
      return true;
    } catch (const std::exception& e) {
      broken_ = true;
      health_.failed(std::string(what) + " for dialog " + dialog_id_, e);
      return false;
    }
  }

  const std::shared_ptr<DialogStore> store_;
  StoreHealth& health_;
  const std::string dialog_id_, turn_id_;
  std::uint64_t next_ = 1;  // 0 is the user's message
  bool ended_ = false;
  bool broken_ = false;  // the store failed: the rest of the turn is not recorded
};

// The outcome an error event gives its turn: its code.
inline std::string error_code_of(const json& event) {
  const auto code = event.find("code");
  return code != event.end() && code->is_string() ? code->get<std::string>() : std::string();
}

// ---------------------------------------------------------------------------
// Memory: a dialog's earlier turns as the model's input
// ---------------------------------------------------------------------------

// The bound on what memory prepends to a request: the last kMemoryTurns
// turns, and of those only the newest that fit in kMemoryBytes of text.
inline constexpr std::size_t kMemoryTurns = 50;
inline constexpr std::size_t kMemoryBytes = 256 * 1024;

// The user and assistant texts of `turns`, in order: the user's message,
// then the assistant's chat text (a cut answer as the user saw it) when any.
inline std::vector<Message> memory_messages(const std::vector<TurnRecord>& turns) {
  std::vector<std::vector<Message>> per_turn;
  for (const TurnRecord& t : turns) {
    std::vector<Message> messages;
    std::string assistant;
    for (const json& e : t.events) {
      const auto type = e.find("type");
      const auto content = e.find("content");
      if (type == e.end() || content == e.end() || !content->is_string()) continue;
      if (*type == "user") {
        messages.push_back(Message{"user", content->get<std::string>()});
      } else if (*type == "chat") {
        assistant += content->get_ref<const std::string&>();
      }
    }
    if (!assistant.empty()) messages.push_back(Message{"assistant", std::move(assistant)});
    per_turn.push_back(std::move(messages));
  }
  // The newest turns that fit.
  std::size_t bytes = 0, first = per_turn.size();
  while (first > 0) {
    std::size_t size = 0;
    for (const Message& m : per_turn[first - 1]) size += m.content.size();
    if (bytes + size > kMemoryBytes) break;
    bytes += size;
    --first;
  }
  std::vector<Message> out;
  for (std::size_t i = first; i < per_turn.size(); ++i) {
    for (Message& m : per_turn[i]) out.push_back(std::move(m));
  }
  return out;
}

}  // namespace detail
}  // namespace agentsmithy
// ---- include/agentsmithy/http/dialogs_api.hpp
namespace agentsmithy {
namespace detail {

// ===========================================================================
// AgentSmithy's dialogs REST API (/api/dialogs...)
// ===========================================================================

// There is always a current dialog (AgentSmithy's clients need one): the
// current one if it still exists, else the most recently updated, else a new
// one. The caller holds Core::current_dialog_mu.
inline std::string ensure_current_dialog(DialogStore& store) {
  if (const auto current = store.current_dialog(); current && store.find_dialog(*current)) {
    return *current;
  }
  const auto dialogs = store.list_dialogs();
  const std::string id =
      dialogs.empty() ? store.create_dialog(new_dialog_id(), std::nullopt).id : dialogs[0].id;
  store.set_current_dialog(id);
  return id;
}

// One handler per route; the front end registers them (the /current routes
// before the {id} ones, whose id is req.matches[1]) and applies the Host
// guard, auth, CORS and drain rules. Every answer is JSON; a StoreError
// becomes 503 "store_unavailable".
class DialogsApi {
 public:
  static constexpr std::size_t kMaxTitleBytes = 1024;

  // `current_mu`: held while the current dialog is read and maybe created,
  // shared with the chat route (Core::current_dialog_mu); `health`: where a
  // store failure is counted and logged.
  DialogsApi(std::shared_ptr<DialogStore> store, std::mutex& current_mu, StoreHealth& health)
      : store_(std::move(store)), current_mu_(current_mu), health_(health) {}

  // Makes sure a current dialog exists: the current one if it still exists,
  // else the most recently updated dialog, else a new one.
  void ensure_current_dialog() { (void)current_id(); }

  // GET /api/dialogs
  void list_dialogs(const httplib::Request&, httplib::Response& res) {
    guarded(res, [&] {
      const std::string current = current_id();
      reply(res, 200, dialog_list_json(store_->list_dialogs(), current));
    });
  }

  // POST /api/dialogs, body {} or {"title": ..., "set_current": bool}
  void create_dialog(const httplib::Request& req, httplib::Response& res) {
    guarded(res, [&] {
      json body = json::object();
      if (!req.body.empty() && !parse_body(req.body, body, res)) return;
      std::optional<std::string> title;
      if (const auto it = body.find("title"); it != body.end() && !it->is_null()) {
        std::string error;
        title = valid_title(*it, error);
        if (!title) return fail(res, 422, error);
      }
      bool set_current = true;
      if (const auto it = body.find("set_current"); it != body.end()) {
        if (!it->is_boolean()) return fail(res, 422, "set_current: must be a boolean");
        set_current = it->get<bool>();
      }
      std::string id = new_dialog_id();
      while (store_->find_dialog(id)) id = new_dialog_id();
      const DialogInfo dialog = store_->create_dialog(id, title);
      if (set_current) {
        std::lock_guard<std::mutex> lock(current_mu_);
        store_->set_current_dialog(dialog.id);
      }
      reply(res, 200, dialog_json(dialog));
    });
  }

  // GET /api/dialogs/current: {"id": ..., "meta": {the dialog}}
  void get_current(const httplib::Request&, httplib::Response& res) {
    guarded(res, [&] {
      const std::string id = current_id();
      const auto dialog = store_->find_dialog(id);
      json body{{"id", id}};
      if (dialog) body["meta"] = dialog_json(*dialog);
      reply(res, 200, body);
    });
  }

  // PATCH /api/dialogs/current?id=ID
  void set_current(const httplib::Request& req, httplib::Response& res) {
    guarded(res, [&] {
      if (!req.has_param("id")) return fail(res, 422, "id: query parameter required");
      const std::string id = req.get_param_value("id");
      if (!valid_dialog_id(id)) return fail(res, 422, kBadId);
      std::lock_guard<std::mutex> lock(current_mu_);
      if (!store_->find_dialog(id)) return not_found(res, id);
      try {
        store_->set_current_dialog(id);
      } catch (const std::invalid_argument&) {  // deleted meanwhile
        return not_found(res, id);
      }
      reply(res, 200, json{{"ok", true}, {"id", id}});
    });
  }

  // GET /api/dialogs/{id}
  void get_dialog(const httplib::Request& req, httplib::Response& res) {
    guarded(res, [&] {
      const std::string id = path_id(req);
      if (!valid_dialog_id(id)) return fail(res, 422, kBadId);
      const auto dialog = store_->find_dialog(id);
      if (!dialog) return not_found(res, id);
      reply(res, 200, dialog_json(*dialog));
    });
  }

  // PATCH /api/dialogs/{id}, body {"title": "..."}: answers the dialog.
  void patch_dialog(const httplib::Request& req, httplib::Response& res) {
    guarded(res, [&] {
      const std::string id = path_id(req);
      if (!valid_dialog_id(id)) return fail(res, 422, kBadId);
      json body;
      if (!parse_body(req.body, body, res)) return;
      const auto it = body.find("title");
      if (it == body.end()) return fail(res, 422, "title: field required");
      std::string error;
      const auto title = valid_title(*it, error);
      if (!title) return fail(res, 422, error);
      const auto dialog = store_->rename_dialog(id, *title);
      if (!dialog) return not_found(res, id);
      reply(res, 200, dialog_json(*dialog));
    });
  }

  // DELETE /api/dialogs/{id}: {"ok": true, "current_dialog_id": ...}; a
  // deleted current dialog is replaced by the most recent one, or a new one.
  void delete_dialog(const httplib::Request& req, httplib::Response& res) {
    guarded(res, [&] {
      const std::string id = path_id(req);
      if (!valid_dialog_id(id)) return fail(res, 422, kBadId);
      if (!store_->delete_dialog(id)) return not_found(res, id);
      const std::string current = current_id();
      reply(res, 200, json{{"ok", true}, {"current_dialog_id", current}});
    });
  }

  // GET /api/dialogs/{id}/history?limit=L&before=B
  void history(const httplib::Request& req, httplib::Response& res) {
    guarded(res, [&] {
      const std::string id = path_id(req);
      if (!valid_dialog_id(id)) return fail(res, 422, kBadId);
      std::optional<long long> limit, before;
      if (req.has_param("limit")) {
        limit = parse_integer(req.get_param_value("limit"));
        if (!limit || *limit < 1) return fail(res, 422, "limit: must be a positive integer");
      }
      if (req.has_param("before")) {
        before = parse_integer(req.get_param_value("before"));
        if (!before || *before < 0) {
          return fail(res, 422, "before: must be a non-negative integer");
        }
      }
      if (!store_->find_dialog(id)) return not_found(res, id);
      reply(res, 200, history_.page(*store_, id, limit, before));
    });
  }

  // GET /api/dialogs/{id}/session: no checkpoints here, so nothing to approve.
  void session(const httplib::Request& req, httplib::Response& res) {
    guarded(res, [&] {
      const std::string id = path_id(req);
      if (!valid_dialog_id(id)) return fail(res, 422, kBadId);
      if (!store_->find_dialog(id)) return not_found(res, id);
      reply(res, 200, json{{"has_unapproved", false}, {"changed_files", json::array()}});
    });
  }

 private:
  static constexpr const char* kBadId = "id: must be 1 to 128 characters of [A-Za-z0-9_-]";

  // The current dialog's id, made to exist (see ensure_current_dialog).
  std::string current_id() {
    std::lock_guard<std::mutex> lock(current_mu_);
    return detail::ensure_current_dialog(*store_);
  }

  // A store failure is logged (at most once a minute) and counted, and the
  // client gets 503 store_unavailable with nothing of the store's message.
  template <typename F>
  void guarded(httplib::Response& res, F&& handler) {
    try {
      handler();
      health_.succeeded();
    } catch (const StoreError& e) {
      health_.failed("the dialogs API", e);
      res.status = 503;
      res.set_header("Retry-After", kRetryAfterSeconds);
      res.set_content(error_body(kStoreUnavailable, "store_unavailable"), "application/json");
    }
  }

  static void reply(httplib::Response& res, int status, const json& body) {
    res.status = status;
    res.set_content(dump_json(body), "application/json");
  }

  static void fail(httplib::Response& res, int status, const std::string& message) {
    res.status = status;
    res.set_content(error_body(message), "application/json");
  }

  static void not_found(httplib::Response& res, const std::string& id) {
    fail(res, 404, "Dialog not found: " + id);
  }

  static std::string path_id(const httplib::Request& req) {
    return req.matches.size() > 1 ? req.matches[1].str() : std::string();
  }

  // A JSON object body, or false after answering 400/422.
  static bool parse_body(const std::string& text, json& out, httplib::Response& res) {
    if (json_nesting_depth(text) > kMaxJsonDepth) {
      fail(res, 400,
           "Invalid JSON: nested deeper than " + std::to_string(kMaxJsonDepth) + " levels");
      return false;
    }
    if (text.find('\0') != std::string::npos) {
      fail(res, 400, "Invalid JSON: the body contains a NUL byte");
      return false;
    }
    try {
      out = json::parse(text);
    } catch (const json::exception& e) {
      fail(res, 400, std::string("Invalid JSON: ") + e.what());
      return false;
    }
    if (!out.is_object()) {
      fail(res, 422, "body: must be a JSON object");
      return false;
    }
    return true;
  }

  // A title trimmed of surrounding whitespace, non-empty, at most
  // kMaxTitleBytes; or nullopt with `error` naming the problem.
  static std::optional<std::string> valid_title(const json& value, std::string& error) {
    if (!value.is_string()) {
      error = "title: must be a string";
      return std::nullopt;
    }
    const std::string& raw = value.get_ref<const std::string&>();
    const auto space = [](char c) { return std::isspace(static_cast<unsigned char>(c)) != 0; };
    const auto first = std::find_if_not(raw.begin(), raw.end(), space);
    const auto last = std::find_if_not(raw.rbegin(), raw.rend(), space).base();
    if (first >= last) {
      error = "title: must not be empty";
      return std::nullopt;
    }
    if (static_cast<std::size_t>(last - first) > kMaxTitleBytes) {
      error = "title: longer than " + std::to_string(kMaxTitleBytes) + " bytes";
      return std::nullopt;
    }
    return std::string(first, last);
  }

  // A decimal integer (optional leading '-') that fits a long long.
  static std::optional<long long> parse_integer(const std::string& text) {
    const std::size_t digits = !text.empty() && text[0] == '-' ? 1 : 0;
    if (digits == text.size()) return std::nullopt;
    for (std::size_t j = digits; j < text.size(); ++j) {
      if (text[j] < '0' || text[j] > '9') return std::nullopt;
    }
    try {
      return std::stoll(text);
    } catch (const std::out_of_range&) {
      return std::nullopt;
    }
  }

  std::shared_ptr<DialogStore> store_;
  // Serializes the choice of a current dialog, so that two requests never
  // both create a default one.
  std::mutex& current_mu_;
  StoreHealth& health_;
  HistoryCache history_;  // each ended turn's history, computed once
};

}  // namespace detail
}  // namespace agentsmithy

// A chat request's path: its channel and the hub that owns every stream's
// socket; the threads that serve connections and the room where idle ones
// wait; the server's shared state; the HTTP front end on cpp-httplib.
// ---- include/agentsmithy/streams/channel.hpp
namespace agentsmithy {
namespace detail {

// ===========================================================================
// Channels: one per chat request, between its producer and its client
// ===========================================================================

enum class ChannelKind { sse, collect };

// How a stream's events are framed on the wire.
struct StreamFormat {
  bool chunked = true;     // false: HTTP/1.0, the body ends with the connection
  bool event_ids = false;  // the GET route: an `id:` line per event (EventSource)
};

// Everything below `mu` is guarded by it. A channel's socket is written by
// whichever thread has something to say (a producer, the hub thread, the
// shutdown), always under `mu`, so events never interleave and no thread
// waits for another to relay its bytes.
struct Channel {
  Channel(std::uint64_t id_, ChannelKind kind_, int fd_, std::string dialog_id_,
          StreamFormat format_)
      : id(id_), kind(kind_), dialog_id(std::move(dialog_id_)), format(format_), fd(fd_) {}

  const std::uint64_t id;
  const ChannelKind kind;
  const std::string dialog_id;
  const StreamFormat format;
  // Set under `mu`; read without it by cancelled(). True once nothing more
  // can be written: the stream ended or was cancelled.
  std::atomic<bool> cancelled{false};

  std::mutex mu;
  std::condition_variable cv;         // cancellation, the end, and room in `pending`
  int fd;                             // -1 once closed (sse only)
  EventLoop::Watch* watch = nullptr;  // the hub's registration of fd
  std::string pending;                // framed bytes the socket has not taken yet
  std::size_t pending_sent = 0;
  bool ended = false;   // the last event is queued: nothing more is added
  bool closed = false;  // socket closed (sse) or abandoned (collect)
  bool watching_out = false;
  bool ended_by_shutdown = false;
  bool errored = false;  // ended by an error event or a failed producer
  bool producer_spoke = false;
  const Clock::time_point opened = Clock::now();
  Clock::time_point last_write = Clock::now();
  Clock::time_point last_progress = Clock::now();
  std::size_t events = 0;
  std::uint64_t last_event_id = 0;  // format.event_ids
  std::string collected;            // collect: the chat chunks joined
  std::string error;                // collect: the producer's error event
  // The max_streams slot, held until the producer ends the stream (not when
  // it is merely cancelled: the producer may still be running).
  std::shared_ptr<void> hold;
  // on_cancel callbacks; `cancel_due` once a cancellation (not a normal end)
  // happened, `cancel_fired` once they were taken to run.
  std::vector<std::function<void()>> cancel_callbacks;
  // The turn's recording in the dialog store (none: not recorded).
  std::unique_ptr<TurnLog> turn;
  bool cancel_due = false;
  bool cancel_fired = false;

  std::size_t unsent() const { return pending.size() - pending_sent; }

  // One SSE event carrying `json_text`, framed for this stream.
  void frame_locked(std::string& out, std::string_view json_text, int retry_ms = 0) {
    std::string block;
    block.reserve(json_text.size() + 32);
    if (retry_ms > 0) block += "retry: " + std::to_string(retry_ms) + "\n";
    if (format.event_ids) block += "id: " + std::to_string(++last_event_id) + "\n";
    block += "data: ";
    block += json_text;
    block += "\n\n";
    if (format.chunked) {
      append_chunk(out, block);
    } else {
      out += block;
    }
  }

  // How every stream ends: [error,] done, then the terminating chunk. The
  // shutdown's error tells a browser when to come back (`retry:`).
  std::string tail_locked(const std::optional<json>& error, bool shutdown = false) {
    std::string tail;
    if (error) {
      frame_locked(tail, event_text(*error, dialog_id, false),
                   shutdown && format.event_ids ? random_retry_ms() : 0);
    }
    frame_locked(tail, event_text(done_event(), dialog_id, true));
    if (format.chunked) tail.append(kLastChunk);
    return tail;
  }

  // What a stream lets go of when its producer ends it: its slot, and the
  // callbacks that can no longer run (they may hold the writer). Destroyed
  // once `mu` is released.
  struct Leftovers {
    std::shared_ptr<void> hold;
    std::vector<std::function<void()>> callbacks;
  };
  Leftovers end_locked() {
    ended = true;
    cancelled = true;
    cv.notify_all();
    Leftovers left{std::exchange(hold, nullptr), {}};
    if (!cancel_due) left.callbacks.swap(cancel_callbacks);
    return left;
  }
};

}  // namespace detail
}  // namespace agentsmithy
// ---- include/agentsmithy/streams/stream_hub.hpp
namespace agentsmithy {
namespace detail {

// ===========================================================================
// Stream hub: owns every streaming socket once its headers are due
// ===========================================================================

// One epoll thread watches all streams: it notices a client that went away
// (EOF, reset) the moment it happens, finishes writes a slow client could not
// take at once, sends heartbeats and drops stalled clients. Producers write
// directly and only fall back on the hub when a socket is full.
class StreamHub {
 public:
  StreamHub(const Options& options, Metrics& metrics, std::function<void()> on_count_change);
  ~StreamHub();
  StreamHub(const StreamHub&) = delete;
  StreamHub& operator=(const StreamHub&) = delete;

  void start();
  void stop();  // joins the hub thread; call after close_all()

  // Takes ownership of `fd` and queues the stream's response `head`. `hold`
  // is released when the stream ends.
  std::shared_ptr<Channel> open_stream(int fd, const std::string& dialog_id, StreamFormat format,
                                       const std::string& head, std::shared_ptr<void> hold);
  std::shared_ptr<Channel> open_collector(const std::string& dialog_id, std::shared_ptr<void> hold);

  // `events[0..count)` in one write; false once cancelled. `from_producer`:
  // false for what the server itself sends (the user event).
  bool send(Channel& ch, const json* events, std::size_t count, bool from_producer = true);
  bool wait(Channel& ch, std::chrono::milliseconds d);
  // The producer ended the stream (error empty) or failed: `done` follows.
  void finish(Channel& ch, const std::optional<json>& error);
  void on_cancel(Channel& ch, std::function<void()> callback);

  // The drain's first step: every open stream is cancelled (from here on
  // its producer's writes are no-ops). Returns the streams it cancelled, for
  // run_cancel_callbacks() and write_shutdown_tails().
  std::vector<std::shared_ptr<Channel>> cancel_all_for_shutdown();
  // Their on_cancel callbacks, so that producers blocked in a call are let go
  // within milliseconds.
  void run_cancel_callbacks(const std::vector<std::shared_ptr<Channel>>& cancelled);
  // The next: each of them gets error + done + last chunk, written by this one
  // thread, before any producer is woken. Returns how many.
  std::size_t write_shutdown_tails(const std::vector<std::shared_ptr<Channel>>& ending);
  // The grace deadline: closes whatever is left. Returns how many.
  std::size_t close_all();
  // A newer turn of the same dialog started: this one ends with an error
  // (code "superseded") then done, and its producer is cancelled.
  void supersede(Channel& ch);
  std::size_t active() const { return count_.load(); }

 private:
  enum class Flow { open, closed, gone };
  static constexpr std::size_t kMaxUnsent = 1 << 20;  // then send() waits

  std::shared_ptr<Channel> add(std::shared_ptr<Channel> ch, std::string_view head);
  std::uint64_t next_id();
  std::shared_ptr<Channel> find(std::uint64_t id) const;
  std::vector<std::shared_ptr<Channel>> snapshot() const;
  // After a channel's lock is released: drops it from the hub if it closed,
  // and runs its cancel callbacks if a cancellation made them due.
  void settle(Channel& ch, Flow flow);
  void forget(Channel& ch);
  void run_cancel_callbacks(Channel& ch);
  void run();
  void tick();
  void on_socket_event(Channel& ch, std::uint32_t events);

  void append_locked(Channel& ch, std::string_view bytes);
  void record_locked(Channel& ch, const json* events, std::size_t count, bool from_producer);
  void record_shutdown_locked(Channel& ch);
  Flow queue_locked(Channel& ch, std::string_view bytes);
  Flow finish_locked(Channel& ch, const std::optional<json>& error, Channel::Leftovers& left);
  // `wake`: notify whoever waits on the channel if it closes. `close_ended`:
  // close an ended stream once all of it is written (else the caller does).
  Flow flush_locked(Channel& ch, bool wake = true, bool close_ended = true);
  void watch_out_locked(Channel& ch, bool on);
  void cancel_for_shutdown_locked(Channel& ch);
  void end_for_shutdown_locked(Channel& ch);
  void close_locked(Channel& ch, bool wake = true);
  void drop_client_locked(Channel& ch, bool wake = true);

  const Options& options_;
  Metrics& metrics_;
  const std::function<void()> on_count_change_;
  EventLoop loop_;
  std::thread thread_;
  std::atomic<std::size_t> count_{0};
  mutable std::mutex mu_;
  std::unordered_map<std::uint64_t, std::shared_ptr<Channel>> channels_;
  std::uint64_t next_id_ = 1;
  bool shutting_down_ = false;
};

inline StreamHub::StreamHub(const Options& options, Metrics& metrics,
                            std::function<void()> on_count_change)
    : options_(options), metrics_(metrics), on_count_change_(std::move(on_count_change)) {}

inline StreamHub::~StreamHub() { close_all(); }

inline void StreamHub::start() {
  thread_ = std::thread([this] {
    name_thread("as-hub");
    run();
  });
}

inline void StreamHub::stop() {
  if (!thread_.joinable()) return;
  loop_.stop();
  thread_.join();
}

inline std::uint64_t StreamHub::next_id() {
  std::lock_guard<std::mutex> lock(mu_);
  return next_id_++;
}

inline std::shared_ptr<Channel> StreamHub::add(std::shared_ptr<Channel> ch, std::string_view head) {
  if (ch->kind == ChannelKind::sse) {
    // Before the channel is shared: once it is, only `mu` guards the fd.
    ch->watch = loop_.watch(ch->fd, EPOLLIN | EPOLLRDHUP,
                            [this, weak = std::weak_ptr<Channel>(ch)](std::uint32_t events) {
                              if (const auto live = weak.lock()) on_socket_event(*live, events);
                            });
  }
  bool late = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    channels_.emplace(ch->id, ch);
    late = shutting_down_;
  }
  ++count_;
  Flow flow = Flow::open;
  {
    std::lock_guard<std::mutex> lock(ch->mu);
    if (ch->kind == ChannelKind::sse) flow = queue_locked(*ch, head);
    // Admitted just as the shutdown began: end it like the others.
    if (late && flow == Flow::open && !ch->ended) {
      end_for_shutdown_locked(*ch);
      ch->cv.notify_all();
      if (!ch->closed && ch->kind == ChannelKind::sse) flow = flush_locked(*ch);
    }
  }
  settle(*ch, flow);
  return ch;
}

inline std::shared_ptr<Channel> StreamHub::open_stream(int fd, const std::string& dialog_id,
                                                       StreamFormat format, const std::string& head,
                                                       std::shared_ptr<void> hold) {
  auto ch = std::make_shared<Channel>(next_id(), ChannelKind::sse, fd, dialog_id, format);
  ch->hold = std::move(hold);
  return add(std::move(ch), head);
}

inline std::shared_ptr<Channel> StreamHub::open_collector(const std::string& dialog_id,
                                                          std::shared_ptr<void> hold) {
  auto ch =
      std::make_shared<Channel>(next_id(), ChannelKind::collect, -1, dialog_id, StreamFormat{});
  ch->hold = std::move(hold);
  return add(std::move(ch), {});
}

inline std::shared_ptr<Channel> StreamHub::find(std::uint64_t id) const {
  std::lock_guard<std::mutex> lock(mu_);
  const auto it = channels_.find(id);
  return it == channels_.end() ? nullptr : it->second;
}

inline std::vector<std::shared_ptr<Channel>> StreamHub::snapshot() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::shared_ptr<Channel>> all;
  all.reserve(channels_.size());
  for (const auto& entry : channels_) all.push_back(entry.second);
  return all;
}

inline void StreamHub::settle(Channel& ch, Flow flow) {
  if (flow != Flow::open) forget(ch);
  run_cancel_callbacks(ch);
}

inline void StreamHub::forget(Channel& ch) {
  bool erased;
  {
    std::lock_guard<std::mutex> lock(mu_);
    erased = channels_.erase(ch.id) > 0;
  }
  if (!erased) return;
  {
    std::lock_guard<std::mutex> lock(ch.mu);
    const Outcome outcome = ch.ended_by_shutdown ? Outcome::shutdown
                            : ch.errored         ? Outcome::error
                            : ch.ended           ? Outcome::completed
                                                 : Outcome::client_gone;
    metrics_.count_stream_end(outcome, Clock::now() - ch.opened);
    if (ch.turn && !ch.turn->ended()) ch.turn->end(TurnOutcome::client_gone, {}, false);
  }
  // Only the last one matters to a drain waiting for zero.
  if (--count_ == 0) on_count_change_();
}

inline void StreamHub::run_cancel_callbacks(Channel& ch) {
  std::vector<std::function<void()>> callbacks;
  {
    std::lock_guard<std::mutex> lock(ch.mu);
    if (!ch.cancel_due || ch.cancel_fired) return;
    ch.cancel_fired = true;
    callbacks.swap(ch.cancel_callbacks);
  }
  for (std::size_t i = 0; i < callbacks.size(); ++i) {
    try {
      callbacks[i]();
    } catch (const std::exception& e) {
      log(options_, LogLevel::error,
          "dialog " + ch.dialog_id + ": on_cancel callback " + std::to_string(i) +
              " threw: " + e.what());
    } catch (...) {
      log(options_, LogLevel::error,
          "dialog " + ch.dialog_id + ": on_cancel callback " + std::to_string(i) + " threw");
    }
  }
}

inline void StreamHub::on_cancel(Channel& ch, std::function<void()> callback) {
  if (!callback) return;
  {
    std::lock_guard<std::mutex> lock(ch.mu);
    if (!ch.cancel_due) {
      if (!ch.ended) ch.cancel_callbacks.push_back(std::move(callback));
      return;  // an ended stream is never cancelled: the callback never runs
    }
  }
  // Cancelled already: run it now, here; the callbacks registered before it
  // run (or ran) on the thread that saw the cancellation.
  std::vector<std::function<void()>> one;
  one.push_back(std::move(callback));
  try {
    one[0]();
  } catch (const std::exception& e) {
    log(options_, LogLevel::error,
        "dialog " + ch.dialog_id + ": on_cancel callback threw: " + e.what());
  } catch (...) {
    log(options_, LogLevel::error, "dialog " + ch.dialog_id + ": on_cancel callback threw");
  }
}

inline void StreamHub::watch_out_locked(Channel& ch, bool on) {
  if (ch.watching_out == on || ch.fd < 0) return;
  ch.watching_out = on;
  if (ch.watch) loop_.rearm(ch.watch, EPOLLIN | EPOLLRDHUP | (on ? EPOLLOUT : 0u));
}

// Closing removes the socket from the epoll set; a stale event for it finds
// the channel gone or closed and is ignored. Closing a stream that has not
// ended is a cancellation: its callbacks become due.
inline void StreamHub::close_locked(Channel& ch, bool wake) {
  if (!ch.ended) ch.cancel_due = true;
  // Out of the epoll set before the close: a child forked meanwhile may hold
  // the socket open, and the set would go on reporting it.
  loop_.unwatch(std::exchange(ch.watch, nullptr));
  if (ch.fd >= 0) ::close(ch.fd);
  ch.fd = -1;
  ch.closed = true;
  ch.cancelled = true;
  ch.pending.clear();
  ch.pending_sent = 0;
  if (wake) ch.cv.notify_all();
}

// RULE client_disconnect_cancels_producer: a client that is gone (EOF or
// reset seen by the hub thread, a failed write, a write stalled past
// write_timeout) is never written to again, and its producer is cancelled:
// send() returns false from now on, and the on_cancel callbacks run (settle())
// once the channel's lock is released, within milliseconds of the cause. A
// stop button is such a disconnect.
inline void StreamHub::drop_client_locked(Channel& ch, bool wake) { close_locked(ch, wake); }

inline StreamHub::Flow StreamHub::flush_locked(Channel& ch, bool wake, bool close_ended) {
  if (ch.closed) return Flow::gone;
  while (ch.unsent() > 0) {
    const ssize_t n = ::send(ch.fd, ch.pending.data() + ch.pending_sent, ch.unsent(),
                             MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) {
      ch.pending_sent += static_cast<std::size_t>(n);
      ch.last_progress = Clock::now();
      metrics_.count_bytes_sent(static_cast<std::uint64_t>(n));
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      watch_out_locked(ch, true);
      return Flow::open;
    }
    drop_client_locked(ch, wake);  // the client is gone: never write to it again
    return Flow::gone;
  }
  ch.pending.clear();
  ch.pending_sent = 0;
  watch_out_locked(ch, false);
  if (wake) ch.cv.notify_all();
  if (ch.ended && close_ended) {
    close_locked(ch, wake);
    return Flow::closed;
  }
  return Flow::open;
}

// Adds bytes to what the socket has yet to take, without writing.
inline void StreamHub::append_locked(Channel& ch, std::string_view bytes) {
  if (ch.pending_sent >= 64 * 1024) {  // keep a backlogged buffer from growing
    ch.pending.erase(0, ch.pending_sent);
    ch.pending_sent = 0;
  }
  ch.last_write = Clock::now();
  if (ch.unsent() == 0) ch.last_progress = ch.last_write;
  ch.pending.append(bytes);
}

// Writes now unless the socket is known to be full: then the hub flushes it
// when it drains, and a fast producer's events go out together.
inline StreamHub::Flow StreamHub::queue_locked(Channel& ch, std::string_view bytes) {
  if (ch.closed) return Flow::gone;
  append_locked(ch, bytes);
  if (ch.watching_out && !ch.ended) return Flow::open;
  return flush_locked(ch);
}

// The shutdown's error event and outcome in the turn's log (synced by the caller).
inline void StreamHub::record_shutdown_locked(Channel& ch) {
  if (!ch.turn || ch.turn->ended()) return;
  const json error = shutdown_error_event();
  ch.turn->record(&error, 1);
  ch.turn->end(TurnOutcome::shutdown, "shutdown", false);
}

// Cancels the stream: nothing the producer does from here on is written.
inline void StreamHub::cancel_for_shutdown_locked(Channel& ch) {
  ch.cancelled = true;
  ch.ended = true;
  ch.ended_by_shutdown = true;
  ch.cancel_due = true;
}

// Cancels the stream and queues its final events; does not write them nor
// wake its producer: see cancel_all_for_shutdown().
inline void StreamHub::end_for_shutdown_locked(Channel& ch) {
  record_shutdown_locked(ch);
  if (ch.turn) ch.turn->sync();
  cancel_for_shutdown_locked(ch);
  if (ch.kind == ChannelKind::sse && !ch.closed) {
    metrics_.count_events_sent(2);
    append_locked(ch, ch.tail_locked(shutdown_error_event(), true));
  }
}

// RULE turn_recorded_before_sent: an event of a recorded turn is in the
// dialog store before its bytes are queued for the client, and the turn's
// outcome is stored (and synced) before its `done` is.
inline void StreamHub::record_locked(Channel& ch, const json* event, std::size_t count,
                                     bool from_producer) {
  if (!ch.turn || !from_producer || ch.turn->ended()) return;
  ch.turn->record(event, count);
  for (std::size_t i = 0; i < count; ++i) {
    const auto type = event[i].find("type");
    if (*type == "error") {
      ch.turn->end(TurnOutcome::error, error_code_of(event[i]), true);
    } else if (*type == "done") {
      ch.turn->end(TurnOutcome::completed, {}, true);
    }
  }
}

inline bool StreamHub::send(Channel& ch, const json* events, std::size_t count,
                            bool from_producer) {
  for (std::size_t i = 0; i < count; ++i) {
    const json& event = events[i];
    const auto type = event.is_object() ? event.find("type") : event.end();
    if (!event.is_object() || type == event.end() || !type->is_string()) {
      throw std::invalid_argument(
          "StreamWriter::send: an event is a JSON object with a string \"type\"");
    }
  }
  const auto kind_of = [](const json& event) -> const std::string& {
    return event.find("type")->get_ref<const std::string&>();
  };

  std::unique_lock<std::mutex> lock(ch.mu);
  if (ch.cancelled) return false;
  if (from_producer && !ch.producer_spoke && count > 0) {
    ch.producer_spoke = true;
    metrics_.count_first_event(Clock::now() - ch.opened);
  }
  if (ch.kind == ChannelKind::collect) {
    Channel::Leftovers left;
    for (std::size_t i = 0; i < count && !ch.ended; ++i) {
      const json& event = events[i];
      const std::string& kind = kind_of(event);
      record_locked(ch, &event, 1, from_producer);
      ++ch.events;
      const auto content = event.find("content");
      if (kind == "chat" && content != event.end() && content->is_string()) {
        ch.collected += content->get_ref<const std::string&>();
      }
      if (kind == "error") {
        ch.errored = true;
        const auto message = event.find("error");
        ch.error = message != event.end() && message->is_string()
                       ? message->get<std::string>()
                       : std::string("generator reported an error");
      }
      if (kind == "error" || kind == "done") left = ch.end_locked();
    }
    lock.unlock();
    return true;
  }

  // Backpressure: a client that reads slower than the producer writes holds
  // the producer here, not an unbounded buffer.
  if (ch.unsent() > kMaxUnsent) {
    const bool room = ch.cv.wait_for(lock, options_.write_timeout, [&] {
      return ch.cancelled.load() || ch.unsent() <= kMaxUnsent / 2;
    });
    if (ch.cancelled) return false;
    if (!room) {
      drop_client_locked(ch);
      lock.unlock();
      settle(ch, Flow::gone);
      return false;
    }
  }

  std::string bytes;
  Channel::Leftovers left;
  std::size_t framed = 0;
  for (std::size_t i = 0; i < count; ++i) {
    const std::string& kind = kind_of(events[i]);
    const bool is_error = kind == "error", is_done = kind == "done";
    ++ch.events;
    ++framed;
    ch.frame_locked(bytes, event_text(events[i], ch.dialog_id, is_done));
    record_locked(ch, &events[i], 1, from_producer);
    if (is_error || is_done) {
      if (is_error) {
        ch.errored = true;
        bytes += ch.tail_locked(std::nullopt);
        ++framed;  // the done that follows
      }
      if (is_done && ch.format.chunked) bytes.append(kLastChunk);
      left = ch.end_locked();
      break;
    }
  }
  metrics_.count_events_sent(framed);
  const Flow flow = queue_locked(ch, bytes);
  lock.unlock();
  settle(ch, flow);
  return flow != Flow::gone;
}

inline bool StreamHub::wait(Channel& ch, std::chrono::milliseconds d) {
  if (d.count() <= 0) return !ch.cancelled;
  std::unique_lock<std::mutex> lock(ch.mu);
  return !ch.cv.wait_for(lock, d, [&] { return ch.cancelled.load(); });
}

// The producer is done (error empty) or failed: `done` follows unless the
// stream already ended. Hands back what the stream lets go of in `left`.
inline StreamHub::Flow StreamHub::finish_locked(Channel& ch, const std::optional<json>& error,
                                                Channel::Leftovers& left) {
  const bool was_open = !ch.ended && !ch.closed;
  if (was_open && error) ch.errored = true;
  if (ch.kind == ChannelKind::collect && was_open && error) {
    const auto message = error->find("error");
    ch.error = message != error->end() && message->is_string() ? message->get<std::string>()
                                                               : "generator failed";
  }
  if (was_open && ch.turn && !ch.turn->ended()) {
    if (error) ch.turn->record(&*error, 1);
    ch.turn->end(error ? TurnOutcome::error : TurnOutcome::completed,
                 error ? error_code_of(*error) : std::string(), true);
  }
  left = ch.end_locked();
  if (ch.kind == ChannelKind::collect) return Flow::closed;
  if (!was_open) return Flow::open;  // ended by an event, the shutdown or the client
  metrics_.count_events_sent(error ? 2 : 1);
  return queue_locked(ch, ch.tail_locked(error));
}

inline void StreamHub::finish(Channel& ch, const std::optional<json>& error) {
  Flow flow;
  Channel::Leftovers left;
  {
    std::lock_guard<std::mutex> lock(ch.mu);
    flow = finish_locked(ch, error, left);
  }
  settle(ch, flow);
}

inline std::vector<std::shared_ptr<Channel>> StreamHub::cancel_all_for_shutdown() {
  std::vector<std::shared_ptr<Channel>> all;
  {
    std::lock_guard<std::mutex> lock(mu_);
    shutting_down_ = true;
    all.reserve(channels_.size());
    for (const auto& entry : channels_) all.push_back(entry.second);
  }
  // Cancel every stream: from here on its producer's writes and end are
  // no-ops.
  std::vector<std::shared_ptr<Channel>> ending;
  ending.reserve(all.size());
  for (const auto& ch : all) {
    std::lock_guard<std::mutex> lock(ch->mu);
    if (ch->ended || ch->closed) continue;
    cancel_for_shutdown_locked(*ch);
    ending.push_back(ch);
  }
  return ending;
}

inline void StreamHub::run_cancel_callbacks(
    const std::vector<std::shared_ptr<Channel>>& cancelled) {
  for (const auto& ch : cancelled) run_cancel_callbacks(*ch);
}

inline std::size_t StreamHub::write_shutdown_tails(
    const std::vector<std::shared_ptr<Channel>>& ending) {
  // Every client gets its final events, then the sockets are closed (a TCP
  // close costs the kernel several times what the write does, and the last
  // client's events would wait for every close before them), then the
  // producers are woken: thousands of woken threads would otherwise compete
  // with these writes.
  //
  // The rule shutdown_tails_follow_their_sync: a turn's shutdown error and
  // outcome are in the store, synced, before its client gets them. The turns
  // are recorded in chunks; a syncer thread makes each recorded chunk
  // durable (one sync covers whatever was recorded before it: group commit)
  // while this thread records the next ones and writes the tails of the
  // chunks already durable, so recording, committing and writing overlap.
  // A store that does not sync within the grace period (a file locked by
  // another process) does not hold the shutdown: the tails go out anyway
  // and the syncer, which owns what it uses, finishes on its own.
  constexpr std::size_t kChunk = 64;
  const std::size_t chunks = (ending.size() + kChunk - 1) / kChunk;
  std::shared_ptr<DialogStore> store;
  for (const auto& ch : ending) {
    std::lock_guard<std::mutex> lock(ch->mu);
    if (ch->turn && !ch->turn->ended()) {
      store = ch->turn->store();
      break;
    }
  }
  struct SyncState {
    std::mutex mu;
    std::condition_variable cv;
    std::size_t recorded = 0, synced = 0;  // chunks
    std::string error;
  };
  const auto sync = std::make_shared<SyncState>();
  if (store) {
    std::thread([sync, store, chunks] {
      name_thread("as-sync");
      std::unique_lock<std::mutex> lock(sync->mu);
      while (sync->synced < chunks) {
        sync->cv.wait(lock, [&] { return sync->recorded > sync->synced; });
        const std::size_t upto = sync->recorded;
        lock.unlock();
        std::string error;
        try {
          store->sync();
        } catch (const std::exception& e) {
          error = e.what();
        }
        lock.lock();
        if (sync->error.empty()) sync->error = std::move(error);
        sync->synced = upto;
        sync->cv.notify_all();
      }
    }).detach();
    for (std::size_t c = 0; c < chunks; ++c) {
      for (std::size_t i = c * kChunk; i < std::min(ending.size(), (c + 1) * kChunk); ++i) {
        std::lock_guard<std::mutex> lock(ending[i]->mu);
        if (!ending[i]->closed) record_shutdown_locked(*ending[i]);
      }
      std::lock_guard<std::mutex> lock(sync->mu);
      ++sync->recorded;
      sync->cv.notify_all();
    }
  }
  const auto sync_deadline = std::chrono::steady_clock::now() + options_.grace_period;
  bool sync_late = false, error_logged = false;
  std::vector<Channel*> written;
  written.reserve(ending.size());
  for (std::size_t c = 0; c < chunks; ++c) {
    if (store && !sync_late) {
      std::unique_lock<std::mutex> lock(sync->mu);
      sync_late = !sync->cv.wait_until(lock, sync_deadline, [&] { return sync->synced > c; });
      if (sync_late) {
        log(options_, LogLevel::warning,
            "dialog store: not synced within the grace period; the shutdown goes on without it");
      } else if (!sync->error.empty() && !error_logged) {
        log(options_, LogLevel::warning, "dialog store: sync at shutdown failed: " + sync->error);
        error_logged = true;
      }
    }
    for (std::size_t i = c * kChunk; i < std::min(ending.size(), (c + 1) * kChunk); ++i) {
      Channel& ch = *ending[i];
      Flow flow = Flow::open;
      {
        std::lock_guard<std::mutex> lock(ch.mu);
        if (ch.closed || ch.kind != ChannelKind::sse) continue;
        metrics_.count_events_sent(2);
        append_locked(ch, ch.tail_locked(shutdown_error_event(), true));
        flow = flush_locked(ch, false, false);
        if (flow == Flow::open && ch.unsent() == 0) written.push_back(&ch);
      }
      if (flow != Flow::open) forget(ch);
    }
  }
  for (Channel* ch : written) {
    {
      std::lock_guard<std::mutex> lock(ch->mu);
      if (ch->closed) continue;
      close_locked(*ch, false);
    }
    forget(*ch);
  }
  for (const auto& ch : ending) {
    std::lock_guard<std::mutex> lock(ch->mu);
    ch->cv.notify_all();
  }
  return ending.size();
}

inline void StreamHub::supersede(Channel& ch) {
  Flow flow = Flow::open;
  {
    std::lock_guard<std::mutex> lock(ch.mu);
    if (ch.ended || ch.closed) return;
    const json error = error_event("Superseded: a newer turn of this dialog started", "superseded");
    if (ch.turn && !ch.turn->ended()) {
      ch.turn->record(&error, 1);
      ch.turn->end(TurnOutcome::superseded, "superseded", true);
    }
    ch.cancelled = true;
    ch.ended = true;
    ch.errored = true;
    ch.cancel_due = true;
    if (ch.kind == ChannelKind::sse) {
      metrics_.count_events_sent(2);
      flow = queue_locked(ch, ch.tail_locked(error));
    } else {
      ch.error = error.value("error", std::string());
      flow = Flow::closed;
    }
    ch.cv.notify_all();
  }
  settle(ch, flow);
}

inline std::size_t StreamHub::close_all() {
  std::size_t closed = 0;
  for (const auto& ch : snapshot()) {
    {
      std::lock_guard<std::mutex> lock(ch->mu);
      if (!ch->closed) ++closed;
      close_locked(*ch);
    }
    settle(*ch, Flow::gone);
  }
  return closed;
}

inline void StreamHub::on_socket_event(Channel& ch, std::uint32_t events) {
  Flow flow = Flow::open;
  {
    std::lock_guard<std::mutex> lock(ch.mu);
    if (ch.closed) return;
    if (events & EPOLLIN) {
      // A stream's client has nothing more to say; reading tells whether it
      // is still there.
      char scratch[4096];
      for (;;) {
        const ssize_t n = ::recv(ch.fd, scratch, sizeof scratch, MSG_DONTWAIT);
        if (n > 0) continue;
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
        drop_client_locked(ch);
        flow = Flow::gone;
        break;
      }
    }
    if (flow == Flow::open && (events & (EPOLLERR | EPOLLHUP | EPOLLRDHUP))) {
      drop_client_locked(ch);
      flow = Flow::gone;
    }
    if (flow == Flow::open && (events & EPOLLOUT)) flow = flush_locked(ch);
  }
  settle(ch, flow);
}

// Heartbeats on quiet streams, and the write timeout for stalled ones.
inline void StreamHub::tick() {
  const auto now = Clock::now();
  const bool heartbeats = options_.heartbeat_interval.count() > 0;
  for (const auto& ch : snapshot()) {
    if (ch->kind != ChannelKind::sse) continue;
    Flow flow = Flow::open;
    {
      std::lock_guard<std::mutex> lock(ch->mu);
      if (ch->closed) continue;
      if (ch->unsent() > 0 && now - ch->last_progress >= options_.write_timeout) {
        drop_client_locked(*ch);
        flow = Flow::gone;
      } else if (heartbeats && !ch->ended && now - ch->last_write >= options_.heartbeat_interval) {
        std::string ping;
        if (ch->format.chunked) {
          append_chunk(ping, kHeartbeatComment);
        } else {
          ping = std::string(kHeartbeatComment);
        }
        flow = queue_locked(*ch, ping);
      }
    }
    settle(*ch, flow);
  }
}

inline void StreamHub::run() {
  using std::chrono::milliseconds;
  auto period = milliseconds(1000);
  if (options_.heartbeat_interval.count() > 0) {
    period = std::min(period, options_.heartbeat_interval / 4);
  }
  period = std::max(std::min(period, options_.write_timeout / 4), milliseconds(5));
  auto next_tick = Clock::now() + period;
  while (loop_.pass(next_tick)) {
    if (Clock::now() >= next_tick) {
      tick();
      next_tick = Clock::now() + period;
    }
  }
}

}  // namespace detail
}  // namespace agentsmithy
// ---- include/agentsmithy/connections/worker_pool.hpp
namespace agentsmithy {
namespace detail {

// ===========================================================================
// Worker pool: the HTTP front end's threads, grown on demand
// ===========================================================================

// cpp-httplib's default pool has a fixed max(8, cores-1) threads and an
// unbounded queue, so the ninth stream waits silently. This one starts empty
// and grows on demand up to a cap sized from max_streams, but not faster than
// it needs to. A worker about to block for long (a generator's whole stream,
// a non-streaming chat waiting for its answer) says so with a Blocking guard:
// it no longer counts among the 8 workers kept ready, and a task waiting for
// it gets a new thread at once. Any other task is short (a request whose
// bytes are there is read and answered or handed on in microseconds), so a
// burst is absorbed by those 8; only when queued tasks make no progress for
// 20 ms or more (a host's route handler or a slow client's body holds every
// thread; a merely busy CPU does not stall them that long) does a monitor add
// a thread per waiting task. Threads that idle for 2 s exit. Threads are
// detached and share the pool state, so a task stuck in a generator that
// ignores cancellation cannot hold up shutdown(); it is left to finish.
class WorkerPool final : public httplib::TaskQueue {
  struct State;

 public:
  WorkerPool(std::size_t max_threads, std::chrono::milliseconds idle_exit)
      : state_(std::make_shared<State>()) {
    state_->max_threads = std::max<std::size_t>(max_threads, 1);
    state_->idle_exit = idle_exit;
  }
  ~WorkerPool() override { shutdown(); }

  // Held by a task that is about to block for long; nothing outside a
  // worker of a pool.
  class Blocking {
   public:
    Blocking();
    ~Blocking();
    Blocking(const Blocking&) = delete;
    Blocking& operator=(const Blocking&) = delete;

   private:
    State* const state_;
  };

  void enqueue(std::function<void()> task) override {
    std::lock_guard<std::mutex> lock(state_->mu);
    state_->tasks.push_back(std::move(task));
    if (unserved_locked(*state_) == 0) {
      state_->work_cv.notify_one();
      return;
    }
    if (state_->threads - state_->blocked < std::min(kEagerThreads, state_->max_threads)) {
      if (spawn_locked(*state_, 1) > 0) return;
    }
    if (!state_->monitor_running) {
      try {
        std::thread(&WorkerPool::monitor, state_).detach();
        state_->monitor_running = true;
      } catch (const std::system_error&) {
        // Out of threads: the task waits for a busy one to come free.
      }
    }
    state_->monitor_cv.notify_one();
  }

  // What cpp-httplib's accept loop gets, owns and deletes: the pool itself
  // is shut down by its owner.
  class Ref final : public httplib::TaskQueue {
   public:
    explicit Ref(WorkerPool& pool) : pool_(pool) {}
    void enqueue(std::function<void()> task) override { pool_.enqueue(std::move(task)); }
    void shutdown() override {}

   private:
    WorkerPool& pool_;
  };

  // Waits briefly for the workers to exit; any still busy then is stuck in a
  // generator and left to finish on its own.
  void shutdown() override {
    std::unique_lock<std::mutex> lock(state_->mu);
    if (state_->stopping) return;
    state_->stopping = true;
    state_->work_cv.notify_all();
    state_->monitor_cv.notify_all();
    state_->exit_cv.wait_for(lock, std::chrono::milliseconds(50),
                             [&] { return state_->threads == 0 && !state_->monitor_running; });
  }

 private:
  static constexpr std::size_t kEagerThreads = 8;
  // How long queued tasks must make no progress before the monitor adds
  // threads: longer as the pool grows, so that a loaded machine (where every
  // task is slow) does not inflate it. Measured: with 1 ms below 16 threads
  // a ramp of 1,000 streams on 2 busy cores grew the pool to ~200 threads,
  // all of them idle a moment later.
  static std::chrono::milliseconds starved_after(std::size_t ready_threads) {
    return std::chrono::milliseconds(ready_threads < 16 ? 20 : 50);
  }

  struct State : std::enable_shared_from_this<State> {
    std::mutex mu;
    std::condition_variable work_cv, exit_cv, monitor_cv;
    std::deque<std::function<void()>> tasks;
    std::size_t threads = 0, idle = 0, max_threads = 1;
    std::size_t blocked = 0;  // threads inside a Blocking guard
    std::uint64_t taken = 0;  // tasks dequeued so far: the monitor's progress mark
    std::chrono::milliseconds idle_exit{10000};
    bool stopping = false;
    bool monitor_running = false;
  };

  // Queued tasks that no idle worker is about to take. Threads started but
  // not yet running do not count: on a machine saturated by thousands of
  // generator threads a new thread waits long for its first time slice, and
  // starting a few too many (they exit after 2 s idle) keeps a ramp of
  // threaded generators going (3,000 of them: 52 s with, over 60 without).
  static std::size_t unserved_locked(const State& s) {
    return s.tasks.size() > s.idle ? s.tasks.size() - s.idle : 0;
  }

  // Starts up to `count` workers; returns how many it started.
  static std::size_t spawn_locked(State& s, std::size_t count) {
    std::size_t started = 0;
    while (started < count && s.threads < s.max_threads) {
      try {
        std::thread(&WorkerPool::work, s.shared_from_this()).detach();
      } catch (const std::system_error&) {
        break;
      }
      ++s.threads;
      ++started;
    }
    return started;
  }

  static void monitor(std::shared_ptr<State> s) {
    name_thread("as-pool");
    std::unique_lock<std::mutex> lock(s->mu);
    while (!s->stopping) {
      const auto starved = [&] { return unserved_locked(*s) > 0; };
      if (!starved()) {
        // Like an idle worker, an idle monitor exits; enqueue() starts another.
        if (!s->monitor_cv.wait_for(lock, s->idle_exit, [&] { return s->stopping || starved(); }))
          break;
        continue;
      }
      const std::uint64_t mark = s->taken;
      s->monitor_cv.wait_for(lock, starved_after(s->threads - s->blocked),
                             [&] { return s->stopping; });
      if (s->stopping || !starved() || s->taken != mark) continue;
      spawn_locked(*s, unserved_locked(*s));
    }
    s->monitor_running = false;
    s->exit_cv.notify_all();
  }

  static void work(std::shared_ptr<State> s) {
    name_thread("as-worker");
    t_state = s.get();
    std::unique_lock<std::mutex> lock(s->mu);
    for (;;) {
      if (!s->tasks.empty()) {
        auto task = std::move(s->tasks.front());
        s->tasks.pop_front();
        ++s->taken;
        lock.unlock();
        try {
          task();
        } catch (...) {
          // A connection's failure must not take the process down.
        }
        task = nullptr;
        lock.lock();
        continue;
      }
      if (s->stopping) break;
      ++s->idle;
      const bool woken =
          s->work_cv.wait_for(lock, s->idle_exit, [&] { return s->stopping || !s->tasks.empty(); });
      --s->idle;
      if (!woken) break;
    }
    --s->threads;
    s->exit_cv.notify_all();
  }

  static inline thread_local State* t_state = nullptr;  // the pool of this worker

  std::shared_ptr<State> state_;
};

inline WorkerPool::Blocking::Blocking() : state_(t_state) {
  if (!state_) return;
  std::lock_guard<std::mutex> lock(state_->mu);
  ++state_->blocked;
  spawn_locked(*state_, unserved_locked(*state_));  // its replacement, or more (unserved_locked)
}

inline WorkerPool::Blocking::~Blocking() {
  if (!state_) return;
  std::lock_guard<std::mutex> lock(state_->mu);
  --state_->blocked;
}

}  // namespace detail
}  // namespace agentsmithy
// ---- include/agentsmithy/server/core.hpp
namespace agentsmithy {
namespace detail {

// ===========================================================================
// Core: the state a Server shares with every thread it starts
// ===========================================================================

// Threads that may outlive the Server object (a generator that ignores
// cancellation) hold a shared_ptr to this, so nothing they touch is freed.
struct Core {
  explicit Core(Options opts)
      : options(std::move(opts)),
        life(options.lame_duck.count() > 0, [this] { changed(); }),
        store(options.store ? options.store : memory_store()),
        store_health([this](const std::string& m) { log(LogLevel::warning, m); }),
        hub(options, metrics, [this] { changed(); }) {}
  Core(const Core&) = delete;
  Core& operator=(const Core&) = delete;

  void log(LogLevel level, const std::string& message) const {
    detail::log(options, level, message);
  }

  // Wakes whoever waits on `cv` for a change of state or of the counters.
  void changed() {
    { std::lock_guard<std::mutex> lock(mu); }
    cv.notify_all();
  }

  // The shutdown starts (the lame duck, if any, then the drain). `cause` is
  // recorded for the report by whoever asks first.
  void request_shutdown(ShutdownReport::Cause cause = ShutdownReport::Cause::shutdown) {
    if (!life.shutdown_requested()) {
      std::lock_guard<std::mutex> lock(mu);
      if (!report_cause_set) {
        report_cause_set = true;
        report.cause = cause;
        report.started = std::chrono::system_clock::now();
      }
    }
    if (life.request_shutdown()) log(LogLevel::info, "shutdown requested");
  }

  void request_force() {
    {
      std::lock_guard<std::mutex> lock(mu);
      if (!report_cause_set) {
        report_cause_set = true;
        report.cause = ShutdownReport::Cause::forced;
        report.started = std::chrono::system_clock::now();
      }
    }
    if (!life.shutdown_requested()) log(LogLevel::info, "shutdown requested");
    life.force();
  }

  // The drain begins: new chats and host routes get 503, and every idle
  // keep-alive connection closes (the waiting room watches the waker).
  void begin_drain() {
    life.enter(Phase::draining);
    drain_started.wake();  // level-triggered and never drained: every waiter wakes
  }

  bool try_admit() {
    if (admitted.fetch_add(1) >= options.max_streams) {
      admitted.fetch_sub(1);
      return false;
    }
    return true;
  }
  void release() {
    if (admitted.fetch_sub(1) == 1) changed();
  }

  // Nothing left to wait for: no stream, no running generator, no connection
  // in the middle of a request. Each counter calls changed() when it reaches
  // zero, so the last one to get there wakes the drain.
  bool drained() const {
    return hub.active() == 0 && admitted.load() == 0 && connections.load() == 0;
  }

  // What serves a chat request that arrives now: exactly one of the two is
  // set. Neither set by the host: the demo, through demo_stream_handler().
  struct Producer {
    Generator generator;
    StreamHandler handler;
  };
  Producer current_producer() {
    std::lock_guard<std::mutex> lock(producer_mu);
    if (!producer.generator && !producer.handler) {
      if (!demo) demo = demo_stream_handler();
      return Producer{nullptr, demo};
    }
    return producer;
  }
  void set_producer(Producer next) {
    std::lock_guard<std::mutex> lock(producer_mu);
    producer = std::move(next);
  }

  // Connections that are being served (not yet handed to the hub). Their
  // sockets are shut down when the grace period runs out.
  void add_connection(int fd) {
    std::lock_guard<std::mutex> lock(connections_mu);
    connection_fds.insert(fd);
    ++connections;
    if (connections_closing) ::shutdown(fd, SHUT_RDWR);
  }
  void remove_connection(int fd) {
    {
      std::lock_guard<std::mutex> lock(connections_mu);
      if (connection_fds.erase(fd) == 0 || --connections > 0) return;
    }
    changed();
  }
  std::size_t shut_down_connections() {
    std::lock_guard<std::mutex> lock(connections_mu);
    connections_closing = true;
    for (const int fd : connection_fds) ::shutdown(fd, SHUT_RDWR);
    return connection_fds.size();
  }

  const Options options;
  Lifecycle life;  // see Lifecycle: every reader of the server's state asks it
  // Dialogs and their turns: Options::store, or a memory_store() of its own.
  const std::shared_ptr<DialogStore> store;
  StoreHealth store_health;
  // Held while the current dialog is read and maybe created (the REST API,
  // a chat without dialog_id), so that two do not each create one.
  std::mutex current_dialog_mu;
  // The turn each dialog is running, for superseding it.
  std::mutex running_turns_mu;
  std::unordered_map<std::string, std::weak_ptr<Channel>> running_turns;  // guarded by it
  std::atomic<std::size_t> refused{0};                                    // 503s while draining
  std::atomic<std::size_t> idle_closed{0};     // keep-alive connections closed by the drain
  Metrics metrics;                             // before `hub`, which reports to it
  std::optional<StatusFile> status;            // Options::status_file
  bool status_stopping_written = false;        // the listen thread's
  ShutdownReport report;                       // guarded by mu
  bool report_cause_set = false;               // guarded by mu
  std::optional<ShutdownReport> final_report;  // guarded by mu
  std::atomic<std::size_t> admitted{0};
  std::atomic<std::size_t> connections{0};
  std::atomic<int> port{0};
  Waker drain_started;  // written once, at the drain; never drained

  mutable std::mutex mu;
  std::condition_variable cv;
  bool listen_called = false;                // guarded by mu
  std::vector<std::function<void()>> hooks;  // guarded by mu
  struct HostRoute {
    std::string method, path;
    RouteHandler handler;
  };
  std::vector<HostRoute> routes;  // guarded by mu

  std::mutex producer_mu;
  Producer producer;   // guarded by producer_mu
  StreamHandler demo;  // guarded by producer_mu; made on first use

  // Threads inside a user generator, by kernel thread id.
  std::mutex generator_threads_mu;
  std::unordered_set<pid_t> generator_threads;

  // Once the shutdown starts, generators only have to notice it and return;
  // thousands of them, runnable on an overloaded machine, would otherwise
  // share the CPU equally with the one thread writing every stream's final
  // events and enforcing the grace period. Unprivileged threads may lower
  // their own scheduling class, not raise it back: these threads serve no
  // more requests of this Server anyway.
  std::size_t demote_generator_threads() {
    std::lock_guard<std::mutex> lock(generator_threads_mu);
    const sched_param idle{0};
    for (const pid_t tid : generator_threads) ::sched_setscheduler(tid, SCHED_IDLE, &idle);
    return generator_threads.size();
  }

  std::mutex connections_mu;
  std::unordered_set<int> connection_fds;
  bool connections_closing = false;

  // Last: its destructor reports to changed(), which needs the members above.
  StreamHub hub;
};

}  // namespace detail
}  // namespace agentsmithy
// ---- include/agentsmithy/dialogs/chat_turns.hpp
namespace agentsmithy {
namespace detail {

// ===========================================================================
// A chat request's turn: its dialog, its memory, its recording
// ===========================================================================

// The dialog a chat request belongs to (AgentSmithy's rule): absent, the
// server's current dialog, created when there is none; unknown but valid, a
// new dialog with that id. Throws StoreError (or what the store throws).
inline void resolve_dialog(Core& core, ChatRequest& request) {
  DialogStore& store = *core.store;
  if (!request.dialog_id.empty()) {
    if (!store.find_dialog(request.dialog_id)) store.create_dialog(request.dialog_id, std::nullopt);
    return;
  }
  std::lock_guard<std::mutex> lock(core.current_dialog_mu);
  request.dialog_id = ensure_current_dialog(store);
}

// Memory (Options::dialog_memory): a request that names its dialog and is
// exactly one user message gets the dialog's earlier turns before it. One
// with more messages manages its own history and is taken as given; one
// without a dialog_id (curl, a load test) is not given the current dialog's.
inline void remember(Core& core, ChatRequest& request, bool named) {
  if (!named || !core.options.dialog_memory || request.messages.size() != 1 ||
      request.messages[0].role != "user") {
    return;
  }
  std::vector<Message> messages =
      memory_messages(core.store->turns(request.dialog_id, kMemoryTurns));
  if (messages.empty()) return;
  messages.push_back(std::move(request.messages[0]));
  request.messages = std::move(messages);
}

// The last user message: what the turn's `user` event shows and position 0
// of its log.
inline std::string user_text(const ChatRequest& request) {
  std::string query;
  for (const Message& m : request.messages) {
    if (m.role == "user") query = m.content;
  }
  return query;
}

// Starts recording the turn of `ch`: a turn its dialog is still running is
// superseded first when the request named the dialog (requests without a
// dialog_id share the current dialog and do not cancel each other); the
// user's message is stored before its `user` event is sent. False when the
// store failed (the turn then ends with store_unavailable).
inline bool start_turn(Core& core, const std::shared_ptr<Channel>& ch, const std::string& query,
                       bool named) {
  std::shared_ptr<Channel> previous;
  if (named) {
    std::lock_guard<std::mutex> lock(core.running_turns_mu);
    std::weak_ptr<Channel>& slot = core.running_turns[ch->dialog_id];
    previous = slot.lock();
    slot = ch;
  }
  if (previous && previous != ch) core.hub.supersede(*previous);
  std::lock_guard<std::mutex> lock(ch->mu);
  if (ch->cancelled) return true;  // the shutdown came first: nothing of it reaches a client
  ch->turn =
      std::make_unique<TurnLog>(core.store, core.store_health, ch->dialog_id, new_dialog_id());
  return ch->turn->begin(query);
}

}  // namespace detail
}  // namespace agentsmithy
// ---- include/agentsmithy/connections/waiting_room.hpp
namespace agentsmithy {
namespace detail {

// ===========================================================================
// Waiting room: connections between two requests wait in epoll, not a thread
// ===========================================================================

// A connection that has no request to read yet (just accepted, or idle
// between two keep-alive requests) waits here, all of them on one thread,
// instead of holding a worker in poll(): a burst of connects or a hundred
// idle keep-alive clients costs no thread each. When a connection's bytes
// arrive (or its peer closes) `resume(fd, served)` hands it back to the
// worker pool, `served` being how many requests it has already had. A
// connection that waits longer than read_timeout (for its first request) or
// keep_alive_timeout (for a later one) is closed here. When the drain starts
// every idle keep-alive connection is closed at once, and one still waiting
// for its first request gets at most kFirstRequestGrace more for it to arrive
// (it deserves its 503), so that a client that says nothing cannot hold up
// the drain. After stop() a connection offered to park() is closed.
class WaitingRoom {
 public:
  static constexpr std::chrono::milliseconds kFirstRequestGrace{50};
  using Resume = std::function<void(int fd, std::size_t served)>;

  WaitingRoom(Core& core, Resume resume) : core_(core), resume_(std::move(resume)) {
    // One-shot: the drain's waker stays readable for good.
    loop_.watch(core_.drain_started.fd(), EPOLLIN | EPOLLONESHOT,
                [this](std::uint32_t) { drain_seen_ = true; });
    thread_ = std::thread([this] {
      name_thread("as-room");
      run();
    });
  }
  ~WaitingRoom() { stop(); }
  WaitingRoom(const WaitingRoom&) = delete;
  WaitingRoom& operator=(const WaitingRoom&) = delete;

  void park(int fd, std::size_t served) {
    const Clock::time_point now = Clock::now();
    std::unique_lock<std::mutex> lock(mu_);
    const bool first = served == 0;
    // Decided under the room's lock: a connection admitted here before the
    // drain is in idle_ when begin_drain_locked() closes them.
    const Admit admit =
        admission_decision(core_.life, first ? Arrival::first_request : Arrival::next_request);
    if (stopped_ || admit == Admit::close) {
      const bool idle_at_drain = !stopped_;
      lock.unlock();
      if (idle_at_drain) ++core_.idle_closed;
      close_connection(fd);
      return;
    }
    const std::uint32_t gen = ++next_gen_;
    Clock::time_point deadline =
        now + (first ? core_.options.read_timeout : core_.options.keep_alive_timeout);
    if (core_.life.refusing()) deadline = std::min(deadline, now + kFirstRequestGrace);
    // Watched before the lock is let go: from then on the thread may expire
    // and close it.
    EventLoop::Watch* const watch =
        loop_.watch(fd, EPOLLIN | EPOLLRDHUP | EPOLLONESHOT,
                    [this, fd, gen](std::uint32_t) { on_ready(fd, gen); });
    if (!watch) {
      lock.unlock();
      close_connection(fd);
      return;
    }
    parked_[fd] = Parked{gen, served, watch};
    (first ? first_ : idle_).push_back(Deadline{deadline, fd, gen});
    // The thread sleeps until its next deadline: wake it if this one is sooner.
    const bool sooner = !next_wake_ || deadline < *next_wake_;
    if (sooner) next_wake_ = deadline;
    lock.unlock();
    if (sooner) loop_.wake();
  }

  // Closes every connection still waiting; park() closes from now on.
  void stop() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stopped_) return;
      stopped_ = true;
    }
    loop_.stop();
    if (thread_.joinable()) thread_.join();
    std::vector<int> left;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (const auto& entry : parked_) {
        loop_.unwatch(entry.second.watch);
        left.push_back(entry.first);
      }
      parked_.clear();
      first_.clear();
      idle_.clear();
    }
    for (const int fd : left) close_connection(fd);
  }

 private:
  struct Parked {
    std::uint32_t gen;
    std::size_t served;
    EventLoop::Watch* watch;
  };
  struct Deadline {
    Clock::time_point at;
    int fd;
    std::uint32_t gen;
  };

  void close_connection(int fd) {
    core_.remove_connection(fd);
    ::close(fd);
  }

  // The loop's thread: the connection's bytes (or its peer's close) arrived.
  void on_ready(int fd, std::uint32_t gen) {
    std::lock_guard<std::mutex> lock(mu_);
    std::size_t served = 0;
    if (take_locked(fd, gen, &served)) ready_.emplace_back(fd, served);
  }

  // Takes `fd` out of the room if `gen` is still its stay; returns whether it was.
  bool take_locked(int fd, std::uint32_t gen, std::size_t* served) {
    const auto it = parked_.find(fd);
    if (it == parked_.end() || it->second.gen != gen) return false;
    if (served) *served = it->second.served;
    loop_.unwatch(it->second.watch);
    parked_.erase(it);
    return true;
  }

  // Drops stale entries and collects the expired ones; returns the next
  // deadline, if any.
  std::optional<Clock::time_point> expire_locked(Clock::time_point now, std::vector<int>& expired) {
    std::optional<Clock::time_point> next;
    for (std::deque<Deadline>* queue : {&first_, &idle_}) {
      while (!queue->empty()) {
        const Deadline& d = queue->front();
        const auto it = parked_.find(d.fd);
        if (it == parked_.end() || it->second.gen != d.gen) {
          queue->pop_front();
          continue;
        }
        if (d.at > now) {
          if (!next || d.at < *next) next = d.at;
          break;
        }
        take_locked(d.fd, d.gen, nullptr);
        expired.push_back(d.fd);
        queue->pop_front();
      }
    }
    next_wake_ = next;
    return next;
  }

  // The drain's waker: what was admitted before it is decided again.
  void begin_drain_locked(Clock::time_point now, std::vector<int>& idle) {
    drain_applied_ = true;
    for (const Deadline& d : idle_) {
      if (take_locked(d.fd, d.gen, nullptr)) idle.push_back(d.fd);
    }
    idle_.clear();
    // Deadlines stay ordered: the minimum of an ordered list and a constant.
    for (Deadline& d : first_) d.at = std::min(d.at, now + kFirstRequestGrace);
  }

  void run() {
    std::vector<std::pair<int, std::size_t>> ready;
    std::vector<int> closing;
    std::optional<Clock::time_point> next;
    while (loop_.pass(next)) {
      ready.clear();
      closing.clear();
      std::size_t idle_closed = 0;
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (stopped_) break;
        const Clock::time_point now = Clock::now();
        if (drain_seen_ && !drain_applied_) {
          begin_drain_locked(now, closing);
          idle_closed = closing.size();
        }
        ready.swap(ready_);
        next = expire_locked(now, closing);
      }
      core_.idle_closed += idle_closed;
      for (const int fd : closing) close_connection(fd);
      for (const auto& [fd, served] : ready) resume_(fd, served);
    }
  }

  Core& core_;
  const Resume resume_;
  EventLoop loop_;
  bool drain_seen_ = false;  // the loop's thread's
  std::mutex mu_;
  std::unordered_map<int, Parked> parked_;          // guarded by mu_
  std::deque<Deadline> first_, idle_;               // guarded by mu_; each ordered by deadline
  std::vector<std::pair<int, std::size_t>> ready_;  // guarded by mu_: woken, to resume
  std::uint32_t next_gen_ = 0;                      // guarded by mu_
  std::optional<Clock::time_point> next_wake_;      // guarded by mu_
  bool drain_applied_ = false;                      // guarded by mu_
  bool stopped_ = false;                            // guarded by mu_
  std::thread thread_;
};

}  // namespace detail
}  // namespace agentsmithy
// ---- include/agentsmithy/http/security.hpp
namespace agentsmithy {
namespace detail {

// ===========================================================================
// Security checks
// ===========================================================================

inline bool is_loopback_host(std::string_view host) {
  return host == "localhost" || host == "::1" || host == "[::1]" || host.rfind("127.", 0) == 0;
}

// A Host header naming this machine's loopback (and, if it has one, our
// port). Anything else reaching a loopback-bound server came through a name
// an attacker controls: DNS rebinding from a web page.
inline bool is_loopback_host_header(std::string_view value, int port) {
  std::string_view name = value, rest;
  if (!value.empty() && value.front() == '[') {
    const std::size_t close = value.find(']');
    if (close == std::string_view::npos) return false;
    name = value.substr(0, close + 1);
    rest = value.substr(close + 1);
  } else if (const std::size_t colon = value.rfind(':'); colon != std::string_view::npos) {
    name = value.substr(0, colon);
    rest = value.substr(colon);
  }
  if (!rest.empty() && rest != ":" + std::to_string(port)) return false;
  std::string lowered(name);
  for (char& c : lowered) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return lowered == "localhost" || lowered == "127.0.0.1" || lowered == "[::1]";
}

// Takes as long for every `given` of a length, whatever it shares with
// `secret`: the token cannot be guessed byte by byte from timings.
inline bool constant_time_equal(std::string_view given, std::string_view secret) {
  unsigned diff = given.size() == secret.size() ? 0u : 1u;
  for (std::size_t i = 0; i < secret.size(); ++i) {
    const unsigned char g = i < given.size() ? static_cast<unsigned char>(given[i]) : 0;
    diff |= g ^ static_cast<unsigned char>(secret[i]);
  }
  return diff == 0;
}

}  // namespace detail
}  // namespace agentsmithy
// ---- include/agentsmithy/http/httplib_adapter.hpp
namespace agentsmithy {
namespace detail {

// ===========================================================================
// The adapter to cpp-httplib: the one part that uses its internals
// ===========================================================================

// cpp-httplib parses requests and routes them; the connections are ours.
// To own them this part uses three of cpp-httplib's internals, whose shape
// changed after 0.11 (0.12 and later differ in process_request's signature
// and the Stream interface):
//   - Server::process_and_close_socket(socket_t), a private virtual: every
//     accepted connection comes to HttplibServer::on_connection instead;
//   - Server::process_request(Stream&, bool, bool&, setup), protected: reads
//     and answers one request from our SocketStream;
//   - Server::svr_sock_, protected: the listening socket, for SOMAXCONN and
//     for stopping the accept loop without closing it.
// Hence the check below: another version is a clear error here, not an
// unrelated one deep in this part.
constexpr bool httplib_version_supported(const char* v) {
  return v[0] == '0' && v[1] == '.' && v[2] == '1' && v[3] == '1' && v[4] == '.';
}
static_assert(httplib_version_supported(CPPHTTPLIB_VERSION),
              "agentsmithy supports cpp-httplib 0.11.x only (tested with 0.11.4, Debian 12's "
              "libcpp-httplib-dev): its HTTP front end overrides Server::process_and_close_socket "
              "and calls Server::process_request, internals that changed in later releases");

// cpp-httplib's Server, with the accepted connections and the request
// reading handed to us. Everything else uses its public API.
class HttplibServer : public httplib::Server {
 public:
  // The bound port, or -1 with the reason in `why`: `port` 0 picks a free
  // one; else `port`, `port`+1, ... up to `attempts` ports.
  int bind_port(const std::string& host, int port, int attempts, std::string& why) {
    int bound = -1;
    if (port == 0) {
      errno = 0;
      bound = bind_to_any_port(host);
      if (bound < 0) why = errno != 0 ? std::strerror(errno) : "address not available";
    }
    const int tries = port == 0 ? 0 : std::max(1, attempts);
    for (int i = 0; i < tries && bound < 0 && port + i <= 65535; ++i) {
      errno = 0;
      if (bind_to_port(host, port + i)) {
        bound = port + i;
        break;
      }
      const int err = errno;
      if (i == 0) why = err != 0 ? std::strerror(err) : "address not available";
      if (err != EADDRINUSE) break;  // another port would not help
    }
    if (bound < 0) {
      if (tries > 1) why += " (and the next " + std::to_string(tries - 1) + " ports)";
      return -1;
    }
    listen_fd_ = svr_sock_;
    // The library listens with a backlog of 5: a burst of clients (say,
    // reconnecting after a restart) would lose handshakes to retry timers.
    ::listen(listen_fd_, SOMAXCONN);
    return bound;
  }
  // Makes listen_after_bind() return; the socket is closed by close_listener().
  void stop_accepting() {
    const socket_t sock = svr_sock_.exchange(INVALID_SOCKET);
    if (sock != INVALID_SOCKET) ::shutdown(sock, SHUT_RDWR);  // wakes accept()
  }
  void close_listener() {
    // listen_after_bind() closes the socket itself when accept() fails, and
    // then leaves svr_sock_ set; after stop_accepting() it never does.
    if (listen_fd_ >= 0 && svr_sock_ == INVALID_SOCKET) ::close(listen_fd_);
    listen_fd_ = -1;
  }

 protected:
  // A connection accepted by the library's accept loop, on a thread of its
  // task queue; the callee owns `sock`.
  virtual void on_connection(int sock) = 0;
  // Reads one request from `stream` and answers it through the routes.
  // `client_closes`: the client asked to close after it.
  bool read_and_answer(httplib::Stream& stream, bool close_after, bool& client_closes) {
    return process_request(stream, close_after, client_closes, nullptr);
  }

 private:
  bool process_and_close_socket(socket_t sock) final {
    on_connection(sock);
    return true;
  }
  int listen_fd_ = -1;
};

// A connection's socket as cpp-httplib's request parser sees it. Reads are
// buffered (the parser asks for one byte at a time) and bounded by the read
// timeout; a muted stream swallows the response cpp-httplib writes for a
// chat request, which we answer ourselves once the handler has returned.
class SocketStream final : public httplib::Stream {
 public:
  SocketStream(int fd, const Options& options)
      : fd_(fd), read_timeout_(options.read_timeout), write_timeout_(options.write_timeout) {}

  bool is_readable() const override { return buffered() > 0 || ready(POLLIN, read_budget()); }
  bool is_writable() const override { return muted_ || ready(POLLOUT, write_timeout_); }

  ssize_t read(char* ptr, size_t size) override {
    if (failed_) return -1;
    if (!in_head_ && !body_framed_) return 0;  // see scan_head: no body
    if (buffered() == 0) {
      if (!ready(POLLIN, read_budget())) return fail();  // the deadline passed
      ssize_t n;
      do {
        n = ::recv(fd_, buffer_, sizeof buffer_, 0);
      } while (n < 0 && errno == EINTR);
      if (n <= 0) return n;
      begin_ = 0;
      end_ = static_cast<std::size_t>(n);
    }
    std::size_t take = std::min(size, buffered());
    if (in_head_) {
      // The library would buffer a request line or header of any length.
      for (std::size_t i = 0; i < take; ++i) {
        const char c = buffer_[begin_ + i];
        scan_head(c);
        const bool bare_lf_pair = c == '\n' && last_ == '\n';  // "\n\n" ends it too
        head_end_ = (c == '\r' || c == '\n') ? head_end_ + 1 : 0;
        last_ = c;
        if (head_end_ == 4 || bare_lf_pair) {
          in_head_ = false;
          take = i + 1;
          break;
        }
      }
      head_bytes_ += take;
      if (in_head_ && head_bytes_ > kMaxHeadBytes) return fail();
    }
    std::memcpy(ptr, buffer_ + begin_, take);
    begin_ += take;
    return static_cast<ssize_t>(take);
  }

  ssize_t write(const char* ptr, size_t size) override {
    if (muted_) return static_cast<ssize_t>(size);
    std::size_t sent = 0;
    while (sent < size) {
      if (!ready(POLLOUT, write_timeout_)) return -1;
      const ssize_t n = ::send(fd_, ptr + sent, size - sent, MSG_NOSIGNAL);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return -1;
      sent += static_cast<std::size_t>(n);
    }
    return static_cast<ssize_t>(size);
  }

  void get_remote_ip_and_port(std::string& ip, int& port) const override {
    address_of(&::getpeername, ip, port);
  }
  void get_local_ip_and_port(std::string& ip, int& port) const override {
    address_of(&::getsockname, ip, port);
  }
  socket_t socket() const override { return fd_; }

  std::size_t buffered() const { return end_ - begin_; }
  void set_muted(bool muted) { muted_ = muted; }
  // Starts the clock on a request: all of it must arrive within read_timeout.
  void begin_request() {
    deadline_ = Clock::now() + read_timeout_;
    in_head_ = true;
    head_bytes_ = 0;
    head_end_ = 0;
    last_ = 0;
    body_framed_ = false;
    in_name_ = true;
    name_.clear();
  }
  // A read timed out or the request head was too long: what is left on the
  // connection cannot be told from a next request, so it must close.
  bool failed() const { return failed_; }

 private:
  static constexpr std::size_t kMaxHeadBytes = 16 * 1024;  // request line + headers

  ssize_t fail() {
    failed_ = true;
    return -1;
  }

  // The rule request_without_framing_has_no_body (RFC 9112, 6.3): a request
  // head without Content-Length or Transfer-Encoding has an empty body.
  // cpp-httplib 0.11 would instead read a POST or PATCH body until the
  // connection closes, and answer 400 after the read timeout; Chromium's
  // fetch sends a bodiless PATCH that way. So the head's header names are
  // watched, and a body read after a head without either sees its end.
  void scan_head(char c) {
    if (c == '\n') {
      in_name_ = true;
      name_.clear();
    } else if (in_name_) {
      if (c == ':') {
        in_name_ = false;
        body_framed_ = body_framed_ || name_ == "content-length" || name_ == "transfer-encoding";
      } else if (name_.size() < 20) {
        name_ += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
      } else {
        in_name_ = false;
      }
    }
  }

  std::chrono::milliseconds read_budget() const {
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline_ - Clock::now());
    return std::max(std::chrono::milliseconds(0), std::min(left, read_timeout_));
  }

  bool ready(short events, std::chrono::milliseconds timeout) const {
    pollfd p{fd_, events, 0};
    int n;
    do {
      n = ::poll(&p, 1, static_cast<int>(timeout.count()));
    } while (n < 0 && errno == EINTR);
    return n > 0;
  }

  template <class Query>
  void address_of(Query query, std::string& ip, int& port) const {
    sockaddr_storage addr{};
    socklen_t len = sizeof addr;
    ip.clear();
    port = -1;
    if (query(fd_, reinterpret_cast<sockaddr*>(&addr), &len) != 0) return;
    char text[INET6_ADDRSTRLEN] = {};
    if (addr.ss_family == AF_INET) {
      const auto* in = reinterpret_cast<const sockaddr_in*>(&addr);
      ::inet_ntop(AF_INET, &in->sin_addr, text, sizeof text);
      port = ntohs(in->sin_port);
    } else if (addr.ss_family == AF_INET6) {
      const auto* in6 = reinterpret_cast<const sockaddr_in6*>(&addr);
      ::inet_ntop(AF_INET6, &in6->sin6_addr, text, sizeof text);
      port = ntohs(in6->sin6_port);
    }
    ip = text;
  }

  const int fd_;
  const std::chrono::milliseconds read_timeout_, write_timeout_;
  char buffer_[4096];
  std::size_t begin_ = 0, end_ = 0;
  bool muted_ = false;
  Clock::time_point deadline_ = Clock::now();
  bool in_head_ = false, failed_ = false;
  std::size_t head_bytes_ = 0;
  int head_end_ = 0;  // CR/LF characters in a row, to find the blank line
  char last_ = 0;
  bool body_framed_ = false;  // the head has Content-Length or Transfer-Encoding
  bool in_name_ = true;       // scanning a header line's name
  std::string name_;          // its first characters, lower-cased
};

}  // namespace detail
}  // namespace agentsmithy
// ---- include/agentsmithy/http/frontend.hpp
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

// The public API's definitions: the stream writer, the server and its
// shutdown sequence, the signal hook.
// ---- include/agentsmithy/streams/stream_writer.hpp
namespace agentsmithy {

// ===========================================================================
// Definitions: stream writer, demo generator, chat service, server
// ===========================================================================

inline StreamWriter::StreamWriter(std::shared_ptr<detail::Core> core,
                                  std::shared_ptr<detail::Channel> channel)
    : core_(std::move(core)), channel_(std::move(channel)) {}

inline StreamWriter::~StreamWriter() { end(); }

inline bool StreamWriter::send(const nlohmann::json& event) {
  return core_->hub.send(*channel_, &event, 1);
}

inline bool StreamWriter::send_batch(const std::vector<nlohmann::json>& events) {
  if (events.empty()) return !cancelled();
  return core_->hub.send(*channel_, events.data(), events.size());
}

inline bool StreamWriter::chat(std::string_view text) {
  return send(nlohmann::json{{"type", "chat"}, {"content", std::string(text)}});
}

inline void StreamWriter::end() { core_->hub.finish(*channel_, std::nullopt); }

inline bool StreamWriter::cancelled() const { return channel_->cancelled.load(); }

inline std::size_t StreamWriter::buffered() const {
  std::lock_guard<std::mutex> lock(channel_->mu);
  return channel_->unsent();
}

inline bool StreamWriter::sleep_for(std::chrono::milliseconds d) {
  return core_->hub.wait(*channel_, d);
}

inline void StreamWriter::on_cancel(std::function<void()> callback) {
  core_->hub.on_cancel(*channel_, std::move(callback));
}

inline const std::string& StreamWriter::dialog_id() const { return channel_->dialog_id; }

}  // namespace agentsmithy
// ---- include/agentsmithy/server/server.hpp
namespace agentsmithy {

inline void ChatService::set_generator(Generator generator) {
  core_.set_producer({std::move(generator), nullptr});
}

inline void ChatService::set_stream_handler(StreamHandler handler) {
  core_.set_producer({nullptr, std::move(handler)});
}

inline std::size_t ChatService::active_streams() const { return core_.hub.active(); }

inline bool ChatService::is_shutting_down() const { return core_.life.shutdown_requested(); }

inline std::optional<ShutdownReport> Server::shutdown_report() const {
  std::lock_guard<std::mutex> lock(core_->mu);
  return core_->final_report;
}

inline Server::Server(Options options)
    : core_(std::make_shared<detail::Core>(std::move(options))), chat_service_(*core_) {}

inline Server::~Server() {
  std::unique_lock<std::mutex> lock(core_->mu);
  if (!core_->listen_called || core_->life.over()) return;
  lock.unlock();
  core_->request_shutdown();
  lock.lock();
  core_->cv.wait(lock, [&] { return core_->life.over(); });
}

inline const Options& Server::options() const { return core_->options; }

namespace detail {

// Linux 6.16+ gives a process a private futex hash sized from the CPU count
// (16 slots on 2 cores), whatever its thread count; with thousands of
// generator threads waiting on condition variables every wake then walks
// long chains. Grow it to fit the threads we may run. Best effort: older
// kernels refuse and keep their global hash.
inline void size_futex_hash(std::size_t threads) {
  constexpr int kFutexHash = 78, kSetSlots = 1, kGetSlots = 2;  // PR_FUTEX_HASH
  unsigned long slots = 16;
  while (slots < threads && slots < (1ul << 16)) slots <<= 1;
  const int current = ::prctl(kFutexHash, kGetSlots, 0, 0, 0);
  if (current >= 0 && static_cast<unsigned long>(current) < slots) {
    ::prctl(kFutexHash, kSetSlots, slots, 0, 0);
  }
}

// The report as one JSON object, durations in milliseconds.
inline nlohmann::json report_json(const ShutdownReport& r) {
  const char* cause = r.cause == ShutdownReport::Cause::signal   ? "signal"
                      : r.cause == ShutdownReport::Cause::forced ? "forced"
                                                                 : "shutdown";
  return {{"started_at", format_utc(r.started, 0, "Z")},
          {"cause", cause},
          {"forced", r.forced},
          {"lame_duck_ms", r.lame_duck.count()},
          {"drain_ms", r.drain.count()},
          {"last_done_ms", r.last_done.count()},
          {"streams_notified", r.streams_notified},
          {"streams_ended_in_grace", r.streams_ended_in_grace},
          {"streams_cut", r.streams_cut},
          {"clients_gone", r.clients_gone},
          {"generators_running", r.generators_running},
          {"idle_connections_closed", r.idle_connections_closed},
          {"requests_refused", r.requests_refused}};
}

// ---------------------------------------------------------------------------
// The shutdown sequence: README "Shutdown sequence", one function a step
// ---------------------------------------------------------------------------

// Runs on the listen thread once listen() has started serving, in the
// README's order. Each step is one named function below; Server::listen()
// calls them in turn.
class ShutdownSequence {
 public:
  ShutdownSequence(Core& core, HttpFrontend& http, std::thread& acceptor)
      : core_(core), http_(http), acceptor_(acceptor), o_(core.options) {}

  // Waits until shutdown() or a signal asks for it (at once if one did before
  // listen()).
  void wait_for_request() {
    wait_for([&] { return core_.life.shutdown_requested(); }, std::nullopt);
    started_ = Clock::now();
    std::lock_guard<std::mutex> lock(core_.mu);
    report_ = core_.report;
  }

  // 1. /health answers 503 "stopping"; with a lame duck everything else is
  // served as before for that long (a second signal cuts it short).
  void lame_duck() {
    if (o_.lame_duck.count() > 0 && !core_.life.forced()) {
      core_.life.enter(Phase::lame_duck);
      core_.log(LogLevel::info, "lame duck for " + std::to_string(o_.lame_duck.count()) +
                                    " ms: /health answers 503, streams go on");
      wait_for([&] { return core_.life.forced(); }, started_ + o_.lame_duck);
    }
    report_.lame_duck = since(started_);
  }

  // 2. The drain begins: new chats and host routes get 503 (see
  // admission_decision), idle keep-alive connections close at once, a
  // connection still without its first request gets kFirstRequestGrace.
  void begin_drain() {
    drain_started_ = Clock::now();
    const std::size_t admitted = core_.admitted.load(), active = core_.hub.active();
    report_.clients_gone = admitted > active ? admitted - active : 0;
    core_.begin_drain();
  }

  // 3. Every open stream ends: it is cancelled, generator threads drop to the
  // idle scheduling class, the on_cancel callbacks run, then one thread
  // writes every stream's shutdown error + done + last chunk
  // (StreamHub::write_shutdown_tails) and only then closes the sockets.
  void end_every_stream() {
    const auto cancelled = core_.hub.cancel_all_for_shutdown();
    // Producers only have to notice and return now; thousands of them
    // runnable (each callback below may wake one) would share the CPU equally
    // with the thread running the callbacks and writing every final event.
    core_.demote_generator_threads();
    core_.hub.run_cancel_callbacks(cancelled);
    notified_ = core_.hub.write_shutdown_tails(cancelled);
    report_.last_done = since(started_);
    core_.log(LogLevel::info,
              std::to_string(notified_) + (notified_ == 1 ? " stream" : " streams") + " notified");
  }

  // 4. Waits up to grace_period for the streams, their producers and open
  // requests; then closes whatever is left.
  void wait_for_drain() {
    bool drained = wait_for([&] { return core_.life.forced() || core_.drained(); },
                            drain_started_ + o_.grace_period);
    drained = drained && !core_.life.forced();
    const std::size_t still_running = std::min(core_.admitted.load(), notified_);
    report_.streams_notified = notified_;
    report_.streams_ended_in_grace = notified_ - still_running;
    if (drained) {
      core_.log(LogLevel::info, "drained in " + std::to_string(elapsed_ms(drain_started_)) + " ms");
    } else {
      const std::size_t generators = core_.admitted.load();
      report_.streams_cut = core_.hub.close_all() + core_.shut_down_connections();
      core_.log(LogLevel::warning,
                std::string(core_.life.forced() ? "forced" : "grace period over") + " after " +
                    std::to_string(elapsed_ms(drain_started_)) + " ms: closed " +
                    std::to_string(report_.streams_cut) + " connections; " +
                    std::to_string(generators) +
                    " generators still running are left to finish on their own");
    }
    report_.forced = core_.life.forced();
    report_.drain = since(drain_started_);
  }

  // 5. Stops serving: the accept loop, the listening socket, the waiting
  // room and the worker pool, the stream hub.
  void stop_serving() {
    http_.stop_accepting();
    acceptor_.join();
    http_.close_listener();
    http_.stop_workers();
    core_.hub.close_all();
    core_.hub.stop();
  }

  // 6. The on_shutdown hooks, in order; one that throws is logged.
  void run_hooks() {
    std::vector<std::function<void()>> hooks;
    {
      std::lock_guard<std::mutex> lock(core_.mu);
      hooks = core_.hooks;
    }
    for (std::size_t i = 0; i < hooks.size(); ++i) {
      try {
        hooks[i]();
      } catch (const std::exception& e) {
        core_.log(LogLevel::error, "on_shutdown hook " + std::to_string(i) + " threw: " + e.what());
      } catch (...) {
        core_.log(LogLevel::error, "on_shutdown hook " + std::to_string(i) + " threw");
      }
    }
  }

  // 7. The report: logged as one record, kept for Server::shutdown_report(),
  // counted in /metrics; then the server is stopped.
  void report() {
    report_.generators_running = core_.admitted.load();
    report_.idle_connections_closed = core_.idle_closed.load();
    report_.requests_refused = core_.refused.load();
    core_.metrics.count_drain(report_.drain, report_.streams_notified, report_.streams_cut);
    core_.log(LogLevel::info, "shutdown report " + report_json(report_).dump());
    {
      std::lock_guard<std::mutex> lock(core_.mu);
      core_.final_report = report_;
    }
    core_.log(LogLevel::info, "stopped");
    core_.life.enter(Phase::stopped);
  }

 private:
  template <class Pred>
  bool wait_for(Pred pred, std::optional<Clock::time_point> until) {
    std::unique_lock<std::mutex> lock(core_.mu);
    if (!until) {
      core_.cv.wait(lock, pred);
      return true;
    }
    return core_.cv.wait_until(lock, *until, pred);
  }
  static std::chrono::milliseconds since(Clock::time_point t) {
    return std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - t);
  }

  Core& core_;
  HttpFrontend& http_;
  std::thread& acceptor_;
  const Options& o_;
  ShutdownReport report_;
  Clock::time_point started_, drain_started_;
  std::size_t notified_ = 0;
};

// status.json follows the lifecycle (Options::status_file).
inline void write_status_on_transition(Core& core) {
  core.life.observe([&core](Phase phase, const std::string& why) {
    StatusFile& status = *core.status;
    switch (phase) {
      case Phase::ready: status.ready(core.port.load()); break;
      case Phase::lame_duck:
      case Phase::draining:
        if (!core.status_stopping_written) status.stopping();
        core.status_stopping_written = true;
        break;
      case Phase::stopped: status.stopped(); break;
      case Phase::failed: status.error(why); break;
      case Phase::starting: break;
    }
  });
}

}  // namespace detail

inline bool Server::listen() {
  using detail::Phase;
  const std::shared_ptr<detail::Core> core = core_;
  const Options& o = core->options;
  {
    std::lock_guard<std::mutex> lock(core->mu);
    if (core->listen_called) {
      core->log(LogLevel::error, "listen() called again: a Server serves once");
      return false;
    }
    core->listen_called = true;
  }
  if (o.status_file) {
    // A raw pointer: the status file is a member of the Core it logs to (a
    // shared_ptr here would keep the Core alive forever).
    detail::Core* const self = core.get();
    core->status.emplace(o.workdir, [self](LogLevel level, const std::string& message) {
      self->log(level, message);
    });
    if (const auto refused = core->status->claim(
            o.port_attempts > 1 || o.port == 0 ? std::nullopt : std::optional<int>(o.port))) {
      core->log(LogLevel::error, "cannot start: " + *refused);
      core->life.enter(Phase::failed);  // the status file stays the other server's
      return false;
    }
    detail::write_status_on_transition(*core);
  }

  detail::HttpFrontend http(core);
  std::string why;
  const int port = http.bind(why);
  if (port < 0) {
    const std::string message =
        "cannot listen on " + o.host + ":" + std::to_string(o.port) + ": " + why;
    core->log(LogLevel::error, message);
    core->life.enter(Phase::failed, message);
    return false;
  }
  core->port = port;
  // There is always a current dialog (AgentSmithy's clients need one).
  try {
    std::lock_guard<std::mutex> lock(core->current_dialog_mu);
    detail::ensure_current_dialog(*core->store);
  } catch (const std::exception& e) {
    core->store_health.failed("creating the current dialog", e);
  }
  detail::size_futex_hash(o.max_streams + 64);
  core->hub.start();
  std::thread acceptor([&] {
    detail::name_thread("as-accept");
    if (!http.listen_after_bind()) {
      core->log(LogLevel::error, "accepting connections failed; shutting down");
      core->request_shutdown();
    }
  });
  core->life.enter(Phase::ready);
  core->log(LogLevel::info, "ready on " + o.host + ":" + std::to_string(port));

  // The shutdown sequence, step by step as the README numbers it.
  detail::ShutdownSequence shutdown(*core, http, acceptor);
  shutdown.wait_for_request();
  shutdown.lame_duck();         // 1.
  shutdown.begin_drain();       // 2.
  shutdown.end_every_stream();  // 3.
  shutdown.wait_for_drain();    // 4.
  shutdown.stop_serving();      // 5.
  shutdown.run_hooks();         // 6.
  shutdown.report();            // 7.
  return true;
}

inline bool Server::wait_until_ready(std::chrono::milliseconds timeout) const {
  std::unique_lock<std::mutex> lock(core_->mu);
  core_->cv.wait_for(lock, timeout, [&] { return core_->life.phase() != detail::Phase::starting; });
  return core_->life.started();
}

inline int Server::port() const { return core_->port.load(); }

inline void Server::shutdown() { core_->request_shutdown(); }

inline void Server::force_shutdown() { core_->request_force(); }

inline bool Server::is_shutting_down() const { return core_->life.shutdown_requested(); }

inline void Server::on_shutdown(std::function<void()> hook) {
  std::lock_guard<std::mutex> lock(core_->mu);
  core_->hooks.push_back(std::move(hook));
}

inline void Server::route(const std::string& method, const std::string& path,
                          RouteHandler handler) {
  static const char* const kMethods[] = {"GET", "POST", "PUT", "PATCH", "DELETE"};
  if (std::find_if(std::begin(kMethods), std::end(kMethods),
                   [&](const char* m) { return method == m; }) == std::end(kMethods)) {
    throw std::invalid_argument("Server::route: unknown method '" + method +
                                "' (GET, POST, PUT, PATCH or DELETE)");
  }
  if (path == "/api/chat" || path == "/health" || path == "/metrics" ||
      path.rfind("/api/dialogs", 0) == 0) {
    throw std::invalid_argument("Server::route: " + path + " is served by the server itself");
  }
  if (!handler) throw std::invalid_argument("Server::route: empty handler");
  std::lock_guard<std::mutex> lock(core_->mu);
  if (core_->listen_called) throw std::logic_error("Server::route: call it before listen()");
  core_->routes.push_back({method, path, std::move(handler)});
}

}  // namespace agentsmithy
// ---- include/agentsmithy/signals/signal_hook.hpp
namespace agentsmithy {

// ===========================================================================
// Signal hook
// ===========================================================================

namespace detail {

struct SignalRecord {
  int signo;  // 0: the guard is going away
  std::int64_t at_ns;
};

// The write end of the hook's pipe; the handler's only state.
inline std::atomic<int> g_signal_pipe{-1};
static_assert(std::atomic<int>::is_always_lock_free, "the signal handler needs a lock-free int");

// Async-signal-safe: clock_gettime and write only.
inline void on_signal(int signo) {
  const int saved_errno = errno;
  const int fd = g_signal_pipe.load(std::memory_order_relaxed);
  if (fd >= 0) {
    timespec ts{};
    ::clock_gettime(CLOCK_MONOTONIC, &ts);
    const SignalRecord record{signo,
                              static_cast<std::int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec};
    const ssize_t w = ::write(fd, &record, sizeof record);
    (void)w;
  }
  errno = saved_errno;
}

inline const char* signal_name(int signo) {
  return signo == SIGINT ? "SIGINT" : signo == SIGTERM ? "SIGTERM" : "signal";
}

}  // namespace detail

struct SignalHook::State {
  std::shared_ptr<detail::Core> core;
  int pipe_read = -1, pipe_write = -1;
  struct sigaction previous_int {};
  struct sigaction previous_term {};
  std::atomic<bool> forced{false};
  std::thread watcher;
};

inline SignalHook::SignalHook(std::unique_ptr<State> state) noexcept : state_(std::move(state)) {}
inline SignalHook::SignalHook(SignalHook&& other) noexcept = default;

inline SignalHook& SignalHook::operator=(SignalHook&& other) noexcept {
  if (this != &other) {
    SignalHook dying(std::move(*this));
    state_ = std::move(other.state_);
  }
  return *this;
}

inline SignalHook::~SignalHook() {
  if (!state_) return;
  ::sigaction(SIGINT, &state_->previous_int, nullptr);
  ::sigaction(SIGTERM, &state_->previous_term, nullptr);
  detail::g_signal_pipe.store(-1);
  const detail::SignalRecord stop{0, 0};
  const ssize_t w = ::write(state_->pipe_write, &stop, sizeof stop);
  (void)w;
  state_->watcher.join();
  ::close(state_->pipe_read);
  ::close(state_->pipe_write);
}

inline bool SignalHook::forced() const { return state_ && state_->forced.load(); }

// The handler only records the signal; this thread acts on it, where locks
// and allocation are allowed. A signal within 20 ms of the first belongs to
// the same burst (kill -TERM sent by a supervisor to every process, a
// repeated key) and does not count as the second one.
inline void SignalHook::watch(State& state) {
  detail::name_thread("as-signal");
  constexpr std::int64_t kBurstNs = 20 * 1000 * 1000;
  std::int64_t first_ns = -1;
  for (;;) {
    detail::SignalRecord record{};
    char* into = reinterpret_cast<char*>(&record);
    std::size_t got = 0;
    while (got < sizeof record) {
      const ssize_t n = ::read(state.pipe_read, into + got, sizeof record - got);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return;
      got += static_cast<std::size_t>(n);
    }
    if (record.signo == 0) return;
    const std::string name = detail::signal_name(record.signo);
    if (first_ns < 0) {
      first_ns = record.at_ns;
      state.core->log(LogLevel::info, "signal received: " + name);
      state.core->request_shutdown(ShutdownReport::Cause::signal);
    } else if (record.at_ns - first_ns >= kBurstNs && !state.forced) {
      state.forced = true;
      state.core->log(LogLevel::warning, "second signal received: " + name + "; forcing shutdown");
      state.core->request_force();
    }
  }
}

inline SignalHook install_signal_handlers(Server& server) {
  auto state = std::make_unique<SignalHook::State>();
  state->core = server.core_;
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0)
    throw std::system_error(errno, std::generic_category(), "pipe2");
  state->pipe_read = fds[0];
  state->pipe_write = fds[1];
  // The handler must never block, even if the watcher falls behind.
  ::fcntl(fds[1], F_SETFL, ::fcntl(fds[1], F_GETFL, 0) | O_NONBLOCK);
  int expected = -1;
  if (!detail::g_signal_pipe.compare_exchange_strong(expected, fds[1])) {
    ::close(fds[0]);
    ::close(fds[1]);
    throw std::logic_error("install_signal_handlers: another SignalHook is alive");
  }
  struct sigaction action {};
  action.sa_handler = &detail::on_signal;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESTART;
  if (::sigaction(SIGINT, &action, &state->previous_int) != 0 ||
      ::sigaction(SIGTERM, &action, &state->previous_term) != 0) {
    const int err = errno;
    ::sigaction(SIGINT, &state->previous_int, nullptr);
    detail::g_signal_pipe.store(-1);
    ::close(fds[0]);
    ::close(fds[1]);
    throw std::system_error(err, std::generic_category(), "sigaction");
  }
  SignalHook::State* raw = state.get();
  state->watcher = std::thread([raw] { SignalHook::watch(*raw); });
  return SignalHook(std::move(state));
}

}  // namespace agentsmithy

// Producers written against the public API only: the built-in demo, and the
// OpenAI-compatible upstream (AGENTSMITHY_OPENAI_SUPPORT).
// ---- include/agentsmithy/demo/demo.hpp
namespace agentsmithy {

// ===========================================================================
// The built-in demo, written against the public API
// ===========================================================================

namespace detail {

// Plays the demo for every stream of a handler from one timer thread, through
// the public StreamWriter: the shape of a host whose one inference thread
// feeds many streams. Events due together go out in one send_batch(). A
// cancelled stream is let go at once (on_cancel), not at its next event.
class DemoFeeder {
 public:
  DemoFeeder() : state_(std::make_shared<State>()) {}
  ~DemoFeeder() {
    std::lock_guard<std::mutex> lock(state_->mu);
    state_->stop = true;
    state_->cv.notify_all();
  }
  DemoFeeder(const DemoFeeder&) = delete;
  DemoFeeder& operator=(const DemoFeeder&) = delete;

  void add(std::shared_ptr<StreamWriter> writer, std::unique_ptr<DemoScript> script) {
    auto play = std::make_shared<Play>(Play{std::move(writer), std::move(script)});
    StreamWriter& out = *play->writer;
    {
      std::lock_guard<std::mutex> lock(state_->mu);
      if (!state_->started) {
        std::thread(&DemoFeeder::run, state_).detach();  // throws if out of threads
        state_->started = true;
      }
      schedule_locked(*state_, play, Clock::now());
    }
    // Wake the feeder for a cancelled stream, so that it lets the writer go
    // now and the stream's slot comes free.
    out.on_cancel([weak = std::weak_ptr<Play>(play), state = std::weak_ptr<State>(state_)] {
      const auto p = weak.lock();
      const auto s = state.lock();
      if (!p || !s) return;
      std::lock_guard<std::mutex> lock(s->mu);
      schedule_locked(*s, p, Clock::now());
    });
  }

 private:
  struct Play {
    std::shared_ptr<StreamWriter> writer;  // null once the play is over
    std::unique_ptr<DemoScript> script;
  };
  struct Due {
    Clock::time_point at;
    std::uint64_t seq;  // first come, first served among equal times
    std::shared_ptr<Play> play;
    bool operator>(const Due& other) const {
      return at != other.at ? at > other.at : seq > other.seq;
    }
  };
  struct State {
    std::mutex mu;
    std::condition_variable cv;
    std::priority_queue<Due, std::vector<Due>, std::greater<Due>> queue;
    std::uint64_t seq = 0;
    bool stop = false, started = false;
  };

  static void schedule_locked(State& s, std::shared_ptr<Play> play, Clock::time_point at) {
    const bool sooner = s.queue.empty() || at < s.queue.top().at;
    s.queue.push(Due{at, s.seq++, std::move(play)});
    if (sooner) s.cv.notify_one();
  }

  static constexpr std::size_t kMaxEventsPerStep = 64;     // then other streams get their turn
  static constexpr std::size_t kMaxBuffered = 256 * 1024;  // a slow client: wait, do not pile up

  // Writes the play's events that are due, in one write; tells when the
  // next is due, nothing once the play is over. Keeping the cadence: a step
  // that runs late does not push back every later event, and the events that
  // fell due meanwhile go out together (on a saturated core, one write per
  // event is what the CPU goes to: see bench/RESULTS.md).
  static std::optional<Clock::time_point> step(Play& play, Clock::time_point due,
                                               Clock::time_point now) {
    StreamWriter& out = *play.writer;
    if (out.cancelled()) return std::nullopt;
    if (out.buffered() > kMaxBuffered) return now + std::chrono::milliseconds(5);
    std::vector<nlohmann::json> batch;
    for (std::size_t i = 0; i < kMaxEventsPerStep; ++i) {
      auto event = play.script->next_event();
      if (!event) {
        out.send_batch(batch);
        out.end();
        return std::nullopt;
      }
      batch.push_back(std::move(*event));
      if (const auto pause = play.script->pause_before_next(); pause.count() > 0) {
        due += pause;
        if (due > now) {
          if (!out.send_batch(batch)) return std::nullopt;
          return due;
        }
      }
    }
    if (!out.send_batch(batch)) return std::nullopt;
    return now;  // more is due: after the other streams' turn
  }

  static void run(std::shared_ptr<State> s) {
    name_thread("as-demo");
    std::vector<Due> due;
    std::unique_lock<std::mutex> lock(s->mu);
    while (!s->stop) {
      if (s->queue.empty()) {
        s->cv.wait(lock);
        continue;
      }
      const auto now = Clock::now();
      if (s->queue.top().at > now) {
        // A copy: wait_until keeps reading its argument, and a push while
        // the lock is released may move the queue's storage.
        const Clock::time_point due = s->queue.top().at;
        s->cv.wait_until(lock, due);
        continue;
      }
      while (!s->queue.empty() && s->queue.top().at <= now && due.size() < 4096) {
        due.push_back(s->queue.top());
        s->queue.pop();
      }
      lock.unlock();
      // Writers are released here, outside the lock: ending a stream may run
      // code (the writer's end) that must not wait for this thread.
      for (Due& d : due) {
        if (!d.play->writer) {
          d.play.reset();  // a wake-up for a play that is over already
          continue;
        }
        if (const auto next = step(*d.play, d.at, now)) {
          d.at = *next;
        } else {
          d.play->writer.reset();
          d.play.reset();
        }
      }
      lock.lock();
      for (Due& d : due) {
        if (d.play) schedule_locked(*s, std::move(d.play), d.at);
      }
      due.clear();
    }
  }

  std::shared_ptr<State> state_;
};

}  // namespace detail

inline StreamHandler demo_stream_handler() {
  auto feeder = std::make_shared<detail::DemoFeeder>();
  return [feeder](const ChatRequest& request, std::shared_ptr<StreamWriter> out) {
    std::unique_ptr<detail::DemoScript> script;
    try {
      script = std::make_unique<detail::DemoScript>(request);
    } catch (const std::invalid_argument& e) {
      out->send(detail::error_event(e.what(), "invalid_request"));
      return;
    }
    feeder->add(std::move(out), std::move(script));
  };
}

inline void demo_generator(const ChatRequest& request, StreamWriter& out) {
  std::optional<detail::DemoScript> script;
  try {
    script.emplace(request);
  } catch (const std::invalid_argument& e) {
    out.send(detail::error_event(e.what(), "invalid_request"));
    return;
  }
  while (const auto event = script->next_event()) {
    if (!out.send(*event)) return;
    const auto pause = script->pause_before_next();
    if (pause.count() > 0 && !out.sleep_for(pause)) return;
  }
}

}  // namespace agentsmithy
#ifdef AGENTSMITHY_OPENAI_SUPPORT
// ---- include/agentsmithy/openai/base_url.hpp
namespace agentsmithy {
namespace detail {

// ===========================================================================
// OpenAI upstream: base URL
// ===========================================================================

struct UpstreamUrl {
  bool tls = false;
  std::string host;  // no brackets around IPv6
  int port = 0;
  std::string path;    // prefix + "/chat/completions"
  std::string shown;   // scheme://host:port/prefix, for messages (no credentials)
  std::string target;  // scheme://host:port/path: what libcurl requests
};

inline bool url_host_char(char c) {
  return std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '-' || c == '_';
}

// Splits base_url into its parts and the URL to request; throws std::invalid_argument
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
    const curl_version_info_data* curl = curl_version_info(CURLVERSION_NOW);
    if (!curl || !(curl->features & CURL_VERSION_SSL))
      return fail("is https, but libcurl was built without TLS support");
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
  out.target = out.shown + "/chat/completions";
  return out;
}

}  // namespace detail
}  // namespace agentsmithy
// ---- include/agentsmithy/openai/sse_parser.hpp
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
// ---- include/agentsmithy/openai/chunk_mapper.hpp
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
// ---- include/agentsmithy/openai/transfer_loop.hpp
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
// ---- include/agentsmithy/openai/generator.hpp
namespace agentsmithy {

inline Generator openai_generator(OpenAIOptions options) {
  if (detail::curl_global() != CURLE_OK)
    throw std::runtime_error("openai_generator: curl_global_init failed");
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

}  // namespace agentsmithy
#endif

// clang-format on
