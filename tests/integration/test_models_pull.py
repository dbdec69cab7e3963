"""`models pull | list | rm` and `init --model hf://...` through the real
`huggingface_hub` client, against a local stand-in of the hub
(`HF_ENDPOINT`, tests/fakes/fake_hub.py), with generated GGUF files and the
real llama-server loading what was pulled."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import constants

from llama_orchestrator.models.tiny import write_tiny_model
from tests.fakes.fake_hub import FakeHub, Repo
from tests.helpers import run_cli, wait_until, write_config

pytestmark = pytest.mark.integration

REPO = "tiny/Tiny-GGUF"
TOKEN = "hf_testtoken_9f8e7d6c5b4a"
#: huggingface_hub writes a download in chunks of this size (10 MiB): what a
#: broken transfer keeps is whole chunks, so the resume tests use a bigger file
CHUNK = constants.DOWNLOAD_CHUNK_SIZE
BIG = "big-Q4_K_M.gguf"


@pytest.fixture(scope="session")
def repo_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """A repo as GGUF uploaders lay one out: two quants, a split model in 3
    parts and a README kept in git."""
    d = tmp_path_factory.mktemp("repo")
    files = {
        "tiny-Q4_K_M.gguf": write_tiny_model(d / "tiny-Q4_K_M.gguf").read_bytes(),
        "tiny-Q8_0.gguf": write_tiny_model(d / "tiny-Q8_0.gguf", seed=1).read_bytes(),
        "README.md": b"# tiny\n",
    }
    first = write_tiny_model(d / "split" / "tiny-F32.gguf", seed=2, split=3)
    for part in sorted(first.parent.iterdir()):
        files[part.name] = part.read_bytes()
    return files


@pytest.fixture(scope="session")
def big_file() -> bytes:
    """Not a model to load: a GGUF header and a chunk and a half of noise."""
    return b"GGUF" + os.urandom(CHUNK + CHUNK // 2)


@pytest.fixture()
def hub(repo_files: dict[str, bytes], big_file: bytes) -> Iterator[FakeHub]:
    with FakeHub() as h:
        h.repos[REPO] = Repo(dict(repo_files), in_git={"README.md"})
        h.repos["tiny/Big-GGUF"] = Repo({BIG: big_file})
        h.repos["tiny/Two-GGUF"] = Repo(
            {
                "base-Q4_K_M.gguf": repo_files["tiny-Q4_K_M.gguf"],
                "chat-Q4_K_M.gguf": repo_files["tiny-Q8_0.gguf"],
            }
        )
        yield h


def cli(home, hub: FakeHub, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return run_cli(home, *args, env={"HF_ENDPOINT": hub.url, **env})


def listed(home, hub: FakeHub, **env: str) -> dict[str, dict]:
    r = cli(home, hub, "models", "list", "--json", **env)
    assert r.returncode == 0, r.stderr
    return {row["id"] or row["path"]: row for row in json.loads(r.stdout)}


def every_file_text(root: Path) -> str:
    return "".join(p.read_bytes().decode("latin-1") for p in root.rglob("*") if p.is_file())


def test_pull_by_quant_tag_verifies_and_records(home, hub, repo_files):
    r = cli(home, hub, "models", "pull", f"{REPO}:q8_0")
    assert r.returncode == 0, r.stderr
    assert f"{REPO}:Q8_0" in r.stdout and "sha256 verified" in r.stdout
    path = home.root / "models" / REPO / "tiny-Q8_0.gguf"
    assert path.read_bytes() == repo_files["tiny-Q8_0.gguf"]
    assert not list(path.parent.glob("*.part"))
    row = listed(home, hub)[f"{REPO}:Q8_0"]
    assert row["verified"] is True and row["verified_by"] == "sha256"
    assert row["path"] == str(path) and row["location"] == "models" and row["complete"]
    assert row["architecture"] == "llama" and row["instances"] == []
    # by the same commit the listing gave
    gets = hub.gets("tiny-Q8_0.gguf")
    assert len(gets) == 1 and "/resolve/main/" not in gets[0].path

    again = cli(home, hub, "models", "pull", f"hf://{REPO}:Q8_0")
    assert again.returncode == 0 and "already pulled and up to date" in again.stderr
    assert len(hub.gets("tiny-Q8_0.gguf")) == 1  # nothing fetched twice


def test_pull_by_file_name_and_a_file_kept_in_git_is_checked_by_its_blob_id(home, hub, repo_files):
    hub.repos[REPO].in_git.add("tiny-Q4_K_M.gguf")  # listed with its git blob id only
    r = cli(home, hub, "models", "pull", f"{REPO}/tiny-Q4_K_M.gguf", "--json")
    assert r.returncode == 0, r.stderr
    entry = json.loads(r.stdout)
    assert entry["id"] == f"{REPO}:Q4_K_M" and entry["verified"] == "git-sha1"
    assert Path(entry["path"]).read_bytes() == repo_files["tiny-Q4_K_M.gguf"]


def test_a_bare_repo_takes_q4_k_m_and_an_ambiguous_tag_lists_the_candidates(home, hub):
    r = cli(home, hub, "models", "pull", REPO)
    assert r.returncode == 0, r.stderr
    assert f"{REPO}:Q4_K_M" in r.stdout

    r = cli(home, hub, "models", "pull", "tiny/Two-GGUF:Q4_K_M")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "matches 2 models" in r.stderr
    assert "base-Q4_K_M.gguf" in r.stderr and "chat-Q4_K_M.gguf" in r.stderr
    assert "tiny/Two-GGUF/base-Q4_K_M.gguf" in r.stderr  # how to name one

    r = cli(home, hub, "models", "pull", f"{REPO}:Q2_K")
    assert r.returncode == 2 and "has no Q2_K model" in r.stderr and "Q4_K_M, Q8_0" in r.stderr
    r = cli(home, hub, "models", "pull", "tiny/Missing")
    assert r.returncode == 2 and "has no repo tiny/Missing" in r.stderr
    assert not (home.root / "models" / "tiny" / "Two-GGUF").exists()


def test_a_split_model_pulls_every_part_and_reads_as_one(home, hub, repo_files):
    r = cli(home, hub, "models", "pull", f"{REPO}:F32")
    assert r.returncode == 0, r.stderr
    assert "3 parts" in r.stdout
    folder = home.root / "models" / REPO
    parts = sorted(p.name for p in folder.glob("tiny-F32-*.gguf"))
    assert parts == [f"tiny-F32-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    for name in parts:
        assert (folder / name).read_bytes() == repo_files[name]
    row = listed(home, hub)[f"{REPO}:F32"]
    assert row["parts"] == 3 and row["size_bytes"] == sum(len(repo_files[n]) for n in parts)
    # the metadata covers all three parts: the whole model's parameters (35168 in
    # the tiny shape; part 1 alone holds fewer) and the size of every part
    info = json.loads(cli(home, hub, "models", "inspect", f"{REPO}:F32", "--json").stdout)
    assert info["parameters"] == 35168 and info["size_bytes"] == row["size_bytes"]


def test_a_checksum_mismatch_is_refused_and_nothing_is_kept(home, hub):
    hub.corrupt.add("tiny-Q8_0.gguf")
    r = cli(home, hub, "models", "pull", f"{REPO}:Q8_0")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "failed its checksum" in r.stderr and "nothing was recorded" in r.stderr
    folder = home.root / "models" / REPO
    assert not folder.exists() or not any(folder.iterdir())
    assert listed(home, hub) == {}


def test_a_cut_download_resumes_with_a_range_request_in_the_same_pull(home, hub, big_file):
    hub.cut_after[BIG] = CHUNK + 1000
    r = cli(home, hub, "models", "pull", "tiny/Big-GGUF")
    assert r.returncode == 0, r.stderr
    gets = hub.gets(BIG)
    assert len(gets) == 2 and "Range" not in gets[0].headers
    assert gets[1].headers["Range"] == f"bytes={CHUNK}-"
    assert (home.root / "models" / "tiny" / "Big-GGUF" / BIG).read_bytes() == big_file


def test_a_failed_pull_keeps_its_part_and_the_next_pull_resumes_it(home, hub, big_file):
    hub.cut_after[BIG] = CHUNK + 1000
    hub.refuse_after_cut = True  # the hub goes down after the cut
    r = cli(home, hub, "models", "pull", "tiny/Big-GGUF")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "HTTP 500" in r.stderr and "partial download is kept" in r.stderr
    folder = home.root / "models" / "tiny" / "Big-GGUF"
    parts = list(folder.glob(f"{BIG}.*.part"))
    assert len(parts) == 1 and parts[0].stat().st_size == CHUNK
    assert listed(home, hub) == {}  # nothing recorded for a partial file

    hub.refusing.clear()
    r = cli(home, hub, "models", "pull", "tiny/Big-GGUF")
    assert r.returncode == 0, r.stderr
    assert "resumed: 10 MiB were here" in r.stderr
    assert hub.gets(BIG)[-1].headers["Range"] == f"bytes={CHUNK}-"
    assert (folder / BIG).read_bytes() == big_file
    assert not parts[0].exists()


def test_ctrl_c_keeps_a_resumable_partial_file_and_says_so(home, hub, big_file):
    hub.stall_after[BIG] = CHUNK + 1000
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_orchestrator", "--home", str(home.root)]
        + ["models", "pull", "tiny/Big-GGUF"],
        env={**os.environ, "HF_ENDPOINT": hub.url},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    folder = home.root / "models" / "tiny" / "Big-GGUF"

    def stalled() -> bool:
        return any(p.stat().st_size == CHUNK for p in folder.glob("*.part"))

    try:
        wait_until(stalled, timeout=30)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
        hub.release.set()
    assert proc.returncode == 130 and "Traceback" not in stderr
    assert f"partial download of {BIG} (10 MiB of 15 MiB) is kept" in stderr
    assert "llama-orch models pull tiny/Big-GGUF` resumes it" in stderr
    r = cli(home, hub, "models", "pull", "tiny/Big-GGUF")
    assert r.returncode == 0, r.stderr
    assert hub.gets(BIG)[-1].headers["Range"] == f"bytes={CHUNK}-"
    assert (folder / BIG).read_bytes() == big_file


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (needs root, as in CI; skipped elsewhere)."""
    mount = tmp_path / "small"
    mount.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_model_bigger_than_the_free_space_is_refused_before_downloading(home, hub, small_disk):
    home.settings_path.write_text(json.dumps({"models": {"dir": str(small_disk)}}))
    r = cli(home, hub, "models", "pull", "tiny/Big-GGUF")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"Not enough disk space in {small_disk}" in r.stderr and "15 MiB more" in r.stderr
    assert hub.gets(BIG) == [] and list(small_disk.rglob("*")) == []


