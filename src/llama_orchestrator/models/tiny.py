"""Write a tiny llama-architecture GGUF model (DESIGN §9).

Used by `llama-orch demo` and the tests: F32 tensors, well under 1 MB, loads
in about a second and answers /completion and /v1/chat/completions. Its
vocabulary is byte tokens only; bytes 0x80-0xFF are marked unused so the
text it generates is valid UTF-8. The weights are seeded noise: it talks
nonsense, quickly and deterministically.
"""

from __future__ import annotations

import shutil
from pathlib import Path

__all__ = ["write_tiny_model"]


_UNKNOWN, _NORMAL, _CONTROL, _UNUSED, _BYTE = 2, 1, 3, 5, 6


def write_tiny_model(
    path: Path,
    *,
    seed: int = 0,
    name: str = "tiny-llama",
    n_layer: int = 2,
    n_embd: int = 32,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 64,
    n_ctx: int = 2048,
    split: int = 1,
    chat_template: str | None = None,
) -> Path:
    """Write the model to `path` (atomically) and return the path. The default
    shape is ~150 KB; others exist for metadata and estimate tests. With
    `split` > 1 the model is written as llama.cpp's split files beside `path`
    (`<stem>-00001-of-0000N.gguf` ...) and the first part's path is returned."""
    import gguf  # imported here: numpy + gguf cost ~0.2 s and most commands never need them
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{b:02X}>".encode() for b in range(256)]
    types = [_UNKNOWN, _CONTROL, _CONTROL] + [_BYTE if b < 0x80 else _UNUSED for b in range(256)]
    n_vocab = len(tokens)
    head_dim = n_embd // n_head

    path.parent.mkdir(parents=True, exist_ok=True)
    n_tensors = 3 + 9 * n_layer
    # split files are named by the writer from its path: write them in a
    # private folder, then move each into place
    tmp_dir = path.with_name(f".{path.name}.tmp.d")
    shutil.rmtree(tmp_dir, ignore_errors=True)  # what a crashed write left
    tmp_dir.mkdir()
    tmp = tmp_dir / path.name
    w = gguf.GGUFWriter(
        str(tmp), "llama", split_max_tensors=-(-n_tensors // split) if split > 1 else 0
    )
    w.add_name(name)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * n_vocab)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)

    def t(*shape: int, scale: float = 0.1) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    ones = np.ones(n_embd, dtype=np.float32)
    w.add_tensor("token_embd.weight", t(n_vocab, n_embd))
    w.add_tensor("output_norm.weight", ones)
    w.add_tensor("output.weight", t(n_vocab, n_embd))
    kv = n_head_kv * head_dim
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        w.add_tensor(f"blk.{i}.attn_q.weight", t(n_embd, n_embd))
        w.add_tensor(f"blk.{i}.attn_k.weight", t(kv, n_embd))
        w.add_tensor(f"blk.{i}.attn_v.weight", t(kv, n_embd))
        w.add_tensor(f"blk.{i}.attn_output.weight", t(n_embd, n_embd))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
        w.add_tensor(f"blk.{i}.ffn_gate.weight", t(n_ff, n_embd))
        w.add_tensor(f"blk.{i}.ffn_up.weight", t(n_ff, n_embd))
        w.add_tensor(f"blk.{i}.ffn_down.weight", t(n_embd, n_ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    written = sorted(tmp_dir.iterdir())
    for f in written:
        f.replace(path.with_name(f.name))
    tmp_dir.rmdir()
    return path.with_name(written[0].name)
