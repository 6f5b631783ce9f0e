"""Torch tensors in POSIX shared memory, and the daemon's view of an engine's paged KV caches.

The daemon reads and writes KV through handles (DESIGN 2): a CPU tensor can be handed to it when
it lives in a POSIX shared-memory object. `shared_tensor` allocates such a tensor;
`locate_shared_memory` finds the object behind any tensor from /proc/self/maps (so caches an
engine allocated itself in /dev/shm need no special allocator). `PagedCache` describes an
engine's per-layer paged caches ([2, num_blocks, block_size, heads, head_dim] NHD or
[2, num_blocks, heads, block_size, head_dim] HND) as one registered cache.

Imports torch lazily: the rest of the package works without it.
"""

import os
import re

from . import BYTES_PER_ELEMENT, SharedMemoryBuffer, pb

NHD = "NHD"
HND = "HND"
_SHM_PREFIX = "/dev/shm/"


def _torch():
    import torch
    return torch


def torch_dtype_to_pb(dtype):
    """DTYPE_FP16 / DTYPE_BF16 for torch.float16 / torch.bfloat16; ValueError otherwise."""
    torch = _torch()
    if dtype == torch.float16:
        return pb.DTYPE_FP16
    if dtype == torch.bfloat16:
        return pb.DTYPE_BF16
    if dtype == torch.uint8 or "float8" in str(dtype):
        raise ValueError("FP8 KV caches are not supported yet: the codec reads FP16/BF16 rows "
                         "(start the engine with kv_cache_dtype auto, i.e. the model's FP16/BF16)")
    raise ValueError("KV cache dtype %s is not supported: FP16 or BF16 only" % dtype)


def shared_tensor(shape, dtype, name=None):
    """A zero-filled tensor of `shape` and `dtype` in a new POSIX shared-memory object. Returns
    (tensor, SharedMemoryBuffer); keep the buffer alive as long as the tensor, then close it."""
    torch = _torch()
    numel = 1
    for d in shape:
        numel *= int(d)
    itemsize = torch.empty((), dtype=dtype).element_size()
    buffer = SharedMemoryBuffer.create(max(1, numel * itemsize), name=name)
    flat = torch.frombuffer(buffer.buf, dtype=dtype, count=numel) if numel else torch.empty(0, dtype=dtype)
    return flat.view(*shape), buffer


