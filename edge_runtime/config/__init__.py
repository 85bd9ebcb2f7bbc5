"""The daemon's TOML configuration: typed, checked, frozen dataclasses."""
