"""Semantic search: indexing throughput (chunks/s) and query latency of pocketlm's SentenceEncoder +
Index against sentence-transformers + a numpy brute-force search, on the same chunks, the same
model folder (all-MiniLM-L6-v2, the registry's `minilm-l6`) and the same questions, with recall
measured on both sides. Each side runs in a fresh process of its own, one after the other.

    HF_HUB_OFFLINE=1 POCKETLM_HOME=data/home .venv/bin/python bench/search.py [--chunks 10000] \\
        [--queries 100] [--threads 2] [--batch-size 32] [--rounds 1] [--write docs/benchmarks.md]

Corpus: the bundled Shakespeare plays and poems (`pocketlm.data.shakespeare_files`, fetched once
into $POCKETLM_HOME/data), cut with pocketlm.search.chunk_lines into chunks of about 128 MiniLM
tokens, consecutive chunks sharing about 32 (the `pocketlm index` defaults): about 13,900 chunks
in all. A seeded sample of --chunks of them is kept in corpus order; with fewer available, all of
them are used and the report says so (none is repeated: duplicate chunks would tie in the
ranking). Then --queries made-up facts ("The piano tuner's locker code is 4817.") are planted,
each as an extra line at a seeded place in its own chunk, and each comes with a question ("What is
the piano tuner's locker code?"); recall@k is the share of questions whose planted chunk is among
the first k hits.

pocketlm: `encoder.encode(texts, batch_size)` (tokenizing included) and the in-memory Index made
from the vectors (which hashes the encoder's weights once for its fingerprint); then, per
question, `index.search(question, encoder, k=10, mode=...)` for dense and for hybrid (BM25 +
dense); the BM25 postings are built by a warm-up hybrid query, timed on its own. `Index.save`
is timed apart. Peer: `SentenceTransformer(folder).encode(texts, batch_size,
normalize_embeddings=True, convert_to_numpy=True)`, then per question the question's vector,
`embeddings @ vector` and np.argpartition + argsort for the top 10. Both sides run with
torch.set_num_threads(--threads) (and the BLAS/OpenMP/Rayon thread variables set to it), embed
one batch as a warm-up before the clock starts, and time each query with its encoding (and the
question's encoding alone, to show what the search itself adds); model loading is timed apart.
With --rounds R > 1 each side runs R times, in alternating order, and the table shows the median
of each timing. Run it on idle cores: other work makes 2-thread OpenMP runs far slower.
"""

import argparse
import datetime
import importlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import command_line, machine_description, publish

HEADING = "## Semantic search: indexing and queries (bench/search.py)"
ENCODER = "minilm-l6"
CHUNK_TOKENS, OVERLAP = 128, 32  # `pocketlm index` defaults
K = 10  # hits per query: recall@1 and recall@10 come from the same list
WARM_UP_QUERY = "Who is the king of Denmark?"

# --- the planted facts: a role × a template, each pair at most once --------------------------------

ROLES = ["lighthouse keeper", "harbour master", "village baker", "night nurse", "museum curator", "ferry captain",
         "school librarian", "orchard owner", "radio operator", "beekeeper", "glassblower", "train conductor",
         "court stenographer", "mountain guide", "piano tuner", "zookeeper", "chess coach", "bridge engineer",
         "wine merchant", "falconer", "clockmaker", "ski instructor", "tram driver", "postmistress", "lock keeper",
         "cheesemaker", "park ranger", "bookbinder", "ice-cream vendor", "submarine cook", "weather forecaster",
         "tattoo artist", "dog groomer", "marine biologist", "taxi dispatcher", "violin maker", "sheep farmer",
         "puppeteer", "crane operator", "florist"]
