"""edge-runtime: a hardened inference daemon for ARM/IoT devices, and a library.

The names in ``__all__`` are the public, stable API; everything in the
subpackages is internal and may move. Typical use::

    import edge_runtime

    with edge_runtime.load_model("face", state_dir="/var/lib/edge-runtime",
                                 trust_dir="/etc/edge-runtime/trust") as model:
        print(model.metadata.inputs, model.predict(jpeg_bytes))

The names are imported on first use (module ``__getattr__``), so
``import edge_runtime`` stays cheap for the CLI and for users who need only
the version. Their types live in ``__init__.pyi``: a TYPE_CHECKING import here
would close an import cycle (this package -> library -> update.store, which
reads ``__version__`` from here).
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = [
    "BundleError",
    "CacheError",
    "ConfigError",
    "EdgeRuntimeError",
    "InputError",
    "Model",
    "ModelError",
    "ModelMetadata",
    "SignatureError",
    "TensorMetadata",
    "__version__",
    "load_model",
    "open_bundle",
]

# public name -> the module that defines it
_LAZY = {
    "BundleError": "edge_runtime.errors",
    "CacheError": "edge_runtime.errors",
    "ConfigError": "edge_runtime.errors",
    "EdgeRuntimeError": "edge_runtime.errors",
    "InputError": "edge_runtime.errors",
    "ModelError": "edge_runtime.errors",
    "SignatureError": "edge_runtime.errors",
    "Model": "edge_runtime.library",
    "ModelMetadata": "edge_runtime.library",
    "TensorMetadata": "edge_runtime.library",
    "load_model": "edge_runtime.library",
    "open_bundle": "edge_runtime.library",
}

def __getattr__(name: str) -> object:  # typed per name in __init__.pyi (typing costs import time)
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'edge_runtime' has no attribute {name!r}")
    value = getattr(__import__(module, fromlist=[name]), name)  # __import__: no importlib to load
    globals()[name] = value  # later look-ups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
