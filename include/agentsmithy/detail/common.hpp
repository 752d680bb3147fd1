namespace agentsmithy {
namespace detail {

using Clock = std::chrono::steady_clock;

// Names the calling thread (at most 15 characters), for top -H, perf and gdb.
inline void name_thread(const char* name) { ::pthread_setname_np(::pthread_self(), name); }
using nlohmann::json;

// ===========================================================================
// Logging
// ===========================================================================

inline const char* level_name(LogLevel level) {
  switch (level) {
    case LogLevel::debug: return "DEBUG";
    case LogLevel::info: return "INFO";
    case LogLevel::warning: return "WARN";
    case LogLevel::error: return "ERROR";
  }
  return "INFO";
}

// `t` in ISO 8601, UTC, with `fraction_digits` (0, 3 or 6) after the
// seconds and `zone` after that: the one formatter of every timestamp the
// server writes (log lines, status.json, the shutdown report).
inline std::string format_utc(std::chrono::system_clock::time_point t, int fraction_digits,
                              const char* zone) {
  const auto us =
      std::chrono::duration_cast<std::chrono::microseconds>(t.time_since_epoch()).count();
  const std::time_t secs = static_cast<std::time_t>(us / 1000000);
  std::tm tm{};
  gmtime_r(&secs, &tm);
  char buf[80];
  int n = std::snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02d", tm.tm_year + 1900,
                        tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec);
  if (fraction_digits == 3) {
    n += std::snprintf(buf + n, sizeof buf - n, ".%03d", static_cast<int>((us / 1000) % 1000));
  } else if (fraction_digits == 6) {
    n += std::snprintf(buf + n, sizeof buf - n, ".%06d", static_cast<int>(us % 1000000));
  }
  std::snprintf(buf + n, sizeof buf - n, "%s", zone);
  return buf;
}

// 2026-11-25T10:00:00.123Z: a log record's time.
inline std::string utc_timestamp() { return format_utc(std::chrono::system_clock::now(), 3, "Z"); }

inline void log_to_stderr(LogLevel level, const std::string& message) {
  // One write per record so lines from several threads do not interleave.
  char head[64];
  std::snprintf(head, sizeof head, "%s %-5s ", utc_timestamp().c_str(), level_name(level));
  const std::string line = head + message + "\n";
  const ssize_t written = ::write(STDERR_FILENO, line.data(), line.size());
  (void)written;
}

inline void log(const Options& options, LogLevel level, const std::string& message) {
  if (level < options.log_level) return;
  if (options.logger) {
    options.logger(level, message);
  } else {
    log_to_stderr(level, message);
  }
}

inline long long elapsed_ms(Clock::time_point since) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - since).count();
}

}  // namespace detail
}  // namespace agentsmithy