TEMPLATES = [  # (fact, question); {value} is drawn from VALUES of the same position
    ("The {role}'s dog is named {value}.", "What is the name of the {role}'s dog?"),
    ("The {role} keeps the spare key inside the {value}.", "Where does the {role} keep the spare key?"),
    ("The {role}'s locker code is {value}.", "What is the {role}'s locker code?"),
    ("The {role} grew up in the town of {value}.", "In which town did the {role} grow up?"),
    ("The {role} drives a {value} to work every morning.", "What does the {role} drive to work?"),
]
VALUES = [
    lambda rng: f"{rng.choice(['Biscuit', 'Pepper', 'Juniper', 'Waffles', 'Comet', 'Noodle', 'Maple'])}-"
                f"{rng.randint(10, 99)}",
    lambda rng: f"{rng.choice(['blue', 'cracked', 'copper', 'green', 'old'])} "
                f"{rng.choice(['teapot', 'boot', 'flowerpot', 'biscuit tin', 'birdhouse', 'music box'])}",
    lambda rng: str(rng.randint(1000, 9999)),
    lambda rng: rng.choice(["Karrowmere", "Oswick", "Brindlecombe", "Tallowford", "Quenby", "Marrowgate",
                            "Little Fennick", "Halsworth"]),
    lambda rng: f"{rng.choice(['yellow', 'rusty', 'silver', 'dark red', 'mint-green'])} "
                f"{rng.choice(['tractor', 'scooter', 'camper van', 'tandem bicycle', 'pickup truck'])}",
]


def planted_facts(count: int, rng: random.Random) -> list[tuple[str, str]]:
    """`count` (fact, question) pairs, each about a different (role, template) pair."""
    pairs = [(role, t) for role in ROLES for t in range(len(TEMPLATES))]
    if count > len(pairs):
        raise SystemExit(f"--queries {count}: at most {len(pairs)} distinct facts can be planted")
    facts = []
    for role, t in rng.sample(pairs, count):
        fact, question = TEMPLATES[t]
        facts.append((fact.format(role=role, value=VALUES[t](rng)), question.format(role=role)))
    return facts


# --- the corpus, built once by the parent ----------------------------------------------------------

def build_corpus(chunks: int, queries: int, seed: int) -> dict:
    """Shakespeare cut into ~128-token chunks, a seeded sample of `chunks` of them (in corpus
    order), and `queries` facts planted one per chunk, with their questions and the planted chunk's
    position (the answer)."""
    from pocketlm import registry
    from pocketlm.data import shakespeare_files
    from pocketlm.search import chunk_lines, read_documents
    from pocketlm.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(registry.resolve(ENCODER).path)

    def count(text):
        return len(tokenizer.encode(text, add_special_tokens=False))
    documents, _ = read_documents(shakespeare_files())
    everything = [c for source, lines in documents for c in chunk_lines(source, lines, count, CHUNK_TOKENS, OVERLAP)]
    rng = random.Random(seed)
    kept = everything if chunks >= len(everything) else [everything[i] for i in
                                                         sorted(rng.sample(range(len(everything)), chunks))]
    if queries > len(kept):
        raise SystemExit(f"--queries {queries} is more than the {len(kept)} chunks to plant them in")
    facts = planted_facts(queries, rng)
    answers = rng.sample(range(len(kept)), queries)
    rows = [[c.text, Path(c.source).name, c.start_line, c.end_line] for c in kept]
    for (fact, _), i in zip(facts, answers):
        lines = rows[i][0].split("\n")
        lines.insert(rng.randint(0, len(lines)), fact)
        rows[i][0] = "\n".join(lines)
    tokens = [len(tokenizer.encode(text)) for text, *_ in rows]  # with [CLS] and [SEP], as the encoder reads them
    return {"chunks": rows, "questions": [q for _, q in facts], "answers": answers, "available": len(everything),
            "mean_tokens": sum(tokens) / len(tokens), "max_tokens": max(tokens)}


# --- children: one side each, in a fresh process ---------------------------------------------------

