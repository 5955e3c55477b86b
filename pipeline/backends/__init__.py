"""Gateway backends: where a validated `ChatRequest` is turned into generated tokens.

`coupled`: both model halves in the gateway's process, one engine with the encoder in its step (the baseline).
`disaggregated`: vision and language servers reached over gRPC, features over the transport.
Each front-end builds the one it runs directly (`deploy/serve_cmd.py`, `deploy/gateway_cmd.py`).
"""

from __future__ import annotations

from dvd.pipeline.backends.base import Backend

__all__ = ["Backend"]
