// bench/loadclient.cpp - the load client of agentsmithy's benchmark.
//
// One process, one thread, non-blocking sockets on epoll: it holds thousands
// of concurrent HTTP/1.1 connections to 127.0.0.1, decodes chunked transfer
// encoding and SSE, and records per client when the events that matter
// arrived (status line, first `chat`, the shutdown `error`, `done`, the
// terminating zero-length chunk, the close). It starts the server under test
// itself (fork/exec, the server dies with it), sends the signal itself so that
// every time is measured from the signal, watches the exit on a pidfd and
// takes peak RSS, thread count and CPU time from /proc and wait4().
//
//   loadclient SCENARIO [options] -- SERVER_COMMAND [ARGS...]
//
// Any argument of the server command containing {PORT} gets the port the load
// client picked. Results are printed as key=value lines on stdout.
// Every wait is bounded in time and every loop in count; only 127.0.0.1 is
// ever connected to.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <string>
#include <string_view>
#include <vector>

namespace {

// ---------------------------------------------------------------------------
// Time and small helpers
// ---------------------------------------------------------------------------

int64_t now_ns() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000LL + ts.tv_nsec;
}

constexpr int64_t kMs = 1000000LL;
constexpr int64_t kSec = 1000000000LL;

double ms(int64_t ns) { return static_cast<double>(ns) / 1e6; }

[[noreturn]] void die(const char* what) {
  std::fprintf(stderr, "loadclient: %s: %s\n", what, std::strerror(errno));
  std::exit(2);
}

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return NAN;
  std::sort(v.begin(), v.end());
  auto rank = static_cast<std::size_t>(std::ceil(p * static_cast<double>(v.size())));
  if (rank < 1) rank = 1;
  return v[std::min(rank, v.size()) - 1];
}

void put(const char* key, const std::string& value) { std::printf("%s=%s\n", key, value.c_str()); }
void put(const char* key, long long value) { std::printf("%s=%lld\n", key, value); }
void putf(const char* key, double value, int decimals = 2) {
  if (std::isnan(value)) {
    std::printf("%s=-\n", key);
  } else {
    std::printf("%s=%.*f\n", key, decimals, value);
  }
}

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

struct Config {
  std::string scenario;        // shutdown | idle | throughput | capacity
  int n = 100;                 // connections
  long tokens = 100000;        // context.demo.tokens
  long interval_ms = 50;       // context.demo.interval_ms
  double ready_timeout = 60;   // s: ramp-up bound (all streaming / all answered)
  double drain_timeout = 15;   // s: signal -> exit bound, then SIGKILL
  double run_timeout = 60;     // s: throughput bound
  double start_timeout = 15;   // s: server readiness bound
  int connect_rate = 5000;     // new connections per second
  int connect_inflight = 64;   // handshakes in progress at once
  int inflight = 0;            // attempts from connect() to the status line (0: no cap)
  double connect_timeout = 4;  // s per attempt
  int connect_attempts = 5;    // per connection
  int sig = SIGTERM;
  double settle = 1.0;      // s: all streaming -> signal (shutdown)
  int rt = -1;              // SCHED_RR if permitted: 1 yes, 0 no, -1 per scenario
  double coalesce_ms = -1;  // wake at most this often before the signal (-1: per scenario)
  int nice = 0;             // this client's nice value (the server keeps 0)
  std::string server_log = "/dev/null";
  std::string dump;  // per-client CSV, optional
  std::string prompt = "Tell me a story";
  bool dialog_ids = false;     // each request carries "dialog_id":"lc-<index>"
  std::string stamps;          // cancel: the server's stamp file, read after its exit
  bool disconnect = false;     // cancel: the client closes every stream instead of a signal
  int disconnect_rate = 2000;  // cancel --disconnect: closes per second
  std::vector<std::string> server_argv;
};

// ---------------------------------------------------------------------------
// Per-connection state
// ---------------------------------------------------------------------------

enum class St : uint8_t { Pending, Retry, Connecting, Sending, Headers, Body, Open, Closed };
enum class Bs : uint8_t { None, ChunkSize, ChunkData, ChunkCrlf, Trailer, Length, UntilEof };

struct Conn {
  int fd = -1;
  St st = St::Pending;
  Bs bs = Bs::None;
  uint8_t attempts = 0;
  bool chunked = false;
  bool retry_after = false;
  bool got_error = false;
  bool error_ok = false;  // error text is the shutdown message
  bool got_done = false;
  bool dup_done = false;
  bool error_before_done = false;  // the event right before done was the error
  bool final_chunk = false;
  bool response_complete = false;
  bool eof = false;
  bool reset = false;
  bool failed_connect = false;
  bool in_flight = false;  // a connection attempt without a status line yet
  int status = 0;
  char last_type = 0;  // first letter of the last event type seen
  uint32_t n_chat = 0;
  uint32_t n_chat_at_signal = 0;  // chat events read when the signal was sent
  uint32_t n_events = 0;
  uint32_t n_after_done = 0;
  uint32_t n_comments = 0;
  uint64_t bytes = 0;
  int64_t left = 0;         // bytes left in the current chunk / body
  int64_t t_first_try = 0;  // first connect attempt
  int64_t t_try = 0;        // current connect attempt
  int64_t t_connected = 0;
  int64_t t_sent = 0;    // request fully written
  int64_t t_status = 0;  // status line received
  int64_t t_first_chat = 0;
  int64_t t_error = 0;
  int64_t t_done = 0;
  int64_t t_final = 0;  // terminating zero-length chunk (or end of body)
  int64_t t_eof = 0;    // peer closed
  int64_t t_retry = 0;  // when to retry
  int64_t t_close = 0;  // cancel --disconnect: when this client closed the stream
  std::size_t out_off = 0;
  std::string hdr;  // header bytes, chunk-size line, trailer
  std::string sse;  // partial SSE event
  std::string req;  // this connection's request while it is sent (--dialog-ids)
};

bool ended(const Conn& c) { return c.st == St::Closed || c.response_complete; }

// ---------------------------------------------------------------------------
// The server process
// ---------------------------------------------------------------------------

int pick_port() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) die("socket");
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) die("bind");
  socklen_t len = sizeof a;
  if (getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) die("getsockname");
  close(fd);
  return ntohs(a.sin_port);
}

struct ServerProc {
  pid_t pid = -1;
  int pidfd = -1;
  bool exited = false;
  bool killed = false;
  int wstatus = 0;
  int64_t t_exit = 0;
  rusage ru{};
  long peak_threads = 0;
  long peak_hwm_kb = 0;  // VmHWM as sampled (ru_maxrss is the authoritative one)
  long peak_rss_kb = 0;  // VmRSS, sampled every 20 ms
  clockid_t cpu_clock{};
  bool have_cpu_clock = false;
};

int pidfd_open_(pid_t pid) { return static_cast<int>(syscall(SYS_pidfd_open, pid, 0)); }

void spawn(ServerProc& sp, const Config& cfg, int port) {
  std::vector<std::string> args;
  for (auto a : cfg.server_argv) {
    for (std::size_t p; (p = a.find("{PORT}")) != std::string::npos;)
      a.replace(p, 6, std::to_string(port));
    args.push_back(a);
  }
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  int logfd = open(cfg.server_log.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (logfd < 0) die("open server log");
  pid_t parent = getpid();
  pid_t pid = fork();
  if (pid < 0) die("fork");
  if (pid == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlive the benchmark
    if (getppid() != parent) _exit(127);
    setpriority(PRIO_PROCESS, 0, 0);  // the server runs at the default priority
    int devnull = open("/dev/null", O_RDONLY);
    if (devnull >= 0) dup2(devnull, 0);
    dup2(logfd, 1);
    dup2(logfd, 2);
    signal(SIGPIPE, SIG_DFL);
    execvp(argv[0], argv.data());
    std::fprintf(stderr, "loadclient: exec %s: %s\n", argv[0], std::strerror(errno));
    _exit(127);
  }
  close(logfd);
  sp.pid = pid;
  sp.pidfd = pidfd_open_(pid);
  if (sp.pidfd < 0) die("pidfd_open");
  sp.have_cpu_clock = clock_getcpuclockid(pid, &sp.cpu_clock) == 0;
}

// Server CPU time (user + system, all threads) in seconds, NAN if unknown.
double server_cpu(const ServerProc& sp) {
  if (sp.exited) {
    return static_cast<double>(sp.ru.ru_utime.tv_sec + sp.ru.ru_stime.tv_sec) +
           static_cast<double>(sp.ru.ru_utime.tv_usec + sp.ru.ru_stime.tv_usec) / 1e6;
  }
  if (!sp.have_cpu_clock) return NAN;
  timespec ts{};
  if (clock_gettime(sp.cpu_clock, &ts) != 0) return NAN;
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) / 1e9;
}

