namespace agentsmithy {

// ===========================================================================
// Events and requests
// ===========================================================================

struct Message {
  std::string role;
  std::string content;
};

struct ChatRequest {
  std::vector<Message> messages;
  nlohmann::json context = nlohmann::json::object();  // {} when absent
  bool stream = true;
  std::string dialog_id;  // the client's, or one the server assigned
};

// The text every stream ends with when the server shuts down under it, and
// the body of the 503 a request gets once the drain has begun. Both also carry
// "code": "shutdown" (see README, "Error codes").
inline constexpr std::string_view kShutdownMessage = "Server is shutting down (graceful shutdown)";

namespace detail {
struct Channel;
struct Core;
class HttpFrontend;
}  // namespace detail
class SignalHook;

}  // namespace agentsmithy
