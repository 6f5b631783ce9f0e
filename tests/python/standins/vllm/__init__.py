"""Stand-in of the parts of vLLM that a KV connector touches (see ../README.md)."""
