"""The whole configuration surface: one frozen pydantic model tree.

Read from a TOML file and overridden by the environment (`NBIOT_<SECTION>__<KEY>`).
It never starts anything; a bad value is a `ConfigError` with its key path.
"""

from __future__ import annotations

import importlib
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from gateway.errors import ConfigError
from gateway.ingest.lwm2m.paths import PathError, parse_path  # pure: no I/O, no imports

Port = Annotated[int, Field(ge=1, lt=65536)]
PortOrAny = Annotated[int, Field(ge=0, lt=65536)]
TopicPart = Annotated[str, Field(min_length=1, pattern=r"^[^/#+\s]+$")]
FIELD_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
RESERVED_FIELDS = frozenset({"seq", "ts", "ack"})


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GatewaySection(Section):
    id: TopicPart = "gw1"
    tenant: TopicPart = "plant"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # On SIGTERM: how long to keep publishing the spool before disconnecting.
    shutdown_grace_s: Annotated[float, Field(ge=0, le=600)] = 10.0
    # Worker processes sharing the CoAP port (SO_REUSEPORT), each owning a share of the
    # devices; 1 runs everything in one process. See docs/operations.md, "Workers".
    workers: Annotated[int, Field(ge=1, le=64)] = 1


class CoapSection(Section):
    enabled: bool = True  # false: coaps only
    # Plain CoAP uplinks must carry the device's token (`?k=`); false trusts the device id
    # in the path (a private APN, say). A token that is given is always checked.
    require_token: bool = True
    bind: str = "::"
    port: PortOrAny = 5683
    max_payload_bytes: Annotated[int, Field(ge=64, le=65536)] = 4096
    # RFC 7252 message deduplication cache; entries live EXCHANGE_LIFETIME.
    # Past the cap the oldest go first; (device, seq) dedup still catches a repeat.
    dedup_max_entries: Annotated[int, Field(ge=1000)] = 200_000
    overload_max_age_s: Annotated[int, Field(ge=1, le=3600)] = 30


ANY_ADDRESS = frozenset({"", "::", "0.0.0.0"})


def dtls_unavailable() -> str | None:
    """Why coaps cannot run here (DTLSSocket, tinydtls' Python binding, not importable)."""
    try:
        importlib.import_module("DTLSSocket.dtls")
    except ImportError as e:
        return (f"coaps.enabled = true needs the DTLSSocket package, which cannot be imported "
                f"({e}): install the gateway with its dtls extra (pip install "
                "'nbiot-gateway[dtls]'; building it needs autoconf, automake and libtool, "
                "which scripts/bootstrap.sh installs)")
    return None


class CoapsSection(Section):
    """CoAP over DTLS (coaps), a pre-shared key per device: the registry's `psk` column."""

    enabled: bool = False
    # One address, not :: or 0.0.0.0: aiocoap's DTLS server binds a single address, so a
    # reply always leaves from the address the device sent to.
    bind: str | None = None
    port: Port = 5684
    # DTLS sessions kept for devices that send again from the same address and port
    # (~4.5 KB each): the least recently active go first past max_sessions, and any
    # session idle for session_idle_s.
    max_sessions: Annotated[int, Field(ge=100)] = 40_000
    session_idle_s: Annotated[float, Field(gt=0)] = 600.0

    @model_validator(mode="after")
    def _can_listen(self) -> CoapsSection:
        if not self.enabled:
            return self
        if self.bind is None or self.bind.strip() in ANY_ADDRESS:
            raise ValueError("coaps.bind must name the one address devices reach (not :: or "
                             "0.0.0.0): aiocoap's DTLS server binds a single address")
        problem = dtls_unavailable()
        if problem is not None:
            raise ValueError(problem)
        return self


def host_port(address: str, default_port: int | None = None) -> tuple[str, int]:
    """`host:port`, `[v6]:port`, or a bare host when there is a default port."""
    host, sep, port = address.rpartition(":")
    if not sep or "]" in port or (":" in host and not host.startswith("[")):
        host, port = address, ""
    host = host.strip("[]")
    if not host:
        raise ValueError(f"{address!r}: no host")
    if not port:
        if default_port is None:
            raise ValueError(f"{address!r}: give host:port")
        return host, default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r}: port must be 1-65535")
    return host, int(port)


