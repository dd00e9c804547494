"""``manage.py produce``, ``generate-bids`` and ``worker --drain`` through click's runner."""

from __future__ import annotations

from pathlib import Path

import click
import orjson
import pytest
from click.testing import CliRunner

from workers.bidgen import BidGenerator, user_key
from workers.cli import register

END_MS = 1_795_132_800_000  # 2026-11-20T00:00:00Z


def is_json(value: bytes) -> bool:
    try:
        orjson.loads(value)
    except orjson.JSONDecodeError:
        return False
    return True


@pytest.fixture
def cli() -> click.Group:
    group = click.Group("manage.py")
    register(group)
    return group


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"RULES_DATA_DIR": str(tmp_path), "RULES_BIDS_PARTITIONS": "3", **extra}


def test_produce_reports_bad_lines_and_keeps_the_rest(cli: click.Group, tmp_path: Path) -> None:
    from rules_service.config import Settings
    from workers.log.factory import create_log

    lines = [
        orjson.dumps({"id": "1", "user": {"id": "alice"}}),
        b"{broken",
        b"",
        orjson.dumps({"id": "2", "device": {"ifa": "ifa-bob"}}),
        b"not json at all",
        orjson.dumps(["no", "user"]),
    ]
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")
    result = CliRunner().invoke(cli, ["produce", "bids", str(source)], env=env_for(tmp_path))
    assert result.exit_code == 1
    assert "line 2: not JSON" in result.stderr and "line 5: not JSON" in result.stderr
    assert '"produced": 3' in result.stderr

    log = create_log(Settings(DATA_DIR=tmp_path, BIDS_PARTITIONS=3))
    assert log.describe_topic("bids").partitions == 3
    records = [r for batch in log.scan_compacted("bids") for r in batch]
    assert sorted((r.key, r.value) for r in records if r.key) == [(b"alice", lines[0]), (b"ifa-bob", lines[3])]
    assert len(records) == 3
    log.close()


def test_produce_creates_compacted_topics_and_keys_rule_changes(cli: click.Group, tmp_path: Path) -> None:
    from rules_service.config import Settings
    from workers.log.factory import create_log

    change = orjson.dumps({"audience_id": "a1", "advertiser_id": "x", "version": 3, "query": {"match_all": {}}})
    result = CliRunner().invoke(cli, ["produce", "audiences.rules"], input=change + b"\n", env=env_for(tmp_path))
    assert result.exit_code == 0, result.output
    log = create_log(Settings(DATA_DIR=tmp_path))
    assert log.describe_topic("audiences.rules").cleanup_policy == "compact"
    assert [r.key for batch in log.scan_compacted("audiences.rules") for r in batch] == [b"a1@v3"]
    log.close()


def test_generate_bids_is_deterministic_and_realistic(cli: click.Group, tmp_path: Path) -> None:
    args = ["generate-bids", "--users", "50", "--bids", "300", "--seed", "9", "--end", "2026-11-20T00:00:00Z"]
    first = CliRunner().invoke(cli, args, env=env_for(tmp_path))
    second = CliRunner().invoke(cli, args, env=env_for(tmp_path))
    assert first.exit_code == 0 and first.stdout_bytes == second.stdout_bytes
    bids = [orjson.loads(line) for line in first.stdout_bytes.splitlines()]
    assert len(bids) == 300
    users = {user_key(b) for b in bids}
    assert 10 < len(users) <= 50  # a population seen many times
    for bid in bids:
        assert bid["device"]["geo"]["country"] == "GBR" and bid["imp"][0]["banner"]["w"] > 0
        received = bid["ext"]["received_at"]
        if isinstance(received, int):
            assert END_MS - 7 * 86_400_000 <= received < END_MS
    other = CliRunner().invoke(cli, [*args[:-4], "--seed", "10"], env=env_for(tmp_path))
    assert other.stdout_bytes != first.stdout_bytes
    bad = CliRunner().invoke(cli, ["generate-bids", "--end", "yesterday"], env=env_for(tmp_path))
    assert bad.exit_code == 2 and "--end" in bad.output


def test_generator_profiles_are_stable_per_user() -> None:
    generator = BidGenerator(seed=1, users=30, days=1)
    seen: dict[bytes, tuple[object, ...]] = {}
    for bid in generator.bids(500):
        assert isinstance(bid, dict)
        key = user_key(bid)
        assert key is not None
        profile = (bid["user"].get("yob"), bid["user"].get("gender"), bid["device"]["geo"]["city"],
                   bid["device"]["model"], bid["device"]["carrier"])
        assert seen.setdefault(key, profile) == profile
    invalid = [b for b in BidGenerator(seed=1, users=30, invalid_rate=0.2).bids(500) if isinstance(b, bytes)]
    assert 50 < len(invalid) < 150


