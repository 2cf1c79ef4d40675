"""What the benchmarks record about the machine while they run."""
from __future__ import annotations

import os
import subprocess


def uptime() -> str:
    """``uptime``'s line (the 1/5/15-minute load), or the load average where the command is missing."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except Exception:  # noqa: BLE001 -- a benchmark never fails for want of a load figure
        return "load average " + " / ".join(f"{x:.2f}" for x in os.getloadavg())
