"""The configuration fields a connector reads."""

import dataclasses


@dataclasses.dataclass
class KVTransferConfig:
    kv_connector: str
    kv_role: str = "kv_both"
    kv_connector_module_path: str = None
    kv_connector_extra_config: dict = dataclasses.field(default_factory=dict)

    @property
    def is_kv_producer(self):
        return self.kv_role in ("kv_producer", "kv_both")


@dataclasses.dataclass
class CacheConfig:
    block_size: int = 16


@dataclasses.dataclass
class ModelConfig:
    model: str = "standin-model"


@dataclasses.dataclass
class ParallelConfig:
    rank: int = 0


@dataclasses.dataclass
class SchedulerConfig:
    hybrid_kv_cache_manager: bool = True


@dataclasses.dataclass
class VllmConfig:
    kv_transfer_config: KVTransferConfig
    cache_config: CacheConfig = dataclasses.field(default_factory=CacheConfig)
    model_config: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    parallel_config: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    scheduler_config: SchedulerConfig = dataclasses.field(default_factory=SchedulerConfig)