void sample_status(ServerProc& sp) {
  if (sp.exited) return;
  char path[64];
  std::snprintf(path, sizeof path, "/proc/%d/status", static_cast<int>(sp.pid));
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return;
  char buf[4096];
  ssize_t n = read(fd, buf, sizeof buf - 1);
  close(fd);
  if (n <= 0) return;
  buf[n] = 0;
  if (const char* p = std::strstr(buf, "\nThreads:"))
    sp.peak_threads = std::max(sp.peak_threads, std::atol(p + 9));
  if (const char* p = std::strstr(buf, "\nVmHWM:"))
    sp.peak_hwm_kb = std::max(sp.peak_hwm_kb, std::atol(p + 7));
  if (const char* p = std::strstr(buf, "\nVmRSS:"))
    sp.peak_rss_kb = std::max(sp.peak_rss_kb, std::atol(p + 7));
}

void reap(ServerProc& sp, int64_t t) {
  if (sp.exited) return;
  sample_status(sp);
  int st = 0;
  rusage ru{};
  pid_t r = wait4(sp.pid, &st, 0, &ru);
  if (r == sp.pid) {
    sp.exited = true;
    sp.wstatus = st;
    sp.ru = ru;
    sp.t_exit = t;
  }
}

// TcpExt ListenOverflows of this network namespace: handshakes dropped
// because a listener's accept queue was full (a small backlog under a burst).
long long listen_overflows() {
  FILE* f = std::fopen("/proc/net/netstat", "r");
  if (!f) return -1;
  char names[8192], values[8192];
  long long result = -1;
  while (std::fgets(names, sizeof names, f) && std::fgets(values, sizeof values, f)) {
    if (std::strncmp(names, "TcpExt:", 7) != 0) continue;
    char* sn = nullptr;
    char* sv = nullptr;
    char* n = strtok_r(names, " \n", &sn);
    char* v = strtok_r(values, " \n", &sv);
    for (int k = 0; n && v && k < 1000; ++k) {
      if (std::strcmp(n, "ListenOverflows") == 0) result = std::atoll(v);
      n = strtok_r(nullptr, " \n", &sn);
      v = strtok_r(nullptr, " \n", &sv);
    }
  }
  std::fclose(f);
  return result;
}

// CPU seconds the whole machine spent busy (all CPUs, /proc/stat).
double machine_busy_s() {
  FILE* f = std::fopen("/proc/stat", "r");
  if (!f) return NAN;
  unsigned long long v[8] = {};
  int n = std::fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3],
                      &v[4], &v[5], &v[6], &v[7]);
  std::fclose(f);
  if (n < 7) return NAN;
  unsigned long long busy = v[0] + v[1] + v[2] + v[5] + v[6];  // user nice system irq softirq
  return static_cast<double>(busy) / static_cast<double>(sysconf(_SC_CLK_TCK));
}

