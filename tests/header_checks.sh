#!/usr/bin/env bash
# Checks the single header as a user meets it, with the compiler as the test:
#   - agentsmithy.hpp is what its parts make (tools/amalgamate.py --check);
#   - include/agentsmithy.hpp, the parts' top file, compiles as the header does;
#   - the core compiles without libcurl: no <curl/curl.h> without the define;
#   - openai_generator without AGENTSMITHY_OPENAI_SUPPORT is an error naming it,
#     and sqlite_store without AGENTSMITHY_SQLITE_SUPPORT;
#   - a cpp-httplib other than 0.11.x is an error naming the supported versions;
#   - the header compiles as C++20, warning-clean.
# Ends with "header: N passed, M failed". CXX picks the compiler (g++).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

CXX=${CXX:-g++}
WARN=(-Wall -Wextra -Wpedantic -Werror)
read -r -a HTTPLIB <<<"$(pkg-config --cflags cpp-httplib)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
passed=0
failed=0

check() {  # check NAME COMMAND...: passes when COMMAND succeeds
  local name=$1
  shift
  if "$@" >"$work/out" 2>&1; then
    echo "ok: $name"
    passed=$((passed + 1))
  else
    echo "FAILED: $name"
    sed 's/^/  /' "$work/out" | head -n 20
    failed=$((failed + 1))
  fi
}

# compile_fails SOURCE EXPECTED FLAGS...: the compile fails, and its first
# error names EXPECTED.
compile_fails() {
  local source=$1 expected=$2
  shift 2
  if "$CXX" -std=c++17 -fsyntax-only "$@" "$source" >"$work/diag" 2>&1; then
    echo "compiled, but should not have"
    return 1
  fi
  local first
  first=$(grep -m 1 'error' "$work/diag")
  echo "$first"
  grep -qF "$expected" <<<"$first"
}

cat >"$work/core.cpp" <<'EOF'
#include "agentsmithy.hpp"
int main() {
  agentsmithy::Server server;
  return server.port();
}
EOF
cat >"$work/openai.cpp" <<'EOF'
#include "agentsmithy.hpp"
int main() {
  agentsmithy::OpenAIOptions up;
  auto generator = agentsmithy::openai_generator(up);
  return generator ? 0 : 1;
}
EOF
cat >"$work/sqlite.cpp" <<'EOF'
#include "agentsmithy.hpp"
int main() {
  auto store = agentsmithy::sqlite_store("/tmp/x.sqlite3");
  return store ? 0 : 1;
}
EOF
# A cpp-httplib that says it is 0.14.0: the real one, relabelled.
mkdir -p "$work/httplib-0.14"
cat >"$work/httplib-0.14/httplib.h" <<'EOF'
#include_next <httplib.h>
#undef CPPHTTPLIB_VERSION
#define CPPHTTPLIB_VERSION "0.14.0"
EOF

check "agentsmithy.hpp matches include/ (tools/amalgamate.py --check)" \
  python3 tools/amalgamate.py --check
check "include/agentsmithy.hpp compiles with -Iinclude, with the upstream" \
  "$CXX" -std=c++17 -fsyntax-only "${WARN[@]}" -DAGENTSMITHY_OPENAI_SUPPORT -Iinclude \
  "${HTTPLIB[@]}" "$work/openai.cpp"
check "the core includes no libcurl nor sqlite3 header without their defines" \
  bash -c "! \"$CXX\" -std=c++17 -E -I. ${HTTPLIB[*]} \"$work/core.cpp\" -H 2>&1 >/dev/null | grep -q -e 'curl/curl.h' -e 'sqlite3.h'"
check "openai_generator without the define: an error that names it" \
  compile_fails "$work/openai.cpp" "AGENTSMITHY_OPENAI_SUPPORT" -I. "${HTTPLIB[@]}"
check "sqlite_store without the define: an error that names it" \
  compile_fails "$work/sqlite.cpp" "AGENTSMITHY_SQLITE_SUPPORT" -I. "${HTTPLIB[@]}"
