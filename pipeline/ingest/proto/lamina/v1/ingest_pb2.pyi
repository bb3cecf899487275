from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENCODING_UNSPECIFIED: _ClassVar[Encoding]
    RAW: _ClassVar[Encoding]
    PNG: _ClassVar[Encoding]
    JPEG: _ClassVar[Encoding]

class Reason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REASON_UNSPECIFIED: _ClassVar[Reason]
    OUT_OF_ORDER: _ClassVar[Reason]
    DUPLICATE: _ClassVar[Reason]
    UNDECODABLE: _ClassVar[Reason]
    SIZE_MISMATCH: _ClassVar[Reason]
    UNKNOWN_ENCODING: _ClassVar[Reason]
    BAD_STREAM: _ClassVar[Reason]
    STREAM_BUSY: _ClassVar[Reason]
    GAP: _ClassVar[Reason]
ENCODING_UNSPECIFIED: Encoding
RAW: Encoding
PNG: Encoding
JPEG: Encoding
REASON_UNSPECIFIED: Reason
OUT_OF_ORDER: Reason
DUPLICATE: Reason
UNDECODABLE: Reason
SIZE_MISMATCH: Reason
UNKNOWN_ENCODING: Reason
BAD_STREAM: Reason
STREAM_BUSY: Reason
GAP: Reason

class Frame(_message.Message):
    __slots__ = ("stream", "index", "capture_time", "encoding", "data", "shape", "dtype", "label")
    STREAM_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_TIME_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    stream: str
    index: int
    capture_time: float
    encoding: Encoding
    data: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    label: int
    def __init__(self, stream: _Optional[str] = ..., index: _Optional[int] = ..., capture_time: _Optional[float] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., data: _Optional[bytes] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., label: _Optional[int] = ...) -> None: ...

class Rejection(_message.Message):
    __slots__ = ("stream", "index", "reason", "message")
    STREAM_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    stream: str
    index: int
    reason: Reason
    message: str
    def __init__(self, stream: _Optional[str] = ..., index: _Optional[int] = ..., reason: _Optional[_Union[Reason, str]] = ..., message: _Optional[str] = ...) -> None: ...

class StreamSummary(_message.Message):
    __slots__ = ("stream", "accepted", "rejected", "next_index", "clips", "pending", "unused")
    STREAM_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    NEXT_INDEX_FIELD_NUMBER: _ClassVar[int]
    CLIPS_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    UNUSED_FIELD_NUMBER: _ClassVar[int]
    stream: str
    accepted: int
    rejected: int
    next_index: int
    clips: int
    pending: int
    unused: int
    def __init__(self, stream: _Optional[str] = ..., accepted: _Optional[int] = ..., rejected: _Optional[int] = ..., next_index: _Optional[int] = ..., clips: _Optional[int] = ..., pending: _Optional[int] = ..., unused: _Optional[int] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("accepted", "rejected", "rejections", "streams", "dropped_frames")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    REJECTIONS_FIELD_NUMBER: _ClassVar[int]
    STREAMS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FRAMES_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    rejected: int
    rejections: _containers.RepeatedCompositeFieldContainer[Rejection]
    streams: _containers.RepeatedCompositeFieldContainer[StreamSummary]
    dropped_frames: int
    def __init__(self, accepted: _Optional[int] = ..., rejected: _Optional[int] = ..., rejections: _Optional[_Iterable[_Union[Rejection, _Mapping]]] = ..., streams: _Optional[_Iterable[_Union[StreamSummary, _Mapping]]] = ..., dropped_frames: _Optional[int] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("interval_s",)
    INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    interval_s: float
    def __init__(self, interval_s: _Optional[float] = ...) -> None: ...

class IngestMetrics(_message.Message):
    __slots__ = ("time", "frames_in", "frames_per_s", "rejected", "dropped_frames", "buffered_clips", "buffered_bytes", "wal_micro_batches", "wal_bytes", "micro_batches", "lag_s", "last_checkpoint", "streams", "active_calls")
    TIME_FIELD_NUMBER: _ClassVar[int]
    FRAMES_IN_FIELD_NUMBER: _ClassVar[int]
    FRAMES_PER_S_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FRAMES_FIELD_NUMBER: _ClassVar[int]
    BUFFERED_CLIPS_FIELD_NUMBER: _ClassVar[int]
    BUFFERED_BYTES_FIELD_NUMBER: _ClassVar[int]
    WAL_MICRO_BATCHES_FIELD_NUMBER: _ClassVar[int]
    WAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCHES_FIELD_NUMBER: _ClassVar[int]
    LAG_S_FIELD_NUMBER: _ClassVar[int]
    LAST_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    STREAMS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_CALLS_FIELD_NUMBER: _ClassVar[int]
    time: float
    frames_in: int
    frames_per_s: float
    rejected: int
    dropped_frames: int
    buffered_clips: int
    buffered_bytes: int
    wal_micro_batches: int
    wal_bytes: int
    micro_batches: int
    lag_s: float
    last_checkpoint: int
    streams: int
    active_calls: int
    def __init__(self, time: _Optional[float] = ..., frames_in: _Optional[int] = ..., frames_per_s: _Optional[float] = ..., rejected: _Optional[int] = ..., dropped_frames: _Optional[int] = ..., buffered_clips: _Optional[int] = ..., buffered_bytes: _Optional[int] = ..., wal_micro_batches: _Optional[int] = ..., wal_bytes: _Optional[int] = ..., micro_batches: _Optional[int] = ..., lag_s: _Optional[float] = ..., last_checkpoint: _Optional[int] = ..., streams: _Optional[int] = ..., active_calls: _Optional[int] = ...) -> None: ...
