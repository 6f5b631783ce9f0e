"""Engine connectors: spectrumkv.integrations.vllm (KV connector v1) and spectrumkv.integrations.sglang."""
