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
