"""Per-user token buckets for create and open.

In memory, per gateway replica: with R replicas behind a load balancer a user gets at most
R times the configured rate. That is the point of it (stop one client hammering), not an
exact global quota; docs/reliability.md says so.

A bucket that has refilled to its burst is the same as no bucket, so buckets leave as soon
as they are full again (oldest use first): the limiter holds the users of the last
``burst / per_s`` seconds (2 s by default), not every user seen. The crowd opens once each,
and a bucket per opener kept up to ``max_users`` had the gateway's memory grow all run.
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
        buckets = self._buckets
        buckets[uid] = (tokens - 1, now)
        buckets.move_to_end(uid)
        for _ in range(2):  # at most two a call: O(1), and more leave than a crowd adds
            if not buckets:
                break
            oldest, (left, used) = next(iter(buckets.items()))  # least recently used
            if len(buckets) <= self._max_users and left + (now - used) * self._per_s < self._burst:
                break
            del buckets[oldest]  # full again (or past the bound): as if never seen

    def __len__(self) -> int:
        return len(self._buckets)
