# The two commands of the README, and a few more. Each one sets the machine up first
# (.ci/setup: Redis, MariaDB, .venv), so they work on a fresh Debian/Ubuntu box.

VENV := .venv
# set by .ci/setup when MariaDB's root cannot log in over TCP
MYSQL_URL_FILE := .cache/mysql-url
ifneq ($(wildcard $(MYSQL_URL_FILE)),)
export REDPACKET_MYSQL_URL ?= $(shell cat $(MYSQL_URL_FILE))
endif

.PHONY: setup demo test lint up bench

setup:
	@bash .ci/setup

demo: setup  ## start a local 2-shard cluster, run a crowd of users against it, check the ledger
	$(VENV)/bin/redpacket demo

test: setup  ## the whole test suite on real Redis, MariaDB and HTTP (what CI runs)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest

up: setup  ## a local cluster in the foreground (Ctrl-C stops it)
	$(VENV)/bin/redpacket dev up

bench: setup  ## the benchmark, with a plot
	$(VENV)/bin/redpacket bench --plot
