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

inline std::string history_type(const json& event) {
  if (!event.is_object()) return {};
  const auto it = event.find("type");
  return it != event.end() && it->is_string() ? it->get<std::string>() : std::string();
}

// Appends a turn's units: [user, ...] and, when the assistant's text is not
// blank, [reasoning..., chat, tool_call/file_edit...]; with a blank text
// the reasoning, tool_call and file_edit events join the user's unit.
// `extras` counts the reasoning blocks, tool calls and file edits.
inline void history_units(const TurnRecord& turn, std::vector<HistoryUnit>& units,
                          std::size_t& extras) {
  if (turn.events.empty()) return;
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
  extras += reasoning.size() + after.size();

  HistoryUnit user_unit;
  user_unit.events.push_back(std::move(user));
  const bool chat_visible = std::any_of(text.begin(), text.end(), [](char c) {
    return !std::isspace(static_cast<unsigned char>(c));
  });
  if (!chat_visible) {
    for (auto& e : reasoning) user_unit.events.push_back(std::move(e));
    for (auto& e : after) user_unit.events.push_back(std::move(e));
    units.push_back(std::move(user_unit));
    return;
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
}

// GET /api/dialogs/{id}/history: AgentSmithy's page of the dialog's visible
// messages (user and non-blank assistant texts), `limit` of them (default
// 20) before the exclusive cursor `before` (clamped to their count), or the
// last ones. Callers reject a limit below 1 and a negative before.
inline json history_page(const std::string& dialog_id, const std::vector<TurnRecord>& turns,
                         std::optional<long long> limit, std::optional<long long> before) {
  std::vector<HistoryUnit> units;
  std::size_t extras = 0;
  for (const auto& turn : turns) history_units(turn, units, extras);

  const std::size_t n = units.size();
  const std::size_t l =
      static_cast<std::size_t>(std::max(0LL, limit.value_or(kDefaultHistoryLimit)));
  std::size_t end = n;
  if (before) end = std::min(n, static_cast<std::size_t>(std::max(0LL, *before)));
  const std::size_t start = end > l ? end - l : 0;

  json events = json::array();
  for (std::size_t u = start; u < end; ++u) {
    for (std::size_t i = 0; i < units[u].events.size(); ++i) {
      json& event = units[u].events[i];
      if (i == units[u].visible) event["idx"] = u;
      events.push_back(std::move(event));
    }
  }
  const bool empty = start == end;
  return json{{"dialog_id", dialog_id},         {"events", std::move(events)},
              {"total_events", n + extras},     {"has_more", start > 0},
              {"first_idx", empty ? 0 : start}, {"last_idx", empty ? 0 : end - 1}};
}

}  // namespace detail
}  // namespace agentsmithy
