// bench/upstream.cpp - a fast local OpenAI-compatible upstream for the
// benchmark's upstream scenario (issue 9).
//
// One thread, non-blocking sockets on epoll. Every POST .../chat/completions
// gets a chunked text/event-stream answer: one chat.completion.chunk with a
// few characters of content every --interval-ms (default 20), --tokens of them
// (default 1,000,000: longer than any run), then a finish chunk, a usage chunk
// and data: [DONE]. For every connection it records when it was accepted, when
// its request arrived, how many chunks it sent and when the peer (the server
// under test) closed it, on CLOCK_MONOTONIC and CLOCK_REALTIME.
//
//   upstream [--port P] [--interval-ms M] [--tokens T] [--stamps FILE] [--rt 0|1]
//
// Token k of a stream is due k intervals after its request arrived (an
// absolute schedule: a late token does not delay the next). With --rt 1 (the
// default) it runs SCHED_RR, priority 1, when permitted: an upstream stands
// for another machine, whose pace must not depend on how many runnable
// threads the server under test has on this one.
//
// Prints "port=P" on stdout once listening (P = 0 picks a free port). On
// SIGUSR1, and on SIGTERM/SIGINT before exiting, writes FILE (default
// upstream-stamps.txt): two header lines ("# upstream sched=... interval_ms=M"
// and the column names), then per connection
//   index accepted_mono_ns request_mono_ns closed_mono_ns closed_real_ns chunks max_late_us
// (0: did not happen; max_late_us: the latest any of its tokens went out
// after its due time, the upstream's own lag). GET /stats answers a one-line JSON summary:
// connections, open, streaming, chunks sent, and the closes' first and last
// times (CLOCK_MONOTONIC and CLOCK_REALTIME, ns), so a driver can compare them
// with the moment it signalled the server (steady_clock is CLOCK_MONOTONIC).
// Only 127.0.0.1 is listened on.
//
// The upstream scenario of bench/run.sh (N = 1,000, a token every 20 ms;
// BENCH_ONLY=upstream) runs, per run:
//   build/bench/upstream --interval-ms 20 --stamps STAMPS      # prints port=UP
//   build/bench/loadclient shutdown --n 1000 --interval-ms 20 --pace-from first-chat
//     --connect-rate 20000 --connect-inflight 256 --inflight 256 ...
//     -- agentsmithy-server --workdir TMP --port {PORT}
//        --upstream http://127.0.0.1:UP/v1 --max-streams 1200 --grace-period 10
//   kill -TERM <upstream>; wait                                 # STAMPS written
// The load client gives pace_pct, settle_server_cores, settle_cpu_us_per_chat
// and done_max_ms, and prints signal_mono_ns (its SIGTERM, CLOCK_MONOTONIC);
// each stream's closed_mono_ns minus that is the upstream-closed figure.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <queue>
#include <string>
#include <vector>

