-- oldest code: 1
-- Issue 18: wallets that move keep their answers (node/handoff/wallets.py).
-- A top-up's first answer, kept with it, so a replay answers exactly that even after its
-- wallet moved to another shard (where its transaction row is a copy). NULL for top-ups made
-- before this migration: their answer is read from their transaction, as before.
-- Expand only: release 0.1.0's code never reads these tables, and code of schema 3 does not
-- name these columns in its inserts (they default to NULL).
ALTER TABLE wallet_topup
  ADD COLUMN IF NOT EXISTS txn_id BIGINT UNSIGNED NULL COMMENT 'the first answer: its transaction',
  ADD COLUMN IF NOT EXISTS balance_after BIGINT NULL COMMENT 'the first answer: the balance after'
;
-- The change in progress whose users' wallets are arriving here: a node refuses (503, retry)
-- every wallet call of a user the change brings here until that user's wallet was imported
-- (wallet_arrival) or the rebalance tool said every wallet is in (the row is deleted).
CREATE TABLE IF NOT EXISTS wallet_incoming (
  id           TINYINT     NOT NULL COMMENT 'always 1',
  ring_version BIGINT      NOT NULL COMMENT 'the version of the change',
  from_json    MEDIUMTEXT  NOT NULL COMMENT 'the ring users are moving from',
  PRIMARY KEY (id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci
;
-- The users whose wallets were imported here during the change of ring_version.
CREATE TABLE IF NOT EXISTS wallet_arrival (
  uid          BIGINT      NOT NULL,
  ring_version BIGINT      NOT NULL,
  PRIMARY KEY (uid)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci
;
