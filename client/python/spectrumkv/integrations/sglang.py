"""SpectrumKV as an SGLang disaggregation transfer backend.

SGLang's flow: the decode instance preallocates pages and tells the prefill instance their
indices (`send_metadata`), then the prefill pushes each prefill chunk (`send`), and both sides
`poll`. Here the push goes through the daemons:

- The prefill's `send(kv_indices)` signals the chunk's rows of every layer into a `SendStream`
  (the daemon reads the registered pools, compresses, sends), and the last chunk seals it.
- The decode's `send_metadata(kv_indices)` issues a `Receive` into those pages, from its own
  daemon.
- The transfer id is SGLang's `bootstrap_room`, which both sides already share.
- The bootstrap server is how the decode tells the prefill which daemon to push to (a per-room
  route; the `peer` setting makes it static for 1P1D), and how the prefill tells the decode its
  daemon id.

Register the backend before SGLang parses its arguments:

    python3 -m spectrumkv.integrations.sglang --disaggregation-transfer-backend spectrumkv ...

That runs `register()` and then `sglang.launch_server` with the remaining arguments. Settings come
from the JSON file named by SPECTRUMKV_CONFIG (keys: spectrumkv.integrations._common.Settings).
Guide: docs/integrations/sglang.md.

Decisions:
- Transfers carry whole pages. The interface gives page indices, not token counts, so up to
  page_size - 1 rows past the prompt travel too.
- MLA pools and decode-side prefix reuse (`decode_prefix_len` > 0) are refused clearly.
- Tokens are never dropped (SGLang's attention cannot mask them).
"""

import http.server
import json
import logging
import os
import threading
import urllib.error
import urllib.request

from sglang.srt.disaggregation.base.conn import (BaseKVBootstrapServer, BaseKVManager, BaseKVReceiver, BaseKVSender,
                                                 KVPoll)

from . import _common
from .. import SpectrumKVError, tensors

log = logging.getLogger("spectrumkv.integrations.sglang")

BACKEND = "spectrumkv"


def load_settings():
    """Settings from SPECTRUMKV_CONFIG: a path to a JSON file, or the JSON itself."""
    raw = os.environ.get("SPECTRUMKV_CONFIG", "")
    if raw and not raw.lstrip().startswith("{"):
        with open(raw) as f:
            raw = f.read()
    return _common.Settings(json.loads(raw) if raw else {})


# ---- bootstrap ------------------------------------------------------------------------------------

class _BootstrapHandler(http.server.BaseHTTPRequestHandler):
    """GET/PUT /spectrumkv/<key>: a small key -> JSON table ("prefill" = the prefill's daemon id,
    "route/<room>" = the decode daemon of a room)."""

    def _key(self):
        prefix = "/spectrumkv/"
        return self.path[len(prefix):] if self.path.startswith(prefix) else None

    def do_GET(self):  # noqa: N802 (http.server's naming)
        key = self._key()
        value = self.server.table.get(key) if key else None
        body = json.dumps(value).encode() if value is not None else b"{}"
        self.send_response(200 if value is not None else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self):  # noqa: N802
        key = self._key()
        length = int(self.headers.get("Content-Length", "0"))
        try:
            value = json.loads(self.rfile.read(min(length, 1 << 16)) or b"null")
        except ValueError:
            value = None
        if not key or not isinstance(value, dict):
            self.send_response(400)
        else:
            self.server.table[key] = value
            self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        return


class SpectrumKVBootstrapServer(BaseKVBootstrapServer):
    """The prefill side's bootstrap endpoint (HTTP on host:port), on a daemon thread."""

    def __init__(self, host, port):
        self.server = http.server.ThreadingHTTPServer((host, port), _BootstrapHandler)
        self.server.table = {}
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="skv-bootstrap", daemon=True)
        self._thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _bootstrap(address, key, value=None, timeout=5.0):
    """GET (value None) or PUT one bootstrap entry; GET answers None when absent."""
    url = "http://%s/spectrumkv/%s" % (address, key)
    data = None if value is None else json.dumps(value).encode()
    request = urllib.request.Request(url, data=data, method="GET" if value is None else "PUT")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read()) if value is None else None
    except urllib.error.HTTPError as e:
        if e.code == 404 and value is None:
            return None
        raise


# ---- manager, sender, receiver -----------------------------------------------------------------

def _mode_name(mode):
    return getattr(mode, "value", mode)


