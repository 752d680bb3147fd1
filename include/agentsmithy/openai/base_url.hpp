namespace agentsmithy {
namespace detail {

// ===========================================================================
// OpenAI upstream: base URL
// ===========================================================================

struct UpstreamUrl {
  bool tls = false;
  std::string host;  // no brackets around IPv6
  int port = 0;
  std::string path;    // prefix + "/chat/completions"
  std::string shown;   // scheme://host:port/prefix, for messages (no credentials)
  std::string target;  // scheme://host:port/path: what libcurl requests
};

inline bool url_host_char(char c) {
  return std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '-' || c == '_';
}

// Splits base_url into its parts and the URL to request; throws std::invalid_argument
// naming the problem. The URL is echoed in messages only when it cannot carry
// credentials (no '@').
inline UpstreamUrl parse_base_url(const std::string& url) {
  const auto fail = [&](const std::string& why) -> UpstreamUrl {
    const bool showable = url.find('@') == std::string::npos && url.size() <= 200;
    throw std::invalid_argument("openai_generator: base_url " +
                                (showable ? "\"" + url + "\" " : std::string()) + why);
  };
  if (url.empty()) return fail("is empty; expected e.g. http://127.0.0.1:8080/v1");
  for (const char c : url) {
    if (static_cast<unsigned char>(c) <= 0x20 || c == 0x7f)
      return fail("contains a space or control character");
  }
  const auto sep = url.find("://");
  if (sep == std::string::npos) return fail("has no scheme; expected http:// or https://");
  std::string scheme = url.substr(0, sep);
  for (auto& c : scheme) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  UpstreamUrl out;
  if (scheme == "https") {
    const curl_version_info_data* curl = curl_version_info(CURLVERSION_NOW);
    if (!curl || !(curl->features & CURL_VERSION_SSL))
      return fail("is https, but libcurl was built without TLS support");
    out.tls = true;
  } else if (scheme != "http") {
    return fail("has scheme \"" + scheme + "\"; use http or https");
  }
  const std::string rest = url.substr(sep + 3);
  const auto path_at = rest.find_first_of("/?#");
  const std::string authority = rest.substr(0, path_at);
  std::string path = path_at == std::string::npos ? std::string() : rest.substr(path_at);
  if (authority.find('@') != std::string::npos)
    return fail("contains credentials (user@host); put the key in api_key instead");
  if (path.find_first_of("?#") != std::string::npos)
    return fail("has a query or fragment; give only scheme, host, port and path");
  std::string port_text;
  if (!authority.empty() && authority.front() == '[') {
    const auto close = authority.find(']');
    if (close == std::string::npos) return fail("has an unterminated IPv6 address");
    out.host = authority.substr(1, close - 1);
    if (out.host.empty() ||
        out.host.find_first_not_of("0123456789abcdefABCDEF:.") != std::string::npos)
      return fail("has an invalid IPv6 address");
    const std::string after = authority.substr(close + 1);
    if (!after.empty() && after.front() != ':') return fail("has junk after the IPv6 address");
    if (!after.empty()) port_text = after.substr(1);
    if (after == ":") return fail("has an empty port");
  } else {
    const auto colon = authority.find(':');
    out.host = authority.substr(0, colon);
    if (colon != std::string::npos) {
      port_text = authority.substr(colon + 1);
      if (port_text.empty()) return fail("has an empty port");
    }
    if (out.host.empty()) return fail("has no host");
    for (const char c : out.host) {
      if (!url_host_char(c)) return fail("has an invalid host name");
    }
  }
  out.port = out.tls ? 443 : 80;
  if (!port_text.empty()) {
    if (port_text.size() > 5 || port_text.find_first_not_of("0123456789") != std::string::npos)
      return fail("has an invalid port \"" + port_text + "\"");
    out.port = std::stoi(port_text);
    if (out.port < 1 || out.port > 65535) return fail("has port " + port_text + " out of range");
  }
  while (!path.empty() && path.back() == '/') path.pop_back();
  const bool v6 = out.host.find(':') != std::string::npos;
  out.shown = scheme + "://" + (v6 ? "[" + out.host + "]" : out.host) + ":" +
              std::to_string(out.port) + path;
  out.path = path + "/chat/completions";
  out.target = out.shown + "/chat/completions";
  return out;
}

}  // namespace detail
}  // namespace agentsmithy
