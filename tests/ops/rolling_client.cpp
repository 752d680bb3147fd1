// tests/ops/rolling_client.cpp - N clients that stream continuously through a
// proxy while the instances behind it are restarted, and check every answer.
//
//   rolling_client --port 8080 --clients 200 --tokens 30 --interval-ms 50
//                  --get-every 4 --phases 3 --final-streams 2 --timeout 150
//
// Each client runs one request at a time on a keep-alive HTTP/1.1 connection
// (a new one when the answer said `Connection: close`): POST /api/chat with
// context {"demo":{"tokens":K,"interval_ms":M}}, and every Gth request
// GET /api/chat?message=... . When a stream ends the next request starts at
// once; a 503 is retried after its Retry-After. One epoll thread, raw sockets.
//
// Phases: the run starts in phase 0 and SIGUSR1 moves it to the next one (the
// test sends it after each restart, once the restarted instance takes traffic
// again). Once every client has completed a stream in the current phase,
// "phase P: every client served" is printed. In the last phase each client
// stops after --final-streams completed streams; when all have, the counts
// are printed and the program exits: 0 if nothing was wrong, 1 otherwise.
//
// A violation is: a status other than 200 or 503 (502, 504, ...); a connect
// failure, a reset, or a connection closed before the answer was complete (a
// truncated chunked body); a stream without `done`, with anything after
// `done`, or with `done` twice; an `error` other than the shutdown error, or
// one not directly followed by `done`; a stream that ended short of its
// answer without the shutdown error (`{"type":"error",...,"code":"shutdown"}`
// then `done`); a POST stream that completed with the wrong number of chunks;
// nothing received for --stall seconds; a client that completed no stream in
// some phase; the --timeout deadline.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;
using Ms = std::chrono::milliseconds;

double ms_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

struct Config {
  std::string host = "127.0.0.1";
  int port = 8080;
  int clients = 200;
  int tokens = 30;
  int interval_ms = 50;
  int get_every = 4;  // 0: POST only
  int phases = 3;
  int final_streams = 2;
  double timeout_s = 150;
  double stall_s = 30;
  int max_details = 5;  // per kind of violation
  // Development against a server from before the "code" field: an error
  // whose text starts "Server is shutting down" counts as the shutdown error.
  bool uncoded_shutdown = false;
};

// ---------------------------------------------------------------------------
// A flat JSON object's top-level members, as text (strings unescaped, other
// values as written). Enough for the server's events: {"type":"error",...}.
// ---------------------------------------------------------------------------
bool parse_flat_object(const std::string& s, std::map<std::string, std::string>& out) {
  std::size_t i = 0;
  const auto ws = [&] {
    while (i < s.size() && (s[i] == ' ' || s[i] == '\t' || s[i] == '\r' || s[i] == '\n')) ++i;
  };
  const auto string_at = [&](std::string& value) {
    if (i >= s.size() || s[i] != '"') return false;
    ++i;
    while (i < s.size() && s[i] != '"') {
      if (s[i] == '\\') {
        if (++i >= s.size()) return false;
        switch (s[i]) {
          case 'n': value += '\n'; break;
          case 't': value += '\t'; break;
          case 'r': value += '\r'; break;
          case 'b': value += '\b'; break;
          case 'f': value += '\f'; break;
          case 'u': value += "\\u"; break;  // kept escaped: only compared, never shown
          default: value += s[i]; break;
        }
        ++i;
      } else {
        value += s[i++];
      }
    }
    if (i >= s.size()) return false;
    ++i;
    return true;
  };
  ws();
  if (i >= s.size() || s[i] != '{') return false;
  ++i;
  ws();
  if (i < s.size() && s[i] == '}') return true;
  for (;;) {
    ws();
    std::string key, value;
    if (!string_at(key)) return false;
    ws();
    if (i >= s.size() || s[i] != ':') return false;
    ++i;
    ws();
    if (i >= s.size()) return false;
    if (s[i] == '"') {
      if (!string_at(value)) return false;
    } else if (s[i] == '{' || s[i] == '[') {  // skipped, strings inside included
      const std::size_t start = i;
      int depth = 0;
      bool in_string = false;
      for (; i < s.size(); ++i) {
        const char c = s[i];
        if (in_string) {
          if (c == '\\')
            ++i;
          else if (c == '"')
            in_string = false;
        } else if (c == '"') {
          in_string = true;
        } else if (c == '{' || c == '[') {
          ++depth;
        } else if ((c == '}' || c == ']') && --depth == 0) {
          ++i;
          break;
        }
      }
      if (depth != 0) return false;
      value = s.substr(start, i - start);
    } else {
      const std::size_t start = i;
      while (i < s.size() && s[i] != ',' && s[i] != '}' && s[i] != ' ') ++i;
      value = s.substr(start, i - start);
    }
    out[key] = value;
    ws();
    if (i >= s.size()) return false;
    if (s[i] == ',') {
      ++i;
      continue;
    }
    if (s[i] != '}') return false;
    ++i;
    ws();
    return i == s.size();
  }
}

