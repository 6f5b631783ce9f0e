import dataclasses


@dataclasses.dataclass
class Request:
    request_id: str
    prompt_token_ids: list
    kv_transfer_params: dict = None
    num_computed_tokens: int = 0

    @property
    def num_tokens(self):
        return len(self.prompt_token_ids)
