"""The device registry: which devices exist, their type, token and report interval.

Loaded from a CSV file (`device_id,type,token,report_interval_s[,enabled][,psk]`, where
`token_sha256` may stand instead of `token`); it never writes the file. A bad file is a
ConfigError naming each bad row, never showing a secret.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from gateway.errors import ConfigError
from gateway.runtime.workers import owner

REQUIRED_COLUMNS = ("device_id", "type", "report_interval_s")
TOKEN_COLUMNS = ("token", "token_sha256")  # at least one of them
DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_TRUE = {"", "1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
MAX_PROBLEMS = 50
# tinydtls' limits: a longer key would overflow its 16-byte buffer (DTLSSocket does not
# check), a longer identity is refused in the handshake.
PSK_MAX_BYTES = 16
PSK_IDENTITY_MAX_BYTES = 32


@dataclass(slots=True, frozen=True)
class Device:
    device_id: str
    device_type: str
    token: str
    report_interval_s: int
    enabled: bool = True
    psk: bytes | None = field(default=None, repr=False)  # coaps key; the identity is device_id
    # SHA-256 of the token, for registries that must not hold tokens in clear.
    token_sha256: bytes | None = field(default=None, repr=False)

    def token_matches(self, presented: str | None) -> bool:
        """Constant-time comparison with the token, or with its SHA-256."""
        if presented is None:
            return False
        if self.token:
            return hmac.compare_digest(self.token.encode(), presented.encode())
        if self.token_sha256 is not None:
            digest = hashlib.sha256(presented.encode()).digest()
            return hmac.compare_digest(self.token_sha256, digest)
        return False  # no token at all: a coaps-only device


class Registry:
    """Devices by id. Immutable once built; a reload builds a new one."""

    def __init__(self, devices: Iterable[Device], source: Path | None = None) -> None:
        self._devices: dict[str, Device] = {d.device_id: d for d in devices}
        self.source = source

    def get(self, device_id: str) -> Device | None:
        return self._devices.get(device_id)

    def __len__(self) -> int:
        return len(self._devices)

    def __iter__(self) -> Iterator[Device]:
        return iter(self._devices.values())

    def owned_by(self, worker: int, workers: int) -> Registry:
        """The devices `worker` owns (gateway/runtime/workers.py); itself with one worker."""
        if workers <= 1:
            return self
        return Registry((d for d in self if owner(d.device_id, workers) == worker), self.source)


def load_registry(path: Path, known_types: Mapping[str, object]) -> Registry:
    """Parse the CSV registry; raise ConfigError listing bad rows (line numbers)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError([f"registry.path: cannot read {path}: {e.strerror}"]) from None
    try:
        # utf-8-sig: spreadsheets save "CSV UTF-8" with a byte order mark before the header.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line_no = e.object.count(b"\n", 0, e.start) + 1
        raise ConfigError([f"{path}:{line_no}: not UTF-8 text (byte {e.object[e.start]:#04x}); "
                           "save the registry as UTF-8"]) from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        devices, problems = _parse_rows(reader, path, known_types)
    except csv.Error as e:  # e.g. an unclosed quote swallowing the rest of the file
        raise ConfigError([f"{path}:{reader.line_num}: not valid CSV ({e}); "
                           "look for an unclosed quote above"]) from None
    if problems:
        raise ConfigError(problems)
    return Registry(devices, source=path)


