"""Which kernel the LLM's linear layers run on, chosen by name (`EngineConfig.linear_backend`).

"torch" (the default) leaves transformers' `nn.Linear`. "onednn" computes them with oneDNN's matmul
on weights converted once to its own layout. Measured here (torch 2.13 CPU wheel, one thread, fp32,
`scripts/measure_linear_kernels.py`, 2026-12-02): oneDNN is ~15% faster for 16-64-row decode
batches at 1B shapes (1024 -> 3072), but 1.1-2.2x slower for prefill chunks (512 rows) at every shape
tried and for everything at the 38b-scaled preset's (256 -> 1280); serving is prefill-dominated
(an image is 256-1280 prompt tokens), so the engine alone ran 8 x 1 290-token requests in 313 ms of CPU
each with torch against 345-350 with oneDNN. Earlier (an older torch) oneDNN measured 1.7-1.85x faster
on decode steps; choose it for decode-heavy text serving of larger models. Same fp32 arithmetic either
way (only the summation order differs).

Why oneDNN's rows are padded to a few sizes (`padded_rows`): oneDNN's primitive cache and ideep's
computation cache each keep a compiled matmul per input shape (about 0.3 MiB apiece for the tiny
model's layers, up to 1024 entries each), and a serving engine's batches take nearly every row count
up to `max_batch_tokens`, so the process's memory grew with every new count it met, ~0.2 MiB a
request in a soak with the prefix cache on (whose cut-short prefills make the counts vary most).
Padded, at most ~80 shapes per layer ever reach oneDNN (46 up to 512 rows), for up to 12.5% more rows
computed in a prefill-sized batch. A row's result does not depend on the rows beside it (checked bit
for bit, tests/language_server/test_memory_bounds.py), except that one row alone takes oneDNN's vector
path: small counts are never padded.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dvd.language_server.config import LINEAR_BACKEND_NAMES

EXACT_ROWS = 16  # up to this many rows (decode steps of a few requests) go as they are


def padded_rows(rows: int) -> int:
    """The row count a matmul of `rows` rows runs at: exact up to EXACT_ROWS, then rounded up to a step of
    1/16 of the next power of two (at least 8): <= 8 sizes per octave, padding < 12.5% past 64 rows."""
    if rows <= EXACT_ROWS:
        return rows
    step = max(8, (1 << (rows - 1).bit_length()) // 16)
    return -(-rows // step) * step


class OneDnnLinear(torch.nn.Module):
    """`nn.Linear` computed by oneDNN on a weight kept in oneDNN's layout (inference only)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_onednn = linear.weight.detach().to_mkldnn()
        self.bias_onednn = None if linear.bias is None else linear.bias.detach().to_mkldnn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        count = rows.shape[0]
        padding = padded_rows(count) - count
        if padding:
            rows = torch.nn.functional.pad(rows, (0, 0, 0, padding))
        out = torch._C._nn.mkldnn_linear(rows.contiguous().to_mkldnn(), self.weight_onednn, self.bias_onednn).to_dense()
        return out[:count].view(*x.shape[:-1], self.out_features)


def _onednn(model: torch.nn.Module) -> None:
    device = next(model.parameters()).device
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        raise ValueError(f"the onednn linear backend runs on a CPU with oneDNN; the model is on {device}")
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(module, name, OneDnnLinear(child))


# name -> what to do to the model once, before serving. "torch" leaves it as transformers built it.
LINEAR_BACKENDS: dict[str, Callable[[torch.nn.Module], None]] = {
    "torch": lambda model: None,
    "onednn": _onednn,
}
assert tuple(LINEAR_BACKENDS) == LINEAR_BACKEND_NAMES  # the configs' list of names
