// Test support for agentsmithy: a server running on its own thread, a raw-socket
// HTTP/SSE client, condition waits and small generator helpers.
//
// Nothing here sleeps in place of a condition: waits poll a condition (every
// millisecond) up to a deadline, and socket reads block in poll() until data,
// EOF or the deadline.
#pragma once

#include <doctest/doctest.h>
#include <httplib.h>
#include <agentsmithy.hpp>

#include <nlohmann/json.hpp>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

namespace test {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;
using namespace std::chrono_literals;

// ---------------------------------------------------------------------------
// Time and waiting
// ---------------------------------------------------------------------------

inline double ms_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}
inline double ms_since(Clock::time_point t0) { return ms_between(t0, Clock::now()); }

// Prints a measured figure (always, so a run shows where time goes).
inline void note(const std::string& what) {
  std::printf("[measure] %s\n", what.c_str());
  std::fflush(stdout);
}

// Polls pred() every `poll` until it holds or `timeout` passes; returns whether
// it held. A bounded wait on a condition, never a sleep standing in for one.
template <class Pred>
bool wait_until(Pred&& pred, milliseconds timeout = 5000ms, milliseconds poll = 1ms) {
  const auto deadline = Clock::now() + timeout;
  for (;;) {
    if (pred()) return true;
    if (Clock::now() >= deadline) return false;
    std::this_thread::sleep_for(poll);
  }
}

// A one-shot latch: wait() blocks (ignoring everything else) until open().
class Gate {
 public:
  void open() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      open_ = true;
    }
    cv_.notify_all();
  }
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    cv_.wait(lock, [&] { return open_; });
  }
  bool is_open() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return open_;
  }

 private:
  mutable std::mutex mutex_;
  std::condition_variable cv_;
  bool open_ = false;
};

// ---------------------------------------------------------------------------
// Logs
// ---------------------------------------------------------------------------

// Collects a server's log records; echoes them to stderr when the environment
// sets AGENTSMITHY_TEST_LOG.
class LogStore {
 public:
  void add(agentsmithy::LogLevel level, const std::string& message) {
    std::lock_guard<std::mutex> lock(mutex_);
    records_.emplace_back(level, message);
    if (echo_)
      std::fprintf(stderr, "  [server log %d] %s\n", static_cast<int>(level), message.c_str());
  }
  bool contains(std::string_view needle,
                agentsmithy::LogLevel at_least = agentsmithy::LogLevel::debug) const {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const auto& r : records_)
      if (static_cast<int>(r.first) >= static_cast<int>(at_least) &&
          r.second.find(needle) != std::string::npos)
        return true;
    return false;
  }
  std::string text() const {
    std::lock_guard<std::mutex> lock(mutex_);
    std::string out;
    for (const auto& r : records_) {
      out += "    [" + std::to_string(static_cast<int>(r.first)) + "] " + r.second + "\n";
    }
    return out;
  }

 private:
  mutable std::mutex mutex_;
  std::vector<std::pair<agentsmithy::LogLevel, std::string>> records_;
  bool echo_ = std::getenv("AGENTSMITHY_TEST_LOG") != nullptr;
};

inline agentsmithy::Logger make_logger(const std::shared_ptr<LogStore>& store) {
  return [store](agentsmithy::LogLevel level, const std::string& message) {
    store->add(level, message);
  };
}

// Options for a test server: an ephemeral port, a short grace period, every
// log record captured.
inline agentsmithy::Options test_options() {
  agentsmithy::Options o;
  o.host = "127.0.0.1";
  o.port = 0;
  o.grace_period = 3000ms;
  o.log_level = agentsmithy::LogLevel::debug;
  // The suite asserts the producer's events exactly; the server's opening
  // `user` event has tests of its own (test_browser_routes.cpp).
  o.user_event = false;
  return o;
}

// ---------------------------------------------------------------------------
// A server on its own thread
// ---------------------------------------------------------------------------

// Runs Server::listen() on a std::thread and waits until it accepts. The
// destructor calls shutdown() and joins (forcing, then aborting the process
// with a message, if listen() never returns, so that a broken server cannot
// hang the suite).
class RunningServer {
 public:
  explicit RunningServer(agentsmithy::Options options = test_options(),
                         const std::function<void(agentsmithy::Server&)>& setup = {})
      : logs(std::make_shared<LogStore>()) {
    if (!options.logger) options.logger = make_logger(logs);
    server_ = std::make_unique<agentsmithy::Server>(std::move(options));
    if (setup) setup(*server_);
    agentsmithy::Server* s = server_.get();
    thread_ = std::thread([this, s] {
      const bool result = s->listen();
      result_.store(result);
      returned_at_ns_.store(Clock::now().time_since_epoch().count());
      returned_.store(true);
    });
    ready_ = server_->wait_until_ready(5000ms);
  }
  ~RunningServer() { stop(); }
  RunningServer(const RunningServer&) = delete;
  RunningServer& operator=(const RunningServer&) = delete;