def test_offline_serves_what_is_pulled_and_refuses_the_rest_in_one_sentence(home, hub):
    assert cli(home, hub, "models", "pull", f"{REPO}:Q8_0").returncode == 0
    before = len(hub.requests)
    r = cli(home, hub, "models", "pull", f"{REPO}:Q8_0", HF_HUB_OFFLINE="1")
    assert r.returncode == 0 and "offline: already pulled" in r.stderr
    r = cli(home, hub, "models", "pull", f"{REPO}:Q4_K_M", HF_HUB_OFFLINE="1")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") <= 2 and "Offline (HF_HUB_OFFLINE is set)" in r.stderr
    assert len(hub.requests) == before  # offline means no request at all
    # no network: the hub's address answers nothing
    dead = {"HF_ENDPOINT": "http://127.0.0.1:9"}
    r = run_cli(home, "models", "pull", f"{REPO}:Q8_0", env=dead)
    assert r.returncode == 0 and "Using the copy pulled on" in r.stderr
    r = run_cli(home, "models", "pull", f"{REPO}:Q4_K_M", env=dead)
    assert r.returncode == 1 and "Cannot reach http://127.0.0.1:9" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_private_repo_uses_hf_token_and_never_shows_or_stores_it(home, hub):
    hub.repos["me/Private-GGUF"] = Repo(
        {"p-Q4_K_M.gguf": hub.repos[REPO].files["tiny-Q4_K_M.gguf"]}, token=TOKEN
    )
    r = cli(home, hub, "models", "pull", "me/Private-GGUF")
    assert r.returncode == 2 and "or it is private" in r.stderr and "HF_TOKEN" in r.stderr
    r = cli(home, hub, "models", "pull", "me/Private-GGUF", "--json", HF_TOKEN=TOKEN)
    assert r.returncode == 0, r.stderr
    assert hub.gets("p-Q4_K_M.gguf")[-1].headers["Authorization"] == f"Bearer {TOKEN}"
    assert TOKEN not in r.stdout + r.stderr
    assert TOKEN not in every_file_text(home.root)

    hub.repos["org/Gated-GGUF"] = Repo(
        {"g-Q4_K_M.gguf": hub.repos[REPO].files["tiny-Q4_K_M.gguf"]}, token=TOKEN, gated=True
    )
    r = cli(home, hub, "models", "pull", "org/Gated-GGUF")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "org/Gated-GGUF is gated" in r.stderr and f"{hub.url}/org/Gated-GGUF" in r.stderr
    assert cli(home, hub, "models", "pull", "org/Gated-GGUF", HF_TOKEN=TOKEN).returncode == 0


