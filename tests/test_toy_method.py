"""A method defined in this file alone runs through inject, switching, save/load, merge (and its
refusal), mixed-batch refusal and specialize: the shared code names no method.

The toy method ("offset") adds a learned vector to a site's output::

    y = W x + b + g * d          (d: [d_out], g: the adapter's switch weight, 0 when inactive)

It enters the site as a *residual* contribution, merges into the bias (refused where the site has
none), and brings its own specialize step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Union

import pytest
import torch
import torch.fx as fx
from snapshot import assert_unchanged, snapshot
from torch import nn

import graphlora
from graphlora import ConfigError, LoraConfig, MergeError
from graphlora.methods import MethodRule, register_rule, unregister_rule
from graphlora.passes import BranchSpec


@dataclasses.dataclass(frozen=True)
class OffsetConfig:
    target_modules: Any = None
    exclude_modules: Any = None
    inference_mode: bool = False
    init_zero: bool = True


def offset(delta: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``g * d``: exactly zero at ``g = 0``."""
    return delta * gate


class OffsetBranch(nn.Module):
    def __init__(self, features: int, *, dtype=None, device=None) -> None:
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(features, dtype=dtype, device=device))
        self.register_buffer("gate", torch.zeros((), device=device), persistent=False)

    has_dropout = False

    @torch.no_grad()
    def apply_state(self, weight: float, merged: bool = False) -> None:
        self.gate.fill_(weight)


def emit_offset(builder, spec: BranchSpec) -> None:
    tag = f"{builder.key}_{spec.adapter}"
    delta = builder.get_attr(f"{spec.prefix}.delta", f"{tag}_delta", spec.adapter)
    gate = builder.get_attr(f"{spec.prefix}.gate", f"{tag}_gate", spec.adapter)
    builder.add_residual(builder.call(offset, (delta, gate), f"{tag}_offset", spec.adapter))


def freeze_offset(gm: fx.GraphModule, node: fx.Node, read) -> list:
    delta, gate = node.args
    if not isinstance(gate, fx.Node):
        return []
    if read(gate) == 0.0:  # y + 0 -> y
        for add in list(node.users):
            add.replace_all_uses_with(add.args[0] if add.args[1] is node else add.args[1])
        return [*node.users, node]
    node.args = (delta, read(gate))
    return [gate]


class OffsetRule(MethodRule):
    name = "offset"
    config_class = OffsetConfig
    peft_type = "TOY_OFFSET"

    def default_targets(self, model_type):
        return None

    def site_plan(self, config, site):
        return ()

    def make_branch(self, config, site, plan, weight):
        branch = OffsetBranch(site.out_features, dtype=weight.dtype, device=weight.device)
        if not config.init_zero:
            with torch.no_grad():
                branch.delta.normal_()
        return branch

    def branch_spec(self, adapter, prefix, branch, site):
        return BranchSpec(adapter, prefix, emit_offset)

    def freeze_steps(self):
        return {offset: freeze_offset}

    def tensors(self, branch):
        return {"offset": branch.delta.detach()}

    def shapes(self, site, plan, config):
        return {"offset": (site.out_features,)}

    def config_from_peft(self, data, source):
        known = {f.name for f in dataclasses.fields(OffsetConfig)}
        return OffsetConfig(**{k: v for k, v in data.items() if k in known})

    def config_to_peft(self, config, sites, resolved, fan_in_fan_out, **meta):
        out = dataclasses.asdict(config)
        out.update(peft_type=self.peft_type, target_modules=list(resolved), inference_mode=True)
        return out

    def merge(self, weight, bias, branch, w, fan_in_fan_out, original=None):
        if bias is None:
            raise MergeError("the offset method merges into the bias, and this site has none")
        return weight, bias + w * branch.delta.detach().float()


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture(autouse=True)
def offset_rule():
    rule = register_rule(OffsetRule())
    yield rule
    unregister_rule(rule)


def _reference(net: Net, x: torch.Tensor, d1: Union[torch.Tensor, None], lora=None) -> torch.Tensor:
    h = net.fc1(x) + (d1 if d1 is not None else 0)
    if lora is not None:
        h = h + lora
    return net.fc2(torch.relu(h))


