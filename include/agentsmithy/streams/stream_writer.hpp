namespace agentsmithy {

// ===========================================================================
// Definitions: stream writer, demo generator, chat service, server
// ===========================================================================

inline StreamWriter::StreamWriter(std::shared_ptr<detail::Core> core,
                                  std::shared_ptr<detail::Channel> channel)
    : core_(std::move(core)), channel_(std::move(channel)) {}

inline StreamWriter::~StreamWriter() { end(); }

inline bool StreamWriter::send(const nlohmann::json& event) {
  return core_->hub.send(*channel_, &event, 1);
}

inline bool StreamWriter::send_batch(const std::vector<nlohmann::json>& events) {
  if (events.empty()) return !cancelled();
  return core_->hub.send(*channel_, events.data(), events.size());
}

inline bool StreamWriter::chat(std::string_view text) {
  return send(nlohmann::json{{"type", "chat"}, {"content", std::string(text)}});
}

inline void StreamWriter::end() { core_->hub.finish(*channel_, std::nullopt); }

inline bool StreamWriter::cancelled() const { return channel_->cancelled.load(); }

inline std::size_t StreamWriter::buffered() const {
  std::lock_guard<std::mutex> lock(channel_->mu);
  return channel_->unsent();
}

inline bool StreamWriter::sleep_for(std::chrono::milliseconds d) {
  return core_->hub.wait(*channel_, d);
}

inline void StreamWriter::on_cancel(std::function<void()> callback) {
  core_->hub.on_cancel(*channel_, std::move(callback));
}

inline const std::string& StreamWriter::dialog_id() const { return channel_->dialog_id; }

}  // namespace agentsmithy