class SpectrumKVManager(BaseKVManager):
    """One engine worker's daemon session, with its KV pools registered once."""

    def __init__(self, args, disaggregation_mode, server_args, is_mla_backend=False):
        if is_mla_backend:
            raise ValueError("spectrumkv: MLA KV pools are not supported (the codec reads per-head K and V rows)")
        self.settings = load_settings()
        self.mode = _mode_name(disaggregation_mode)
        self.page_size = args.page_size
        layers = len(args.kv_data_ptrs) // 2
        if len(args.kv_data_ptrs) != 2 * layers or len(set(args.kv_data_lens)) != 1 or len(set(args.kv_item_lens)) != 1:
            raise ValueError("spectrumkv: expected every layer's K buffer then every layer's V buffer, all of one size")
        pools = tensors.PagePools(args.kv_data_ptrs[:layers], args.kv_data_ptrs[layers:], args.kv_data_lens[0],
                                  args.kv_item_lens[0], args.page_size, args.kv_head_num, self.settings.kv_dtype)
        model = self.settings.model_name or getattr(server_args, "model_path", None) or "sglang-model"
        cache_id = self.settings.cache_id or "sglang-%s-%d-%d" % (self.mode, os.getpid(), args.engine_rank)
        self.session = _common.WorkerSession(self.settings, pools, model, cache_id, writable=True)
        self.bootstrap_port = getattr(server_args, "disaggregation_bootstrap_port", None)
        self.bootstrap_host = getattr(server_args, "host", "127.0.0.1")

    def register_to_bootstrap(self):
        """Prefill: publishes this node's daemon id, so decode Receives name their sender."""
        if self.mode == "prefill" and self.bootstrap_port:
            _bootstrap("%s:%d" % (self.bootstrap_host, self.bootstrap_port), "prefill",
                       {"daemon_id": self.settings.daemon_id})

    def close(self):
        self.session.close()


class SpectrumKVSender(BaseKVSender):
    """One request on the prefill side: its chunks signalled into one SendStream."""

    def __init__(self, mgr, bootstrap_addr, bootstrap_room, dest_tp_ranks, pp_rank,
                 req_has_disagg_prefill_dp_rank=False):
        self.mgr = mgr
        self.bootstrap_addr = bootstrap_addr
        self.room = int(bootstrap_room)
        self.pages_total = None
        self.pages_sent = 0
        self.stream = None
        self.peer = None
        self.error = None

    def init(self, num_kv_indices, aux_index=None):
        self.pages_total = int(num_kv_indices)

    def _peer(self):
        """The decode daemon: the `peer` setting, else the room's route once the decode has
        published it (cached)."""
        if self.peer is None:
            self.peer = self.mgr.settings.peer
            if not self.peer:
                try:
                    route = _bootstrap(self.bootstrap_addr, "route/%d" % self.room)
                except OSError as e:
                    log.debug("bootstrap %s: %s", self.bootstrap_addr, e)
                    route = None
                self.peer = route.get("peer") if route else None
        return self.peer

    def send(self, kv_indices, state_indices=None, token_position_offset=0):
        if self.error is not None:
            return
        try:
            pages = [int(p) for p in kv_indices]
            if self.pages_total is None:
                raise ValueError("send before init")
            if self.pages_sent + len(pages) > self.pages_total:
                raise ValueError("%d pages sent, more than the %d announced" % (self.pages_sent + len(pages),
                                                                                self.pages_total))
            session, size = self.mgr.session, self.mgr.page_size
            if self.stream is None:
                peer = self._peer()
                if not peer:
                    raise ValueError("no decode daemon for room %d: set 'peer' or start the decode first" % self.room)
                self.stream = session.open_stream(self.room, self.pages_total * size, peer, self.mgr.settings.budget)
                self.block_ids = []
            self.block_ids += pages
            begin, end = self.pages_sent * size, (self.pages_sent + len(pages)) * size
            for layer in range(session.cache.layers):
                self.stream.layer_ready(layer, self.block_ids, begin, end)
            self.pages_sent += len(pages)
            if self.pages_sent == self.pages_total:
                self.stream.seal()
        except (SpectrumKVError, ValueError, OSError) as e:
            self.error = e
            if self.stream is not None:
                self.stream.abort(str(e))

    def poll(self):
        if self.error is not None:
            return KVPoll.Failed
        if self.pages_total is None:
            return KVPoll.Bootstrapping
        if self.stream is None:  # ready to send once the decode side is known
            return KVPoll.WaitingForInput if self._peer() else KVPoll.Bootstrapping
        if self.stream.call.error() is not None:
            self.error = self.stream.call.error()
            return KVPoll.Failed
        # The pages may be freed once the daemon has read every row.
        return KVPoll.Success if self.stream.source_released() else KVPoll.Transferring

    def failure_exception(self):
        raise RuntimeError("spectrumkv transfer of room %d failed: %s" % (self.room, self.error))

    def get_transfer_metric(self):
        from sglang.srt.disaggregation.base.conn import KVTransferMetric
        sent = sum(e.layer_sent.wire_bytes for e in list(self.stream.call.events)
                   if e.HasField("layer_sent")) if self.stream is not None else None
        return KVTransferMetric(transfer_total_bytes=sent)

    def abort(self):
        if self.stream is not None:
            self.stream.abort("aborted by the engine")
        self.error = self.error or RuntimeError("aborted")

    def clear(self):
        if self.stream is not None and self.stream.call.finished():
            self.stream.close()


