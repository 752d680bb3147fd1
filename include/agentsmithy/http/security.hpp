namespace agentsmithy {
namespace detail {

// ===========================================================================
// Security checks
// ===========================================================================

inline bool is_loopback_host(std::string_view host) {
  return host == "localhost" || host == "::1" || host == "[::1]" || host.rfind("127.", 0) == 0;
}

// A Host header naming this machine's loopback (and, if it has one, our
// port). Anything else reaching a loopback-bound server came through a name
// an attacker controls: DNS rebinding from a web page.
inline bool is_loopback_host_header(std::string_view value, int port) {
  std::string_view name = value, rest;
  if (!value.empty() && value.front() == '[') {
    const std::size_t close = value.find(']');
    if (close == std::string_view::npos) return false;
    name = value.substr(0, close + 1);
    rest = value.substr(close + 1);
  } else if (const std::size_t colon = value.rfind(':'); colon != std::string_view::npos) {
    name = value.substr(0, colon);
    rest = value.substr(colon);
  }
  if (!rest.empty() && rest != ":" + std::to_string(port)) return false;
  std::string lowered(name);
  for (char& c : lowered) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return lowered == "localhost" || lowered == "127.0.0.1" || lowered == "[::1]";
}

// Takes as long for every `given` of a length, whatever it shares with
// `secret`: the token cannot be guessed byte by byte from timings.
inline bool constant_time_equal(std::string_view given, std::string_view secret) {
  unsigned diff = given.size() == secret.size() ? 0u : 1u;
  for (std::size_t i = 0; i < secret.size(); ++i) {
    const unsigned char g = i < given.size() ? static_cast<unsigned char>(given[i]) : 0;
    diff |= g ^ static_cast<unsigned char>(secret[i]);
  }
  return diff == 0;
}

}  // namespace detail
}  // namespace agentsmithy
