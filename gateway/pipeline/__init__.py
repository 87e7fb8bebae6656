"""The transport-independent pipeline: an `Uplink` in, a `Verdict` out (`core`). Decoding
(`codecs`), the device registry, schema validation, replay protection and the MQTT message
it renders; it never sees a socket."""
