"""A stand-in for systemctl, nssm and schtasks: records its argv as a JSON
line in $FAKE_TOOL_LOG and answers like the real tool would, keeping whether
a service is installed in $FAKE_TOOL_LOG.state."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

tool = sys.argv[1]  # the wrapper script passes the name it was called by
args = sys.argv[2:]
log = Path(os.environ["FAKE_TOOL_LOG"])
state = log.with_suffix(".state")
with log.open("a") as f:
    f.write(json.dumps([tool, *args]) + "\n")

installed = state.exists()
if tool == "systemctl":
    verb = next(a for a in args if not a.startswith("--"))
    answers = {"is-enabled": "enabled", "is-active": "active"}
    if verb in answers:
        print(answers[verb])
    elif verb == "status":
        print("● llama-orch.service - llama-orch supervisor\n     Active: active (running)")
elif tool == "nssm":
    if args[0] == "install":
        state.write_text("installed")
    elif args[0] == "remove":
        state.unlink(missing_ok=True)
    elif args[0] == "status":
        if not installed:
            print("Can't open service!", file=sys.stderr)
            sys.exit(3)
        print("SERVICE_RUNNING")
elif tool == "schtasks":
    if args[0] == "/Create":
        state.write_text("installed")
    elif args[0] == "/Delete":
        state.unlink(missing_ok=True)
    elif args[0] == "/Query":
        if not installed:
            print("ERROR: The system cannot find the file specified.", file=sys.stderr)
            sys.exit(1)
        print("TaskName: \\llama-orch\nStatus: Running")