// ---------------------------------------------------------------------------
// One client: a connection, one request at a time, and what it has seen.
// ---------------------------------------------------------------------------
enum class State { idle, connecting, sending, head, body, waiting_retry, finished };
enum class Framing { none, chunked, length, close };
enum class ChunkState { size, data, data_crlf, trailer };

struct Client {
  int id = 0;
  int fd = -1;
  State state = State::idle;
  bool reused = false;  // this request went out on a connection used before
  bool is_get = false;
  bool retry = false;    // the next request repeats the last one (after a 503)
  bool backoff = false;  // a violation: wait a moment before the next request
  std::uint64_t requests = 0;
  std::string out;  // request bytes not yet written
  std::size_t out_off = 0;
  std::string in;  // received bytes not yet consumed
  // response
  int status = 0;
  bool conn_close = false;
  Framing framing = Framing::none;
  std::size_t remaining = 0;  // content-length or current chunk
  ChunkState chunk = ChunkState::size;
  double retry_after_s = 1;
  std::string body;  // a non-stream answer's body
  bool event_stream = false;
  // SSE
  std::string sse_line_buf;
  std::string data_buf;
  bool has_data = false;
  std::vector<std::string> types;  // event types in order
  std::string last_error_code;
  std::string last_error_text;
  int chats = 0;
  // timing
  Clock::time_point last_byte;
  Clock::time_point retry_at;
  Clock::time_point gap_start;  // when the previous stream ended (or the run began)
  bool gap_open = true;
  // results
  std::vector<int> completed_in_phase;
  int final_completed = 0;
};

struct Totals {
  std::uint64_t requests_sent = 0;
  std::uint64_t served = 0;  // streams that completed (done after the whole answer)
  std::uint64_t served_post = 0;
  std::uint64_t served_get = 0;
  std::uint64_t cut_by_shutdown = 0;
  std::uint64_t status_503 = 0;
  std::uint64_t reconnects = 0;
  std::uint64_t violations = 0;
  std::map<std::string, std::uint64_t> by_kind;
  std::vector<double> waits_ms;  // per gap between two streams of a client
  double max_wait_ms = 0;
};

class Runner {
 public:
  explicit Runner(const Config& c) : cfg_(c) {}

  int run();

 private:
  void violation(Client& c, const std::string& kind, const std::string& detail);
  void start_request(Client& c);
  void open_connection(Client& c);
  void close_connection(Client& c);
  void on_event(Client& c, uint32_t events);
  bool flush(Client& c);
  void consume(Client& c, bool eof);
  bool parse_head(Client& c);
  void feed_body(Client& c, const char* p, std::size_t n);
  void feed_sse(Client& c, const char* p, std::size_t n);
  void end_event(Client& c);
  void response_done(Client& c);
  void next_or_finish(Client& c);
  void watch(Client& c, uint32_t events, bool add);
  void check_phase_served();

  Config cfg_;
  int ep_ = -1;
  int sig_fd_ = -1;
  int phase_ = 0;
  int phase_announced_ = -1;
  std::vector<Client> clients_;
  Totals t_;
  Clock::time_point start_;
  bool stopping_ = false;
};

void Runner::violation(Client& c, const std::string& kind, const std::string& detail) {
  ++t_.violations;
  // The first few of each kind, with the client and when.
  if (++t_.by_kind[kind] <= static_cast<std::uint64_t>(cfg_.max_details)) {
    std::printf("VIOLATION client %d request %llu (%s, phase %d, %.0f ms): %s: %s\n", c.id,
                static_cast<unsigned long long>(c.requests), c.is_get ? "GET" : "POST", phase_,
                ms_between(start_, Clock::now()), kind.c_str(), detail.c_str());
    std::fflush(stdout);
  }
  c.backoff = true;  // no tight loop of failures against a broken proxy
}