  agentsmithy::Server& server() { return *server_; }
  agentsmithy::ChatService& chat() { return server_->chat_service(); }
  bool ready() const { return ready_; }
  int port() const { return server_->port(); }

  bool listen_returned() const { return returned_.load(); }
  bool listen_result() const { return result_.load(); }
  Clock::time_point listen_returned_at() const {
    return Clock::time_point(Clock::duration(returned_at_ns_.load()));
  }
  // Waits (without asking for a shutdown) until listen() has returned.
  bool wait_returned(milliseconds timeout) {
    const bool ok = wait_until([&] { return returned_.load(); }, timeout);
    if (ok && thread_.joinable()) thread_.join();
    return ok;
  }
  // shutdown() and join; see the class comment.
  void stop(milliseconds timeout = 20000ms) {
    if (!thread_.joinable()) return;
    server_->shutdown();
    if (!wait_until([&] { return returned_.load(); }, timeout)) {
      std::fprintf(stderr,
                   "RunningServer: listen() did not return %lld ms after shutdown(); "
                   "calling force_shutdown()\nserver log:\n%s",
                   static_cast<long long>(timeout.count()), logs->text().c_str());
      server_->force_shutdown();
      if (!wait_until([&] { return returned_.load(); }, 5000ms)) {
        std::fprintf(stderr, "RunningServer: listen() hangs even after force_shutdown(); abort\n");
        std::fflush(stderr);
        std::_Exit(3);
      }
    }
    thread_.join();
  }
  // stop() and then destroy the Server object.
  void destroy() {
    stop();
    server_.reset();
  }

  std::shared_ptr<LogStore> logs;

 private:
  std::unique_ptr<agentsmithy::Server> server_;
  std::thread thread_;
  bool ready_ = false;
  std::atomic<bool> returned_{false};
  std::atomic<bool> result_{false};
  std::atomic<Clock::rep> returned_at_ns_{0};
};

// ---------------------------------------------------------------------------
// Request bodies
// ---------------------------------------------------------------------------

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

