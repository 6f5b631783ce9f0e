"""The vLLM connector through vLLM's call order (vllm_driver.Engine, the stand-in interfaces),
end to end with two real spectrumkvd processes and paged caches in POSIX shared memory."""

import time
import unittest

import torch

import daemons
import vllm_driver
from spectrumkv import pb, tensors
from spectrumkv.integrations import _common
from vllm.config import KVTransferConfig, VllmConfig
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole, SupportsHMA

LAYERS, HEADS, HEAD_DIM, BLOCK = 4, 2, 64, 16


def config(**extra):
    return VllmConfig(kv_transfer_config=KVTransferConfig(
        kv_connector="SpectrumKVConnector", kv_connector_module_path="spectrumkv.integrations.vllm",
        kv_connector_extra_config=extra))


class LoadingAndSettings(unittest.TestCase):
    """No daemon needed."""

    def test_loads_by_module_path_with_hybrid_manager(self):
        connector = KVConnectorFactory.create_connector(config(peer="decode"), KVConnectorRole.SCHEDULER)
        self.assertEqual(type(connector).__name__, "SpectrumKVConnector")
        self.assertIsInstance(connector, SupportsHMA)
        self.assertEqual(type(connector).get_required_kvcache_layout(config()), "NHD")
        self.assertEqual(type(connector).get_required_kvcache_layout(config(kv_cache_layout="hnd")), "HND")
        self.assertTrue(type(connector).requires_piecewise_for_cudagraph({}))

    def test_bad_settings_are_refused_by_name(self):
        for extra, words in [({"budgte": 0.5}, "unknown setting(s) budgte"), ({"budget": 0}, "budget 0"),
                             ({"passthrough": "sometimes"}, "passthrough"),
                             ({"policy": {"allow_drop": True}}, "cannot mask"),
                             ({"policy": {"allocator": "greedy"}}, "allocator"),
                             ({"policy": {"transform_coding": True}}, "needs `profile`"),
                             ({"kv_cache_layout": "NDH"}, "NHD or HND"),
                             ({"tls_cert_file": "/x"}, "go together")]:
            with self.assertRaises(ValueError) as raised:
                KVConnectorFactory.create_connector(config(**extra), KVConnectorRole.SCHEDULER)
            self.assertIn(words, str(raised.exception))

    def test_policy_never_drops_tokens(self):
        settings = _common.Settings({"policy": {"allocator": "paper", "sink_tokens": 8}})
        self.assertFalse(settings.policy.allow_drop)
        coded = _common.Settings({"policy": {"transform_coding": True}, "profile": "/m.skvprofile"})
        self.assertTrue(coded.policy.transform_coding)
        self.assertEqual(coded.profile, "/m.skvprofile")
        self.assertEqual(settings.policy.allocator, pb.ALLOCATOR_PAPER)
        self.assertEqual(settings.policy.sink_tokens, 8)

    def test_remote_decode_without_peer_is_refused(self):
        connector = KVConnectorFactory.create_connector(config(), KVConnectorRole.SCHEDULER)
        request = vllm_driver.Request("r", list(range(8)), {"do_remote_decode": True})
        with self.assertRaises(ValueError) as raised:
            connector.update_state_after_alloc(request, vllm_driver.KVCacheBlocks(([1],)), 0)
        self.assertIn("no peer", str(raised.exception))

    def test_decode_abort_before_any_worker_saw_the_load_frees_at_once(self):
        connector = KVConnectorFactory.create_connector(config(), KVConnectorRole.SCHEDULER)
        params = {"do_remote_prefill": True, "spectrumkv_transfer_id": 77, "spectrumkv_tokens": 20}
        request = vllm_driver.Request("d", list(range(20)), params)
        self.assertEqual(connector.get_num_new_matched_tokens(request, 0), (20, True))
        connector.update_state_after_alloc(request, vllm_driver.KVCacheBlocks(([3, 1],)), 20)
        self.assertEqual(connector.request_finished(request, [3, 1]), (False, None))
        meta = connector.build_connector_meta(vllm_driver.SchedulerOutput([], vllm_driver.CachedRequestData(), {},
                                                                          set()))
        self.assertEqual((meta.loads, meta.cancels), ([], []))

    def test_two_cache_groups_are_refused(self):
        connector = KVConnectorFactory.create_connector(config(peer="d"), KVConnectorRole.SCHEDULER)
        with self.assertRaises(ValueError):
            connector.request_finished_all_groups(vllm_driver.Request("r", [1]), ([1], [2]))

    def test_caches_it_cannot_read_are_refused(self):
        fp8, shm = tensors.shared_tensor([2, 2, 4, BLOCK, 2, HEAD_DIM], torch.uint8)
        with self.assertRaises(ValueError) as raised:
            tensors.PagedCache({0: fp8[0], 1: fp8[1]})
        self.assertIn("FP8", str(raised.exception))
        del fp8
        shm.close()
        private = torch.zeros(2, 4, BLOCK, 2, HEAD_DIM, dtype=torch.float16)
        with self.assertRaises(ValueError) as raised:
            tensors.PagedCache({0: private})
        self.assertIn("shared-memory", str(raised.exception))


