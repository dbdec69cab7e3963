"""A Ray cluster as the engine past a few machines (docs/scaling.md).

Ray places each instance on a node and keeps the ledger of what every node
has; llama-orch supervises the servers as on one box. The pure rules live
in `placement` and `kuberay`; `ray` is the adapter over Ray Core (the only
module that imports it, lazily: the `ray` extra is optional); `host` is
the actor that runs one instance's server on its node.
"""