def test_models_in_the_shared_hugging_face_cache_are_listed_and_not_fetched_twice(
    home, hub, tmp_path
):
    from huggingface_hub import hf_hub_download

    cache = tmp_path / "hf-cache"
    # another tool downloaded this one, into the real cache layout
    got = hf_hub_download(REPO, "tiny-Q8_0.gguf", cache_dir=cache, endpoint=hub.url)
    assert "models--tiny--Tiny-GGUF" in got
    before = len(hub.requests)
    rows = listed(home, hub, HF_HUB_CACHE=str(cache))
    assert len(hub.requests) == before  # listing pulls nothing
    row = rows[str(Path(got))]
    assert row["location"] == "hf-cache" and row["repo"] == REPO and row["quant"] == "Q8_0"
    assert row["id"] is None and row["architecture"] == "llama"

    r = cli(home, hub, "models", "pull", f"{REPO}:Q8_0", HF_HUB_CACHE=str(cache))
    assert r.returncode == 0, r.stderr
    assert "found in the Hugging Face cache; nothing downloaded" in r.stderr
    assert len(hub.gets("tiny-Q8_0.gguf")) == 1  # the other tool's one download
    assert listed(home, hub, HF_HUB_CACHE=str(cache))[f"{REPO}:Q8_0"]["verified"] is True


