"""Everything a shard node reads from its environment, read once at start."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from redpacket.core.amounts import Limits
from redpacket.core.env import SettingsError, env_bool, env_float, env_int, env_str, environ


def _with_ordinal(value: str, ordinal: str) -> str:
    """Fill ``{ordinal}`` (a StatefulSet pod's index) into a URL or name template."""
    return value.replace("{ordinal}", ordinal)


def _ordinal(env: Mapping[str, str]) -> str:
    explicit = env.get("REDPACKET_ORDINAL", "")
    if explicit:
        return explicit
    match = re.search(r"-(\d+)$", env.get("HOSTNAME", ""))
    return match.group(1) if match else "0"


@dataclass(frozen=True)
class NodeSettings:
    name: str = "shard-0"
    host: str = "127.0.0.1"
    port: int = 9000
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_cluster: bool = False
    redis_pool_size: int = 64
    mysql_url: str = "mysql://root@127.0.0.1:3306/redpacket_shard_0"
    mysql_pool_size: int = 8
    mysql_timeout_s: float = 3.0
    startup_wait_s: float = 60.0  # how long to wait for Redis and MySQL at start
    node_secret: str = ""
    limits: Limits = field(default_factory=Limits)
    max_expire_s: int = 7 * 86400
    redis_retention_s: int = 7 * 86400  # Redis keeps a packet this long past its expiry
    commit_max_batch: int = 256
    commit_workers: int = 4
    admission_wait_s: float = 0.5
    reconcile_interval_s: float = 5.0
    sweep_interval_s: float = 10.0
    refund_grace_s: float = 30.0  # a packet is refunded this long after it expires
    idempotency_key_ttl_s: int = 86400  # an Idempotency-Key binds its packet this long
    max_body_bytes: int = 16 * 1024
    link_max_inflight: int = 1024  # calls running per link connection before reading pauses
    link_max_message_bytes: int = 4 * 1024 * 1024  # one link message (frames of one tick)
    redis_max_pipelines: int = 4  # script pipelines in flight; more calls wait their turn
    drain_s: float = 10.0  # SIGTERM: how long calls in flight may take to finish
    log_level: str = "INFO"
    access_log: bool = False
    ring_file: str = ""  # the ring, to find the shard owning a user's history ("": this one)
    # how long the history relay sleeps when its outbox is empty (half that after a delivery)
    history_relay_idle_s: float = 0.1
    # an event its destination keeps answering 500 (a bug there) is set aside after this
    relay_server_error_grace_s: float = 60.0
    # a create's hold still open this long is asked about (node/wallet/holds.py)
    wallet_hold_timeout_s: float = 30.0
    # a file of milliseconds added to the node's clock (core/clock.py): chaos runs only
    clock_offset_file: str = ""
    metrics_port: int = 9101  # GET /metrics, on its own port (0: any free one)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> NodeSettings:
        env = environ() if env is None else env
        ordinal = _ordinal(env)
        settings = cls(
            name=_with_ordinal(env_str(env, "REDPACKET_NODE_NAME", cls.name), ordinal),
            host=env_str(env, "REDPACKET_HOST", cls.host),
            port=env_int(env, "REDPACKET_PORT", cls.port, minimum=0),
            redis_url=_with_ordinal(env_str(env, "REDPACKET_REDIS_URL", cls.redis_url), ordinal),
            redis_cluster=env_bool(env, "REDPACKET_REDIS_CLUSTER", cls.redis_cluster),
            redis_pool_size=env_int(
                env, "REDPACKET_REDIS_POOL_SIZE", cls.redis_pool_size, minimum=1
            ),
            mysql_url=_with_ordinal(env_str(env, "REDPACKET_MYSQL_URL", cls.mysql_url), ordinal),
            mysql_pool_size=env_int(
                env, "REDPACKET_MYSQL_POOL_SIZE", cls.mysql_pool_size, minimum=1
            ),
            mysql_timeout_s=env_float(env, "REDPACKET_MYSQL_TIMEOUT_S", cls.mysql_timeout_s),
            startup_wait_s=env_float(env, "REDPACKET_STARTUP_WAIT_S", cls.startup_wait_s),
            node_secret=env_str(env, "REDPACKET_NODE_SECRET", ""),
            limits=Limits(
                max_packets=env_int(env, "REDPACKET_MAX_PACKETS", Limits.max_packets, minimum=1),
                max_amount=env_int(env, "REDPACKET_MAX_AMOUNT", Limits.max_amount, minimum=1),
                max_greeting_chars=env_int(
                    env, "REDPACKET_MAX_GREETING_CHARS", Limits.max_greeting_chars, minimum=1
                ),
            ),
            max_expire_s=env_int(env, "REDPACKET_MAX_EXPIRE_S", cls.max_expire_s, minimum=1),
            redis_retention_s=env_int(
                env, "REDPACKET_REDIS_RETENTION_S", cls.redis_retention_s, minimum=0
            ),
            commit_max_batch=env_int(
                env, "REDPACKET_COMMIT_MAX_BATCH", cls.commit_max_batch, minimum=1
            ),
            commit_workers=env_int(env, "REDPACKET_COMMIT_WORKERS", cls.commit_workers, minimum=1),
            admission_wait_s=env_float(env, "REDPACKET_ADMISSION_WAIT_S", cls.admission_wait_s),
            reconcile_interval_s=env_float(
                env, "REDPACKET_RECONCILE_INTERVAL_S", cls.reconcile_interval_s
            ),
            sweep_interval_s=env_float(env, "REDPACKET_SWEEP_INTERVAL_S", cls.sweep_interval_s),
            refund_grace_s=env_float(env, "REDPACKET_REFUND_GRACE_S", cls.refund_grace_s),
            idempotency_key_ttl_s=env_int(
                env, "REDPACKET_IDEMPOTENCY_KEY_TTL_S", cls.idempotency_key_ttl_s, minimum=1
            ),
            max_body_bytes=env_int(
                env, "REDPACKET_MAX_BODY_BYTES", cls.max_body_bytes, minimum=256
            ),
            link_max_inflight=env_int(
                env, "REDPACKET_LINK_MAX_INFLIGHT", cls.link_max_inflight, minimum=1
            ),
            link_max_message_bytes=env_int(
                env, "REDPACKET_LINK_MAX_MESSAGE_BYTES", cls.link_max_message_bytes, minimum=4096
            ),
            redis_max_pipelines=env_int(
                env, "REDPACKET_REDIS_MAX_PIPELINES", cls.redis_max_pipelines, minimum=1
            ),
            drain_s=env_float(env, "REDPACKET_DRAIN_S", cls.drain_s),
            log_level=env_str(env, "REDPACKET_LOG_LEVEL", cls.log_level),
            access_log=env_bool(env, "REDPACKET_ACCESS_LOG", cls.access_log),
            ring_file=env_str(env, "REDPACKET_RING_FILE", cls.ring_file),
            history_relay_idle_s=env_float(
                env, "REDPACKET_HISTORY_RELAY_IDLE_S", cls.history_relay_idle_s
            ),
            relay_server_error_grace_s=env_float(
                env, "REDPACKET_RELAY_SERVER_ERROR_GRACE_S", cls.relay_server_error_grace_s
            ),
            wallet_hold_timeout_s=env_float(
                env, "REDPACKET_WALLET_HOLD_TIMEOUT_S", cls.wallet_hold_timeout_s
            ),
            clock_offset_file=env_str(env, "REDPACKET_CLOCK_OFFSET_FILE", ""),
            metrics_port=env_int(env, "REDPACKET_METRICS_PORT", cls.metrics_port, minimum=0),
        )
        if not settings.node_secret:
            raise SettingsError(
                "REDPACKET_NODE_SECRET is not set: nodes accept calls only from a gateway that "
                "presents this shared secret"
            )
        if settings.limits.max_greeting_chars > 255:
            raise SettingsError("REDPACKET_MAX_GREETING_CHARS must be at most 255 (column size)")
        return settings
