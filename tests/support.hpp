// Test support for agentsmithy, by topic under tests/support/ (each header
// includes what it needs; this one includes them all):
//
//   base.hpp      the namespace `test`: time, bounded waits, a latch (Gate)
//   server.hpp    log records, test_options(), ListenThread, RunningServer,
//                 with_generator() and with_handler()
//   client.hpp    request bodies, RawClient (raw-socket HTTP + SSE),
//                 http_client(), bind_listener()
//   checks.hpp    the rules every stream obeys; a server still serving
//   fixtures.hpp  servers that many tests set up alike: StuckServer<GraceMs>,
//                 CountingServer, ParkedServer and ParkedStream
//   process.hpp   this process's fds, threads and memory; ServerProcess
//
// Nothing here sleeps in place of a condition: waits poll a condition (every
// millisecond) up to a deadline, and socket reads block in poll() until data,
// EOF or the deadline.
#pragma once

#include "support/base.hpp"
#include "support/checks.hpp"
#include "support/client.hpp"
#include "support/fixtures.hpp"
#include "support/process.hpp"
#include "support/server.hpp"
