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
