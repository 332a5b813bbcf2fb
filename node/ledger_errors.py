"""The ledger's errors: what a failure of MySQL or of the network means for the caller.

Callers never see a driver's exception: :func:`ledger_error` files each one by MySQL's error
number under the ledger's own family (unavailable: retry later, a 503; a lock conflict:
retry now; refused: the same statement will always fail), and node/calls.py turns that
family into HTTP statuses in one place.
"""

from __future__ import annotations

import asyncio
import functools
import random
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

import asyncmy.errors
import pymysql

P = ParamSpec("P")
T = TypeVar("T")

# Lock conflicts: the batch path falls back to one claim at a time, the single path retries.
LOCK_CODES = {1205, 1213}


class LedgerError(Exception):
    """MySQL failed or refused a statement. The ledger's callers see only this family, never
    the driver's errors: :meth:`Ledger.connection` translates them where they leave it."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code  # MySQL's error number, when it gave one


class LedgerUnavailable(LedgerError):
    """MySQL did not commit; the caller answers 503 and Redis keeps the claim for the reconciler."""


class LockConflict(LedgerUnavailable):
    """InnoDB rolled the transaction back to break a deadlock or a lock wait: trying it again
    is safe (:func:`retry_lock_conflicts`); if retries do not help, the ledger is unavailable."""


class LedgerRefused(LedgerError):
    """MySQL refused the statement for the values it carries (too long for a column, a
    duplicate key, a failed CHECK): sending it again unchanged will not help."""


class ValueRefused(LedgerRefused):
    """A value does not fit its column (``1406 Data too long``, an invalid string)."""


class GuardFailed(Exception):
    """The guarded update found the packet unable to take the claim (refunded, or counters short).

    Only possible when Redis and MySQL have diverged; the node then rebuilds Redis from MySQL.
    """


class IdCollision(Exception):
    """A create reused an existing red_packet_id with a different creation token."""


class CreateAbandoned(Exception):
    """A create whose hold the wallet's sweeper released (node/wallet/abandon.py): refused."""


# The driver's errors, of the ledger's pool (asyncmy) and of the tools' connections (PyMySQL).
# They are told apart by MySQL's error number: the two drivers file some numbers under
# different classes (1054 is an OperationalError to asyncmy).
_DRIVER_ERRORS = (asyncmy.errors.MySQLError, pymysql.err.MySQLError)
_CLOSED_ERRORS = (asyncmy.errors.InterfaceError, pymysql.err.InterfaceError)  # used when closed
INTEGRITY_ERRORS = (asyncmy.errors.IntegrityError, pymysql.err.IntegrityError)
# "MySQL is not there right now": too many connections, shutting down, aborted, interrupted,
# killed, idle disconnect; and every client-side error (2000-2999: cannot connect, gone
# away, lost during query, ...).
_DOWN_CODES = {1040, 1053, 1077, 1152, 1317, 1927, 4031}
# A value that does not fit its column: out of range, truncated, incorrect, too long.
_VALUE_CODES = {1264, 1265, 1292, 1366, 1367, 1406}


def ledger_error(exc: BaseException) -> LedgerError | None:
    """The ledger's error for a failure of the driver or the network; None for anything else
    (the ledger's own errors, GuardFailed, a bug)."""
    if isinstance(exc, (TimeoutError, OSError, EOFError)):  # the network (EOF: a cut read)
        return LedgerUnavailable(str(exc) or type(exc).__name__)
    if not isinstance(exc, _DRIVER_ERRORS):
        return None
    code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
    if code in LOCK_CODES:
        return LockConflict(str(exc), code)
    if (
        isinstance(exc, _CLOSED_ERRORS)
        or code is None
        or code in _DOWN_CODES
        or 2000 <= code < 3000
    ):
        return LedgerUnavailable(str(exc), code)
    if code in _VALUE_CODES:
        return ValueRefused(str(exc), code)
    return LedgerRefused(str(exc), code)  # duplicates, failed checks, bad statements


# New users' first wallet rows are inserted side by side (next-key locks): 50 concurrent
# creates by new senders lost a hold to three deadlocks in a row once (a 503 to a create).
LOCK_CONFLICT_ATTEMPTS = 6


def retry_lock_conflicts(method: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Run a one-transaction method again when InnoDB picked it as a deadlock victim.

    Deadlocks are part of InnoDB's normal life under concurrency; the transaction was rolled
    back whole, so trying it again is safe. The last conflict is raised as it is: a
    LedgerUnavailable.
    """

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        for attempt in range(LOCK_CONFLICT_ATTEMPTS):
            try:
                return await method(*args, **kwargs)
            except LockConflict:
                if attempt == LOCK_CONFLICT_ATTEMPTS - 1:
                    raise
                # jittered and growing: two victims retrying in step would meet again
                await asyncio.sleep(random.uniform(0.0, 0.005 * 2**attempt))
        raise AssertionError("unreachable")

    return wrapper


def is_duplicate(exc: BaseException) -> bool:
    return isinstance(exc, INTEGRITY_ERRORS) and exc.args[0] == 1062
