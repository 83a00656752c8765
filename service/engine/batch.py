"""The recurrent state of every running job of one model, stepped together as one batch.

Row i of `state` and `logits` belongs to `jobs[i]`. Rows join (`add`) and leave (`keep`) between
steps; `step` feeds one character id per row through the network:

    ids (batch,) -> embedding -> recurrent layers (state (layers, batch, hidden)) -> head -> logits (batch, vocab)
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

import torch

from charrnn.model.cpu import has_bf16_dot
from charrnn.model.decoding import Sample
from charrnn.model.network import CharRNN, state_from_tensors, state_tensors
from charrnn.service.engine import core_board, lstm_kernel

# memmove called with the GIL held (PYFUNCTYPE; ctypes.memmove lets it go). On the scheduler thread every letting go
# of the GIL is a wait to get it back while the request threads run: under 32 streams, each cost ~0.5 ms and the
# thread spent a quarter of its time waiting. A row of a few KB copies in far less; a torch copy_ of one lets the
# GIL go five times (twice more to make and free the views it needs), a numpy fancy-indexed copy three.
_copy_bytes = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)(
    ctypes._memmove_addr  # type: ignore[attr-defined]  # what ctypes.memmove wraps (there since Python 2.5)
)


class RecurrentBatch:
    """Rows of recurrent state and next-character logits, one per job (what every kind of batch offers).

    `logits` is (batch, vocab); `state` is a list of (layers, batch, hidden) tensors, (h,) or (h, c).
    """

    logits: torch.Tensor
    state: list[torch.Tensor]

    def __init__(self, model: CharRNN, capacity: int):
        self.model = model
        self.capacity = capacity
        self.jobs: list[Any] = []

    def add(self, job: Any, logits: torch.Tensor, state: Sequence[torch.Tensor]) -> None:
        """A new row: its logits (vocab,) and state tensors (layers, 1, hidden), copied in."""
        raise NotImplementedError

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows, in this order."""
        raise NotImplementedError

    def step(self, ids: list[int]) -> None:
        """Feed one id per row; logits and state move on by one character."""
        raise NotImplementedError

    def draw_and_step(self, rows: Sequence[Sample], steps: int = 1) -> tuple[list[int], list[float]] | None:
        """For rows that draw plainly (every one `Sample.draws_plainly`, row i with rows[i]): the character each
        draws from the logits, as `model.decoding.Decoder.draw` would, and its log-probability, then the step
        with those ids, `steps` times in one go; (ids, logprobs), step s's row i at s * len(rows) + i. A row with
        fewer characters left draws its last with its own noise, then spare noise (lstm_kernel.KernelDraw.fill);
        every other must have `steps` rows of noise `available`. None where this batch cannot (the caller draws,
        then steps), and then nothing has changed."""
        return None


class ModuleBatch(RecurrentBatch):
    """A batch stepped by the model module itself (any cell)."""

    def __init__(self, model: CharRNN, capacity: int):
        super().__init__(model, capacity)
        cfg = model.config
        self.state = [torch.zeros(cfg.layers, 0, cfg.hidden) for _ in range(2 if cfg.cell == "lstm" else 1)]
        self.logits = torch.zeros(0, cfg.vocab_size)

    def add(self, job: Any, logits: torch.Tensor, state: Sequence[torch.Tensor]) -> None:
        self.jobs.append(job)
        self.logits = torch.cat([self.logits, logits.unsqueeze(0)])
        self.state = [torch.cat([mine, theirs], dim=1) for mine, theirs in zip(self.state, state, strict=True)]

    def keep(self, rows: list[int]) -> None:
        self.jobs = [self.jobs[r] for r in rows]
        index = torch.tensor(rows, dtype=torch.long)
        self.logits = self.logits.index_select(0, index)
        self.state = [s.index_select(1, index) for s in self.state]

    def step(self, ids: list[int]) -> None:
        x = torch.tensor(ids, dtype=torch.long).unsqueeze(1)  # (batch, 1)
        out, state = self.model(x, state_from_tensors(self.state))
        self.logits = out[:, -1]
        self.state = state_tensors(state)


