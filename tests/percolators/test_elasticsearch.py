"""The Elasticsearch backend against a fake HTTP server answering with recorded Elasticsearch 8/9
response shapes: every request's method, path, query string, headers and body is checked, and
every answer (pages, slots, bulk item errors, error documents, outages) is fed back.

No Elasticsearch is needed; the real-cluster checks are the ``elasticsearch`` params of
tests/percolators/test_contract.py (opt-in with RULES_TEST_ELASTICSEARCH_URL).
"""

from __future__ import annotations

import base64
import importlib.util
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from percolators.elasticsearch import (
    SEARCH_PARAMS,
    ElasticsearchPercolator,
    field_path,
    rule_error_from_es,
)
from percolators.errors import (
    InvalidDocumentError,
    InvalidRuleError,
    PercolatorError,
    PercolatorUnavailableError,
)
from percolators.es_http import EsHttpClient, EsHttpError
from percolators.port import Rule
from rules_service.schema import USER_MAPPING
from tests.conftest import free_port
from tests.percolators.fake_es import (
    FakeElasticsearch,
    RecordedRequest,
    already_exists,
    bulk_error,
    bulk_ok,
    bulk_response,
    created_index,
    error_body,
    es_info,
    index_not_found,
    mget_response,
    search_page,
    search_phase_error,
)

INDEX = "audience-rules"
SEARCH = f"/{INDEX}/_search"
BULK = f"/{INDEX}/_bulk"
MGET = f"/{INDEX}/_mget"

needs_dsl = pytest.mark.skipif(
    importlib.util.find_spec("percolators.dsl") is None,
    reason="percolators.dsl (local rule validation) not written yet",
)

RULE_QUERY = {
    "bool": {
        "filter": [
            {"term": {"gender": "female"}},
            {"range": {"age": {"gte": 25, "lte": 34}}},
            {"terms": {"geo.postcode": ["75011", "75012"]}},
        ]
    }
}
NOW_QUERY = {"bool": {"filter": [{"range": {"last_seen": {"gte": "now-30d/d"}}}, {"term": {"device.os": "ios"}}]}}


class Sleeps(list[float]):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def es() -> Iterator[FakeElasticsearch]:
    with FakeElasticsearch() as server:
        yield server
        assert not server.unexpected, [f"{r.method} {r.path}" for r in server.unexpected]


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


def make(es: FakeElasticsearch, sleeps: Sleeps, url: str | None = None, **kwargs: Any) -> ElasticsearchPercolator:
    kwargs.setdefault("retries", 3)
    kwargs.setdefault("backoff", 0.01)
    return ElasticsearchPercolator(url or es.url, USER_MAPPING, sleep=sleeps, **kwargs)


def ready(es: FakeElasticsearch, index: str = INDEX, version: str = "8.15.3") -> None:
    es.reply("GET", "/", body=es_info(version))
    es.reply("PUT", f"/{index}", body=created_index(index))


def json_headers(request: RecordedRequest) -> None:
    assert request.headers["content-type"] == "application/json"
    assert request.headers["accept"] == "application/json"


def expected_search(
    documents: list[dict[str, Any]],
    *,
    size: int = 5000,
    ids: list[str] | None = None,
    pinned: bool = False,
    after: list[str] | None = None,
) -> dict[str, Any]:
    filters: list[dict[str, Any]] = [{"percolate": {"field": "rule_query", "documents": documents}}]
    if ids is not None:
        filters.append({"ids": {"values": ids}})
    query: dict[str, Any] = {"bool": {"filter": filters}}
    if pinned:
        query["bool"]["must_not"] = [{"term": {"rule_meta.uses_now": True}}]
    body: dict[str, Any] = {
        "query": query,
        "_source": False,
        "size": size,
        "sort": [{"rule_meta.id": "asc"}],
        "track_total_hits": False,
    }
    if after is not None:
        body["search_after"] = after
    return body


DOCS: list[dict[str, Any]] = [
    {
        "user_id": "u1",
        "gender": "female",
        "age": 31,
        "geo": {"postcode": "75011", "location": {"lat": 48.85, "lon": 2.37}},
    },
    {"user_id": "u2", "gender": "male", "age": 45, "device": {"os": "android", "carrier": "orange"}},
    {"user_id": "u3", "gender": "female", "age": 27, "interests": ["running", "cooking"]},
]


