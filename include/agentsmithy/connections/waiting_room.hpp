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
