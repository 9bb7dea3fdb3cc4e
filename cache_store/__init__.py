"""KV cartridges: pre-computed, optionally compressed KV caches stored content-addressed on disk."""