void Runner::watch(Client& c, uint32_t events, bool add) {
  epoll_event ev{};
  ev.events = events;
  ev.data.u32 = static_cast<uint32_t>(c.id);
  if (::epoll_ctl(ep_, add ? EPOLL_CTL_ADD : EPOLL_CTL_MOD, c.fd, &ev) != 0) {
    std::perror("epoll_ctl");
    std::exit(2);
  }
}

void Runner::close_connection(Client& c) {
  if (c.fd >= 0) ::close(c.fd);  // also leaves the epoll set
  c.fd = -1;
  c.in.clear();
}

void Runner::open_connection(Client& c) {
  c.fd = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (c.fd < 0) {
    std::perror("socket");
    std::exit(2);
  }
  const int one = 1;
  ::setsockopt(c.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(cfg_.port));
  ::inet_pton(AF_INET, cfg_.host.c_str(), &addr.sin_addr);
  ++t_.reconnects;
  c.reused = false;
  const int r = ::connect(c.fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  if (r == 0 || errno == EINPROGRESS) {
    c.state = State::connecting;
    watch(c, EPOLLOUT | EPOLLIN | EPOLLRDHUP, true);
    return;
  }
  violation(c, "connect", std::strerror(errno));
  close_connection(c);
  c.state = State::waiting_retry;
  c.retry_at = Clock::now() + Ms(200);
}

void Runner::start_request(Client& c) {
  ++t_.requests_sent;
  if (!c.retry) {
    ++c.requests;
    c.is_get = cfg_.get_every > 0 && c.requests % static_cast<std::uint64_t>(cfg_.get_every) == 0;
  }
  c.retry = false;
  const std::string host = cfg_.host + ":" + std::to_string(cfg_.port);
  if (c.is_get) {
    c.out = "GET /api/chat?message=hello%20from%20client%20" + std::to_string(c.id) +
            " HTTP/1.1\r\nHost: " + host + "\r\nAccept: text/event-stream\r\n\r\n";
  } else {
    const std::string body =
        "{\"messages\":[{\"role\":\"user\",\"content\":\"client " + std::to_string(c.id) +
        "\"}],\"stream\":true,\"context\":{\"demo\":{\"tokens\":" + std::to_string(cfg_.tokens) +
        ",\"interval_ms\":" + std::to_string(cfg_.interval_ms) + "}}}";
    c.out = "POST /api/chat HTTP/1.1\r\nHost: " + host +
            "\r\nContent-Type: application/json\r\nAccept: text/event-stream\r\nContent-Length: " +
            std::to_string(body.size()) + "\r\n\r\n" + body;
  }
  c.out_off = 0;
  c.status = 0;
  c.conn_close = false;
  c.framing = Framing::none;
  c.remaining = 0;
  c.chunk = ChunkState::size;
  c.retry_after_s = 1;
  c.body.clear();
  c.event_stream = false;
  c.sse_line_buf.clear();
  c.data_buf.clear();
  c.has_data = false;
  c.types.clear();
  c.last_error_code.clear();
  c.last_error_text.clear();
  c.chats = 0;
  c.last_byte = Clock::now();
  if (c.fd < 0) {
    open_connection(c);
    return;
  }
  c.reused = true;
  c.state = State::sending;
  if (flush(c)) watch(c, EPOLLIN | EPOLLRDHUP, false);
}

// Writes what it can; true when the whole request is out.
bool Runner::flush(Client& c) {
  while (c.out_off < c.out.size()) {
    const ssize_t n =
        ::send(c.fd, c.out.data() + c.out_off, c.out.size() - c.out_off, MSG_NOSIGNAL);
    if (n > 0) {
      c.out_off += static_cast<std::size_t>(n);
      continue;
    }
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      watch(c, EPOLLOUT | EPOLLIN | EPOLLRDHUP, false);
      return false;
    }
    if (n < 0 && errno == EINTR) continue;
    violation(c, c.reused ? "reset (reused connection)" : "reset",
              std::string("send: ") + std::strerror(errno));
    close_connection(c);
    next_or_finish(c);
    return false;
  }
  c.state = State::head;
  return true;
}

