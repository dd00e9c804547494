"""A fake Elasticsearch: a real HTTP server on 127.0.0.1 (in a thread) that records every request
and answers with canned, Elasticsearch-shaped responses queued by the test.

It does not evaluate anything: a test says which responses come back and then checks the requests
the client sent (method, path, query string, headers, body) and what the client made of the
answers. The response bodies used by the tests are modelled on the examples of the Elasticsearch
8.x reference (bulk, search, percolate, create index, error responses).

    with FakeElasticsearch() as es:
        es.reply("GET", "/", body=es_info("8.15.3"))
        es.reply("POST", "/audience-rules/_search", body=search_page([...]))
        ...
        assert es.requests[1].json["query"] == ...
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return orjson.loads(self.body)

    @property
    def ndjson(self) -> list[Any]:
        text = self.body.decode()
        assert text.endswith("\n"), "bulk bodies must end with a newline"
        return [orjson.loads(line) for line in text.splitlines()]


@dataclass
class Reply:
    method: str
    path: str
    status: int = 200
    body: Any = None
    times: int = 1  # how many requests this reply answers; 0 means forever
    drop: bool = False  # close the connection without answering
    handler: Callable[[RecordedRequest], tuple[int, Any]] | None = None
    used: int = field(default=0)


class FakeElasticsearch:
    """Requests are matched against queued replies by method and path, first come first served."""

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self.unexpected: list[RecordedRequest] = []
        self._replies: list[Reply] = []
        self._lock = threading.Lock()
        #: answers requests no queued reply matches (the emulator); None: they are unexpected (599)
        self.fallback: Callable[[RecordedRequest], tuple[int, Any]] | None = None
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def _handle(self) -> None:
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                request = RecordedRequest(
                    method=self.command,
                    path=parts.path,
                    query={k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()},
                    headers={k.lower(): v for k, v in self.headers.items()},
                    body=body,
                )
                reply = fake._take(request)
                if reply is not None and reply.drop:
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if reply is None:
                    status, payload = 599, {"error": f"fake: no reply queued for {request.method} {request.path}"}
                elif reply.handler is not None:
                    status, payload = reply.handler(request)
                else:
                    status, payload = reply.status, reply.body
                data = payload if isinstance(payload, bytes) else orjson.dumps(payload)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("X-elastic-product", "Elasticsearch")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="fake-es", daemon=True
        )
        self._thread.start()

    def _take(self, request: RecordedRequest) -> Reply | None:
        with self._lock:
            self.requests.append(request)
            for reply in self._replies:
                if reply.method == request.method and reply.path == request.path:
                    reply.used += 1
                    if reply.times and reply.used >= reply.times:
                        self._replies.remove(reply)
                    return reply
            if self.fallback is not None:
                return Reply(request.method, request.path, handler=self.fallback)
            self.unexpected.append(request)
            return None

    def reply(self, method: str, path: str, status: int = 200, body: Any = None, *, times: int = 1) -> None:
        with self._lock:
            self._replies.append(Reply(method, path, status, body, times))

    def reply_with(
        self, method: str, path: str, handler: Callable[[RecordedRequest], tuple[int, Any]], *, times: int = 1
    ) -> None:
        with self._lock:
            self._replies.append(Reply(method, path, times=times, handler=handler))

    def drop(self, method: str, path: str, *, times: int = 1) -> None:
        with self._lock:
            self._replies.append(Reply(method, path, times=times, drop=True))

    def pending(self) -> list[str]:
        with self._lock:
            return [f"{r.method} {r.path}" for r in self._replies if r.times]

    def calls(self, method: str | None = None, path: str | None = None) -> list[RecordedRequest]:
        return [r for r in self.requests if (method is None or r.method == method) and (path is None or r.path == path)]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FakeElasticsearch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- response shapes (modelled on the Elasticsearch 8.x reference examples) -----------------------


def es_info(number: str = "8.15.3", distribution: str | None = None) -> dict[str, Any]:
    """``GET /`` (the root API)."""
    version: dict[str, Any] = {
        "number": number,
        "build_flavor": "default",
        "build_type": "docker",
        "build_hash": "f97532e680b555c3a05e73a74c28afb666923018",
        "build_date": "2024-10-09T22:08:00.328917561Z",
        "build_snapshot": False,
        "lucene_version": "9.11.1",
        "minimum_wire_compatibility_version": "7.17.0",
        "minimum_index_compatibility_version": "7.0.0",
    }
    if distribution:
        version["distribution"] = distribution
    return {
        "name": "es01",
        "cluster_name": "docker-cluster",
        "cluster_uuid": "R6oBqvPXTVyNhJIt3oafIQ",
        "version": version,
        "tagline": "You Know, for Search",
    }


def error_body(
    status: int,
    type_: str,
    reason: str,
    *,
    caused_by: dict[str, Any] | None = None,
    index: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The common error response: ``{"error": {"root_cause": [...], "type", "reason"}, "status"}``."""
    root: dict[str, Any] = {"type": type_, "reason": reason}
    if index:
        root.update({"index_uuid": "_na_", "index": index})
    error: dict[str, Any] = {"root_cause": [dict(root)], **root, **extra}
    if caused_by:
        error["caused_by"] = caused_by
    return {"error": error, "status": status}


