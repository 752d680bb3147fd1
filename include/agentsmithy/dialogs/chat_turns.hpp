namespace agentsmithy {
namespace detail {

// ===========================================================================
// A chat request's turn: its dialog, its memory, its recording
// ===========================================================================

// The dialog a chat request belongs to (AgentSmithy's rule): absent, the
// server's current dialog, created when there is none; unknown but valid, a
// new dialog with that id. Throws StoreError (or what the store throws).
inline void resolve_dialog(Core& core, ChatRequest& request) {
  DialogStore& store = *core.store;
  if (!request.dialog_id.empty()) {
    if (!store.find_dialog(request.dialog_id)) store.create_dialog(request.dialog_id, std::nullopt);
    return;
  }
  std::lock_guard<std::mutex> lock(core.current_dialog_mu);
  request.dialog_id = ensure_current_dialog(store);
}

// Memory (Options::dialog_memory): a request that names its dialog and is
// exactly one user message gets the dialog's earlier turns before it. One
// with more messages manages its own history and is taken as given; one
// without a dialog_id (curl, a load test) is not given the current dialog's.
inline void remember(Core& core, ChatRequest& request, bool named) {
  if (!named || !core.options.dialog_memory || request.messages.size() != 1 ||
      request.messages[0].role != "user") {
    return;
  }
  std::vector<Message> messages =
      memory_messages(core.store->turns(request.dialog_id, kMemoryTurns));
  if (messages.empty()) return;
  messages.push_back(std::move(request.messages[0]));
  request.messages = std::move(messages);
}

// The last user message: what the turn's `user` event shows and position 0
// of its log.
inline std::string user_text(const ChatRequest& request) {
  std::string query;
  for (const Message& m : request.messages) {
    if (m.role == "user") query = m.content;
  }
  return query;
}

// Starts recording the turn of `ch`: a turn its dialog is still running is
// superseded first when the request named the dialog (requests without a
// dialog_id share the current dialog and do not cancel each other); the
// user's message is stored before its `user` event is sent. False when the
// store failed (the turn then ends with store_unavailable).
inline bool start_turn(Core& core, const std::shared_ptr<Channel>& ch, const std::string& query,
                       bool named) {
  std::shared_ptr<Channel> previous;
  if (named) {
    std::lock_guard<std::mutex> lock(core.running_turns_mu);
    std::weak_ptr<Channel>& slot = core.running_turns[ch->dialog_id];
    previous = slot.lock();
    slot = ch;
  }
  if (previous && previous != ch) core.hub.supersede(*previous);
  std::lock_guard<std::mutex> lock(ch->mu);
  if (ch->cancelled) return true;  // the shutdown came first: nothing of it reaches a client
  ch->turn =
      std::make_unique<TurnLog>(core.store, core.store_health, ch->dialog_id, new_dialog_id());
  return ch->turn->begin(query);
}

}  // namespace detail
}  // namespace agentsmithy