def child_pocketlm(spec: dict) -> dict:
    import torch

    from pocketlm.encoder import SentenceEncoder
    from pocketlm.search import Chunk, Index

    torch.set_num_threads(spec["threads"])
    for module in ("pocketlm.checkpoint", "pocketlm.tokenizer"):  # imported before the clock starts,
        importlib.import_module(module)  # as the peer's are: model loading is timed without imports
    t0 = time.perf_counter()
    encoder = SentenceEncoder.from_pretrained(ENCODER)
    load_seconds = time.perf_counter() - t0
    chunks = [Chunk(text, source, start, end) for text, source, start, end in spec["chunks"]]
    texts = [c.text for c in chunks]
    encoder.encode(texts[:spec["batch_size"]], batch_size=spec["batch_size"])  # warm-up

    t0 = time.perf_counter()
    vectors = encoder.encode(texts, batch_size=spec["batch_size"], normalize=True)
    t1 = time.perf_counter()
    index = Index(vectors, chunks, Index.empty(encoder, chunk_tokens=CHUNK_TOKENS, overlap=OVERLAP).meta)
    index_seconds, fingerprint_seconds = time.perf_counter() - t0, time.perf_counter() - t1

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        index.save(Path(tmp) / "index")
        save_seconds = time.perf_counter() - t0

    position = {id(c): i for i, c in enumerate(index.chunks)}
    result = {"load_seconds": load_seconds, "index_seconds": index_seconds, "fingerprint_seconds": fingerprint_seconds,
              "save_seconds": save_seconds, "encode_question_seconds": []}
    for question in spec["questions"]:  # the part of a dense query that is the encoder's
        t0 = time.perf_counter()
        encoder.encode(question, normalize=True)
        result["encode_question_seconds"].append(time.perf_counter() - t0)
    for mode in ("dense", "hybrid"):
        t0 = time.perf_counter()
        index.search(WARM_UP_QUERY, encoder, k=K, mode=mode)  # hybrid: builds the BM25 postings
        result[f"{mode}_first_seconds"] = time.perf_counter() - t0
        seconds, ranked = [], []
        for question in spec["questions"]:
            t0 = time.perf_counter()
            hits = index.search(question, encoder, k=K, mode=mode)
            seconds.append(time.perf_counter() - t0)
            ranked.append([position[id(h.chunk)] for h in hits])
        result[mode] = {"seconds": seconds, "ranked": ranked}
    np.save(spec["embeddings"]["pocketlm"], index.embeddings.numpy())
    return result


def child_peer(spec: dict) -> dict:
    import torch
    from sentence_transformers import SentenceTransformer

    from pocketlm import registry

    torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    model = SentenceTransformer(str(registry.resolve(ENCODER).path), device="cpu")
    load_seconds = time.perf_counter() - t0
    texts = [text for text, *_ in spec["chunks"]]

    def embed(inputs):
        return model.encode(inputs, batch_size=spec["batch_size"], normalize_embeddings=True,
                            convert_to_numpy=True, show_progress_bar=False)
    embed(texts[:spec["batch_size"]])  # warm-up

    t0 = time.perf_counter()
    embeddings = embed(texts)
    index_seconds = time.perf_counter() - t0

    def top_k(vector):  # exact top k by cosine: a matrix-vector product and a partial sort
        scores = embeddings @ vector
        top = np.argpartition(-scores, K)[:K] if K < len(scores) else np.arange(len(scores))
        return top[np.argsort(-scores[top], kind="stable")]
    top_k(embed(WARM_UP_QUERY))
    seconds, encode_seconds, ranked = [], [], []
    for question in spec["questions"]:
        t0 = time.perf_counter()
        vector = embed(question)
        t1 = time.perf_counter()
        top = top_k(vector)
        seconds.append(time.perf_counter() - t0)
        encode_seconds.append(t1 - t0)
        ranked.append(top.tolist())
    np.save(spec["embeddings"]["peer"], embeddings)
    return {"load_seconds": load_seconds, "index_seconds": index_seconds, "encode_question_seconds": encode_seconds,
            "dense": {"seconds": seconds, "ranked": ranked}}


def run_child(kind: str, spec_path: str, threads: int) -> dict:
    count = str(threads)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": count, "MKL_NUM_THREADS": count,
           "OPENBLAS_NUM_THREADS": count, "RAYON_NUM_THREADS": count}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--child", kind, "--spec", spec_path],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{kind} child failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {kind}: {result['index_seconds']:.1f} s to index, process {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)
    return result


# --- the report ------------------------------------------------------------------------------------

def recall(ranked: list[list[int]], answers: list[int], k: int) -> float:
    return sum(answer in top[:k] for top, answer in zip(ranked, answers)) / len(answers)


def ms(seconds: list[float], q: float) -> float:
    return float(np.percentile(seconds, q)) * 1000


