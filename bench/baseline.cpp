// bench/baseline.cpp - the naive alternative the benchmark compares against.
//
// A bare cpp-httplib 0.11 server, written the way most cpp-httplib programs
// are: POST /api/chat streams the same SSE events as agentsmithy's demo
// generator (chat_start, `chat` chunks paced by context.demo, chat_end, done),
// each event from the chunked content provider's own call; on SIGTERM or
// SIGINT a sigwait thread simply calls Server::stop(). Nothing tells the open
// streams that the server is going away, the default thread pool
// (max(8, cores - 1) workers, unbounded queue) and the library's compiled-in
// listen backlog are left as they are.
//
// Same CLI subset as build/agentsmithy-server: --port P, --host H; --workdir,
// --max-streams, --grace-period and --log-format are accepted and ignored so
// the benchmark can start both the same way.
//
// Build (one line): g++ -std=c++17 -O2 bench/baseline.cpp
//            $(pkg-config --cflags --libs cpp-httplib) -pthread
#include <httplib.h>

#include <nlohmann/json.hpp>

#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <thread>

namespace {

using nlohmann::json;

const char* const kWords[] = {"Once",   "upon",   "a",     "time,",  "in",     "a",     "quiet",
                              "valley", "there",  "lived", "an",     "old",    "clock", "maker",
                              "who",    "built",  "small", "brass",  "birds",  "that",  "sang",
                              "the",    "hours.", "Every", "day",    "people", "came",  "from",
                              "far",    "away",   "to",    "listen."};
constexpr std::size_t kWordCount = sizeof(kWords) / sizeof(kWords[0]);

std::string random_dialog_id() {
  static std::atomic<unsigned> seq{0};
  std::mt19937_64 rng(std::random_device{}() ^ (seq.fetch_add(1) * 0x9E3779B97F4A7C15ULL));
  static const char hex[] = "0123456789abcdef";
  std::string id(32, '0');
  for (auto& c : id) c = hex[rng() & 15U];
  return id;
}

struct StreamState {
  std::string dialog_id;
  long tokens = 20;
  long interval_ms = 20;
  long step = 0;  // 0: chat_start, 1..tokens: chat, tokens+1: chat_end, then done
};

std::string sse(const json& event) { return "data: " + event.dump() + "\n\n"; }

std::string chunk_text(long i) {
  std::string s;
  for (int k = 0; k < 3; ++k) {
    s += kWords[static_cast<std::size_t>(i * 3 + k) % kWordCount];
    s += ' ';
  }
  return s;
}

void handle_chat(const httplib::Request& req, httplib::Response& res) {
  json body = json::parse(req.body, nullptr, false);
  if (body.is_discarded() || !body.is_object()) {
    res.status = 400;
    res.set_content(R"({"error":"Invalid JSON"})", "application/json");
    return;
  }
  auto st = std::make_shared<StreamState>();
  st->dialog_id = body.contains("dialog_id") && body["dialog_id"].is_string()
                      ? body["dialog_id"].get<std::string>()
                      : random_dialog_id();
  if (body.contains("context") && body["context"].is_object()) {
    const json& ctx = body["context"];
    if (ctx.contains("demo") && ctx["demo"].is_object()) {
      const json& demo = ctx["demo"];
      if (demo.contains("tokens") && demo["tokens"].is_number_integer())
        st->tokens = demo["tokens"].get<long>();
      if (demo.contains("interval_ms") && demo["interval_ms"].is_number_integer())
        st->interval_ms = demo["interval_ms"].get<long>();
    }
  }
  res.set_header("Cache-Control", "no-cache");
  res.set_header("X-Accel-Buffering", "no");
  res.set_chunked_content_provider("text/event-stream", [st](std::size_t, httplib::DataSink& sink) {
    std::string ev;
    if (st->step == 0) {
      ev = sse({{"type", "chat_start"}, {"dialog_id", st->dialog_id}});
    } else if (st->step <= st->tokens) {
      if (st->interval_ms > 0)
        std::this_thread::sleep_for(std::chrono::milliseconds(st->interval_ms));
      ev = sse({{"type", "chat"}, {"content", chunk_text(st->step)}, {"dialog_id", st->dialog_id}});
    } else if (st->step == st->tokens + 1) {
      ev = sse({{"type", "chat_end"}, {"dialog_id", st->dialog_id}});
    } else {
      ev = sse({{"type", "done"}, {"done", true}, {"dialog_id", st->dialog_id}});
      bool ok = sink.write(ev.data(), ev.size());
      sink.done();
      return ok;
    }
    ++st->step;
    return sink.write(ev.data(), ev.size());
  });
}

[[noreturn]] void usage(int code) {
  std::fprintf(code ? stderr : stdout,
               "usage: baseline [--host H] [--port P] [--workdir DIR] [--max-streams N]\n"
               "                [--grace-period S] [--log-format F]\n"
               "A bare cpp-httplib server streaming demo SSE events; SIGTERM calls "
               "Server::stop().\n");
  std::exit(code);
}

}  // namespace

int main(int argc, char** argv) {
  std::string host = "127.0.0.1";
  int port = 8765;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage(1);
      return argv[++i];
    };
    if (a == "--port") {
      port = std::atoi(value().c_str());
    } else if (a == "--host") {
      host = value();
    } else if (a == "--workdir" || a == "--max-streams" || a == "--grace-period" ||
               a == "--log-format") {
      value();  // accepted for a common command line, ignored
    } else if (a == "--help" || a == "-h") {
      usage(0);
    } else {
      std::fprintf(stderr, "baseline: unknown argument %s\n", a.c_str());
      usage(1);
    }
  }

  // The common way: block the signals in every thread, wait for them on one.
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);

  httplib::Server svr;
  svr.Get("/health", [port](const httplib::Request&, httplib::Response& res) {
    json j = {{"status", "ok"}, {"service", "baseline"}, {"pid", getpid()}, {"port", port}};
    res.set_content(j.dump(), "application/json");
  });
  svr.Post("/api/chat", handle_chat);

  std::thread stopper([&svr, set] {
    int sig = 0;
    sigwait(&set, &sig);
    std::fprintf(stderr, "baseline: signal %d, calling Server::stop()\n", sig);
    svr.stop();
  });

  std::fprintf(stderr, "baseline: listening on %s:%d\n", host.c_str(), port);
  bool ok = svr.listen(host.c_str(), port);
  if (!ok) {
    std::fprintf(stderr, "baseline: cannot listen on %s:%d\n", host.c_str(), port);
    pthread_kill(stopper.native_handle(), SIGTERM);  // release the sigwait thread
  }
  stopper.join();
  std::fprintf(stderr, "baseline: stopped\n");
  return ok ? 0 : 1;
}
