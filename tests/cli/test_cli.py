import re
from pathlib import Path

import pytest

from charrnn.cli import build_parser
from tests.helpers import run_cli


def test_sample_prints_prompt_and_continuation_reproducibly(trained_run: Path, capsys) -> None:
    code, first, _ = run_cli(capsys, "sample", str(trained_run), "--prompt", "The ", "--length", "40", "--seed", "7")
    assert code == 0 and first.startswith("The ") and len(first) == len("The ") + 40 + 1
    _, second, _ = run_cli(
        capsys, "sample", str(trained_run / "best.safetensors"), "--prompt", "The ", "--length", "40", "--seed", "7"
    )
    assert first == second
    _, third, _ = run_cli(  # the service's name for the length
        capsys, "sample", str(trained_run), "--prompt", "The ", "--max-new-chars", "40", "--seed", "7"
    )
    assert third == first


def test_eval_prints_nats_then_bits_then_carried(trained_run: Path, text_file: Path, capsys) -> None:
    code, out, _ = run_cli(capsys, "eval", str(trained_run), "--corpus", str(text_file))
    lines = out.splitlines()
    assert code == 0
    assert lines[0].startswith("loss: ") and "nats/char" in lines[0]
    assert lines[1].startswith("bits per char: ")
    assert "state carried" in lines[2]
    code, out_all, _ = run_cli(capsys, "eval", str(trained_run), "--corpus", str(text_file), "--split", "all")
    assert code == 0 and "split all" in out_all


def test_train_from_the_command_line(text_file: Path, tmp_path: Path, capsys) -> None:
    code, out, _ = run_cli(
        capsys,
        "train",
        "--corpus",
        str(text_file),
        "--out",
        str(tmp_path / "run"),
        "--preset",
        "tiny",
        "--max-steps",
        "20",
        "--no-progress",
        "--cell",
        "gru",
        "--hidden",
        "32",
    )
    assert code == 0 and "step 20" in out
    assert (tmp_path / "run" / "best.safetensors").exists()
    assert (tmp_path / "run" / "best.copies").exists()  # the copy index of the text it trained on


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "corpus not found"),
        (b"", "empty"),
        (b"\xff\xfe\x00bad", "not valid UTF-8"),
        (b"short text", "too short for one batch"),
    ],
    ids=["missing", "empty", "not-utf8", "too-short"],
)
def test_bad_corpora_fail_with_a_message(tmp_path: Path, capsys, content: bytes | None, message: str) -> None:
    path = tmp_path / "corpus.txt"
    if content is not None:
        path.write_bytes(content)
    code, _, err = run_cli(capsys, "train", "--corpus", str(path), "--out", str(tmp_path / "out"), "--no-progress")
    assert code == 1
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--hidden", "0"], "argument --hidden: must be between 1 and 16384, got 0"),
        (["--layers", "17"], "argument --layers: must be between 1 and 16, got 17"),  # model.config.MAX_LAYERS
        (["--lr", "abc"], "argument --lr: expected a number, got 'abc'"),
        (["--dropout", "2"], "argument --dropout: must be between 0.0 and 0.95"),
        (["--cell", "transformer"], "argument --cell: invalid choice"),
        (["--preset", "huge"], "argument --preset: invalid choice"),
        (["--device", "tpu"], "--device: must be auto, cpu or cuda"),
        (["--precision", "fp8"], "argument --precision: invalid choice"),
    ],
)
def test_bad_flags_name_the_flag_and_the_allowed_range(text_file: Path, tmp_path: Path, capsys, argv, message) -> None:
    code, _, err = run_cli(
        capsys, "train", "--corpus", str(text_file), "--out", str(tmp_path / "o"), "--no-progress", *argv
    )
    assert code in (1, 2)
    assert message in err


def test_serve_flags_allow_what_the_settings_they_set_allow(capsys) -> None:
    args = build_parser().parse_args(["serve", "--port", "0", "--workers", "100"])  # CHARRNN_WORKERS has no maximum
    assert (args.port, args.workers) == (0, 100)
    code, _, err = run_cli(capsys, "serve", "--port", "65536")
    assert code == 2 and "argument --port: must be between 0 and 65535, got 65536" in err


def test_sample_refuses_a_bad_checkpoint_and_unknown_prompt_characters(
    trained_run: Path, tmp_path: Path, capsys
) -> None:
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"\x80\x04not really")
    code, _, err = run_cli(capsys, "sample", str(bogus))
    assert code == 1 and "pickle" in err
    code, _, err = run_cli(capsys, "sample", str(trained_run), "--prompt", "東京")
    assert code == 1 and "'東'" in err
    code, _, err = run_cli(capsys, "sample", str(trained_run), "--temperature", "9")
    assert code == 2 and "--temperature" in err


