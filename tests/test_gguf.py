"""The GGUF reader: files written by the `gguf` package read back the same, dequantization equals
`gguf.quants.dequantize`, and broken files raise FormatError naming the field."""

import struct

import gguf
import numpy as np
import pytest
import torch

from pocketlm.errors import FormatError, NotFoundError
from pocketlm.gguf import TENSOR_TYPES, GGUFFile, dequantize

Q = gguf.GGMLQuantizationType
TYPE_BY_NAME = {t.name: t for t in TENSOR_TYPES.values()}


def write_gguf(path, tensors=None, metadata=None, alignment=None):
    """A small but complete GGUF file; tensors are name → (numpy array, ggml type)."""
    writer = gguf.GGUFWriter(str(path), arch="llama")
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    for key, value in (metadata or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_array(key, value)
    for name, (array, qtype) in (tensors or {}).items():
        if qtype in (Q.F32, Q.F16):
            writer.add_tensor(name, array.astype(np.float16 if qtype == Q.F16 else np.float32))
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def small(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"token_embd.weight": (rng.standard_normal((8, 64)).astype(np.float32), Q.F32),
               "blk.0.attn_q.weight": (rng.standard_normal((4, 64)).astype(np.float32), Q.Q8_0),
               "output_norm.weight": (rng.standard_normal(64).astype(np.float32), Q.F16)}
    metadata = {"tokenizer.ggml.tokens": ["a", "b", "ü", "🦊"], "llama.block_count": 1,
                "llama.rope.freq_base": 10000.0, "tokenizer.ggml.add_bos_token": True,
                "tokenizer.ggml.token_type": [1, 1, 1, 3]}
    return write_gguf(tmp_path / "small.gguf", tensors, metadata), tensors, metadata


def test_reads_what_the_gguf_package_wrote(small):
    path, tensors, metadata = small
    with GGUFFile(path) as f:
        assert f.version == 3
        for key, value in metadata.items():
            assert f.metadata[key] == (pytest.approx(value) if isinstance(value, float) else value), key
        assert f.metadata["general.architecture"] == "llama"
        reference = gguf.GGUFReader(path)
        for t in reference.tensors:
            ours = f.tensors[t.name]
            assert ours.shape == tuple(int(d) for d in reversed(t.shape)) == tensors[t.name][0].shape
            expected = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ours.shape)
            assert torch.equal(f.dequantize(t.name), torch.from_numpy(np.array(expected, dtype=np.float32)))


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "F16", "BF16"])
def test_dequantize_random_blocks_like_gguf(name):
    kind = TYPE_BY_NAME[name]
    rng = np.random.default_rng(1)
    n_blocks = 64
    raw = rng.integers(0, 256, size=(n_blocks, kind.block_bytes), dtype=np.uint8)
    if kind.block_size > 1:  # keep the float16 scale (and minimum) finite
        halves = rng.uniform(-2, 2, size=(n_blocks, 2)).astype(np.float16).view(np.uint8)
        at = kind.block_bytes - 2 if name == "Q6_K" else 0  # Q6_K keeps its one scale at the end
        raw[:, at:at + halves.shape[1]] = halves[:, :kind.block_bytes - at]
    else:
        raw = rng.uniform(-4, 4, size=(n_blocks, 1)).astype(np.float16).view(np.uint8) if name == "F16" else \
            torch.randn(n_blocks, 1).to(torch.bfloat16).view(torch.uint8).numpy()
    numel = raw.size // kind.block_bytes * kind.block_size
    expected = gguf.quants.dequantize(raw.reshape(-1), getattr(Q, name)).reshape(-1)
    ours = dequantize(raw.reshape(-1), kind, numel)
    assert ours.dtype == torch.float32 and ours.shape == (numel,)
    assert torch.allclose(ours, torch.from_numpy(expected.astype(np.float32)), rtol=0, atol=1e-6)


# --- broken files --------------------------------------------------------------------------------

def _header(n_tensors=0, n_kv=0, version=3, magic=b"GGUF"):
    return magic + struct.pack("<IQQ", version, n_tensors, n_kv)


def _string(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


def _kv(key: bytes, value_type: int, payload: bytes) -> bytes:
    return _string(key) + struct.pack("<I", value_type) + payload


def _tensor(name=b"t", dims=(32,), ggml_type=0, offset=0) -> bytes:
    return _string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims) + \
        struct.pack("<IQ", ggml_type, offset)


def _with_data(head: bytes, data_bytes: int, alignment: int = 32) -> bytes:
    return head + b"\0" * (-len(head) % alignment) + b"\0" * data_bytes


