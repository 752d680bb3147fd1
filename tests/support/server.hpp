// Test support: a server's log records, test options, and a Server whose
// listen() runs on a thread of its own.
#pragma once

#include "base.hpp"

namespace test {

// Collects a server's log records; echoes them to stderr when the environment
// sets AGENTSMITHY_TEST_LOG.
class LogStore {
 public:
  void add(agentsmithy::LogLevel level, const std::string& message) {
    std::lock_guard<std::mutex> lock(mutex_);
    records_.emplace_back(level, message);
    if (echo_)
      std::fprintf(stderr, "  [server log %d] %s\n", static_cast<int>(level), message.c_str());
  }
  bool contains(std::string_view needle,
                agentsmithy::LogLevel at_least = agentsmithy::LogLevel::debug) const {
    return count(needle, at_least) > 0;
  }
  // Records at `at_least` or above that contain `needle`.
  std::size_t count(std::string_view needle,
                    agentsmithy::LogLevel at_least = agentsmithy::LogLevel::debug) const {
    std::lock_guard<std::mutex> lock(mutex_);
    std::size_t n = 0;
    for (const auto& r : records_)
      if (static_cast<int>(r.first) >= static_cast<int>(at_least) &&
          r.second.find(needle) != std::string::npos)
        ++n;
    return n;
  }
  std::string text() const {
    std::lock_guard<std::mutex> lock(mutex_);
    std::string out;
    for (const auto& r : records_) {
      out += "    [" + std::to_string(static_cast<int>(r.first)) + "] " + r.second + "\n";
    }
    return out;
  }

 private:
  mutable std::mutex mutex_;
  std::vector<std::pair<agentsmithy::LogLevel, std::string>> records_;
  bool echo_ = std::getenv("AGENTSMITHY_TEST_LOG") != nullptr;
};

inline agentsmithy::Logger make_logger(const std::shared_ptr<LogStore>& store) {
  return [store](agentsmithy::LogLevel level, const std::string& message) {
    store->add(level, message);
  };
}

// Options for a test server: an ephemeral port, a short grace period, every
// log record captured.
inline agentsmithy::Options test_options() {
  agentsmithy::Options o;
  o.host = "127.0.0.1";
  o.port = 0;
  o.grace_period = 3000ms;
  o.log_level = agentsmithy::LogLevel::debug;
  // The suite asserts the producer's events exactly; the server's opening
  // `user` event has tests of its own (test_browser_routes.cpp).
  o.user_event = false;
  return o;
}

// Server::listen() on a thread of its own: whether and when it returned, and
// what. The destructor asks for a shutdown if listen() has not returned within
// 100 ms, and aborts the process with a message if it still does not return,
// so that a broken server cannot hang the suite.
class ListenThread {
 public:
  explicit ListenThread(agentsmithy::Server& s) : server_(s), thread_([this] { run(); }) {}
  ~ListenThread() {
    if (!thread_.joinable()) return;
    if (!wait(100ms)) server_.shutdown();
    if (!wait(15000ms)) {
      std::fprintf(stderr, "ListenThread: listen() does not return; abort\n");
      std::fflush(stderr);
      std::_Exit(3);
    }
  }
  ListenThread(const ListenThread&) = delete;
  ListenThread& operator=(const ListenThread&) = delete;

  bool returned() const { return returned_.load(); }
  bool result() const { return result_.load(); }
  Clock::time_point returned_at() const { return from_rep(returned_at_.load()); }
  // Waits (without asking for a shutdown) until listen() has returned, and
  // joins the thread then.
  bool wait(milliseconds timeout) {
    const bool ok = wait_until([&] { return returned_.load(); }, timeout);
    if (ok && thread_.joinable()) thread_.join();
    return ok;
  }
  bool joined() const { return !thread_.joinable(); }

 private:
  void run() {
    result_.store(server_.listen());
    returned_at_.store(now_rep());
    returned_.store(true);
  }

  agentsmithy::Server& server_;
  std::atomic<bool> returned_{false};
  std::atomic<bool> result_{false};
  std::atomic<Clock::rep> returned_at_{0};
  std::thread thread_;  // last: it starts once the rest is initialised
};

// A Server with listen() on a ListenThread; the constructor waits until it
// accepts. The destructor calls shutdown() and joins (forcing, then aborting
// the process with a message, if listen() never returns, so that a broken
// server cannot hang the suite).
class RunningServer {
 public:
  using Setup = std::function<void(agentsmithy::Server&)>;

  explicit RunningServer(agentsmithy::Options options = test_options(), const Setup& setup = {})
      : logs(std::make_shared<LogStore>()) {
    if (!options.logger) options.logger = make_logger(logs);
    server_ = std::make_unique<agentsmithy::Server>(std::move(options));
    if (setup) setup(*server_);
    listen_ = std::make_unique<ListenThread>(*server_);
    ready_ = server_->wait_until_ready(5000ms);
  }
  ~RunningServer() { stop(); }
  RunningServer(const RunningServer&) = delete;
  RunningServer& operator=(const RunningServer&) = delete;

  agentsmithy::Server& server() { return *server_; }
  agentsmithy::ChatService& chat() { return server_->chat_service(); }
  bool ready() const { return ready_; }
  int port() const { return server_->port(); }

  bool listen_returned() const { return listen_->returned(); }
  bool listen_result() const { return listen_->result(); }
  Clock::time_point listen_returned_at() const { return listen_->returned_at(); }
  // Waits (without asking for a shutdown) until listen() has returned.
  bool wait_returned(milliseconds timeout) { return listen_->wait(timeout); }
  // Server::shutdown(), then requires that the chat service reports it (and
  // so answers new chats with 503) within 1 s.
  void start_shutdown() {
    server_->shutdown();
    REQUIRE(wait_until([&] { return chat().is_shutting_down(); }, 1000ms));
  }
  // shutdown() and join; see the class comment.
  void stop(milliseconds timeout = 20000ms) {
    if (!listen_ || listen_->joined()) return;
    server_->shutdown();
    if (!listen_->wait(timeout)) {
      std::fprintf(stderr,
                   "RunningServer: listen() did not return %lld ms after shutdown(); "
                   "calling force_shutdown()\nserver log:\n%s",
                   static_cast<long long>(timeout.count()), logs->text().c_str());
      server_->force_shutdown();
      if (!listen_->wait(5000ms)) {
        std::fprintf(stderr, "RunningServer: listen() hangs even after force_shutdown(); abort\n");
        std::fflush(stderr);
        std::_Exit(3);
      }
    }
  }
  // stop() and then destroy the Server object.
  void destroy() {
    stop();
    server_.reset();
  }

  std::shared_ptr<LogStore> logs;

 private:
  std::unique_ptr<agentsmithy::Server> server_;
  std::unique_ptr<ListenThread> listen_;
  bool ready_ = false;
};

// RunningServer setups: the server's chat requests go to `generator`, or to
// the stream handler `handler`.
inline RunningServer::Setup with_generator(agentsmithy::Generator generator) {
  return [generator](agentsmithy::Server& s) { s.chat_service().set_generator(generator); };
}
inline RunningServer::Setup with_handler(agentsmithy::StreamHandler handler) {
  return [handler](agentsmithy::Server& s) { s.chat_service().set_stream_handler(handler); };
}

}  // namespace test
