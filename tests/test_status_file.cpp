// DIR/.agentsmithy/status.json (detail::StatusFile): AgentSmithy's fields and
// lifecycle, atomic replacement, foreign fields kept, a dead server marked
// crashed, a live one refused, a corrupt file tolerated.
#include <doctest/doctest.h>

#include "agentsmithy.hpp"

#include <dirent.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <fstream>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace {

using agentsmithy::LogLevel;
using agentsmithy::detail::StatusFile;
using nlohmann::json;

// A fresh directory under $TMPDIR, removed (with its .agentsmithy/) at the end.
struct TempDir {
  std::string path;
  TempDir() {
    const char* base = std::getenv("TMPDIR");
    std::string tmpl = std::string(base && *base ? base : "/tmp") + "/status-file-XXXXXX";
    std::vector<char> buf(tmpl.begin(), tmpl.end());
    buf.push_back('\0');
    REQUIRE(::mkdtemp(buf.data()) != nullptr);
    path = buf.data();
  }
  ~TempDir() {
    const std::string state = path + "/.agentsmithy";
    for (const auto& name : list(state)) ::unlink((state + "/" + name).c_str());
    ::rmdir(state.c_str());
    ::rmdir(path.c_str());
  }
  std::string status() const { return path + "/.agentsmithy/status.json"; }
  static std::set<std::string> list(const std::string& dir) {
    std::set<std::string> names;
    if (DIR* d = ::opendir(dir.c_str())) {
      while (dirent* e = ::readdir(d)) {
        const std::string name = e->d_name;
        if (name != "." && name != "..") names.insert(name);
      }
      ::closedir(d);
    }
    return names;
  }
};

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

void put(const std::string& path, const std::string& text) {
  const auto slash = path.rfind('/');
  ::mkdir(path.substr(0, slash).c_str(), 0777);
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  REQUIRE(out.good());
}

json load(const std::string& path) {
  json doc = json::parse(slurp(path), nullptr, false);
  REQUIRE_MESSAGE(doc.is_object(), "not a JSON object: " << slurp(path));
  return doc;
}

bool iso_utc(const json& value) {
  static const std::regex form(R"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00)");
  return value.is_string() && std::regex_match(value.get<std::string>(), form);
}

// Records what the module logs.
struct LogSink {
  std::mutex mu;
  std::vector<std::pair<LogLevel, std::string>> records;
  agentsmithy::Logger logger() {
    return [this](LogLevel level, const std::string& message) {
      std::lock_guard<std::mutex> lock(mu);
      records.emplace_back(level, message);
    };
  }
  bool has(LogLevel level, const std::string& part) {
    std::lock_guard<std::mutex> lock(mu);
    for (const auto& [l, m] : records) {
      if (l == level && m.find(part) != std::string::npos) return true;
    }
    return false;
  }
};

// A pid that is certainly dead: a child that exited and was reaped.
pid_t dead_pid() {
  const pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) ::_exit(0);
  int status = 0;
  REQUIRE(::waitpid(child, &status, 0) == child);
  REQUIRE(::kill(child, 0) == -1);
  return child;
}

// A live child process that waits in pause() until killed.
struct LiveChild {
  pid_t pid = -1;
  LiveChild() {
    pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      for (;;) ::pause();
    }
  }
  void kill_and_reap() {
    if (pid <= 0) return;
    ::kill(pid, SIGKILL);
    int status = 0;
    ::waitpid(pid, &status, 0);
    pid = -1;
  }
  ~LiveChild() { kill_and_reap(); }
};

}  // namespace

