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
