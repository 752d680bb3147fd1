// bench/storebench.cpp - the SQLite dialog store's own figures (issue 17).
//
//   storebench count FILE
//       What a run left in the store FILE (read only): store_turns,
//       store_turns_running, store_turns_shutdown, store_chat_events (the
//       chat events of every turn). bench/run.sh compares them with what the
//       load client's clients received.
//
//   storebench serve SERVER [--dialogs N] [--turns T] [--requests R] [--starts S]
//       Writes a store with N dialogs (default 10,000), the current one
//       holding T turns of 40 events each (default 1,000), through the public
//       sqlite_store(); then starts SERVER (build/agentsmithy-server) on it S
//       times (default 5), each time from posix_spawn to its first
//       `GET /health` 200 (startup_ms), and against the last one sends R
//       (default 1,000) `GET /api/dialogs/{id}/history` requests over one
//       keep-alive connection, the extension's first page and then pages at
//       random `before` positions (history_ms). Prints startup_ms_median,
//       startup_ms_max, history_p50_ms, history_p99_ms, history_max_ms.
//
// Build (bench/run.sh does): g++ -std=c++17 -O2 -I. -DAGENTSMITHY_SQLITE_SUPPORT
//     bench/storebench.cpp $(pkg-config --cflags --libs cpp-httplib) -lsqlite3 -pthread
#include "agentsmithy.hpp"

#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sqlite3.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

extern char** environ;

namespace {

using Clock = std::chrono::steady_clock;
using json = nlohmann::json;

[[noreturn]] void die(const std::string& message) {
  std::fprintf(stderr, "storebench: %s\n", message.c_str());
  std::exit(1);
}

double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  std::size_t rank = static_cast<std::size_t>(p * static_cast<double>(v.size()) + 0.999999);
  rank = std::min(std::max<std::size_t>(rank, 1), v.size());
  return v[rank - 1];
}

// --- count --------------------------------------------------------------------

long long scalar(sqlite3* db, const char* sql) {
  sqlite3_stmt* st = nullptr;
  if (sqlite3_prepare_v2(db, sql, -1, &st, nullptr) != SQLITE_OK) {
    die(std::string("query failed: ") + sqlite3_errmsg(db));
  }
  long long v = sqlite3_step(st) == SQLITE_ROW ? sqlite3_column_int64(st, 0) : -1;
  sqlite3_finalize(st);
  return v;
}

int count(const std::string& file) {
  sqlite3* db = nullptr;
  if (sqlite3_open_v2(file.c_str(), &db, SQLITE_OPEN_READONLY, nullptr) != SQLITE_OK) {
    die("cannot open " + file + ": " + (db ? sqlite3_errmsg(db) : "out of memory"));
  }
  std::printf("store_turns=%lld\n", scalar(db, "SELECT count(*) FROM turns"));
  std::printf("store_turns_running=%lld\n",
              scalar(db, "SELECT count(*) FROM turns WHERE outcome = 'running'"));
  std::printf("store_turns_shutdown=%lld\n",
              scalar(db, "SELECT count(*) FROM turns WHERE outcome = 'shutdown'"));
  std::printf(
      "store_chat_events=%lld\n",
      scalar(db, "SELECT count(*) FROM events WHERE json_extract(json, '$.type') = 'chat'"));
  sqlite3_close(db);
  return 0;
}

// --- serve --------------------------------------------------------------------

int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  if (fd < 0 || ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    die("no free port");
  }
  ::close(fd);
  return ntohs(a.sin_port);
}

struct Child {
  pid_t pid = -1;
  void stop() {
    if (pid <= 0) return;
    ::kill(pid, SIGTERM);
    int st = 0;
    ::waitpid(pid, &st, 0);
    pid = -1;
  }
};

// Starts SERVER on `file`; the time from posix_spawn to its first /health 200.
double start(const std::string& server, const std::string& workdir, const std::string& file,
             int port, Child& child) {
  std::vector<std::string> args = {server,   "--workdir",          workdir,
                                   "--port", std::to_string(port), "--store-path",
                                   file,     "--log-level",        "warning"};
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  const auto t0 = Clock::now();
  if (::posix_spawn(&child.pid, server.c_str(), nullptr, nullptr, argv.data(), environ) != 0) {
    die("cannot start " + server);
  }
  httplib::Client cli("127.0.0.1", port);
  cli.set_connection_timeout(0, 200000);
  for (;;) {
    if (auto res = cli.Get("/health"); res && res->status == 200) return ms_since(t0);
    int st = 0;
    if (::waitpid(child.pid, &st, WNOHANG) == child.pid) die("the server exited at start");
    if (ms_since(t0) > 30000) die("the server did not answer /health within 30 s");
    std::this_thread::sleep_for(std::chrono::microseconds(200));  // poll its port
  }
}

