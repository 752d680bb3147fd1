namespace agentsmithy {

inline Generator openai_generator(OpenAIOptions options) {
  if (detail::curl_global() != CURLE_OK)
    throw std::runtime_error("openai_generator: curl_global_init failed");
  auto config = std::make_shared<detail::OpenAIConfig>();
  config->url = detail::parse_base_url(options.base_url);
  if (options.connect_timeout.count() <= 0)
    throw std::invalid_argument("openai_generator: connect_timeout must be positive");
  if (options.read_timeout.count() <= 0)
    throw std::invalid_argument("openai_generator: read_timeout must be positive");
  if (!options.extra_body.is_null() && !options.extra_body.is_object())
    throw std::invalid_argument("openai_generator: extra_body must be a JSON object");
  config->options = std::move(options);
  std::shared_ptr<const detail::OpenAIConfig> shared = std::move(config);
  return [shared](const ChatRequest& request, StreamWriter& out) {
    detail::run_openai(*shared, request, out);
  };
}

}  // namespace agentsmithy