# -- start-up ----------------------------------------------------------------------------------------


def test_connect_checks_version_then_creates_the_index_with_the_percolator_mapping(es, sleeps):
    ready(es)
    perc = make(es, sleeps)
    perc.connect()
    perc.connect()  # idempotent: no more requests
    assert [(r.method, r.path) for r in es.requests] == [("GET", "/"), ("PUT", "/audience-rules")]
    assert es.requests[0].body == b""
    assert es.requests[0].headers["accept"] == "application/json"
    assert "authorization" not in es.requests[0].headers
    create = es.requests[1]
    json_headers(create)
    body = create.json
    assert set(body) == {"mappings"}
    mappings = body["mappings"]
    assert mappings["dynamic"] is False
    properties = mappings["properties"]
    for name, definition in USER_MAPPING["properties"].items():
        assert properties[name] == definition
    assert properties["rule_query"] == {"type": "percolator"}
    assert properties["rule_meta"] == {
        "properties": {
            "id": {"type": "keyword"},
            "advertiser": {"type": "keyword"},
            "audience": {"type": "keyword"},
            "version": {"type": "keyword"},
            "status": {"type": "keyword"},
            "uses_now": {"type": "boolean"},
            "extra": {"type": "object", "enabled": False},
        }
    }
    assert perc.server_version == "8.15.3"


def test_index_from_url_path_basic_auth_from_userinfo_and_settings(es, sleeps):
    ready(es, index="my-rules", version="9.1.4")
    url = es.url.replace("http://", "http://elastic:s%40cret@") + "/my-rules"
    perc = make(es, sleeps, url=url, index_settings={"number_of_shards": 1})
    perc.connect()
    expected = "Basic " + base64.b64encode(b"elastic:s@cret").decode()
    assert [r.headers["authorization"] for r in es.requests] == [expected, expected]
    assert es.requests[1].path == "/my-rules"
    assert es.requests[1].json["settings"] == {"number_of_shards": 1}
    assert "s@cret" not in perc.url and "s%40cret" not in perc.url


def test_api_key_header_wins_over_userinfo(es, sleeps):
    ready(es)
    perc = make(
        es,
        sleeps,
        url=es.url.replace("http://", "http://u:p@"),
        api_key="VnVhQ2ZHY0JDZGJrUW0tZTVhT3g6dWkybHAyYXhUTm1zeWFrdzl0dk5udw==",
    )
    perc.connect()
    assert (
        es.requests[0].headers["authorization"] == "ApiKey VnVhQ2ZHY0JDZGJrUW0tZTVhT3g6dWkybHAyYXhUTm1zeWFrdzl0dk5udw=="
    )


def test_explicit_index_overrides_url_path_and_bad_names_are_refused(es, sleeps):
    ready(es, index="other")
    make(es, sleeps, url=es.url + "/from-url", index="other").connect()
    assert es.requests[1].path == "/other"
    with pytest.raises(ValueError, match="index name"):
        make(es, sleeps, url=es.url + "/Upper")
    with pytest.raises(ValueError, match="reserved"):
        ElasticsearchPercolator(es.url, {"properties": {"rule_query": {"type": "keyword"}}})


def test_existing_index_gets_new_document_fields_through_put_mapping(es, sleeps):
    es.reply("GET", "/", body=es_info())
    es.reply("PUT", f"/{INDEX}", 400, already_exists(INDEX))
    es.reply("PUT", f"/{INDEX}/_mapping", body={"acknowledged": True})
    perc = make(es, sleeps)
    perc.connect()
    put_mapping = es.calls("PUT", f"/{INDEX}/_mapping")[0]
    json_headers(put_mapping)
    assert put_mapping.json == perc.index_mapping()
    assert sleeps == []  # a 400 is not retried


def test_existing_index_with_a_conflicting_mapping_is_a_clear_error(es, sleeps):
    es.reply("GET", "/", body=es_info())
    es.reply("PUT", f"/{INDEX}", 400, already_exists(INDEX))
    es.reply(
        "PUT",
        f"/{INDEX}/_mapping",
        400,
        error_body(
            400, "illegal_argument_exception", "mapper [age] cannot be changed from type [keyword] to [integer]"
        ),
    )
    with pytest.raises(
        PercolatorError, match=r"conflicts with the document mapping: .*mapper \[age\] cannot be changed"
    ):
        make(es, sleeps).connect()


