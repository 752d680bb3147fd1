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
