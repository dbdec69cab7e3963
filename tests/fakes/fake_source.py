"""A deterministic DataSource for Pilot and snapshot tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llama_orchestrator.gpus.alerts import GpuStatus
from llama_orchestrator.gpus.discover import GpuInfo
from llama_orchestrator.home import Home
from llama_orchestrator.tui.data import InstanceView, Snapshot


def status(
    name: str, state: str, port: int, pid: int | None = None, **extra: Any
) -> dict[str, Any]:
    base = {
        "name": name,
        "state": state,
        "desired": "running" if pid else "stopped",
        "pid": pid,
        "host": "127.0.0.1",
        "port": port,
        "alias": name,
        "model_path": f"/models/{name}.gguf",
        "backend": "cuda",
        "gpu_devices": [0],
        "restarts": 0,
        "started_at": None,
        "uptime_s": 125.0 if pid else None,
        "exit_code": None,
        "last_exit": None,
        "supervised": False,
        "next_restart_at": None,
        "config_error": None,
    }
    return {**base, **extra}


def task(tid: str, state: str, kind: str = "llm", **extra: Any) -> dict[str, Any]:
    base = {
        "id": tid,
        "kind": kind,
        "model": "tiny",
        "tags": None,
        "state": state,
        "attempts": 1 if state != "pending" else 0,
        "instance": "gpt-oss" if kind == "llm" and state != "pending" else None,
        "elapsed_s": 1.5 if state != "pending" else None,
        "error": None,
        "prompt_tokens": None,
        "completion_tokens": None,
    }
    return {**base, **extra}


def plan_run(rid: str, name: str, state: str, tasks: list[dict[str, Any]]) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for t in tasks:
        counts[t["state"]] = counts.get(t["state"], 0) + 1
    return {
        "id": rid,
        "name": name,
        "state": state,
        "created_at": "2026-11-22T06:00:00+00:00",
        "finished_at": None,
        "elapsed_s": 12.0,
        "source": "plan.json",
        "tasks_total": len(tasks),
        "tasks_done": counts.get("completed", 0),
        "counts": counts,
        "tasks": tasks,
    }


class FakeSource:
    def __init__(self, log_root: Path, n: int = 3) -> None:
        self.home = Home(Path("/srv/llama-orch"))  # what the header shows: fixed for snapshots
        self.log_root = log_root
        self.calls: list[tuple[str, str]] = []
        self.fail: str | None = None
        self.unreached: dict[str, str] = {}
        names = ["gpt-oss", "qwen-7b", "llama-8b"] + [
            f"worker-{i:02d}" for i in range(max(0, n - 3))
        ]
        self.instances = [
            InstanceView(
                status(names[0], "healthy", 8001, 4242, gpu_devices=[0, 3], restarts=1),
                cpu_pct=12.0,
                rss_mib=812.0,
                active=2,
                tokens_per_s=41.5,
            ),
            InstanceView(
                status(names[1], "starting", 8002, 4243, gpu_devices=[1]),
                cpu_pct=99.0,
                rss_mib=2048.0,
            ),
            InstanceView(status(names[2], "exited", 8003, None, exit_code=139, gpu_devices=[2])),
        ][:n] + [InstanceView(status(nm, "stopped", 8100 + i)) for i, nm in enumerate(names[3:n])]
        self.gpus = GpuStatus(
            [
                GpuInfo(
                    0,
                    "GTX 1060 6GB",
                    "cuda",
                    6144,
                    4012,
                    87,
                    68,
                    102,
                    instances=["gpt-oss"],
                    state="llm_busy",
                ),
                GpuInfo(
                    1,
                    "GTX 1060 6GB",
                    "cuda",
                    6144,
                    2100,
                    3,
                    90,
                    60,
                    instances=["qwen-7b"],
                    state="script_busy",
                    lease={"task": "asr", "plan": "5f1c2a9e", "since": "2026-12-01T06:30:15+00:00"},
                ),
            ],
            ["GPU 1 (GTX 1060 6GB) is at 90 °C, over the 85 °C threshold (used by qwen-7b)"],
            "nvidia-smi",
        )
        self.plans = [
            plan_run(
                "20261122-0601-b2",
                "nightly",
                "failed",
                [
                    task("fetch", "completed", "shell"),
                    task("summarise", "failed", error="HTTP 500 from gpt-oss"),
                    task("publish", "skipped", "shell"),
                ],
            ),
            plan_run("20261122-0600-a1", "diamond", "completed", [task("root", "completed")]),
        ]
        self.outputs = {("20261122-0601-b2", "fetch"): ("fetched 3 files\n", "a warning\n")}
        logs = log_root
        for v in self.instances:
            d = logs / v.name
            d.mkdir(parents=True, exist_ok=True)
            (d / "stderr.log").write_text("".join(f"{v.name} stderr line {i}\n" for i in range(5)))
            (d / "stdout.log").write_text(f"{v.name} stdout line\n")

    def snapshot(self, with_gpus: bool) -> Snapshot:
        events = [
            {
                "id": 1,
                "ts": "2026-11-22T06:00:00+00:00",
                "instance": "gpt-oss",
                "kind": "healthy",
                "message": "answered /health with 200",
                "data": {},
            }
        ]
        return Snapshot(
            "no daemon: reading state and probing directly",
            list(self.instances),
            events,
            self.gpus if with_gpus else None,
            self.plans,
            unreached=self.unreached,
        )

    def _act(self, verb: str, name: str) -> None:
        self.calls.append((verb, name))
        if self.fail:
            raise RuntimeError(self.fail)
        for v in self.instances:
            if v.name == name:
                v.status["state"] = {"up": "healthy", "down": "stopped", "restart": "healthy"}[verb]

    def up(self, name: str) -> None:
        self._act("up", name)

    def down(self, name: str) -> None:
        self._act("down", name)

    def restart(self, name: str) -> None:
        self._act("restart", name)

    def describe(self, name: str) -> dict[str, Any]:
        v = next(v for v in self.instances if v.name == name)
        return {
            **v.status,
            "config": {"model": {"context_size": 4096}, "server": {"parallel": 4}},
            "model": {
                "architecture": "llama",
                "file_type": "Q4_K_M",
                "estimate_gpu_bytes": 5 << 30,
            },
        }

    def log_paths(self, name: str) -> dict[str, Path]:
        return {s: self.log_root / name / f"{s}.log" for s in ("stdout", "stderr")}

    def task_output(self, run_id: str, task_id: str) -> tuple[str | None, str | None]:
        self.calls.append(("output", f"{run_id}/{task_id}"))
        return self.outputs.get((run_id, task_id), (None, None))

    def cancel_plan(self, run_id: str) -> str:
        self.calls.append(("cancel_plan", run_id))
        if self.fail:
            raise RuntimeError(self.fail)
        return f"Cancelled plan run {run_id}."

    def retry_plan(self, run_id: str) -> str:
        self.calls.append(("retry_plan", run_id))
        if self.fail:
            raise RuntimeError(self.fail)
        for run in self.plans:
            if run["id"] == run_id:
                run["state"] = "running"
                for t in run["tasks"]:
                    if t["state"] in ("failed", "skipped"):
                        t["state"] = "pending"
        return f"Plan run {run_id}: queued again."
