namespace agentsmithy {
namespace detail {

// ===========================================================================
// Status file
// ===========================================================================

// The server's entry in DIR/.agentsmithy/status.json. Lifecycle:
//
//   claim(port)  at start, before binding; a refusal (another live server for
//                DIR) comes back as the message to log before exiting 1
//   ready(port)  once accepting connections
//   stopping()   when the shutdown starts
//   stopped()    when listen() is about to return
//   error(why)   instead of ready when the server cannot start (bind failed)
//
// Thread-safe; nothing throws. A write that fails is logged (warning) and
// reported as false: the server keeps serving without its status file.
class StatusFile {
 public:
  // `log` may be empty (nothing is logged).
  explicit StatusFile(std::string workdir, Logger log = {});
  ~StatusFile();
  StatusFile(const StatusFile&) = delete;
  StatusFile& operator=(const StatusFile&) = delete;

  // Reads the current status (a missing or corrupt file counts as empty).
  // A server_pid that is dead (kill(pid, 0) gives ESRCH) while the status says
  // starting, ready or stopping is first marked crashed. If a live other
  // process (or another claimed StatusFile in this process) is starting, ready
  // or stopping for DIR, returns "another server is running for DIR on port P
  // (pid N)" and this object writes nothing, ever. Otherwise writes starting
  // with our pid, `port` when already known, server_started_at, and returns
  // nullopt (also when that write failed: the failure is logged).
  std::optional<std::string> claim(std::optional<int> port = std::nullopt);

  // Each returns whether the file was written. They write nothing after a
  // refused claim, nor over a status that names another live running server.
  bool ready(int port);
  bool stopping();
  bool stopped();
  bool error(const std::string& message);

  const std::string& path() const { return path_; }
  bool claimed() const;

  // The statuses in which a server_pid is considered to hold the directory.
  static bool running_state(const json& status);
  // kill(pid, 0) != ESRCH, for a pid that is a positive pid_t.
  static bool pid_alive(long long pid);
  // datetime.now(UTC).isoformat(): 2026-11-25T10:00:00.123456+00:00
  static std::string iso_now();

 private:
  // Holds an exclusive flock on the lock file while alive (best effort: if
  // the lock file cannot be opened, the in-process mutex still serialises).
  class FileLock {
   public:
    explicit FileLock(const std::string& path);
    ~FileLock();
    FileLock(const FileLock&) = delete;
    FileLock& operator=(const FileLock&) = delete;

   private:
    int fd_ = -1;
  };

  void warn(const std::string& message) const;
  void info(const std::string& message) const;
  bool ensure_dir();
  json read(bool* corrupt = nullptr) const;
  bool write(const json& doc);
  // The message naming the server that holds DIR, if `doc` names one other
  // than us.
  std::optional<std::string> held_by_other(const json& doc) const;
  // The read-modify-write shared by ready/stopping/stopped/error.
  template <class Change>
  bool update(const char* what, Change&& change);
  void release_registration();

  static std::mutex& registry_mutex();
  static std::set<std::string>& registry();  // canonical workdirs claimed in this process

