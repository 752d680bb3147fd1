namespace agentsmithy {

// ===========================================================================
// Signal hook
// ===========================================================================

// While alive, SIGINT and SIGTERM start server.shutdown(); a second signal
// during the drain (20 ms or more after the first) forces it. Destroying the
// guard restores the previous handlers. One guard at a time per process.
class SignalHook {
 public:
  SignalHook() noexcept = default;
  SignalHook(SignalHook&& other) noexcept;
  SignalHook& operator=(SignalHook&& other) noexcept;
  ~SignalHook();
  // True once a second signal forced the shutdown.
  bool forced() const;

 private:
  struct State;
  friend SignalHook install_signal_handlers(Server& server);
  explicit SignalHook(std::unique_ptr<State> state) noexcept;
  static void watch(State& state);
  std::unique_ptr<State> state_;
};

// Throws std::logic_error if another SignalHook is alive,
// std::system_error if the handlers cannot be installed.
SignalHook install_signal_handlers(Server& server);

}  // namespace agentsmithy