class SpectrumKVReceiver(BaseKVReceiver):
    """One request on the decode side: a Receive into its preallocated pages."""

    def __init__(self, mgr, bootstrap_addr, bootstrap_room=None):
        self.mgr = mgr
        self.bootstrap_addr = bootstrap_addr
        self.room = int(bootstrap_room or 0)
        self.sender = ""
        self.inited = False
        self.future = None
        self.pages = []
        self.error = None

    def init(self, prefill_dp_rank):
        """Tells the prefill which daemon to push to, and learns the prefill's daemon id."""
        try:
            if self.room == 0:
                raise ValueError("bootstrap_room 0 cannot name a transfer")
            if self.bootstrap_addr:
                if self.mgr.settings.daemon_id:
                    _bootstrap(self.bootstrap_addr, "route/%d" % self.room, {"peer": self.mgr.settings.daemon_id})
                prefill = _bootstrap(self.bootstrap_addr, "prefill") or {}
                self.sender = prefill.get("daemon_id", "")
        except (OSError, ValueError) as e:
            self.error = e
        self.inited = True

    def send_metadata(self, kv_indices, aux_index=None, state_indices=None, decode_prefix_len=None):
        if self.error is not None:
            return
        if decode_prefix_len:
            self.error = ValueError("decode-side prefix reuse (decode_prefix_len %d) is not supported: the transfer "
                                    "carries the whole prompt" % decode_prefix_len)
            return
        self.pages = [int(p) for p in kv_indices]
        self.future = self.mgr.session.start_receive(self.room, len(self.pages) * self.mgr.page_size, self.pages,
                                                     self.sender)

    def poll(self):
        if self.error is not None:
            return KVPoll.Failed
        if not self.inited:
            return KVPoll.Bootstrapping
        if self.future is None:
            return KVPoll.WaitingForInput
        if not self.future.done():
            return KVPoll.Transferring
        try:
            self.stats = self.future.result()
        except Exception as e:  # the Receive's failure, whatever it was, fails the request
            self.error = e
            return KVPoll.Failed
        return KVPoll.Success

    def failure_exception(self):
        raise RuntimeError("spectrumkv receive of room %d failed: %s" % (self.room, self.error))

    def abort(self):
        if self.future is not None and not self.future.done():
            self.mgr.session.cancel_receive(self.room, self.future)
        self.error = self.error or RuntimeError("aborted")


# ---- registration --------------------------------------------------------------------------------

CLASSES = {"manager": SpectrumKVManager, "sender": SpectrumKVSender, "receiver": SpectrumKVReceiver,
           "bootstrap_server": SpectrumKVBootstrapServer}


def _extend_enum(enum_class, name, value):
    """Adds member `name` = `value` to an existing Enum (SGLang's TransferBackend is closed)."""
    if value in enum_class._value2member_map_:
        return enum_class(value)
    member = object.__new__(enum_class)
    member._name_, member._value_ = name, value
    member.__objclass__ = enum_class
    member.__init__(value)
    enum_class._member_names_.append(name)
    enum_class._member_map_[name] = member
    enum_class._value2member_map_[value] = member
    type.__setattr__(enum_class, name, member)
    return member


def register():
    """Makes "spectrumkv" a TransferBackend and answers it in get_kv_class (also in modules that
    imported get_kv_class already). Idempotent."""
    import sys
    from sglang.srt.disaggregation import utils
    from sglang.srt.disaggregation.base.conn import KVArgs
    member = _extend_enum(utils.TransferBackend, BACKEND.upper(), BACKEND)
    original = utils.get_kv_class
    if getattr(original, "_spectrumkv", False):
        return member

    def get_kv_class(transfer_backend, class_type):
        if transfer_backend == member or getattr(transfer_backend, "value", transfer_backend) == BACKEND:
            name = getattr(class_type, "value", class_type)
            return KVArgs if name == "kvargs" else CLASSES.get(name)
        return original(transfer_backend, class_type)

    get_kv_class._spectrumkv = True
    for module in list(sys.modules.values()):
        if getattr(module, "get_kv_class", None) is original and isinstance(getattr(module, "__name__", None), str) \
                and module.__name__.startswith("sglang."):
            module.get_kv_class = get_kv_class
    return member


def main(argv=None):
    """`python3 -m spectrumkv.integrations.sglang ARGS`: register, then run sglang.launch_server."""
    import runpy
    import sys
    register()
    sys.argv = ["sglang.launch_server"] + list(sys.argv[1:] if argv is None else argv)
    runpy.run_module("sglang.launch_server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()


__all__ = ["SpectrumKVManager", "SpectrumKVSender", "SpectrumKVReceiver", "SpectrumKVBootstrapServer", "register",
           "BACKEND"]
