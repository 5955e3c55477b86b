from dvd.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AllowDestinationsRequest(_message.Message):
    __slots__ = ("destinations",)
    DESTINATIONS_FIELD_NUMBER: _ClassVar[int]
    destinations: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, destinations: _Optional[_Iterable[str]] = ...) -> None: ...

class AllowDestinationsResponse(_message.Message):
    __slots__ = ("num_allowed",)
    NUM_ALLOWED_FIELD_NUMBER: _ClassVar[int]
    num_allowed: int
    def __init__(self, num_allowed: _Optional[int] = ...) -> None: ...

class MediaInput(_message.Message):
    __slots__ = ("data", "max_num", "num_segments")
    DATA_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_FIELD_NUMBER: _ClassVar[int]
    NUM_SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    max_num: int
    num_segments: int
    def __init__(self, data: _Optional[bytes] = ..., max_num: _Optional[int] = ..., num_segments: _Optional[int] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("request_id", "inputs", "destination", "attempt", "slots")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    inputs: _containers.RepeatedCompositeFieldContainer[MediaInput]
    destination: str
    attempt: int
    slots: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[MediaInput, _Mapping]]] = ..., destination: _Optional[str] = ..., attempt: _Optional[int] = ..., slots: _Optional[_Iterable[int]] = ...) -> None: ...

class SlotResult(_message.Message):
    __slots__ = ("slot", "input_index", "tokens_per_tile", "num_tokens", "cache_hit", "preprocessed_at_ms", "encode_start_ms", "encode_end_ms", "send_start_ms", "send_end_ms")
    SLOT_FIELD_NUMBER: _ClassVar[int]
    INPUT_INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_TILE_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    PREPROCESSED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_START_MS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_END_MS_FIELD_NUMBER: _ClassVar[int]
    SEND_START_MS_FIELD_NUMBER: _ClassVar[int]
    SEND_END_MS_FIELD_NUMBER: _ClassVar[int]
    slot: int
    input_index: int
    tokens_per_tile: _containers.RepeatedScalarFieldContainer[int]
    num_tokens: int
    cache_hit: bool
    preprocessed_at_ms: float
    encode_start_ms: float
    encode_end_ms: float
    send_start_ms: float
    send_end_ms: float
    def __init__(self, slot: _Optional[int] = ..., input_index: _Optional[int] = ..., tokens_per_tile: _Optional[_Iterable[int]] = ..., num_tokens: _Optional[int] = ..., cache_hit: _Optional[bool] = ..., preprocessed_at_ms: _Optional[float] = ..., encode_start_ms: _Optional[float] = ..., encode_end_ms: _Optional[float] = ..., send_start_ms: _Optional[float] = ..., send_end_ms: _Optional[float] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("request_id", "slots", "elapsed_ms")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_MS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    slots: _containers.RepeatedCompositeFieldContainer[SlotResult]
    elapsed_ms: float
    def __init__(self, request_id: _Optional[str] = ..., slots: _Optional[_Iterable[_Union[SlotResult, _Mapping]]] = ..., elapsed_ms: _Optional[float] = ...) -> None: ...
