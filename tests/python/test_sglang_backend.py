"""The SGLang backend through SGLang's call order (bootstrap, receiver init and send_metadata,
sender init and chunked send, poll), with the stand-in interfaces, page pools in POSIX shared
memory and two real spectrumkvd processes."""

import json
import os
import time
import unittest

import torch

import daemons
import vllm_driver
from spectrumkv import dense_layout, tensors
from spectrumkv.integrations import sglang as backend
from sglang.srt.disaggregation.base.conn import KVArgs, KVPoll
from sglang.srt.disaggregation.utils import DisaggregationMode, KVClassType, TransferBackend, get_kv_class
from sglang.srt.server_args import ServerArgs

LAYERS, HEADS, HEAD_DIM, PAGE, PAGES = 3, 2, 64, 4, 48


class Registration(unittest.TestCase):

    def test_plugin_extends_the_backend_enum_and_lookup(self):
        member = backend.register()
        self.assertIs(backend.register(), member)  # idempotent
        self.assertIs(TransferBackend("spectrumkv"), member)
        from sglang.srt.disaggregation import utils
        for kind, cls in [(KVClassType.MANAGER, backend.SpectrumKVManager), (KVClassType.SENDER,
                          backend.SpectrumKVSender), (KVClassType.RECEIVER, backend.SpectrumKVReceiver),
                          (KVClassType.BOOTSTRAP_SERVER, backend.SpectrumKVBootstrapServer),
                          (KVClassType.KVARGS, KVArgs)]:
            self.assertIs(utils.get_kv_class(member, kind), cls)
        with self.assertRaises(ValueError):
            utils.get_kv_class(TransferBackend.NIXL, KVClassType.MANAGER)  # others still reach upstream's
        self.assertIsNot(get_kv_class, utils.get_kv_class)


