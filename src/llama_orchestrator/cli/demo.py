"""`llama-orch demo`: the `docker run hello-world` of llama-orch."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Optional

import typer

from llama_orchestrator.cli.context import err, out
from llama_orchestrator.cli.inspect import ps_table
from llama_orchestrator.config.create import create_instance
from llama_orchestrator.engine.lifecycle import Engine
from llama_orchestrator.engine.status import collect
from llama_orchestrator.errors import UserError
from llama_orchestrator.gguf_meta import is_gguf
from llama_orchestrator.home import Home

__all__ = ["demo", "run_demo"]

NAMES = ("demo-a", "demo-b")


def run_demo(root: Path, model: Path | None) -> None:
    """The demo in home `root`; stops everything it started, whatever happens."""
    import httpx  # only the demo needs a general HTTP client

    home = Home(root)
    engine = Engine(home)
    t0 = time.monotonic()
    try:
        if model is None:
            from llama_orchestrator.tinymodel import write_tiny_model

            model = write_tiny_model(root / "models" / "tiny-llama.gguf")
            out.print(f"1. Wrote a tiny test model ({model.stat().st_size // 1024} KiB): {model}")
            prompt, ctx = "Hello", 512
        else:
            out.print(f"1. Using your model: {model}")
            prompt, ctx = "The capital of France is", 2048
        for name in NAMES:
            path = create_instance(home, name, model=str(model), ctx=ctx, parallel=2).path
            out.print(
                f"2. llama-orch init {name} --model … → {path.relative_to(root)}", markup=False
            )
        out.print("3. llama-orch up demo-a demo-b")
        with err.status("   waiting for both to answer /health …"):
            results = engine.up(list(NAMES), timeout=180)
        for r in results:
            out.print(f"   [green]✔[/] {r.name} healthy on port {r.port} (pid {r.pid})")
        out.print("4. One completion from each:")
        with httpx.Client(trust_env=False, timeout=60) as client:
            for r in results:
                t = time.monotonic()
                resp = client.post(
                    f"http://127.0.0.1:{r.port}/completion",
                    json={"prompt": prompt, "n_predict": 16, "temperature": 0},
                )
                resp.raise_for_status()
                text = resp.json().get("content", "")
                out.print(
                    f"   {r.name}: {prompt!r} → {text!r} ({time.monotonic() - t:.2f}s)",
                    markup=False,
                )
        out.print("5. llama-orch ps")
        out.print(ps_table(collect(engine)), markup=False, highlight=False)
    finally:
        stopped = engine.down(engine.known_names())
        engine.close()
        if stopped:
            out.print(f"6. llama-orch down --all → stopped {', '.join(stopped)}")
    out.print(f"\nDone in {time.monotonic() - t0:.1f}s; nothing is left running.")


NEXT_STEPS = """
Now with your own model, in a folder of your choice:
  llama-orch init my-model --model /path/to/model.gguf     # add --backend cuda --gpu 0 for a GPU
  llama-orch up my-model
  llama-orch ps
  curl http://127.0.0.1:8001/v1/chat/completions -d '{"messages":[{"role":"user","content":"Hi"}]}'
  llama-orch down my-model"""


def demo(
    model: Optional[Path] = typer.Option(
        None, "--model", help="Use this GGUF model instead of a tiny test one."
    ),
) -> None:
    """Try llama-orch in a throwaway home: two instances up, a completion each, then down."""
    if model is not None and not is_gguf(model):
        raise UserError(f"{model} is not a GGUF model file.", hint="Pass the path of a .gguf file.")
    with tempfile.TemporaryDirectory(prefix="llama-orch-demo-") as tmp:
        run_demo(Path(tmp), model.resolve() if model else None)
    out.print(NEXT_STEPS, markup=False)
