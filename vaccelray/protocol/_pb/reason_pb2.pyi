from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Reason(_message.Message):
    __slots__ = ("code",)
    class Code(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        UNSPECIFIED: _ClassVar[Reason.Code]
        UNKNOWN_SESSION: _ClassVar[Reason.Code]
        UNKNOWN_FUNCTION: _ClassVar[Reason.Code]
        NOT_DISPATCHED: _ClassVar[Reason.Code]
        SHUTTING_DOWN: _ClassVar[Reason.Code]
        UNKNOWN_RESOURCE: _ClassVar[Reason.Code]
        ACTOR_DIED: _ClassVar[Reason.Code]
    UNSPECIFIED: Reason.Code
    UNKNOWN_SESSION: Reason.Code
    UNKNOWN_FUNCTION: Reason.Code
    NOT_DISPATCHED: Reason.Code
    SHUTTING_DOWN: Reason.Code
    UNKNOWN_RESOURCE: Reason.Code
    ACTOR_DIED: Reason.Code
    CODE_FIELD_NUMBER: _ClassVar[int]
    code: Reason.Code
    def __init__(self, code: _Optional[_Union[Reason.Code, str]] = ...) -> None: ...
