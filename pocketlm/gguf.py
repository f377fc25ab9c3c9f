"""GGUF files (llama.cpp's single-file model format), read as untrusted input.

`GGUFFile(path)` maps the file and parses its header, metadata and tensor table, checking every
count, length, type and offset against the file before using it: a malformed file raises
`FormatError` naming the field and its byte offset, never a crash, a hang or a huge allocation.
Tensor data stays in the memory map until asked for; `dequantize(name)` turns one tensor into a
torch tensor (float32 unless the data is already F16/BF16 and a dtype asks for it).

Layout of a file (little-endian): magic "GGUF", version (2 or 3), tensor count, metadata count;
the metadata (key string, value type, value); the tensor table (name, dims innermost first, type,
offset into the data section); padding to `general.alignment`; the data section.

Dequantization follows the block formats of ggml: each block of 32 (or 256 for K-quants) values
stores a scale (and a minimum for the _1 kinds) as float16, followed by packed integers.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pocketlm.config import LLAMA, ModelConfig
from pocketlm.errors import ConfigError, FormatError, NotFoundError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
MAX_ARRAY_DEPTH = 4  # arrays of arrays are legal; deeper nesting than this is not a model file

# metadata value types: id -> (name, struct format or None for string/array)
VALUE_TYPES = {
    0: ("uint8", "<B"), 1: ("int8", "<b"), 2: ("uint16", "<H"), 3: ("int16", "<h"),
    4: ("uint32", "<I"), 5: ("int32", "<i"), 6: ("float32", "<f"), 7: ("bool", "<?"),
    8: ("string", None), 9: ("array", None), 10: ("uint64", "<Q"), 11: ("int64", "<q"),
    12: ("float64", "<d"),
}
STRING, ARRAY = 8, 9


@dataclass(frozen=True)
class TensorType:
    name: str
    block_size: int  # values per block
    block_bytes: int  # bytes per block


# the ggml tensor types pocketlm reads (ids from ggml.h)
TENSOR_TYPES = {
    0: TensorType("F32", 1, 4),
    1: TensorType("F16", 1, 2),
    2: TensorType("Q4_0", 32, 18),
    3: TensorType("Q4_1", 32, 20),
    6: TensorType("Q5_0", 32, 22),
    7: TensorType("Q5_1", 32, 24),
    8: TensorType("Q8_0", 32, 34),
    12: TensorType("Q4_K", 256, 144),
    13: TensorType("Q5_K", 256, 176),
    14: TensorType("Q6_K", 256, 210),
    30: TensorType("BF16", 1, 2),
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order: outermost first (GGUF lists the innermost first)
    type: TensorType
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


class _Cursor:
    """Reads little-endian fields from the mapped file, refusing to step past its end."""

    def __init__(self, data, path: Path):
        self.data, self.pos, self.path = data, 0, path
        self.size = len(data)

    def fail(self, field: str, problem: str, at: int | None = None) -> FormatError:
        return FormatError(f"{self.path}: {field} at byte {self.pos if at is None else at}: {problem}; "
                           "the file is not a valid GGUF model (truncated or corrupt?)")

    def take(self, n: int, field: str) -> bytes:
        if n < 0 or n > self.size - self.pos:
            raise self.fail(field, f"needs {n} bytes but only {self.size - self.pos} remain")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str, field: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), field))[0]

    def string(self, field: str) -> str:
        return self.strings(1, field)[0]

    def strings(self, n: int, field: str) -> list[str]:
        """n length-prefixed UTF-8 strings in a row, in one tight loop (vocabularies hold ~100k)."""
        data, pos, size, out = self.data, self.pos, self.size, []
        unpack_length = struct.Struct("<Q").unpack_from
        try:
            for _ in range(n):
                if size - pos < 8:
                    raise self.fail(f"{field} length", "needs 8 bytes but fewer remain", pos)
                (length,) = unpack_length(data, pos)
                pos += 8
                if length > size - pos:
                    raise self.fail(field, f"needs {length} bytes but only {size - pos} remain", pos)
                out.append(str(data[pos:pos + length], "utf-8"))
                pos += length
        except UnicodeDecodeError:
            raise self.fail(field, "is not valid UTF-8", pos) from None
        self.pos = pos
        return out

    def count(self, field: str, min_item_bytes: int) -> int:
        """A 64-bit count of items that each need at least min_item_bytes: checked against what
        is left of the file before anything is allocated for them."""
        at = self.pos
        n = self.unpack("<Q", field)
        if n * min_item_bytes > self.size - self.pos:
            raise self.fail(field, f"declares {n:,} items, more than the {self.size - self.pos:,} bytes left "
                                   "could hold", at)
        return n


class GGUFFile:
    """A validated, memory-mapped GGUF file: `.metadata` (dict), `.tensors` (name → TensorInfo)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise NotFoundError(f"{self.path} is not a file; pass the path of a .gguf model file")
        self._file = open(self.path, "rb")
        try:
            if self.path.stat().st_size == 0:
                raise FormatError(f"{self.path}: the file is empty, not a GGUF model")
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            self._data = memoryview(self._map)
            self._parse(_Cursor(self._data, self.path))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Unmap and close the file (the map stays while arrays from raw() still view it)."""
        self._file.close()
        if not hasattr(self, "_data"):
            return
        try:
            self._data.release()
            self._map.close()
        except BufferError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- parsing -----------------------------------------------------------------------------

    def _parse(self, c: _Cursor) -> None:
        magic = c.take(4, "magic")
        if magic != MAGIC:
            raise c.fail("magic", f"is {magic!r}, not {MAGIC!r}", 0)
        self.version = c.unpack("<I", "version")
        if self.version not in VERSIONS:
            raise c.fail("version", f"{self.version} is not a supported GGUF version {VERSIONS}", 4)
        # a tensor entry takes at least 8 (name length) + 4 (n_dims) + 4 (type) + 8 (offset) bytes,
        # a metadata entry 8 (key length) + 4 (type) + 1 (smallest value)
        n_tensors = c.count("tensor count", 24)
        n_kv = c.count("metadata count", 13)

        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            at = c.pos
            key = c.string("metadata key")
            if key in self.metadata:
                raise c.fail("metadata key", f"{key!r} appears twice", at)
            value_type = c.unpack("<I", f"type of {key!r}")
            self.metadata[key] = self._value(c, value_type, key, 0)

        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 \
                or alignment & (alignment - 1):
            raise c.fail("general.alignment", f"{alignment!r} is not a positive power of two")

        table = []
        names = set()
        for _ in range(n_tensors):
            at = c.pos
            name = c.string("tensor name")
            if name in names:
                raise c.fail("tensor name", f"{name!r} appears twice", at)
            names.add(name)
            n_dims = c.unpack("<I", f"dimension count of {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise c.fail(f"dimension count of {name!r}", f"{n_dims} is outside 1..{MAX_DIMS}")
            dims = [c.unpack("<Q", f"dimension {i} of {name!r}") for i in range(n_dims)]
            type_at = c.pos
            type_id = c.unpack("<I", f"type of tensor {name!r}")
            offset = c.unpack("<Q", f"data offset of {name!r}")
            table.append((name, dims, type_id, type_at, offset, at))

        data_start = -(-c.pos // alignment) * alignment
        self.data_start = data_start
        self.tensors: dict[str, TensorInfo] = {}
        spans = []
        for name, dims, type_id, type_at, offset, at in table:
            kind = TENSOR_TYPES.get(type_id)
            if kind is None:
                raise c.fail(f"type of tensor {name!r}", f"ggml type {type_id} is unknown or not supported",
                             type_at)
            if any(d == 0 for d in dims):
                raise c.fail(f"dimensions of {name!r}", f"{dims} include a zero", at)
            numel = 1
            for d in dims:
                numel *= d
                if numel > c.size * max(1, kind.block_size):  # cannot fit, and would overflow later
                    raise c.fail(f"dimensions of {name!r}", f"{dims} describe more values than the file holds", at)
            if dims[0] % kind.block_size:
                raise c.fail(f"dimensions of {name!r}", f"the row length {dims[0]} is not a multiple of "
                                                         f"{kind.name}'s block of {kind.block_size}", at)
            nbytes = numel // kind.block_size * kind.block_bytes
            if offset % alignment:
                raise c.fail(f"data offset of {name!r}", f"{offset} is not a multiple of the alignment {alignment}", at)
            begin = data_start + offset
            if begin + nbytes > c.size:
                raise c.fail(f"data of {name!r}", f"bytes {begin:,}..{begin + nbytes:,} lie past the end of the "
                                                   f"file ({c.size:,} bytes)", at)
            spans.append((begin, begin + nbytes, name))
            self.tensors[name] = TensorInfo(name, tuple(reversed(dims)), kind, begin, nbytes)
        spans.sort()
        for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
            if begin_b < end_a:
                raise FormatError(f"{self.path}: the data of tensors {a!r} and {b!r} overlap "
                                  f"(at byte {begin_b:,}); the file is corrupt")

    def _value(self, c: _Cursor, value_type: int, key: str, depth: int):
        at = c.pos
        if value_type not in VALUE_TYPES:
            raise c.fail(f"value of {key!r}", f"unknown value type {value_type}", at - 4)
        if value_type == STRING:
            return c.string(f"value of {key!r}")
        if value_type != ARRAY:
            return c.unpack(VALUE_TYPES[value_type][1], f"value of {key!r}")
        if depth >= MAX_ARRAY_DEPTH:
            raise c.fail(f"value of {key!r}", f"arrays nested deeper than {MAX_ARRAY_DEPTH}", at)
        item_type = c.unpack("<I", f"item type of {key!r}")
        if item_type not in VALUE_TYPES:
            raise c.fail(f"item type of {key!r}", f"unknown value type {item_type}", at)
        fmt = VALUE_TYPES[item_type][1]
        item_bytes = struct.calcsize(fmt) if fmt else (8 if item_type == STRING else 12)
        n = c.count(f"length of {key!r}", item_bytes)
        if fmt is not None:  # numbers: one slice, no per-item Python objects until asked
            raw = c.take(n * item_bytes, f"value of {key!r}")
            return np.frombuffer(raw, dtype=np.dtype(fmt)).tolist()
        if item_type == STRING:  # vocabularies: ~100k strings, so a tight loop
            return c.strings(n, f"value of {key!r}")
        return [self._value(c, item_type, key, depth + 1) for _ in range(n)]

    # --- tensor data ---------------------------------------------------------------------------

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 view of the map (no copy)."""
        info = self._info(name)
        return np.frombuffer(self._data, dtype=np.uint8, count=info.nbytes, offset=info.offset)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """A fresh copy of the tensor's bytes (or of rows [start, end) of its outermost
        dimension), read from the file rather than through the map, so that the file's pages do
        not stay in this process's memory beside the dequantized weights."""
        info = self._info(name)
        offset, nbytes = info.offset, info.nbytes
        if rows is not None:
            row_bytes = nbytes // info.shape[0]
            offset, nbytes = offset + rows[0] * row_bytes, (rows[1] - rows[0]) * row_bytes
        out = np.empty(nbytes, dtype=np.uint8)
        self._file.seek(offset)
        if self._file.readinto(memoryview(out)) != nbytes:
            raise FormatError(f"{self.path}: tensor {name!r} could not be read whole (the file changed?)")
        return out

    def dequantize(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor (or rows [start, end) of it) as float32, in torch order (outermost first)."""
        info = self._info(name)
        shape = info.shape if rows is None else (rows[1] - rows[0], *info.shape[1:])
        numel = int(np.prod(shape, dtype=np.int64))
        return dequantize(self.read(name, rows), info.type, numel).reshape(shape)

    def _info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise FormatError(f"{self.path} has no tensor {name!r}") from None


# --- dequantization: raw blocks → float32 ----------------------------------------------------------

def dequantize(raw: np.ndarray, kind: TensorType, numel: int) -> torch.Tensor:
    """Float32 values (numel,) from the raw bytes of `numel` values of type `kind`."""
    if not raw.flags.writeable:  # a view of the map (raw()); bytes from read() are ours already
        raw = raw.copy()
    if kind.name == "F32":
        return torch.from_numpy(raw.view(np.float32))
    if kind.name == "F16":
        return torch.from_numpy(raw.view(np.float16).astype(np.float32))
    if kind.name == "BF16":
        return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16).float()
    decode = _BLOCK_DECODERS.get(kind.name)
    if decode is None:
        raise FormatError(f"dequantizing {kind.name} is not supported yet")
    blocks = torch.from_numpy(raw.reshape(-1, kind.block_bytes))  # (N, block_bytes) uint8
    return decode(blocks).reshape(numel)


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 at bytes [start, start+2) of each block, as float32 (N, 1)."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(N, 16) bytes → (N, 32) values: the low nibbles give values 0..15, the high ones 16..31."""
    return torch.cat((packed & 0x0F, packed >> 4), dim=-1)


def _high_bits(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """Q5's fifth bits: a little-endian uint32 at [start, start+4), bit j for value j → (N, 32)."""
    bits = blocks[:, start:start + 4].long()
    word = bits[:, 0] | bits[:, 1] << 8 | bits[:, 2] << 16 | bits[:, 3] << 24
    return ((word[:, None] >> torch.arange(32)) & 1).to(torch.uint8)


def _q4_0(blocks):  # d (f16), 16 bytes of nibbles; value = d * (q - 8)
    return _f16(blocks, 0) * (_nibbles(blocks[:, 2:18]).float() - 8)


def _q4_1(blocks):  # d, m (f16), 16 bytes of nibbles; value = d * q + m
    return _f16(blocks, 0) * _nibbles(blocks[:, 4:20]).float() + _f16(blocks, 2)


def _q5_0(blocks):  # d, 4 bytes of fifth bits, 16 bytes of nibbles; value = d * (q - 16)
    q = _nibbles(blocks[:, 6:22]) | (_high_bits(blocks, 2) << 4)
    return _f16(blocks, 0) * (q.float() - 16)


def _q5_1(blocks):  # d, m, 4 bytes of fifth bits, 16 bytes of nibbles; value = d * q + m
    q = _nibbles(blocks[:, 8:24]) | (_high_bits(blocks, 4) << 4)
    return _f16(blocks, 0) * q.float() + _f16(blocks, 2)


def _q8_0(blocks):  # d, 32 signed bytes; value = d * q
    return _f16(blocks, 0) * blocks[:, 2:34].contiguous().view(torch.int8).float()


def _k_scales(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes → 8 six-bit scales and 8 six-bit minimums per block, (N, 8) each:
    sub-blocks 0..3 keep theirs in the low 6 bits of bytes 0..3 (scales) and 4..7 (mins);
    4..7 split them between the nibbles of bytes 8..11 and the top 2 bits of bytes 0..7."""
    s = packed.long()
    low_scale, low_min = s[:, 0:4] & 63, s[:, 4:8] & 63
    high_scale = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    high_min = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return torch.cat((low_scale, high_scale), 1).float(), torch.cat((low_min, high_min), 1).float()


def _k_quant(blocks: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """value = d * scale * q - dmin * min for the 8 sub-blocks of 32 in each block; q (N, 256)."""
    scale, minimum = _k_scales(blocks[:, 4:16])
    q = q.float().view(-1, 8, 32)
    return (_f16(blocks, 0)[:, :, None] * scale[:, :, None] * q
            - _f16(blocks, 2)[:, :, None] * minimum[:, :, None]).reshape(-1, 256)


def _k_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(N, 128) bytes → (N, 256): each 32-byte group gives 32 low nibbles then 32 high ones."""
    qs = qs.view(-1, 4, 32)
    return torch.stack((qs & 0x0F, qs >> 4), dim=2).reshape(-1, 256)


def _q4_k(blocks):  # d, dmin (f16), 12 bytes of scales/mins, 128 bytes of nibbles
    return _k_quant(blocks, _k_nibbles(blocks[:, 16:144]))


def _q5_k(blocks):  # d, dmin, 12 bytes of scales/mins, 32 bytes of fifth bits, 128 bytes of nibbles
    qh = blocks[:, 16:48]  # bit j of qh[l] is the fifth bit of value 32 * j + l
    fifth = (qh[:, None, :] >> torch.arange(8, dtype=torch.uint8)[None, :, None]) & 1  # (N, 8, 32)
    return _k_quant(blocks, _k_nibbles(blocks[:, 48:176]) | (fifth.reshape(-1, 256) << 4))


def _q6_k(blocks):  # 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 int8 scales, d (f16)
    ql = blocks[:, 0:128].view(-1, 2, 2, 32)  # (N, half, which 32 of ql, l)
    qh = blocks[:, 128:192].view(-1, 2, 1, 32)  # (N, half, 1, l)
    low = torch.stack((ql & 0x0F, ql >> 4), dim=2)  # (N, half, nibble, 2, l): values 0..3 of a half
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 2, 2, 1)
    high = (qh[:, :, None] >> shifts) & 3  # (N, half, 2, 2, l) in the same (nibble, which) order
    q = (low | (high << 4)).reshape(-1, 2, 4, 32).float() - 32  # (N, half, quarter, l)
    scales = blocks[:, 192:208].contiguous().view(torch.int8).float().view(-1, 2, 4, 2, 1)  # 16 per 16 values
    d = _f16(blocks, 208).view(-1, 1, 1, 1, 1)
    return (d * scales * q.view(-1, 2, 4, 2, 16)).reshape(-1, 256)


_BLOCK_DECODERS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
                   "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


# --- GGUF → pocketlm model -------------------------------------------------------------------------

SUPPORTED_ARCHITECTURES = ("llama",)
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_MISSING = object()


def config_from_gguf(f: GGUFFile) -> ModelConfig:
    """The ModelConfig a GGUF file's metadata describes, checked against its tensor table."""
    arch = f.metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise FormatError(f"{f.path}: the model architecture {arch!r} is not supported yet; pocketlm reads "
                          f"GGUF files of {', '.join(SUPPORTED_ARCHITECTURES)} models")

    def meta(key, kind=int, default=_MISSING):
        value = f.metadata.get(f"{arch}.{key}", default)
        if value is _MISSING:
            raise FormatError(f"{f.path}: metadata {arch}.{key} is missing")
        if value is not None and value is not default and (isinstance(value, bool) or not isinstance(value, kind)):
            kinds = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise FormatError(f"{f.path}: metadata {arch}.{key} is {value!r}, not a {kinds}")
        return value

    n_layer, n_embd, n_head = meta("block_count"), meta("embedding_length"), meta("attention.head_count")
    n_kv_head = meta("attention.head_count_kv", int, n_head)
    head_dim = meta("attention.key_length", int, None) or meta("rope.dimension_count", int, None)
    embed = f.tensors.get("token_embd.weight")
    if embed is None or len(embed.shape) != 2:
        raise FormatError(f"{f.path}: the token embedding tensor token_embd.weight is missing or not a matrix")
    vocab = meta("vocab_size", int, None) or len(f.metadata.get("tokenizer.ggml.tokens", ())) or embed.shape[0]
    if embed.shape != (vocab, n_embd):
        raise FormatError(f"{f.path}: token_embd.weight has shape {embed.shape} but the metadata describes "
                          f"{vocab} tokens of width {n_embd}")
    layers = {int(part) for name in f.tensors if name.startswith("blk.")
              for part in [name.split(".")[1]] if part.isdigit()}
    if layers != set(range(n_layer)):
        raise FormatError(f"{f.path}: metadata {arch}.block_count is {n_layer} but the file holds tensors for "
                          f"{len(layers)} layers (numbered {min(layers, default=0)}..{max(layers, default=-1)})")
    ids = {role: f.metadata.get(f"tokenizer.ggml.{key}_token_id")
           for role, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"))}
    try:
        return ModelConfig(**{**LLAMA, "vocab_size": vocab, "n_layer": n_layer, "n_head": n_head,
                              "n_kv_head": n_kv_head, "n_embd": n_embd, "head_dim": head_dim,
                              "intermediate_size": meta("feed_forward_length"),
                              "max_position": meta("context_length"),
                              "rope_theta": float(meta("rope.freq_base", (int, float), 10000.0)),
                              "norm_eps": float(meta("attention.layer_norm_rms_epsilon", (int, float))),
                              "tie_embeddings": "output.weight" not in f.tensors,
                              "bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"]})
    except (ConfigError, TypeError) as e:
        raise FormatError(f"{f.path}: the metadata describes an impossible model: {e}") from None


TRANSPOSED_CHUNK_ROWS = 4096


def state_dict_from_gguf(f: GGUFFile, config, dtype: torch.dtype = torch.float32,
                         transposed: Collection[str] = ()) -> dict[str, torch.Tensor]:
    """Every tensor dequantized under our names, with llama.cpp's row order of q and k undone.
    Matrices named in `transposed` come in transposed storage (same shape and values), filled a
    few thousand rows at a time, so the layout decoding prefers costs no second full copy."""
    from pocketlm.packing import trim_heap

    out = {}
    for i, (name, info) in enumerate(f.tensors.items()):
        if i % 16 == 15:
            trim_heap()  # dequantizing frees many temporaries; keep them from piling up
        ours = _our_name(f, name, config)
        if ours in transposed and len(info.shape) == 2:
            t = torch.empty(info.shape[::-1], dtype=dtype).t()
            for start in range(0, info.shape[0], TRANSPOSED_CHUNK_ROWS):
                end = min(start + TRANSPOSED_CHUNK_ROWS, info.shape[0])
                t[start:end] = f.dequantize(name, (start, end))
            out[ours] = t
            continue
        t = f.dequantize(name)
        heads = _rope_heads(ours, config)
        out[ours] = (_unpermute(t, heads, f.path, name) if heads else t).to(dtype)
    return out


FLOAT_TYPES = ("F32", "F16", "BF16")


def quantized_state_from_gguf(f: GGUFFile, config) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Every tensor under our names with the file's matrices kept quantized: Q8_0, Q4_0 and Q4_1
    repacked as int8 / int4 blocks (exactly the same weights, no float copy); other quantized
    types (K-quants, Q5) do not fit blocks of 32 losslessly and are requantized to int8, one
    tensor at a time; norms and float matrices as float32. Returns the tensors and {module: bits}."""
    from pocketlm.quant import GGUF_BLOCK_BYTES, from_gguf_blocks, quantize

    out, bits_of = {}, {}
    for name, info in f.tensors.items():
        ours = _our_name(f, name, config)
        heads = _rope_heads(ours, config)
        if len(info.shape) != 2 or info.type.name in FLOAT_TYPES:
            t = f.dequantize(name)
            out[ours] = (_unpermute(t, heads, f.path, name) if heads else t).float()
            continue
        if info.type.name in GGUF_BLOCK_BYTES:
            layer = from_gguf_blocks(f.read(name), info.type.name, info.shape)
        else:
            layer = quantize(f.dequantize(name), 8)
        module = ours.removesuffix(".weight")
        for part in ("q", "scale", "offset"):
            t = getattr(layer, part)
            if t is not None:  # q and k rows: the same row order as the float path, blocks and all
                out[f"{module}.{part}"] = _unpermute(t, heads, f.path, name) if heads else t
        bits_of[module] = layer.bits
    return out, bits_of


def _our_name(f: GGUFFile, name: str, config) -> str:
    """Our name for the file's tensor `name`; a FormatError for a tensor our model has no place for."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}"
    raise FormatError(f"{f.path}: tensor {name!r} has no place in a {config.family} model; "
                      "the file may be of an architecture variant pocketlm does not support yet")


def _rope_heads(ours: str, config) -> int | None:
    """The head count of a q or k projection (whose rows llama.cpp interleaves), else None."""
    if ours.endswith("q_proj.weight"):
        return config.n_head
    if ours.endswith("k_proj.weight"):
        return config.n_kv_head
    return None


def _unpermute(w: torch.Tensor, heads: int, path, name: str) -> torch.Tensor:
    """llama.cpp stores each head's rows of q and k interleaved in pairs (x0, x_{D/2}, x1, ...) for
    its RoPE; put them back in the half-split order of the Hugging Face layout we use."""
    rows = w.shape[0]
    if rows % (2 * heads):
        raise FormatError(f"{path}: {name} has {rows} rows, not a whole number of {heads} heads")
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def load_gguf(source: str | Path | GGUFFile, device=None, dtype=None, cls=None, adapt_config=None):
    """A model (`cls`, default Transformer) with a GGUF file's weights, validated against the
    config its metadata describes (passed through `adapt_config` when given, e.g. for a
    classifier's labels). `source` is a path or an open GGUFFile (so the tokenizer can come from
    the same parse).

    dtype None or "auto": on CPU, the file's own precision, its quantized matrices kept quantized
    (the fast path for inference; see quantized_state_from_gguf); on a GPU, bfloat16. A float
    dtype dequantizes every weight to it (what training needs); "int8" / "int4" requantize the
    layers to those blocks."""
    from pocketlm.checkpoint import _resolve_dtype, model_from_tensors, output_head_names, quant_bits
    from pocketlm.model import Transformer

    if not isinstance(source, GGUFFile):
        with GGUFFile(source) as f:
            return load_gguf(f, device, dtype, cls, adapt_config)
    f, path = source, source.path
    cls = cls or Transformer
    config = config_from_gguf(f)
    if adapt_config is not None:
        config = adapt_config(config)
    on_cpu = device is None or torch.device(device).type == "cpu"
    bits = quant_bits(dtype)
    if dtype in (None, "auto") and on_cpu and quantized_matrices(f):
        tensors, quantized = quantized_state_from_gguf(f, config)
        return model_from_tensors(cls, config, tensors, where=str(path), device=device, quantized=quantized)
    if dtype in (None, "auto") and not on_cpu:
        dtype = torch.bfloat16  # a GPU computes fastest in bf16; GGUF blocks have no fast kernels there
    tensors = state_dict_from_gguf(f, config, _resolve_dtype(None if bits else dtype, torch.float32),
                                   output_head_names(config) if on_cpu and not bits else ())
    model = model_from_tensors(cls, config, tensors, where=str(path), device=device)
    if bits:
        from pocketlm.quant import quantize_model

        quantize_model(model, bits)
    return model


def quantized_matrices(f: GGUFFile) -> bool:
    """Whether the file's layer matrices are quantized (so it loads quantized by default)."""
    return any(name.startswith("blk.") and len(info.shape) == 2 and info.type.name not in FLOAT_TYPES
               for name, info in f.tensors.items())


# --- GGUF → Tokenizer ---------------------------------------------------------------------------------

CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values for special and added tokens


def tokenizer_from_gguf(f: GGUFFile):
    """The Tokenizer described by tokenizer.ggml.*: byte-level BPE with its merges, special and
    added tokens, bos/eos/pad/unk, optional BOS insertion, and the chat template."""
    from tokenizers import AddedToken, models, pre_tokenizers, processors

    from pocketlm.tokenizer import Tokenizer, _byte_level_bpe_backend

    meta = f.metadata
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise FormatError(f"{f.path}: tokenizer model {kind!r} is not supported yet (pocketlm reads byte-level "
                          "BPE, tokenizer.ggml.model = 'gpt2')")
    tokens, merges = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.merges")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens) or not tokens:
        raise FormatError(f"{f.path}: tokenizer.ggml.tokens must be a non-empty list of strings")
    if not isinstance(merges, list) or not all(isinstance(m, str) and m.count(" ") == 1 for m in merges):
        raise FormatError(f"{f.path}: tokenizer.ggml.merges must be a list of 'left right' strings")
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise FormatError(f"{f.path}: tokenizer.ggml.tokens lists the same token twice")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise FormatError(f"{f.path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")

    backend = _byte_level_bpe_backend()
    try:
        backend.model = models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges])
    except Exception as e:  # tokenizers raises a bare Exception for merges of unknown tokens
        raise FormatError(f"{f.path}: tokenizer.ggml.merges do not fit the vocabulary: {e}") from None
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre == "smollm":  # digits one by one, then GPT-2's split
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                         backend.pre_tokenizer])
    elif pre not in ("default", "gpt2"):
        raise FormatError(f"{f.path}: pre-tokenizer {pre!r} is not supported yet (known: default, gpt2, smollm)")
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, kind in zip(tokens, types) if kind == CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, kind in zip(tokens, types) if kind == USER_DEFINED])

    def token(role):
        i = meta.get(f"tokenizer.ggml.{role}_token_id")
        if i is None:
            return None
        if not isinstance(i, int) or not 0 <= i < len(tokens):
            raise FormatError(f"{f.path}: tokenizer.ggml.{role}_token_id={i!r} is not a token id")
        return tokens[i]

    bos = token("bos")
    if meta.get("tokenizer.ggml.add_bos_token") and bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return Tokenizer(backend, bos_token=bos, eos_token=token("eos"), pad_token=token("padding"),
                     unk_token=token("unknown"),
                     model_max_length=f.metadata.get(f"{meta.get('general.architecture')}.context_length"),
                     chat_template=meta.get("tokenizer.chat_template"))
