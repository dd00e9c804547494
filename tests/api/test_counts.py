"""size, sizes, insights and live (SSE) through HTTP against real RedisCounters."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson
import pytest

from tests.api.conftest import ApiEnv
from tests.api.fakes import batch_for

pytestmark = pytest.mark.redis

NOW = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)


def feed(api: ApiEnv, rule_id: str, events: list[tuple[datetime, str, dict[str, str]]], offset: int = 1) -> None:
    assert api.counters.apply(batch_for(rule_id, events), "test", {("bids", 0): offset})


def test_size_by_days_and_by_window_reads_the_serving_version(api: ApiEnv) -> None:
    headers = api.advertiser()
    audience = api.create(headers)
    rid = f"{audience['id']}@v1"
    feed(api, rid, [(NOW - timedelta(days=2, hours=3), "u1", {}), (NOW - timedelta(days=2), "u2", {}),
                    (NOW - timedelta(days=40), "u3", {}), (NOW - timedelta(hours=2), "u1", {})])
    url = f"/v1/audiences/{audience['id']}/size"
    body = api.client.get(url, headers=headers).get_json()  # default: 30 days
    assert (body["unique_users"], body["matches"], body["version"]) == (2, 3, 1)
    assert body["from"].endswith("Z") and body["to"].endswith("Z")
    assert datetime.fromisoformat(body["to"]) - datetime.fromisoformat(body["from"]) == timedelta(days=30)
    body = api.client.get(url + "?days=90", headers=headers).get_json()
    assert (body["unique_users"], body["matches"]) == (3, 4)
    start, end = (NOW - timedelta(days=3)).isoformat(), (NOW - timedelta(days=1)).isoformat()
    body = api.client.get(url, query_string={"from": start, "to": end}, headers=headers).get_json()
    assert (body["unique_users"], body["matches"]) == (2, 2)
    # a new version backfilling keeps v1 serving
    api.client.put(f"/v1/audiences/{audience['id']}", json={"rule": {"term": {"gender": "female"}},
                                                             "lookback_days": 30}, headers=headers)
    feed(api, f"{audience['id']}@v2", [(NOW - timedelta(hours=1), "x", {})], offset=2)
    assert api.client.get(url, headers=headers).get_json()["version"] == 1
    api.store.activate_version(audience["id"], 2)
    body = api.client.get(url, headers=headers).get_json()
    assert (body["version"], body["unique_users"]) == (2, 1)


@pytest.mark.parametrize(("query", "field"), [
    ("days=0", "days"), ("days=401", "days"), ("days=abc", "days"), ("from=yesterday", "from"),
    ("from=2026-01-02T00:00:00Z&to=2026-01-01T00:00:00Z", "from"), ("days=3&to=2026-01-01T00:00:00Z", "days"),
    ("from=2020-01-01T00:00:00Z&to=2026-01-01T00:00:00Z", "from"),
])
def test_size_bad_parameters_are_400_with_fields(api: ApiEnv, query: str, field: str) -> None:
    headers = api.advertiser()
    audience = api.create(headers)
    response = api.client.get(f"/v1/audiences/{audience['id']}/size?{query}", headers=headers)
    assert response.status_code == 400
    assert field in response.get_json()["error"]["fields"], response.get_json()


def test_sizes_batch(api: ApiEnv) -> None:
    headers = api.advertiser()
    ids = [api.create(headers, name=f"a{i}")["id"] for i in range(3)]
    for i, audience_id in enumerate(ids):
        feed(api, f"{audience_id}@v1", [(NOW - timedelta(hours=1), f"u{j}", {}) for j in range(i + 1)], offset=i + 1)
    body = api.client.get(f"/v1/audiences/sizes?ids={','.join(ids)}&ids=aud_missing&days=7", headers=headers)
    assert body.status_code == 200
    data = body.get_json()
    assert [(s["audience_id"], s["unique_users"]) for s in data["sizes"]] == [(ids[0], 1), (ids[1], 2), (ids[2], 3)]
    assert data["not_found"] == ["aud_missing"]
    too_many = ",".join(f"a{i}" for i in range(101))
    assert api.client.get(f"/v1/audiences/sizes?ids={too_many}", headers=headers).status_code == 400
    assert api.client.get("/v1/audiences/sizes", headers=headers).status_code == 400


def test_insights_series_and_breakdowns(api: ApiEnv) -> None:
    headers = api.advertiser()
    audience = api.create(headers)
    day = NOW.replace(hour=0) - timedelta(days=2)
    feed(api, f"{audience['id']}@v1", [
        (day + timedelta(hours=1), "u1", {"gender": "male", "device.os": "ios"}),
        (day + timedelta(hours=2), "u2", {"gender": "male", "device.os": "android"}),
        (day + timedelta(days=1, hours=1), "u1", {"gender": "male", "device.os": "ios"}),
    ])
    url = f"/v1/audiences/{audience['id']}/insights"
    body = api.client.get(url, query_string={"from": day.isoformat(), "to": (day + timedelta(days=2)).isoformat(),
                                             "dimension": ["gender", "device.os"]}, headers=headers).get_json()
    assert body["granularity"] == "day"
    assert [(p["unique_users"], p["matches"]) for p in body["series"]] == [(2, 2), (1, 1)]
    assert body["series"][0]["start"].startswith(day.strftime("%Y-%m-%dT00:00:00"))
    assert body["breakdowns"] == {"gender": {"male": 3}, "device.os": {"ios": 2, "android": 1}}
    hourly = api.client.get(url, query_string={"from": day.isoformat(), "to": (day + timedelta(hours=3)).isoformat(),
                                               "granularity": "hour", "dimension": "gender,device.os"},
                            headers=headers).get_json()
    assert [p["matches"] for p in hourly["series"]] == [0, 1, 1]
    assert set(hourly["breakdowns"]) == {"gender", "device.os"}
    bad = api.client.get(url + "?dimension=shoe_size", headers=headers)
    assert bad.status_code == 400 and "dimension" in bad.get_json()["error"]["fields"]
    assert api.client.get(url + "?granularity=week", headers=headers).status_code == 400
    assert api.client.get(url + "?granularity=hour&days=60", headers=headers).status_code == 400


def _events(body: bytes) -> list[dict]:
    events = []
    for block in body.decode().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(":"))
        if lines.get("event") == "counts":
            events.append(orjson.loads(lines["data"]))
    return events


def test_live_sends_counts_at_once_then_on_change(api: ApiEnv) -> None:
    headers = api.advertiser()
    audience = api.create(headers)
    rid = f"{audience['id']}@v1"
    feed(api, rid, [(NOW - timedelta(hours=1), "u1", {})])
    response = api.client.get(f"/v1/audiences/{audience['id']}/live?max_events=2&timeout=10",
                              headers=headers, buffered=False)
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-cache"
    chunks = iter(response.response)
    assert next(chunks).startswith(b"retry:")
    first = _events(next(chunks))
    # the workers count a new user while the dashboard listens
    feed(api, rid, [(NOW - timedelta(hours=1), "u2", {}), (NOW - timedelta(hours=1), "u1", {})], offset=2)
    rest = _events(b"".join(chunks))  # max_events=2 ends the stream
    events = first + rest
    assert [(e["unique_users"], e["matches"]) for e in events] == [(1, 1), (2, 3)]
    assert events[0]["version"] == 1 and events[0]["audience_id"] == audience["id"]


def test_live_coalesces_and_times_out(api: ApiEnv) -> None:
    headers = api.advertiser()
    audience = api.create(headers)
    response = api.client.get(f"/v1/audiences/{audience['id']}/live?timeout=1.5", headers=headers)
    events = _events(response.data)
    assert len(events) == 1 and events[0]["unique_users"] == 0  # unchanged counts are not repeated
    assert api.client.get(f"/v1/audiences/{audience['id']}/live?interval=0.5", headers=headers).status_code == 400


def test_live_reports_deletion(api: ApiEnv) -> None:
    headers = api.advertiser()
    audience = api.create(headers)
    response = api.client.get(f"/v1/audiences/{audience['id']}/live?timeout=5", headers=headers,
                              buffered=False)
    chunks = iter(response.response)
    assert next(chunks).startswith(b"retry:")
    assert b"event: counts" in next(chunks)
    api.store.delete_audience(audience["id"])
    assert b"event: deleted" in next(chunks)
    response.close()


def test_batched_summaries_equal_per_rule_reads(api: ApiEnv) -> None:
    from rules_service.api.batch_counts import summaries
    from tests.api.fakes import FakeCounters

    rules = [f"aud_b{i}@v1" for i in range(4)]
    fake = FakeCounters()
    for i, rid in enumerate(rules):
        events: list[tuple[datetime, str, dict[str, str]]] = [
            (NOW - timedelta(days=d, hours=h), f"u{(d * 7 + h) % (5 + i)}", {})
            for d in range(0, 20, 3) for h in range(0, 24, 5 + i)]
        feed(api, rid, events, offset=i + 1)
        for when, user, _ in events:
            fake.add(rid, when, user)
    for start, end in [(NOW - timedelta(days=30), NOW + timedelta(hours=1)),
                       (NOW - timedelta(days=10, hours=5), NOW - timedelta(days=2, hours=3))]:
        batched = summaries(api.counters, [*rules, "aud_none@v1"], start, end)
        single = [(api.counters.unique_users(r, start, end), api.counters.matches(r, start, end))
                  for r in [*rules, "aud_none@v1"]]
        assert batched == single
        assert summaries(fake, rules, start, end) == [(fake.unique_users(r, start, end), fake.matches(r, start, end))
                                                      for r in rules]
        assert batched[-1] == (0, 0) and all(m > 0 for _, m in batched[:-1])


def test_closed_days_sketch_cache_is_exact_bounded_and_deleted_with_the_rule(api: ApiEnv) -> None:
    from rules_service.api import batch_counts
    from rules_service.api.batch_counts import summaries

    rid = "aud_cache@v1"
    events: list[tuple[datetime, str, dict[str, str]]] = [
        (NOW - timedelta(days=d), f"u{d % 13}", {}) for d in range(2, 60)]
    feed(api, rid, events)
    start, end = NOW - timedelta(days=90), NOW + timedelta(hours=1)
    assert summaries(api.counters, [rid], start, end) == [(13, 58)]
    cache_keys = [k.decode() for k in api.redis.keys("c:{r:aud_cache@v1}:*:cache:*")]
    assert len(cache_keys) == 2 and all(0 < api.redis.ttl(k) <= batch_counts.CACHE_TTL_S for k in cache_keys)
    # a replay adds a user to an old day: visible once the merged sketch expires, live days at once
    feed(api, rid, [(NOW - timedelta(days=30), "late", {})], offset=2)
    feed(api, rid, [(NOW - timedelta(hours=1), "live", {})], offset=3)
    assert summaries(api.counters, [rid], start, end) == [(14, 59)]  # 'live' counted, 'late' not yet
    api.redis.delete(cache_keys[0])  # what the TTL does (either key missing rebuilds both)
    assert summaries(api.counters, [rid], start, end) == [(15, 60)]
    assert summaries(api.counters, [rid], start, end)[0][0] == api.counters.unique_users(rid, start, end)
    api.counters.delete_rule(rid)
    assert api.redis.keys("c:{r:aud_cache@v1}:*") == []


def test_sizes_under_replay_are_exact_and_a_replay_request_drops_the_cache(api: ApiEnv) -> None:
    headers = api.advertiser()
    audience = api.create(headers, lookback_days=90)  # v1 serves while its backfill is pending
    rid = f"{audience['id']}@v1"
    url = f"/v1/audiences/{audience['id']}/size?days=90"
    feed(api, rid, [(NOW - timedelta(days=d), f"u{d}", {}) for d in range(2, 40)])
    assert api.client.get(url, headers=headers).get_json()["unique_users"] == 38
    feed(api, rid, [(NOW - timedelta(days=20), "replayed", {})], offset=2)  # the replay writes the past
    assert api.client.get(url, headers=headers).get_json()["unique_users"] == 39  # at once
    assert api.redis.keys(f"c:{{r:{rid}}}:*cache*") == []  # nothing cached meanwhile
    api.store.activate_version(audience["id"], 1)  # replay done
    assert api.client.get(url, headers=headers).get_json()["unique_users"] == 39
    assert api.redis.keys(f"c:{{r:{rid}}}:*cache*") != []  # now cached
    # a new replay of the serving version (e.g. POST /replays) drops the cache before writing
    doc = api.store.get_audience(audience["id"])
    assert doc is not None
    api.app.extensions["rules_service"].backfills.start(doc, 1, 90)
    assert api.redis.keys(f"c:{{r:{rid}}}:*cache*") == []


def test_live_ends_with_an_error_event_when_counters_fail(api: ApiEnv) -> None:
    from tests.api.fakes import FakeCounters

    class FailingSecondTime(FakeCounters):
        calls = 0

        def unique_users(self, rule_id: str, start: datetime, end: datetime) -> int:
            self.calls += 1
            if self.calls > 1:
                raise ConnectionError("redis went away")
            return 7

    headers = api.advertiser()
    audience = api.create(headers)
    api.app.extensions["rules_service"]._provided["COUNTERS"] = FailingSecondTime()
    body = api.client.get(f"/v1/audiences/{audience['id']}/live?timeout=5", headers=headers).data.decode()
    assert _events(body.encode())[0]["unique_users"] == 7
    assert body.rstrip().endswith('data: {"type":"service_unavailable","message":"counts unavailable '
                                  '(ConnectionError)"}')


def test_size_reads_survive_a_script_flush(api: ApiEnv) -> None:
    from rules_service.api.batch_counts import summaries

    rid = "aud_flush@v1"
    feed(api, rid, [(NOW - timedelta(days=d), f"u{d}", {}) for d in range(1, 30)])
    window = (NOW - timedelta(days=90), NOW + timedelta(hours=1))
    assert summaries(api.counters, [rid], *window) == [(29, 29)]
    api.redis.script_flush()
    api.redis.delete(*api.redis.keys("c:*cache*"))  # the build script must be reloaded too
    assert summaries(api.counters, [rid], *window) == [(29, 29)]
