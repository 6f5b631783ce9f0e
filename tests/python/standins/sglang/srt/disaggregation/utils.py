"""The backend registry: a closed enum and a lookup, as upstream's (out-of-tree backends extend
the enum through a plugin)."""

from enum import Enum


class DisaggregationMode(Enum):
    NULL = "null"
    PREFILL = "prefill"
    DECODE = "decode"


class TransferBackend(Enum):
    MOONCAKE = "mooncake"
    NIXL = "nixl"
    ASCEND = "ascend"
    FAKE = "fake"


class KVClassType(Enum):
    KVARGS = "kvargs"
    MANAGER = "manager"
    SENDER = "sender"
    RECEIVER = "receiver"
    BOOTSTRAP_SERVER = "bootstrap_server"


def get_kv_class(transfer_backend, class_type):
    raise ValueError(f"Unsupported transfer backend: {transfer_backend}")


def kv_to_page_num(num_kv_indices, page_size):
    return (num_kv_indices + page_size - 1) // page_size
