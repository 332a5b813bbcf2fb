"""Redis key names of one red packet.

Every key of a packet carries the packet id as its hash tag (``{...}``), so all of them live
in one Redis Cluster slot and every Lua script touches exactly one slot.
"""

from __future__ import annotations

PENDING_PATTERN = "rp:{*}:pending"


def packet_keys(packet_id: int) -> tuple[str, str, str]:
    """``(info, claims, pending)``: the order every script takes its KEYS in.

    - info: hash of totals, remaining counters, expiry and a state flag;
    - claims: hash uid -> amount in cents, every share taken;
    - pending: hash uid -> claim details, the shares not yet committed to MySQL.
    """
    tag = f"rp:{{{packet_id}}}"
    return f"{tag}:info", f"{tag}:claims", f"{tag}:pending"


def packet_id_of(key: str) -> int:
    """The packet id inside a key made by :func:`packet_keys`."""
    return int(key[key.index("{") + 1 : key.index("}")])
