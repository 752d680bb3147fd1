namespace agentsmithy {
namespace detail {

// ===========================================================================
// Dialogs and history as AgentSmithy's REST API shows them
// ===========================================================================

inline constexpr long long kDefaultHistoryLimit = 20;

// {"id","title" (null until named),"created_at","updated_at"}
inline json dialog_json(const DialogInfo& dialog) {
  return json{{"id", dialog.id},
              {"title", dialog.title ? json(*dialog.title) : json(nullptr)},
              {"created_at", dialog.created_at},
              {"updated_at", dialog.updated_at}};
}

// GET /api/dialogs: {"current_dialog_id": id or null, "dialogs": [...]}, in
// the order given (the store's: updated_at, newest first).
inline json dialog_list_json(const std::vector<DialogInfo>& dialogs,
                             const std::optional<std::string>& current) {
  json list = json::array();
  for (const auto& d : dialogs) list.push_back(dialog_json(d));
  return json{{"current_dialog_id", current ? json(*current) : json(nullptr)},
              {"dialogs", std::move(list)}};
}

// One visible message (a user message, or an assistant text that is not
// blank) with the events that go with it; events[visible] gets the idx.
struct HistoryUnit {
  std::vector<json> events;
  std::size_t visible = 0;
};

inline const std::string& history_text(const json& event) {
  static const std::string empty;
  if (!event.is_object()) return empty;
  const auto it = event.find("content");
  return it != event.end() && it->is_string() ? it->get_ref<const std::string&>() : empty;
}

inline std::size_t units_bytes(const std::vector<HistoryUnit>& units) {
  std::size_t bytes = 64;
  for (const HistoryUnit& u : units) {
    for (const json& e : u.events) bytes += history_text(e).size() + 128;
  }
  return bytes;
}

inline std::string history_type(const json& event) {
  if (!event.is_object()) return {};
  const auto it = event.find("type");
  return it != event.end() && it->is_string() ? it->get<std::string>() : std::string();
}

// What one turn shows in the history: its units and how many events beyond
// the visible messages (reasoning blocks, tool calls, file edits) they hold.
struct TurnUnits {
  std::vector<HistoryUnit> units;
  std::size_t extras = 0;
  std::size_t bytes = 0;  // about what it takes in memory (HistoryCache's bound)
};

// A turn's units: [user, ...] and, when the assistant's text is not blank,
// [reasoning..., chat, tool_call/file_edit...]; with a blank text the
// reasoning, tool_call and file_edit events join the user's unit.
inline TurnUnits turn_units(const TurnRecord& turn) {
  TurnUnits out;
  std::vector<HistoryUnit>& units = out.units;
  if (turn.events.empty()) return out;
  const json& stored_user = turn.events[0];
  json user{{"type", "user"}, {"content", history_text(stored_user)}};
  if (stored_user.is_object()) {
    for (const char* key : {"checkpoint", "session"}) {
      const auto it = stored_user.find(key);
      if (it != stored_user.end() && !it->is_null()) user[key] = *it;
    }
  }

  std::string text;
  std::vector<json> reasoning, after;
  bool in_reasoning = false;
  std::string thought;
  json model_name;
  const auto close_reasoning = [&] {
    if (in_reasoning && !thought.empty()) {
      json block{{"type", "reasoning"}, {"content", thought}};
      if (model_name.is_string()) block["model_name"] = model_name;
      reasoning.push_back(std::move(block));
    }
    in_reasoning = false;
    thought.clear();
    model_name = nullptr;
  };
  for (std::size_t i = 1; i < turn.events.size(); ++i) {
    const json& event = turn.events[i];
    const std::string type = history_type(event);
    if (type == "reasoning_start" || type == "reasoning") {
      if (type == "reasoning_start") close_reasoning();
      in_reasoning = true;
      thought += history_text(event);
      const auto name = event.find("model_name");
      if (name != event.end() && name->is_string()) model_name = *name;
      continue;
    }
    close_reasoning();  // reasoning_end, or any other event, ends a block
    if (type == "chat") {
      text += history_text(event);
    } else if (type == "tool_call" || type == "file_edit") {
      json copy = event;
      copy.erase("dialog_id");
      after.push_back(std::move(copy));
    }
  }
  close_reasoning();
  out.extras = reasoning.size() + after.size();

  HistoryUnit user_unit;
  user_unit.events.push_back(std::move(user));
  const bool chat_visible = std::any_of(text.begin(), text.end(), [](char c) {
    return !std::isspace(static_cast<unsigned char>(c));
  });
  if (!chat_visible) {
    for (auto& e : reasoning) user_unit.events.push_back(std::move(e));
    for (auto& e : after) user_unit.events.push_back(std::move(e));
    units.push_back(std::move(user_unit));
    out.bytes = units_bytes(units);
    return out;
  }
  units.push_back(std::move(user_unit));

  HistoryUnit chat_unit;
  for (auto& e : reasoning) chat_unit.events.push_back(std::move(e));
  json chat{{"type", "chat"}, {"content", std::move(text)}};
  if (turn.outcome != TurnOutcome::completed) {
    chat["outcome"] = turn_outcome_name(turn.outcome);
    if (turn.outcome == TurnOutcome::error && !turn.error_code.empty()) {
      chat["outcome_code"] = turn.error_code;
    }
  }
  chat_unit.visible = chat_unit.events.size();
  chat_unit.events.push_back(std::move(chat));
  for (auto& e : after) chat_unit.events.push_back(std::move(e));
  units.push_back(std::move(chat_unit));
  out.bytes = units_bytes(units);
  return out;
}

// GET /api/dialogs/{id}/history: AgentSmithy's page of the dialog's visible
// messages (user and non-blank assistant texts), `limit` of them (default
// 20) before the exclusive cursor `before` (clamped to their count), or the
// last ones. Callers reject a limit below 1 and a negative before.
inline json history_page_of(const std::string& dialog_id,
                            const std::vector<std::shared_ptr<const TurnUnits>>& turns,
                            std::optional<long long> limit, std::optional<long long> before) {
  std::size_t n = 0, extras = 0;
  for (const auto& t : turns) {
    n += t->units.size();
    extras += t->extras;
  }
  const std::size_t l =
      static_cast<std::size_t>(std::max(0LL, limit.value_or(kDefaultHistoryLimit)));
  std::size_t end = n;
  if (before) end = std::min(n, static_cast<std::size_t>(std::max(0LL, *before)));
  const std::size_t start = end > l ? end - l : 0;

  json events = json::array();
  std::size_t u = 0;  // the idx of the turn's first unit
  for (const auto& t : turns) {
    for (const HistoryUnit& unit : t->units) {
      if (u >= start && u < end) {
        for (std::size_t i = 0; i < unit.events.size(); ++i) {
          events.push_back(unit.events[i]);
          if (i == unit.visible) events.back()["idx"] = u;
        }
      }
      ++u;
    }
  }
  const bool empty = start == end;
  return json{{"dialog_id", dialog_id},         {"events", std::move(events)},
              {"total_events", n + extras},     {"has_more", start > 0},
              {"first_idx", empty ? 0 : start}, {"last_idx", empty ? 0 : end - 1}};
}

inline json history_page(const std::string& dialog_id, const std::vector<TurnRecord>& turns,
                         std::optional<long long> limit, std::optional<long long> before) {
  std::vector<std::shared_ptr<const TurnUnits>> units;
  units.reserve(turns.size());
  for (const auto& turn : turns) units.push_back(std::make_shared<TurnUnits>(turn_units(turn)));
  return history_page_of(dialog_id, units, limit, before);
}

// The history of long dialogs without reading every turn's events on every
// page: each ended turn's units are computed once (an ended turn's log never
// changes, and turn ids are never reused) and kept, the least recently used
// dropped past `max_bytes`. A page then reads the dialog's turn headers and
// the events of the turns not seen ended (usually the last one or none).
class HistoryCache {
 public:
  explicit HistoryCache(std::size_t max_bytes = 32u << 20) : max_bytes_(max_bytes) {}

  json page(DialogStore& store, const std::string& dialog_id, std::optional<long long> limit,
            std::optional<long long> before) {
    const std::vector<TurnRecord> headers =
        store.turn_headers(dialog_id, static_cast<std::size_t>(-1));
    std::vector<std::shared_ptr<const TurnUnits>> turns(headers.size());
    std::size_t first_missing = headers.size();
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (std::size_t i = 0; i < headers.size(); ++i) {
        if (headers[i].outcome != TurnOutcome::running) turns[i] = find_locked(headers[i].turn_id);
        if (!turns[i] && first_missing == headers.size()) first_missing = i;
      }
    }
    if (first_missing < headers.size()) {
      // One read for the tail from the first turn not at hand; a turn that
      // began in between is not on this page, one deleted in between is
      // left out.
      std::unordered_map<std::string, TurnRecord> read;
      for (TurnRecord& t : store.turns(dialog_id, headers.size() - first_missing)) {
        read.emplace(t.turn_id, std::move(t));
      }
      for (std::size_t i = first_missing; i < headers.size(); ++i) {
        if (turns[i]) continue;
        auto it = read.find(headers[i].turn_id);
        std::optional<TurnRecord> record;
        if (it != read.end()) {
          record = std::move(it->second);
        } else {
          record = store.turn(headers[i].turn_id);
        }
        if (!record) continue;
        auto units = std::make_shared<const TurnUnits>(turn_units(*record));
        if (record->outcome != TurnOutcome::running) keep(record->turn_id, units);
        turns[i] = std::move(units);
      }
      turns.erase(std::remove(turns.begin(), turns.end(), nullptr), turns.end());
    }
    return history_page_of(dialog_id, turns, limit, before);
  }

  std::size_t bytes() const {
    std::lock_guard<std::mutex> lock(mu_);
    return bytes_;
  }

 private:
  using Lru = std::list<std::pair<std::string, std::shared_ptr<const TurnUnits>>>;

  std::shared_ptr<const TurnUnits> find_locked(const std::string& turn_id) {
    const auto it = index_.find(turn_id);
    if (it == index_.end()) return nullptr;
    lru_.splice(lru_.begin(), lru_, it->second);
    return it->second->second;
  }

  void keep(const std::string& turn_id, const std::shared_ptr<const TurnUnits>& units) {
    std::lock_guard<std::mutex> lock(mu_);
    if (index_.count(turn_id) != 0 || units->bytes > max_bytes_) return;
    lru_.emplace_front(turn_id, units);
    index_[turn_id] = lru_.begin();
    bytes_ += units->bytes;
    while (bytes_ > max_bytes_ && !lru_.empty()) {
      bytes_ -= lru_.back().second->bytes;
      index_.erase(lru_.back().first);
      lru_.pop_back();
    }
  }

  const std::size_t max_bytes_;
  mutable std::mutex mu_;
  Lru lru_;  // most recently used first
  std::unordered_map<std::string, Lru::iterator> index_;
  std::size_t bytes_ = 0;
};

}  // namespace detail
}  // namespace agentsmithy
