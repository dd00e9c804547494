"""A small JSON-over-HTTP client for Elasticsearch, on urllib3, with retries and clear errors.

Why not the ``elasticsearch`` package: the wire format is the contract we test (the same requests
work on Elasticsearch 8 and 9, whose clients are version-locked), and urllib3 is already a core
dependency. This module knows HTTP, JSON, NDJSON, auth and retries; nothing about percolation.

Retry policy (exponential backoff with full jitter, as in the AWS architecture blog "Exponential
Backoff And Jitter"): connection errors, connect timeouts, dropped connections and HTTP
429/502/503/504 are retried up to ``retries`` times; every other 4xx/5xx is raised at once as
:class:`EsHttpError`. When the retries are used up, :class:`~percolators.errors.PercolatorUnavailableError`
names the URL (password removed) and the last cause.

A *read* timeout is not retried: the request reached Elasticsearch, which keeps running it (an
expensive percolation against many rules can take seconds per document, elastic/elasticsearch
#114392), and sending it again would only pile more work on a struggling cluster. It raises
PercolatorUnavailableError at once; the caller retries the batch later, as the port says.
"""

from __future__ import annotations

import base64
import random
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import quote, unquote, urlencode, urlsplit, urlunsplit

import orjson
import urllib3
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import NewConnectionError, ProtocolError, ReadTimeoutError
from urllib3.exceptions import TimeoutError as Urllib3Timeout

from percolators.errors import PercolatorError, PercolatorUnavailableError

#: Statuses worth retrying: 429 Too Many Requests (es_rejected_execution_exception, circuit
#: breakers), and gateway/availability errors (a node restarting, no master, a proxy in between).
RETRY_STATUSES = frozenset({429, 502, 503, 504})


class EsHttpError(PercolatorError):
    """Elasticsearch answered with an error status that is not worth retrying.

    ``body`` is the parsed JSON error document when there is one: ``{"error": {"root_cause": [...],
    "type", "reason", "caused_by"?}, "status"}`` (see the "Common options / error responses" page of
    the Elasticsearch REST docs).
    """

    def __init__(self, method: str, path: str, status: int, body: Any):
        self.method = method
        self.path = path
        self.status = status
        self.body = body
        super().__init__(f"Elasticsearch {method} {path} failed with HTTP {status}: {describe_error(body)}")

    @property
    def error(self) -> Mapping[str, Any]:
        err = self.body.get("error") if isinstance(self.body, Mapping) else None
        return err if isinstance(err, Mapping) else {}

    @property
    def error_type(self) -> str:
        return str(self.error.get("type", ""))

    def causes(self) -> list[Mapping[str, Any]]:
        """Every error object in the response: the top error, its ``caused_by`` chain, the
        ``root_cause`` list and each shard failure's ``reason`` (search_phase_execution_exception)."""
        return error_tree(self.error)


def error_tree(error: Any) -> list[Mapping[str, Any]]:
    out: list[Mapping[str, Any]] = []
    stack = [error]
    while stack:
        node = stack.pop()
        if not isinstance(node, Mapping):
            continue
        out.append(node)
        stack.append(node.get("caused_by"))
        for key in ("root_cause", "failed_shards"):
            for item in node.get(key) or ():
                stack.append(item.get("reason") if key == "failed_shards" and isinstance(item, Mapping) else item)
    return out


def describe_error(body: Any) -> str:
    """``type: reason`` of an Elasticsearch error body, with the deepest cause appended."""
    if isinstance(body, Mapping) and isinstance(body.get("error"), Mapping):
        err = body["error"]
        text = f"{err.get('type', 'error')}: {err.get('reason', '')}"
        roots = [r for r in err.get("root_cause") or () if isinstance(r, Mapping)]
        if roots and roots[0].get("reason") != err.get("reason"):
            text += f" (root cause {roots[0].get('type')}: {roots[0].get('reason')})"
        return text
    if isinstance(body, Mapping) and "error" in body:
        return str(body["error"])
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
    return text[:300]


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.password is not None else f"{parts.username}@"
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))


