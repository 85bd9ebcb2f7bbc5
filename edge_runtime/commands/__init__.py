"""Device-side fleet commands: parse, authenticate, deduplicate, dispatch, reply."""