def created_index(index: str) -> dict[str, Any]:
    return {"acknowledged": True, "shards_acknowledged": True, "index": index}


def already_exists(index: str) -> dict[str, Any]:
    return error_body(
        400,
        "resource_already_exists_exception",
        f"index [{index}/q8ZCBqT6S8eL4lUw-VlFvA] already exists",
        index=index,
    )


def index_not_found(index: str) -> dict[str, Any]:
    return error_body(
        404,
        "index_not_found_exception",
        f"no such index [{index}]",
        index=index,
        **{"resource.type": "index_or_alias", "resource.id": index},  # type: ignore[arg-type]
    )


def search_phase_error(index: str, type_: str, reason: str, caused_by: dict[str, Any] | None = None) -> dict[str, Any]:
    """A search that failed on every shard (``search_phase_execution_exception``, status 400 when
    the shard failures are bad requests)."""
    shard_reason: dict[str, Any] = {"type": type_, "reason": reason}
    if caused_by:
        shard_reason["caused_by"] = caused_by
    return {
        "error": {
            "root_cause": [{"type": type_, "reason": reason}],
            "type": "search_phase_execution_exception",
            "reason": "all shards failed",
            "phase": "query",
            "grouped": True,
            "failed_shards": [{"shard": 0, "index": index, "node": "9pQb5lH5TuOHoOw4Rc9U9w", "reason": shard_reason}],
        },
        "status": 400,
    }


def search_page(hits: list[tuple[str, list[int]]], *, with_source: dict[str, Any] | None = None) -> dict[str, Any]:
    """A (filter_path-trimmed) search response whose hits are percolator matches: rule id and
    ``_percolator_document_slot``, sorted on the rule id."""
    out = []
    for rule_id, slots in hits:
        hit: dict[str, Any] = {"_id": rule_id, "sort": [rule_id]}
        if slots:
            hit["fields"] = {"_percolator_document_slot": slots}
        if with_source and rule_id in with_source:
            hit["_source"] = with_source[rule_id]
        out.append(hit)
    body: dict[str, Any] = {"_shards": {"failed": 0}}
    if out:  # filter_path drops "hits" entirely when there are none
        body["hits"] = {"hits": out}
    return body


def bulk_response(items: list[dict[str, Any]], took: int = 30) -> dict[str, Any]:
    return {"took": took, "errors": any("error" in next(iter(i.values())) for i in items), "items": items}


def bulk_ok(op: str, index: str, rule_id: str, *, result: str = "created", seq_no: int = 0) -> dict[str, Any]:
    status = {"created": 201, "updated": 200, "deleted": 200, "not_found": 404}[result]
    return {
        op: {
            "_index": index,
            "_id": rule_id,
            "_version": 1,
            "result": result,
            "forced_refresh": True,
            "_shards": {"total": 2, "successful": 1, "failed": 0},
            "_seq_no": seq_no,
            "_primary_term": 1,
            "status": status,
        }
    }


def bulk_error(op: str, index: str, rule_id: str, status: int, error: dict[str, Any]) -> dict[str, Any]:
    return {op: {"_index": index, "_id": rule_id, "status": status, "error": error}}


def mget_response(index: str, found: dict[str, Any], missing: list[str]) -> dict[str, Any]:
    docs = [
        {"_index": index, "_id": rid, "_version": 1, "_seq_no": 0, "_primary_term": 1, "found": True, "_source": src}
        for rid, src in found.items()
    ]
    docs += [{"_index": index, "_id": rid, "found": False} for rid in missing]
    return {"docs": docs}


def iter_bodies(requests: list[RecordedRequest]) -> Iterator[Any]:
    for request in requests:
        yield request.json


