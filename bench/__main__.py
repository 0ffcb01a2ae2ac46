"""`python -m bench NAME [--json] [...]`: run one benchmark (module bench.<name>, `-` read as `_`)."""

from __future__ import annotations

import importlib
import pkgutil
import sys

import bench


def main(argv: list[str]) -> int:
    # Every module of the package is a benchmark but this one (__main__) and the shared helpers.
    names = sorted(m.name.replace("_", "-") for m in pkgutil.iter_modules(bench.__path__)
                   if not m.name.startswith("_") and m.name != "common")
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m bench NAME [--json] [options]\nbenchmarks: " + ", ".join(names))
        return 0 if argv else 2
    name = argv[0]
    if name not in names:
        print(f"bench: unknown benchmark {name!r}; choose one of: {', '.join(names)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"bench.{name.replace('-', '_')}")
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
