"""graphlora's graph passes (installed as ``graphlora.passes``).

Passes work on ``torch.fx`` graphs and know nothing of transformers:

- :mod:`.sites` — *locate*: find every linear op (``nn.Linear`` calls, functional ``linear``,
  ``addmm`` with an (in, out) weight) as a :class:`Site` record.
- :mod:`.targeting` — PEFT's target-selection rules as pure functions of module paths.
- :mod:`.splice` — *splice*: insert adapter branches and one named switch node per site.
- :mod:`.dropout` — turn trace-time-frozen dropout into mode-following dropout.
- :mod:`.cleanup` — drop trace-time assertions that pin dtype/device.
- :mod:`.attention` — run attention whose traced mask is provably causal with ``is_causal=True``.
- :mod:`.ops` — the runtime functions the inserted nodes call; :mod:`.kernels` their Triton kernels.
- :mod:`.stack_cache` — mixed-batch stacked adapter weights kept between eager calls.

Each rewrite is a callable ``GraphModule -> PassResult`` (``torch.fx.passes.infra``).
"""

from .attention import causal_attention, causal_sdpa
from .cleanup import strip_tensor_asserts
from .dropout import follow_train_mode
from .sites import Site, locate_sites
from .splice import BranchSpec, splice_adapters, splice_mixed
from .targeting import is_excluded, is_targeted, pattern_value

__all__ = [
    "Site",
    "locate_sites",
    "BranchSpec",
    "splice_adapters",
    "splice_mixed",
    "follow_train_mode",
    "strip_tensor_asserts",
    "causal_attention",
    "causal_sdpa",
    "is_targeted",
    "is_excluded",
    "pattern_value",
]
