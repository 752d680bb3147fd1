# agentsmithy - build the examples and tests, run the server, run the tests.
#
#   make            build/agentsmithy-server, build/embed, build/agentsmithy-tests
#   make run        build/agentsmithy-server --workdir . (port 8765; Ctrl+C drains)
#   make test       build, run the doctest suite and tests/shutdown_simple.sh
#   make cxx20      build everything as C++20 into build/cxx20/
#   make bench      bash bench/run.sh
#   make format     clang-format -i the sources
#   make clean      rm -rf build
#
# `make`, `make run` and `make test` first install the Debian packages they
# need (apt-get, with sudo when not root) if any is missing; SKIP_DEPS=1 skips.

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

PACKAGES := libcpp-httplib-dev nlohmann-json3-dev doctest-dev curl pkg-config g++ make

# Expanded when a recipe runs, i.e. after `deps` has installed pkg-config.
HTTPLIB_CFLAGS = $(shell pkg-config --cflags cpp-httplib)
HTTPLIB_LIBS   = $(shell pkg-config --libs cpp-httplib)
COMPILE = $(CXX) $(STD) $(CXXFLAGS) $(WARNINGS) $(CPPFLAGS) -I. $(HTTPLIB_CFLAGS) -MMD -MP
LINK    = $(HTTPLIB_LIBS) -pthread $(LDFLAGS) $(LDLIBS)

SERVER := $(BUILD)/agentsmithy-server
EMBED  := $(BUILD)/embed
TESTS  := $(BUILD)/agentsmithy-tests
TEST_SOURCES := $(sort $(wildcard tests/*.cpp))
TEST_OBJECTS := $(TEST_SOURCES:%.cpp=$(BUILD)/obj/%.o)
FORMAT_SOURCES := $(wildcard agentsmithy.hpp examples/*.cpp tests/*.cpp tests/*.hpp \
                             bench/*.cpp bench/*.hpp)

.PHONY: all run test cxx20 bench format format-check clean deps

all: $(SERVER) $(EMBED) $(TESTS)

# One compile unit per example; the test objects compile in parallel.
$(SERVER): examples/server.cpp agentsmithy.hpp | deps
	@mkdir -p $(@D)
	$(COMPILE) -MF $@.d $< -o $@ $(LINK)

$(EMBED): examples/embed.cpp agentsmithy.hpp | deps
	@mkdir -p $(@D)
	$(COMPILE) -MF $@.d $< -o $@ $(LINK)

$(BUILD)/obj/%.o: %.cpp agentsmithy.hpp | deps
	@mkdir -p $(@D)
	$(COMPILE) -c $< -o $@

$(TESTS): $(TEST_OBJECTS) agentsmithy.hpp | deps
	@mkdir -p $(@D)
	$(CXX) $(STD) $(CXXFLAGS) $(TEST_OBJECTS) -o $@ $(LINK)

-include $(wildcard $(BUILD)/*.d $(BUILD)/obj/tests/*.d)

# Installs the missing Debian packages; then checks that pkg-config finds
# cpp-httplib (its cflags select the library's ABI: OpenSSL, zlib, brotli).
deps:
	@if [ -z "$(SKIP_DEPS)" ] && command -v dpkg >/dev/null 2>&1; then \
	  missing=; \
	  for p in $(PACKAGES); do \
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
	@pkg-config --exists cpp-httplib || \
	  { echo "error: pkg-config cannot find cpp-httplib (apt-get install libcpp-httplib-dev)" >&2; exit 1; }

run: $(SERVER)
	@echo "agentsmithy-server on port 8765; Ctrl+C to shut down gracefully"
	@$(SERVER) --workdir . $(RUN_ARGS); status=$$?; \
	  echo "agentsmithy-server exited with status $$status"; exit $$status

# Runs the doctest suite, then the shell test, whatever the first gives, and
# ends with "tests: N passed, M failed" (doctest test cases + the shell test).
test: all
	@passed=0; failed=0; log=$(BUILD)/agentsmithy-tests.log; \
	AGENTSMITHY_SERVER=$(SERVER) timeout --foreground -k 10 $(TEST_TIMEOUT) \
	  $(TESTS) $(TEST_ARGS) 2>&1 | tee $$log; status=$${PIPESTATUS[0]}; \
	summary=$$(sed 's/\x1b\[[0-9;]*m//g' $$log | grep '^\[doctest\] test cases:' | tail -n 1); \
	if [ -n "$$summary" ]; then \
	  passed=$$(awk -F'|' '{ print $$2 + 0 }' <<<"$$summary"); \
	  failed=$$(awk -F'|' '{ print $$3 + 0 }' <<<"$$summary"); \
	fi; \
	if [ "$$status" -ne 0 ] && [ "$$failed" -eq 0 ]; then \
	  echo "$(TESTS) exited with status $$status"; failed=1; \
	fi; \
	echo "--- tests/shutdown_simple.sh"; \
	if AGENTSMITHY_SERVER=$(SERVER) timeout --foreground -k 10 $(SCRIPT_TIMEOUT) \
	     bash tests/shutdown_simple.sh; then \
	  passed=$$((passed + 1)); \
	else \
	  echo "tests/shutdown_simple.sh failed (status $$?)"; failed=$$((failed + 1)); \
	fi; \
	echo "tests: $$passed passed, $$failed failed"; \
	[ "$$failed" -eq 0 ]

cxx20:
	@$(MAKE) --no-print-directory BUILD=$(BUILD)/cxx20 STD=-std=c++20 all

bench: $(SERVER)
	AGENTSMITHY_SERVER=$(abspath $(SERVER)) bash bench/run.sh

format:
	clang-format -i $(FORMAT_SOURCES)

format-check:
	clang-format --dry-run --Werror $(FORMAT_SOURCES)

clean:
	rm -rf $(BUILD)
