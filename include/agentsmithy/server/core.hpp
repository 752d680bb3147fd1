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
