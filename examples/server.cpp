// examples/server.cpp - agentsmithy-server, the C++ counterpart of
// `python main.py --workdir .`: the demo chat server on port 8765 that drains
// its streams on Ctrl+C (SIGINT) or SIGTERM.
//
//   build/agentsmithy-server --workdir . [--port 8765] [--log-format json]
//
// Settings: a flag beats the environment, the environment beats DIR/.env.
// Exit status: 0 after a graceful shutdown, 130 after a forced one (a second
// signal during the drain), 1 when the server cannot start, 2 for bad usage.
//
// It serves --upstream through openai_generator and keeps dialogs with
// sqlite_store, so it is built with the OpenAI upstream (libcurl) and the
// SQLite store (libsqlite3); the Makefile and CMake pass the defines too.
#ifndef AGENTSMITHY_OPENAI_SUPPORT
#define AGENTSMITHY_OPENAI_SUPPORT
#endif
#ifndef AGENTSMITHY_SQLITE_SUPPORT
#define AGENTSMITHY_SQLITE_SUPPORT
#endif
#include "agentsmithy.hpp"

#include <signal.h>
#include <sys/stat.h>

#include <cctype>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <exception>
#include <fstream>
#include <iostream>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace {

const char* const kUsage = R"(usage: agentsmithy-server --workdir DIR [options]

Serves the AgentSmithy chat API (POST and GET /api/chat, GET /health, GET
/metrics) and a chat page at GET /, streaming from an OpenAI-compatible
upstream (--upstream) or, without one, the built-in demo. SIGINT or SIGTERM
drains the open streams and exits 0; a second signal during the drain closes
them at once and exits 130. DIR/.agentsmithy/status.json follows the
server's lifecycle, as AgentSmithy's does.

options:
  --workdir DIR             project directory (required); DIR/.env is loaded
  --host HOST               address to bind       (SERVER_HOST, default 127.0.0.1)
  --port PORT               port, 0 for any free  (SERVER_PORT; default: the
                            first free port from 8765, 200 tries)
  --grace-period SECONDS    drain limit at shutdown, may be fractional (default 5)
  --lame-duck SECONDS       at shutdown, /health answers 503 for this long while
                            everything else is served, then the drain (default 0)
  --max-streams N           concurrent chat requests before 503 (default 256)
  --upstream URL            an OpenAI-compatible API, e.g. http://127.0.0.1:8080/v1
                            (OPENAI_BASE_URL); without one: the demo
  --model NAME              the upstream's model (AGENTSMITHY_MODEL)
  --cors-origin ORIGIN      a browser origin allowed to call the API; repeatable
                            (AGENTSMITHY_CORS_ORIGINS, comma-separated)
  --store sqlite|memory      where dialogs are kept (AGENTSMITHY_STORE): sqlite
                            (the default) in DIR/.agentsmithy/agentsmithy.sqlite3,
                            kept across restarts; memory: in this process only
  --store-path FILE         another SQLite file for the dialogs
  --no-chat-page            do not serve the chat page at GET /
  --ide NAME                the IDE that launched the server (shown in /health)
  --no-log-colors           never colour the log (it is coloured only on a terminal)
  --generator handler|thread
                            handler (default): the built-in demo through
                            set_stream_handler, every stream fed by one timer
                            thread; thread: the same demo as a blocking
                            Generator, one thread per stream
  --log-level LEVEL         debug|info|warning|error (LOG_LEVEL, default info)
  --log-format FORMAT       pretty|json (LOG_FORMAT, default pretty)
  --help                    show this help and exit

