// examples/embed.cpp - agentsmithy inside a host program: a Server with its own
// generator runs on a std::thread, the program streams one request to itself,
// then shuts the server down programmatically and joins the thread.
//
// clang-format off
// Build (from the repository root) and run:
//   g++ -std=c++17 -O2 -I. examples/embed.cpp -o embed $(pkg-config --cflags --libs cpp-httplib) -pthread
//   ./embed
// clang-format on
#include "agentsmithy.hpp"

#include <chrono>
#include <iostream>
#include <sstream>
#include <string>
#include <thread>

using namespace std::chrono_literals;

// The generator: the host's model goes here. This one echoes the question word
// by word. It stops as soon as a send fails (client gone or server stopping).
void echo_generator(const agentsmithy::ChatRequest& request, agentsmithy::StreamWriter& out) {
  if (!out.send({{"type", "chat_start"}})) return;
  std::istringstream words("You asked: " + request.messages.back().content);
  for (std::string word; words >> word;) {
    if (!out.chat(word + " ") || !out.sleep_for(10ms)) return;
  }
  out.send({{"type", "chat_end"}});
}  // returning normally: the server appends the final "done" event

int main() {
  agentsmithy::Options options;
  options.port = 0;  // any free port; server.port() tells which
  agentsmithy::Server server(options);
  server.chat_service().set_generator(echo_generator);
  server.on_shutdown([] { std::cout << "on_shutdown: releasing the host's resources\n"; });

  std::thread serving([&server] { server.listen(); });
  if (!server.wait_until_ready(5s)) {
    std::cerr << "embed: the server did not start\n";
    server.shutdown();
    serving.join();
    return 1;
  }

  // One streaming request, printing each SSE event ("data: <json>\n\n") as it
  // arrives.
  httplib::Client client("127.0.0.1", server.port());
  httplib::Request request;
  request.method = "POST";
  request.path = "/api/chat";
  request.set_header("Content-Type", "application/json");
  request.set_header("Accept", "text/event-stream");
  const nlohmann::json question = {{"role", "user"}, {"content", "What is SSE?"}};
  request.body = nlohmann::json{{"messages", {question}}, {"stream", true}}.dump();
  std::string pending;
  request.content_receiver = [&pending](const char* data, std::size_t size, std::uint64_t,
                                        std::uint64_t) {
    pending.append(data, size);
    for (std::size_t end; (end = pending.find("\n\n")) != std::string::npos;) {
      const std::string event = pending.substr(0, end);
      pending.erase(0, end + 2);
      if (event.compare(0, 6, "data: ") == 0) std::cout << "event: " << event.substr(6) << "\n";
    }
    return true;
  };
  const httplib::Result result = client.send(request);
  const bool ok = result && result->status == 200;
  if (!result) std::cerr << "embed: request failed: " << httplib::to_string(result.error()) << "\n";
  if (result && !ok) std::cerr << "embed: request failed with status " << result->status << "\n";

  server.shutdown();  // graceful: drains the streams, runs on_shutdown hooks
  serving.join();     // listen() has returned
  std::cout << "server stopped\n";
  return ok ? 0 : 1;
}
