// Test support for tests that watch the process or run the example server:
// this process's descriptors, threads and memory, and build/agentsmithy-server
// as a child process.
#pragma once

#include "base.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>
#include <filesystem>

namespace test {

// ---------------------------------------------------------------------------
// The process: descriptors, threads, memory
// ---------------------------------------------------------------------------

// Open file descriptors of this process (the entries of /proc/self/fd, less
// the one used to list them).
inline std::size_t open_fd_count() {
  DIR* dir = ::opendir("/proc/self/fd");
  if (!dir) return 0;
  std::size_t n = 0;
  while (const dirent* entry = ::readdir(dir)) {
    if (entry->d_name[0] != '.') ++n;
  }
  ::closedir(dir);
  return n > 0 ? n - 1 : 0;
}

// A "Key:   value ..." line of /proc/<pid>/status as a number (kB for Vm*),
// -1 when absent. pid 0: this process.
inline long proc_status(const char* key, pid_t pid = 0) {
  const std::string path =
      pid == 0 ? std::string("/proc/self/status") : "/proc/" + std::to_string(pid) + "/status";
  std::FILE* f = std::fopen(path.c_str(), "r");
  if (!f) return -1;
  char line[256];
  long value = -1;
  const std::size_t len = std::strlen(key);
  while (std::fgets(line, sizeof line, f)) {
    if (std::strncmp(line, key, len) == 0 && line[len] == ':') {
      value = std::strtol(line + len + 1, nullptr, 10);
      break;
    }
  }
  std::fclose(f);
  return value;
}
inline long thread_count(pid_t pid = 0) { return proc_status("Threads", pid); }
inline long vm_rss_kb(pid_t pid = 0) { return proc_status("VmRSS", pid); }

// Threads of a process that runs no server: main's, plus ThreadSanitizer's
// background thread, which it starts with the first pthread_create().
#if defined(__SANITIZE_THREAD__)
inline constexpr long kRuntimeThreads = 1;
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
inline constexpr long kRuntimeThreads = 1;
#else
inline constexpr long kRuntimeThreads = 0;
#endif
#else
inline constexpr long kRuntimeThreads = 0;
#endif
inline const long g_threads_at_start = thread_count();

// A sanitizer build (ASan or TSan): several times slower, so timing bounds
// are only printed there (bench/ measures them).
#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
inline constexpr bool kSanitized = true;
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer) || __has_feature(address_sanitizer)
inline constexpr bool kSanitized = true;
#else
inline constexpr bool kSanitized = false;
#endif
#else
inline constexpr bool kSanitized = false;
#endif

// Waits (bounded) for threads left by earlier tests (idle pool workers exit
// after 2 s) to be gone, so that a test can take its own baseline. Returns the
// count it settled at.
inline long settle_threads(milliseconds timeout = 5000ms) {
  std::thread([] {}).join();  // ThreadSanitizer's thread, if any, exists from here on
  wait_until([&] { return thread_count() <= g_threads_at_start + kRuntimeThreads; }, timeout);
  return thread_count();
}

// ---------------------------------------------------------------------------
// build/agentsmithy-server as a child process
// ---------------------------------------------------------------------------

// The example server's path: $AGENTSMITHY_SERVER, else build/agentsmithy-server.
inline std::string server_binary() {
  const char* p = std::getenv("AGENTSMITHY_SERVER");
  return p && *p ? p : "build/agentsmithy-server";
}

// Starts the example server with posix_spawn (fork is unsafe in this
// multithreaded process) in a fresh temporary --workdir, with stdout and
// stderr captured by a reader thread. The settings variables of the test's own
// environment are not passed on. The destructor kills (SIGKILL) and reaps a
// child still running and removes the workdir.
class ServerProcess {
 public:
  struct Spec {
    std::vector<std::string> args;                         // after --workdir DIR
    std::vector<std::pair<std::string, std::string>> env;  // set in the child
    std::string dotenv;                                    // WORKDIR/.env when not empty
    bool block_signals = false;  // SIGINT and SIGTERM blocked in the child's initial mask
  };

