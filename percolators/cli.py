"""``manage.py percolate``: dry-run rules against documents (ops use it; it also checks the engine).

    python manage.py percolate --mapping MAPPING.json --rules RULES.jsonl --docs DOCS.jsonl \\
        [--now 2026-01-15T12:00:00Z] [--backend embedded:|http://es:9200] [--batch-size 4096]

RULES.jsonl holds one ``{"id": "...", "query": {...}}`` per line; DOCS.jsonl one JSON document per
line. For each document line, in order, stdout gets ``{"doc": <0-based line>, "matches": [...]}``
(sorted rule ids) or ``{"doc": <line>, "error": "..."}`` when the line is not a JSON object or the
document cannot be indexed; the run goes on. A bad rules file or an invalid rule stops everything
before any output: exit status 2 and a message naming the line or rule id.
"""

from __future__ import annotations

import gc
import sys
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import IO, Any

import click
import orjson

from percolators.errors import InvalidRuleError, PercolatorError
from percolators.port import Percolator, Rule
from rules_service.cli import CliError
from rules_service.cli_redis import clean_errors
from rules_service.config import ConfigError, load_settings


def parse_now(text: str | None) -> datetime | None:
    """``--now``: ISO 8601 (``Z`` or an offset; naive means UTC) or epoch milliseconds."""
    if text is None:
        return None
    raw = text.strip()
    try:
        if raw.lstrip("-").isdigit():
            return datetime.fromtimestamp(int(raw) / 1000, tz=UTC)
        value = datetime.fromisoformat(raw.replace("Z", "+00:00") if raw.endswith("Z") else raw)
    except (ValueError, OverflowError, OSError):
        raise CliError(
            f"--now {text!r}: expected an ISO 8601 date-time (e.g. 2026-01-15T12:00:00Z) or epoch millis"
        ) from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def read_mapping(path: Path) -> dict[str, Any]:
    try:
        data = orjson.loads(path.read_bytes())
    except OSError as exc:
        raise CliError(f"--mapping {path}: cannot read: {exc.strerror or exc}") from None
    except orjson.JSONDecodeError as exc:
        raise CliError(f"--mapping {path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CliError(f"--mapping {path}: expected a JSON object with 'properties'")
    return data


def read_rules(path: Path) -> list[Rule]:
    """Every rule of RULES.jsonl; a malformed line or duplicate id is a CliError naming the line."""
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise CliError(f"--rules {path}: cannot read: {exc.strerror or exc}") from None
    rules: list[Rule] = []
    seen: dict[str, int] = {}
    with handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue  # blank lines in a rules file are harmless
            where = f"{path}:{number}"
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise CliError(f"rules line {number} ({where}): not valid JSON: {exc}") from None
            if not isinstance(entry, dict):
                raise CliError(f"rules line {number} ({where}): expected an object {{\"id\": ..., \"query\": ...}}")
            rule_id = entry.get("id")
            if not isinstance(rule_id, str) or not rule_id:
                raise CliError(f"rules line {number} ({where}): 'id' must be a non-empty string")
            if "query" not in entry:
                raise CliError(f"rule {rule_id!r} (line {number}): missing 'query'")
            if not isinstance(entry["query"], dict):
                raise CliError(f"rule {rule_id!r} (line {number}): 'query' must be an object")
            if rule_id in seen:
                raise CliError(f"rule {rule_id!r} (line {number}): duplicate id (first on line {seen[rule_id]})")
            seen[rule_id] = number
            metadata = entry.get("metadata") or {}
            if not isinstance(metadata, dict):
                raise CliError(f"rule {rule_id!r} (line {number}): 'metadata' must be an object")
            rules.append(Rule(rule_id, entry["query"], {str(k): str(v) for k, v in metadata.items()}))
    return rules


def _parse_lines(lines: list[bytes]) -> list[Any]:
    """Each line's JSON value, or a ValueError saying why it is not one."""
    loads = orjson.loads
    try:
        return [loads(line) for line in lines]  # the common case: every line parses
    except orjson.JSONDecodeError:
        pass
    values: list[Any] = []
    for line in lines:
        try:
            values.append(loads(line))
        except orjson.JSONDecodeError as exc:
            values.append(ValueError(f"not valid JSON: {exc}" if line.strip() else "blank line: not a JSON object"))
    return values


def _records(first: int, values: list[Any], results: list[Any]) -> list[dict[str, Any]]:
    """The output record of each line (``results``: the percolator's, for the JSON objects only)."""
    if len(results) == len(values):  # every line a JSON object
        return [
            {"doc": number, "matches": result} if type(result) is list else {"doc": number, "error": str(result)}
            for number, result in zip(range(first, first + len(values)), results, strict=True)
        ]
    records: list[dict[str, Any]] = []
    found = iter(results)
    for number, value in enumerate(values, start=first):
        if type(value) is dict:
            result = next(found)
            records.append({"doc": number, "matches": result} if type(result) is list
                           else {"doc": number, "error": str(result)})
        elif isinstance(value, Exception):
            records.append({"doc": number, "error": str(value)})
        else:
            records.append({"doc": number, "error": f"not a JSON object (got {type(value).__name__})"})
    return records


def _encode(records: list[dict[str, Any]]) -> memoryview:
    """One JSON line per record, serialised in one call: in the array orjson writes, ``},{"doc":``
    occurs only between two records (inside a string a quote is always escaped), so the array's
    separators can become line breaks; the brackets are cut off by a view, not a copy (a batch's
    output is megabytes: every copy costs)."""
    body = orjson.dumps(records)
    return memoryview(body.replace(b'},{"doc":', b'}\n{"doc":'))[1:-1]


def run_percolate(
    percolator: Percolator, docs: IO[bytes], out: IO[bytes], *, now: datetime | None, batch_size: int
) -> int:
    """Percolate every line of ``docs`` and write one JSON line per document; returns the count."""
    # Parsing a batch allocates tens of thousands of (acyclic) objects that live until the batch
    # is written: the cyclic GC would run over and over on them. Paused for the run; the young
    # generation (whatever cycles a batch left, e.g. around error tracebacks) is collected after
    # each batch, once the batch's own objects are gone (so that collection has little to walk).
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        count = 0
        while True:
            written = _run_batch(percolator, docs, out, count, now=now, batch_size=batch_size)
            gc.collect(0)
            if not written:
                return count
            count += written
    finally:
        if gc_was_enabled:
            gc.enable()


def _run_batch(
    percolator: Percolator, docs: IO[bytes], out: IO[bytes], first: int, *, now: datetime | None, batch_size: int
) -> int:
    """Read, percolate and write the next ``batch_size`` lines; returns how many there were."""
    lines = list(islice(docs, batch_size))
    if not lines:
        return 0
    values = _parse_lines(lines)
    documents = [value for value in values if type(value) is dict]
    results = percolator.percolate(documents, now=now, on_error="skip") if documents else []
    out.write(_encode(_records(first, values, results)))
    out.write(b"\n")
    return len(lines)


@click.command("percolate")
@click.option("--mapping", "mapping_path", required=True, type=click.Path(path_type=Path),
              help="Elasticsearch mapping JSON ({\"properties\": ...}).")
@click.option("--rules", "rules_path", required=True, type=click.Path(path_type=Path),
              help="JSON lines: {\"id\": ..., \"query\": ...}.")
@click.option("--docs", "docs_path", required=True, type=click.Path(path_type=Path),
              help="JSON lines: one document per line ('-' for stdin).")
@click.option("--now", "now_text", default=None, help="Pin the time used by date math (ISO 8601 or epoch millis).")
@click.option("--backend", default=None,
              help="Percolator URL (embedded: or http://es:9200), overriding RULES_PERCOLATOR_URL.")
@click.option("--batch-size", default=8192, show_default=True, type=click.IntRange(min=1),
              help="Documents percolated per call.")
def percolate_command(
    mapping_path: Path, rules_path: Path, docs_path: Path, now_text: str | None, backend: str | None, batch_size: int
) -> None:
    """Print, for each document line, the ids of the rules it matches."""
    from percolators.factory import create_percolator
    from percolators.mapping import MappingError

    now = parse_now(now_text)
    try:
        settings = load_settings({"PERCOLATOR_URL": backend} if backend is not None else None)
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    mapping = read_mapping(mapping_path)
    rules = read_rules(rules_path)
    if str(docs_path) != "-" and not docs_path.is_file():
        raise CliError(f"--docs {docs_path}: no such file")
    try:
        with clean_errors(settings):
            percolator = create_percolator(settings, mapping)
    except MappingError as exc:
        raise CliError(f"--mapping {mapping_path}: {exc}") from None
    try:
        try:
            with clean_errors(settings):
                percolator.upsert(rules)
        except InvalidRuleError as exc:
            raise CliError(f"invalid rule {exc.rule_id!r}" + (f" at {exc.path}" if exc.path else "")
                           + f": {exc.message}") from None
        # The rules are loaded for good: move them out of the cyclic GC's sight, or every full
        # collection triggered by parsing documents would walk the whole rule index again.
        gc.collect()
        gc.freeze()
        out = sys.stdout.buffer
        try:
            if str(docs_path) == "-":
                run_percolate(percolator, sys.stdin.buffer, out, now=now, batch_size=batch_size)
            else:
                with docs_path.open("rb") as docs:
                    run_percolate(percolator, docs, out, now=now, batch_size=batch_size)
            out.flush()
        except PercolatorError as exc:
            raise CliError(str(exc), ) from None
        except OSError as exc:
            raise CliError(f"--docs {docs_path}: {exc.strerror or exc}") from None
    finally:
        percolator.close()


def register(cli: click.Group) -> None:
    cli.add_command(percolate_command)
