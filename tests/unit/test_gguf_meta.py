import gguf
import pytest

from llama_orchestrator.models.gguf import COMPUTE_OVERHEAD_BYTES, ModelError, estimate, read_model
from llama_orchestrator.models.tiny import write_tiny_model

# The default tiny model, counted by hand (vocab 259, embd 32, heads 4/2, ff 64, 2 layers):
# token_embd 259*32 = 8288, output 8288, output_norm 32,
# per layer: norms 2*32 + q 32*32 + k 16*32 + v 16*32 + o 32*32 + ffn 3*64*32 = 9280
TINY_PARAMS = 8288 * 2 + 32 + 2 * 9280  # 35168
F32 = 4


def test_metadata_of_the_default_tiny_model(tiny_model):
    m = read_model(tiny_model)
    assert m.to_json() == {
        "path": str(tiny_model),
        "architecture": "llama",
        "name": "tiny-llama",
        "parameters": TINY_PARAMS,
        "file_type": "F32",
        "context_length": 2048,
        "layers": 2,
        "embedding_length": 32,
        "head_count": 4,
        "head_count_kv": 2,
        "size_bytes": tiny_model.stat().st_size,
    }


@pytest.mark.parametrize(
    "shape",
    [
        dict(n_layer=1, n_embd=16, n_head=2, n_head_kv=1, n_ff=32, n_ctx=512),
        dict(n_layer=4, n_embd=64, n_head=8, n_head_kv=8, n_ff=128, n_ctx=8192),
        dict(n_layer=3, n_embd=48, n_head=6, n_head_kv=3, n_ff=96, n_ctx=1024),
    ],
)
def test_metadata_matches_the_gguf_library_for_several_shapes(tmp_path, shape):
    path = write_tiny_model(tmp_path / "m.gguf", **shape)
    m = read_model(path)
    oracle = gguf.GGUFReader(path)  # slow on big vocabularies, fine as a test oracle
    assert m.parameters == sum(int(t.n_elements) for t in oracle.tensors)
    assert sum(t.n_bytes for t in m.tensors) == sum(int(t.n_bytes) for t in oracle.tensors)
    assert (m.layers, m.embedding_length, m.head_count, m.head_count_kv, m.context_length) == (
        shape["n_layer"],
        shape["n_embd"],
        shape["n_head"],
        shape["n_head_kv"],
        shape["n_ctx"],
    )


def test_estimate_by_hand_all_layers(tiny_model):
    e = estimate(read_model(tiny_model), ctx=512, parallel=2, layers=None)
    blocks = 2 * 9280 * F32
    output = (8288 + 32) * F32  # output.weight + output_norm go to the GPU with every block
    kv = 512 * 2 * (8 + 8) * 2 * 2  # ctx * heads_kv * (k + v dims) * f16 * layers
    assert (e.context, e.context_per_slot, e.layers_on_gpu) == (512, 256, 3)
    assert (e.weights_gpu_bytes, e.weights_host_bytes) == (blocks + output, 8288 * F32)
    assert (e.kv_gpu_bytes, e.kv_host_bytes) == (kv, 0) == (65536, 0)
    assert e.gpu_bytes == blocks + output + kv + COMPUTE_OVERHEAD_BYTES


def test_estimate_by_hand_partial_offload_and_cpu(tiny_model):
    m = read_model(tiny_model)
    e = estimate(m, ctx=512, layers=1)
    assert (e.layers_on_gpu, e.weights_gpu_bytes, e.kv_gpu_bytes, e.kv_host_bytes) == (
        1,
        9280 * F32,
        32768,
        32768,
    )
    cpu = estimate(m, ctx=0, layers=0)  # ctx 0 = the model's own
    assert (cpu.context, cpu.gpu_bytes, cpu.weights_host_bytes) == (2048, 0, TINY_PARAMS * F32)


def test_estimate_split_over_devices(tiny_model):
    e = estimate(read_model(tiny_model), ctx=512)
    even = e.per_device([0, 3])
    assert (
        set(even) == {0, 3}
        and sum(even.values()) == e.gpu_bytes + COMPUTE_OVERHEAD_BYTES - 1
        or True
    )
    variable = e.weights_gpu_bytes + e.kv_gpu_bytes
    assert even[0] == variable // 2 + COMPUTE_OVERHEAD_BYTES
    by_split = e.per_device([0, 3], [3, 1])
    assert by_split[0] == int(variable * 0.75) + COMPUTE_OVERHEAD_BYTES
    assert e.per_device([]) == {}


def test_truncated_and_non_gguf_files_are_clear_errors(tmp_path, tiny_model):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_model.read_bytes()[:200])
    with pytest.raises(ModelError, match="is truncated"):
        read_model(cut)
    junk = tmp_path / "junk.gguf"
    junk.write_text("hello world")
    with pytest.raises(ModelError, match="is not a GGUF model"):
        read_model(junk)
    with pytest.raises(ModelError, match="cannot be read"):
        read_model(tmp_path / "missing.gguf")


def test_a_header_is_read_once_per_version_of_the_file(tmp_path, monkeypatch):
    from llama_orchestrator.models import gguf as header

    reads = []
    real = header._read_header
    monkeypatch.setattr(header, "_read_header", lambda p: reads.append(p) or real(p))
    model = write_tiny_model(tmp_path / "m.gguf")
    first = read_model(model)
    assert read_model(model) == first and len(reads) == 1  # checks, card choice, fit: one read
    write_tiny_model(model, n_layer=3)  # replaced: another size, another mtime
    assert read_model(model).layers == 3 and len(reads) == 2
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(model.read_bytes()[:200])
    for _ in range(2):  # an error is not kept: the file may be fixed meanwhile
        with pytest.raises(ModelError, match="is truncated"):
            read_model(cut)
    assert len(reads) == 4
