"""Configuration: YAML plus `WA_ROUTER_*` environment overrides, validated once.

Every section is a frozen dataclass; durations end in `_s`, sizes in `_bytes`. The loader
walks the dataclasses, so a key the dataclasses do not name is an error (a typo must not be
silently ignored), and every error names the dotted key it is about.

Environment overrides: `WA_ROUTER_<SECTION>__<KEY>=value` (double underscore between levels),
the value read as a YAML scalar or flow collection, e.g.
`WA_ROUTER_SERVER__PORT=9000`, `WA_ROUTER_UPSTREAM__CLIENT_KEYS='[k1, k2]'`.
`WA_ROUTER_CONFIG` names the file itself and is not an override.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yarl import URL

from .errors import ConfigError
from .typed import build

ENV_PREFIX = "WA_ROUTER_"
ENV_CONFIG_FILE = "WA_ROUTER_CONFIG"

ROUTE_KINDS = ("session", "create", "pool_health", "pool_list", "any_instance")
SESSION_SOURCES = ("path", "body", "query", "header", "none")
PROFILES = ("blazz", "simple")
STORE_KINDS = ("memory", "redis")
BACKLOG_KINDS = ("auto", "sqlite", "redis")
UPSTREAM_CLIENTS = ("aiohttp", "lean")  # forward.AiohttpForwarder | h1.LeanForwarder
SERVER_FRONTS = ("lean", "aiohttp")  # lean.LeanServer in front of aiohttp | aiohttp alone


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    # On SIGTERM: stop accepting, let requests in flight finish for at most this long.
    shutdown_grace_s: float = 15.0
    # A request's head must arrive within this, its body within this after the head; an
    # idle keep-alive connection is closed after this (408 for the first two).
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keepalive_timeout_s: float = 75.0
    # A caller that reads nothing of its answers for this long is cut off: a streamed answer
    # holds a pooled connection to its instance while it waits.
    write_timeout_s: float = 60.0
    # Open caller connections; past it a new one is answered 503 and closed. Kept below the
    # file limit, which the router raises to its hard limit at start (upstream connections
    # and the state files need descriptors too).
    max_connections: int = 10_000
    # `lean`: proxied routes parsed by httptools on a bare Protocol (lean.py), the rest of
    # the port by aiohttp; `aiohttp`: every request through aiohttp.
    front: str = "lean"
    # The lean front's express lane (express.py): a request whose owner is cached and ready
    # goes out on an idle pooled connection and is answered from its callbacks. Off: every
    # request takes the full path (the same answers, more CPU). Needs `upstream.client: lean`.
    express_lane: bool = True


@dataclass(frozen=True, slots=True)
class InstanceConfig:
    name: str
    url: str
    # Other spellings of this instance's URL, e.g. `http://localhost:3001` as Node names
    # itself in `X-Instance-Url`. Loopback spellings are added automatically.
    aliases: tuple[str, ...] = ()
    # No new sessions placed here (a rolling restart, a machine to retire): set at start and
    # when a reload turns it on, for every router sharing the store; turned off by a reload,
    # it undrains. The admin API's drain is the same state (the last change wins).
    drain: bool = False


@dataclass(frozen=True, slots=True)
class RouteRuleConfig:
    """Where the session id of a request is, and what kind of route it is.

    `path` is a template of `/`-separated segments: a literal, `{session}` (the session id),
    `*` (any one segment) or, last only, `**` (any rest, including nothing).
    """

    name: str
    path: str
    methods: tuple[str, ...] = ()  # empty: any method
    kind: str = "session"  # one of ROUTE_KINDS
    session_in: str = "path"  # one of SESSION_SOURCES
    field: str = ""  # body field, query parameter or header name
    read_timeout_s: float = 30.0
    # The longest this route's requests wait for their session (None: parking.max_wait_s).
    # Laravel's own timeouts bound it: status checks 3 s, creates 10 s, sends 30 s.
    max_wait_s: float | None = None
    # Only a `connected` owner can serve it (sends): never sent to a session logging in.
    needs_connected: bool = False
    # It disconnects or deletes the session: sent only after the target said it holds the
    # session (a Blazz instance that does not hold it deletes its files: the shared login).
    verify_holder: bool = False


@dataclass(frozen=True, slots=True)
class NotHereConfig:
    """An answer meaning "the session is not (usably) here": checked before anything was
    done, so the request was not processed and may go to another instance."""

    http_status: int
    contains: str = ""  # case-insensitive text of the body's error/message ("": any body)
    means: str = "gone"  # one of NOT_HERE_MEANINGS: what it says of the session there


NOT_HERE_MEANINGS = ("gone", "disconnected")


@dataclass(frozen=True, slots=True)
class ProfileConfig:
    """How the upstream API speaks; None means the named profile's default."""

    name: str = "blazz"
    status_path: str | None = None  # probe used by discovery, with `{session}`
    list_path: str | None = None
    health_path: str | None = None
    owning_statuses: tuple[str, ...] | None = None  # ranked, best first
    api_key_query: str | None = None  # query parameter carrying the key on GET
    api_key_field: str | None = None  # JSON body field carrying the key otherwise
    api_key_header: str | None = None  # header carrying the key (simplified API)
    # Answers that mean "not here, not processed"; None: the profile's (Blazz: 404
    # `Session not found`, 400 `Session not connected`, and 421).
    not_here: tuple[NotHereConfig, ...] | None = None


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    # Above 1 s: Linux retransmits a dropped SYN (full accept queue) after 1 s, and that
    # connect should still succeed rather than fail the instance.
    connect_timeout_s: float = 2.0
    # Node closes idle keep-alive connections after 5 s; ours must close first, or a request
    # can be written into a socket Node is closing (and we cannot tell whether it ran).
    keepalive_s: float = 2.0
    max_connections_per_instance: int = 256
    # A request finding all of an instance's connections busy waits this long for one, then
    # fails as not reached (nothing was sent: it may go elsewhere, or get a 502).
    pool_wait_s: float = 2.0
    # The Node api key: the router's own calls (sync) use it, and it is injected into the
    # requests of callers that present one of `client_keys` (nobody else's).
    api_key: str | None = None
    client_keys: tuple[str, ...] = ()
    # The HTTP/1.1 client to the instances: `lean` (h1.py: ~2.5x less CPU per request) or
    # `aiohttp` (aiohttp's ClientSession, the conservative choice).
    client: str = "lean"  # one of UPSTREAM_CLIENTS


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    probe_timeout_s: float = 1.0
    negative_ttl_s: float = 2.0


