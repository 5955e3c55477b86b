"""How to pick tokens: one `SamplingParams` with one set of defaults, shared by the gateway, both APIs,
the language server and the CLIs (torch-free, so the gateway need not import torch for it).

The defaults are what the server applies to a field a client leaves out, OpenAI's where OpenAI has
one (temperature 1, top_p 1); callers that want greedy decoding say `temperature=0`. Stop strings
are not here: they act on text, so the gateway's detokenizer decides them (`ChatRequest.stop_strings`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from dvd.errors import InvalidFieldError

DEFAULT_MAX_NEW_TOKENS = 256
SEED_RANGE = (-(1 << 63), (1 << 63) - 1)  # int64, as OpenAI and vLLM take it (and the language server's wire)
# The closed ranges of the fields both APIs take as OpenAI and vLLM spell them (pipeline/validate.py checks
# a client's values against these, naming the API's field).
MIN_P_RANGE = (0.0, 1.0)
PENALTY_RANGE = (-2.0, 2.0)  # presence_penalty and frequency_penalty, OpenAI's


@dataclass(frozen=True)
class SamplingParams:
    """`temperature == 0` means greedy. Every value is checked once, here; errors name the field."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k; -1, vLLM's spelling of it, is taken as 0
    repetition_penalty: float = 1.0
    # 0 = off; vLLM's min_p and OpenAI's penalties (over the generated tokens only, not the prompt).
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one
    presence_penalty: float = 0.0  # subtracted from the logit of every token generated so far
    frequency_penalty: float = 0.0  # x the number of times each token was generated so far
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        # Held at float32, the precision of the wire to a language server and of the sampler's tensors: an
        # HTTP double (top_p=0.9) must sample exactly as the same value after a gRPC hop, or `--coupled` and
        # the disaggregated servers draw different tokens for one seeded request (1 - top_p is the cut).
        for name in _FLOAT_FIELDS:
            object.__setattr__(self, name, _float32(getattr(self, name)))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}"),
            (0 <= self.min_new_tokens <= self.max_new_tokens, "min_new_tokens",
             f"must be in [0, max_new_tokens={self.max_new_tokens}], got {self.min_new_tokens}"),
            (self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, "top_k", f"must be >= 0, got {self.top_k} (-1, as 0: no top-k)"),
            (self.repetition_penalty > 0, "repetition_penalty", f"must be > 0, got {self.repetition_penalty}"),
            (_within(self.min_p, MIN_P_RANGE), "min_p", f"must be in {list(MIN_P_RANGE)}, got {self.min_p}"),
            (_within(self.presence_penalty, PENALTY_RANGE), "presence_penalty",
             f"must be in {list(PENALTY_RANGE)}, got {self.presence_penalty}"),
            (_within(self.frequency_penalty, PENALTY_RANGE), "frequency_penalty",
             f"must be in {list(PENALTY_RANGE)}, got {self.frequency_penalty}"),
            (all(t >= 0 for t in self.stop_token_ids), "stop_token_ids", f"must be >= 0, got {self.stop_token_ids}"),
            (self.seed is None or _within(self.seed, SEED_RANGE), "seed",
             f"must be an int64, in [-2**63, 2**63 - 1], got {self.seed}"),
        ]
        for ok, name, message in checks:
            if not ok:
                raise InvalidFieldError(f"{name} {message}", name)


_FLOAT_FIELDS = ("temperature", "top_p", "repetition_penalty", "min_p", "presence_penalty", "frequency_penalty")


def _float32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


def _within(value: float, bounds: tuple[float, float]) -> bool:
    return bounds[0] <= value <= bounds[1]  # NaN fails both comparisons: refused


def greedy(**fields: object) -> SamplingParams:
    """SamplingParams that always pick the most likely token (what equality tests and benchmarks use)."""
    return SamplingParams(temperature=0.0, **fields)  # type: ignore[arg-type]
