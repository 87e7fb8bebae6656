"""The fleet simulator: tens of thousands of NB-IoT devices sending real CoAP to the gateway,
and an MQTT witness proving what was delivered. Never imported by the daemon itself.

One job per module: `retransmit` (RFC 7252 timer), `radio` (latency, loss, NAT), `payloads`
(readings and faults), `exchange` (one CON exchange), `endpoints` (its source address and
port: a shared port or a socket of its own), `fleet` (scheduling
the devices), `ledger` (accounting), `lag` (event-loop lag), `report`, `progress`; the
processes: `run` (the parent), `shard` (a fleet process), `witness` (the MQTT side),
`processes` and `channel` (starting them, talking to them), `gateway_side` (its /metrics).
"""
