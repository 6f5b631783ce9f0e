import dataclasses


@dataclasses.dataclass
class KVCacheBlocks:
    blocks: tuple  # one list of block ids per KV-cache group

    def get_block_ids(self):
        return tuple(list(group) for group in self.blocks)