class FastLSTMBatch(RecurrentBatch):
    """An LSTM batch stepped by a lean loop over preallocated buffers, not by the nn.LSTM module.

    nn.LSTM on CPU goes through oneDNN, whose per-call set-up costs milliseconds for a one-step
    input; here a step is one addmm per layer plus in-place gate arithmetic:

        layer 0:  gates = table[ids] + h0 @ W_hh0          table = embed @ W_ih0 + b_ih0 + b_hh0, (vocab, 4H)
        layer l:  gates = b_l + [h_{l-1}, h_l] @ W_l       W_l = [W_ih_l; W_hh_l], (2H, 4H)
        gates are reordered (i, f, o, g): one sigmoid over the first 3H columns, one tanh over the last H
        c = f * c + i * g;  h = o * tanh(c)
        logits = b_head + h_{L-1} @ W_head

    The h of every layer sits side by side in one buffer `hs` (capacity, layers * H), so that
    [h_{l-1}, h_l] is a view, never a copy. Results equal the module's up to float rounding.
    """

    def __init__(self, model: CharRNN, capacity: int):
        super().__init__(model, capacity)
        cfg, rnn, hidden = model.config, model.rnn, model.config.hidden
        order = torch.cat(
            [torch.arange(0, 2 * hidden), torch.arange(3 * hidden, 4 * hidden), torch.arange(2 * hidden, 3 * hidden)]
        )
        with torch.no_grad():
            self.table = (model.embed.weight @ rnn.weight_ih_l0.T + rnn.bias_ih_l0 + rnn.bias_hh_l0)[
                :, order
            ].contiguous()
            self.weights = [rnn.weight_hh_l0[order].T.contiguous()]  # (H, 4H), then (2H, 4H)
            self.biases: list[torch.Tensor | None] = [None]
            for layer in range(1, cfg.layers):
                w = torch.cat([getattr(rnn, f"weight_ih_l{layer}"), getattr(rnn, f"weight_hh_l{layer}")], 1)
                self.weights.append(w[order].T.contiguous())
                b = getattr(rnn, f"bias_ih_l{layer}") + getattr(rnn, f"bias_hh_l{layer}")
                self.biases.append(b[order].unsqueeze(0).contiguous())
            self.head_w = model.head.weight.T.contiguous()  # (H, vocab)
            self.head_b = model.head.bias.unsqueeze(0).contiguous()
        self.hs = torch.zeros(capacity, cfg.layers * hidden)
        self.cs = torch.zeros(cfg.layers, capacity, hidden)
        self.gates = torch.zeros(capacity, 4 * hidden)
        self.tanh_c = torch.zeros(capacity, hidden)
        self.out = torch.zeros(capacity, cfg.vocab_size)
        self.ids = torch.zeros(capacity, dtype=torch.long)
        self._views: dict[int, tuple] = {}
        self._arrays = (self.hs.numpy(), self.cs.numpy(), self.out.numpy())  # the same memory, for keep()
        # where hs, cs and out start, and the bytes of one row of each (cs: of one layer), for add() and keep()
        self._addresses = (self.hs.data_ptr(), self.cs.data_ptr(), self.out.data_ptr())
        self._row_bytes = (4 * cfg.layers * hidden, 4 * hidden, 4 * cfg.vocab_size)

    @property
    def state(self) -> list[torch.Tensor]:  # type: ignore[override]  # views, (layers, batch, hidden) each
        n, cfg = len(self.jobs), self.model.config
        return [self.hs[:n].view(n, cfg.layers, cfg.hidden).transpose(0, 1), self.cs[:, :n]]

    @property
    def logits(self) -> torch.Tensor:  # type: ignore[override]  # a view, (batch, vocab)
        n = len(self.jobs)
        return (self._views.get(n) or self._make_views(n))[-1]  # out[:n], made once per n (a slice costs us)

    def add(self, job: Any, logits: torch.Tensor, state: Sequence[torch.Tensor]) -> None:
        row, hidden = len(self.jobs), self.model.config.hidden
        if row == self.capacity:
            raise RuntimeError("batch is full")
        h, c = state  # (layers, 1, hidden)
        hs_row, cs_row, out_row = self._row_bytes
        sizes = (hs_row, hs_row, out_row)  # the bytes each of h, c and logits must hold to be copied whole
        if all(t.is_cpu and t.dtype == torch.float32 and t.is_contiguous() and 4 * t.numel() == size
               for t, size in zip((h, c, logits), sizes, strict=True)):  # fmt: skip
            _copy_bytes(self._row_address(0, row), h.data_ptr(), hs_row)  # every layer's h, side by side
            for layer in range(self.model.config.layers):
                _copy_bytes(self._row_address(1, row, layer), c.data_ptr() + layer * cs_row, cs_row)
            _copy_bytes(self._row_address(2, row), logits.data_ptr(), out_row)
        else:
            self.hs[row].view(-1, hidden).copy_(h[:, 0])
            self.cs[:, row].copy_(c[:, 0])
            self.out[row].copy_(logits)
        self.jobs.append(job)

    def keep(self, rows: list[int]) -> None:
        jobs = self.jobs
        if any(not 0 <= row < len(jobs) for row in rows):  # checked before any raw copy
            raise IndexError(f"keep({rows}) names rows outside 0 .. {len(jobs) - 1}")
        moved = [i for i, row in enumerate(rows) if row != i]  # only the rows that change place are copied
        sources = [rows[i] for i in moved]
        if moved and set(sources).isdisjoint(moved):  # always so for scheduler.fill_holes's orders
            for place, row in zip(moved, sources, strict=True):  # no copy reads a row another has written
                for buffer, layers in ((0, 1), (1, self.model.config.layers), (2, 1)):
                    for layer in range(layers):
                        to, source = self._row_address(buffer, place, layer), self._row_address(buffer, row, layer)
                        _copy_bytes(to, source, self._row_bytes[buffer])
        elif moved:
            hs, cs, out = self._arrays  # numpy views of the buffers: reads every source before it writes
            hs[moved], cs[:, moved], out[moved] = hs[sources], cs[:, sources], out[sources]
        self.jobs = [jobs[r] for r in rows]

    def _row_address(self, buffer: int, row: int, layer: int = 0) -> int:
        """Where row `row` (of layer `layer`, for cs) starts in buffer 0 (hs), 1 (cs) or 2 (out)."""
        return self._addresses[buffer] + (layer * self.capacity + row) * self._row_bytes[buffer]

    def step(self, ids: list[int]) -> None:
        n = len(ids)
        gates, tanh_c, hs_in, hs_out, cs, out = self._views.get(n) or self._make_views(n)
        hidden = self.model.config.hidden
        if n == 1:
            torch.addmm(self.table[ids[0] : ids[0] + 1], hs_in[0], self.weights[0], out=gates)
        else:
            self.ids[:n] = torch.tensor(ids)
            torch.index_select(self.table, 0, self.ids[:n], out=gates)
            gates.addmm_(hs_in[0], self.weights[0])
        for layer in range(len(self.weights)):
            if layer:
                torch.addmm(self.biases[layer], hs_in[layer], self.weights[layer], out=gates)
            gates[:, : 3 * hidden].sigmoid_()
            gates[:, 3 * hidden :].tanh_()
            cs[layer].mul_(gates[:, hidden : 2 * hidden]).addcmul_(gates[:, :hidden], gates[:, 3 * hidden :])
            torch.tanh(cs[layer], out=tanh_c)
            torch.mul(gates[:, 2 * hidden : 3 * hidden], tanh_c, out=hs_out[layer])
        torch.addmm(self.head_b, hs_out[-1], self.head_w, out=out)

    def _make_views(self, n: int) -> tuple:
        """Views of the buffers for a batch of n rows, made once per n."""
        hidden, layers = self.model.config.hidden, self.model.config.layers
        hs_in = [self.hs[:n, :hidden]] + [self.hs[:n, (i - 1) * hidden : (i + 1) * hidden] for i in range(1, layers)]
        hs_out = [self.hs[:n, i * hidden : (i + 1) * hidden] for i in range(layers)]
        views = (self.gates[:n], self.tanh_c[:n], hs_in, hs_out, [self.cs[i, :n] for i in range(layers)], self.out[:n])
        self._views[n] = views
        return views


