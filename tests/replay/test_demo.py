"""``manage.py demo --no-serve`` end to end in a subprocess (embedded everything, small sizes)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_runs_embedded_and_prints_tables(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RULES_")}
    env["RULES_DATA_DIR"] = str(tmp_path / "data")
    proc = subprocess.run([sys.executable, "manage.py", "demo", "--no-serve", "--bids", "40000", "--users", "3000"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "Audience sizes" in out and "Insights:" in out
    rows = [line for line in out.splitlines() if re.search(r"\s+v\d+\s*$", line)]
    assert len(rows) == 5, out
    ninety_days = [int(re.split(r"\s{2,}", row.strip())[3].replace(",", "")) for row in rows]
    assert sum(1 for n in ninety_days if n > 0) >= 4, out
    assert "30-day lookback" in rows[-1] and ninety_days[-1] > 0
    assert "replay rpl_" in proc.stderr and "embedded redis-server stopped" in proc.stderr
    assert "   40,000 bids, " in proc.stderr  # every bid, the last flush window's too
    assert (tmp_path / "data" / "demo" / ".rules-demo").exists()
    # a second run starts fresh in the same directory
    again = subprocess.run([sys.executable, "manage.py", "demo", "--no-serve", "--bids", "2000", "--users", "500"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
