"""lm-evaluation-harness, a real client, evaluates the served default model through `local-completions`.

The harness asks the tokenizer endpoints (`tokenizer_backend=remote`, so it downloads no tokenizer),
sends token-id prompts with `echo`, `logprobs` and `max_tokens` (loglikelihood) and relies on the
server's `stop` (generate_until). Tasks and data are files this test writes; everything runs offline.

The harness is heavy (transformers, datasets, ...), so it lives in its own virtual environment:
`make test-harness` builds `.venv-harness` and runs this tier with CHARRNN_LM_EVAL pointing at its
`lm_eval`. Without one this tier is skipped, except when CHARRNN_REQUIRE_HARNESS=1 (`make test-harness`,
so CI), where a missing harness fails.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from charrnn.service.config import DEFAULT_MODEL_DIR
from tests.helpers import REPO, GunicornServer, start_gunicorn

pytestmark = [pytest.mark.harness, pytest.mark.slow]

# Well-known lines of Shakespeare (public domain), typed here: the context is the first part of a line,
# the true continuation the rest; the wrong choices are the same characters shuffled.
LINES = [
    ("To be, or not to be,", " that is the question:"),
    ("Now is the winter of", " our discontent"),
    ("Friends, Romans, countrymen,", " lend me your ears;"),
    ("All the world's a stage,", " and all the men and women merely players"),
    ("O Romeo, Romeo!", " wherefore art thou Romeo?"),
    ("The quality of mercy", " is not strain'd,"),
    ("If music be the food of love,", " play on;"),
    ("Shall I compare thee", " to a summer's day?"),
    ("What's in a name? That which we call a rose", " by any other name would smell as sweet;"),
    ("Once more unto the breach, dear friends,", " once more;"),
    ("A horse! a horse!", " my kingdom for a horse!"),
    ("Good night, good night!", " parting is such sweet sorrow,"),
    ("Double, double", " toil and trouble;"),
    ("The lady doth protest", " too much, methinks."),
    ("Uneasy lies the head", " that wears a crown."),
    ("Cowards die many times", " before their deaths;"),
    ("We are such stuff", " as dreams are made on,"),
    ("Something is rotten", " in the state of Denmark."),
    ("Though this be madness,", " yet there is method in't."),
    ("But, soft! what light through yonder", " window breaks?"),
]
CHOICES = 4
GENERATE_PROMPTS = ["ROMEO:\n", "JULIET:\n", "KING RICHARD III:\n", "First Citizen:\n"]


def lm_eval_executable() -> str | None:
    candidates = [os.environ.get("CHARRNN_LM_EVAL"), str(REPO / ".venv-harness" / "bin" / "lm_eval")]
    found = next((c for c in candidates if c and Path(c).exists()), None)
    return found or shutil.which("lm_eval")


@pytest.fixture(scope="module")
def lm_eval() -> str:
    found = lm_eval_executable()
    if found is None:
        if os.environ.get("CHARRNN_REQUIRE_HARNESS") == "1":
            pytest.fail("lm_eval not found: CHARRNN_LM_EVAL must point at it (make test-harness builds it)")
        pytest.skip("lm-evaluation-harness is not installed: `make test-harness` installs and runs it")
    return found


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornServer]:
    """Gunicorn serving the shipped default model, as `make serve` does."""
    log = tmp_path_factory.mktemp("harness-gunicorn") / "server.log"
    server = start_gunicorn(DEFAULT_MODEL_DIR, log, CHARRNN_TORCH_THREADS="2")
    yield server
    server.stop()


def write_tasks(folder: Path) -> None:
    """A multiple-choice task scored by log-likelihood and a generate_until task, on local jsonl files."""
    rng = random.Random(0)
    with open(folder / "choice.jsonl", "w", encoding="utf-8") as out:
        for context, truth in LINES:
            wrong = []
            while len(wrong) < CHOICES - 1:
                shuffled = truth[0] + "".join(rng.sample(truth[1:], len(truth) - 1))  # keeps the leading space
                if shuffled != truth and shuffled not in wrong:
                    wrong.append(shuffled)
            choices = [truth, *wrong]
            rng.shuffle(choices)
            out.write(json.dumps({"context": context, "choices": choices, "label": choices.index(truth)}) + "\n")
    with open(folder / "generate.jsonl", "w", encoding="utf-8") as out:
        for prompt in GENERATE_PROMPTS:
            out.write(json.dumps({"context": prompt, "target": ""}) + "\n")
    (folder / "charrnn_choice.yaml").write_text(
        f"""task: charrnn_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / "choice.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
""",
        encoding="utf-8",
    )
    (folder / "charrnn_generate.yaml").write_text(
        f"""task: charrnn_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / "generate.jsonl"}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 80
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
""",
        encoding="utf-8",
    )


def run_harness(lm_eval: str, server: GunicornServer, tasks: Path, out: Path) -> dict:
    model_args = ",".join(
        [
            f"base_url={server.url}/v1/completions",
            "model=shakespeare",
            "tokenizer_backend=remote",
            "tokenized_requests=True",
            "num_concurrent=2",
            "max_retries=1",
        ]
    )
    command = [lm_eval, "run", "--model", "local-completions", "--model_args", model_args]
    command += ["--tasks", "charrnn_choice,charrnn_generate", "--include_path", str(tasks)]
    command += ["--output_path", str(out), "--log_samples"]
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env = os.environ | offline | {"HF_HOME": str(out / "hf-home"), "OPENAI_API_KEY": "unused"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-6000:]
    (results,) = out.rglob("results_*.json")
    return json.loads(results.read_text())


def test_the_harness_scores_choices_and_generates_through_the_server(
    lm_eval: str, server: GunicornServer, tmp_path: Path
) -> None:
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_tasks(tasks)
    results = run_harness(lm_eval, server, tasks, tmp_path / "out")
    accuracy = results["results"]["charrnn_choice"]["acc,none"]
    print(f"multiple choice: {accuracy:.2f} of {len(LINES)} true continuations picked (chance {1 / CHOICES:.2f})")
    assert accuracy >= 0.8  # shuffled letters are far less likely under a Shakespeare model

    (samples,) = (tmp_path / "out").rglob("samples_charrnn_generate_*.jsonl")
    generations = [json.loads(line)["resps"][0][0] for line in samples.read_text().splitlines()]
    assert len(generations) == len(GENERATE_PROMPTS)
    assert all(text and "\n" not in text for text in generations), generations  # the server applied `stop`