def locate_shared_memory(address, length):
    """(name, offset) of the POSIX shared-memory object mapped at [address, address + length) in
    this process, from /proc/self/maps. ValueError when the range is not inside one mapping of
    a live /dev/shm object."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(None, 5)
            if len(fields) < 6:
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if not start <= address < end:
                continue
            path = fields[5].strip()
            if not path.startswith(_SHM_PREFIX) or path.endswith("(deleted)"):
                raise ValueError("memory at 0x%x is mapped from %r, not a live POSIX shared-memory "
                                 "object: allocate the KV cache in /dev/shm (spectrumkv.tensors."
                                 "shared_tensor) or pass device memory" % (address, path or "anonymous memory"))
            if address + length > end:
                raise ValueError("memory [0x%x, +%d) runs past its shared-memory mapping %s"
                                 % (address, length, path))
            return "/" + path[len(_SHM_PREFIX):], address - start + int(fields[2], 16)
    raise ValueError("address 0x%x is not mapped in this process" % address)


def layer_index(layer_name, fallback):
    """The layer number in an engine's layer name ("model.layers.17.self_attn.attn" -> 17): the
    first integer in it, or `fallback` (the name's position) when there is none."""
    match = re.search(r"(\d+)", layer_name)
    return int(match.group(1)) if match else fallback


def _locate_extent(ranges):
    """(shm name, extent offset, extent length, offset of each range in the extent) of address
    ranges [(address, length)] that must all lie in one POSIX shared-memory object."""
    located = [locate_shared_memory(address, length) for address, length in ranges]
    names = {name for name, _ in located}
    if len(names) != 1:
        raise ValueError("the KV pools live in %d shared-memory objects (%s); register needs one"
                         % (len(names), ", ".join(sorted(names))))
    offsets = [offset for _, offset in located]
    start = min(offsets)
    end = max(offset + length for offset, (_, length) in zip(offsets, ranges))
    return names.pop(), start, end - start, [offset - start for offset in offsets]


def _locate_cuda_extent(tensors, ranges):
    """((IPC memory handle, device), extent offset, extent length, offset of each range in the
    extent) of CUDA tensors that must all lie in one device allocation (one cudaIpcMemHandle).
    The offsets are from the allocation's start, as the daemon maps it."""
    handles, starts = set(), []
    for t, (address, _) in zip(tensors, ranges):
        storage = t.untyped_storage() if hasattr(t, "untyped_storage") else t.storage()
        # (device, handle, size, offset of the storage in its allocation, ...): torch's own export.
        device, handle, _, storage_offset = storage._share_cuda_()[:4]
        handles.add((bytes(handle), int(device)))
        starts.append(int(storage_offset) + address - storage.data_ptr())
    if len(handles) != 1:
        raise ValueError("the KV caches live in %d device allocations; a registered cache is one (allocate every "
                         "layer from one tensor)" % len(handles))
    start = min(starts)
    end = max(s + length for s, (_, length) in zip(starts, ranges))
    return handles.pop(), start, end - start, [s - start for s in starts]


def _pool_layout(dtype, kv_heads, head_dim, block_size, num_blocks, k_offsets, v_offsets):
    """A registered cache's layout: paged pools, rows [heads, head_dim] contiguous per token."""
    row_bytes = kv_heads * head_dim * BYTES_PER_ELEMENT
    return pb.KvLayout(dtype=dtype, layers=len(k_offsets), kv_heads=kv_heads, head_dim=head_dim, tokens=1,
                       paged=pb.PagedKvLayout(block_size=block_size, num_blocks=num_blocks,
                                              block_stride_bytes=block_size * row_bytes, token_stride_bytes=row_bytes,
                                              k_pool_offset_bytes=k_offsets, v_pool_offset_bytes=v_offsets))


class PagedCache:
    """An engine worker's per-layer paged KV caches as one registered cache.

    `caches` maps layer index -> tensor [2, num_blocks, block_size, heads, head_dim] (NHD) or
    [2, num_blocks, heads, block_size, head_dim] (HND), FP16 or BF16, every layer in the same
    shared-memory object. NHD rows are what the daemon reads and writes in place (zero copy).
    HND rows are not contiguous per token; transfers of HND caches go through a dense per-request
    buffer (`gather_rows` / `scatter_rows`), one extra copy on each side.
    """

    def __init__(self, caches, layout=NHD):
        if layout not in (NHD, HND):
            raise ValueError("cache layout %r: expected 'NHD' or 'HND'" % (layout,))
        if not caches:
            raise ValueError("no KV caches to register")
        self.layout = layout
        self.layers = len(caches)
        if sorted(caches) != list(range(self.layers)):
            raise ValueError("layer indices %s are not 0..%d" % (sorted(caches), self.layers - 1))
        self.tensors = [caches[i] for i in range(self.layers)]
        first = self.tensors[0]
        if first.dim() != 5 or first.shape[0] != 2:
            raise ValueError("layer 0 cache has shape %s; expected [2, num_blocks, block_size, heads, "
                             "head_dim] (NHD) or [2, num_blocks, heads, block_size, head_dim] (HND)"
                             % (tuple(first.shape),))
        self.dtype = torch_dtype_to_pb(first.dtype)
        _, self.num_blocks, a, b, self.head_dim = (int(x) for x in first.shape)
        self.block_size, self.kv_heads = (a, b) if layout == NHD else (b, a)
        for i, t in enumerate(self.tensors):
            if t.shape != first.shape or t.dtype != first.dtype:
                raise ValueError("layer %d cache %s %s differs from layer 0's %s %s"
                                 % (i, tuple(t.shape), t.dtype, tuple(first.shape), first.dtype))
            if t.device != first.device:
                raise ValueError("layer %d cache is on %s, layer 0's on %s" % (i, t.device, first.device))
            if not t.is_contiguous():
                raise ValueError("layer %d cache is not contiguous" % i)
        ranges = [(t.data_ptr(), t.numel() * t.element_size()) for t in self.tensors]
        # One memory object holding every layer: the registered handle spans them.
        self.on_device = first.device.type == "cuda"
        if self.on_device:
            self._ipc, self.extent_offset, self.extent_length, self._pool_offsets = _locate_cuda_extent(
                self.tensors, ranges)
        elif first.device.type == "cpu":
            self.shm_name, self.extent_offset, self.extent_length, self._pool_offsets = _locate_extent(ranges)
        else:
            raise ValueError("KV caches on %s are not supported (CPU in shared memory, or CUDA)" % first.device)

    @property
    def row_bytes(self):
        return self.kv_heads * self.head_dim * BYTES_PER_ELEMENT

    def handle(self):
        if self.on_device:
            ipc_handle, device = self._ipc
            return pb.KvHandle(cuda_ipc=pb.CudaIpcHandle(ipc_handle=ipc_handle, device=device,
                                                         offset=self.extent_offset, length=self.extent_length))
        return pb.KvHandle(shared_memory=pb.SharedMemoryHandle(
            name=self.shm_name, offset=self.extent_offset, length=self.extent_length))

    def pool_layout(self):
        """The registered layout: NHD pools in place. (HND caches are not registered: their rows
        are not contiguous.)"""
        if self.layout != NHD:
            raise ValueError("HND caches cannot be registered: rows are not contiguous per token")
        pool_bytes = self.num_blocks * self.block_size * self.row_bytes  # K pool, then V pool
        return _pool_layout(self.dtype, self.kv_heads, self.head_dim, self.block_size, self.num_blocks,
                            self._pool_offsets, [o + pool_bytes for o in self._pool_offsets])

    def dense_layout(self, tokens):
        return pb.KvLayout(dtype=self.dtype, layers=self.layers, kv_heads=self.kv_heads, head_dim=self.head_dim,
                           tokens=tokens, contiguous=pb.ContiguousKvLayout())

    def dense_bytes(self, tokens):
        return self.layers * 2 * tokens * self.row_bytes

    def _slots(self, block_ids, begin, end):
        """(pool block, slot in block) index tensors of sequence tokens [begin, end)."""
        torch = _torch()
        tokens = torch.arange(begin, end)
        return torch.tensor(block_ids, dtype=torch.long)[tokens // self.block_size], tokens % self.block_size

    def read_layer(self, layer, block_ids, begin, end):
        """A copy of rows [begin, end) of `layer`: [2, end - begin, heads, head_dim]."""
        blocks, slots = self._slots(block_ids, begin, end)
        cache = self.tensors[layer]
        if self.layout == NHD:
            return cache[:, blocks, slots]
        # Advanced indices apart from each other come first: [n, 2, heads, head_dim].
        return cache[:, blocks, :, slots].transpose(0, 1)

    def write_layer(self, layer, rows, block_ids, begin, end):
        """Writes `rows` ([2, end - begin, heads, head_dim]) as rows [begin, end) of `layer`."""
        blocks, slots = self._slots(block_ids, begin, end)
        cache = self.tensors[layer]
        if self.layout == NHD:
            cache[:, blocks, slots] = rows
        else:
            cache[:, blocks, :, slots] = rows.transpose(0, 1)

    def gather_rows(self, dense, layer, block_ids, begin, end):
        """Copies rows [begin, end) of `layer` into `dense` (a [layers, 2, tokens, heads,
        head_dim] tensor, the dense layout)."""
        dense[layer, :, begin:end] = self.read_layer(layer, block_ids, begin, end)

    def scatter_rows(self, dense, block_ids, begin, end):
        """Writes rows [begin, end) of every layer from `dense` into the cache blocks."""
        for layer in range(self.layers):
            self.write_layer(layer, dense[layer, :, begin:end], block_ids, begin, end)


class PagePools:
    """Per-layer K and V page pools given by address and length (SGLang's KVArgs): each pool is
    `pool_bytes` long, in pages of `page_bytes` = page_size tokens of [kv_heads, head_dim] rows,
    all in one POSIX shared-memory object. Registered in place (rows are contiguous per token)."""

    layout = NHD
    on_device = False  # KVArgs pointers are resolved in this process's shared memory only

    def __init__(self, k_addresses, v_addresses, pool_bytes, page_bytes, page_size, kv_heads, dtype):
        if not k_addresses or len(k_addresses) != len(v_addresses):
            raise ValueError("%d K pools and %d V pools: expected the same nonzero number"
                             % (len(k_addresses), len(v_addresses)))
        row = page_size * kv_heads * BYTES_PER_ELEMENT
        if page_size <= 0 or kv_heads <= 0 or page_bytes % row != 0 or pool_bytes % page_bytes != 0:
            raise ValueError("pages of %d bytes do not hold %d tokens of %d heads of 2-byte elements, or pools of "
                             "%d bytes are not whole pages" % (page_bytes, page_size, kv_heads, pool_bytes))
        self.layers, self.kv_heads, self.block_size, self.dtype = len(k_addresses), kv_heads, page_size, dtype
        self.head_dim = page_bytes // row
        self.num_blocks = pool_bytes // page_bytes
        self.shm_name, self.extent_offset, self.extent_length, offsets = _locate_extent(
            [(a, pool_bytes) for a in list(k_addresses) + list(v_addresses)])
        self._k_offsets, self._v_offsets = offsets[:self.layers], offsets[self.layers:]

    handle = PagedCache.handle

    def pool_layout(self):
        return _pool_layout(self.dtype, self.kv_heads, self.head_dim, self.block_size, self.num_blocks,
                            self._k_offsets, self._v_offsets)


def dense_tensor(buffer, layers, tokens, heads, head_dim, dtype):
    """The [layers, 2, tokens, heads, head_dim] view of a shared-memory buffer holding a dense KV."""
    torch = _torch()
    numel = layers * 2 * tokens * heads * head_dim
    return torch.frombuffer(buffer.buf, dtype=dtype, count=numel).view(layers, 2, tokens, heads, head_dim)


def shm_exists(name):
    return os.path.exists(_SHM_PREFIX + name.lstrip("/"))
