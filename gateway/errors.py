"""The project's own exceptions: what can go wrong, named for the operator."""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(GatewayError):
    """The configuration or the device registry is invalid; each line names a key or a row."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class UplinkRejected(GatewayError):
    """An uplink the gateway refuses: a CoAP response code and a reason slug (a metric label)."""

    def __init__(self, code: int, reason: str, detail: str, max_age_s: int | None = None) -> None:
        super().__init__(detail)
        self.code = code
        self.reason = reason
        self.detail = detail
        self.max_age_s = max_age_s
        self.authenticated = False  # set once the device's credential was checked
