"""Python helpers for spectrumkvd, on top of the generated `spectrumkv.v1` gRPC stubs.

Needs only grpcio and protobuf (Debian: python3-grpcio, python3-protobuf). An installed package
carries its stubs; from a source checkout they are found through SKV_PYTHON_STUBS (default:
build/python); see _stubs.py. Engine connectors live in `spectrumkv.integrations`.

    from spectrumkv import Client, SharedMemoryBuffer, dense_layout, pb

    kv = Client.connect("127.0.0.1:50551")
    model = kv.register_model("llama-7b", layers=32, kv_heads=8, head_dim=128)
    layout = dense_layout(layers=32, kv_heads=8, head_dim=128, tokens=1000)
    with SharedMemoryBuffer.create(dense_layout_bytes(layout)) as src:
        ...fill src.buf...
        stats = kv.send(request_id=42, model_id=model.model_id, source=src, layout=layout,
                        peer="decode-0", budget=0.5).stats

Every RPC wrapper returns the response message or raises SpectrumKVError, which carries the gRPC
status code (`.code`, a grpc.StatusCode) and the daemon's message (`.details`, starting with the
field at fault).
"""

import concurrent.futures
import mmap
import os
import queue
import random
import struct
import threading
import time

import grpc
from google.protobuf import duration_pb2

from . import _stubs

pb, rpc = _stubs.load(__path__)  # noqa: F401  (re-exported)
from . import health  # noqa: E402

__all__ = [
    "pb", "rpc", "Client", "SendStream", "SpectrumKVError", "SharedMemoryBuffer", "dense_layout",
    "dense_layout_bytes",
    "fill_synthetic_kv", "health",
]

BYTES_PER_ELEMENT = 2  # FP16 and BF16
_DEFAULT_MESSAGE_LIMIT = 64 << 20  # the daemon's gRPC message limit


class SpectrumKVError(Exception):
    """A failed RPC: `rpc` (method name), `code` (grpc.StatusCode), `details` (daemon message)."""

    def __init__(self, rpc_name, code, details):
        self.rpc = rpc_name
        self.code = code
        self.details = details
        code_name = code.name if isinstance(code, grpc.StatusCode) else str(code)
        super().__init__("%s failed: %s: %s" % (rpc_name, code_name, details))

    @classmethod
    def from_rpc_error(cls, rpc_name, error):
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        return cls(rpc_name, code, details)


# ---- layouts ------------------------------------------------------------------------------------

def dense_layout(layers, kv_heads, head_dim, tokens, dtype=None):
    """The dense contiguous layout [layers][K, V][tokens][kv_heads][head_dim] (all strides 0)."""
    return pb.KvLayout(dtype=dtype if dtype is not None else pb.DTYPE_FP16, layers=layers, kv_heads=kv_heads,
                       head_dim=head_dim, tokens=tokens, contiguous=pb.ContiguousKvLayout())


def dense_layout_bytes(layout):
    """Bytes of the dense layout: layers * 2 * tokens * kv_heads * head_dim * 2."""
    return layout.layers * 2 * layout.tokens * layout.kv_heads * layout.head_dim * BYTES_PER_ELEMENT


def fill_synthetic_kv(buf, layout, seed=7):
    """Fills `buf` (writable, dense_layout_bytes(layout) long) with FP16 KV that looks like real
    KV: keys Gaussian with a per-channel bias and a few outlier channels, values Gaussian. Pure
    Python (struct's 'e' format), so keep it small: ~1 M elements per second."""
    rng = random.Random(seed)
    head_dim = layout.head_dim
    per_tensor = layout.tokens * layout.kv_heads * head_dim
    key_scale = [8.0 if ch % 37 == 5 else 1.0 for ch in range(head_dim)]
    key_bias = [0.5 * (ch % 7) for ch in range(head_dim)]
    gauss = rng.gauss
    pack = struct.Struct("<%de" % per_tensor).pack_into
    offset = 0
    for _ in range(layout.layers):
        keys = [gauss(0.0, 1.0) * key_scale[i % head_dim] + key_bias[i % head_dim] for i in range(per_tensor)]
        pack(buf, offset, *keys)
        offset += per_tensor * BYTES_PER_ELEMENT
        pack(buf, offset, *[gauss(0.0, 1.0) for _ in range(per_tensor)])
        offset += per_tensor * BYTES_PER_ELEMENT