@pytest.mark.parametrize(
    ("number", "distribution", "accepted"),
    [
        ("8.0.0", None, True),
        ("8.15.3", None, True),
        ("9.1.4", None, True),
        ("7.17.24", None, False),
        ("10.0.0", None, False),
        ("2.17.1", "opensearch", False),
    ],
)
def test_version_check(es, sleeps, number, distribution, accepted):
    es.reply("GET", "/", body=es_info(number, distribution))
    perc = make(es, sleeps)
    if accepted:
        es.reply("PUT", f"/{INDEX}", body=created_index(INDEX))
        perc.connect()
        assert perc.server_version == number
    else:
        with pytest.raises(PercolatorError, match=rf"is .*{number}; this backend needs Elasticsearch 8.x or 9.x"):
            perc.connect()
        assert [r.path for r in es.requests] == ["/"]  # nothing created on a wrong server


# -- percolation -------------------------------------------------------------------------------------


def test_percolate_sends_one_search_and_maps_slots_back_to_documents(es, sleeps):
    ready(es)
    es.reply("POST", SEARCH, body=search_page([("aud-1@v1", [0, 2]), ("aud-2@v3", [2]), ("aud-9@v1", [1])]))
    perc = make(es, sleeps)
    assert perc.percolate(DOCS) == [["aud-1@v1"], ["aud-9@v1"], ["aud-1@v1", "aud-2@v3"]]
    search = es.calls("POST", SEARCH)[0]
    json_headers(search)
    assert search.query == SEARCH_PARAMS
    assert search.query["allow_partial_search_results"] == "false"
    assert search.json == expected_search(DOCS)


def test_results_are_sorted_even_if_hits_are_not(es, sleeps):
    ready(es)
    es.reply("POST", SEARCH, body=search_page([("b", [0]), ("a", [0]), ("c", [0])]))
    assert make(es, sleeps).percolate([DOCS[0]]) == [["a", "b", "c"]]


def test_no_hits_means_no_matches(es, sleeps):
    ready(es)
    es.reply("POST", SEARCH, body=search_page([]))  # filter_path drops "hits" when empty
    assert make(es, sleeps).percolate(DOCS) == [[], [], []]


def test_percolate_paginates_with_search_after_on_the_rule_id(es, sleeps):
    ready(es)
    es.reply("POST", SEARCH, body=search_page([("r1", [0]), ("r2", [1])]))
    es.reply("POST", SEARCH, body=search_page([("r3", [0, 1]), ("r4", [2])]))
    es.reply("POST", SEARCH, body=search_page([("r5", [2])]))
    perc = make(es, sleeps, page_size=2)
    assert perc.percolate(DOCS) == [["r1", "r3"], ["r2", "r3"], ["r4", "r5"]]
    bodies = [r.json for r in es.calls("POST", SEARCH)]
    assert bodies == [
        expected_search(DOCS, size=2),
        expected_search(DOCS, size=2, after=["r2"]),
        expected_search(DOCS, size=2, after=["r4"]),
    ]


def test_a_full_last_page_costs_one_empty_page(es, sleeps):
    ready(es)
    es.reply("POST", SEARCH, body=search_page([("r1", [0]), ("r2", [0])]))
    es.reply("POST", SEARCH, body=search_page([]))
    assert make(es, sleeps, page_size=2).percolate([DOCS[0]]) == [["r1", "r2"]]
    assert es.calls("POST", SEARCH)[1].json["search_after"] == ["r2"]


def test_large_batches_are_split_and_slots_are_relative_to_each_search(es, sleeps):
    ready(es)
    docs = [{"user_id": f"u{i}", "age": 20 + i} for i in range(5)]
    es.reply("POST", SEARCH, body=search_page([("r-even", [0]), ("r-odd", [1])]))
    es.reply("POST", SEARCH, body=search_page([("r-even", [0]), ("r-odd", [1])]))
    es.reply("POST", SEARCH, body=search_page([("r-even", [0])]))
    result = make(es, sleeps, batch_size=2).percolate(docs)
    assert result == [["r-even"], ["r-odd"], ["r-even"], ["r-odd"], ["r-even"]]
    sent = [r.json["query"]["bool"]["filter"][0]["percolate"]["documents"] for r in es.calls("POST", SEARCH)]
    assert sent == [docs[0:2], docs[2:4], docs[4:5]]


