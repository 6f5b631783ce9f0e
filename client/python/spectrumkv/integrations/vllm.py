"""SpectrumKV as a vLLM KV connector (v1), loaded without patching vLLM:

    --kv-transfer-config '{"kv_connector": "SpectrumKVConnector",
                           "kv_connector_module_path": "spectrumkv.integrations.vllm",
                           "kv_role": "kv_both",
                           "kv_connector_extra_config": {"daemon_address": "127.0.0.1:50551",
                                                         "peer": "decode-0", "budget": 0.5}}'

Push, layer by layer (DESIGN 4.1): a prefill request carrying kv_transfer_params
{"do_remote_decode": true} opens a SendStream on its first scheduled step; each attention layer's
`save_kv_layer` signals that step's rows (chunked prefill signals several chunks per layer; a
local prefix hit signals the cached rows with the first chunk); the step that completes the
prompt seals it. The daemon encodes and sends while later layers compute. `request_finished`
keeps the blocks (delay-free) and returns the parameters the proxy forwards to the decode
instance; the blocks are given back as soon as the daemon has read every row.

The decode instance sees {"do_remote_prefill": true, "spectrumkv_transfer_id": ...}:
`get_num_new_matched_tokens` answers an asynchronous load of the prompt, `start_load_kv` issues
the Receive into the request's blocks, `get_finished` reports it, and a failed or lossy receive
reports its blocks through `get_block_ids_with_load_errors`, so vLLM recomputes instead of
decoding garbage. Settings: see spectrumkv.integrations._common.Settings. Guide:
docs/integrations/vllm.md.

Decisions: FP8 KV caches are refused at registration (the codec reads FP16/BF16 rows; passing
FP8 through as bytes would bypass the budget accounting); the hybrid KV-cache manager is
supported for a single KV-cache group only; the decode side never lets the codec drop tokens
(vLLM's attention cannot mask them).
"""

import concurrent.futures
import dataclasses
import logging
import os

from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1, KVConnectorMetadata,
                                                               KVConnectorRole)

try:  # newer vLLM: the hybrid KV-cache manager asks connectors to declare support
    from vllm.distributed.kv_transfer.kv_connector.v1.base import SupportsHMA
except ImportError:  # older vLLM
    class SupportsHMA:  # noqa: D101
        pass

from . import _common
from .. import SpectrumKVError, tensors

log = logging.getLogger("spectrumkv.integrations.vllm")

# kv_transfer_params keys, between the prefill's request_finished, the proxy and the decode.
TRANSFER_ID = "spectrumkv_transfer_id"
SENDER = "spectrumkv_sender"
TOKENS = "spectrumkv_tokens"
PEER = "spectrumkv_peer"


@dataclasses.dataclass
class SaveSpec:
    """One prefill request's rows computed in this step."""
    req_id: str
    transfer_id: int
    tokens: int          # the prompt's length
    begin: int           # rows [begin, end) become ready in this step
    end: int
    block_ids: list      # the request's blocks so far
    open: bool           # first step of this transfer: open the stream
    seal: bool           # the prompt is complete after this step
    peer: str
    budget: float


@dataclasses.dataclass
class LoadSpec:
    """One decode request whose prompt KV is to be received into its blocks."""
    req_id: str
    transfer_id: int
    sender: str
    tokens: int
    block_ids: list
    skip_tokens: int     # rows the engine already holds (local prefix hit): not overwritten


class SpectrumKVConnectorMetadata(KVConnectorMetadata):
    """Scheduler -> workers, once per step (pickled between processes)."""

    def __init__(self, saves=(), loads=(), aborts=(), preempted=(), cancels=(), discards=()):
        self.saves = list(saves)
        self.loads = list(loads)
        self.cancels = list(cancels)      # request ids whose pending loads are abandoned (aborted)
        self.discards = list(discards)    # transfer ids not needed (full prefix hit): free their staging
        self.aborts = list(aborts)        # request ids whose streams end unsealed
        self.preempted = list(preempted)  # request ids whose blocks are about to be reused


@dataclasses.dataclass
class _Producing:
    transfer_id: int
    tokens: int
    peer: str
    block_ids: list
    signalled: int = 0   # rows handed to workers so far
    opened: bool = False