void Runner::on_event(Client& c, uint32_t events) {
  if (c.fd < 0) return;
  if (c.state == State::connecting) {
    int err = 0;
    socklen_t len = sizeof err;
    ::getsockopt(c.fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err != 0) {
      violation(c, "connect", std::strerror(err));
      close_connection(c);
      c.state = State::waiting_retry;
      c.retry_at = Clock::now() + Ms(200);
      return;
    }
    if (!(events & EPOLLOUT)) return;
    c.state = State::sending;
  }
  if (c.state == State::sending) {
    if (!flush(c)) return;
    watch(c, EPOLLIN | EPOLLRDHUP, false);
  }
  if (!(events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))) return;
  char buf[16384];
  const int fd = c.fd;
  for (;;) {
    // An answer that ended may have closed this connection and opened the
    // next request's: that one reports its own events.
    if (c.fd != fd) return;
    const ssize_t n = ::recv(c.fd, buf, sizeof buf, 0);
    if (n > 0) {
      c.last_byte = Clock::now();
      if (c.state == State::idle || c.state == State::finished || c.state == State::waiting_retry) {
        violation(c, "unexpected bytes", "data on an idle connection");
        close_connection(c);
        return;
      }
      c.in.append(buf, static_cast<std::size_t>(n));
      consume(c, false);
      if (c.fd < 0) return;
      continue;
    }
    if (n == 0) {
      if (c.state == State::head || c.state == State::body) {
        consume(c, true);
      } else if (c.state == State::sending || c.state == State::connecting) {
        violation(c, c.reused ? "reset (reused connection)" : "reset",
                  "connection closed while the request was being sent");
        close_connection(c);
        next_or_finish(c);
      } else {
        close_connection(c);  // an idle kept-alive connection the proxy closed
      }
      return;
    }
    if (errno == EAGAIN || errno == EWOULDBLOCK) return;
    if (errno == EINTR) continue;
    if (c.state == State::head || c.state == State::body) {
      violation(c, c.reused && c.status == 0 ? "reset (reused connection)" : "reset",
                std::string("recv: ") + std::strerror(errno));
      close_connection(c);
      next_or_finish(c);
    } else {
      close_connection(c);
    }
    return;
  }
}

bool iequals_prefix(const std::string& line, const char* name, std::string& value) {
  const std::size_t len = std::strlen(name);
  if (line.size() < len || line[len - 1] != ':') return false;
  for (std::size_t i = 0; i < len; ++i) {
    if (std::tolower(static_cast<unsigned char>(line[i])) != name[i]) return false;
  }
  std::size_t b = len;
  while (b < line.size() && (line[b] == ' ' || line[b] == '\t')) ++b;
  std::size_t e = line.size();
  while (e > b && (line[e - 1] == ' ' || line[e - 1] == '\t')) --e;
  value = line.substr(b, e - b);
  for (char& ch : value) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return true;
}

// Parses the status line and headers once they are all in; false if not yet.
bool Runner::parse_head(Client& c) {
  const std::size_t end = c.in.find("\r\n\r\n");
  if (end == std::string::npos) return false;
  const std::string head = c.in.substr(0, end);
  c.in.erase(0, end + 4);
  std::size_t pos = head.find("\r\n");
  const std::string status_line = head.substr(0, pos);
  if (status_line.compare(0, 5, "HTTP/") != 0 || status_line.size() < 12) {
    c.status = -1;
    return true;
  }
  c.status = std::atoi(status_line.c_str() + 9);
  bool chunked = false;
  long long length = -1;
  while (pos != std::string::npos) {
    const std::size_t start = pos + 2;
    pos = head.find("\r\n", start);
    const std::string line = head.substr(start, pos == std::string::npos ? pos : pos - start);
    std::string v;
    if (iequals_prefix(line, "transfer-encoding:", v)) {
      chunked = v.find("chunked") != std::string::npos;
    } else if (iequals_prefix(line, "content-length:", v)) {
      length = std::atoll(v.c_str());
    } else if (iequals_prefix(line, "connection:", v)) {
      c.conn_close = v.find("close") != std::string::npos;
    } else if (iequals_prefix(line, "retry-after:", v)) {
      c.retry_after_s = std::max(0.0, std::atof(v.c_str()));
    } else if (iequals_prefix(line, "content-type:", v)) {
      c.event_stream = v.find("text/event-stream") != std::string::npos;
    }
  }
  if (chunked) {
    c.framing = Framing::chunked;
  } else if (length >= 0) {
    c.framing = Framing::length;
    c.remaining = static_cast<std::size_t>(length);
  } else {
    c.framing = Framing::close;
    c.conn_close = true;
  }
  return true;
}

