// agentsmithy.hpp - an embeddable AI-chat HTTP server that streams Server-Sent
// Events and shuts down gracefully.
//
// Single header. The core depends on cpp-httplib 0.11 (compile and link with
// `pkg-config --cflags --libs cpp-httplib`), nlohmann_json and POSIX/Linux.
// Optional parts, each behind a macro defined before the include, as
// cpp-httplib does with CPPHTTPLIB_OPENSSL_SUPPORT:
//   AGENTSMITHY_OPENAI_SUPPORT   openai_generator (links libcurl 7.87+)
//   AGENTSMITHY_SQLITE_SUPPORT   sqlite_store (links libsqlite3)
//
//   agentsmithy::Server server;                       // 127.0.0.1:8765
//   server.chat_service().set_generator(my_llm);      // or keep the demo
//   auto hook = agentsmithy::install_signal_handlers(server);
//   server.listen();                                  // returns after the drain
//
// This file is made by tools/amalgamate.py from include/agentsmithy.hpp and
// the parts under include/agentsmithy/ (`make amalgamate`). Edit the parts.
//
// Layout, in the order of the includes below: the public API (declarations
// only); the building blocks in namespace detail (logging, the event loop,
// SSE framing, request parsing, metrics, the lifecycle); one request's path
// through the server (channels and the stream hub, the worker pool, the
// waiting room, the cpp-httplib adapter and the HTTP front end); the server
// and its shutdown sequence (server/server.hpp); the signal hook; the
// built-in demo and the OpenAI upstream, which use only the public API.
#pragma once

#ifdef AGENTSMITHY_OPENAI_SUPPORT
#include <curl/curl.h>
#endif
#ifdef AGENTSMITHY_SQLITE_SUPPORT
#include <sqlite3.h>
#endif
#include <httplib.h>

#include <nlohmann/json.hpp>

#include <arpa/inet.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/file.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <deque>
#include <functional>
#include <iostream>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <queue>
#include <random>
#include <regex>
#include <set>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

// The parts, in this order (clang-format must not sort them).
// clang-format off

// The public API: what a host includes this header for.
#include "agentsmithy/api/options.hpp"
#include "agentsmithy/api/chat_request.hpp"
#include "agentsmithy/api/stream_writer.hpp"
#include "agentsmithy/api/dialog_store.hpp"
#include "agentsmithy/api/openai.hpp"
#include "agentsmithy/api/server.hpp"
#include "agentsmithy/api/signal_hook.hpp"

// Building blocks (namespace detail). Nothing below is part of the API.
#include "agentsmithy/detail/common.hpp"
#include "agentsmithy/detail/event_loop.hpp"
#include "agentsmithy/sse/framing.hpp"
#include "agentsmithy/http/chat_request_parser.hpp"
#include "agentsmithy/demo/script.hpp"
#include "agentsmithy/lifecycle/lifecycle.hpp"
#include "agentsmithy/observability/metrics.hpp"
#include "agentsmithy/lifecycle/status_file.hpp"

// Dialogs: the memory store, the history AgentSmithy's clients page through,
// a turn's recording, the REST API.
#include "agentsmithy/dialogs/memory_store.hpp"
#ifdef AGENTSMITHY_SQLITE_SUPPORT
#include "agentsmithy/dialogs/sqlite_store.hpp"
#endif
#include "agentsmithy/dialogs/history.hpp"
#include "agentsmithy/dialogs/turn_log.hpp"
#include "agentsmithy/http/dialogs_api.hpp"

// A chat request's path: its channel and the hub that owns every stream's
// socket; the threads that serve connections and the room where idle ones
// wait; the server's shared state; the HTTP front end on cpp-httplib.
#include "agentsmithy/streams/channel.hpp"
#include "agentsmithy/streams/stream_hub.hpp"
#include "agentsmithy/connections/worker_pool.hpp"
#include "agentsmithy/server/core.hpp"
#include "agentsmithy/dialogs/chat_turns.hpp"
#include "agentsmithy/connections/waiting_room.hpp"
#include "agentsmithy/http/security.hpp"
#include "agentsmithy/http/httplib_adapter.hpp"
#include "agentsmithy/http/frontend.hpp"

// The public API's definitions: the stream writer, the server and its
// shutdown sequence, the signal hook.
#include "agentsmithy/streams/stream_writer.hpp"
#include "agentsmithy/server/server.hpp"
#include "agentsmithy/signals/signal_hook.hpp"

// Producers written against the public API only: the built-in demo, and the
// OpenAI-compatible upstream (AGENTSMITHY_OPENAI_SUPPORT).
#include "agentsmithy/demo/demo.hpp"
#ifdef AGENTSMITHY_OPENAI_SUPPORT
#include "agentsmithy/openai/base_url.hpp"
#include "agentsmithy/openai/sse_parser.hpp"
#include "agentsmithy/openai/chunk_mapper.hpp"
#include "agentsmithy/openai/transfer_loop.hpp"
#include "agentsmithy/openai/generator.hpp"
#endif

// clang-format on
