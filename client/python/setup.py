"""Builds the package with the `spectrumkv.v1` stubs generated from proto/ (see pyproject.toml).

The stubs are generated at build time, never committed: with protoc + grpc_python_plugin (Debian:
protobuf-compiler, protobuf-compiler-grpc) or grpc_tools. The proto directory is ../../proto of
this file (pip builds a local directory in place), or SKV_PROTO_DIR.
"""

import importlib.util
import os
import shutil
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_FILE = os.path.join("spectrumkv", "v1", "spectrumkv.proto")


def proto_dir():
    directory = os.environ.get("SKV_PROTO_DIR", os.path.join(HERE, "..", "..", "proto"))
    if not os.path.isfile(os.path.join(directory, PROTO_FILE)):
        sys.exit("spectrumkv: no %s under %s; build from the repository checkout or set SKV_PROTO_DIR"
                 % (PROTO_FILE, os.path.abspath(directory)))
    return os.path.abspath(directory)


def protoc_command(out_dir):
    plugin = shutil.which("grpc_python_plugin")
    if shutil.which("protoc") and plugin:
        return ["protoc", "--plugin=protoc-gen-grpc=" + plugin, "--grpc_out=" + out_dir]
    if importlib.util.find_spec("grpc_tools") is None:
        sys.exit("spectrumkv: generating the stubs needs protoc and grpc_python_plugin "
                 "(Debian: protobuf-compiler protobuf-compiler-grpc) or grpc_tools")
    return [sys.executable, "-m", "grpc_tools.protoc", "--grpc_python_out=" + out_dir]


class BuildWithStubs(build_py):
    """build_py, then the generated stubs into <build_lib>/spectrumkv/v1/."""

    def run(self):
        super().run()
        out_dir = os.path.abspath(self.build_lib)
        os.makedirs(os.path.join(out_dir, "spectrumkv", "v1"), exist_ok=True)
        source = proto_dir()
        command = protoc_command(out_dir) + ["-I", source, "--python_out=" + out_dir,
                                             os.path.join(source, PROTO_FILE)]
        self.announce("generating stubs: " + " ".join(command), level=2)
        subprocess.check_call(command)


setup(cmdclass={"build_py": BuildWithStubs})
