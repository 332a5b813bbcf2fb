"""Everything the gateway reads from its environment, read once at start."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from redpacket.core.amounts import Limits
from redpacket.core.env import SettingsError, env_bool, env_float, env_int, env_str, environ
from redpacket.core.ids import derive_id_key


@dataclass(frozen=True)
class GatewaySettings:
    host: str = "127.0.0.1"
    port: int = 8080
    ring_file: str = ""
    jwt_secret: str = ""
    node_secret: str = ""
    node_timeout_s: float = 2.0  # a slow shard costs its own packets this much, no more
    node_connections: int = 256  # keep-alive connections per shard node (HTTP transport)
    node_transport: str = "link"  # "link": frames on a few WebSockets per node; or "http"
    link_connections: int = 2  # link connections per shard node (per gateway process)
    link_max_inflight: int = 512  # calls in flight per link connection; more wait their turn
    link_max_message_bytes: int = 4 * 1024 * 1024
    frozen_retry_s: float = 3.0  # how long to retry a packet that is moving between shards
    expire_s: int = 86400  # red packets expire after a day, as in WeChat
    limits: Limits = field(default_factory=Limits)
    create_per_s: float = 5.0  # per-user rate limits (per gateway replica)
    create_burst: int = 20
    open_per_s: float = 20.0
    open_burst: int = 40
    finished_cache_size: int = 50_000
    # verified tokens remembered (gateway/auth.py): a crowd user's grab and open seconds apart,
    # a session's calls; 16,384 covers 8 s of 2,000 new users/s in ~10 MiB
    token_cache_size: int = 16_384
    finished_ttl_s: float = 30.0
    generator_id: int | None = None
    max_body_bytes: int = 4096
    ring_poll_s: float = 1.0
    log_level: str = "INFO"
    access_log: bool = False
    dev_login: bool = False  # POST /dev/login mints tokens for anyone: local clusters only
    # the wallet (gateway/wallet.py): the key of the top-up webhook's signatures ("": the
    # endpoint is off, 404), and a dev cluster's starting balance (0: none)
    payments_secret: str = ""
    dev_starting_balance: int = 0
    # public ids (core/ids.py PublicIds): the tag key ("": derived from the node secret), and
    # the time before which release 0.1.0's decimal ids are still accepted (0: none)
    id_secret: str = ""
    legacy_ids_before_ms: int = 0
    unknown_ids_per_s: float = 1.0  # per-user answers "no such red packet", then 429
    unknown_ids_burst: int = 20
    metrics_port: int = 9100  # GET /metrics, on its own port (0: any free one)
    header_timeout_s: float = 10.0  # request headers (and an idle keep-alive) within this
    body_read_timeout_s: float = 10.0  # a request body within this, else 408 and closed

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> GatewaySettings:
        env = environ() if env is None else env
        generator = env.get("REDPACKET_ID_GENERATOR", "")
        settings = cls(
            host=env_str(env, "REDPACKET_HOST", cls.host),
            port=env_int(env, "REDPACKET_PORT", cls.port, minimum=0),
            ring_file=env_str(env, "REDPACKET_RING_FILE", ""),
            jwt_secret=env_str(env, "REDPACKET_JWT_SECRET", ""),
            node_secret=env_str(env, "REDPACKET_NODE_SECRET", ""),
            node_timeout_s=env_float(env, "REDPACKET_NODE_TIMEOUT_S", cls.node_timeout_s),
            node_connections=env_int(
                env, "REDPACKET_NODE_CONNECTIONS", cls.node_connections, minimum=1
            ),
            node_transport=env_str(env, "REDPACKET_NODE_TRANSPORT", cls.node_transport),
            link_connections=env_int(
                env, "REDPACKET_LINK_CONNECTIONS", cls.link_connections, minimum=1
            ),
            link_max_inflight=env_int(
                env, "REDPACKET_LINK_MAX_INFLIGHT", cls.link_max_inflight, minimum=1
            ),
            link_max_message_bytes=env_int(
                env, "REDPACKET_LINK_MAX_MESSAGE_BYTES", cls.link_max_message_bytes, minimum=4096
            ),
            frozen_retry_s=env_float(env, "REDPACKET_FROZEN_RETRY_S", cls.frozen_retry_s),
            expire_s=env_int(env, "REDPACKET_EXPIRE_S", cls.expire_s, minimum=1),
            limits=Limits(
                max_packets=env_int(env, "REDPACKET_MAX_PACKETS", Limits.max_packets, minimum=1),
                max_amount=env_int(env, "REDPACKET_MAX_AMOUNT", Limits.max_amount, minimum=1),
                max_greeting_chars=env_int(
                    env, "REDPACKET_MAX_GREETING_CHARS", Limits.max_greeting_chars, minimum=1
                ),
            ),
            create_per_s=env_float(env, "REDPACKET_RATE_CREATE_PER_S", cls.create_per_s),
            create_burst=env_int(env, "REDPACKET_RATE_CREATE_BURST", cls.create_burst, minimum=1),
            open_per_s=env_float(env, "REDPACKET_RATE_OPEN_PER_S", cls.open_per_s),
            open_burst=env_int(env, "REDPACKET_RATE_OPEN_BURST", cls.open_burst, minimum=1),
            finished_cache_size=env_int(
                env, "REDPACKET_FINISHED_CACHE_SIZE", cls.finished_cache_size, minimum=0
            ),
            finished_ttl_s=env_float(env, "REDPACKET_FINISHED_TTL_S", cls.finished_ttl_s),
            token_cache_size=env_int(
                env, "REDPACKET_TOKEN_CACHE_SIZE", cls.token_cache_size, minimum=0
            ),
            generator_id=int(generator) if generator else None,
            max_body_bytes=env_int(
                env, "REDPACKET_MAX_BODY_BYTES", cls.max_body_bytes, minimum=256
            ),
            ring_poll_s=env_float(env, "REDPACKET_RING_POLL_S", cls.ring_poll_s),
            log_level=env_str(env, "REDPACKET_LOG_LEVEL", cls.log_level),
            access_log=env_bool(env, "REDPACKET_ACCESS_LOG", cls.access_log),
            dev_login=env_bool(env, "REDPACKET_DEV_LOGIN", cls.dev_login),
            payments_secret=env_str(env, "REDPACKET_PAYMENTS_SECRET", ""),
            dev_starting_balance=env_int(
                env, "REDPACKET_DEV_STARTING_BALANCE", cls.dev_starting_balance, minimum=0
            ),
            metrics_port=env_int(env, "REDPACKET_METRICS_PORT", cls.metrics_port, minimum=0),
            header_timeout_s=env_float(env, "REDPACKET_HEADER_TIMEOUT_S", cls.header_timeout_s),
            body_read_timeout_s=env_float(
                env, "REDPACKET_BODY_READ_TIMEOUT_S", cls.body_read_timeout_s
            ),
            id_secret=env_str(env, "REDPACKET_ID_SECRET", ""),
            legacy_ids_before_ms=env_int(
                env, "REDPACKET_LEGACY_IDS_BEFORE_MS", cls.legacy_ids_before_ms, minimum=0
            ),
            unknown_ids_per_s=env_float(
                env, "REDPACKET_RATE_UNKNOWN_ID_PER_S", cls.unknown_ids_per_s
            ),
            unknown_ids_burst=env_int(
                env, "REDPACKET_RATE_UNKNOWN_ID_BURST", cls.unknown_ids_burst, minimum=1
            ),
        )
        missing = [
            name
            for name, value in (
                ("REDPACKET_RING_FILE", settings.ring_file),
                ("REDPACKET_JWT_SECRET", settings.jwt_secret),
                ("REDPACKET_NODE_SECRET", settings.node_secret),
            )
            if not value
        ]
        if settings.node_transport not in ("link", "http"):
            raise SettingsError("REDPACKET_NODE_TRANSPORT must be link or http")
        if missing:
            raise SettingsError(f"the gateway needs {', '.join(missing)} to be set")
        if settings.dev_starting_balance and not settings.dev_login:
            # free money is a dev cluster's convenience: REDPACKET_DEV_LOGIN is what marks one
            raise SettingsError(
                "REDPACKET_DEV_STARTING_BALANCE is for dev clusters only "
                "(REDPACKET_DEV_LOGIN=true, as `redpacket dev up` sets)"
            )
        if settings.payments_secret and len(settings.payments_secret.encode()) < 32:
            raise SettingsError("REDPACKET_PAYMENTS_SECRET must be at least 32 bytes")
        if len(settings.jwt_secret.encode()) < 32:
            raise SettingsError("REDPACKET_JWT_SECRET must be at least 32 bytes (HS256 key)")
        if settings.id_secret and len(settings.id_secret.encode()) < 32:
            raise SettingsError("REDPACKET_ID_SECRET must be at least 32 bytes")
        return settings

    def id_key(self) -> bytes:
        """The public id tag key (core/ids.py): REDPACKET_ID_SECRET, or one derived from the
        node secret. Changing it changes every public id: docs/api.md "What an id is"."""
        return self.id_secret.encode() if self.id_secret else derive_id_key(self.node_secret)
