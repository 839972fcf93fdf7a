"""Site probes: HTTP status, latency and TLS certificate lifetime of the node's sites.

Targets come from `probes.json` in the state dir (the site engine writes it; format in
docs/agents.md), re-read when the file changes. A round probes every target at once
(at most `MAX_CONCURRENCY` in flight), each on a fresh connection so that latency
includes connecting and TLS, the certificate is the one the server presents now, and
redirects are not followed. The metric callbacks report the latest completed round; a
probe that fails or hangs only ever turns its own site's `up` to 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from opentelemetry.metrics import CallbackOptions, Meter, Observation

from yakpanel.clock import Clock, SystemClock

log = logging.getLogger(__name__)

MAX_TARGETS = 200
MAX_CONCURRENCY = 16
DEFAULT_TIMEOUT_S = 5.0
MAX_TIMEOUT_S = 30.0
USER_AGENT = "yakpanel-agent-probe"


class ProbeConfigError(ValueError):
    """`probes.json` is not valid; the message says where."""


@dataclass(frozen=True)
class ProbeTarget:
    site: str
    url: str
    host: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def https(self) -> bool:
        return self.url.lower().startswith("https://")


@dataclass(frozen=True)
class ProbeResult:
    target: ProbeTarget
    up: bool
    status_code: int  # 0 when no HTTP response came back
    duration_s: float
    tls_days_left: float | None
    error: str | None = None


def parse_targets(data: Any) -> list[ProbeTarget]:
    """Targets from the decoded JSON: a list of {"site", "url", "host"?, "timeout_s"?}.
    Unknown keys are ignored (newer writers may add some); duplicates of (site, url)
    and targets past `MAX_TARGETS` are left out."""
    if not isinstance(data, list):
        raise ProbeConfigError("the file must hold a JSON list of probe targets")
    targets: dict[tuple[str, str], ProbeTarget] = {}
    for i, item in enumerate(data):
        where = f"target {i}"
        if not isinstance(item, dict):
            raise ProbeConfigError(f"{where} must be an object")
        site, url = item.get("site"), item.get("url")
        if not isinstance(site, str) or not site.strip() or len(site) > 253:
            raise ProbeConfigError(f"{where}: site must be a non-empty name")
        if not isinstance(url, str):
            raise ProbeConfigError(f"{where}: url must be an http:// or https:// URL")
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise ProbeConfigError(f"{where}: url is not valid: {exc}") from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ProbeConfigError(f"{where}: url must be an http:// or https:// URL")
        host = item.get("host")
        if host is not None and (
            not isinstance(host, str) or not host or any(c in host for c in "\r\n\0 /")
        ):
            raise ProbeConfigError(f"{where}: host must be a host name (the Host header)")
        timeout = item.get("timeout_s", DEFAULT_TIMEOUT_S)
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not 0 < timeout <= MAX_TIMEOUT_S
        ):
            raise ProbeConfigError(f"{where}: timeout_s must be a number in (0, {MAX_TIMEOUT_S}]")
        targets.setdefault((site, url), ProbeTarget(site, url, host, float(timeout)))
    found = list(targets.values())
    if len(found) > MAX_TARGETS:
        log.warning("probes: %d targets; probing the first %d", len(found), MAX_TARGETS)
    return found[:MAX_TARGETS]


class ProbeTargetsFile:
    """The targets in `path`, re-read when the file changes (size, mtime or inode). A
    missing file means no probes; an invalid one is reported once and the previous
    targets are kept."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._signature: tuple[int, int, int] | None = None
        self._targets: list[ProbeTarget] = []

    def current(self) -> list[ProbeTarget]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if self._signature is not None:
                log.info("probes: %s was removed; no site probes", self.path)
            self._signature, self._targets = None, []
            return []
        except OSError as exc:
            log.warning("probes: cannot read %s: %s", self.path, exc)
            return self._targets
        signature = (st.st_mtime_ns, st.st_size, st.st_ino)
        if signature == self._signature:
            return self._targets
        self._signature = signature
        try:
            targets = parse_targets(json.loads(self.path.read_bytes()))
        except (OSError, ValueError) as exc:
            log.warning(
                "probes: %s is not valid (%s); keeping the %d previous targets",
                self.path,
                exc,
                len(self._targets),
            )
            return self._targets
        log.info("probes: %d targets from %s", len(targets), self.path)
        self._targets = targets
        return targets


def default_tls_context() -> ssl.SSLContext:
    """The node's trust store, as a browser on it would verify the sites."""
    return ssl.create_default_context()