void Runner::consume(Client& c, bool eof) {
  if (c.state == State::head) {
    if (!parse_head(c)) {
      if (eof) {
        violation(c, c.reused && c.in.empty() ? "reset (reused connection)" : "truncated",
                  c.in.empty() ? "connection closed before any response byte"
                               : "connection closed inside the response head");
        close_connection(c);
        next_or_finish(c);
      }
      return;
    }
    if (c.status < 0) {
      violation(c, "bad response", "not an HTTP status line");
      close_connection(c);
      next_or_finish(c);
      return;
    }
    c.state = State::body;
    // The wait between two streams: from the end of the previous answer to
    // the head of the next 200, 503 retries included.
    if (c.status == 200 && c.gap_open) {
      const double w = ms_between(c.gap_start, Clock::now());
      t_.waits_ms.push_back(w);
      t_.max_wait_ms = std::max(t_.max_wait_ms, w);
      c.gap_open = false;
    }
    if (c.framing == Framing::length && c.remaining == 0) {
      response_done(c);
      return;
    }
  }
  if (c.state != State::body) return;
  std::string data;
  data.swap(c.in);
  feed_body(c, data.data(), data.size());
  if (c.state != State::body || c.fd < 0) return;
  if (eof) {
    if (c.framing == Framing::close) {
      response_done(c);
    } else {
      violation(c, "truncated",
                c.framing == Framing::chunked ? "connection closed before the terminating chunk"
                                              : "connection closed before Content-Length bytes");
      close_connection(c);
      next_or_finish(c);
    }
  }
}

void Runner::feed_body(Client& c, const char* p, std::size_t n) {
  if (c.framing == Framing::close) {
    feed_sse(c, p, n);
    return;
  }
  if (c.framing == Framing::length) {
    const std::size_t take = std::min(n, c.remaining);
    feed_sse(c, p, take);
    c.remaining -= take;
    if (take < n) c.in.assign(p + take, n - take);  // nothing is pipelined: flagged below
    if (c.remaining == 0) response_done(c);
    return;
  }
  std::size_t i = 0;
  while (i < n && c.state == State::body) {
    if (c.chunk == ChunkState::data) {
      const std::size_t take = std::min(n - i, c.remaining);
      feed_sse(c, p + i, take);
      i += take;
      c.remaining -= take;
      if (c.remaining == 0) c.chunk = ChunkState::data_crlf;
      continue;
    }
    // The other states read one line (a chunk's size, the CRLF after its
    // data, a trailer): wait until all of it is there.
    const char* nl = static_cast<const char*>(std::memchr(p + i, '\n', n - i));
    if (!nl) {
      c.in.assign(p + i, n - i);
      return;
    }
    const std::string line(p + i, static_cast<std::size_t>(nl - (p + i)));
    i = static_cast<std::size_t>(nl - p) + 1;
    switch (c.chunk) {
      case ChunkState::size:
        c.remaining = std::strtoul(line.c_str(), nullptr, 16);
        c.chunk = c.remaining == 0 ? ChunkState::trailer : ChunkState::data;
        break;
      case ChunkState::data_crlf: c.chunk = ChunkState::size; break;
      case ChunkState::trailer:
        if (line.empty() || line == "\r") {  // the blank line that ends the body
          if (i < n) c.in.assign(p + i, n - i);
          response_done(c);
          return;
        }
        break;
      case ChunkState::data: break;  // above
    }
  }
}

void Runner::feed_sse(Client& c, const char* p, std::size_t n) {
  if (!c.event_stream) {
    c.body.append(p, n);
    return;
  }
  for (std::size_t i = 0; i < n; ++i) {
    const char ch = p[i];
    if (ch != '\n') {
      c.sse_line_buf += ch;
      continue;
    }
    std::string line;
    line.swap(c.sse_line_buf);
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty()) {
      end_event(c);
    } else if (line.compare(0, 5, "data:") == 0) {
      std::size_t b = 5;
      if (b < line.size() && line[b] == ' ') ++b;
      if (c.has_data) c.data_buf += '\n';
      c.data_buf += line.substr(b);
      c.has_data = true;
    }
    // "id:", "retry:", "event:" and ": ping" lines carry nothing checked here.
  }
}

