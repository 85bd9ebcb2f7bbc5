"""The on-disk model cache and state under the state dir."""
