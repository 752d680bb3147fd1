namespace agentsmithy {
namespace detail {

// ===========================================================================
// The SQLite dialog store (AGENTSMITHY_SQLITE_SUPPORT)
// ===========================================================================

// One file in WAL mode. The dialogs, the current one and what each turn of
// this process has begun (its dialog, its next position, whether it runs)
// live in memory too, so that append() only checks positions and queues
// its events: one writer thread owns the write connection and commits
// everything queued in one transaction (group commit), kSqliteLinger after
// the first queued write at the latest, at once when a sync() or a read
// waits. Reads of turns wait until what was queued before them is committed,
// then read on their own connection.
//
// Schema (version 1):
//   meta(key PK, value)            application marker, schema_version,
//                                  current_dialog
//   dialogs(id PK, title, created_at, updated_at), index on updated_at
//   turns(seq INTEGER PK, turn_id UNIQUE, dialog_id, outcome, error_code,
//         started_at, ended_at), index on (dialog_id, seq)
//   events(turn_id, pos, json, PK (turn_id, pos)) WITHOUT ROWID
// Deleting a dialog deletes its turns and their events (by hand, in the
// same transaction).
inline constexpr const char* kSqliteStoreMarker = "agentsmithy-dialogs";
inline constexpr int kSqliteSchemaVersion = 1;
inline constexpr std::chrono::milliseconds kSqliteLinger{20};
inline constexpr std::size_t kSqliteMaxBatch = 20000;     // queued writes that start a commit
inline constexpr std::size_t kSqliteEndedCached = 10000;  // ended turns kept in memory

class SqliteDialogStore final : public DialogStore {
 public:
  explicit SqliteDialogStore(std::string path) : path_(std::move(path)) {
    open();
    load();
    writer_ = std::thread([this] { writer_loop(); });
  }

  ~SqliteDialogStore() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    writer_cv_.notify_all();
    if (writer_.joinable()) writer_.join();
    // The statements, then the connections (members, in reverse order).
  }

  SqliteDialogStore(const SqliteDialogStore&) = delete;
  SqliteDialogStore& operator=(const SqliteDialogStore&) = delete;

  const std::string& path() const { return path_; }

  std::vector<DialogInfo> list_dialogs() override {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<DialogInfo> out;
    out.reserve(dialogs_.size());
    for (auto it = by_updated_.rbegin(); it != by_updated_.rend(); ++it) {
      out.push_back(dialogs_.at(it->second));
    }
    return out;
  }

  std::optional<DialogInfo> find_dialog(const std::string& id) override {
    std::lock_guard<std::mutex> lock(mu_);
    const auto it = dialogs_.find(id);
    if (it == dialogs_.end()) return std::nullopt;
    return it->second;
  }

  DialogInfo create_dialog(const std::string& id,
                           const std::optional<std::string>& title) override {
    std::lock_guard<std::mutex> lock(mu_);
    throw_failure_locked();
    return create_locked(id, title);
  }

  std::optional<DialogInfo> rename_dialog(const std::string& id,
                                          const std::string& title) override {
    std::lock_guard<std::mutex> lock(mu_);
    throw_failure_locked();
    const auto it = dialogs_.find(id);
    if (it == dialogs_.end()) return std::nullopt;
    it->second.title = title;
    Op op;
    op.kind = OpKind::rename;
    op.a = id;
    op.b = title;
    touch_locked(it->second, op);
    enqueue_locked(std::move(op));
    return it->second;
  }

  bool delete_dialog(const std::string& id) override {
    std::lock_guard<std::mutex> lock(mu_);
    throw_failure_locked();
    const auto it = dialogs_.find(id);
    if (it == dialogs_.end()) return false;
    by_updated_.erase(std::make_pair(it->second.updated_at, id));
    dialogs_.erase(it);
    Op op;
    op.kind = OpKind::remove;
    op.a = id;
    const std::uint64_t seq = enqueue_locked(std::move(op));
    if (current_ == id) set_current_locked(std::nullopt);
    // Its running turns are dropped: their later append() and end_turn()
    // are ignored.
    for (auto& [turn_id, t] : turns_) {
      if (t.dialog_id != id || t.dropped) continue;
      t.dropped = true;
      if (t.running) ended_.emplace_back(seq, turn_id);
      t.running = false;
    }
    return true;
  }

  std::optional<std::string> current_dialog() override {
    std::lock_guard<std::mutex> lock(mu_);
    return current_;
  }

  void set_current_dialog(const std::optional<std::string>& id) override {
    std::lock_guard<std::mutex> lock(mu_);
    throw_failure_locked();
    if (id && dialogs_.count(*id) == 0) {
      throw std::invalid_argument("set_current_dialog: unknown dialog " + *id);
    }
    set_current_locked(id);
  }

  void begin_turn(const std::string& dialog_id, const std::string& turn_id,
                  const nlohmann::json& user_event) override {
    std::string user = dump_json(user_event);
    std::lock_guard<std::mutex> lock(mu_);
    throw_failure_locked();
    const auto it = turns_.find(turn_id);
    if ((it != turns_.end() && !it->second.dropped) ||
        (it == turns_.end() && turn_in_file(turn_id))) {
      throw std::invalid_argument("begin_turn: turn id already used: " + turn_id);
    }
    create_locked(dialog_id, std::nullopt);
    DialogInfo& d = dialogs_.at(dialog_id);
    TurnState state;
    state.dialog_id = dialog_id;
    turns_[turn_id] = state;
    Op op;
    op.kind = OpKind::begin;
    op.a = turn_id;
    op.b = dialog_id;
    op.n = next_seq_++;
    op.stamp = next_stamp_locked();
    op.events.push_back(std::move(user));
    touch_locked(d, op);
    enqueue_locked(std::move(op));
  }

  void append(const std::string& turn_id, std::uint64_t first,
              const std::vector<nlohmann::json>& events) override {
    std::vector<std::string> dumped;
    dumped.reserve(events.size());
    for (const nlohmann::json& e : events) dumped.push_back(dump_json(e));
    std::unique_lock<std::mutex> lock(mu_);
    throw_failure_locked();
    TurnState* t = find_turn_locked(lock, turn_id);
    if (t == nullptr || t->dropped) return;
    const std::uint64_t have = t->next;
    if (first > have) {
      throw std::invalid_argument("append: position " + std::to_string(first) +
                                  " leaves a gap after " + std::to_string(have));
    }
    if (first + dumped.size() <= have) return;  // all of it a replay
    Op op;
    op.kind = OpKind::events;
    op.a = turn_id;
    op.n = have;
    op.events.assign(
        std::make_move_iterator(dumped.begin() + static_cast<std::ptrdiff_t>(have - first)),
        std::make_move_iterator(dumped.end()));
    t->next = first + dumped.size();
    enqueue_locked(std::move(op));  // updated_at moves when a turn begins and ends
  }

  void end_turn(const std::string& turn_id, TurnOutcome outcome,
                const std::string& error_code) override {
    std::unique_lock<std::mutex> lock(mu_);
    throw_failure_locked();
    TurnState* t = find_turn_locked(lock, turn_id);
    if (t == nullptr || t->dropped) return;
    if (!t->running || outcome == TurnOutcome::running) return;
    t->running = false;
    Op op;
    op.kind = OpKind::end;
    op.a = turn_id;
    op.b = outcome == TurnOutcome::error ? error_code : std::string();
    op.n = static_cast<std::uint64_t>(outcome);
    op.stamp = next_stamp_locked();
    touch_locked(dialogs_.at(t->dialog_id), op);
    ended_.emplace_back(enqueue_locked(std::move(op)), turn_id);
    evict_ended_locked();
  }

  // Everything queued before the call is committed; a failed commit since
  // the last report throws here.
  void sync() override {
    std::unique_lock<std::mutex> lock(mu_);
    wait_committed_locked(lock, queued_seq_);
    throw_failure_locked();
  }

  std::vector<TurnRecord> turns(const std::string& dialog_id, std::size_t max_turns) override {
    return read_turns(dialog_id, max_turns, true);
  }

  std::vector<TurnRecord> turn_headers(const std::string& dialog_id,
                                       std::size_t max_turns) override {
    return read_turns(dialog_id, max_turns, false);
  }

  std::optional<TurnRecord> turn(const std::string& turn_id) override {
    {
      std::unique_lock<std::mutex> lock(mu_);
      wait_committed_locked(lock, queued_seq_);
    }
    std::lock_guard<std::mutex> read(read_mu_);
    ReadSnapshot snapshot(*this);
    std::optional<TurnRecord> out;
    {
      Use q(*this, rdb_.get(), turn_by_id_, "cannot read a turn");
      q.text(1, turn_id);
      if (q.step()) out = q.turn_row();
    }
    if (out) read_events(*out);
    return out;
  }

 private:
  using Stamp = std::chrono::time_point<std::chrono::system_clock, std::chrono::microseconds>;

  // ---- SQLite handles ------------------------------------------------------

  struct DbClose {
    void operator()(sqlite3* db) const { sqlite3_close_v2(db); }
  };
  struct StmtFinalize {
    void operator()(sqlite3_stmt* s) const { sqlite3_finalize(s); }
  };
  using Db = std::unique_ptr<sqlite3, DbClose>;
  using Stmt = std::unique_ptr<sqlite3_stmt, StmtFinalize>;

  [[noreturn]] void fail(sqlite3* db, const std::string& what) const {
    throw StoreError(path_ + ": " + what + ": " + (db ? sqlite3_errmsg(db) : "out of memory"));
  }

  void exec(sqlite3* db, const char* sql, const std::string& what) const {
    if (sqlite3_exec(db, sql, nullptr, nullptr, nullptr) != SQLITE_OK) fail(db, what);
  }

  Stmt prepare(sqlite3* db, const char* sql) const {
    sqlite3_stmt* s = nullptr;
    if (sqlite3_prepare_v3(db, sql, -1, SQLITE_PREPARE_PERSISTENT, &s, nullptr) != SQLITE_OK) {
      fail(db, std::string("cannot prepare \"") + sql + "\"");
    }
    return Stmt(s);
  }

  // One use of a prepared statement: binds (the values must outlive it),
  // steps, and resets it when it goes.
  class Use {
   public:
    Use(const SqliteDialogStore& store, sqlite3* db, const Stmt& stmt, const char* what)
        : store_(store), db_(db), s_(stmt.get()), what_(what) {}
    ~Use() {
      sqlite3_reset(s_);
      sqlite3_clear_bindings(s_);
    }
    Use(const Use&) = delete;
    Use& operator=(const Use&) = delete;

    void text(int i, const std::string& v) {
      check(sqlite3_bind_text(s_, i, v.data(), static_cast<int>(v.size()), SQLITE_STATIC));
    }
    void text(int i, const std::optional<std::string>& v) {
      if (v) return text(i, *v);
      check(sqlite3_bind_null(s_, i));
    }
    void int64(int i, sqlite3_int64 v) { check(sqlite3_bind_int64(s_, i, v)); }
    // True: a row.
    bool step() {
      const int rc = sqlite3_step(s_);
      if (rc == SQLITE_ROW) return true;
      if (rc == SQLITE_DONE) return false;
      store_.fail(db_, what_);
    }
    void run() {
      while (step()) {
      }
    }
    std::string column(int i) const {
      const auto* p = reinterpret_cast<const char*>(sqlite3_column_text(s_, i));
      return p ? std::string(p, static_cast<std::size_t>(sqlite3_column_bytes(s_, i)))
               : std::string();
    }
    std::optional<std::string> nullable(int i) const {
      if (sqlite3_column_type(s_, i) == SQLITE_NULL) return std::nullopt;
      return column(i);
    }
    sqlite3_int64 integer(int i) const { return sqlite3_column_int64(s_, i); }
    // turn_id, dialog_id, outcome, error_code, started_at, ended_at
    TurnRecord turn_row() const {
      TurnRecord t;
      t.turn_id = column(0);
      t.dialog_id = column(1);
      t.outcome = outcome_of(column(2));
      t.error_code = column(3);
      t.started_at = column(4);
      t.ended_at = column(5);
      return t;
    }

   private:
    void check(int rc) {
      if (rc != SQLITE_OK) store_.fail(db_, what_);
    }
    const SqliteDialogStore& store_;
    sqlite3* const db_;
    sqlite3_stmt* const s_;
    const char* const what_;
  };

  // One read transaction on the read connection: a turn and its events as
  // of one commit.
  class ReadSnapshot {
   public:
    explicit ReadSnapshot(const SqliteDialogStore& store) : db_(store.rdb_.get()) {
      store.exec(db_, "BEGIN", "cannot begin a read");
    }
    ~ReadSnapshot() { sqlite3_exec(db_, "COMMIT", nullptr, nullptr, nullptr); }
    ReadSnapshot(const ReadSnapshot&) = delete;
    ReadSnapshot& operator=(const ReadSnapshot&) = delete;

   private:
    sqlite3* const db_;
  };

  static TurnOutcome outcome_of(const std::string& name) {
    for (TurnOutcome o : {TurnOutcome::completed, TurnOutcome::error, TurnOutcome::shutdown,
                          TurnOutcome::client_gone, TurnOutcome::superseded}) {
      if (name == turn_outcome_name(o)) return o;
    }
    return TurnOutcome::running;
  }

  // ---- Opening -------------------------------------------------------------

  Db connect(int flags) const {
    sqlite3* raw = nullptr;
    const int rc = sqlite3_open_v2(path_.c_str(), &raw, flags | SQLITE_OPEN_NOMUTEX, nullptr);
    Db db(raw);
    if (rc != SQLITE_OK) fail(db.get(), "cannot open");
    sqlite3_extended_result_codes(db.get(), 1);
    // Our one writer never waits for itself; another process's lock (the
    // sqlite3 shell) is waited for this long, then the commit fails: a turn's
    // done is held at most that long, and the shutdown not even that.
    if (sqlite3_busy_timeout(db.get(), 1000) != SQLITE_OK)
      fail(db.get(), "cannot set busy_timeout");
    return db;
  }

  void open() {
    wdb_ = connect(SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE);
    if (sqlite3_db_readonly(wdb_.get(), "main") == 1) {
      throw StoreError(path_ + ": cannot open for writing: the file is read-only");
    }
    // The first read of the file: what it is.
    if (sqlite3_exec(wdb_.get(), "PRAGMA journal_mode=WAL", nullptr, nullptr, nullptr) !=
        SQLITE_OK) {
      if ((sqlite3_extended_errcode(wdb_.get()) & 0xff) == SQLITE_NOTADB) {
        fail(wdb_.get(), "not a valid store (not an SQLite database)");
      }
      fail(wdb_.get(), "cannot use WAL mode");
    }
    exec(wdb_.get(), "PRAGMA synchronous=NORMAL", "cannot set synchronous=NORMAL");
    // Every running turn appends to its own pages: with a thousand streams a
    // commit touches a thousand pages, which the default 2 MiB cache would
    // read back from the file each time.
    exec(wdb_.get(), "PRAGMA cache_size=-65536", "cannot set cache_size");
    exec(wdb_.get(), "BEGIN IMMEDIATE", "cannot lock the file to check its schema");
    try {
      check_or_create_schema();
      exec(wdb_.get(), "COMMIT", "cannot commit the schema");
    } catch (...) {
      sqlite3_exec(wdb_.get(), "ROLLBACK", nullptr, nullptr, nullptr);
      throw;
    }

    insert_dialog_ = prepare(wdb_.get(),
                             "INSERT OR IGNORE INTO dialogs(id, title, created_at, updated_at) "
                             "VALUES(?1, ?2, ?3, ?3)");
    rename_dialog_ = prepare(wdb_.get(), "UPDATE dialogs SET title = ?2 WHERE id = ?1");
    touch_dialog_ =
        prepare(wdb_.get(), "UPDATE dialogs SET updated_at = ?2 WHERE id = ?1 AND updated_at < ?2");
    delete_events_ = prepare(wdb_.get(),
                             "DELETE FROM events WHERE turn_id IN "
                             "(SELECT turn_id FROM turns WHERE dialog_id = ?1)");
    delete_turns_ = prepare(wdb_.get(), "DELETE FROM turns WHERE dialog_id = ?1");
    delete_dialog_ = prepare(wdb_.get(), "DELETE FROM dialogs WHERE id = ?1");
    set_current_ =
        prepare(wdb_.get(), "INSERT OR REPLACE INTO meta(key, value) VALUES('current_dialog', ?1)");
    insert_turn_ = prepare(wdb_.get(),
                           "INSERT OR IGNORE INTO turns(seq, turn_id, dialog_id, outcome, "
                           "error_code, started_at, ended_at) "
                           "VALUES(?3, ?1, ?2, 'running', '', ?4, NULL)");
    insert_event_ =
        prepare(wdb_.get(), "INSERT OR IGNORE INTO events(turn_id, pos, json) VALUES(?1, ?2, ?3)");
    end_turn_ = prepare(wdb_.get(),
                        "UPDATE turns SET outcome = ?2, error_code = ?3, ended_at = ?4 "
                        "WHERE turn_id = ?1 AND outcome = 'running'");

    rdb_ = connect(SQLITE_OPEN_READWRITE);
    exec(rdb_.get(), "PRAGMA query_only=1", "cannot set query_only");
    static constexpr const char* kTurnColumns =
        "SELECT turn_id, dialog_id, outcome, error_code, started_at, "
        "coalesce(ended_at, ''), seq FROM turns ";
    turns_of_dialog_ = prepare(
        rdb_.get(),
        (std::string(kTurnColumns) + "WHERE dialog_id = ?1 ORDER BY seq DESC LIMIT ?2").c_str());
    turn_by_id_ = prepare(rdb_.get(), (std::string(kTurnColumns) + "WHERE turn_id = ?1").c_str());
    events_of_turn_ =
        prepare(rdb_.get(), "SELECT json FROM events WHERE turn_id = ?1 ORDER BY pos");
    next_pos_ =
        prepare(rdb_.get(), "SELECT coalesce(max(pos) + 1, 0) FROM events WHERE turn_id = ?1");
  }

  // In the open transaction: an empty file gets the schema; any other must
  // be a store of this version or older.
  void check_or_create_schema() {
    sqlite3* db = wdb_.get();
    Stmt tables = prepare(db, "SELECT count(*) FROM sqlite_master");
    sqlite3_int64 count = 0;
    {
      Use q(*this, db, tables, "cannot read the schema");
      if (q.step()) count = q.integer(0);
    }
    if (count == 0) {
      exec(db,
           "CREATE TABLE meta(key TEXT PRIMARY KEY, value);"
           "CREATE TABLE dialogs(id TEXT PRIMARY KEY, title TEXT, created_at TEXT NOT NULL,"
           " updated_at TEXT NOT NULL);"
           "CREATE INDEX dialogs_by_updated ON dialogs(updated_at);"
           "CREATE TABLE turns(seq INTEGER PRIMARY KEY, turn_id TEXT NOT NULL UNIQUE,"
           " dialog_id TEXT NOT NULL, outcome TEXT NOT NULL, error_code TEXT NOT NULL,"
           " started_at TEXT NOT NULL, ended_at TEXT);"
           "CREATE INDEX turns_by_dialog ON turns(dialog_id, seq);"
           "CREATE TABLE events(turn_id TEXT NOT NULL, pos INTEGER NOT NULL, json TEXT NOT NULL,"
           " PRIMARY KEY(turn_id, pos)) WITHOUT ROWID;",
           "cannot create the schema");
      const std::string meta = std::string("INSERT INTO meta(key, value) VALUES('application', '") +
                               kSqliteStoreMarker + "'), ('schema_version', " +
                               std::to_string(kSqliteSchemaVersion) + ")";
      exec(db, meta.c_str(), "cannot create the schema");
      return;
    }
    const char* invalid =
        "not a valid store (an SQLite database that is not agentsmithy's dialog store)";
    Stmt marker = prepare_or_null(db, "SELECT value FROM meta WHERE key = 'application'");
    if (!marker) throw StoreError(path_ + ": " + invalid);
    {
      Use q(*this, db, marker, "cannot read the schema");
      if (!q.step() || q.column(0) != kSqliteStoreMarker) throw StoreError(path_ + ": " + invalid);
    }
    Stmt version = prepare(db, "SELECT value FROM meta WHERE key = 'schema_version'");
    sqlite3_int64 v = 0;
    {
      Use q(*this, db, version, "cannot read the schema version");
      if (q.step()) v = q.integer(0);
    }
    if (v > kSqliteSchemaVersion) {
      throw StoreError(path_ + ": not a valid store: its schema version " + std::to_string(v) +
                       " is newer than this build's " + std::to_string(kSqliteSchemaVersion));
    }
    if (v < 1) throw StoreError(path_ + ": not a valid store: no schema version");
    for (const char* table : {"dialogs", "turns", "events"}) {
      Stmt probe =
          prepare_or_null(db, (std::string("SELECT 1 FROM ") + table + " LIMIT 1").c_str());
      if (!probe) {
        throw StoreError(path_ + ": not a valid store: table " + table + " is missing");
      }
    }
  }

  Stmt prepare_or_null(sqlite3* db, const char* sql) const {
    sqlite3_stmt* s = nullptr;
    if (sqlite3_prepare_v2(db, sql, -1, &s, nullptr) != SQLITE_OK) return Stmt();
    return Stmt(s);
  }

  // The dialogs, the current one, the next turn's seq, the last stamp.
  void load() {
    sqlite3* db = rdb_.get();
    std::string newest;
    {
      Stmt all = prepare(db, "SELECT id, title, created_at, updated_at FROM dialogs");
      Use q(*this, db, all, "cannot read the dialogs");
      while (q.step()) {
        DialogInfo d;
        d.id = q.column(0);
        d.title = q.nullable(1);
        d.created_at = q.column(2);
        d.updated_at = q.column(3);
        newest = std::max(newest, d.updated_at);
        by_updated_.emplace(d.updated_at, d.id);
        std::string id = d.id;
        dialogs_.emplace(std::move(id), std::move(d));
      }
    }
    {
      Stmt current = prepare(db, "SELECT value FROM meta WHERE key = 'current_dialog'");
      Use q(*this, db, current, "cannot read the current dialog");
      if (q.step()) current_ = q.nullable(0);
      if (current_ && dialogs_.count(*current_) == 0) current_.reset();
    }
    {
      Stmt seq = prepare(db, "SELECT coalesce(max(seq), 0) + 1 FROM turns");
      Use q(*this, db, seq, "cannot read the turns");
      if (q.step()) next_seq_ = static_cast<std::uint64_t>(q.integer(0));
    }
    last_stamp_ = parse_stamp(newest);
  }

  // "2026-12-07T11:09:20.123456Z" back to a time point (epoch if it is not one).
  static Stamp parse_stamp(const std::string& s) {
    int y = 0, mo = 0, d = 0, h = 0, mi = 0, sec = 0, us = 0;
    if (std::sscanf(s.c_str(), "%4d-%2d-%2dT%2d:%2d:%2d.%6d", &y, &mo, &d, &h, &mi, &sec, &us) !=
        7) {
      return Stamp{};
    }
    std::tm tm{};
    tm.tm_year = y - 1900;
    tm.tm_mon = mo - 1;
    tm.tm_mday = d;
    tm.tm_hour = h;
    tm.tm_min = mi;
    tm.tm_sec = sec;
    const std::time_t t = ::timegm(&tm);
    return Stamp{std::chrono::seconds(t) + std::chrono::microseconds(us)};
  }

  // ---- The state in memory ---------------------------------------------------

  struct TurnState {
    std::string dialog_id;
    std::uint64_t next = 1;  // the next position
    bool running = true;
    bool dropped = false;  // its dialog was deleted
  };

  enum class OpKind { create, rename, remove, current, begin, events, end };
  // One queued write. a: the dialog or turn id; b: title, dialog id (begin),
  // error code (end); opt: title (create) or current id; n: seq (begin),
  // first position (events), outcome (end); stamp: created, started or
  // ended; touched/touch: the dialog whose updated_at this write sets.
  struct Op {
    OpKind kind = OpKind::create;
    std::string a, b, stamp;
    std::optional<std::string> opt;
    std::uint64_t n = 0;
    std::vector<std::string> events;
    std::string touched, touch;
  };

  std::string next_stamp_locked() {
    auto now =
        std::chrono::time_point_cast<std::chrono::microseconds>(std::chrono::system_clock::now());
    if (now <= last_stamp_) now = last_stamp_ + std::chrono::microseconds(1);
    last_stamp_ = now;
    return format_utc(now, 6, "Z");
  }

  void touch_locked(DialogInfo& d, Op& op) {
    by_updated_.erase(std::make_pair(d.updated_at, d.id));
    d.updated_at = next_stamp_locked();
    by_updated_.emplace(d.updated_at, d.id);
    op.touched = d.id;
    op.touch = d.updated_at;
  }

  DialogInfo create_locked(const std::string& id, const std::optional<std::string>& title) {
    const auto it = dialogs_.find(id);
    if (it != dialogs_.end()) return it->second;
    DialogInfo d;
    d.id = id;
    d.title = title;
    d.created_at = d.updated_at = next_stamp_locked();
    by_updated_.emplace(d.updated_at, id);
    Op op;
    op.kind = OpKind::create;
    op.a = id;
    op.opt = title;
    op.stamp = d.created_at;
    enqueue_locked(std::move(op));
    dialogs_.emplace(id, d);
    return d;
  }

  void set_current_locked(const std::optional<std::string>& id) {
    current_ = id;
    Op op;
    op.kind = OpKind::current;
    op.opt = id;
    enqueue_locked(std::move(op));
  }

  // The turn's state: from memory, else (after the queue is committed) from
  // the file; null when there is no such turn.
  TurnState* find_turn_locked(std::unique_lock<std::mutex>& lock, const std::string& turn_id) {
    auto it = turns_.find(turn_id);
    if (it != turns_.end()) return &it->second;
    wait_committed_locked(lock, queued_seq_);
    it = turns_.find(turn_id);  // begun while we waited
    if (it != turns_.end()) return &it->second;
    std::lock_guard<std::mutex> read(read_mu_);
    std::optional<TurnRecord> row;
    {
      Use q(*this, rdb_.get(), turn_by_id_, "cannot read a turn");
      q.text(1, turn_id);
      if (q.step()) row = q.turn_row();
    }
    if (!row || dialogs_.count(row->dialog_id) == 0) return nullptr;
    TurnState state;
    state.dialog_id = row->dialog_id;
    state.running = row->outcome == TurnOutcome::running;
    {
      Use q(*this, rdb_.get(), next_pos_, "cannot read a turn");
      q.text(1, turn_id);
      if (q.step()) state.next = static_cast<std::uint64_t>(q.integer(0));
    }
    TurnState& cached = turns_[turn_id] = state;
    if (!state.running) {
      ended_.emplace_back(0, turn_id);
      evict_ended_locked();
    }
    return &cached;
  }

  // A turn in the file (committed; those of this process are in turns_).
  bool turn_in_file(const std::string& turn_id) {
    std::lock_guard<std::mutex> read(read_mu_);
    Use q(*this, rdb_.get(), turn_by_id_, "cannot read a turn");
    q.text(1, turn_id);
    return q.step();
  }

  // Ended turns leave memory once their end is committed and more than
  // kSqliteEndedCached have ended since (append() and end_turn() then read
  // them from the file).
  void evict_ended_locked() {
    while (ended_.size() > kSqliteEndedCached && ended_.front().first <= committed_seq_) {
      const auto it = turns_.find(ended_.front().second);
      if (it != turns_.end() && !it->second.running) turns_.erase(it);
      ended_.pop_front();
    }
  }

  // The last `max_turns` turns of the dialog in order, with their events or
  // without, in one read transaction after what was queued is committed.
  std::vector<TurnRecord> read_turns(const std::string& dialog_id, std::size_t max_turns,
                                     bool with_events) {
    std::vector<TurnRecord> out;
    {
      std::unique_lock<std::mutex> lock(mu_);
      if (max_turns == 0 || dialogs_.count(dialog_id) == 0) return out;
      wait_committed_locked(lock, queued_seq_);
    }
    std::lock_guard<std::mutex> read(read_mu_);
    ReadSnapshot snapshot(*this);
    const auto limit = static_cast<sqlite3_int64>(
        std::min<std::uint64_t>(max_turns, static_cast<std::uint64_t>(INT64_MAX)));
    {
      Use q(*this, rdb_.get(), turns_of_dialog_, "cannot read turns");
      q.text(1, dialog_id);
      q.int64(2, limit);
      while (q.step()) out.push_back(q.turn_row());
    }
    std::reverse(out.begin(), out.end());
    if (with_events) {
      for (TurnRecord& t : out) read_events(t);
    }
    return out;
  }

  void read_events(TurnRecord& t) {
    Use q(*this, rdb_.get(), events_of_turn_, "cannot read a turn's events");
    q.text(1, t.turn_id);
    while (q.step()) {
      const std::string text = q.column(0);
      nlohmann::json e = nlohmann::json::parse(text, nullptr, false);
      if (e.is_discarded()) {
        throw StoreError(path_ + ": read a turn's events: an event is not JSON (turn " + t.turn_id +
                         ")");
      }
      t.events.push_back(std::move(e));
    }
  }

  // ---- The writer -----------------------------------------------------------

  std::uint64_t enqueue_locked(Op op) {
    if (queue_.empty()) first_queued_ = Clock::now();
    queue_.push_back(std::move(op));
    if (queue_.size() == 1 || queue_.size() >= kSqliteMaxBatch) writer_cv_.notify_one();
    return ++queued_seq_;
  }

  void throw_failure_locked() {
    if (failure_.empty()) return;
    std::string message;
    message.swap(failure_);
    throw StoreError(message);
  }

  // Until everything queued up to `seq` is committed (or failed: the
  // failure is kept for the next write call or sync()).
  void wait_committed_locked(std::unique_lock<std::mutex>& lock, std::uint64_t seq) {
    if (committed_seq_ >= seq) return;
    wanted_seq_ = std::max(wanted_seq_, seq);
    writer_cv_.notify_one();
    done_cv_.wait(lock, [&] { return committed_seq_ >= seq; });
  }

  void writer_loop() {
    name_thread("as-sqlite");
    std::unique_lock<std::mutex> lock(mu_);
    std::vector<Op> batch;
    for (;;) {
      writer_cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) break;  // stopping, everything committed
      writer_cv_.wait_until(lock, first_queued_ + kSqliteLinger, [&] {
        return stop_ || wanted_seq_ > committed_seq_ || queue_.size() >= kSqliteMaxBatch;
      });
      batch.swap(queue_);
      const std::uint64_t upto = queued_seq_;
      lock.unlock();
      std::string error = commit(batch);
      batch.clear();
      lock.lock();
      committed_seq_ = upto;
      if (!error.empty()) failure_ = std::move(error);
      evict_ended_locked();
      done_cv_.notify_all();
    }
  }

  // One transaction for the whole batch. Never throws: a failure is rolled
  // back and returned.
  std::string commit(const std::vector<Op>& batch) noexcept {
    sqlite3* db = wdb_.get();
    try {
      exec(db, "BEGIN IMMEDIATE", "cannot begin a transaction");
      std::unordered_map<std::string, std::string> touched;  // dialog -> newest updated_at
      for (const Op& op : batch) {
        apply(db, op);
        if (!op.touched.empty()) {
          std::string& t = touched[op.touched];
          t = std::max(t, op.touch);
        }
      }
      for (const auto& [id, stamp] : touched) {
        Use q(*this, db, touch_dialog_, "cannot update a dialog");
        q.text(1, id);
        q.text(2, stamp);
        q.run();
      }
      exec(db, "COMMIT", "cannot commit");
      return {};
    } catch (const std::exception& e) {
      if (!sqlite3_get_autocommit(db)) sqlite3_exec(db, "ROLLBACK", nullptr, nullptr, nullptr);
      try {
        return e.what();
      } catch (...) {
        return {};
      }
    } catch (...) {
      if (!sqlite3_get_autocommit(db)) sqlite3_exec(db, "ROLLBACK", nullptr, nullptr, nullptr);
      try {
        return path_ + ": cannot commit";
      } catch (...) {
        return {};
      }
    }
  }

  void apply(sqlite3* db, const Op& op) {
    switch (op.kind) {
      case OpKind::create: {
        Use q(*this, db, insert_dialog_, "cannot store a dialog");
        q.text(1, op.a);
        q.text(2, op.opt);
        q.text(3, op.stamp);
        q.run();
        return;
      }
      case OpKind::rename: {
        Use q(*this, db, rename_dialog_, "cannot rename a dialog");
        q.text(1, op.a);
        q.text(2, op.b);
        q.run();
        return;
      }
      case OpKind::remove: {
        for (const Stmt* s : {&delete_events_, &delete_turns_, &delete_dialog_}) {
          Use q(*this, db, *s, "cannot delete a dialog");
          q.text(1, op.a);
          q.run();
        }
        return;
      }
      case OpKind::current: {
        Use q(*this, db, set_current_, "cannot store the current dialog");
        q.text(1, op.opt);
        q.run();
        return;
      }
      case OpKind::begin: {
        {
          Use q(*this, db, insert_turn_, "cannot store a turn");
          q.text(1, op.a);
          q.text(2, op.b);
          q.int64(3, static_cast<sqlite3_int64>(op.n));
          q.text(4, op.stamp);
          q.run();
        }
        insert_events(db, op.a, 0, op.events);
        return;
      }
      case OpKind::events: insert_events(db, op.a, op.n, op.events); return;
      case OpKind::end: {
        const std::string outcome = turn_outcome_name(static_cast<TurnOutcome>(op.n));
        Use q(*this, db, end_turn_, "cannot store a turn's outcome");
        q.text(1, op.a);
        q.text(2, outcome);
        q.text(3, op.b);
        q.text(4, op.stamp);
        q.run();
        return;
      }
    }
  }

  void insert_events(sqlite3* db, const std::string& turn_id, std::uint64_t first,
                     const std::vector<std::string>& events) {
    for (std::size_t i = 0; i < events.size(); ++i) {
      Use q(*this, db, insert_event_, "cannot store an event");
      q.text(1, turn_id);
      q.int64(2, static_cast<sqlite3_int64>(first + i));
      q.text(3, events[i]);
      q.run();
    }
  }

  const std::string path_;
  // The connections first, so that they close after the statements.
  Db wdb_;  // the writer's (and the constructor's)
  Db rdb_;  // reads, under read_mu_
  Stmt insert_dialog_, rename_dialog_, touch_dialog_, delete_events_, delete_turns_, delete_dialog_,
      set_current_, insert_turn_, insert_event_, end_turn_;
  Stmt turns_of_dialog_, turn_by_id_, events_of_turn_, next_pos_;
  std::mutex read_mu_;  // after mu_ when both are held

  std::mutex mu_;
  std::unordered_map<std::string, DialogInfo> dialogs_;
  std::set<std::pair<std::string, std::string>> by_updated_;  // (updated_at, id), oldest first
  std::optional<std::string> current_;
  std::unordered_map<std::string, TurnState> turns_;
  std::deque<std::pair<std::uint64_t, std::string>> ended_;  // (seq of the end, turn id)
  std::uint64_t next_seq_ = 1;
  Stamp last_stamp_{};

  std::vector<Op> queue_;
  Clock::time_point first_queued_{};
  std::uint64_t queued_seq_ = 0, committed_seq_ = 0, wanted_seq_ = 0;
  std::string failure_;  // a failed commit, not yet reported
  bool stop_ = false;
  std::condition_variable writer_cv_, done_cv_;
  std::thread writer_;
};

}  // namespace detail

inline std::shared_ptr<DialogStore> sqlite_store(const std::string& path) {
  return std::make_shared<detail::SqliteDialogStore>(path);
}

}  // namespace agentsmithy
