"""A Python client for the gateway's gRPC API (`dvd.v1.Generation`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from dvd.v1 import common_pb2, generation_pb2, generation_pb2_grpc


@dataclass
class Completion:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    timings_ms: dict[str, float] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, response: generation_pb2.GenerateResponse) -> None:
        """One streamed response: its text and tokens; the last one's finish reason, timings and usage."""
        self.text += response.text
        self.token_ids += list(response.token_ids)
        if response.finish_reason:
            self.finish_reason = response.finish_reason
            t = response.timings
            self.timings_ms = {"encode": t.encode_ms, "transfer": t.transfer_ms, "queue": t.queue_ms,
                               "prefill": t.prefill_ms, "decode": t.decode_ms}
            if t.kv_transfer_ms:  # P/D only
                self.timings_ms["kv_transfer"] = t.kv_transfer_ms
            self.prompt_tokens, self.completion_tokens = response.prompt_tokens, response.completion_tokens


def _message(role: str, content: str | Sequence[Any]) -> generation_pb2.ChatMessage:
    """`content`: text, or parts: str (text), bytes (an encoded image) or {"type": "text"/"image"/"video", ...}."""
    parts = [content] if isinstance(content, str) else list(content)
    out = []
    for part in parts:
        if isinstance(part, str):
            out.append(generation_pb2.ContentPart(text=part))
        elif isinstance(part, bytes):
            out.append(generation_pb2.ContentPart(image=part))
        elif part.get("type") == "text":
            out.append(generation_pb2.ContentPart(text=part["text"]))
        elif part.get("type") == "video":
            out.append(generation_pb2.ContentPart(video=part["data"]))
        else:
            out.append(generation_pb2.ContentPart(image=part["data"]))
    return generation_pb2.ChatMessage(role=role, content=out)


def generate_request(messages: Sequence[dict[str, Any]], model: str = "", max_num: int = 0, thinking: bool = False,
                     num_segments: int = 0, **sampling: Any) -> generation_pb2.GenerateRequest:
    """The request `GenerationClient.stream` sends. `stop` may be one string, as in the OpenAI API (protobuf
    would take a string for a repeated field as its characters, each a stop string)."""
    if isinstance(sampling.get("stop"), str):
        sampling["stop"] = [sampling["stop"]]
    return generation_pb2.GenerateRequest(
        model=model, messages=[_message(m["role"], m["content"]) for m in messages],
        sampling=generation_pb2.Sampling(**sampling), max_num=max_num, thinking=thinking, num_segments=num_segments)


class GenerationClient:
    def __init__(self, address: str, timeout_s: float | None = None, api_key: str | None = None,
                 root_certificates: bytes | None = None) -> None:
        """`root_certificates` (PEM): talk TLS to a gateway whose certificate they sign."""
        options = [("grpc.max_send_message_length", 256 << 20)]
        if root_certificates is None:
            self.channel = grpc.insecure_channel(address, options=options)
        else:
            credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self.channel = grpc.secure_channel(address, credentials, options=options)
        self.stub = generation_pb2_grpc.GenerationStub(self.channel)
        self.timeout_s = timeout_s
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> GenerationClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def health(self) -> common_pb2.HealthResponse:
        return self.stub.Health(common_pb2.HealthRequest(), timeout=self.timeout_s)

    def stream(self, messages: Sequence[dict[str, Any]], model: str = "", max_num: int = 0, thinking: bool = False,
               num_segments: int = 0, **sampling: Any) -> Iterator[generation_pb2.GenerateResponse]:
        """Stream responses; `sampling` takes the `dvd.v1.Sampling` fields (max_new_tokens, temperature, ...)."""
        request = generate_request(messages, model=model, max_num=max_num, thinking=thinking,
                                   num_segments=num_segments, **sampling)
        return self.stub.Generate(request, timeout=self.timeout_s, metadata=self.metadata)

    def complete(self, messages: Sequence[dict[str, Any]], **kwargs: Any) -> Completion:
        out = Completion()
        for response in self.stream(messages, **kwargs):
            out.add(response)
        return out