def test_rule_ids_restrict_the_search_with_an_ids_filter(es, sleeps):
    ready(es)
    es.reply("POST", SEARCH, body=search_page([("aud-7@v2", [0])]))
    perc = make(es, sleeps)
    assert perc.percolate([DOCS[0]], rule_ids={"aud-7@v2", "aud-1@v1"}) == [["aud-7@v2"]]
    assert es.calls("POST", SEARCH)[0].json == expected_search([DOCS[0]], ids=["aud-1@v1", "aud-7@v2"])
    # an empty restriction matches nothing and needs no search
    assert perc.percolate(DOCS, rule_ids=[]) == [[], [], []]
    assert len(es.calls("POST", SEARCH)) == 1


def test_reserved_fields_are_stripped_from_documents(es, sleeps):
    ready(es)
    es.reply("POST", SEARCH, body=search_page([]))
    doc = {"user_id": "u1", "rule_query": {"match_all": {}}, "rule_meta": {"id": "x"}}
    make(es, sleeps).percolate([doc])
    assert es.calls("POST", SEARCH)[0].json["query"]["bool"]["filter"][0]["percolate"]["documents"] == [
        {"user_id": "u1"}
    ]


def bad_age_handler(request: RecordedRequest) -> tuple[int, Any]:
    """Elasticsearch's answer to a percolate search: a document_parsing_exception for the whole
    search if any document has a non-numeric age, else every document matches rule r1."""
    docs = request.json["query"]["bool"]["filter"][0]["percolate"]["documents"]
    for doc in docs:
        if isinstance(doc.get("age"), str) and not doc["age"].isdigit():
            return 400, search_phase_error(
                INDEX,
                "document_parsing_exception",
                f"[1:27] failed to parse field [age] of type [integer] in document with id 'null'. "
                f"Preview of field's value: '{doc['age']}'",
                caused_by={"type": "number_format_exception", "reason": f'For input string: "{doc["age"]}"'},
            )
    return 200, search_page([("r1", list(range(len(docs))))])


def test_a_rejected_document_is_found_by_bisection_and_reported_in_its_slot(es, sleeps):
    ready(es)
    es.reply_with("POST", SEARCH, bad_age_handler, times=0)
    docs: list[dict[str, Any]] = [{"age": 30}, {"age": 31}, {"age": "thirty"}, {"age": 33}]
    result = make(es, sleeps).percolate(docs, on_error="skip")
    assert result[0] == ["r1"] and result[1] == ["r1"] and result[3] == ["r1"]
    error = result[2]
    assert isinstance(error, InvalidDocumentError)
    assert error.field == "age"
    assert "failed to parse field [age] of type [integer]" in error.message
    assert 'For input string: "thirty"' in error.message
    assert not error.message.startswith("[1:27]")
    # whole batch, then halves [0,1] and [2,3], then [2] and [3]
    sizes = [len(r.json["query"]["bool"]["filter"][0]["percolate"]["documents"]) for r in es.calls("POST", SEARCH)]
    assert sizes == [4, 2, 2, 1, 1]
    assert sleeps == []  # a bad document is not an outage


def test_a_rejected_document_raises_by_default(es, sleeps):
    ready(es)
    es.reply_with("POST", SEARCH, bad_age_handler, times=0)
    with pytest.raises(InvalidDocumentError) as info:
        make(es, sleeps).percolate([{"age": 30}, {"age": "old"}])
    assert info.value.field == "age"


def test_other_document_errors_name_the_field(es, sleeps):
    ready(es)
    es.reply(
        "POST",
        SEARCH,
        400,
        search_phase_error(
            INDEX,
            "document_parsing_exception",
            "[1:9] object mapping for [geo] tried to parse field [geo] as object, but found a concrete value",
        ),
    )
    result = make(es, sleeps).percolate([{"geo": "paris"}], on_error="skip")
    assert isinstance(result[0], InvalidDocumentError) and result[0].field == "geo"


def test_a_non_object_document_is_reported_without_asking_elasticsearch(es, sleeps):
    ready(es)
    es.reply("POST", SEARCH, body=search_page([("r1", [0])]))
    result = make(es, sleeps).percolate([DOCS[0], ["not", "an", "object"]], on_error="skip")  # type: ignore[list-item]
    assert result[0] == ["r1"] and isinstance(result[1], InvalidDocumentError)
    assert es.calls("POST", SEARCH)[0].json["query"]["bool"]["filter"][0]["percolate"]["documents"] == [DOCS[0]]


