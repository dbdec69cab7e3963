"""Our HTTP/1.1, both ways, on httptools (llhttp): `pool`, the daemon's one
client (pooled keep-alive connections: the router's forwarding, probes,
upstream checks, peers), and `server`, the router's server (hostile
clients' limits, streaming, cancellation). The CLI's one request at a time
uses the standard library's http.client instead."""
