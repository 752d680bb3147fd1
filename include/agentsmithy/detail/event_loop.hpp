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
