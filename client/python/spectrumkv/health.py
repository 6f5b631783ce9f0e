"""gRPC health checking (grpc.health.v1.Health/Check) without the grpc_health package.

Debian's python3-grpcio does not ship `grpc_health`, and no health.proto is installed with
libgrpc++-dev. The protocol is two tiny messages, so they are built here at import time from a
descriptor that mirrors grpc/health/v1/health.proto (field numbers and names are the standard
ones). When `grpc_health` is installed, its generated classes are used instead.
"""

try:  # pip's grpcio-health-checking
    from grpc_health.v1 import health_pb2 as _health_pb2

    HealthCheckRequest = _health_pb2.HealthCheckRequest
    HealthCheckResponse = _health_pb2.HealthCheckResponse
    SOURCE = "grpc_health"
except ImportError:  # build the two messages from a descriptor
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    def _build():
        f = descriptor_pb2.FileDescriptorProto()
        f.name = "spectrumkv/grpc_health_v1.proto"  # private name: no clash with a real one
        f.package = "grpc.health.v1"
        f.syntax = "proto3"
        req = f.message_type.add()
        req.name = "HealthCheckRequest"
        field = req.field.add()
        field.name, field.number = "service", 1
        field.type = descriptor_pb2.FieldDescriptorProto.TYPE_STRING
        field.label = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
        resp = f.message_type.add()
        resp.name = "HealthCheckResponse"
        enum = resp.enum_type.add()
        enum.name = "ServingStatus"
        for name, number in (("UNKNOWN", 0), ("SERVING", 1), ("NOT_SERVING", 2), ("SERVICE_UNKNOWN", 3)):
            value = enum.value.add()
            value.name, value.number = name, number
        field = resp.field.add()
        field.name, field.number = "status", 1
        field.type = descriptor_pb2.FieldDescriptorProto.TYPE_ENUM
        field.type_name = ".grpc.health.v1.HealthCheckResponse.ServingStatus"
        field.label = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
        pool = descriptor_pool.DescriptorPool()
        pool.Add(f)
        if hasattr(message_factory, "GetMessageClass"):  # protobuf >= 4.22
            get = lambda name: message_factory.GetMessageClass(pool.FindMessageTypeByName(name))  # noqa: E731
        else:
            factory = message_factory.MessageFactory(pool)
            get = lambda name: factory.GetPrototype(pool.FindMessageTypeByName(name))  # noqa: E731
        return get("grpc.health.v1.HealthCheckRequest"), get("grpc.health.v1.HealthCheckResponse")

    HealthCheckRequest, HealthCheckResponse = _build()
    SOURCE = "built-in descriptor"

_STATUS_NAMES = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


def check(channel, service="", timeout=5.0):
    """Calls Health/Check; returns the status name ("SERVING", "NOT_SERVING", ...).

    Raises grpc.RpcError on transport errors (e.g. UNAVAILABLE while the daemon starts).
    """
    call = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=HealthCheckRequest.SerializeToString,
        response_deserializer=HealthCheckResponse.FromString)
    response = call(HealthCheckRequest(service=service), timeout=timeout)
    return _STATUS_NAMES.get(response.status, str(response.status))
