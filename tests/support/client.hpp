// Test support: request bodies, a raw-socket HTTP/1.1 client with an
// incremental chunked + SSE parser, an httplib client with short timeouts,
// and a listening socket.
//
// Socket reads block in poll() until data, EOF or the deadline; nothing
// sleeps in place of a condition.
#pragma once

#include "base.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

namespace test {

// HTTP header fields in order, as (name, value).
using Headers = std::vector<std::pair<std::string, std::string>>;

inline json chat_body(const std::string& text, json context = json::object(), bool stream = true) {
  json body = {{"messages", json::array({{{"role", "user"}, {"content", text}}})},
               {"stream", stream}};
  if (!context.empty()) body["context"] = std::move(context);
  return body;
}

// A demo request paced by context.demo.
inline json demo_body(const std::string& text, int tokens, int interval_ms, bool stream = true) {
  return chat_body(text, {{"demo", {{"tokens", tokens}, {"interval_ms", interval_ms}}}}, stream);
}

// Reads "Name: value" lines from `in` up to its end into `headers`, the names
// lower-cased and the values without leading spaces; skips lines without a colon.
inline void read_header_lines(std::istream& in, Headers& headers) {
  std::string line;
  while (std::getline(in, line)) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    const auto c = line.find(':');
    if (c == std::string::npos) continue;
    std::string value = line.substr(c + 1);
    while (!value.empty() && value.front() == ' ') value.erase(0, 1);
    headers.emplace_back(lower(line.substr(0, c)), value);
  }
}

class RawClient {
 public:
  RawClient() = default;
  explicit RawClient(int port) { connect_to(port); }
  ~RawClient() {
    join_background();
    close();
  }
  RawClient(const RawClient&) = delete;
  RawClient& operator=(const RawClient&) = delete;

