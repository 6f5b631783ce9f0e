"""What the scheduler hands the model runner each step (the fields connectors read)."""

import dataclasses


@dataclasses.dataclass
class NewRequestData:
    req_id: str
    prompt_token_ids: list
    block_ids: tuple  # one list per KV-cache group
    num_computed_tokens: int


@dataclasses.dataclass
class CachedRequestData:
    req_ids: list = dataclasses.field(default_factory=list)
    resumed_from_preemption: list = dataclasses.field(default_factory=list)
    new_block_ids: list = dataclasses.field(default_factory=list)  # per request: tuple per group, or None
    num_computed_tokens: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class SchedulerOutput:
    scheduled_new_reqs: list
    scheduled_cached_reqs: CachedRequestData
    num_scheduled_tokens: dict
    finished_req_ids: set
    preempted_req_ids: set = dataclasses.field(default_factory=set)
    kv_connector_metadata: object = None
