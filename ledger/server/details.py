"""Rich error details (google.rpc.Status), so that a client program can tell which field or
which rule a call failed on: every INVALID_ARGUMENT carries a google.rpc.BadRequest naming the
field, every FAILED_PRECONDITION a google.rpc.PreconditionFailure naming the rule.

Sent as the `grpc-status-details-bin` trailer, as grpcio-status reads it
(grpc_status.rpc_status.from_call). Protobuf only, no grpc: the liquidation writer's process
builds them too.
"""

from __future__ import annotations

from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from ledger.errors import FailedPrecondition, InvalidArgument
from ledger.server.codes import Code

DETAILS_KEY = "grpc-status-details-bin"


def status_details(error: Exception, code: int, message: str) -> bytes | None:
    """The serialized google.rpc.Status of a failed call, or None when it has no details."""
    detail: error_details_pb2.BadRequest | error_details_pb2.PreconditionFailure
    if code == Code.INVALID_ARGUMENT:
        field = error.field if isinstance(error, InvalidArgument) else _field_of(error)
        detail = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=field, description=message)
            ]
        )
    elif code == Code.FAILED_PRECONDITION:
        kind, subject = (
            (error.type, error.subject)
            if isinstance(error, FailedPrecondition)
            else ("LEDGER_STATE", "")
        )
        detail = error_details_pb2.PreconditionFailure(
            violations=[
                error_details_pb2.PreconditionFailure.Violation(
                    type=kind, subject=subject, description=message
                )
            ]
        )
    else:
        return None
    packed = any_pb2.Any()
    packed.Pack(detail)
    status = status_pb2.Status(code=int(code), message=message, details=[packed])
    serialized: bytes = status.SerializeToString()
    return serialized


def _field_of(error: Exception) -> str:
    """The field of an INVALID_ARGUMENT that is not an InvalidArgument: the allocator's
    errors are about the streamed positions."""
    return "positions"