def summary(runs: list[dict], answers: list[int], chunks: int) -> dict:
    """The median over rounds of each timing; rankings are the same every round, so the first's."""
    def median(f):
        return statistics.median(f(r) for r in runs)
    out = {"chunks_s": median(lambda r: chunks / r["index_seconds"]), "load": median(lambda r: r["load_seconds"]),
           "encode_p50": median(lambda r: ms(r["encode_question_seconds"], 50))}
    for mode in ("dense", "hybrid"):
        if mode in runs[0]:
            out[mode] = {"p50": median(lambda r: ms(r[mode]["seconds"], 50)),
                         "p95": median(lambda r: ms(r[mode]["seconds"], 95)),
                         "r1": recall(runs[0][mode]["ranked"], answers, 1),
                         "r10": recall(runs[0][mode]["ranked"], answers, K)}
    if "save_seconds" in runs[0]:
        out["save"] = median(lambda r: r["save_seconds"])
        out["bm25"] = median(lambda r: r["hybrid_first_seconds"])
        out["fingerprint"] = median(lambda r: r["fingerprint_seconds"])
    return out


def command() -> str:
    """command_line(), with POCKETLM_HOME in front when it is set (it says where the model and the
    corpus were read from)."""
    line, home = command_line(), os.environ.get("POCKETLM_HOME")
    if not home:
        return line
    if os.path.abspath(home).startswith(os.getcwd() + os.sep):
        home = os.path.relpath(home)
    offline = "HF_HUB_OFFLINE=1 "
    return (offline if line.startswith(offline) else "") + f"POCKETLM_HOME={home} " + line.removeprefix(offline)