void Runner::end_event(Client& c) {
  if (!c.has_data) return;
  std::map<std::string, std::string> obj;
  std::string data;
  data.swap(c.data_buf);
  c.has_data = false;
  if (!parse_flat_object(data, obj) || obj.find("type") == obj.end()) {
    violation(c, "bad event", data.substr(0, 200));
    c.types.push_back("?");
    return;
  }
  const std::string& type = obj["type"];
  if (!c.types.empty() && c.types.back() == "done") {
    violation(c, "event after done", type);
  }
  c.types.push_back(type);
  if (type == "chat") ++c.chats;
  if (type == "error") {
    c.last_error_code = obj.count("code") ? obj["code"] : "";
    c.last_error_text = obj.count("error") ? obj["error"] : "";
  }
  if (type == "done" && obj["done"] != "true") violation(c, "bad done", data.substr(0, 200));
}

void Runner::response_done(Client& c) {
  const auto now = Clock::now();
  c.state = State::idle;
  if (!c.in.empty()) {
    violation(c, "bad response", "bytes after the end of the answer");
    c.conn_close = true;
  }
  if (c.conn_close) close_connection(c);
  if (c.status == 503) {
    ++t_.status_503;
    c.state = State::waiting_retry;
    c.retry_at = now + Ms(static_cast<long long>(c.retry_after_s * 1000));
    c.retry = true;  // the same request again, after Retry-After
    if (stopping_) c.state = State::finished;
    return;
  }
  if (c.status != 200) {
    violation(c, "status " + std::to_string(c.status), c.body.substr(0, 200));
    next_or_finish(c);
    return;
  }
  if (!c.event_stream) {
    violation(c, "not a stream", "Content-Type is not text/event-stream");
    next_or_finish(c);
    return;
  }
  if (!c.sse_line_buf.empty() || c.has_data) {
    violation(c, "truncated", "the body ended inside an event");
  }
  const auto& ty = c.types;
  const auto count = [&](const char* name) { return std::count(ty.begin(), ty.end(), name); };
  const std::string shown = std::to_string(ty.size()) + " events, " + std::to_string(c.chats) +
                            " chat" + (ty.empty() ? "" : ", last " + ty.back());
  bool ok = true;
  if (ty.empty() || ty.back() != "done") {
    violation(c, "no done", shown);
    ok = false;
  } else if (count("done") != 1) {
    violation(c, "done twice", shown);
    ok = false;
  }
  const long errors = count("error");
  if (ok && errors > 0) {
    const bool error_then_done = errors == 1 && ty.size() >= 2 && ty[ty.size() - 2] == "error";
    if (!error_then_done) {
      violation(c, "error not followed by done", shown);
    } else if (c.last_error_code != "shutdown" &&
               !(cfg_.uncoded_shutdown &&
                 c.last_error_text.rfind("Server is shutting down", 0) == 0)) {
      violation(c, "error", "code '" + c.last_error_code + "': " + c.last_error_text);
    } else if (count("chat_end") != 0) {
      violation(c, "shutdown error after chat_end", shown);
    } else {
      ++t_.cut_by_shutdown;
    }
    ok = false;  // not a completed stream either way
  }
  if (ok) {
    const bool complete =
        count("chat_start") == 1 && count("chat_end") == 1 && (c.is_get || c.chats == cfg_.tokens);
    if (!complete) {
      violation(c, "truncated", "done without the whole answer: " + shown);
    } else {
      ++t_.served;
      ++(c.is_get ? t_.served_get : t_.served_post);
      ++c.completed_in_phase[static_cast<std::size_t>(phase_)];
      if (phase_ == cfg_.phases - 1) ++c.final_completed;
    }
  }
  next_or_finish(c);
}

// Called when an answer other than a 503 has ended, however it ended: the
// wait for the next stream starts here.
void Runner::next_or_finish(Client& c) {
  c.state = State::idle;
  c.retry = false;
  if (!c.gap_open) {
    c.gap_start = Clock::now();
    c.gap_open = true;
  }
  if (stopping_ || (phase_ == cfg_.phases - 1 && c.final_completed >= cfg_.final_streams)) {
    c.state = State::finished;
    close_connection(c);
    return;
  }
  if (c.backoff) {
    c.backoff = false;
    c.state = State::waiting_retry;
    c.retry_at = Clock::now() + Ms(100);
    return;
  }
  start_request(c);
}