environment:
  AGENTSMITHY_TOKEN         when set, /api/* requires "Authorization: Bearer <token>"
                            (401 otherwise; GET /api/chat also takes
                            ?access_token=<token>, for EventSource); /health stays open
  OPENAI_API_KEY            the upstream's API key (never a flag: ps shows flags)

DIR/.env holds KEY=VALUE lines (# comments, optional quotes, optional
`export `); it never overrides a variable already in the environment.
)";

[[noreturn]] void fail(int status, const std::string& message) {
  std::cerr << "agentsmithy-server: " << message << "\n";
  if (status == 2) std::cerr << "Try 'agentsmithy-server --help'.\n";
  std::exit(status);
}

// ---------------------------------------------------------------------------
// Parsing values from flags, the environment and .env
// ---------------------------------------------------------------------------

std::string lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

std::string trim(const std::string& s) {
  const auto begin = s.find_first_not_of(" \t\r");
  if (begin == std::string::npos) return "";
  return s.substr(begin, s.find_last_not_of(" \t\r") - begin + 1);
}

// A whole-string integer in [min, max], or nothing.
std::optional<long long> parse_int(const std::string& text, long long min, long long max) {
  if (text.empty() || text.find_first_not_of("0123456789") != std::string::npos) return {};
  errno = 0;
  const long long value = std::strtoll(text.c_str(), nullptr, 10);
  if (errno == ERANGE || value < min || value > max) return {};
  return value;
}

int parse_port(const std::string& text, const std::string& source) {
  if (auto port = parse_int(text, 0, 65535)) return static_cast<int>(*port);
  fail(2, source + ": invalid port '" + text + "' (expected 0-65535)");
}

std::size_t parse_count(const std::string& text, const std::string& source) {
  if (auto count = parse_int(text, 1, 100000)) return static_cast<std::size_t>(*count);
  fail(2, source + ": invalid count '" + text + "' (expected 1-100000)");
}

std::chrono::milliseconds parse_seconds(const std::string& text, const std::string& source) {
  char* end = nullptr;
  errno = 0;
  const double seconds = std::strtod(text.c_str(), &end);
  if (text.empty() || *end != '\0' || errno == ERANGE || !std::isfinite(seconds) || seconds < 0 ||
      seconds > 86400) {
    fail(2, source + ": invalid duration '" + text + "' (expected seconds, 0-86400)");
  }
  return std::chrono::milliseconds(std::llround(seconds * 1000));
}

agentsmithy::LogLevel parse_level(const std::string& text, const std::string& source) {
  const std::string name = lower(text);
  if (name == "debug") return agentsmithy::LogLevel::debug;
  if (name == "info") return agentsmithy::LogLevel::info;
  if (name == "warning" || name == "warn") return agentsmithy::LogLevel::warning;
  if (name == "error") return agentsmithy::LogLevel::error;
  fail(2, source + ": invalid log level '" + text + "' (expected debug|info|warning|error)");
}

bool parse_json_format(const std::string& text, const std::string& source) {
  const std::string name = lower(text);
  if (name == "pretty" || name == "json") return name == "json";
  fail(2, source + ": invalid log format '" + text + "' (expected pretty|json)");
}

// Loads KEY=VALUE lines into the environment, like python-dotenv's
// load_dotenv(): variables already set keep their value.
void load_dotenv(const std::string& path) {
  std::ifstream in(path);
  std::string line;
  for (int number = 1; std::getline(in, line); ++number) {
    line = trim(line);
    if (line.empty() || line[0] == '#') continue;
    if (line.compare(0, 7, "export ") == 0) line = trim(line.substr(7));
    const auto eq = line.find('=');
    const std::string key = trim(line.substr(0, eq));
    if (eq == std::string::npos || key.empty()) {
      std::cerr << "agentsmithy-server: " << path << ":" << number << ": ignored, not KEY=VALUE\n";
      continue;
    }
    std::string value = trim(line.substr(eq + 1));
    if (!value.empty() && (value[0] == '"' || value[0] == '\'')) {
      const auto close = value.find(value[0], 1);  // quoted: up to the closing quote
      value = value.substr(1, close == std::string::npos ? std::string::npos : close - 1);
    } else {
      value = trim(value.substr(0, value.find(" #")));  // unquoted: drop a trailing comment
    }
    ::setenv(key.c_str(), value.c_str(), /*overwrite=*/0);
  }
}

// ---------------------------------------------------------------------------
// Logging
// ---------------------------------------------------------------------------

// 2026-11-25T10:00:00.123Z
std::string utc_timestamp() {
  const auto now = std::chrono::system_clock::now();
  const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch());
  const std::time_t seconds = static_cast<std::time_t>(ms.count() / 1000);
  std::tm tm{};
  ::gmtime_r(&seconds, &tm);
  char buffer[40];
  const std::size_t n = std::strftime(buffer, sizeof buffer, "%Y-%m-%dT%H:%M:%S", &tm);
  std::snprintf(buffer + n, sizeof buffer - n, ".%03dZ", static_cast<int>(ms.count() % 1000));
  return buffer;
}

