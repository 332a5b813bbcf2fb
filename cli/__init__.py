"""The ``redpacket`` command: servers, local cluster, demo, checker, tools."""