check "cpp-httplib 0.14: an error that names the supported versions" \
  compile_fails "$work/core.cpp" "supports cpp-httplib 0.11.x only" -I"$work/httplib-0.14" -I. \
  "${HTTPLIB[@]}"
check "the header compiles as C++20, warning-clean, with the upstream" \
  "$CXX" -std=c++20 -fsyntax-only "${WARN[@]}" -DAGENTSMITHY_OPENAI_SUPPORT -I. "${HTTPLIB[@]}" \
  "$work/openai.cpp"

# The CMake package and the pkg-config files, installed into a scratch
# prefix, as a consumer finds them: agentsmithy::agentsmithy without libcurl,
# agentsmithy::openai with the define and libcurl.
cmake_package() {
  local prefix=$work/prefix consumer=$work/consumer
  cmake -S . -B "$work/cmake" -DAGENTSMITHY_BUILD_EXAMPLES=OFF -DAGENTSMITHY_BUILD_TESTS=OFF \
    -DCMAKE_INSTALL_PREFIX="$prefix" >/dev/null &&
    cmake --install "$work/cmake" >/dev/null || return 1
  mkdir -p "$consumer"
  cp "$work/core.cpp" "$work/openai.cpp" "$work/sqlite.cpp" "$consumer/"
  printf '%s\n' 'cmake_minimum_required(VERSION 3.16)' 'project(consumer LANGUAGES CXX)' \
    'find_package(agentsmithy REQUIRED COMPONENTS openai sqlite)' \
    'add_executable(sqlite sqlite.cpp)' \
    'target_link_libraries(sqlite PRIVATE agentsmithy::sqlite)' \
    'add_executable(core core.cpp)' \
    'target_link_libraries(core PRIVATE agentsmithy::agentsmithy)' \
    'add_executable(openai openai.cpp)' \
    'target_link_libraries(openai PRIVATE agentsmithy::openai)' >"$consumer/CMakeLists.txt"
  cmake -S "$consumer" -B "$consumer/build" -DCMAKE_PREFIX_PATH="$prefix" \
    -DCMAKE_CXX_FLAGS=-O0 >/dev/null &&
    cmake --build "$consumer/build" -j2 >/dev/null || return 1
  # The core links no libcurl; the upstream's does.
  if ldd "$consumer/build/core" | grep -q libcurl; then
    echo "core links libcurl"
    return 1
  fi
  ldd "$consumer/build/openai" | grep -q libcurl || {
    echo "openai does not link libcurl"
    return 1
  }
  ldd "$consumer/build/sqlite" | grep -q libsqlite3 || {
    echo "sqlite does not link libsqlite3"
    return 1
  }
  local pc=$prefix/share/pkgconfig
  if PKG_CONFIG_PATH=$pc pkg-config --libs agentsmithy | grep -q curl; then
    echo "agentsmithy.pc brings libcurl"
    return 1
  fi
  PKG_CONFIG_PATH=$pc pkg-config --cflags agentsmithy-openai | grep -q -- -DAGENTSMITHY_OPENAI_SUPPORT || {
    echo "agentsmithy-openai.pc lacks the define"
    return 1
  }
  PKG_CONFIG_PATH=$pc pkg-config --libs agentsmithy-openai | grep -q -- -lcurl || {
    echo "agentsmithy-openai.pc lacks libcurl"
    return 1
  }
  PKG_CONFIG_PATH=$pc pkg-config --cflags --libs agentsmithy-sqlite |
    grep -q -- '-DAGENTSMITHY_SQLITE_SUPPORT.*-lsqlite3' || {
    echo "agentsmithy-sqlite.pc lacks the define or libsqlite3"
    return 1
  }
}
check "CMake and pkg-config: the core alone; agentsmithy::openai with libcurl, ::sqlite with libsqlite3" \
  cmake_package

echo "header: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
