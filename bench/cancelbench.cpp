// bench/cancelbench.cpp - the on_cancel latency bench server.
//
// Every chat request gets a generator that sends chat_start and one chat
// event, then blocks in recv() on one end of a socketpair that nothing ever
// writes to. Only the stream's on_cancel callback can release it: the
// callback shuts the socket down, and recv() returns 0. Per stream it stamps
// on CLOCK_MONOTONIC (one clock for every process on the machine, the one the
// load client stamps the signal and its disconnects with):
//
//   t_blocked   just before the generator enters recv()
//   t_callback  when the on_cancel callback started
//   t_released  when recv() returned in the generator
//
// and once listen() has returned (the drain is over) writes one line per
// stream to --stamps FILE: "<dialog_id> <t_blocked> <t_callback> <t_released>"
// in nanoseconds (0: did not happen). `loadclient cancel` reads that file.
//
//   cancelbench --stamps FILE [--port P] [--host H] [--max-streams N]
//               [--grace-period S] [--workdir DIR] [--log-level LEVEL]
//
// Build: g++ -std=c++17 -O2 -I. bench/cancelbench.cpp
//        $(pkg-config --cflags --libs cpp-httplib) -pthread
#include "agentsmithy.hpp"

#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace {

int64_t monotonic_ns() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000LL + ts.tv_nsec;
}

// One stream's producer: its socketpair and its three times. The socketpair
// is closed only at exit, so that a callback can never shut down a
// descriptor that has since been reused.
struct Record {
  std::string dialog_id;
  int fds[2] = {-1, -1};
  std::atomic<int64_t> blocked{0};
  std::atomic<int64_t> callback{0};
  std::atomic<int64_t> released{0};
  ~Record() {
    for (int fd : fds)
      if (fd >= 0) close(fd);
  }
};

std::mutex records_mu;
std::vector<std::shared_ptr<Record>> records;

void blocked_generator(const agentsmithy::ChatRequest&, agentsmithy::StreamWriter& out) {
  if (!out.send({{"type", "chat_start"}}) || !out.chat("blocked ")) return;
  auto rec = std::make_shared<Record>();
  rec->dialog_id = out.dialog_id();
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, rec->fds) != 0) {
    out.send({{"type", "error"}, {"error", std::string("socketpair: ") + std::strerror(errno)}});
    return;
  }
  {
    std::lock_guard<std::mutex> lock(records_mu);
    records.push_back(rec);
  }
  // Registered after a cancellation, the callback runs at once, here; the
  // recv() below then returns at once too.
  out.on_cancel([rec] {
    rec->callback.store(monotonic_ns());
    shutdown(rec->fds[0], SHUT_RDWR);
  });
  rec->blocked.store(monotonic_ns());
  char byte = 0;
  for (int k = 0; k < 1000; ++k) {  // only EINTR repeats
    const ssize_t n = recv(rec->fds[0], &byte, 1, 0);
    if (n >= 0 || errno != EINTR) break;
  }
  rec->released.store(monotonic_ns());
  // Returning appends done; on a shutdown the server has already ended the
  // stream with the shutdown error and done.
}

bool write_stamps(const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "w");
  if (!f) return false;
  std::fprintf(f, "# dialog_id t_blocked_ns t_callback_ns t_released_ns (CLOCK_MONOTONIC)\n");
  std::lock_guard<std::mutex> lock(records_mu);
  for (const auto& r : records)
    std::fprintf(
        f, "%s %lld %lld %lld\n", r->dialog_id.c_str(), static_cast<long long>(r->blocked.load()),
        static_cast<long long>(r->callback.load()), static_cast<long long>(r->released.load()));
  return std::fclose(f) == 0;
}

[[noreturn]] void usage(int code) {
  std::fprintf(code ? stderr : stdout,
               "usage: cancelbench --stamps FILE [--port P] [--host H] [--max-streams N]\n"
               "                   [--grace-period S] [--workdir DIR] [--log-level LEVEL]\n"
               "Every stream blocks in recv() until its on_cancel callback shuts the socket\n"
               "down; the times are written to FILE once the server has stopped.\n");
  std::exit(code);
}

}  // namespace

int main(int argc, char** argv) {
  agentsmithy::Options options;
  options.port = 8765;
  std::string stamps;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") usage(0);
    if (i + 1 >= argc) usage(2);
    const std::string v = argv[++i];
    if (a == "--port") {
      options.port = std::atoi(v.c_str());
    } else if (a == "--host") {
      options.host = v;
    } else if (a == "--workdir") {
      options.workdir = v;
    } else if (a == "--max-streams") {
      options.max_streams = static_cast<std::size_t>(std::strtoul(v.c_str(), nullptr, 10));
    } else if (a == "--grace-period") {
      options.grace_period = std::chrono::milliseconds(std::llround(std::atof(v.c_str()) * 1000));
    } else if (a == "--stamps") {
      stamps = v;
    } else if (a == "--log-level") {
      options.log_level = v == "debug"     ? agentsmithy::LogLevel::debug
                          : v == "warning" ? agentsmithy::LogLevel::warning
                          : v == "error"   ? agentsmithy::LogLevel::error
                                           : agentsmithy::LogLevel::info;
    } else if (a == "--generator" || a == "--log-format") {
      // accepted for a common command line, ignored
    } else {
      std::fprintf(stderr, "cancelbench: unknown argument %s\n", a.c_str());
      usage(2);
    }
  }
  if (stamps.empty()) usage(2);

  agentsmithy::Server server(options);
  server.chat_service().set_generator(blocked_generator);
  auto hook = agentsmithy::install_signal_handlers(server);
  std::fprintf(stderr, "cancelbench: serving on %s:%d\n", options.host.c_str(), options.port);
  if (!server.listen()) {
    std::fprintf(stderr, "cancelbench: cannot listen on %s:%d\n", options.host.c_str(),
                 options.port);
    return 1;
  }
  if (!write_stamps(stamps)) {
    std::fprintf(stderr, "cancelbench: cannot write %s: %s\n", stamps.c_str(),
                 std::strerror(errno));
    return 1;
  }
  std::lock_guard<std::mutex> lock(records_mu);
  std::fprintf(stderr, "cancelbench: stopped; %zu streams stamped to %s\n", records.size(),
               stamps.c_str());
  return 0;
}
