"""Input sources for pipelines: the base class in :mod:`.base`, one module per source type
(:mod:`.folder`, :mod:`.capture`, :mod:`.mqtt_input`), chosen by :func:`.factory.build_source`."""