class EmulatedElasticsearch(FakeElasticsearch):
    """A fake that answers, like a one-node Elasticsearch 8, exactly the requests the backend makes
    (root, create index, put mapping, delete index, _mget, _bulk, _search with percolate / ids /
    term / match_all, sort on rule_meta.id, search_after, size, _source filtering), evaluating
    percolate queries with the embedded engine.

    It proves the backend's plumbing end to end (pagination, slot mapping, bisection, rollback,
    the pinned-now split) with real matching, NOT Elasticsearch's semantics: that is what the
    opt-in real-cluster contract run is for.
    """

    def __init__(self, mapping: dict[str, Any]) -> None:
        super().__init__()
        from percolators.embedded import EmbeddedPercolator

        self.mapping = mapping
        self.sources: dict[str, dict[str, dict[str, Any]]] = {}  # index -> rule id -> _source
        self.engines: dict[str, Any] = {}
        self._make_engine = lambda: EmbeddedPercolator(mapping)
        self._emulator_lock = threading.Lock()
        self.fallback = self._emulate

    def _emulate(self, request: RecordedRequest) -> tuple[int, Any]:
        with self._emulator_lock:
            parts = [p for p in request.path.split("/") if p]
            if request.method == "GET" and not parts:
                return 200, es_info("8.15.3")
            index = parts[0] if parts else ""
            action = parts[1] if len(parts) > 1 else ""
            if request.method == "PUT" and not action:
                if index in self.sources:
                    return 400, already_exists(index)
                self.sources[index] = {}
                self.engines[index] = self._make_engine()
                return 200, created_index(index)
            if request.method == "PUT" and action == "_mapping":
                return 200, {"acknowledged": True}
            if index not in self.sources:
                return 404, index_not_found(index)
            if request.method == "DELETE" and not action:
                del self.sources[index], self.engines[index]
                return 200, {"acknowledged": True}
            if request.method == "POST" and action == "_mget":
                found = {i: self.sources[index][i] for i in request.json["ids"] if i in self.sources[index]}
                return 200, mget_response(index, found, [i for i in request.json["ids"] if i not in found])
            if request.method == "POST" and action == "_bulk":
                return 200, self._bulk(index, request.ndjson)
            if request.method == "POST" and action == "_search":
                return self._search(index, request.json)
            return 400, error_body(400, "illegal_argument_exception", f"emulator: {request.method} {request.path}")

    def _bulk(self, index: str, lines: list[Any]) -> dict[str, Any]:
        from percolators.errors import InvalidRuleError
        from percolators.port import Rule

        items = []
        position = 0
        while position < len(lines):
            op, meta = next(iter(lines[position].items()))
            rule_id = meta["_id"]
            if op == "delete":
                position += 1
                existed = self.sources[index].pop(rule_id, None) is not None
                self.engines[index].delete([rule_id])
                items.append(bulk_ok("delete", index, rule_id, result="deleted" if existed else "not_found"))
                continue
            source = lines[position + 1]
            position += 2
            try:
                self.engines[index].upsert([Rule(rule_id, source["rule_query"])])
            except InvalidRuleError as exc:
                reason = f"[1:1] failed to parse: {exc.message}"
                items.append(
                    bulk_error(op, index, rule_id, 400, {"type": "document_parsing_exception", "reason": reason})
                )
                continue
            existed = rule_id in self.sources[index]
            self.sources[index][rule_id] = source
            items.append(bulk_ok(op, index, rule_id, result="updated" if existed else "created"))
        return bulk_response(items)

    def _search(self, index: str, body: dict[str, Any]) -> tuple[int, Any]:
        sources = self.sources[index]
        query = body["query"]
        candidates = set(sources)
        documents = None
        if "bool" in query:
            for clause in query["bool"].get("filter", []):
                kind, spec = next(iter(clause.items()))
                if kind == "percolate":
                    documents = spec["documents"]
                elif kind == "ids":
                    candidates &= set(spec["values"])
                elif kind == "term":
                    candidates = {
                        i for i in candidates if sources[i]["rule_meta"].get("uses_now") is spec["rule_meta.uses_now"]
                    }
            for clause in query["bool"].get("must_not", []):
                value = clause["term"]["rule_meta.uses_now"]
                candidates = {i for i in candidates if sources[i]["rule_meta"].get("uses_now") is not value}
        slots: dict[str, list[int]] = {i: [] for i in candidates}
        if documents is not None:
            results = self.engines[index].percolate(documents, rule_ids=candidates, on_error="skip")
            for result in results:
                if isinstance(result, Exception):
                    field = getattr(result, "field", "")
                    return 400, search_phase_error(
                        index,
                        "document_parsing_exception",
                        f"[1:2] failed to parse field [{field}] of type [unknown] in document with id 'null'. "
                        f"Preview of field's value: 'x'",
                        caused_by={"type": "illegal_argument_exception", "reason": str(result)},
                    )
            slots = {i: [] for i in candidates}
            for slot, matched in enumerate(results):
                for rule_id in matched:
                    slots[rule_id].append(slot)
            slots = {i: s for i, s in slots.items() if s}
        ordered = sorted(slots)
        if "search_after" in body:
            ordered = [i for i in ordered if i > body["search_after"][0]]
        ordered = ordered[: body["size"]]
        hits = []
        for rule_id in ordered:
            hit: dict[str, Any] = {"_id": rule_id, "sort": [rule_id]}
            if documents is not None:
                hit["fields"] = {"_percolator_document_slot": slots[rule_id]}
            if body.get("_source"):
                hit["_source"] = _filter_source(sources[rule_id], body["_source"])
            hits.append(hit)
        out: dict[str, Any] = {"_shards": {"failed": 0}}
        if hits:
            out["hits"] = {"hits": hits}
        return 200, out


def _filter_source(source: dict[str, Any], paths: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path in paths:
        head, _, rest = path.partition(".")
        if head not in source:
            continue
        if not rest:
            out[head] = source[head]
        elif rest in source[head]:
            out.setdefault(head, {})[rest] = source[head][rest]
    return out
