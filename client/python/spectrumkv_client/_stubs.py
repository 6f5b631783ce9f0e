"""Locates and imports the generated `spectrumkv.v1` stubs.

The stubs are built by the CMake target `skv_python_stubs` into `<build>/python/spectrumkv/v1/`.
The directory holding `spectrumkv/` is taken from the environment variable SKV_PYTHON_STUBS;
without it, `build/python` is tried relative to the current directory and to the repository
this package lives in (client/python/spectrumkv_client -> ../../../build/python).
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO_ROOT = os.path.abspath(os.path.join(_HERE, "..", "..", ".."))


def stub_search_path():
    """The directories that are tried, in order."""
    explicit = os.environ.get("SKV_PYTHON_STUBS")
    if explicit:
        return [os.path.abspath(explicit)]
    return [os.path.abspath(os.path.join("build", "python")), os.path.join(_REPO_ROOT, "build", "python")]


def _has_stubs(directory):
    return os.path.isfile(os.path.join(directory, "spectrumkv", "v1", "spectrumkv_pb2.py"))


def load():
    """Returns (spectrumkv_pb2, spectrumkv_pb2_grpc) or raises ImportError naming what was tried."""
    tried = stub_search_path()
    for directory in tried:
        if _has_stubs(directory):
            if directory not in sys.path:
                sys.path.insert(0, directory)
            break
    # Found above, or maybe importable already (PYTHONPATH); otherwise say where we looked.
    try:
        from spectrumkv.v1 import spectrumkv_pb2, spectrumkv_pb2_grpc
    except ImportError as error:
        raise ImportError(
            "spectrumkv.v1 stubs not importable (%s); looked in %s; build them with "
            "`ninja -C <build> skv_python_stubs` and set SKV_PYTHON_STUBS=<build>/python"
            % (error, ", ".join(tried))) from error
    return spectrumkv_pb2, spectrumkv_pb2_grpc


pb, rpc = load()
