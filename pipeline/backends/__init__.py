"""Gateway backends: where a validated `ChatRequest` is turned into generated tokens.

`coupled`: both model halves in the gateway's process, one request at a time (the baseline).
`disaggregated`: vision and language servers reached over gRPC, features over the transport.
"""

from __future__ import annotations

from dvd.pipeline.backends.base import Backend

BACKENDS: dict[str, str] = {
    "coupled": "dvd.pipeline.backends.coupled:CoupledBackend",
    "disaggregated": "dvd.pipeline.backends.disaggregated:DisaggregatedBackend",
}


def backend_class(kind: str) -> type[Backend]:
    """The backend class registered under `kind` (imported only when chosen)."""
    import importlib

    if kind not in BACKENDS:
        raise ValueError(f"unknown backend {kind!r}; choose from {sorted(BACKENDS)}")
    module, _, name = BACKENDS[kind].partition(":")
    return getattr(importlib.import_module(module), name)


__all__ = ["BACKENDS", "Backend", "backend_class"]
