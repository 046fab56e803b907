"""Wall time of the everyday commands (issue 16: `bench list` took 7-15 s when every plug-in module imported torch),
beside the cost of importing what they no longer import. Prints min and median of N runs per command.

    python benchmarks/cli_startup.py [N]
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {
    "bench --help": ["-m", "bench.cli", "--help"],
    "bench list": ["-m", "bench.cli", "list"],
    "bench list metrics": ["-m", "bench.cli", "list", "metrics"],
    "bench validate robustness": ["-m", "bench.cli", "validate", "robustness"],
    "bench validate smoke --profile paper": ["-m", "bench.cli", "validate", "smoke", "--profile", "paper"],
    "(eager imports: torch + diffusers + transformers)": ["-c", "import torch, diffusers, transformers"],
    "(every plug-in imported with torch loaded)": ["-c", "import torch; from bench.registry import load_builtins; "
                                                         "load_builtins()"],
}


def time_command(args: list[str], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, check=False)
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    print(f"{'command':55s} {'min s':>7s} {'median s':>9s}  (n={n})")
    for name, args in COMMANDS.items():
        times = time_command(args, n)
        print(f"{name:55s} {min(times):7.2f} {statistics.median(times):9.2f}")


if __name__ == "__main__":
    main()