TEST_SUITE("status file") {
  TEST_CASE("lifecycle: starting, ready, stopping, stopped with AgentSmithy's fields") {
    TempDir dir;
    StatusFile status(dir.path);
    CHECK(status.path() == dir.status());
    CHECK_FALSE(status.claim(std::nullopt).has_value());  // creates .agentsmithy/ too
    CHECK(status.claimed());

    json doc = load(dir.status());
    CHECK(doc["server_status"] == "starting");
    CHECK(doc["server_pid"] == ::getpid());
    CHECK_FALSE(doc.contains("port"));  // not known yet
    CHECK(iso_utc(doc["server_started_at"]));
    CHECK(doc["server_updated_at"] == doc["server_started_at"]);
    const std::string started = doc["server_started_at"];

    REQUIRE(status.ready(43210));
    doc = load(dir.status());
    CHECK(doc["server_status"] == "ready");
    CHECK(doc["server_pid"] == ::getpid());
    CHECK(doc["port"] == 43210);
    CHECK(doc["server_started_at"] == started);
    CHECK(iso_utc(doc["server_updated_at"]));
    CHECK(doc["server_updated_at"].get<std::string>() >= started);

    REQUIRE(status.stopping());
    doc = load(dir.status());
    CHECK(doc["server_status"] == "stopping");
    CHECK(doc["server_pid"] == ::getpid());
    CHECK(doc["port"] == 43210);

    REQUIRE(status.stopped());
    doc = load(dir.status());
    CHECK(doc["server_status"] == "stopped");
    CHECK_FALSE(doc.contains("server_pid"));
    CHECK_FALSE(doc.contains("port"));
    CHECK_FALSE(doc.contains("server_started_at"));
    CHECK_FALSE(doc.contains("server_error"));
    CHECK(iso_utc(doc["server_updated_at"]));
    // Only the status and its lock are left: no temporary file.
    CHECK(TempDir::list(dir.path + "/.agentsmithy") ==
          std::set<std::string>{"status.json", "status.json.lock"});
  }

  TEST_CASE("a port known at claim is written with starting") {
    TempDir dir;
    StatusFile status(dir.path);
    CHECK_FALSE(status.claim(9123).has_value());
    CHECK(load(dir.status())["port"] == 9123);
  }

  TEST_CASE("error: server_error set, pid and port removed; the next start clears it") {
    TempDir dir;
    {
      StatusFile status(dir.path);
      CHECK_FALSE(status.claim(8765).has_value());
      REQUIRE(status.error("cannot listen on 127.0.0.1:8765: Address already in use"));
      const json doc = load(dir.status());
      CHECK(doc["server_status"] == "error");
      CHECK(doc["server_error"] == "cannot listen on 127.0.0.1:8765: Address already in use");
      CHECK_FALSE(doc.contains("server_pid"));
      CHECK_FALSE(doc.contains("port"));
      CHECK(iso_utc(doc["server_updated_at"]));
    }
    StatusFile again(dir.path);  // error does not block a new start
    CHECK_FALSE(again.claim(std::nullopt).has_value());
    const json doc = load(dir.status());
    CHECK(doc["server_status"] == "starting");
    CHECK_FALSE(doc.contains("server_error"));
  }

  TEST_CASE("fields the server does not own are kept through every write") {
    TempDir dir;
    const json foreign = {{"scan_status", "done"},
                          {"scan_progress", 100},
                          {"scan_started_at", "2026-01-01T00:00:00+00:00"},
                          {"scan_pid", nullptr},
                          {"error", nullptr},
                          {"custom", {{"nested", {1, "two", 3.5}}}}};
    put(dir.status(), foreign.dump());
    StatusFile status(dir.path);
    const auto keeps = [&] {
      const json doc = load(dir.status());
      for (auto it = foreign.begin(); it != foreign.end(); ++it) {
        const std::string key = it.key();
        CHECK_MESSAGE(doc.contains(key), key);
        CHECK_MESSAGE(doc.value(key, json()) == it.value(), key);
      }
    };
    CHECK_FALSE(status.claim(std::nullopt).has_value());
    keeps();
    status.ready(1234);
    keeps();
    status.stopping();
    keeps();
    status.stopped();
    keeps();
    status.error("late");
    keeps();
  }

  TEST_CASE("a missing, empty, corrupt or non-object file is tolerated") {
    for (const char* text :
         {"", "{not json", "[1, 2, 3]", "\"ready\"", "{\"server_status\": ", "\x01\xff"}) {
      CAPTURE(text);
      TempDir dir;
      put(dir.status(), text);
      LogSink log;
      StatusFile status(dir.path, log.logger());
      CHECK_FALSE(status.claim(std::nullopt).has_value());
      json doc = load(dir.status());
      CHECK(doc["server_status"] == "starting");
      CHECK(doc["server_pid"] == ::getpid());
      if (*text != '\0') CHECK(log.has(LogLevel::warning, "not a JSON object"));
      CHECK(status.ready(5555));
      CHECK(load(dir.status())["port"] == 5555);
    }
  }

  TEST_CASE("a workdir that cannot hold .agentsmithy: logged, never thrown, writes report false") {
    TempDir dir;
    const std::string missing = dir.path + "/does/not/exist";
    LogSink log;
    StatusFile status(missing, log.logger());
    CHECK_FALSE(status.claim(std::nullopt).has_value());  // not a refusal: the server may run
    CHECK(log.has(LogLevel::warning, "cannot create"));
    CHECK_FALSE(status.ready(1));
    CHECK_FALSE(status.stopping());
    CHECK_FALSE(status.stopped());
  }

  TEST_CASE("a dead server in a running state is marked crashed before the new start") {
    for (const char* state : {"starting", "ready", "stopping"}) {
      CAPTURE(state);
      TempDir dir;
      const pid_t dead = dead_pid();
      put(dir.status(), json{{"server_status", state},
                             {"server_pid", dead},
                             {"port", 8765},
                             {"server_started_at", "2026-01-01T00:00:00.000000+00:00"},
                             {"scan_status", "idle"}}
                            .dump());
      // The module logs right after the crashed write and before the starting
      // one: read the file from the logger to see the intermediate state.
      std::optional<json> seen;
      StatusFile status(dir.path, [&](LogLevel, const std::string& message) {
        if (message.find("marked crashed") != std::string::npos) seen = load(dir.status());
      });
      CHECK_FALSE(status.claim(std::nullopt).has_value());
      REQUIRE(seen.has_value());
      CHECK((*seen)["server_status"] == "crashed");
      CHECK_FALSE(seen->contains("server_pid"));
      CHECK_FALSE(seen->contains("port"));
      CHECK((*seen)["server_error"].get<std::string>().find("pid " + std::to_string(dead)) !=
            std::string::npos);
      CHECK((*seen)["server_error"].get<std::string>().find(state) != std::string::npos);
      CHECK(iso_utc((*seen)["server_updated_at"]));
      CHECK((*seen)["scan_status"] == "idle");

      const json doc = load(dir.status());
      CHECK(doc["server_status"] == "starting");
      CHECK(doc["server_pid"] == ::getpid());
      CHECK(doc["scan_status"] == "idle");
    }
  }

  TEST_CASE("a dead pid in a final state is not marked crashed") {
    for (const char* state : {"stopped", "error", "crashed"}) {
      CAPTURE(state);
      TempDir dir;
      put(dir.status(), json{{"server_status", state}, {"server_pid", dead_pid()}}.dump());
      bool crashed_logged = false;
      StatusFile status(dir.path, [&](LogLevel, const std::string& message) {
        if (message.find("marked crashed") != std::string::npos) crashed_logged = true;
      });
      CHECK_FALSE(status.claim(std::nullopt).has_value());
      CHECK_FALSE(crashed_logged);
      CHECK(load(dir.status())["server_status"] == "starting");
    }
  }

  TEST_CASE("a live server for the same directory refuses the new one, which then writes nothing") {
    TempDir dir;
    LiveChild other;
    const std::string before = json{{"server_status", "ready"},
                                    {"server_pid", other.pid},
                                    {"port", 8765},
                                    {"server_started_at", "2026-01-01T00:00:00.000000+00:00"},
                                    {"server_updated_at", "2026-01-01T00:00:00.000000+00:00"}}
                                   .dump(2);
    put(dir.status(), before);
    {
      StatusFile status(dir.path);
      const auto refusal = status.claim(std::nullopt);
      REQUIRE(refusal.has_value());
      CHECK(*refusal == "another server is running for " + dir.path + " on port 8765 (pid " +
                            std::to_string(other.pid) + ")");
      CHECK_FALSE(status.claimed());
      CHECK(slurp(dir.status()) == before);
      CHECK_FALSE(status.ready(9999));
      CHECK_FALSE(status.stopping());
      CHECK_FALSE(status.stopped());
      CHECK_FALSE(status.error("x"));
      CHECK(slurp(dir.status()) == before);  // byte for byte
    }
    CHECK(slurp(dir.status()) == before);  // nor at destruction

    // Once that server is gone, the next one marks it crashed and starts.
    other.kill_and_reap();
    StatusFile next(dir.path);
    CHECK_FALSE(next.claim(std::nullopt).has_value());
    CHECK(load(dir.status())["server_status"] == "starting");
    CHECK(load(dir.status())["server_pid"] == ::getpid());
  }

  TEST_CASE("a live pid refuses in every running state, and in none of the others") {
    LiveChild other;
    for (const char* state : {"starting", "ready", "stopping", "stopped", "error", "crashed"}) {
      CAPTURE(state);
      TempDir dir;
      put(dir.status(), json{{"server_status", state}, {"server_pid", other.pid}}.dump());
      StatusFile status(dir.path);
      const auto refusal = status.claim(std::nullopt);
      const bool running = std::string(state) != "stopped" && std::string(state) != "error" &&
                           std::string(state) != "crashed";
      CHECK(refusal.has_value() == running);
      if (refusal)
        CHECK(refusal->find("on port unknown (pid " + std::to_string(other.pid) + ")") !=
              std::string::npos);
    }
  }

  TEST_CASE(
      "pid values that are not a process never refuse (kill(0) and kill(-1) address groups)") {
    for (const json& pid :
         {json(0), json(-1), json("1"), json(1.5), json(nullptr), json(4294967296LL)}) {
      CAPTURE(pid.dump());
      TempDir dir;
      put(dir.status(), json{{"server_status", "ready"}, {"server_pid", pid}}.dump());
      StatusFile status(dir.path);
      CHECK_FALSE(status.claim(std::nullopt).has_value());
      CHECK(load(dir.status())["server_pid"] == ::getpid());
    }
  }

  TEST_CASE("a status left by an earlier process with our own pid is stale, not a refusal") {
    TempDir dir;
    put(dir.status(),
        json{{"server_status", "ready"}, {"server_pid", ::getpid()}, {"port", 1}}.dump());
    StatusFile status(dir.path);
    CHECK_FALSE(status.claim(std::nullopt).has_value());
    CHECK(load(dir.status())["server_status"] == "starting");
  }

  TEST_CASE("two claims for one directory in one process: the second is refused until stopped") {
    TempDir dir;
    StatusFile first(dir.path);
    CHECK_FALSE(first.claim(8765).has_value());
    {
      StatusFile second(dir.path + "/.");  // the same directory, spelled differently
      const auto refusal = second.claim(std::nullopt);
      REQUIRE(refusal.has_value());
      CHECK(refusal->find("in this process") != std::string::npos);
    }
    CHECK(load(dir.status())["server_pid"] == ::getpid());
    first.ready(8765);
    first.stopped();
    StatusFile third(dir.path);
    CHECK_FALSE(third.claim(std::nullopt).has_value());
  }

  TEST_CASE("a status taken over by another live server is not overwritten by ours") {
    TempDir dir;
    StatusFile status(dir.path);
    CHECK_FALSE(status.claim(8765).has_value());
    LiveChild other;  // e.g. status.json was deleted and another server started
    const std::string theirs =
        json{{"server_status", "ready"}, {"server_pid", other.pid}, {"port", 8766}}.dump();
    put(dir.status(), theirs);
    CHECK_FALSE(status.stopping());
    CHECK_FALSE(status.stopped());
    CHECK(slurp(dir.status()) == theirs);
  }

  TEST_CASE("atomic replacement: a reader always sees a whole JSON object while writes repeat") {
    TempDir dir;
    StatusFile status(dir.path);
    put(dir.status(),
        json{{"scan_status", "scanning"}, {"padding", std::string(64 * 1024, 'x')}}.dump());
    REQUIRE_FALSE(status.claim(std::nullopt).has_value());

    std::atomic<bool> done{false};
    std::atomic<int> bad{0}, reads{0};
    std::set<std::string> stamps;  // distinct server_updated_at values the reader saw
    std::thread reader([&] {
      while (!done.load()) {
        const std::string text = slurp(dir.status());
        const json doc = json::parse(text, nullptr, false);
        if (!doc.is_object() || !doc.contains("server_status") ||
            doc.value("padding", std::string()).size() != 64 * 1024) {
          ++bad;
        } else {
          stamps.insert(doc.value("server_updated_at", std::string()));
        }
        ++reads;
      }
    });
    // Two writer threads through the same object: the mutex serialises them.
    const auto writer = [&](int base) {
      for (int i = 0; i < 150; ++i) {
        if (i % 2 == 0) {
          status.ready(base + i);
        } else {
          status.stopping();
        }
      }
    };
    std::thread w1(writer, 20000), w2(writer, 30000);
    w1.join();
    w2.join();
    done = true;
    reader.join();
    MESSAGE("reads: " << reads.load() << ", distinct states seen: " << stamps.size());
    CHECK(bad.load() == 0);
    CHECK(reads.load() > 0);
    CHECK(stamps.size() > 1);  // the reader did overlap the writes
    const json doc = load(dir.status());
    CHECK(doc["scan_status"] == "scanning");
    CHECK(TempDir::list(dir.path + "/.agentsmithy") ==
          std::set<std::string>{"status.json", "status.json.lock"});
  }

  TEST_CASE(
      "concurrent writers in two processes lose no foreign field (flock around each update)") {
    // The child plays another writer of status.json (e.g. a scanner) using the
    // same read-modify-write under the lock; ours must not drop its field.
    TempDir dir;
    StatusFile status(dir.path);
    REQUIRE_FALSE(status.claim(std::nullopt).has_value());
    int go[2];
    REQUIRE(::pipe(go) == 0);
    const pid_t child = ::fork();
    REQUIRE(child >= 0);
    if (child == 0) {
      char c;
      (void)::read(go[0], &c, 1);
      // Each iteration: lock, read, count one more, replace. A write of ours
      // made from a stale read would take the count back: the total falls short.
      for (int i = 1; i <= 200; ++i) {
        const int lock = ::open((dir.status() + ".lock").c_str(), O_RDWR | O_CLOEXEC);
        ::flock(lock, LOCK_EX);
        json doc = json::parse(slurp(dir.status()), nullptr, false);
        if (!doc.is_object()) ::_exit(3);
        doc["scan_count"] = doc.value("scan_count", 0) + 1;
        const std::string tmp = dir.status() + ".child.tmp";
        {
          std::ofstream out(tmp, std::ios::trunc);
          out << doc.dump();
        }
        ::rename(tmp.c_str(), dir.status().c_str());
        ::close(lock);
      }
      ::_exit(0);
    }
    REQUIRE(::write(go[1], "g", 1) == 1);
    int wstatus = 0;
    int writes = 0;
    pid_t reaped = 0;
    // Write while the child does (bounded: a stuck child fails the test, not hangs it).
    while ((reaped = ::waitpid(child, &wstatus, WNOHANG)) == 0 && writes < 200000) {
      status.ready(40000 + (writes++ % 1000));
    }
    if (reaped == 0) {
      ::kill(child, SIGKILL);
      reaped = ::waitpid(child, &wstatus, 0);
      FAIL("the child writer did not finish");
    }
    REQUIRE(reaped == child);
    MESSAGE("our writes while the child wrote: " << writes);
    ::close(go[0]);
    ::close(go[1]);
    REQUIRE(WIFEXITED(wstatus));
    REQUIRE(WEXITSTATUS(wstatus) == 0);
    status.stopping();
    const json doc = load(dir.status());
    CHECK(doc["scan_count"] == 200);  // none of the child's writes was lost
    CHECK(doc["server_status"] == "stopping");
  }

}  // TEST_SUITE
