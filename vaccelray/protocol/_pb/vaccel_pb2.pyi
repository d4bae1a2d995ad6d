from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BlobType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FILE: _ClassVar[BlobType]
    BUFFER: _ClassVar[BlobType]
    MAPPED: _ClassVar[BlobType]

class ResourceType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LIB: _ClassVar[ResourceType]
    DATA: _ClassVar[ResourceType]
    MODEL: _ClassVar[ResourceType]
FILE: BlobType
BUFFER: BlobType
MAPPED: BlobType
LIB: ResourceType
DATA: ResourceType
MODEL: ResourceType

class EmptyResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CreateSessionRequest(_message.Message):
    __slots__ = ("flags",)
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    flags: int
    def __init__(self, flags: _Optional[int] = ...) -> None: ...

class CreateSessionResponse(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    def __init__(self, session_id: _Optional[int] = ...) -> None: ...

class UpdateSessionRequest(_message.Message):
    __slots__ = ("session_id", "flags")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    flags: int
    def __init__(self, session_id: _Optional[int] = ..., flags: _Optional[int] = ...) -> None: ...

class DestroySessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    def __init__(self, session_id: _Optional[int] = ...) -> None: ...

class ImageClassificationRequest(_message.Message):
    __slots__ = ("session_id", "image")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    image: bytes
    def __init__(self, session_id: _Optional[int] = ..., image: _Optional[bytes] = ...) -> None: ...

class ImageClassificationResponse(_message.Message):
    __slots__ = ("tags",)
    TAGS_FIELD_NUMBER: _ClassVar[int]
    tags: bytes
    def __init__(self, tags: _Optional[bytes] = ...) -> None: ...

class Arg(_message.Message):
    __slots__ = ("buf", "size", "arg_type", "custom_type_id", "parts", "part_no")
    BUF_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    ARG_TYPE_FIELD_NUMBER: _ClassVar[int]
    CUSTOM_TYPE_ID_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    PART_NO_FIELD_NUMBER: _ClassVar[int]
    buf: bytes
    size: int
    arg_type: int
    custom_type_id: int
    parts: int
    part_no: int
    def __init__(self, buf: _Optional[bytes] = ..., size: _Optional[int] = ..., arg_type: _Optional[int] = ..., custom_type_id: _Optional[int] = ..., parts: _Optional[int] = ..., part_no: _Optional[int] = ...) -> None: ...

class GenopRequest(_message.Message):
    __slots__ = ("session_id", "read_args", "write_args")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    READ_ARGS_FIELD_NUMBER: _ClassVar[int]
    WRITE_ARGS_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    read_args: _containers.RepeatedCompositeFieldContainer[Arg]
    write_args: _containers.RepeatedCompositeFieldContainer[Arg]
    def __init__(self, session_id: _Optional[int] = ..., read_args: _Optional[_Iterable[_Union[Arg, _Mapping]]] = ..., write_args: _Optional[_Iterable[_Union[Arg, _Mapping]]] = ...) -> None: ...

class GenopResponse(_message.Message):
    __slots__ = ("write_args",)
    WRITE_ARGS_FIELD_NUMBER: _ClassVar[int]
    write_args: _containers.RepeatedCompositeFieldContainer[Arg]
    def __init__(self, write_args: _Optional[_Iterable[_Union[Arg, _Mapping]]] = ...) -> None: ...

class Blob(_message.Message):
    __slots__ = ("type", "name", "data", "size")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    type: BlobType
    name: str
    data: bytes
    size: int
    def __init__(self, type: _Optional[_Union[BlobType, str]] = ..., name: _Optional[str] = ..., data: _Optional[bytes] = ..., size: _Optional[int] = ...) -> None: ...

class RegisterResourceRequest(_message.Message):
    __slots__ = ("paths", "blobs", "resource_type", "resource_id", "session_id")
    PATHS_FIELD_NUMBER: _ClassVar[int]
    BLOBS_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_TYPE_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    paths: _containers.RepeatedScalarFieldContainer[str]
    blobs: _containers.RepeatedCompositeFieldContainer[Blob]
    resource_type: ResourceType
    resource_id: int
    session_id: int
    def __init__(self, paths: _Optional[_Iterable[str]] = ..., blobs: _Optional[_Iterable[_Union[Blob, _Mapping]]] = ..., resource_type: _Optional[_Union[ResourceType, str]] = ..., resource_id: _Optional[int] = ..., session_id: _Optional[int] = ...) -> None: ...

class RegisterResourceResponse(_message.Message):
    __slots__ = ("resource_id",)
    RESOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    resource_id: int
    def __init__(self, resource_id: _Optional[int] = ...) -> None: ...

class UnregisterResourceRequest(_message.Message):
    __slots__ = ("resource_id", "session_id")
    RESOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    resource_id: int
    session_id: int
    def __init__(self, resource_id: _Optional[int] = ..., session_id: _Optional[int] = ...) -> None: ...

class SyncResourceRequest(_message.Message):
    __slots__ = ("resource_id",)
    RESOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    resource_id: int
    def __init__(self, resource_id: _Optional[int] = ...) -> None: ...

class SyncResourceResponse(_message.Message):
    __slots__ = ("blobs",)
    BLOBS_FIELD_NUMBER: _ClassVar[int]
    blobs: _containers.RepeatedCompositeFieldContainer[Blob]
    def __init__(self, blobs: _Optional[_Iterable[_Union[Blob, _Mapping]]] = ...) -> None: ...

class OpStatus(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class TFTensor(_message.Message):
    __slots__ = ("data", "dims", "type")
    DATA_FIELD_NUMBER: _ClassVar[int]
    DIMS_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    dims: _containers.RepeatedScalarFieldContainer[int]
    type: int
    def __init__(self, data: _Optional[bytes] = ..., dims: _Optional[_Iterable[int]] = ..., type: _Optional[int] = ...) -> None: ...

class TFNode(_message.Message):
    __slots__ = ("name", "id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    id: int
    def __init__(self, name: _Optional[str] = ..., id: _Optional[int] = ...) -> None: ...

class TensorflowModelLoadRequest(_message.Message):
    __slots__ = ("session_id", "model_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    model_id: int
    def __init__(self, session_id: _Optional[int] = ..., model_id: _Optional[int] = ...) -> None: ...

class TensorflowModelLoadResponse(_message.Message):
    __slots__ = ("graph_def", "status")
    GRAPH_DEF_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    graph_def: bytes
    status: OpStatus
    def __init__(self, graph_def: _Optional[bytes] = ..., status: _Optional[_Union[OpStatus, _Mapping]] = ...) -> None: ...

class TensorflowModelUnloadRequest(_message.Message):
    __slots__ = ("session_id", "model_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    model_id: int
    def __init__(self, session_id: _Optional[int] = ..., model_id: _Optional[int] = ...) -> None: ...

class TensorflowModelUnloadResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: OpStatus
    def __init__(self, status: _Optional[_Union[OpStatus, _Mapping]] = ...) -> None: ...

class TensorflowModelRunRequest(_message.Message):
    __slots__ = ("session_id", "model_id", "run_options", "in_nodes", "out_nodes", "in_tensors")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    IN_NODES_FIELD_NUMBER: _ClassVar[int]
    OUT_NODES_FIELD_NUMBER: _ClassVar[int]
    IN_TENSORS_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    model_id: int
    run_options: bytes
    in_nodes: _containers.RepeatedCompositeFieldContainer[TFNode]
    out_nodes: _containers.RepeatedCompositeFieldContainer[TFNode]
    in_tensors: _containers.RepeatedCompositeFieldContainer[TFTensor]
    def __init__(self, session_id: _Optional[int] = ..., model_id: _Optional[int] = ..., run_options: _Optional[bytes] = ..., in_nodes: _Optional[_Iterable[_Union[TFNode, _Mapping]]] = ..., out_nodes: _Optional[_Iterable[_Union[TFNode, _Mapping]]] = ..., in_tensors: _Optional[_Iterable[_Union[TFTensor, _Mapping]]] = ...) -> None: ...

class TensorflowModelRunResponse(_message.Message):
    __slots__ = ("out_tensors", "status")
    OUT_TENSORS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    out_tensors: _containers.RepeatedCompositeFieldContainer[TFTensor]
    status: OpStatus
    def __init__(self, out_tensors: _Optional[_Iterable[_Union[TFTensor, _Mapping]]] = ..., status: _Optional[_Union[OpStatus, _Mapping]] = ...) -> None: ...

class TFLiteTensor(_message.Message):
    __slots__ = ("data", "dims", "type")
    DATA_FIELD_NUMBER: _ClassVar[int]
    DIMS_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    dims: _containers.RepeatedScalarFieldContainer[int]
    type: int
    def __init__(self, data: _Optional[bytes] = ..., dims: _Optional[_Iterable[int]] = ..., type: _Optional[int] = ...) -> None: ...

class TensorflowLiteModelLoadRequest(_message.Message):
    __slots__ = ("session_id", "model_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    model_id: int
    def __init__(self, session_id: _Optional[int] = ..., model_id: _Optional[int] = ...) -> None: ...

class TensorflowLiteModelUnloadRequest(_message.Message):
    __slots__ = ("session_id", "model_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    model_id: int
    def __init__(self, session_id: _Optional[int] = ..., model_id: _Optional[int] = ...) -> None: ...

class TensorflowLiteModelRunRequest(_message.Message):
    __slots__ = ("session_id", "model_id", "in_tensors", "nr_out_tensors")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    IN_TENSORS_FIELD_NUMBER: _ClassVar[int]
    NR_OUT_TENSORS_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    model_id: int
    in_tensors: _containers.RepeatedCompositeFieldContainer[TFLiteTensor]
    nr_out_tensors: int
    def __init__(self, session_id: _Optional[int] = ..., model_id: _Optional[int] = ..., in_tensors: _Optional[_Iterable[_Union[TFLiteTensor, _Mapping]]] = ..., nr_out_tensors: _Optional[int] = ...) -> None: ...

class TensorflowLiteModelRunResponse(_message.Message):
    __slots__ = ("out_tensors", "status")
    OUT_TENSORS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    out_tensors: _containers.RepeatedCompositeFieldContainer[TFLiteTensor]
    status: OpStatus
    def __init__(self, out_tensors: _Optional[_Iterable[_Union[TFLiteTensor, _Mapping]]] = ..., status: _Optional[_Union[OpStatus, _Mapping]] = ...) -> None: ...

class TorchTensor(_message.Message):
    __slots__ = ("data", "dims", "type")
    DATA_FIELD_NUMBER: _ClassVar[int]
    DIMS_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    dims: _containers.RepeatedScalarFieldContainer[int]
    type: int
    def __init__(self, data: _Optional[bytes] = ..., dims: _Optional[_Iterable[int]] = ..., type: _Optional[int] = ...) -> None: ...

class TorchModelLoadRequest(_message.Message):
    __slots__ = ("session_id", "model_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    model_id: int
    def __init__(self, session_id: _Optional[int] = ..., model_id: _Optional[int] = ...) -> None: ...

class TorchModelRunRequest(_message.Message):
    __slots__ = ("session_id", "model_id", "run_options", "in_tensors", "nr_out_tensors")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    IN_TENSORS_FIELD_NUMBER: _ClassVar[int]
    NR_OUT_TENSORS_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    model_id: int
    run_options: bytes
    in_tensors: _containers.RepeatedCompositeFieldContainer[TorchTensor]
    nr_out_tensors: int
    def __init__(self, session_id: _Optional[int] = ..., model_id: _Optional[int] = ..., run_options: _Optional[bytes] = ..., in_tensors: _Optional[_Iterable[_Union[TorchTensor, _Mapping]]] = ..., nr_out_tensors: _Optional[int] = ...) -> None: ...

class TorchModelRunResponse(_message.Message):
    __slots__ = ("out_tensors",)
    OUT_TENSORS_FIELD_NUMBER: _ClassVar[int]
    out_tensors: _containers.RepeatedCompositeFieldContainer[TorchTensor]
    def __init__(self, out_tensors: _Optional[_Iterable[_Union[TorchTensor, _Mapping]]] = ...) -> None: ...

class ProfilerRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    def __init__(self, session_id: _Optional[int] = ...) -> None: ...

class ProfilerSample(_message.Message):
    __slots__ = ("start", "time")
    START_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    start: int
    time: int
    def __init__(self, start: _Optional[int] = ..., time: _Optional[int] = ...) -> None: ...

class ProfilerRegion(_message.Message):
    __slots__ = ("samples",)
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    samples: _containers.RepeatedCompositeFieldContainer[ProfilerSample]
    def __init__(self, samples: _Optional[_Iterable[_Union[ProfilerSample, _Mapping]]] = ...) -> None: ...

class Profiler(_message.Message):
    __slots__ = ("component_name", "regions")
    class RegionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: ProfilerRegion
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[ProfilerRegion, _Mapping]] = ...) -> None: ...
    COMPONENT_NAME_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    component_name: str
    regions: _containers.MessageMap[str, ProfilerRegion]
    def __init__(self, component_name: _Optional[str] = ..., regions: _Optional[_Mapping[str, ProfilerRegion]] = ...) -> None: ...

class ProfilerResponse(_message.Message):
    __slots__ = ("profiler",)
    PROFILER_FIELD_NUMBER: _ClassVar[int]
    profiler: Profiler
    def __init__(self, profiler: _Optional[_Union[Profiler, _Mapping]] = ...) -> None: ...
