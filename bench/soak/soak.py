#!/usr/bin/python3
"""SpectrumKV soak driver: two real spectrumkvd daemons, many concurrent transfers, faults.

    /usr/bin/python3 bench/soak/soak.py --bin build/bin --stubs build/python \
        --duration 600 --concurrency 64 --kill-every 10 --garbage-rate 5

Starts a decode and a prefill daemon on loopback (fresh free ports, UCX over TCP on lo, a shared
token, each naming the other in --peers), registers one model on both, then for --duration
seconds keeps --concurrency transfers in flight. Each transfer picks a KV size, a budget, a dense
or paged (shuffled block table) destination, puts source and destination in POSIX shared memory,
calls Receive on the decode daemon (sender_daemon_id="prefill") and Send on the prefill daemon
with the same unique request id. Faults: CancelTransfer on either side mid-transfer for a
fraction of transfers, kill -9 of the decode daemon every --kill-every seconds (restarted on the
same ports), and garbage TCP connections to the decode daemon's data port.

Every transfer is checked: both calls must return within their deadlines (else LOST); exactly
one side OK is HALF-COMMITTED unless a kill of the decode daemon overlapped the transfer; when
both are OK a sampled fraction is compared with the decode daemon's stateless Encode+Decode of
the same source at the same budget (budget 1.0: byte for byte with the source), over the whole
destination extent (rows that must stay untouched must still be zero): a mismatch is CORRUPT.
The daemons' RSS, open fds and threads are sampled throughout.

Exit status: 0 = clean; 1 = something lost, half-committed (unexplained) or corrupt, or a daemon
crashed on its own (or failed to restart / to stop on SIGTERM); 2 = bad usage or set-up failure;
77 = the Python stubs or grpc/protobuf are missing (skip); 130 = interrupted.
"""

import argparse
import collections
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
SKIP = 77

# Model and workload shape. One token of the whole model (every layer, K and V) is
# LAYERS * 2 * KV_HEADS * HEAD_DIM * 2 bytes = 4 KiB, so the token counts below span 128 KiB..4 MiB.
# 32 tokens is the smallest count for which every budget below is feasible: under it the fixed
# headers and the FP16 sink tokens alone exceed b = 0.2 and Send answers OUT_OF_RANGE.
LAYERS, KV_HEADS, HEAD_DIM = 4, 4, 64
ROW_BYTES = KV_HEADS * HEAD_DIM * 2
TOKEN_CHOICES = (32, 100, 333, 1024)
BUDGET_CHOICES = (1.0, 0.5, 0.3, 0.2)
BLOCK_SIZES = (16, 32)
MODEL_NAME = "soak-%dx%dx%d-fp16" % (LAYERS, KV_HEADS, HEAD_DIM)
AUTH_TOKEN = "skv-soak-token"


def log(msg):
    sys.stderr.write("[soak %7.1f] %s\n" % (time.monotonic() - T_START, msg))
    sys.stderr.flush()


T_START = time.monotonic()


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", default=os.path.join(REPO, "build", "bin"),
                   help="directory holding spectrumkvd, or the binary itself (default: build/bin)")
    p.add_argument("--stubs", default=None,
                   help="directory holding the generated spectrumkv/v1 stubs (default: $SKV_PYTHON_STUBS "
                        "or build/python)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of traffic (default 60)")
    p.add_argument("--concurrency", type=int, default=16, help="transfers in flight (default 16)")
    p.add_argument("--kill-every", type=float, default=10.0,
                   help="seconds between kill -9 of the decode daemon; 0 = never (default 10)")
    p.add_argument("--garbage-rate", type=float, default=5.0,
                   help="garbage TCP connections per second to the decode data port; 0 = none (default 5)")
    p.add_argument("--cancel-fraction", type=float, default=0.1,
                   help="fraction of transfers cancelled mid-way on a random side (default 0.1)")
    p.add_argument("--verify-fraction", type=float, default=0.25,
                   help="fraction of compressed transfers checked against Encode+Decode; budget 1.0 "
                        "transfers are always checked byte for byte (default 0.25)")
    p.add_argument("--receive-timeout", type=float, default=30.0,
                   help="ReceiveRequest.timeout, seconds; the Receive call's gRPC deadline is 10 s more "
                        "(default 30)")
    p.add_argument("--send-deadline", type=float, default=60.0,
                   help="gRPC deadline of each Send, seconds (default 60)")
    p.add_argument("--restart-timeout", type=float, default=75.0,
                   help="seconds a restart of the decode daemon may take, retries included (its data port can "
                        "stay busy for a minute after kill -9, see README); then the run fails (default 75)")
    p.add_argument("--ucx-reuseaddr", action="store_true",
                   help="start the daemons with UCX_TCP_CM_REUSEADDR=y, so a restarted daemon can listen on "
                        "its data port at once")
    p.add_argument("--sample-every", type=float, default=2.0,
                   help="seconds between RSS/fd/thread samples (default 2)")
    p.add_argument("--log-dir", default=None, help="where the daemon logs go (default: a new /tmp/skv-soak.*)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--seed", type=int, default=1, help="seed of every random choice (default 1)")
    args = p.parse_args(argv)
    if args.duration <= 0 or args.concurrency < 1 or args.kill_every < 0 or args.garbage_rate < 0:
        p.error("--duration and --concurrency must be positive, --kill-every and --garbage-rate >= 0")
    if not (0 <= args.cancel_fraction <= 1 and 0 <= args.verify_fraction <= 1):
        p.error("--cancel-fraction and --verify-fraction are fractions in [0, 1]")
    if args.receive_timeout <= 0 or args.send_deadline <= 0 or args.sample_every <= 0:
        p.error("--receive-timeout, --send-deadline and --sample-every must be positive")
    return args


# ---- set-up checks (exit 77 = skip) -------------------------------------------------------------

def load_client(stubs):
    """Imports grpc and the client package with the stubs from `stubs`; exits 77 when missing."""
    if not os.path.isfile(os.path.join(stubs, "spectrumkv", "v1", "spectrumkv_pb2_grpc.py")):
        print("SKIP: no Python stubs in %s (build the skv_python_stubs target)" % stubs)
        sys.exit(SKIP)
    os.environ["SKV_PYTHON_STUBS"] = os.path.abspath(stubs)
    sys.path.insert(0, os.path.join(REPO, "client", "python"))
    try:
        import grpc  # noqa: F401
        import spectrumkv  # noqa: F401
    except ImportError as e:
        print("SKIP: %s cannot import grpc/protobuf/the stubs (Debian: python3-grpcio python3-protobuf): %s"
              % (sys.executable, e))
        sys.exit(SKIP)
    pb = spectrumkv.pb
    if "sender_daemon_id" not in pb.ReceiveRequest.DESCRIPTOR.fields_by_name:
        print("the stubs in %s predate ReceiveRequest.sender_daemon_id; rebuild skv_python_stubs" % stubs)
        sys.exit(2)
    return grpc, spectrumkv


