"""What the vLLM and SGLang connectors share: settings, the daemon session of one engine worker,
streamed sends and receives into an engine's paged caches.

Neither engine can mask tokens in attention, so every transfer is planned with
`CodecPolicy.allow_drop = false`: the codec spends the budget on precision only, and a budget
below the no-drop minimum is refused by the daemon (the request then fails over to recompute).
"""

import concurrent.futures
import logging
import secrets
import threading
import time

import grpc

from .. import Client, SharedMemoryBuffer, SpectrumKVError, pb
from .. import tensors

log = logging.getLogger("spectrumkv.integrations")

_PASSTHROUGH = {"auto": pb.PASSTHROUGH_MODE_AUTO, "never": pb.PASSTHROUGH_MODE_NEVER,
                "always": pb.PASSTHROUGH_MODE_ALWAYS}
_ALLOCATORS = {"rd": pb.ALLOCATOR_RD, "paper": pb.ALLOCATOR_PAPER}
_POLICY_FIELDS = {"rotate": bool, "centre": bool, "per_channel_keys": bool, "group_size": int, "allow_int4": bool,
                  "allow_int2": bool, "sink_tokens": int, "recent_tokens": int, "entropy_coding": bool,
                  "transform_coding": bool}


class Settings:
    """The connector's settings (vLLM: kv_connector_extra_config; SGLang: a JSON file named by
    SPECTRUMKV_CONFIG). Unknown keys are refused, so that a typo is not silently ignored.

    daemon_address    this node's spectrumkvd gRPC address (default 127.0.0.1:50551)
    peer              the decode daemon to push to (daemon id or data address); a request's
                      kv_transfer_params["spectrumkv_peer"] overrides it
    daemon_id         this node's daemon id, passed to the decode side so that only this daemon's
                      transfer can fill its blocks (optional)
    budget            wire bytes / FP16 bytes, (0, 1] (default 0.5)
    passthrough       auto | never | always (default auto)
    policy            CodecPolicy fields: allocator (rd | paper), rotate, centre, per_channel_keys,
                      group_size, allow_int4, allow_int2, sink_tokens, recent_tokens,
                      entropy_coding (zstd-code the segments: fewer bytes, more CPU),
                      transform_coding (code in the model profile's basis; needs `profile`)
    profile           path of the model's profile (skv-calibrate), registered with the model on
                      every worker's daemon, prefill and decode alike (optional)
    model_name        name registered with the daemon (default: the engine's model name)
    cache_id          name of this worker's registered cache (default <engine>-<pid>-<rank>)
    kv_cache_layout   NHD | HND (default NHD: zero copy; HND costs one copy on each side)
    kv_dtype          fp16 | bf16: the cache's element type where the engine does not say (SGLang's
                      KVArgs carries none; default fp16)
    receive_timeout_s how long a decode worker waits for a transfer (default 30)
    tls_ca_file, tls_cert_file, tls_key_file   TLS to the daemon (CA alone: server TLS)
    """

    KEYS = ("daemon_address", "peer", "daemon_id", "budget", "passthrough", "policy", "profile", "model_name",
            "cache_id", "kv_cache_layout", "kv_dtype", "receive_timeout_s", "tls_ca_file", "tls_cert_file",
            "tls_key_file")

    def __init__(self, values=None):
        values = dict(values or {})
        unknown = sorted(set(values) - set(self.KEYS))
        if unknown:
            raise ValueError("spectrumkv: unknown setting(s) %s; known: %s" % (", ".join(unknown), ", ".join(self.KEYS)))
        self.daemon_address = str(values.get("daemon_address", "127.0.0.1:50551"))
        self.peer = values.get("peer")
        self.daemon_id = values.get("daemon_id", "")
        self.budget = float(values.get("budget", 0.5))
        if not 0.0 < self.budget <= 1.0:
            raise ValueError("spectrumkv: budget %r is outside (0, 1]" % values.get("budget"))
        passthrough = str(values.get("passthrough", "auto")).lower()
        if passthrough not in _PASSTHROUGH:
            raise ValueError("spectrumkv: passthrough %r: expected auto, never or always" % passthrough)
        self.passthrough = _PASSTHROUGH[passthrough]
        self.policy = self._policy(values.get("policy") or {})
        self.profile = values.get("profile")
        if self.policy.transform_coding and not self.profile:
            raise ValueError("spectrumkv: policy.transform_coding needs `profile` (the model's skv-calibrate file)")
        self.model_name = values.get("model_name")
        self.cache_id = values.get("cache_id")
        self.kv_cache_layout = str(values.get("kv_cache_layout", tensors.NHD)).upper()
        if self.kv_cache_layout not in (tensors.NHD, tensors.HND):
            raise ValueError("spectrumkv: kv_cache_layout %r: expected NHD or HND" % values.get("kv_cache_layout"))
        kv_dtype = str(values.get("kv_dtype", "fp16")).lower()
        if kv_dtype not in ("fp16", "bf16"):
            raise ValueError("spectrumkv: kv_dtype %r: expected fp16 or bf16 (FP8 caches are not supported)" % kv_dtype)
        self.kv_dtype = pb.DTYPE_FP16 if kv_dtype == "fp16" else pb.DTYPE_BF16
        self.receive_timeout_s = float(values.get("receive_timeout_s", 30.0))
        if self.receive_timeout_s <= 0:
            raise ValueError("spectrumkv: receive_timeout_s must be > 0")
        self.tls = {k: values.get(k) for k in ("tls_ca_file", "tls_cert_file", "tls_key_file")}
        if (self.tls["tls_cert_file"] is None) != (self.tls["tls_key_file"] is None):
            raise ValueError("spectrumkv: tls_cert_file and tls_key_file go together")
        if self.tls["tls_cert_file"] and not self.tls["tls_ca_file"]:
            raise ValueError("spectrumkv: client certificates need tls_ca_file")

    @staticmethod
    def _policy(values):
        policy = pb.CodecPolicy(allow_drop=False)
        for key, value in values.items():
            if key == "allocator":
                if str(value).lower() not in _ALLOCATORS:
                    raise ValueError("spectrumkv: policy.allocator %r: expected rd or paper" % value)
                policy.allocator = _ALLOCATORS[str(value).lower()]
            elif key in _POLICY_FIELDS:
                setattr(policy, key, _POLICY_FIELDS[key](value))
            elif key == "allow_drop":
                raise ValueError("spectrumkv: policy.allow_drop cannot be set: the engine cannot mask dropped tokens")
            else:
                raise ValueError("spectrumkv: unknown policy field %r; known: allocator, %s"
                                 % (key, ", ".join(sorted(_POLICY_FIELDS))))
        return policy

    def connect(self):
        ca = _read(self.tls["tls_ca_file"])
        return Client.connect(self.daemon_address, root_certificates=ca, private_key=_read(self.tls["tls_key_file"]),
                              certificate_chain=_read(self.tls["tls_cert_file"]))