def report(args, spec: dict, ours: dict, peer: dict, agreement: dict) -> str:
    n, q = len(spec["chunks"]), len(spec["questions"])
    corpus = (f"{n:,} of the {spec['available']:,} chunks" if n < spec["available"] else
              f"all {n:,} chunks (fewer than the {args.chunks:,} asked for; none repeated)")
    rounds = f"{args.rounds} rounds in alternating order, medians shown" if args.rounds > 1 else "one run each"
    ratio = ours["chunks_s"] / peer["chunks_s"]
    d, h, p = ours["dense"], ours["hybrid"], peer["dense"]
    machine = machine_description(None, ("torch", "sentence-transformers", "numpy"))
    lines = [
        f"Run {datetime.date.today()}. Machine: {machine}. "
        f"{args.threads} threads, batch size {args.batch_size}; each side in a fresh process ({rounds}). "
        f"Corpus: {corpus} of the Shakespeare plays and poems ({CHUNK_TOKENS}-token chunks, {OVERLAP} overlap, "
        f"seed {args.seed}; {spec['mean_tokens']:.0f} tokens per chunk on average, at most {spec['max_tokens']}), "
        f"with {q} made-up facts planted one per chunk and asked about; all-MiniLM-L6-v2 (`{ENCODER}`) on both sides.",
        "",
        "    " + command(),
        "",
        "| metric | pocketlm (SentenceEncoder + Index) | sentence-transformers + numpy | pocketlm ÷ peer |",
        "|---|---|---|---|",
        f"| indexing chunks/s ↑ | {ours['chunks_s']:,.1f} | {peer['chunks_s']:,.1f} | {ratio:.2f}× |",
        f"| dense query p50 / p95 ms ↓ (encode + exact top {K}) | {d['p50']:.1f} / {d['p95']:.1f} | "
        f"{p['p50']:.1f} / {p['p95']:.1f} | {d['p50'] / p['p50']:.2f}× (p50) |",
        f"| of which encoding the question, p50 ms | {ours['encode_p50']:.1f} | {peer['encode_p50']:.1f} | |",
        f"| hybrid query p50 / p95 ms ↓ (dense + BM25, fused) | {h['p50']:.1f} / {h['p95']:.1f} | — | |",
        f"| dense recall@1 / @{K} ↑ | {d['r1']:.2f} / {d['r10']:.2f} | {p['r1']:.2f} / {p['r10']:.2f} | |",
        f"| hybrid recall@1 / @{K} ↑ | {h['r1']:.2f} / {h['r10']:.2f} | — | |",
        f"| model load s | {ours['load']:.2f} | {peer['load']:.2f} | |",
        f"| Index.save s / first hybrid query (builds BM25) s | {ours['save']:.2f} / {ours['bm25']:.2f} | — | |",
        f"| largest 1 − cos between the two sides' chunk vectors | | | {agreement['cos']:.1e} |",
        f"| questions with the same dense top {K}, in order | | | {agreement['same']} of {q} |",
        "",
    ]
    verdict = ("meets" if ratio >= 1.0 else "misses, by less than this machine's run-to-run noise (a few percent; "
               "--rounds 3 tells them apart better)," if ratio >= 0.95 else "misses")
    same_recall = (d["r1"], d["r10"]) == (p["r1"], p["r10"])
    lines.append(
        f"pocketlm indexes at {ratio:.2f}× the peer's chunks/s, which {verdict} the ≥ 1.0× target (both sides "
        "tokenize and embed the same texts with the same weights; pocketlm's time also includes hashing the "
        f"encoder's weights once for the index fingerprint, {ours['fingerprint']:.2f} s). "
        + ("Dense recall is the same on both sides, as it should be for vectors this close. " if same_recall else
           "Dense recall differs between the sides although the vectors agree closely: near-ties in the ranking "
           "were broken differently. ")
        + f"A dense query costs {d['p50']:.1f} ms against {p['p50']:.1f} ms at the median, of which encoding the "
        f"question is {ours['encode_p50']:.1f} and {peer['encode_p50']:.1f} ms; the rest is the search over "
        f"{n:,} vectors (and, for pocketlm, its checks: the query's length, the encoder's fingerprint). Hybrid "
        f"search adds BM25 and reciprocal-rank fusion ({h['p50']:.1f} ms at the median) and takes recall@1 from "
        f"{d['r1']:.2f} to {h['r1']:.2f} on these planted facts, whose questions share rare words with their "
        "chunk (the role: \"piano tuner\", the attribute: \"locker code\") and that BM25 matches exactly.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=10_000, help="chunks to index (default 10000)")
    parser.add_argument("--queries", type=int, default=100, help="planted facts, one question each (default 100)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each side (default 2)")
    parser.add_argument("--batch-size", type=int, default=32, help="texts per forward pass, both sides (default 32)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each side, in alternating order (default 1)")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--write", metavar="MD", help="put the results in this markdown file's section")
    parser.add_argument("--child", choices=("pocketlm", "peer"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(Path(args.spec).read_text(encoding="utf-8"))
        result = (child_pocketlm if args.child == "pocketlm" else child_peer)(spec)
        print(json.dumps(result))
        return
    if args.chunks < 1 or args.queries < 1 or args.rounds < 1:
        raise SystemExit("--chunks, --queries and --rounds must be at least 1")

    busy = os.getloadavg()[0]
    if busy > 0.5:
        print(f"warning: the load average is {busy:.1f} before the run; with {args.threads} threads per side, other "
              "work on these cores makes the figures slower and noisier (single queries most)", file=sys.stderr)
    t0 = time.perf_counter()
    spec = build_corpus(args.chunks, args.queries, args.seed)
    n = len(spec["chunks"])
    if n < args.chunks:
        print(f"only {n:,} chunks of Shakespeare are available (asked for {args.chunks:,}): indexing all of "
              "them, none repeated", file=sys.stderr)
    print(f"corpus: {n:,} chunks, {len(spec['questions'])} planted facts ({time.perf_counter() - t0:.1f} s)",
          file=sys.stderr)
    runs = {"pocketlm": [], "peer": []}
    with tempfile.TemporaryDirectory() as tmp:
        spec.update(threads=args.threads, batch_size=args.batch_size,
                    embeddings={side: str(Path(tmp) / f"{side}.npy") for side in runs})
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec), encoding="utf-8")
        for r in range(args.rounds):
            for side in (("pocketlm", "peer") if r % 2 == 0 else ("peer", "pocketlm")):
                runs[side].append(run_child(side, str(spec_path), args.threads))
        ours, theirs = np.load(spec["embeddings"]["pocketlm"]), np.load(spec["embeddings"]["peer"])
    ours, theirs = ours.astype(np.float64), theirs.astype(np.float64)
    cos = np.sum(ours * theirs, axis=1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1))
    agreement = {"cos": float(np.max(np.abs(1 - cos))),
                 "same": sum(a == b for a, b in zip(runs["pocketlm"][0]["dense"]["ranked"],
                                                    runs["peer"][0]["dense"]["ranked"]))}
    text = report(args, spec, summary(runs["pocketlm"], spec["answers"], n), summary(runs["peer"], spec["answers"], n),
                  agreement)
    publish(text, HEADING, args.write)


if __name__ == "__main__":
    main()
