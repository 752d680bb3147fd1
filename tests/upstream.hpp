// A scripted OpenAI-compatible upstream for the openai_generator tests: a
// loopback TCP listener with a thread per connection that reads the request,
// records it, and runs a script that writes the answer exactly as a provider
// (or a broken one) would: any framing, byte by byte or all at once, stalls,
// silence. It records when the peer (our server) closed each connection, so a
// test asserts the cancellation latency instead of assuming it.
//
// Nothing here sleeps in place of a condition: waiting for the peer's close is
// a poll() on the socket.
#pragma once

#include "support.hpp"

#include <sys/stat.h>

#include <cstdlib>
#include <deque>
#include <fstream>
#include <map>

namespace test {

// One chat.completion.chunk with the given delta (and finish_reason).
inline std::string chunk_json(const json& delta, const json& finish_reason = nullptr,
                              const json& extra = json::object()) {
  json c = {{"id", "chatcmpl-1"},
            {"object", "chat.completion.chunk"},
            {"created", 1694268190},
            {"model", "m"},
            {"choices", json::array({{{"index", 0},
                                      {"delta", delta},
                                      {"logprobs", nullptr},
                                      {"finish_reason", finish_reason}}})}};
  for (auto it = extra.begin(); it != extra.end(); ++it) c[it.key()] = it.value();
  return c.dump();
}
inline std::string sse(const std::string& data) { return "data: " + data + "\n\n"; }
inline std::string sse_content(const std::string& text) {
  return sse(chunk_json({{"content", text}}));
}
inline std::string sse_finish(const std::string& reason = "stop") {
  return sse(chunk_json(json::object(), reason));
}
inline std::string sse_usage(int prompt, int completion) {
  return sse(json{{"id", "chatcmpl-1"},
                  {"object", "chat.completion.chunk"},
                  {"choices", json::array()},
                  {"usage",
                   {{"prompt_tokens", prompt},
                    {"completion_tokens", completion},
                    {"total_tokens", prompt + completion}}}}
                 .dump());
}
inline const std::string kSseDone = "data: [DONE]\n\n";

class ScriptedUpstream {
 public:
  struct Request {
    std::string method, path;
    Headers headers;  // names lower-cased
    std::string body;
    std::string header(const std::string& name) const {
      for (const auto& h : headers)
        if (h.first == lower(name)) return h.second;
      return {};
    }
    bool has_header(const std::string& name) const {
      for (const auto& h : headers)
        if (h.first == lower(name)) return true;
      return false;
    }
    json body_json() const { return json::parse(body, nullptr, false); }
  };

  enum class Framing { chunked, close, length };

  // The connection as the script sees it.
  class Conn {
   public:
    Conn(ScriptedUpstream& up, std::size_t index, int fd) : up_(up), index_(index), fd_(fd) {}
    std::size_t index() const { return index_; }
    const Request& request() const { return request_; }
    int fd() const { return fd_; }

