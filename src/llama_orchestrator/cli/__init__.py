"""Thin Typer commands: parse, call the core, render (STYLE 8).

One rule for names: a module that declares commands is `<subject>_cmd`
(`lifecycle_cmd`: init/up/down/restart/rm, `inspect_cmd`: ps/describe/
probe, `gpus_cmd`, `logs_cmd`: logs/events, one per command group
otherwise). What they share has no suffix: `app` (the root command and the
entry point), `context` (the application object each command is handed),
`helptext`."""
