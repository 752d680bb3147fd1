namespace agentsmithy {
namespace detail {

// ===========================================================================
// Turn log: what a stream's client is sent, recorded in the dialog store
// ===========================================================================

// The message a client gets (a turn, the dialogs API) when the store cannot be read: no detail
// of the store's (a path, a host) reaches a client.
inline constexpr std::string_view kStoreUnavailable = "The dialog store is unavailable";

// The store's health as /health (store_ok) and /metrics
// (agentsmithy_store_errors_total) show it. A failure is logged at most once
// a minute; the server keeps serving.
class StoreHealth {
 public:
  explicit StoreHealth(std::function<void(const std::string&)> warn) : warn_(std::move(warn)) {}

  void failed(const std::string& what, const std::exception& e) {
    ok_ = false;
    errors_.fetch_add(1, std::memory_order_relaxed);
    const auto now = Clock::now().time_since_epoch().count();
    auto last = last_log_.load();
    const auto minute =
        std::chrono::duration_cast<Clock::duration>(std::chrono::minutes(1)).count();
    if ((last == 0 || now - last >= minute) && last_log_.compare_exchange_strong(last, now)) {
      warn_("dialog store: " + what + " failed: " + e.what() +
            " (streams go on; logged at most once a minute)");
    }
  }
  void succeeded() {
    if (!ok_.load(std::memory_order_relaxed)) ok_ = true;
  }
  bool ok() const { return ok_.load(); }
  std::uint64_t errors() const { return errors_.load(); }

 private:
  const std::function<void(const std::string&)> warn_;
  std::atomic<bool> ok_{true};
  std::atomic<std::uint64_t> errors_{0};
  std::atomic<Clock::rep> last_log_{0};
};

// One turn's recording. The hub calls it under the turn's channel lock, so
// the log has the client's events in the client's order: an event is
// recorded before its bytes are queued, and the outcome (with a sync) before
// `done` is. A store failure is counted and the stream goes on unrecorded.
class TurnLog {
 public:
  TurnLog(std::shared_ptr<DialogStore> store, StoreHealth& health, std::string dialog_id,
          std::string turn_id)
      : store_(std::move(store)),
        health_(health),
        dialog_id_(std::move(dialog_id)),
        turn_id_(std::move(turn_id)) {}

  const std::string& turn_id() const { return turn_id_; }
  const std::shared_ptr<DialogStore>& store() const { return store_; }
  bool ended() const { return ended_; }

  // Position 0: the user's message. False (and nothing more is recorded)
  // when the store fails.
  bool begin(const std::string& user_text) {
    return attempt("begin_turn", [&] {
      store_->begin_turn(dialog_id_, turn_id_, json{{"type", "user"}, {"content", user_text}});
    });
  }

  // The producer's events, as sent (without dialog_id), done excluded.
  void record(const json* events, std::size_t count) {
    if (ended_ || broken_ || count == 0) return;
    std::vector<json> batch;
    batch.reserve(count);
    for (std::size_t i = 0; i < count; ++i) {
      const auto type = events[i].find("type");
      if (type != events[i].end() && *type == "done") continue;
      json e = events[i];
      e.erase("dialog_id");
      batch.push_back(std::move(e));
    }
    if (batch.empty()) return;
    const std::uint64_t first = next_;
    next_ += batch.size();
    attempt("append", [&] { store_->append(turn_id_, first, batch); });
  }

  // The outcome, once. `sync`: durable before returning (before `done` is
  // queued for the client).
  void end(TurnOutcome outcome, const std::string& code, bool sync) {
    if (ended_) return;
    ended_ = true;
    if (broken_) return;
    attempt("end_turn", [&] {
      store_->end_turn(turn_id_, outcome, code);
      if (sync) store_->sync();
    });
  }
  void sync() {
    if (!broken_) attempt("sync", [&] { store_->sync(); });
  }

 private:
  template <class F>
  bool attempt(const char* what, F&& f) {
    try {
      f();
      health_.succeeded();
      return true;
    } catch (const std::exception& e) {
      broken_ = true;
      health_.failed(std::string(what) + " for dialog " + dialog_id_, e);
      return false;
    }
  }

  const std::shared_ptr<DialogStore> store_;
  StoreHealth& health_;
  const std::string dialog_id_, turn_id_;
  std::uint64_t next_ = 1;  // 0 is the user's message
  bool ended_ = false;
  bool broken_ = false;  // the store failed: the rest of the turn is not recorded
};

// The outcome an error event gives its turn: its code.
inline std::string error_code_of(const json& event) {
  const auto code = event.find("code");
  return code != event.end() && code->is_string() ? code->get<std::string>() : std::string();
}

// ---------------------------------------------------------------------------
// Memory: a dialog's earlier turns as the model's input
// ---------------------------------------------------------------------------

// The bound on what memory prepends to a request: the last kMemoryTurns
// turns, and of those only the newest that fit in kMemoryBytes of text.
inline constexpr std::size_t kMemoryTurns = 50;
inline constexpr std::size_t kMemoryBytes = 256 * 1024;

// The user and assistant texts of `turns`, in order: the user's message,
// then the assistant's chat text (a cut answer as the user saw it) when any.
inline std::vector<Message> memory_messages(const std::vector<TurnRecord>& turns) {
  std::vector<std::vector<Message>> per_turn;
  for (const TurnRecord& t : turns) {
    std::vector<Message> messages;
    std::string assistant;
    for (const json& e : t.events) {
      const auto type = e.find("type");
      const auto content = e.find("content");
      if (type == e.end() || content == e.end() || !content->is_string()) continue;
      if (*type == "user") {
        messages.push_back(Message{"user", content->get<std::string>()});
      } else if (*type == "chat") {
        assistant += content->get_ref<const std::string&>();
      }
    }
    if (!assistant.empty()) messages.push_back(Message{"assistant", std::move(assistant)});
    per_turn.push_back(std::move(messages));
  }
  // The newest turns that fit.
  std::size_t bytes = 0, first = per_turn.size();
  while (first > 0) {
    std::size_t size = 0;
    for (const Message& m : per_turn[first - 1]) size += m.content.size();
    if (bytes + size > kMemoryBytes) break;
    bytes += size;
    --first;
  }
  std::vector<Message> out;
  for (std::size_t i = first; i < per_turn.size(); ++i) {
    for (Message& m : per_turn[i]) out.push_back(std::move(m));
  }
  return out;
}

}  // namespace detail
}  // namespace agentsmithy