  explicit ServerProcess(Spec spec) {
    char dir_template[] = "/tmp/agentsmithy-test-XXXXXX";
    if (!::mkdtemp(dir_template)) return;
    workdir = dir_template;
    if (!spec.dotenv.empty()) {
      std::FILE* f = std::fopen((workdir + "/.env").c_str(), "w");
      if (f) {
        std::fputs(spec.dotenv.c_str(), f);
        std::fclose(f);
      }
    }
    std::vector<std::string> argv_s = {server_binary(), "--workdir", workdir};
    argv_s.insert(argv_s.end(), spec.args.begin(), spec.args.end());
    std::vector<std::string> env_s;
    const char* const dropped[] = {
        "SERVER_HOST=",      "SERVER_PORT=",       "LOG_LEVEL=",
        "LOG_FORMAT=",       "AGENTSMITHY_TOKEN=", "OPENAI_BASE_URL=",
        "OPENAI_API_KEY=",   "AGENTSMITHY_MODEL=", "AGENTSMITHY_CORS_ORIGINS=",
        "AGENTSMITHY_STORE="};
    for (char** e = environ; *e; ++e) {
      bool drop = false;
      for (const char* d : dropped) drop = drop || std::strncmp(*e, d, std::strlen(d)) == 0;
      for (const auto& kv : spec.env)
        drop = drop || std::strncmp(*e, (kv.first + "=").c_str(), kv.first.size() + 1) == 0;
      if (!drop) env_s.emplace_back(*e);
    }
    for (const auto& kv : spec.env) env_s.push_back(kv.first + "=" + kv.second);
    std::vector<char*> argv_p, env_p;
    for (auto& a : argv_s) argv_p.push_back(a.data());
    argv_p.push_back(nullptr);
    for (auto& e : env_s) env_p.push_back(e.data());
    env_p.push_back(nullptr);

    int out[2];
    if (::pipe2(out, O_CLOEXEC) != 0) return;
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_adddup2(&actions, out[1], 1);
    posix_spawn_file_actions_adddup2(&actions, out[1], 2);
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 34))
    // Sockets of servers running in this process are not all close-on-exec.
    posix_spawn_file_actions_addclosefrom_np(&actions, 3);