inline std::string lower(std::string s) {
  for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

// ---------------------------------------------------------------------------
// A raw-socket HTTP/1.1 client with an incremental chunked + SSE parser
// ---------------------------------------------------------------------------

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
               const std::vector<std::pair<std::string, std::string>>& headers = {},
               bool keep_alive = false) {
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
  std::vector<std::pair<std::string, std::string>> headers;  // names lower-cased
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
    while (std::getline(in, line)) {
      if (!line.empty() && line.back() == '\r') line.pop_back();
      const auto c = line.find(':');
      if (c == std::string::npos) continue;
      std::string value = line.substr(c + 1);
      while (!value.empty() && value.front() == ' ') value.erase(0, 1);
      headers.emplace_back(lower(line.substr(0, c)), value);
    }
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

// ---------------------------------------------------------------------------
// Checks shared by the test files
// ---------------------------------------------------------------------------

// The rules every stream obeys: 200, SSE, terminating chunk, only JSON events,
// each an object with a string type and the same string dialog_id, done
// exactly once and last with done:true, every error followed at once by done.
inline void check_well_formed_stream(const RawClient& c, const std::string& dialog_id = "") {
  INFO(c.summary());
  CHECK(c.status == 200);
  CHECK(c.terminating_chunk);
  CHECK_FALSE(c.framing_error);
  CHECK(c.malformed.empty());
  CHECK(c.other_lines.empty());
  CHECK(c.bytes_after_end == 0);
  REQUIRE_FALSE(c.events.empty());
  CHECK(c.count("done") == 1);
  CHECK(c.events.back().value("type", std::string()) == "done");
  CHECK(c.events.back().value("done", false) == true);
  const std::string first_id = c.events.front().value("dialog_id", std::string());
  CHECK_FALSE(first_id.empty());
  if (!dialog_id.empty()) CHECK(first_id == dialog_id);
  for (std::size_t i = 0; i < c.events.size(); ++i) {
    const json& e = c.events[i];
    INFO("event " << i << ": " << e.dump());
    REQUIRE(e.is_object());
    CHECK(e.contains("type"));
    CHECK(e["type"].is_string());
    CHECK(e.contains("dialog_id"));
    CHECK(e.value("dialog_id", std::string("<missing>")) == first_id);
    if (e.value("type", std::string()) == "error") {
      CHECK(e.contains("error"));
      CHECK(e["error"].is_string());
      CHECK(i + 1 < c.events.size());
      if (i + 1 < c.events.size()) CHECK(c.events[i + 1].value("type", std::string()) == "done");
    }
  }
}

// A stream that the shutdown ended: well formed, and its last two events are
// the shutdown error and done.
inline void check_ended_by_shutdown(const RawClient& c) {
  check_well_formed_stream(c);
  INFO(c.summary());
  REQUIRE(c.events.size() >= 2);
  const json& err = c.events[c.events.size() - 2];
  CHECK(err.value("type", std::string()) == "error");
  CHECK(err.value("error", std::string()) == std::string(agentsmithy::kShutdownMessage));
  CHECK(c.count("error") == 1);
}

// A request, a health check and a short stream, each answered promptly.
inline void check_still_serving(int port, const char* when) {
  CAPTURE(when);
  const auto t0 = Clock::now();
  RawClient h(port);
  REQUIRE(h.get("/health"));
  CHECK(h.read_response(2000ms));
  CHECK(h.status == 200);
  RawClient s(port);
  REQUIRE(s.post_chat(chat_body("hi")));
  CHECK(s.read_to_eof(2000ms));
  check_well_formed_stream(s);
  const double ms = ms_since(t0);
  CHECK(ms < 1000.0);
}

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

// ---------------------------------------------------------------------------
// Generators
// ---------------------------------------------------------------------------

// A generator that writes one chat event and then blocks on a gate, ignoring
// cancellation (a model call that cannot be interrupted). The state is shared
// so it outlives the test's locals if the server leaves the generator running.
struct StuckState {
  Gate gate;
  std::atomic<int> entered{0};
  std::atomic<int> finished{0};
  std::atomic<int> late_send_true{0};   // sends after the gate that returned true
  std::atomic<int> late_send_false{0};  // ... and false
  std::atomic<int> late_cancelled{0};   // cancelled() true after the gate
};

inline agentsmithy::Generator stuck_generator(std::shared_ptr<StuckState> st) {
  return [st](const agentsmithy::ChatRequest&, agentsmithy::StreamWriter& out) {
    st->entered.fetch_add(1);
    out.chat("before the stall");
    st->gate.wait();
    if (out.cancelled()) st->late_cancelled.fetch_add(1);
    const bool sent = out.chat("after the stall");
    (sent ? st->late_send_true : st->late_send_false).fetch_add(1);
    st->finished.fetch_add(1);
  };
}

// Opens the gate when it goes out of scope (also when a REQUIRE fails) and
// waits a bounded time for the stuck generators to return. Declare it after
// the RunningServer so that it runs first.
struct StuckRelease {
  std::shared_ptr<StuckState> st;
  ~StuckRelease() {
    st->gate.open();
    wait_until([&] { return st->finished.load() >= st->entered.load(); }, 5000ms);
  }
};

// Counts whitespace-separated words.
inline std::size_t word_count(const std::string& s) {
  std::istringstream in(s);
  std::size_t n = 0;
  std::string w;
  while (in >> w) ++n;
  return n;
}

}  // namespace test

// Helpers added for the hostile-client, fault and security tests.
#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>

