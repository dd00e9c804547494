"""``manage.py advertisers ...`` and ``manage.py serve``: a real waitress server over loopback with
the embedded log and percolator, driven over HTTP (including an SSE stream)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from rules_service.cli import cli
from rules_service.cli_api import register
from tests.conftest import free_port, wait_for_port

pytestmark = pytest.mark.redis
ROOT = Path(__file__).resolve().parents[2]


def run_cli(args: list[str], redis_url: str, tmp_path: Path) -> tuple[int, str, str]:
    register(cli)
    result = CliRunner().invoke(cli, args, env={"RULES_REDIS_URL": redis_url, "RULES_DATA_DIR": str(tmp_path)})
    return result.exit_code, result.stdout, result.stderr


def test_advertisers_create_list_rotate_revoke(redis_url: str, tmp_path: Path) -> None:
    code, out, _ = run_cli(["advertisers", "create", "Acme Ltd"], redis_url, tmp_path)
    assert code == 0
    created = json.loads(out)
    assert set(created) == {"id", "name", "api_key"} and created["name"] == "Acme Ltd"
    assert len(created["api_key"]) > 40
    code, out, _ = run_cli(["advertisers", "list"], redis_url, tmp_path)
    listed = [json.loads(line) for line in out.splitlines()]
    assert listed == [{"id": created["id"], "name": "Acme Ltd", "created_at": listed[0]["created_at"],
                       "revoked": False}]
    assert created["api_key"] not in out
    import redis as redis_lib

    raw = redis_lib.Redis.from_url(redis_url)
    dump = b"".join(raw.dump(k) or b"" for k in raw.keys("*"))
    assert created["api_key"].encode() not in dump  # stored hashed only
    code, out, _ = run_cli(["advertisers", "rotate-key", created["id"]], redis_url, tmp_path)
    assert code == 0 and json.loads(out)["api_key"] != created["api_key"]
    code, out, _ = run_cli(["advertisers", "revoke", created["id"]], redis_url, tmp_path)
    assert code == 0 and json.loads(out) == {"id": created["id"], "revoked": True}
    code, _, err = run_cli(["advertisers", "revoke", "adv_nope"], redis_url, tmp_path)
    assert code == 2 and "no advertiser 'adv_nope'" in err


def _request(method: str, url: str, key: str, body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.slow
def test_serve_under_waitress_end_to_end(redis_url: str, tmp_path: Path) -> None:
    _, out, _ = run_cli(["advertisers", "create", "Acme"], redis_url, tmp_path)
    key = json.loads(out)["api_key"]
    port = free_port()
    env = {**os.environ, "RULES_REDIS_URL": redis_url, "RULES_DATA_DIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "manage.py", "serve", "--port", str(port), "--threads", "8"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, proc=proc)
        base = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(base + "/healthz", timeout=5) as response:
            assert json.loads(response.read()) == {"status": "ok"}
        status, body = _request("POST", base + "/v1/audiences", key,
                                {"name": "iOS men", "rule": {"bool": {"must": [
                                    {"term": {"gender": "male"}}, {"term": {"device.os": "ios"}}]}}})
        assert status == 201, body
        status, bad = _request("POST", base + "/v1/audiences", key, {"name": "x", "rule": {"term": {"shoe": 1}}})
        assert status == 422 and "rule.term.shoe" in json.dumps(bad["error"]["fields"]), bad
        status, ready = _request("GET", base + "/readyz", key)
        assert status == 200, ready
        # an SSE stream through the real server: first event at once
        request = urllib.request.Request(f"{base}/v1/audiences/{body['id']}/live?max_events=1",
                                         headers={"Authorization": f"Bearer {key}"})
        started = time.monotonic()
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.headers["Content-Type"].startswith("text/event-stream")
            text = response.read().decode()
        assert "event: counts" in text and '"unique_users":0' in text
        assert time.monotonic() - started < 5
        status, gone = _request("GET", base + "/v1/audiences/aud_missing", key)
        assert status == 404 and gone["error"]["type"] == "not_found"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
