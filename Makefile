# The two commands of the README, and a few more. Each one sets the machine up first
# (.ci/setup: Redis, MariaDB, .venv), so they work on a fresh Debian/Ubuntu box.

VENV := .venv
# .ci/setup writes .cache/mysql-url when MariaDB's root cannot log in over TCP (Debian's
# default). It is read when each recipe runs, i.e. after `setup` made it, never when make
# parses this file; a REDPACKET_MYSQL_URL from the environment wins.
WITH_DB := if [ -z "$${REDPACKET_MYSQL_URL:-}" ] && [ -s .cache/mysql-url ]; then \
	REDPACKET_MYSQL_URL="$$(cat .cache/mysql-url)"; export REDPACKET_MYSQL_URL; fi;

.PHONY: setup demo test lint up bench

setup:
	@bash .ci/setup

demo: setup  ## start a local 2-shard cluster, run a crowd of users against it, check the ledger
	@$(WITH_DB) set -x; $(VENV)/bin/redpacket demo

test: setup  ## the whole test suite on real Redis, MariaDB and HTTP (what CI runs)
	$(VENV)/bin/ruff check .
	@$(WITH_DB) set -x; $(VENV)/bin/pytest

up: setup  ## a local cluster in the foreground (Ctrl-C stops it)
	@$(WITH_DB) set -x; $(VENV)/bin/redpacket dev up

bench: setup  ## the benchmark, with a plot
	@$(WITH_DB) set -x; $(VENV)/bin/redpacket bench --plot