namespace test {

// ---------------------------------------------------------------------------
// The process: descriptors, threads, memory
// ---------------------------------------------------------------------------

// Open file descriptors of this process (the entries of /proc/self/fd, less
// the one used to list them).
inline std::size_t open_fd_count() {
  DIR* dir = ::opendir("/proc/self/fd");
  if (!dir) return 0;
  std::size_t n = 0;
  while (const dirent* entry = ::readdir(dir)) {
    if (entry->d_name[0] != '.') ++n;
  }
  ::closedir(dir);
  return n > 0 ? n - 1 : 0;
}

// A "Key:   value ..." line of /proc/<pid>/status as a number (kB for Vm*),
// -1 when absent. pid 0: this process.
inline long proc_status(const char* key, pid_t pid = 0) {
  const std::string path =
      pid == 0 ? std::string("/proc/self/status") : "/proc/" + std::to_string(pid) + "/status";
  std::FILE* f = std::fopen(path.c_str(), "r");
  if (!f) return -1;
  char line[256];
  long value = -1;
  const std::size_t len = std::strlen(key);
  while (std::fgets(line, sizeof line, f)) {
    if (std::strncmp(line, key, len) == 0 && line[len] == ':') {
      value = std::strtol(line + len + 1, nullptr, 10);
      break;
    }
  }
  std::fclose(f);
  return value;
}
inline long thread_count(pid_t pid = 0) { return proc_status("Threads", pid); }
inline long vm_rss_kb(pid_t pid = 0) { return proc_status("VmRSS", pid); }

// Threads of a process that runs no server: main's, plus ThreadSanitizer's
// background thread, which it starts with the first pthread_create().
#if defined(__SANITIZE_THREAD__)
inline constexpr long kRuntimeThreads = 1;
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
inline constexpr long kRuntimeThreads = 1;
#else
inline constexpr long kRuntimeThreads = 0;
#endif
#else
inline constexpr long kRuntimeThreads = 0;
#endif
inline const long g_threads_at_start = thread_count();

// Waits (bounded) for threads left by earlier tests (idle pool workers exit
// after 2 s) to be gone, so that a test can take its own baseline. Returns the
// count it settled at.
inline long settle_threads(milliseconds timeout = 5000ms) {
  std::thread([] {}).join();  // ThreadSanitizer's thread, if any, exists from here on
  wait_until([&] { return thread_count() <= g_threads_at_start + kRuntimeThreads; }, timeout);
  return thread_count();
}

// ---------------------------------------------------------------------------
// build/agentsmithy-server as a child process
// ---------------------------------------------------------------------------

// The example server's path: $AGENTSMITHY_SERVER, else build/agentsmithy-server.
inline std::string server_binary() {
  const char* p = std::getenv("AGENTSMITHY_SERVER");
  return p && *p ? p : "build/agentsmithy-server";
}

// Starts the example server with posix_spawn (fork is unsafe in this
// multithreaded process) in a fresh temporary --workdir, with stdout and
// stderr captured by a reader thread. The settings variables of the test's own
// environment are not passed on. The destructor kills (SIGKILL) and reaps a
// child still running and removes the workdir.
class ServerProcess {
 public:
  struct Spec {
    std::vector<std::string> args;                         // after --workdir DIR
    std::vector<std::pair<std::string, std::string>> env;  // set in the child
    std::string dotenv;                                    // WORKDIR/.env when not empty
    bool block_signals = false;  // SIGINT and SIGTERM blocked in the child's initial mask
  };