class WithDaemons(unittest.TestCase):
    """Prefill and decode engines, each with its own caches, against two real daemons."""

    decode_flags = ()

    @classmethod
    def setUpClass(cls):
        cls.pair = daemons.DaemonPair(decode_flags=cls.decode_flags).__enter__()

    @classmethod
    def tearDownClass(cls):
        cls.pair.__exit__(None, None, None)

    def engines(self, layout="NHD", dtype=torch.float16, chunk_tokens=1 << 30, receive_timeout_s=20.0, **extra):
        common = dict(budget=extra.pop("budget", 1.0), passthrough=extra.pop("passthrough", "always"), **extra)
        prefill = vllm_driver.Engine(dict(common, daemon_address=self.pair.address("prefill"), peer="decode",
                                          daemon_id="prefill"), LAYERS, HEADS, HEAD_DIM, BLOCK, layout=layout,
                                     dtype=dtype, chunk_tokens=chunk_tokens, seed=1)
        decode = vllm_driver.Engine(dict(common, daemon_address=self.pair.address("decode"),
                                         receive_timeout_s=receive_timeout_s), LAYERS, HEADS, HEAD_DIM, BLOCK,
                                    layout=layout, dtype=dtype, seed=2)
        self.addCleanup(decode.close)
        self.addCleanup(prefill.close)
        return prefill, decode

    def prefill(self, engine, req_id, kv, **kwargs):
        engine.add(req_id, kv, {"do_remote_decode": True}, **kwargs)
        self.assertTrue(engine.run_until(lambda: engine.requests[req_id].state == "finished"))
        # The blocks come back once the daemon has read every row.
        self.assertTrue(engine.run_until(lambda: req_id not in engine.held), "prefill blocks never released")
        return engine.requests[req_id].params

    def decode(self, engine, req_id, kv, params, **kwargs):
        engine.add(req_id, kv, params, **kwargs)
        self.assertTrue(engine.run_until(lambda: engine.requests[req_id].state == "loaded"))
        return engine.requests[req_id]

    def assert_free(self, engine):
        self.assertEqual(sorted(engine.free), list(range(64)), "blocks leaked")

    def transfer(self, prefill, decode, tokens, seed, dtype=torch.float16, **kwargs):
        kv = vllm_driver.synthetic_kv(LAYERS, tokens, HEADS, HEAD_DIM, seed, dtype)
        params = self.prefill(prefill, "p%d" % seed, kv, **kwargs)
        self.assertIsNotNone(params)
        received = self.decode(decode, "d%d" % seed, kv, params)
        self.assertFalse(received.recomputed, "the load failed: %s" % decode.load_errors)
        return kv, decode.rows("d%d" % seed), decode.worker.load_stats["d%d" % seed]


