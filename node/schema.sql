-- The MySQL ledger of one shard. Applied idempotently at node start and by `redpacket db init`.
-- Runs unchanged on MySQL 8 and MariaDB 10.11: utf8mb4_unicode_ci exists on both, and both
-- enforce CHECK constraints. Times are UTC (the node sets time_zone = '+00:00').
-- Statements are separated by lines holding only ';' so the loader needs no SQL parser.

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
  -- added with packet kinds and 手气最佳 (node/ledger.py ADDED_COLUMNS adds them to older tables)
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
-- ==== Wallet (零钱), issue 18 (node/wallet/, docs/architecture.md "Money flow") ============
-- One block, to move into a numbered migration as it is. A user's wallet lives on the shard
-- that owns "user:<uid>" (like history). Amounts are integer cents.
CREATE TABLE IF NOT EXISTS wallet (
  uid         BIGINT      NOT NULL,
  balance     BIGINT      NOT NULL DEFAULT 0 COMMENT 'cents; never negative',
  granted     TINYINT     NOT NULL DEFAULT 0 COMMENT '1 once the dev starting balance was given',
  update_time DATETIME(3) NOT NULL,
  PRIMARY KEY (uid),
  CONSTRAINT ck_wallet_balance CHECK (balance >= 0)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci
;
-- Every change of a balance, exactly once: (uid, kind, ref) is the idempotency reference:
-- topup: the topup_id; grant: 'dev'; send: the create token; receive and refund: the packet
-- id; the release of an orphan hold is a refund with ref 'release:<create token>'.
CREATE TABLE IF NOT EXISTS wallet_txn (
  id            BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
  uid           BIGINT       NOT NULL,
  kind          VARCHAR(8)   NOT NULL COMMENT 'topup | grant | send | receive | refund',
  ref           VARCHAR(80) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
  amount        BIGINT       NOT NULL COMMENT 'signed cents: send is negative',
  red_packet_id BIGINT       NULL,
  balance_after BIGINT       NOT NULL,
  create_time   DATETIME(3)  NOT NULL,
  PRIMARY KEY (id),
  UNIQUE KEY uk_wallet_txn_ref (uid, kind, ref),
  KEY idx_wallet_txn_user (uid, id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci
;
-- The debit of a create, keyed by its create token: 'held' until the packet's shard has the
-- packet ('sent') or said it never will ('released', the money given back).
CREATE TABLE IF NOT EXISTS wallet_hold (
  create_token  CHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
  uid           BIGINT      NOT NULL,
  amount        BIGINT      NOT NULL,
  red_packet_id BIGINT      NOT NULL COMMENT 'the id chosen before the hold: where to ask',
  state         VARCHAR(8)  NOT NULL DEFAULT 'held' COMMENT 'held | sent | released',
  create_time   DATETIME(3) NOT NULL,
  PRIMARY KEY (create_token),
  KEY idx_wallet_hold_state (state, create_time),
  CONSTRAINT ck_wallet_hold_amount CHECK (amount >= 1)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci
;
-- A payment provider's top-up, idempotent by its id: a replay answers the first result.
CREATE TABLE IF NOT EXISTS wallet_topup (
  topup_id    VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
  uid         BIGINT      NOT NULL,
  amount      BIGINT      NOT NULL,
  body_sha256 CHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL
              COMMENT 'of the request as meant; its transaction is (uid, topup, topup_id)',
  create_time DATETIME(3) NOT NULL,
  PRIMARY KEY (topup_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci
;
-- On the packet's shard: a create token the wallet's sweeper gave up on (its hold was
-- released). A create of that packet id arriving later is refused, so a released hold can
-- never also become a packet.
CREATE TABLE IF NOT EXISTS create_abandoned (
  red_packet_id BIGINT      NOT NULL,
  create_token  CHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
  create_time   DATETIME(3) NOT NULL,
  PRIMARY KEY (red_packet_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci
;
-- ==== end of the wallet block ===============================================================
