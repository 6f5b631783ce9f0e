#!/bin/bash
# ctest python_package_install: `pip install --no-build-isolation` of client/python into a fresh
# virtual environment (with Debian's site packages: grpcio, protobuf, setuptools), as a user
# would, then, from another directory, the installed package's stubs import and each connector
# loads by module path through the stand-in engines' loaders.
#   run_package_install.sh WORKDIR
set -euo pipefail
WORK=${1:?usage: run_package_install.sh WORKDIR}
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
PY=/usr/bin/python3
$PY -c 'import venv, ensurepip' 2>/dev/null || { echo "SKIP: $PY lacks venv/ensurepip (Debian: python3-venv)"; exit 77; }
$PY -c 'import setuptools, grpc, google.protobuf' 2>/dev/null ||
  { echo "SKIP: $PY lacks setuptools/grpc/protobuf (Debian: python3-setuptools python3-grpcio python3-protobuf)"; exit 77; }

rm -rf "$WORK" && mkdir -p "$WORK"
trap 'rm -rf "$WORK"' EXIT
$PY -m venv --system-site-packages "$WORK/venv"
# A copy of the package and the proto, so the in-place build leaves the checkout alone.
mkdir -p "$WORK/src/client" && cp -r "$REPO/client/python" "$WORK/src/client/python" && cp -r "$REPO/proto" "$WORK/src/proto"
"$WORK/venv/bin/pip" install --quiet --no-build-isolation --no-index "$WORK/src/client/python"
cd "$WORK"
SKV_PYTHON_STUBS= PYTHONPATH="$HERE/standins" "$WORK/venv/bin/python" - <<'PYEOF'
import os, spectrumkv, spectrumkv.v1.spectrumkv_pb2 as stubs
assert "site-packages" in spectrumkv.__file__ and "site-packages" in stubs.__file__, (spectrumkv.__file__, stubs.__file__)
assert "allow_drop" in stubs.CodecPolicy.DESCRIPTOR.fields_by_name
from vllm.config import KVTransferConfig, VllmConfig
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
config = VllmConfig(kv_transfer_config=KVTransferConfig(
    kv_connector="SpectrumKVConnector", kv_connector_module_path="spectrumkv.integrations.vllm",
    kv_connector_extra_config={"peer": "decode-0", "budget": 0.5}))
connector = KVConnectorFactory.create_connector(config, KVConnectorRole.SCHEDULER)
import sys
assert "site-packages" in sys.modules[type(connector).__module__].__file__
from spectrumkv.integrations import sglang as backend
from sglang.srt.disaggregation import utils
member = backend.register()
assert utils.get_kv_class(member, utils.KVClassType.SENDER) is backend.SpectrumKVSender
print("installed:", spectrumkv.__file__, "connector:", type(connector).__module__ + "." + type(connector).__name__)
PYEOF
echo "python_package_install: PASS"