class Passthrough(WithDaemons):

    def test_nhd_chunked_prefill_is_byte_exact(self):
        prefill, decode = self.engines(chunk_tokens=40)
        kv, rows, stats = self.transfer(prefill, decode, 100, seed=11)
        self.assertTrue(torch.equal(kv, rows))
        self.assertEqual(stats.raw_bytes, LAYERS * 2 * 100 * HEADS * HEAD_DIM * 2)
        self.assert_free(prefill)

    def test_hnd_is_byte_exact(self):
        prefill, decode = self.engines(layout="HND", chunk_tokens=33)
        kv, rows, _ = self.transfer(prefill, decode, 77, seed=12)
        self.assertTrue(torch.equal(kv, rows))

    def test_bf16_is_byte_exact(self):
        prefill, decode = self.engines(dtype=torch.bfloat16, model_name="standin-bf16")
        kv, rows, _ = self.transfer(prefill, decode, 50, seed=13, dtype=torch.bfloat16)
        self.assertTrue(torch.equal(kv, rows))

    def test_prefill_prefix_hit_sends_the_cached_rows_too(self):
        prefill, decode = self.engines(chunk_tokens=24)
        kv = vllm_driver.synthetic_kv(LAYERS, 90, HEADS, HEAD_DIM, 14)
        params = self.prefill(prefill, "p", kv, local_hit=48)
        self.decode(decode, "d", kv, params)
        self.assertTrue(torch.equal(kv, decode.rows("d")))

    def test_decode_partial_prefix_hit_keeps_its_own_rows(self):
        prefill, decode = self.engines()
        kv = vllm_driver.synthetic_kv(LAYERS, 70, HEADS, HEAD_DIM, 15)
        params = self.prefill(prefill, "p", kv)
        received = self.decode(decode, "d", kv, params, local_hit=32)
        self.assertFalse(received.recomputed)
        self.assertTrue(torch.equal(kv, decode.rows("d")))

    def test_decode_full_prefix_hit_loads_nothing(self):
        prefill, decode = self.engines()
        kv = vllm_driver.synthetic_kv(LAYERS, 40, HEADS, HEAD_DIM, 16)
        params = self.prefill(prefill, "p", kv)
        self.assertEqual(decode.scheduler.get_num_new_matched_tokens(vllm_driver.Request("x", list(range(40)), params),
                                                                     40), (0, False))
        self.decode(decode, "d", kv, params, local_hit=40)
        self.assertNotIn("d", decode.worker.load_stats)
        self.assertTrue(torch.equal(kv, decode.rows("d")))
        # The staged transfer is freed at once, and its sender hears of it (not after the TTL).
        stream = next(st for st in prefill.worker._detached if st.transfer_id == params["spectrumkv_transfer_id"])
        self.assertTrue(stream.wait_ended(10.0))
        self.assertIn("cancelled the staged transfer", str(stream.call.error()))

    def test_preempted_prefill_sends_its_recomputed_transfer(self):
        prefill, decode = self.engines(chunk_tokens=20)
        kv = vllm_driver.synthetic_kv(LAYERS, 80, HEADS, HEAD_DIM, 17)
        prefill.add("p", kv, {"do_remote_decode": True})
        prefill.step()
        prefill.step()
        prefill.preempt("p")
        self.assertTrue(prefill.run_until(lambda: prefill.requests["p"].state == "finished"))
        params = prefill.requests["p"].params
        self.decode(decode, "d", kv, params)
        self.assertTrue(torch.equal(kv, decode.rows("d")))
        self.assertTrue(prefill.run_until(lambda: not prefill.held))
        self.assert_free(prefill)

    def test_abort_before_the_first_step_sends_nothing(self):
        prefill, _ = self.engines()
        prefill.add("p", vllm_driver.synthetic_kv(LAYERS, 30, HEADS, HEAD_DIM, 18), {"do_remote_decode": True})
        prefill.abort("p")
        self.assertIsNone(prefill.requests["p"].params)
        self.assertEqual(prefill.held, {})
        self.assert_free(prefill)

    def test_abort_mid_prefill_releases_blocks_and_decode_recomputes(self):
        prefill, decode = self.engines(chunk_tokens=16, receive_timeout_s=5.0)
        kv = vllm_driver.synthetic_kv(LAYERS, 64, HEADS, HEAD_DIM, 19)
        prefill.add("p", kv, {"do_remote_decode": True})
        prefill.step()
        prefill.step()
        transfer_id = prefill.scheduler._producing["p"].transfer_id
        prefill.abort("p")
        self.assertIsNone(prefill.requests["p"].params)  # nothing for the proxy to forward
        self.assertTrue(prefill.run_until(lambda: not prefill.held), "aborted stream never released its blocks")
        self.assert_free(prefill)
        # A decode that was told about the transfer anyway fails its load and recomputes.
        params = {"do_remote_prefill": True, "spectrumkv_transfer_id": transfer_id, "spectrumkv_sender": "prefill",
                  "spectrumkv_tokens": 64}
        received = self.decode(decode, "d", kv, params)
        self.assertTrue(received.recomputed)
        self.assertTrue(torch.equal(kv, decode.rows("d")))

    def test_decode_abort_while_loading_cancels_the_receive(self):
        _, decode = self.engines(receive_timeout_s=30.0)
        kv = vllm_driver.synthetic_kv(LAYERS, 40, HEADS, HEAD_DIM, 20)
        params = {"do_remote_prefill": True, "spectrumkv_transfer_id": 987654321, "spectrumkv_sender": "prefill",
                  "spectrumkv_tokens": 40}
        decode.add("d", kv, params)
        decode.step()
        self.assertEqual(decode.requests["d"].state, "remote")
        started = time.monotonic()
        decode.abort("d")
        self.assertTrue(decode.run_until(lambda: not decode.held, max_steps=100))
        self.assertLess(time.monotonic() - started, 10.0)
        self.assertEqual(decode.load_errors, set())
        self.assert_free(decode)