@dataclass(frozen=True, slots=True)
class DirectoryConfig:
    cache_ttl_s: float = 300.0
    cache_max_entries: int = 100_000
    # A forgotten session is remembered as forgotten this long, so a late retry of an
    # older webhook cannot bring it back.
    tombstone_ttl_s: float = 600.0


@dataclass(frozen=True, slots=True)
class StoreConfig:
    kind: str = "memory"  # one of STORE_KINDS
    # redis://, rediss:// (TLS), unix://; `redis://user:password@host:6379/0` for ACLs.
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Redis Sentinel: `host:port` of each sentinel, and the master's name; the URL then
    # gives only the credentials and the db. (Redis Cluster is not supported.)
    sentinels: tuple[str, ...] = ()
    sentinel_master: str = "mymaster"
    key_prefix: str = "wa-router:"
    # Each call a request or a webhook makes to the store waits at most this long; after a
    # failure the store is not asked for `breaker_s` (routing goes on from the cache and
    # discovery): a hung Redis never holds a request or a webhook for long.
    deadline_s: float = 0.25
    breaker_s: float = 1.0


@dataclass(frozen=True, slots=True)
class PoolConfig:
    # After a connect failure on live traffic an instance is suspect: discovery skips it
    # for this long, then gives it another chance.
    suspect_cooldown_s: float = 5.0


@dataclass(frozen=True, slots=True)
class HealthConfig:
    """Active health checks: each instance's health route, all at once, every interval."""

    interval_s: float = 2.0
    # While an instance is not healthy it is asked this often: back in use at once.
    down_interval_s: float = 0.5
    timeout_s: float = 1.0
    fall: int = 2  # consecutive failures (checks or live-traffic connects) -> down
    rise: int = 1  # consecutive successes -> healthy again


