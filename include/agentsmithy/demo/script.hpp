namespace agentsmithy {
namespace detail {

// ===========================================================================
// The demo generator's text
// ===========================================================================

inline const std::vector<std::string>& story_words() {
  static const std::vector<std::string> words = [] {
    static const char* const sentences[] = {
        "In a valley where the rivers ran backwards at dusk, there lived a smith who forged "
        "answers instead of swords.",
        "Every morning travellers climbed the hill to her forge with questions wrapped in cloth, "
        "and every evening they walked home lighter.",
        "She heated each question until it glowed, folded it over and over, and quenched it in "
        "a barrel of cold starlight.",
        "One winter a stranger arrived carrying a question so heavy that the road cracked "
        "under his boots.",
        "He asked how a thing could end well when nobody knew it was ending, and the smith set "
        "down her hammer for the first time in years.",
        "She told him that endings are kind only when they are announced, when every listener "
        "hears the last word before the door is closed.",
        "So together they built a bell that rang once for each traveller still on the road, so "
        "that no one would walk into a dark and silent forge.",
        "When the smith finally grew tired and banked her fire, the bell rang for every "
        "traveller, and each of them turned for home knowing why.",
        "Nobody was left waiting at the door, no question was left half forged, and the valley "
        "slept soundly that night.",
        "Years later children still told the story, and they always ended it the same way, "
        "with the ringing of the bell and a quiet word of goodbye.",
    };
    std::vector<std::string> all;
    for (int chapter = 1; all.size() < 2200; ++chapter) {
      all.push_back("Chapter");
      all.push_back(std::to_string(chapter) + ".");
      for (const char* sentence : sentences) {
        std::string text = sentence;
        std::size_t start = 0;
        while (start < text.size()) {
          const std::size_t end = std::min(text.find(' ', start), text.size());
          all.push_back(text.substr(start, end - start));
          start = end + 1;
        }
      }
    }
    return all;
  }();
  return words;
}

inline std::vector<std::string> split_words(const std::string& text) {
  std::vector<std::string> words;
  std::size_t start = 0;
  while (start < text.size()) {
    const std::size_t end = std::min(text.find(' ', start), text.size());
    if (end > start) words.push_back(text.substr(start, end - start));
    start = end + 1;
  }
  return words;
}

// context.demo.<field> as an integer in [low, high], or `fallback` when absent.
inline long long demo_setting(const json& context, const char* field, long long low, long long high,
                              long long fallback) {
  const auto demo = context.find("demo");
  if (demo == context.end() || !demo->is_object()) return fallback;
  const auto value = demo->find(field);
  if (value == demo->end()) return fallback;
  if (!value->is_number_integer() || value->get<long long>() < low ||
      value->get<long long>() > high) {
    throw std::invalid_argument("context.demo." + std::string(field) + " must be an integer in [" +
                                std::to_string(low) + ", " + std::to_string(high) + "]");
  }
  return value->get<long long>();
}

// The demo's answer as a sequence of events with pauses between them. The
// same script runs as demo_generator() on a generator thread and, for the
// built-in default, directly on the stream hub's timer, where a paced stream
// costs no thread and no wake-up of its own.
class DemoScript {
 public:
  // Throws std::invalid_argument for a bad context.demo.
  explicit DemoScript(const ChatRequest& request)
      : tokens_(demo_setting(request.context, "tokens", 1, 1000000, 0)),
        interval_(demo_setting(request.context, "interval_ms", 0, 60000, 20)) {
    std::string query;
    for (const Message& m : request.messages) {
      if (m.role == "user") query = m.content;
    }
    std::string lowered = query;
    for (char& c : lowered) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    if (tokens_ == 0 && lowered.find("long story") == std::string::npos) {
      reply_ = split_words("You said: \"" + query +
                           "\". This is the agentsmithy demo generator; ask it to \"Tell me a "
                           "long story\" to watch a long answer stream.");
    }
    const std::size_t words = this->words().size();
    // With `tokens` the text repeats as often as needed; otherwise it is told once.
    chunks_ = tokens_ > 0 ? tokens_
                          : static_cast<long long>((words + kWordsPerChunk - 1) / kWordsPerChunk);
  }

  // The next event, or nothing once the answer is complete.
  std::optional<json> next_event() {
    if (step_ == 0) {
      ++step_;
      return json{{"type", "chat_start"}};
    }
    if (step_ <= chunks_) {
      ++step_;
      const auto& all = words();
      std::string text;
      for (std::size_t k = 0; k < kWordsPerChunk && (tokens_ > 0 || word_ < all.size()); ++k) {
        text += all[word_++ % all.size()];
        text += ' ';
      }
      return json{{"type", "chat"}, {"content", std::move(text)}};
    }
    if (step_ == chunks_ + 1) {
      ++step_;
      return json{{"type", "chat_end"}};
    }
    return std::nullopt;
  }

  // How long to wait before the next event: the interval between chunks.
  std::chrono::milliseconds pause_before_next() const {
    return step_ >= 2 && step_ <= chunks_ ? interval_ : std::chrono::milliseconds(0);
  }

 private:
  static constexpr std::size_t kWordsPerChunk = 3;
  const std::vector<std::string>& words() const { return reply_.empty() ? story_words() : reply_; }

  const long long tokens_;
  const std::chrono::milliseconds interval_;
  std::vector<std::string> reply_;  // empty: the story
  long long chunks_ = 0;
  long long step_ = 0;  // 0: chat_start next; 1..chunks_: that chunk next
  std::size_t word_ = 0;
};

}  // namespace detail
}  // namespace agentsmithy