// Blocking probe: GET /health with Connection: close; true on a 200.
bool health_ok(int port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  timeval tv{1, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bool ok = false;
  if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0) {
    std::string req = "GET /health HTTP/1.1\r\nHost: 127.0.0.1:" + std::to_string(port) +
                      "\r\nConnection: close\r\n\r\n";
    if (send(fd, req.data(), req.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(req.size())) {
      char buf[512];
      ssize_t n = recv(fd, buf, sizeof buf - 1, 0);
      if (n >= 12) {
        buf[n] = 0;
        ok = std::strncmp(buf, "HTTP/1.1 200", 12) == 0 ||
             std::strncmp(buf, "HTTP/1.0 200", 12) == 0;
      }
    }
  }
  close(fd);
  return ok;
}

// ---------------------------------------------------------------------------
// The engine: connections on epoll
// ---------------------------------------------------------------------------

constexpr uint64_t kPidTag = ~0ULL;
// Where a request carries its connection's dialog id (--dialog-ids).
constexpr std::string_view kDialogMark = "lc-XXXXXX";

class Engine {
 public:
  // `request`: the bytes every connection sends; with cfg.dialog_ids, every
  // "lc-XXXXXX" in it becomes "lc-<index of the connection, 6 digits>"
  // (the same length, so that Content-Length holds).
  Engine(const Config& cfg, ServerProc& sp, int port, std::string request)
      : cfg_(cfg),
        sp_(sp),
        port_(port),
        request_(std::move(request)),
        per_conn_request_(cfg.dialog_ids && request_.find(kDialogMark) != std::string::npos),
        conns_(static_cast<std::size_t>(cfg.n)) {
    ep_ = epoll_create1(EPOLL_CLOEXEC);
    if (ep_ < 0) die("epoll_create1");
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = kPidTag;
    if (epoll_ctl(ep_, EPOLL_CTL_ADD, sp_.pidfd, &ev) != 0) die("epoll_ctl pidfd");
    addr_.sin_family = AF_INET;
    addr_.sin_port = htons(static_cast<uint16_t>(port_));
    addr_.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    last_refill_ = now_ns();
  }
  ~Engine() {
    for (auto& c : conns_)
      if (c.fd >= 0) close(c.fd);
    close(ep_);
  }

  std::vector<Conn>& conns() { return conns_; }
  // Connection attempts (connect() to the status line) in flight: the most
  // there were at once.
  int peak_inflight() const { return peak_awaiting_; }
  // Closes connection idx as a client that goes away does (cancel --disconnect).
  void disconnect(std::size_t idx, int64_t t) {
    Conn& c = conns_[idx];
    if (c.fd < 0) return;
    c.t_close = t;
    c.st = St::Closed;
    close_fd(c);
  }
  void stop_starting() { starting_ = false; }
  // Close a connection once its response is complete (default), or keep it
  // open and idle (keep-alive; the idle scenario).
  void keep_alive(bool on) { close_after_response_ = !on; }
  // Wake at most once per `ns` (0: on every event). Thousands of streams
  // paced apart would otherwise wake this thread once per event, and on a
  // shared 2-core machine the context switches cost more than the reads.
  // Long where timestamp precision does not matter (ramp-up and steady
  // streaming 100 ms, throughput 2 ms), 1 ms after the signal, 0 for the
  // capacity and idle tests.
  void coalesce(int64_t ns) { coalesce_ns_ = ns; }
  int64_t t_begin() const { return t_begin_; }

  // Runs the loop until pred() is true or the deadline passes. Returns pred().
  template <class Pred>
  bool run_until(int64_t deadline, Pred pred) {
    if (t_begin_ == 0) t_begin_ = now_ns();
    int64_t last_check = 0;
    for (long iter = 0; iter < 100000000L; ++iter) {  // bounded; the deadline ends it first
      int64_t t = now_ns();
      // The predicate may scan every connection: at most every 2 ms (event
      // times are taken as they arrive, not here).
      if (t - last_check >= 2 * kMs) {
        last_check = t;
        if (pred()) return true;
      }
      if (t >= deadline) return pred();
      start_connections(t);
      if (t - last_scan_ >= 20 * kMs) {
        last_scan_ = t;
        scan_timeouts(t);
        sample_status(sp_);
      }
      // Pause only once every connection is started (a pause would hold
      // the handshakes in flight and throttle the connect rate) and the
      // previous wait drained everything ready (a full batch means more
      // sockets are waiting to be read).
      const bool ramping = starting_ && (next_ < conns_.size() || connecting_ > 0 ||
                                         awaiting_ > 0 || !retries_.empty());
      if (coalesce_ns_ > 0 && !ramping && !last_full_ && t - last_wait_ < coalesce_ns_) {
        timespec ts{0, static_cast<long>(coalesce_ns_ - (t - last_wait_))};
        nanosleep(&ts, nullptr);
      }
      last_wait_ = now_ns();
      int timeout = static_cast<int>(std::min<int64_t>((deadline - t) / kMs + 1, 5));
      int n = epoll_wait(ep_, evs_, kMaxEvents, timeout);
      if (n < 0) {
        if (errno == EINTR) continue;
        die("epoll_wait");
      }
      last_full_ = n == kMaxEvents;
      int64_t tr = now_ns();
      for (int i = 0; i < n; ++i) {
        if (evs_[i].data.u64 == kPidTag) {
          epoll_ctl(ep_, EPOLL_CTL_DEL, sp_.pidfd, nullptr);
          reap(sp_, tr);
          continue;
        }
        on_event(static_cast<std::size_t>(evs_[i].data.u64), evs_[i].events, tr);
      }
    }
    return pred();
  }

 private:
  static constexpr int kMaxEvents = 1024;

  void start_connections(int64_t t) {
    double elapsed = static_cast<double>(t - last_refill_) / 1e9;
    last_refill_ = t;
    bucket_ =
        std::min(bucket_ + elapsed * cfg_.connect_rate, static_cast<double>(cfg_.connect_inflight));
    if (!starting_) return;
    while (connecting_ < cfg_.connect_inflight && bucket_ >= 1.0 &&
           (cfg_.inflight <= 0 || awaiting_ < cfg_.inflight)) {
      std::size_t idx;
      if (!retries_.empty() && conns_[retries_.front()].t_retry <= t) {
        idx = retries_.front();
        retries_.pop_front();
      } else if (next_ < conns_.size()) {
        idx = next_++;
      } else {
        break;
      }
      bucket_ -= 1.0;
      start(idx, t);
    }
  }

  void start(std::size_t idx, int64_t t) {
    Conn& c = conns_[idx];
    ++c.attempts;
    if (c.t_first_try == 0) c.t_first_try = t;
    c.t_try = t;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
      connect_failed(idx, t);
      return;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c.fd = fd;
    c.in_flight = true;
    ++awaiting_;
    peak_awaiting_ = std::max(peak_awaiting_, awaiting_);
    epoll_event ev{};
    ev.events = EPOLLOUT;
    ev.data.u64 = idx;
    if (epoll_ctl(ep_, EPOLL_CTL_ADD, fd, &ev) != 0) die("epoll_ctl add");
    c.st = St::Connecting;
    ++connecting_;
    int r = connect(fd, reinterpret_cast<const sockaddr*>(&addr_), sizeof addr_);
    if (r == 0) {
      connected(idx, t);
    } else if (errno != EINPROGRESS) {
      connect_failed(idx, t);
    }
  }

  void close_fd(Conn& c) {
    if (c.in_flight) {
      c.in_flight = false;
      --awaiting_;
    }
    if (c.fd >= 0) {
      epoll_ctl(ep_, EPOLL_CTL_DEL, c.fd, nullptr);
      close(c.fd);
      c.fd = -1;
    }
  }

  void connect_failed(std::size_t idx, int64_t t) {
    Conn& c = conns_[idx];
    if (c.st == St::Connecting) --connecting_;
    close_fd(c);
    if (starting_ && c.attempts < cfg_.connect_attempts) {
      c.st = St::Retry;
      c.t_retry = t + 100 * kMs * c.attempts;
      retries_.push_back(idx);
    } else {
      c.st = St::Closed;
      c.failed_connect = true;
    }
  }

  void connected(std::size_t idx, int64_t t) {
    Conn& c = conns_[idx];
    --connecting_;
    c.t_connected = t;
    c.st = St::Sending;
    c.out_off = 0;
    if (per_conn_request_) {
      c.req = request_;
      char id[16];
      std::snprintf(id, sizeof id, "lc-%06zu", idx % 1000000);
      for (std::size_t p; (p = c.req.find(kDialogMark)) != std::string::npos;)
        c.req.replace(p, kDialogMark.size(), id);
    }
    send_more(idx, t);
  }

  void send_more(std::size_t idx, int64_t t) {
    Conn& c = conns_[idx];
    const std::string& req = per_conn_request_ ? c.req : request_;
    while (c.out_off < req.size()) {
      ssize_t n = send(c.fd, req.data() + c.out_off, req.size() - c.out_off, MSG_NOSIGNAL);
      if (n > 0) {
        c.out_off += static_cast<std::size_t>(n);
      } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        return;  // EPOLLOUT will bring us back
      } else {
        c.reset = true;
        c.t_eof = t;
        c.st = St::Closed;
        close_fd(c);
        return;
      }
    }
    c.t_sent = t;
    c.st = St::Headers;
    std::string().swap(c.req);
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = idx;
    if (epoll_ctl(ep_, EPOLL_CTL_MOD, c.fd, &ev) != 0) die("epoll_ctl mod");
  }

  void on_event(std::size_t idx, uint32_t events, int64_t t) {
    Conn& c = conns_[idx];
    if (c.fd < 0) return;
    if (c.st == St::Connecting) {
      int err = 0;
      socklen_t len = sizeof err;
      getsockopt(c.fd, SOL_SOCKET, SO_ERROR, &err, &len);
      if (err != 0 || (events & (EPOLLERR | EPOLLHUP)) != 0) {
        connect_failed(idx, t);
      } else {
        connected(idx, t);
      }
      return;
    }
    if (c.st == St::Sending) {
      send_more(idx, t);
      return;
    }
    ssize_t n = recv(c.fd, buf_, sizeof buf_, 0);
    if (n > 0) {
      feed(c, buf_, static_cast<std::size_t>(n), t);
    } else if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
      if (n < 0) c.reset = true;
      c.eof = true;
      c.t_eof = t;
      if (c.bs == Bs::UntilEof) {
        c.response_complete = true;
        c.t_final = t;
      }
      c.st = St::Closed;
      close_fd(c);
    }
  }

  void scan_timeouts(int64_t t) {
    if (connecting_ == 0) return;
    const auto limit = static_cast<int64_t>(cfg_.connect_timeout * 1e9);
    for (std::size_t i = 0; i < conns_.size(); ++i) {
      if (conns_[i].st == St::Connecting && t - conns_[i].t_try > limit) connect_failed(i, t);
    }
  }

  // --- HTTP/1.1 response, chunked decoding, SSE -----------------------------

  void feed(Conn& c, const char* p, std::size_t n, int64_t t) {
    c.bytes += n;
    for (int guard = 0; n > 0 && guard < 1000000; ++guard) {
      if (c.st == St::Headers) {
        std::size_t old = c.hdr.size();
        c.hdr.append(p, n);
        std::size_t pos = c.hdr.find("\r\n\r\n", old >= 3 ? old - 3 : 0);
        if (pos == std::string::npos) {
          if (c.hdr.size() > 65536) protocol_error(c, t);
          return;
        }
        std::size_t used = pos + 4 - old;
        p += used;
        n -= used;
        c.hdr.resize(pos + 2);
        headers(c, t);
        c.hdr.clear();
        continue;
      }
      if (c.st != St::Body) {  // bytes after the end of a response
        ++c.n_after_done;
        return;
      }
      switch (c.bs) {
        case Bs::ChunkSize: {
          const char* nl = static_cast<const char*>(std::memchr(p, '\n', n));
          std::size_t take = nl ? static_cast<std::size_t>(nl - p) + 1 : n;
          c.hdr.append(p, take);
          p += take;
          n -= take;
          if (!nl) {
            if (c.hdr.size() > 1024) protocol_error(c, t);
            break;
          }
          char* end = nullptr;
          long long size = std::strtoll(c.hdr.c_str(), &end, 16);
          if (end == c.hdr.c_str() || size < 0) {
            protocol_error(c, t);
            return;
          }
          c.hdr.clear();
          if (size == 0) {
            c.bs = Bs::Trailer;
          } else {
            c.left = size;
            c.bs = Bs::ChunkData;
          }
          break;
        }
        case Bs::ChunkData: {
          std::size_t take = std::min<std::size_t>(n, static_cast<std::size_t>(c.left));
          sse_feed(c, p, take, t);
          p += take;
          n -= take;
          c.left -= static_cast<int64_t>(take);
          if (c.left == 0) {
            c.bs = Bs::ChunkCrlf;
            c.left = 2;
          }
          break;
        }
        case Bs::ChunkCrlf: {
          std::size_t take = std::min<std::size_t>(n, static_cast<std::size_t>(c.left));
          p += take;
          n -= take;
          c.left -= static_cast<int64_t>(take);
          if (c.left == 0) c.bs = Bs::ChunkSize;
          break;
        }
        case Bs::Trailer: {  // lines until an empty one
          const char* nl = static_cast<const char*>(std::memchr(p, '\n', n));
          std::size_t take = nl ? static_cast<std::size_t>(nl - p) + 1 : n;
          c.hdr.append(p, take);
          p += take;
          n -= take;
          if (!nl) break;
          if (c.hdr == "\r\n" || c.hdr == "\n") {
            c.final_chunk = true;
            finish_response(c, t);
          }
          c.hdr.clear();
          break;
        }
        case Bs::Length: {
          std::size_t take = std::min<std::size_t>(n, static_cast<std::size_t>(c.left));
          if (c.status == 200) sse_feed(c, p, take, t);
          p += take;
          n -= take;
          c.left -= static_cast<int64_t>(take);
          if (c.left == 0) finish_response(c, t);
          break;
        }
        case Bs::UntilEof:
          if (c.status == 200) sse_feed(c, p, n, t);
          n = 0;
          break;
        case Bs::None: n = 0; break;
      }
    }
  }

  void finish_response(Conn& c, int64_t t) {
    c.response_complete = true;
    c.t_final = t;
    c.bs = Bs::None;
    if (close_after_response_) {  // as curl or a browser does after a stream
      c.st = St::Closed;
      close_fd(c);
    } else {
      c.st = St::Open;  // stays connected (keep-alive) until the peer closes
    }
  }

  void protocol_error(Conn& c, int64_t t) {
    std::fprintf(stderr, "loadclient: protocol error on a connection (status %d)\n", c.status);
    c.t_eof = t;
    c.st = St::Closed;
    close_fd(c);
  }

  static bool header_is(std::string_view line, std::string_view name) {
    if (line.size() < name.size() + 1) return false;
    for (std::size_t i = 0; i < name.size(); ++i)
      if (std::tolower(static_cast<unsigned char>(line[i])) != name[i]) return false;
    return line[name.size()] == ':';
  }

  static std::string lower_value(std::string_view line, std::size_t name_len) {
    std::string v;
    for (std::size_t i = name_len + 1; i < line.size(); ++i)
      if (line[i] != ' ' && line[i] != '\t' && line[i] != '\r')
        v += static_cast<char>(std::tolower(static_cast<unsigned char>(line[i])));
    return v;
  }

  void headers(Conn& c, int64_t t) {
    std::string_view h(c.hdr);
    c.t_status = t;
    if (c.in_flight) {
      c.in_flight = false;
      --awaiting_;
    }
    if (h.size() >= 12 && h.substr(0, 5) == "HTTP/")
      c.status = std::atoi(std::string(h.substr(9, 3)).c_str());
    long long length = -1;
    std::size_t pos = h.find('\n');
    while (pos != std::string_view::npos && pos + 1 < h.size()) {
      std::size_t next = h.find('\n', pos + 1);
      std::string_view line = h.substr(
          pos + 1, next == std::string_view::npos ? std::string_view::npos : next - pos - 1);
      if (header_is(line, "transfer-encoding")) {
        c.chunked = lower_value(line, 17).find("chunked") != std::string::npos;
      } else if (header_is(line, "content-length")) {
        length = std::atoll(lower_value(line, 14).c_str());
      } else if (header_is(line, "retry-after")) {
        c.retry_after = true;
      }
      pos = next;
    }
    c.st = St::Body;
    if (c.chunked) {
      c.bs = Bs::ChunkSize;
    } else if (length > 0) {
      c.bs = Bs::Length;
      c.left = length;
    } else if (length == 0) {
      finish_response(c, t);
    } else {
      c.bs = Bs::UntilEof;
    }
  }

  void sse_feed(Conn& c, const char* p, std::size_t n, int64_t t) {
    std::size_t scan = c.sse.size() >= 1 ? c.sse.size() - 1 : 0;
    c.sse.append(p, n);
    std::size_t start = 0;
    for (int guard = 0; guard < 1000000; ++guard) {
      std::size_t end = c.sse.find("\n\n", std::max(scan, start));
      if (end == std::string::npos) break;
      event(c, std::string_view(c.sse).substr(start, end - start), t);
      start = end + 2;
    }
    if (start > 0) c.sse.erase(0, start);
  }

  static std::string_view json_string_field(std::string_view data, std::string_view key) {
    std::size_t k = data.find(key);
    if (k == std::string_view::npos) return {};
    std::size_t i = k + key.size();
    while (i < data.size() && (data[i] == ' ' || data[i] == ':')) ++i;
    if (i >= data.size() || data[i] != '"') return {};
    std::size_t j = data.find('"', i + 1);
    if (j == std::string_view::npos) return {};
    return data.substr(i + 1, j - i - 1);
  }

  void event(Conn& c, std::string_view block, int64_t t) {
    std::string_view data;
    std::string joined;
    bool multi = false;
    std::size_t pos = 0;
    while (pos < block.size()) {
      std::size_t nl = block.find('\n', pos);
      std::string_view line =
          block.substr(pos, nl == std::string_view::npos ? std::string_view::npos : nl - pos);
      pos = nl == std::string_view::npos ? block.size() : nl + 1;
      if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
      if (line.empty()) continue;
      if (line[0] == ':') {
        ++c.n_comments;
        continue;
      }
      if (line.substr(0, 5) == "data:") {
        std::string_view d = line.substr(5);
        if (!d.empty() && d[0] == ' ') d.remove_prefix(1);
        if (data.empty() && !multi) {
          data = d;
        } else {
          if (!multi) joined.assign(data);
          multi = true;
          joined += '\n';
          joined += d;
        }
      }
    }
    if (multi) data = joined;
    if (data.empty()) return;
    ++c.n_events;
    if (c.got_done) ++c.n_after_done;
    std::string_view type = json_string_field(data, "\"type\"");
    if (type == "chat") {
      ++c.n_chat;
      if (c.t_first_chat == 0) c.t_first_chat = t;
    } else if (type == "error") {
      if (!c.got_error) {
        c.got_error = true;
        c.t_error = t;
        c.error_ok = data.find("Server is shutting down") != std::string_view::npos;
      }
    } else if (type == "done") {
      if (c.got_done) {
        c.dup_done = true;
      } else {
        c.got_done = true;
        c.t_done = t;
        c.error_before_done = c.last_type == 'e';
      }
    }
    c.last_type = type.empty() ? '?' : type[0];
  }

  const Config& cfg_;
  ServerProc& sp_;
  int port_;
  std::string request_;
  bool per_conn_request_ = false;
  std::vector<Conn> conns_;
  int ep_ = -1;
  sockaddr_in addr_{};
  std::size_t next_ = 0;
  std::deque<std::size_t> retries_;
  int connecting_ = 0;
  int awaiting_ = 0;  // attempts without a status line yet
  int peak_awaiting_ = 0;
  double bucket_ = 0;
  int64_t last_refill_ = 0;
  int64_t last_scan_ = 0;
  int64_t t_begin_ = 0;
  bool starting_ = true;
  bool close_after_response_ = true;
  int64_t coalesce_ns_ = 0;
  int64_t last_wait_ = 0;
  bool last_full_ = false;
  epoll_event evs_[kMaxEvents]{};
  char buf_[65536]{};
};