class NativeLSTMBatch(FastLSTMBatch):
    """FastLSTMBatch stepped by the C kernel, every batch size.

    The same buffers and weight layouts as the parent (see service/engine/lstm_kernel.py). Every size, so
    that a row's text never depends on its batch (the kernel folds each element alike; a PyTorch step
    past some size would sum in MKL's order), and because the kernel is the faster: on 2 threads the
    default model's float32 step made 18,700 characters/s at 128 rows against MKL's 13,800 (it took
    over from 64 rows while the kernel ran on one thread).
    """

    def __init__(self, model: CharRNN, capacity: int, lib: Any, bf16: bool = False, int8: bool = False):
        super().__init__(model, capacity)
        if model.config.layers > lstm_kernel.MAX_LAYERS:
            raise ValueError("too many layers for the native kernel")
        if bf16 and not bf16_capable(model, lib):
            raise ValueError("this kernel or model cannot step in bfloat16 (see bf16_capable)")
        if int8 and not int8_capable(model, lib):
            raise ValueError("this kernel or model cannot step in int8 (see int8_capable)")
        bf16 = bf16 and not int8  # int8 replaces the bfloat16 products
        self.lib = lib
        self._ids_np = self.ids.numpy()
        self._ids_address = self.ids.data_ptr()
        self._draws = lstm_kernel.KernelDraw(lib, model.config.vocab_size)  # draw_and_step's rows, as the draw's
        net = lstm_kernel.Net(layers=model.config.layers, hidden=model.config.hidden)
        net.vocab, net.capacity = model.config.vocab_size, capacity
        net.table, net.head_w, net.head_b = self.table.data_ptr(), self.head_w.data_ptr(), self.head_b.data_ptr()
        # float16 copies of the weights that are float16 values (see lstm_kernel: exact, half the bytes);
        # none in bfloat16 mode, where the kernel reads only the bfloat16 panels (below)
        reduced = bf16 or int8
        self.weights_half = [w.half() if not reduced and _exact_in_half(w) else None for w in self.weights]
        # The weights a batch reads, in panels of 16 columns (see lstm_step.h): a block of rows reads them in order.
        self.panels = [
            None if reduced else _panels(w if wh is None else wh)
            for w, wh in zip(self.weights, self.weights_half, strict=True)
        ]
        for layer, (w, b, wh, panels) in enumerate(
            zip(self.weights, self.biases, self.weights_half, self.panels, strict=True)
        ):
            net.w[layer] = w.data_ptr()
            net.b[layer] = 0 if b is None else b.data_ptr()
            net.wh[layer] = 0 if wh is None else wh.data_ptr()
            net.panels[layer] = 0 if panels is None else panels.data_ptr()
        # bfloat16 arithmetic: every recurrent layer's weights rounded to bfloat16 and paired (lstm_step.h)
        self.bf16 = bf16
        core_board.set_threads(lib)  # threads share its products: torch's, or a server worker's share of the cores
        self.bpanels = [_bf16_panels(w) for w in self.weights] if bf16 else []
        self.xb = torch.zeros(capacity, 2 * model.config.hidden, dtype=torch.bfloat16) if bf16 else None
        for layer, panels in enumerate(self.bpanels):
            net.bpanels[layer] = panels.data_ptr()
        net.xb = None if self.xb is None else self.xb.data_ptr()
        # int8 arithmetic: every recurrent layer's weights quantized per column and packed (lstm_step.h)
        self.int8 = int8
        self.quantized = [_int8_panels(w) for w in self.weights] if int8 else []
        # room for int16 inputs (the AVX2 build's; the VNNI build's bytes use half of it)
        self.xq = torch.zeros(capacity, 2 * model.config.hidden, dtype=torch.int16) if int8 else None
        for layer, (panels, scale, corr) in enumerate(self.quantized):
            net.qpanels[layer], net.qscale[layer], net.qcorr[layer] = (
                panels.data_ptr(),
                scale.data_ptr(),
                corr.data_ptr(),
            )
        net.xq = None if self.xq is None else self.xq.data_ptr()
        net.hs, net.cs, net.gates, net.logits = (t.data_ptr() for t in (self.hs, self.cs, self.gates, self.out))
        self.net = ctypes.byref(net)
        self._net = net  # keeps the struct alive; the tensors it points into are attributes of self

    def step(self, ids: list[int]) -> None:
        n = len(ids)
        self._ids_np[:n] = ids
        self.lib.charrnn_lstm_step(self.net, n, self._ids_address)

    def draw_and_step(self, rows: Sequence[Sample], steps: int = 1) -> tuple[list[int], list[float]]:
        """The draws and the steps in one call to the kernel (charrnn_draw_step), which holds no lock of Python's:
        the scheduler thread lets the others run once every `steps` steps, not twice a step."""
        draws = self._draws
        n = draws.fill(rows, steps)
        temperatures, ids, logprobs = (t.data_ptr() for t in (draws.temperatures, draws.ids, draws.logprobs))
        self.lib.charrnn_draw_step(self.net, n, steps, temperatures, draws.noise, ids, logprobs)
        return draws.drawn_ids(steps * n), draws.drawn_logprobs(steps * n)