def fp16_values(data):
    """The FP16 values of `data` (bytes-like) as a tuple of floats."""
    return struct.unpack("<%de" % (len(data) // 2), data)


# ---- shared memory ------------------------------------------------------------------------------

_SHM_DIR = "/dev/shm"
_counter = 0
_counter_lock = threading.Lock()


class SharedMemoryBuffer:
    """A POSIX shared-memory object owned by this process (shm_open semantics through /dev/shm):
    created exclusively, mapped read-write, unlinked by close() / the context manager.

    `buf` is a writable memoryview of the whole object; `handle()` is the KvHandle to give the
    daemon. (multiprocessing.shared_memory would also do, but its resource tracker unlinks and
    warns about objects it thinks leaked; here the lifetime is explicit.)
    """

    def __init__(self, name, size, fd, mapping):
        self.name = name
        self.size = size
        self._fd = fd
        self._mmap = mapping
        self.buf = memoryview(mapping)

    @classmethod
    def create(cls, size, name=None):
        global _counter
        if size <= 0:
            raise ValueError("shared memory size must be > 0")
        if name is None:
            with _counter_lock:
                _counter += 1
                name = "/skv-py-%d-%d" % (os.getpid(), _counter)
        if not name.startswith("/"):
            name = "/" + name
        if "/" in name[1:] or len(name) > 255:
            raise ValueError("shared memory name %r: at most 255 characters, no '/' after the first" % name)
        path = os.path.join(_SHM_DIR, name[1:])
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        return cls(name, size, fd, mapping)

    def handle(self, offset=0, length=None):
        """KvHandle naming [offset, offset + length) of this object (default: all of it)."""
        if length is None:
            length = self.size - offset
        return pb.KvHandle(shared_memory=pb.SharedMemoryHandle(name=self.name, offset=offset, length=length))

    def read(self, offset=0, length=None):
        end = self.size if length is None else offset + length
        return bytes(self.buf[offset:end])

    def close(self):
        """Unmaps and unlinks (idempotent)."""
        if self._mmap is None:
            return
        try:
            self.buf.release()
            self._mmap.close()
        except BufferError:
            pass  # tensors still view the mapping (torch.frombuffer): it goes when they do
        os.close(self._fd)
        try:
            os.unlink(os.path.join(_SHM_DIR, self.name[1:]))
        except FileNotFoundError:
            pass
        self._mmap = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


# ---- client -------------------------------------------------------------------------------------

def _duration(seconds):
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def _as_handle(memory):
    if isinstance(memory, SharedMemoryBuffer):
        return memory.handle()
    if isinstance(memory, (bytes, bytearray, memoryview)):
        return pb.KvHandle(inline_data=bytes(memory))
    if isinstance(memory, pb.KvHandle):
        return memory
    raise TypeError("expected a SharedMemoryBuffer, bytes or a KvHandle, got %r" % type(memory))


def _as_peer(peer):
    if isinstance(peer, pb.PeerRef):
        return peer
    return pb.PeerRef(daemon_id=peer)


def _set_send_options(message, passthrough, policy_override, token_scores):
    """The optional fields SendRequest and StreamOpen share."""
    if passthrough is not None:
        message.passthrough = passthrough
    if policy_override is not None:
        message.policy_override.CopyFrom(policy_override)
    if token_scores is not None:
        message.token_scores.scores.extend(token_scores)


class Client:
    """One daemon's API. Each method returns the response message or raises SpectrumKVError."""

    def __init__(self, channel, target, call_timeout=10.0, transfer_timeout=120.0):
        self.channel = channel
        self.target = target
        self.stub = rpc.SpectrumKVStub(channel)
        self.call_timeout = call_timeout
        self.transfer_timeout = transfer_timeout
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="skv-client")

    @classmethod
    def connect(cls, target, root_certificates=None, private_key=None, certificate_chain=None,
                call_timeout=10.0, transfer_timeout=120.0, wait_ready=10.0):
        """Opens a channel to `target` ("host:port" or "unix:/path"); TLS when a CA is given (and
        mutual TLS with a key and chain). With `wait_ready` > 0, waits that many seconds for the
        health service to report SERVING and raises SpectrumKVError(UNAVAILABLE) otherwise."""
        options = [("grpc.max_receive_message_length", _DEFAULT_MESSAGE_LIMIT),
                   ("grpc.max_send_message_length", _DEFAULT_MESSAGE_LIMIT)]
        if root_certificates is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
            channel = grpc.secure_channel(target, credentials, options=options)
        else:
            channel = grpc.insecure_channel(target, options=options)
        client = cls(channel, target, call_timeout, transfer_timeout)
        if wait_ready and wait_ready > 0:
            client.wait_until_serving(wait_ready)
        return client

    def close(self):
        self._pool.shutdown(wait=False)
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # -- health --
    def health(self, service="", timeout=None):
        """The health service's status name for `service` ("" = the whole server)."""
        try:
            return health.check(self.channel, service, timeout or self.call_timeout)
        except grpc.RpcError as e:
            raise SpectrumKVError.from_rpc_error("Health/Check", e) from None

    def wait_until_serving(self, timeout=10.0):
        deadline = time.monotonic() + timeout
        last = None
        while True:
            try:
                status = health.check(self.channel, "", max(0.1, min(1.0, deadline - time.monotonic())))
                if status == "SERVING":
                    return
                last = "health status %s" % status
            except grpc.RpcError as e:
                last = "%s: %s" % (e.code().name, e.details())
            if time.monotonic() >= deadline:
                raise SpectrumKVError("Health/Check", grpc.StatusCode.UNAVAILABLE,
                                      "%s not serving after %.1f s (%s)" % (self.target, timeout, last))
            time.sleep(0.05)

    # -- RPCs --
    def _call(self, name, request, timeout=None):
        method = getattr(self.stub, name)
        try:
            return method(request, timeout=timeout or self.call_timeout)
        except grpc.RpcError as e:
            raise SpectrumKVError.from_rpc_error(name, e) from None

    def register_model(self, name, layers, kv_heads, head_dim, dtype=None, query_heads=0, default_policy=None,
                       profile=None):
        """RegisterModel. `profile`: the model's profile, a pb.ModelProfile or the path of the
        file skv-calibrate wrote; peers must register the same one."""
        shape = pb.ModelShape(layers=layers, kv_heads=kv_heads, head_dim=head_dim,
                              dtype=dtype if dtype is not None else pb.DTYPE_FP16, query_heads=query_heads)
        request = pb.RegisterModelRequest(name=name, shape=shape)
        if default_policy is not None:
            request.default_policy.CopyFrom(default_policy)
        if isinstance(profile, (str, os.PathLike)):
            with open(profile, "rb") as f:
                request.profile.ParseFromString(f.read())
        elif profile is not None:
            request.profile.CopyFrom(profile)
        return self._call("RegisterModel", request)

    def send(self, request_id, model_id, source, layout, peer, budget, passthrough=None, policy_override=None,
             token_scores=None, timeout=None):
        """Send: returns SendResponse once the peer committed the KV. `source` is a
        SharedMemoryBuffer, bytes (inline) or a KvHandle; `peer` a daemon id or a PeerRef;
        `passthrough` a pb.PASSTHROUGH_MODE_* (default AUTO)."""
        request = pb.SendRequest(request_id=request_id, model_id=model_id, source=_as_handle(source),
                                 source_layout=layout, peer=_as_peer(peer), budget=budget)
        _set_send_options(request, passthrough, policy_override, token_scores)
        return self._call("Send", request, timeout or self.transfer_timeout)

    def send_stream(self, request_id, model_id, source, layout, peer, budget, tokens=None, passthrough=None,
                    policy_override=None, token_scores=None, cache_id=None, timeout=None):
        """Opens a SendStream (layer by layer while prefill runs) and returns a SendStream: call
        layer_ready() as each layer (or chunk) is computed, then seal(), then wait(). `source` and
        `layout` are the request's KV handle and layout, or None with `cache_id` (a registered
        cache; then `tokens` is required and layer_ready() names block ids)."""
        open_msg = pb.StreamOpen(request_id=request_id, model_id=model_id, peer=_as_peer(peer), budget=budget,
                                 tokens=tokens if tokens is not None else layout.tokens)
        if cache_id is not None:
            open_msg.cache_id = cache_id
        else:
            open_msg.handle.handle.CopyFrom(_as_handle(source))
            open_msg.handle.layout.CopyFrom(layout)
        _set_send_options(open_msg, passthrough, policy_override, token_scores)
        return SendStream(self.stub, open_msg, timeout or self.transfer_timeout)

    def register_cache(self, cache_id, model_id, memory, layout, writable=False):
        """Registers an engine worker's paged pools once (`layout`: paged, no block ids);
        `writable` for a decode worker whose Receives name blocks in it."""
        return self._call("RegisterCache", pb.RegisterCacheRequest(cache_id=cache_id, model_id=model_id,
                                                                   memory=_as_handle(memory), layout=layout,
                                                                   writable=writable))

    def receive(self, request_id, model_id, destination, layout, timeout_s=30.0, mask_format=None, timeout=None,
                sender_daemon_id=""):
        """Receive: returns ReceiveResponse once every row is written and verified."""
        request = pb.ReceiveRequest(request_id=request_id, model_id=model_id, destination=_as_handle(destination),
                                    destination_layout=layout, timeout=_duration(timeout_s),
                                    sender_daemon_id=sender_daemon_id)
        if mask_format is not None:
            request.mask_format = mask_format
        return self._call("Receive", request, timeout or max(self.transfer_timeout, timeout_s + 5))

    def receive_blocks(self, request_id, model_id, cache_id, tokens, block_ids, timeout_s=30.0, sender_daemon_id=""):
        """Receive into blocks of a cache registered writable (RegisterCache): `block_ids[i]` holds
        sequence tokens [i * block_size, (i + 1) * block_size)."""
        request = pb.ReceiveRequest(request_id=request_id, model_id=model_id, timeout=_duration(timeout_s),
                                    sender_daemon_id=sender_daemon_id,
                                    destination_blocks=pb.RegisteredBlocks(cache_id=cache_id, tokens=tokens,
                                                                           block_ids=list(block_ids)))
        return self._call("Receive", request, max(self.transfer_timeout, timeout_s + 5))

    def receive_async(self, *args, **kwargs):
        """receive() on a worker thread: a concurrent.futures.Future whose result() is the
        ReceiveResponse or raises SpectrumKVError."""
        return self._pool.submit(self.receive, *args, **kwargs)

    def get_transfer(self, request_id, role=None):
        return self._call("GetTransfer", pb.GetTransferRequest(request_id=request_id, role=role or 0))

    def list_transfers(self, role=None, state=None, page_size=0, page_token=""):
        return self._call("ListTransfers", pb.ListTransfersRequest(role=role or 0, state=state or 0,
                                                                   page_size=page_size, page_token=page_token))

    def cancel_transfer(self, request_id, role=None):
        return self._call("CancelTransfer", pb.CancelTransferRequest(request_id=request_id, role=role or 0))

    def probe(self, model_id, sample, layout, max_int4_error=0.0, dry_run=False):
        return self._call("Probe", pb.ProbeRequest(model_id=model_id, sample=_as_handle(sample), sample_layout=layout,
                                                   max_int4_error=max_int4_error, dry_run=dry_run))

    def encode(self, kv, layout, budget, request_id=0, policy=None, stream_chunk_ends=None):
        """Encode; with `stream_chunk_ends`, as a SendStream signalling every layer's rows up to each
        end in turn (chunk by chunk, layers in order) would."""
        request = pb.EncodeRequest(kv=bytes(kv), layout=layout, budget=budget, request_id=request_id)
        if policy is not None:
            request.policy.CopyFrom(policy)
        if stream_chunk_ends is not None:
            request.stream.chunk_token_ends.extend(stream_chunk_ends)
        return self._call("Encode", request)

    def decode(self, segments, output_layout=None, mask_format=None):
        request = pb.DecodeRequest(segments=list(segments))
        if output_layout is not None:
            request.output_layout.CopyFrom(output_layout)
        if mask_format is not None:
            request.mask_format = mask_format
        return self._call("Decode", request)


class SendStream:
    """One SendStream call. Messages are queued and sent in order by gRPC's request iterator, so
    layer_ready() never blocks the caller's forward pass; events (opened, layer_consumed,
    layer_sent, done) are read on a thread and kept in `events`."""

    _CLOSE = object()

    def __init__(self, stub, open_msg, timeout):
        self.events = []
        self._queue = queue.Queue()
        self._queue.put(pb.SendStreamRequest(open=open_msg))
        self._call = stub.SendStream(self._requests(), timeout=timeout)
        self._outcome = None
        self._done = threading.Event()
        self._reader = threading.Thread(target=self._read, name="skv-send-stream", daemon=True)
        self._reader.start()

    def _requests(self):
        while True:
            message = self._queue.get()
            if message is SendStream._CLOSE:
                return
            yield message

    def _read(self):
        done = None
        try:
            for event in self._call:
                self.events.append(event)
                if event.HasField("done"):
                    done = event.done
            self._outcome = done if done is not None else SpectrumKVError(
                "SendStream", grpc.StatusCode.INTERNAL, "the stream ended without its done event")
        except grpc.RpcError as e:
            self._outcome = SpectrumKVError.from_rpc_error("SendStream", e)
        finally:
            self._queue.put(SendStream._CLOSE)
            self._done.set()

    def layer_ready(self, layer, token_begin=0, token_end=0, block_ids=()):
        """Rows [token_begin, token_end) of `layer` are computed (token_end 0 = the prompt's end)."""
        self._queue.put(pb.SendStreamRequest(layer_ready=pb.LayerReady(
            layer=layer, token_begin=token_begin, token_end=token_end, block_ids=list(block_ids))))

    def seal(self):
        self._queue.put(pb.SendStreamRequest(seal=pb.StreamSeal()))
        self._queue.put(SendStream._CLOSE)

    def abort(self, reason=""):
        self._queue.put(pb.SendStreamRequest(abort=pb.StreamAbort(reason=reason)))
        self._queue.put(SendStream._CLOSE)

    def cancel(self):
        self._call.cancel()

    def finished(self):
        """True once the call has ended (its outcome is known)."""
        return self._done.is_set()

    def error(self):
        """The call's failure (SpectrumKVError) once it has ended with one, else None."""
        outcome = self._outcome if self._done.is_set() else None
        return outcome if isinstance(outcome, SpectrumKVError) else None

    def wait_finished(self, timeout=None):
        """Waits up to `timeout` seconds for the call to end; True if it has."""
        return self._done.wait(timeout)

    def wait(self, timeout=None):
        """The transfer's SendResponse once the peer committed; raises SpectrumKVError otherwise."""
        if not self._done.wait(timeout):
            raise SpectrumKVError("SendStream", grpc.StatusCode.DEADLINE_EXCEEDED, "no outcome yet")
        if isinstance(self._outcome, SpectrumKVError):
            raise self._outcome
        return self._outcome


def seconds(duration):
    """A google.protobuf.Duration as float seconds."""
    return duration.seconds + duration.nanos / 1e9