// ---------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------

std::string chat_request(const Config& cfg, int port) {
  std::string body =
      R"({"messages":[{"role":"user","content":")" + cfg.prompt + R"("}],"stream":true,)" +
      (cfg.dialog_ids ? R"("dialog_id":")" + std::string(kDialogMark) + "\"," : std::string()) +
      R"("context":{"demo":{"tokens":)" + std::to_string(cfg.tokens) + R"(,"interval_ms":)" +
      std::to_string(cfg.interval_ms) + "}}}";
  return "POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1:" + std::to_string(port) +
         "\r\nContent-Type: application/json\r\nAccept: text/event-stream\r\nContent-Length: " +
         std::to_string(body.size()) + "\r\n\r\n" + body;
}

std::string health_request(int port) {
  return "GET /health HTTP/1.1\r\nHost: 127.0.0.1:" + std::to_string(port) + "\r\n\r\n";
}

int64_t secs(double s) { return static_cast<int64_t>(s * 1e9); }

// Sends the signal, waits (bounded) for the exit, kills the server if it
// outlives the bound. Returns the signal time.
int64_t signal_and_wait(Engine& eng, ServerProc& sp, const Config& cfg, double& cpu_at_signal) {
  eng.stop_starting();
  eng.coalesce(kMs);  // times after the signal are exact to a millisecond
  // Read what has arrived (the client may have paused up to --coalesce-ms)
  // so that the count of events received before the signal is current.
  eng.run_until(now_ns() + 20 * kMs, [] { return false; });
  sample_status(sp);
  cpu_at_signal = server_cpu(sp);
  auto& conns = eng.conns();
  for (auto& c : conns) c.n_chat_at_signal = c.n_chat;
  int64_t t_sig = now_ns();
  if (kill(sp.pid, cfg.sig) != 0) die("kill");
  eng.run_until(t_sig + secs(cfg.drain_timeout), [&] {
    if (!sp.exited) return false;
    for (auto& c : conns)
      if (c.fd >= 0 && c.st != St::Connecting && c.st != St::Sending) return false;
    return true;
  });
  if (!sp.exited) {
    kill(sp.pid, SIGKILL);
    sp.killed = true;
    int64_t t = now_ns();
    pollfd pfd{sp.pidfd, POLLIN, 0};
    poll(&pfd, 1, 5000);
    reap(sp, t);
    sp.t_exit = 0;
  }
  return t_sig;
}

