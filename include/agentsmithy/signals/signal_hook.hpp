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
