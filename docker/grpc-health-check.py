#!/usr/bin/python3
"""gRPC health check (grpc.health.v1.Health/Check) for spectrumkvd: exit 0 when SERVING, 1 otherwise.

Usage: skv-health-check [TARGET] [--service=NAME] [--timeout=SECONDS]
TARGET defaults to $SKV_HEALTH_TARGET or 127.0.0.1:50551 (also unix:/path).

Debian's python3-grpcio has no grpc_health module, so the two tiny messages are encoded by hand:
HealthCheckRequest{string service = 1}, HealthCheckResponse{ServingStatus status = 1}, SERVING = 1.
"""
import os
import sys

import grpc


def encode_request(service: str) -> bytes:
    data = service.encode()
    if not data:
        return b""
    if len(data) > 127:
        raise ValueError("service name too long")
    return b"\x0a" + bytes([len(data)]) + data


def decode_status(payload: bytes) -> int:
    # Field 1, varint; proto3 omits a zero value (UNKNOWN).
    if len(payload) >= 2 and payload[0] == 0x08:
        return payload[1]
    return 0


def main(argv):
    target = os.environ.get("SKV_HEALTH_TARGET", "127.0.0.1:50551")
    service, timeout = "", 3.0
    for arg in argv[1:]:
        if arg.startswith("--service="):
            service = arg.split("=", 1)[1]
        elif arg.startswith("--timeout="):
            timeout = float(arg.split("=", 1)[1])
        elif arg.startswith("-"):
            print(__doc__, file=sys.stderr)
            return 2
        else:
            target = arg
    names = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}
    try:
        with grpc.insecure_channel(target) as channel:
            check = channel.unary_unary("/grpc.health.v1.Health/Check")
            status = decode_status(check(encode_request(service), timeout=timeout))
    except grpc.RpcError as e:
        print(f"health {target}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    print(f"health {target}: {names.get(status, status)}")
    return 0 if status == 1 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