class Node:
    """One SGLang worker: page pools (K and V per layer) in shared memory and its manager."""

    def __init__(self, mode, settings, port=None, dtype=torch.float16):
        self.pool, self.shm = tensors.shared_tensor([2, LAYERS, PAGES * PAGE, HEADS, HEAD_DIM], dtype)
        args = KVArgs()
        args.engine_rank, args.page_size, args.kv_head_num, args.total_kv_head_num = 0, PAGE, HEADS, HEADS
        args.kv_data_ptrs = [self.pool[0, l].data_ptr() for l in range(LAYERS)] + \
            [self.pool[1, l].data_ptr() for l in range(LAYERS)]
        bytes_per_pool = self.pool[0, 0].numel() * self.pool.element_size()
        args.kv_data_lens = [bytes_per_pool] * (2 * LAYERS)
        args.kv_item_lens = [PAGE * HEADS * HEAD_DIM * self.pool.element_size()] * (2 * LAYERS)
        os.environ["SPECTRUMKV_CONFIG"] = json.dumps(settings)
        try:
            self.manager = backend.SpectrumKVManager(args, DisaggregationMode(mode), ServerArgs(
                disaggregation_bootstrap_port=port))
        finally:
            del os.environ["SPECTRUMKV_CONFIG"]
        self.free = list(range(PAGES))
        vllm_driver.random.Random(len(mode)).shuffle(self.free)

    def allocate(self, n):
        taken, self.free = self.free[:n], self.free[n:]
        return taken

    def _rows(self, pages, tokens):
        t = torch.arange(tokens)
        return torch.tensor(pages)[t // PAGE] * PAGE + t % PAGE

    def write(self, kv, pages, begin, end):
        rows = self._rows(pages, end)[begin:end]
        self.pool[:, :, rows] = kv[:, :, begin:end].transpose(0, 1)

    def read(self, pages, tokens):
        return self.pool[:, :, self._rows(pages, tokens)].transpose(0, 1)

    def close(self):
        self.manager.close()
        self.pool = None
        self.shm.close()


class WithDaemons(unittest.TestCase):
    decode_flags = ()

    @classmethod
    def setUpClass(cls):
        cls.pair = daemons.DaemonPair(decode_flags=cls.decode_flags).__enter__()
        cls.bootstrap = backend.SpectrumKVBootstrapServer("127.0.0.1", 0)
        cls.bootstrap_addr = "127.0.0.1:%d" % cls.bootstrap.port

    @classmethod
    def tearDownClass(cls):
        cls.bootstrap.close()
        cls.pair.__exit__(None, None, None)

    def nodes(self, dtype=torch.float16, **settings):
        common = dict(budget=settings.pop("budget", 1.0), passthrough=settings.pop("passthrough", "always"),
                      kv_dtype="bf16" if dtype == torch.bfloat16 else "fp16",
                      model_name="sglang-%s" % dtype, receive_timeout_s=settings.pop("receive_timeout_s", 20.0))
        prefill = Node("prefill", dict(common, daemon_address=self.pair.address("prefill"), daemon_id="prefill",
                                       **settings), port=self.bootstrap.port, dtype=dtype)
        decode = Node("decode", dict(common, daemon_address=self.pair.address("decode"), daemon_id="decode"),
                      dtype=dtype)
        prefill.manager.register_to_bootstrap()
        self.addCleanup(decode.close)
        self.addCleanup(prefill.close)
        return prefill, decode

    def poll_until_done(self, *pollers, timeout=30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = [p.poll() for p in pollers]
            if all(s in (KVPoll.Success, KVPoll.Failed) for s in states):
                return states
            time.sleep(0.01)
        self.fail("transfer did not finish within %.0f s" % timeout)

    def run_request(self, prefill, decode, room, kv, chunk_pages=5, abort_after=None):
        tokens = kv.shape[2]
        pages = -(-tokens // PAGE)
        # Decode first: it preallocates and announces (and names its daemon for the room).
        receiver = backend.SpectrumKVReceiver(decode.manager, self.bootstrap_addr, room)
        self.assertEqual(receiver.poll(), KVPoll.Bootstrapping)
        receiver.init(prefill_dp_rank=0)
        decode_pages = decode.allocate(pages)
        receiver.send_metadata(decode_pages)
        # Prefill: chunks computed (written), then sent.
        sender = backend.SpectrumKVSender(prefill.manager, self.bootstrap_addr, room, [0], 0)
        self.assertEqual(sender.poll(), KVPoll.Bootstrapping)
        sender.init(pages)
        self.assertEqual(sender.poll(), KVPoll.WaitingForInput)  # the decode published its daemon
        prefill_pages = prefill.allocate(pages)
        padded = torch.zeros(LAYERS, 2, pages * PAGE, HEADS, HEAD_DIM, dtype=kv.dtype)
        padded[:, :, :tokens] = kv
        for i, first in enumerate(range(0, pages, chunk_pages)):
            if abort_after is not None and i == abort_after:
                sender.abort()
                break
            chunk = prefill_pages[first:first + chunk_pages]
            prefill.write(padded, prefill_pages, first * PAGE, (first + len(chunk)) * PAGE)
            sender.send(chunk)
        states = self.poll_until_done(sender, receiver)
        return states, receiver, decode.read(decode_pages, tokens)


class Transfers(WithDaemons):

    def test_passthrough_is_byte_exact_in_shuffled_pages(self):
        prefill, decode = self.nodes()
        kv = vllm_driver.synthetic_kv(LAYERS, 150, HEADS, HEAD_DIM, 5)
        states, receiver, rows = self.run_request(prefill, decode, 1001, kv)
        self.assertEqual(states, [KVPoll.Success, KVPoll.Success])
        self.assertTrue(torch.equal(rows, kv))

    def test_bf16_is_byte_exact(self):
        prefill, decode = self.nodes(dtype=torch.bfloat16)
        kv = vllm_driver.synthetic_kv(LAYERS, 64, HEADS, HEAD_DIM, 6, torch.bfloat16)
        states, _, rows = self.run_request(prefill, decode, 1002, kv, chunk_pages=16)
        self.assertEqual(states, [KVPoll.Success, KVPoll.Success])
        self.assertTrue(torch.equal(rows, kv))

    def test_compressed_within_budget(self):
        prefill, decode = self.nodes(budget=0.45, passthrough="never")
        kv = vllm_driver.synthetic_kv(LAYERS, 160, HEADS, HEAD_DIM, 7)
        states, receiver, rows = self.run_request(prefill, decode, 1003, kv)
        self.assertEqual(states, [KVPoll.Success, KVPoll.Success])
        self.assertLessEqual(receiver.stats.wire_bytes, 0.45 * receiver.stats.raw_bytes)
        self.assertLess(((rows.float() - kv.float()).norm() / kv.float().norm()).item(), 0.1)
        # Exactly the codec's own Encode/Decode of the same KV, chunked as the sender sent it.
        session = prefill.manager.session
        encoded = session.client.encode(kv.numpy().tobytes(), dense_layout(LAYERS, HEADS, HEAD_DIM, 160), 0.45,
                                        request_id=1003, policy=session.settings.policy,
                                        stream_chunk_ends=list(range(20, 161, 20)))
        self.assertEqual(encoded.stats.wire_bytes, receiver.stats.wire_bytes)
        decoded = session.client.decode(encoded.segments)
        self.assertTrue(torch.equal(rows, torch.frombuffer(bytearray(decoded.kv), dtype=torch.float16).view(kv.shape)))

    def test_prefill_abort_fails_both_sides(self):
        prefill, decode = self.nodes(receive_timeout_s=10.0)
        kv = vllm_driver.synthetic_kv(LAYERS, 120, HEADS, HEAD_DIM, 8)
        states, receiver, _ = self.run_request(prefill, decode, 1004, kv, abort_after=2)
        self.assertEqual(states, [KVPoll.Failed, KVPoll.Failed])
        with self.assertRaises(RuntimeError):
            receiver.failure_exception()

    def test_budget_below_the_no_drop_minimum_fails_both_sides(self):
        prefill, decode = self.nodes(budget=0.05, passthrough="never", receive_timeout_s=10.0)
        kv = vllm_driver.synthetic_kv(LAYERS, 60, HEADS, HEAD_DIM, 9)
        states, receiver, _ = self.run_request(prefill, decode, 1005, kv)
        self.assertEqual(states, [KVPoll.Failed, KVPoll.Failed])

    def test_decode_prefix_reuse_is_refused_clearly(self):
        _, decode = self.nodes()
        receiver = backend.SpectrumKVReceiver(decode.manager, self.bootstrap_addr, 1006)
        receiver.init(0)
        receiver.send_metadata([1, 2], decode_prefix_len=4)
        self.assertEqual(receiver.poll(), KVPoll.Failed)
        with self.assertRaisesRegex(RuntimeError, "prefix reuse"):
            receiver.failure_exception()

    def test_decode_abort_while_waiting_cancels_the_receive(self):
        _, decode = self.nodes(receive_timeout_s=30.0)
        receiver = backend.SpectrumKVReceiver(decode.manager, self.bootstrap_addr, 1007)
        receiver.init(0)
        receiver.send_metadata(decode.allocate(4))
        self.assertEqual(receiver.poll(), KVPoll.Transferring)
        started = time.monotonic()
        receiver.abort()
        self.assertEqual(receiver.poll(), KVPoll.Failed)
        self.assertTrue(receiver.future.done())
        self.assertLess(time.monotonic() - started, 6.0)



class StagingExpiry(WithDaemons):
    decode_flags = ("--early_segment_ttl_seconds=1",)

    def test_a_decode_that_comes_after_the_ttl_fails(self):
        prefill, decode = self.nodes(peer="decode", receive_timeout_s=3.0)
        kv = vllm_driver.synthetic_kv(LAYERS, 40, HEADS, HEAD_DIM, 10)
        sender = backend.SpectrumKVSender(prefill.manager, self.bootstrap_addr, 2001, [0], 0)
        sender.init(10)
        pages = prefill.allocate(10)
        prefill.write(kv, pages, 0, 40)
        sender.send(pages)  # pushed into the decode daemon's staging before any Receive
        self.assertEqual(self.poll_until_done(sender), [KVPoll.Success])  # the source was read: pages free
        time.sleep(2.5)
        receiver = backend.SpectrumKVReceiver(decode.manager, self.bootstrap_addr, 2001)
        receiver.init(0)
        receiver.send_metadata(decode.allocate(10))
        self.assertEqual(self.poll_until_done(receiver), [KVPoll.Failed])


class DaemonKilled(WithDaemons):

    def test_killed_prefill_daemon_fails_both_sides_without_hanging(self):
        prefill, decode = self.nodes(receive_timeout_s=4.0)
        kv = vllm_driver.synthetic_kv(LAYERS, 80, HEADS, HEAD_DIM, 11)
        receiver = backend.SpectrumKVReceiver(decode.manager, self.bootstrap_addr, 3001)
        receiver.init(0)
        receiver.send_metadata(decode.allocate(20))
        sender = backend.SpectrumKVSender(prefill.manager, self.bootstrap_addr, 3001, [0], 0)
        sender.init(20)
        pages = prefill.allocate(20)
        prefill.write(kv, pages, 0, 40)
        sender.send(pages[:10])  # half the prompt, then the daemon dies
        self.pair.kill("prefill")
        started = time.monotonic()
        self.assertEqual(self.poll_until_done(sender, receiver), [KVPoll.Failed, KVPoll.Failed])
        self.assertLess(time.monotonic() - started, 15.0)


if __name__ == "__main__":
    unittest.main()