def _read(path):
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


def new_transfer_id():
    """A fresh nonzero 63-bit transfer id (each prefill attempt gets its own, so a retried or
    preempted request never collides with its earlier transfer)."""
    return secrets.randbits(63) | 1


def touched_blocks(block_ids, block_size, begin, end):
    """The pool blocks holding sequence tokens [begin, end), in order."""
    return list(block_ids[begin // block_size:(end - 1) // block_size + 1])


class WorkerSession:
    """One engine worker's link to its daemon: the model and the paged caches, registered once."""

    def __init__(self, settings, cache, model_name, cache_id, writable):
        """`cache`: a tensors.PagedCache or tensors.PagePools."""
        self.settings = settings
        self.cache = cache
        self.client = settings.connect()
        self.model_id = self.client.register_model(
            model_name, layers=self.cache.layers, kv_heads=self.cache.kv_heads, head_dim=self.cache.head_dim,
            dtype=self.cache.dtype, profile=settings.profile).model_id
        self.cache_id = cache_id
        # HND rows are not contiguous per token: those transfers go through a dense buffer.
        self.direct = self.cache.layout == tensors.NHD
        if self.direct:
            self.client.register_cache(cache_id, self.model_id, self.cache.handle(), self.cache.pool_layout(),
                                       writable=writable)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="skv-connector")
        # Device caches: layer signals wait for the GPU (CPU caches are written when signalled).
        self.after_device = AfterDevice() if cache.on_device else None

    def dense_buffer(self, tokens):
        """(SharedMemoryBuffer, [layers, 2, tokens, heads, head_dim] tensor) for one request."""
        import torch
        buffer = SharedMemoryBuffer.create(self.cache.dense_bytes(tokens))
        dtype = torch.float16 if self.cache.dtype == pb.DTYPE_FP16 else torch.bfloat16
        view = tensors.dense_tensor(buffer, self.cache.layers, tokens, self.cache.kv_heads, self.cache.head_dim,
                                    dtype)
        return buffer, view

    def open_stream(self, transfer_id, tokens, peer, budget):
        return OutboundStream(self, transfer_id, tokens, peer, budget)

    def start_receive(self, transfer_id, tokens, block_ids, sender, skip_tokens=0):
        """Receives transfer `transfer_id` into `block_ids` on a worker thread: a Future whose
        result is None or raises. `skip_tokens` rows (a local prefix the engine already holds)
        are not overwritten: that receive goes through a dense buffer."""
        return self._pool.submit(self._receive, transfer_id, tokens, list(block_ids), sender, skip_tokens)

    def _receive(self, transfer_id, tokens, block_ids, sender, skip_tokens):
        timeout = self.settings.receive_timeout_s
        if self.direct and skip_tokens == 0:
            response = self.client.receive_blocks(transfer_id, self.model_id, self.cache_id, tokens, block_ids,
                                                  timeout_s=timeout, sender_daemon_id=sender or "")
        else:
            buffer, dense = self.dense_buffer(tokens)
            try:
                response = self.client.receive(transfer_id, self.model_id, buffer, self.cache.dense_layout(tokens),
                                               timeout_s=timeout, sender_daemon_id=sender or "")
                self.cache.scatter_rows(dense, block_ids, skip_tokens, tokens)
            finally:
                del dense
                buffer.close()
        if response.kept.tokens != tokens or response.kept.mask.count(0) != 0:
            raise SpectrumKVError("Receive", grpc.StatusCode.DATA_LOSS,
                                  "transfer %d dropped tokens, which the engine cannot mask" % transfer_id)
        return response.stats

    def discard_staged(self, transfer_id):
        """Frees a transfer staged on this daemon that no Receive will claim; its sender is told.
        One that has not arrived yet expires at the daemon's staging TTL instead."""
        try:
            self.client.cancel_transfer(transfer_id, role=pb.TRANSFER_ROLE_RECEIVER)
        except SpectrumKVError as e:
            log.debug("discarding transfer %d: %s", transfer_id, e)

    def cancel_receive(self, transfer_id, future, wait_s=5.0):
        """Ends a pending Receive before its blocks are reused: cancels it on the daemon until its
        call has ended (the Receive may not have reached the daemon yet), at most `wait_s`."""
        if future.cancel():
            return True
        deadline = time.monotonic() + wait_s
        while not future.done() and time.monotonic() < deadline:
            try:
                self.client.cancel_transfer(transfer_id, role=pb.TRANSFER_ROLE_RECEIVER)
            except SpectrumKVError as e:
                log.debug("cancel of transfer %d: %s", transfer_id, e)
            concurrent.futures.wait([future], timeout=0.05)
        return future.done()

    def close(self):
        if self.after_device is not None:
            self.after_device.close()
        self._pool.shutdown(wait=False)
        self.client.close()


class AfterDevice:
    """Runs callbacks, in order on one thread, once the GPU work queued before each was submitted
    has finished (a CUDA event per callback): signalling a layer never blocks the forward pass,
    and the daemon never reads rows that the kernels have not written yet."""

    def __init__(self):
        import queue
        self._queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="skv-after-device", daemon=True)
        self._thread.start()

    def submit(self, callback):
        import torch
        event = torch.cuda.Event()
        event.record()  # on the current stream: after the layer's kernels
        self._queue.put((event, callback))

    def _run(self):
        while True:
            event, callback = self._queue.get()
            if callback is None:
                return
            event.synchronize()
            try:
                callback()
            except Exception:  # a failed signal fails its stream; the next ones still run
                log.exception("spectrumkv: a deferred layer signal failed")

    def close(self):
        self._queue.put((None, None))
        self._thread.join(5.0)


