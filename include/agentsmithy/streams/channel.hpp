namespace agentsmithy {
namespace detail {

// ===========================================================================
// Channels: one per chat request, between its producer and its client
// ===========================================================================

enum class ChannelKind { sse, collect };

// How a stream's events are framed on the wire.
struct StreamFormat {
  bool chunked = true;     // false: HTTP/1.0, the body ends with the connection
  bool event_ids = false;  // the GET route: an `id:` line per event (EventSource)
};

// Everything below `mu` is guarded by it. A channel's socket is written by
// whichever thread has something to say (a producer, the hub thread, the
// shutdown), always under `mu`, so events never interleave and no thread
// waits for another to relay its bytes.
struct Channel {
  Channel(std::uint64_t id_, ChannelKind kind_, int fd_, std::string dialog_id_,
          StreamFormat format_)
      : id(id_), kind(kind_), dialog_id(std::move(dialog_id_)), format(format_), fd(fd_) {}

  const std::uint64_t id;
  const ChannelKind kind;
  const std::string dialog_id;
  const StreamFormat format;
  // Set under `mu`; read without it by cancelled(). True once nothing more
  // can be written: the stream ended or was cancelled.
  std::atomic<bool> cancelled{false};

  std::mutex mu;
  std::condition_variable cv;         // cancellation, the end, and room in `pending`
  int fd;                             // -1 once closed (sse only)
  EventLoop::Watch* watch = nullptr;  // the hub's registration of fd
  std::string pending;                // framed bytes the socket has not taken yet
  std::size_t pending_sent = 0;
  bool ended = false;   // the last event is queued: nothing more is added
  bool closed = false;  // socket closed (sse) or abandoned (collect)
  bool watching_out = false;
  bool ended_by_shutdown = false;
  bool errored = false;  // ended by an error event or a failed producer
  bool producer_spoke = false;
  const Clock::time_point opened = Clock::now();
  Clock::time_point last_write = Clock::now();
  Clock::time_point last_progress = Clock::now();
  std::size_t events = 0;
  std::uint64_t last_event_id = 0;  // format.event_ids
  std::string collected;            // collect: the chat chunks joined
  std::string error;                // collect: the producer's error event
  // The max_streams slot, held until the producer ends the stream (not when
  // it is merely cancelled: the producer may still be running).
  std::shared_ptr<void> hold;
  // on_cancel callbacks; `cancel_due` once a cancellation (not a normal end)
  // happened, `cancel_fired` once they were taken to run.
  std::vector<std::function<void()>> cancel_callbacks;
  // The turn's recording in the dialog store (none: not recorded).
  std::unique_ptr<TurnLog> turn;
  bool cancel_due = false;
  bool cancel_fired = false;

  std::size_t unsent() const { return pending.size() - pending_sent; }

  // One SSE event carrying `json_text`, framed for this stream.
  void frame_locked(std::string& out, std::string_view json_text, int retry_ms = 0) {
    std::string block;
    block.reserve(json_text.size() + 32);
    if (retry_ms > 0) block += "retry: " + std::to_string(retry_ms) + "\n";
    if (format.event_ids) block += "id: " + std::to_string(++last_event_id) + "\n";
    block += "data: ";
    block += json_text;
    block += "\n\n";
    if (format.chunked) {
      append_chunk(out, block);
    } else {
      out += block;
    }
  }

  // How every stream ends: [error,] done, then the terminating chunk. The
  // shutdown's error tells a browser when to come back (`retry:`).
  std::string tail_locked(const std::optional<json>& error, bool shutdown = false) {
    std::string tail;
    if (error) {
      frame_locked(tail, event_text(*error, dialog_id, false),
                   shutdown && format.event_ids ? random_retry_ms() : 0);
    }
    frame_locked(tail, event_text(done_event(), dialog_id, true));
    if (format.chunked) tail.append(kLastChunk);
    return tail;
  }

  // What a stream lets go of when its producer ends it: its slot, and the
  // callbacks that can no longer run (they may hold the writer). Destroyed
  // once `mu` is released.
  struct Leftovers {
    std::shared_ptr<void> hold;
    std::vector<std::function<void()>> callbacks;
  };
  Leftovers end_locked() {
    ended = true;
    cancelled = true;
    cv.notify_all();
    Leftovers left{std::exchange(hold, nullptr), {}};
    if (!cancel_due) left.callbacks.swap(cancel_callbacks);
    return left;
  }
};

}  // namespace detail
}  // namespace agentsmithy
