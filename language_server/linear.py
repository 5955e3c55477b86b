"""Which kernel the LLM's linear layers run on, chosen by name (`EngineConfig.linear_backend`).

Why: on a CPU the linear layers are nearly all of a step's time, and for the few-row matrices of
decoding (a batch of 1 to 64 tokens) PyTorch's default fp32 GEMM runs far below the machine's
peak. oneDNN's matmul on weights converted once to its own layout was measured here (2 cores,
1B-shaped model) at 1.85x faster for a 16-request decode step and 1.7x for a one-token step,
with the same fp32 arithmetic (only the summation order differs). Attention, norms and RoPE stay
transformers' own.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from language_server.config import LINEAR_BACKEND_NAMES


class OneDnnLinear(torch.nn.Module):
    """`nn.Linear` computed by oneDNN on a weight kept in oneDNN's layout (inference only)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_onednn = linear.weight.detach().to_mkldnn()
        self.bias_onednn = None if linear.bias is None else linear.bias.detach().to_mkldnn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).contiguous().to_mkldnn()
        out = torch._C._nn.mkldnn_linear(rows, self.weight_onednn, self.bias_onednn).to_dense()
        return out.view(*x.shape[:-1], self.out_features)


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