    // The status line and headers. Framing::length needs the whole body now.
    bool head(int status = 200, const std::string& content_type = "text/event-stream",
              Framing framing = Framing::chunked, const std::string& length_body = "",
              const std::string& extra_headers = "") {
      framing_ = framing;
      std::string h = "HTTP/1.1 " + std::to_string(status) + " X\r\nContent-Type: " + content_type +
                      "\r\nConnection: close\r\n" + extra_headers;
      if (framing == Framing::chunked) h += "Transfer-Encoding: chunked\r\n";
      if (framing == Framing::length)
        h += "Content-Length: " + std::to_string(length_body.size()) + "\r\n";
      h += "\r\n";
      if (framing == Framing::length) h += length_body;
      return raw(h);
    }
    // Body bytes in one write (one chunk when chunked).
    bool body(std::string_view data) {
      if (data.empty()) return true;
      if (framing_ != Framing::chunked) return raw(data);
      char size[32];
      std::snprintf(size, sizeof size, "%zx\r\n", data.size());
      return raw(std::string(size) + std::string(data) + "\r\n");
    }
    // Body bytes one write (and one chunk) per byte.
    bool body_bytewise(std::string_view data) {
      for (std::size_t i = 0; i < data.size(); ++i)
        if (!body(data.substr(i, 1))) return false;
      return true;
    }
    bool end() { return framing_ != Framing::chunked || raw("0\r\n\r\n"); }
    // One send() of exactly these bytes.
    bool raw(std::string_view data) {
      while (!data.empty()) {
        const ssize_t n = ::send(fd_, data.data(), data.size(), MSG_NOSIGNAL);
        if (n < 0) {
          if (errno == EINTR) continue;
          up_.mark_closed(index_);
          return false;
        }
        data.remove_prefix(static_cast<std::size_t>(n));
      }
      return true;
    }
    // Blocks until the peer closes the connection (recorded) or `timeout`
    // passes; true if it closed.
    bool wait_closed(milliseconds timeout = 20000ms) {
      const auto deadline = Clock::now() + timeout;
      char buf[4096];
      for (;;) {
        const auto left = std::chrono::duration_cast<milliseconds>(deadline - Clock::now()).count();
        if (left < 0) return false;
        pollfd p{fd_, POLLIN | POLLRDHUP, 0};
        const int r = ::poll(&p, 1, static_cast<int>(left) + 1);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) continue;
        const ssize_t n = ::recv(fd_, buf, sizeof buf, MSG_DONTWAIT);
        if (n > 0) continue;  // nothing more is expected; ignore
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) continue;
        up_.mark_closed(index_);
        return true;
      }
    }
    // Writes `piece` every `interval` until the peer closes (or `max` pieces).
    void drip(const std::string& piece, milliseconds interval, int max = 100000) {
      for (int i = 0; i < max; ++i) {
        if (!body(piece)) return;
        if (wait_closed(interval)) return;
      }
    }