#endif
    posix_spawnattr_t attr;
    posix_spawnattr_init(&attr);
    sigset_t mask, defaults;
    sigemptyset(&mask);
    if (spec.block_signals) {
      sigaddset(&mask, SIGINT);
      sigaddset(&mask, SIGTERM);
    }
    sigemptyset(&defaults);
    sigaddset(&defaults, SIGINT);
    sigaddset(&defaults, SIGTERM);
    sigaddset(&defaults, SIGPIPE);
    posix_spawnattr_setsigmask(&attr, &mask);
    posix_spawnattr_setsigdefault(&attr, &defaults);
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
    const int rc = ::posix_spawn(&pid_, argv_p[0], &actions, &attr, argv_p.data(), env_p.data());
    posix_spawn_file_actions_destroy(&actions);
    posix_spawnattr_destroy(&attr);
    ::close(out[1]);
    if (rc != 0) {
      spawn_error = std::strerror(rc);
      pid_ = -1;
      ::close(out[0]);
      return;
    }
    reader_ = std::thread([this, fd = out[0]] {
      char buf[4096];
      for (;;) {
        const ssize_t n = ::read(fd, buf, sizeof buf);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        std::lock_guard<std::mutex> lock(mutex_);
        output_.append(buf, static_cast<std::size_t>(n));
      }
      ::close(fd);
    });
  }
  ~ServerProcess() {
    if (pid_ > 0 && !reaped_) {
      ::kill(pid_, SIGKILL);
      int st = 0;
      while (::waitpid(pid_, &st, 0) < 0 && errno == EINTR) {
      }
    }
    if (reader_.joinable()) reader_.join();
    if (!workdir.empty()) {
      std::error_code ignored;  // .env, and .agentsmithy/ with the SQLite store
      std::filesystem::remove_all(workdir, ignored);
    }
  }
  ServerProcess(const ServerProcess&) = delete;
  ServerProcess& operator=(const ServerProcess&) = delete;

  bool started() const { return pid_ > 0; }
  pid_t pid() const { return pid_; }
  bool signal(int sig) const { return pid_ > 0 && !reaped_ && ::kill(pid_, sig) == 0; }

  std::string output() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return output_;
  }
  std::size_t count(std::string_view needle) const {
    const std::string out = output();
    std::size_t n = 0;
    for (std::size_t p = out.find(needle); p != std::string::npos; p = out.find(needle, p + 1)) ++n;
    return n;
  }
  bool wait_for_output(std::string_view needle, milliseconds timeout = 5000ms) const {
    return wait_until([&] { return count(needle) > 0; }, timeout);
  }
  // The port from the "ready on HOST:PORT" log line; -1 if it does not come.
  int wait_ready(milliseconds timeout = 5000ms) const {
    if (!wait_until([&] { return count("ready on ") > 0 || exited_now(); }, timeout)) return -1;
    const std::string out = output();
    const auto p = out.find("ready on ");
    if (p == std::string::npos) return -1;
    const auto eol = out.find('\n', p);
    const std::string line = out.substr(p, eol == std::string::npos ? std::string::npos : eol - p);
    const auto colon = line.rfind(':');
    if (colon == std::string::npos) return -1;
    return std::atoi(line.c_str() + colon + 1);
  }
  // Requires that the child started and logged "ready on" within `timeout`;
  // returns its port.
  int require_ready(milliseconds timeout = 5000ms) const {
    REQUIRE(started());
    const int port = wait_ready(timeout);
    INFO(output());
    REQUIRE(port > 0);
    return port;
  }
  // Reaps the child if it has exited within `timeout`.
  bool wait_exit(milliseconds timeout = 5000ms) {
    const bool ok = wait_until([&] { return exited_now(); }, timeout);
    if (ok && reader_.joinable()) reader_.join();  // the pipe closes with the child
    return ok;
  }
  bool exited() const { return reaped_ && WIFEXITED(status_); }
  int exit_code() const { return exited() ? WEXITSTATUS(status_) : -1; }
  bool signaled() const { return reaped_ && WIFSIGNALED(status_); }
  int term_signal() const { return signaled() ? WTERMSIG(status_) : 0; }
  Clock::time_point exited_at() const { return exited_at_; }
  std::string describe() const {
    if (!reaped_) return "still running";
    if (exited()) return "exit status " + std::to_string(exit_code());
    if (signaled())
      return std::string("killed by signal ") + std::to_string(term_signal()) + " (" +
             ::strsignal(term_signal()) + ")";
    return "status " + std::to_string(status_);
  }

  std::string workdir;
  std::string spawn_error;

 private:
  bool exited_now() const {
    if (reaped_) return true;
    if (pid_ <= 0) return false;
    int st = 0;
    const pid_t r = ::waitpid(pid_, &st, WNOHANG);
    if (r == pid_) {
      reaped_ = true;
      status_ = st;
      exited_at_ = Clock::now();
    }
    return reaped_;
  }

  pid_t pid_ = -1;
  mutable bool reaped_ = false;
  mutable int status_ = 0;
  mutable Clock::time_point exited_at_{};
  mutable std::mutex mutex_;
  std::string output_;
  std::thread reader_;
};

// SIGTERM to `p`: it exits with status 0 within `timeout`.
inline void check_exits_on_sigterm(ServerProcess& p, milliseconds timeout = 5000ms) {
  p.signal(SIGTERM);
  CHECK(p.wait_exit(timeout));
  CHECK(p.exit_code() == 0);
}

}  // namespace test
