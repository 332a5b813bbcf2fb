"""``redpacket chaos``: seeded faults under mixed load, then a verdict (docs/reliability.md)."""
