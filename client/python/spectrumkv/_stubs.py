"""Locates and imports the generated `spectrumkv.v1` stubs.

An installed package (`pip install --no-build-isolation ./client/python`) carries them in
`spectrumkv/v1/`. From a source checkout they are built by the CMake target `skv_python_stubs`
into `<build>/python/spectrumkv/v1/`; that directory's `spectrumkv/` is then appended to this
package's search path, so `spectrumkv.v1` resolves to it. The build directory is taken from the
environment variable SKV_PYTHON_STUBS (the directory holding `spectrumkv/`); without it,
`build/python` is tried relative to the current directory and to the repository this package
lives in (client/python/spectrumkv -> ../../../build/python).
"""

import os

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO_ROOT = os.path.abspath(os.path.join(_HERE, "..", "..", ".."))


def stub_search_path():
    """The directories that are tried after the package itself, in order."""
    explicit = os.environ.get("SKV_PYTHON_STUBS")
    if explicit:
        return [os.path.abspath(explicit)]
    return [os.path.abspath(os.path.join("build", "python")), os.path.join(_REPO_ROOT, "build", "python")]


def _has_stubs(package_dir):
    return os.path.isfile(os.path.join(package_dir, "v1", "spectrumkv_pb2.py"))


def load(package_path):
    """Returns (spectrumkv_pb2, spectrumkv_pb2_grpc), extending `package_path` (the package's
    __path__) with a build tree's stubs when the package carries none; raises ImportError naming
    what was tried."""
    tried = stub_search_path()
    if not _has_stubs(_HERE):
        for directory in tried:
            candidate = os.path.join(directory, "spectrumkv")
            if _has_stubs(candidate):
                if candidate not in package_path:
                    package_path.append(candidate)
                break
    try:
        from spectrumkv.v1 import spectrumkv_pb2, spectrumkv_pb2_grpc
    except ImportError as error:
        raise ImportError(
            "spectrumkv.v1 stubs not importable (%s); not in %s nor in %s; install the package "
            "(pip install --no-build-isolation ./client/python) or build them with "
            "`ninja -C <build> skv_python_stubs` and set SKV_PYTHON_STUBS=<build>/python"
            % (error, _HERE, ", ".join(tried))) from error
    return spectrumkv_pb2, spectrumkv_pb2_grpc