class MqttSection(Section):
    host: str = "localhost"
    port: Port = 1883
    # A broker cluster: every node's `host:port`, tried in turn when one cannot be reached
    # or drops the connection. Empty: the one broker at host and port.
    brokers: tuple[str, ...] = ()
    username: str | None = None
    password: SecretStr | None = None
    tls: bool = False
    tls_ca_file: Path | None = None
    client_id: str | None = None
    topic_prefix: TopicPart = "nbiot"
    keepalive_s: Annotated[int, Field(ge=5, le=3600)] = 30
    inflight_window: Annotated[int, Field(ge=1, le=65535)] = 1000
    reconnect_min_s: Annotated[float, Field(gt=0)] = 0.5
    reconnect_max_s: Annotated[float, Field(gt=0)] = 30.0

    @model_validator(mode="after")
    def _backoff_order(self) -> MqttSection:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        for address in self.brokers:
            host_port(address, self.port)
        return self

    def broker_addresses(self) -> list[tuple[str, int]]:
        """Where to connect, in order of preference."""
        if not self.brokers:
            return [(self.host, self.port)]
        return [host_port(address, self.port) for address in self.brokers]


class ClusterSection(Section):
    """Several gateway hosts sharing the devices (docs/operations.md, "Cluster"). Every
    host has the same [cluster] but its own `host`, and its own gateway.id."""

    enabled: bool = False
    host: TopicPart | None = None  # this host's name in `hosts`
    # name -> "ip:port" of that host's peer channel (worker i listens on port + i). The
    # channel listens only on this host's own entry.
    hosts: dict[TopicPart, str] = Field(default_factory=dict)
    # Shared by every host: each peer message carries an HMAC-SHA256 made with it.
    secret: SecretStr | None = None
    # "disk": 2.04 once the uplink is durable on this host's disk (survives broker outages;
    # a host that dies and comes back publishes what it acknowledged). "broker": 2.04 once
    # the broker cluster has PUBACKed it (a host lost for good, disk and all, loses nothing
    # it acknowledged); while no broker node takes it, devices get 5.03 with Max-Age.
    ack: Literal["disk", "broker"] = "disk"
    heartbeat_interval_s: Annotated[float, Field(gt=0, le=10)] = 0.5
    # A peer not heard from for this long is dead; its devices go to the others.
    peer_dead_after_s: Annotated[float, Field(gt=0, le=60)] = 2.0
    # ack = "broker": how long an uplink waits for its PUBACK before the device gets 5.03.
    broker_ack_timeout_s: Annotated[float, Field(gt=0, le=60)] = 3.0
    # RabbitMQ's management API on the broker nodes (http://host:15672), tried in turn: at
    # start the gateway checks that the uplink topics are bound to a quorum queue. A
    # PUBACK for a message no queue takes means nothing in RabbitMQ.
    broker_api: tuple[str, ...] = ()
    # false: skip that check, for a broker that is not RabbitMQ (a test's mosquitto): then
    # nothing but the broker's own word says a PUBACKed uplink is kept.
    check_uplink_queue: bool = True

    @model_validator(mode="after")
    def _complete(self) -> ClusterSection:
        if not self.enabled:
            return self
        if len(self.hosts) < 2:
            raise ValueError("a cluster needs at least two entries in cluster.hosts")
        if self.host not in self.hosts:
            raise ValueError(f"cluster.host must name this host's entry in cluster.hosts "
                             f"({', '.join(self.hosts)}), not {self.host!r}")
        for name, address in self.hosts.items():
            try:
                host_port(address)
            except ValueError as e:
                raise ValueError(f"cluster.hosts.{name}: {e}") from None
        if self.secret is None or len(self.secret.get_secret_value()) < 16:
            raise ValueError("cluster.secret: at least 16 characters, the same on every host")
        if self.check_uplink_queue and not self.broker_api:
            raise ValueError("cluster.broker_api: the RabbitMQ management API of the broker "
                             "nodes (http://node:15672), to check the uplink queue at start "
                             "(or check_uplink_queue = false for a broker that is not "
                             "RabbitMQ)")
        if self.heartbeat_interval_s * 2 > self.peer_dead_after_s:
            raise ValueError("cluster.peer_dead_after_s must be at least twice "
                             "heartbeat_interval_s")
        return self

    def peer_address(self, name: str) -> tuple[str, int]:
        return host_port(self.hosts[name])


