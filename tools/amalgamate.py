#!/usr/bin/env python3
"""Builds the single header agentsmithy.hpp from include/agentsmithy.hpp and its parts.

Each `#include "agentsmithy/..."` line of include/agentsmithy.hpp is replaced by
the part's text, preceded by a line naming it; everything else is copied as it
is. Standard library only.

  tools/amalgamate.py            writes agentsmithy.hpp
  tools/amalgamate.py --check    exits 1 (and says which) when agentsmithy.hpp
                                 differs from what the parts make
"""
import difflib
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INCLUDE = os.path.join(ROOT, "include")
TOP = os.path.join(INCLUDE, "agentsmithy.hpp")
OUT = os.path.join(ROOT, "agentsmithy.hpp")
PART = re.compile(r'^#include "(agentsmithy/[^"]+)"\s*$')


def amalgamate():
    out, seen = [], set()
    with open(TOP, encoding="utf-8") as f:
        for line in f:
            m = PART.match(line)
            if not m:
                out.append(line)
                continue
            name = m.group(1)
            if name in seen:
                sys.exit(f"amalgamate: {name} is included twice")
            seen.add(name)
            path = os.path.join(INCLUDE, name)
            if not os.path.isfile(path):
                sys.exit(f"amalgamate: include/{name} does not exist")
            with open(path, encoding="utf-8") as part:
                text = part.read()
            if PART.search(text) or re.search(r"^#pragma once", text, re.M):
                sys.exit(f"amalgamate: include/{name}: a part includes no other part "
                         "and has no #pragma once (the top file orders them)")
            out.append(f"// ---- include/{name}\n")
            out.append(text if text.endswith("\n") else text + "\n")
    parts = {os.path.relpath(os.path.join(d, f), INCLUDE)
             for d, _, files in os.walk(os.path.join(INCLUDE, "agentsmithy"))
             for f in files if f.endswith(".hpp")}
    if parts - seen:
        sys.exit("amalgamate: parts not included by include/agentsmithy.hpp: " +
                 ", ".join(sorted(parts - seen)))
    return "".join(out)


def main():
    text = amalgamate()
    if "--check" in sys.argv[1:]:
        current = open(OUT, encoding="utf-8").read() if os.path.exists(OUT) else ""
        if current != text:
            diff = difflib.unified_diff(current.splitlines(True), text.splitlines(True),
                                        "agentsmithy.hpp (committed)",
                                        "agentsmithy.hpp (from include/)", n=1)
            sys.stdout.writelines(list(diff)[:60])
            print("amalgamate: agentsmithy.hpp differs from its parts: run `make amalgamate`")
            return 1
        print("amalgamate: agentsmithy.hpp matches its parts")
        return 0
    tmp = OUT + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, OUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
