"""Two real spectrumkvd processes on free loopback ports (UCX over TCP on lo) for the connector
tests: `prefill` sends to its configured peer `decode`. Started with `DaemonPair(...)` as a context
manager; every process is stopped by PID on exit (TERM, then KILL after 5 s), and `kill(name)`
kills one mid-test. The daemon binary is SKV_DAEMON (set by ctest)."""

import os
import signal
import socket
import subprocess
import tempfile
import time

DAEMON = os.environ.get("SKV_DAEMON", "")


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


class DaemonPair:

    def __init__(self, decode_flags=(), prefill_flags=()):
        if not DAEMON or not os.access(DAEMON, os.X_OK):
            raise RuntimeError("SKV_DAEMON=%r is not an executable spectrumkvd" % DAEMON)
        self.workdir = tempfile.mkdtemp(prefix="skv-connector-")
        ports = free_ports(6)
        self.ports = {"prefill": ports[0:3], "decode": ports[3:6]}
        self.flags = {"decode": list(decode_flags), "prefill": ["--peers=decode=127.0.0.1:%d" % ports[4]] +
                      list(prefill_flags)}
        self.procs = {}

    def address(self, name):
        return "127.0.0.1:%d" % self.ports[name][0]

    def _start(self, name):
        grpc_port, data_port, metrics_port = self.ports[name]
        log = open(os.path.join(self.workdir, name + ".log"), "ab")
        self.procs[name] = subprocess.Popen(
            [DAEMON, "--daemon_id=" + name, "--grpc_listen_address=127.0.0.1:%d" % grpc_port,
             "--data_listen_address=127.0.0.1:%d" % data_port, "--metrics_listen_address=127.0.0.1:%d" % metrics_port,
             "--auth_token=connector-test-token", "--ucx_tls=tcp", "--ucx_net_devices=lo"] + self.flags[name],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def _wait_ready(self, names, timeout=15.0):
        deadline = time.monotonic() + timeout
        pending = set(names)
        while pending and time.monotonic() < deadline:
            for name in list(pending):
                if self.procs[name].poll() is not None:
                    raise RuntimeError("spectrumkvd %s exited at start:\n%s" % (name, self.log(name)))
                if "spectrumkvd ready" in self.log(name):
                    pending.discard(name)
            time.sleep(0.05)
        if pending:
            raise RuntimeError("spectrumkvd %s not ready within %.0f s" % (", ".join(sorted(pending)), timeout))

    def __enter__(self):
        try:
            for name in ("decode", "prefill"):
                self._start(name)
            self._wait_ready(self.procs)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()
        return False

    def kill(self, name):
        """SIGKILL one daemon (a crash) and reap it."""
        proc = self.procs[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def log(self, name):
        try:
            with open(os.path.join(self.workdir, name + ".log"), "rb") as f:
                return f.read().decode(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self):
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for name in list(self.procs):
            path = os.path.join(self.workdir, name + ".log")
            if os.path.exists(path):
                os.unlink(path)
        try:
            os.rmdir(self.workdir)
        except OSError:
            pass
