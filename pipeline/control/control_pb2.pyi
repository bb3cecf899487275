from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LayerStatus(_message.Message):
    __slots__ = ("layer", "loss", "spread")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    SPREAD_FIELD_NUMBER: _ClassVar[int]
    layer: int
    loss: float
    spread: float
    def __init__(self, layer: _Optional[int] = ..., loss: _Optional[float] = ..., spread: _Optional[float] = ...) -> None: ...

class StageStatus(_message.Message):
    __slots__ = ("stage", "layers", "micro_batch", "microbatches_per_s", "busy")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    MICROBATCHES_PER_S_FIELD_NUMBER: _ClassVar[int]
    BUSY_FIELD_NUMBER: _ClassVar[int]
    stage: int
    layers: _containers.RepeatedScalarFieldContainer[int]
    micro_batch: int
    microbatches_per_s: float
    busy: float
    def __init__(self, stage: _Optional[int] = ..., layers: _Optional[_Iterable[int]] = ..., micro_batch: _Optional[int] = ..., microbatches_per_s: _Optional[float] = ..., busy: _Optional[float] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("run_dir", "engine", "steps_done", "steps_total", "microbatches_per_s", "layers", "stopping", "checkpoint_failures", "last_checkpoint", "stages")
    RUN_DIR_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    STEPS_DONE_FIELD_NUMBER: _ClassVar[int]
    STEPS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    MICROBATCHES_PER_S_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    STOPPING_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FAILURES_FIELD_NUMBER: _ClassVar[int]
    LAST_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    run_dir: str
    engine: str
    steps_done: int
    steps_total: int
    microbatches_per_s: float
    layers: _containers.RepeatedCompositeFieldContainer[LayerStatus]
    stopping: bool
    checkpoint_failures: int
    last_checkpoint: int
    stages: _containers.RepeatedCompositeFieldContainer[StageStatus]
    def __init__(self, run_dir: _Optional[str] = ..., engine: _Optional[str] = ..., steps_done: _Optional[int] = ..., steps_total: _Optional[int] = ..., microbatches_per_s: _Optional[float] = ..., layers: _Optional[_Iterable[_Union[LayerStatus, _Mapping]]] = ..., stopping: _Optional[bool] = ..., checkpoint_failures: _Optional[int] = ..., last_checkpoint: _Optional[int] = ..., stages: _Optional[_Iterable[_Union[StageStatus, _Mapping]]] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("interval_s",)
    INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    interval_s: float
    def __init__(self, interval_s: _Optional[float] = ...) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CheckpointReply(_message.Message):
    __slots__ = ("accepted", "detail")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    detail: str
    def __init__(self, accepted: _Optional[bool] = ..., detail: _Optional[str] = ...) -> None: ...

class StopRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StopReply(_message.Message):
    __slots__ = ("accepted",)
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    def __init__(self, accepted: _Optional[bool] = ...) -> None: ...
