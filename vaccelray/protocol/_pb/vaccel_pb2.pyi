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