   private:
    friend class ScriptedUpstream;
    ScriptedUpstream& up_;
    std::size_t index_;
    int fd_;
    Request request_;
    Framing framing_ = Framing::chunked;
  };

  using Script = std::function<void(Conn&)>;

  // backlog_only: listen with backlog 0 and never accept; one filler
  // connection fills the queue so that later connects hang in SYN_SENT.
  explicit ScriptedUpstream(Script script, bool backlog_only = false) : script_(std::move(script)) {
    listen_fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ::bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
    ::listen(listen_fd_, backlog_only ? 0 : 128);
    socklen_t len = sizeof addr;
    ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&addr), &len);
    port_ = ntohs(addr.sin_port);
    if (backlog_only) {
      filler_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
      ::connect(filler_, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
      return;
    }
    acceptor_ = std::thread([this] { accept_loop(); });
  }
  ~ScriptedUpstream() {
    stopping_ = true;
    ::shutdown(listen_fd_, SHUT_RDWR);
    if (acceptor_.joinable()) acceptor_.join();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (const auto& c : conns_)
        if (c.fd >= 0) ::shutdown(c.fd, SHUT_RDWR);
    }
    for (auto& t : threads_) t.join();
    ::close(listen_fd_);
    if (filler_ >= 0) ::close(filler_);
  }
  ScriptedUpstream(const ScriptedUpstream&) = delete;
  ScriptedUpstream& operator=(const ScriptedUpstream&) = delete;

  int port() const { return port_; }
  std::string url(const std::string& prefix = "/v1") const {
    return "http://127.0.0.1:" + std::to_string(port_) + prefix;
  }

  std::size_t connections() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return conns_.size();
  }
  std::size_t requests() const {
    std::lock_guard<std::mutex> lock(mutex_);
    std::size_t n = 0;
    for (const auto& c : conns_) n += c.has_request ? 1 : 0;
    return n;
  }
  bool wait_requests(std::size_t n, milliseconds timeout = 5000ms) const {
    return wait_until([&] { return requests() >= n; }, timeout);
  }
  Request request(std::size_t i) const {
    std::lock_guard<std::mutex> lock(mutex_);
    return conns_.at(i).request;
  }
  // When the peer closed connection i (nullopt while open).
  std::optional<Clock::time_point> closed_at(std::size_t i) const {
    std::lock_guard<std::mutex> lock(mutex_);
    if (i >= conns_.size() || !conns_[i].closed) return std::nullopt;
    return conns_[i].closed_at;
  }
  bool wait_closed(std::size_t i, milliseconds timeout = 5000ms) const {
    return wait_until([&] { return closed_at(i).has_value(); }, timeout);
  }
  // Times the script noted (e.g. "first byte sent").
  void mark(const std::string& what) {
    std::lock_guard<std::mutex> lock(mutex_);
    marks_[what] = Clock::now();
  }

 private:
  struct ConnState {
    int fd = -1;
    bool has_request = false;
    Request request;
    bool closed = false;
    Clock::time_point closed_at{};
  };

  void mark_closed(std::size_t i) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!conns_[i].closed) {
      conns_[i].closed = true;
      conns_[i].closed_at = Clock::now();
    }
  }

  void accept_loop() {
    for (;;) {
      const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) {
        if (errno == EINTR || errno == ECONNABORTED) continue;
        return;
      }
      if (stopping_) {
        ::close(fd);
        return;
      }
      const int one = 1;
      ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      std::size_t index;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        index = conns_.size();
        conns_.emplace_back();
        conns_.back().fd = fd;
      }
      threads_.emplace_back([this, index, fd] { serve(index, fd); });
    }
  }

  void serve(std::size_t index, int fd) {
    Conn conn(*this, index, fd);
    if (read_request(fd, conn.request_)) {
      {
        std::lock_guard<std::mutex> lock(mutex_);
        conns_[index].has_request = true;
        conns_[index].request = conn.request_;
      }
      if (script_) script_(conn);
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      conns_[index].fd = -1;
    }
    ::shutdown(fd, SHUT_RDWR);
    ::close(fd);
  }

  static bool read_request(int fd, Request& out) {
    std::string raw;
    char buf[8192];
    std::size_t head_end = std::string::npos;
    std::size_t need = 0;
    for (;;) {
      if (head_end == std::string::npos) {
        head_end = raw.find("\r\n\r\n");
        if (head_end != std::string::npos) {
          std::istringstream in(raw.substr(0, head_end));
          std::string line;
          std::getline(in, line);
          std::istringstream first(line);
          first >> out.method >> out.path;
          read_header_lines(in, out.headers);
          const std::string cl = out.header("content-length");
          need = head_end + 4 + (cl.empty() ? 0 : std::stoul(cl));
        }
      }
      if (head_end != std::string::npos && raw.size() >= need) {
        out.body = raw.substr(head_end + 4, need - head_end - 4);
        return true;
      }
      const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return false;
      raw.append(buf, static_cast<std::size_t>(n));
    }
  }

  Script script_;
  int listen_fd_ = -1;
  int filler_ = -1;
  int port_ = 0;
  std::atomic<bool> stopping_{false};
  std::thread acceptor_;
  std::vector<std::thread> threads_;  // touched by the acceptor, then by the destructor
  mutable std::mutex mutex_;
  std::deque<ConnState> conns_;
  std::map<std::string, Clock::time_point> marks_;
};

// A self-signed certificate for 127.0.0.1 and localhost, made with the openssl
// CLI in a fresh temporary directory (removed by the destructor).
struct SelfSignedCert {
  std::string dir, cert, key;
  bool ok = false;
  SelfSignedCert() {
    char tmpl[] = "/tmp/agentsmithy-tls-XXXXXX";
    if (!::mkdtemp(tmpl)) return;
    dir = tmpl;
    cert = dir + "/cert.pem";
    key = dir + "/key.pem";
    const std::string cmd =
        "openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=127.0.0.1"
        " -addext subjectAltName=IP:127.0.0.1,DNS:localhost -keyout " +
        key + " -out " + cert + " >/dev/null 2>&1";
    ok = std::system(cmd.c_str()) == 0;
  }
  ~SelfSignedCert() {
    ::unlink(cert.c_str());
    ::unlink(key.c_str());
    ::rmdir(dir.c_str());
  }
};

}  // namespace test