# ---- registry of what this process created: cleaned on every exit path ---------------------------

class Registry:
    def __init__(self):
        self.lock = threading.Lock()
        self.procs = []          # subprocess.Popen
        self.shm = {}            # name -> SharedMemoryBuffer (open)
        self.channels = []

    def add_shm(self, buf):
        with self.lock:
            self.shm[buf.name] = buf

    def close_shm(self, buf):
        with self.lock:
            self.shm.pop(buf.name, None)
        buf.close()

    def cleanup(self):
        with self.lock:
            procs, self.procs = list(self.procs), []
            shm, self.shm = list(self.shm.values()), {}
            channels, self.channels = list(self.channels), []
        for p in procs:
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 8
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        for buf in shm:
            try:
                buf.close()
            except Exception:
                # Still mapped by a view: at least unlink the name.
                try:
                    os.unlink(os.path.join("/dev/shm", buf.name.lstrip("/")))
                except OSError:
                    pass
        for ch in channels:
            try:
                ch.close()
            except Exception:
                pass


REG = Registry()


# ---- daemons -------------------------------------------------------------------------------------

def free_ports(n):
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def read_proc(pid):
    """(rss_kib, fds, threads, rss_anon_kib) of `pid`, or None when it is gone. VmRSS includes the
    shared-memory KV objects the daemon keeps mapped (RssShmem); RssAnon is its own heap."""
    try:
        fields = {}
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "Threads", "RssAnon"):
                    fields[key] = int(value.split()[0])
        fds = len(os.listdir("/proc/%d/fd" % pid))
        if "VmRSS" not in fields or "Threads" not in fields:
            return None
        return fields["VmRSS"], fds, fields["Threads"], fields.get("RssAnon", 0)
    except (OSError, ValueError, IndexError):
        return None


def log_tail(path, lines=25):
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            return b"\n".join(f.read().splitlines()[-lines:]).decode("utf-8", "replace")
    except OSError:
        return ""


def scan_log(path):
    """Counts of notable lines in a daemon log."""
    counts = collections.Counter()
    try:
        with open(path, "rb") as f:
            for raw in f:
                line = raw.decode("utf-8", "replace")
                if "] [critical] " in line:
                    counts["critical"] += 1
                elif "] [error] " in line:
                    counts["error"] += 1
                elif "] [warning] " in line:
                    counts["warning"] += 1
                for marker in ("AddressSanitizer", "terminate called", "Segmentation fault", "Aborted",
                               "runtime error:", "LeakSanitizer"):
                    if marker in line:
                        counts[marker] += 1
    except OSError:
        pass
    return dict(counts)


