"""The `charrnn` command line: train, sample, eval, corpus, export, index, serve, generate."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from charrnn.model.config import BOUNDS, CELLS, RESUME_MAY_CHANGE, TRAIN_PRECISIONS, Range, setting_flag
from charrnn.model.copies import DEFAULT_MIN_CHARS, MAX_MIN_CHARS

log = logging.getLogger("charrnn")
DYNAMIC_LR = 1.0  # plain SGD on the segment's mean loss: the shipped model gains 0.044 on 20 k characters


def number(kind: type, low: float, high: float | None = None) -> Callable[[str], Any]:
    """An argparse type that parses `kind` and names the allowed range when a value is outside it."""
    allowed = Range(low, high)

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if not allowed.allows(value):
            raise argparse.ArgumentTypeError(f"must be {allowed.text()}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def add_setting(group: Any, name: str, kind: type, text: str, **kwargs: Any) -> None:
    """Add the flag of the numeric training setting `name`: it allows what the setting allows (model/config.py's
    BOUNDS), and its help, `text`, ends with that range."""
    allowed = BOUNDS[name]
    parse = number(kind, allowed.low, allowed.high)
    group.add_argument(setting_flag(name), type=parse, help=f"{text} ({allowed.text()})", **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line, every flag with help text."""
    parser = argparse.ArgumentParser(prog="charrnn", description="Character-level RNN: train, sample, evaluate, serve.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(commands)
    _add_sample(commands)
    _add_eval(commands)
    _add_corpus(commands)
    _add_export(commands)
    _add_index(commands)
    _add_serve(commands)
    _add_generate(commands)
    return parser


def _add_train(commands: Any) -> None:
    from charrnn.model.recipe import AUTO, PRESET_NAMES

    p = commands.add_parser("train", help="train a model on a corpus", description="Train a model on a corpus.")
    p.add_argument(
        "--corpus",
        required=True,
        help="a UTF-8 text file, a directory of them, or a corpus name (see `charrnn corpus list`)",
    )
    p.add_argument("--out", required=True, type=Path, help="directory for checkpoints, metrics.jsonl and loss.png")
    p.add_argument(
        "--preset",
        choices=PRESET_NAMES,
        default=AUTO,
        help="a named recipe; the flags below override its values. auto (the default) chooses the network, "
        "dropout, batch, learning rate, evaluation and patience for the text's size and vocabulary, the time "
        "budget (default 150 s) and the device, and logs why; cpu-fast is tuned for Tiny Shakespeare",
    )
    may_change = ", ".join(map(setting_flag, RESUME_MAY_CHANGE))
    p.add_argument(
        "--resume",
        action="store_true",
        help=f"continue from the last checkpoint in OUT exactly where it stopped. Only {may_change} (and --threads, "
        "--no-progress, --cache-dir) may differ from the first run; every other setting, given as a flag or by "
        "--preset, must match it, or the resume is refused. A corpus that grew (lines appended, files added) is "
        "trained on from the checkpoint, its new characters added to the vocabulary",
    )
    p.add_argument(
        "--init-from",
        metavar="CHECKPOINT",
        help="fine-tune: start from this trained model (a run directory, a .safetensors checkpoint, or an exported "
        "model such as service/default_model/shakespeare.safetensors). Its network's shape is used (--cell, "
        "--layers, --hidden, --embed may not differ from it); the vocabulary is its characters and the text's; "
        "auto chooses a fine-tuning recipe and logs why",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.add_argument(
        "--cache-dir",
        type=Path,
        help="where encoded corpora are cached (default $CHARRNN_CACHE_DIR or ~/.cache/charrnn)",
    )
    p.add_argument(
        "--threads",
        type=number(int, 1, 1024),
        help="CPU threads for torch (default: torch's choice); 1 is faster on a machine busy with other work",
    )
    net = p.add_argument_group("network")
    net.add_argument("--cell", choices=CELLS, help="recurrent cell")
    add_setting(net, "layers", int, "stacked recurrent layers")
    add_setting(net, "hidden", int, "hidden units per layer")
    add_setting(net, "embed", int, "character embedding size")
    add_setting(net, "dropout", float, "dropout between layers and before the head")
    add_setting(
        net,
        "weight_drop",
        float,
        "DropConnect on the recurrent weights while training (AWD-LSTM's regulariser; 0: off)",
    )
    opt = p.add_argument_group("training")
    add_setting(opt, "batch", int, "tracks read side by side (per rank under torchrun)")
    add_setting(opt, "seq_len", int, "characters per truncated-BPTT window")
    add_setting(
        opt,
        "reset_every",
        int,
        "restart each track from a zero state every N windows, staggered across tracks (0: only each epoch)",
        metavar="N",
    )
    add_setting(opt, "lr", float, "peak learning rate of AdamW")
    add_setting(opt, "min_lr_ratio", float, "final lr as a fraction of the peak")
    add_setting(opt, "warmup_frac", float, "fraction of the run spent warming up")
    add_setting(opt, "weight_decay", float, "AdamW weight decay")
    add_setting(opt, "grad_clip", float, "gradient-norm clipping (0 turns it off)")
    add_setting(opt, "max_steps", int, "stop after this many steps")
    add_setting(
        opt,
        "time_budget",
        float,
        "stop after this many seconds of training, then evaluate and save",
        metavar="SECONDS",
    )
    add_setting(
        opt,
        "eval_every",
        int,
        "evaluate and checkpoint every N steps (with a time budget, --eval-count also applies: whichever comes first)",
    )
    add_setting(
        opt,
        "eval_count",
        int,
        "with a time budget, also evaluate every budget/N seconds of training, so that a run evaluates about N "
        "times whatever its speed (default 20; 0: by --eval-every only)",
        metavar="N",
    )
    add_setting(
        opt,
        "patience",
        int,
        "stop early after N evaluations in a row without a better validation loss (0: never; auto turns it on "
        "for texts the budget reads many times)",
        metavar="N",
    )
    add_setting(
        opt,
        "sample_chars",
        int,
        "characters sampled at each evaluation, at temperatures 0.5 and 1 from a fixed seed, shown in the log "
        "and metrics.jsonl (default 80; 0: none; not counted in the time budget)",
        metavar="N",
    )
    add_setting(
        opt,
        "eval_max_chars",
        int,
        "characters of the validation split read by periodic evaluations (the final reads all)",
    )
    add_setting(opt, "final_eval_max_chars", int, "characters of the validation split read by the final evaluation")
    add_setting(opt, "val_fraction", float, "fraction of the text held out at its end")
    add_setting(
        opt,
        "ema",
        float,
        "evaluate, and keep as best, an exponential moving average of the weights with this decay per step "
        "(e.g. 0.999; last keeps the raw weights for --resume; default 0: off)",
        metavar="DECAY",
    )
    add_setting(opt, "seed", int, "random seed")
    opt.add_argument("--device", help="auto, cpu or cuda[:N] (default auto)")
    opt.add_argument(
        "--precision",
        choices=TRAIN_PRECISIONS,
        help="forward-pass arithmetic: bf16 autocast or fp32 (auto: bf16 on CUDA and on CPUs with native bf16)",
    )
    opt.add_argument("--nonfinite", choices=("stop", "skip"), help="on a NaN/inf loss: stop the run, or skip the step")
    add_setting(opt, "log_every", int, "write a metrics line every N steps")
    p.set_defaults(handler=_run_train)


def _add_sample(commands: Any) -> None:
    p = commands.add_parser(
        "sample", help="generate text from a checkpoint", description="Generate text from a checkpoint."
    )
    p.add_argument("checkpoint", type=Path, help="a .safetensors checkpoint, or a run directory (uses best)")
    p.add_argument("--prompt", default="", help="text to continue (default: empty)")
    p.add_argument(
        "--length",
        "--max-new-chars",  # the service's name for it
        dest="length",
        type=number(int, 1, 1_000_000),
        default=500,
        help="characters to generate (--max-new-chars, as /generate names it, is the same)",
    )
    p.add_argument("--temperature", type=number(float, 0.0, 5.0), default=0.8, help="0 = greedy, up to 5")
    p.add_argument("--top-k", type=number(int, 1), help="sample only from the k likeliest characters")
    p.add_argument("--top-p", type=number(float, 1e-9, 1.0), default=1.0, help="nucleus sampling mass (0, 1]")
    p.add_argument("--seed", type=number(int, 0, 2**63 - 1), help="random seed; the same seed gives the same text")
    p.add_argument("--stop", action="append", default=[], help="stop when this string appears (repeatable)")
    p.add_argument(
        "--unknown-chars",
        choices=("error", "drop"),
        default="error",
        help="what to do with prompt characters the model does not know",
    )
    p.add_argument(
        "--regex",
        help="constrain the generated text to match this regular expression (Python syntax, no anchors or "
        "lookarounds); generation stops once the match is complete",
    )
    p.add_argument(
        "--choice",
        action="append",
        dest="choices",
        help="constrain the generated text to be one of these strings (repeatable)",
    )
    p.add_argument(
        "--presence-penalty",
        type=number(float, -2.0, 2.0),
        default=0.0,
        help="subtracted from a character's logit once it has been generated (OpenAI's meaning), -2 to 2",
    )
    p.add_argument(
        "--frequency-penalty",
        type=number(float, -2.0, 2.0),
        default=0.0,
        help="subtracted from a character's logit for each time it has been generated, -2 to 2",
    )
    p.add_argument(
        "--logit-bias",
        action="append",
        default=[],
        metavar="CHAR=BIAS",
        type=_bias,
        help="add BIAS (-100 to 100) to a character's logit; -100 bans it (repeatable; CHAR may be a vocabulary "
        "index of two or more digits)",
    )
    p.add_argument(
        "--dry-multiplier",
        type=number(float, 0.0, 5.0),
        default=0.0,
        help="DRY repetition penalty (llama.cpp's): a character extending a repeat of n >= --dry-allowed-length "
        "characters loses MULTIPLIER * BASE ** (n - allowed length) from its logit; 0 (default) is off, up to 5",
    )
    p.add_argument(
        "--dry-base", type=number(float, 1.0, 4.0), default=1.75, help="DRY: growth per repeated character, > 1 to 4"
    )
    p.add_argument(
        "--dry-allowed-length",
        type=number(int, 1, 64),
        default=2,
        help="DRY: the longest repeat left unpenalised, 1 to 64",
    )
    p.add_argument(
        "--dry-penalty-last-n",
        type=number(int, -1, 65536),
        default=-1,
        help="DRY: how many of the latest characters (prompt and generated text) are searched; -1 (default) all, "
        "0 none (DRY off)",
    )
    p.add_argument(
        "--dry-sequence-breakers",
        nargs="*",
        metavar="STRING",
        help="DRY: strings a repeat never spans (default: newline, ':', '\"', '*'; give none for no breakers)",
    )
    p.add_argument(
        "--copies",
        nargs="?",
        const=DEFAULT_MIN_CHARS,
        type=number(int, 1, MAX_MIN_CHARS),
        metavar="N",
        help=f"after the text, list on stderr every span of at least N (default {DEFAULT_MIN_CHARS}) characters that "
        "stands verbatim in the training text, with its offset there; needs the checkpoint's copy index "
        "(`charrnn index`)",
    )
    p.set_defaults(handler=_run_sample)


def _bias(text: str) -> tuple[str | int, float]:
    """CHAR=BIAS (split at the last '='), the character as itself or as a vocabulary index of 2+ digits."""
    key, sep, value = text.rpartition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected CHAR=BIAS, got {text!r}")
    bias = number(float, -100.0, 100.0)(value)
    return (int(key) if len(key) > 1 and key.isdigit() else key), bias


def _add_eval(commands: Any) -> None:
    p = commands.add_parser(
        "eval",
        help="validation loss of a checkpoint on a corpus",
        description="Loss in nats and bits per character on a corpus.",
    )
    p.add_argument("checkpoint", type=Path, help="a .safetensors checkpoint, or a run directory (uses best)")
    p.add_argument("--corpus", required=True, help="a path or corpus name")
    p.add_argument(
        "--split",
        choices=("val", "all"),
        default="val",
        help="val: the held-out end of the text, as in training (default); all: the whole text",
    )
    add_setting(p, "val_fraction", float, "held-out fraction (default: the checkpoint's own)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument(
        "--dynamic",
        action="store_true",
        help="also report dynamic evaluation (Krause et al.): the state carried, and after scoring each segment "
        "the model takes an SGD step on it, so that it adapts to the text it has read; beside the static figure",
    )
    p.add_argument("--dynamic-lr", type=number(float, 0.0, 100.0), default=DYNAMIC_LR, help="SGD step of --dynamic")
    p.add_argument(
        "--dynamic-segment",
        type=number(int, 1, 65536),
        default=128,
        help="characters scored between two steps of --dynamic (default 128)",
    )
    p.set_defaults(handler=_run_eval)


def _add_corpus(commands: Any) -> None:
    p = commands.add_parser("corpus", help="list, fetch or describe corpora", description="Named corpora.")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    sub.add_parser("list", help="the named corpora with source and licence")
    fetch = sub.add_parser("fetch", help="download (or build) a named corpus and verify its checksum")
    fetch.add_argument("name", help="a corpus name from `charrnn corpus list`")
    info = sub.add_parser("info", help="size, characters and sha256 of a corpus")
    info.add_argument("name", help="a corpus name or path")
    p.set_defaults(handler=_run_corpus)


def _add_export(commands: Any) -> None:
    p = commands.add_parser(
        "export",
        help="write a checkpoint for serving (weights only, optionally float16) with a model card",
        description="Export a checkpoint for serving, with a model card (NAME.card.json) beside it.",
    )
    p.add_argument("checkpoint", type=Path, help="a .safetensors checkpoint, or a run directory (uses best)")
    p.add_argument("--out", required=True, type=Path, help="the file to write, e.g. models/NAME.safetensors")
    p.add_argument("--half", action="store_true", help="store float16 weights (half the size)")
    p.add_argument("--corpus", help="measure validation loss on this corpus (path or name) for the card")
    p.add_argument("--command", dest="train_command", help="the command that trained the model, recorded in the card")
    p.add_argument(
        "--chat-template",
        type=Path,
        metavar="FILE.json",
        help="how /v1/chat/completions renders a conversation for this model, recorded in the card: a JSON object "
        'such as {"kind": "script", "user": "ROMEO", "assistant": "JULIET"} (kinds: script, transcript; '
        "docs/SERVICE.md); without it the service uses a plain User:/Assistant: transcript",
    )
    p.set_defaults(handler=_run_export)


def _add_index(commands: Any) -> None:
    p = commands.add_parser(
        "index",
        help="build a checkpoint's copy index (NAME.copies), which finds what generated text copies from training",
        description="Build the copy index of the text a checkpoint was trained on, saved beside it as NAME.copies. "
        "The index holds no text: the service and `charrnn sample --copies` read the corpus again when they open it.",
    )
    p.add_argument("checkpoint", type=Path, help="a .safetensors checkpoint, or a run directory (uses best)")
    p.add_argument(
        "--corpus",
        required=True,
        help="the corpus the model was trained on (a name from `charrnn corpus list`, or a path); its sha256 must be "
        "the one the checkpoint records",
    )
    p.add_argument("--cache-dir", type=Path, help="where encoded corpora are cached (default ~/.cache/charrnn)")
    p.set_defaults(handler=_run_index)


def _add_serve(commands: Any) -> None:
    from charrnn.service.config import bounds  # the flags allow what the settings they set allow

    port, workers = bounds("port"), bounds("workers")
    p = commands.add_parser(
        "serve",
        help="run the HTTP service under Gunicorn",
        description="Serve every checkpoint in a model directory over HTTP. The directory is watched: a checkpoint "
        "renamed into it (or replaced, or removed) is served (or no longer served) by every worker within seconds; "
        "POST /admin/reload or SIGHUP to the server checks at once (docs/SERVICE.md, Hot reload).",
    )
    p.add_argument(
        "--model-dir", type=Path, help="directory of checkpoints, watched while serving (default: the shipped model)"
    )
    p.add_argument("--host", help="address to bind (default 127.0.0.1; 0.0.0.0 in Docker)")
    p.add_argument("--port", type=number(int, port.low, port.high), help="port to bind (default 8000)")
    p.add_argument(
        "--workers",
        type=number(int, workers.low, workers.high),
        help="Gunicorn worker processes (default: 2 on 2+ cores)",
    )
    p.set_defaults(handler=_run_serve)


def _add_generate(commands: Any) -> None:
    p = commands.add_parser(
        "generate",
        help="answer a file of /generate request bodies offline, batched as the service batches them",
        description="Answer a JSON-lines file of POST /generate bodies: output line i is the JSON the service "
        "answers for input line i (its error object for a bad line, and the run goes on). A body with "
        '"stream": true is answered with the non-streamed JSON. Exit status 0 when every line was answered.',
    )
    p.add_argument(
        "--model-dir", type=Path, help="directory of checkpoints (default: $CHARRNN_MODEL_DIR, else the shipped model)"
    )
    p.add_argument("--input", required=True, help="a file of /generate bodies, one JSON object a line; - for stdin")
    p.add_argument(
        "--output",
        required=True,
        help="the file of answers, one line per input line; - for stdout. A file that exists is resumed: its "
        "complete lines are kept, as many input lines skipped, the rest appended",
    )
    p.add_argument(
        "--concurrency",
        type=number(int, 1, 4096),
        help="lines in flight at once, their generations batched together (default: the service's max batch, "
        "CHARRNN_MAX_BATCH, 64)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_run_generate)


# -- handlers -----------------------------------------------------------------------------------------


def _run_train(args: argparse.Namespace) -> int:
    from charrnn.corpora.indexed_text import index_after_training
    from charrnn.corpora.registry import resolve
    from charrnn.model.run_plan import plan_run
    from charrnn.model.train import Trainer

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    flags = {k: v for k, v in vars(args).items() if v is not None}
    overrides = {k: flags[k] for k in flags if k in _config_keys()}
    path, name = resolve(args.corpus)
    plan = plan_run(path, name, args.out, args.preset, overrides, args.resume, args.init_from, args.cache_dir)
    trainer = Trainer(
        plan.model_config,
        plan.train_config,
        plan.corpus,
        args.out,
        resume=args.resume,
        progress=not args.no_progress,
        preset=args.preset,
        init_from=plan.parent,
    )
    result = trainer.run()
    if trainer.dist.is_main:
        index_after_training(Path(args.out), plan.corpus, args.corpus, plan.train_config.val_fraction)
        print(
            f"step {result.step}: val loss {result.val_loss:.4f} nats/char; best {result.best_val_loss:.4f} at step "
            f"{result.best_step} on the evaluation windows (`charrnn eval` gives best's figure on the whole split); "
            f"checkpoints in {result.out_dir} (stopped by {result.stopped_by})"
        )
        print(result.summary)
    return 0


def _config_keys() -> frozenset[str]:
    from charrnn.model.config import MODEL_KEYS, TRAIN_KEYS

    return MODEL_KEYS | TRAIN_KEYS


def _run_sample(args: argparse.Namespace) -> int:
    from charrnn.model.checkpoint import load_checkpoint, run_checkpoint
    from charrnn.model.generation import generate, params_for

    ckpt = load_checkpoint(run_checkpoint(args.checkpoint))
    model = ckpt.build_model()
    index = None
    if args.copies is not None:  # before generating: a missing index is an error now, not after the text
        from charrnn.corpora.indexed_text import open_index

        index = open_index(ckpt.path, ckpt.vocab, ckpt.meta)
    params = params_for(
        ckpt.vocab,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        logit_bias=dict(args.logit_bias),
        regex=args.regex,
        choices=args.choices,
        dry_multiplier=args.dry_multiplier,
        dry_base=args.dry_base,
        dry_allowed_length=args.dry_allowed_length,
        dry_penalty_last_n=args.dry_penalty_last_n,
        **({} if args.dry_sequence_breakers is None else {"dry_sequence_breakers": args.dry_sequence_breakers}),
    )
    generation = generate(
        model, ckpt.vocab, args.prompt, args.length, params, seed=args.seed, stop=args.stop, unknown=args.unknown_chars
    )
    sys.stdout.write(args.prompt)
    text = []
    for token in generation:
        sys.stdout.write(token.char)
        sys.stdout.flush()
        text.append(token.char)
    sys.stdout.write("\n")
    sys.stdout.flush()
    log.info("seed %d, finish reason %s", generation.seed, generation.finish_reason)
    if index is not None:
        _print_copies("".join(text), index.find(ckpt.vocab.encode("".join(text)), args.copies), args.copies)
    return 0


def _print_copies(text: str, found: Sequence[Any], min_chars: int) -> None:
    """One line per copy on stderr: where it is in the generated text (after the prompt) and in the training text."""
    print(f"copies of at least {min_chars} characters from the training text: {len(found)}", file=sys.stderr)
    for copy in found:
        print(
            f"  {copy.start}-{copy.end} ({copy.end - copy.start} characters) at offset {copy.offset}: "
            f"{text[copy.start : copy.end]!r}",
            file=sys.stderr,
        )


def _run_eval(args: argparse.Namespace) -> int:
    from charrnn.corpora.registry import resolve
    from charrnn.model.checkpoint import load_checkpoint, run_checkpoint
    from charrnn.model.data import load_corpus
    from charrnn.model.evaluate import bits_per_char, carried_loss, dynamic_loss, windowed_loss
    from charrnn.model.train import resolve_device

    ckpt = load_checkpoint(run_checkpoint(args.checkpoint))
    model = ckpt.build_model(resolve_device(args.device))
    path, name = resolve(args.corpus)
    corpus = load_corpus(path, vocab=ckpt.vocab, name=name)
    fraction = args.val_fraction if args.val_fraction is not None else ckpt.meta["train_config"]["val_fraction"]
    ids = corpus.split(fraction)[1] if args.split == "val" else corpus.ids
    windowed = windowed_loss(model, ids)
    print(
        f"loss: {windowed:.4f} nats/char (windows of 256 from a zero state, {len(ids):,} characters, "
        f"split {args.split})"
    )
    print(f"bits per char: {bits_per_char(windowed):.4f}")
    carried = carried_loss(model, ids)
    print(f"loss with state carried through the split: {carried:.4f} nats/char")
    if args.dynamic:
        dynamic = dynamic_loss(model, ids, lr=args.dynamic_lr, segment=args.dynamic_segment)
        print(
            f"dynamic evaluation (state carried, an SGD step of {args.dynamic_lr:g} after each "
            f"{args.dynamic_segment}-character segment): {dynamic:.4f} nats/char ({dynamic - carried:+.4f} "
            "against the state-carried figure)"
        )
    return 0


def _run_corpus(args: argparse.Namespace) -> int:
    from charrnn.corpora.registry import fetch, manifest, resolve
    from charrnn.model.data import corpus_files, corpus_sha256, scan_characters

    entries = manifest()
    if args.action == "list":
        for entry in entries.values():
            print(f"{entry.name}\n  {entry.description}\n  source: {entry.source}\n  licence: {entry.licence}")
        return 0
    if args.action == "fetch":
        if args.name not in entries:
            raise ValueError(f"unknown corpus {args.name!r}; known: {', '.join(sorted(entries))}")
        print(fetch(entries[args.name]))
        return 0
    path, name = resolve(args.name)
    files = corpus_files(path)
    vocab, n_chars = scan_characters(files)
    print(
        f"name: {name}\npath: {path}\nfiles: {len(files)}\ncharacters: {n_chars:,}\n"
        f"vocabulary: {len(vocab)}\nsha256: {corpus_sha256(files)}"
    )
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from charrnn.corpora.registry import resolve
    from charrnn.model.chat_template import ChatTemplateError
    from charrnn.model.checkpoint import load_checkpoint, run_checkpoint
    from charrnn.model.data import load_corpus
    from charrnn.model.export import card_path, export

    source = run_checkpoint(args.checkpoint)
    corpus = None
    if args.corpus:
        path, name = resolve(args.corpus)
        corpus = load_corpus(path, vocab=load_checkpoint(source).vocab, name=name)
    template = _read_chat_template(args.chat_template) if args.chat_template else None
    try:
        card = export(source, args.out, args.half, corpus, args.train_command, template)
    except ChatTemplateError as exc:  # names or headers in characters the model lacks
        raise ValueError(f"--chat-template {args.chat_template}: {exc}") from None
    print(f"wrote {args.out} ({card['file_bytes']:,} bytes) and {card_path(args.out)}")
    if "validation" in card:
        print(
            f"validation loss {card['validation']['loss']:.4f} nats/char "
            f"(float32 weights: {card['validation']['loss_float32']:.4f})"
        )
    return 0


def _run_index(args: argparse.Namespace) -> int:
    from charrnn.corpora.indexed_text import index_checkpoint

    started = time.perf_counter()
    path, index = index_checkpoint(args.checkpoint, args.corpus, cache_dir=args.cache_dir)
    size = path.stat().st_size
    print(
        f"{path}: {index.chars:,} characters of {index.header['corpus'].get('name')} indexed in "
        f"{time.perf_counter() - started:.1f} s, {size:,} bytes ({size / index.chars:.2f} bytes per character)"
    )
    return 0


def _read_chat_template(path: Path) -> Any:
    """The --chat-template file's template; a file that is unreadable, not JSON or not a template names the flag."""
    import json

    from charrnn.model.chat_template import ChatTemplate

    try:
        return ChatTemplate.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:
        raise ValueError(f"--chat-template {path}: {exc}") from None


def _run_serve(args: argparse.Namespace) -> int:
    from charrnn.service.web.server import serve

    return serve(model_dir=args.model_dir, host=args.host, port=args.port, workers=args.workers)


def _run_generate(args: argparse.Namespace) -> int:
    from charrnn.batch import generate_jsonl

    summary = generate_jsonl(args.input, args.output, args.model_dir, args.concurrency, args.quiet)
    skipped = f"; {summary.skipped:,} skipped, answered by an earlier run" if summary.skipped else ""
    print(
        f"charrnn generate: {summary.lines:,} lines answered, {summary.failed:,} of them with an error{skipped}; "
        f"{summary.chars:,} characters in {summary.seconds:.1f} s ({summary.chars_per_second:,.0f} characters/s)",
        file=sys.stderr,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `charrnn` console script."""
    from charrnn.model.checkpoint import CheckpointError
    from charrnn.model.config import ConfigError
    from charrnn.model.data import CorpusError
    from charrnn.model.decoding import SamplingError
    from charrnn.model.distributed import RankFailedError
    from charrnn.model.train import TrainingError
    from charrnn.model.vocab import UnknownCharactersError

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.handler(args)
    except ConfigError as exc:
        print(f"charrnn {args.command}: error: {setting_flag(exc.field)}: {exc.message}", file=sys.stderr)
    except SamplingError as exc:  # name the flag, as argparse does
        flag = {"max_new_chars": "length", "choices": "choice"}.get(exc.field, exc.field).replace("_", "-")
        print(f"charrnn {args.command}: error: --{flag}: {str(exc).removeprefix(exc.field + ': ')}", file=sys.stderr)
    except (
        CorpusError,
        CheckpointError,
        TrainingError,
        RankFailedError,
        UnknownCharactersError,
        ValueError,
        OSError,
    ) as exc:
        print(f"charrnn {args.command}: error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"charrnn {args.command}: interrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
