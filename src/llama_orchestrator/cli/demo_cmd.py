"""`llama-orch demo`: the `docker run hello-world` of llama-orch.

In a throwaway home it shows the product as a user meets it: the daemon
starts, two replicas of one alias come up behind the router, a request goes
through the router in the OpenAI wire format, one server is killed with
SIGKILL and the daemon brings it back, and everything stops again. Every
step is the call the CLI command makes (`control`, `collect`, `stop`).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import typer

from llama_orchestrator.cli.context import app_context, err, out
from llama_orchestrator.cli.inspect_cmd import ps_table
from llama_orchestrator.engine.health import http_request
from llama_orchestrator.engine.lifecycle import Engine
from llama_orchestrator.engine.status import collect
from llama_orchestrator.engine.unsupervised import Unsupervised
from llama_orchestrator.errors import OrchError, UserError
from llama_orchestrator.home import Home
from llama_orchestrator.models.gguf import is_gguf, read_model

__all__ = ["demo", "run_demo"]

NAMES = ("demo-a", "demo-b")
ALIAS = "demo"
RESTART_TIMEOUT = 60.0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _step(text: str) -> None:
    out.print(text, markup=False, highlight=False)


def _ask(port: int, method: str, path: str, body: bytes = b"") -> Any:
    """The router's JSON answer (the CLI's one HTTP client, the standard library's)."""
    status, text = http_request("127.0.0.1", port, method, path, 60, body)
    if status != 200:
        raise UserError(
            f"The demo's router answered {method} {path} with HTTP {status}: {text[:200]}"
        )
    return json.loads(text)


def run_demo(root: Path, model: Path | None) -> None:
    """The demo in home `root`; stops everything it started, whatever happens."""
    import psutil

    from llama_orchestrator.config.create import create_instance
    from llama_orchestrator.daemon import control
    from llama_orchestrator.daemon.main import stop

    home = Home(root)
    (root / "instances").mkdir(parents=True, exist_ok=True)
    router_port = _free_port()  # not 8080: the user's own daemon may hold it
    home.settings_path.write_text(json.dumps({"router": {"port": router_port}}))
    router = f"http://127.0.0.1:{router_port}"
    engine = Engine(home)
    t0 = time.monotonic()
    try:
        if model is None:
            from llama_orchestrator.models.tiny import write_tiny_model

            model = write_tiny_model(root / "models" / "tiny-llama.gguf")
            _step(f"1. Wrote a tiny test model ({model.stat().st_size // 1024} KiB): {model}")
            prompt, ctx, chat = "Hello", 512, True
        else:
            _step(f"1. Using your model: {model}")
            prompt, ctx = "The capital of France is", 2048
            chat = read_model(model).chat_template
        for name in NAMES:
            # ports the system hands out, not the first free from 8001: another
            # program (or another demo) choosing at the same moment takes those
            create_instance(
                home, name, model=str(model), ctx=ctx, parallel=2, alias=ALIAS, port=_free_port()
            )
        _step(f"2. llama-orch init {NAMES[0]} / {NAMES[1]} --model … --alias {ALIAS}: two replicas")

        def started(info: Any) -> None:
            _step(
                f"3. Started the llama-orch daemon (pid {info.pid}): it supervises what `up` starts"
            )

        ctl = control(engine, True, started)
        with err.status("   llama-orch up: waiting for both to answer /health …"):
            results = ctl.up(list(NAMES), timeout=180)
        for r in results:
            _step(f"   ✔ {r.name} healthy on port {r.port} (pid {r.pid})")
        _step("4. llama-orch ps")
        _step(ps_table(collect(engine)))

        t = time.monotonic()
        if chat:
            path = "/v1/chat/completions"
            body: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}]}
        else:
            path = "/v1/completions"
            body = {"prompt": prompt}
            _step("   (the model has no chat template, so the demo asks for a plain completion)")
        body = {"model": ALIAS, **body, "max_tokens": 16, "temperature": 0}
        answer = _ask(router_port, "POST", path, json.dumps(body).encode())
        choice = answer["choices"][0]
        text = choice["message"]["content"] if chat else choice["text"]
        _step(f"5. POST {router}{path}  model={ALIAS!r}  (the OpenAI wire format)")
        _step(f"   {prompt!r} → {text!r} ({time.monotonic() - t:.2f}s, least busy replica)")
        models = [m["id"] for m in _ask(router_port, "GET", "/v1/models")["data"]]
        _step(f"   GET {router}/v1/models → {models}")

        victim = results[0]
        _step(f"6. kill -9 {victim.pid} ({victim.name}): the daemon sees it die and restarts it")
        seen = engine.store.events(victim.name)[-1].id if engine.store.events(victim.name) else 0
        psutil.Process(victim.pid).kill()
        row = _wait_restarted(engine, victim.name, victim.pid)
        for e in engine.store.events(victim.name):
            if e.id > seen:
                _step(f"   event {e.kind:<8} {e.message}")
        _step(f"   ✔ {victim.name} healthy again: new pid {row.pid}, restarts {row.restarts}")
        _step("7. llama-orch ps")
        _step(ps_table(collect(engine)))
    finally:
        try:
            if stop(home, all_=True) is not None:  # `daemon stop --all`
                _step("8. llama-orch daemon stop --all → the instances and the daemon stopped")
        finally:
            # whatever may still run (a daemon that failed)
            Unsupervised(engine).down(engine.known_names())
            engine.close()
    _step(f"\nDone in {time.monotonic() - t0:.1f}s; nothing is left running.")


def _wait_restarted(engine: Engine, name: str, old_pid: int | None) -> Any:
    """The row once the daemon has it healthy again under a new pid."""
    from llama_orchestrator.states import InstanceState as S

    deadline = time.monotonic() + RESTART_TIMEOUT
    while time.monotonic() < deadline:
        row = engine.store.get(name)
        if row is not None and row.pid != old_pid and row.state == S.HEALTHY:
            return row
        time.sleep(0.05)
    raise OrchError(
        f"The demo's instance '{name}' was not restarted within {RESTART_TIMEOUT:g}s.",
        hint="`llama-orch events` in a home of your own shows what the daemon did.",
    )


NEXT_STEPS = """
Now with your own model, in a folder of your choice:
  mkdir my-llms && cd my-llms && mkdir instances
  llama-orch init my-model --model /path/to/model.gguf     # a GPU: docs/gpu-builds.md
  llama-orch up my-model                                   # starts the daemon and its router
  llama-orch ps
  curl http://127.0.0.1:8080/v1/chat/completions -d '{"model": "my-model", "messages":[{"role":"user","content":"Hi"}], "max_tokens": 64}'
  llama-orch dashboard
  llama-orch down my-model"""


def demo(
    ctx: typer.Context,
    model: Optional[Path] = typer.Option(
        None, "--model", help="Use this GGUF model instead of a tiny test one."
    ),
) -> None:
    """Try llama-orch in a throwaway home: the daemon, two replicas behind the router, a kill -9 and the restart."""
    app_context(ctx).home  # noqa: B018 -- a wrong --home is said, though the demo uses its own
    if model is not None and not is_gguf(model):
        raise UserError(f"{model} is not a GGUF model file.", hint="Pass the path of a .gguf file.")
    with tempfile.TemporaryDirectory(prefix="llama-orch-demo-") as tmp:
        run_demo(Path(tmp), model.resolve() if model else None)
    out.print(NEXT_STEPS, markup=False)