def test_a_query_error_is_not_mistaken_for_a_document_error(es, sleeps):
    ready(es)
    es.reply(
        "POST", SEARCH, 400, search_phase_error(INDEX, "query_shard_exception", "field [rule_query] does not exist")
    )
    with pytest.raises(EsHttpError, match="field \\[rule_query\\] does not exist") as info:
        make(es, sleeps).percolate(DOCS)
    assert info.value.status == 400
    assert len(es.calls("POST", SEARCH)) == 1  # no bisection, no retry


def test_partial_shard_failures_are_not_silently_incomplete_results(es, sleeps):
    ready(es)
    body = search_page([("r1", [0])])
    body["_shards"] = {
        "failed": 1,
        "failures": [
            {
                "shard": 1,
                "index": INDEX,
                "reason": {
                    "type": "node_not_connected_exception",
                    "reason": "[es02][10.0.0.2:9300] Node not connected",
                },
            }
        ],
    }
    es.reply("POST", SEARCH, body=body)
    with pytest.raises(PercolatorUnavailableError, match=r"1 shard\(s\) failed.*Node not connected"):
        make(es, sleeps).percolate([DOCS[0]])


def test_a_deleted_index_is_recreated_and_the_search_retried(es, sleeps):
    ready(es)
    es.reply("POST", SEARCH, 404, index_not_found(INDEX))
    ready(es)
    es.reply("POST", SEARCH, body=search_page([]))
    assert make(es, sleeps).percolate([DOCS[0]]) == [[]]
    assert [(r.method, r.path) for r in es.requests] == [
        ("GET", "/"),
        ("PUT", f"/{INDEX}"),
        ("POST", SEARCH),
        ("GET", "/"),
        ("PUT", f"/{INDEX}"),
        ("POST", SEARCH),
    ]


def test_rule_ids_pages_through_every_rule(es, sleeps):
    ready(es)
    es.reply("POST", SEARCH, body=search_page([("a", []), ("b", [])]))
    es.reply("POST", SEARCH, body=search_page([("c", [])]))
    assert make(es, sleeps, page_size=2).rule_ids() == {"a", "b", "c"}
    bodies = [r.json for r in es.calls("POST", SEARCH)]
    assert bodies[0] == {
        "query": {"match_all": {}},
        "_source": False,
        "size": 2,
        "sort": [{"rule_meta.id": "asc"}],
        "track_total_hits": False,
    }
    assert bodies[1]["search_after"] == ["b"]


# -- retries and outages -------------------------------------------------------------------------------


def test_503_then_success_is_retried_with_backoff(es, sleeps):
    es.reply("GET", "/", 503, error_body(503, "master_not_discovered_exception", "no master"))
    es.reply(
        "GET",
        "/",
        503,
        error_body(503, "cluster_block_exception", "blocked by: [SERVICE_UNAVAILABLE/1/state not recovered]"),
    )
    ready(es)
    perc = make(es, sleeps)
    perc.connect()
    assert [r.path for r in es.requests] == ["/", "/", "/", f"/{INDEX}"]
    assert len(sleeps) == 2
    assert 0.001 <= sleeps[0] <= 0.01 and 0.002 <= sleeps[1] <= 0.02  # exponential caps, full jitter


def test_429_on_search_is_retried(es, sleeps):
    ready(es)
    es.reply(
        "POST",
        SEARCH,
        429,
        error_body(429, "es_rejected_execution_exception", "rejected execution of TimedRunnable on search queue"),
    )
    es.reply("POST", SEARCH, body=search_page([("r1", [0])]))
    assert make(es, sleeps).percolate([DOCS[0]]) == [["r1"]]
    assert len(sleeps) == 1


