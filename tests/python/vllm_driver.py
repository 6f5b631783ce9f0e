"""Replays vLLM's call order against a KV connector, with the stand-in interfaces
(tests/python/standins) and real paged caches: torch CPU tensors in POSIX shared memory.

`Engine` is one vLLM instance: a scheduler-side and a worker-side connector (two instances, as in
two processes; the metadata is pickled between them), a block pool handed out in shuffled order,
and a "model" whose attention layers write each scheduled token's true K/V rows into the
request's blocks. One `step()` is one engine step:

    scheduler: get_num_new_matched_tokens -> update_state_after_alloc (admission),
               build_connector_meta
    worker:    bind_connector_metadata -> handle_preemptions -> start_load_kv ->
               per layer: wait_for_layer_load, attention, save_kv_layer -> wait_for_save ->
               get_finished -> get_block_ids_with_load_errors -> clear_connector_metadata
    scheduler: update_connector_output, request_finished for requests that ended,
               blocks freed when the worker reports them

Prefill requests (kv_transfer_params {"do_remote_decode": True}) end when their prompt is
computed (max_tokens = 1); decode requests wait for their remote KV, or recompute when the load
reports errors.
"""

import dataclasses
import math
import pickle
import random

import torch

from spectrumkv import tensors
from vllm.config import CacheConfig, KVTransferConfig, VllmConfig
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.forward_context import ForwardContext
from vllm.v1.core.kv_cache_manager import KVCacheBlocks
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
from vllm.v1.outputs import KVConnectorOutput
from vllm.v1.request import Request


def layer_name(layer):
    return "model.layers.%d.self_attn.attn" % layer


def synthetic_kv(layers, tokens, heads, head_dim, seed, dtype=torch.float16):
    """[layers, 2, tokens, heads, head_dim] KV with LLM-like statistics (a per-channel key bias
    and a few large key channels)."""
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(layers, 2, tokens, heads, head_dim, generator=g)
    kv[:, 0] += torch.randn(layers, 1, heads, head_dim, generator=g) * 0.5
    kv[:, 0, :, :, :4] *= 6.0
    return kv.to(dtype)


@dataclasses.dataclass
class Tracked:
    request: Request
    kv: torch.Tensor            # the true KV the model computes for this prompt
    blocks: list = dataclasses.field(default_factory=list)
    computed: int = 0
    state: str = "waiting"      # waiting | running | remote | loaded | finished | aborted
    local_hit: int = 0          # tokens the local prefix cache holds at admission
    new_this_step: bool = True
    new_blocks: list = dataclasses.field(default_factory=list)
    resumed: bool = False
    recomputed: bool = False
    load_failed: bool = False
    params: dict = None         # request_finished's kv_transfer_params


