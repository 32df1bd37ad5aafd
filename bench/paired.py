"""Time two commands from outside, in turn (A B A B ...), and report the ratio A/B pair by pair.

    python bench/paired.py -n 7 --vs "B COMMAND" -- A COMMAND [ARG ...]

Each run is a whole process, start-up included: wall seconds (a monotonic clock around start and exit), CPU
seconds (user + system) and peak RSS of the largest process it waited for, as the kernel accounts for the finished
child (wait4). Each figure is printed as min / median / max; quote the median. Pairing keeps the ratio meaningful
when a shared machine's speed drifts during the call. Without --vs, only A is timed. A command is split as a shell
splits words but not given a shell: write `sh -c '...'` for pipes, redirections or variables. What a command prints
is discarded; the first line names the machine (CPU model, cores this process may use, load average) and the date.
"""
from __future__ import annotations

import argparse
import datetime
import os
import shlex
import statistics
import subprocess
import sys
import time


def machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"{now}; {model}, {len(os.sched_getaffinity(0))} cores for this process; load average {load}"


def run_once(argv: list[str]) -> dict:
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "peak_mib": usage.ru_maxrss / 1024,
            "exit": proc.returncode}


def spread(values) -> str:
    return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", "--runs", type=int, default=5, help="timed runs of each command (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of each first (default 1)")
    p.add_argument("--vs", help="command B, one string split as a shell splits words")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- command A and its arguments")
    args = p.parse_args()
    a = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not a:
        p.error("give command A after --")
    commands = {"A": a, **({"B": shlex.split(args.vs)} if args.vs else {})}
    print(machine(), flush=True)
    for _ in range(args.warmup):
        for argv in commands.values():
            run_once(argv)
    runs = {name: [] for name in commands}
    for i in range(args.runs):
        for name, argv in commands.items():
            r = run_once(argv)
            runs[name].append(r)
            print(f"run {i + 1} {name}: wall {r['wall']:.2f} s, cpu {r['cpu']:.2f} s, peak {r['peak_mib']:.0f} MiB, "
                  f"exit {r['exit']}", flush=True)
    for name, argv in commands.items():
        rs = runs[name]
        print(f"{name}: {shlex.join(argv)}\n   wall s {spread([r['wall'] for r in rs])}   cpu s "
              f"{spread([r['cpu'] for r in rs])}   peak MiB {spread([r['peak_mib'] for r in rs])}   (min / median / max)")
    if "B" in runs:
        ratios = [ra["wall"] / rb["wall"] for ra, rb in zip(runs["A"], runs["B"])]
        print(f"A/B wall, pair by pair: {spread(ratios)}")
    return 0 if all(r["exit"] == 0 for rs in runs.values() for r in rs) else 1


if __name__ == "__main__":
    sys.exit(main())
