"""``autocast_adapter_dtype`` (PEFT's default True): float32 LoRA / IA3 adapters over a bf16 base.

Against PEFT's ``get_peft_model(..., autocast_adapter_dtype=...)`` on a bf16 tiny Llama with the same
(random) adapter weights, for both settings: the parameters' dtype, and the outputs of the switch form
(grad enabled), the serving form (eval, ``no_grad``, read from the banks) and a mixed batch.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import graphlora
from graphlora import IA3Config, LoraConfig

from models import main_output, tiny_llama, token_ids

peft = pytest.importorskip("peft")

IDS = token_ids(batch=2, seq=6)
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _pair(autocast: bool, names=("default",)):
    base = tiny_llama().to(torch.bfloat16).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=TARGETS,
                                                                       init_lora_weights=False),
                                 autocast_adapter_dtype=autocast)
        for name in names[1:]:
            pm.add_adapter(name, peft.LoraConfig(r=2, target_modules=TARGETS, init_lora_weights=False),
                           autocast_adapter_dtype=autocast)
    gm = graphlora.inject(base, LoraConfig(r=4, target_modules=TARGETS), autocast_adapter_dtype=autocast)
    for name in names[1:]:
        gm.add_adapter(name, LoraConfig(r=2, target_modules=TARGETS))
    with torch.no_grad():  # the same weights on both sides
        for path, module in pm.named_modules():
            for name in names:
                if hasattr(module, "lora_A") and name in getattr(module, "lora_A", {}):
                    branch = gm.graphlora.branch(path.removeprefix("base_model.model.").replace(".", "_"), name)
                    branch.lora_A.weight.copy_(module.lora_A[name].weight)
                    branch.lora_B.weight.copy_(module.lora_B[name].weight)
    gm.set_adapter("default")
    return gm.eval(), pm.eval()


@pytest.mark.parametrize("autocast", [True, False])
def test_lora_over_bf16_matches_peft_in_every_form(autocast):
    gm, pm = _pair(autocast, names=("default", "other"))
    want_dtype = torch.float32 if autocast else torch.bfloat16
    assert {p.dtype for n, p in gm.named_parameters() if "lora_" in n} == {want_dtype}
    assert {p.dtype for n, p in pm.named_parameters() if "lora_" in n} == {want_dtype}
    with torch.no_grad():
        want = main_output(pm(input_ids=IDS)).float()
        served = main_output(gm(input_ids=IDS)).float()  # eval + no_grad: the banks
        pm.set_adapter("other")
        want_other = main_output(pm(input_ids=IDS)).float()
        rows = main_output(gm(input_ids=IDS, adapter_names=["default", "other"])).float()
        rows_peft = main_output(pm(input_ids=IDS, adapter_names=["default", "other"])).float()
    switched = main_output(gm(input_ids=IDS)).detach().float()  # grad enabled: each adapter's branch
    assert served.dtype == switched.dtype
    # float32 adapters: the update is added in float32 and rounded once, as PEFT does (0.0 measured here);
    # bf16 adapters: an ulp of rounding-order difference (2.4e-3 measured at logits of magnitude 0.4)
    tol = dict(rtol=0, atol=1e-6) if autocast else dict(rtol=0, atol=8e-3)
    torch.testing.assert_close(switched, want, **tol)
    torch.testing.assert_close(served, want, **tol)
    # mixed rows: PEFT's mixed path rounds each adapter's update to bf16 before adding it
    torch.testing.assert_close(rows, rows_peft, rtol=0, atol=8e-3)
    assert not torch.allclose(want, want_other, rtol=1e-3, atol=1e-3)  # the adapters differ: the check means something


def test_ia3_autocasts_and_dora_keeps_the_base_dtype():
    base = tiny_llama().to(torch.bfloat16)
    gm = graphlora.inject(base, IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    assert {p.dtype for n, p in gm.named_parameters() if "ia3_l" in n} == {torch.float32}
    gm.add_adapter("dora", LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    assert {p.dtype for n, p in gm.named_parameters() if ".dora." in n} == {torch.bfloat16}
    gm.add_adapter("plain16", LoraConfig(r=2, target_modules=["q_proj"]), autocast_adapter_dtype=False)
    assert {p.dtype for n, p in gm.named_parameters() if ".plain16." in n} == {torch.bfloat16}
    gm.set_adapter(["default", "plain16"])
    with torch.no_grad():
        assert main_output(gm.eval()(input_ids=IDS)).dtype == torch.bfloat16
