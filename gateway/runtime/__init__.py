"""The process and its operation: wiring and lifecycle (`service`), the workers and their
supervisor, systemd's notify protocol, logs and the metrics endpoint."""
