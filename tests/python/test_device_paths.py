"""The connectors' device paths: CUDA IPC export of device caches and layer signals ordered after
the GPU work (CUDA events). They run where torch sees a GPU and skip cleanly elsewhere (Debian's
python3-torch is CPU-only). The daemon side of device memory is the device path's work; these
tests check what the connector hands it."""

import threading
import time
import unittest

import torch

from spectrumkv import tensors
from spectrumkv.integrations import _common

HAS_GPU = torch.cuda.is_available()


@unittest.skipUnless(HAS_GPU, "no CUDA device visible to torch")
class CudaIpcExport(unittest.TestCase):

    def test_one_allocation_is_one_handle_with_per_layer_offsets(self):
        pool = torch.randn(3, 2, 8, 16, 2, 64, device="cuda").half()
        cache = tensors.PagedCache({i: pool[i] for i in range(3)})
        self.assertTrue(cache.on_device)
        handle = cache.handle().cuda_ipc
        storage = pool.untyped_storage() if hasattr(pool, "untyped_storage") else pool.storage()
        device, ipc, _, offset = storage._share_cuda_()[:4]
        self.assertEqual(handle.ipc_handle, bytes(ipc))
        self.assertEqual(handle.device, int(device))
        self.assertEqual(handle.offset, int(offset))
        self.assertEqual(handle.length, pool.numel() * 2)
        layer_bytes = pool[0].numel() * 2
        layout = cache.pool_layout().paged
        self.assertEqual(list(layout.k_pool_offset_bytes), [i * layer_bytes for i in range(3)])
        self.assertEqual(list(layout.v_pool_offset_bytes), [i * layer_bytes + layer_bytes // 2 for i in range(3)])

    def test_layers_in_separate_allocations_are_refused(self):
        # 16 MiB each: above the caching allocator's split threshold, so two cudaMalloc's.
        layers = {i: torch.zeros(2, 256, 16, 8, 128, device="cuda", dtype=torch.float16) for i in range(2)}
        with self.assertRaisesRegex(ValueError, "device allocations"):
            tensors.PagedCache(layers)


@unittest.skipUnless(HAS_GPU, "no CUDA device visible to torch")
class LayerSignalsAfterTheGpu(unittest.TestCase):

    def test_signal_runs_after_the_kernels_and_never_blocks(self):
        after = _common.AfterDevice()
        self.addCleanup(after.close)
        done = threading.Event()
        seen = {}
        torch.cuda._sleep(int(2e8))  # ~0.1 s of GPU work queued before the signal
        marker = torch.cuda.Event()
        marker.record()
        started = time.monotonic()
        after.submit(lambda: (seen.setdefault("gpu_done", marker.query()), done.set()))
        self.assertLess(time.monotonic() - started, 0.05, "submitting a signal blocked on the GPU")
        self.assertTrue(done.wait(10.0))
        self.assertTrue(seen["gpu_done"], "the signal ran before the GPU work it follows")


class WithoutGpu(unittest.TestCase):

    def test_cpu_caches_signal_at_once(self):
        pool, shm = tensors.shared_tensor([2, 2, 4, 16, 2, 64], torch.float16)
        self.addCleanup(shm.close)
        cache = tensors.PagedCache({0: pool[0], 1: pool[1]})
        self.assertFalse(cache.on_device)
        self.assertTrue(cache.handle().HasField("shared_memory"))
        del cache, pool


if __name__ == "__main__":
    unittest.main()