class Compressed(WithDaemons):

    def test_within_budget_and_close_to_the_input(self):
        prefill, decode = self.engines(budget=0.4, passthrough="never", chunk_tokens=48)
        kv, rows, stats = self.transfer(prefill, decode, 120, seed=21)
        self.assertFalse(stats.passthrough.passthrough)
        self.assertLessEqual(stats.wire_bytes, 0.4 * stats.raw_bytes)
        self.assertGreater(stats.achieved_budget, 0.3)
        error = (rows.float() - kv.float()).norm() / kv.float().norm()
        self.assertLess(error, 0.1)

    def test_equals_the_codecs_own_encode_and_decode(self):
        """What the decode's blocks hold is exactly Decode(Encode(the same KV)) with the chunking
        the connector signalled (48-token prefill chunks, layers in order each step)."""
        prefill, decode = self.engines(budget=0.35, passthrough="never", chunk_tokens=48)
        kv, rows, stats = self.transfer(prefill, decode, 130, seed=23)
        transfer_id = prefill.requests["p23"].params["spectrumkv_transfer_id"]
        session = prefill.worker.session
        encoded = session.client.encode(kv.numpy().tobytes(), session.cache.dense_layout(130), 0.35,
                                        request_id=transfer_id, policy=session.settings.policy,
                                        stream_chunk_ends=[48, 96, 130])
        self.assertEqual(encoded.stats.wire_bytes, stats.wire_bytes)
        self.assertEqual(encoded.stats.achieved_budget, stats.achieved_budget)
        decoded = session.client.decode(encoded.segments)
        self.assertEqual(decoded.kept.mask, b"\x01" * 130)
        expected = torch.frombuffer(bytearray(decoded.kv), dtype=torch.float16).view(kv.shape)
        self.assertTrue(torch.equal(rows, expected))
        self.assertFalse(torch.equal(rows, kv))  # lossy: the comparison is not trivially passthrough

    def test_budget_below_the_no_drop_minimum_fails_over_to_recompute(self):
        prefill, decode = self.engines(budget=0.05, passthrough="never", receive_timeout_s=5.0)
        kv = vllm_driver.synthetic_kv(LAYERS, 60, HEADS, HEAD_DIM, 22)
        params = self.prefill(prefill, "p", kv)
        received = self.decode(decode, "d", kv, params)
        self.assertTrue(received.recomputed)
        self.assertTrue(torch.equal(kv, decode.rows("d")))


class StagingExpiry(WithDaemons):
    decode_flags = ("--early_segment_ttl_seconds=1",)

    def test_expired_staging_is_a_load_error(self):
        prefill, decode = self.engines(receive_timeout_s=3.0)
        kv = vllm_driver.synthetic_kv(LAYERS, 40, HEADS, HEAD_DIM, 31)
        params = self.prefill(prefill, "p", kv)
        time.sleep(2.5)
        received = self.decode(decode, "d", kv, params)
        self.assertTrue(received.recomputed)
        self.assertTrue(decode.load_errors)


class DaemonKilled(WithDaemons):

    def test_killed_prefill_daemon_fails_both_sides_without_hanging(self):
        prefill, decode = self.engines(chunk_tokens=16, receive_timeout_s=4.0)
        kv = vllm_driver.synthetic_kv(LAYERS, 96, HEADS, HEAD_DIM, 41)
        prefill.add("p", kv, {"do_remote_decode": True})
        prefill.step()
        transfer_id = prefill.scheduler._producing["p"].transfer_id
        params = {"do_remote_prefill": True, "spectrumkv_transfer_id": transfer_id, "spectrumkv_sender": "prefill",
                  "spectrumkv_tokens": 96}
        decode.add("d", kv, params)
        decode.step()
        self.pair.kill("prefill")
        started = time.monotonic()
        self.assertTrue(prefill.run_until(lambda: prefill.requests["p"].state == "finished"))
        self.assertTrue(prefill.run_until(lambda: not prefill.held), "blocks never released after the crash")
        self.assertTrue(decode.run_until(lambda: decode.requests["d"].state == "loaded"))
        self.assertTrue(decode.requests["d"].recomputed)
        self.assertTrue(decode.load_errors)
        self.assertTrue(torch.equal(kv, decode.rows("d")))
        self.assertLess(time.monotonic() - started, 30.0)


if __name__ == "__main__":
    unittest.main()
