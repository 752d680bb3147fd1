// Inputs the libFuzzer targets in tests/fuzz/ found to break a rule, kept as
// regression tests: each case names the target and the rule it broke.
#include "support.hpp"

using namespace test;
using agentsmithy::ChatRequest;
namespace detail = agentsmithy::detail;

// fuzz_request: a number outside double's range made nlohmann_json throw
// out_of_range (406), not parse_error, out of parse_chat_request; cpp-httplib
// caught it and answered 500 with the exception's text in an EXCEPTION_WHAT
// header. Such a body is not valid JSON for us: 400 Invalid JSON.
TEST_CASE("fuzz regression: a number out of double's range is 400 Invalid JSON, not a throw") {
  for (const char* number : {"1e999", "-1e999", "1E400", "123456789e999"}) {
    CAPTURE(number);
    const std::string body =
        std::string(R"({"messages":[{"role":"user","content":"x"}],"n":)") + number + "}";
    ChatRequest req;
    std::optional<detail::HttpError> err;
    CHECK_NOTHROW(err = detail::parse_chat_request(body, req));
    REQUIRE(err.has_value());
    CHECK(err->status == 400);
    CHECK(err->message.rfind("Invalid JSON", 0) == 0);
  }
}

TEST_CASE("fuzz regression: the server answers 400, not 500, to a number out of range") {
  RunningServer rs(test_options());
  REQUIRE(rs.ready());
  for (const bool stream : {true, false}) {
    CAPTURE(stream);
    RawClient c(rs.port());
    REQUIRE(c.post_raw(std::string(R"({"messages":[{"role":"user","content":"hi"}],"stream":)") +
                       (stream ? "true" : "false") + R"(,"context":{"x":1e999}})"));
    REQUIRE(c.read_response(5000ms));
    INFO(c.summary());
    CHECK(c.status == 400);
    CHECK_FALSE(c.has_header("exception_what"));
    const json body = json::parse(c.body, nullptr, false);
    REQUIRE(body.is_object());
    CHECK(body["error"].get<std::string>().rfind("Invalid JSON", 0) == 0);
  }
}

// fuzz_request's seed corpus: nlohmann_json stops at a NUL byte outside a
// string, so a valid body followed by a NUL and anything else was accepted
// with the rest ignored. A NUL is never valid JSON: 400.
TEST_CASE("fuzz regression: a body with a NUL byte is 400 Invalid JSON") {
  const std::string valid = R"({"messages":[{"role":"user","content":"x"}]})";
  for (const std::string& body :
       {valid + std::string(1, '\0') + "[[[", std::string(1, '\0') + valid}) {
    ChatRequest req;
    const auto err = detail::parse_chat_request(body, req);
    REQUIRE(err.has_value());
    CHECK(err->status == 400);
    CHECK(err->message.rfind("Invalid JSON", 0) == 0);
  }
}