void put_server(const ServerProc& sp, int64_t t_sig) {
  put("server_killed", sp.killed ? 1 : 0);
  if (sp.exited && WIFEXITED(sp.wstatus)) {
    put("server_exit_status", WEXITSTATUS(sp.wstatus));
  } else if (sp.exited && WIFSIGNALED(sp.wstatus)) {
    put("server_exit_status", std::string("signal ") + std::to_string(WTERMSIG(sp.wstatus)));
  }
  putf("exit_ms", sp.t_exit && !sp.killed ? ms(sp.t_exit - t_sig) : NAN, 1);
  putf("peak_rss_mib", static_cast<double>(sp.ru.ru_maxrss) / 1024.0, 1);
  putf("peak_vmrss_mib", static_cast<double>(sp.peak_rss_kb) / 1024.0, 1);
  put("peak_threads", sp.peak_threads);
}

void dump_csv(const Config& cfg, const std::vector<Conn>& conns, int64_t t0) {
  if (cfg.dump.empty()) return;
  FILE* f = std::fopen(cfg.dump.c_str(), "w");
  if (!f) return;
  auto rel = [t0](int64_t t) { return t ? ms(t - t0) : NAN; };
  std::fprintf(f,
               "idx,attempts,status,t_first_try,t_connected,t_sent,t_status,t_first_chat,n_chat,"
               "n_events,t_error,error_ok,t_done,error_before_done,final_chunk,t_final,t_eof,bytes,"
               "n_chat_at_signal,t_close\n");
  for (std::size_t i = 0; i < conns.size(); ++i) {
    const Conn& c = conns[i];
    std::fprintf(
        f, "%zu,%d,%d,%.3f,%.3f,%.3f,%.3f,%.3f,%u,%u,%.3f,%d,%.3f,%d,%d,%.3f,%.3f,%llu,%u,%.3f\n",
        i, c.attempts, c.status, rel(c.t_first_try), rel(c.t_connected), rel(c.t_sent),
        rel(c.t_status), rel(c.t_first_chat), c.n_chat, c.n_events, rel(c.t_error), c.error_ok,
        rel(c.t_done), c.error_before_done, c.final_chunk, rel(c.t_final), rel(c.t_eof),
        static_cast<unsigned long long>(c.bytes), c.n_chat_at_signal, rel(c.t_close));
  }
  std::fclose(f);
}