  explicit ServerProcess(Spec spec) {
    char dir_template[] = "/tmp/agentsmithy-test-XXXXXX";
    if (!::mkdtemp(dir_template)) return;
    workdir = dir_template;
    if (!spec.dotenv.empty()) {
      std::FILE* f = std::fopen((workdir + "/.env").c_str(), "w");
      if (f) {
        std::fputs(spec.dotenv.c_str(), f);
        std::fclose(f);
      }
    }
    std::vector<std::string> argv_s = {server_binary(), "--workdir", workdir};
    argv_s.insert(argv_s.end(), spec.args.begin(), spec.args.end());
    std::vector<std::string> env_s;
    const char* const dropped[] = {
        "SERVER_HOST=",    "SERVER_PORT=",       "LOG_LEVEL=",
        "LOG_FORMAT=",     "AGENTSMITHY_TOKEN=", "OPENAI_BASE_URL=",
        "OPENAI_API_KEY=", "AGENTSMITHY_MODEL=", "AGENTSMITHY_CORS_ORIGINS="};
    for (char** e = environ; *e; ++e) {
      bool drop = false;
      for (const char* d : dropped) drop = drop || std::strncmp(*e, d, std::strlen(d)) == 0;
      for (const auto& kv : spec.env)
        drop = drop || std::strncmp(*e, (kv.first + "=").c_str(), kv.first.size() + 1) == 0;
      if (!drop) env_s.emplace_back(*e);
    }
    for (const auto& kv : spec.env) env_s.push_back(kv.first + "=" + kv.second);
    std::vector<char*> argv_p, env_p;
    for (auto& a : argv_s) argv_p.push_back(a.data());
    argv_p.push_back(nullptr);
    for (auto& e : env_s) env_p.push_back(e.data());
    env_p.push_back(nullptr);

    int out[2];
    if (::pipe2(out, O_CLOEXEC) != 0) return;
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_adddup2(&actions, out[1], 1);
    posix_spawn_file_actions_adddup2(&actions, out[1], 2);
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 34))
    // Sockets of servers running in this process are not all close-on-exec.
    posix_spawn_file_actions_addclosefrom_np(&actions, 3);
#endif
    posix_spawnattr_t attr;
    posix_spawnattr_init(&attr);
    sigset_t mask, defaults;
    sigemptyset(&mask);
    if (spec.block_signals) {
      sigaddset(&mask, SIGINT);
      sigaddset(&mask, SIGTERM);
    }
    sigemptyset(&defaults);
    sigaddset(&defaults, SIGINT);
    sigaddset(&defaults, SIGTERM);
    sigaddset(&defaults, SIGPIPE);
    posix_spawnattr_setsigmask(&attr, &mask);
    posix_spawnattr_setsigdefault(&attr, &defaults);
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
    const int rc = ::posix_spawn(&pid_, argv_p[0], &actions, &attr, argv_p.data(), env_p.data());
    posix_spawn_file_actions_destroy(&actions);
    posix_spawnattr_destroy(&attr);
    ::close(out[1]);
    if (rc != 0) {
      spawn_error = std::strerror(rc);
      pid_ = -1;
      ::close(out[0]);
      return;
    }
    reader_ = std::thread([this, fd = out[0]] {
      char buf[4096];
      for (;;) {
        const ssize_t n = ::read(fd, buf, sizeof buf);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        std::lock_guard<std::mutex> lock(mutex_);
        output_.append(buf, static_cast<std::size_t>(n));
      }
      ::close(fd);
    });
  }
  ~ServerProcess() {
    if (pid_ > 0 && !reaped_) {
      ::kill(pid_, SIGKILL);
      int st = 0;
      while (::waitpid(pid_, &st, 0) < 0 && errno == EINTR) {
      }
    }
    if (reader_.joinable()) reader_.join();
    if (!workdir.empty()) {
      ::unlink((workdir + "/.env").c_str());
      ::rmdir(workdir.c_str());
    }
  }
  ServerProcess(const ServerProcess&) = delete;
  ServerProcess& operator=(const ServerProcess&) = delete;

  bool started() const { return pid_ > 0; }
  pid_t pid() const { return pid_; }
  bool signal(int sig) const { return pid_ > 0 && !reaped_ && ::kill(pid_, sig) == 0; }

  std::string output() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return output_;
  }
  std::size_t count(std::string_view needle) const {
    const std::string out = output();
    std::size_t n = 0;
    for (std::size_t p = out.find(needle); p != std::string::npos; p = out.find(needle, p + 1)) ++n;
    return n;
  }
  bool wait_for_output(std::string_view needle, milliseconds timeout = 5000ms) const {
    return wait_until([&] { return count(needle) > 0; }, timeout);
  }
  // The port from the "ready on HOST:PORT" log line; -1 if it does not come.
  int wait_ready(milliseconds timeout = 5000ms) const {
    if (!wait_until([&] { return count("ready on ") > 0 || exited_now(); }, timeout)) return -1;
    const std::string out = output();
    const auto p = out.find("ready on ");
    if (p == std::string::npos) return -1;
    const auto eol = out.find('\n', p);
    const std::string line = out.substr(p, eol == std::string::npos ? std::string::npos : eol - p);
    const auto colon = line.rfind(':');
    if (colon == std::string::npos) return -1;
    return std::atoi(line.c_str() + colon + 1);
  }
  // Reaps the child if it has exited within `timeout`.
  bool wait_exit(milliseconds timeout = 5000ms) {
    const bool ok = wait_until([&] { return exited_now(); }, timeout);
    if (ok && reader_.joinable()) reader_.join();  // the pipe closes with the child
    return ok;
  }
  bool exited() const { return reaped_ && WIFEXITED(status_); }
  int exit_code() const { return exited() ? WEXITSTATUS(status_) : -1; }
  bool signaled() const { return reaped_ && WIFSIGNALED(status_); }
  int term_signal() const { return signaled() ? WTERMSIG(status_) : 0; }
  Clock::time_point exited_at() const { return exited_at_; }
  std::string describe() const {
    if (!reaped_) return "still running";
    if (exited()) return "exit status " + std::to_string(exit_code());
    if (signaled())
      return std::string("killed by signal ") + std::to_string(term_signal()) + " (" +
             ::strsignal(term_signal()) + ")";
    return "status " + std::to_string(status_);
  }

  std::string workdir;
  std::string spawn_error;

 private:
  bool exited_now() const {
    if (reaped_) return true;
    if (pid_ <= 0) return false;
    int st = 0;
    const pid_t r = ::waitpid(pid_, &st, WNOHANG);
    if (r == pid_) {
      reaped_ = true;
      status_ = st;
      exited_at_ = Clock::now();
    }
    return reaped_;
  }

  pid_t pid_ = -1;
  mutable bool reaped_ = false;
  mutable int status_ = 0;
  mutable Clock::time_point exited_at_{};
  mutable std::mutex mutex_;
  std::string output_;
  std::thread reader_;
};

}  // namespace test