class SpoolSection(Section):
    path: Path = Path("var/spool.sqlite")
    max_bytes: Annotated[int, Field(ge=1024)] = 1 << 30
    max_batch: Annotated[int, Field(ge=1, le=100_000)] = 2000
    # An uplink may wait this long for others to share its commit (fsync): at moderate
    # load this turns one commit per uplink into one per ~linger, cutting disk writes and
    # CPU per uplink (docs/decisions.md). A device on NB-IoT waits 0.4-5 s for its reply.
    commit_linger_ms: Annotated[float, Field(ge=0, le=1000)] = 30.0


class MetricsSection(Section):
    enabled: bool = True
    bind: str = "127.0.0.1"
    port: PortOrAny = 9108


class RegistrySection(Section):
    path: Path = Path("devices.example.csv")


Share = Annotated[float, Field(ge=0.0, le=1.0)]
SimFormat = Literal["json", "cbor", "senml+json", "senml+cbor"]


class SimSection(Section):
    """The fleet simulator (`nbiot-gateway sim`); the daemon never reads this section."""

    host: str = "127.0.0.1"  # the gateway's CoAP address
    port: PortOrAny | None = None  # None: coap.port
    devices: Annotated[int, Field(ge=1)] | None = None  # None: every device in the registry
    interval_s: Annotated[float, Field(gt=0)] | None = None  # None: each device's own interval
    duration_s: Annotated[float, Field(gt=0)] = 60.0  # reports start within this window
    profile: Literal["steady", "storm", "faulty"] = "steady"
    seed: int | None = None  # None: a new fleet every run
    jitter: Annotated[float, Field(ge=0.0, le=0.5)] = 0.1  # +- share of the interval
    storm_window_s: Annotated[float, Field(gt=0)] = 5.0  # profile storm: all report within it
    faulty_share: Share | None = None  # None: 0.01, or 0.3 with profile faulty
    loss_up: Annotated[float, Field(ge=0.0, le=0.9)] = 0.01
    loss_down: Annotated[float, Field(ge=0.0, le=0.9)] = 0.01
    latency_scale: Annotated[float, Field(ge=0.0, le=10.0)] = 1.0  # x the CE0/CE1/CE2 latencies
    coverage_shares: tuple[Share, Share, Share] = (0.7, 0.2, 0.1)  # CE0, CE1, CE2
    formats: Annotated[tuple[SimFormat, ...], Field(min_length=1)] = (
        "json", "cbor", "senml+json", "senml+cbor")
    nat_rebind_probability: Share = 0.05  # per retransmission: a new source port
    nat_idle_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    max_awake: Annotated[int, Field(ge=1)] = 15_000  # sockets open at once (fd limit!)
    source_addresses: Literal["per_device", "shared"] = "per_device"  # 127.x.y.z per device
    drain_s: Annotated[float, Field(ge=0)] = 30.0  # after the window: finish exchanges
    grace_s: Annotated[float, Field(ge=0)] = 10.0  # then: wait for acked reports on MQTT
    processes: Annotated[int, Field(ge=1, le=64)] = 1  # fleet processes, devices split by index
    # A self-test: every second, each fleet process busy-waits this long on its event loop,
    # as an overloaded simulator would (the summary must then call its latencies distorted).
    loop_stall_ms: Annotated[float, Field(ge=0, lt=1000)] = 0.0
    # LwM2M devices (queue mode, Send on /dp): this share of the fleet, drawn among the
    # devices whose type maps every field to a resource ([types.X.lwm2m] fields). The
    # gateway must have [lwm2m] enabled (and allow_nosec: the simulator speaks plain UDP).
    lwm2m_share: Share = 0.0
    # How long an LwM2M device listens after its last datagram; None: the lwm2m.awake_s of
    # the gateway's config (the gateway sends queued requests that long after it spoke).
    lwm2m_listen_s: Annotated[float, Field(gt=0, le=600)] | None = None

    @model_validator(mode="after")
    def _some_coverage(self) -> SimSection:
        if sum(self.coverage_shares) <= 0:
            raise ValueError("coverage_shares must not all be 0")
        return self


class FieldSpec(Section):
    unit: str = ""
    min: float | None = None
    max: float | None = None
    required: bool = False

    @model_validator(mode="after")
    def _range_order(self) -> FieldSpec:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        return self


def _lwm2m_path(path: str, levels: range) -> tuple[int, ...] | None:
    """`path` parsed as the LwM2M server parses it, if it has that many levels."""
    try:
        parsed = parse_path(path)
    except PathError:
        return None
    return parsed if len(parsed) in levels else None