// One line per record on stderr, either
//   2026-11-25T10:00:00.123Z INFO  ready on 127.0.0.1:8765
// (the level coloured on a terminal unless `colors` is off) or
//   {"ts":"2026-11-25T10:00:00.123Z","level":"info","msg":"ready on 127.0.0.1:8765"}
// The shutdown report's record carries the report as an object, "report".
agentsmithy::Logger make_logger(bool json, bool colors) {
  auto mutex = std::make_shared<std::mutex>();
  return [json, colors, mutex](agentsmithy::LogLevel level, const std::string& message) {
    static const char* const kPretty[] = {"DEBUG", "INFO ", "WARN ", "ERROR"};
    static const char* const kColor[] = {"\x1b[2m", "\x1b[32m", "\x1b[33m", "\x1b[31m"};
    static const char* const kJson[] = {"debug", "info", "warning", "error"};
    static const std::string kReport = "shutdown report ";
    const int index = static_cast<int>(level);
    std::string line;
    if (json) {
      nlohmann::ordered_json record = {
          {"ts", utc_timestamp()}, {"level", kJson[index]}, {"msg", message}};
      if (message.compare(0, kReport.size(), kReport) == 0) {
        record["msg"] = "shutdown report";
        record["report"] =
            nlohmann::ordered_json::parse(message.substr(kReport.size()), nullptr, false);
      }
      line = record.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    } else if (colors) {
      line = utc_timestamp() + " " + kColor[index] + kPretty[index] + "\x1b[0m " + message;
    } else {
      line = utc_timestamp() + " " + kPretty[index] + " " + message;
    }
    line += '\n';
    std::lock_guard<std::mutex> lock(*mutex);
    std::fwrite(line.data(), 1, line.size(), stderr);
    std::fflush(stderr);
  };
}

// ---------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------

struct Flags {
  std::optional<std::string> workdir, host, port, grace_period, max_streams, lame_duck;
  std::optional<std::string> log_level, log_format, generator, upstream, model, ide, store;
  std::optional<std::string> store_path;
  std::vector<std::string> cors_origins;
  bool no_chat_page = false, no_log_colors = false;
};

Flags parse_flags(int argc, char** argv) {
  Flags flags;
  for (int i = 1; i < argc; ++i) {
    std::string name = argv[i];
    std::optional<std::string> value;
    if (const auto eq = name.find('='); name.compare(0, 2, "--") == 0 && eq != std::string::npos) {
      value = name.substr(eq + 1);  // --name=value
      name.resize(eq);
    }
    if (name == "--help" || name == "-h") {
      std::cout << kUsage;
      std::exit(0);
    }
    const std::pair<const char*, bool*> switches[] = {{"--no-chat-page", &flags.no_chat_page},
                                                      {"--no-log-colors", &flags.no_log_colors}};
    bool* on = nullptr;
    for (const auto& [flag, target] : switches) {
      if (name == flag) on = target;
    }
    if (on) {
      if (value) fail(2, name + " takes no value");
      *on = true;
      continue;
    }
    std::optional<std::string> cors;
    const std::pair<const char*, std::optional<std::string>*> known[] = {
        {"--workdir", &flags.workdir},
        {"--host", &flags.host},
        {"--port", &flags.port},
        {"--grace-period", &flags.grace_period},
        {"--max-streams", &flags.max_streams},
        {"--log-level", &flags.log_level},
        {"--log-format", &flags.log_format},
        {"--generator", &flags.generator},
        {"--lame-duck", &flags.lame_duck},
        {"--upstream", &flags.upstream},
        {"--model", &flags.model},
        {"--ide", &flags.ide},
        {"--store", &flags.store},
        {"--store-path", &flags.store_path},
        {"--cors-origin", &cors}};
    std::optional<std::string>* slot = nullptr;
    for (const auto& [flag, target] : known) {
      if (name == flag) slot = target;
    }
    if (slot == nullptr) fail(2, "unknown argument '" + name + "'");
    if (!value) {
      if (i + 1 == argc) fail(2, name + " needs a value");
      value = argv[++i];
    }
    *slot = *value;
    if (cors) flags.cors_origins.push_back(*cors);
  }
  return flags;
}

