namespace agentsmithy {

// ===========================================================================
// OpenAI-compatible upstream
// ===========================================================================

// Where and how openai_generator reaches an OpenAI-compatible
// /chat/completions endpoint: OpenAI, llama.cpp's llama-server, Ollama (/v1),
// vLLM, LM Studio, OpenRouter, DeepSeek.
struct OpenAIOptions {
  // Scheme (http or https), host, optional port and path prefix, e.g.
  // "http://127.0.0.1:8080/v1" or "https://api.openai.com/v1";
  // "/chat/completions" is appended to the path.
  std::string base_url;
  // Sent as "Authorization: Bearer <api_key>"; empty: no header. Never
  // appears in an event, a log line or an exception.
  std::string api_key;
  // The "model" field; empty: left out (llama-server serves one model).
  std::string model;
  // Prepended as a system message when the request has none.
  std::string system_prompt;
  // Merged into the request body (RFC 7386 merge patch: a null removes a
  // field, e.g. {"stream_options": null} for a server that rejects it).
  nlohmann::json extra_body = nlohmann::json::object();
  // Bounds the whole connection setup: DNS lookup, TCP connect and TLS
  // handshake together. A cancellation takes effect at once in every step.
  std::chrono::milliseconds connect_timeout{10000};
  // The longest silence once connected: no byte for this long, prompt
  // processing included, fails the stream.
  std::chrono::milliseconds read_timeout{120000};
  // HTTPS: a PEM bundle of the CAs to trust; empty: the system's store.
  std::string ca_cert_path;
};

// Returns a generator that streams each request from the upstream and maps
// the answer onto AgentSmithy's events: chat_start, chat per content delta,
// reasoning_start / reasoning / reasoning_end, one tool_call per complete
// call, chat_end with finish_reason and usage. Every failure (connect, TLS,
// timeout, HTTP status, an error or invalid chunk in the stream) is one error
// event. When the stream is cancelled (client gone, shutdown) the upstream
// connection is closed at once. The generator is copyable and serves many
// requests at once. Throws std::invalid_argument naming the problem when
// base_url or a timeout is not valid.
//
// Every upstream transfer, of every openai_generator, runs on one libcurl
// event-loop thread, started on first use and gone while no transfer is open;
// the generator's own thread only waits for its transfer to end, and is not
// woken per token. That thread blocks SIGPIPE, so the process needs no SIG_IGN.
//
// Compiled only with AGENTSMITHY_OPENAI_SUPPORT defined before the include
// (and linked with libcurl 7.87+), as cpp-httplib does for
// CPPHTTPLIB_OPENSSL_SUPPORT: the core needs no libcurl.
#ifdef AGENTSMITHY_OPENAI_SUPPORT
Generator openai_generator(OpenAIOptions options);
#else
namespace detail {
template <class T>
inline constexpr bool needs_openai_support = false;
}  // namespace detail
// Without the define, a call fails to compile with this message.
template <class Options = OpenAIOptions>
Generator openai_generator(Options) {
  static_assert(
      detail::needs_openai_support<Options>,
      "openai_generator needs AGENTSMITHY_OPENAI_SUPPORT: #define it before including "
      "agentsmithy.hpp (or link agentsmithy::openai in CMake, pkg-config agentsmithy-openai) "
      "and link libcurl");
  return {};
}
#endif

}  // namespace agentsmithy