int serve(const std::string& server, long dialogs, long turns, long requests, int starts) {
  char dir[] = "/tmp/agentsmithy-storebench-XXXXXX";
  if (!::mkdtemp(dir)) die("mkdtemp failed");
  const std::string workdir = dir, file = workdir + "/store.sqlite3";
  std::string big;
  {
    auto store = agentsmithy::sqlite_store(file);
    for (long i = 0; i < dialogs; ++i) {
      char id[40];
      std::snprintf(id, sizeof id, "dlg-bench-%06ld", i);
      store->create_dialog(id, "dialog " + std::to_string(i));
      if (i == 0) big = id;
    }
    store->set_current_dialog(big);
    for (long t = 0; t < turns; ++t) {
      const std::string turn = "turn-bench-" + std::to_string(t);
      store->begin_turn(big, turn,
                        json{{"type", "user"}, {"content", "question " + std::to_string(t)}});
      std::vector<json> events;
      for (int e = 0; e < 40; ++e) {
        events.push_back(json{{"type", "chat"}, {"content", "token " + std::to_string(e) + " "}});
      }
      store->append(turn, 1, events);
      store->end_turn(turn, agentsmithy::TurnOutcome::completed, "");
    }
    store->sync();
  }
  std::vector<double> startup;
  Child child;
  int port = 0;
  for (int s = 0; s < starts; ++s) {
    child.stop();
    port = free_port();
    startup.push_back(start(server, workdir, file, port, child));
  }
  httplib::Client cli("127.0.0.1", port);
  cli.set_keep_alive(true);
  std::mt19937 rng(17);
  std::vector<double> history;
  long long last_idx = -1;
  for (long r = 0; r < requests; ++r) {
    std::string path = "/api/dialogs/" + big + "/history?limit=20";
    if (r > 0 && last_idx > 0) {
      path +=
          "&before=" + std::to_string(std::uniform_int_distribution<long long>(1, last_idx)(rng));
    }
    const auto t0 = Clock::now();
    auto res = cli.Get(path.c_str());
    history.push_back(ms_since(t0));
    if (!res || res->status != 200) die("history request failed: " + path);
    if (r == 0) last_idx = json::parse(res->body).value("last_idx", -1LL);
  }
  child.stop();
  std::system(("rm -rf " + workdir).c_str());
  std::printf("dialogs=%ld\nturns=%ld\nhistory_requests=%ld\n", dialogs, turns, requests);
  std::printf("startup_ms_median=%.1f\nstartup_ms_max=%.1f\n", percentile(startup, 0.5),
              percentile(startup, 1.0));
  std::printf("history_p50_ms=%.2f\nhistory_p99_ms=%.2f\nhistory_max_ms=%.2f\n",
              percentile(history, 0.5), percentile(history, 0.99), percentile(history, 1.0));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::signal(SIGPIPE, SIG_IGN);
  const std::vector<std::string> args(argv + 1, argv + argc);
  if (args.size() == 2 && args[0] == "count") return count(args[1]);
  if (args.size() >= 2 && args[0] == "serve") {
    long dialogs = 10000, turns = 1000, requests = 1000;
    int starts = 5;
    for (std::size_t i = 2; i + 1 < args.size(); i += 2) {
      const long v = std::strtol(args[i + 1].c_str(), nullptr, 10);
      if (args[i] == "--dialogs")
        dialogs = v;
      else if (args[i] == "--turns")
        turns = v;
      else if (args[i] == "--requests")
        requests = v;
      else if (args[i] == "--starts")
        starts = static_cast<int>(v);
      else
        die("unknown option " + args[i]);
    }
    return serve(args[1], std::max(1L, dialogs), turns, std::max(1L, requests),
                 std::max(1, starts));
  }
  std::fprintf(stderr,
               "usage: storebench count FILE\n"
               "       storebench serve SERVER [--dialogs N] [--turns T] [--requests R] "
               "[--starts S]\n");
  return 2;
}
