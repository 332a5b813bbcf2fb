-- oldest code: 1
-- Issue 19: history events the relay could not deliver (node/relay.py, node/deadletters.py).
-- An outbox row that its destination refuses for what it holds (not for being down) moves
-- here in one transaction, so the relay never blocks behind it; `redpacket dead-letters
-- list|retry` shows them and puts them back in the outbox. Metric: redpacket_dead_letters.
-- Expand only: release 0.1.0's code never reads it.
CREATE TABLE IF NOT EXISTS history_dead_letter (
  id            BIGINT UNSIGNED NOT NULL COMMENT 'the outbox row id it had',
  uid           BIGINT       NOT NULL,
  event         VARCHAR(16)  NOT NULL,
  red_packet_id BIGINT       NOT NULL,
  payload       VARBINARY(2048) NOT NULL,
  create_time   DATETIME(3)  NOT NULL COMMENT 'when the outbox row was written',
  error         VARCHAR(255) NOT NULL DEFAULT '' COMMENT 'why its delivery was refused',
  dead_time     DATETIME(3)  NOT NULL,
  PRIMARY KEY (id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci
;
