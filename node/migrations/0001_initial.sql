-- oldest code: 1
-- The MySQL ledger of one shard as release 0.1.0 (e6803e9) left it: its node/schema.sql, then
-- the columns its node/ledger.py ADDED_COLUMNS put on tables made before them. Every statement
-- is idempotent, so this migration also adopts a database that a 0.1.0 node made (no version
-- table yet): it changes nothing there but recording version 1.
-- Runs unchanged on MySQL 8 and MariaDB 10.11: utf8mb4_unicode_ci exists on both, and both
-- enforce CHECK constraints. Times are UTC (the node sets time_zone = '+00:00').
-- Statements are separated by lines holding only ';' so the runner needs no SQL parser.

-- One row per red packet (the seed's table, with the fixes the issue asks for).
CREATE TABLE IF NOT EXISTS red_packet_info (
  id               BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
  red_packet_id    BIGINT       NOT NULL COMMENT 'time-ordered 63-bit id made by the gateway',
  uid              BIGINT       NOT NULL COMMENT 'sender',
  total_amount     INT          NOT NULL COMMENT 'cents',
  total_packet     INT          NOT NULL COMMENT 'number of shares',
  remaining_amount INT          NOT NULL COMMENT 'cents not yet opened (committed claims only)',
  remaining_packet INT          NOT NULL COMMENT 'shares not yet opened (committed claims only)',
  greeting         VARCHAR(255) NOT NULL DEFAULT '',
  status           VARCHAR(16)  NOT NULL DEFAULT 'active' COMMENT 'active | sold_out | refunded',
  create_token     CHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL
                   COMMENT 'tells a retried create (same token) from an id collision (other token)',
  create_time      DATETIME(3)  NOT NULL,
  expire_time      DATETIME(3)  NOT NULL,
  update_time      DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
  -- added with packet kinds and 手气最佳 (the end of this file adds them to older tables)
  kind             VARCHAR(16)  NOT NULL DEFAULT 'lucky' COMMENT 'lucky | equal | exclusive',
  amount_each      INT          NULL COMMENT 'equal: cents per share',
  receiver_uid     BIGINT       NULL COMMENT 'exclusive: the only uid that may open it',
  sender_nick      VARCHAR(64)  NOT NULL DEFAULT '' COMMENT 'the sender, as their token named them',
  sender_img       VARCHAR(512) NOT NULL DEFAULT '',
  luckiest_uid     BIGINT       NULL COMMENT 'lucky: 手气最佳, set by the commit that sells it out',
  PRIMARY KEY (id),
  UNIQUE KEY uk_red_packet_id (red_packet_id),
  KEY idx_status_expire (status, expire_time),
  CONSTRAINT ck_info_amounts CHECK (remaining_amount >= 0 AND remaining_packet >= 0
                                    AND remaining_amount >= remaining_packet
                                    AND remaining_amount <= total_amount
                                    AND remaining_packet <= total_packet)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci
;
-- One row per opened share. UNIQUE(red_packet_id, uid) is what makes every retry idempotent.
CREATE TABLE IF NOT EXISTS red_packet_record (
  id            BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
  red_packet_id BIGINT       NOT NULL,
  uid           BIGINT       NOT NULL,
  amount        INT          NOT NULL COMMENT 'cents',
  nick_name     VARCHAR(64)  NOT NULL DEFAULT '',
  img_url       VARCHAR(512) NOT NULL DEFAULT '',
  create_time   DATETIME(3)  NOT NULL COMMENT 'when the share was taken in Redis',
  update_time   DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
  PRIMARY KEY (id),
  UNIQUE KEY uk_packet_uid (red_packet_id, uid),
  KEY idx_packet_time (red_packet_id, create_time, uid),
  CONSTRAINT ck_record_amount CHECK (amount >= 1)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci
;
-- The remainder of an expired packet, paid back to its sender exactly once.
CREATE TABLE IF NOT EXISTS red_packet_refund (
  id            BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
  red_packet_id BIGINT      NOT NULL,
  uid           BIGINT      NOT NULL COMMENT 'the sender, who receives the refund',
  amount        INT         NOT NULL COMMENT 'cents',
  create_time   DATETIME(3) NOT NULL,
  PRIMARY KEY (id),
  UNIQUE KEY uk_refund_packet (red_packet_id),
  CONSTRAINT ck_refund_amount CHECK (amount >= 1)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci
;
-- Idempotency-Key of a create, stored on the shard that owns the *user* (the ring hashes
-- "user:<uid>"), because the red packet id is not known until the key is claimed.
CREATE TABLE IF NOT EXISTS idempotency_key (
  uid           BIGINT       NOT NULL,
  idem_key      VARCHAR(255) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
  request_hash  CHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
  red_packet_id BIGINT       NOT NULL,
  create_time   DATETIME(3)  NOT NULL,
  PRIMARY KEY (uid, idem_key),
  KEY ix_idempotency_key_create_time (create_time)  -- the purge of expired keys
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci
;
-- Rebalancing (node/handoff.py, docs/rebalancing.md). Where a red packet went when this shard
-- handed it to another one: kept after the copy here is deleted, so a late request for it is
-- answered 421 packet_moved (owner = the node name) instead of 404.
CREATE TABLE IF NOT EXISTS red_packet_tombstone (
  red_packet_id BIGINT       NOT NULL,
  owner         VARCHAR(64)  NOT NULL COMMENT 'ring name of the node the packet moved to',
  owner_url     VARCHAR(255) NOT NULL DEFAULT '' COMMENT 'its URL when the packet moved',
  ring_version  INT          NOT NULL COMMENT 'version of the ring the move was made for',
  create_time   DATETIME(3)  NOT NULL,
  PRIMARY KEY (red_packet_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci
;
-- A handoff under way. direction 'out': this shard froze its copy for `peer` (its row in
-- red_packet_info has status 'moving'); 'in': this shard holds a staged copy from `peer`,
-- inert (status 'moving') until activated. prior_status is the status to restore.
CREATE TABLE IF NOT EXISTS red_packet_handoff (
  red_packet_id BIGINT      NOT NULL,
  direction     VARCHAR(3)  NOT NULL COMMENT 'out | in',
  peer          VARCHAR(64) NOT NULL,
  prior_status  VARCHAR(16) NOT NULL,
  ring_version  INT         NOT NULL,
  create_time   DATETIME(3) NOT NULL,
  PRIMARY KEY (red_packet_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci
;
-- The ring the last rebalance moved this shard to (one row, id = 1). The node refuses to
-- create packets or bind idempotency keys that this ring gives to another node.
CREATE TABLE IF NOT EXISTS shard_ring (
  id           TINYINT     NOT NULL,
  version      INT         NOT NULL,
  ring_json    MEDIUMTEXT  NOT NULL,
  update_time  DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
  PRIMARY KEY (id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci
;
-- Per-user history (node/history.py, docs/architecture.md "My red packets"). The ledger of a
-- packet's shard writes an outbox row in the transaction that changes the packet; the relay
-- (node/relay.py) delivers it, at least once, to the shard owning "user:<uid>", which applies
-- it exactly once (the primary keys below; every apply is an idempotent merge).
CREATE TABLE IF NOT EXISTS history_outbox (
  id            BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
  uid           BIGINT       NOT NULL COMMENT 'the user whose history this changes',
  event         VARCHAR(16)  NOT NULL COMMENT 'received | sent',
  red_packet_id BIGINT       NOT NULL,
  payload       VARBINARY(2048) NOT NULL COMMENT 'the row to merge, JSON',
  create_time   DATETIME(3)  NOT NULL,
  PRIMARY KEY (id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci
;
-- A share this user received. year: the calendar year in UTC+8 (China Standard Time).
CREATE TABLE IF NOT EXISTS user_received (
  uid           BIGINT       NOT NULL,
  red_packet_id BIGINT       NOT NULL,
  year          SMALLINT     NOT NULL COMMENT 'of create_time, in UTC+8',
  sender_uid    BIGINT       NOT NULL,
  sender_nick   VARCHAR(64)  NOT NULL DEFAULT '',
  sender_img    VARCHAR(512) NOT NULL DEFAULT '',
  kind          VARCHAR(16)  NOT NULL,
  amount        INT          NOT NULL COMMENT 'cents',
  luckiest      TINYINT      NOT NULL DEFAULT 0,
  create_time   DATETIME(3)  NOT NULL COMMENT 'when the share was taken',
  PRIMARY KEY (uid, red_packet_id),
  KEY idx_user_year_time (uid, year, create_time, red_packet_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci
;
-- A packet this user sent, with its progress (merged monotonically: counts only grow).
CREATE TABLE IF NOT EXISTS user_sent (
  uid             BIGINT       NOT NULL,
  red_packet_id   BIGINT       NOT NULL,
  year            SMALLINT     NOT NULL COMMENT 'of create_time, in UTC+8',
  kind            VARCHAR(16)  NOT NULL,
  total_amount    INT          NOT NULL,
  total_packet    INT          NOT NULL,
  opened_packet   INT          NOT NULL DEFAULT 0,
  opened_amount   INT          NOT NULL DEFAULT 0,
  refunded_amount INT          NOT NULL DEFAULT 0,
  greeting        VARCHAR(255) NOT NULL DEFAULT '',
  create_time     DATETIME(3)  NOT NULL,
  expire_time     DATETIME(3)  NOT NULL,
  PRIMARY KEY (uid, red_packet_id),
  KEY idx_user_year_time (uid, year, create_time, red_packet_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci
;
-- Columns added to red_packet_info after its first version (0.1.0's ADDED_COLUMNS), for a
-- table made before them. MySQL 8 has no ADD COLUMN IF NOT EXISTS, so each one is a statement
-- built from information_schema: the ALTER when the column is missing, else a no-op (DO 0).
SET @ddl = (SELECT IF(COUNT(*) = 0,
  'ALTER TABLE red_packet_info ADD COLUMN kind VARCHAR(16) NOT NULL DEFAULT ''lucky''', 'DO 0')
  FROM information_schema.COLUMNS
  WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'red_packet_info' AND COLUMN_NAME = 'kind')
;
PREPARE add_column FROM @ddl
;
EXECUTE add_column
;
DEALLOCATE PREPARE add_column
;
SET @ddl = (SELECT IF(COUNT(*) = 0,
  'ALTER TABLE red_packet_info ADD COLUMN amount_each INT NULL', 'DO 0')
  FROM information_schema.COLUMNS
  WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'red_packet_info' AND COLUMN_NAME = 'amount_each')
;
PREPARE add_column FROM @ddl
;
EXECUTE add_column
;
DEALLOCATE PREPARE add_column
;
SET @ddl = (SELECT IF(COUNT(*) = 0,
  'ALTER TABLE red_packet_info ADD COLUMN receiver_uid BIGINT NULL', 'DO 0')
  FROM information_schema.COLUMNS
  WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'red_packet_info' AND COLUMN_NAME = 'receiver_uid')
;
PREPARE add_column FROM @ddl
;
EXECUTE add_column
;
DEALLOCATE PREPARE add_column
;
SET @ddl = (SELECT IF(COUNT(*) = 0,
  'ALTER TABLE red_packet_info ADD COLUMN sender_nick VARCHAR(64) NOT NULL DEFAULT ''''', 'DO 0')
  FROM information_schema.COLUMNS
  WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'red_packet_info' AND COLUMN_NAME = 'sender_nick')
;
PREPARE add_column FROM @ddl
;
EXECUTE add_column
;
DEALLOCATE PREPARE add_column
;
SET @ddl = (SELECT IF(COUNT(*) = 0,
  'ALTER TABLE red_packet_info ADD COLUMN sender_img VARCHAR(512) NOT NULL DEFAULT ''''', 'DO 0')
  FROM information_schema.COLUMNS
  WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'red_packet_info' AND COLUMN_NAME = 'sender_img')
;
PREPARE add_column FROM @ddl
;
EXECUTE add_column
;
DEALLOCATE PREPARE add_column
;
SET @ddl = (SELECT IF(COUNT(*) = 0,
  'ALTER TABLE red_packet_info ADD COLUMN luckiest_uid BIGINT NULL', 'DO 0')
  FROM information_schema.COLUMNS
  WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'red_packet_info' AND COLUMN_NAME = 'luckiest_uid')
;
PREPARE add_column FROM @ddl
;
EXECUTE add_column
;
DEALLOCATE PREPARE add_column
;
