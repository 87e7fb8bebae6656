"""Log set-up: one event per line on stderr, `key=value` pairs, for journald and grep."""

from __future__ import annotations

import logging
import sys
import time


class LogfmtFormatter(logging.Formatter):
    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self._worker = "" if worker is None else f" worker={worker}"

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        msg = record.getMessage().replace('"', "'").replace("\n", " | ")
        line = f'ts={ts}.{int(record.msecs):03d}Z level={record.levelname}{self._worker} ' \
               f'logger={record.name} msg="{msg}"'
        if record.exc_info:
            exc = self.formatException(record.exc_info).replace("\n", " | ")
            line += f' exc="{exc}"'
        return line


def setup_logging(level: str, worker: int | None = None) -> None:
    """`worker`: the worker process's index, added to every line as `worker=N`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter(worker))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
