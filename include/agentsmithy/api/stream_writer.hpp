namespace agentsmithy {

// ===========================================================================
// Stream writer: what a generator or a stream handler writes its events to
// ===========================================================================

// One chat request's answer. Every method may be called from any thread, also
// concurrently: events are written whole, in the order the calls returned.
//
// The stream ends when an "error" or "done" event is sent ("done" follows an
// error), when end() is called, or when the last reference to the writer is
// released (a generator's writer: when the generator returns). Until it ends
// it holds one of Options::max_streams slots, also after a cancellation.
class StreamWriter {
 public:
  // Writes one event: an object with a string "type"; "dialog_id" is added.
  // Returns false once the stream is cancelled (client gone, shutdown) or
  // ended, and from then on writes nothing. An "error" or "done" event ends
  // the stream. Throws std::invalid_argument for an event that is not such an
  // object. Never blocks unless the client reads slower than events come
  // (then up to Options::write_timeout, after which the client is dropped).
  bool send(const nlohmann::json& event);
  // Like send() for each event in order, in one write to the socket: for a
  // producer that has several events at hand. False once cancelled.
  bool send_batch(const std::vector<nlohmann::json>& events);
  // Shorthand for send({"type":"chat","content":text}).
  bool chat(std::string_view text);
  // Ends the stream: appends "done" unless an error or done was sent.
  // Idempotent; a no-op once cancelled (the server ended the stream).
  void end();
  // True once cancelled or ended: nothing more will be written.
  bool cancelled() const;
  // Bytes written that the client has not taken yet. A producer feeding many
  // streams from one thread skips a stream while this is large, instead of
  // blocking in send() for one slow client.
  std::size_t buffered() const;
  // Waits d on the calling thread; true after the full delay, false at once
  // when cancelled.
  bool sleep_for(std::chrono::milliseconds d);
  // `callback` runs exactly once if the stream is cancelled (client gone,
  // shutdown, grace deadline, forced shutdown), on a server thread, within
  // 10 ms of the cause, while the producer may be blocked in a call it is
  // meant to interrupt (close a socket, abort a decode). Registered after the
  // cancellation, it runs at once on the calling thread. Never runs for a
  // stream that ended normally. Callbacks run in registration order; one that
  // throws is logged and the rest still run. Keep them short; they may call
  // any method of this writer.
  void on_cancel(std::function<void()> callback);
  const std::string& dialog_id() const;

  // Ends the stream as end() does if it has not ended.
  ~StreamWriter();
  StreamWriter(const StreamWriter&) = delete;
  StreamWriter& operator=(const StreamWriter&) = delete;

 private:
  friend class detail::HttpFrontend;
  StreamWriter(std::shared_ptr<detail::Core> core, std::shared_ptr<detail::Channel> channel);
  const std::shared_ptr<detail::Core> core_;  // first: outlives the channel's release
  const std::shared_ptr<detail::Channel> channel_;
};

// Produces the answer to one request by writing events, on a thread of its
// own for the whole stream; may block. Should return soon after send()
// returns false or an on_cancel callback runs. Returning ends the stream with
// "done"; throwing ends it with an "error" event (code "generator_error").
using Generator = std::function<void(const ChatRequest&, StreamWriter&)>;

// Starts the answer to one request and returns at once, typically handing the
// writer to the producer that feeds it (an inference thread batching many
// sequences, an event loop). Called on a server thread; the stream stays open
// until the writer ends (see StreamWriter). Throwing ends the stream with an
// "error" event (code "generator_error").
using StreamHandler = std::function<void(const ChatRequest&, std::shared_ptr<StreamWriter>)>;

// The built-in demo: chat_start, chat chunks of a few words 20 ms apart,
// chat_end. "Tell me a long story" gets a story of over 2,000 words. A request
// sets the pace with context.demo = {"tokens": N, "interval_ms": M}, N in
// [1, 1000000] chunks, M in [0, 60000] ms; other values end the stream with an
// error event (code "invalid_request").
//
// demo_stream_handler() plays it for every stream from one timer thread
// through the public StreamWriter (the server's default); demo_generator()
// plays it as a blocking Generator, one thread per stream.
StreamHandler demo_stream_handler();
void demo_generator(const ChatRequest& request, StreamWriter& out);

}  // namespace agentsmithy