  const std::string workdir_;
  const std::string dir_;   // workdir_/.agentsmithy
  const std::string path_;  // dir_/status.json
  const std::string lock_path_;
  const Logger log_;
  const long long pid_;
  mutable std::mutex mu_;
  bool claimed_ = false;           // guarded by mu_
  bool refused_ = false;           // guarded by mu_
  std::string registered_;         // the registry key we hold, if any; guarded by mu_
  unsigned long tmp_counter_ = 0;  // guarded by mu_
};

// ---------------------------------------------------------------------------

inline StatusFile::StatusFile(std::string workdir, Logger log)
    : workdir_(workdir.empty() ? std::string(".") : std::move(workdir)),
      dir_(workdir_ + "/.agentsmithy"),
      path_(dir_ + "/status.json"),
      lock_path_(path_ + ".lock"),
      log_(std::move(log)),
      pid_(static_cast<long long>(::getpid())) {}

inline StatusFile::~StatusFile() {
  std::lock_guard<std::mutex> lock(mu_);
  release_registration();
}

inline std::mutex& StatusFile::registry_mutex() {
  static std::mutex mu;
  return mu;
}

inline std::set<std::string>& StatusFile::registry() {
  static std::set<std::string> claimed;
  return claimed;
}

inline void StatusFile::release_registration() {
  if (registered_.empty()) return;
  std::lock_guard<std::mutex> lock(registry_mutex());
  registry().erase(registered_);
  registered_.clear();
}

inline bool StatusFile::claimed() const {
  std::lock_guard<std::mutex> lock(mu_);
  return claimed_;
}

inline void StatusFile::warn(const std::string& message) const {
  if (!log_) return;
  try {
    log_(LogLevel::warning, message);
  } catch (...) {
  }
}

inline void StatusFile::info(const std::string& message) const {
  if (!log_) return;
  try {
    log_(LogLevel::info, message);
  } catch (...) {
  }
}

inline bool StatusFile::running_state(const json& status) {
  const auto it = status.find("server_status");
  if (it == status.end() || !it->is_string()) return false;
  const auto& s = it->get_ref<const std::string&>();
  return s == "starting" || s == "ready" || s == "stopping";
}

inline bool StatusFile::pid_alive(long long pid) {
  // kill(0) and kill(-n) address process groups: never a server's pid.
  if (pid <= 0 || pid > static_cast<long long>(INT_MAX)) return false;
  if (::kill(static_cast<pid_t>(pid), 0) == 0) return true;
  return errno != ESRCH;  // EPERM: alive, owned by another user
}

// As AgentSmithy's server writes it: microseconds, "+00:00".
inline std::string StatusFile::iso_now() {
  return format_utc(std::chrono::system_clock::now(), 6, "+00:00");
}

inline StatusFile::FileLock::FileLock(const std::string& path) {
  fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0666);
  if (fd_ < 0) return;
  while (::flock(fd_, LOCK_EX) != 0) {
    if (errno != EINTR) {
      ::close(fd_);
      fd_ = -1;
      return;
    }
  }
}

inline StatusFile::FileLock::~FileLock() {
  if (fd_ >= 0) ::close(fd_);  // releases the flock
}

inline bool StatusFile::ensure_dir() {
  if (::mkdir(dir_.c_str(), 0777) == 0 || errno == EEXIST) return true;
  warn("status file: cannot create " + dir_ + ": " + std::strerror(errno));
  return false;
}

inline json StatusFile::read(bool* corrupt) const {
  if (corrupt) *corrupt = false;
  const int fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return json::object();  // missing (or unreadable): nothing to keep
  std::string text;
  char buf[8192];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n > 0) {
      text.append(buf, static_cast<std::size_t>(n));
      if (text.size() > (1u << 20)) break;  // not ours; a status is a few hundred bytes
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    break;
  }
  ::close(fd);
  json doc = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (doc.is_object()) return doc;
  if (corrupt) *corrupt = true;
  return json::object();
}

inline bool StatusFile::write(const json& doc) {
  if (!ensure_dir()) return false;
  const std::string text = doc.dump(2, ' ', false, json::error_handler_t::replace) + "\n";
  // A name no other writer uses: our pid and a counter; O_EXCL skips one that
  // a dead process with our pid left behind.
  std::string tmp;
  int fd = -1;
  for (int attempt = 0; attempt < 100 && fd < 0; ++attempt) {
    tmp = path_ + "." + std::to_string(pid_) + "." + std::to_string(++tmp_counter_) + ".tmp";
    fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd < 0 && errno != EEXIST) break;
  }
  if (fd < 0) {
    warn("status file: cannot create a temporary file next to " + path_ + ": " +
         std::strerror(errno));
    return false;
  }
  const char* failed = nullptr;
  int failed_errno = 0;
  for (std::size_t off = 0; off < text.size();) {
    const ssize_t n = ::write(fd, text.data() + off, text.size() - off);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      failed = "write";
      failed_errno = n < 0 ? errno : EIO;
      break;
    }
    off += static_cast<std::size_t>(n);
  }
  // No fsync: the rename makes the change atomic for every reader, which is
  // all a file that describes a running process needs (after a power loss no
  // server is running, whatever the disk kept). Two fsyncs cost the start and
  // the shutdown a few milliseconds each.
  if (::close(fd) != 0 && !failed) {
    failed = "close";
    failed_errno = errno;
  }
  if (!failed && ::rename(tmp.c_str(), path_.c_str()) != 0) {
    failed = "rename";
    failed_errno = errno;
  }
  if (failed) {
    ::unlink(tmp.c_str());
    warn(std::string("status file: ") + failed + " failed for " + path_ + ": " +
         std::strerror(failed_errno));
    return false;
  }
  return true;
}

inline std::optional<std::string> StatusFile::held_by_other(const json& doc) const {
  const auto pid_it = doc.find("server_pid");
  if (pid_it == doc.end() || !pid_it->is_number_integer() || !running_state(doc)) return {};
  const long long pid = pid_it->get<long long>();
  if (pid == pid_ || !pid_alive(pid)) return {};
  std::string port = "unknown";
  const auto port_it = doc.find("port");
  if (port_it != doc.end() && port_it->is_number_integer()) {
    port = std::to_string(port_it->get<long long>());
  }
  return "another server is running for " + workdir_ + " on port " + port + " (pid " +
         std::to_string(pid) + ")";
}

