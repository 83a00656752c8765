"""The trainer: truncated BPTT over a memory-mapped corpus, AdamW, warmup + cosine, safe checkpoints.

Nothing here knows about HTTP. Under torchrun, each rank reads its own tracks of the corpus,
DistributedDataParallel all-reduces the gradients, the ranks agree on the elapsed time and on an
interrupt before every step (so they share one schedule and stop together), and only rank 0 writes
files or shows progress.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from charrnn.model import plot
from charrnn.model.checkpoint import BEST, LAST, SUFFIX, load_checkpoint, save_checkpoint
from charrnn.model.config import RESUME_MAY_CHANGE, ModelConfig, TrainConfig, setting_flag
from charrnn.model.cpu import cpu_flags
from charrnn.model.data import Corpus, CorpusError, TrackBatcher, corpus_growth, corpus_stats
from charrnn.model.decoding import SamplingParams
from charrnn.model.diagnosis import diagnose
from charrnn.model.distributed import Distributed, weights_digest
from charrnn.model.evaluate import bits_per_char, windowed_loss
from charrnn.model.generation import generate
from charrnn.model.network import CharRNN, State, detach_state, state_from_tensors, state_tensors
from charrnn.model.text_warnings import text_warnings
from charrnn.model.vocab import Vocab
from charrnn.model.vocab_growth import VOCAB_ROWS, added_ids, grow_rows, grow_weights

if TYPE_CHECKING:
    from charrnn.model.finetune import Parent

log = logging.getLogger(__name__)

PLOT_INTERVAL_S = 30.0
SAMPLE_TEMPERATURES = (0.5, 1.0)  # the samples shown at each evaluation, each drawn with seed SEED
SEED = 1
EVAL_SHARE_CAP = 4.0  # evaluations by the clock wait for 4x their cost in training: at most ~20 % of the budget


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a resume that does not match); the message says why."""


@dataclass
class TrainResult:
    """Where a run ended."""

    step: int
    train_loss: float | None
    val_loss: float | None
    best_val_loss: float | None
    elapsed: float
    out_dir: Path
    stopped_by: str  # "max_steps", "time_budget", "patience", "interrupt" or "stop_at_step"
    best_step: int | None = None
    summary: str = ""  # how the run went (overfitted, still improving, ...) and what to try


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when there is a GPU, else the CPU; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError("--device cuda was asked for, but no CUDA device is available")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the forward pass, or None for plain float32 (see TrainConfig.precision).

    "bf16" on a CPU whose oneDNN has no bfloat16 (no AVX-512: an AVX2-only CPU) is refused with a clear
    message: PyTorch's LSTM under bfloat16 autocast would fail there at the first step ("could not create
    a primitive descriptor for the LSTM forward propagation primitive")."""
    if name == "fp32":
        return None
    if name == "bf16" and device.type == "cpu" and not cpu_runs_bf16():
        raise TrainingError(
            "--precision bf16: this CPU has no bfloat16 in PyTorch's oneDNN (on x86 it needs AVX-512; this one"
            f" has {cpu_simd()}), where PyTorch's LSTM cannot run in bfloat16 (and nothing gains from it): use"
            " --precision fp32 (or auto, which is fp32 here)"
        )
    if name == "bf16" or device.type == "cuda" or cpu_has_native_bf16():
        return torch.bfloat16
    return None


def cpu_runs_bf16() -> bool:
    """Whether PyTorch's oneDNN runs bfloat16 on this CPU at all (AVX-512 or newer), natively or not."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_simd() -> str:
    """This CPU's vector instructions as PyTorch names them (DEFAULT, AVX2, AVX512...), for messages."""
    return torch.backends.cpu.get_cpu_capability()


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX, which oneDNN's bf16 kernels need to be faster than float32 (Linux flags)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags()) and cpu_runs_bf16()


def learning_rate(cfg: TrainConfig, progress: float) -> float:
    """Linear warmup over the first `warmup_frac` of the run, then cosine decay to lr * min_lr_ratio."""
    if progress < cfg.warmup_frac:
        return cfg.lr * max(progress / cfg.warmup_frac, 0.01)
    decay = min(1.0, (progress - cfg.warmup_frac) / max(1.0 - cfg.warmup_frac, 1e-9))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * decay)))


