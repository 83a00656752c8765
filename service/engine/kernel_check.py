"""A kernel build's first run, in a child process of `lstm_kernel.check_build`: a build that crashes here
(SIGILL: an instruction this CPU lacks) or answers wrong costs this process, not the service.

    python -m charrnn.service.engine.kernel_check PATH

Loads the library at PATH as the service would (`lstm_kernel.open_checked`), asks for what it needs from
the OS (`charrnn_init`), then steps a small random LSTM (2 layers of 48 units, 19 rows: more than one
group of rows, and a k-tail for the AMX tiles) a few characters on two threads, in float32 and, where the
build has them, bfloat16 and int8. The logits must equal the PyTorch float32 step's to within rounding, and a row
stepped alone must give the very bits it gives inside the batch (the seeded-batch contract). Exit status
0 when all is right; else one line on stderr saying what was wrong, and 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from charrnn.model.config import ModelConfig
from charrnn.model.network import CharRNN
from charrnn.service.engine import lstm_kernel
from charrnn.service.engine.batch import FastLSTMBatch, NativeLSTMBatch, bf16_capable, int8_capable

ROWS, STEPS = 19, 4
# Largest |logit difference| allowed against PyTorch's float32 step: float32 sums in another order; bfloat16
# weights and inputs (8 bits of mantissa), int8 ones (7 bits and a sign), on a random model whose logits
# are of order 0.1-1.
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "int8": 5e-2}


def compare(model: CharRNN, lib: object, arithmetic: str) -> str | None:
    """What is wrong with the kernel's steps against PyTorch's (None: nothing)."""
    generator = torch.Generator().manual_seed(1)
    cfg = model.config
    h = torch.randn(cfg.layers, ROWS, cfg.hidden, generator=generator)
    c = torch.randn(cfg.layers, ROWS, cfg.hidden, generator=generator)
    ids = torch.randint(0, cfg.vocab_size, (STEPS, ROWS), generator=generator).tolist()
    kinds = {"bf16": arithmetic == "bfloat16", "int8": arithmetic == "int8"}
    reference, native = FastLSTMBatch(model, ROWS), NativeLSTMBatch(model, ROWS, lib, **kinds)
    alone = NativeLSTMBatch(model, 1, lib, **kinds)
    zeros = torch.zeros(cfg.vocab_size)
    for row in range(ROWS):
        reference.add(row, zeros, (h[:, row : row + 1], c[:, row : row + 1]))
        native.add(row, zeros, (h[:, row : row + 1], c[:, row : row + 1]))
    last = ROWS - 1
    alone.add(last, zeros, (h[:, last:], c[:, last:]))
    for step in ids:
        reference.step(step)
        native.step(step)
        alone.step(step[last:])
    error = float((reference.logits - native.logits).abs().max())
    if not error <= TOLERANCE[arithmetic]:  # a NaN fails too
        return f"{arithmetic} logits differ from PyTorch's by {error:.3g}"
    if not torch.equal(alone.logits[0], native.logits[last]):
        return f"{arithmetic}: a row alone differs from the same row in a batch"
    return None


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m charrnn.service.engine.kernel_check PATH", file=sys.stderr)
        return 2
    path = Path(argv[1])
    lib = lstm_kernel._bind(lstm_kernel.open_checked(path), path)
    if not lib.charrnn_init():
        print("the operating system refused what this build needs (AMX tile state)", file=sys.stderr)
        return 1
    lib.charrnn_set_threads(2)
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=13, cell="lstm", layers=2, hidden=48, embed=8)).eval()
    with torch.inference_mode():
        arithmetics = ["float32"] + ["bfloat16"] * bf16_capable(model, lib) + ["int8"] * int8_capable(model, lib)
        for arithmetic in arithmetics:
            problem = compare(model, lib, arithmetic)
            if problem:
                print(problem, file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
