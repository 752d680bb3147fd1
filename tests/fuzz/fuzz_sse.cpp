// libFuzzer target: the SSE framing of events built from arbitrary strings
// (agentsmithy::detail::Channel::frame_locked, event_text, append_chunk, dump_json).
// Generators hand the server model output that may be any bytes (an LLM token
// cut mid-character), and a client's dialog_id is echoed on every event.
//
// Checked for every input:
// - nothing throws, whatever the bytes (invalid UTF-8 is replaced, in values
//   and in keys);
// - an event is exactly one HTTP/1.1 chunk: a lower-case hex size that is the
//   payload's length, never 0 (that would end the response), then CRLF, the
//   payload and CRLF;
// - the payload is exactly one SSE `data: ` line followed by a blank line,
//   with no raw CR or LF inside the JSON;
// - the JSON parses back (strictly, as valid UTF-8) to an object with the
//   same type, content and dialog_id when those were valid UTF-8, and with
//   U+FFFD in place of the bad bytes when they were not;
// - append_chunk frames any payload, and two events decode back in order.
//
//   make fuzz          (60 s; corpus in tests/fuzz/corpus_fuzz_sse/)
#include <agentsmithy.hpp>

#include <fuzzer/FuzzedDataProvider.h>

#include "fuzz_check.hpp"

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace {

using nlohmann::json;
namespace detail = agentsmithy::detail;

bool valid_utf8(const std::string& s) {
  try {
    (void)json(s).dump();
    return true;
  } catch (const json::type_error&) {
    return false;
  }
}

// Takes one chunk off the front of `wire`; returns its payload.
std::string take_chunk(std::string_view& wire) {
  const std::size_t eol = wire.find("\r\n");
  FUZZ_CHECK(eol != std::string_view::npos && eol > 0 && eol <= 16);
  std::size_t size = 0;
  for (const char c : wire.substr(0, eol)) {
    const bool digit = c >= '0' && c <= '9';
    const bool hex = c >= 'a' && c <= 'f';
    FUZZ_CHECK(digit || hex);
    size = size * 16 + static_cast<std::size_t>(digit ? c - '0' : c - 'a' + 10);
  }
  FUZZ_CHECK(eol == 1 || wire[0] != '0');  // no leading zeros
  wire.remove_prefix(eol + 2);
  FUZZ_CHECK(wire.size() >= size + 2);
  std::string payload(wire.substr(0, size));
  FUZZ_CHECK(wire.substr(size, 2) == "\r\n");
  wire.remove_prefix(size + 2);
  return payload;
}

// Checks one event's chunk payload; returns the JSON it carries.
json check_event_payload(const std::string& payload) {
  FUZZ_CHECK(!payload.empty());
  FUZZ_CHECK(payload.rfind("data: ", 0) == 0);
  FUZZ_CHECK(payload.size() >= 8 && payload.compare(payload.size() - 2, 2, "\n\n") == 0);
  const std::string_view text(payload.data() + 6, payload.size() - 8);
  FUZZ_CHECK(text.find('\n') == std::string_view::npos);
  FUZZ_CHECK(text.find('\r') == std::string_view::npos);
  const json parsed = json::parse(text.begin(), text.end(), nullptr, false);
  FUZZ_CHECK(!parsed.is_discarded());
  FUZZ_CHECK(parsed.is_object());
  return parsed;
}

void check_field(const json& parsed, const char* key, const std::string& sent) {
  const auto it = parsed.find(key);
  FUZZ_CHECK(it != parsed.end() && it->is_string());
  const auto& got = it->get_ref<const std::string&>();
  if (valid_utf8(sent)) {
    FUZZ_CHECK(got == sent);
  } else {
    FUZZ_CHECK(got.find("\xEF\xBF\xBD") != std::string::npos);  // U+FFFD
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  FuzzedDataProvider in(data, size);
  const std::string type = in.ConsumeRandomLengthString(64);
  const std::string content = in.ConsumeRandomLengthString(4096);
  const std::string dialog_id = in.ConsumeRandomLengthString(160);
  const std::string key = in.ConsumeRandomLengthString(32);
  const double number = in.ConsumeFloatingPoint<double>();
  const std::string raw = in.ConsumeRemainingBytesAsString();

  // An event as StreamWriter::send() builds it: the generator's fields, an
  // extra field under an arbitrary key, and the dialog_id.
  json event = {{"type", type}, {"content", content}, {"n", number}};
  if (key != "type" && key != "content" && key != "dialog_id" && key != "n") event[key] = raw;
  event["dialog_id"] = dialog_id;

  // Framed as a stream frames it: one chunk per event.
  std::string wire;
  try {
    detail::Channel ch(1, detail::ChannelKind::sse, -1, "fuzz", detail::StreamFormat{});
    ch.frame_locked(wire, detail::dump_json(event));
    ch.frame_locked(wire, detail::dump_json(detail::error_event(content, "shutdown")));
  } catch (const std::exception& e) {
    fuzz::unexpected_exception("frame_locked", &e);
  }

  // The fast path that splices a (validated) dialog_id into the dump.
  if (detail::valid_dialog_id(dialog_id)) {
    json plain = event;
    plain.erase("dialog_id");
    std::string text;
    try {
      text = detail::event_text(plain, dialog_id, false);
    } catch (const std::exception& e) {
      fuzz::unexpected_exception("event_text", &e);
    }
    const json spliced = json::parse(text, nullptr, false);
    FUZZ_CHECK(!spliced.is_discarded() && spliced.is_object());
    FUZZ_CHECK(spliced.size() == plain.size() + 1);
    FUZZ_CHECK(spliced.value("dialog_id", std::string()) == dialog_id);
  }

  std::string_view rest(wire);
  const json first = check_event_payload(take_chunk(rest));
  check_field(first, "type", type);
  check_field(first, "content", content);
  check_field(first, "dialog_id", dialog_id);
  FUZZ_CHECK(first.size() == event.size());
  const json second = check_event_payload(take_chunk(rest));
  FUZZ_CHECK(second["type"] == "error");
  check_field(second, "error", content);
  FUZZ_CHECK(rest.empty());

  // Any payload as one chunk, and the zero-length chunk is only ever the end.
  std::string chunk;
  detail::append_chunk(chunk, raw);
  rest = chunk;
  if (raw.empty()) {
    FUZZ_CHECK(chunk == detail::kLastChunk);
  } else {
    FUZZ_CHECK(take_chunk(rest) == raw);
    FUZZ_CHECK(rest.empty());
  }
  return 0;
}
