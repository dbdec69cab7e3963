"""Plans: DAGs of llm and shell tasks that the daemon runs on healthy
instances (DESIGN §7). `spec` parses and checks, `template` fills prompts,
`schedule` decides (pure), `records` persists; the daemon's `plans` runs them."""

#: how a ready task's `error` says what it waits for (a GPU lease), not why it failed
WAITING = "waiting for "

#: the task states `plan retry` starts over (the others keep their results)
RETRYABLE = ("failed", "skipped", "cancelled")


def run_verbs(state: str, counts: dict[str, int]) -> frozenset[str]:
    """What a plan run in `state`, with `counts` tasks by state, can be asked
    (pure): cancel while it runs; retry once it ended with a task to start over."""
    if state == "running":
        return frozenset({"cancel"})
    return frozenset({"retry"}) if any(counts.get(s) for s in RETRYABLE) else frozenset()
