"""The fleet simulator: tens of thousands of NB-IoT devices sending real CoAP to the gateway,
and an MQTT witness proving what was delivered. Never imported by the daemon itself.

One job per module: `retransmit` (RFC 7252 timer), `radio` (latency, loss, NAT), `payloads`
(readings and faults), `exchange` (one CON exchange on its own socket), `fleet` (scheduling
the devices), `ledger` (accounting), `witness` (MQTT side), `report`, `progress`, `run`.
"""