def test_down_cluster_raises_unavailable_naming_url_and_cause(sleeps):
    port = free_port()  # nothing listens there
    perc = ElasticsearchPercolator(
        f"http://elastic:hunter2@127.0.0.1:{port}", USER_MAPPING, retries=3, backoff=0.01, sleep=sleeps, timeout=2
    )
    with pytest.raises(PercolatorUnavailableError) as info:
        perc.percolate([DOCS[0]])
    assert str(info.value) == (
        f"Elasticsearch at http://127.0.0.1:{port} unreachable after 4 attempts: connection refused"
    )
    assert "hunter2" not in str(info.value)
    assert len(sleeps) == 3
    caps = [0.01, 0.02, 0.04]
    assert all(0.1 * cap <= slept <= cap for slept, cap in zip(sleeps, caps, strict=True))


def test_persistent_503_ends_in_unavailable_with_the_last_cause(es, sleeps):
    es.reply(
        "GET",
        "/",
        503,
        error_body(503, "cluster_block_exception", "blocked by: [SERVICE_UNAVAILABLE/2/no master]"),
        times=0,
    )
    with pytest.raises(
        PercolatorUnavailableError, match=r"unreachable after 3 attempts: HTTP 503 \(cluster_block_exception"
    ):
        make(es, sleeps, retries=2).connect()
    assert len(es.requests) == 3


def test_a_dropped_connection_is_retried(es, sleeps):
    es.drop("GET", "/")
    ready(es)
    make(es, sleeps).connect()
    assert len(sleeps) == 1


def test_a_read_timeout_is_not_retried(es, sleeps):
    """The search reached Elasticsearch and may still be running: sending it again piles up work."""
    ready(es)

    def slow(request: RecordedRequest) -> tuple[int, Any]:
        time.sleep(0.5)
        return 200, search_page([])

    es.reply_with("POST", SEARCH, slow)
    perc = make(es, sleeps, timeout=0.2)
    with pytest.raises(PercolatorUnavailableError, match=r"did not answer POST /audience-rules/_search within 0.2s"):
        perc.percolate([DOCS[0]])
    assert len(es.calls("POST", SEARCH)) == 1 and sleeps == []


def test_no_retry_on_other_4xx(es, sleeps):
    es.reply(
        "GET",
        "/",
        401,
        error_body(401, "security_exception", "missing authentication credentials for REST request [/]"),
    )
    with pytest.raises(EsHttpError, match="HTTP 401: security_exception"):
        make(es, sleeps).connect()
    assert len(es.requests) == 1 and sleeps == []


def test_client_rejects_non_http_urls():
    with pytest.raises(ValueError, match="not an http"):
        EsHttpClient("kafka://localhost:9092")


# -- rules (local validation with percolators.dsl first) ------------------------------------------------


@needs_dsl
def test_upsert_validates_locally_before_any_request(es, sleeps):
    perc = make(es, sleeps)
    bad = {"bool": {"must": [{"term": {"gender": "female"}}, {"term": {"favourite_colour": "red"}}]}}
    with pytest.raises(InvalidRuleError) as info:
        perc.upsert([Rule("good@v1", RULE_QUERY), Rule("bad@v1", bad)])
    assert info.value.rule_id == "bad@v1"
    assert "bool.must[1]" in info.value.path
    assert es.requests == []  # nothing sent, nothing stored


@needs_dsl
def test_upsert_sends_one_bulk_with_rule_id_as_doc_id_and_metadata(es, sleeps):
    ready(es)
    es.reply("POST", MGET, body=mget_response(INDEX, {}, ["aud-1@v1", "aud-2@v1"]))
    es.reply(
        "POST",
        BULK,
        body=bulk_response([bulk_ok("index", INDEX, "aud-1@v1"), bulk_ok("index", INDEX, "aud-2@v1", seq_no=1)]),
    )
    metadata = {"advertiser_id": "adv-42", "audience_id": "aud-1", "version": "1", "status": "active"}
    reports = make(es, sleeps).upsert([Rule("aud-1@v1", RULE_QUERY, metadata), Rule("aud-2@v1", NOW_QUERY)])
    assert [r.rule_id for r in reports] == ["aud-1@v1", "aud-2@v1"]
    mget = es.calls("POST", MGET)[0]
    json_headers(mget)
    assert mget.json == {"ids": ["aud-1@v1", "aud-2@v1"]}
    bulk = es.calls("POST", BULK)[0]
    assert bulk.headers["content-type"] == "application/x-ndjson"
    assert bulk.query == {"refresh": "true"}
    assert bulk.ndjson == [
        {"index": {"_id": "aud-1@v1"}},
        {
            "rule_query": RULE_QUERY,
            "rule_meta": {
                "id": "aud-1@v1",
                "uses_now": False,
                "advertiser": "adv-42",
                "audience": "aud-1",
                "version": "1",
                "status": "active",
                "extra": metadata,
            },
        },
        {"index": {"_id": "aud-2@v1"}},
        {"rule_query": NOW_QUERY, "rule_meta": {"id": "aud-2@v1", "uses_now": True}},
    ]