// The flag if given, else the environment variable (which .env may have set).
std::optional<std::pair<std::string, std::string>> setting(const std::optional<std::string>& flag,
                                                           const std::string& flag_name,
                                                           const char* variable) {
  if (flag) return std::make_pair(*flag, flag_name);
  if (const char* value = std::getenv(variable); value && *value) {
    return std::make_pair(std::string(value), std::string(variable));
  }
  return {};
}

// "scheme://host[:port]/path" without "user:password@", for the log.
std::string without_credentials(const std::string& url) {
  const auto scheme = url.find("://");
  const auto start = scheme == std::string::npos ? 0 : scheme + 3;
  const auto at = url.find('@', start);
  const auto slash = url.find('/', start);
  if (at == std::string::npos || (slash != std::string::npos && at > slash)) return url;
  return url.substr(0, start) + url.substr(at + 1);
}

const char kChatPage[] =
#include "chat_html.inc"
    ;

}  // namespace

int main(int argc, char** argv) {
  // SIGINT and SIGTERM wait until the hook is installed: one that arrives
  // while the server starts then shuts it down cleanly (exit 0) instead of
  // killing it. Unblocking also delivers one that was pending at exec.
  sigset_t shutdown_signals;
  sigemptyset(&shutdown_signals);
  sigaddset(&shutdown_signals, SIGINT);
  sigaddset(&shutdown_signals, SIGTERM);
  ::pthread_sigmask(SIG_BLOCK, &shutdown_signals, nullptr);

  const Flags flags = parse_flags(argc, argv);

  if (!flags.workdir) fail(1, "--workdir DIR is required (e.g. --workdir .)");
  struct stat info {};
  if (::stat(flags.workdir->c_str(), &info) != 0) {
    fail(1, "--workdir: '" + *flags.workdir + "': " + std::strerror(errno));
  }
  if (!S_ISDIR(info.st_mode)) fail(1, "--workdir: '" + *flags.workdir + "' is not a directory");
  load_dotenv(*flags.workdir + "/.env");

  agentsmithy::Options options;
  options.workdir = *flags.workdir;
  if (auto host = setting(flags.host, "--host", "SERVER_HOST")) options.host = host->first;
  if (auto port = setting(flags.port, "--port", "SERVER_PORT")) {
    options.port = parse_port(port->first, port->second);
  } else {
    options.port = 8765;  // and the next free one, as AgentSmithy does
    options.port_attempts = 200;
  }
  options.status_file = true;
  if (flags.ide) options.ide = *flags.ide;
  if (flags.lame_duck) options.lame_duck = parse_seconds(*flags.lame_duck, "--lame-duck");
  options.cors_origins = flags.cors_origins;
  if (flags.cors_origins.empty()) {
    if (const char* list = std::getenv("AGENTSMITHY_CORS_ORIGINS")) {
      std::string rest = list;
      while (!rest.empty()) {
        const auto comma = rest.find(',');
        const std::string origin = trim(rest.substr(0, comma));
        if (!origin.empty()) options.cors_origins.push_back(origin);
        rest = comma == std::string::npos ? "" : rest.substr(comma + 1);
      }
    }
  }
  if (flags.grace_period) {
    options.grace_period = parse_seconds(*flags.grace_period, "--grace-period");
  }
  if (flags.max_streams) options.max_streams = parse_count(*flags.max_streams, "--max-streams");
  const auto store = setting(flags.store, "--store", "AGENTSMITHY_STORE");
  const std::string store_kind = store ? store->first : "sqlite";
  if (store_kind == "memory") {
    if (flags.store_path) fail(2, "--store-path is the SQLite file: not with --store memory");
    options.store = agentsmithy::memory_store();
  } else if (store_kind == "sqlite") {
    const std::string path =
        flags.store_path ? *flags.store_path : *flags.workdir + "/.agentsmithy/agentsmithy.sqlite3";
    if (!flags.store_path) ::mkdir((*flags.workdir + "/.agentsmithy").c_str(), 0755);
    try {
      options.store = agentsmithy::sqlite_store(path);
    } catch (const std::exception& e) {
      fail(1, std::string("cannot open the dialog store: ") + e.what());
    }
  } else {
    fail(2, store->second + ": expected sqlite or memory, got '" + store_kind + "'");
  }
  if (auto level = setting(flags.log_level, "--log-level", "LOG_LEVEL")) {
    options.log_level = parse_level(level->first, level->second);
  }
  bool json_logs = false;
  if (auto format = setting(flags.log_format, "--log-format", "LOG_FORMAT")) {
    json_logs = parse_json_format(format->first, format->second);
  }
  // A secret: only from the environment or .env, never a flag (ps shows flags).
  if (const char* token = std::getenv("AGENTSMITHY_TOKEN"); token && *token) {
    options.auth_token = token;
  }
  options.logger = make_logger(json_logs, !flags.no_log_colors && ::isatty(STDERR_FILENO) == 1);
  if (flags.generator && *flags.generator != "thread" && *flags.generator != "handler") {
    fail(2, "--generator: '" + *flags.generator + "' is not handler or thread");
  }

  // The upstream, if any; a URL that fails validation leaves the server up
  // with config_valid false in /health and an error on every chat.
  agentsmithy::Generator upstream;
  std::string serving = "the built-in demo";
  if (auto url = setting(flags.upstream, "--upstream", "OPENAI_BASE_URL")) {
    agentsmithy::OpenAIOptions up;
    up.base_url = url->first;
    if (auto model = setting(flags.model, "--model", "AGENTSMITHY_MODEL")) up.model = model->first;
    if (const char* key = std::getenv("OPENAI_API_KEY"); key && *key) up.api_key = key;
    const std::string shown = without_credentials(up.base_url);
    try {
      upstream = agentsmithy::openai_generator(up);
      serving = "the upstream " + shown + (up.model.empty() ? "" : " (model " + up.model + ")");
    } catch (const std::invalid_argument& e) {
      const std::string problem = url->second + ": " + e.what();
      options.config_errors.push_back(problem);
      upstream = [problem](const agentsmithy::ChatRequest&, agentsmithy::StreamWriter& out) {
        out.send({{"type", "error"},
                  {"error", "The server's configuration is invalid: " + problem},
                  {"code", "config_invalid"}});
      };
      serving = "nothing: the configuration is invalid (" + problem + ")";
    }
  }
  if (options.log_level <= agentsmithy::LogLevel::info) {
    options.logger(agentsmithy::LogLevel::info,
                   "agentsmithy-server starting: workdir " + options.workdir +
                       (options.ide.empty() ? "" : ", launched by " + options.ide) + ", serving " +
                       serving + ", grace period " + std::to_string(options.grace_period.count()) +
                       " ms" +
                       (options.lame_duck.count() > 0
                            ? ", lame duck " + std::to_string(options.lame_duck.count()) + " ms"
                            : "") +
                       ", max streams " + std::to_string(options.max_streams) +
                       (options.auth_token.empty() ? "" : ", bearer token required for /api/*"));
  }

  try {
    agentsmithy::Server server(options);  // serves the built-in demo by default
    if (upstream) {
      server.chat_service().set_generator(upstream);
    } else if (flags.generator && *flags.generator == "thread") {
      server.chat_service().set_generator(agentsmithy::demo_generator);
    } else {
      server.chat_service().set_stream_handler(agentsmithy::demo_stream_handler());
    }
    if (!flags.no_chat_page) {
      server.route("GET", "/", [](const httplib::Request&, httplib::Response& res) {
        res.set_header("Referrer-Policy", "no-referrer");
        res.set_header("Cache-Control", "no-cache");
        res.set_content(kChatPage, "text/html; charset=utf-8");
      });
    }
    auto hook = agentsmithy::install_signal_handlers(server);
    ::pthread_sigmask(SIG_UNBLOCK, &shutdown_signals, nullptr);
    if (!server.listen()) return 1;  // the library has logged why (port taken, ...)
    return hook.forced() ? 130 : 0;
  } catch (const std::exception& e) {
    fail(1, e.what());
  }
}