@dataclass(frozen=True, slots=True)
class SyncConfig:
    """Full reconciliation of the directory with every instance's session list."""

    interval_s: float = 60.0
    # /readyz says not ready until the first sync is done, or this long after start.
    startup_timeout_s: float = 10.0


@dataclass(frozen=True, slots=True)
class ParkingConfig:
    """Requests whose session is expected back wait for it (parking.py) instead of failing."""

    # The longest wait; below Laravel's 30 s send timeout (node-pool-api.md). A caller's
    # `Prefer: wait=N` (RFC 7240) lowers it for one request; `wait=0` turns it off.
    max_wait_s: float = 20.0
    max_per_session: int = 200
    max_total: int = 10_000
    # Retry-After of a 503 session_unavailable.
    retry_after_s: int = 5
    # An instance that came back or restarted restores its accounts for about this long:
    # its sessions are expected back meanwhile.
    restore_window_s: float = 60.0


@dataclass(frozen=True, slots=True)
class AdminConfig:
    # Bearer token of /admin/*; None: the admin API is off (404).
    token: str | None = None


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    # Bearer token /metrics asks of scrapers (it shares the proxy's port); None: open.
    token: str | None = None


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_body_bytes: int = 16 * 1024 * 1024
    # The request line and headers together (431 past it; 414 for the target alone).
    max_header_bytes: int = 32 * 1024
    session_id_max_length: int = 128
    session_id_pattern: str = r"[A-Za-z0-9][A-Za-z0-9_.:@+=-]*"


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    """Webhooks from the instances: verified, learned from, relayed to Laravel."""

    # HMAC secrets accepted (several during a key rotation). The first one re-signs a
    # relayed webhook whose timestamp has aged past the receiver's window. Empty: intake off.
    secrets: tuple[str, ...] = ()
    # Laravel's base URL (`http://laravel.internal`); webhooks and Node's other calls to
    # Laravel go on to the same path there. None: webhooks are learned from, not relayed.
    laravel_url: str | None = None
    path: str = "/api/whatsapp/webhooks/webjs"
    passthrough_prefix: str = "/api/whatsapp/"
    window_s: float = 300.0  # Laravel's: |now - X-Timestamp| <= 300
    # Node re-signs each retry with a new timestamp: an identical body from the same
    # instance within this span is the same event. Node's last retry comes at most ~34 s
    # after the first attempt (2 + 4 + 8 s of pauses, four 5 s timeouts).
    retry_dedupe_s: float = 35.0
    max_body_bytes: int = 1024 * 1024
    forget_reasons: tuple[str, ...] = ("LOGOUT", "UNPAIRED", "UNPAIRED_IDLE")
    relay_timeout_s: float = 10.0
    # A relay that timed out may still be running at Laravel: that event (and so the rest
    # of its session, to keep the order) is not sent again before this long.
    inflight_s: float = 60.0
    backlog_max_items: int = 100_000
    retry_base_s: float = 1.0
    retry_max_s: float = 60.0
    resign_after_s: float = 240.0  # re-sign queued webhooks older than this
    # Laravel's VerifyWhatsAppHmac allows 1,000 webhooks a minute per client IP, and every
    # hit re-arms the minute: the router sends at most this many before a minute of quiet
    # (the rest wait in the backlog), and after a 429 nothing for a minute
    # (laravel_budget.py). null: no count (a 429 still pauses), for a Laravel without it.
    laravel_max_per_minute: int | None = 950
    laravel_limit_window_s: float = 60.0  # Laravel's minute
    # The router's URL as Laravel reaches it: relayed webhooks carry it in X-Instance-Url,
    # so Laravel (which sends to the last session_ready's X-Instance-Url) keeps sending
    # through the router. None: http://<server.host>:<server.port> (0.0.0.0 as 127.0.0.1).
    advertise_url: str | None = None
    # Login-stage events from an instance restoring a session that is connected on its
    # owner are held, not relayed (they would flip Laravel's copy of the account), for at
    # most this long: relayed before that instance's session_ready, else dropped.
    hold_login_events: bool = True
    hold_login_events_s: float = 30.0
    # Where waiting webhooks are kept: "sqlite" (a file in state.dir, one router), "redis"
    # (Redis Streams beside the directory, any number of routers and workers), "auto":
    # redis when store.kind is redis.
    backlog: str = "auto"
    shards: int = 16  # Redis Streams: one session's events all go to one of them
    # A router that stops renewing its hold of a shard for this long is taken for dead:
    # another takes the shard and claims what it had not acknowledged.
    claim_after_s: float = 20.0


