"""Plans: DAGs of llm and shell tasks that the daemon runs on healthy
instances (DESIGN §7). `spec` parses and checks, `template` fills prompts,
`schedule` decides (pure), `records` persists; the daemon's `plans` runs them."""

#: how a ready task's `error` says what it waits for (a GPU lease), not why it failed
WAITING = "waiting for "
