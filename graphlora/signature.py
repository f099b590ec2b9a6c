"""The emitted module's visible ``forward`` signature: the source model's.

``torch.fx.GraphModule`` generates ``forward`` from the graph on every recompile, so its signature
is the traced one (``(input_ids, use_cache)`` for an exported transformers model). Tools that
inspect the model (transformers' ``Trainer`` picks dataset columns and label names from
``inspect.signature(model.forward)`` and ``type(model).forward``) must see the source model's.
"""

from __future__ import annotations

import inspect
from typing import Union

from torch import nn

__all__ = ["show_source_signature"]


def show_source_signature(cls: type, source: Union[nn.Module, None]) -> None:
    """Give ``cls.forward`` (the function ``GraphModule`` generated) ``source``'s ``forward`` signature.

    Only ``__signature__`` changes: the code that runs, and what ``torch.fx`` and ``torch.compile``
    read, stay the generated ones. Nothing happens when ``source`` is ``None`` or its ``forward``
    has no signature.
    """
    if source is None:
        return
    try:
        signature = inspect.signature(type(source).forward)
    except (TypeError, ValueError):
        return
    cls.forward.__signature__ = signature
