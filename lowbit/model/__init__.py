"""Models (embedded GGUF -> cached safetensors), the TP sharding, the engine, text and task data."""
