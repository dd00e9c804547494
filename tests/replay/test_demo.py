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


@pytest.mark.slow
def test_a_terminated_demo_stops_its_embedded_redis(tmp_path: Path) -> None:
    """SIGTERM (kill, timeout, a service manager) stops the demo like Ctrl-C: its embedded
    redis-server goes too, instead of being left running."""
    import signal
    import socket
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RULES_")}
    env["RULES_DATA_DIR"] = str(tmp_path / "data")
    proc = subprocess.Popen([sys.executable, "manage.py", "demo", "--bids", "2000", "--users", "500", "--port",
                             str(port)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pid_file = tmp_path / "data" / "demo" / "redis" / "redis.pid"
    deadline = time.monotonic() + 180
    while True:  # serving once the port answers
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
        with socket.socket() as client:
            if client.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.2)
    redis_pid = int(pid_file.read_text().strip())
    os.kill(redis_pid, 0)  # running
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode in (0, 128 + signal.SIGTERM), err[-2000:]  # (the server loop ends cleanly)
    assert "embedded redis-server stopped" in err
    for _ in range(100):
        try:
            os.kill(redis_pid, 0)
        except ProcessLookupError:
            break
        if Path(f"/proc/{redis_pid}/stat").read_text().rpartition(")")[2].split()[0] in ("Z", "X"):
            break  # a zombie waiting for init to reap it: gone
        time.sleep(0.1)
    else:
        raise AssertionError(f"redis-server {redis_pid} still running")
