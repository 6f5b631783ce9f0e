import dataclasses


@dataclasses.dataclass
class ServerArgs:
    disaggregation_mode: str = "null"
    disaggregation_transfer_backend: str = "mooncake"
    disaggregation_bootstrap_port: int = 8998
    host: str = "127.0.0.1"
