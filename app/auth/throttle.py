"""Per-process limits that keep floods off the database: failed API-key attempts per client address (checked before
the key's query), and open event streams per owner and per process.

The client address is the socket peer as the ASGI server reports it (`scope["client"]`); this module never reads
X-Forwarded-For. `distillery api` runs uvicorn with proxy headers on, and uvicorn itself replaces the peer by the
forwarded address only when the peer is one of its trusted proxies (`--forwarded-allow-ips` / FORWARDED_ALLOW_IPS,
127.0.0.1 by default), so a client cannot pick its own address by sending the header. IPv6 peers count per /64 (one
host usually holds a whole /64, so counting single addresses would give it 2^64 budgets).
"""
from __future__ import annotations

import ipaddress
import math
import threading
import time
from collections import OrderedDict

from app.core.errors import TooManyRequests

OVERFLOW = "*"  # the bucket shared by the addresses that find the table full


def client_address(scope) -> str:
    """The key failed attempts are counted by: the peer's IPv4 address, or its IPv6 /64."""
    client = scope.get("client")
    host = client[0] if client else ""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host or "unknown"
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class KeyAttemptsLimited(TooManyRequests):
    """429 for an address over `auth_failures_per_minute`, with Retry-After."""

    code = "auth_rate_limited"


class FailedKeyLimiter:
    """A token bucket per client address for key verifications: `per_minute` failures, bursts up to the same number.

    A key that is not in the verified cache takes a token before its query and gives it back when it verifies, so
    only failures spend the budget, and a burst can never run more queries than the budget (the check and the take
    are one step). The table holds only addresses whose bucket is partly spent, at most `max_addresses` of them: a
    bucket full again leaves it, a full table drops only entries whose bucket has refilled (a spent bucket is never
    forgotten, so nobody can flush a refused address out of it), and addresses that find no room share one overflow
    bucket."""

    def __init__(self, per_minute: int, max_addresses: int, clock=time.monotonic):
        self.clock = clock
        self.per_minute = per_minute
        self.rate = per_minute / 60.0
        self.capacity = float(per_minute)
        self.max_addresses = max_addresses
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()  # address -> [tokens, at], least recent first
        self._overflow = [self.capacity, clock()]
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._buckets)

    def _level(self, bucket: list[float], now: float) -> float:
        return min(self.capacity, bucket[0] + (now - bucket[1]) * self.rate)

    def _bucket(self, address: str, now: float) -> tuple[str, list[float]]:
        bucket = self._buckets.get(address)
        if bucket is not None:
            self._buckets.move_to_end(address)
            return address, bucket
        while len(self._buckets) >= self.max_addresses:
            oldest, old = next(iter(self._buckets.items()))
            if self._level(old, now) < self.capacity:
                return OVERFLOW, self._overflow  # every entry still counts: no room, and none is given up
            del self._buckets[oldest]
        bucket = self._buckets[address] = [self.capacity, now]
        return address, bucket

    def take(self, address: str) -> tuple[str | None, float]:
        """(the bucket charged, 0.0) when `address` may try a key; (None, seconds until it may) when not."""
        now = self.clock()
        with self._lock:
            key, bucket = self._bucket(address, now)
            tokens = self._level(bucket, now)
            if tokens < 1.0:
                bucket[0], bucket[1] = tokens, now
                return None, (1.0 - tokens) / self.rate
            bucket[0], bucket[1] = tokens - 1.0, now
            return key, 0.0

    def refund(self, key: str) -> None:
        """The attempt charged to bucket `key` did not fail (the key verified, or the database could not say)."""
        now = self.clock()
        with self._lock:
            bucket = self._overflow if key == OVERFLOW else self._buckets.get(key)
            if bucket is None:
                return
            bucket[0], bucket[1] = min(self.capacity, self._level(bucket, now) + 1.0), now
            if key != OVERFLOW and bucket[0] >= self.capacity:
                del self._buckets[key]

    def refusal(self, wait_s: float) -> KeyAttemptsLimited:
        retry = max(1, math.ceil(wait_s))
        return KeyAttemptsLimited(
            f"too many failed API key attempts from this address: the limit is {self.per_minute} per minute "
            f"(auth_failures_per_minute); retry in {retry} s", retry_after_s=retry,
            detail={"limit": "auth_failures_per_minute", "value": self.per_minute})


class TooManyEventStreams(TooManyRequests):
    code = "event_streams_limit"


class StreamSlot:
    """One open event stream; `close()` (idempotent) frees its place."""

    def __init__(self, slots: "StreamSlots", owner: str):
        self._slots, self.owner, self._open = slots, owner, True

    def close(self) -> None:
        if self._open:
            self._open = False
            self._slots._release(self.owner)


class StreamSlots:
    """Event streams open in this API process: at most `per_owner` per owner and `per_process` in all."""

    RETRY_AFTER_S = 5

    def __init__(self, per_owner: int, per_process: int):
        self.per_owner, self.per_process = per_owner, per_process
        self._by_owner: dict[str, int] = {}
        self._total = 0
        self._lock = threading.Lock()

    @property
    def open_count(self) -> int:
        return self._total

    def open(self, owner: str) -> StreamSlot:
        """A slot for one more stream of `owner`; TooManyEventStreams, naming the limit, when there is none."""
        with self._lock:
            mine = self._by_owner.get(owner, 0)
            if mine >= self.per_owner:
                raise TooManyEventStreams(
                    f"owner {owner!r} already has {mine} event streams open on this API process; the limit is "
                    f"{self.per_owner} (max_event_streams_per_owner): close one, or poll GET /v1/jobs/{{id}}",
                    retry_after_s=self.RETRY_AFTER_S,
                    detail={"limit": "max_event_streams_per_owner", "value": self.per_owner, "open": mine})
            if self._total >= self.per_process:
                raise TooManyEventStreams(
                    f"this API process already serves {self._total} event streams; the limit is {self.per_process} "
                    "(max_event_streams): retry later, or poll GET /v1/jobs/{id}",
                    retry_after_s=self.RETRY_AFTER_S,
                    detail={"limit": "max_event_streams", "value": self.per_process, "open": self._total})
            self._by_owner[owner] = mine + 1
            self._total += 1
        return StreamSlot(self, owner)

    def _release(self, owner: str) -> None:
        with self._lock:
            left = self._by_owner.get(owner, 0) - 1
            if left > 0:
                self._by_owner[owner] = left
            else:
                self._by_owner.pop(owner, None)
            self._total -= 1

class Guards:
    def __init__(self, settings):
        self.failed_keys = FailedKeyLimiter(settings.auth_failures_per_minute, settings.auth_failure_max_addresses)
        self.event_streams = StreamSlots(settings.max_event_streams_per_owner, settings.max_event_streams)


_make_lock = threading.Lock()


def guards(services) -> Guards:
    """This API process's limits, made from its settings on first use and kept with its services."""
    found = getattr(services, "guards", None)
    if found is None:
        with _make_lock:
            found = getattr(services, "guards", None)
            if found is None:
                found = services.guards = Guards(services.settings)
    return found