def test_corpus_list_and_info(capsys, text_file: Path) -> None:
    code, out, _ = run_cli(capsys, "corpus", "list")
    assert code == 0 and "tinyshakespeare" in out and "python-stdlib" in out and "licence" in out
    code, out, _ = run_cli(capsys, "corpus", "info", str(text_file))
    assert code == 0 and "characters: 40,000" in out and "sha256: " in out


def test_export_writes_half_precision_weights_and_a_model_card(
    trained_run: Path, text_file: Path, tmp_path: Path, capsys
) -> None:
    import json

    from charrnn.model.checkpoint import load_checkpoint

    out = tmp_path / "models" / "demo.safetensors"
    code, stdout, _ = run_cli(
        capsys,
        "export",
        str(trained_run),
        "--out",
        str(out),
        "--half",
        "--corpus",
        str(text_file),
        "--command",
        "charrnn train --preset tiny",
    )
    assert code == 0 and "validation loss" in stdout
    card = json.loads((tmp_path / "models" / "demo.card.json").read_text())
    assert card["weights"] == "float16" and card["command"] == "charrnn train --preset tiny"
    assert abs(card["validation"]["loss"] - card["validation"]["loss_float32"]) < 0.005
    assert 0 < card["validation"]["loss_state_carried"] < card["validation"]["loss"] + 0.1
    assert card["sample"]["text"].startswith(card["sample"]["prompt"]) and card["corpus"]["sha256"]
    assert card["corpus"]["sha256"] in card["copies"]["training_text"] and "offset" in card["copies"]["offsets"]
    assert out.stat().st_size < (trained_run / "best.safetensors").stat().st_size
    assert load_checkpoint(out).meta["half"] is True


def resume(capsys, run_dir: Path, corpus: Path, *argv: str) -> tuple[int, str, str]:
    return run_cli(capsys, "train", "--corpus", str(corpus), "--out", str(run_dir), "--resume", "--no-progress", *argv)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch", "4"], "--batch 4 (was 8)"),
        (["--seq-len", "16"], "--seq-len 16 (was 32)"),
        (["--reset-every", "2"], "--reset-every 2 (was 0)"),
        (["--lr", "0.005"], "--lr 0.005 (was 0.01)"),
        (["--min-lr-ratio", "0.1"], "--min-lr-ratio 0.1 (was 0.05)"),
        (["--warmup-frac", "0.1"], "--warmup-frac 0.1 (was 0.05)"),
        (["--weight-decay", "0.1"], "--weight-decay 0.1 (was 0.0)"),
        (["--grad-clip", "1"], "--grad-clip 1.0 (was 5.0)"),
        (["--val-fraction", "0.2"], "--val-fraction 0.2 (was 0.1)"),
        (["--seed", "1"], "--seed 1 (was 1337)"),
        (["--precision", "bf16"], "--precision bf16 (was fp32)"),
        (["--cell", "gru"], "--cell gru (was lstm)"),
        (["--hidden", "32"], "--hidden 32 (was 64)"),
        (["--dropout", "0.1"], "--dropout 0.1 (was 0.0)"),
        (["--weight-drop", "0.1"], "--weight-drop 0.1 (was 0.0)"),
        (["--batch", "4", "--seq-len", "16"], "--batch 4 (was 8), --seq-len 16 (was 32)"),
    ],
)
def test_resume_refuses_a_changed_recipe_naming_the_flag_and_both_values(
    trained_run: Path, text_file: Path, capsys, argv: list[str], message: str
) -> None:
    before = (trained_run / "last.safetensors").read_bytes()
    code, _, err = resume(capsys, trained_run, text_file, "--preset", "tiny", *argv)
    assert code == 1
    assert err.startswith("charrnn train: error: --resume: ") and message in err and "Traceback" not in err
    assert "only --max-steps, --time-budget" in err
    assert (trained_run / "last.safetensors").read_bytes() == before  # refused before anything ran


def test_resume_may_change_how_long_and_how_often_to_evaluate(
    trained_run: Path, text_file: Path, tmp_path: Path, capsys
) -> None:
    import shutil

    from charrnn.model.checkpoint import load_checkpoint

    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    allowed = "--max-steps 160 --time-budget 600 --eval-every 4 --eval-max-chars 512 --final-eval-max-chars 1024"
    allowed += " --log-every 3 --nonfinite skip --device cpu --threads 1"
    code, out, err = resume(capsys, run_dir, text_file, "--preset", "tiny", *allowed.split())
    assert code == 0 and "step 160" in out, err
    last = load_checkpoint(run_dir / "last.safetensors")
    assert last.meta["train_config"]["max_steps"] == 160 and last.meta["preset"] == "tiny"
    # Resuming without the preset it was trained with (the default is auto, which chooses 256 units for
    # this 40,000-character text) changes the whole recipe: the message says which.
    code, _, err = resume(capsys, run_dir, text_file, "--max-steps", "170")
    assert code == 1 and "--hidden 256 (was 64)" in err and "(it was trained with --preset tiny)" in err