@pytest.mark.redis
def test_worker_drain_prints_a_summary(cli: click.Group, tmp_path: Path, redis_url: str) -> None:
    generator = BidGenerator(seed=3, users=100, days=1, invalid_rate=0.05)
    lines = [value for _, value in generator.messages(400) if is_json(value)]
    source = tmp_path / "bids.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")
    env = env_for(tmp_path, RULES_REDIS_URL=redis_url)
    rule = orjson.dumps({"audience_id": "all", "advertiser_id": "x", "version": 1, "query": {"match_all": {}}})
    assert CliRunner().invoke(cli, ["produce", "audiences.rules"], input=rule, env=env).exit_code == 0
    assert CliRunner().invoke(cli, ["produce", "bids", str(source)], env=env).exit_code == 0
    result = CliRunner().invoke(cli, ["worker", "--drain", "--batch-size", "64", "--loglevel", "WARNING"], env=env)
    assert result.exit_code == 0, result.output
    summary = orjson.loads(result.stdout.strip().splitlines()[-1])
    assert summary["processed"] == len(lines)
    assert summary["dlq"] == sum(summary["dlq_reasons"].values()) > 0
    assert summary["matched"] == len(lines) - summary["dlq"]
    assert summary["bids_per_s"] > 0 and summary["batches"] >= len(lines) // 64
    again = CliRunner().invoke(cli, ["worker", "--drain"], env=env)
    assert orjson.loads(again.stdout.strip().splitlines()[-1])["processed"] == 0  # nothing left: resumes at the end
    bad = CliRunner().invoke(cli, ["worker", "--drain", "--partitions", "x"], env=env)
    assert bad.exit_code == 2


# --- clean errors for an unreachable Redis / log / percolator (every command of COMMAND_MODULES) ---

def full_cli() -> click.Group:
    import importlib

    from rules_service.cli import COMMAND_MODULES

    group = click.Group("manage.py")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(group)
    return group


BAD_REDIS = "redis://127.0.0.1:1/0"
BAD_LOG = "kafka://127.0.0.1:1?request_timeout_ms=500"


def assert_clean_error(result: object, *needles: str) -> None:
    from click.testing import Result

    assert isinstance(result, Result)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ")
    for needle in needles:
        assert needle in line, line


@pytest.mark.parametrize("args", [
    ["worker", "--drain"],
    ["replay", "x", "--days", "3"],
    ["advertisers", "list"],
    ["advertisers", "create", "acme"],
    ["serve", "--port", "0"],
])
def test_unreachable_redis_is_a_clean_error(tmp_path: Path, args: list[str]) -> None:
    result = CliRunner().invoke(full_cli(), args, env=env_for(tmp_path, RULES_REDIS_URL=BAD_REDIS))
    assert_clean_error(result, "127.0.0.1:1", "RULES_REDIS_URL")


@pytest.mark.parametrize("args", [["worker", "--drain"], ["produce", "bids"]])
def test_unreachable_log_is_a_clean_error(tmp_path: Path, args: list[str]) -> None:
    env = env_for(tmp_path, RULES_LOG_URL=BAD_LOG, RULES_REDIS_URL=BAD_REDIS)
    result = CliRunner().invoke(full_cli(), args, input=b"{}\n", env=env)
    assert_clean_error(result, "127.0.0.1:1")


def test_unreachable_percolator_is_a_clean_error(tmp_path: Path) -> None:
    (tmp_path / "m.json").write_text('{"properties": {"a": {"type": "keyword"}}}')
    (tmp_path / "r.jsonl").write_text('{"id": "r", "query": {"match_all": {}}}\n')
    (tmp_path / "d.jsonl").write_text('{"a": "x"}\n')
    args = ["percolate", "--mapping", str(tmp_path / "m.json"), "--rules", str(tmp_path / "r.jsonl"),
            "--docs", str(tmp_path / "d.jsonl"), "--backend", "http://127.0.0.1:1"]
    result = CliRunner().invoke(full_cli(), args, env=env_for(tmp_path))
    assert_clean_error(result, "http://127.0.0.1:1", "--backend")


def test_bad_setting_is_a_clean_error(tmp_path: Path) -> None:
    for args in (["worker", "--drain"], ["produce", "bids"], ["redis", "status"], ["replay", "x", "--days", "1"]):
        result = CliRunner().invoke(full_cli(), args, input=b"", env=env_for(tmp_path, RULES_BIDS_PARTITIONS="x"))
        assert_clean_error(result, "RULES_BIDS_PARTITIONS")


# --- produce: an unknown topic is a typo unless --create ---

def test_produce_to_an_unknown_topic_needs_create(cli: click.Group, tmp_path: Path) -> None:
    from rules_service.config import Settings
    from workers.log.factory import create_log

    env = env_for(tmp_path)
    assert CliRunner().invoke(cli, ["produce", "bids"], input=b"{}\n", env=env).exit_code == 0
    typo = CliRunner().invoke(cli, ["produce", "bidz"], input=b"{}\n", env=env)
    assert_clean_error(typo, "'bidz'", "does not exist", "bids", "--create")
    log = create_log(Settings(DATA_DIR=tmp_path))
    assert "bidz" not in log.list_topics()
    log.close()

    made = CliRunner().invoke(cli, ["produce", "scratch", "--create"], input=b"{}\n", env=env)
    assert made.exit_code == 0, made.output
    again = CliRunner().invoke(cli, ["produce", "scratch"], input=b"{}\n", env=env)  # exists now
    assert again.exit_code == 0, again.output
    # every standard topic is still created on first use without --create
    for topic, line in (("users.last_seen", b'{"user_id": "u1"}'), ("replays", b"{}"), ("bids.dlq", b"{}")):
        result = CliRunner().invoke(cli, ["produce", topic], input=line + b"\n", env=env)
        assert result.exit_code == 0, result.output
    log = create_log(Settings(DATA_DIR=tmp_path))
    assert [r.value for batch in log.scan_compacted("scratch") for r in batch] == [b"{}", b"{}"]
    log.close()