namespace {

int64_t clock_ns(clockid_t id) {
  timespec ts{};
  clock_gettime(id, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000LL + ts.tv_nsec;
}
int64_t mono() { return clock_ns(CLOCK_MONOTONIC); }

struct Config {
  int port = 0;
  int interval_ms = 20;
  long long tokens = 1000000;
  std::string stamps = "upstream-stamps.txt";
  bool rt = true;
};

struct Conn {
  int fd = -1;
  std::string in;   // the request so far
  std::string out;  // bytes the socket has not taken yet
  bool streaming = false;
  bool finished = false;  // the whole answer is queued
  long long chunks = 0;
  int64_t accepted = 0, request = 0, closed_mono = 0, closed_real = 0;
  int64_t max_late = 0;  // ns: the latest a token went out after its due time
};

std::string chunk(const std::string& payload) {
  char size[32];
  std::snprintf(size, sizeof size, "%zx\r\n", payload.size());
  return size + payload + "\r\n";
}
std::string sse(const std::string& json) { return chunk("data: " + json + "\n\n"); }

const char* kHead =
    "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    "Connection: close\r\nTransfer-Encoding: chunked\r\n\r\n";

class Upstream {
 public:
  explicit Upstream(Config cfg) : cfg_(cfg) {}

  int run() {
    if (cfg_.rt) {
      sched_param prm{};
      prm.sched_priority = 1;
      rt_ = sched_setscheduler(0, SCHED_RR | SCHED_RESET_ON_FORK, &prm) == 0;
    }
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGTERM);
    sigaddset(&mask, SIGINT);
    sigaddset(&mask, SIGUSR1);
    sigaddset(&mask, SIGPIPE);
    sigprocmask(SIG_BLOCK, &mask, nullptr);
    sigfd_ = signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK);
    listen_fd_ = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    const int one = 1;
    setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<uint16_t>(cfg_.port));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
        listen(listen_fd_, 4096) != 0) {
      std::fprintf(stderr, "upstream: cannot listen on port %d: %s\n", cfg_.port, strerror(errno));
      return 1;
    }
    socklen_t len = sizeof addr;
    getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&addr), &len);
    std::printf("port=%d\n", ntohs(addr.sin_port));
    std::fflush(stdout);
    ep_ = epoll_create1(EPOLL_CLOEXEC);
    add(listen_fd_, EPOLLIN, kListen);
    add(sigfd_, EPOLLIN, kSignal);
    std::vector<epoll_event> events(1024);
    for (;;) {
      int timeout = -1;
      if (!due_.empty())
        timeout = static_cast<int>(std::max<int64_t>(0, (due_.top().first - mono()) / 1000000 + 1));
      const int n = epoll_wait(ep_, events.data(), static_cast<int>(events.size()), timeout);
      if (n < 0 && errno != EINTR) return 1;
      bool stop = false;
      for (int i = 0; i < n; ++i) {
        const uint64_t tag = events[i].data.u64;
        if (tag == kListen) {
          accept_all();
        } else if (tag == kSignal) {
          if (!on_signal()) stop = true;
        } else {
          on_conn(static_cast<std::size_t>(tag), events[i].events);
        }
      }
      if (stop) {
        // Closes already pending (the server under test has exited when the
        // bench sends SIGTERM) are stamped before the file is written, not
        // lost behind the signal: read until nothing is ready (bounded).
        for (int round = 0; round < 1000; ++round) {
          const int k = epoll_wait(ep_, events.data(), static_cast<int>(events.size()), 0);
          if (k <= 0) break;
          for (int i = 0; i < k; ++i) {
            const uint64_t tag = events[i].data.u64;
            if (tag != kListen && tag != kSignal)
              on_conn(static_cast<std::size_t>(tag), events[i].events);
          }
        }
        write_stamps();
        return 0;
      }
      tick();
    }
  }

 private:
  static constexpr uint64_t kListen = ~0ULL, kSignal = ~0ULL - 1;

  void add(int fd, uint32_t ev, uint64_t tag) {
    epoll_event e{};
    e.events = ev;
    e.data.u64 = tag;
    epoll_ctl(ep_, EPOLL_CTL_ADD, fd, &e);
  }
  void mod(Conn& c, std::size_t i, bool want_out) {
    epoll_event e{};
    e.events = EPOLLIN | EPOLLRDHUP | (want_out ? EPOLLOUT : 0u);
    e.data.u64 = i;
    epoll_ctl(ep_, EPOLL_CTL_MOD, c.fd, &e);
  }

  void accept_all() {
    for (;;) {
      const int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
      if (fd < 0) return;
      const int one = 1;
      setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      conns_.emplace_back();
      Conn& c = conns_.back();
      c.fd = fd;
      c.accepted = mono();
      add(fd, EPOLLIN | EPOLLRDHUP, conns_.size() - 1);
    }
  }

  void close_conn(Conn& c, bool by_peer) {
    if (c.fd < 0) return;
    if (by_peer && c.closed_mono == 0) {
      c.closed_mono = mono();
      c.closed_real = clock_ns(CLOCK_REALTIME);
    }
    epoll_ctl(ep_, EPOLL_CTL_DEL, c.fd, nullptr);
    close(c.fd);
    c.fd = -1;
  }

  void on_conn(std::size_t i, uint32_t ev) {
    Conn& c = conns_[i];
    if (c.fd < 0) return;
    if (ev & EPOLLIN) {
      char buf[16384];
      for (;;) {
        const ssize_t n = recv(c.fd, buf, sizeof buf, 0);
        if (n > 0) {
          if (!c.streaming) c.in.append(buf, static_cast<std::size_t>(n));
          continue;
        }
        if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
          close_conn(c, true);
          return;
        }
        break;
      }
      if (!c.streaming) maybe_start(c, i);
    }
    if (ev & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
      close_conn(c, true);
      return;
    }
    if (ev & EPOLLOUT) flush(c, i);
  }

  void maybe_start(Conn& c, std::size_t i) {
    const auto end = c.in.find("\r\n\r\n");
    if (end == std::string::npos) return;
    std::size_t length = 0;
    std::string head = c.in.substr(0, end);
    for (auto& ch : head) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    const auto cl = head.find("content-length:");
    if (cl != std::string::npos) length = std::strtoul(head.c_str() + cl + 15, nullptr, 10);
    if (c.in.size() < end + 4 + length) return;
    c.request = mono();
    if (head.rfind("get /stats", 0) == 0) {
      const std::string body = stats();
      c.out =
          "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
          "Content-Length: " +
          std::to_string(body.size()) + "\r\n\r\n" + body;
      c.finished = true;
      c.streaming = true;
      flush(c, i);
      return;
    }
    c.streaming = true;
    c.in.clear();
    c.out = kHead;
    c.out += sse(
        R"({"id":"b","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]})");
    flush(c, i);
    due_.emplace(mono() + cfg_.interval_ms * 1000000LL, i);
  }

  void flush(Conn& c, std::size_t i) {
    while (!c.out.empty()) {
      const ssize_t n = send(c.fd, c.out.data(), c.out.size(), MSG_NOSIGNAL);
      if (n > 0) {
        c.out.erase(0, static_cast<std::size_t>(n));
        continue;
      }
      if (errno == EAGAIN) {
        mod(c, i, true);
        return;
      }
      close_conn(c, true);
      return;
    }
    mod(c, i, false);
    if (c.finished) close_conn(c, false);
  }

  void tick() {
    const int64_t now = mono();
    while (!due_.empty() && due_.top().first <= now) {
      const auto [due, i] = due_.top();
      due_.pop();
      Conn& c = conns_[i];
      if (c.fd < 0) continue;
      if (c.out.size() > (1 << 20)) {  // a reader that does not keep up: skip a beat
        due_.emplace(due + cfg_.interval_ms * 1000000LL, i);
        continue;
      }
      c.max_late = std::max(c.max_late, now - due);
      if (c.chunks < cfg_.tokens) {
        ++c.chunks;
        c.out += sse(
            R"({"id":"b","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"tok )" +
            std::to_string(c.chunks) + R"( "},"finish_reason":null}]})");
        due_.emplace(due + cfg_.interval_ms * 1000000LL, i);
      } else {
        c.out += sse(
            R"({"id":"b","object":"chat.completion.chunk","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]})");
        c.out += sse(
            R"({"id":"b","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":)" +
            std::to_string(c.chunks) + "}}");
        c.out += chunk("data: [DONE]\n\n") + "0\r\n\r\n";
        c.finished = true;
      }
      flush(c, i);
    }
  }

  std::string stats() const {
    long long open = 0, streaming = 0, chunks = 0, closes = 0;
    int64_t first = 0, last = 0, first_real = 0, last_real = 0;
    for (const Conn& c : conns_) {
      if (c.fd >= 0) ++open;
      if (c.fd >= 0 && c.streaming && !c.finished) ++streaming;
      chunks += c.chunks;
      if (c.closed_mono) {
        ++closes;
        if (!first || c.closed_mono < first) first = c.closed_mono, first_real = c.closed_real;
        if (c.closed_mono > last) last = c.closed_mono, last_real = c.closed_real;
      }
    }
    char buf[512];
    std::snprintf(
        buf, sizeof buf,
        "{\"connections\":%zu,\"open\":%lld,\"streaming\":%lld,\"chunks\":%lld,"
        "\"peer_closes\":%lld,\"first_close_mono_ns\":%lld,\"last_close_mono_ns\":%lld,"
        "\"first_close_real_ns\":%lld,\"last_close_real_ns\":%lld,\"now_mono_ns\":%lld}\n",
        conns_.size(), open, streaming, chunks, closes, static_cast<long long>(first),
        static_cast<long long>(last), static_cast<long long>(first_real),
        static_cast<long long>(last_real), static_cast<long long>(mono()));
    return buf;
  }

  void write_stamps() const {
    std::FILE* f = std::fopen(cfg_.stamps.c_str(), "w");
    if (!f) return;
    std::fprintf(f, "# upstream sched=%s interval_ms=%d\n", rt_ ? "SCHED_RR" : "SCHED_OTHER",
                 cfg_.interval_ms);
    std::fprintf(f,
                 "# index accepted_mono_ns request_mono_ns closed_mono_ns closed_real_ns chunks "
                 "max_late_us\n");
    for (std::size_t i = 0; i < conns_.size(); ++i) {
      const Conn& c = conns_[i];
      std::fprintf(f, "%zu %lld %lld %lld %lld %lld %lld\n", i, static_cast<long long>(c.accepted),
                   static_cast<long long>(c.request), static_cast<long long>(c.closed_mono),
                   static_cast<long long>(c.closed_real), c.chunks,
                   static_cast<long long>(c.max_late / 1000));
    }
    std::fclose(f);
  }

  // SIGUSR1 writes the stamps at once. False: SIGTERM or SIGINT, exit (the
  // caller writes the stamps once the pending events are read).
  bool on_signal() {
    signalfd_siginfo si{};
    bool go_on = true;
    for (int k = 0; k < 64 && read(sigfd_, &si, sizeof si) == static_cast<ssize_t>(sizeof si);
         ++k) {
      if (si.ssi_signo == SIGTERM || si.ssi_signo == SIGINT)
        go_on = false;
      else if (si.ssi_signo == SIGUSR1)
        write_stamps();
    }
    return go_on;
  }

  Config cfg_;
  int listen_fd_ = -1, ep_ = -1, sigfd_ = -1;
  bool rt_ = false;
  std::vector<Conn> conns_;
  std::priority_queue<std::pair<int64_t, std::size_t>, std::vector<std::pair<int64_t, std::size_t>>,
                      std::greater<>>
      due_;
};

}  // namespace

int main(int argc, char** argv) {
  Config cfg;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const char* v = i + 1 < argc ? argv[i + 1] : nullptr;
    if (a == "--port" && v) {
      cfg.port = std::atoi(v), ++i;
    } else if (a == "--interval-ms" && v) {
      cfg.interval_ms = std::max(1, std::atoi(v)), ++i;
    } else if (a == "--tokens" && v) {
      cfg.tokens = std::atoll(v), ++i;
    } else if (a == "--stamps" && v) {
      cfg.stamps = v, ++i;
    } else if (a == "--rt" && v) {
      cfg.rt = std::atoi(v) != 0, ++i;
    } else {
      std::fprintf(stderr,
                   "usage: upstream [--port P] [--interval-ms M] [--tokens T] [--stamps FILE] "
                   "[--rt 0|1]\n");
      return 2;
    }
  }
  return Upstream(cfg).run();
}