double client_cpu() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<double>(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
         static_cast<double>(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

// Scenario 1 (and the tail of 4): streams are open; signal; per-client outcome.
void report_shutdown(const Config& cfg, const std::vector<Conn>& conns, int64_t t_sig,
                     const ServerProc& sp, double cpu_at_signal, long held) {
  long complete = 0, got_error = 0, got_done = 0, final_chunk = 0, closed = 0;
  std::vector<double> to_done, to_error;
  // The pace delivered before the signal: chat events read by the signal
  // (the client reads everything pending just before sending it) over the
  // events asked for: the first chunk comes with the status line, then one
  // every interval, so 1 + floor((signal - status line) / interval) each.
  // chat_at_signal is the numerator alone, for a driver that knows the
  // asked pace better (bench/run.sh's upstream scenario: from the upstream's
  // own stamps).
  double pace_got = 0, pace_asked = 0;
  long long chat_at_signal = 0;
  for (const Conn& c : conns) {
    if (c.t_first_chat == 0 || (c.t_done && c.t_done < t_sig))
      continue;  // not streaming at the signal
    chat_at_signal += c.n_chat_at_signal;
    if (cfg.interval_ms > 0 && c.t_status > 0 && c.t_status < t_sig) {
      pace_asked += 1.0 + std::floor(static_cast<double>(t_sig - c.t_status) /
                                     static_cast<double>(cfg.interval_ms * kMs));
      pace_got += c.n_chat_at_signal;
    }
    if (c.got_error && c.error_ok && c.t_error >= t_sig) {
      ++got_error;
      to_error.push_back(ms(c.t_error - t_sig));
    }
    if (c.got_done && c.t_done >= t_sig) {
      ++got_done;
      to_done.push_back(ms(c.t_done - t_sig));
    }
    if (c.final_chunk) ++final_chunk;
    if (c.t_eof || c.response_complete) ++closed;
    if (c.got_error && c.error_ok && c.got_done && c.error_before_done && c.final_chunk &&
        !c.dup_done && c.n_after_done == 0 && c.t_error >= t_sig)
      ++complete;
  }
  const long n = static_cast<long>(conns.size());
  put("held", held);
  put("got_error", got_error);
  put("got_done", got_done);
  put("final_chunk", final_chunk);
  put("ended", closed);
  put("complete", complete);
  putf("complete_pct", 100.0 * static_cast<double>(complete) / static_cast<double>(n), 1);
  putf("error_p50_ms", percentile(to_error, 0.50));
  putf("error_max_ms", percentile(to_error, 1.0));
  putf("done_p50_ms", percentile(to_done, 0.50));
  putf("done_p99_ms", percentile(to_done, 0.99));
  putf("done_max_ms", percentile(to_done, 1.0));
  putf("pace_pct", pace_asked > 0 ? 100.0 * pace_got / pace_asked : NAN, 1);
  put("chat_at_signal", chat_at_signal);
  // Every chat event any client received (bench/run.sh compares it with what
  // the server's dialog store recorded).
  long long chat_received = 0;
  for (const Conn& c : conns) chat_received += c.n_chat;
  put("chat_received", chat_received);
  // The signal's time on CLOCK_MONOTONIC, to compare with other processes'
  // stamps (bench/upstream.cpp's closes): one clock for the whole machine.
  put("signal_mono_ns", static_cast<long long>(t_sig));
  put_server(sp, t_sig);
  double cpu_end = server_cpu(sp);
  double drain_cpu = cpu_end - cpu_at_signal;
  putf("drain_cpu_ms", drain_cpu * 1e3, 1);
  if (held > 0) {
    putf("drain_cpu_per_stream_us", drain_cpu * 1e6 / static_cast<double>(held), 1);
    if (sp.t_exit && !sp.killed)
      putf("exit_per_stream_us", ms(sp.t_exit - t_sig) * 1e3 / static_cast<double>(held), 1);
  }
}

int run_shutdown(const Config& cfg, ServerProc& sp, int port) {
  Engine eng(cfg, sp, port, chat_request(cfg, port));
  // Before the signal nothing is timed finer than "all are streaming": read
  // every 100 ms, two 50 ms events per read, half the client's CPU.
  eng.coalesce(static_cast<int64_t>((cfg.coalesce_ms >= 0 ? cfg.coalesce_ms : 100) * 1e6));
  auto& conns = eng.conns();
  int64_t t0 = now_ns();
  long streaming = 0;
  bool all = eng.run_until(t0 + secs(cfg.ready_timeout), [&] {
    if (sp.exited) return true;
    streaming = 0;
    long finished = 0;
    for (auto& c : conns) {
      if (c.t_first_chat)
        ++streaming;
      else if (c.st == St::Closed || c.response_complete)
        ++finished;
    }
    return streaming + finished >= cfg.n;
  });
  int64_t t_ready = now_ns();
  // Settle: the streams run on their own for a while; this says whether the
  // server keeps their pace (a saturated server delivers fewer events than
  // asked for) and how busy it is doing so.
  double settle_cpu = NAN, paced_pct = NAN, settle_client = NAN, settle_chat_rate = NAN;
  if (!sp.exited && cfg.settle > 0) {
    auto chats = [&] {
      uint64_t k = 0;
      for (auto& c : conns) k += c.n_chat;
      return k;
    };
    uint64_t k0 = chats();
    double c0 = server_cpu(sp);
    double cl0 = client_cpu();
    int64_t s0 = now_ns();
    eng.run_until(s0 + secs(cfg.settle), [&] { return sp.exited; });
    int64_t s1 = now_ns();
    double wall = static_cast<double>(s1 - s0) / 1e9;
    settle_cpu = (server_cpu(sp) - c0) / wall;
    settle_client = (client_cpu() - cl0) / wall;
    settle_chat_rate = static_cast<double>(chats() - k0) / wall;
    long live = 0;
    for (auto& c : conns)
      if (c.t_first_chat && !ended(c)) ++live;
    if (live > 0 && cfg.interval_ms > 0)
      paced_pct =
          100.0 * static_cast<double>(chats() - k0) /
          (wall * static_cast<double>(live) * 1000.0 / static_cast<double>(cfg.interval_ms));
  }
  long held = 0, answered_200 = 0, status_503 = 0;
  for (auto& c : conns) {
    if (c.t_first_chat && !ended(c)) ++held;
    if (c.status == 200) ++answered_200;
    if (c.status == 503) ++status_503;
  }
  put("scenario", "shutdown");
  put("n", cfg.n);
  put("all_streaming", all && streaming == cfg.n ? 1 : 0);
  putf("ramp_s", ms(t_ready - t0) / 1e3, 2);
  put("peak_inflight", eng.peak_inflight());
  put("answered_200", answered_200);
  put("status_503", status_503);
  putf("settle_server_cores", settle_cpu, 2);
  putf("settle_paced_pct", paced_pct, 1);
  // Chat events received per second while settling, and the server's CPU
  // per chat event (a proxied token, in the upstream scenario).
  putf("settle_chat_per_s", settle_chat_rate, 0);
  putf("settle_cpu_us_per_chat", settle_chat_rate > 0 ? settle_cpu * 1e6 / settle_chat_rate : NAN,
       2);
  putf("settle_client_cores", settle_client, 2);
  putf("client_cpu_s", client_cpu(), 2);
  if (sp.exited) {
    put("error", "server exited before the signal");
    put_server(sp, t_ready);
    return 1;
  }
  double cpu_at_signal = 0;
  double client0 = client_cpu();
  int64_t t_sig = signal_and_wait(eng, sp, cfg, cpu_at_signal);
  report_shutdown(cfg, conns, t_sig, sp, cpu_at_signal, held);
  putf("client_cpu_drain_ms", (client_cpu() - client0) * 1e3, 1);
  dump_csv(cfg, conns, t_sig);
  return 0;
}

int run_idle(const Config& cfg, ServerProc& sp, int port) {
  Engine eng(cfg, sp, port, health_request(port));
  eng.keep_alive(true);
  auto& conns = eng.conns();
  int64_t t0 = now_ns();
  eng.run_until(t0 + secs(cfg.ready_timeout), [&] {
    if (sp.exited) return true;
    for (auto& c : conns)
      if (!c.response_complete && c.st != St::Closed) return false;
    return true;
  });
  long answered = 0, open_idle = 0;
  for (auto& c : conns) {
    if (c.response_complete && c.status == 200) ++answered;
    if (c.st == St::Open) ++open_idle;
  }
  put("scenario", "idle");
  put("n", cfg.n);
  put("health_answered", answered);
  put("idle_open_at_signal", open_idle);
  if (sp.exited) {
    put("error", "server exited before the signal");
    return 1;
  }
  double cpu_at_signal = 0;
  int64_t t_sig = signal_and_wait(eng, sp, cfg, cpu_at_signal);
  std::vector<double> closes;
  for (auto& c : conns)
    if (c.t_eof >= t_sig) closes.push_back(ms(c.t_eof - t_sig));
  put("closed_by_server", static_cast<long long>(closes.size()));
  putf("close_max_ms", percentile(closes, 1.0), 1);
  put_server(sp, t_sig);
  dump_csv(cfg, conns, t_sig);
  return 0;
}

int run_throughput(const Config& cfg, ServerProc& sp, int port) {
  Engine eng(cfg, sp, port, chat_request(cfg, port));
  // Streams as fast as possible: longer pauses would fill the socket buffers
  // and hold the server back.
  eng.coalesce(static_cast<int64_t>((cfg.coalesce_ms >= 0 ? cfg.coalesce_ms : 2) * 1e6));
  auto& conns = eng.conns();
  double cpu0 = server_cpu(sp);
  double client0 = client_cpu();
  int64_t t0 = now_ns();
  bool all = eng.run_until(t0 + secs(cfg.run_timeout), [&] {
    if (sp.exited) return true;
    for (auto& c : conns)
      if (!ended(c)) return false;
    return true;
  });
  int64_t t_end = now_ns();
  double cpu1 = server_cpu(sp);
  double client1 = client_cpu();
  if (all) {  // the window ends with the last byte, not with the check
    int64_t last = 0;
    for (auto& c : conns) last = std::max({last, c.t_final, c.t_eof});
    if (last > t0) t_end = last;
  }
  uint64_t events = 0, bytes = 0, chats = 0;
  long complete = 0;
  for (auto& c : conns) {
    events += c.n_events;
    chats += c.n_chat;
    bytes += c.bytes;
    if (c.got_done && c.final_chunk && c.n_chat == static_cast<uint32_t>(cfg.tokens)) ++complete;
  }
  double secs_run = static_cast<double>(t_end - t0) / 1e9;
  put("scenario", "throughput");
  put("n", cfg.n);
  put("tokens", cfg.tokens);
  put("streams_complete", complete);
  put("timed_out", all ? 0 : 1);
  put("events", static_cast<long long>(events));
  put("chat_events", static_cast<long long>(chats));
  put("bytes", static_cast<long long>(bytes));
  putf("seconds", secs_run, 3);
  putf("events_per_s", static_cast<double>(events) / secs_run, 0);
  putf("mb_per_s", static_cast<double>(bytes) / 1e6 / secs_run, 1);
  putf("server_cpu_s", cpu1 - cpu0, 3);
  putf("cpu_s_per_million_events", events ? (cpu1 - cpu0) / static_cast<double>(events) * 1e6 : NAN,
       2);
  putf("client_cpu_s", client1 - client0, 3);
  if (sp.exited) {
    put("error", "server exited during the run");
    return 1;
  }
  double cpu_at_signal = 0;
  int64_t t_sig = signal_and_wait(eng, sp, cfg, cpu_at_signal);
  put_server(sp, t_sig);
  dump_csv(cfg, conns, t0);
  return 0;
}

int run_capacity(const Config& cfg, ServerProc& sp, int port) {
  Engine eng(cfg, sp, port, chat_request(cfg, port));
  auto& conns = eng.conns();
  int64_t t0 = now_ns();
  eng.run_until(t0 + secs(cfg.ready_timeout), [&] {
    if (sp.exited) return true;
    for (auto& c : conns)
      if (!c.t_first_chat && !ended(c)) return false;
    return true;
  });
  long streaming = 0, n503 = 0, n503_retry = 0, other = 0, unanswered = 0;
  std::vector<double> to_503, to_503_connect;
  for (auto& c : conns) {
    if (c.t_first_chat && !ended(c)) {
      ++streaming;
    } else if (c.status == 503) {
      ++n503;
      if (c.retry_after) ++n503_retry;
      to_503.push_back(ms(c.t_status - c.t_sent));
      to_503_connect.push_back(ms(c.t_status - c.t_first_try));
    } else if (c.status == 0) {
      ++unanswered;
    } else {
      ++other;
    }
  }
  put("scenario", "capacity");
  put("n", cfg.n);
  put("streaming", streaming);
  put("status_503", n503);
  put("status_503_retry_after", n503_retry);
  put("other_status", other);
  put("unanswered", unanswered);
  putf("t503_p50_ms", percentile(to_503, 0.50));
  putf("t503_p99_ms", percentile(to_503, 0.99));
  putf("t503_max_ms", percentile(to_503, 1.0));
  putf("t503_from_connect_p99_ms", percentile(to_503_connect, 0.99));
  if (sp.exited) {
    put("error", "server exited before the signal");
    return 1;
  }
  double cpu_at_signal = 0;
  int64_t t_sig = signal_and_wait(eng, sp, cfg, cpu_at_signal);
  long complete = 0;
  for (auto& c : conns)
    if (c.t_first_chat && c.got_error && c.error_ok && c.got_done && c.error_before_done &&
        c.final_chunk)
      ++complete;
  put("streams_complete_at_shutdown", complete);
  put_server(sp, t_sig);
  dump_csv(cfg, conns, t_sig);
  return 0;
}

// The on_cancel bench (bench/cancelbench.cpp, and goserver --cancel-stamps):
// every stream's producer blocks in a read that only its cancel callback
// interrupts. The server stamps, per dialog_id, when the producer blocked,
// when the callback ran and when the producer was released, on
// CLOCK_MONOTONIC, which is one clock for every process on the machine (as
// now_ns() here), and writes them to the stamp file at its exit. The cause is
// the signal (default), or with --disconnect this client closing each stream
// (its t_close), and the signal once every stream is closed.
struct Stamp {
  int64_t blocked = 0, callback = 0, released = 0;
};

// Reads "<dialog_id> <t_blocked> <t_callback> <t_released>" lines; dialog ids
// "lc-<index>" map to connections. Returns the number of lines read.
long read_stamps(const std::string& path, std::vector<Stamp>& out) {
  FILE* f = std::fopen(path.c_str(), "r");
  if (!f) return -1;
  char line[512];
  long n = 0;
  for (int guard = 0; guard < 10000000 && std::fgets(line, sizeof line, f); ++guard) {
    if (line[0] == '#') continue;
    char id[200];
    long long b = 0, cb = 0, r = 0;
    if (std::sscanf(line, "%199s %lld %lld %lld", id, &b, &cb, &r) != 4) continue;
    if (std::strncmp(id, "lc-", 3) != 0) continue;
    long idx = std::atol(id + 3);
    if (idx < 0 || static_cast<std::size_t>(idx) >= out.size()) continue;
    out[static_cast<std::size_t>(idx)] = Stamp{b, cb, r};
    ++n;
  }
  std::fclose(f);
  return n;
}

int run_cancel(const Config& cfg, ServerProc& sp, int port) {
  if (cfg.stamps.empty()) {
    std::fprintf(stderr, "loadclient: cancel needs --stamps FILE (the server's stamp file)\n");
    return 2;
  }
  std::remove(cfg.stamps.c_str());
  Engine eng(cfg, sp, port, chat_request(cfg, port));
  auto& conns = eng.conns();
  int64_t t0 = now_ns();
  long streaming = 0;
  bool all = eng.run_until(t0 + secs(cfg.ready_timeout), [&] {
    if (sp.exited) return true;
    streaming = 0;
    long finished = 0;
    for (auto& c : conns) {
      if (c.t_first_chat)
        ++streaming;
      else if (ended(c))
        ++finished;
    }
    return streaming + finished >= cfg.n;
  });
  int64_t t_ready = now_ns();
  // Let every producer reach its blocking read.
  eng.run_until(t_ready + secs(cfg.settle), [&] { return sp.exited; });
  long held = 0;
  for (auto& c : conns)
    if (c.t_first_chat && !ended(c)) ++held;
  put("scenario", cfg.disconnect ? "cancel-disconnect" : "cancel-signal");
  put("n", cfg.n);
  put("all_streaming", all && streaming == cfg.n ? 1 : 0);
  putf("ramp_s", ms(t_ready - t0) / 1e3, 2);
  put("peak_inflight", eng.peak_inflight());
  if (sp.exited) {
    put("error", "server exited before the signal");
    put_server(sp, t_ready);
    return 1;
  }
  int64_t t_first_close = 0, t_last_close = 0;
  if (cfg.disconnect) {
    // Close the streams one by one at --disconnect-rate, each with its own
    // time; then give the server a moment before the signal that makes it
    // exit (and write its stamps).
    const int64_t gap = kSec / std::max(1, cfg.disconnect_rate);
    eng.stop_starting();
    eng.coalesce(0);
    std::size_t next = 0;
    t_first_close = now_ns();
    eng.run_until(t_first_close + secs(cfg.drain_timeout), [&] {
      int64_t t = now_ns();
      while (next < conns.size() && t >= t_first_close + static_cast<int64_t>(next) * gap) {
        if (conns[next].t_first_chat && !ended(conns[next])) eng.disconnect(next, now_ns());
        ++next;
      }
      return next >= conns.size() || sp.exited;
    });
    t_last_close = now_ns();
    eng.run_until(t_last_close + 300 * kMs, [&] { return sp.exited; });
    putf("disconnect_s", ms(t_last_close - t_first_close) / 1e3, 2);
  }
  double cpu_at_signal = 0;
  int64_t t_sig = signal_and_wait(eng, sp, cfg, cpu_at_signal);
  if (!cfg.disconnect) {
    Config unpaced = cfg;  // the streams are not paced: no pace figure
    unpaced.interval_ms = 0;
    report_shutdown(unpaced, conns, t_sig, sp, cpu_at_signal, held);
  } else {
    put("held", held);
    put_server(sp, t_sig);
  }
  std::vector<Stamp> stamps(conns.size());
  long lines = read_stamps(cfg.stamps, stamps);
  put("stamps", lines);
  std::vector<double> to_cb, to_release;
  long with_cb = 0, released = 0, missing = 0;
  for (std::size_t i = 0; i < conns.size(); ++i) {
    const Conn& c = conns[i];
    const Stamp& st = stamps[i];
    const int64_t cause = cfg.disconnect ? c.t_close : t_sig;
    if (!c.t_first_chat || cause == 0) continue;  // was not streaming, or not closed by us
    if (st.blocked == 0) {
      ++missing;
      continue;
    }
    if (st.callback) {
      ++with_cb;
      to_cb.push_back(ms(st.callback - cause));
    }
    if (st.released) {
      ++released;
      to_release.push_back(ms(st.released - cause));
    }
  }
  put("callbacks", with_cb);
  put("released", released);
  put("no_stamp", missing);
  putf("cb_p50_ms", percentile(to_cb, 0.50), 2);
  putf("cb_p99_ms", percentile(to_cb, 0.99), 2);
  putf("cb_max_ms", percentile(to_cb, 1.0), 2);
  putf("release_p50_ms", percentile(to_release, 0.50), 2);
  putf("release_max_ms", percentile(to_release, 1.0), 2);
  dump_csv(cfg, conns, cfg.disconnect ? t_first_close : t_sig);
  return 0;
}

// ---------------------------------------------------------------------------
// main
// ---------------------------------------------------------------------------

[[noreturn]] void usage(int code) {
  std::fputs(
      R"(usage: loadclient SCENARIO [options] -- SERVER_COMMAND [ARGS...]

Starts SERVER_COMMAND (every {PORT} in it replaced by a free port), waits for
GET /health to answer 200, runs the scenario against 127.0.0.1, signals the
server, and prints key=value results.

scenarios:
  shutdown    open N streams; once all have had a chat event, signal; per
              client: shutdown error, done, terminating chunk, signal->done;
              signal->exit, peak RSS and threads, drain CPU per stream
  idle        N keep-alive connections each make one GET /health and stay idle;
              signal; signal->exit
  throughput  N streams of --tokens chunks at --interval-ms (use 0); events/s,
              MB/s, server CPU seconds per million events
  capacity    open N streams against a server with a lower --max-streams;
              count 503s and the time to them; then signal
  cancel      open N streams to a server whose producers block until their
              cancel callback runs (bench/cancelbench.cpp, goserver
              --cancel-stamps); signal (or with --disconnect close every
              stream, then signal); read the server's --stamps file and
              report cause->callback and cause->release per stream

options:
  --n N                 connections (default 100)
  --tokens T            context.demo.tokens (default 100000)
  --interval-ms M       context.demo.interval_ms (default 50)
  --prompt TEXT         the user message (default "Tell me a story")
  --ready-timeout S     bound of the ramp-up (default 60)
  --drain-timeout S     bound of signal->exit, then SIGKILL (default 15)
  --run-timeout S       bound of the throughput run (default 60)
  --start-timeout S     bound of the server start (default 15)
  --connect-rate R      new connections per second (default 5000)
  --connect-inflight K  handshakes in progress at once (default 64)
  --inflight K          connection attempts in flight (from connect() to the
                        response's status line) at most (default 0: no cap
                        beyond --connect-inflight); the peak is reported
  --connect-timeout S   per attempt (default 4); refused/timed out: retried
  --connect-attempts A  per connection (default 5)
  --signal TERM|INT     (default TERM)
  --settle S            shutdown: streaming time between ramp-up and signal,
                        measuring the server's CPU and delivered pace (default 1)
  --coalesce-ms M       shutdown, throughput: before the signal, wake at most
                        every M ms to read what arrived (0: on every event;
                        default 100 for shutdown, 2 for throughput); after the
                        signal every 1 ms; capacity and idle: on every event
  --rt 0|1              run this client SCHED_RR (priority 1, reset on fork, so
                        the server runs SCHED_OTHER) when permitted. Default: 1
                        for shutdown, idle and capacity: under CFS a client
                        thread gets one share against thousands of runnable
                        server threads, and a saturated server then delays its
                        timestamps (and its own deadlines) by seconds; at
                        N = 1,000 RT and non-RT gave the same figures. 0 for
                        throughput: an RT client preempting 100 busy server
                        threads raised agentsmithy's CPU per event by ~50%.
  --nice N              this client's nice value; the server keeps 0 (default 0)
  --server-log FILE     server stdout/stderr (default /dev/null)
  --dump FILE           per-client CSV, times in ms from the signal
  --dialog-ids 0|1      each request carries "dialog_id":"lc-<6-digit index>" (default 0;
                        always on for cancel)
  --stamps FILE         cancel: the stamp file the server writes at its exit
  --disconnect 0|1      cancel: the client closes each stream (default 0: signal)
  --disconnect-rate R   cancel --disconnect: closes per second (default 2000)
)",
      code ? stderr : stdout);
  std::exit(code);
}

Config parse(int argc, char** argv) {
  Config cfg;
  if (argc < 2) usage(1);
  cfg.scenario = argv[1];
  if (cfg.scenario == "--help" || cfg.scenario == "-h") usage(0);
  int i = 2;
  for (; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--") {
      ++i;
      break;
    }
    if (i + 1 >= argc) usage(1);
    std::string v = argv[++i];
    if (a == "--n")
      cfg.n = std::atoi(v.c_str());
    else if (a == "--tokens")
      cfg.tokens = std::atol(v.c_str());
    else if (a == "--interval-ms")
      cfg.interval_ms = std::atol(v.c_str());
    else if (a == "--prompt")
      cfg.prompt = v;
    else if (a == "--ready-timeout")
      cfg.ready_timeout = std::atof(v.c_str());
    else if (a == "--drain-timeout")
      cfg.drain_timeout = std::atof(v.c_str());
    else if (a == "--run-timeout")
      cfg.run_timeout = std::atof(v.c_str());
    else if (a == "--start-timeout")
      cfg.start_timeout = std::atof(v.c_str());
    else if (a == "--connect-rate")
      cfg.connect_rate = std::atoi(v.c_str());
    else if (a == "--connect-inflight")
      cfg.connect_inflight = std::atoi(v.c_str());
    else if (a == "--inflight")
      cfg.inflight = std::atoi(v.c_str());
    else if (a == "--dialog-ids")
      cfg.dialog_ids = v != "0";
    else if (a == "--stamps")
      cfg.stamps = v;
    else if (a == "--disconnect")
      cfg.disconnect = v != "0";
    else if (a == "--disconnect-rate")
      cfg.disconnect_rate = std::atoi(v.c_str());
    else if (a == "--connect-timeout")
      cfg.connect_timeout = std::atof(v.c_str());
    else if (a == "--connect-attempts")
      cfg.connect_attempts = std::atoi(v.c_str());
    else if (a == "--server-log")
      cfg.server_log = v;
    else if (a == "--dump")
      cfg.dump = v;
    else if (a == "--signal")
      cfg.sig = v == "INT" ? SIGINT : SIGTERM;
    else if (a == "--settle")
      cfg.settle = std::atof(v.c_str());
    else if (a == "--rt")
      cfg.rt = v != "0" ? 1 : 0;
    else if (a == "--nice")
      cfg.nice = std::atoi(v.c_str());
    else if (a == "--coalesce-ms")
      cfg.coalesce_ms = std::atof(v.c_str());
    else {
      std::fprintf(stderr, "loadclient: unknown option %s\n", a.c_str());
      usage(1);
    }
  }
  for (; i < argc; ++i) cfg.server_argv.emplace_back(argv[i]);
  if (cfg.server_argv.empty() || cfg.n < 1 || cfg.n > 100000 || cfg.connect_rate < 1 ||
      cfg.connect_inflight < 1 || cfg.tokens < 1) {
    std::fprintf(stderr, "loadclient: need a server command after --, N in [1, 100000]\n");
    usage(1);
  }
  if (cfg.scenario != "shutdown" && cfg.scenario != "idle" && cfg.scenario != "throughput" &&
      cfg.scenario != "capacity" && cfg.scenario != "cancel")
    usage(1);
  if (cfg.scenario == "cancel") cfg.dialog_ids = true;
  return cfg;
}

}  // namespace

