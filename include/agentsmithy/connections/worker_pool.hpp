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