def _parse_rows(
    reader: Iterator[list[str]], path: Path, known_types: Mapping[str, object]
) -> tuple[list[Device], list[str]]:
    problems: list[str] = []
    devices: list[Device] = []
    first_line: dict[str, int] = {}
    header = next(reader, None)
    if header is None:
        raise ConfigError([f"{path}: empty file, expected header {','.join(REQUIRED_COLUMNS)}"])
    columns = [h.strip() for h in header]
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if not any(c in columns for c in TOKEN_COLUMNS):
        missing.append(" or ".join(TOKEN_COLUMNS))
    if missing:
        raise ConfigError([f"{path}:1: missing column(s) {', '.join(missing)} "
                           f"(the header reads {','.join(header)!r}; columns are comma-separated)"])
    i_id, i_type, i_interval = (columns.index(c) for c in REQUIRED_COLUMNS)
    i_token = columns.index("token") if "token" in columns else None
    i_sha = columns.index("token_sha256") if "token_sha256" in columns else None
    i_enabled = columns.index("enabled") if "enabled" in columns else None
    i_psk = columns.index("psk") if "psk" in columns else None
    width = len(columns)
    for line_no, row in enumerate(reader, start=2):
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if row[0].startswith("#"):
            continue
        if len(row) != width:
            problems.append(f"{path}:{line_no}: expected {width} columns, got {len(row)}")
            continue
        # Stripped like the other columns: "d1, env_th, tok, 60" must not make every uplink 4.01.
        device_id, dtype = row[i_id].strip(), row[i_type].strip()
        token = row[i_token].strip() if i_token is not None else ""
        where = f"{path}:{line_no}"
        if not DEVICE_ID.match(device_id):
            problems.append(f"{where}: device_id {device_id!r} is not a valid id")
        elif device_id in first_line:
            problems.append(f"{where}: device_id {device_id!r} appears twice "
                            f"(first on line {first_line[device_id]})")
        if dtype not in known_types:
            problems.append(f"{where}: type {dtype!r} is not defined under [types]")
        psk = _parse_psk(row[i_psk], device_id, where, problems) if i_psk is not None else None
        token_sha256 = _parse_sha256(row[i_sha], where, problems) if i_sha is not None else None
        if not token and token_sha256 is None and psk is None:
            problems.append(f"{where}: token is empty (a device needs a token or token_sha256, "
                            "or a psk for coaps)")
        try:
            interval = int(row[i_interval])
            if interval <= 0:
                raise ValueError
        except ValueError:
            problems.append(f"{where}: report_interval_s {row[i_interval]!r} is not a positive integer")
            interval = 0
        enabled = True
        if i_enabled is not None:
            flag = row[i_enabled].strip().lower()
            if flag in _TRUE:
                enabled = True
            elif flag in _FALSE:
                enabled = False
            else:
                problems.append(f"{where}: enabled {row[i_enabled]!r} is not true/false")
        if len(problems) >= MAX_PROBLEMS:
            problems.append("... (further problems not listed)")
            break
        first_line.setdefault(device_id, line_no)
        devices.append(Device(device_id, dtype, token, interval, enabled, psk, token_sha256))
    return devices, problems


def _parse_sha256(text: str, where: str, problems: list[str]) -> bytes | None:
    """The `token_sha256` column: 64 hex digits, or empty."""
    text = text.strip()
    if not text:
        return None
    try:
        digest = bytes.fromhex(text)
    except ValueError:
        digest = b""
    if len(digest) != 32:
        problems.append(f"{where}: token_sha256 is not 64 hex digits")
        return None
    return digest


def _parse_psk(text: str, device_id: str, where: str, problems: list[str]) -> bytes | None:
    """The `psk` column: hex, 1 to 16 bytes; empty means the device cannot use coaps."""
    text = text.strip()
    if not text:
        return None
    try:
        psk = bytes.fromhex(text)
    except ValueError:
        problems.append(f"{where}: psk is not hex (two digits 0-9a-f per byte)")
        return None
    if not 1 <= len(psk) <= PSK_MAX_BYTES:
        problems.append(f"{where}: psk is {len(psk)} bytes; DTLS (tinydtls) takes 1 to "
                        f"{PSK_MAX_BYTES} bytes, {2 * PSK_MAX_BYTES} hex digits at most")
        return None
    if len(device_id.encode()) > PSK_IDENTITY_MAX_BYTES:
        problems.append(f"{where}: device_id is the DTLS PSK identity, at most "
                        f"{PSK_IDENTITY_MAX_BYTES} bytes; this one cannot have a psk")
        return None
    return psk
