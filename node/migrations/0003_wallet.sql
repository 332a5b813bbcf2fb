-- oldest code: 1
-- Issue 18: the wallet (零钱) (node/wallet/, docs/architecture.md "Money flow"). A user's
-- wallet lives on the shard that owns "user:<uid>" (like history). Amounts are integer cents.
-- Expand only: release 0.1.0's code never reads these tables.
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
