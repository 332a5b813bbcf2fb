"""Per-user token buckets for create and open.

In memory, per gateway replica: with R replicas behind a load balancer a user gets at most
R times the configured rate. That is the point of it (stop one client hammering), not an
exact global quota; docs/reliability.md says so.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict

from redpacket.core.errors import ApiError


class RateLimiter:
    def __init__(self, per_s: float, burst: int, max_users: int = 200_000) -> None:
        self._per_s = per_s
        self._burst = float(burst)
        self._buckets: OrderedDict[int, tuple[float, float]] = OrderedDict()
        self._max_users = max_users

    def check(self, uid: int) -> None:
        """429 if this user's bucket is empty now, without spending a token."""
        if self._per_s <= 0 or uid not in self._buckets:
            return
        tokens, last = self._buckets[uid]
        if min(self._burst, tokens + (time.monotonic() - last) * self._per_s) < 1:
            self.take(uid)  # raises the 429, with its Retry-After

    def take(self, uid: int) -> None:
        """Spend one token of this user's bucket, or raise 429 with when to come back."""
        if self._per_s <= 0:
            return
        now = time.monotonic()
        tokens, last = self._buckets.get(uid, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._per_s)
        if tokens < 1:
            retry_after = max(1, math.ceil((1 - tokens) / self._per_s))
            self._buckets[uid] = (tokens, now)
            raise ApiError(
                429,
                "rate_limited",
                "too many requests; slow down",
                headers={"Retry-After": str(retry_after)},
            )
        self._buckets[uid] = (tokens - 1, now)
        self._buckets.move_to_end(uid)
        if len(self._buckets) > self._max_users:
            self._buckets.popitem(last=False)