BROKEN = {
    "bad magic": (_header(magic=b"GGML"), "magic"),
    "version 1": (_header(version=1), "version"),
    "version 99": (_header(version=99), "version"),
    "absurd tensor count": (_header(n_tensors=2**60), "tensor count"),
    "absurd metadata count": (_header(n_kv=2**40), "metadata count"),
    "truncated header": (_header()[:10], "needs"),
    "key longer than the file": (_header(n_kv=1) + struct.pack("<Q", 2**50) + b"abc", "metadata count|key"),
    "key not utf-8": (_header(n_kv=1) + _string(b"\xff\xfe") + struct.pack("<IB", 0, 1), "UTF-8"),
    "unknown value type": (_header(n_kv=1) + _kv(b"k", 77, b"\0" * 8), "unknown value type"),
    "duplicate key": (_header(n_kv=2) + _kv(b"k", 4, b"\1\0\0\0") * 2, "twice"),
    "array longer than the file": (_header(n_kv=1) + _kv(b"k", 9, struct.pack("<IQ", 4, 2**40)), "length of"),
    "array of unknown type": (_header(n_kv=1) + _kv(b"k", 9, struct.pack("<IQ", 55, 1) + b"\0" * 8), "unknown value type"),
    "arrays nested too deep": (_header(n_kv=1) + _kv(b"k", 9, struct.pack("<IQ", 9, 1) * 6 + b"\0" * 16), "nested"),
    "string value past the end": (_header(n_kv=1) + _kv(b"k", 8, struct.pack("<Q", 10**6) + b"x"), "value of"),
    "alignment not a power of two": (_header(n_kv=1) + _kv(b"general.alignment", 4, struct.pack("<I", 24)), "alignment"),
    "zero alignment": (_header(n_kv=1) + _kv(b"general.alignment", 4, struct.pack("<I", 0)), "alignment"),
    "five dimensions": (_with_data(_header(n_tensors=1) + _tensor(dims=(32, 1, 1, 1, 1)), 128), "dimension count"),
    "zero dimension": (_with_data(_header(n_tensors=1) + _tensor(dims=(32, 0)), 128), "zero"),
    "unknown tensor type": (_with_data(_header(n_tensors=1) + _tensor(ggml_type=99), 128), "ggml type 99"),
    "row not a whole number of blocks": (_with_data(_header(n_tensors=1) + _tensor(dims=(40,), ggml_type=8), 64), "multiple"),
    "data past the end": (_with_data(_header(n_tensors=1) + _tensor(dims=(64,)), 128), "past the end"),
    "2^40 bytes declared": (_with_data(_header(n_tensors=1) + _tensor(dims=(2**20, 2**18)), 128), "more values|past the end"),
    "misaligned offset": (_with_data(_header(n_tensors=1) + _tensor(offset=4), 256), "alignment"),
    "duplicate tensor": (_with_data(_header(n_tensors=2) + _tensor() + _tensor(offset=128), 256), "twice"),
    "overlapping tensors": (_with_data(_header(n_tensors=2) + _tensor(dims=(64,)) + _tensor(b"u", offset=128), 512), "overlap"),
    "tensor table cut short": (_header(n_tensors=1) + _tensor()[:-6] + b"\0" * 20, "needs|data offset|past"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_files_raise_format_error_naming_the_field(case, tmp_path):
    content, message = BROKEN[case]
    path = tmp_path / "broken.gguf"
    path.write_bytes(content)
    with pytest.raises(FormatError, match=message):
        GGUFFile(path)


def test_valid_file_cut_at_every_section_raises_format_error(small, tmp_path):
    data = small[0].read_bytes()
    for cut in range(0, len(data) - 1, max(1, len(data) // 50)):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(FormatError):
            GGUFFile(tmp_path / "cut.gguf")


def test_missing_file(tmp_path):
    with pytest.raises(NotFoundError):
        GGUFFile(tmp_path / "nope.gguf")


# --- GGUF → model ---------------------------------------------------------------------------------

def llama_gguf_with_tokenizer(path, model, tok, qtype=None):
    """`model` as a llama.cpp-style GGUF file with `tok` (a byte-level BPE) in its metadata
    (matrices in `qtype` blocks where their rows fit, see _llama_gguf)."""
    import json

    spec = json.loads(tok._backend.to_str())["model"]
    tokens = sorted(spec["vocab"], key=spec["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["merges"]]

    class WithTokenizer(gguf.GGUFWriter):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_tokenizer_model("gpt2")
            self.add_token_list(tokens)
            self.add_token_merges(merges)
            self.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
            self.add_eos_token_id(tok.eos_token_id)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "GGUFWriter", WithTokenizer)
        return _llama_gguf(path, model, qtype=qtype)


def _llama_gguf(path, model, arch="llama", drop=(), extra_metadata=None, layers=None, qtype=None):
    """Write a pocketlm Llama-family model as llama.cpp would: its names, q/k rows permuted;
    matrices whose rows are whole blocks in `qtype` (a quantizable GGMLQuantizationType) when given."""
    c = model.config
    writer = gguf.GGUFWriter(str(path), arch=arch)
    meta = {"block_count": layers or c.n_layer, "context_length": c.max_position, "embedding_length": c.n_embd,
            "feed_forward_length": c.intermediate_size, "attention.head_count": c.n_head,
            "attention.head_count_kv": c.n_kv_head, "attention.key_length": c.head_dim,
            "attention.layer_norm_rms_epsilon": float(c.norm_eps), "rope.freq_base": float(c.rope_theta)}
    meta.update(extra_metadata or {})
    for key, value in meta.items():
        add = {float: writer.add_float32, str: writer.add_string}.get(type(value), writer.add_uint32)
        add(f"{arch}.{key}", value)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer = {v: k for k, v in {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                               "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                               "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                               "ffn_down": "mlp.down_proj"}.items()}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_embeddings:
            continue
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            module, _ = rest.rsplit(".", 1)
            gguf_name = f"blk.{i}.{layer[module]}.weight"
        else:
            gguf_name = names[name]
        if gguf_name in drop:
            continue
        t = t.detach().numpy()
        if "attn_q" in gguf_name or "attn_k" in gguf_name:
            heads = c.n_head if "attn_q" in gguf_name else c.n_kv_head
            t = t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)
        t = np.ascontiguousarray(t, dtype=np.float32)
        if qtype is not None and t.ndim == 2 and t.shape[1] % 32 == 0:
            writer.add_tensor(gguf_name, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name, t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(params=["llama-gqa-tied", "llama-mha-untied"])
def tiny_llama(request):
    from conftest import TINY, randomize
    from pocketlm.config import ModelConfig
    from pocketlm.model import Transformer

    return randomize(Transformer(ModelConfig(**TINY[request.param])), seed=7).eval()


def test_llama_gguf_loads_as_the_model_it_was_written_from(tiny_llama, tmp_path):
    from pocketlm.gguf import load_gguf

    loaded = load_gguf(_llama_gguf(tmp_path / "m.gguf", tiny_llama))
    assert loaded.config.tie_embeddings == tiny_llama.config.tie_embeddings
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, tiny_llama(ids).logits, atol=1e-5)


@pytest.mark.parametrize("change,message", [
    (dict(arch="gemma3"), "architecture 'gemma3' is not supported"),
    (dict(layers=3), "block_count is 3 but the file holds tensors for 2 layers"),
    (dict(extra_metadata={"vocab_size": 100}), "shape .* but the metadata describes 100 tokens"),
    (dict(extra_metadata={"attention.head_count_kv": 3}), "impossible model"),
    (dict(drop=("blk.1.ffn_up.weight",)), "lack 1 tensors"),
    (dict(extra_metadata={"embedding_length": 48}), "metadata describes"),
    (dict(extra_metadata={"rope.freq_base": "fast"}), "is 'fast', not a int or float"),
])
def test_metadata_that_contradicts_itself_or_the_tensors(tiny_llama, tmp_path, change, message):
    from pocketlm.gguf import load_gguf

    with pytest.raises(FormatError, match=message):
        load_gguf(_llama_gguf(tmp_path / "m.gguf", tiny_llama, **change))


CHILD = r"""
import json, resource, sys
from pocketlm.errors import FormatError
from pocketlm.gguf import GGUFFile
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    GGUFFile(sys.argv[1])
    outcome = "loaded"
except FormatError as e:
    outcome = "FormatError"
except BaseException as e:
    outcome = f"{type(e).__name__}: {e}"
print(json.dumps({"outcome": outcome, "grew_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline}))
"""


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_files_in_a_fresh_process_fail_cleanly_without_growing_memory(case, tmp_path):
    """Nothing but FormatError, and no allocation driven by what the file claims (ru_maxrss after
    imports vs after the attempt, in a process of its own)."""
    import json
    import subprocess
    import sys

    path = tmp_path / "broken.gguf"
    path.write_bytes(BROKEN[case][0])
    done = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["outcome"] == "FormatError"
    assert result["grew_kb"] < 16 * 1024
