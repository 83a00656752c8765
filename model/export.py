"""Export a trained checkpoint for serving: weights only (optionally half precision) and a model card.

The model card (JSON beside the checkpoint) records how the model was made and what it measures: the
training command, corpus and sha256 (and, for a fine-tuned model, the parent model's name, sha256 and
corpus), steps, wall time, validation loss of the exported weights in the
project's convention (and of the float32 weights, so the cost of half precision is visible), a sample,
and the chat template the service renders conversations with (model/chat_template.py), when given one.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from charrnn.model.atomic import atomic_write
from charrnn.model.chat_template import ChatTemplate, ChatTemplateError
from charrnn.model.checkpoint import load_checkpoint, save_checkpoint
from charrnn.model.data import Corpus
from charrnn.model.decoding import SamplingParams
from charrnn.model.evaluate import bits_per_char, carried_loss, windowed_loss
from charrnn.model.generation import generate

SAMPLE = {"prompt": "ROMEO:\n", "length": 400, "temperature": 0.8, "seed": 1}
# What the card's sample text depends on besides the seed (docs/SERVICE.md, "Seeds"), said in the card.
SAMPLE_ARITHMETIC = (
    "charrnn sample's text: PyTorch, float32. The service gives it for this seed with CHARRNN_PRECISION=fp32"
    " in any build of its C kernel (AMX, AVX512-BF16, AVX2: the same bits; portable C: the same text but for"
    " a draw within rounding of a tie). Its default arithmetic (int8 on a CPU with AVX2, AVX512-VNNI or AMX:"
    " exact integer sums, the same bits on each) gives a text of its own for the same seed, per build and"
    " precision"
    " (CHARRNN_PRECISION=int8, bf16 or fp32 picks one); every build and precision keeps a seed's text"
    " whatever shares the batch."
)


def card_path(checkpoint: Path) -> Path:
    """Where a checkpoint's model card lives: NAME.card.json beside NAME.safetensors."""
    return checkpoint.with_name(checkpoint.name.removesuffix(".safetensors") + ".card.json")


def read_card(checkpoint: Path) -> dict[str, Any] | None:
    """A checkpoint's model card, or None when it has none."""
    try:
        text = card_path(checkpoint).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    card = json.loads(text)
    if not isinstance(card, dict):
        raise ValueError(f"{card_path(checkpoint)}: a model card is a JSON object")
    return card


def export(
    source: Path,
    out: Path,
    half: bool,
    corpus: Corpus | None,
    command: str | None,
    chat_template: ChatTemplate | None = None,
) -> dict[str, Any]:
    """Write `out` (weights only) and its model card; returns the card."""
    ckpt = load_checkpoint(source)
    if chat_template is not None:
        _check_template(chat_template, "".join(ckpt.vocab.chars))
    model = ckpt.build_model()
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: v for k, v in ckpt.meta.items() if k not in ("format_version", "model_config", "vocab", "torch_version")}
    save_checkpoint(out, model, ckpt.vocab, {**meta, "exported_from": source.name, "half": half}, half=half)
    exported = load_checkpoint(out)
    card: dict[str, Any] = {
        "name": out.name.removesuffix(".safetensors"),
        "command": command,
        "preset": ckpt.meta.get("preset"),
        "model_config": ckpt.config.to_dict(),
        "parameters": model.num_parameters(),
        "weights": "float16" if half else "float32",
        "file_bytes": out.stat().st_size,
        "corpus": ckpt.meta.get("corpus"),
        "steps": ckpt.meta.get("step"),
        "train_seconds": ckpt.meta.get("elapsed_s"),
        "train_config": ckpt.meta.get("train_config"),
        "torch_version": torch.__version__,
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    # The model it was fine-tuned from (--init-from) with its corpus, and what it trained on before its corpus grew.
    card |= {key: ckpt.meta[key] for key in ("parent", "earlier_corpora") if ckpt.meta.get(key) is not None}
    if corpus is not None:
        val = corpus.split(ckpt.meta["train_config"]["val_fraction"])[1]
        full, stored = windowed_loss(model, val), windowed_loss(exported.build_model(), val)
        card["validation"] = {
            "convention": "nats/char on the last 10% of the corpus, windows of 256 characters from a zero state",
            "loss": round(stored, 4),
            "bits_per_char": round(bits_per_char(stored), 4),
            "loss_float32": round(full, 4),
            "loss_state_carried": round(carried_loss(exported.build_model(), val), 4),  # as it reads generating
            "chars": len(val),
        }
    prompt = "".join(c for c in SAMPLE["prompt"] if c in exported.vocab)  # a code corpus may lack "R", ":"
    tokens = generate(
        exported.build_model(),
        exported.vocab,
        prompt,
        SAMPLE["length"],
        SamplingParams(temperature=SAMPLE["temperature"]),
        seed=SAMPLE["seed"],
    )
    card["sample"] = {**SAMPLE, "prompt": prompt, "text": prompt + "".join(t.char for t in tokens)}
    card["sample"]["arithmetic"] = SAMPLE_ARITHMETIC
    if chat_template is not None:
        card["chat_template"] = chat_template.to_card()
    card["copies"] = copies_note(card["name"], ckpt.meta)
    with atomic_write(card_path(out)) as fh:
        fh.write((json.dumps(card, indent=2, ensure_ascii=False) + "\n").encode())
    return card


def copies_note(name: str, meta: dict[str, Any]) -> dict[str, Any]:
    """What the card says of copy detection: the index's file, the text it covers and what an offset counts."""
    corpus = meta.get("corpus") if isinstance(meta.get("corpus"), dict) else {}
    train_config = meta.get("train_config") if isinstance(meta.get("train_config"), dict) else {}
    chars, fraction = corpus.get("chars"), train_config.get("val_fraction")
    trained = chars - int(chars * fraction) if isinstance(chars, int) and isinstance(fraction, float) else None
    corpus_name = corpus.get("name", "the corpus")
    return {
        "index": f"{name}.copies, built by `charrnn index {name}.safetensors --corpus {corpus_name}` (not shipped: "
        "it holds no text and opens only with the corpus)",
        "training_text": f"the first {trained} characters of {corpus_name} (sha256 {corpus.get('sha256')}): the "
        "part before the validation split",
        "offsets": f"a copy's offset counts characters from the start of {corpus_name}'s text, the file whose sha256 "
        "is given",
    }


def _check_template(template: ChatTemplate, alphabet: str) -> None:
    """Refuse a template whose names or headers the model cannot read: every conversation would be refused."""
    missing = template.missing(alphabet)
    if missing:
        raise ChatTemplateError(f"chat_template: the model's vocabulary lacks the characters {missing!r} of its text")
