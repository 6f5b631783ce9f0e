#!/usr/bin/python3
"""SpectrumKV from Python: one KV transfer between two running spectrumkvd daemons.

    SKV_PYTHON_STUBS=build/python /usr/bin/python3 client/python/example.py \
        --sender=127.0.0.1:50551 --receiver=127.0.0.1:50561 --peer=decode

Steps: gRPC health of both daemons; RegisterModel on both (same shape -> same compatibility
hash); a small synthetic FP16 KV in POSIX shared memory; Receive on the decode daemon (in a
thread) + Send on the prefill daemon at budget 0.5; the transfer's statistics; a check of the
received KV against the sender's stateless Encode/Decode of the same KV; an FP16 passthrough
transfer checked byte for byte; the same KV streamed layer by layer (SendStream) and checked;
ListTransfers on both; and one deliberately bad request to show
how errors surface. Exit code 0 = everything checked.

Needs only /usr/bin/python3 with Debian's python3-grpcio and python3-protobuf.
"""

import argparse
import math
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import grpc  # noqa: E402

from spectrumkv import (  # noqa: E402
    Client, SharedMemoryBuffer, SpectrumKVError, dense_layout, dense_layout_bytes, fill_synthetic_kv, fp16_values,
    health, pb, seconds)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sender", default="127.0.0.1:50551", help="prefill-side daemon gRPC address")
    p.add_argument("--receiver", default="127.0.0.1:50561", help="decode-side daemon gRPC address")
    p.add_argument("--peer", default="decode", help="the receiving daemon's id as the sender knows it")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--kv_heads", type=int, default=2)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--request_id", type=int, default=0, help="0 = derived from the time")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds for the transfer")
    return p.parse_args()


def state_name(value):
    return pb.TransferState.Name(value).replace("TRANSFER_STATE_", "")


def role_name(value):
    return pb.TransferRole.Name(value).replace("TRANSFER_ROLE_", "")


def print_transfers(label, client):
    listing = client.list_transfers(page_size=10)
    print("ListTransfers %s (%s): %d transfer(s)" % (label, client.target, len(listing.transfers)))
    for t in listing.transfers:
        print("  request %d  %-8s %-9s model=%s peer=%s segments %d/%d achieved_b=%.4f%s" % (
            t.request_id, role_name(t.role), state_name(t.state), t.model_id, t.peer_daemon_id or "-",
            t.segments_done, t.segments_total, t.stats.achieved_budget,
            ("  error %d: %s" % (t.error_code, t.error_message)) if t.error_code else ""))
    return listing


