"""Gateway backends: where a validated `ChatRequest` is turned into generated tokens.

`coupled`: both model halves in the gateway's process, one engine with the encoder in its step (the baseline).
`disaggregated`: vision and language servers reached over gRPC, features over the transport.
"""

from __future__ import annotations

from dvd.named import load_named
from dvd.pipeline.backends.base import Backend

BACKENDS: dict[str, str] = {
    "coupled": "dvd.pipeline.backends.coupled:CoupledBackend",
    "disaggregated": "dvd.pipeline.backends.disaggregated:DisaggregatedBackend",
}


def backend_class(kind: str) -> type[Backend]:
    """The backend class registered under `kind` (imported only when chosen)."""
    backend: type[Backend] = load_named(BACKENDS, kind, "backend")
    return backend


__all__ = ["BACKENDS", "Backend", "backend_class"]
