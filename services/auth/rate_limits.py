"""In-process token buckets: the auth service answers every edge check, so it is where limits live."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass

from services.auth.settings import RateLimit

MAX_TRACKED_KEYS = 100_000


@dataclass
class _Bucket:
    tokens: float
    updated: float


class TokenBuckets:
    """One bucket per key; `take` answers 0 when allowed, else the seconds to wait."""

    def __init__(self, limit: RateLimit) -> None:
        self._limit = limit
        self._rate = limit.per_minute / 60.0
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def take(self, key: str, *, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        bucket = self._buckets.pop(key, None) or _Bucket(tokens=float(self._limit.burst), updated=now)
        bucket.tokens = min(float(self._limit.burst), bucket.tokens + (now - bucket.updated) * self._rate)
        bucket.updated = now
        self._buckets[key] = bucket
        if len(self._buckets) > MAX_TRACKED_KEYS:
            self._buckets.popitem(last=False)
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0
        return max(1, math.ceil((1.0 - bucket.tokens) / self._rate))