class Daemon:
    """One spectrumkvd role; `lives` records every process started for it."""

    def __init__(self, name, binary, ports, peer, log_dir, env=None):
        self.name = name
        self.env = env
        self.binary = binary
        self.grpc_port, self.data_port, self.metrics_port = ports
        self.peer = peer  # "id=127.0.0.1:port"
        self.log_dir = log_dir
        self.lives = []  # dicts: proc, log, started, ended, killed, exit
        self.proc = None

    @property
    def grpc_target(self):
        return "127.0.0.1:%d" % self.grpc_port

    def command(self):
        cmd = [self.binary, "--daemon_id=" + self.name,
               "--grpc_listen_address=127.0.0.1:%d" % self.grpc_port,
               "--data_listen_address=127.0.0.1:%d" % self.data_port,
               "--metrics_listen_address=127.0.0.1:%d" % self.metrics_port,
               "--peers=" + self.peer, "--auth_token=" + AUTH_TOKEN,
               "--ucx_tls=tcp", "--ucx_net_devices=lo", "--shutdown_grace_seconds=2"]
        # The daemon dies with this driver's main thread even if the driver is killed -9.
        if os.path.exists("/usr/bin/setpriv"):
            cmd = ["/usr/bin/setpriv", "--pdeathsig", "KILL", "--"] + cmd
        return cmd

    def start(self, timeout=20.0):
        """Starts a new life and waits for its ready line; returns None or an error string."""
        path = os.path.join(self.log_dir, "%s-%d.log" % (self.name, len(self.lives) + 1))
        with open(path, "wb") as out:
            proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, env=self.env)
        with REG.lock:
            REG.procs.append(proc)
        life = {"proc": proc, "log": path, "started": time.monotonic(), "ended": None, "killed": False,
                "exit": None, "pid": proc.pid}
        self.lives.append(life)
        self.proc = proc
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                life["ended"] = time.monotonic()
                life["exit"] = proc.returncode
                life["start_failed"] = True
                return "%s exited at start with %s; log %s:\n%s" % (self.name, proc.returncode, path, log_tail(path))
            try:
                with open(path, "rb") as f:
                    if b"spectrumkvd ready" in f.read():
                        return None
            except OSError:
                pass
            time.sleep(0.05)
        life["start_failed"] = True
        proc.kill()
        proc.wait()
        life["ended"] = time.monotonic()
        life["exit"] = proc.returncode
        return "%s not ready after %.0f s; log %s" % (self.name, timeout, path)

    def kill9(self):
        life = self.lives[-1]
        life["killed"] = True
        try:
            self.proc.send_signal(signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        life["ended"] = time.monotonic()
        life["exit"] = self.proc.returncode

    def crashed(self):
        """The current life's exit status if it ended without the driver asking, else None."""
        life = self.lives[-1] if self.lives else None
        if life is None or life["killed"] or life.get("terminated") or life.get("start_failed") \
                or life.get("crash_reported"):
            return None
        rc = life["proc"].poll()
        if rc is None:
            return None
        life["crash_reported"] = True
        if life["ended"] is None:
            life["ended"] = time.monotonic()
            life["exit"] = rc
        return rc

    def terminate(self, timeout=15.0):
        """SIGTERM and wait; returns the exit status, or None if it had to be killed."""
        life = self.lives[-1]
        life["terminated"] = True
        if self.proc.poll() is not None:
            life["ended"] = time.monotonic()
            life["exit"] = self.proc.returncode
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
            rc = self.proc.returncode
        except subprocess.TimeoutExpired:
            self.proc.kill()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            rc = None
        life["ended"] = time.monotonic()
        life["exit"] = self.proc.returncode
        return rc


# ---- statistics helpers --------------------------------------------------------------------------

def percentile(values, q):
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(math.floor(k)), int(math.ceil(k))
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def slope_per_minute(points):
    """Least-squares slope of [(t_seconds, value)] in value per minute; None for < 3 points."""
    if len(points) < 3:
        return None
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    den = sum((t - mt) ** 2 for t, _ in points)
    if den <= 0:
        return None
    return 60.0 * sum((t - mt) * (v - mv) for t, v in points) / den


def code_name(code):
    return code.name if hasattr(code, "name") else str(code)


# ---- the soak ------------------------------------------------------------------------------------

class Soak:
    def __init__(self, args, grpc_mod, client_mod):
        self.args = args
        self.grpc = grpc_mod
        self.kv = client_mod
        self.pb = client_mod.pb
        self.stop = threading.Event()        # stop starting new transfers
        self.decode_up = threading.Event()   # the decode daemon is serving and has the model
        self.lock = threading.Lock()
        self.kills = 0                       # incremented just before each kill -9
        self.kill_times = []
        self.restarts = []                   # dicts: kill_at, ready_at, first_ok_at
        self.next_id = (random.Random(args.seed).getrandbits(24) + 1) << 32
        self.results = []                    # one dict per finished transfer
        self.inflight = 0
        self.garbage = collections.Counter()
        self.samples = {"prefill": [], "decode": []}  # (t, rss_kib, fds, threads, life, anon_kib)
        self.crashes = []
        self.problems = []                   # set-up / restart / shutdown problems (fatal)
        self.shutdown = {}
        self.clients = {}
        self.model_ids = {}
        self.pool = None
        self.t0 = None
        self.t_end = None

    # -- clients --
    def connect(self, daemon):
        opts = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20),
                ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000)]
        channel = self.grpc.insecure_channel(daemon.grpc_target, options=opts)
        with REG.lock:
            REG.channels.append(channel)
        client = self.kv.Client(channel, daemon.grpc_target, call_timeout=10.0, transfer_timeout=60.0)
        client.wait_until_serving(15.0)
        model = client.register_model(MODEL_NAME, LAYERS, KV_HEADS, HEAD_DIM)
        with self.lock:
            self.clients[daemon.name] = client
            self.model_ids[daemon.name] = model.model_id
        return model

    # -- source data: synthetic FP16 KV, generated once, rotated per transfer --
    def make_pool(self):
        tokens = max(TOKEN_CHOICES)
        layout = self.kv.dense_layout(LAYERS, KV_HEADS, HEAD_DIM, tokens)
        buf = bytearray(self.kv.dense_layout_bytes(layout))
        self.kv.fill_synthetic_kv(buf, layout, seed=self.args.seed)
        self.pool = memoryview(bytes(buf) * 2)
        self.pool_len = len(buf)

    # -- layouts --
    def dst_layout(self, rng, tokens, paged):
        pb = self.pb
        if not paged:
            layout = self.kv.dense_layout(LAYERS, KV_HEADS, HEAD_DIM, tokens)
            return layout, self.kv.dense_layout_bytes(layout), None
        bs = rng.choice(BLOCK_SIZES)
        need = -(-tokens // bs)
        num_blocks = need + rng.randrange(0, 9)
        ids = rng.sample(range(num_blocks), need)  # distinct, shuffled
        block_stride = bs * ROW_BYTES
        pool_bytes = num_blocks * block_stride
        k_off = [l * 2 * pool_bytes for l in range(LAYERS)]
        v_off = [o + pool_bytes for o in k_off]
        paged_layout = pb.PagedKvLayout(block_size=bs, num_blocks=num_blocks, block_ids=ids,
                                        k_pool_offset_bytes=k_off, v_pool_offset_bytes=v_off)
        layout = pb.KvLayout(dtype=pb.DTYPE_FP16, layers=LAYERS, kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                             tokens=tokens, paged=paged_layout)
        return layout, LAYERS * 2 * pool_bytes, (bs, ids, block_stride, k_off, v_off)

    @staticmethod
    def scatter(dense, tokens, extent, paging):
        """The expected destination: `dense` ([layers][K,V][tokens][row]) placed into a zeroed extent."""
        if paging is None:
            return bytes(dense)
        bs, ids, block_stride, k_off, v_off = paging
        out = bytearray(extent)
        mv = memoryview(dense)
        for l in range(LAYERS):
            for s, pools in ((0, k_off), (1, v_off)):
                base = (l * 2 + s) * tokens * ROW_BYTES
                for i, block in enumerate(ids):
                    t0 = i * bs
                    n = min(bs, tokens - t0)
                    if n <= 0:
                        break
                    at = pools[l] + block * block_stride
                    out[at:at + n * ROW_BYTES] = mv[base + t0 * ROW_BYTES: base + (t0 + n) * ROW_BYTES]
        return bytes(out)

    # -- one transfer --
    def one_transfer(self, rng, worker):
        pb, grpc = self.pb, self.grpc
        args = self.args
        while not self.decode_up.wait(0.5):
            if self.stop.is_set():
                return
        with self.lock:
            self.next_id += 1
            rid = self.next_id
            decode_client, prefill_client = self.clients["decode"], self.clients["prefill"]
            decode_model, prefill_model = self.model_ids["decode"], self.model_ids["prefill"]
            kills_before = self.kills
        tokens = rng.choice(TOKEN_CHOICES)
        budget = rng.choice(BUDGET_CHOICES)
        paged = rng.random() < 0.5
        cancel_side = None
        if rng.random() < args.cancel_fraction:
            cancel_side = rng.choice(("sender", "receiver"))
        cancel_delay = rng.uniform(0.0, 0.02 + tokens * 2e-5 * (1 + args.concurrency / 8.0))
        receive_first = rng.random() < 0.7
        gap = rng.uniform(0.0, 0.02)
        verify = budget >= 1.0 or rng.random() < args.verify_fraction

        src_layout = self.kv.dense_layout(LAYERS, KV_HEADS, HEAD_DIM, tokens)
        src_size = self.kv.dense_layout_bytes(src_layout)
        layout, dst_size, paging = self.dst_layout(rng, tokens, paged)
        rec = {"id": rid, "worker": worker, "tokens": tokens, "bytes": src_size, "budget": budget,
               "layout": "paged" if paged else "dense", "order": "recv-first" if receive_first else "send-first",
               "cancel": cancel_side, "t0": time.monotonic() - self.t0}
        src = self.kv.SharedMemoryBuffer.create(src_size)
        REG.add_shm(src)
        try:
            dst = self.kv.SharedMemoryBuffer.create(dst_size)
        except BaseException:
            REG.close_shm(src)
            raise
        REG.add_shm(dst)
        lost = False
        try:
            off = rng.randrange(0, self.pool_len // (HEAD_DIM * 2)) * HEAD_DIM * 2
            src.buf[:] = self.pool[off:off + src_size]

            recv_req = pb.ReceiveRequest(request_id=rid, model_id=decode_model, destination=dst.handle(),
                                         destination_layout=layout, sender_daemon_id="prefill")
            recv_req.timeout.FromNanoseconds(int(args.receive_timeout * 1e9))
            send_req = pb.SendRequest(request_id=rid, model_id=prefill_model, source=src.handle(),
                                      source_layout=src_layout, peer=pb.PeerRef(daemon_id="decode"), budget=budget,
                                      passthrough=pb.PASSTHROUGH_MODE_AUTO if budget >= 1.0
                                      else pb.PASSTHROUGH_MODE_NEVER)
            recv_deadline = args.receive_timeout + 10.0
            send_deadline = args.send_deadline
            calls = {}

            done_at = {}

            def start(side):
                t = time.monotonic()
                if side == "recv":
                    fut = decode_client.stub.Receive.future(recv_req, timeout=recv_deadline)
                else:
                    fut = prefill_client.stub.Send.future(send_req, timeout=send_deadline)
                calls[side] = (t, fut)
                # When the call completed (not when this thread got round to looking at it).
                fut.add_done_callback(lambda _f, side=side: done_at.setdefault(side, time.monotonic()))

            first, second = ("recv", "send") if receive_first else ("send", "recv")
            start(first)
            time.sleep(gap)
            start(second)

            if cancel_side is not None:
                time.sleep(cancel_delay)
                client = prefill_client if cancel_side == "sender" else decode_client
                role = pb.TRANSFER_ROLE_SENDER if cancel_side == "sender" else pb.TRANSFER_ROLE_RECEIVER
                try:
                    client.cancel_transfer(rid, role)
                    rec["cancel_result"] = "OK"
                except self.kv.SpectrumKVError as e:
                    rec["cancel_result"] = code_name(e.code)
                rec["cancel_at"] = time.monotonic() - calls["send"][0]

            outcome = {}
            for side, deadline in (("send", send_deadline), ("recv", recv_deadline)):
                started, fut = calls[side]
                # gRPC enforces `deadline` on the client; the extra 10 s only catches a stuck client.
                remaining = started + deadline + 10.0 - time.monotonic()
                try:
                    resp = fut.result(timeout=max(0.0, remaining))
                    outcome[side] = ("OK", done_at.get(side, time.monotonic()) - started, resp, "")
                except grpc.FutureTimeoutError:
                    outcome[side] = ("LOST", time.monotonic() - started, None, "no answer from the client library")
                    fut.cancel()
                except grpc.RpcError as e:
                    elapsed = done_at.get(side, time.monotonic()) - started
                    code = code_name(e.code())
                    # The daemon did not answer: gRPC's own deadline fired on this side.
                    if code == "DEADLINE_EXCEEDED" and elapsed >= deadline - 0.05:
                        outcome[side] = ("LOST", elapsed, None, "gRPC deadline %.0f s passed: %s" % (deadline, e.details()))
                    else:
                        outcome[side] = (code, elapsed, None, e.details() or "")
            rec["end"] = time.monotonic() - self.t0
            with self.lock:
                kills_after = self.kills
            rec["kill_overlap"] = kills_after != kills_before
            s_code, s_time, s_resp, s_msg = outcome["send"]
            r_code, r_time, r_resp, r_msg = outcome["recv"]
            rec.update(send=s_code, recv=r_code, send_s=s_time, recv_s=r_time)
            if s_code != "OK":
                rec["send_msg"] = s_msg[:300]
            if r_code != "OK":
                rec["recv_msg"] = r_msg[:300]
            lost = "LOST" in (s_code, r_code)
            if lost:
                rec["verdict"] = "lost"
            elif s_code == "OK" and r_code == "OK":
                rec["verdict"] = "ok"
                if s_resp.stats.passthrough.passthrough:
                    rec["passthrough"] = True
                if verify:
                    self.verify(rec, src, dst, src_layout, layout, dst_size, paging, budget, s_resp, r_resp,
                                decode_client)
            elif s_code == "OK" or r_code == "OK":
                rec["verdict"] = "half_committed_kill" if rec["kill_overlap"] else "half_committed"
            elif cancel_side is not None:
                rec["verdict"] = "cancelled"
            else:
                rec["verdict"] = "failed"
        finally:
            if lost:
                pass  # a call may still use the buffers: they stay until the final cleanup
            else:
                REG.close_shm(src)
                REG.close_shm(dst)
        with self.lock:
            self.results.append(rec)
            if rec["verdict"] == "ok" and self.restarts and self.restarts[-1].get("first_ok_at") is None \
                    and self.restarts[-1].get("ready_at") is not None \
                    and rec["t0"] + self.t0 >= self.restarts[-1]["ready_at"]:
                self.restarts[-1]["first_ok_at"] = time.monotonic()
        if rec["verdict"] in ("lost", "half_committed", "corrupt"):
            log("%s: %s" % (rec["verdict"].upper(), json.dumps(rec, sort_keys=True)))

    def verify(self, rec, src, dst, src_layout, layout, dst_size, paging, budget, s_resp, r_resp, decode_client):
        got = dst.read()
        if budget >= 1.0 or s_resp.stats.passthrough.passthrough:
            expected = self.scatter(src.read(), rec["tokens"], dst_size, paging)
            expected_mask = None
            rec["check"] = "bytes"
        else:
            planned = s_resp.stats.passthrough.planned_budget or budget
            with self.lock:  # the decode daemon now serving (it may have restarted since)
                decode_client = self.clients["decode"]
            try:
                enc = decode_client.encode(src.read(), src_layout, planned, request_id=rec["id"])
                dec = decode_client.decode(enc.segments)
            except self.kv.SpectrumKVError as e:
                rec["check"] = "skipped: %s" % code_name(e.code)
                return
            expected = self.scatter(dec.kv, rec["tokens"], dst_size, paging)
            expected_mask = (dec.kept.layers, dec.kept.tokens, dec.kept.mask)
            rec["check"] = "codec"
        problems = []
        if got != expected:
            diff = next(i for i in range(len(got)) if got[i] != expected[i])
            problems.append("destination differs from the expected bytes first at offset %d of %d" % (diff, len(got)))
        if expected_mask is not None:
            m = r_resp.kept
            if (m.layers, m.tokens, m.mask) != expected_mask:
                problems.append("kept mask differs from Decode's")
        elif r_resp.kept.mask and set(r_resp.kept.mask) != {1}:
            problems.append("passthrough transfer reports dropped tokens")
        if problems:
            rec["verdict"] = "corrupt"
            rec["corrupt"] = "; ".join(problems)

    def worker(self, index):
        rng = random.Random(self.args.seed * 1000003 + index)
        while not self.stop.is_set():
            with self.lock:
                self.inflight += 1
            try:
                self.one_transfer(rng, index)
            except Exception as e:  # a driver bug must not hide as a quiet thread death
                log("worker %d: driver error: %r" % (index, e))
                with self.lock:
                    self.results.append({"verdict": "driver_error", "error": repr(e)})
                time.sleep(0.2)
            finally:
                with self.lock:
                    self.inflight -= 1

    def garbage_loop(self, port):
        rate = self.args.garbage_rate
        rng = random.Random(self.args.seed * 7919)
        next_at = time.monotonic()
        while not self.stop.is_set():
            next_at += 1.0 / rate
            delay = next_at - time.monotonic()
            if delay > 0:
                self.stop.wait(delay)
            if self.stop.is_set():
                break
            payload = rng.randbytes(rng.randrange(1024, 8 * 1024))
            s = socket.socket()
            s.settimeout(1.0)
            try:
                s.connect(("127.0.0.1", port))
                self.garbage["connected"] += 1
                s.sendall(payload)
                self.garbage["bytes"] += len(payload)
            except ConnectionRefusedError:
                self.garbage["refused"] += 1
            except OSError:
                self.garbage["errors"] += 1
            finally:
                s.close()

    def sample(self, daemons):
        now = time.monotonic() - self.t0
        for d in daemons:
            life = len(d.lives)
            v = read_proc(d.proc.pid) if d.proc.poll() is None else None
            if v is not None:
                self.samples[d.name].append((now, v[0], v[1], v[2], life, v[3]))

    # -- the run --
    def run(self, binary, log_dir):
        args = self.args
        ports = free_ports(6)
        env = dict(os.environ)
        if args.ucx_reuseaddr:
            env["UCX_TCP_CM_REUSEADDR"] = "y"
        decode = Daemon("decode", binary, ports[0:3], "prefill=127.0.0.1:%d" % ports[4], log_dir, env)
        prefill = Daemon("prefill", binary, ports[3:6], "decode=127.0.0.1:%d" % ports[1], log_dir, env)
        self.daemons = (decode, prefill)
        log("daemon logs: %s" % log_dir)
        for d in (decode, prefill):
            err = d.start()
            if err:
                self.problems.append("start: " + err)
                return
        log("decode pid %d (grpc %d, data %d), prefill pid %d (grpc %d, data %d)" % (
            decode.proc.pid, decode.grpc_port, decode.data_port, prefill.proc.pid, prefill.grpc_port,
            prefill.data_port))
        self.make_pool()
        try:
            for d in (decode, prefill):
                self.connect(d)
        except self.kv.SpectrumKVError as e:
            self.problems.append("connect/register: %s" % e)
            return
        self.t0 = time.monotonic()
        self.sample(self.daemons)
        self.decode_up.set()
        threads = [threading.Thread(target=self.worker, args=(i,), name="soak-%d" % i, daemon=True)
                   for i in range(args.concurrency)]
        if args.garbage_rate > 0:
            threads.append(threading.Thread(target=self.garbage_loop, args=(decode.data_port,), name="garbage",
                                            daemon=True))
        for t in threads:
            t.start()
        log("running %.0f s: concurrency %d, kill every %s, garbage %.1f/s" % (
            args.duration, args.concurrency, ("%.0f s" % args.kill_every) if args.kill_every else "never",
            args.garbage_rate))
        end = self.t0 + args.duration
        next_sample = self.t0 + args.sample_every
        next_kill = self.t0 + args.kill_every if args.kill_every > 0 else float("inf")
        next_report = self.t0 + 10
        try:
            while time.monotonic() < end and not self.problems:
                now = time.monotonic()
                if now >= next_sample:
                    self.sample(self.daemons)
                    next_sample += args.sample_every
                for d in self.daemons:
                    rc = d.crashed()
                    if rc is not None:
                        self.crashes.append({"daemon": d.name, "life": len(d.lives), "exit": rc, "log": d.lives[-1]["log"],
                                             "at_s": now - self.t0, "tail": log_tail(d.lives[-1]["log"])})
                        log("CRASH: %s (pid %d) exited with %s on its own; log %s" % (
                            d.name, d.proc.pid, rc, d.lives[-1]["log"]))
                if self.crashes:
                    break
                if now >= next_kill and now < end - 1.0:
                    self.kill_and_restart(decode)
                    next_kill = time.monotonic() + args.kill_every
                    continue
                if now >= next_report:
                    with self.lock:
                        c = collections.Counter(r["verdict"] for r in self.results)
                    log("%d transfers: %s; decode life %d" % (sum(c.values()), dict(c), len(decode.lives)))
                    next_report += 10
                time.sleep(max(0.01, min(next_sample, next_kill, end, next_report) - time.monotonic()))
        finally:
            self.stop.set()
            self.t_end = time.monotonic()
        # Drain: each transfer is bounded by its deadlines (+10 s client slack).
        drain_until = time.monotonic() + max(args.send_deadline, args.receive_timeout + 10) + 15
        for t in threads:
            t.join(timeout=max(0.0, drain_until - time.monotonic()))
        stuck = [t.name for t in threads if t.is_alive()]
        if stuck:
            self.problems.append("threads still running after the drain: %s" % ", ".join(stuck))
        self.sample(self.daemons)
        for d in self.daemons:
            rc = d.crashed()
            if rc is not None:
                self.crashes.append({"daemon": d.name, "life": len(d.lives), "exit": rc, "log": d.lives[-1]["log"],
                                     "at_s": time.monotonic() - self.t0, "tail": log_tail(d.lives[-1]["log"])})
        # SIGTERM both at once; each gets 10 s (its shutdown grace is 2 s, gRPC's 2 s more).
        running = [d for d in self.daemons if d.lives[-1]["ended"] is None]
        started = time.monotonic()
        for d in running:
            d.lives[-1]["terminated"] = True
            d.proc.send_signal(signal.SIGTERM)
        for d in running:
            rc = d.terminate(timeout=max(0.1, started + 10.0 - time.monotonic()))
            self.shutdown[d.name] = {"exit": rc, "seconds": round(time.monotonic() - started, 2)}
            if rc != 0:
                self.problems.append("%s did not stop cleanly on SIGTERM: exit %s; log %s" % (
                    d.name, "killed after 10 s" if rc is None else rc, d.lives[-1]["log"]))

    def kill_and_restart(self, decode):
        with self.lock:
            self.decode_up.clear()
            self.kills += 1
        kill_at = time.monotonic()
        self.kill_times.append(kill_at - self.t0)
        rec = {"kill_at": kill_at}
        self.restarts.append(rec)
        pid = decode.proc.pid
        decode.kill9()
        if decode.proc.returncode != -signal.SIGKILL:
            self.crashes.append({"daemon": "decode", "life": len(decode.lives), "exit": decode.proc.returncode,
                                 "log": decode.lives[-1]["log"], "at_s": kill_at - self.t0,
                                 "tail": log_tail(decode.lives[-1]["log"]),
                                 "note": "had already exited before the kill"})
        self.sample(self.daemons)
        # The data port can stay busy after kill -9 (the old connections' sockets linger in
        # FIN_WAIT2/TIME_WAIT and the listener does not set SO_REUSEADDR): retry, bounded.
        err = None
        attempts = 0
        give_up = kill_at + self.args.restart_timeout
        while True:
            attempts += 1
            err = decode.start()
            if err is None or time.monotonic() >= give_up:
                break
            if "Device is busy" in err or "Address already in use" in err:
                rec["port_busy"] = True
            self.sample(self.daemons[1:])
            time.sleep(0.5)
        rec["attempts"] = attempts
        if err is None:
            try:
                self.connect(decode)
            except self.kv.SpectrumKVError as e:
                err = "register after restart: %s" % e
        if err:
            self.problems.append("decode restart after kill %d failed: %s" % (self.kills, err))
            return
        rec["ready_at"] = time.monotonic()
        log("killed decode pid %d, restarted as pid %d in %.2f s (%d start%s)" % (
            pid, decode.proc.pid, rec["ready_at"] - kill_at, attempts, "" if attempts == 1 else "s"))
        self.sample(self.daemons)
        self.decode_up.set()

    # -- report --
    def summary(self, log_dir):
        args = self.args
        res = [r for r in self.results if "verdict" in r]
        verdicts = collections.Counter(r["verdict"] for r in res)
        failed_codes = collections.Counter()
        failed_nokill = collections.Counter()
        cancelled_codes = collections.Counter()
        for r in res:
            key = "send=%s recv=%s" % (r.get("send"), r.get("recv"))
            if r["verdict"] == "failed":
                failed_codes[key] += 1
                if not r.get("kill_overlap"):
                    failed_nokill[key] += 1
            elif r["verdict"] == "cancelled":
                cancelled_codes[key] += 1
        send_lat = [r["send_s"] for r in res if r.get("send") == "OK"]
        recv_lat = [r["recv_s"] for r in res if r.get("recv") == "OK"]
        lat_by_tokens = {}
        for t in TOKEN_CHOICES:
            v = [r["send_s"] for r in res if r.get("send") == "OK" and r["tokens"] == t]
            lat_by_tokens[str(t)] = {"n": len(v), "p50_s": percentile(v, 0.5), "p99_s": percentile(v, 0.99)}
        checks = collections.Counter(r.get("check", "none") for r in res if r["verdict"] in ("ok", "corrupt"))
        ok_bytes = sum(r["bytes"] for r in res if r["verdict"] == "ok")
        duration = (self.t_end - self.t0) if self.t0 and self.t_end else 0.0
        cancels = [r for r in res if r.get("cancel")]
        # CancelTransfer on one side should end the other side's call CANCELLED too.
        not_propagated = collections.Counter(
            "%s cancelled, other side %s" % (r["cancel"], r["recv"] if r["cancel"] == "sender" else r["send"])
            for r in res if r["verdict"] == "cancelled" and r.get("cancel_result") == "OK"
            and (r["recv"] if r["cancel"] == "sender" else r["send"]) != "CANCELLED")
        procs = {}

        def point(x):
            return {"rss_mib": round(x[1] / 1024, 1), "fds": x[2], "threads": x[3], "anon_mib": round(x[5] / 1024, 1)}

        for name in ("prefill", "decode"):
            s = self.samples[name]
            entry = {"samples": len(s)}
            if s:
                entry["start"] = point(s[0])
                entry["end"] = point(s[-1])
                entry["max"] = {"rss_mib": round(max(x[1] for x in s) / 1024, 1), "fds": max(x[2] for x in s),
                                "threads": max(x[3] for x in s), "anon_mib": round(max(x[5] for x in s) / 1024, 1)}
                # Slopes over the samples taken while the traffic ran (not the drain after it).
                traffic = [x for x in s if x[0] <= duration + 0.5] or s
                if name == "prefill":
                    span = traffic
                    entry["slope_over"] = "whole run (%.0f s, %d samples)" % (span[-1][0] - span[0][0], len(span))
                else:
                    lives = collections.defaultdict(list)
                    for x in traffic:
                        lives[x[4]].append(x)
                    best = max(lives.values(), key=lambda v: (v[-1][0] - v[0][0], len(v)))
                    span = best
                    entry["slope_over"] = "life %d (%.0f s, %d samples)" % (best[0][4], best[-1][0] - best[0][0], len(best))
                    entry["lives"] = len(self.daemons[0].lives) if hasattr(self, "daemons") else 1
                    entry["life_used"] = {"start": point(best[0]), "end": point(best[-1])}
                entry["slope_per_min"] = {
                    "rss_mib": slope_per_minute([(x[0], x[1] / 1024) for x in span]),
                    "fds": slope_per_minute([(x[0], x[2]) for x in span]),
                    "threads": slope_per_minute([(x[0], x[3]) for x in span]),
                    "anon_mib": slope_per_minute([(x[0], x[5] / 1024) for x in span])}
            procs[name] = entry
        restart_s = [r["ready_at"] - r["kill_at"] for r in self.restarts if r.get("ready_at")]
        first_ok_s = [r["first_ok_at"] - r["ready_at"] for r in self.restarts if r.get("first_ok_at")]
        logs = {}
        if hasattr(self, "daemons"):
            for d in self.daemons:
                total = collections.Counter()
                failed = collections.Counter()
                for life in d.lives:
                    (failed if life.get("start_failed") else total).update(scan_log(life["log"]))
                logs[d.name] = {"lives": sum(1 for x in d.lives if not x.get("start_failed")),
                                "failed_starts": sum(1 for x in d.lives if x.get("start_failed")),
                                "lines": dict(total), "failed_start_lines": dict(failed)}
        half = [r for r in res if r["verdict"] == "half_committed"]
        out = {
            "config": {"duration_s": args.duration, "concurrency": args.concurrency, "kill_every_s": args.kill_every,
                       "ucx_reuseaddr": args.ucx_reuseaddr, "restart_timeout_s": args.restart_timeout,
                       "garbage_rate_per_s": args.garbage_rate, "cancel_fraction": args.cancel_fraction,
                       "verify_fraction": args.verify_fraction, "receive_timeout_s": args.receive_timeout,
                       "send_deadline_s": args.send_deadline, "seed": args.seed,
                       "model": {"layers": LAYERS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM},
                       "tokens": list(TOKEN_CHOICES), "budgets": list(BUDGET_CHOICES)},
            "run_s": round(duration, 1),
            "transfers": len(res),
            "ok": verdicts["ok"],
            "failed": verdicts["failed"],
            "failed_by_code": dict(failed_codes),
            "failed_without_kill_by_code": dict(failed_nokill),
            "cancelled": verdicts["cancelled"],
            "cancelled_by_code": dict(cancelled_codes),
            "cancel_requested": len(cancels),
            "cancel_too_late_both_ok": sum(1 for r in cancels if r["verdict"] == "ok"),
            "cancel_result": dict(collections.Counter(r.get("cancel_result") for r in cancels)),
            "cancel_not_propagated": dict(not_propagated),
            "lost": verdicts["lost"],
            "half_committed": verdicts["half_committed"],
            "half_committed_explained_by_kill": verdicts["half_committed_kill"],
            "corrupt": verdicts["corrupt"],
            "driver_errors": verdicts["driver_error"],
            "checks": dict(checks),
            "ok_per_s": round(verdicts["ok"] / duration, 2) if duration else None,
            "ok_mib_per_s": round(ok_bytes / duration / 2 ** 20, 2) if duration else None,
            "send_latency_s": {"n": len(send_lat), "p50": percentile(send_lat, 0.5), "p99": percentile(send_lat, 0.99),
                               "max": max(send_lat) if send_lat else None},
            "receive_latency_s": {"n": len(recv_lat), "p50": percentile(recv_lat, 0.5),
                                  "p99": percentile(recv_lat, 0.99)},
            "send_latency_by_tokens": lat_by_tokens,
            "kills": self.kills,
            "restart_s": {"mean": (sum(restart_s) / len(restart_s)) if restart_s else None,
                          "max": max(restart_s) if restart_s else None,
                          "all": [round(x, 2) for x in restart_s]},
            "restarts_port_busy": sum(1 for r in self.restarts if r.get("port_busy")),
            "decode_down_s": round(sum(r["ready_at"] - r["kill_at"] for r in self.restarts if r.get("ready_at")), 1),
            "restart_start_attempts": sum(r.get("attempts", 0) for r in self.restarts),
            "first_ok_after_restart_s": {"mean": (sum(first_ok_s) / len(first_ok_s)) if first_ok_s else None,
                                         "max": max(first_ok_s) if first_ok_s else None,
                                         "restarts_without_ok": len(restart_s) - len(first_ok_s)},
            "garbage": dict(self.garbage),
            "processes": procs,
            "crashes": self.crashes,
            "shutdown": self.shutdown,
            "problems": self.problems,
            "log_lines": logs,
            "log_dir": log_dir,
            "examples": {
                "lost": [r for r in res if r["verdict"] == "lost"][:5],
                "half_committed": half[:5],
                "half_committed_kill": [r for r in res if r["verdict"] == "half_committed_kill"][:3],
                "corrupt": [r for r in res if r["verdict"] == "corrupt"][:5],
                "failed_without_kill": [r for r in res if r["verdict"] == "failed" and not r.get("kill_overlap")][:5],
            },
        }
        out["pass"] = not (out["lost"] or out["half_committed"] or out["corrupt"] or self.crashes or self.problems
                           or out["driver_errors"])
        return out


def fmt(v, spec="%.3f"):
    return "-" if v is None else spec % v


def print_table(s):
    w = sys.stdout.write
    c = s["config"]
    w("SpectrumKV soak: %.0f s, concurrency %d, kill -9 decode every %s, garbage %.1f conn/s, cancel %.0f%%, "
      "seed %d%s\n" % (s["run_s"], c["concurrency"], ("%.0f s" % c["kill_every_s"]) if c["kill_every_s"] else "never",
                       c["garbage_rate_per_s"], 100 * c["cancel_fraction"], c["seed"],
                       ", UCX_TCP_CM_REUSEADDR=y" if c["ucx_reuseaddr"] else ""))
    if s["kills"]:
        w("decode daemon down (kill -> serving again) %.1f s of the %.0f s\n" % (s["decode_down_s"], s["run_s"]))
    w("\n%-40s %10s\n" % ("transfers", s["transfers"]))
    w("%-40s %10d   (%s/s, %s MiB/s)\n" % ("ok (both sides OK)", s["ok"], s["ok_per_s"], s["ok_mib_per_s"]))
    w("%-40s %10s\n" % ("  checked", ", ".join("%s %d" % kv for kv in sorted(s["checks"].items())) or "-"))
    w("%-40s %10d\n" % ("failed (both sides failed)", s["failed"]))
    for k, v in sorted(s["failed_by_code"].items(), key=lambda kv: -kv[1]):
        w("    %-52s %6d  (%d without a kill)\n" % (k, v, s["failed_without_kill_by_code"].get(k, 0)))
    w("%-40s %10d   (of %d cancels requested; %d too late, both OK)\n" % (
        "cancelled", s["cancelled"], s["cancel_requested"], s["cancel_too_late_both_ok"]))
    for k, v in sorted(s["cancelled_by_code"].items(), key=lambda kv: -kv[1]):
        w("    %-52s %6d\n" % (k, v))
    for k, v in sorted(s["cancel_not_propagated"].items(), key=lambda kv: -kv[1]):
        w("    not propagated: %-36s %6d\n" % (k, v))
    w("%-40s %10d\n" % ("LOST (no answer within the deadline)", s["lost"]))
    w("%-40s %10d\n" % ("HALF-COMMITTED (unexplained)", s["half_committed"]))
    w("%-40s %10d\n" % ("half-committed, explained by a kill", s["half_committed_explained_by_kill"]))
    w("%-40s %10d\n" % ("CORRUPT", s["corrupt"]))
    if s["driver_errors"]:
        w("%-40s %10d\n" % ("driver errors", s["driver_errors"]))
    sl, rl = s["send_latency_s"], s["receive_latency_s"]
    w("\nSend latency (OK sends, n=%d): p50 %s s, p99 %s s, max %s s\n" % (sl["n"], fmt(sl["p50"]), fmt(sl["p99"]),
                                                                        fmt(sl["max"])))
    for t, v in s["send_latency_by_tokens"].items():
        w("    %5s tokens (%5.0f KiB): n=%5d  p50 %s s  p99 %s s\n" % (
            t, int(t) * LAYERS * 2 * ROW_BYTES / 1024, v["n"], fmt(v["p50_s"]), fmt(v["p99_s"])))
    w("Receive latency (OK receives, n=%d): p50 %s s, p99 %s s\n" % (rl["n"], fmt(rl["p50"]), fmt(rl["p99"])))
    w("kills %d; restart (kill -> serving + registered) mean %s s, max %s s; first OK transfer after restart "
      "mean %s s, max %s s (%d restarts without one)\n" % (
          s["kills"], fmt(s["restart_s"]["mean"], "%.2f"), fmt(s["restart_s"]["max"], "%.2f"),
          fmt(s["first_ok_after_restart_s"]["mean"], "%.2f"), fmt(s["first_ok_after_restart_s"]["max"], "%.2f"),
          s["first_ok_after_restart_s"]["restarts_without_ok"]))
    if s["restarts_port_busy"]:
        w("  %d of %d restarts found the data port busy (\"Device is busy\") and needed %d starts in all; "
          "slowest %.1f s\n" % (s["restarts_port_busy"], s["kills"], s["restart_start_attempts"],
                                s["restart_s"]["max"] or 0))
    g = s["garbage"]
    w("garbage connections: %d connected (%d KiB), %d refused, %d errors\n" % (
        g.get("connected", 0), g.get("bytes", 0) // 1024, g.get("refused", 0), g.get("errors", 0)))
    w("\n%-8s %-6s %10s %10s %10s %10s   %s\n" % ("daemon", "", "RSS MiB", "fds", "threads", "anon MiB", ""))
    for name in ("prefill", "decode"):
        p = s["processes"].get(name, {})
        if "start" not in p:
            w("%-8s no samples\n" % name)
            continue
        rows = [("start", p["start"], ""), ("end", p["end"], ""), ("max", p["max"], "")]
        if name == "decode":
            rows = [("start", p["start"], "(first life)"), ("end", p["end"], "(last life)"), ("max", p["max"], "")]
            rows.append(("life s", p["life_used"]["start"], "longest life, start"))
            rows.append(("life e", p["life_used"]["end"], "longest life, end"))
        for label, v, note in rows:
            w("%-8s %-6s %10.1f %10d %10d %10.1f   %s\n" % (name, label, v["rss_mib"], v["fds"], v["threads"],
                                                       v["anon_mib"], note))
        sp = p["slope_per_min"]
        w("%-8s %-6s %10s %10s %10s %10s   per minute, least squares over %s\n" % (
            name, "slope", fmt(sp["rss_mib"], "%+.2f"), fmt(sp["fds"], "%+.1f"), fmt(sp["threads"], "%+.2f"),
            fmt(sp["anon_mib"], "%+.2f"), p["slope_over"]))
    for c in s["crashes"]:
        w("\nCRASH: %s life %d exited with %s at %.1f s on its own; log %s\n%s\n" % (
            c["daemon"], c["life"], c["exit"], c["at_s"], c["log"], c["tail"]))
    for p in s["problems"]:
        w("\nPROBLEM: %s\n" % p)
    for kind in ("lost", "half_committed", "corrupt"):
        for r in s["examples"][kind]:
            w("%s: %s\n" % (kind.upper(), json.dumps(r, sort_keys=True)))
    for name, v in sorted(s["log_lines"].items()):
        w("%s log lines: %s over %d li%s%s\n" % (
            name, ", ".join("%s %d" % kv for kv in sorted(v["lines"].items())) or "none", v["lives"],
            "fe" if v["lives"] == 1 else "ves",
            ("; %d failed starts (%s)" % (v["failed_starts"], ", ".join("%s %d" % kv for kv in
                                                                        sorted(v["failed_start_lines"].items()))))
            if v["failed_starts"] else ""))
    w("shutdown on SIGTERM: %s\n" % ", ".join("%s exit %s in %.1f s" % (k, v["exit"], v["seconds"])
                                              for k, v in sorted(s["shutdown"].items())))
    w("daemon logs: %s (and summary.json, transfers.jsonl, samples.json)\n" % s["log_dir"])
    w("result: %s\n" % ("PASS" if s["pass"] else "FAIL"))


def main(argv):
    args = parse_args(argv)
    binary = args.bin
    if os.path.isdir(binary):
        binary = os.path.join(binary, "spectrumkvd")
    if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
        print("no spectrumkvd at %s (build the spectrumkvd target)" % binary)
        return 2
    stubs = args.stubs or os.environ.get("SKV_PYTHON_STUBS") or os.path.join(REPO, "build", "python")
    grpc_mod, client_mod = load_client(stubs)
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="skv-soak.")
    os.makedirs(log_dir, exist_ok=True)
    soak = Soak(args, grpc_mod, client_mod)
    interrupted = False
    try:
        soak.run(os.path.abspath(binary), log_dir)
    except KeyboardInterrupt:
        interrupted = True
        soak.stop.set()
        if soak.t0 and not soak.t_end:
            soak.t_end = time.monotonic()
        log("interrupted: cleaning up")
    finally:
        soak.stop.set()
        # A second Ctrl-C / SIGTERM must not cut the clean-up short (it is bounded in time).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        REG.cleanup()
    summary = soak.summary(log_dir)
    summary["interrupted"] = interrupted
    try:
        with open(os.path.join(log_dir, "transfers.jsonl"), "w") as f:
            for r in list(soak.results):
                f.write(json.dumps(r, sort_keys=True) + "\n")
        with open(os.path.join(log_dir, "samples.json"), "w") as f:
            json.dump(soak.samples, f)
        with open(os.path.join(log_dir, "summary.json"), "w") as f:
            json.dump(summary, f, sort_keys=True, indent=1)
    except OSError as e:
        log("cannot write the per-transfer records: %s" % e)
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    else:
        print_table(summary)
    sys.stdout.flush()
    if interrupted:
        return 130
    if soak.problems and not soak.t0:
        return 2
    return 0 if summary["pass"] else 1


if __name__ == "__main__":
    def _term(signum, frame):
        raise KeyboardInterrupt()
    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, _term)
    sys.exit(main(sys.argv[1:]))
