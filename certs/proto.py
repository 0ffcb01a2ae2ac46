"""Message types of `istio.v1.auth.IstioCertificateService`, built at import from a descriptor.

Same field numbers as Istio's `security/proto/providers/google/ca.proto` / istio.io/api
`security/v1alpha1/ca.proto`, so our CA and istiod are interchangeable on the wire:

    message IstioCertificateRequest  { string csr = 1; int64 validity_duration = 3;
                                       google.protobuf.Struct metadata = 4; }
    message IstioCertificateResponse { repeated string cert_chain = 1; }
    service IstioCertificateService  { rpc CreateCertificate(IstioCertificateRequest)
                                           returns (IstioCertificateResponse); }

A private descriptor pool keeps these out of the process-wide registry other packages use.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, struct_pb2

SERVICE = "istio.v1.auth.IstioCertificateService"
METHOD = "CreateCertificate"
FULL_METHOD = f"/{SERVICE}/{METHOD}"
# Metadata key Istio's CA reads to sign on behalf of another identity (ztunnel's node-proxy mode).
IMPERSONATED_IDENTITY = "ImpersonatedIdentity"
# Our CA also returns its whole trust bundle (old + new root during rotation) in this header.
TRUST_BUNDLE_HEADER = "meshaccel-trust-bundle-bin"

_F = descriptor_pb2.FieldDescriptorProto


def _file() -> descriptor_pb2.FileDescriptorProto:
    f = descriptor_pb2.FileDescriptorProto(
        name="meshaccel/istio/v1/auth/ca.proto",
        package="istio.v1.auth",
        syntax="proto3",
        dependency=["google/protobuf/struct.proto"],
    )
    req = f.message_type.add(name="IstioCertificateRequest")
    req.field.add(name="csr", number=1, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL, json_name="csr")
    req.field.add(
        name="validity_duration", number=3, type=_F.TYPE_INT64, label=_F.LABEL_OPTIONAL, json_name="validityDuration"
    )
    req.field.add(
        name="metadata",
        number=4,
        type=_F.TYPE_MESSAGE,
        type_name=".google.protobuf.Struct",
        label=_F.LABEL_OPTIONAL,
        json_name="metadata",
    )
    resp = f.message_type.add(name="IstioCertificateResponse")
    resp.field.add(name="cert_chain", number=1, type=_F.TYPE_STRING, label=_F.LABEL_REPEATED, json_name="certChain")
    svc = f.service.add(name="IstioCertificateService")
    svc.method.add(
        name=METHOD,
        input_type=".istio.v1.auth.IstioCertificateRequest",
        output_type=".istio.v1.auth.IstioCertificateResponse",
    )
    return f


_pool = descriptor_pool.DescriptorPool()
_pool.AddSerializedFile(struct_pb2.DESCRIPTOR.serialized_pb)
_pool.AddSerializedFile(_file().SerializeToString())

# Typed as Any: runtime-built classes have no stubs; callers use the fields listed above.
IstioCertificateRequest: Any = message_factory.GetMessageClass(_pool.FindMessageTypeByName("istio.v1.auth.IstioCertificateRequest"))
IstioCertificateResponse: Any = message_factory.GetMessageClass(_pool.FindMessageTypeByName("istio.v1.auth.IstioCertificateResponse"))


def make_request(csr: str, validity_seconds: int, impersonate: str | None = None) -> Any:
    req = IstioCertificateRequest(csr=csr, validity_duration=validity_seconds)
    if impersonate is not None:
        req.metadata.fields[IMPERSONATED_IDENTITY].string_value = impersonate
    return req


def impersonated_identity(req: Any) -> str | None:
    """The ImpersonatedIdentity string from the request metadata, if set."""
    if not req.HasField("metadata"):
        return None
    value = req.metadata.fields.get(IMPERSONATED_IDENTITY)
    if value is None:
        return None
    if value.WhichOneof("kind") != "string_value":
        raise ValueError(f"metadata {IMPERSONATED_IDENTITY} must be a string")
    return str(value.string_value)
