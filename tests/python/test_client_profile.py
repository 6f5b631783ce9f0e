"""Client.register_model with a model profile, against two real daemons: from a message and from
a file, the hashes the daemons report, a transfer between daemons that disagree is refused, and a
transform-coded transfer (CodecPolicy.transform_coding) needs the profile and lands with it."""

import os
import random
import struct
import tempfile
import unittest

from daemons import DaemonPair
from spectrumkv import Client, SharedMemoryBuffer, SpectrumKVError, dense_layout, pb

LAYERS, HEADS, DIM, TOKENS = 2, 1, 8, 64


def identity_profile(calibration=""):
    heads = []
    for _ in range(LAYERS * HEADS):
        basis = lambda: pb.ComponentBasis(  # noqa: E731
            mean=[0.0] * DIM, variance=[float(DIM - i) for i in range(DIM)],
            basis=[1.0 if i == j else 0.0 for i in range(DIM) for j in range(DIM)])
        heads.append(pb.HeadProfile(keys=basis(), values=basis()))
    return pb.ModelProfile(format_version=1, layers=LAYERS, kv_heads=HEADS, head_dim=DIM,
                           rope=pb.RopeConvention(style=pb.RopeConvention.STYLE_INTERLEAVED, theta=10000.0),
                           heads=heads, calibration=calibration)


class RegisterWithProfile(unittest.TestCase):

    def test_a_profile_from_a_file_or_a_message_and_a_mismatch_refused(self):
        with DaemonPair() as daemons, Client.connect(daemons.address("prefill")) as prefill, \
                Client.connect(daemons.address("decode")) as decode:
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "model.skvprofile")
                with open(path, "wb") as f:
                    f.write(identity_profile().SerializeToString())
                from_file = decode.register_model("m", LAYERS, HEADS, DIM, profile=path)
            from_message = prefill.register_model("m", LAYERS, HEADS, DIM, profile=identity_profile())
            self.assertNotEqual(from_file.profile_hash, 0)
            self.assertEqual(from_file.compatibility_hash, from_message.compatibility_hash)

            other = prefill.register_model("m", LAYERS, HEADS, DIM, profile=identity_profile("other text"))
            self.assertNotEqual(other.compatibility_hash, from_file.compatibility_hash)
            size = LAYERS * 2 * TOKENS * HEADS * DIM * 2
            layout = dense_layout(LAYERS, HEADS, DIM, TOKENS)
            with SharedMemoryBuffer.create(size) as destination:
                received = decode.receive_async(7, "m", destination, layout, timeout_s=20.0)
                with self.assertRaises(SpectrumKVError) as refused:
                    prefill.send(7, "m", bytes(size), layout, "decode", 0.9,
                                 passthrough=pb.PASSTHROUGH_MODE_NEVER)
                self.assertIn("profile", str(refused.exception))
                with self.assertRaises(SpectrumKVError) as refused_there:
                    received.result(20)
                self.assertIn("profile", str(refused_there.exception))

            with self.assertRaises(SpectrumKVError) as bad:
                decode.register_model("m", LAYERS, HEADS, DIM + 8, profile=identity_profile())
            self.assertIn("profile.head_dim", str(bad.exception))

    def test_a_transform_coded_transfer_needs_the_profile_and_lands(self):
        size = LAYERS * 2 * TOKENS * HEADS * DIM * 2
        layout = dense_layout(LAYERS, HEADS, DIM, TOKENS)
        rng = random.Random(5)
        count = size // 2
        want = [rng.gauss(0.0, (DIM - i % DIM) ** 0.5) for i in range(count)]  # the profile's variances
        kv = struct.pack("<%de" % count, *want)
        coded = pb.CodecPolicy(transform_coding=True)
        with DaemonPair() as daemons, Client.connect(daemons.address("prefill")) as prefill, \
                Client.connect(daemons.address("decode")) as decode:
            prefill.register_model("m", LAYERS, HEADS, DIM)
            with self.assertRaises(SpectrumKVError) as refused:
                prefill.send(8, "m", kv, layout, "decode", 0.3, passthrough=pb.PASSTHROUGH_MODE_NEVER,
                             policy_override=coded)
            self.assertIn("transform_coding", str(refused.exception))

            for client in (prefill, decode):
                client.register_model("m", LAYERS, HEADS, DIM, profile=identity_profile())
            with SharedMemoryBuffer.create(size) as destination:
                received = decode.receive_async(9, "m", destination, layout, timeout_s=20.0)
                sent = prefill.send(9, "m", kv, layout, "decode", 0.6, passthrough=pb.PASSTHROUGH_MODE_NEVER,
                                    policy_override=coded)
                received.result(20)
                self.assertLessEqual(sent.stats.achieved_budget, 0.6)
                got = struct.unpack("<%de" % count, bytes(destination.buf[:size]))
            error = sum((a - b) ** 2 for a, b in zip(got, want))
            energy = sum(b * b for b in want)
            self.assertLess(error, 0.05 * energy)


if __name__ == "__main__":
    unittest.main()