def test_pull_into_the_shared_cache_with_cache(home, hub, tmp_path):
    cache = tmp_path / "hf-cache"
    r = cli(home, hub, "models", "pull", f"{REPO}:F32", "--cache", HF_HUB_CACHE=str(cache))
    assert r.returncode == 0, r.stderr
    row = listed(home, hub, HF_HUB_CACHE=str(cache))[f"{REPO}:F32"]
    assert row["location"] == "hf-cache" and row["parts"] == 3 and row["verified"]
    assert row["path"].startswith(str(cache / "models--tiny--Tiny-GGUF" / "snapshots"))
    assert not (home.root / "models").exists()
    r = cli(home, hub, "models", "rm", f"{REPO}:F32", HF_HUB_CACHE=str(cache))
    assert r.returncode == 0 and "stay in the shared Hugging Face cache" in r.stderr
    assert Path(row["path"]).exists()


def test_init_from_a_reference_pulls_and_the_instance_runs_on_it(home, hub, server_bin):
    try:
        r = cli(home, hub, "init", "t", "--model", f"hf://{REPO}:Q8_0", "--ctx", "512")
        assert r.returncode == 0, r.stderr
        assert f"model {REPO}:Q8_0: pulled now" in r.stdout
        cfg = json.loads(home.config_path("t").read_text())
        assert cfg["model"]["path"] == str(home.root / "models" / REPO / "tiny-Q8_0.gguf")

        # a config may name a reference itself: refused until pulled, with the command
        write_config(home, "s", f"hf://{REPO}:F32")
        r = cli(home, hub, "up", "s")
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert f"run `llama-orch models pull {REPO}:F32`" in r.stderr
        assert hub.gets("tiny-F32-00001-of-00003.gguf") == []  # no silent download at start
        assert cli(home, hub, "models", "pull", f"{REPO}:F32").returncode == 0

        r = cli(home, hub, "up", "t", "s")
        assert r.returncode == 0, r.stderr
        rows = {x["name"]: x for x in json.loads(run_cli(home, "ps", "--json").stdout)}
        assert rows["t"]["state"] == rows["s"]["state"] == "healthy"  # the split one too
        assert rows["s"]["model_path"].endswith("tiny-F32-00001-of-00003.gguf")

        models = listed(home, hub)
        assert models[f"{REPO}:Q8_0"]["instances"] == ["t"]
        assert models[f"{REPO}:F32"]["instances"] == ["s"]
        r = cli(home, hub, "models", "rm", f"{REPO}:Q8_0")
        assert r.returncode == 2 and "used by instance t" in r.stderr
        assert (home.root / "models" / REPO / "tiny-Q8_0.gguf").exists()
    finally:
        run_cli(home, "down", "--all", "--timeout", "5")
    assert run_cli(home, "rm", "t").returncode == 0
    r = cli(home, hub, "models", "rm", f"{REPO}:Q8_0")
    assert r.returncode == 0 and "removed" in r.stdout
    assert not (home.root / "models" / REPO / "tiny-Q8_0.gguf").exists()
    assert f"{REPO}:Q8_0" not in listed(home, hub)