class Lwm2mType(Section):
    """How the type's LwM2M devices carry its fields: `fields` maps a field to the resource
    that holds it (`temperature = "/3303/0/5700"`); `observe` lists what the gateway
    observes after each Register of an LwM2M 1.0 device (1.0 has no Send)."""

    fields: dict[str, str] = Field(default_factory=dict)
    observe: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _paths(self) -> Lwm2mType:
        resources = set()
        for name, path in self.fields.items():
            resource = _lwm2m_path(path, range(3, 5))  # a resource or a resource instance
            if resource is None:
                raise ValueError(f"fields.{name}: {path!r} is not a resource path like "
                                 "/3303/0/5700")
            resources.add(resource)
        if len(resources) != len(self.fields):
            raise ValueError("fields: two fields map the same resource")
        for path in self.observe:
            if _lwm2m_path(path, range(1, 4)) is None:
                raise ValueError(f"observe: {path!r} is not an object, instance or resource "
                                 "path like /3303/0")
        return self


class DeviceType(Section):
    fields: dict[str, FieldSpec] = Field(min_length=1)
    lwm2m: Lwm2mType | None = None

    @model_validator(mode="after")
    def _field_names(self) -> DeviceType:
        for name in self.fields:
            if not FIELD_NAME.match(name):
                raise ValueError(f"field name {name!r} must match {FIELD_NAME.pattern}")
            if name in RESERVED_FIELDS:
                raise ValueError(f"field name {name!r} is reserved (seq, ts and ack are envelope keys)")
        for name in self.lwm2m.fields if self.lwm2m else ():
            if name not in self.fields:
                raise ValueError(f"lwm2m.fields.{name}: no such field in this type's fields")
        return self


class Lwm2mSection(Section):
    """The LwM2M server (registration interface, Send, Observe, commands), on the CoAP
    port: requests to a device must leave from the address it registered with."""

    enabled: bool = False
    # Registration over plain UDP (LwM2M NoSec): LwM2M itself carries no credential, so
    # anyone who knows a device id could register as it. Off unless the network is closed
    # (a carrier APN with private addressing).
    allow_nosec: bool = False
    min_lifetime_s: Annotated[int, Field(ge=1)] = 60
    max_lifetime_s: Annotated[int, Field(ge=1)] = 30 * 86400
    # A queue-mode device listens this long after each message (LwM2M 1.1 6.5: the client
    # stays awake at least CoAP's MAX_TRANSMIT_WAIT, 93 s; many modules much less).
    awake_s: Annotated[float, Field(gt=0, le=600)] = 20.0

    @model_validator(mode="after")
    def _lifetimes(self) -> Lwm2mSection:
        if self.min_lifetime_s > self.max_lifetime_s:
            raise ValueError("min_lifetime_s is greater than max_lifetime_s")
        return self


class LimitsSection(Section):
    # Per device: uplinks per second on average and the burst allowed; excess gets 4.29
    # with Max-Age. 0 turns the per-device limit off.
    per_device_rate: Annotated[float, Field(ge=0)] = 1.0
    per_device_burst: Annotated[int, Field(ge=1)] = 20
    # Admission control: uplinks waiting for their spool commit; past this, 5.03.
    max_in_flight: Annotated[int, Field(ge=100)] = 20_000
    # Admission control: while the event loop runs later than this, new uplinks get 5.03.
    max_loop_lag_s: Annotated[float, Field(gt=0)] = 0.25
    # Rejected uplinks kept on the dead-letter topic, per second (bursts of 5 s).
    dead_letters_per_s: Annotated[float, Field(gt=0)] = 200.0


class LivenessSection(Section):
    # A device is offline after this many report intervals without an uplink.
    offline_after_intervals: Annotated[float, Field(ge=1)] = 3.0
    check_interval_s: Annotated[float, Field(gt=0, le=3600)] = 10.0
    # The last-seen table is written this often (and at a clean stop): after a crash the
    # restarted gateway knows each device as last seen up to this long before. Each save
    # rewrites most of the table's pages, so a short interval costs disk writes.
    save_interval_s: Annotated[float, Field(gt=0, le=3600)] = 60.0
    # The last-seen table; default: liveness.sqlite beside the spool.
    path: Path | None = None


