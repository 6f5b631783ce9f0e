import dataclasses


@dataclasses.dataclass
class ForwardContext:
    attn_metadata: object = None
