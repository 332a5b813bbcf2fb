"""``redpacket bench``: load generator, ceilings, results and plots."""
