"""graphlora: adapters injected by rewriting the model's traced graph.

>>> import graphlora
>>> gm = graphlora.inject(model, graphlora.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
>>> gm.print_trainable_parameters()
"""

from .api import inject, list_sites
from .config import IA3Config, LoHaConfig, LoKrConfig, LoraConfig
from .errors import (
    AdapterExistsError,
    AdapterFileError,
    AdapterNotFoundError,
    AdapterStateError,
    ConfigError,
    GraphLoraError,
    MergeError,
    NoTargetError,
    PeftFunctionError,
    PlacementError,
    SignatureError,
    TargetTypeError,
    TraceError,
    UnknownFieldError,
)
from .freeze import specialize
from .merge import lora_delta
from .quantize import QuantizationError, allow_requantize, quantize_base
from .module import AdaptedGraphModule, SiteInfo
from .peft_io import read_adapter_config, read_adapter_dir
from .pool import AdapterPool
from .viz import before_after, export_graph, to_networkx

__version__ = "0.1.0"

__all__ = [
    "inject",
    "list_sites",
    "LoraConfig",
    "IA3Config",
    "LoHaConfig",
    "LoKrConfig",
    "AdaptedGraphModule",
    "AdapterPool",
    "SiteInfo",
    "GraphLoraError",
    "ConfigError",
    "NoTargetError",
    "AdapterNotFoundError",
    "AdapterExistsError",
    "AdapterStateError",
    "TraceError",
    "SignatureError",
    "AdapterFileError",
    "MergeError",
    "PlacementError",
    "PeftFunctionError",
    "TargetTypeError",
    "UnknownFieldError",
    "to_networkx",
    "export_graph",
    "before_after",
    "specialize",
    "lora_delta",
    "quantize_base",
    "allow_requantize",
    "QuantizationError",
    "read_adapter_dir",
    "read_adapter_config",
]


def __getattr__(name: str):
    """``graphlora.training`` (``AdapterTrainer``) without ``import graphlora.training`` first; it is
    imported on first use, since it imports transformers' ``Trainer``."""
    if name == "training":
        import importlib

        return importlib.import_module(".training", __name__)
    raise AttributeError(f"module 'graphlora' has no attribute {name!r}")