def main():
    args = parse_args()
    request_id = args.request_id or (int(time.time() * 1000) % (1 << 40)) + 1

    sender = Client.connect(args.sender, transfer_timeout=args.timeout + 10)
    receiver = Client.connect(args.receiver, transfer_timeout=args.timeout + 10)

    # 1. Health (grpc.health.v1; messages from grpc_health or built in, see spectrumkv/health.py).
    for label, c in (("sender", sender), ("receiver", receiver)):
        print("health %s (%s): %s [%s]" % (label, c.target, c.health(), health.SOURCE))

    # 2. The same model on both daemons.
    name = "py-example-%dx%dx%d-fp16" % (args.layers, args.kv_heads, args.head_dim)
    models = [c.register_model(name, args.layers, args.kv_heads, args.head_dim) for c in (sender, receiver)]
    if models[0].compatibility_hash != models[1].compatibility_hash:
        raise SystemExit("compatibility hashes differ: %x vs %x" % (models[0].compatibility_hash,
                                                                    models[1].compatibility_hash))
    print("registered model '%s' on both: model_id=%s compatibility_hash=%016x int4_enabled=%s" % (
        name, models[0].model_id, models[0].compatibility_hash, models[0].int4_enabled))

    # 3. KV in shared memory: source filled, destination zero.
    layout = dense_layout(args.layers, args.kv_heads, args.head_dim, args.tokens)
    size = dense_layout_bytes(layout)
    with SharedMemoryBuffer.create(size) as src, SharedMemoryBuffer.create(size) as dst:
        fill_synthetic_kv(src.buf, layout, seed=7)
        print("KV: %d layers x %d tokens x %d heads x %d dims FP16 = %d bytes in %s -> %s" % (
            args.layers, args.tokens, args.kv_heads, args.head_dim, size, src.name, dst.name))

        # 4. Receive on the decode daemon (a thread), then Send on the prefill daemon.
        pending = receiver.receive_async(request_id, models[1].model_id, dst, layout, timeout_s=args.timeout)
        sent = sender.send(request_id, models[0].model_id, src, layout, args.peer, args.budget,
                           passthrough=pb.PASSTHROUGH_MODE_NEVER)
        received = pending.result(timeout=args.timeout + 10)

        s, r = sent.stats, received.stats
        d = s.durations
        print("transfer %d at b=%.2f: committed" % (request_id, args.budget))
        print("  budget     requested %.3f, achieved %.4f (payload only %.4f)" % (
            s.requested_budget, s.achieved_budget, s.payload_budget))
        print("  bytes      raw %d, wire %d (%.2fx smaller), %d segments" % (
            s.raw_bytes, s.wire_bytes, s.raw_bytes / max(1, s.wire_bytes), s.segments))
        print("  rows/tier  " + ", ".join("%s %d" % (pb.Tier.Name(t.tier)[len("TIER_"):].lower(), t.rows)
                                          for t in s.tier_rows))
        print("  sender (s) score %.4f, plan %.4f, encode %.4f, wire %.4f, total %.4f" % (
            seconds(d.score), seconds(d.plan), seconds(d.encode), seconds(d.wire), seconds(d.total)))
        print("  receiver   decode %.4f s, commit %.4f s, total %.4f s" % (
            seconds(r.durations.decode), seconds(r.durations.commit), seconds(r.durations.total)))
        print("  passthrough %s, importance %s" % (
            s.passthrough.passthrough, pb.ImportanceSource.Name(s.importance_source)))
        m = received.kept  # BYTES format (the default): one byte per token, 1 = kept
        print("  kept mask  layers=%d tokens=%d, %d mask bytes, %d of them kept" % (
            m.layers, m.tokens, len(m.mask), sum(m.mask)))
        if not (0 < s.achieved_budget <= args.budget + 1e-9):
            raise SystemExit("achieved budget %.4f is not within (0, %.2f]" % (s.achieved_budget, args.budget))

        # 5. Check: the received KV equals the codec's own Encode/Decode of the same KV, and is close
        #    to the source.
        got = dst.read()
        encoded = sender.encode(src.read(), layout, args.budget, request_id=request_id)
        decoded = sender.decode(encoded.segments, output_layout=layout)
        if decoded.kv != got:
            raise SystemExit("received KV differs from the sender's Encode/Decode of the same KV")
        a, b = fp16_values(src.read()), fp16_values(got)
        err = math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)) / max(1e-30, sum(x * x for x in a)))
        print("  check      received KV identical to Encode/Decode; relative L2 error vs source %.4f" % err)
        if not err < 0.2:
            raise SystemExit("relative error %.4f too large" % err)
        if s.raw_bytes != size or r.raw_bytes != size:
            raise SystemExit("raw_bytes %d (sender) / %d (receiver), expected %d" % (s.raw_bytes, r.raw_bytes, size))

        # 6. FP16 passthrough (b = 1) of the same KV must land byte for byte.
        dst.buf[:] = bytes(size)
        pending = receiver.receive_async(request_id + 1, models[1].model_id, dst, layout, timeout_s=args.timeout)
        raw = sender.send(request_id + 1, models[0].model_id, src, layout, args.peer, 1.0,
                          passthrough=pb.PASSTHROUGH_MODE_ALWAYS)
        pending.result(timeout=args.timeout + 10)
        print("transfer %d at b=1.00 (passthrough %s): %d wire bytes, %.4f s" % (
            request_id + 1, raw.stats.passthrough.passthrough, raw.stats.wire_bytes, seconds(raw.stats.durations.total)))
        if not raw.stats.passthrough.passthrough or dst.read() != src.read():
            raise SystemExit("passthrough transfer did not deliver the source bytes unchanged")
        print("  check      passthrough KV identical to the source")

        # 6b. The same KV streamed layer by layer (SendStream), as an engine does during prefill:
        # open, one layer_ready per layer as it is computed, seal; FP16 rows must land unchanged.
        dst.buf[:] = bytes(size)
        pending = receiver.receive_async(request_id + 3, models[1].model_id, dst, layout, timeout_s=args.timeout)
        stream = sender.send_stream(request_id + 3, models[0].model_id, src, layout, args.peer, 1.0,
                                    passthrough=pb.PASSTHROUGH_MODE_ALWAYS)
        for layer in range(layout.layers):
            stream.layer_ready(layer)
        stream.seal()
        streamed = stream.wait(timeout=args.timeout + 10)
        pending.result(timeout=args.timeout + 10)
        kinds = [e.WhichOneof("event") for e in stream.events]
        print("transfer %d streamed layer by layer: events %s; %d wire bytes" % (
            request_id + 3, ", ".join("%s x%d" % (k, kinds.count(k)) for k in dict.fromkeys(kinds)),
            streamed.stats.wire_bytes))
        if dst.read() != src.read() or kinds.count("layer_sent") != layout.layers:
            raise SystemExit("the streamed transfer did not deliver every layer unchanged")
        print("  check      streamed KV identical to the source")

    # 7. Transfer listings.
    for label, c in (("sender", sender), ("receiver", receiver)):
        listing = print_transfers(label, c)
        if not any(x.request_id == request_id and x.state == pb.TRANSFER_STATE_COMMITTED
                   for x in listing.transfers):
            raise SystemExit("transfer %d not listed as COMMITTED on the %s" % (request_id, label))

    # 8. Errors are exceptions with the gRPC status code and the field at fault.
    try:
        sender.send(request_id + 2, models[0].model_id, b"\0" * 16, layout, args.peer, budget=1.5)
        raise SystemExit("a budget of 1.5 was accepted")
    except SpectrumKVError as e:
        print("bad request -> SpectrumKVError code=%s details=%r" % (e.code.name, e.details))
        if e.code != grpc.StatusCode.INVALID_ARGUMENT:
            raise SystemExit("expected INVALID_ARGUMENT, got %s" % e.code.name)

    sender.close()
    receiver.close()
    print("python example: OK")
    return 0


if __name__ == "__main__":
    # SIGTERM (timeout, ctest) unwinds like an exception, so the shared-memory objects are unlinked.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        sys.exit(main())
    except SpectrumKVError as e:
        print("python example: FAILED: %s" % e, file=sys.stderr)
        sys.exit(1)