def test_resume_help_says_which_flags_may_change(capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "1000")  # one line per flag: no hyphenated words broken by wrapping
    code, out, _ = run_cli(capsys, "train", "--help")
    assert code == 0
    text = " ".join(out.split())
    assert "Only --max-steps, --time-budget, --eval-every" in text and "must match it" in text


def test_train_defaults_to_auto_says_why_and_ends_with_a_verdict(
    text_file: Path, tmp_path: Path, capsys, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from charrnn.model.checkpoint import load_checkpoint

    with caplog.at_level(logging.INFO):
        code, out, err = run_cli(
            capsys, "train", "--corpus", str(text_file), "--out", str(tmp_path / "run"), "--no-progress",
            "--max-steps", "20", "--patience", "3", "--eval-count", "10", "--sample-chars", "12", "--threads", "1",
        )  # fmt: skip
    assert code == 0, err
    assert (
        "--preset auto chose" in caplog.text and "dropout " in caplog.text and "patience      3 (given" in caplog.text
    )
    assert "sample at step 20, temperature 0.5: " in caplog.text
    first, verdict = out.splitlines()[-2:]
    assert first.startswith("step 20: ") and "at step 20" in first
    assert verdict.startswith(("still improving", "levelled off", "overfitted"))
    last = load_checkpoint(tmp_path / "run" / "last.safetensors")
    assert last.meta["preset"] == "auto" and last.config.hidden == 256
    assert last.meta["train_config"]["patience"] == 3 and last.meta["train_config"]["eval_every"] == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--patience", "-1"], "argument --patience: must be between 0 and 1000000, got -1"),
        (["--eval-count", "x"], "argument --eval-count: expected an integer, got 'x'"),
        (["--sample-chars", "100000"], "argument --sample-chars: must be between 0 and 10000"),
    ],
)
def test_bad_evaluation_flags_name_the_flag(text_file: Path, tmp_path: Path, capsys, argv, message) -> None:
    code, _, err = run_cli(capsys, "train", "--corpus", str(text_file), "--out", str(tmp_path / "o"), *argv)
    assert code == 2 and message in err


def test_eval_dynamic_reports_dynamic_evaluation_beside_the_static_figures(
    trained_run: Path, text_file: Path, capsys
) -> None:
    code, out, err = run_cli(capsys, "eval", str(trained_run), "--corpus", str(text_file), "--dynamic")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("loss: ") and "state carried" in lines[2]  # the static figures stay, first
    assert lines[3].startswith("dynamic evaluation (state carried, an SGD step of 1 after each 128-character ")
    assert "against the state-carried figure" in lines[3]


def test_sample_steers_with_a_regex_choices_penalties_and_bias(trained_run: Path, capsys) -> None:
    code, out, _ = run_cli(
        capsys, "sample", str(trained_run), "--prompt", "The ", "--seed", "2", "--regex", "[a-z]+ dog!"
    )
    assert code == 0 and re.fullmatch(r"The [a-z]+ dog!\n", out)
    code, out, _ = run_cli(capsys, "sample", str(trained_run), "--prompt", "", "--choice", "fox", "--choice", "hen")
    assert code == 0 and out in ("fox\n", "hen\n")
    args = ["--length", "200", "--seed", "4", "--logit-bias", "e=-100", "--logit-bias", " =-100"]
    code, out, _ = run_cli(capsys, "sample", str(trained_run), *args, "--frequency-penalty", "0.5")
    assert code == 0 and "e" not in out and " " not in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--regex", "("], "--regex: not a valid regular expression"),
        (["--regex", "Ω+"], "--regex: no text made of this model's characters can match"),
        (["--logit-bias", "Ω=1"], "--logit-bias: 'Ω' is not a character"),
        (["--logit-bias", "e"], "argument --logit-bias: expected CHAR=BIAS"),
        (["--logit-bias", "e=200"], "argument --logit-bias: must be between -100.0 and 100.0"),
        (["--presence-penalty", "3"], "argument --presence-penalty: must be between -2.0 and 2.0"),
    ],
)
def test_bad_steering_flags_name_the_flag(trained_run: Path, capsys, argv: list[str], message: str) -> None:
    code, _, err = run_cli(capsys, "sample", str(trained_run), "--length", "5", *argv)
    assert code in (1, 2)
    assert message in err