def _cause_text(exc: BaseException, timeout: float) -> str:
    """A short human cause for a transport error: the most specific exception in its chain."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__ or getattr(current, "reason", None)
    if any(isinstance(e, ConnectionRefusedError) for e in chain):
        return "connection refused"
    if any(isinstance(e, ConnectionResetError) for e in chain):
        return "connection reset by peer"
    # NewConnectionError subclasses ConnectTimeoutError in urllib3, so test it before timeouts.
    if isinstance(exc, NewConnectionError):
        return f"cannot connect ({exc})"
    if any(isinstance(e, Urllib3Timeout | TimeoutError) for e in chain):
        return f"timed out after {timeout:g}s"
    if isinstance(exc, ProtocolError):
        return f"connection dropped ({exc.args[0] if exc.args else exc})"
    return str(exc) or type(exc).__name__


class EsHttpClient:
    """JSON requests to one Elasticsearch endpoint.

    ``url`` is ``http(s)://[user:password@]host:port``; userinfo becomes HTTP basic auth. An
    ``api_key`` (the base64 ``id:key`` credential Elasticsearch returns as ``encoded``) is sent as
    ``Authorization: ApiKey <key>`` and wins over userinfo.
    """

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        connect_timeout: float = 5.0,
        retries: int = 3,
        backoff: float = 0.2,
        max_backoff: float = 10.0,
        sleep: Callable[[float], None] = time.sleep,
        rng: Callable[[], float] = random.random,
    ):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) Elasticsearch URL: {redact(url)!r}")
        host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        self.base_url = f"{parts.scheme}://{host}:{parts.port or (443 if parts.scheme == 'https' else 9200)}"
        self.display_url = self.base_url
        self.headers: dict[str, str] = {"Accept": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"ApiKey {api_key}"
        elif parts.username is not None:
            user = unquote(parts.username)
            password = unquote(parts.password or "")
            token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
            self.headers["Authorization"] = f"Basic {token}"
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._sleep = sleep
        self._rng = rng
        # retries=False: this class owns the retry policy (and its error messages).
        self._pool = urllib3.PoolManager(
            num_pools=4,
            maxsize=4,
            retries=False,
            timeout=urllib3.Timeout(connect=min(connect_timeout, timeout), read=timeout),
        )

    def close(self) -> None:
        self._pool.clear()

    # -- requests -----------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        ndjson: Iterable[Any] | None = None,
    ) -> Any:
        """Send one request and return the parsed JSON body of a 2xx answer.

        ``body`` is sent as ``application/json``; ``ndjson`` (an iterable of JSON values) as
        ``application/x-ndjson`` with a trailing newline, which the bulk API requires.
        Raises :class:`EsHttpError` for non-retryable errors and PercolatorUnavailableError once
        retries are exhausted.
        """
        status, payload = self.request_raw(method, path, params=params, body=body, ndjson=ndjson)
        if 200 <= status < 300:
            return payload
        raise EsHttpError(method, path, status, payload)

    def request_raw(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        ndjson: Iterable[Any] | None = None,
    ) -> tuple[int, Any]:
        """Like :meth:`request` but returns ``(status, parsed body)`` for any non-retryable status."""
        headers = dict(self.headers)
        data: bytes | None = None
        if ndjson is not None:
            data = b"".join(orjson.dumps(line) + b"\n" for line in ndjson)
            headers["Content-Type"] = "application/x-ndjson"
        elif body is not None:
            data = orjson.dumps(body)
            headers["Content-Type"] = "application/json"
        url = self.base_url + quote(path, safe="/_-.,*:@")
        if params:
            url += "?" + urlencode(params)
        attempts = self.retries + 1
        last_cause = ""
        for attempt in range(attempts):
            if attempt:
                self._sleep(self._delay(attempt))
            try:
                response = self._pool.request(method, url, body=data, headers=headers, redirect=False)
            except ReadTimeoutError as exc:
                raise PercolatorUnavailableError(
                    f"Elasticsearch at {self.display_url} did not answer {method} {path} within {self.timeout:g}s "
                    "(not retried: the request may still be running there)"
                ) from exc
            except Urllib3Error as exc:
                last_cause = _cause_text(exc, self.timeout)
                continue
            payload = _parse(response.data)
            if response.status in RETRY_STATUSES:
                last_cause = f"HTTP {response.status} ({describe_error(payload)})"
                continue
            return response.status, payload
        raise PercolatorUnavailableError(
            f"Elasticsearch at {self.display_url} unreachable after {attempts} attempts: {last_cause}"
        )

    def _delay(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(max_backoff, backoff * 2**(attempt-1))], at least a tenth
        of the cap so that a run of retries still spreads out."""
        cap = min(self.max_backoff, self.backoff * (2 ** (attempt - 1)))
        return cap * (0.1 + 0.9 * self._rng())


def _parse(data: bytes) -> Any:
    if not data:
        return None
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return data.decode("utf-8", "replace")