@needs_dsl
def test_elasticsearch_rejecting_a_rule_rolls_back_the_others_and_names_the_clause(es, sleeps):
    """The index was created by an older release whose mapping lacks geo.city: local validation
    passes, Elasticsearch refuses the rule; the rule applied in the same call is restored."""
    ready(es)
    old_source = {"rule_query": {"match_all": {}}, "rule_meta": {"id": "aud-1@v2", "uses_now": False}}
    es.reply("POST", MGET, body=mget_response(INDEX, {"aud-1@v2": old_source}, ["aud-3@v1", "aud-2@v1"]))
    city_rule = {"bool": {"filter": [{"term": {"gender": "male"}}, {"term": {"geo.city": "lyon"}}]}}
    es.reply(
        "POST",
        BULK,
        body=bulk_response(
            [
                bulk_ok("index", INDEX, "aud-1@v2", result="updated"),
                bulk_ok("index", INDEX, "aud-3@v1"),
                bulk_error(
                    "index",
                    INDEX,
                    "aud-2@v1",
                    400,
                    {
                        "type": "document_parsing_exception",
                        "reason": "[1:86] failed to parse: "
                        "No field mapping can be found for the field with name [geo.city]",
                        "caused_by": {
                            "type": "query_shard_exception",
                            "reason": "No field mapping can be found for the field with name [geo.city]",
                            "index_uuid": "q8ZCBqT6S8eL4lUw-VlFvA",
                            "index": INDEX,
                        },
                    },
                ),
            ]
        ),
    )
    es.reply(
        "POST",
        BULK,
        body=bulk_response(
            [
                bulk_ok("index", INDEX, "aud-1@v2", result="updated"),
                bulk_ok("delete", INDEX, "aud-3@v1", result="deleted"),
            ]
        ),
    )
    with pytest.raises(InvalidRuleError) as info:
        make(es, sleeps).upsert(
            [Rule("aud-1@v2", RULE_QUERY), Rule("aud-3@v1", RULE_QUERY), Rule("aud-2@v1", city_rule)]
        )
    assert info.value.rule_id == "aud-2@v1"
    assert info.value.path == "bool.filter[1].term.geo.city"
    assert "No field mapping can be found for the field with name [geo.city]" in info.value.message
    rollback = es.calls("POST", BULK)[1]
    assert rollback.ndjson == [{"index": {"_id": "aud-1@v2"}}, old_source, {"delete": {"_id": "aud-3@v1"}}]


@needs_dsl
def test_bulk_items_rejected_with_429_are_retried_alone(es, sleeps):
    ready(es)
    es.reply("POST", MGET, body=mget_response(INDEX, {}, ["a@v1", "b@v1"]))
    es.reply(
        "POST",
        BULK,
        body=bulk_response(
            [
                bulk_ok("index", INDEX, "a@v1"),
                bulk_error(
                    "index",
                    INDEX,
                    "b@v1",
                    429,
                    {
                        "type": "es_rejected_execution_exception",
                        "reason": "rejected execution of coordinating operation",
                    },
                ),
            ]
        ),
    )
    es.reply("POST", BULK, body=bulk_response([bulk_ok("index", INDEX, "b@v1")]))
    make(es, sleeps).upsert([Rule("a@v1", RULE_QUERY), Rule("b@v1", RULE_QUERY)])
    second = es.calls("POST", BULK)[1].ndjson
    assert [line for line in second if "index" in line] == [{"index": {"_id": "b@v1"}}]
    assert len(sleeps) == 1


def test_delete_is_a_bulk_delete_and_missing_rules_are_fine(es, sleeps):
    ready(es)
    es.reply(
        "POST",
        BULK,
        body=bulk_response(
            [
                bulk_ok("delete", INDEX, "a@v1", result="deleted"),
                bulk_ok("delete", INDEX, "gone@v1", result="not_found"),
            ]
        ),
    )
    make(es, sleeps).delete(["a@v1", "gone@v1", "a@v1"])
    bulk = es.calls("POST", BULK)[0]
    assert bulk.headers["content-type"] == "application/x-ndjson"
    assert bulk.query == {"refresh": "true"}
    assert bulk.ndjson == [{"delete": {"_id": "a@v1"}}, {"delete": {"_id": "gone@v1"}}]


