namespace agentsmithy {

// ===========================================================================
// Dialog store: dialogs, and each turn's events as an append-only log
// ===========================================================================

// A dialog as AgentSmithy's API shows it. Times are ISO 8601 UTC
// ("2026-12-07T11:09:20.123456Z").
struct DialogInfo {
  std::string id;
  std::optional<std::string> title;  // null until named
  std::string created_at;
  std::string updated_at;  // bumped by every turn and by a rename
};

// How a turn ended; `running` while it streams.
enum class TurnOutcome { running, completed, error, shutdown, client_gone, superseded };
const char* turn_outcome_name(TurnOutcome outcome);

// One turn: the user's message and what the assistant streamed, as an
// append-only log. events[i] sits at position i (dense from 0): position 0 is
// {"type":"user","content":...}; then the producer's events as sent
// (without dialog_id): chat, reasoning*, tool_call, file_edit, and the
// turn's error event if it ended with one.
struct TurnRecord {
  std::string turn_id;  // random, never sequential
  std::string dialog_id;
  TurnOutcome outcome = TurnOutcome::running;
  std::string error_code;  // outcome error: the error event's "code"
  std::string started_at, ended_at;
  std::vector<nlohmann::json> events;
};

// Thrown by a store that cannot read or write (disk full, file removed,
// locked, Redis down); the server keeps serving (see README, "Dialogs").
struct StoreError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Where the server keeps dialogs and their turns. A host can implement it
// over its own database; every method may be called from any thread,
// concurrently. The server calls:
//   - begin_turn() when a turn starts, before its `user` event is sent;
//   - append() as the producer's events are sent (from the streams' threads:
//     must not block for long; a store batches writes off that path);
//   - end_turn() and then sync() before a turn's `done` reaches the client
//     (sync: everything appended so far is durable);
//   - the dialog methods for the REST API and for dialog_id resolution;
//   - turns() for memory (the model's input) and for history.
class DialogStore {
 public:
  virtual ~DialogStore() = default;

  virtual std::vector<DialogInfo> list_dialogs() = 0;  // updated_at, newest first
  virtual std::optional<DialogInfo> find_dialog(const std::string& id) = 0;
  // Creates the dialog (an existing id: returned as it is).
  virtual DialogInfo create_dialog(const std::string& id,
                                   const std::optional<std::string>& title) = 0;
  virtual std::optional<DialogInfo> rename_dialog(const std::string& id,
                                                  const std::string& title) = 0;
  // Removes the dialog and its turns; deleting the current dialog leaves none
  // current. A running turn of a deleted dialog is dropped: its later
  // append() and end_turn() are ignored.
  virtual bool delete_dialog(const std::string& id) = 0;  // false: unknown
  virtual std::optional<std::string> current_dialog() = 0;
  // An unknown id throws std::invalid_argument.
  virtual void set_current_dialog(const std::optional<std::string>& id) = 0;

  // The turn log. `user_event` is position 0. An unknown dialog is created
  // (AgentSmithy adopts unknown ids); a turn_id already used throws
  // std::invalid_argument.
  virtual void begin_turn(const std::string& dialog_id, const std::string& turn_id,
                          const nlohmann::json& user_event) = 0;
  // Events at positions first .. first + events.size() - 1. Positions the
  // log already holds are skipped (a replay); a gap throws
  // std::invalid_argument; an unknown turn is ignored.
  virtual void append(const std::string& turn_id, std::uint64_t first,
                      const std::vector<nlohmann::json>& events) = 0;
  virtual void end_turn(const std::string& turn_id, TurnOutcome outcome,
                        const std::string& error_code) = 0;  // the first end is final
  virtual void sync() = 0;
  // The dialog's turns in order, the last `max_turns` of them.
  virtual std::vector<TurnRecord> turns(const std::string& dialog_id, std::size_t max_turns) = 0;
  virtual std::optional<TurnRecord> turn(const std::string& turn_id) = 0;
  // turns() without the events: history reads the events only of turns it
  // has not seen end (an ended turn never changes). The default drops them
  // from turns(); a store that can list turns more cheaply overrides it.
  virtual std::vector<TurnRecord> turn_headers(const std::string& dialog_id,
                                               std::size_t max_turns) {
    std::vector<TurnRecord> out = turns(dialog_id, max_turns);
    for (TurnRecord& t : out) t.events.clear();
    return out;
  }

  // True when other processes share it (issue 18: hand-off at shutdown).
  virtual bool shared() const { return false; }
};

// Keeps everything in this process, at most `max_bytes` of event text; the
// dialogs updated longest ago are evicted first. The default store.
std::shared_ptr<DialogStore> memory_store(std::size_t max_bytes = 64 << 20);

// Keeps dialogs in the SQLite file at `path` (created when missing; WAL
// mode), so that they outlive the process. append() only queues: one writer
// thread commits what is queued in one transaction, within 20 ms, and at
// once when sync() waits; after a crash at most the last ~100 ms of a
// running turn are missing. A file that cannot be opened or is not a valid
// store (not SQLite, another application's database, a newer schema) throws
// StoreError naming the file and the reason; so does a failure at run time
// (disk full, file removed, locked), from the call or the next sync().
// Compiled only with AGENTSMITHY_SQLITE_SUPPORT defined before the include
// (and linked with libsqlite3).
#ifdef AGENTSMITHY_SQLITE_SUPPORT
std::shared_ptr<DialogStore> sqlite_store(const std::string& path);
#else
namespace detail {
template <class T>
inline constexpr bool needs_sqlite_support = false;
}  // namespace detail
// Without the define, a call fails to compile with this message.
template <class Path = std::string>
std::shared_ptr<DialogStore> sqlite_store(const Path&) {
  static_assert(detail::needs_sqlite_support<Path>,
                "sqlite_store needs AGENTSMITHY_SQLITE_SUPPORT: #define it before including "
                "agentsmithy.hpp and link libsqlite3 (pkg-config sqlite3)");
  return {};
}
#endif

}  // namespace agentsmithy
