"""GPU lease round trip: a plan's script task takes the card of an idle
instance (`yield_to_scripts`), and gives it back.

Measured from the daemon's own records, per round:
  - grant: from the script task ready (the run created) to the script's first
    line (it prints its clock): the instance drained and stopped, the script spawned;
  - restore: from the script's end (the lease released) to the instance
    healthy again;
against the instance's own load time in the same run (its `starting` to
`healthy` at `up`). Target (issue 15): restore <= load + 0.3 s.

The card is a fake nvidia-smi reporting one 6 GB card; llama-server is the
real one (a CPU build runs on the CPU whatever CUDA_VISIBLE_DEVICES says).

    python bench/leases.py [--rounds 5] [--model PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import free_port, model_and_binary, write_instance  # noqa: E402

from llama_orchestrator.store.database import Store  # noqa: E402

CARD = "0, NVIDIA GeForce GTX 1060 6GB, GPU-0, 6144, 0, 6144, 0, 35, 20.00\n"
SCRIPT = "import time; print(time.time(), flush=True)"


def fake_gpu(folder: Path) -> dict[str, str]:
    """PATH with a nvidia-smi that reports one card."""
    folder.mkdir()
    (folder / "card.csv").write_text(CARD)
    smi = folder / "nvidia-smi"
    smi.write_text(
        f"#!{sys.executable}\nimport sys\nsys.stdout.write(open({str(folder / 'card.csv')!r}).read())\n"
    )
    smi.chmod(0o755)
    return {"PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}


def cli(home: Path, env: dict[str, str], *args: str) -> str:
    r = subprocess.run(
        [sys.executable, "-m", "llama_orchestrator", "--home", str(home), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    if r.returncode != 0:
        raise RuntimeError(f"llama-orch {' '.join(args)}: {r.stderr}")
    return r.stdout


def events(home: Path, kind: str) -> list:
    store = Store.open(home / "state" / "state.sqlite")
    try:
        return [e for e in store.events() if e.kind == kind]
    finally:
        store.close()


def one_round(home: Path, env: dict[str, str], plan: Path) -> tuple[float, float]:
    run_id = cli(home, env, "plan", "run", str(plan), "--wait").split()[0]
    run = json.loads(cli(home, env, "plan", "status", run_id, "--json"))
    created = json.loads((home / "plans" / run_id / "run.jsonl").read_text().splitlines()[0])["ts"]
    began = float((home / "plans" / run_id / "t.out").read_text().split()[0])
    assert run["state"] == "completed", run
    released = events(home, "lease_released")[-1].ts
    deadline = time.monotonic() + 60
    while True:
        healthy = [e.ts for e in events(home, "healthy") if e.instance == "big" and e.ts > released]
        if healthy:
            return began - created, healthy[0] - released
        if time.monotonic() > deadline:
            raise RuntimeError("the instance did not come back")
        time.sleep(0.05)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--model")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-leases-"))
    home = tmp / "home"
    env = fake_gpu(tmp / "gpu")
    try:
        model, _ = model_and_binary(tmp, args.model)
        write_instance(home, "big", model, free_port(), gpu={"backend": "cuda", "device_id": 0})
        cfg_path = home / "instances" / "big" / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.update(yield_to_scripts=True, healthcheck={"interval": 1})
        cfg_path.write_text(json.dumps(cfg))
        (home / "llama-orch.json").write_text(json.dumps({"router": {"port": free_port()}}))
        cli(home, env, "up", "big")
        load = events(home, "healthy")[-1].ts - events(home, "starting")[-1].ts
        plan = tmp / "plan.json"
        task = {"id": "t", "kind": "script", "gpus": 1, "command": [sys.executable, "-c", SCRIPT]}
        plan.write_text(json.dumps({"tasks": [task]}))
        grants, restores = [], []
        for _ in range(args.rounds):
            grant, restore = one_round(home, env, plan)
            grants.append(grant)
            restores.append(restore)
        g, r = statistics.median(grants), statistics.median(restores)
        print(f"instance load (starting -> healthy at up): {load * 1000:7.0f} ms")
        print(
            f"grant (task ready -> script running):      {g * 1000:7.0f} ms (median of {args.rounds})"
        )
        print(
            f"restore (lease released -> healthy):       {r * 1000:7.0f} ms (median of {args.rounds})"
        )
        print(f"restore - load: {(r - load) * 1000:+.0f} ms (target <= +300 ms)")
    finally:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "llama_orchestrator",
                "--home",
                str(home),
                "daemon",
                "stop",
                "--all",
            ],
            capture_output=True,
            env={**os.environ, **env},
        )
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
