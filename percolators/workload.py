"""A realistic, seeded audience workload: advertiser rules and user documents over ``USER_MAPPING``.

Rules look like what advertisers write: a ``bool`` of 2-5 clauses over age ranges, gender,
occupation, interests, postcodes (prefix) and cities, a radius around a London suburb, device OS /
make / carrier, last-seen date math, sometimes ``must_not`` or ``should`` with
``minimum_should_match``. Documents have Zipf-skewed values (a few interests, makes and suburbs
are very common, most are rare), arrays, and missing fields, in the shapes bid normalisation
produces. Everything is deterministic for a given seed; used by tests, benchmarks and the demo.

    rules = generate_rules(10_000, seed=1)          # [{"id": ..., "query": {...}}, ...]
    docs = generate_documents(50_000, seed=2)       # [{...}, ...]
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from rules_service.schema import age_band

#: The time the documents are generated around; pass it as ``now`` when percolating.
WORKLOAD_NOW = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)

# (suburb, lat, lon, postcode district)
LONDON_SUBURBS: tuple[tuple[str, float, float, str], ...] = (
    ("Croydon", 51.3762, -0.0982, "CR0"),
    ("Bromley", 51.4039, 0.0198, "BR1"),
    ("Richmond", 51.4613, -0.3037, "TW9"),
    ("Wimbledon", 51.4214, -0.2064, "SW19"),
    ("Ealing", 51.5130, -0.3089, "W5"),
    ("Harrow", 51.5806, -0.3420, "HA1"),
    ("Enfield", 51.6523, -0.0807, "EN1"),
    ("Barnet", 51.6252, -0.1517, "EN5"),
    ("Romford", 51.5768, 0.1801, "RM1"),
    ("Kingston", 51.4123, -0.3007, "KT1"),
    ("Sutton", 51.3618, -0.1945, "SM1"),
    ("Greenwich", 51.4826, -0.0077, "SE10"),
    ("Stratford", 51.5413, -0.0032, "E15"),
    ("Camden", 51.5390, -0.1426, "NW1"),
    ("Islington", 51.5362, -0.1033, "N1"),
    ("Hackney", 51.5450, -0.0553, "E8"),
    ("Brixton", 51.4613, -0.1156, "SW2"),
    ("Clapham", 51.4618, -0.1384, "SW4"),
    ("Hammersmith", 51.4927, -0.2339, "W6"),
    ("Wembley", 51.5588, -0.2817, "HA9"),
    ("Walthamstow", 51.5830, -0.0200, "E17"),
    ("Lewisham", 51.4452, -0.0209, "SE13"),
    ("Putney", 51.4599, -0.2161, "SW15"),
    ("Chiswick", 51.4927, -0.2593, "W4"),
    ("Uxbridge", 51.5461, -0.4784, "UB8"),
    ("Hounslow", 51.4746, -0.3680, "TW3"),
    ("Ilford", 51.5590, 0.0741, "IG1"),
    ("Bexleyheath", 51.4560, 0.1500, "DA6"),
    ("Orpington", 51.3730, 0.0982, "BR6"),
    ("Twickenham", 51.4462, -0.3306, "TW1"),
)
# (city, lat, lon, postcode districts, region)
OTHER_CITIES: tuple[tuple[str, float, float, tuple[str, ...], str], ...] = (
    ("Manchester", 53.4808, -2.2426, ("M1", "M4", "M14", "M20"), "ENG"),
    ("Birmingham", 52.4862, -1.8904, ("B1", "B15", "B29"), "ENG"),
    ("Leeds", 53.8008, -1.5491, ("LS1", "LS6"), "ENG"),
    ("Glasgow", 55.8642, -4.2518, ("G1", "G12"), "SCT"),
    ("Bristol", 51.4545, -2.5879, ("BS1", "BS8"), "ENG"),
    ("Liverpool", 53.4084, -2.9916, ("L1", "L17"), "ENG"),
    ("Edinburgh", 55.9533, -3.1883, ("EH1", "EH3"), "SCT"),
    ("Cardiff", 51.4816, -3.1791, ("CF10", "CF24"), "WLS"),
)
OCCUPATIONS = (
    "student", "engineer", "teacher", "nurse", "retail", "manager", "developer", "designer", "driver",
    "accountant", "chef", "lawyer", "doctor", "consultant", "sales", "marketing", "electrician", "builder",
    "civil_servant", "retired", "unemployed", "artist", "journalist", "scientist", "pharmacist", "police",
    "firefighter", "banker", "analyst", "architect", "plumber", "mechanic", "cleaner", "carer", "farmer",
    "pilot", "musician", "photographer", "writer", "entrepreneur",
)
_INTEREST_ROOTS = (
    "football", "running", "cooking", "travel", "gaming", "music", "fashion", "fitness", "movies", "tech",
    "cars", "finance", "parenting", "pets", "gardening", "books", "photography", "yoga", "cycling", "crypto",
    "beauty", "wine", "coffee", "hiking", "tennis", "golf", "art", "theatre", "diy", "property",
)
_INTEREST_QUALIFIERS = ("", "_news", "_deals", "_fans", "_uk", "_london", "_pro", "_beginners", "_gear", "_events")
INTERESTS = tuple(root + q for q in _INTEREST_QUALIFIERS for root in _INTEREST_ROOTS)  # 300, popular roots first
LANGUAGES = ("en", "pl", "fr", "es", "ro", "pt", "it", "de", "ur", "bn", "pa", "ar", "tr", "zh")
# (os, versions, makes with models)
DEVICES: tuple[tuple[str, tuple[str, ...], tuple[tuple[str, tuple[str, ...]], ...]], ...] = (
    (
        "ios",
        ("17.4", "17.5", "18.0", "18.1", "16.7"),
        (("apple", ("iPhone15,2", "iPhone14,5", "iPhone13,2", "iPad13,1")),),
    ),
    (
        "android",
        ("14", "13", "12", "11", "10"),
        (
            ("samsung", ("SM-G991B", "SM-S911B", "SM-A536B", "SM-A146P", "SM-G998B")),
            ("google", ("Pixel 8", "Pixel 7a", "Pixel 6")),
            ("xiaomi", ("Redmi Note 12", "2201117TG", "M2101K6G")),
            ("motorola", ("moto g54", "moto e13")),
            ("oneplus", ("CPH2449", "LE2123")),
            ("huawei", ("ELS-NX9", "VOG-L29")),
            ("oppo", ("CPH2211", "CPH2477")),
        ),
    ),
    ("windows", ("10", "11"), (("microsoft", ("Surface Pro 9", "PC")), ("dell", ("XPS 13", "PC")))),
    ("macos", ("14.4", "13.6"), (("apple", ("MacBookPro18,1", "Mac")),)),
    ("tizen", ("6.5", "7.0"), (("samsung", ("QE55Q80B", "UE43AU7100")),)),
)
CARRIERS = ("ee", "vodafone", "o2", "three", "giffgaff", "tesco_mobile", "sky_mobile", "virgin_media", "lebara", "wifi")
DEVICE_TYPE_NAMES = ("phone", "mobile", "tablet", "desktop", "connected_tv", "connected_device", "set_top_box")
CATEGORIES = tuple(f"IAB{i}" for i in range(1, 27)) + tuple(f"IAB{i}-{j}" for i in range(1, 27) for j in range(1, 6))
EXCHANGES = ("adx", "appnexus", "rubicon", "openx", "pubmatic", "index", "smaato", "inmobi")
AD_SLOTS = ((320, 50), (300, 250), (728, 90), (320, 480), (160, 600), (300, 600), (970, 250))
BUNDLES = tuple(f"com.example.app{i}" for i in range(400))
DOMAINS = tuple(f"news{i}.example.co.uk" for i in range(300))


class _Zipf:
    """Draw items with probability ~ 1 / rank**s (rank 1 = first item)."""

    def __init__(self, items: Sequence[Any], s: float = 1.1):
        self.items = list(items)
        self.cum = list(itertools.accumulate(1.0 / (k**s) for k in range(1, len(self.items) + 1)))

    def one(self, rng: random.Random) -> Any:
        return rng.choices(self.items, cum_weights=self.cum)[0]

    def many(self, rng: random.Random, k: int) -> list[Any]:
        return list(dict.fromkeys(rng.choices(self.items, cum_weights=self.cum, k=k)))


_Z_OCC = _Zipf(OCCUPATIONS, 1.0)
_Z_INT = _Zipf(INTERESTS, 1.05)
_Z_INT_RULE = _Zipf(INTERESTS, 0.6)  # advertisers target a flatter spread of interests than users have
_Z_LANG = _Zipf(LANGUAGES, 2.0)
_Z_SUBURB = _Zipf(LONDON_SUBURBS, 0.9)
_Z_CARRIER = _Zipf(CARRIERS, 1.0)
_Z_CAT = _Zipf(CATEGORIES, 1.2)
_Z_EXCH = _Zipf(EXCHANGES, 1.0)
_Z_SLOT = _Zipf(AD_SLOTS, 1.0)
_Z_BUNDLE = _Zipf(BUNDLES, 1.1)
_Z_DOMAIN = _Zipf(DOMAINS, 1.1)
_OS_WEIGHTS = (0.42, 0.45, 0.07, 0.03, 0.03)


def _location(rng: random.Random) -> tuple[str, float, float, str, str]:
    """(city, lat, lon, postcode, region): 75% around London suburbs, the rest in other cities."""
    if rng.random() < 0.75:
        _name, lat, lon, district = _Z_SUBURB.one(rng)
        city, region = "London", "ENG"
    else:
        city, lat, lon, districts, region = rng.choice(OTHER_CITIES)
        district = rng.choice(districts)
    lat += rng.gauss(0, 0.02)
    lon += rng.gauss(0, 0.03)
    postcode = f"{district} {rng.randint(1, 9)}{rng.choice('ABDEFGHJLNPQRSTUWXYZ')}{rng.choice('ABDEFGHJLNPQRSTUWXYZ')}"
    return city, round(lat, 6), round(lon, 6), postcode, region


def generate_document(rng: random.Random, serial: int, now: datetime = WORKLOAD_NOW) -> dict[str, Any]:
    """One user document, as bid normalisation produces it."""
    doc: dict[str, Any] = {"user_id": f"u{serial:08d}"}
    if rng.random() < 0.85:
        age = max(13, min(90, int(rng.gauss(34, 12))))
        doc["age"] = age
        doc["age_band"] = age_band(age)
    if rng.random() < 0.85:
        doc["gender"] = rng.choices(("male", "female", "other"), (0.48, 0.48, 0.04))[0]
    if rng.random() < 0.6:
        doc["occupation"] = _Z_OCC.one(rng)
    n_interests = rng.choices((0, 1, 2, 3, 4, 6, 8), (0.15, 0.15, 0.2, 0.2, 0.15, 0.1, 0.05))[0]
    if n_interests:
        doc["interests"] = _Z_INT.many(rng, n_interests)
    if rng.random() < 0.9:
        doc["language"] = _Z_LANG.one(rng)
    if rng.random() < 0.9:
        city, lat, lon, postcode, region = _location(rng)
        geo: dict[str, Any] = {"city": city, "region": region, "country": "GBR"}
        if rng.random() < 0.8:
            geo["location"] = {"lat": lat, "lon": lon}
        if rng.random() < 0.85:
            geo["postcode"] = postcode
        doc["geo"] = geo
    os_name, versions, makes = rng.choices(DEVICES, _OS_WEIGHTS)[0]
    make, models = makes[0] if len(makes) == 1 else rng.choices(makes, [1.0 / (i + 1) for i in range(len(makes))])[0]
    device: dict[str, Any] = {"os": os_name, "os_version": rng.choice(versions), "make": make,
                              "model": rng.choice(models)}
    if os_name in ("ios", "android") and rng.random() < 0.9:
        device["carrier"] = _Z_CARRIER.one(rng)
        device["type"] = rng.choices(("phone", "mobile", "tablet"), (0.6, 0.3, 0.1))[0]
    else:
        device["type"] = {"windows": "desktop", "macos": "desktop", "tizen": "connected_tv"}.get(os_name, "tablet")
    doc["device"] = device
    if rng.random() < 0.6:
        doc["publisher"] = {"bundle": _Z_BUNDLE.one(rng), "category": _Z_CAT.many(rng, rng.randint(1, 3))}
    else:
        doc["publisher"] = {"domain": _Z_DOMAIN.one(rng), "category": _Z_CAT.many(rng, rng.randint(1, 2))}
    doc["exchange"] = _Z_EXCH.one(rng)
    w, h = _Z_SLOT.one(rng)
    doc["ad_slot"] = {"w": w, "h": h}
    seen = now - timedelta(seconds=rng.randint(0, 90 * 86400))
    doc["last_seen"] = seen.strftime("%Y-%m-%dT%H:%M:%SZ")
    return doc


def generate_documents(count: int, seed: int = 2, now: datetime = WORKLOAD_NOW) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [generate_document(rng, i, now) for i in range(count)]


# ----- rules ---------------------------------------------------------------------------------
_AGE_LOWS = (13, 16, 18, 18, 21, 25, 25, 30, 35, 40, 45, 50, 55, 65)
_AGE_SPANS = (4, 6, 9, 9, 14, 19, 29)
_DISTANCES = ("1km", "2km", "3km", "5km", "5km", "8km", "10km", "15km", "2mi", "5mi", "3000m", "0.5km")


def _clause_age(rng: random.Random) -> dict[str, Any]:
    low = rng.choice(_AGE_LOWS)
    r = rng.random()
    if r < 0.15:
        return {"range": {"age": {"gte": low}}}
    if r < 0.25:
        return {"range": {"age": {"gt": low, "lt": low + rng.choice(_AGE_SPANS) + 1}}}
    if r < 0.32:
        return {"terms": {"age_band": rng.sample(["18-24", "25-34", "35-44", "45-54", "55-64"], rng.randint(1, 2))}}
    return {"range": {"age": {"gte": low, "lte": low + rng.choice(_AGE_SPANS)}}}


def _clause_gender(rng: random.Random) -> dict[str, Any]:
    return {"term": {"gender": rng.choices(("male", "female", "other"), (0.45, 0.5, 0.05))[0]}}


def _clause_occupation(rng: random.Random) -> dict[str, Any]:
    values = list(dict.fromkeys(rng.choice(OCCUPATIONS) for _ in range(rng.randint(1, 3))))
    return {"terms": {"occupation": values}} if len(values) > 1 else {"term": {"occupation": values[0]}}


def _clause_interests(rng: random.Random) -> dict[str, Any]:
    values = _Z_INT_RULE.many(rng, rng.randint(1, 4))
    if len(values) == 1 and rng.random() < 0.3:
        return {"match": {"interests": values[0]}}
    return {"terms": {"interests": values}} if len(values) > 1 else {"term": {"interests": {"value": values[0]}}}


def _clause_place(rng: random.Random) -> dict[str, Any]:
    r = rng.random()
    if r < 0.35:
        district = rng.choice(LONDON_SUBURBS)[3]
        return {"prefix": {"geo.postcode": district + " "}}
    if r < 0.45:
        district = rng.choice(LONDON_SUBURBS)[3]
        return {"wildcard": {"geo.postcode": {"value": district + " ?A*"}}}
    if r < 0.75:
        cities = ["London", *(c[0] for c in OTHER_CITIES)]
        return {"terms": {"geo.city": rng.sample(cities, rng.randint(1, 3))}}
    return {"term": {"geo.region": rng.choice(("ENG", "SCT", "WLS"))}}


def _clause_radius(rng: random.Random) -> dict[str, Any]:
    _name, lat, lon, _ = rng.choice(LONDON_SUBURBS)
    r = rng.random()
    point: Any
    if r < 0.5:
        point = {"lat": lat, "lon": lon}
    elif r < 0.75:
        point = [lon, lat]
    else:
        point = f"{lat},{lon}"
    return {"geo_distance": {"distance": rng.choice(_DISTANCES), "geo.location": point}}


def _clause_device(rng: random.Random) -> dict[str, Any]:
    r = rng.random()
    if r < 0.4:
        return {"term": {"device.os": rng.choices(("ios", "android", "windows"), (0.45, 0.45, 0.1))[0]}}
    if r < 0.65:
        makes = sorted({m for _, _, ms in DEVICES for m, _ in ms})
        return {"terms": {"device.make": rng.sample(makes, rng.randint(1, 2))}}
    if r < 0.9:
        return {"terms": {"device.carrier": list(dict.fromkeys(_Z_CARRIER.one(rng) for _ in range(rng.randint(1, 2))))}}
    return {"term": {"device.type": rng.choice(("phone", "tablet", "connected_tv"))}}


def _clause_recency(rng: random.Random) -> dict[str, Any]:
    days = rng.choice((7, 14, 30, 60, 90))
    return {"range": {"last_seen": {"gte": f"now-{days}d/d"}}}


def _clause_context(rng: random.Random) -> dict[str, Any]:
    r = rng.random()
    if r < 0.4:
        return {"terms": {"publisher.category": _Z_CAT.many(rng, rng.randint(1, 3))}}
    if r < 0.7:
        return {"term": {"exchange": _Z_EXCH.one(rng)}}
    if r < 0.85:
        w, h = rng.choice(AD_SLOTS)
        return {"bool": {"filter": [{"term": {"ad_slot.w": w}}, {"term": {"ad_slot.h": h}}]}}
    return {"term": {"language": _Z_LANG.one(rng)}}


_CLAUSES = (
    (_clause_age, 0.55),
    (_clause_gender, 0.45),
    (_clause_occupation, 0.2),
    (_clause_interests, 0.6),
    (_clause_place, 0.3),
    (_clause_radius, 0.2),
    (_clause_device, 0.35),
    (_clause_recency, 0.1),
    (_clause_context, 0.2),
)
_NEGATABLE = (_clause_device, _clause_interests, _clause_occupation, _clause_place)


def generate_rule_query(rng: random.Random) -> dict[str, Any]:
    """One audience query: a bool of 2-5 clauses (filters, sometimes must_not / should)."""
    n = rng.choices((2, 3, 4, 5), (0.15, 0.35, 0.35, 0.15))[0]
    makers = [maker for maker, _ in _CLAUSES]
    weights = [weight for _, weight in _CLAUSES]
    chosen: list[Any] = []
    while len(chosen) < n:
        maker = rng.choices(makers, weights)[0]
        if maker not in chosen:
            chosen.append(maker)
    body: dict[str, Any] = {}
    shape = rng.random()
    if shape < 0.15 and n >= 3:  # "any two of these interests", "at least 50%"
        should = [_clause_interests(rng) for _ in range(rng.randint(2, 4))]
        body["should"] = should
        body["minimum_should_match"] = rng.choice((1, 2, "50%", "-1", "2<75%")) if len(should) > 2 else 1
        chosen = chosen[: n - 1]
    elif shape < 0.22:  # users in either place (should is optional next to filters unless required)
        body["should"] = [_clause_place(rng), _clause_radius(rng)]
        body["minimum_should_match"] = 1
        chosen = chosen[: n - 1]
    body["filter"] = [maker(rng) for maker in chosen]
    if rng.random() < 0.2:
        body["must_not"] = [rng.choice(_NEGATABLE)(rng)]
    if rng.random() < 0.1 and body["filter"]:  # some advertisers write must instead of filter
        body["must"] = [body["filter"].pop()]
    if not body["filter"]:
        del body["filter"]
    query: dict[str, Any] = {"bool": body}
    if rng.random() < 0.03:
        query = {"constant_score": {"filter": query}}
    return query


def generate_rules(count: int, seed: int = 1, prefix: str = "aud") -> list[dict[str, Any]]:
    """``count`` rules ``{"id": "<prefix>-<n>@v1", "query": {...}}``."""
    rng = random.Random(seed)
    return [{"id": f"{prefix}-{i:06d}@v1", "query": generate_rule_query(rng)} for i in range(count)]