class Settings(BaseSettings):
    """Root of the configuration. Build it with `load_config`, not directly."""

    model_config = SettingsConfigDict(
        env_prefix="NBIOT_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )
    toml_path: ClassVar[Path | None] = None

    gateway: GatewaySection = GatewaySection()
    coap: CoapSection = CoapSection()
    coaps: CoapsSection = CoapsSection()
    mqtt: MqttSection = MqttSection()
    spool: SpoolSection = SpoolSection()
    metrics: MetricsSection = MetricsSection()
    registry: RegistrySection = RegistrySection()
    sim: SimSection = SimSection()
    liveness: LivenessSection = LivenessSection()
    limits: LimitsSection = LimitsSection()
    cluster: ClusterSection = ClusterSection()
    lwm2m: Lwm2mSection = Lwm2mSection()
    types: dict[TopicPart, DeviceType] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _ingest(self) -> Settings:
        if not self.coap.enabled and not self.coaps.enabled:
            raise ValueError("coap.enabled and coaps.enabled are both false: no uplink could arrive")
        if self.cluster.enabled and self.coaps.enabled:
            raise ValueError("cluster.enabled with coaps.enabled: not supported yet (a DTLS "
                             "session lives on the host the balancer picked, and its "
                             "uplinks are not relayed to the device's owner)")
        if self.lwm2m.enabled:
            if not self.coap.enabled:
                raise ValueError("lwm2m.enabled needs coap.enabled: LwM2M shares the CoAP port")
            if self.gateway.workers > 1 or self.cluster.enabled:
                raise ValueError("lwm2m.enabled with gateway.workers > 1 or cluster.enabled: not "
                                 "supported yet (a Send names no device: its registration, "
                                 "found by address, lives in one process)")
        if self.coap.enabled and self.coaps.enabled and self.coap.port == self.coaps.port:
            raise ValueError(f"coap.port and coaps.port are both {self.coap.port}: "
                             "give coaps a port of its own (5684)")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Priority is the order: explicit arguments, environment, then the TOML file.
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if cls.toml_path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=cls.toml_path))
        return tuple(sources)

    def with_paths_relative_to(self, base: Path) -> Settings:
        """Relative file paths in the config mean: relative to the config file."""

        def anchor(p: Path) -> Path:
            return p if p.is_absolute() else Path(os.path.normpath(base / p))

        spool_path = anchor(self.spool.path)
        liveness_path = (anchor(self.liveness.path) if self.liveness.path
                         else spool_path.parent / "liveness.sqlite")
        return self.model_copy(
            update={
                "spool": self.spool.model_copy(update={"path": spool_path}),
                "registry": self.registry.model_copy(update={"path": anchor(self.registry.path)}),
                "liveness": self.liveness.model_copy(update={"path": liveness_path}),
                "mqtt": self.mqtt.model_copy(update={
                    "tls_ca_file": anchor(self.mqtt.tls_ca_file) if self.mqtt.tls_ca_file
                    else None}),
            }
        )


def _format_errors(err: ValidationError) -> list[str]:
    env = {k.upper() for k in os.environ}
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(root)"
        line = f"{loc}: {e['msg']}"
        # A bad value set in the environment is not in the file: say where it came from.
        for depth in range(len(e["loc"]), 0, -1):
            name = "NBIOT_" + "__".join(str(p) for p in e["loc"][:depth]).upper()
            if name in env:
                line += f" (from the environment: {name})"
                break
        lines.append(line)
    return lines


def load_config(path: Path | str, **overrides: Any) -> Settings:
    """Read and validate the config file; raise ConfigError listing every problem."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise ConfigError([f"config file {path} {what}"])
    try:
        with path.open("rb") as f:
            tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{path}: not valid TOML: {e}"]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([f"{path}: not valid TOML: not UTF-8 text ({e.reason} "
                           f"at byte {e.start})"]) from None
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror}"]) from None
    bound = type("BoundSettings", (Settings,), {"toml_path": path})
    try:
        settings: Settings = bound(**overrides)
    except ValidationError as e:
        raise ConfigError(_format_errors(e)) from None
    env_unknown = [
        # Upper-cased like pydantic-settings does: `nbiot_mqqt__port` is a typo too.
        k for k in os.environ if k.upper().startswith("NBIOT_")
        and k.split("__")[0][6:].lower() not in Settings.model_fields
    ]
    if env_unknown:
        raise ConfigError([f"{k}: unknown setting in the environment" for k in env_unknown])
    return settings.with_paths_relative_to(path.resolve().parent)
