"""The durable stores, SQLite files beside each other: the spool of records (`spool`), the
downlink commands waiting for sleeping devices (`downlink`), the liveness table (`liveness`)."""