async def probe(
    target: ProbeTarget, verify: ssl.SSLContext, clock: Clock | None = None
) -> ProbeResult:
    """One GET of `target.url` within `target.timeout_s`, the body left unread."""
    clock = clock or SystemClock()
    headers = {"User-Agent": USER_AGENT}
    extensions: dict[str, Any] = {}
    if target.host:
        headers["Host"] = target.host
        if target.https:
            extensions["sni_hostname"] = target.host
    started = time.perf_counter()
    try:
        async with asyncio.timeout(target.timeout_s):
            async with (
                httpx.AsyncClient(
                    verify=verify,
                    follow_redirects=False,
                    trust_env=False,
                    timeout=target.timeout_s,
                    limits=httpx.Limits(max_keepalive_connections=0),
                ) as client,
                client.stream(
                    "GET", target.url, headers=headers, extensions=extensions
                ) as response,
            ):
                duration = time.perf_counter() - started
                days = None
                if target.https:
                    stream = response.extensions.get("network_stream")
                    ssl_object = stream.get_extra_info("ssl_object") if stream else None
                    der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
                    days = days_left(der, clock.now()) if der else None
                return ProbeResult(
                    target, response.status_code < 500, response.status_code, duration, days
                )
    except (httpx.HTTPError, TimeoutError, OSError, ssl.SSLError) as exc:
        duration = time.perf_counter() - started
        error = _describe(exc)
        verification_failed = _verification_failed(exc)
    days = None
    if target.https and verification_failed:
        remaining = max(0.5, target.timeout_s - duration)
        days = await _unverified_days_left(target, remaining, clock)
    return ProbeResult(target, False, 0, duration, days, error)


def days_left(der: bytes, now: datetime) -> float:
    cert = x509.load_der_x509_certificate(der)
    return (cert.not_valid_after_utc - now).total_seconds() / 86400


async def _unverified_days_left(
    target: ProbeTarget, timeout_s: float, clock: Clock
) -> float | None:
    """The certificate the server presents, read over a handshake that does not verify
    it: an expired or untrusted certificate still has a lifetime to report."""
    url = httpx.URL(target.url)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        async with asyncio.timeout(timeout_s):
            _reader, writer = await asyncio.open_connection(
                url.host,
                url.port or 443,
                ssl=context,
                server_hostname=target.host or url.host,
            )
            try:
                ssl_object = writer.get_extra_info("ssl_object")
                der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
            finally:
                writer.close()
                with contextlib.suppress(OSError, ssl.SSLError):
                    await writer.wait_closed()
    except (TimeoutError, OSError, ssl.SSLError) as exc:
        log.debug("probes: no certificate from %s: %s", target.url, exc)
        return None
    if not der:
        return None
    try:
        return days_left(der, clock.now())
    except ValueError as exc:
        log.debug("probes: unreadable certificate from %s: %s", target.url, exc)
        return None


def _verification_failed(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return text[:300]


class SiteProber:
    """Probes the targets of a `ProbeTargetsFile` every interval on the event loop and
    reports the latest results through the `yakpanel.site.*` instruments."""

    def __init__(
        self,
        targets: ProbeTargetsFile,
        *,
        verify: ssl.SSLContext | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.targets = targets
        self._verify = verify
        self._clock = clock or SystemClock()
        self._results: dict[tuple[str, str], ProbeResult] = {}
        self.rounds = 0

    @property
    def results(self) -> list[ProbeResult]:
        return list(self._results.values())

    async def run_once(self) -> list[ProbeResult]:
        targets = await asyncio.to_thread(self.targets.current)
        if self._verify is None:
            self._verify = await asyncio.to_thread(default_tls_context)
        verify = self._verify
        limit = asyncio.Semaphore(MAX_CONCURRENCY)

        async def bounded(target: ProbeTarget) -> ProbeResult:
            async with limit:
                try:
                    return await probe(target, verify, self._clock)
                except Exception as exc:  # a bug in one probe must not stop the others
                    log.exception("probes: %s failed unexpectedly", target.url)
                    return ProbeResult(target, False, 0, 0.0, None, _describe(exc))

        results = await asyncio.gather(*(bounded(t) for t in targets))
        previous = self._results
        self._results = {(r.target.site, r.target.url): r for r in results}
        self.rounds += 1
        for key, result in self._results.items():
            was = previous.get(key)
            if not result.up and (was is None or was.up):
                log.warning(
                    "probes: %s (%s) is down: %s",
                    result.target.site,
                    result.target.url,
                    result.error or f"HTTP {result.status_code}",
                )
            elif result.up and was is not None and not was.up:
                log.info("probes: %s (%s) is up again", result.target.site, result.target.url)
        return results

    async def run(self, interval_s: float) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.run_once()
            except Exception:
                log.exception("probes: a round failed")
            await asyncio.sleep(max(0.0, interval_s - (time.monotonic() - started)))

    def register(self, meter: Meter) -> None:
        meter.create_observable_gauge(
            "yakpanel.site.up", [self._observe("up")], "1", "1 if the site answered below 500"
        )
        meter.create_observable_gauge(
            "yakpanel.site.http.status_code",
            [self._observe("status_code")],
            "1",
            "HTTP status of the probe (0: no response)",
        )
        meter.create_observable_gauge(
            "yakpanel.site.http.duration",
            [self._observe("duration_s")],
            "s",
            "Seconds until the response headers, connecting included",
        )
        meter.create_observable_gauge(
            "yakpanel.site.tls.days_left",
            [self._observe("tls_days_left")],
            "d",
            "Days until the presented certificate expires",
        )

    def _observe(self, field: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(_: CallbackOptions) -> Iterable[Observation]:
            out = []
            for result in self.results:
                value = getattr(result, field)
                if value is None:
                    continue
                attributes = {"site": result.target.site, "url": result.target.url}
                out.append(Observation(float(value), attributes))
            return out

        return observe