class Engine:

    def __init__(self, extra_config, layers, heads, head_dim, block_size=16, num_blocks=64, layout="NHD",
                 dtype=torch.float16, chunk_tokens=1 << 30, seed=0, module="spectrumkv.integrations.vllm"):
        config = VllmConfig(kv_transfer_config=KVTransferConfig(
            kv_connector="SpectrumKVConnector", kv_connector_module_path=module, kv_role="kv_both",
            kv_connector_extra_config=dict(extra_config, kv_cache_layout=layout)),
            cache_config=CacheConfig(block_size=block_size))
        self.scheduler = KVConnectorFactory.create_connector(config, KVConnectorRole.SCHEDULER)
        self.worker = KVConnectorFactory.create_connector(config, KVConnectorRole.WORKER)
        self.layers, self.heads, self.head_dim, self.block_size = layers, heads, head_dim, block_size
        self.layout, self.chunk_tokens = layout, chunk_tokens
        per_layer = [2, num_blocks, block_size, heads, head_dim] if layout == "NHD" else \
            [2, num_blocks, heads, block_size, head_dim]
        self.pool, self._shm = tensors.shared_tensor([layers] + per_layer, dtype)
        self.cache = None
        self.worker.register_kv_caches({layer_name(i): self.pool[i] for i in range(layers)})
        self.cache = self.worker.session.cache
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)
        self.requests = {}
        self.finished_ids = set()   # ended this step; given to the worker next step
        self.held = {}              # req_id -> blocks kept for the connector (delay-free)
        self.preempted = set()
        self.steps = 0
        self.load_errors = set()

    # ---- requests ------------------------------------------------------------------------------

    def add(self, req_id, kv, params=None, local_hit=0):
        tokens = kv.shape[2]
        self.requests[req_id] = Tracked(Request(req_id, list(range(tokens)), dict(params or {})), kv,
                                        local_hit=local_hit)

    def abort(self, req_id):
        tracked = self.requests[req_id]
        if tracked.state in ("finished", "aborted"):
            return
        self._finish(tracked, "aborted")

    def preempt(self, req_id):
        """Frees a running request's blocks; it is recomputed from scratch when scheduled again."""
        tracked = self.requests[req_id]
        assert tracked.state == "running"
        self.preempted.add(req_id)
        self._release(tracked.blocks)
        tracked.blocks, tracked.computed, tracked.state, tracked.resumed = [], 0, "waiting", True
        tracked.local_hit = 0

    def _allocate(self, n):
        if n > len(self.free):
            raise RuntimeError("out of blocks")
        taken, self.free = self.free[:n], self.free[n:]
        return taken

    def _release(self, blocks):
        self.free.extend(blocks)

    def _blocks_for(self, tracked, tokens):
        need = math.ceil(tokens / self.block_size) - len(tracked.blocks)
        if need > 0:
            new = self._allocate(need)
            tracked.blocks += new
            tracked.new_blocks += new

    def _write_rows(self, tracked, layer, begin, end):
        """The attention layer writing the true K/V rows [begin, end) into the request's blocks."""
        self.cache.write_layer(layer, tracked.kv[layer, :, begin:end], tracked.blocks, begin, end)

    def _finish(self, tracked, state):
        blocks = list(tracked.blocks)
        delay, params = self.scheduler.request_finished(tracked.request, blocks)
        tracked.params = params
        tracked.state = state
        self.finished_ids.add(tracked.request.request_id)
        if delay:
            self.held[tracked.request.request_id] = blocks
        else:
            self._release(blocks)
        tracked.blocks = []

    # ---- one engine step -----------------------------------------------------------------------

    def step(self):
        self.steps += 1
        new_reqs, cached, scheduled = [], CachedRequestData(), {}
        for tracked in self.requests.values():
            req_id = tracked.request.request_id
            if tracked.state == "waiting":
                hit = tracked.local_hit
                if hit:  # the local prefix cache's blocks already hold these rows
                    self._blocks_for(tracked, hit)
                    for layer in range(self.layers):
                        self._write_rows(tracked, layer, 0, hit)
                n_ext, is_async = self.scheduler.get_num_new_matched_tokens(tracked.request, hit)
                tokens = len(tracked.request.prompt_token_ids)
                if is_async:
                    self._blocks_for(tracked, tokens)
                self.scheduler.update_state_after_alloc(tracked.request, KVCacheBlocks((list(tracked.blocks),)),
                                                        n_ext if is_async else 0)
                tracked.computed = hit
                tracked.state = "remote" if is_async else "running"
                tracked.new_this_step = True
                if is_async:
                    continue
            if tracked.state != "running":
                continue
            tokens = len(tracked.request.prompt_token_ids)
            n = min(self.chunk_tokens, tokens - tracked.computed)
            self._blocks_for(tracked, tracked.computed + n)
            scheduled[req_id] = n
            if tracked.new_this_step:
                new_reqs.append(NewRequestData(req_id, tracked.request.prompt_token_ids, (list(tracked.blocks),),
                                               tracked.computed))
            else:
                cached.req_ids.append(req_id)
                cached.resumed_from_preemption.append(tracked.resumed)
                cached.new_block_ids.append((list(tracked.blocks if tracked.resumed else tracked.new_blocks),))
                cached.num_computed_tokens.append(tracked.computed)
            tracked.new_blocks, tracked.new_this_step, tracked.resumed = [], False, False
        output = SchedulerOutput(new_reqs, cached, scheduled, set(self.finished_ids), set(self.preempted))
        self.finished_ids.clear()
        self.preempted.clear()
        meta = pickle.loads(pickle.dumps(self.scheduler.build_connector_meta(output)))

        # worker
        w = self.worker
        w.bind_connector_metadata(meta)
        if output.preempted_req_ids:
            w.handle_preemptions(meta)
        w.start_load_kv(ForwardContext())
        for layer in range(self.layers):
            w.wait_for_layer_load(layer_name(layer))
            for req_id, n in scheduled.items():
                tracked = self.requests[req_id]
                self._write_rows(tracked, layer, tracked.computed, tracked.computed + n)
            w.save_kv_layer(layer_name(layer), self.pool[layer], None)
        w.wait_for_save()
        sending, recving = w.get_finished(output.finished_req_ids)
        errors = w.get_block_ids_with_load_errors()
        w.clear_connector_metadata()

        # scheduler: outputs
        self.scheduler.update_connector_output(KVConnectorOutput(sending, recving, errors))
        self.load_errors |= errors
        for req_id in sending or ():
            self._release(self.held.pop(req_id))
        for req_id in recving or ():
            tracked = self.requests[req_id]
            if tracked.state in ("finished", "aborted"):
                self._release(self.held.pop(req_id))
            elif set(tracked.blocks) & errors:  # vLLM recomputes what failed to load
                tracked.load_failed = tracked.recomputed = True
                tracked.state, tracked.computed = "running", 0
            else:
                tracked.state, tracked.computed = "loaded", len(tracked.request.prompt_token_ids)
        for req_id, n in scheduled.items():
            tracked = self.requests[req_id]
            tracked.computed += n
            params = tracked.request.kv_transfer_params or {}
            if tracked.computed == len(tracked.request.prompt_token_ids):
                if params.get("do_remote_decode"):
                    self._finish(tracked, "finished")  # max_tokens = 1: the prefill instance is done
                else:
                    tracked.state = "loaded"  # computed locally (a recompute)

    def run_until(self, predicate, max_steps=400, sleep_s=0.01):
        import time
        for _ in range(max_steps):
            if predicate():
                return True
            self.step()
            time.sleep(sleep_s)
        return predicate()

    def rows(self, req_id):
        """The [layers, 2, tokens, heads, head_dim] KV the request's blocks hold now."""
        tracked = self.requests[req_id]
        tokens = len(tracked.request.prompt_token_ids)
        out = torch.empty(self.layers, 2, tokens, self.heads, self.head_dim, dtype=self.pool.dtype)
        for layer in range(self.layers):
            self.cache.gather_rows(out, layer, tracked.blocks, 0, tokens)
        return out

    def close(self):
        self.worker.shutdown()
        self.cache = None
        self.pool = None
        self._shm.close()
