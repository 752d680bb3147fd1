#!/usr/bin/env bash
# tests/tsan/build-cpp-httplib.sh OUT [CXX] [FLAGS]
#
# Rebuilds the cpp-httplib that Debian installed (libcpp-httplib-dev) with
# ThreadSanitizer, from Debian's own source package, for `make test-tsan`.
#
# Why: Debian ships cpp-httplib as a compiled, uninstrumented shared library.
# Our request handlers run under its frames (its accept loop and its parser
# call into agentsmithy), and TSan cannot see the memory accesses made inside
# an uninstrumented library, so it reports races against them that are not
# there, or misses the order they establish. Rebuilt with -fsanitize=thread,
# the library is checked like our own code, with no suppressions.
#
# What it does (all of it under OUT, which is inside build/ and never
# committed):
#   1. fetches the source package of the installed version with
#      `apt-get source` (adds a deb-src entry mirroring the configured Debian
#      repositories if apt has none); dpkg-source applies Debian's patches;
#   2. splits httplib.h into a header and httplib.cc with the package's own
#      split.py, as Debian's build does (the header is the same as
#      /usr/include/httplib.h; a difference is reported);
#   3. compiles httplib.cc with the flags Debian uses (C++11,
#      -DCPPHTTPLIB_USE_POLL, the ABI macros from pkg-config) plus FLAGS, into
#      OUT/libcpp-httplib.a, next to OUT/include/httplib.h.
set -euo pipefail

out=${1:?usage: build-cpp-httplib.sh OUT [CXX] [FLAGS]}
cxx=${2:-clang++}
flags=${3:--O1 -g -fno-omit-frame-pointer -fsanitize=thread}

binary_pkg=libcpp-httplib-dev
src_pkg=$(dpkg-query -W -f='${source:Package}' "$binary_pkg")
version=$(dpkg-query -W -f='${source:Version}' "$binary_pkg")
sudo=
if [ "$(id -u)" != 0 ]; then sudo=sudo; fi

has_source() {
  apt-cache showsrc "$src_pkg" 2>/dev/null | grep -qx "Version: $version"
}

if ! has_source; then
  # No deb-src entry (Debian's default): add deb-src twins of the configured
  # Debian repositories, in files of our own.
  sources=/etc/apt/sources.list.d/agentsmithy-deb-src.sources
  oneline=/etc/apt/sources.list.d/agentsmithy-deb-src.list
  echo "Adding deb-src entries to /etc/apt/sources.list.d/ to fetch the $src_pkg $version source"
  entries=
  for f in /etc/apt/sources.list.d/*.sources; do
    if [ ! -f "$f" ] || [ "$f" = "$sources" ]; then continue; fi
    grep -q 'debian\.org' "$f" || continue
    entries+=$(sed -e 's/^Types:.*/Types: deb-src/' "$f")$'\n\n'
  done
  lines=
  if [ -f /etc/apt/sources.list ]; then
    lines=$(sed -n 's/^deb \(.*debian\.org.*\)/deb-src \1/p' /etc/apt/sources.list)
  fi
  if [ -z "$entries" ] && [ -z "$lines" ]; then
    # shellcheck disable=SC1091
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
    entries="Types: deb-src
URIs: http://deb.debian.org/debian
Suites: $codename $codename-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian-security
Suites: $codename-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"
  fi
  if [ -n "$entries" ]; then printf '%s' "$entries" | $sudo tee "$sources" >/dev/null; fi
  if [ -n "$lines" ]; then printf '%s\n' "$lines" | $sudo tee "$oneline" >/dev/null; fi
  $sudo apt-get update -qq
fi
if ! has_source; then
  echo "error: apt cannot find the source package $src_pkg $version" >&2
  exit 1
fi

rm -rf "$out"
mkdir -p "$out/src" "$out/include"
(
  cd "$out/src"
  # As root, apt warns that its sandbox user cannot write here: harmless.
  apt-get source -qq -o APT::Sandbox::User=root "$src_pkg=$version" >/dev/null
)
srcdir=$(find "$out/src" -mindepth 1 -maxdepth 1 -type d -name "$src_pkg-*" | head -n 1)
[ -f "$srcdir/split.py" ] || { echo "error: no split.py in $srcdir" >&2; exit 1; }
python3 "$srcdir/split.py" --out "$out/include" >/dev/null
if ! cmp -s "$out/include/httplib.h" /usr/include/httplib.h; then
  echo "warning: the split httplib.h differs from /usr/include/httplib.h;" \
    "the TSan build uses its own copy consistently" >&2
fi

# shellcheck disable=SC2086,SC2046  # flags and pkg-config's output are words
"$cxx" -std=c++11 $flags -fPIC -DCPPHTTPLIB_USE_POLL $(pkg-config --cflags cpp-httplib) \
  -I"$out/include" -c "$out/include/httplib.cc" -o "$out/httplib.o"
ar rcs "$out/libcpp-httplib.a.tmp" "$out/httplib.o"
mv "$out/libcpp-httplib.a.tmp" "$out/libcpp-httplib.a"
echo "built $out/libcpp-httplib.a: $src_pkg $version from source, $cxx $flags"
