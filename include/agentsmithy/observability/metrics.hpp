namespace agentsmithy {
namespace detail {

// ===========================================================================
// Metrics: what GET /metrics reports, in Prometheus' text format
// ===========================================================================

// A histogram whose observations are seconds; counts are cumulative when
// rendered. Lock-free: observe() is called on the streams' hot paths.
class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds)
      : bounds_(std::move(bounds)), counts_(bounds_.size() + 1) {}

  void observe(Clock::duration d) {
    const double seconds = std::chrono::duration<double>(d).count();
    std::size_t i = 0;
    while (i < bounds_.size() && seconds > bounds_[i]) ++i;
    counts_[i].fetch_add(1, std::memory_order_relaxed);
    sum_ns_.fetch_add(static_cast<std::uint64_t>(std::max<Clock::rep>(
                          0, std::chrono::duration_cast<std::chrono::nanoseconds>(d).count())),
                      std::memory_order_relaxed);
  }

  void render(std::string& out, const std::string& name, const std::string& help) const {
    out += "# HELP " + name + " " + help + "\n# TYPE " + name + " histogram\n";
    std::uint64_t cumulative = 0;
    for (std::size_t i = 0; i <= bounds_.size(); ++i) {
      cumulative += counts_[i].load(std::memory_order_relaxed);
      std::string le = "+Inf";
      if (i < bounds_.size()) {
        char buf[32];
        std::snprintf(buf, sizeof buf, "%g", bounds_[i]);
        le = buf;
      }
      out += name + "_bucket{le=\"" + le + "\"} " + std::to_string(cumulative) + "\n";
    }
    char sum[48];
    std::snprintf(sum, sizeof sum, "%.9g", static_cast<double>(sum_ns_.load()) / 1e9);
    out += name + "_sum " + sum + "\n" + name + "_count " + std::to_string(cumulative) + "\n";
  }

 private:
  const std::vector<double> bounds_;
  std::vector<std::atomic<std::uint64_t>> counts_;
  std::atomic<std::uint64_t> sum_ns_{0};
};

// How a chat request ended, for agentsmithy_streams_ended_total.
enum class Outcome {
  completed,
  client_gone,
  shutdown,
  error,
  rejected_capacity,
  rejected_stopping
};
inline constexpr const char* kOutcomeNames[] = {
    "completed", "client_gone", "shutdown", "error", "rejected_capacity", "rejected_stopping"};

struct Metrics {
  std::atomic<std::uint64_t> ended[6] = {};
  std::atomic<std::uint64_t> events_sent{0};
  std::atomic<std::uint64_t> bytes_sent{0};
  Histogram duration{{0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600}};
  Histogram first_event{{0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30}};
  // The last drain (a Server drains once; an embedder may scrape after it).
  std::atomic<bool> drained_once{false};
  std::atomic<std::int64_t> drain_ms{0};
  std::atomic<std::uint64_t> drain_notified{0};
  std::atomic<std::uint64_t> drain_closed{0};

  // Where each metric is counted: the count_* functions below, called from
  // the stream hub (streams, events, bytes), the HTTP front end (requests,
  // refusals) and the shutdown sequence (the last drain).
  void count_end(Outcome outcome) {
    ended[static_cast<int>(outcome)].fetch_add(1, std::memory_order_relaxed);
  }
  void count_stream_end(Outcome outcome, Clock::duration lasted) {
    count_end(outcome);
    duration.observe(lasted);
  }
  void count_first_event(Clock::duration after) { first_event.observe(after); }
  void count_events_sent(std::uint64_t n) { events_sent.fetch_add(n, std::memory_order_relaxed); }
  void count_bytes_sent(std::uint64_t n) { bytes_sent.fetch_add(n, std::memory_order_relaxed); }
  void count_drain(std::chrono::milliseconds took, std::uint64_t notified, std::uint64_t closed) {
    drain_ms = took.count();
    drain_notified = notified;
    drain_closed = closed;
    drained_once = true;
  }

