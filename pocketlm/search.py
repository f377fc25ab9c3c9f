"""Semantic search over your own documents: chunk, embed, index, and find — dense, lexical or both.

    index = Index.build(["notes/", "book.txt"], SentenceEncoder.from_pretrained("minilm-l6"))
    index.save("my-index")
    for hit in Index.load("my-index").search("where did we leave the keys?", k=5):
        print(hit.score, hit.chunk.source, hit.chunk.start_line, hit.chunk.text)

Documents (plain text, markdown, or JSONL with a "text" field per line) are cut into chunks of
whole lines holding about `chunk_tokens` of the encoder's tokens, consecutive chunks sharing about
`overlap` tokens, so every hit can name its file and line range. Dense search ranks chunks by the
cosine of their embeddings with the query's (exact: a matrix product in torch, or FAISS's flat
inner-product index with `Index.load(folder, backend="faiss")`). Embeddings alone
miss rare names and exact terms, so the default is hybrid: the dense ranking and a BM25 ranking
over the same chunks, fused by reciprocal rank (each list contributes 1 / (60 + rank)).

An index is a folder: embeddings.safetensors (the (N, dim) float32 matrix) and index.json (the
encoder's name and fingerprint, the chunking settings, each source file's sha256, and the chunks).
It is written to a new folder beside the old one and swapped in, so an interrupted write leaves
the previous index as it was. Adding documents to an existing index embeds only new or changed
files; an index is only searched and extended with the encoder that built it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

from pocketlm.errors import ConfigError, FormatError, NotFoundError

FORMAT = "pocketlm-index/1"
MODES = ("hybrid", "dense", "lexical")
BACKENDS = ("torch", "faiss")
# With FAISS, hybrid search fuses this many dense candidates with the BM25 ranking (a chunk ranked
# lower contributes nothing dense; with torch it would add at most 1 / (60 + 101) to its score)
FUSION_POOL = 100
TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst", ".text", ""}
RRF_K = 60  # reciprocal-rank fusion's constant
BM25_K1, BM25_B = 1.5, 0.75
_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass
class Chunk:
    text: str
    source: str  # the file, as given when indexed
    start_line: int  # 1-based, inclusive
    end_line: int


@dataclass
class Hit:
    score: float
    chunk: Chunk
    rank: int


@dataclass
class Skipped:
    path: str
    reason: str


def read_documents(paths: Iterable[str | os.PathLike]) -> tuple[list[tuple[str, list[tuple[int, str]]]], list[Skipped]]:
    """[(source, [(line number, line text), ...])] for every readable document under `paths`
    (folders are walked; hidden files and unknown suffixes are left out), and the files skipped
    with why (empty, binary, not UTF-8, JSONL without text)."""
    files: list[Path] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            files += sorted(f for f in path.rglob("*") if f.is_file() and not any(part.startswith(".")
                            for part in f.relative_to(path).parts) and f.suffix.lower() in TEXT_SUFFIXES | {".jsonl"})
        elif path.is_file():
            files.append(path)
        else:
            raise NotFoundError(f"{p}: no such file or folder to index")
    documents, skipped = [], []
    for f in files:
        raw = f.read_bytes()
        if b"\0" in raw[:8192]:
            skipped.append(Skipped(str(f), "binary"))
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            skipped.append(Skipped(str(f), "not UTF-8 text"))
            continue
        if f.suffix.lower() == ".jsonl":
            lines = []
            for number, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise FormatError(f"{f}:{number}: not a JSON object (JSONL documents hold one per line)") from None
                value = record.get("text") if isinstance(record, dict) else None
                if isinstance(value, str) and value.strip():
                    lines.append((number, " ".join(value.split())))
        else:
            lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        if not lines:
            skipped.append(Skipped(str(f), "empty"))
            continue
        documents.append((str(f), lines))
    return documents, skipped


def chunk_lines(source: str, lines: list[tuple[int, str]], count_tokens, chunk_tokens: int, overlap: int) -> list[Chunk]:
    """Whole lines packed into chunks of about chunk_tokens tokens; each chunk after the first
    starts with the last lines of the one before, up to `overlap` tokens of them. A single line
    longer than a chunk is a chunk of its own (the encoder reads its start)."""
    sizes = [max(1, count_tokens(text)) for _, text in lines]
    chunks, start = [], 0
    while start < len(lines):
        end, total = start, 0
        while end < len(lines) and (end == start or total + sizes[end] <= chunk_tokens):
            total += sizes[end]
            end += 1
        chunks.append(Chunk("\n".join(t for _, t in lines[start:end]), source, lines[start][0], lines[end - 1][0]))
        if end >= len(lines):
            break
        back, carried = end, 0  # step back over lines worth `overlap` tokens, but always move forward
        while back - 1 > start and carried + sizes[back - 1] <= overlap:
            back -= 1
            carried += sizes[back]
        start = back
    return chunks


def encoder_fingerprint(encoder) -> str:
    """sha256 over the encoder's config, its tokenizer and a digest of its weights: an index
    refuses queries embedded by any other encoder. Hashing the weights takes a moment, so it is
    done once per encoder object (encoders are for inference: their weights do not change)."""
    cached = encoder.__dict__.get("_fingerprint")
    if cached is None:
        cached = encoder.__dict__["_fingerprint"] = _fingerprint(encoder)
    return cached


def _fingerprint(encoder) -> str:
    digest = hashlib.sha256(json.dumps(asdict(encoder.model.config), sort_keys=True).encode())
    digest.update(encoder.tokenizer.fingerprint().encode())
    for name, tensor in sorted(encoder.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).digest())
    return digest.hexdigest()


class Index:
    def __init__(self, embeddings: torch.Tensor, chunks: list[Chunk], meta: dict):
        if embeddings.shape[0] != len(chunks):
            raise FormatError(f"the index holds {embeddings.shape[0]} embeddings for {len(chunks)} chunks")
        self.embeddings, self.chunks, self.meta = embeddings, chunks, meta
        self._bm25 = None
        self.backend = "torch"
        self._faiss = None

    # --- building -----------------------------------------------------------------------------

    @classmethod
    def empty(cls, encoder, *, chunk_tokens: int = 128, overlap: int = 32) -> "Index":
        """An index with no chunks yet, for `encoder` (documents go in with `add`)."""
        return cls(torch.empty(0, encoder.dimension), [], {
            "format": FORMAT, "encoder": {"name": encoder.name, "fingerprint": encoder_fingerprint(encoder),
                                          "dimension": encoder.dimension},
            "chunk_tokens": chunk_tokens, "overlap": overlap, "sources": {}})

    @classmethod
    def build(cls, paths: Sequence[str | os.PathLike], encoder, *, chunk_tokens: int = 128, overlap: int = 32,
              batch_size: int = 32) -> "Index":
        index = cls.empty(encoder, chunk_tokens=chunk_tokens, overlap=overlap)
        index.add(paths, encoder, batch_size=batch_size)
        return index

    def add(self, paths: Sequence[str | os.PathLike], encoder, batch_size: int = 32) -> dict:
        """Index new files and re-index changed ones (by sha256); returns counts of what happened."""
        self.check_encoder(encoder)
        chunk_tokens, overlap = self.meta["chunk_tokens"], self.meta["overlap"]
        if not (isinstance(chunk_tokens, int) and 8 <= chunk_tokens <= encoder.max_seq_length - 2):
            raise ConfigError(f"chunk size {chunk_tokens} tokens must be from 8 to {encoder.max_seq_length - 2} "
                              f"(the encoder reads {encoder.max_seq_length} tokens with [CLS] and [SEP])")
        if not (isinstance(overlap, int) and 0 <= overlap < chunk_tokens):
            raise ConfigError(f"overlap {overlap} tokens must be from 0 to less than the chunk size {chunk_tokens}")
        documents, skipped = read_documents(paths)
        sources = self.meta["sources"]

        def count(text):
            return len(encoder.tokenizer.encode(text, add_special_tokens=False))
        new_chunks, changed = [], set()
        for source, lines in documents:
            digest = hashlib.sha256("\n".join(f"{n}\t{t}" for n, t in lines).encode()).hexdigest()
            if sources.get(source, {}).get("sha256") == digest:
                continue
            changed.add(source)
            chunks = chunk_lines(source, lines, count, chunk_tokens, overlap)
            new_chunks += chunks
            sources[source] = {"sha256": digest, "chunks": len(chunks)}
        keep = [i for i, c in enumerate(self.chunks) if c.source not in changed]
        vectors = encoder.encode([c.text for c in new_chunks], batch_size=batch_size, normalize=True) \
            if new_chunks else torch.empty(0, encoder.dimension)
        self.embeddings = torch.cat((self.embeddings[keep], vectors))
        self.chunks = [self.chunks[i] for i in keep] + new_chunks
        self._bm25 = self._faiss = None
        return {"files": len(changed), "chunks": len(new_chunks), "unchanged": len(documents) - len(changed),
                "skipped": skipped}

    def check_encoder(self, encoder) -> None:
        built = self.meta["encoder"]
        if built["fingerprint"] != encoder_fingerprint(encoder):
            raise ConfigError(f"this index was built with the encoder {built['name']!r} (fingerprint "
                              f"{built['fingerprint'][:12]}…); {encoder.name!r} is a different one: search it with "
                              "--encoder set to the one that built it, or rebuild the index")

    # --- files --------------------------------------------------------------------------------

    def save(self, folder: str | os.PathLike) -> None:
        """Write to a new folder beside `folder`, then swap it in (an interrupted write leaves the
        old index whole)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        if folder.exists() and not (folder / "index.json").is_file():
            raise ConfigError(f"{folder} exists and is not a pocketlm index; choose another --out")
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
        old = folder.parent / f".{folder.name}.old"
        try:
            save_file({"embeddings": self.embeddings.contiguous()}, str(staging / "embeddings.safetensors"))
            meta = {**self.meta, "chunks": [asdict(c) for c in self.chunks]}
            (staging / "index.json").write_text(json.dumps(meta, ensure_ascii=False) + "\n", encoding="utf-8")
            from pocketlm.files import _umask

            for path in (staging, *staging.iterdir()):  # mkdtemp and safetensors make private files
                os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())
            if old.exists():
                shutil.rmtree(old)
            if folder.exists():
                os.replace(folder, old)
            os.replace(staging, folder)
            if old.exists():
                shutil.rmtree(old)
        finally:
            if staging.exists():
                shutil.rmtree(staging)

    @classmethod
    def load(cls, folder: str | os.PathLike, backend: str = "torch") -> "Index":
        """The index in `folder`, searched densely by `backend`: "torch" (exact, a matrix product)
        or "faiss" (FAISS's exact inner-product index, `pip install 'pocketlm[faiss]'`, built
        at the first query beside the torch matrix)."""
        from pocketlm.checkpoint import read_safetensors
        from pocketlm.files import read_json

        folder = Path(folder)
        if not (folder / "index.json").is_file():
            raise NotFoundError(f"{folder} is not a pocketlm index (no index.json); build one with `pocketlm index`")
        meta = read_json(folder / "index.json", "index")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise FormatError(f"{folder}/index.json is not a {FORMAT} index")
        try:
            chunks = [Chunk(str(c["text"]), str(c["source"]), int(c["start_line"]), int(c["end_line"]))
                      for c in meta.pop("chunks")]
            dimension = int(meta["encoder"]["dimension"])
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"{folder}/index.json is damaged: {type(e).__name__}: {e}") from None
        tensors = read_safetensors(folder / "embeddings.safetensors")
        embeddings = tensors.get("embeddings")
        if embeddings is None or embeddings.dim() != 2 or embeddings.shape[1] != dimension:
            raise FormatError(f"{folder}/embeddings.safetensors does not hold an (N, {dimension}) embeddings matrix")
        index = cls(embeddings.float(), chunks, meta)
        index.use_backend(backend)
        return index

    def use_backend(self, backend: str) -> None:
        if backend not in BACKENDS:
            raise ConfigError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
        if backend == "faiss":
            _faiss()  # refused now, not at the first query, when FAISS is missing
        self.backend, self._faiss = backend, None

    # --- searching ----------------------------------------------------------------------------

    def search(self, query: str, encoder=None, k: int = 5, mode: str = "hybrid") -> list[Hit]:
        """The k best chunks for `query`: by cosine of embeddings (dense), BM25 (lexical) or both
        fused by reciprocal rank (hybrid; the score is then the fused one). Dense and hybrid need
        the encoder that built the index."""
        if mode not in MODES:
            raise ConfigError(f"mode {mode!r} is not one of {', '.join(MODES)}")
        if not isinstance(query, str) or not query.strip():
            raise ConfigError("the query is empty")
        if k < 1:
            raise ConfigError(f"k must be at least 1, got {k}")
        if not self.chunks:
            return []
        dense = lexical = None
        if mode != "lexical":
            if encoder is None:
                raise ConfigError("dense and hybrid search need the encoder that built the index")
            self.check_encoder(encoder)
            if len(encoder.tokenize([query])[0]) >= encoder.max_seq_length:
                raise ConfigError(f"the query is longer than the encoder's window of {encoder.max_seq_length} "
                                  "tokens; shorten it (only its start would count)")
            vector = encoder.encode(query, normalize=True)
            if self.backend == "faiss":
                dense = self._faiss_scores(vector, k if mode == "dense" else max(k, FUSION_POOL))
            else:
                dense = self.embeddings @ vector
        if mode != "dense":
            lexical = self._bm25_scores(query)
        if mode == "dense":
            scores = dense
        elif mode == "lexical":
            scores = lexical
        else:
            scores = _rrf(dense) + _rrf(lexical, only_positive=True)
        top = torch.topk(scores, min(k, len(self.chunks)))
        hits = []
        for rank, (score, i) in enumerate(zip(top.values.tolist(), top.indices.tolist()), 1):
            if mode == "lexical" and score <= 0:
                break  # no query word in the rest
            hits.append(Hit(score, self.chunks[i], rank))
        return hits

    def _faiss_scores(self, vector: torch.Tensor, pool: int) -> torch.Tensor:
        """Cosines of the `pool` nearest chunks by FAISS (an exact inner-product index over the
        normalised embeddings), -inf for every other chunk."""
        if self._faiss is None:
            faiss = _faiss()
            self._faiss = faiss.IndexFlatIP(self.embeddings.shape[1])
            self._faiss.add(self.embeddings.contiguous().numpy())
        found, where = self._faiss.search(vector.float().reshape(1, -1).numpy(), min(pool, len(self.chunks)))
        scores = torch.full((len(self.chunks),), float("-inf"))
        keep = where[0] >= 0
        scores[torch.from_numpy(where[0][keep]).long()] = torch.from_numpy(found[0][keep]).float()
        return scores

    def _bm25_scores(self, query: str) -> torch.Tensor:
        if self._bm25 is None:
            docs = [Counter(_words(c.text)) for c in self.chunks]
            lengths = torch.tensor([sum(d.values()) for d in docs], dtype=torch.float32)
            postings: dict[str, list[tuple[int, int]]] = {}
            for i, d in enumerate(docs):
                for word, tf in d.items():
                    postings.setdefault(word, []).append((i, tf))
            self._bm25 = (postings, lengths, float(lengths.mean()) if len(docs) else 1.0)
        postings, lengths, average = self._bm25
        n = len(self.chunks)
        scores = torch.zeros(n)
        for word in set(_words(query)):
            hits = postings.get(word)
            if not hits:
                continue
            idf = math.log(1 + (n - len(hits) + 0.5) / (len(hits) + 0.5))
            rows = torch.tensor([i for i, _ in hits])
            tf = torch.tensor([t for _, t in hits], dtype=torch.float32)
            norm = BM25_K1 * (1 - BM25_B + BM25_B * lengths[rows] / average)
            scores[rows] += idf * tf * (BM25_K1 + 1) / (tf + norm)
        return scores


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _rrf(scores: torch.Tensor, only_positive: bool = False) -> torch.Tensor:
    """Reciprocal-rank fusion terms: 1 / (RRF_K + rank) by descending score (rank 1 first)."""
    order = torch.argsort(scores, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(1, len(scores) + 1)
    fused = (1.0 / (RRF_K + ranks.float())).masked_fill(scores == float("-inf"), 0.0)  # not a candidate
    return fused.masked_fill(scores <= 0, 0.0) if only_positive else fused


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ConfigError("the faiss backend needs FAISS: pip install 'pocketlm[faiss]' (or faiss-cpu), or use "
                          "--backend torch") from None
    return faiss