def test_delete_failure_is_raised(es, sleeps):
    ready(es)
    es.reply(
        "POST",
        BULK,
        body=bulk_response(
            [
                bulk_error(
                    "delete",
                    INDEX,
                    "a@v1",
                    403,
                    {
                        "type": "cluster_block_exception",
                        "reason": "index [audience-rules] blocked by: [FORBIDDEN/8/index write (api)];",
                    },
                )
            ]
        ),
    )
    with pytest.raises(PercolatorError, match=r"could not delete rule 'a@v1'.*FORBIDDEN"):
        make(es, sleeps).delete(["a@v1"])


# -- pinned now ----------------------------------------------------------------------------------------


@pytest.mark.skipif(
    importlib.util.find_spec("percolators.dsl") is None or importlib.util.find_spec("percolators.embedded") is None,
    reason="needs the embedded engine (percolators.embedded, percolators.dsl)",
)
def test_pinned_now_evaluates_now_rules_in_process_and_the_rest_in_elasticsearch(es, sleeps):
    ready(es)
    docs = [
        {"user_id": "u1", "device": {"os": "ios"}, "last_seen": "2024-05-01T10:00:00Z"},
        {"user_id": "u2", "device": {"os": "ios"}, "last_seen": "2024-01-01T10:00:00Z"},
    ]
    es.reply("POST", SEARCH, body=search_page([("static@v1", [0, 1])]))
    now_rule_source = {"rule_query": NOW_QUERY, "rule_meta": {"extra": {"advertiser": "adv-1"}}}
    es.reply("POST", SEARCH, body=search_page([("recent-ios@v1", [])], with_source={"recent-ios@v1": now_rule_source}))
    perc = make(es, sleeps)
    result = perc.percolate(docs, now=datetime(2024, 5, 20, tzinfo=UTC))
    assert result == [["recent-ios@v1", "static@v1"], ["static@v1"]]
    first, second = (r.json for r in es.calls("POST", SEARCH))
    assert first == expected_search(docs, pinned=True)
    assert second == {
        "query": {"bool": {"filter": [{"term": {"rule_meta.uses_now": True}}]}},
        "_source": ["rule_query", "rule_meta.extra"],
        "size": 5000,
        "sort": [{"rule_meta.id": "asc"}],
        "track_total_hits": False,
    }


# -- error mapping helpers ------------------------------------------------------------------------------


def test_field_path_finds_keys_and_field_parameters():
    query = {"bool": {"must": [{"term": {"gender": "f"}}, {"bool": {"should": [{"exists": {"field": "geo.city"}}]}}]}}
    assert field_path(query, "gender") == "bool.must[0].term.gender"
    assert field_path(query, "geo.city") == "bool.must[1].bool.should[0].exists"
    assert field_path(query, "nope") is None


def test_rule_error_from_es_8_0_mapper_parsing_exception_shape():
    """8.0-8.7 wrap the percolator's QueryShardException in mapper_parsing_exception."""
    error = {
        "type": "mapper_parsing_exception",
        "reason": "failed to parse",
        "caused_by": {
            "type": "query_shard_exception",
            "reason": "No field mapping can be found for the field with name [shoe_size]",
        },
    }
    err = rule_error_from_es("r@v1", {"range": {"shoe_size": {"gte": 40}}}, error)
    assert (err.rule_id, err.path) == ("r@v1", "range.shoe_size")
    unknown = {
        "type": "document_parsing_exception",
        "reason": "[1:30] failed to parse: unknown query [percolate_me]",
        "caused_by": {"type": "parsing_exception", "reason": "unknown query [percolate_me]"},
    }
    err = rule_error_from_es("r@v1", {"bool": {"filter": [{"percolate_me": {}}]}}, unknown)
    assert err.path == "bool.filter[0].percolate_me"
    other = rule_error_from_es("r@v1", {}, {"type": "illegal_argument_exception", "reason": "too many clauses"})
    assert other.path == "" and "too many clauses" in other.message