int main(int argc, char** argv) {
  Config cfg = parse(argc, argv);
  signal(SIGPIPE, SIG_IGN);
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // results survive a kill midway

  // Thousands of sockets: raise the soft descriptor limit to the hard one
  // (the server inherits it).
  rlimit rl{};
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }
  getrlimit(RLIMIT_NOFILE, &rl);
  if (rl.rlim_cur < static_cast<rlim_t>(cfg.n) + 64) {
    std::fprintf(stderr, "loadclient: RLIMIT_NOFILE %llu is too low for %d connections\n",
                 static_cast<unsigned long long>(rl.rlim_cur), cfg.n);
    return 2;
  }
  // A hard bound on the whole run: past it the default SIGALRM action ends
  // this process, and PR_SET_PDEATHSIG ends the server with it.
  alarm(static_cast<unsigned>(cfg.start_timeout + cfg.ready_timeout + cfg.drain_timeout +
                              cfg.run_timeout + 30));

  // On a 2-core machine shared with the server, a client thread under CFS
  // competes with every runnable server thread; real-time priority keeps its
  // timestamps close to the arrival of the bytes, but preempts the server
  // (see --rt in the usage for when it is used). It blocks in epoll_wait when
  // idle, and the kernel's RT throttling bounds it anyway.
  if (cfg.nice != 0) setpriority(PRIO_PROCESS, 0, cfg.nice);
  bool rt = false;
  if (cfg.rt == 1 || (cfg.rt == -1 && cfg.scenario != "throughput")) {
    sched_param prm{};
    prm.sched_priority = 1;
    rt = sched_setscheduler(0, SCHED_RR | SCHED_RESET_ON_FORK, &prm) == 0;
  }

  int port = pick_port();
  ServerProc sp;
  spawn(sp, cfg, port);
  int64_t deadline = now_ns() + secs(cfg.start_timeout);
  bool ready = false;
  for (int k = 0; k < 100000 && now_ns() < deadline; ++k) {
    pollfd pfd{sp.pidfd, POLLIN, 0};
    if (poll(&pfd, 1, 0) > 0) break;  // the server died
    if (health_ok(port)) {
      ready = true;
      break;
    }
    usleep(20000);
  }
  if (!ready) {
    std::fprintf(stderr, "loadclient: server not ready on port %d (see %s)\n", port,
                 cfg.server_log.c_str());
    kill(sp.pid, SIGKILL);
    waitpid(sp.pid, nullptr, 0);
    put("scenario", cfg.scenario);
    put("error", "server did not start");
    return 1;
  }
  sample_status(sp);
  long long overflows0 = listen_overflows();
  const double machine0 = machine_busy_s();
  const double server0 = server_cpu(sp);
  const double client0 = client_cpu();
  const int64_t wall0 = now_ns();

  int rc = 1;
  if (cfg.scenario == "shutdown")
    rc = run_shutdown(cfg, sp, port);
  else if (cfg.scenario == "idle")
    rc = run_idle(cfg, sp, port);
  else if (cfg.scenario == "throughput")
    rc = run_throughput(cfg, sp, port);
  else if (cfg.scenario == "capacity")
    rc = run_capacity(cfg, sp, port);
  else if (cfg.scenario == "cancel")
    rc = run_cancel(cfg, sp, port);

  if (!sp.exited) {  // never leave the server behind
    kill(sp.pid, SIGKILL);
    waitpid(sp.pid, nullptr, 0);
  }
  put("client_sched", rt ? "SCHED_RR" : "SCHED_OTHER");
  // CPU the rest of the machine used meanwhile (other builds and tests on a
  // shared machine): busy time of all CPUs minus the server's and ours.
  {
    const double wall = static_cast<double>(now_ns() - wall0) / 1e9;
    const double other =
        (machine_busy_s() - machine0) - (server_cpu(sp) - server0) - (client_cpu() - client0);
    putf("other_busy_pct",
         std::max(0.0, 100.0 * other / (wall * static_cast<double>(sysconf(_SC_NPROCESSORS_ONLN)))),
         0);
  }
  long long overflows1 = listen_overflows();
  if (overflows0 >= 0 && overflows1 >= 0) put("listen_overflows", overflows1 - overflows0);
  std::fflush(stdout);
  return rc;
}