  // rcvbuf > 0 sets SO_RCVBUF before connecting (a small window: a slow client).
  bool connect_to(int port, int rcvbuf = 0) {
    close();
    fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd_ < 0) return false;
    if (rcvbuf > 0) ::setsockopt(fd_, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<uint16_t>(port));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    for (;;) {
      if (::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0) return true;
      if (errno == EINTR) continue;
      ::close(fd_);
      fd_ = -1;
      return false;
    }
  }
  bool connected() const { return fd_ >= 0; }
  int fd() const { return fd_; }

  // Closes the socket at once: a client that goes away.
  void close() {
    if (fd_ >= 0) {
      ::close(fd_);
      fd_ = -1;
    }
  }
  // Closes with an RST instead of a FIN (SO_LINGER 0).
  void abort() {
    if (fd_ >= 0) {
      linger l{1, 0};
      ::setsockopt(fd_, SOL_SOCKET, SO_LINGER, &l, sizeof l);
      close();
    }
  }

  bool send_all(std::string_view data) {
    while (!data.empty()) {
      const ssize_t n = ::send(fd_, data.data(), data.size(), MSG_NOSIGNAL);
      if (n < 0) {
        if (errno == EINTR) continue;
        return false;
      }
      data.remove_prefix(static_cast<std::size_t>(n));
    }
    return true;
  }

  bool request(const std::string& method, const std::string& path, const std::string& body = "",
               const Headers& headers = {}, bool keep_alive = false) {
    std::string req = method + " " + path + " HTTP/1.1\r\nHost: 127.0.0.1\r\n";
    for (const auto& h : headers) req += h.first + ": " + h.second + "\r\n";
    if (!body.empty() || method == "POST")
      req += "Content-Length: " + std::to_string(body.size()) + "\r\n";
    req += keep_alive ? "Connection: keep-alive\r\n" : "Connection: close\r\n";
    req += "\r\n";
    req += body;
    sent_at = Clock::now();
    return send_all(req);
  }
  bool post_chat(const json& body, bool keep_alive = false) {
    return post_raw(body.dump(), keep_alive);
  }
  bool post_raw(const std::string& body, bool keep_alive = false) {
    return request("POST", "/api/chat", body,
                   {{"Content-Type", "application/json"}, {"Accept", "text/event-stream"}},
                   keep_alive);
  }
  bool get(const std::string& path, bool keep_alive = false) {
    return request("GET", path, "", {}, keep_alive);
  }

  // Reads whatever arrives until pred() holds, the peer closes, or the timeout
  // passes. Returns pred().
  template <class Pred>
  bool read_until(Pred&& pred, milliseconds timeout = 5000ms) {
    const auto deadline = Clock::now() + timeout;
    char buf[65536];
    for (;;) {
      if (pred()) return true;
      if (eof || fd_ < 0) return pred();
      const auto now = Clock::now();
      if (now >= deadline) return false;
      const auto left = std::chrono::duration_cast<milliseconds>(deadline - now).count() + 1;
      pollfd p{fd_, POLLIN, 0};
      const int r = ::poll(&p, 1, static_cast<int>(left));
      if (r < 0) {
        if (errno == EINTR) continue;
        return pred();
      }
      if (r == 0) continue;
      const ssize_t n = ::recv(fd_, buf, sizeof buf, 0);
      if (n < 0) {
        if (errno == EINTR || errno == EAGAIN) continue;
        reset = true;
        on_eof();
        continue;
      }
      if (n == 0) {
        on_eof();
        continue;
      }
      feed(std::string_view(buf, static_cast<std::size_t>(n)));
    }
  }
  bool read_headers(milliseconds timeout = 5000ms) {
    return read_until([&] { return headers_done; }, timeout);
  }
  bool read_response(milliseconds timeout = 5000ms) {
    return read_until([&] { return complete; }, timeout);
  }
  bool read_to_eof(milliseconds timeout = 5000ms) {
    return read_until([&] { return eof; }, timeout);
  }
  bool read_events(std::size_t n, milliseconds timeout = 5000ms) {
    return read_until([&] { return events.size() >= n; }, timeout);
  }
  bool read_count(const std::string& type, std::size_t n, milliseconds timeout = 5000ms) {
    return read_until([&] { return count(type) >= n; }, timeout);
  }

  // Reads to EOF on a thread of its own; progress is visible through the
  // atomics below, the full state after join_background().
  void start_background_read(milliseconds timeout = 20000ms) {
    background_ = std::thread([this, timeout] {
      read_to_eof(timeout);
      background_done.store(true);
    });
  }
  void join_background() {
    if (background_.joinable()) background_.join();
  }

  // Prepares for the next response on the same (keep-alive) connection.
  void next_response() {
    status = 0;
    reason.clear();
    headers.clear();
    headers_done = chunked = complete = terminating_chunk = false;
    content_length.reset();
    body.clear();
    events.clear();
    event_times.clear();
    comments.clear();
    malformed.clear();
    other_lines.clear();
    sse_buffer_.clear();
    data_.clear();
    has_data_ = false;
    n_events.store(0);
    saw_done.store(false);
    parse();
  }

  // ---- what was received ----
  int status = 0;
  std::string version, reason;
  Headers headers;  // names lower-cased
  bool headers_done = false;
  bool chunked = false;
  std::optional<std::size_t> content_length;
  bool complete = false;           // the whole body (terminating chunk, length or EOF)
  bool terminating_chunk = false;  // the zero-length chunk arrived
  bool eof = false;                // the peer closed
  bool reset = false;              // ... with an error (RST)
  bool framing_error = false;
  std::size_t bytes_after_end = 0;  // bytes after a complete response (not reset by next_response)
  std::string body;                 // decoded
  std::vector<json> events;
  std::vector<Clock::time_point> event_times;
  std::vector<std::string> comments;   // SSE comment lines (": ping")
  std::vector<std::string> malformed;  // data: payloads that were not JSON
  std::vector<std::string>
      other_lines;                   // lines that are neither data:, id:, retry:, comment nor blank
  std::vector<std::string> ids;      // id: values, in order
  std::vector<std::string> retries;  // retry: values
  Clock::time_point sent_at{}, headers_at{}, complete_at{}, eof_at{}, done_at{};
  std::atomic<std::size_t> n_events{0};
  std::atomic<bool> saw_done{false};
  std::atomic<bool> background_done{false};

  std::string header(const std::string& name) const {
    const std::string n = lower(name);
    for (const auto& h : headers)
      if (h.first == n) return h.second;
    return {};
  }
  bool has_header(const std::string& name) const {
    const std::string n = lower(name);
    for (const auto& h : headers)
      if (h.first == n) return true;
    return false;
  }
  std::vector<std::string> types() const {
    std::vector<std::string> out;
    for (const auto& e : events) out.push_back(e.value("type", std::string("<no type>")));
    return out;
  }
  std::size_t count(const std::string& type) const {
    std::size_t n = 0;
    for (const auto& e : events)
      if (e.is_object() && e.value("type", std::string()) == type) ++n;
    return n;
  }
  std::string joined_chat() const {
    std::string out;
    for (const auto& e : events)
      if (e.is_object() && e.value("type", std::string()) == "chat")
        out += e.value("content", std::string());
    return out;
  }
  json body_json() const { return json::parse(body, nullptr, false); }
  std::size_t ping_count() const {
    std::size_t n = 0;
    for (const auto& c : comments)
      if (c == ": ping") ++n;
    return n;
  }

  // A description for failure messages.
  std::string summary() const {
    std::ostringstream s;
    s << "status=" << status << " headers_done=" << headers_done << " chunked=" << chunked
      << " complete=" << complete << " terminating_chunk=" << terminating_chunk << " eof=" << eof
      << " reset=" << reset << " framing_error=" << framing_error
      << " bytes_after_end=" << bytes_after_end << " events=" << events.size()
      << " comments=" << comments.size() << " malformed=" << malformed.size()
      << " other_lines=" << other_lines.size() << "\n  headers:";
    for (const auto& h : headers) s << " [" << h.first << ": " << h.second << "]";
    s << "\n  types:";
    const auto t = types();
    for (std::size_t i = 0; i < t.size(); ++i) {
      if (t.size() > 14 && i == 6) {
        s << " ... (" << (t.size() - 12) << " more)";
        i = t.size() - 6;
      }
      s << " " << t[i];
    }
    if (!events.empty()) s << "\n  last event: " << events.back().dump();
    if (events.size() >= 2) s << "\n  before it: " << events[events.size() - 2].dump();
    if (!malformed.empty()) s << "\n  first malformed: " << malformed.front();
    if (!other_lines.empty()) s << "\n  first other line: " << other_lines.front();
    if (!content_length && !chunked && body.size() < 2000) s << "\n  body: " << body;
    if (content_length && body.size() < 2000) s << "\n  body: " << body;
    return s.str();
  }

 private:
  void on_eof() {
    eof = true;
    eof_at = Clock::now();
    if (headers_done && !complete && !chunked && !content_length) {
      complete = true;  // a body delimited by the end of the connection
      complete_at = eof_at;
    }
  }

  void feed(std::string_view data) {
    raw_.append(data.data(), data.size());
    parse();
  }

  void parse() {
    for (;;) {
      if (!headers_done) {
        const auto p = raw_.find("\r\n\r\n");
        if (p == std::string::npos) return;
        parse_head(raw_.substr(0, p));
        raw_.erase(0, p + 4);
        headers_done = true;
        headers_at = Clock::now();
        chunked = lower(header("transfer-encoding")).find("chunked") != std::string::npos;
        if (!chunked && has_header("content-length"))
          content_length = static_cast<std::size_t>(std::stoull(header("content-length")));
        if ((content_length && *content_length == 0) || status == 204 || status == 304) {
          complete = true;
          complete_at = headers_at;
        }
        is_sse_ = lower(header("content-type")).rfind("text/event-stream", 0) == 0;
        continue;
      }
      if (complete) {
        bytes_after_end += raw_.size();
        raw_.clear();
        return;
      }
      if (chunked) {
        const auto p = raw_.find("\r\n");
        if (p == std::string::npos) return;
        std::string line = raw_.substr(0, p);
        const auto semi = line.find(';');
        if (semi != std::string::npos) line.resize(semi);
        std::size_t size = 0;
        try {
          std::size_t used = 0;
          size = std::stoull(line, &used, 16);
          if (used != line.size()) throw std::invalid_argument(line);
        } catch (...) {
          framing_error = true;
          complete = true;
          complete_at = Clock::now();
          continue;
        }
        if (size == 0) {
          std::size_t end;
          if (raw_.compare(p + 2, 2, "\r\n") == 0) {
            end = p + 4;
          } else {
            const auto q = raw_.find("\r\n\r\n", p + 2);  // trailers
            if (q == std::string::npos) return;
            end = q + 4;
          }
          if (raw_.size() < end) return;
          raw_.erase(0, end);
          terminating_chunk = true;
          complete = true;
          complete_at = Clock::now();
          continue;
        }
        if (raw_.size() < p + 2 + size + 2) return;
        if (raw_.compare(p + 2 + size, 2, "\r\n") != 0) framing_error = true;
        feed_body(std::string_view(raw_).substr(p + 2, size));
        raw_.erase(0, p + 2 + size + 2);
        continue;
      }
      if (content_length) {
        const std::size_t take = std::min(*content_length - body.size(), raw_.size());
        feed_body(std::string_view(raw_).substr(0, take));
        raw_.erase(0, take);
        if (body.size() == *content_length) {
          complete = true;
          complete_at = Clock::now();
          continue;
        }
        return;
      }
      feed_body(raw_);  // delimited by EOF
      raw_.clear();
      return;
    }
  }

  void parse_head(const std::string& head) {
    std::istringstream in(head);
    std::string line;
    std::getline(in, line);
    if (!line.empty() && line.back() == '\r') line.pop_back();
    {
      std::istringstream sl(line);
      sl >> version >> status;
      std::getline(sl, reason);
      if (!reason.empty() && reason.front() == ' ') reason.erase(0, 1);
    }
    read_header_lines(in, headers);
  }

  void feed_body(std::string_view s) {
    body.append(s.data(), s.size());
    if (!is_sse_) return;
    sse_buffer_.append(s.data(), s.size());
    std::size_t pos;
    while ((pos = sse_buffer_.find('\n')) != std::string::npos) {
      std::string line = sse_buffer_.substr(0, pos);
      sse_buffer_.erase(0, pos + 1);
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (line.empty()) {
        if (has_data_) dispatch();
      } else if (line[0] == ':') {
        comments.push_back(line);
      } else if (line.rfind("data:", 0) == 0) {
        std::string v = line.substr(5);
        if (!v.empty() && v[0] == ' ') v.erase(0, 1);
        if (has_data_) data_ += '\n';
        data_ += v;
        has_data_ = true;
      } else if (line.rfind("id: ", 0) == 0) {  // the GET route (EventSource)
        ids.push_back(line.substr(4));
      } else if (line.rfind("retry: ", 0) == 0) {
        retries.push_back(line.substr(7));
      } else {
        other_lines.push_back(line);
      }
    }
  }

  void dispatch() {
    json e = json::parse(data_, nullptr, false);
    if (e.is_discarded()) {
      malformed.push_back(data_);
    } else {
      const auto now = Clock::now();
      const bool is_done = e.is_object() && e.value("type", std::string()) == "done";
      events.push_back(std::move(e));
      event_times.push_back(now);
      if (is_done && !saw_done.load()) {
        done_at = now;
        saw_done.store(true);
      }
      n_events.store(events.size());
    }
    data_.clear();
    has_data_ = false;
  }

  int fd_ = -1;
  std::string raw_;
  bool is_sse_ = false;
  std::string sse_buffer_;
  std::string data_;
  bool has_data_ = false;
  std::thread background_;
};

// An httplib client with short timeouts.
inline std::unique_ptr<httplib::Client> http_client(int port) {
  auto c = std::make_unique<httplib::Client>("127.0.0.1", port);
  c->set_connection_timeout(3, 0);
  c->set_read_timeout(5, 0);
  c->set_write_timeout(5, 0);
  return c;
}

// Binds a listening TCP socket to 127.0.0.1:port (0: any), without
// SO_REUSEPORT; returns the fd (or -1) and the bound port.
inline int bind_listener(int port, int* bound_port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 || ::listen(fd, 16) != 0) {
    ::close(fd);
    return -1;
  }
  socklen_t len = sizeof addr;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  if (bound_port) *bound_port = ntohs(addr.sin_port);
  return fd;
}

}  // namespace test
