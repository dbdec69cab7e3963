"""Model references, choosing a repo's file(s) for a quant tag, and the catalog file."""

from __future__ import annotations

from pathlib import Path

import pytest

from llama_orchestrator.errors import UserError
from llama_orchestrator.models.catalog import (
    Catalog,
    Entry,
    Ref,
    RemoteFile,
    choose,
    entry_id,
    is_ref,
    models_of,
    parse_ref,
    quant_of,
    resolve_local,
)
from llama_orchestrator.models.gguf import split_of, split_parts

REPO = "Qwen/Qwen2.5-0.5B-Instruct-GGUF"


def files(*names: str) -> list[RemoteFile]:
    return [RemoteFile(n, size=10) for n in names]


@pytest.mark.parametrize(
    ("text", "ref"),
    [
        (REPO, Ref(REPO)),
        (f"{REPO}:Q4_K_M", Ref(REPO, quant="Q4_K_M")),
        (f"hf://{REPO}:q8_0", Ref(REPO, quant="q8_0")),
        (
            f"{REPO}/qwen2.5-0.5b-instruct-q8_0.gguf",
            Ref(REPO, file="qwen2.5-0.5b-instruct-q8_0.gguf"),
        ),
        (f"https://huggingface.co/{REPO}/sub/x-Q4_0.gguf", Ref(REPO, file="sub/x-Q4_0.gguf")),
        ("hf.co/a/b:IQ2_XXS", Ref("a/b", quant="IQ2_XXS")),
    ],
)
def test_references_parse(text: str, ref: Ref) -> None:
    assert parse_ref(text) == ref


@pytest.mark.parametrize(
    "text", ["just-a-name", "a/b/README.md", "/abs/path.gguf", "a/b:", "a/../b/x.gguf", "a/b c"]
)
def test_a_bad_reference_names_the_form(text: str) -> None:
    with pytest.raises(UserError) as exc:
        parse_ref(text)
    assert "OWNER/REPO" in (exc.value.hint or "") or "gguf" in str(exc.value)


def test_only_the_hf_prefix_is_a_reference_in_a_config() -> None:
    assert is_ref("hf://a/b:Q4_K_M")
    assert not is_ref("models/b.gguf") and not is_ref("a/b:Q4_K_M")


@pytest.mark.parametrize(
    ("name", "quant"),
    [
        ("qwen2.5-0.5b-instruct-q4_k_m.gguf", "Q4_K_M"),
        ("Llama-3.2-1B-Instruct-Q8_0.gguf", "Q8_0"),
        ("gemma-3-270m-it-UD-IQ2_XXS.gguf", "UD-IQ2_XXS"),
        ("model.F16.gguf", "F16"),
        ("big-Q5_K_S-00002-of-00003.gguf", "Q5_K_S"),
        ("sub/dir/x-bf16.gguf", "BF16"),
        ("gpt-oss-20b-MXFP4.gguf", "MXFP4"),
        ("tinyllama.gguf", None),
        ("q4-notes.gguf", None),
    ],
)
def test_quant_tags_are_read_from_file_names(name: str, quant: str | None) -> None:
    assert quant_of(name) == quant


def test_split_files_are_grouped_under_their_first_part() -> None:
    listing = files(
        "README.md",
        "m-Q8_0-00002-of-00003.gguf",
        "m-Q8_0-00001-of-00003.gguf",
        "m-Q8_0-00003-of-00003.gguf",
        "m-Q4_K_M.gguf",
    )
    models = models_of(listing)
    assert [[f.name for f in m.files] for m in models] == [
        ["m-Q4_K_M.gguf"],
        ["m-Q8_0-00001-of-00003.gguf", "m-Q8_0-00002-of-00003.gguf", "m-Q8_0-00003-of-00003.gguf"],
    ]
    assert models[1].size == 30 and models[1].quant == "Q8_0"
    # naming any part of a split model takes all of it
    got = choose(Ref("o/r", file="m-Q8_0-00002-of-00003.gguf"), listing)
    assert len(got.files) == 3


def test_split_names_and_their_parts(tmp_path: Path) -> None:
    assert split_of("x-00001-of-00003.gguf") == ("x", 1, 3)
    assert split_of("x-00004-of-00003.gguf") is None and split_of("x.gguf") is None
    first = tmp_path / "x-00001-of-00002.gguf"
    assert split_parts(first) == [first, tmp_path / "x-00002-of-00002.gguf"]
    assert split_parts(tmp_path / "x-00002-of-00002.gguf") == [tmp_path / "x-00002-of-00002.gguf"]


