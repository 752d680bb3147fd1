namespace agentsmithy {
namespace detail {

// ===========================================================================
// The adapter to cpp-httplib: the one part that uses its internals
// ===========================================================================

// cpp-httplib parses requests and routes them; the connections are ours.
// To own them this part uses three of cpp-httplib's internals, whose shape
// changed after 0.11 (0.12 and later differ in process_request's signature
// and the Stream interface):
//   - Server::process_and_close_socket(socket_t), a private virtual: every
//     accepted connection comes to HttplibServer::on_connection instead;
//   - Server::process_request(Stream&, bool, bool&, setup), protected: reads
//     and answers one request from our SocketStream;
//   - Server::svr_sock_, protected: the listening socket, for SOMAXCONN and
//     for stopping the accept loop without closing it.
// Hence the check below: another version is a clear error here, not an
// unrelated one deep in this part.
constexpr bool httplib_version_supported(const char* v) {
  return v[0] == '0' && v[1] == '.' && v[2] == '1' && v[3] == '1' && v[4] == '.';
}
static_assert(httplib_version_supported(CPPHTTPLIB_VERSION),
              "agentsmithy supports cpp-httplib 0.11.x only (tested with 0.11.4, Debian 12's "
              "libcpp-httplib-dev): its HTTP front end overrides Server::process_and_close_socket "
              "and calls Server::process_request, internals that changed in later releases");

// cpp-httplib's Server, with the accepted connections and the request
// reading handed to us. Everything else uses its public API.
class HttplibServer : public httplib::Server {
 public:
  // The bound port, or -1 with the reason in `why`: `port` 0 picks a free
  // one; else `port`, `port`+1, ... up to `attempts` ports.
  int bind_port(const std::string& host, int port, int attempts, std::string& why) {
    int bound = -1;
    if (port == 0) {
      errno = 0;
      bound = bind_to_any_port(host);
      if (bound < 0) why = errno != 0 ? std::strerror(errno) : "address not available";
    }
    const int tries = port == 0 ? 0 : std::max(1, attempts);
    for (int i = 0; i < tries && bound < 0 && port + i <= 65535; ++i) {
      errno = 0;
      if (bind_to_port(host, port + i)) {
        bound = port + i;
        break;
      }
      const int err = errno;
      if (i == 0) why = err != 0 ? std::strerror(err) : "address not available";
      if (err != EADDRINUSE) break;  // another port would not help
    }
    if (bound < 0) {
      if (tries > 1) why += " (and the next " + std::to_string(tries - 1) + " ports)";
      return -1;
    }
    listen_fd_ = svr_sock_;
    // The library listens with a backlog of 5: a burst of clients (say,
    // reconnecting after a restart) would lose handshakes to retry timers.
    ::listen(listen_fd_, SOMAXCONN);
    return bound;
  }
  // Makes listen_after_bind() return; the socket is closed by close_listener().
  void stop_accepting() {
    const socket_t sock = svr_sock_.exchange(INVALID_SOCKET);
    if (sock != INVALID_SOCKET) ::shutdown(sock, SHUT_RDWR);  // wakes accept()
  }
  void close_listener() {
    // listen_after_bind() closes the socket itself when accept() fails, and
    // then leaves svr_sock_ set; after stop_accepting() it never does.
    if (listen_fd_ >= 0 && svr_sock_ == INVALID_SOCKET) ::close(listen_fd_);
    listen_fd_ = -1;
  }

 protected:
  // A connection accepted by the library's accept loop, on a thread of its
  // task queue; the callee owns `sock`.
  virtual void on_connection(int sock) = 0;
  // Reads one request from `stream` and answers it through the routes.
  // `client_closes`: the client asked to close after it.
  bool read_and_answer(httplib::Stream& stream, bool close_after, bool& client_closes) {
    return process_request(stream, close_after, client_closes, nullptr);
  }

 private:
  bool process_and_close_socket(socket_t sock) final {
    on_connection(sock);
    return true;
  }
  int listen_fd_ = -1;
};

// A connection's socket as cpp-httplib's request parser sees it. Reads are
// buffered (the parser asks for one byte at a time) and bounded by the read
// timeout; a muted stream swallows the response cpp-httplib writes for a
// chat request, which we answer ourselves once the handler has returned.
class SocketStream final : public httplib::Stream {
 public:
  SocketStream(int fd, const Options& options)
      : fd_(fd), read_timeout_(options.read_timeout), write_timeout_(options.write_timeout) {}

  bool is_readable() const override { return buffered() > 0 || ready(POLLIN, read_budget()); }
  bool is_writable() const override { return muted_ || ready(POLLOUT, write_timeout_); }

  ssize_t read(char* ptr, size_t size) override {
    if (failed_) return -1;
    if (!in_head_ && !body_framed_) return 0;  // see scan_head: no body
    if (buffered() == 0) {
      if (!ready(POLLIN, read_budget())) return fail();  // the deadline passed
      ssize_t n;
      do {
        n = ::recv(fd_, buffer_, sizeof buffer_, 0);
      } while (n < 0 && errno == EINTR);
      if (n <= 0) return n;
      begin_ = 0;
      end_ = static_cast<std::size_t>(n);
    }
    std::size_t take = std::min(size, buffered());
    if (in_head_) {
      // The library would buffer a request line or header of any length.
      for (std::size_t i = 0; i < take; ++i) {
        const char c = buffer_[begin_ + i];
        scan_head(c);
        const bool bare_lf_pair = c == '\n' && last_ == '\n';  // "\n\n" ends it too
        head_end_ = (c == '\r' || c == '\n') ? head_end_ + 1 : 0;
        last_ = c;
        if (head_end_ == 4 || bare_lf_pair) {
          in_head_ = false;
          take = i + 1;
          break;
        }
      }
      head_bytes_ += take;
      if (in_head_ && head_bytes_ > kMaxHeadBytes) return fail();
    }
    std::memcpy(ptr, buffer_ + begin_, take);
    begin_ += take;
    return static_cast<ssize_t>(take);
  }

  ssize_t write(const char* ptr, size_t size) override {
    if (muted_) return static_cast<ssize_t>(size);
    std::size_t sent = 0;
    while (sent < size) {
      if (!ready(POLLOUT, write_timeout_)) return -1;
      const ssize_t n = ::send(fd_, ptr + sent, size - sent, MSG_NOSIGNAL);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return -1;
      sent += static_cast<std::size_t>(n);
    }
    return static_cast<ssize_t>(size);
  }

  void get_remote_ip_and_port(std::string& ip, int& port) const override {
    address_of(&::getpeername, ip, port);
  }
  void get_local_ip_and_port(std::string& ip, int& port) const override {
    address_of(&::getsockname, ip, port);
  }
  socket_t socket() const override { return fd_; }

  std::size_t buffered() const { return end_ - begin_; }
  void set_muted(bool muted) { muted_ = muted; }
  // Starts the clock on a request: all of it must arrive within read_timeout.
  void begin_request() {
    deadline_ = Clock::now() + read_timeout_;
    in_head_ = true;
    head_bytes_ = 0;
    head_end_ = 0;
    last_ = 0;
    body_framed_ = false;
    in_name_ = true;
    name_.clear();
  }
  // A read timed out or the request head was too long: what is left on the
  // connection cannot be told from a next request, so it must close.
  bool failed() const { return failed_; }

 private:
  static constexpr std::size_t kMaxHeadBytes = 16 * 1024;  // request line + headers

  ssize_t fail() {
    failed_ = true;
    return -1;
  }

  // The rule request_without_framing_has_no_body (RFC 9112, 6.3): a request
  // head without Content-Length or Transfer-Encoding has an empty body.
  // cpp-httplib 0.11 would instead read a POST or PATCH body until the
  // connection closes, and answer 400 after the read timeout; Chromium's
  // fetch sends a bodiless PATCH that way. So the head's header names are
  // watched, and a body read after a head without either sees its end.
  void scan_head(char c) {
    if (c == '\n') {
      in_name_ = true;
      name_.clear();
    } else if (in_name_) {
      if (c == ':') {
        in_name_ = false;
        body_framed_ = body_framed_ || name_ == "content-length" || name_ == "transfer-encoding";
      } else if (name_.size() < 20) {
        name_ += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
      } else {
        in_name_ = false;
      }
    }
  }

  std::chrono::milliseconds read_budget() const {
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline_ - Clock::now());
    return std::max(std::chrono::milliseconds(0), std::min(left, read_timeout_));
  }

  bool ready(short events, std::chrono::milliseconds timeout) const {
    pollfd p{fd_, events, 0};
    int n;
    do {
      n = ::poll(&p, 1, static_cast<int>(timeout.count()));
    } while (n < 0 && errno == EINTR);
    return n > 0;
  }

  template <class Query>
  void address_of(Query query, std::string& ip, int& port) const {
    sockaddr_storage addr{};
    socklen_t len = sizeof addr;
    ip.clear();
    port = -1;
    if (query(fd_, reinterpret_cast<sockaddr*>(&addr), &len) != 0) return;
    char text[INET6_ADDRSTRLEN] = {};
    if (addr.ss_family == AF_INET) {
      const auto* in = reinterpret_cast<const sockaddr_in*>(&addr);
      ::inet_ntop(AF_INET, &in->sin_addr, text, sizeof text);
      port = ntohs(in->sin_port);
    } else if (addr.ss_family == AF_INET6) {
      const auto* in6 = reinterpret_cast<const sockaddr_in6*>(&addr);
      ::inet_ntop(AF_INET6, &in6->sin6_addr, text, sizeof text);
      port = ntohs(in6->sin6_port);
    }
    ip = text;
  }

  const int fd_;
  const std::chrono::milliseconds read_timeout_, write_timeout_;
  char buffer_[4096];
  std::size_t begin_ = 0, end_ = 0;
  bool muted_ = false;
  Clock::time_point deadline_ = Clock::now();
  bool in_head_ = false, failed_ = false;
  std::size_t head_bytes_ = 0;
  int head_end_ = 0;  // CR/LF characters in a row, to find the blank line
  char last_ = 0;
  bool body_framed_ = false;  // the head has Content-Length or Transfer-Encoding
  bool in_name_ = true;       // scanning a header line's name
  std::string name_;          // its first characters, lower-cased
};

}  // namespace detail
}  // namespace agentsmithy
