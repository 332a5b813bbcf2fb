"""Per-user token buckets (gateway/ratelimit.py): a user who hammers is refused with a
Retry-After, and the limiter remembers only users whose buckets are not full again, so a
crowd that opens once each does not grow the gateway's memory."""

from __future__ import annotations

import time

import pytest

from redpacket.core.errors import ApiError
from redpacket.gateway.ratelimit import RateLimiter


def test_a_user_past_the_burst_is_refused_with_when_to_come_back() -> None:
    limiter = RateLimiter(per_s=1.0, burst=3)
    for _ in range(3):
        limiter.take(7)
    with pytest.raises(ApiError) as refused:
        limiter.take(7)
    assert refused.value.status == 429 and refused.value.headers["Retry-After"] == "1"
    with pytest.raises(ApiError):
        limiter.check(7)
    limiter.check(8)  # another user is not affected
    limiter.take(8)


def test_a_crowd_opening_once_each_leaves_no_buckets_behind() -> None:
    limiter = RateLimiter(per_s=1000.0, burst=2)  # a bucket is full again after 2 ms
    for uid in range(1, 1001):  # at least 0.1 ms apart: at most ~20 in any 2 ms
        limiter.take(uid)
        time.sleep(0.0001)
    assert len(limiter) < 100  # the last few milliseconds' users, not all 1,000


def test_a_user_still_refilling_keeps_their_bucket_while_the_crowd_passes() -> None:
    limiter = RateLimiter(per_s=0.001, burst=2)  # no refill to speak of during the test
    limiter.take(1)
    limiter.take(1)  # empty now
    for uid in range(100, 400):
        limiter.take(uid)
    with pytest.raises(ApiError):  # the crowd did not push the hammering user out
        limiter.take(1)


def test_the_bound_still_holds_when_no_bucket_is_full() -> None:
    limiter = RateLimiter(per_s=0.001, burst=5, max_users=50)
    for uid in range(1, 500):
        limiter.take(uid)
    assert len(limiter) <= 50
