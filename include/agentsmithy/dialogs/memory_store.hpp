namespace agentsmithy {

inline const char* turn_outcome_name(TurnOutcome outcome) {
  switch (outcome) {
    case TurnOutcome::running: return "running";
    case TurnOutcome::completed: return "completed";
    case TurnOutcome::error: return "error";
    case TurnOutcome::shutdown: return "shutdown";
    case TurnOutcome::client_gone: return "client_gone";
    case TurnOutcome::superseded: return "superseded";
  }
  return "running";
}

namespace detail {

// ===========================================================================
// The memory dialog store (the default)
// ===========================================================================

// About the size of `e` dumped as JSON, without dumping it (it is counted for
// every event a stream sends).
inline std::size_t json_bytes(const nlohmann::json& e) {
  switch (e.type()) {
    case nlohmann::json::value_t::object: {
      std::size_t n = 2;
      for (const auto& [key, value] : e.items()) n += key.size() + 4 + json_bytes(value);
      return n;
    }
    case nlohmann::json::value_t::array: {
      std::size_t n = 2;
      for (const auto& value : e) n += 1 + json_bytes(value);
      return n;
    }
    case nlohmann::json::value_t::string: return e.get_ref<const std::string&>().size() + 2;
    default: return 8;
  }
}

// Everything under one mutex. Its size is about the dumped JSON of every
// stored event (json_bytes) plus every title; past `max_bytes` the dialogs updated longest ago
// are evicted (never the current one, nor one with a running turn).
class MemoryDialogStore final : public DialogStore {
 public:
  explicit MemoryDialogStore(std::size_t max_bytes) : max_bytes_(max_bytes) {}

  std::vector<DialogInfo> list_dialogs() override {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<DialogInfo> out;
    out.reserve(dialogs_.size());
    for (auto it = by_updated_.rbegin(); it != by_updated_.rend(); ++it) {
      out.push_back(dialogs_.at(it->second).info);
    }
    return out;
  }

  std::optional<DialogInfo> find_dialog(const std::string& id) override {
    std::lock_guard<std::mutex> lock(mu_);
    const auto it = dialogs_.find(id);
    if (it == dialogs_.end()) return std::nullopt;
    return it->second.info;
  }

  DialogInfo create_dialog(const std::string& id,
                           const std::optional<std::string>& title) override {
    std::lock_guard<std::mutex> lock(mu_);
    const DialogInfo info = create_locked(id, title).info;
    enforce_bound_locked();
    return info;
  }

  std::optional<DialogInfo> rename_dialog(const std::string& id,
                                          const std::string& title) override {
    std::lock_guard<std::mutex> lock(mu_);
    const auto it = dialogs_.find(id);
    if (it == dialogs_.end()) return std::nullopt;
    Dialog& d = it->second;
    const std::size_t old_size = d.info.title ? d.info.title->size() : 0;
    d.info.title = title;
    d.bytes = d.bytes - old_size + title.size();
    bytes_ = bytes_ - old_size + title.size();
    touch_locked(d);
    const DialogInfo info = d.info;
    enforce_bound_locked();
    return info;
  }

  bool delete_dialog(const std::string& id) override {
    std::lock_guard<std::mutex> lock(mu_);
    const auto it = dialogs_.find(id);
    if (it == dialogs_.end()) return false;
    erase_locked(it);
    return true;
  }

  std::optional<std::string> current_dialog() override {
    std::lock_guard<std::mutex> lock(mu_);
    return current_;
  }

  void set_current_dialog(const std::optional<std::string>& id) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (id && dialogs_.count(*id) == 0) {
      throw std::invalid_argument("set_current_dialog: unknown dialog " + *id);
    }
    current_ = id;
    enforce_bound_locked();  // the previous current one may go now
  }

  void begin_turn(const std::string& dialog_id, const std::string& turn_id,
                  const nlohmann::json& user_event) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (turns_.count(turn_id) != 0) {
      throw std::invalid_argument("begin_turn: turn id already used: " + turn_id);
    }
    Dialog& d = create_locked(dialog_id, std::nullopt);
    TurnRecord turn;
    turn.turn_id = turn_id;
    turn.dialog_id = dialog_id;
    turn.started_at = next_stamp_locked();
    turn.events.push_back(user_event);
    const std::size_t size = json_bytes(user_event);
    turns_.emplace(turn_id, std::move(turn));
    d.turn_ids.push_back(turn_id);
    d.bytes += size;
    bytes_ += size;
    ++d.running;
    touch_locked(d);
    enforce_bound_locked();
  }

  void append(const std::string& turn_id, std::uint64_t first,
              const std::vector<nlohmann::json>& events) override {
    std::lock_guard<std::mutex> lock(mu_);
    const auto it = turns_.find(turn_id);
    if (it == turns_.end()) return;
    TurnRecord& turn = it->second;
    const std::uint64_t have = turn.events.size();
    if (first > have) {
      throw std::invalid_argument("append: position " + std::to_string(first) +
                                  " leaves a gap after " + std::to_string(have));
    }
    std::size_t added = 0;
    for (std::uint64_t i = have - first; i < events.size(); ++i) {
      added += json_bytes(events[i]);
      turn.events.push_back(events[i]);
    }
    if (first + events.size() <= have) return;  // all of it a replay
    Dialog& d = dialogs_.at(turn.dialog_id);
    d.bytes += added;
    bytes_ += added;
    enforce_bound_locked();  // updated_at moves when a turn begins and ends
  }

  void end_turn(const std::string& turn_id, TurnOutcome outcome,
                const std::string& error_code) override {
    std::lock_guard<std::mutex> lock(mu_);
    const auto it = turns_.find(turn_id);
    if (it == turns_.end()) return;
    TurnRecord& turn = it->second;
    if (turn.outcome != TurnOutcome::running || outcome == TurnOutcome::running) return;
    turn.outcome = outcome;
    turn.error_code = outcome == TurnOutcome::error ? error_code : std::string();
    turn.ended_at = next_stamp_locked();
    Dialog& d = dialogs_.at(turn.dialog_id);
    --d.running;
    touch_locked(d);
    enforce_bound_locked();
  }

  void sync() override {}

  std::vector<TurnRecord> turns(const std::string& dialog_id, std::size_t max_turns) override {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<TurnRecord> out;
    const auto it = dialogs_.find(dialog_id);
    if (it == dialogs_.end()) return out;
    const auto& ids = it->second.turn_ids;
    const std::size_t n = std::min(max_turns, ids.size());
    out.reserve(n);
    for (std::size_t i = ids.size() - n; i < ids.size(); ++i) out.push_back(turns_.at(ids[i]));
    return out;
  }

  std::vector<TurnRecord> turn_headers(const std::string& dialog_id,
                                       std::size_t max_turns) override {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<TurnRecord> out;
    const auto it = dialogs_.find(dialog_id);
    if (it == dialogs_.end()) return out;
    const auto& ids = it->second.turn_ids;
    const std::size_t n = std::min(max_turns, ids.size());
    out.reserve(n);
    for (std::size_t i = ids.size() - n; i < ids.size(); ++i) {
      const TurnRecord& t = turns_.at(ids[i]);
      out.push_back(TurnRecord{
          t.turn_id, t.dialog_id, t.outcome, t.error_code, t.started_at, t.ended_at, {}});
    }
    return out;
  }

  std::optional<TurnRecord> turn(const std::string& turn_id) override {
    std::lock_guard<std::mutex> lock(mu_);
    const auto it = turns_.find(turn_id);
    if (it == turns_.end()) return std::nullopt;
    return it->second;
  }

  // The bytes counted against the bound (for tests and metrics).
  std::size_t bytes_used() const {
    std::lock_guard<std::mutex> lock(mu_);
    return bytes_;
  }

 private:
  struct Dialog {
    DialogInfo info;
    std::vector<std::string> turn_ids;
    std::size_t bytes = 0;
    int running = 0;
  };
  using DialogMap = std::unordered_map<std::string, Dialog>;

  // A timestamp later than every earlier one, so that updated_at orders the
  // dialogs totally even within one microsecond or if the clock steps back.
  std::string next_stamp_locked() {
    auto now =
        std::chrono::time_point_cast<std::chrono::microseconds>(std::chrono::system_clock::now());
    if (now <= last_stamp_) now = last_stamp_ + std::chrono::microseconds(1);
    last_stamp_ = now;
    return format_utc(now, 6, "Z");
  }

  void touch_locked(Dialog& d) {
    by_updated_.erase(std::make_pair(d.info.updated_at, d.info.id));
    d.info.updated_at = next_stamp_locked();
    by_updated_.emplace(d.info.updated_at, d.info.id);
  }

  Dialog& create_locked(const std::string& id, const std::optional<std::string>& title) {
    const auto it = dialogs_.find(id);
    if (it != dialogs_.end()) return it->second;
    Dialog d;
    d.info.id = id;
    d.info.title = title;
    d.info.created_at = d.info.updated_at = next_stamp_locked();
    d.bytes = title ? title->size() : 0;
    bytes_ += d.bytes;
    by_updated_.emplace(d.info.updated_at, id);
    return dialogs_.emplace(id, std::move(d)).first->second;
  }

  void erase_locked(DialogMap::iterator it) {
    Dialog& d = it->second;
    for (const auto& turn_id : d.turn_ids) turns_.erase(turn_id);
    by_updated_.erase(std::make_pair(d.info.updated_at, d.info.id));
    bytes_ -= d.bytes;
    if (current_ == d.info.id) current_.reset();
    dialogs_.erase(it);
  }

  // Evicts the dialogs updated longest ago until the store fits, skipping the
  // current one and those with a running turn.
  // Still over (the current dialog, or one with a running turn, holds the
  // bytes): their oldest ended turns go, so that no dialog grows the store
  // past its bound.
  void enforce_bound_locked() {
    auto next = by_updated_.begin();
    while (bytes_ > max_bytes_ && next != by_updated_.end()) {
      const auto it = dialogs_.find((next++)->second);
      if (it->second.running > 0 || current_ == it->first) continue;
      erase_locked(it);  // `next` stays valid: only this dialog's entry goes
    }
    for (auto d = by_updated_.begin(); bytes_ > max_bytes_ && d != by_updated_.end(); ++d) {
      Dialog& dialog = dialogs_.at(d->second);
      auto& ids = dialog.turn_ids;
      for (std::size_t k = 0; bytes_ > max_bytes_ && k < ids.size();) {
        const auto turn = turns_.find(ids[k]);
        if (turn->second.outcome == TurnOutcome::running) {
          ++k;
          continue;
        }
        std::size_t size = 0;
        for (const nlohmann::json& e : turn->second.events) size += json_bytes(e);
        size = std::min(size, dialog.bytes);
        dialog.bytes -= size;
        bytes_ -= size;
        turns_.erase(turn);
        ids.erase(ids.begin() + static_cast<std::ptrdiff_t>(k));
      }
    }
  }

  mutable std::mutex mu_;
  const std::size_t max_bytes_;
  std::size_t bytes_ = 0;
  DialogMap dialogs_;
  std::unordered_map<std::string, TurnRecord> turns_;
  std::set<std::pair<std::string, std::string>> by_updated_;  // (updated_at, id), oldest first
  std::optional<std::string> current_;
  std::chrono::time_point<std::chrono::system_clock, std::chrono::microseconds> last_stamp_{};
};

}  // namespace detail

inline std::shared_ptr<DialogStore> memory_store(std::size_t max_bytes) {
  return std::make_shared<detail::MemoryDialogStore>(max_bytes);
}

}  // namespace agentsmithy
