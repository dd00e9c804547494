"""The percolator port on Elasticsearch 8/9: rules stored as ``percolator`` fields, documents
percolated in batches with the ``documents`` parameter.

Wire format (all JSON over HTTP, see :mod:`percolators.es_http`; references are to the Elasticsearch
8.x reference, "elastic.co/guide/en/elasticsearch/reference/8.15/<page>.html"):

* ``GET /`` once, before anything else: ``version.number`` must be 8.x or 9.x.
* ``PUT /<index>`` (create-index) with the mappings below; ``resource_already_exists_exception``
  means another process got there first, and then ``PUT /<index>/_mapping`` adds any new document
  fields (or fails, clearly, when a field changed type).
* Rules: ``POST /<index>/_bulk?refresh=true`` (docs-bulk), NDJSON ``{"index": {"_id": <rule id>}}``
  + source lines; per-item errors are read from ``items[i].<op>.error`` (the top-level status is
  200 even when every item failed; ``errors: true`` says some did).
* Percolation: ``POST /<index>/_search`` with
  ``{"query": {"bool": {"filter": [{"percolate": {"field": "rule_query", "documents": [...]}},
  {"ids": {"values": [...]}}]}}, "sort": [{"rule_meta.id": "asc"}], "search_after": [...]}``
  (query-dsl-percolate-query, paginate-search-results). Each hit's
  ``fields._percolator_document_slot`` lists the 0-based positions of the documents it matched
  (PercolatorMatchedSlotSubFetchPhase in modules/percolator, which finds the percolate query inside
  bool clauses too, so filter context is fine).

Index layout. The index mapping is the document mapping's ``properties`` plus two reserved
top-level fields, chosen so that they cannot collide with document fields (the constructor rejects
a document mapping that defines either):

* ``rule_query`` (type ``percolator``): the rule. Not ``query``: a document field called ``query``
  is plausible, and a percolated document containing the percolator field would be parsed as a
  query. Both reserved names are also stripped from percolated documents.
* ``rule_meta`` (object): ``id``, ``advertiser``, ``audience``, ``version``, ``status`` keywords,
  ``uses_now`` boolean, and ``extra`` (not indexed) holding the rule's full metadata.

``"dynamic": false`` at the root: unmapped document fields are ignored, as the embedded engine does,
instead of being mapped on the fly (``strict`` would reject a whole batch for one extra field).
The percolator still rejects a *rule* on an unmapped field ("No field mapping can be found for the
field with name [x]", PercolatorFieldMapper sets ``allowUnmappedFields(false)``).

Validation. Rules are parsed locally first with :func:`percolators.dsl.parse_rule` against the same
mapping, so errors name the exact clause path; Elasticsearch's own rejection (a bulk item error)
is the second line of defence and is mapped back to :class:`InvalidRuleError` with the path of
the offending field found in the rule.

Writes. ``upsert`` is all-or-nothing as the port demands: everything is validated locally before
any request; if Elasticsearch still rejects an item, the items of the same call that were applied
are rolled back (previous versions re-indexed from an ``_mget`` taken before the write, new rules
deleted) and the error is raised. This is compensation, not a transaction: a concurrent
percolation can see the intermediate state for a few milliseconds. ``refresh=true`` (docs-refresh)
makes the write visible to the next percolation deterministically; ``wait_for`` would add up to
``index.refresh_interval`` (1 s) per write and hangs on an index whose refresh is disabled. Rule
writes are rare (API calls), so the extra small segments are cheap.

Pinned ``now``. Elasticsearch resolves ``now`` in stored queries to the search's own start time
(PercolateQueryBuilder calls ``context.nowInMillis()``); the REST API has no parameter to set it.
So when ``now`` is given, the rules whose query uses date math on ``now`` (flagged
``rule_meta.uses_now`` at upsert) are excluded from the Elasticsearch search, fetched (their
``_source``) and evaluated in-process by the embedded engine at the pinned time; every other rule
is matched by Elasticsearch. Without ``now``, Elasticsearch matches everything at its own clock.

Document errors. Elasticsearch fails a whole percolate search when one document cannot be parsed
(``document_parsing_exception`` in 8.8+, ``mapper_parsing_exception`` before). The batch is then
bisected to find the culprit documents (about 2*log2(n) extra searches per bad document); each
gets an :class:`InvalidDocumentError` naming the field from Elasticsearch's reason.

``explain`` runs the embedded engine: Elasticsearch's explain API works on stored documents and
reports Lucene scoring, not clause paths of the percolated rule.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

from percolators.errors import (
    InvalidDocumentError,
    InvalidRuleError,
    PercolatorError,
    PercolatorUnavailableError,
)
from percolators.es_http import RETRY_STATUSES, EsHttpClient, EsHttpError, error_tree, redact
from percolators.port import Explanation, Percolator, Rule, RuleReport
from percolators.query import Bool, Node, ParsedRule, Range

DEFAULT_INDEX = "audience-rules"
QUERY_FIELD = "rule_query"
META_FIELD = "rule_meta"
RESERVED_FIELDS = frozenset({QUERY_FIELD, META_FIELD})
SLOT_FIELD = "_percolator_document_slot"
ID_FIELD = f"{META_FIELD}.id"
USES_NOW_FIELD = f"{META_FIELD}.uses_now"
#: Metadata keys indexed as keywords (``advertiser_id`` etc. are accepted as spellings).
META_KEYWORDS = ("advertiser", "audience", "version", "status")
SUPPORTED_MAJORS = (8, 9)
#: Elasticsearch's error types for a document that cannot be parsed against the mapping.
DOCUMENT_ERROR_TYPES = frozenset(
    {"document_parsing_exception", "mapper_parsing_exception", "strict_dynamic_mapping_exception"}
)
#: ``max_result_window`` default: the largest page a search can return.
MAX_PAGE = 10_000
#: Keep percolate responses small: only what we read (common-options, ``filter_path``).
SEARCH_PARAMS = {
    "allow_partial_search_results": "false",
    "filter_path": "hits.hits._id,hits.hits.fields,hits.hits.sort,hits.hits._source,_shards.failed,_shards.failures",
}

_UNMAPPED_RE = re.compile(r"No field mapping can be found for the field with name \[([^\]]+)\]")
_UNKNOWN_QUERY_RE = re.compile(r"unknown query \[([^\]]+)\]")
_INDEX_NAME_RE = re.compile(r'^[^-_+.A-Z\\/*?"<>| ,#:][^A-Z\\/*?"<>| ,#:]*$')
_FIELD_RES = (
    re.compile(r"failed to parse field \[([^\]]+)\]"),
    re.compile(r"dynamic introduction of \[([^\]]+)\] within \[([^\]]+)\]"),
    re.compile(r"object mapping for \[([^\]]+)\] tried to parse field \[([^\]]+)\]"),
    re.compile(r"field \[([^\]]+)\]"),
)
_LOCATION_RE = re.compile(r"^\[\d+:\d+\] ")


class ElasticsearchPercolator(Percolator):
    """Rules in an Elasticsearch 8/9 index; see the module docstring for the wire format.

    ``url`` is ``http(s)://[user:password@]host:9200[/index][?api_key=...]``; the index defaults to
    ``audience-rules``, ``index=`` overrides the URL path. ``batch_size`` documents go in one
    search (request size stays well under ``http.max_content_length``), ``page_size`` hits per
    page (at most 10,000), ``bulk_size`` rules per bulk request. ``retries`` and ``backoff`` apply
    to every request and to bulk items rejected with 429. ``timeout`` is the read timeout of one
    request (a percolate search of a whole batch: Elasticsearch can spend hundreds of ms per
    document against many rules, so keep ``batch_size * per-document time`` well under it).
    """

    def __init__(
        self,
        url: str,
        mapping: Mapping[str, Any],
        *,
        index: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.2,
        batch_size: int = 500,
        page_size: int = 5000,
        bulk_size: int = 1000,
        refresh: str = "true",
        index_settings: Mapping[str, Any] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        path_index = parts.path.strip("/")
        self.index = index or path_index or DEFAULT_INDEX
        if not _INDEX_NAME_RE.match(self.index) or len(self.index.encode()) > 255:
            raise ValueError(f"invalid Elasticsearch index name {self.index!r} (from {redact(url)!r})")
        if not 1 <= batch_size or not 1 <= page_size <= MAX_PAGE or not 1 <= bulk_size:
            raise ValueError("batch_size and bulk_size must be >= 1 and page_size within [1, 10000]")
        if refresh not in ("true", "wait_for", "false"):
            raise ValueError(f"refresh must be true, wait_for or false, not {refresh!r}")
        properties = mapping.get("properties")
        if not isinstance(properties, Mapping):
            raise ValueError('the document mapping must be an object with "properties"')
        clash = RESERVED_FIELDS & set(properties)
        if clash:
            raise ValueError(f"document mapping defines reserved field(s) {sorted(clash)}: used by the rule index")
        from percolators.mapping import Mapping as DocMapping

        self.mapping = mapping
        self.doc_mapping = DocMapping.from_json(mapping)  # validates the mapping, and parse_rule needs it
        self.url = redact(urlunsplit((parts.scheme, parts.netloc, "", "", "")))
        self.batch_size = batch_size
        self.page_size = page_size
        self.bulk_size = bulk_size
        self.refresh = refresh
        self.index_settings = dict(index_settings or {})
        self.retries = retries
        self._sleep = sleep
        self._http = EsHttpClient(
            urlunsplit((parts.scheme, parts.netloc, "", "", "")),
            api_key=api_key or next(iter(query.get("api_key") or ()), None),
            timeout=timeout,
            retries=retries,
            backoff=backoff,
            sleep=sleep,
        )
        self.server_version: str | None = None
        self._ready = False
        self._local: Percolator | None = None
        self._local_sources: dict[str, Any] = {}

    # -- set-up -----------------------------------------------------------------------------------

    def index_mapping(self) -> dict[str, Any]:
        """The ``mappings`` of the rule index (document fields + the reserved rule fields)."""
        keyword = {"type": "keyword"}
        properties = dict(self.mapping["properties"])
        properties[QUERY_FIELD] = {"type": "percolator"}
        properties[META_FIELD] = {
            "properties": {
                "id": keyword,
                **{name: keyword for name in META_KEYWORDS},
                "uses_now": {"type": "boolean"},
                "extra": {"type": "object", "enabled": False},
            }
        }
        return {"dynamic": False, "properties": properties}

    def connect(self) -> None:
        """Check the server version and create the index if needed (idempotent; every operation
        calls it first, so calling it is only useful to fail fast at start-up)."""
        if self._ready:
            return
        info = self._http.request("GET", "/")
        self._check_version(info)
        self._create_index()
        self._ready = True

    def _check_version(self, info: Any) -> None:
        version = info.get("version") if isinstance(info, Mapping) else None
        number = str(version.get("number", "")) if isinstance(version, Mapping) else ""
        distribution = version.get("distribution") if isinstance(version, Mapping) else None
        major = number.split(".", 1)[0]
        if distribution or not major.isdigit() or int(major) not in SUPPORTED_MAJORS:
            product = f"{distribution} {number}" if distribution else f"version {number or 'unknown'}"
            raise PercolatorError(
                f"Elasticsearch at {self.url} is {product}; this backend needs Elasticsearch 8.x or 9.x"
            )
        self.server_version = number

    def _create_index(self) -> None:
        body: dict[str, Any] = {"mappings": self.index_mapping()}
        if self.index_settings:
            body["settings"] = self.index_settings
        status, payload = self._http.request_raw("PUT", f"/{self.index}", body=body)
        if 200 <= status < 300:
            return
        error = EsHttpError("PUT", f"/{self.index}", status, payload)
        if error.error_type != "resource_already_exists_exception":
            raise error
        # Someone created it: make sure it knows every document field (put-mapping only adds).
        status, payload = self._http.request_raw("PUT", f"/{self.index}/_mapping", body=self.index_mapping())
        if not 200 <= status < 300:
            reason = EsHttpError("PUT", f"/{self.index}/_mapping", status, payload)
            raise PercolatorError(
                f"index {self.index!r} at {self.url} exists with a mapping that conflicts with the document "
                f"mapping: {_deepest_reason(reason.error)}"
            )

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        """One request; if the index vanished (deleted by an operator), recreate it and retry once."""
        self.connect()
        try:
            return self._http.request(method, path, **kwargs)
        except EsHttpError as exc:
            if exc.error_type != "index_not_found_exception":
                raise
            self._ready = False
            self.connect()
            return self._http.request(method, path, **kwargs)

    # -- rules ------------------------------------------------------------------------------------

    def _parse(self, rule: Rule) -> ParsedRule:
        from percolators.dsl import parse_rule

        return parse_rule(rule.id, rule.query, self.doc_mapping, metadata=dict(rule.metadata))

    def validate(self, rule: Rule) -> RuleReport:
        parsed = self._parse(rule)
        return RuleReport(rule.id, tuple(parsed.warnings))

    def upsert(self, rules: Iterable[Rule]) -> list[RuleReport]:
        rules = list(rules)
        parsed = [self._parse(rule) for rule in rules]  # all-or-nothing: validate everything first
        if not rules:
            return []
        latest: dict[str, tuple[Rule, ParsedRule]] = {}
        for rule, p in zip(rules, parsed, strict=True):
            latest[rule.id] = (rule, p)  # a repeated id: the last one wins, as in a bulk request
        ids = list(latest)
        self.connect()
        previous = self._fetch_sources(ids)
        applied: list[str] = []
        for chunk in _chunks(ids, self.bulk_size):
            ops = [("index", rid, self._source(*latest[rid])) for rid in chunk]
            ok, failed = self._bulk(ops)
            applied.extend(ok)
            if failed:
                self._rollback(applied, previous)
                raise self._rule_error(failed, {rid: latest[rid][0] for rid in failed})
        return [RuleReport(p.id, tuple(p.warnings)) for p in parsed]

    def delete(self, rule_ids: Iterable[str]) -> None:
        ids = list(dict.fromkeys(rule_ids))
        if not ids:
            return
        self.connect()
        for chunk in _chunks(ids, self.bulk_size):
            _, failed = self._bulk([("delete", rid, None) for rid in chunk])
            if failed:
                rid, item = next(iter(failed.items()))
                raise PercolatorError(f"Elasticsearch could not delete rule {rid!r}: {_item_reason(item)}")

    def rule_ids(self) -> set[str]:
        return {hit["_id"] for hit in self._scan({"match_all": {}}, source=False)}

    def _source(self, rule: Rule, parsed: ParsedRule) -> dict[str, Any]:
        meta: dict[str, Any] = {"id": rule.id, "uses_now": uses_now(parsed.query)}
        for key in META_KEYWORDS:
            value = rule.metadata.get(key, rule.metadata.get(f"{key}_id"))
            if value is not None:
                meta[key] = str(value)
        if rule.metadata:
            meta["extra"] = dict(rule.metadata)
        return {QUERY_FIELD: dict(rule.query), META_FIELD: meta}

    def _fetch_sources(self, ids: list[str]) -> dict[str, Any]:
        """Current sources of the given rules (docs-multi-get: ``{"docs": [{"_id", "found",
        "_source"}]}``), to roll an upsert back."""
        found: dict[str, Any] = {}
        for chunk in _chunks(ids, self.bulk_size):
            response = self._request("POST", f"/{self.index}/_mget", body={"ids": chunk})
            for doc in response.get("docs") or ():
                if doc.get("found"):
                    found[doc["_id"]] = doc["_source"]
        return found

    def _bulk(self, ops: list[tuple[str, str, Any]]) -> tuple[list[str], dict[str, Mapping[str, Any]]]:
        """Run bulk actions; items rejected with 429/5xx are retried with backoff. Returns the ids
        applied and the failed items (``{"_id", "status", "error": {"type", "reason", ...}}``). A
        delete of a missing rule (``result: not_found``, status 404) counts as applied."""
        ok: list[str] = []
        failed: dict[str, Mapping[str, Any]] = {}
        pending = ops
        for attempt in range(self.retries + 1):
            if attempt:
                self._sleep(self._http._delay(attempt))
            lines: list[Any] = []
            for op, rid, source in pending:
                lines.append({op: {"_id": rid}})
                if source is not None:
                    lines.append(source)
            response = self._request("POST", f"/{self.index}/_bulk", params={"refresh": self.refresh}, ndjson=lines)
            items = response.get("items") or []
            if len(items) != len(pending):
                raise PercolatorError(f"Elasticsearch bulk answered {len(items)} items for {len(pending)} actions")
            retry = []
            for action, item in zip(pending, items, strict=True):
                op, rid, _ = action
                result: Mapping[str, Any] = item.get(op) or next(iter(item.values()), {})
                status = int(result.get("status", 0))
                if result.get("error") is None or (op == "delete" and status == 404):
                    ok.append(rid)
                    failed.pop(rid, None)
                elif status in RETRY_STATUSES:
                    retry.append(action)
                    failed[rid] = result
                else:
                    failed[rid] = result
            if not retry:
                break
            pending = retry
        return ok, failed

    def _rollback(self, applied: list[str], previous: Mapping[str, Any]) -> None:
        if not applied:
            return
        ops = [("index", rid, previous[rid]) if rid in previous else ("delete", rid, None) for rid in applied]
        try:
            _, failed = self._bulk(ops)
        except PercolatorError as exc:
            raise PercolatorError(
                f"rolling back rules {applied} failed, they may be in their new state: {exc}"
            ) from exc
        if failed:
            raise PercolatorError(f"rolling back rules {sorted(failed)} failed, they may be in their new state")

    def _rule_error(self, failed: Mapping[str, Mapping[str, Any]], rules: Mapping[str, Rule]) -> PercolatorError:
        """The error for an upsert that Elasticsearch refused, naming the first refused rule."""
        rid, item = next(iter(failed.items()))
        others = f" ({len(failed) - 1} more rules refused: {sorted(failed)[:10]})" if len(failed) > 1 else ""
        status = int(item.get("status", 0))
        if status in RETRY_STATUSES:
            return PercolatorUnavailableError(
                f"Elasticsearch at {self.url} kept rejecting rule {rid!r} after {self.retries + 1} attempts: "
                f"{_item_reason(item)}{others}; nothing was stored"
            )
        return rule_error_from_es(rid, rules[rid].query, item.get("error") or {}, suffix=others)

    # -- percolation ------------------------------------------------------------------------------

    def percolate(
        self,
        documents: Sequence[Mapping[str, Any]],
        *,
        rule_ids: Collection[str] | None = None,
        now: datetime | None = None,
        on_error: str = "raise",
    ) -> list[list[str] | Exception]:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
        docs = list(documents)
        if not docs:
            return []
        restrict = None if rule_ids is None else sorted(set(rule_ids))
        matches: list[set[str] | Exception] = [set() for _ in docs]
        valid: list[int] = []
        for i, doc in enumerate(docs):
            if isinstance(doc, Mapping):
                valid.append(i)
            else:
                matches[i] = InvalidDocumentError("", f"document {i} is not a JSON object")
        if restrict != [] and valid:
            for chunk in _chunks(valid, self.batch_size):
                found = self._percolate_chunk([_clean(docs[i]) for i in chunk], restrict, now is not None)
                for i, result in zip(chunk, found, strict=True):
                    matches[i] = result
            if now is not None:
                self._percolate_at(now, docs, matches, restrict)
        out: list[list[str] | Exception] = []
        for result in matches:
            if isinstance(result, Exception):
                if on_error == "raise":
                    raise result
                out.append(result)
            else:
                out.append(sorted(result))
        return out

    def _percolate_chunk(
        self, docs: list[Mapping[str, Any]], restrict: list[str] | None, pinned: bool
    ) -> list[set[str] | Exception]:
        """Matches per document; when Elasticsearch rejects a document, bisect to find it."""
        try:
            return list(self._search_slots(docs, restrict, pinned))
        except EsHttpError as exc:
            if not is_document_error(exc):
                raise
            if len(docs) == 1:
                return [document_error_from_es(exc)]
            mid = len(docs) // 2
            return self._percolate_chunk(docs[:mid], restrict, pinned) + self._percolate_chunk(
                docs[mid:], restrict, pinned
            )

    def percolate_query(
        self, docs: list[Mapping[str, Any]], restrict: list[str] | None, pinned: bool
    ) -> dict[str, Any]:
        """The query of one percolate search (public for tests and ops debugging)."""
        filters: list[dict[str, Any]] = [{"percolate": {"field": QUERY_FIELD, "documents": docs}}]
        if restrict is not None:
            filters.append({"ids": {"values": restrict}})
        query: dict[str, Any] = {"bool": {"filter": filters}}
        if pinned:
            query["bool"]["must_not"] = [{"term": {USES_NOW_FIELD: True}}]
        return query

    def _search_slots(self, docs: list[Mapping[str, Any]], restrict: list[str] | None, pinned: bool) -> list[set[str]]:
        slots: list[set[str]] = [set() for _ in docs]
        for hit in self._scan(self.percolate_query(docs, restrict, pinned), source=False):
            positions = (hit.get("fields") or {}).get(SLOT_FIELD)
            if positions is None:
                if len(docs) != 1:
                    raise PercolatorError(f"Elasticsearch hit {hit.get('_id')!r} has no {SLOT_FIELD} field")
                positions = [0]
            for slot in positions:
                slots[int(slot)].add(hit["_id"])
        return slots

    def _scan(self, query: Mapping[str, Any], *, source: bool | list[str]) -> Iterator[Mapping[str, Any]]:
        """Every hit of ``query``, page by page with ``search_after`` on the rule id.

        Sorting on ``rule_meta.id`` (a keyword with doc values) rather than ``_id``: fielddata on
        ``_id`` is disabled by default since 8.0 (``indices.id_field_data.enabled``). No point in
        time: it would cost two more round trips per batch, and without one each rule is still
        read exactly once (ids are unique and the cursor is strictly increasing); a rule changed
        while the pages are read is seen either before or after the change.
        """
        after: list[Any] | None = None
        while True:
            body: dict[str, Any] = {
                "query": query,
                "_source": source,
                "size": self.page_size,
                "sort": [{ID_FIELD: "asc"}],
                "track_total_hits": False,
            }
            if after is not None:
                body["search_after"] = after
            response = self._request("POST", f"/{self.index}/_search", params=SEARCH_PARAMS, body=body)
            shards = (response or {}).get("_shards") or {}
            if shards.get("failed"):
                failures = shards.get("failures") or [{}]
                raise PercolatorUnavailableError(
                    f"Elasticsearch at {self.url}: {shards['failed']} shard(s) failed, results would be incomplete: "
                    f"{_deepest_reason(failures[0].get('reason') or {})}"
                )
            hits = ((response or {}).get("hits") or {}).get("hits") or []
            yield from hits
            if len(hits) < self.page_size:
                return
            after = hits[-1]["sort"]

    def _percolate_at(
        self,
        now: datetime,
        docs: list[Mapping[str, Any]],
        matches: list[set[str] | Exception],
        restrict: list[str] | None,
    ) -> None:
        """Match the rules that use ``now`` in-process at the pinned time (see the module docstring)."""
        query: dict[str, Any] = {"bool": {"filter": [{"term": {USES_NOW_FIELD: True}}]}}
        if restrict is not None:
            query["bool"]["filter"].append({"ids": {"values": restrict}})
        rules = [
            Rule(hit["_id"], hit["_source"][QUERY_FIELD], dict(hit["_source"].get(META_FIELD, {}).get("extra") or {}))
            for hit in self._scan(query, source=[QUERY_FIELD, f"{META_FIELD}.extra"])
        ]
        if not rules:
            return
        local = self._local_engine()
        changed = [rule for rule in rules if self._local_sources.get(rule.id) != rule.query]
        if changed:
            local.upsert(changed)
            self._local_sources.update((rule.id, rule.query) for rule in changed)
        positions = [i for i, result in enumerate(matches) if not isinstance(result, Exception)]
        found = local.percolate(
            [_clean(docs[i]) for i in positions], rule_ids={rule.id for rule in rules}, now=now, on_error="skip"
        )
        for i, result in zip(positions, found, strict=True):
            current = matches[i]
            if isinstance(result, Exception):
                matches[i] = result
            elif isinstance(current, set):
                current.update(result)

    def _local_engine(self) -> Percolator:
        if self._local is None:
            from percolators.embedded import EmbeddedPercolator

            self._local = EmbeddedPercolator(self.mapping)
        return self._local

    def explain(
        self, query: Mapping[str, Any], document: Mapping[str, Any], *, now: datetime | None = None
    ) -> Explanation:
        return self._local_engine().explain(query, document, now=now)

    def close(self) -> None:
        self._http.close()
        if self._local is not None:
            self._local.close()


# -- helpers (module level so that tests can check them directly) --------------------------------


def uses_now(node: Node) -> bool:
    """Whether a parsed rule has date math on ``now`` anywhere."""
    if isinstance(node, Range):
        return node.uses_now
    if isinstance(node, Bool):
        return any(uses_now(child) for child in (*node.must, *node.filter, *node.should, *node.must_not))
    return False


def field_path(query: Any, field: str, path: str = "") -> str | None:
    """The clause path of the first place ``query`` names ``field`` (a key, or the value of a
    ``field`` parameter as in ``exists``), e.g. ``bool.must[1].term.favourite_colour``."""
    if isinstance(query, Mapping):
        for key, value in query.items():
            here = f"{path}.{key}" if path else str(key)
            if key == field:
                return here
            if key == "field" and value == field:
                return path
            found = field_path(value, field, here)
            if found is not None:
                return found
    elif isinstance(query, list):
        for i, value in enumerate(query):
            found = field_path(value, field, f"{path}[{i}]")
            if found is not None:
                return found
    return None


def rule_error_from_es(rule_id: str, query: Any, error: Mapping[str, Any], suffix: str = "") -> InvalidRuleError:
    """Map a bulk item error for a rule to InvalidRuleError with the best clause path we can find.

    ES 8.8+: ``{"type": "document_parsing_exception", "reason": "[1:52] failed to parse: No field
    mapping can be found for the field with name [x]", "caused_by": {"type": "query_shard_exception",
    ...}}``; earlier 8.x: ``mapper_parsing_exception`` / ``failed to parse`` with the same cause.
    """
    reasons = [str(node.get("reason", "")) for node in error_tree(error)]
    for reason in reasons:
        match = _UNMAPPED_RE.search(reason)
        if match:
            name = match.group(1)
            return InvalidRuleError(
                rule_id,
                field_path(query, name) or "",
                f"field [{name}] is not in the mapping (Elasticsearch: {match.group(0)}){suffix}",
            )
    for reason in reasons:
        match = _UNKNOWN_QUERY_RE.search(reason)
        if match:
            name = match.group(1)
            return InvalidRuleError(
                rule_id, field_path(query, name) or "", f"unknown query type [{name}] (Elasticsearch){suffix}"
            )
    return InvalidRuleError(rule_id, "", f"Elasticsearch rejected the rule: {_deepest_reason(error)}{suffix}")


def is_document_error(exc: EsHttpError) -> bool:
    """Whether a failed percolate search was caused by a document that cannot be parsed."""
    if exc.status != 400:
        return False
    return any(node.get("type") in DOCUMENT_ERROR_TYPES for node in exc.causes())


def document_error_from_es(exc: EsHttpError) -> InvalidDocumentError:
    nodes = [node for node in exc.causes() if node.get("type") in DOCUMENT_ERROR_TYPES]
    reason = str(nodes[0].get("reason", "")) if nodes else str(exc)
    field = ""
    for pattern in _FIELD_RES:
        match = pattern.search(reason)
        if match:
            groups = match.groups()
            field = f"{groups[1]}.{groups[0]}" if len(groups) == 2 and "dynamic" in pattern.pattern else groups[0]
            if field.startswith("_doc."):
                field = field[len("_doc.") :]
            break
    message = _LOCATION_RE.sub("", reason)
    cause = nodes[0].get("caused_by") if nodes else None
    if isinstance(cause, Mapping) and cause.get("reason"):
        message += f" ({cause.get('reason')})"
    return InvalidDocumentError(field, f"Elasticsearch rejected the document: {message}")


def _deepest_reason(error: Any) -> str:
    node = error if isinstance(error, Mapping) else {}
    while isinstance(node.get("caused_by"), Mapping):
        node = node["caused_by"]
    return f"{node.get('type', 'error')}: {node.get('reason', '')}"


def _item_reason(item: Mapping[str, Any]) -> str:
    return f"HTTP {item.get('status')} {_deepest_reason(item.get('error') or {})}"


def _clean(doc: Mapping[str, Any]) -> Mapping[str, Any]:
    """The document without the reserved rule fields (see the module docstring)."""
    if RESERVED_FIELDS.isdisjoint(doc):
        return doc
    return {key: value for key, value in doc.items() if key not in RESERVED_FIELDS}


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
