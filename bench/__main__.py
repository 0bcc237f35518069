"""Every section of RESULTS.md, one bench after the other, in the order of the file.

    python -m bench                       # all of them (about 15 minutes on a quiet 2-core machine)
    python -m bench --no-write            # printed only
    python -m bench --only scale-pg       # some of them (section names, as in RESULTS.md)

Each bench runs as ``python -m bench.<name> ...`` in a process of its own, as a person would run
it, with ``--quiet-wait`` and ``--no-write`` passed on. Stops at the first bench that fails.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from bench.common import ORDER, ROOT

# Section name -> the command line that writes it (after ``python -m``).
COMMANDS: dict[str, list[str]] = {
    "inbound": ["bench.inbound"],
    "hunting": ["bench.hunting"],
    "hunting-pg": ["bench.hunting", "--db", "pg"],
    "hunting-pg-hunter-process": ["bench.hunting", "--db", "pg", "--hunter-process"],
    "scale": ["bench.scale"],
    "scale-pg": ["bench.scale", "--db", "pg"],
    "scale-pg-hunter-process": ["bench.scale", "--db", "pg", "--hunter-process"],
    "recovery": ["bench.recovery"],
    "recovery-pg": ["bench.recovery", "--db", "pg"],
}
assert list(COMMANDS) == ORDER, "a section of RESULTS.md without its command, or the other way round"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quiet-wait", type=float, default=30.0, help="passed on (each bench's default is 300 s)")
    ap.add_argument("--no-write", action="store_true", help="passed on: print only")
    ap.add_argument("--only", action="append", choices=ORDER, help="these sections only (repeatable)")
    args = ap.parse_args()
    for name in ORDER:
        if args.only and name not in args.only:
            continue
        argv = [sys.executable, "-m", *COMMANDS[name], "--quiet-wait", str(args.quiet_wait)]
        if args.no_write:
            argv.append("--no-write")
        print(f"\n### {name}: {' '.join(argv[1:])}", flush=True)
        code = subprocess.call(argv, cwd=ROOT)
        if code != 0:
            print(f"### {name} failed (exit {code}): stopping", file=sys.stderr)
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
