"""Other machines: `--host ssh://` over the system's OpenSSH (`ssh`),
`docker context`-style contexts (`contexts`) and every host's `ps` rows
(`fleet`). What routers tell their peers is `router.peers`; the daemon's
look at each peer is `daemon.peers`."""