def test_inject_switch_and_disable():
    torch.manual_seed(0)
    net = Net()
    gm = graphlora.inject(net, OffsetConfig(target_modules=["fc1"], init_zero=False))
    x = torch.randn(3, 8)
    d = gm.adapter_state.branch("fc1", "default").delta.detach()
    with torch.no_grad():
        assert "fc1_default_offset" in gm.code
        torch.testing.assert_close(gm(x), _reference(net, x, d))
        gm.disable_adapters()
        assert torch.equal(gm(x), net(x))
        gm.enable_adapters()
        gm.set_adapter_weights({"default": 0.5})
        torch.testing.assert_close(gm(x), _reference(net, x, 0.5 * d))
    assert gm.sites_table().count("default:offset") == 1


def test_next_to_lora_contributions_add():
    torch.manual_seed(1)
    net = Net()
    gm = graphlora.inject(net, OffsetConfig(target_modules=["fc1"], init_zero=False))
    gm.add_adapter("lora", LoraConfig(r=2, target_modules=["fc1"], init_lora_weights=False))
    gm.set_adapter(["default", "lora"])
    x = torch.randn(3, 8)
    branch = gm.adapter_state.branch("fc1", "lora")
    with torch.no_grad():
        lora = branch.scaling * x @ branch.lora_A.weight.T @ branch.lora_B.weight.T
        d = gm.adapter_state.branch("fc1", "default").delta
        torch.testing.assert_close(gm(x), _reference(net, x, d, lora))


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(2)
    gm = graphlora.inject(Net(), OffsetConfig(target_modules=["fc1"], init_zero=False))
    gm.save_adapter(tmp_path)
    assert graphlora.read_adapter_config(tmp_path) == OffsetConfig(target_modules=["fc1"], inference_mode=True,
                                                                   init_zero=False)
    other = graphlora.inject(Net(), tmp_path)
    x = torch.randn(2, 8)
    with torch.no_grad():
        other.get_base_model().load_state_dict(gm.get_base_model().state_dict())
        torch.testing.assert_close(other(x), gm(x), rtol=0, atol=0)
    # hotswap: same keys and shapes, new values, in place
    with torch.no_grad():
        gm.adapter_state.branch("fc1", "default").delta.add_(1.0)
    gm.save_adapter(tmp_path / "v2")
    other.load_adapter(tmp_path / "v2", "default")
    with torch.no_grad():
        torch.testing.assert_close(other(x), gm(x), rtol=0, atol=0)


def test_merge_and_its_refusal():
    torch.manual_seed(3)
    net = Net()
    gm = graphlora.inject(net, OffsetConfig(target_modules=["fc1"], init_zero=False))
    x = torch.randn(3, 8)
    with torch.no_grad():
        want = gm(x)
        gm.merge_adapter()
        torch.testing.assert_close(gm(x), want)
        gm.unmerge_adapter()
        torch.testing.assert_close(gm(x), want)
    gm.add_adapter("on_fc2", OffsetConfig(target_modules=["fc2"], init_zero=False))
    before = snapshot(gm, net)
    with pytest.raises(MergeError, match="has none"):
        gm.merge_adapter(["on_fc2"])
    assert_unchanged(before, snapshot(gm, net))


def test_mixed_batches_refuse_it():
    gm = graphlora.inject(Net(), OffsetConfig(target_modules=["fc1"]))
    with torch.no_grad(), pytest.raises(ConfigError, match="offset"):
        gm(torch.randn(2, 8), adapter_names=["default", "__base__"])


def test_specialize_uses_the_methods_own_step():
    torch.manual_seed(4)
    net = Net()
    gm = graphlora.inject(net, OffsetConfig(target_modules=["fc1"], init_zero=False))
    x = torch.randn(3, 8)
    with torch.no_grad():
        fast = graphlora.specialize(gm)
        torch.testing.assert_close(fast(x), gm(x), rtol=0, atol=0)
        assert "default_gate" not in fast.code and "offset" in fast.code
        gm.disable_adapters()
        bare = graphlora.specialize(gm)
        assert "offset" not in bare.code
        assert torch.equal(bare(x), net(x))