def _group0(block_ids):
    """The block ids of the single KV-cache group (vLLM passes one list per group)."""
    if block_ids is None:
        return []
    if len(block_ids) and isinstance(block_ids[0], (list, tuple)):
        if len(block_ids) != 1:
            raise ValueError("spectrumkv supports one KV-cache group; this model has %d" % len(block_ids))
        return list(block_ids[0])
    return list(block_ids)


class SpectrumKVConnector(KVConnectorBase_V1, SupportsHMA):

    def __init__(self, vllm_config, role, kv_cache_config):
        super().__init__(vllm_config, role, kv_cache_config)
        transfer = vllm_config.kv_transfer_config
        self.settings = _common.Settings(getattr(transfer, "kv_connector_extra_config", None) or {})
        model_config = getattr(vllm_config, "model_config", None)
        self.model_name = self.settings.model_name or getattr(model_config, "model", None) or "vllm-model"
        if role == KVConnectorRole.SCHEDULER:
            self._producing = {}   # req_id -> _Producing
            self._loads = []       # LoadSpec waiting for the next step's metadata
            self._loading = set()  # requests whose load has not been reported finished
            self._aborts = []
            self._cancels = []
            self._discards = []
        else:
            self.session = None
            self._layers = {}      # layer name -> index
            self._streams = {}     # req_id -> OutboundStream
            self._detached = []    # streams whose blocks were given back, until their calls end
            self._receives = {}    # req_id -> (Future, LoadSpec)
            self._finished_seen = set()
            self._load_errors = set()
            self._cancelled = set()  # loads abandoned by their request: no load errors
            self.load_stats = {}     # req_id -> TransferStats of its last successful load

    # ---- scheduler side ------------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        params = getattr(request, "kv_transfer_params", None) or {}
        if not params.get("do_remote_prefill") or TRANSFER_ID not in params:
            return 0, False
        prompt = len(request.prompt_token_ids)
        if int(params.get(TOKENS, prompt)) != prompt:
            log.warning("request %s: the transfer holds %s tokens, the prompt %d: recomputing",
                        request.request_id, params.get(TOKENS), prompt)
            return 0, False
        count = prompt - num_computed_tokens
        return (count, True) if count > 0 else (0, False)

    def update_state_after_alloc(self, request, blocks, num_external_tokens):
        params = getattr(request, "kv_transfer_params", None) or {}
        if params.get("do_remote_prefill") and TRANSFER_ID in params:
            if num_external_tokens > 0:
                prompt = len(request.prompt_token_ids)
                self._loads.append(LoadSpec(
                    req_id=request.request_id, transfer_id=int(params[TRANSFER_ID]), sender=params.get(SENDER, ""),
                    tokens=prompt, block_ids=_group0(blocks.get_block_ids()),
                    skip_tokens=prompt - num_external_tokens))
                self._loading.add(request.request_id)
            else:  # the engine holds the whole prompt already: free the pushed transfer's staging
                self._discards.append(int(params[TRANSFER_ID]))
            # Loaded or not, the transfer is consumed only once.
            params.pop("do_remote_prefill", None)
        elif params.get("do_remote_decode") and request.request_id not in self._producing:
            peer = params.get(PEER) or self.settings.peer
            if not peer:
                raise ValueError("spectrumkv: request %s asks for remote decode but no peer is set (setting 'peer' "
                                 "or kv_transfer_params['%s'])" % (request.request_id, PEER))
            self._producing[request.request_id] = _Producing(
                transfer_id=_common.new_transfer_id(), tokens=len(request.prompt_token_ids), peer=peer, block_ids=[])

    def build_connector_meta(self, scheduler_output):
        saves = []
        steps = []  # (req_id, new blocks, replace, num_computed)
        for req in getattr(scheduler_output, "scheduled_new_reqs", ()):
            steps.append((req.req_id, _group0(req.block_ids), True, req.num_computed_tokens))
        cached = getattr(scheduler_output, "scheduled_cached_reqs", None)
        if cached is not None:
            resumed = getattr(cached, "resumed_from_preemption", None) or [False] * len(cached.req_ids)
            for i, req_id in enumerate(cached.req_ids):
                steps.append((req_id, _group0(cached.new_block_ids[i]), bool(resumed[i]),
                              cached.num_computed_tokens[i]))
        preempted = list(getattr(scheduler_output, "preempted_req_ids", None) or ())
        for req_id in preempted:  # recomputed from scratch later: a new transfer then
            state = self._producing.get(req_id)
            if state is not None and state.opened:
                self._aborts.append(req_id)
                self._producing[req_id] = _Producing(_common.new_transfer_id(), state.tokens, state.peer, [])
        for req_id, new_blocks, replace, num_computed in steps:
            state = self._producing.get(req_id)
            if state is None:
                continue
            state.block_ids = new_blocks if replace else state.block_ids + new_blocks
            end = min(state.tokens, num_computed + scheduler_output.num_scheduled_tokens.get(req_id, 0))
            if end <= state.signalled:
                continue  # decoding past the prompt: nothing more to send
            saves.append(SaveSpec(req_id=req_id, transfer_id=state.transfer_id, tokens=state.tokens,
                                  begin=state.signalled, end=end, block_ids=list(state.block_ids),
                                  open=not state.opened, seal=end == state.tokens, peer=state.peer,
                                  budget=self.settings.budget))
            state.opened = True
            state.signalled = end
        meta = SpectrumKVConnectorMetadata(saves, self._loads, self._aborts, preempted, self._cancels,
                                           self._discards)
        self._loads, self._aborts, self._cancels, self._discards = [], [], [], []
        return meta

    def update_connector_output(self, connector_output):
        self._loading -= set(getattr(connector_output, "finished_recving", None) or ())

    def request_finished(self, request, block_ids):
        if request.request_id in self._loading:
            queued = [load for load in self._loads if load.req_id == request.request_id]
            if queued:  # no worker has started it: nothing writes into the blocks
                self._loads = [load for load in self._loads if load.req_id != request.request_id]
                self._loading.discard(request.request_id)
                return False, None
            # Aborted while its KV arrives: the write is stopped before the blocks are freed.
            self._cancels.append(request.request_id)
            return True, None  # freed when the worker reports the load finished
        state = self._producing.pop(request.request_id, None)
        if state is None or not state.opened:
            return False, None
        if state.signalled < state.tokens:  # aborted or cut short before its prompt completed
            self._aborts.append(request.request_id)
            return True, None  # the worker reports it once the daemon stopped reading
        return True, {"do_remote_prefill": True, "do_remote_decode": False, TRANSFER_ID: state.transfer_id,
                      SENDER: self.settings.daemon_id, TOKENS: state.tokens}

    def request_finished_all_groups(self, request, block_ids):
        if len(block_ids) != 1:
            raise ValueError("spectrumkv supports one KV-cache group; this model has %d" % len(block_ids))
        return self.request_finished(request, list(block_ids[0]))

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config):
        extra = getattr(vllm_config.kv_transfer_config, "kv_connector_extra_config", None) or {}
        return str(extra.get("kv_cache_layout", tensors.NHD)).upper()

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config):
        return True  # save_kv_layer signals layers: CUDA graphs would skip it

    # ---- worker side ---------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches):
        self._layers = {name: tensors.layer_index(name, i) for i, name in enumerate(kv_caches)}
        caches = {self._layers[name]: tensor for name, tensor in kv_caches.items()}
        cache_id = self.settings.cache_id or "vllm-%d-%d" % (os.getpid(), getattr(
            getattr(self._vllm_config, "parallel_config", None), "rank", 0))
        cache = tensors.PagedCache(caches, self.settings.kv_cache_layout)
        self.session = _common.WorkerSession(self.settings, cache, self.model_name, cache_id, writable=True)
        log.info("spectrumkv: registered %d layers (%s, %d blocks of %d tokens) as cache %s at %s",
                 self.session.cache.layers, self.session.cache.layout, self.session.cache.num_blocks,
                 self.session.cache.block_size, cache_id, self.settings.daemon_address)

    def start_load_kv(self, forward_context, **kwargs):
        meta = self._get_connector_metadata()
        for req_id in meta.aborts:
            self._abort(req_id, "request finished before its prompt was complete")
        for req_id in meta.cancels:
            pending = self._receives.get(req_id)
            if pending is not None:
                self._cancelled.add(req_id)
                if not self.session.cancel_receive(pending[1].transfer_id, pending[0]):
                    log.error("spectrumkv: the load of aborted request %s did not stop", req_id)
        for transfer_id in meta.discards:
            self.session.discard_staged(transfer_id)
        for load in meta.loads:
            future = self.session.start_receive(load.transfer_id, load.tokens, load.block_ids, load.sender,
                                                load.skip_tokens)
            self._receives[load.req_id] = (future, load)
        for save in meta.saves:
            if save.open:
                if save.req_id in self._streams:  # an earlier attempt (preempted): ends on its own
                    self._abort(save.req_id, "superseded by a new transfer")
                    self._detach(save.req_id)
                self._streams[save.req_id] = self.session.open_stream(save.transfer_id, save.tokens, save.peer,
                                                                      save.budget)

    def wait_for_layer_load(self, layer_name):
        return  # loads land between steps (asynchronous load): nothing to wait for per layer

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs):
        if not self.has_connector_metadata():
            return
        layer = self._layers[layer_name]
        for save in self._get_connector_metadata().saves:
            stream = self._streams.get(save.req_id)
            if stream is not None and stream.transfer_id == save.transfer_id:
                stream.layer_ready(layer, save.block_ids, save.begin, save.end)

    def wait_for_save(self):
        if not self.has_connector_metadata():
            return
        for save in self._get_connector_metadata().saves:
            stream = self._streams.get(save.req_id)
            if save.seal and stream is not None and stream.transfer_id == save.transfer_id:
                stream.seal()

    def handle_preemptions(self, kv_connector_metadata):
        for req_id in kv_connector_metadata.preempted:
            self._abort(req_id, "request preempted", wait_s=10.0)

    def _abort(self, req_id, reason, wait_s=0.0):
        stream = self._streams.get(req_id)
        if stream is None or stream.call.finished():
            return
        stream.abort(reason)
        if wait_s and not stream.wait_ended(wait_s):
            log.error("spectrumkv: stream of %s did not end within %.0f s of its abort", req_id, wait_s)

    def get_finished(self, finished_req_ids):
        self._finished_seen |= {req_id for req_id in finished_req_ids if req_id in self._streams}
        done_sending = set()
        for req_id in list(self._finished_seen):
            if self._streams[req_id].source_released():
                done_sending.add(req_id)
                self._finished_seen.discard(req_id)
                self._detach(req_id)  # the peer's commit may still be pending; the blocks are free
        for stream in [s for s in self._detached if s.call.finished()]:
            self._detached.remove(stream)
            self._close(stream)
        done_recving = set()
        for req_id, (future, load) in list(self._receives.items()):
            if not future.done():
                continue
            del self._receives[req_id]
            done_recving.add(req_id)
            try:
                self.load_stats[req_id] = future.result()
                while len(self.load_stats) > 1024:  # the most recent loads only
                    self.load_stats.pop(next(iter(self.load_stats)))
            except (SpectrumKVError, OSError, ValueError, concurrent.futures.CancelledError) as e:
                if req_id in self._cancelled:
                    self._cancelled.discard(req_id)
                    continue
                log.warning("spectrumkv: load of %s (transfer %d) failed, recomputing: %s", req_id,
                            load.transfer_id, e)
                self._load_errors.update(load.block_ids[load.skip_tokens // self.session.cache.block_size:])
        return (done_sending or None), (done_recving or None)

    @staticmethod
    def _close(stream):
        if stream.call.error() is not None:
            log.warning("spectrumkv: transfer %d ended: %s", stream.transfer_id, stream.call.error())
        stream.close()

    def _detach(self, req_id):
        """Keeps a stream alive until its call ends, out of the request's bookkeeping."""
        self._detached.append(self._streams.pop(req_id))

    def get_block_ids_with_load_errors(self):
        errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self):
        if getattr(self, "session", None) is None:
            return
        for req_id in list(self._streams):
            self._abort(req_id, "connector shut down")
            self._detach(req_id)
        for stream in self._detached:
            stream.abort("connector shut down")
            stream.wait_ended(5.0)
            stream.close()
        self._detached.clear()
        self.session.close()
        self.session = None