@dataclass(frozen=True, slots=True)
class StateConfig:
    dir: str = "state"  # the webhook backlog (SQLite) lives here
    # With the memory store: the directory is written to state.dir this often while it
    # changed (and at the stop), and read back at the start, so a restarted router still
    # knows whose sessions are restoring (stores/snapshot.py). null: not kept.
    directory_snapshot_s: float | None = 5.0


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"
    format: str = "auto"  # auto (JSON unless on a terminal) | json | console


@dataclass(frozen=True, slots=True)
class Config:
    instances: tuple[InstanceConfig, ...]
    server: ServerConfig = field(default_factory=ServerConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    rules: tuple[RouteRuleConfig, ...] | None = None  # None: the profile's default rules
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    directory: DirectoryConfig = field(default_factory=DirectoryConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    parking: ParkingConfig = field(default_factory=ParkingConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    webhooks: WebhookConfig = field(default_factory=WebhookConfig)
    state: StateConfig = field(default_factory=StateConfig)
    log: LogConfig = field(default_factory=LogConfig)


# ---------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read `path` (or `$WA_ROUTER_CONFIG`), apply env overrides, build and validate."""
    env = {} if env is None else env
    if path is None:
        path = env.get(ENV_CONFIG_FILE)
    raw: Any = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError("", f"cannot read config file {path}: {exc.strerror}") from None
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError("", f"{path} is not valid YAML: {exc}") from None
        if raw is None:
            raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("", "the top level of the config must be a mapping")
    apply_env(raw, env)
    return config_from_dict(raw)


def apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> None:
    """Overlay `WA_ROUTER_A__B=v` onto raw["a"]["b"] (in place)."""
    for name, value in sorted(env.items()):
        if not name.startswith(ENV_PREFIX) or name == ENV_CONFIG_FILE:
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        key = ".".join(parts)
        if not all(parts):
            raise ConfigError(key, f"malformed environment variable {name}")
        try:
            parsed = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            raise ConfigError(key, f"{name} is not a valid YAML value") from None
        node = raw
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(key, f"{name} reaches into a value that is not a mapping")
            node = child
        node[parts[-1]] = parsed


def config_from_dict(raw: Mapping[str, Any]) -> Config:
    cfg = build(Config, raw, "")
    assert isinstance(cfg, Config)
    validate(cfg)
    return cfg


# ---------------------------------------------------------------------------------------
# Validation: rules that span fields


def backlog_kind(cfg: Config) -> str:
    """ "sqlite" or "redis": where this config keeps waiting webhooks."""
    if cfg.webhooks.backlog == "auto":
        return "redis" if cfg.store.kind == "redis" else "sqlite"
    return cfg.webhooks.backlog


def validate(cfg: Config) -> None:
    _validate_numbers(cfg, "")
    if not cfg.instances:
        raise ConfigError("instances", "at least one instance is required")
    names: set[str] = set()
    urls: dict[str, str] = {}
    for i, inst in enumerate(cfg.instances):
        key = f"instances[{i}]"
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", inst.name):
            raise ConfigError(f"{key}.name", f"{inst.name!r}: use letters, digits, _ . -")
        if inst.name in names:
            raise ConfigError(f"{key}.name", f"duplicate instance name {inst.name!r}")
        names.add(inst.name)
        for j, u in enumerate((inst.url, *inst.aliases)):
            ukey = f"{key}.url" if j == 0 else f"{key}.aliases[{j - 1}]"
            norm = normalize_url(u, ukey)
            if norm in urls and urls[norm] != inst.name:
                raise ConfigError(ukey, f"{u} is already instance {urls[norm]!r}")
            if norm in urls and j == 0:
                raise ConfigError(ukey, f"duplicate instance URL {u}")
            urls[norm] = inst.name
    _validate_choice("profile.name", cfg.profile.name, PROFILES)
    _validate_choice("store.kind", cfg.store.kind, STORE_KINDS)
    _validate_choice("upstream.client", cfg.upstream.client, UPSTREAM_CLIENTS)
    _validate_choice("server.front", cfg.server.front, SERVER_FRONTS)
    if URL(cfg.store.redis_url).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError("store.redis_url", "must be redis://, rediss:// or unix://")
    for i, hostport in enumerate(cfg.store.sentinels):
        host, _, port = hostport.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"store.sentinels[{i}]", f"{hostport!r} is not host:port")
    _validate_choice("log.format", cfg.log.format, ("auto", "json", "console"))
    _validate_choice("log.level", cfg.log.level.lower(), ("debug", "info", "warning", "error"))
    if cfg.upstream.client_keys and not cfg.upstream.api_key:
        raise ConfigError("upstream.client_keys", "needs upstream.api_key to inject")
    if cfg.admin.token is not None and len(cfg.admin.token) < 16:
        raise ConfigError("admin.token", "use at least 16 characters")
    if cfg.metrics.token is not None and len(cfg.metrics.token) < 16:
        raise ConfigError("metrics.token", "use at least 16 characters")
    try:
        re.compile(cfg.limits.session_id_pattern)
    except re.error as exc:
        raise ConfigError("limits.session_id_pattern", f"not a regular expression: {exc}") from None
    for i, nh in enumerate(cfg.profile.not_here or ()):
        _validate_choice(f"profile.not_here[{i}].means", nh.means, NOT_HERE_MEANINGS)
        if not 400 <= nh.http_status <= 599:
            raise ConfigError(f"profile.not_here[{i}].http_status", "must be a 4xx or 5xx")
    if cfg.profile.status_path is not None and "{session}" not in cfg.profile.status_path:
        raise ConfigError("profile.status_path", "must contain {session}")
    for i, rule in enumerate(cfg.rules or ()):
        validate_rule(rule, f"rules[{i}]")
    _validate_webhooks(cfg.webhooks)
    if cfg.webhooks.backlog == "redis" and cfg.store.kind != "redis":
        raise ConfigError("webhooks.backlog", "redis needs store.kind: redis (its connection)")
    if (
        cfg.webhooks.laravel_url
        and cfg.webhooks.advertise_url is None
        and cfg.server.host in ("0.0.0.0", "::", "")
    ):
        raise ConfigError(
            "webhooks.advertise_url",
            "set it to the router's URL as Laravel reaches it: relayed webhooks name it, and "
            "with server.host a wildcard the router cannot tell its own address",
        )


def _validate_webhooks(wh: WebhookConfig) -> None:
    for i, secret in enumerate(wh.secrets):
        if not secret:
            raise ConfigError(f"webhooks.secrets[{i}]", "must not be empty")
    if wh.laravel_url is not None:
        try:
            u = URL(wh.laravel_url)
        except (ValueError, TypeError):
            u = URL()
        if u.scheme not in ("http", "https") or not u.host or u.query_string:
            raise ConfigError(
                "webhooks.laravel_url", f"{wh.laravel_url!r} must be http(s)://host[:port][/base]"
            )
    if wh.advertise_url is not None:
        u = URL(wh.advertise_url)
        if u.scheme not in ("http", "https") or not u.host or u.query_string:
            raise ConfigError(
                "webhooks.advertise_url", f"{wh.advertise_url!r} must be http(s)://host[:port]"
            )
    for key in ("path", "passthrough_prefix"):
        if not getattr(wh, key).startswith("/"):
            raise ConfigError(f"webhooks.{key}", "must start with /")
    if wh.resign_after_s >= wh.window_s:
        raise ConfigError(
            "webhooks.resign_after_s",
            "must be below webhooks.window_s, or re-signing comes too late",
        )
    if wh.hold_login_events_s >= wh.window_s:
        raise ConfigError(
            "webhooks.hold_login_events_s",
            "must be below webhooks.window_s: a held event is relayed as it was signed",
        )
    if wh.inflight_s < wh.relay_timeout_s:
        raise ConfigError("webhooks.inflight_s", "must not be below webhooks.relay_timeout_s")
    if wh.retry_base_s > wh.retry_max_s:
        raise ConfigError("webhooks.retry_base_s", "must not exceed webhooks.retry_max_s")
    _validate_choice("webhooks.backlog", wh.backlog, BACKLOG_KINDS)
    if wh.claim_after_s < 2 * wh.relay_timeout_s:
        raise ConfigError(
            "webhooks.claim_after_s",
            "must be at least twice webhooks.relay_timeout_s: a delivery starts only with "
            "more than the relay timeout left on its shard's lease",
        )
    if wh.shards > 64:
        raise ConfigError("webhooks.shards", "at most 64 (one blocking read per shard held)")


def _validate_numbers(obj: Any, key: str) -> None:
    """Durations and sizes are never negative; ports, limits and TTLs are positive."""
    if isinstance(obj, tuple):
        for i, item in enumerate(obj):
            _validate_numbers(item, f"{key}[{i}]")
        return
    if not dataclasses.is_dataclass(obj):
        return
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        sub = f"{key}.{f.name}" if key else f.name
        if isinstance(value, int | float) and not isinstance(value, bool):
            if value < 0:
                raise ConfigError(sub, f"must not be negative, got {value}")
            if value == 0 and not f.name.endswith("grace_s") and f.name != "port":
                raise ConfigError(sub, "must be greater than 0")
            if f.name == "port" and value > 65535:
                raise ConfigError(sub, f"is not a port number: {value}")
        else:
            _validate_numbers(value, sub)


def _validate_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(key, f"{value!r} is not one of {', '.join(choices)}")


def validate_rule(rule: RouteRuleConfig, key: str) -> None:
    _validate_choice(f"{key}.kind", rule.kind, ROUTE_KINDS)
    _validate_choice(f"{key}.session_in", rule.session_in, SESSION_SOURCES)
    if not rule.path.startswith("/"):
        raise ConfigError(f"{key}.path", f"{rule.path!r} must start with /")
    segments = rule.path.strip("/").split("/")
    if "**" in segments[:-1]:
        raise ConfigError(f"{key}.path", "** may only be the last segment")
    has_session = "{session}" in segments
    if (rule.session_in == "path") != has_session:
        raise ConfigError(f"{key}.path", "has {session} exactly when session_in is path")
    needs_session = rule.kind in ("session", "create")
    if needs_session and rule.session_in == "none":
        raise ConfigError(f"{key}.session_in", f"a {rule.kind} route needs a session id")
    if not needs_session and rule.session_in != "none":
        raise ConfigError(f"{key}.session_in", f"a {rule.kind} route takes no session id")
    if rule.session_in in ("body", "query", "header") and not rule.field:
        raise ConfigError(f"{key}.field", f"names the {rule.session_in} field of the session id")
    for m in rule.methods:
        if not re.fullmatch(r"[A-Z]+", m):
            raise ConfigError(f"{key}.methods", f"{m!r} is not an upper-case HTTP method")


def normalize_url(url: str, key: str) -> str:
    """`scheme://host:port` of an instance URL; loopback names are not unified here."""
    try:
        u = URL(url)
    except (ValueError, TypeError):
        raise ConfigError(key, f"{url!r} is not a URL") from None
    if u.scheme not in ("http", "https") or not u.host:
        raise ConfigError(key, f"{url!r} must be http://host:port or https://host:port")
    if u.path not in ("", "/") or u.query_string or u.fragment:
        raise ConfigError(key, f"{url!r} must have no path, query or fragment")
    if u.user or u.password:
        raise ConfigError(key, f"{url!r} must not carry credentials")
    host = u.host
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        host = host.lower()
    return f"{u.scheme}://{host}:{u.port}"
