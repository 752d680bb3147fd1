// libFuzzer target: the checks on request headers a client controls.
// - is_loopback_host_header (the DNS-rebinding guard on Host) agrees with a
//   reference: the value, lower-cased, is localhost, 127.0.0.1 or [::1],
//   optionally followed by ":<our port>"; nothing else passes.
// - constant_time_equal (the bearer-token check) agrees with ==.
// - valid_dialog_id agrees with [A-Za-z0-9_-]{1,128}.
//
//   make fuzz          (60 s; corpus in tests/fuzz/corpus_fuzz_headers/)
#include <agentsmithy.hpp>

#include <fuzzer/FuzzedDataProvider.h>

#include "fuzz_check.hpp"

#include <cctype>
#include <cstddef>
#include <cstdint>
#include <string>

namespace {

namespace detail = agentsmithy::detail;

bool reference_host_ok(const std::string& value, int port) {
  std::string lowered = value;
  for (char& c : lowered) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  for (const char* name : {"localhost", "127.0.0.1", "[::1]"}) {
    if (lowered == name || lowered == std::string(name) + ":" + std::to_string(port)) return true;
  }
  return false;
}

bool reference_dialog_id(const std::string& id) {
  if (id.empty() || id.size() > 128) return false;
  for (const char c : id) {
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '_') return false;
  }
  return true;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  FuzzedDataProvider in(data, size);
  const int port = in.ConsumeIntegralInRange<int>(0, 65535);
  const std::string host = in.ConsumeRandomLengthString(300);
  const std::string secret = in.ConsumeRandomLengthString(300);
  const std::string given = in.ConsumeRemainingBytesAsString();

  FUZZ_CHECK(detail::is_loopback_host_header(host, port) == reference_host_ok(host, port));
  FUZZ_CHECK(detail::constant_time_equal(given, secret) == (given == secret));
  FUZZ_CHECK(detail::constant_time_equal(secret, secret));
  FUZZ_CHECK(detail::valid_dialog_id(host) == reference_dialog_id(host));
  FUZZ_CHECK(detail::valid_dialog_id(given) == reference_dialog_id(given));
  return 0;
}
