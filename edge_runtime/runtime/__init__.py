"""Models in memory: backends, loaded models, slots, pre/post-processing, gates."""
