"""How a request or a plan task names what serves it (DESIGN §6): an
instance's alias, or `tags:<tag>[,<tag>...]` for any instance that carries
every tag listed. A leaf: the config checks, plans, peers and the router's
choice all speak this vocabulary, and none of them owns it."""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

__all__ = ["TAG_PREFIX", "tag_set", "tag_model", "offers", "serves", "alias_names"]

TAG_PREFIX = "tags:"


@lru_cache(maxsize=1024)
def alias_names(alias: str) -> tuple[str, ...]:
    """The names an alias gives: llama-server's `--alias a,b,c` is three
    names of one model ("a,b,c" -> ("a", "b", "c"); one name stays one)."""
    if "," not in alias:
        return (alias,)
    return tuple(n for n in (part.strip() for part in alias.split(",")) if n) or (alias,)


def tag_set(model: str) -> frozenset[str]:
    """The tags a `tags:a,b` name asks for (empty for an alias, or for `tags:`)."""
    if not model.startswith(TAG_PREFIX):
        return frozenset()
    return frozenset(t.strip() for t in model[len(TAG_PREFIX) :].split(",") if t.strip())


def tag_model(tags: Iterable[str]) -> str:
    """The one name for a set of tags: `tags:` and the tags sorted, comma-joined
    (so `tags:gpu,worker` and `tags:worker, gpu` wait in the same queue)."""
    return TAG_PREFIX + ",".join(sorted({t.strip() for t in tags if t.strip()}))


def offers(known: Iterable[str], model: str) -> bool:
    """Whether `model` names what the configs offer (`known`, see
    `config.validate.offered_names`): an alias, or tags that one instance
    carries all of (`known` holds each instance's whole set, `tags:a,b,c`)."""
    if not model.startswith(TAG_PREFIX):
        return model in known
    wanted = tag_set(model)
    return bool(wanted) and any(wanted <= tag_set(k) for k in known)


def serves(model: str, alias: str, tags: Iterable[str]) -> bool:
    """Whether an instance with this alias and these tags serves `model`."""
    if model.startswith(TAG_PREFIX):
        wanted = tag_set(model)
        return bool(wanted) and wanted <= set(tags)
    return model == alias or model in alias_names(alias)
