"""Loads a connector class by module path, as vLLM's KVConnectorFactory does for
`kv_connector_module_path`: import the module, take the class named `kv_connector`."""

import importlib

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, supports_hma


class KVConnectorFactory:

    @staticmethod
    def get_connector_class(kv_transfer_config):
        module = importlib.import_module(kv_transfer_config.kv_connector_module_path)
        cls = getattr(module, kv_transfer_config.kv_connector)
        if not issubclass(cls, KVConnectorBase_V1):
            raise TypeError("%s is not a KVConnectorBase_V1" % cls)
        return cls

    @classmethod
    def create_connector(cls, config, role, kv_cache_config=None):
        connector_cls = cls.get_connector_class(config.kv_transfer_config)
        if config.scheduler_config.hybrid_kv_cache_manager and not supports_hma(connector_cls):
            raise ValueError("%s does not support the hybrid KV-cache manager" % connector_cls.__name__)
        return connector_cls(config, role, kv_cache_config)
