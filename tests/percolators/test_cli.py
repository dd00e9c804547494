"""``manage.py percolate`` through click's CliRunner and as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner

from percolators.cli import register
from percolators.embedded import EmbeddedPercolator
from percolators.port import Rule
from percolators.workload import WORKLOAD_NOW, generate_documents, generate_rules
from rules_service.cli import cli
from rules_service.schema import USER_MAPPING

ROOT = Path(__file__).resolve().parents[2]
if "percolate" not in cli.commands:
    register(cli)

RULES = [
    {"id": "women", "query": {"term": {"gender": "female"}}},
    {"id": "recent", "query": {"range": {"last_seen": {"gte": "now-7d/d"}}}},
    {"id": "adults", "query": {"range": {"age": {"gte": 18}}}},
]
DOCS_TEXT = "\n".join([
    json.dumps({"gender": "female", "age": 30, "last_seen": "2026-01-14T00:00:00Z"}),
    "not json",
    "[1, 2]",
    "",
    json.dumps({"age": "old"}),
    json.dumps({"age": 12}),
]) + "\n"


def write_inputs(tmp_path: Path, rules=RULES, docs_text=DOCS_TEXT) -> dict[str, Path]:
    paths = {"mapping": tmp_path / "mapping.json", "rules": tmp_path / "rules.jsonl", "docs": tmp_path / "docs.jsonl"}
    paths["mapping"].write_text(json.dumps(USER_MAPPING))
    paths["rules"].write_text("".join(json.dumps(r) + "\n" for r in rules) if isinstance(rules, list) else rules)
    paths["docs"].write_text(docs_text)
    return paths


def args_for(paths: dict[str, Path], *extra: str) -> list[str]:
    return ["percolate", "--mapping", str(paths["mapping"]), "--rules", str(paths["rules"]), "--docs",
            str(paths["docs"]), *extra]


def run(paths, *extra):
    return CliRunner().invoke(cli, args_for(paths, *extra))


def test_one_line_per_document_in_order_with_errors_inline(tmp_path):
    result = run(write_inputs(tmp_path), "--now", "2026-01-15T12:00:00Z")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["doc"] for line in lines] == [0, 1, 2, 3, 4, 5]
    assert lines[0] == {"doc": 0, "matches": ["adults", "recent", "women"]}
    assert "not valid JSON" in lines[1]["error"]
    assert "not a JSON object" in lines[2]["error"]
    assert "error" in lines[3]
    assert "age" in lines[4]["error"]
    assert lines[5] == {"doc": 5, "matches": []}


def test_now_pins_date_math(tmp_path):
    result = run(write_inputs(tmp_path), "--now", "2026-03-01T00:00:00+00:00", "--batch-size", "2")
    assert json.loads(result.stdout.splitlines()[0])["matches"] == ["adults", "women"]


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ([{"id": "bad", "query": {"bool": {"filter": [{"term": {"unmapped": 1}}]}}}], "'bad' at bool.filter[0]"),
        ([{"id": "s", "query": {"script": {"script": "1"}}}], "invalid rule 's'"),
        ('{"id": "x", "query": {}}\n{oops\n', "rules line 2"),
        ([{"query": {"match_all": {}}}], "rules line 1"),
        ([{"id": "q"}], "rule 'q' (line 1): missing 'query'"),
        ([RULES[0], RULES[0]], "duplicate id"),
    ],
)
def test_bad_rules_exit_2_with_a_clean_message(tmp_path, rules, message):
    result = run(write_inputs(tmp_path, rules))
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert result.stdout == ""


def test_missing_files_and_bad_now_are_clean_errors(tmp_path):
    paths = write_inputs(tmp_path)
    for key in ("mapping", "rules", "docs"):
        broken = dict(paths, **{key: tmp_path / "missing.json"})
        result = run(broken)
        assert result.exit_code == 2 and "missing.json" in result.stderr, (key, result.output)
    result = run(paths, "--now", "yesterday")
    assert result.exit_code == 2 and "--now" in result.stderr
    result = run(paths, "--backend", "ftp://nope")
    assert result.exit_code == 2 and "PERCOLATOR_URL" in result.stderr


def test_output_equals_the_engine_on_the_workload(tmp_path):
    rules = generate_rules(300, seed=4)
    docs = generate_documents(200, seed=5)
    paths = write_inputs(tmp_path, rules, "".join(json.dumps(d) + "\n" for d in docs))
    result = run(paths, "--now", WORKLOAD_NOW.isoformat(), "--backend", "embedded:", "--batch-size", "64")
    assert result.exit_code == 0, result.output
    engine = EmbeddedPercolator(presearcher="match_all")
    engine.upsert([Rule(r["id"], r["query"]) for r in rules])
    expected = engine.percolate(docs, now=WORKLOAD_NOW)
    assert [json.loads(line)["matches"] for line in result.stdout.splitlines()] == expected


def test_real_subprocess(tmp_path):
    paths = write_inputs(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RULES_")}
    done = subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), *args_for(paths, "--now", "1768478400000")],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[0]) == {"doc": 0, "matches": ["adults", "recent", "women"]}
    assert len(done.stdout.splitlines()) == 6
    bad = write_inputs(tmp_path, [{"id": "r1", "query": {"term": {"nope": "x"}}}])
    done = subprocess.run([sys.executable, str(ROOT / "manage.py"), *args_for(bad)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)
    assert done.returncode == 2
    assert "r1" in done.stderr and "Traceback" not in done.stderr and done.stdout == ""


def _reference_output(percolator, lines: list[bytes], now) -> bytes:
    """The output format, one document at a time: what ``run_percolate`` must write, byte for byte."""
    out = []
    for number, line in enumerate(lines):
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            error = f"not valid JSON: {exc}" if line.strip() else "blank line: not a JSON object"
            out.append(orjson.dumps({"doc": number, "error": error}))
            continue
        if not isinstance(value, dict):
            out.append(orjson.dumps({"doc": number, "error": f"not a JSON object (got {type(value).__name__})"}))
            continue
        result = percolator.percolate([value], now=now, on_error="skip")[0]
        record = {"doc": number, "error": str(result)} if isinstance(result, Exception) else {
            "doc": number, "matches": result}
        out.append(orjson.dumps(record))
    return b"".join(line + b"\n" for line in out)


# ids a naive line splitter would trip on: the record separator, quotes, new lines, non-ASCII
_TRICKY_IDS = ['},{"doc":1', 'a"b', "line\nbreak", "é日本", "}\n{", "x" * 300]


@pytest.mark.parametrize("batch_size", [1, 3, 64, 8192])
def test_run_percolate_writes_exactly_the_reference_format(batch_size):
    import io

    from percolators.cli import run_percolate

    rules = [Rule(r["id"], r["query"]) for r in generate_rules(150, seed=6)]
    rules += [Rule(rule_id, {"term": {"gender": "female"}}) for rule_id in _TRICKY_IDS]
    engine = EmbeddedPercolator()
    engine.upsert(rules)
    lines = [orjson.dumps(d) + b"\n" for d in generate_documents(120, seed=7)]
    odd = [b"not json\n", b"[1, 2]\n", b"\n", b"   \n", b'{"age": "old"}\n', b"7\n", b'"text"\n', b"null\n",
           b'{"gender": "female"}\n', b'{"geo.city": "London", "gender": "female"}\n', b"{}\n", b'{"a": }\n']
    for i, line in enumerate(odd):
        lines.insert(i * 9, line)
    lines[-1] = lines[-1].rstrip(b"\n")  # no new line at the end of the file
    out = io.BytesIO()
    count = run_percolate(engine, io.BytesIO(b"".join(lines)), out, now=WORKLOAD_NOW, batch_size=batch_size)
    assert count == len(lines)
    expected = _reference_output(engine, lines, WORKLOAD_NOW)
    assert out.getvalue() == expected
    assert expected.count(b"\n") == len(lines) and b'"error"' in expected and b"line\\nbreak" in expected


def test_run_percolate_on_an_empty_input_writes_nothing():
    import io

    from percolators.cli import run_percolate

    out = io.BytesIO()
    assert run_percolate(EmbeddedPercolator(), io.BytesIO(b""), out, now=None, batch_size=10) == 0
    assert out.getvalue() == b""