def test_a_quant_tag_picks_its_file_case_blind() -> None:
    listing = files("a-Q4_K_M.gguf", "a-Q8_0.gguf", "mmproj-a-f16.gguf")
    assert choose(Ref("o/r", quant="q8_0"), listing).first.name == "a-Q8_0.gguf"


def test_an_absent_quant_lists_the_tags_the_repo_has() -> None:
    with pytest.raises(UserError) as exc:
        choose(Ref("o/r", quant="Q2_K"), files("a-Q4_K_M.gguf", "a-Q8_0.gguf"))
    assert "has no Q2_K model" in str(exc.value) and "Q4_K_M, Q8_0" in str(exc.value)


def test_an_ambiguous_quant_lists_the_matches_and_how_to_name_one() -> None:
    listing = files("base-Q4_K_M.gguf", "instruct-Q4_K_M.gguf")
    with pytest.raises(UserError) as exc:
        choose(Ref("o/r", quant="Q4_K_M"), listing)
    assert "matches 2 models" in str(exc.value)
    assert "base-Q4_K_M.gguf" in str(exc.value) and "instruct-Q4_K_M.gguf" in str(exc.value)
    assert "o/r/base-Q4_K_M.gguf" in (exc.value.hint or "")


def test_no_tag_takes_the_only_model_else_q4_k_m_else_asks() -> None:
    assert choose(Ref("o/r"), files("only.gguf", "mmproj-x.gguf")).first.name == "only.gguf"
    assert choose(Ref("o/r"), files("a-Q8_0.gguf", "a-Q4_K_M.gguf")).first.name == "a-Q4_K_M.gguf"
    with pytest.raises(UserError) as exc:
        choose(Ref("o/r"), files("a-Q8_0.gguf", "a-Q6_K.gguf"))
    assert "2 models" in str(exc.value) and "names none" in str(exc.value)


def test_a_missing_file_lists_what_the_repo_has() -> None:
    with pytest.raises(UserError) as exc:
        choose(Ref("o/r", file="nope.gguf"), files("a-Q8_0.gguf", "README.md"))
    assert "no file nope.gguf" in str(exc.value) and "a-Q8_0.gguf [Q8_0]" in str(exc.value)


def test_ids_use_the_quant_only_when_it_is_unique() -> None:
    one = files("a-Q4_K_M.gguf", "a-Q8_0.gguf")
    assert entry_id("o/r", choose(Ref("o/r", quant="Q8_0"), one), one) == "o/r:Q8_0"
    two = files("base-Q4_K_M.gguf", "instruct-Q4_K_M.gguf")
    got = choose(Ref("o/r", file="base-Q4_K_M.gguf"), two)
    assert entry_id("o/r", got, two) == "o/r/base-Q4_K_M.gguf"
    bare = files("tiny.gguf")
    assert entry_id("o/r", choose(Ref("o/r"), bare), bare) == "o/r/tiny.gguf"


def _entry(tmp_path: Path, quant: str = "Q8_0", name: str = "a-Q8_0.gguf") -> Entry:
    path = tmp_path / "models" / "o" / "r" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF" + b"\0" * 6)
    return Entry(
        id=f"o/r:{quant}",
        repo="o/r",
        revision="c" * 40,
        files=[{"name": name, "size": 10, "sha256": "x"}],
        path=str(path),
        quant=quant,
        verified="sha256",
    )


def test_the_catalog_round_trips_and_finds_by_id_reference_or_prefix(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "state" / "models.json")
    cat.put(_entry(tmp_path))
    cat.save()
    again = Catalog.load(cat.path)
    assert [e.id for e in again.entries] == ["o/r:Q8_0"]
    for key in ("o/r:Q8_0", "O/R:q8_0", "hf://o/r:Q8_0", "o/r/a-Q8_0.gguf", "o/r"):
        assert again.find(key) is not None, key
    assert again.find("o/r:Q4_K_M") is None and again.find("x/y") is None
    assert again.entries[0].complete()
    # the home's catalog resolves an hf:// reference to the file, while it is complete
    assert resolve_local(tmp_path, "hf://o/r:Q8_0") == Path(again.entries[0].path)
    Path(again.entries[0].path).write_bytes(b"GGUF")
    assert resolve_local(tmp_path, "hf://o/r:Q8_0") is None


def test_a_damaged_catalog_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "models.json"
    path.write_text("{not json")
    with pytest.raises(UserError) as exc:
        Catalog.load(path)
    assert "cannot be read" in str(exc.value) and "records them again" in (exc.value.hint or "")
