"""Result rows for the load test and the soak: run info (date, device, revision), percentiles, CSV."""
from __future__ import annotations

import csv
import datetime
import os
import platform
import subprocess
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"


def run_info() -> dict:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        rev = "unknown"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": f"{cpu} x{os.cpu_count()}",
            "revision": rev}


def percentile(xs, q: float) -> float:
    """Linear-interpolated q-th percentile (q in [0, 100]) of a non-empty sequence."""
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def write_csv(path, rows: list[dict]) -> Path:
    """Append rows to path (header written when the file is new)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)
    return path


def dated(stem: str) -> Path:
    return RESULTS / f"{stem}_{datetime.date.today().isoformat()}.csv"
