"""The schema of a shard's MySQL ledger, as numbered migrations (``NNNN_name.sql``).

``runner.py`` applies them (``redpacket db migrate``) and tells a node whether it may run
against a database; docs/deploy.md "Upgrades" has the rules a new migration must follow.
"""
