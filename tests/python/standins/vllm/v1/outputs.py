import dataclasses


@dataclasses.dataclass
class KVConnectorOutput:
    finished_sending: set = None
    finished_recving: set = None
    invalid_block_ids: set = dataclasses.field(default_factory=set)
