"""Run every benchmark in bench/ and assemble docs/benchmarks.md.

Each `bench/bench_*.py` is a standalone script that writes its own section to
`docs/benchmarks/<name>.md` (machine, command, numbers). This driver runs them one after the other
(never in parallel: they time things) and joins the sections under a header describing the machine.

    python -m bench.run_all                 # all benchmarks, then assemble
    python -m bench.run_all --only search   # one benchmark, then assemble
    python -m bench.run_all --assemble      # only assemble the existing sections
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTIONS = REPO / "docs" / "benchmarks"
OUTPUT = REPO / "docs" / "benchmarks.md"


def machine_summary() -> str:
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import torch

    from densenas.latency import describe_device

    cpu = describe_device("cpu")["name"]
    return (f"{cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB RAM, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def assemble() -> Path:
    parts = [
        "# Benchmarks\n",
        "Speed and memory goals live here, never in timed tests. Each section names the machine and the",
        "command that produced it; regenerate everything with `make bench` (or one section with",
        "`python -m bench.run_all --only NAME`).\n",
        f"Assembled on: {machine_summary()}.\n",
    ]
    for section in sorted(SECTIONS.glob("*.md")):
        parts.append(section.read_text().rstrip() + "\n")
    OUTPUT.write_text("\n".join(parts))
    return OUTPUT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", default=[], help="run only bench_<NAME>.py (repeatable)")
    parser.add_argument("--assemble", action="store_true", help="do not run anything, only assemble")
    args = parser.parse_args(argv)

    failures = []
    if not args.assemble:
        scripts = sorted((REPO / "bench").glob("bench_*.py"))
        if args.only:
            scripts = [s for s in scripts if s.stem.removeprefix("bench_") in args.only]
            if not scripts:
                parser.error(f"no benchmark named {args.only}; have: "
                             + ", ".join(s.stem.removeprefix('bench_') for s in sorted((REPO / 'bench').glob('bench_*.py'))))
        for script in scripts:
            print(f"=== {script.name}", flush=True)
            start = time.time()
            rc = subprocess.call([sys.executable, str(script)], cwd=REPO)
            print(f"=== {script.name}: exit {rc} after {time.time() - start:.0f} s", flush=True)
            if rc:
                failures.append(script.name)
    print(f"wrote {assemble()}")
    if failures:
        print("failed: " + ", ".join(failures), file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
