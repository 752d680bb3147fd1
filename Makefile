# agentsmithy - build the examples and tests, run the server, run the tests.
#
#   make            build/agentsmithy-server, build/embed, build/agentsmithy-tests
#   make run        build/agentsmithy-server --workdir . (port 8765; Ctrl+C drains)
#   make test       build, run the doctest suite and tests/shutdown_simple.sh
#   make amalgamate regenerate agentsmithy.hpp from include/ (also done by
#                   `make` when a part changed)
#   make check-header  the header as users meet it (tests/header_checks.sh)
#   make cxx20      build everything as C++20 into build/cxx20/
#   make test-asan  the same tests built with AddressSanitizer + UBSan (build/asan/)
#   make test-tsan  the same tests built with ThreadSanitizer (build/tsan/)
#   make test-ide   AgentSmithy's VS Code extension's launch, status.json and
#                   Node fetch checks (tests/ide/)
#   make test-browser  the chat page and EventSource in headless Chromium
#   make test-ops   nginx rolling restart, Prometheus, deploy files (tests/ops/)
#   make fuzz       each libFuzzer target in tests/fuzz/ for 60 s (fuzz-ci: 15 s)
#   make bench      bash bench/run.sh
#   make format     clang-format -i the sources
#   make clean      rm -rf build
#
# `make`, `make run` and `make test` first install the Debian packages they
# need (apt-get, with sudo when not root) if any is missing; SKIP_DEPS=1 skips.
# The sanitizer and fuzz targets also install clang 14 and its runtimes.

SHELL := /bin/bash
.DEFAULT_GOAL := all
# Build in parallel by default; a -j on the command line wins. (Only at the
# top level: a sub-make shares its parent's jobserver.)
ifeq ($(MAKELEVEL),0)
MAKEFLAGS += -j$(shell nproc 2>/dev/null || echo 2)
endif
# `make clean all` must not build while it deletes.
ifneq ($(filter clean,$(MAKECMDGOALS)),)
.NOTPARALLEL:
endif

BUILD    ?= build
STD      ?= -std=c++17
CXXFLAGS ?= -O2 -g
WARNINGS ?= -Wall -Wextra -Wpedantic -Werror
RUN_ARGS ?=
TEST_ARGS ?=
# Upper bounds so a hung test fails the run instead of hanging CI (seconds).
TEST_TIMEOUT ?= 300
SCRIPT_TIMEOUT ?= 120

# libcurl and libsqlite3: the example server and the tests use the OpenAI
# upstream (AGENTSMITHY_OPENAI_SUPPORT) and the SQLite dialog store
# (AGENTSMITHY_SQLITE_SUPPORT); the core and examples/embed.cpp do not.
# python3: tools/amalgamate.py, which makes agentsmithy.hpp from its parts.
PACKAGES := libcpp-httplib-dev libcurl4-openssl-dev libsqlite3-dev nlohmann-json3-dev doctest-dev \
            curl pkg-config g++ make python3

# Expanded when a recipe runs, i.e. after `deps` has installed pkg-config.
HTTPLIB_CFLAGS = $(shell pkg-config --cflags cpp-httplib)
HTTPLIB_LIBS   = $(shell pkg-config --libs cpp-httplib)
# libcurl: the OpenAI upstream's HTTP client (one event-loop thread), only
# where AGENTSMITHY_OPENAI_SUPPORT is defined.
CURL_CFLAGS = $(shell pkg-config --cflags libcurl)
CURL_LIBS   = $(shell pkg-config --libs libcurl)
OPENAI_CFLAGS = -DAGENTSMITHY_OPENAI_SUPPORT $(CURL_CFLAGS)
# libsqlite3: sqlite_store(), only where AGENTSMITHY_SQLITE_SUPPORT is defined.
SQLITE_CFLAGS = -DAGENTSMITHY_SQLITE_SUPPORT $(shell pkg-config --cflags sqlite3)
SQLITE_LIBS   = $(shell pkg-config --libs sqlite3)
# The core: cpp-httplib, nlohmann_json and POSIX only (examples/embed.cpp).
CORE_COMPILE = $(CXX) $(STD) $(CXXFLAGS) $(WARNINGS) $(CPPFLAGS) -I. $(HTTPLIB_CFLAGS) -MMD -MP
CORE_LINK    = $(HTTPLIB_LIBS) -pthread $(LDFLAGS) $(LDLIBS)
# With the OpenAI upstream and the SQLite store: the example server, the
# tests, the fuzz targets.
COMPILE = $(CORE_COMPILE) $(OPENAI_CFLAGS) $(SQLITE_CFLAGS)
LINK    = $(HTTPLIB_LIBS) $(CURL_LIBS) $(SQLITE_LIBS) -pthread $(LDFLAGS) $(LDLIBS)

