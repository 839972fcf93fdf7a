import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ResultStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESULT_STATUS_UNSPECIFIED: _ClassVar[ResultStatus]
    DISPATCHED: _ClassVar[ResultStatus]
    ACKNOWLEDGED: _ClassVar[ResultStatus]
    PROGRESS: _ClassVar[ResultStatus]
    SUCCEEDED: _ClassVar[ResultStatus]
    FAILED: _ClassVar[ResultStatus]
    REJECTED: _ClassVar[ResultStatus]
RESULT_STATUS_UNSPECIFIED: ResultStatus
DISPATCHED: ResultStatus
ACKNOWLEDGED: ResultStatus
PROGRESS: ResultStatus
SUCCEEDED: ResultStatus
FAILED: ResultStatus
REJECTED: ResultStatus

class EnrollRequest(_message.Message):
    __slots__ = ("token", "csr_pem", "hostname", "agent_version")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    token: str
    csr_pem: bytes
    hostname: str
    agent_version: str
    def __init__(self, token: _Optional[str] = ..., csr_pem: _Optional[bytes] = ..., hostname: _Optional[str] = ..., agent_version: _Optional[str] = ...) -> None: ...

class EnrollResponse(_message.Message):
    __slots__ = ("certificate_pem", "ca_chain_pem", "command_signing_public_key", "tenant_id", "server_id", "connect_address")
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    CA_CHAIN_PEM_FIELD_NUMBER: _ClassVar[int]
    COMMAND_SIGNING_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    CONNECT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    certificate_pem: bytes
    ca_chain_pem: bytes
    command_signing_public_key: bytes
    tenant_id: str
    server_id: str
    connect_address: str
    def __init__(self, certificate_pem: _Optional[bytes] = ..., ca_chain_pem: _Optional[bytes] = ..., command_signing_public_key: _Optional[bytes] = ..., tenant_id: _Optional[str] = ..., server_id: _Optional[str] = ..., connect_address: _Optional[str] = ...) -> None: ...

class CommandEnvelope(_message.Message):
    __slots__ = ("command_id", "idempotency_key", "tenant_id", "server_id", "type", "payload", "issued_at", "deadline", "signature")
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    command_id: str
    idempotency_key: str
    tenant_id: str
    server_id: str
    type: str
    payload: bytes
    issued_at: _timestamp_pb2.Timestamp
    deadline: _timestamp_pb2.Timestamp
    signature: bytes
    def __init__(self, command_id: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., tenant_id: _Optional[str] = ..., server_id: _Optional[str] = ..., type: _Optional[str] = ..., payload: _Optional[bytes] = ..., issued_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., signature: _Optional[bytes] = ...) -> None: ...

class CommandResult(_message.Message):
    __slots__ = ("command_id", "idempotency_key", "tenant_id", "server_id", "status", "progress_percent", "message", "output", "error_code", "at", "replayed", "session_id")
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_PERCENT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    command_id: str
    idempotency_key: str
    tenant_id: str
    server_id: str
    status: ResultStatus
    progress_percent: int
    message: str
    output: bytes
    error_code: str
    at: _timestamp_pb2.Timestamp
    replayed: bool
    session_id: str
    def __init__(self, command_id: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., tenant_id: _Optional[str] = ..., server_id: _Optional[str] = ..., status: _Optional[_Union[ResultStatus, str]] = ..., progress_percent: _Optional[int] = ..., message: _Optional[str] = ..., output: _Optional[bytes] = ..., error_code: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., replayed: _Optional[bool] = ..., session_id: _Optional[str] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("agent_version", "hostname", "capabilities")
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    agent_version: str
    hostname: str
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, agent_version: _Optional[str] = ..., hostname: _Optional[str] = ..., capabilities: _Optional[_Iterable[str]] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("session_id", "heartbeat_interval_ms")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    heartbeat_interval_ms: int
    def __init__(self, session_id: _Optional[str] = ..., heartbeat_interval_ms: _Optional[int] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("sent_at", "seq")
    SENT_AT_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    sent_at: _timestamp_pb2.Timestamp
    seq: int
    def __init__(self, sent_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., seq: _Optional[int] = ...) -> None: ...

class AgentMessage(_message.Message):
    __slots__ = ("hello", "heartbeat", "result")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    heartbeat: Heartbeat
    result: CommandResult
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., result: _Optional[_Union[CommandResult, _Mapping]] = ...) -> None: ...

class GatewayMessage(_message.Message):
    __slots__ = ("welcome", "heartbeat", "command")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    heartbeat: Heartbeat
    command: CommandEnvelope
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., command: _Optional[_Union[CommandEnvelope, _Mapping]] = ...) -> None: ...

class PresenceEvent(_message.Message):
    __slots__ = ("tenant_id", "server_id", "online", "session_id", "gateway_id", "at", "reason")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    ONLINE_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    server_id: str
    online: bool
    session_id: str
    gateway_id: str
    at: _timestamp_pb2.Timestamp
    reason: str
    def __init__(self, tenant_id: _Optional[str] = ..., server_id: _Optional[str] = ..., online: _Optional[bool] = ..., session_id: _Optional[str] = ..., gateway_id: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reason: _Optional[str] = ...) -> None: ...