void Runner::check_phase_served() {
  if (phase_announced_ >= phase_) return;
  for (const Client& c : clients_) {
    if (c.completed_in_phase[static_cast<std::size_t>(phase_)] == 0) return;
  }
  phase_announced_ = phase_;
  std::printf("phase %d: every client served (%.0f ms)\n", phase_,
              ms_between(start_, Clock::now()));
  std::fflush(stdout);
}

int Runner::run() {
  sigset_t mask;
  sigemptyset(&mask);
  sigaddset(&mask, SIGUSR1);
  sigaddset(&mask, SIGINT);
  sigaddset(&mask, SIGTERM);
  sigprocmask(SIG_BLOCK, &mask, nullptr);
  sig_fd_ = ::signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
  ep_ = ::epoll_create1(EPOLL_CLOEXEC);
  if (sig_fd_ < 0 || ep_ < 0) {
    std::perror("signalfd/epoll");
    return 2;
  }
  epoll_event sev{};
  sev.events = EPOLLIN;
  sev.data.u32 = UINT32_MAX;
  ::epoll_ctl(ep_, EPOLL_CTL_ADD, sig_fd_, &sev);

  start_ = Clock::now();
  clients_.resize(static_cast<std::size_t>(cfg_.clients));
  for (int i = 0; i < cfg_.clients; ++i) {
    Client& c = clients_[static_cast<std::size_t>(i)];
    c.id = i;
    c.completed_in_phase.assign(static_cast<std::size_t>(cfg_.phases), 0);
    c.gap_start = start_;
    start_request(c);
  }
  const auto deadline = start_ + std::chrono::duration_cast<Clock::duration>(
                                     std::chrono::duration<double>(cfg_.timeout_s));
  const auto stall =
      std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(cfg_.stall_s));
  std::vector<epoll_event> events(1024);
  bool timed_out = false;
  for (;;) {
    bool all_finished = true;
    for (const Client& c : clients_) all_finished = all_finished && c.state == State::finished;
    if (all_finished) break;
    const auto now = Clock::now();
    if (now >= deadline) {
      timed_out = true;
      break;
    }
    const int n = ::epoll_wait(ep_, events.data(), static_cast<int>(events.size()), 20);
    if (n < 0 && errno != EINTR) {
      std::perror("epoll_wait");
      return 2;
    }
    for (int k = 0; k < n; ++k) {
      if (events[static_cast<std::size_t>(k)].data.u32 == UINT32_MAX) {
        signalfd_siginfo si;
        while (::read(sig_fd_, &si, sizeof si) == static_cast<ssize_t>(sizeof si)) {
          if (si.ssi_signo == SIGUSR1) {
            if (phase_ + 1 < cfg_.phases) {
              ++phase_;
              std::printf("phase %d begins (%.0f ms)\n", phase_, ms_between(start_, Clock::now()));
              std::fflush(stdout);
            }
          } else {
            stopping_ = true;
          }
        }
        continue;
      }
      Client& c = clients_[events[static_cast<std::size_t>(k)].data.u32];
      on_event(c, events[static_cast<std::size_t>(k)].events);
    }
    const auto t = Clock::now();
    for (Client& c : clients_) {
      if (c.state == State::waiting_retry && t >= c.retry_at) {
        start_request(c);
      } else if ((c.state == State::head || c.state == State::body ||
                  c.state == State::connecting) &&
                 t - c.last_byte > stall) {
        violation(c, "stalled", "nothing received for " + std::to_string(cfg_.stall_s) + " s");
        close_connection(c);
        next_or_finish(c);
      } else if (stopping_ && (c.state == State::waiting_retry || c.state == State::idle)) {
        c.state = State::finished;
        close_connection(c);
      }
    }
    check_phase_served();
  }

  const double elapsed_s = ms_between(start_, Clock::now()) / 1000.0;
  if (timed_out) {
    int unfinished = 0;
    for (const Client& c : clients_) unfinished += c.state != State::finished;
    Client dummy;
    dummy.id = -1;
    violation(dummy, "timeout",
              std::to_string(unfinished) + " clients unfinished after " +
                  std::to_string(cfg_.timeout_s) + " s (phase " + std::to_string(phase_) + " of " +
                  std::to_string(cfg_.phases) + ")");
  }
  if (!stopping_) {
    if (phase_ != cfg_.phases - 1) {
      Client dummy;
      dummy.id = -1;
      violation(dummy, "phases", "ended in phase " + std::to_string(phase_));
    }
    for (Client& c : clients_) {
      for (int p = 0; p < cfg_.phases; ++p) {
        if (c.completed_in_phase[static_cast<std::size_t>(p)] == 0) {
          violation(c, "starved", "no stream completed in phase " + std::to_string(p));
        }
      }
    }
  }
  std::vector<double> w = t_.waits_ms;
  std::sort(w.begin(), w.end());
  const auto pct = [&](double q) {
    return w.empty() ? 0.0 : w[std::min(w.size() - 1, static_cast<std::size_t>(q * w.size()))];
  };
  std::printf(
      "rolling_client: clients=%d requests_sent=%llu requests_served=%llu (post=%llu get=%llu) "
      "cut_by_shutdown=%llu client_503=%llu connections=%llu errors=%llu "
      "wait_p50_ms=%.1f wait_p99_ms=%.1f max_wait_ms=%.1f duration_s=%.1f\n",
      cfg_.clients, static_cast<unsigned long long>(t_.requests_sent),
      static_cast<unsigned long long>(t_.served), static_cast<unsigned long long>(t_.served_post),
      static_cast<unsigned long long>(t_.served_get),
      static_cast<unsigned long long>(t_.cut_by_shutdown),
      static_cast<unsigned long long>(t_.status_503),
      static_cast<unsigned long long>(t_.reconnects),
      static_cast<unsigned long long>(t_.violations), pct(0.5), pct(0.99), t_.max_wait_ms,
      elapsed_s);
  for (const auto& kv : t_.by_kind) {
    std::printf("rolling_client: violations[%s]=%llu\n", kv.first.c_str(),
                static_cast<unsigned long long>(kv.second));
  }
  std::fflush(stdout);
  return t_.violations == 0 ? 0 : 1;
}