class OutboundStream:
    """One request's streamed send from the engine's caches: signal chunks as layers finish,
    seal when the prompt is done. Direct (NHD: the daemon reads the registered blocks) or through
    a dense buffer (HND: rows are gathered first)."""

    def __init__(self, session, transfer_id, tokens, peer, budget):
        self.session = session
        self.transfer_id = transfer_id
        self.tokens = tokens
        self.buffer = self.dense = None
        settings = session.settings
        common = dict(request_id=transfer_id, model_id=session.model_id, peer=peer, budget=budget, tokens=tokens,
                      passthrough=settings.passthrough, policy_override=settings.policy)
        if session.direct:
            self.call = session.client.send_stream(source=None, layout=None, cache_id=session.cache_id, **common)
        else:
            self.buffer, self.dense = session.dense_buffer(tokens)
            self.call = session.client.send_stream(source=self.buffer, layout=session.cache.dense_layout(tokens),
                                                   **common)
        self._consumed_rows = 0
        self.sealed = False

    def layer_ready(self, layer, block_ids, begin, end):
        cache = self.session.cache
        if self.dense is not None:
            cache.gather_rows(self.dense, layer, block_ids, begin, end)  # a copy: ready at once
            self.call.layer_ready(layer, begin, end)
        else:
            blocks = touched_blocks(block_ids, cache.block_size, begin, end)
            self._after_device(lambda: self.call.layer_ready(layer, begin, end, blocks))

    def seal(self):
        self.sealed = True
        self._after_device(self.call.seal)

    def _after_device(self, signal):
        if self.session.after_device is not None:
            self.session.after_device.submit(signal)
        else:
            signal()

    def abort(self, reason):
        if not self.call.finished():
            self.call.abort(reason)

    def source_released(self):
        """True once the engine's blocks may be reused: the daemon read every row, or the call
        ended (sent, failed or aborted)."""
        if self.call.finished():
            return True
        if self.dense is not None:
            return self.sealed  # rows were copied out of the blocks at signal time
        if not self.sealed:
            return False
        consumed = sum(e.layer_consumed.token_end - e.layer_consumed.token_begin
                       for e in list(self.call.events) if e.HasField("layer_consumed"))
        return consumed == self.session.cache.layers * self.tokens

    def wait_ended(self, timeout):
        return self.call.wait_finished(timeout)

    def close(self):
        self.dense = None
        if self.buffer is not None:
            self.buffer.close()
            self.buffer = None