inline std::optional<std::string> StatusFile::claim(std::optional<int> port) {
  try {
    std::lock_guard<std::mutex> lock(mu_);
    if (refused_) return std::string("status file: claim refused earlier");
    if (claimed_) return {};
    // One claim per directory in this process, too (two Servers, one DIR).
    char resolved[PATH_MAX];
    const std::string key =
        ::realpath(workdir_.c_str(), resolved) ? std::string(resolved) : workdir_;
    {
      std::lock_guard<std::mutex> reg(registry_mutex());
      if (registry().count(key) != 0) {
        refused_ = true;
        return "another server is running for " + workdir_ + " in this process (pid " +
               std::to_string(pid_) + ")";
      }
      registry().insert(key);
      registered_ = key;
    }
    ensure_dir();
    FileLock file_lock(lock_path_);
    bool corrupt = false;
    json doc = read(&corrupt);
    if (corrupt) warn("status file: " + path_ + " is not a JSON object; starting it afresh");

    if (auto other = held_by_other(doc)) {
      refused_ = true;
      release_registration();
      return other;
    }
    const auto pid_it = doc.find("server_pid");
    if (pid_it != doc.end() && pid_it->is_number_integer() && running_state(doc)) {
      // Dead, or our own pid left by an earlier process (pid reuse): crashed.
      const std::string old_pid = std::to_string(pid_it->get<long long>());
      const std::string old_status = doc["server_status"].get<std::string>();
      doc["server_status"] = "crashed";
      doc["server_updated_at"] = iso_now();
      doc["server_error"] = "Server process (pid " + old_pid +
                            ") terminated unexpectedly while in '" + old_status + "' state";
      doc.erase("server_pid");
      doc.erase("port");
      write(doc);
      info("status file: the previous server (pid " + old_pid + ", " + old_status +
           ") is gone; marked crashed");
    }

    const std::string now = iso_now();
    doc["server_status"] = "starting";
    doc["server_pid"] = pid_;
    if (port && *port > 0) {
      doc["port"] = *port;
    } else {
      doc.erase("port");
    }
    doc["server_started_at"] = now;
    doc["server_updated_at"] = now;
    doc.erase("server_error");
    claimed_ = true;
    write(doc);
    return {};
  } catch (const std::exception& e) {
    warn(std::string("status file: claim failed: ") + e.what());
  } catch (...) {
    warn("status file: claim failed");
  }
  return {};
}

template <class Change>
bool StatusFile::update(const char* what, Change&& change) {
  try {
    std::lock_guard<std::mutex> lock(mu_);
    if (refused_) return false;
    ensure_dir();
    FileLock file_lock(lock_path_);
    json doc = read();
    if (auto other = held_by_other(doc)) {
      warn(std::string("status file: not writing ") + what + ": " + *other);
      return false;
    }
    doc["server_updated_at"] = iso_now();
    change(doc);
    return write(doc);
  } catch (const std::exception& e) {
    warn(std::string("status file: writing ") + what + " failed: " + e.what());
  } catch (...) {
    warn(std::string("status file: writing ") + what + " failed");
  }
  return false;
}

inline bool StatusFile::ready(int port) {
  return update("ready", [&](json& doc) {
    doc["server_status"] = "ready";
    doc["server_pid"] = pid_;
    doc["port"] = port;
    doc.erase("server_error");
  });
}

inline bool StatusFile::stopping() {
  return update("stopping", [&](json& doc) {
    doc["server_status"] = "stopping";
    doc.erase("server_error");
  });
}

inline bool StatusFile::stopped() {
  const bool ok = update("stopped", [&](json& doc) {
    doc["server_status"] = "stopped";
    doc.erase("server_pid");
    doc.erase("port");
    doc.erase("server_started_at");
    doc.erase("server_error");
  });
  std::lock_guard<std::mutex> lock(mu_);
  release_registration();  // the directory is free for another Server here
  claimed_ = false;
  return ok;
}

inline bool StatusFile::error(const std::string& message) {
  const bool ok = update("error", [&](json& doc) {
    doc["server_status"] = "error";
    doc.erase("server_pid");
    doc.erase("port");
    doc["server_error"] = message;
  });
  std::lock_guard<std::mutex> lock(mu_);
  release_registration();
  claimed_ = false;
  return ok;
}

}  // namespace detail
}  // namespace agentsmithy
