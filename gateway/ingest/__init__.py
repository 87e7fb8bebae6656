"""Ingest: the only stage that knows a wire protocol. Datagrams in (CoAP over UDP in `coap`,
coaps in `coap.dtls`), plain `Uplink`s out to the pipeline, its `Verdict` back as a reply."""