class Trainer:
    """Trains one model on one corpus, writing `best`/`last` checkpoints, metrics and a loss plot."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        cfg: TrainConfig,
        corpus: Corpus,
        out_dir: str | Path,
        resume: bool = False,
        progress: bool = True,
        preset: str | None = None,
        init_from: Parent | None = None,
    ):
        self.cfg, self.corpus, self.out_dir, self.preset = cfg, corpus, Path(out_dir), preset
        self.dist = Distributed.from_environment(cfg.device)
        self._check_same_corpus()
        self.device = self.dist.device if self.dist.enabled else resolve_device(cfg.device)
        self.show_progress = progress and self.dist.is_main
        torch.manual_seed(cfg.seed)
        self.model = CharRNN(model_cfg).to(self.device)
        self.wrapped: nn.Module = self.dist.wrap(self.model)
        # fused: one kernel for every parameter's update, 1.6 against 13 ms a step for the 2 x 512 LSTM on
        # one Zen 5 core (torch's default on a CPU updates one tensor at a time).
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            weight_decay=cfg.weight_decay,
            fused=True,
        )
        # The moving average of the weights (--ema), one tensor per parameter, or None.
        self.ema = [p.detach().clone() for p in self.model.parameters()] if cfg.ema else None
        train_ids, self.val_ids = corpus.split(cfg.val_fraction)
        self.batcher = TrackBatcher(train_ids, cfg.batch, cfg.seq_len, self.dist.rank, self.dist.world)
        if len(self.val_ids) < 2:
            raise TrainingError("validation split is empty: use a larger corpus or a larger --val-fraction")
        self.step, self.elapsed = 0, 0.0
        self.state: State | None = None
        self.train_loss: float | None = None
        self.val_loss: float | None = None
        self.compared_val_loss: float | None = None  # the last evaluation on the windows `best` is chosen on
        self.best_val_loss: float | None = None
        self.best_step: int | None = None
        self.best_train_loss: float | None = None  # the training loss when `best` was saved
        self.evals_since_best = 0  # evaluations without a new best, for --patience
        self.started_at = datetime.now(UTC).isoformat(timespec="seconds")
        self._plotted_at = float("-inf")
        self._last_eval_elapsed: float | None = None  # the agreed elapsed time of the last evaluation
        # What the last evaluation cost, in agreed seconds (its step included), learnt at the first agreement
        # after it: evaluations by the clock wait until training has had EVAL_SHARE_CAP x that much time.
        self._eval_cost, self._measure_eval_cost = 0.0, False
        # What the checkpoints record beyond this run's corpus: the model it was fine-tuned from (--init-from),
        # and the corpora it was trained on before its corpus grew (--resume).
        self.parent: dict[str, Any] | None = init_from.record() if init_from is not None else None
        self.earlier_corpora: list[dict[str, Any]] = []
        if resume:
            self._restore()
        else:
            self._check_out_dir_is_free()
            if init_from is not None:
                self._start_from(init_from)
        # after --resume's check of the recipe, so that a changed --precision is named as a change first
        self.autocast_dtype = resolve_precision(cfg.precision, self.device)
        if self.dist.is_main:
            stats, size = corpus_stats(corpus, cfg.val_fraction), self.model.num_parameters()
            for warning in text_warnings(stats, size, fine_tuning=self.parent is not None):
                log.warning("%s", warning)

    def _check_out_dir_is_free(self) -> None:
        """Refuse to start over a run. Only rank 0's --out counts (it alone writes); its refusal stops every rank."""
        with self.dist.failing_together():
            if self.dist.is_main and ((self.out_dir / LAST).exists() or (self.out_dir / BEST).exists()):
                raise TrainingError(
                    f"{self.out_dir} already holds a training run; pass --resume to continue it, "
                    "or choose another --out (nothing there is overwritten)"
                )

    def _check_same_corpus(self) -> None:
        """Under torchrun every rank cuts the same text into tracks and reads its own: a machine holding
        another text (another version of a file) would train on the wrong tracks, so refuse it."""
        corpora = self.dist.gather_digests(len(self.corpus), self.corpus.sha256)
        if len(set(corpora)) > 1:
            each = "; ".join(f"rank {r}: {n:,} characters, sha256 {sha[:16]}" for r, (n, sha) in enumerate(corpora))
            self.dist.close()  # every rank stops here: leave the group now (gloo's teardown at exit aborted a rank)
            raise TrainingError(f"the ranks read different corpora ({each}); give every machine the same --corpus text")

    # -- the loop -------------------------------------------------------------------------------

    def run(self, stop_at_step: int | None = None) -> TrainResult:
        """Train until max_steps, the time budget, Ctrl-C/SIGTERM or `stop_at_step`; evaluate and save."""
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        cfg, stopped_by = self.cfg, "max_steps"
        bar = self._progress_bar()
        chars_per_step = cfg.batch * cfg.seq_len * self.dist.world
        if self.parent is not None and self.step == 0:  # the parent's figure on this text: `best` starts there
            self._evaluate_and_save()
        interrupted = _InterruptFlag()
        window_start, window_steps = time.perf_counter(), 0
        with interrupted:
            while self.step < cfg.max_steps:
                # Under torchrun the ranks' clocks and signals differ: every rank takes the longest elapsed
                # time and any rank's interrupt, so all use the same lr and stop at the same step. The
                # evaluation schedule is decided from this agreed time too, never from a rank's own clock.
                self.elapsed, stop = self.dist.agree(self.elapsed, interrupted.flag)
                agreed = self.elapsed
                if self._measure_eval_cost:
                    self._eval_cost, self._measure_eval_cost = agreed - (self._last_eval_elapsed or 0.0), False
                if stop_at_step is not None and self.step >= stop_at_step:
                    stopped_by = "stop_at_step"
                    break
                if cfg.time_budget is not None and self.elapsed >= cfg.time_budget:
                    stopped_by = "time_budget"
                    break
                if stop:
                    stopped_by = "interrupt"
                    break
                tick = time.perf_counter()
                self._train_step()
                self.elapsed += time.perf_counter() - tick
                window_steps += 1
                if self.step % cfg.log_every == 0:
                    rate = window_steps * chars_per_step / max(time.perf_counter() - window_start, 1e-9)
                    self._log_train(rate, bar)
                    window_start, window_steps = time.perf_counter(), 0
                if self.step < cfg.max_steps and self.evaluation_due(agreed):
                    self._last_eval_elapsed, self._measure_eval_cost = agreed, True
                    tick = time.perf_counter()
                    self._evaluate_and_save()
                    self.elapsed += time.perf_counter() - tick
                    self._show_samples()
                    window_start = time.perf_counter()
                    if cfg.patience and self.evals_since_best >= cfg.patience:
                        stopped_by = "patience"
                        log.info(
                            "stopping early: no better validation loss in %d evaluations (--patience %d); "
                            "best %.4f nats/char at step %d",
                            self.evals_since_best,
                            cfg.patience,
                            self.best_val_loss,
                            self.best_step,
                        )
                        break
        if bar is not None:
            bar.close()
        self._evaluate_and_save(final=True)
        self._show_samples()
        summary = self.summary()
        if self.dist.is_main:
            log.info(
                "stopped by %s at step %d: val loss %.4f nats/char (%.4f bits)",
                stopped_by,
                self.step,
                self.val_loss,
                bits_per_char(self.val_loss),
            )
            log.info("%s", summary)
        self._log_how_ranks_end()
        # Rank 0 has just saved and plotted while the others waited for nothing: one more agreement
        # before leaving the group, so that no rank tears it down while another is still busy; and the
        # DistributedDataParallel wrapper goes first (its reducer outliving the group aborted a rank at exit).
        self.dist.agree(self.elapsed, False)
        if self.wrapped is not self.model:
            self.wrapped = self.model
            gc.collect()
        self.dist.close()
        return TrainResult(
            self.step,
            self.train_loss,
            self.val_loss,
            self.best_val_loss,
            self.elapsed,
            self.out_dir,
            stopped_by,
            self.best_step,
            summary,
        )

    def _log_how_ranks_end(self) -> None:
        """Under torchrun, rank 0 logs whether every rank ends at the same step with bit-identical weights:
        only rank 0's are saved, and ranks on machines whose arithmetic differs could drift apart."""
        if not self.dist.enabled:
            return
        ends = self.dist.gather_digests(self.step, weights_digest(self.model.state_dict()))
        if not self.dist.is_main:
            return
        if len(set(ends)) == 1:
            log.info("all %d ranks end at step %d with identical weights (sha256 %s)", self.dist.world, *ends[0])
            return
        apart = "; ".join(
            f"rank {rank}: step {step}, weights sha256 {digest}" for rank, (step, digest) in enumerate(ends)
        )
        log.warning("the ranks end apart (%s); the checkpoints hold rank 0's weights", apart)

    def evaluation_interval(self) -> float | None:
        """Seconds of training between evaluations by the clock: the budget / eval_count (None: by steps only)."""
        if self.cfg.time_budget is None or self.cfg.eval_count <= 0:
            return None
        return self.cfg.time_budget / self.cfg.eval_count

    def evaluation_due(self, agreed_elapsed: float) -> bool:
        """Evaluate after this step? Every `eval_every` steps, and with a time budget also each time the
        agreed elapsed time crosses a multiple of budget / eval_count (whichever comes first; both count).

        The clock's schedule is a fixed grid, so an evaluation by steps does not shift it. Where one
        evaluation costs more than a share of its interval (a slow machine, a short budget, a large split),
        the clock's evaluations wait until training has had EVAL_SHARE_CAP times the last one's cost, so
        that evaluating never takes more than about 1 / (1 + EVAL_SHARE_CAP) of the budget.
        """
        if self.step % self.cfg.eval_every == 0:
            return True
        interval = self.evaluation_interval()
        if interval is None:
            return False
        last = self._last_eval_elapsed if self._last_eval_elapsed is not None else 0.0
        if agreed_elapsed - last - self._eval_cost < EVAL_SHARE_CAP * self._eval_cost:
            return False
        return math.floor(agreed_elapsed / interval) > math.floor(last / interval)

    def summary(self) -> str:
        """One paragraph on how the run went, from the best and final losses, and what to try next."""
        return diagnose(
            best=self.best_val_loss,
            best_step=self.best_step,
            best_train=self.best_train_loss,
            final=self.compared_val_loss,
            final_train=self.train_loss,
            step=self.step,
            hidden=self.model.config.hidden,
            dropout=self.model.config.dropout,
        )

    def _train_step(self) -> None:
        cfg = self.cfg
        x, y, new_epoch = self.batcher.batch(self.step)
        if new_epoch:
            self.state = None  # each epoch starts every track from a zero state
        elif self.state is not None and cfg.reset_every:
            self.state = self._restart_tracks(self.state, self.batcher.restarts(self.step, cfg.reset_every))
        x, y = torch.from_numpy(x), torch.from_numpy(y)
        if self.device.type == "cuda":  # page-locked host memory: the copies overlap the GPU's work
            x, y = x.pin_memory(), y.pin_memory()
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            logits, state = self.wrapped(x, self.state)  # (batch, seq_len, vocab)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        loss_value = self.dist.mean(loss.detach())
        if not math.isfinite(loss_value):
            self._nonfinite(loss_value)
            self.state = None
            self.step += 1
            return
        self.state = detach_state(state)
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        lr = learning_rate(cfg, self.progress())
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        if self.ema is not None:
            decay = min(cfg.ema, (1 + self.step) / (10 + self.step))
            with torch.no_grad():
                for average, param in zip(self.ema, self.model.parameters(), strict=True):
                    average.lerp_(param, 1 - decay)
        self.train_loss = loss_value if self.train_loss is None else 0.9 * self.train_loss + 0.1 * loss_value
        self.step += 1

    def _restart_tracks(self, state: State, restart: np.ndarray) -> State:
        """The carried state with the rows of restarting tracks set to zero."""
        if not restart.any():
            return state
        keep = torch.from_numpy(~restart).to(self.device, torch.float32).view(1, -1, 1)  # (layers, batch, hidden)
        return state_from_tensors([t * keep for t in state_tensors(state)])

    def progress(self) -> float:
        """How far through the run we are, by steps or by time, whichever is further."""
        by_steps = self.step / self.cfg.max_steps
        by_time = self.elapsed / self.cfg.time_budget if self.cfg.time_budget else 0.0
        return min(1.0, max(by_steps, by_time))

    def _nonfinite(self, value: float) -> None:
        if self.cfg.nonfinite == "stop":
            raise TrainingError(
                f"loss became {value} at step {self.step}; stopping without saving it. "
                f"The last good checkpoint is in {self.out_dir}: --resume with --nonfinite skip, "
                "or start again (another --out) with a lower --lr."
            )
        log.warning("loss became %s at step %d; skipping the step (--nonfinite skip)", value, self.step)

    # -- evaluation, checkpoints, logs ------------------------------------------------------------

    def _validation_loss(self, limit: int) -> float:
        """The windowed validation loss; every rank holds the same weights and split, and the mean makes
        the ranks agree on it bit for bit anyway, since --patience stops (or not) on it."""
        loss = windowed_loss(self.model, self.val_ids, limit=limit)
        return self.dist.mean(torch.tensor(loss, dtype=torch.float64, device=self.device))

    @contextlib.contextmanager
    def _averaged(self) -> Iterator[None]:
        """The model holds the moving average of its weights inside this block (no-op without --ema)."""
        if self.ema is None:
            yield
            return
        params = list(self.model.parameters())
        raw = [p.detach().clone() for p in params]
        with torch.no_grad():
            for param, average in zip(params, self.ema, strict=True):
                param.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, weights in zip(params, raw, strict=True):
                    param.copy_(weights)

    def _evaluate_and_save(self, final: bool = False) -> None:
        """Evaluate (the averaged weights, with --ema) and save `best` if it improved, then `last` (raw)."""
        with self._averaged():
            self._evaluate_and_save_best(final)
        # Each rank carries the state of its own tracks: `last` keeps every rank's, for --resume.
        carry = [self.dist.gather_rows(t) for t in state_tensors(self.state)] if self.state is not None else []
        if not self.dist.is_main:
            return
        self._save(LAST, training_state=True, carry=carry)
        if final or time.monotonic() - self._plotted_at >= PLOT_INTERVAL_S:  # a PNG costs ~0.3 s: not every eval
            plot.write_loss_curve(self.out_dir / "metrics.jsonl", self.out_dir / "loss.png")
            self._plotted_at = time.monotonic()

    def _evaluate_and_save_best(self, final: bool) -> None:
        # `best` is chosen on the windows every evaluation reads (eval_max_chars of the split, the same
        # each time), the final one included, so that a checkpoint never wins by being read on other text;
        # the final evaluation also reads up to final_eval_max_chars for the figure it reports.
        compared = self._validation_loss(self.cfg.eval_max_chars)
        self.compared_val_loss = compared  # what the verdict compares with the best: the same windows
        whole = final and len(self.val_ids) > self.cfg.eval_max_chars
        self.val_loss = self._validation_loss(self.cfg.final_eval_max_chars) if whole else compared
        improved = self.best_val_loss is None or compared < self.best_val_loss
        if improved:
            self.best_val_loss, self.best_step, self.best_train_loss = compared, self.step, self.train_loss
            self.evals_since_best = 0
        elif not final:
            self.evals_since_best += 1
        if not self.dist.is_main:
            return
        read = min(self.cfg.final_eval_max_chars if whole else self.cfg.eval_max_chars, len(self.val_ids))
        record = {
            "step": self.step,
            "val_loss": self.val_loss,
            "val_bpc": bits_per_char(self.val_loss),
            "val_chars": read,
            "best_val_loss": self.best_val_loss,
            "best_step": self.best_step,
            "elapsed": round(self.elapsed, 3),
        }
        self._write_metrics(record)
        if not final:
            log.info(
                "step %d: val loss %.4f nats/char (best %.4f at step %d)",
                self.step,
                self.val_loss,
                self.best_val_loss,
                self.best_step,
            )
        if improved:
            self._save(BEST, training_state=False)

    def _samples(self) -> dict[str, str]:
        """A short text at each SAMPLE_TEMPERATURES, from a fixed seed, so that runs and steps compare."""
        if self.cfg.sample_chars <= 0:
            return {}
        was_training = self.model.training
        self.model.eval()  # no dropout, and no draw from the global RNG that training's dropout uses
        try:
            return {
                f"{t:g}": "".join(
                    token.char
                    for token in generate(
                        self.model, self.corpus.vocab, "", self.cfg.sample_chars, SamplingParams(temperature=t), SEED
                    )
                )
                for t in SAMPLE_TEMPERATURES
            }
        finally:
            self.model.train(was_training)

    def _show_samples(self) -> None:
        """Log the samples (rank 0) and write them to metrics.jsonl; not counted in the time budget."""
        with self._averaged():
            samples = self._samples()  # on every rank (the same text), so that the ranks stay in step
        if not samples or not self.dist.is_main:
            return
        self._write_metrics({"step": self.step, "samples": samples})
        for temperature, text in samples.items():
            log.info("  sample at step %d, temperature %s: %r", self.step, temperature, text)

    def _save(self, name: str, training_state: bool, carry: list[torch.Tensor] | None = None) -> None:
        meta = {
            "kind": name.removesuffix(SUFFIX),
            "step": self.step,
            "train_loss": self.train_loss,
            "val_loss": self.val_loss,
            "best_val_loss": self.best_val_loss,
            "best_step": self.best_step,
            "best_train_loss": self.best_train_loss,
            "evals_since_best": self.evals_since_best,
            "elapsed_s": round(self.elapsed, 3),
            "corpus": self._corpus_record(),
            "parent": self.parent,
            "earlier_corpora": self.earlier_corpora or None,
            "train_config": self.cfg.to_dict(),
            "preset": self.preset,
            "world_size": self.dist.world,
            "started_at": self.started_at,
            "saved_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        meta = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in meta.items()}
        meta = {k: v for k, v in meta.items() if v is not None or k not in ("parent", "earlier_corpora")}
        extra = self._training_state(carry or []) if training_state else None
        path = self.out_dir / name
        try:
            save_checkpoint(path, self.model, self.corpus.vocab, meta, extra)
        except OSError as exc:  # a full disk, a lost permission: the previous file is intact (atomic_write)
            reason = exc.strerror or str(exc)
            raise TrainingError(
                f"could not save {path} at step {self.step}: {reason}; the previous {name} is intact"
                " (free some space or fix the directory's permissions, then --resume)"
            ) from exc

    def _corpus_record(self) -> dict[str, Any]:
        """The corpus as checkpoints record it; its files let a later --resume tell growth from change."""
        record = {"name": self.corpus.name, "sha256": self.corpus.sha256, "chars": len(self.corpus)}
        return record | ({"files": [list(f) for f in self.corpus.files]} if self.corpus.files else {})

    def _start_from(self, parent: Parent) -> None:
        """Load the parent's weights (--init-from), its vocabulary grown to the corpus's."""
        old = parent.checkpoint.vocab
        generator = torch.Generator().manual_seed(self.cfg.seed)
        self.model.load_state_dict(grow_weights(parent.checkpoint.weights, old, self.corpus.vocab, generator))
        if self.ema is not None:
            self.ema = [p.detach().clone() for p in self.model.parameters()]
        if self.dist.is_main:
            log.info(
                "fine-tuning %s (%s), %d characters of vocabulary grown to %d",
                parent.name,
                parent.checkpoint.path,
                len(old),
                len(self.corpus.vocab),
            )

    def _training_state(self, carry: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Everything beyond the weights that makes a resumed run identical to an unbroken one (`carry`: the
        carried state of every rank's tracks, (layers, batch x world, hidden) each)."""
        tensors = {"rng.torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        for i, param in enumerate(self.model.parameters()):
            for key, value in self.optimizer.state.get(param, {}).items():
                tensors[f"optim.{i}.{key}"] = torch.as_tensor(value)
        for j, tensor in enumerate(carry):
            tensors[f"carry.{j}"] = tensor
        for i, average in enumerate(self.ema or []):
            tensors[f"ema.{i}"] = average
        return tensors

    def _restore(self) -> None:
        path = self.out_dir / LAST
        with self.dist.rank0_file(path) as local:  # rank 0's checkpoint on every machine
            if local is None:
                where = " on the machine of rank 0" if self.dist.enabled else ""
                raise TrainingError(f"--resume: no {LAST} in {self.out_dir}{where} to resume from")
            ckpt = load_checkpoint(local, with_training_state=True)
        growth = self._check_same_run(path, ckpt.meta, ckpt.config)
        generator = torch.Generator().manual_seed(self.cfg.seed + ckpt.meta["step"])
        self.model.load_state_dict(grow_weights(ckpt.weights, ckpt.vocab, self.corpus.vocab, generator))
        self._restore_optimizer(ckpt.extra, ckpt.vocab)
        if self.ema is not None:  # a checkpoint without one (written before --ema existed) starts it afresh
            restored = [ckpt.extra.get(f"ema.{i}") for i in range(len(self.ema))]
            self.ema = [
                self._grown(name, r, ckpt.vocab, p) if r is not None else p.detach().clone()
                for r, (name, p) in zip(restored, self.model.named_parameters(), strict=True)
            ]
        torch.set_rng_state(ckpt.extra["rng.torch"])
        if "rng.cuda" in ckpt.extra and self.device.type == "cuda":
            torch.cuda.set_rng_state(ckpt.extra["rng.cuda"], self.device)
        carry = [ckpt.extra[f"carry.{j}"] for j in range(2) if f"carry.{j}" in ckpt.extra]
        if growth is None:  # on a grown corpus the tracks are laid out anew: each starts from a zero state
            own = [self.dist.own_rows(t, self.cfg.batch).to(self.device) for t in carry]
            self.state = state_from_tensors(own) if own else None
        meta = ckpt.meta
        self.step, self.elapsed = meta["step"], meta["elapsed_s"]
        self.train_loss, self.val_loss, self.best_val_loss = meta["train_loss"], meta["val_loss"], meta["best_val_loss"]
        self.best_step, self.best_train_loss = meta.get("best_step"), meta.get("best_train_loss")
        self.evals_since_best = meta.get("evals_since_best", 0)
        self._last_eval_elapsed = self.elapsed  # `last` is written at an evaluation
        self.started_at = meta["started_at"]
        self.parent, self.earlier_corpora = meta.get("parent"), list(meta.get("earlier_corpora") or [])
        if growth is not None:
            self._continue_on_grown_corpus(growth, meta["corpus"], ckpt.vocab)
        log.info("resumed from %s at step %d", path, self.step)

    def _continue_on_grown_corpus(self, growth: str, was: dict[str, Any], old_vocab: Vocab) -> None:
        """After a resume on a corpus that grew: the new split's losses are not the old one's, so `best` starts
        again at the next evaluation; the corpus trained on before is recorded."""
        self.val_loss = self.best_val_loss = self.best_step = self.best_train_loss = None
        self.evals_since_best = 0
        self.earlier_corpora.append({k: was[k] for k in ("name", "sha256", "chars") if k in was})
        added = "".join(c for c in self.corpus.vocab.chars if c not in old_vocab)
        vocab = f"vocabulary {len(old_vocab)} -> {len(self.corpus.vocab)} characters ({len(added)} new: {added!r})"
        if self.dist.is_main:
            log.info(
                "--resume: the corpus grew (%s); %s. Training goes on from step %d on the grown text, not exactly "
                "as an unbroken run would; `best` is chosen again on its validation split, from the next evaluation",
                growth,
                vocab if added else f"the same {len(old_vocab)} characters",
                self.step,
            )

    def _grown(self, name: str, tensor: torch.Tensor, old: Vocab, param: torch.Tensor) -> torch.Tensor:
        """An average (--ema) of the checkpoint's vocabulary as this run's: new characters' rows are the weights'."""
        tensor = tensor.to(self.device)
        if name not in VOCAB_ROWS or old == self.corpus.vocab:
            return tensor.clone()
        grown = grow_rows(tensor, old, self.corpus.vocab)
        added = added_ids(old, self.corpus.vocab).to(self.device)
        grown[added] = param.detach()[added]
        return grown

    def _check_same_run(self, path: Path, meta: dict[str, Any], model_cfg: ModelConfig) -> str | None:
        """Refuse a resume whose corpus, world size or settings would change the data order or the arithmetic.

        A corpus that only grew (lines appended, files added) is allowed: returns how it grew (None: unchanged).
        """
        growth = None
        if meta["corpus"]["sha256"] != self.corpus.sha256:
            try:
                growth = corpus_growth(meta["corpus"], self.corpus)
            except CorpusError as exc:
                raise TrainingError(f"--resume: {path} was trained on a different corpus: {exc}") from None
        if meta.get("world_size", 1) != self.dist.world:
            raise TrainingError(
                f"--resume: {path} was written by {meta.get('world_size', 1)} ranks, "
                f"this run has {self.dist.world}; the data layout would differ"
            )
        was = {**(meta.get("train_config") or {}), **model_cfg.to_dict()}
        now = {**self.cfg.to_dict(), **self.model.config.to_dict()}
        may_change = (*RESUME_MAY_CHANGE, "vocab_size") if growth else RESUME_MAY_CHANGE  # grown: new characters
        # A key the checkpoint lacks (written before the setting existed) cannot be checked.
        changed = [k for k in now if k in was and k not in may_change and was[k] != now[k]]
        if not changed:
            return growth
        differences = ", ".join(f"{setting_flag(k)} {now[k]} (was {was[k]})" for k in changed)
        preset = meta.get("preset")
        hint = f" (it was trained with --preset {preset})" if preset and preset != self.preset else ""
        raise TrainingError(
            f"--resume: this run's settings differ from those {path} was trained with: {differences}. "
            f"Pass the first run's values{hint}; only {', '.join(map(setting_flag, RESUME_MAY_CHANGE))} may change"
        )

    def _restore_optimizer(self, extra: dict[str, torch.Tensor], old_vocab: Vocab) -> None:
        """AdamW's moments as saved; a grown vocabulary's new rows start with zero moments."""
        names = [name for name, _ in self.model.named_parameters()]
        state: dict[int, dict[str, torch.Tensor]] = {}
        for name, tensor in extra.items():
            if name.startswith("optim."):
                _, index, key = name.split(".", 2)
                if names[int(index)] in VOCAB_ROWS and tensor.dim() > 0 and old_vocab != self.corpus.vocab:
                    tensor = grow_rows(tensor, old_vocab, self.corpus.vocab)
                state.setdefault(int(index), {})[key] = tensor
        groups = self.optimizer.state_dict()["param_groups"]
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})

    def _write_metrics(self, record: dict[str, Any]) -> None:
        with open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def _log_train(self, chars_per_s: float, bar: Any) -> None:
        if not self.dist.is_main:
            return
        lr = self.optimizer.param_groups[0]["lr"]
        self._write_metrics(
            {
                "step": self.step,
                "train_loss": self.train_loss,
                "lr": lr,
                "chars_per_s": round(chars_per_s),
                "elapsed": round(self.elapsed, 3),
            }
        )
        if bar is None:
            return
        if self.cfg.time_budget:  # the bar's total follows whichever limit will end the run first
            steps_by_time = self.step / max(self.elapsed, 1e-9) * self.cfg.time_budget
            bar.total = int(min(self.cfg.max_steps, max(steps_by_time, self.step)))
        bar.set_postfix(
            loss=f"{self.train_loss:.3f}",
            val=f"{self.val_loss:.3f}" if self.val_loss else "-",
            chars_s=f"{chars_per_s:,.0f}",
            refresh=False,
        )
        bar.update(self.step - bar.n)

    def _progress_bar(self) -> Any:
        if not self.show_progress:
            return None
        from tqdm import tqdm

        return tqdm(total=self.cfg.max_steps, initial=self.step, unit="step", dynamic_ncols=True, smoothing=0.1)


class _InterruptFlag:
    """Turns the first Ctrl-C or SIGTERM into a clean stop (evaluate, save); a second one aborts.

    Under torchrun the flag is this rank's own; the loop stops every rank when any rank's is set.
    """

    def __init__(self) -> None:
        self.flag = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True
        log.warning("stopping after this step (signal %d); send it again to abort without saving", signum)

    def __enter__(self) -> _InterruptFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
