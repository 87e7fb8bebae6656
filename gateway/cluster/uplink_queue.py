"""At start in a cluster: is a durable quorum queue bound to the uplink topics?

RabbitMQ confirms (PUBACKs) a message that matches no queue and drops it, and MQTT has no
`mandatory` flag: without that binding a 2.04 would mean nothing. Asked of the broker
nodes' management API (`cluster.broker_api`, each tried in turn); never on the datagram
path. It only reads.
"""

from __future__ import annotations

import base64
import json
import logging
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from gateway.config import Settings
from gateway.errors import GatewayError

log = logging.getLogger(__name__)
TIMEOUT_S = 5.0


class UplinkQueueMissing(GatewayError):
    """The broker cluster keeps no uplink: the gateway must not start."""


def mqtt_to_routing_key(topic: str) -> str:
    """The AMQP routing key RabbitMQ's MQTT plugin gives a topic (`/` and `.` swapped), or
    the binding key of a topic filter (`+` -> `*`, `#` stays)."""
    swapped = topic.translate(str.maketrans("/.", "./"))
    return ".".join("*" if word == "+" else word for word in swapped.split("."))


def binding_matches(binding_key: str, key: str) -> bool:
    """AMQP topic matching: `*` is one word, `#` zero or more."""
    return _match(binding_key.split("."), key.split("."))


def _match(pattern: list[str], words: list[str]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_match(rest, words[i:]) for i in range(len(words) + 1))
    return bool(words) and head in ("*", words[0]) and _match(rest, words[1:])


def check(settings: Settings) -> str:
    """A line naming the queue(s) that keep the uplinks; raise UplinkQueueMissing else."""
    sample = mqtt_to_routing_key(f"{settings.mqtt.topic_prefix}/{settings.gateway.tenant}/"
                         "type/device/up")
    problems: list[str] = []
    for api in settings.cluster.broker_api:
        try:
            queues = _quorum_queues_for(api, sample, settings)
        except (OSError, ValueError, KeyError) as e:
            problems.append(f"{api}: {e}")
            continue
        if not queues:
            raise UplinkQueueMissing(
                f"no durable quorum queue is bound to amq.topic for the uplink topics "
                f"(routing key {sample!r}, from {settings.mqtt.topic_prefix}/"
                f"{settings.gateway.tenant}/+/+/up) on {api}: RabbitMQ would PUBACK and drop "
                "every uplink. Declare one before starting the gateways "
                "(docs/operations.md, \"Cluster\").")
        return f"uplinks kept by quorum queue {', '.join(queues)} (checked on {api})"
    raise UplinkQueueMissing("cannot ask any broker node whether a queue keeps the uplinks: "
                             + "; ".join(problems))


def _quorum_queues_for(api: str, key: str, settings: Settings) -> list[str]:
    bindings = _get(api, "/api/exchanges/%2F/amq.topic/bindings/source", settings)
    queues = []
    for binding in bindings:
        if binding.get("destination_type") != "queue":
            continue
        if not binding_matches(str(binding.get("routing_key", "")), key):
            continue
        name = str(binding["destination"])
        queue = _get(api, "/api/queues/%2F/" + urllib.parse.quote(name, safe=""), settings)
        if queue.get("durable") and (queue.get("type") == "quorum" or queue.get(
                "arguments", {}).get("x-queue-type") == "quorum"):
            queues.append(name)
        else:
            log.warning("queue %s is bound to the uplink topics but is not a durable quorum "
                        "queue: it does not survive the loss of its node", name)
    return queues


def _get(api: str, path: str, settings: Settings) -> Any:
    request = urllib.request.Request(api.rstrip("/") + path)
    user = settings.mqtt.username or "guest"
    password = settings.mqtt.password.get_secret_value() if settings.mqtt.password else "guest"
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        raise OSError(f"HTTP {e.code} {e.reason} for {path}") from None