def _panels(weights: torch.Tensor) -> torch.Tensor | None:
    """weights (K, N) as N / 16 panels of (K, 16), each contiguous; None unless N is a multiple of 16."""
    rows, columns = weights.shape
    if columns % 16:
        return None
    return weights.view(rows, columns // 16, 16).transpose(0, 1).contiguous()


def _bf16_panels(weights: torch.Tensor) -> torch.Tensor:
    """weights (K, N) rounded to bfloat16 and packed as the kernel's bpanels (service/engine/kernels/lstm_step.h):
    N / 32 panels, each K / 2 pairs of rows of 32 columns, a column's two weights side by side."""
    rows, columns = weights.shape
    paired = weights.to(torch.bfloat16).view(rows // 2, 2, columns // 32, 32)
    return paired.permute(2, 0, 3, 1).contiguous()


def _int8_panels(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weights (K, N) quantized per column (q = round(w / s), s = max |w| / 127) and packed as the kernel's
    qpanels (service/engine/kernels/lstm_step.h): N / 32 panels, each K / 4 quads of rows of 32 columns, a
    column's four weights side by side; with qscale (N,) = s / 127 (the inputs are round(127 h)) and
    qcorr (N,) = 128 * sum_k q (the VNNI build stores the inputs plus 128, unsigned; the AVX2 build, as
    int16, needs no correction)."""
    rows, columns = weights.shape
    scale = weights.abs().amax(0).clamp_min(1e-30) / 127
    q = torch.round(weights / scale).clamp(-127, 127).to(torch.int8)
    panels = q.view(rows // 4, 4, columns // 32, 32).permute(2, 0, 3, 1).contiguous()
    corr = (128 * q.sum(0, dtype=torch.int32)).to(torch.int32).contiguous()
    return panels, (scale / 127).float().contiguous(), corr


def int8_capable(model: CharRNN, lib: Any) -> bool:
    """Whether `lib` can step this model in int8: the kernel build has int8 products (AVX512-VNNI's or AVX2's;
    a build is loaded only where this CPU runs it), and the panels fit (4H a multiple of 32 and every K a
    multiple of 4: hidden a multiple of 8)."""
    return (
        lib is not None
        and bool(lib.charrnn_has_int8())
        and model.config.cell == "lstm"
        and model.config.hidden % 8 == 0
        and model.config.layers <= lstm_kernel.MAX_LAYERS
    )


def bf16_capable(model: CharRNN, lib: Any) -> bool:
    """Whether `lib` (a kernel from lstm_kernel) can step this model in bfloat16: the kernel was built with
    AVX512-BF16 and this CPU runs it, and the panels fit (4H a multiple of 32, so hidden a multiple of 8;
    every K even)."""
    return (
        lib is not None
        and bool(lib.charrnn_has_bf16())
        and has_bf16_dot()
        and model.config.cell == "lstm"
        and model.config.hidden % 8 == 0
        and model.config.layers <= lstm_kernel.MAX_LAYERS
    )


def _exact_in_half(weights: torch.Tensor) -> bool:
    """Whether every value is a float16 value (a checkpoint stored in float16 loads as such)."""
    return bool(torch.equal(weights.half().float(), weights))


def precision_flags(precision: str) -> tuple[bool, bool]:
    """What a precision setting (service.config.KERNEL_PRECISIONS) asks of make_batch: (bf16, int8).

    "auto" is the fastest arithmetic the kernel and the CPU have whose validation loss is that of float32:
    int8 where the kernel build has int8 products, which every build that has them sums as the same exact
    integers (AMX's tiles from 8 rows, AVX512-VNNI's vpdpbusd, AVX2's vpmaddwd) and finishes with the same
    float operations, so the same bits on any of them and in any batch (the shipped model's loss 1.46509
    against float32's 1.46513); on the Intel Xeon with AMX of docs/BENCHMARKS.md, int8 steps 1.4-2.9x the
    AMX build's bfloat16 at 1-128 rows, 1.7-1.8x bfloat16 at 8-128 rows on an AMD EPYC Zen 5, 1.2x float32
    at 8-128 rows, 3.1x at one on an AVX2-only AMD EPYC; bfloat16 where a build has no int8; float32 in the
    portable build. Each asks only: make_batch falls back to what the kernel, the CPU and the model allow.
    """
    if precision == "auto":
        return True, True
    return precision in ("bf16", "int8"), precision == "int8"


def make_batch(
    model: CharRNN, capacity: int, lib: Any = None, bf16: bool = False, int8: bool = False
) -> RecurrentBatch:
    """The batch implementation for this model: the C kernel's step where there is one (`lib`, from
    `lstm_kernel.load`) and the model is an LSTM, else the lean PyTorch LSTM step, else the module's.
    With `int8`, the kernel's int8 arithmetic where it and the model allow it (`int8_capable`); else, with
    `bf16`, its bfloat16 arithmetic where they allow that (`bf16_capable`)."""
    if model.config.cell != "lstm":
        return ModuleBatch(model, capacity)
    if lib is not None and model.config.layers <= lstm_kernel.MAX_LAYERS:
        int8 = int8 and int8_capable(model, lib)
        return NativeLSTMBatch(model, capacity, lib, bf16=bf16 and not int8 and bf16_capable(model, lib), int8=int8)
    return FastLSTMBatch(model, capacity)


def arithmetic(batch: RecurrentBatch) -> str:
    """The recurrent layers' arithmetic of a batch: "int8", "bfloat16" or "float32"."""
    if isinstance(batch, NativeLSTMBatch) and batch.int8:
        return "int8"
    return "bfloat16" if isinstance(batch, NativeLSTMBatch) and batch.bf16 else "float32"


def describe_batch(batch: RecurrentBatch) -> str:
    """How a batch steps, for the log: which implementation, and the C kernel's arithmetic."""
    if isinstance(batch, NativeLSTMBatch):
        build = batch.lib.charrnn_build().decode()
        return f"the C kernel ({build} build), {arithmetic(batch)} arithmetic"
    if isinstance(batch, FastLSTMBatch):
        return "the PyTorch LSTM step"
    return "the model's own module"
