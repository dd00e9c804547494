"""A realistic, seeded OpenRTB 2.5 bid request stream for tests, benches, demos and ops.

``BidGenerator(seed=..., users=..., days=..., end=...)`` draws a population of UK users with
stable profiles (age via ``user.yob``, gender, occupation, interests, a home location in a city or
a London suburb with a real-looking postcode, a phone or tablet with a carrier), then emits bid
requests in which each user is seen many times (a few users very often, most users now and then),
from apps and sites on several exchanges, with event times (``ext.received_at``) spread over
``days`` days ending at ``end`` in stream order (with a little jitter, as on real exchanges).

Same seed, same arguments -> the same bytes. ``invalid_rate`` mixes in a fraction of broken
messages (truncated JSON, no user id, wrong types, not an object) for dead-letter paths.

Speed: profiles and app/site/device objects are built once and shared; a bid is a handful of dict
insertions plus ``orjson.dumps`` (well over 100k bids/s on one core), so it can feed the
20k bids/s bench.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

# (city, postcode outward codes, lat, lon, region, weight). London is split into suburbs.
PLACES: tuple[tuple[str, tuple[str, ...], float, float, str, float], ...] = (
    ("Wimbledon", ("SW19", "SW20"), 51.4214, -0.2064, "GB-ENG", 3),
    ("Clapham", ("SW4", "SW11"), 51.4620, -0.1380, "GB-ENG", 3),
    ("Camden", ("NW1", "NW5"), 51.5390, -0.1426, "GB-ENG", 3),
    ("Islington", ("N1", "N7"), 51.5362, -0.1033, "GB-ENG", 3),
    ("Hackney", ("E8", "E9"), 51.5450, -0.0553, "GB-ENG", 3),
    ("Brixton", ("SW2", "SW9"), 51.4613, -0.1156, "GB-ENG", 2),
    ("Greenwich", ("SE10",), 51.4826, -0.0077, "GB-ENG", 2),
    ("Richmond", ("TW9", "TW10"), 51.4613, -0.3037, "GB-ENG", 2),
    ("Shoreditch", ("E1", "EC2A"), 51.5265, -0.0780, "GB-ENG", 2),
    ("Stratford", ("E15", "E20"), 51.5413, -0.0032, "GB-ENG", 2),
    ("Croydon", ("CR0",), 51.3762, -0.0982, "GB-ENG", 2),
    ("Ealing", ("W5", "W13"), 51.5130, -0.3089, "GB-ENG", 2),
    ("Westminster", ("SW1A", "SW1P", "W1D"), 51.4975, -0.1357, "GB-ENG", 3),
    ("Manchester", ("M1", "M4", "M14", "M20"), 53.4808, -2.2426, "GB-ENG", 6),
    ("Birmingham", ("B1", "B5", "B15", "B29"), 52.4862, -1.8904, "GB-ENG", 6),
    ("Leeds", ("LS1", "LS6", "LS8"), 53.8008, -1.5491, "GB-ENG", 4),
    ("Glasgow", ("G1", "G3", "G12"), 55.8642, -4.2518, "GB-SCT", 4),
    ("Edinburgh", ("EH1", "EH3", "EH9"), 55.9533, -3.1883, "GB-SCT", 3),
    ("Liverpool", ("L1", "L8", "L17"), 53.4084, -2.9916, "GB-ENG", 3),
    ("Bristol", ("BS1", "BS6", "BS8"), 51.4545, -2.5879, "GB-ENG", 3),
    ("Sheffield", ("S1", "S10", "S11"), 53.3811, -1.4701, "GB-ENG", 3),
    ("Newcastle upon Tyne", ("NE1", "NE2", "NE6"), 54.9783, -1.6178, "GB-ENG", 2),
    ("Cardiff", ("CF10", "CF11", "CF24"), 51.4816, -3.1791, "GB-WLS", 2),
    ("Belfast", ("BT1", "BT7", "BT9"), 54.5973, -5.9301, "GB-NIR", 2),
    ("Nottingham", ("NG1", "NG7"), 52.9548, -1.1581, "GB-ENG", 2),
    ("Leicester", ("LE1", "LE2"), 52.6369, -1.1398, "GB-ENG", 2),
    ("Brighton", ("BN1", "BN2"), 50.8225, -0.1372, "GB-ENG", 2),
    ("Oxford", ("OX1", "OX4"), 51.7520, -1.2577, "GB-ENG", 1),
    ("Cambridge", ("CB1", "CB2"), 52.2053, 0.1218, "GB-ENG", 1),
)
LONDON_SUBURBS = frozenset(p[0] for p in PLACES[:13])

OCCUPATIONS = ("teacher", "nurse", "engineer", "student", "software developer", "accountant", "retail assistant",
               "doctor", "electrician", "driver", "chef", "lawyer", "designer", "retired", "manager", "plumber")
INTERESTS = ("football", "cooking", "travel", "fitness", "music", "gaming", "fashion", "technology", "finance",
             "gardening", "movies", "running", "cycling", "parenting", "pets", "motoring", "property", "reading")
SEGMENTS = ("in_market_auto", "new_parents", "frequent_flyers", "luxury_shoppers", "home_movers", "sports_fans")
# (os, os versions, devicetype, [(make, model)], weight)
DEVICES: tuple[tuple[str, tuple[str, ...], int, tuple[tuple[str, str], ...], float], ...] = (
    ("iOS", ("16.7", "17.4", "17.5", "18.1"), 4,
     (("Apple", "iPhone 13"), ("Apple", "iPhone 14"), ("Apple", "iPhone 15"), ("Apple", "iPhone 15 Pro")), 46),
    ("iOS", ("17.5", "18.1"), 5, (("Apple", "iPad"), ("Apple", "iPad Air")), 6),
    ("Android", ("12", "13", "14"), 4,
     (("Samsung", "Galaxy S23"), ("Samsung", "Galaxy S24"), ("Samsung", "Galaxy A54"), ("Google", "Pixel 7"),
      ("Google", "Pixel 8"), ("OnePlus", "11"), ("Xiaomi", "Redmi Note 12"), ("Motorola", "moto g84")), 44),
    ("Android", ("13", "14"), 5, (("Samsung", "Galaxy Tab S9"),), 4),
)
CARRIERS = (("EE", 30), ("Vodafone", 22), ("O2", 26), ("Three", 14), ("giffgaff", 5), ("Tesco Mobile", 3))
EXCHANGES = (("google_adx", 35), ("xandr", 20), ("pubmatic", 15), ("magnite", 15), ("openx", 10), ("index", 5))
APPS = (("com.bbc.news", "BBC News", ["IAB12"]), ("com.spotify.music", "Spotify", ["IAB1-6"]),
        ("com.king.candycrushsaga", "Candy Crush Saga", ["IAB9-30"]), ("uk.co.guardian.android", "The Guardian",
        ["IAB12"]), ("com.bskyb.skysports", "Sky Sports", ["IAB17"]), ("com.rightmove.android", "Rightmove",
        ["IAB21"]), ("com.ubercab", "Uber", ["IAB20"]), ("com.deliveroo.orderapp", "Deliveroo", ["IAB8"]))
SITES = (("bbc.co.uk", ["IAB12"]), ("theguardian.com", ["IAB12"]), ("dailymail.co.uk", ["IAB12", "IAB14"]),
         ("autotrader.co.uk", ["IAB2"]), ("rightmove.co.uk", ["IAB21"]), ("bbcgoodfood.com", ["IAB8"]),
         ("skysports.com", ["IAB17"]), ("mumsnet.com", ["IAB6"]))
BANNERS = ((320, 50), (300, 250), (728, 90), (320, 480), (300, 600), (160, 600))
LANGUAGES = (("en", 92), ("pl", 3), ("ur", 2), ("pa", 1), ("cy", 2))
_INWARD_LETTERS = "ABDEFGHJLNPQRSTUWXYZ"  # Royal Mail never uses C I K M O V in the inward code


@dataclass(frozen=True)
class GeneratedUser:
    user_id: str | None  # None: only the device advertising id identifies the user
    ifa: str
    user: dict[str, Any]
    device: dict[str, Any]

    @property
    def key(self) -> str:
        return self.user_id or self.ifa


def _weighted(rng: random.Random, items: tuple[tuple[Any, float], ...]) -> Any:
    return rng.choices([i for i, _ in items], weights=[w for _, w in items])[0]


class BidGenerator:
    """Deterministic for a seed; see the module docstring."""

    def __init__(self, *, seed: int = 0, users: int = 10_000, days: float = 7.0, end: datetime | None = None,
                 invalid_rate: float = 0.0) -> None:
        if users < 1:
            raise ValueError("users must be at least 1")
        if not 0 <= invalid_rate < 1:
            raise ValueError("invalid_rate must be in [0, 1)")
        self.seed = seed
        self.days = days
        self.end = (end or datetime(2026, 11, 22, 12, 0, tzinfo=UTC)).astimezone(UTC)
        self.invalid_rate = invalid_rate
        rng = random.Random(f"population-{seed}")
        self.population = [self._user(rng, i) for i in range(users)]
        self._apps = [{"id": f"app-{i}", "name": name, "bundle": bundle, "cat": cat,
                       "publisher": {"id": f"pub-{i}"}} for i, (bundle, name, cat) in enumerate(APPS)]
        self._sites = [{"id": f"site-{i}", "domain": domain, "page": f"https://www.{domain}/", "cat": cat,
                        "publisher": {"id": f"pub-s{i}"}} for i, (domain, cat) in enumerate(SITES)]
        # Impressions are shared objects too: banner sizes x a spread of floor prices.
        self._imps = [[{"id": "1", "banner": {"w": w, "h": h}, "bidfloor": round(0.05 + 0.05 * f, 2),
                        "bidfloorcur": "GBP"}] for f in range(50) for w, h in BANNERS]
        rng.shuffle(self._imps)

    def _user(self, rng: random.Random, index: int) -> GeneratedUser:
        place = rng.choices(PLACES, weights=[p[5] for p in PLACES])[0]
        city, outwards, lat, lon, region, _ = place
        inward = f"{rng.randint(1, 9)}{rng.choice(_INWARD_LETTERS)}{rng.choice(_INWARD_LETTERS)}"
        postcode = f"{rng.choice(outwards)} {inward}"
        geo = {"lat": round(lat + rng.uniform(-0.02, 0.02), 5), "lon": round(lon + rng.uniform(-0.03, 0.03), 5),
               "city": city, "zip": postcode, "region": region, "country": "GBR", "type": 2}
        os_name, versions, devicetype, models, _ = rng.choices(DEVICES, weights=[d[4] for d in DEVICES])[0]
        make, model = rng.choice(models)
        ifa = (f"{rng.getrandbits(32):08x}-{rng.getrandbits(16):04x}-4{rng.getrandbits(12):03x}-"
               f"{0x8000 | rng.getrandbits(14):04x}-{rng.getrandbits(48):012x}")
        device: dict[str, Any] = {
            "ua": f"Mozilla/5.0 ({os_name})",
            "ip": f"81.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
            "geo": geo, "devicetype": devicetype, "make": make, "model": model, "os": os_name,
            "osv": rng.choice(versions), "language": _weighted(rng, LANGUAGES), "ifa": ifa,
            "carrier": _weighted(rng, CARRIERS), "connectiontype": rng.choice((2, 6, 6, 7)),
        }
        user_id = None if rng.random() < 0.1 else f"u{self.seed}-{index:07d}"
        age = max(16, min(85, int(rng.gauss(38, 14))))
        user: dict[str, Any] = {}
        if user_id is not None:
            user["id"] = user_id
        if rng.random() < 0.9:
            user["yob"] = self.end.year - age
        gender = rng.choices(("M", "F", "O", None), weights=(47, 47, 2, 4))[0]
        if gender is not None:
            user["gender"] = gender
        if rng.random() < 0.8:
            user["keywords"] = ",".join(rng.sample(INTERESTS, rng.randint(1, 4)))
        if rng.random() < 0.25:
            segments = rng.sample(SEGMENTS, rng.randint(1, 2))
            user["data"] = [{"id": "dmp-1", "name": "acme_dmp",
                             "segment": [{"id": f"seg-{s}", "name": s} for s in segments]}]
        if rng.random() < 0.85:
            user["ext"] = {"occupation": "retired" if age >= 67 else rng.choice(OCCUPATIONS)}
        return GeneratedUser(user_id, ifa, user, device)

    def pick_user(self, rng: random.Random) -> GeneratedUser:
        return self.population[int(len(self.population) * rng.random() ** 1.6)]

    def bids(self, count: int, *, start_index: int = 0) -> Iterator[dict[str, Any] | bytes]:
        """``count`` bids as dicts (valid) or bytes (the invalid ones, when ``invalid_rate`` > 0)."""
        rng = random.Random(f"bids-{self.seed}-{start_index}")
        random_ = rng.random
        span_ms = int(self.days * 86_400_000)
        end_ms = int(self.end.timestamp() * 1000)
        start_ms = end_ms - span_ms
        step = span_ms / max(count, 1)
        cum_exchange = list(_cumulative([w for _, w in EXCHANGES]))
        exchange_pool = [EXCHANGES[_bisect(cum_exchange, (j + 0.5) / 200 * cum_exchange[-1])][0] for j in range(200)]
        imps = self._imps
        apps, sites = self._apps, self._sites
        population = self.population
        n_users = len(population)
        invalid_rate = self.invalid_rate
        jitter = min(300_000, int(step * 5) + 1)
        prefix = f"{self.seed:x}-"
        for i in range(count):
            at = min(start_ms + int(i * step) + int(random_() * jitter), end_ms - 1)
            if invalid_rate and random_() < invalid_rate:
                yield self._invalid(rng, start_index + i, at)
                continue
            # Skewed popularity: a few users are seen very often, most now and then.
            user = population[int(n_users * random_() ** 1.6)]
            r = random_()
            bid: dict[str, Any] = {"id": f"{prefix}{start_index + i:x}", "imp": imps[int(r * len(imps))]}
            if r < 0.65:
                bid["app"] = apps[int(random_() * len(apps))]
            else:
                bid["site"] = sites[int(random_() * len(sites))]
            bid["device"] = user.device
            bid["user"] = user.user
            bid["at"] = 1
            bid["tmax"] = 120
            received: int | str = at
            if i % 10 == 7:  # some exchanges send ISO 8601
                received = datetime.fromtimestamp(at / 1000, UTC).isoformat(timespec="milliseconds").replace(
                    "+00:00", "Z")
            bid["ext"] = {"exchange": exchange_pool[int(random_() * 200)], "received_at": received}
            yield bid

    def _invalid(self, rng: random.Random, index: int, at: int) -> bytes:
        kind = index % 5
        if kind == 0:
            return b'{"id": "broken-%d", "imp": [{"id": "1", "banner": {"w": 300' % index
        if kind == 1:
            return orjson.dumps({"id": f"anon-{index}", "imp": [], "device": {"os": "iOS"},
                                 "ext": {"received_at": at}})
        if kind == 2:
            user = self.pick_user(rng)
            return orjson.dumps({"id": f"badyob-{index}", "user": {"id": user.key, "yob": "nineteen-eighty"},
                                 "ext": {"received_at": at}})
        if kind == 3:
            return b'["not", "a", "bid request"]'
        return b"\xff\xfe garbage"

    def messages(self, count: int, *, start_index: int = 0) -> Iterator[tuple[bytes | None, bytes]]:
        """(key, value) pairs ready to produce to ``bids``: key = the user id when there is one."""
        dumps = orjson.dumps
        for bid in self.bids(count, start_index=start_index):
            if isinstance(bid, bytes):
                yield None, bid
            else:
                yield user_key(bid), dumps(bid)


def user_key(bid: Any) -> bytes | None:
    """The partitioning key of a bid: user.id, else device.ifa (None when neither is a string)."""
    if not isinstance(bid, dict):
        return None
    user, device = bid.get("user"), bid.get("device")
    uid = user.get("id") if isinstance(user, dict) else None
    if not isinstance(uid, str) or not uid:
        uid = device.get("ifa") if isinstance(device, dict) else None
    return uid.encode() if isinstance(uid, str) and uid else None


def _cumulative(weights: list[float]) -> Iterator[float]:
    total = 0.0
    for w in weights:
        total += w
        yield total


def _bisect(cum: list[float], x: float) -> int:
    for i, c in enumerate(cum):
        if x < c:
            return i
    return len(cum) - 1


def parse_end(text: str | None) -> datetime | None:
    """``--end`` values: ISO 8601 (naive means UTC) or None."""
    if not text:
        return None
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=UTC)


__all__ = ["BidGenerator", "GeneratedUser", "parse_end", "user_key"]
