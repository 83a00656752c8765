"""Copy detection on the shipped default model: spans against a brute force, the index's cost, the request's cost.

The index of Tiny Shakespeare's training part (the first 90 %, as the model was trained) is built into a
temporary copy of the default model's directory (`charrnn index`'s code), and the real app (create_app, Flask's
test client: no HTTP socket, so the figure is the check's, not the network's) answers POST /generate for
3 seeds x 1,500 characters at temperatures 0.5 and 1.0 with `copies`. For each answer it prints:

    spans     the spans the service reported, and those a brute force finds (str.__contains__ on the training
              text for every position and length, from the lower bound ms[i] >= ms[i-1] - 1 up)
    verbatim  whether every reported span stands at its offset, character for character
    missed    brute-force spans the service did not report (goal 0), extra: reported spans it did not find

then the index's size (bytes, bytes per character) and build time, and the added time per request: the
median of --repeats requests of 1,500 characters with and without `copies`, alternated, same seed, and the ratio
(goal: under 1.05), and, steadier than that difference of two noisy times, the search alone on the texts above
as a share of the request. Needs the corpus (`charrnn corpus fetch tinyshakespeare`, or a local copy). Usage:

    python bench/copies.py [--min-chars 32 20] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/NAME.py`

from bench._common import cpu_name
from charrnn.corpora.indexed_text import index_checkpoint
from charrnn.corpora.registry import resolve
from charrnn.model.checkpoint import load_checkpoint
from charrnn.service.config import DEFAULT_MODEL_DIR
from charrnn.service.web.app import create_app

SEEDS = (1, 2, 3)
TEMPERATURES = (0.5, 1.0)
CHARS = 1500


def brute_force(train: str, text: str, min_chars: int) -> list[tuple[int, int]]:
    """Every maximal span of `text` of at least `min_chars` characters found in `train`, by substring search."""
    longest: list[int] = []
    for i in range(len(text)):
        length = max(longest[-1] - 1, 0) if longest else 0  # text[i:i+length] is inside the previous match
        while i + length < len(text) and text[i : i + length + 1] in train:
            length += 1
        longest.append(length)
    return [(i, i + n) for i, n in enumerate(longest) if n >= min_chars and (i == 0 or longest[i - 1] <= n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--min-chars", type=int, nargs="+", default=[32, 20, 12], help="span minimums to check")
    parser.add_argument("--repeats", type=int, default=5, help="timed requests with and without copies")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_name()}, {args.threads} torch threads")
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp)
        shutil.copy(DEFAULT_MODEL_DIR / "shakespeare.safetensors", models / "shakespeare.safetensors")
        started = time.perf_counter()
        path, index = index_checkpoint(models / "shakespeare.safetensors", "tinyshakespeare")
        built = time.perf_counter() - started
        size = path.stat().st_size
        corpus_path, _ = resolve("tinyshakespeare", download=False)
        train = corpus_path.read_text(encoding="utf-8")[: index.chars]
        print(
            f"index: {index.chars:,} characters, {size:,} bytes ({size / index.chars:.2f} bytes/char), built in "
            f"{built:.2f} s (charrnn index, corpus read and hashed included)"
        )
        app = create_app({"MODEL_DIR": models, "TESTING": True})
        try:
            client = app.test_client()
            texts = spans_table(client, train, args.min_chars)
            plain = timing(client, args.repeats)
            check_alone(index, load_checkpoint(models / "shakespeare.safetensors").vocab, texts, plain)
        finally:
            app.extensions["charrnn"].close()


def spans_table(client, train: str, minimums: list[int]) -> list[str]:
    """Print the table; return the texts generated."""
    texts = []
    print(f"\n{'T':>4} {'seed':>4} {'min':>4} {'reported':>8} {'brute':>6} {'verbatim':>8} {'missed':>6} {'extra':>5}")
    for temperature in TEMPERATURES:
        for seed in SEEDS:
            for min_chars in minimums:
                body = {"max_new_chars": CHARS, "temperature": temperature, "seed": seed}
                answer = client.post("/generate", json={**body, "copies": {"min_chars": min_chars}}).get_json()
                choice = answer["choices"][0]
                text, spans = choice["text"], choice["copies"]
                if min_chars == minimums[0]:
                    texts.append(text)  # the same text for every minimum (same seed)
                reported = [(s["start"], s["end"]) for s in spans]
                verbatim = all(
                    text[s["start"] : s["end"]] == train[s["offset"] : s["offset"] + s["end"] - s["start"]]
                    for s in spans
                )
                truth = brute_force(train, text, min_chars)
                missed, extra = len(set(truth) - set(reported)), len(set(reported) - set(truth))
                print(
                    f"{temperature:>4} {seed:>4} {min_chars:>4} {len(reported):>8} {len(truth):>6} "
                    f"{'yes' if verbatim else 'NO':>8} {missed:>6} {extra:>5}"
                )
    return texts


def timing(client, repeats: int) -> float:
    """Print the median request time with and without copies and their ratio; return the time without."""
    body = {"max_new_chars": CHARS, "temperature": 1.0, "seed": 7}
    client.post("/generate", json=body)  # warm-up: kernel, caches
    plain, checked = [], []
    for _ in range(repeats):
        for copies, times in ((None, plain), ({"min_chars": 32}, checked)):
            started = time.perf_counter()
            response = client.post("/generate", json=body if copies is None else {**body, "copies": copies})
            times.append(time.perf_counter() - started)
            assert response.status_code == 200, response.get_json()
    a, b = statistics.median(plain), statistics.median(checked)
    print(
        f"\nPOST /generate, {CHARS} characters, median of {repeats}: without copies {a * 1000:.1f} ms, "
        f"with copies {b * 1000:.1f} ms, ratio {b / a:.3f} (+{(b - a) * 1000:.1f} ms)"
    )
    return a


def check_alone(index, vocab, texts: list[str], request_s: float, repeats: int = 20) -> None:
    """The search by itself (what a request with copies adds), timed over the generated texts: steadier than
    the difference of two noisy request times."""
    for min_chars in (32, 20, 12):
        times = []
        for text in texts:
            ids = vocab.encode(text)
            started = time.perf_counter()
            for _ in range(repeats):
                index.find(ids, min_chars)
            times.append((time.perf_counter() - started) / repeats)
        per = statistics.median(times)
        print(
            f"the search alone, min_chars {min_chars}: {per * 1000:.2f} ms per {CHARS} characters (median of "
            f"{len(texts)} texts), {100 * per / request_s:.2f} % of a request without copies"
        )


if __name__ == "__main__":
    main()
