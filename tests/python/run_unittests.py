"""Runs unittest modules of tests/python with /usr/bin/python3: the stand-in engines
(standins/) and the source tree's package (client/python) first on sys.path, so `import vllm`,
`import sglang` and `import spectrumkv` resolve to them. Exits 77 (ctest: skipped) when Debian's
grpc, protobuf or torch are missing, naming the package to install.

    run_unittests.py MODULE[.Class[.test]] ...   (env: SKV_PYTHON_STUBS, SKV_DAEMON)
"""

import os
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
SKIP = 77

sys.path[:0] = [os.path.join(HERE, "standins"), os.path.join(REPO, "client", "python"), HERE]
for module, package in (("grpc", "python3-grpcio"), ("google.protobuf", "python3-protobuf"),
                        ("torch", "python3-torch")):
    try:
        __import__(module)
    except ImportError as e:
        print("SKIP: %s cannot import %s (Debian: %s): %s" % (sys.executable, module, package, e))
        sys.exit(SKIP)

suite = unittest.defaultTestLoader.loadTestsFromNames(sys.argv[1:])
result = unittest.TextTestRunner(verbosity=2).run(suite)
sys.exit(0 if result.wasSuccessful() else 1)
