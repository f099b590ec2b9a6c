"""graphlora's graph passes (installed as ``graphlora.passes``).

Passes work on ``torch.fx`` graphs and know nothing of transformers, nor of any adapter method:
a method's rule (``graphlora/methods/``) hands them its emitters and steps.

Each pass is a ``torch.fx.passes.infra.pass_base.PassBase`` that takes its settings in
``__init__`` and returns an honest ``PassResult(graph_module, modified)`` from ``call(gm)``
(in-place ones lint and recompile when they changed the graph: :mod:`.result`). Pipelines run
through :func:`run_passes` (``PassManager`` with a lint check after each pass, :mod:`.pipeline`):

- :class:`FollowTrainMode` (:mod:`.dropout`) — turn trace-time-frozen dropout into
  mode-following ``nn.Dropout`` modules.
- :class:`StripTensorAsserts` (:mod:`.cleanup`) — drop trace-time assertions that pin dtype/device.
- :class:`CausalAttention(lengths) <CausalAttention>` (:mod:`.attention`) — run attention whose
  traced mask is provably causal with ``is_causal=True``.
- :class:`MatmulAsLinear` (:mod:`.matmul_linear`) — a hand-written linear ``x @ W.T (+ b)``
  (Falcon's ``FalconLinear``) as one ``matmul_linear(x, W, b)`` node, a linear site.
- :class:`SpliceAdapters(sites, specs) <SpliceAdapters>` (:mod:`.splice`) — *splice*: insert each
  site's branches (:class:`BranchSpec`, built through a :class:`SiteBuilder`) behind one named
  switch node (every program form: switch, serving from the adapter banks, mixed batches).
- :class:`FreezeSwitches(steps) <FreezeSwitches>` (:mod:`.specialize`) — freeze the current gate
  values into the graph (the specialize pass).
- :class:`RetargetDevice(old, new) <RetargetDevice>` (:mod:`.device`) — move the devices a trace
  baked into the graph (nested higher-order-op graphs included).
- :class:`DetachedReads(prefix) <DetachedReads>` (:mod:`.detach_reads`) — a grad-free graph reads
  the parameters under ``prefix`` through detached aliases (no ``requires_grad`` for dynamo to
  guard on).
- :class:`CheckpointBlocks(prefix, every_n_layers, options) <CheckpointBlocks>` (:mod:`.checkpoint`) —
  each block's nodes as one activation-checkpointed call (training mode only).
- :class:`ReplicateBlock(prefix, count, source) <ReplicateBlock>` (:mod:`.replicate`) — a graph
  traced with two copies of a block, stamped out to ``count`` (a new module, or ``modified=False``
  when the graph does not have that shape).

:func:`base_passes` is the pipeline every traced graph gets first: ``FollowTrainMode``,
``StripTensorAsserts``, ``CausalAttention``, ``MatmulAsLinear``. Besides the passes:

- :mod:`.sites` — *locate*: find every linear op (``nn.Linear`` calls, functional ``linear``,
  ``addmm`` with an (in, out) weight, ``matmul_linear``) as a :class:`Site` record.
- :mod:`.targeting` — PEFT's target-selection rules as pure functions of module paths.
- :mod:`.ops` — the runtime functions the inserted nodes call (the low-rank switches
  ``lora_down``, ``lora_switch``, ``lora_linear``, and the bank updates ``lora_bank`` /
  ``lora_bank_rows``); :mod:`.method_ops` the scaling switch ``scale_switch``; :mod:`.kernels`
  their Triton kernels; :mod:`.linear_few` a base linear with the adapter update as its epilogue
  for few-row compiled calls (off until measured on the GPU), which :mod:`.fuse_linear` prepares
  the serving programs for.
"""

from .attention import CausalAttention, causal_sdpa
from .checkpoint import CheckpointBlocks, release_regions
from .cleanup import StripTensorAsserts
from .detach_reads import DetachedReads
from .device import RetargetDevice
from .dropout import FollowTrainMode
from .matmul_linear import MatmulAsLinear, matmul_linear
from .pipeline import base_passes, run_passes
from .replicate import ReplicateBlock
from .result import GraphPass
from .sites import Site, locate_sites
from .specialize import FreezeSwitches
from .splice import BranchSpec, SiteBuilder, SpliceAdapters
from .targeting import is_excluded, is_targeted, pattern_value

__all__ = [
    "Site",
    "locate_sites",
    "BranchSpec",
    "SiteBuilder",
    "GraphPass",
    "run_passes",
    "base_passes",
    "FollowTrainMode",
    "DetachedReads",
    "StripTensorAsserts",
    "CausalAttention",
    "MatmulAsLinear",
    "matmul_linear",
    "causal_sdpa",
    "SpliceAdapters",
    "FreezeSwitches",
    "RetargetDevice",
    "ReplicateBlock",
    "CheckpointBlocks",
    "release_regions",
    "is_targeted",
    "is_excluded",
    "pattern_value",
]