[[noreturn]] void usage(const char* why) {
  std::fprintf(stderr,
               "rolling_client: %s\nusage: rolling_client --port P [--host 127.0.0.1] "
               "[--clients N] [--tokens K] [--interval-ms M] [--get-every G] [--phases P] "
               "[--final-streams S] [--timeout SECONDS] [--stall SECONDS]\n",
               why);
  std::exit(2);
}

}  // namespace

int main(int argc, char** argv) {
  Config cfg;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--accept-uncoded-shutdown") {
      cfg.uncoded_shutdown = true;
      continue;
    }
    if (i + 1 >= argc) usage(("missing value for " + a).c_str());
    const std::string v = argv[++i];
    if (a == "--host") {
      cfg.host = v;
      continue;
    }
    // The numeric options: where each goes, and its range.
    struct Numeric {
      const char* name;
      int* integer;
      double* real;
      double lo, hi;
    };
    const Numeric numeric[] = {
        {"--port", &cfg.port, nullptr, 1, 65535},
        {"--clients", &cfg.clients, nullptr, 1, 20000},
        {"--tokens", &cfg.tokens, nullptr, 1, 100000},
        {"--interval-ms", &cfg.interval_ms, nullptr, 0, 60000},
        {"--get-every", &cfg.get_every, nullptr, 0, 1000000},
        {"--phases", &cfg.phases, nullptr, 1, 100},
        {"--final-streams", &cfg.final_streams, nullptr, 1, 1000000},
        {"--timeout", nullptr, &cfg.timeout_s, 1, 86400},
        {"--stall", nullptr, &cfg.stall_s, 1, 86400},
    };
    const Numeric* option = nullptr;
    for (const Numeric& n : numeric)
      if (a == n.name) option = &n;
    if (!option) usage(("unknown option " + a).c_str());
    char* end = nullptr;
    const double d = std::strtod(v.c_str(), &end);
    if (v.empty() || *end != '\0' || d < option->lo || d > option->hi)
      usage(("bad value for " + a).c_str());
    if (option->integer) *option->integer = static_cast<int>(d);
    if (option->real) *option->real = d;
  }
  sockaddr_in probe{};
  if (::inet_pton(AF_INET, cfg.host.c_str(), &probe.sin_addr) != 1)
    usage("--host: not an IPv4 address");
  Runner runner(cfg);
  return runner.run();
}