  // Requests by route (a fixed set, so that odd paths cannot grow it) and status.
  void count_request(const std::string& route, int status) {
    std::lock_guard<std::mutex> lock(requests_mu);
    ++requests[{route, status}];
  }

  // `now`: the lifecycle's phase (see Lifecycle); `store_errors`: the dialog
  // store's failures (StoreHealth counts them).
  std::string render(std::size_t active, Phase now, std::uint64_t store_errors = 0) const {
    std::string out;
    const auto gauge = [&](const std::string& name, const std::string& help) {
      out += "# HELP " + name + " " + help + "\n# TYPE " + name + " gauge\n";
    };
    const auto counter = [&](const std::string& name, const std::string& help) {
      out += "# HELP " + name + " " + help + "\n# TYPE " + name + " counter\n";
    };
    gauge("agentsmithy_streams_active", "Chat requests in flight whose client is connected.");
    out += "agentsmithy_streams_active " + std::to_string(active) + "\n";
    counter("agentsmithy_streams_ended_total", "Chat requests ended, by outcome.");
    for (int i = 0; i < 6; ++i) {
      out += std::string("agentsmithy_streams_ended_total{outcome=\"") + kOutcomeNames[i] + "\"} " +
             std::to_string(ended[i].load()) + "\n";
    }
    counter("agentsmithy_http_requests_total", "HTTP requests answered, by route and status.");
    {
      std::lock_guard<std::mutex> lock(requests_mu);
      for (const auto& [key, count] : requests) {
        out += "agentsmithy_http_requests_total{route=\"" + key.first + "\",status=\"" +
               std::to_string(key.second) + "\"} " + std::to_string(count) + "\n";
      }
    }
    counter("agentsmithy_events_sent_total", "SSE events written to streams.");
    out += "agentsmithy_events_sent_total " + std::to_string(events_sent.load()) + "\n";
    counter("agentsmithy_sent_bytes_total", "Bytes of stream responses written to clients.");
    out += "agentsmithy_sent_bytes_total " + std::to_string(bytes_sent.load()) + "\n";
    duration.render(out, "agentsmithy_stream_duration_seconds",
                    "Time from a stream's admission to its end.");
    first_event.render(out, "agentsmithy_stream_first_event_seconds",
                       "Time from a stream's admission to its producer's first event.");
    counter("agentsmithy_store_errors_total", "Dialog store operations that failed.");
    out += "agentsmithy_store_errors_total " + std::to_string(store_errors) + "\n";
    gauge("agentsmithy_lifecycle_state", "The server's lifecycle state (1 for the current one).");
    for (const Phase s :
         {Phase::starting, Phase::ready, Phase::lame_duck, Phase::draining, Phase::stopped}) {
      out += std::string("agentsmithy_lifecycle_state{state=\"") + phase_name(s) + "\"} " +
             (s == now ? "1" : "0") + "\n";
    }
    if (drained_once) {
      char secs[32];
      std::snprintf(secs, sizeof secs, "%.3f", static_cast<double>(drain_ms.load()) / 1000.0);
      gauge("agentsmithy_last_drain_duration_seconds", "How long the last drain took.");
      out += std::string("agentsmithy_last_drain_duration_seconds ") + secs + "\n";
      gauge("agentsmithy_last_drain_streams_notified",
            "Streams that got the shutdown error in the last drain.");
      out +=
          "agentsmithy_last_drain_streams_notified " + std::to_string(drain_notified.load()) + "\n";
      gauge("agentsmithy_last_drain_connections_closed",
            "Connections closed at the last drain's deadline.");
      out +=
          "agentsmithy_last_drain_connections_closed " + std::to_string(drain_closed.load()) + "\n";
    }
    return out;
  }

  mutable std::mutex requests_mu;
  std::map<std::pair<std::string, int>, std::uint64_t> requests;  // guarded by requests_mu
};

}  // namespace detail
}  // namespace agentsmithy
