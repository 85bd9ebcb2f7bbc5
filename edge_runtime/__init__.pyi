# Types of the lazily imported public names of edge_runtime/__init__.py (kept equal to its __all__ by tests).

from edge_runtime.errors import BundleError as BundleError
from edge_runtime.errors import CacheError as CacheError
from edge_runtime.errors import ConfigError as ConfigError
from edge_runtime.errors import EdgeRuntimeError as EdgeRuntimeError
from edge_runtime.errors import InputError as InputError
from edge_runtime.errors import ModelError as ModelError
from edge_runtime.errors import SignatureError as SignatureError
from edge_runtime.library import Model as Model
from edge_runtime.library import ModelMetadata as ModelMetadata
from edge_runtime.library import TensorMetadata as TensorMetadata
from edge_runtime.library import load_model as load_model
from edge_runtime.library import open_bundle as open_bundle

__version__: str
__all__: list[str]