SERVER := $(BUILD)/agentsmithy-server
EMBED  := $(BUILD)/embed
TESTS  := $(BUILD)/agentsmithy-tests
TEST_SOURCES := $(sort $(wildcard tests/*.cpp))
# The test sources compile as TEST_UNITS unity translation units (a file
# that #includes several of them), one per core: each unit parses
# cpp-httplib, nlohmann_json, doctest and agentsmithy.hpp once and
# instantiates their inline code once, which is most of a test file's
# compile. TEST_UNITS=0 compiles one object per source file instead.
TEST_UNITS ?= 2
ifeq ($(TEST_UNITS),0)
TEST_OBJECTS := $(TEST_SOURCES:%.cpp=$(BUILD)/obj/%.o)
else
TEST_UNIT_SOURCES := $(foreach i,$(shell seq 1 $(TEST_UNITS)),$(BUILD)/gen/tests_unit_$(i).cpp)
TEST_OBJECTS := $(TEST_UNIT_SOURCES:$(BUILD)/gen/%.cpp=$(BUILD)/obj/%.o)
endif
# The single header is made from these (tools/amalgamate.py).
HEADER_PARTS := include/agentsmithy.hpp $(sort $(shell find include/agentsmithy -name '*.hpp'))
FORMAT_SOURCES := $(wildcard $(HEADER_PARTS) examples/*.cpp tests/*.cpp tests/*.hpp \
                             tests/support/*.hpp tests/ops/*.cpp \
                             tests/fuzz/*.cpp tests/fuzz/*.hpp bench/*.cpp bench/*.hpp)

.PHONY: all run test cxx20 bench format format-check clean deps deps-san amalgamate check-amalgamate check-header \
        test-asan test-tsan fuzz fuzz-ci test-ide test-browser test-ops

all: $(SERVER) $(EMBED) $(TESTS)

# agentsmithy.hpp is committed; it is remade when a part is newer.
agentsmithy.hpp: $(HEADER_PARTS) tools/amalgamate.py | deps
	python3 tools/amalgamate.py

amalgamate:
	python3 tools/amalgamate.py

# The header as a user meets it: amalgamated from its parts, the core without
# libcurl, the errors that name a missing define or an unsupported
# cpp-httplib, C++20 (tests/header_checks.sh).
check-header: | deps
	@$(call install_missing,cmake)
	@bash tests/header_checks.sh

# Fails when the committed header is not what its parts make.
check-amalgamate:
	@if python3 tools/amalgamate.py --check; then \
	  echo "amalgamate: 1 passed, 0 failed"; \
	else \
	  echo "amalgamate: 0 passed, 1 failed"; exit 1; \
	fi

# One compile unit per example; the test objects compile in parallel.
# The chat page, examples/chat.html, is compiled into the example server as
# a raw string literal.
CHAT_PAGE := $(BUILD)/gen/chat_html.inc
$(CHAT_PAGE): examples/chat.html
	@mkdir -p $(@D)
	@{ printf 'R"AGENTSMITHY_HTML('; cat $<; printf ')AGENTSMITHY_HTML"\n'; } >$@

$(SERVER): examples/server.cpp agentsmithy.hpp $(CHAT_PAGE) | deps
	@mkdir -p $(@D)
	$(COMPILE) -I$(BUILD)/gen -MF $@.d $< -o $@ $(LINK)

# The core alone: no libcurl, as the README's one g++ command builds it.
$(EMBED): examples/embed.cpp agentsmithy.hpp | deps
	@mkdir -p $(@D)
	$(CORE_COMPILE) -MF $@.d $< -o $@ $(CORE_LINK)

$(BUILD)/obj/%.o: %.cpp agentsmithy.hpp | deps
	@mkdir -p $(@D)
	$(COMPILE) -c $< -o $@

# Unit i holds every TEST_UNITS-th source from the i-th on; rewritten only
# when that list changes.
$(BUILD)/gen/tests_unit_%.cpp: FORCE
	@mkdir -p $(@D)
	@k=0; for f in $(TEST_SOURCES); do \
	  if [ $$((k % $(TEST_UNITS) + 1)) -eq $* ]; then echo "#include \"$$f\""; fi; k=$$((k + 1)); \
	done >$@.tmp; cmp -s $@.tmp $@ && rm -f $@.tmp || mv $@.tmp $@

$(BUILD)/obj/tests_unit_%.o: $(BUILD)/gen/tests_unit_%.cpp agentsmithy.hpp | deps
	@mkdir -p $(@D)
	$(COMPILE) -c $< -o $@

.PHONY: FORCE
FORCE:
.PRECIOUS: $(BUILD)/gen/tests_unit_%.cpp

$(TESTS): $(TEST_OBJECTS) agentsmithy.hpp | deps
	@mkdir -p $(@D)
	$(CXX) $(STD) $(CXXFLAGS) $(TEST_OBJECTS) -o $@ $(LINK)

# Dependency files are only read: no rule (a pattern rule would match them).
%.d: ;
-include $(wildcard $(BUILD)/*.d $(BUILD)/obj/*.d $(BUILD)/obj/tests/*.d)

# $(call install_missing,PACKAGES): apt-get installs those not installed yet.
define install_missing
if [ -z "$(SKIP_DEPS)" ] && command -v dpkg >/dev/null 2>&1; then \
  missing=; \
  for p in $(1); do \
    dpkg -s $$p 2>/dev/null | grep -q '^Status: install ok installed' || missing="$$missing $$p"; \
  done; \
  if [ -n "$$missing" ]; then \
    echo "Installing missing packages:$$missing"; \
    sudo=; [ "$$(id -u)" = 0 ] || sudo=sudo; \
    $$sudo apt-get update && \
    $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing \
      || { echo "error: could not install$$missing" >&2; exit 1; }; \
  fi; \
fi
endef

# Installs the missing Debian packages; then checks that pkg-config finds
# cpp-httplib (its cflags select the library's ABI: OpenSSL, zlib, brotli)
# and libcurl.
deps:
	@$(call install_missing,$(PACKAGES))
	@pkg-config --exists cpp-httplib || \
	  { echo "error: pkg-config cannot find cpp-httplib (apt-get install libcpp-httplib-dev)" >&2; exit 1; }
	@pkg-config --exists libcurl || \
	  { echo "error: pkg-config cannot find libcurl (apt-get install libcurl4-openssl-dev)" >&2; exit 1; }
	@pkg-config --exists sqlite3 || \
	  { echo "error: pkg-config cannot find sqlite3 (apt-get install libsqlite3-dev)" >&2; exit 1; }

run: $(SERVER)
	@echo "agentsmithy-server on port 8765; Ctrl+C to shut down gracefully"
	@$(SERVER) --workdir . $(RUN_ARGS); status=$$?; \
	  echo "agentsmithy-server exited with status $$status"; exit $$status

# $(call run_suite,LABEL,TESTS,SERVER,ENV,TIMEOUT_FACTOR,SCRIPTS): runs the
# doctest binary TESTS, then each shell test of SCRIPTS against SERVER,
# whatever the ones before gave, with the environment assignments ENV, and
# ends with "LABEL: N passed, M failed" (doctest test cases + the scripts).
define run_suite
passed=0; failed=0; log=$(2).log; \
env $(4) AGENTSMITHY_SERVER=$(3) timeout --foreground -k 10 $$(($(TEST_TIMEOUT) * $(5))) \
  $(2) $(TEST_ARGS) 2>&1 | tee $$log; status=$${PIPESTATUS[0]}; \
summary=$$(sed 's/\x1b\[[0-9;]*m//g' $$log | grep '^\[doctest\] test cases:' | tail -n 1); \
if [ -n "$$summary" ]; then \
  passed=$$(awk -F'|' '{ print $$2 + 0 }' <<<"$$summary"); \
  failed=$$(awk -F'|' '{ print $$3 + 0 }' <<<"$$summary"); \
fi; \
if [ "$$status" -ne 0 ] && [ "$$failed" -eq 0 ]; then \
  echo "$(2) exited with status $$status"; failed=1; \
fi; \
for script in $(6); do \
  echo "--- $$script"; \
  if env $(4) AGENTSMITHY_SERVER=$(3) timeout --foreground -k 10 $$(($(SCRIPT_TIMEOUT) * $(5))) \
       bash $$script; then \
    passed=$$((passed + 1)); \
  else \
    echo "$$script failed (status $$?)"; failed=$$((failed + 1)); \
  fi; \
done; \
echo "$(1): $$passed passed, $$failed failed"; \
[ "$$failed" -eq 0 ]
endef

# The shell tests: the founding spec's client, and the README's walkthrough
# run for real against what the README shows (sanitized runs: the first).
SUITE_SCRIPTS := tests/shutdown_simple.sh tests/readme_walkthrough.sh

# Runs the doctest suite, then the shell tests, whatever the ones before give,
# and ends with "tests: N passed, M failed" (doctest test cases + the scripts).
test: all
	@$(call run_suite,tests,$(TESTS),$(SERVER),,1,$(SUITE_SCRIPTS))

cxx20:
	@$(MAKE) --no-print-directory BUILD=$(BUILD)/cxx20 STD=-std=c++20 all

# ---------------------------------------------------------------------------
# Sanitizers: the test binary and the example server (which the shell test
# drives) rebuilt with clang 14, -O1, into build/asan/ and build/tsan/, then
# the whole suite run as `make test` runs it. Any report fails the run.
# Warnings are shown but not fatal here: `make` already enforces -Werror.
# A test can tell it is sanitized with __has_feature(address_sanitizer) or
# __has_feature(thread_sanitizer) (clang 14 defines no __SANITIZE_*__ macro).
# ---------------------------------------------------------------------------
SAN_PACKAGES  := clang libclang-rt-14-dev llvm
TSAN_PACKAGES := dpkg-dev python3 xz-utils
SAN_CXX    ?= clang++
SAN_CFLAGS ?= -O1 -g -fno-omit-frame-pointer
ASAN_FLAGS := -fsanitize=address,undefined -fno-sanitize-recover=all
TSAN_FLAGS := -fsanitize=thread
SAN_WARNINGS := -Wall -Wextra -Wpedantic
# Sanitized runs are slower: their time limits are this many times make test's.
SAN_TIMEOUT_FACTOR ?= 3
ASAN_DIR := $(BUILD)/asan
TSAN_DIR := $(BUILD)/tsan
ASAN_ENV := ASAN_OPTIONS=halt_on_error=1:detect_leaks=1:detect_stack_use_after_return=1:strict_init_order=1 \
            UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
            LSAN_OPTIONS=report_objects=1
# atexit_sleep_ms=0: ThreadSanitizer otherwise sleeps 1 s at exit while
# detached threads (idle pool workers, the demo's timer thread) still run,
# which the tests that time a server process's exit would measure.
TSAN_ENV := TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1:history_size=4:atexit_sleep_ms=0 \
            UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
# ThreadSanitizer needs every library that synchronises our threads to be
# instrumented. cpp-httplib is: tests/tsan/build-cpp-httplib.sh rebuilds the
# installed version from Debian's source package with -fsanitize=thread into
# $(TSAN_HTTPLIB) (the header split off that source, and a static library), and
# the TSan binaries use those instead of /usr/include/httplib.h and
# libcpp-httplib.so. OpenSSL, zlib and brotli stay uninstrumented: the server
# never calls them. libcurl (the OpenAI upstream's client) stays uninstrumented
# too: its event-loop thread shares nothing with ours but what our own mutexes
# guard, and TSan sees those (it intercepts pthread calls in any library).
TSAN_HTTPLIB := $(TSAN_DIR)/cpp-httplib
TSAN_HTTPLIB_LIB := $(TSAN_HTTPLIB)/libcpp-httplib.a

deps-san: deps
	@$(call install_missing,$(SAN_PACKAGES))

$(TSAN_HTTPLIB_LIB): tests/tsan/build-cpp-httplib.sh | deps-san
	@$(call install_missing,$(TSAN_PACKAGES))
	bash tests/tsan/build-cpp-httplib.sh $(TSAN_HTTPLIB) $(SAN_CXX) "$(SAN_CFLAGS) $(TSAN_FLAGS)"

test-asan: deps-san
	@$(MAKE) --no-print-directory BUILD=$(ASAN_DIR) CXX=$(SAN_CXX) \
	  CXXFLAGS="$(SAN_CFLAGS) $(ASAN_FLAGS)" WARNINGS="$(SAN_WARNINGS)" \
	  $(ASAN_DIR)/agentsmithy-tests $(ASAN_DIR)/agentsmithy-server
	@$(call run_suite,asan,$(ASAN_DIR)/agentsmithy-tests,$(ASAN_DIR)/agentsmithy-server,$(ASAN_ENV),$(SAN_TIMEOUT_FACTOR),tests/shutdown_simple.sh)

test-tsan: $(TSAN_HTTPLIB_LIB) | deps-san
	@$(MAKE) --no-print-directory BUILD=$(TSAN_DIR) CXX=$(SAN_CXX) \
	  CXXFLAGS="$(SAN_CFLAGS) $(TSAN_FLAGS)" WARNINGS="$(SAN_WARNINGS)" \
	  HTTPLIB_CFLAGS="-I$(TSAN_HTTPLIB)/include $$(pkg-config --cflags cpp-httplib)" \
	  HTTPLIB_LIBS="$(TSAN_HTTPLIB_LIB) $$(pkg-config --libs openssl zlib libbrotlidec libbrotlienc)" \
	  $(TSAN_DIR)/agentsmithy-tests $(TSAN_DIR)/agentsmithy-server
	@$(call run_suite,tsan,$(TSAN_DIR)/agentsmithy-tests,$(TSAN_DIR)/agentsmithy-server,$(TSAN_ENV),$(SAN_TIMEOUT_FACTOR),tests/shutdown_simple.sh)

# ---------------------------------------------------------------------------
# Fuzzing: libFuzzer targets tests/fuzz/fuzz_*.cpp (clang 14, with ASan and
# UBSan), each run for FUZZ_SECONDS on its seed corpus
# tests/fuzz/corpus_<target>/ (read only: what the fuzzer finds goes to
# build/fuzz/corpus/<target>/). A crash leaves its input in build/fuzz/ and
# fails the run; each one found becomes a case in
# tests/test_fuzz_regressions.cpp.
# ---------------------------------------------------------------------------
FUZZ_SECONDS ?= 60
FUZZ_DIR     := $(BUILD)/fuzz
FUZZ_FLAGS   := -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all
FUZZ_OPTIONS ?= -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
FUZZ_TARGETS := $(patsubst tests/fuzz/%.cpp,%,$(sort $(wildcard tests/fuzz/fuzz_*.cpp)))
FUZZ_BINS    := $(FUZZ_TARGETS:%=$(FUZZ_DIR)/%)

$(FUZZ_BINS): $(FUZZ_DIR)/%: tests/fuzz/%.cpp tests/fuzz/fuzz_check.hpp agentsmithy.hpp | deps-san
	@mkdir -p $(@D)
	$(SAN_CXX) $(STD) $(SAN_CFLAGS) $(FUZZ_FLAGS) $(SAN_WARNINGS) $(CPPFLAGS) -I. $(HTTPLIB_CFLAGS) \
	  $(OPENAI_CFLAGS) $(SQLITE_CFLAGS) -MMD -MP -MF $@.d $< -o $@ $(LINK)

-include $(wildcard $(FUZZ_DIR)/*.d)

# One target per fuzzer, so that they run side by side under make -j; each
# prints its last lines (all of its log on a crash) and the run's verdict.
FUZZ_RUNS := $(FUZZ_TARGETS:%=fuzz-run-%)
.PHONY: $(FUZZ_RUNS)
$(FUZZ_RUNS): fuzz-run-%: $(FUZZ_DIR)/%
	@mkdir -p $(FUZZ_DIR)/corpus/$* $(FUZZ_DIR)/artifacts
	@rm -f $(FUZZ_DIR)/artifacts/$*-*
	@log=$(FUZZ_DIR)/$*.log; dict=; \
	[ -f tests/fuzz/$*.dict ] && dict=-dict=tests/fuzz/$*.dict; \
	echo "--- $*: fuzzing for $(FUZZ_SECONDS) s (log: $$log)"; \
	if $(FUZZ_DIR)/$* $(FUZZ_OPTIONS) $$dict -max_total_time=$(FUZZ_SECONDS) \
	     -artifact_prefix=$(FUZZ_DIR)/artifacts/$*- \
	     $(FUZZ_DIR)/corpus/$* tests/fuzz/corpus_$* >$$log 2>&1; then \
	  echo "$*: PASS: $$(grep -E '^Done [0-9]+ runs' $$log | tail -n 1)" \
	    "($$(grep -E '^#[0-9]+.*DONE' $$log | tail -n 1 | grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [^ ]+'))"; \
	else \
	  status=$$?; grep -v -E '^#[0-9]+|^\s+NEW_FUNC' $$log | tail -n 60; \
	  echo "$*: FAIL (status $$status); crash input in $(FUZZ_DIR)/artifacts/:"; \
	  ls -1 $(FUZZ_DIR)/artifacts/ | grep "^$*-" | sed 's/^/  /'; \
	  echo "  replay: $(FUZZ_DIR)/$* $(FUZZ_DIR)/artifacts/<file>"; \
	  touch $(FUZZ_DIR)/$*.failed; \
	fi

# Runs every fuzzer for FUZZ_SECONDS and ends with "fuzz: N passed, M failed".
fuzz:
	@rm -f $(FUZZ_DIR)/*.failed
	@total=$(words $(FUZZ_TARGETS)); \
	if $(MAKE) --no-print-directory $(FUZZ_RUNS); then \
	  failed=$$(ls $(FUZZ_DIR)/*.failed 2>/dev/null | wc -l); \
	else \
	  echo "error: building the fuzz targets failed"; failed=$$total; \
	fi; \
	echo "fuzz: $$((total - failed)) passed, $$failed failed"; \
	[ "$$failed" -eq 0 ]

fuzz-ci:
	@$(MAKE) --no-print-directory FUZZ_SECONDS=15 fuzz

# Integration suites against build/agentsmithy-server, each in its own
# directory with a run.sh that installs what it needs (nodejs, chromium +
# puppeteer-core from tests/browser/package-lock.json, nginx, prometheus)
# and ends with "<suite>: N passed, M failed".
test-ide: $(SERVER)
	@AGENTSMITHY_SERVER=$(abspath $(SERVER)) bash tests/ide/run.sh
test-browser: $(SERVER)
	@AGENTSMITHY_SERVER=$(abspath $(SERVER)) bash tests/browser/run.sh
test-ops: $(SERVER)
	@AGENTSMITHY_SERVER=$(abspath $(SERVER)) bash tests/ops/run.sh

bench: $(SERVER)
	AGENTSMITHY_SERVER=$(abspath $(SERVER)) bash bench/run.sh

format:
	clang-format -i $(FORMAT_SOURCES)

format-check:
	clang-format --dry-run --Werror $(FORMAT_SOURCES)

clean:
	rm -rf $(BUILD)
