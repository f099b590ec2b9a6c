"""PEFT-format adapters both ways, with PEFT as the oracle (tiny Llama, GPT-2 Conv1D, BERT)."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import graphlora
from graphlora import AdapterFileError, LoraConfig
from graphlora.peft_format import CONFIG_NAME, WEIGHTS_NAME

from models import token_ids, reset_to_default
from peft_oracle import base, peft_from_pretrained, peft_model, run

pytest.importorskip("peft")

TOL = dict(rtol=1e-5, atol=1e-5)
IDS = token_ids(batch=2, seq=7)
FIRST = {
    "llama": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    "gpt2": LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False),
    "bert": LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False),
}
# (arch, LoraConfig / peft.LoraConfig kwargs): the same dict builds either side's config
VARIANTS = [
    ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    ("llama", dict(r=4, lora_alpha=6, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                   rank_pattern={"k_proj": 2}, alpha_pattern={"o_proj": 3}, use_rslora=True)),
    ("llama", dict(r=3, lora_alpha=5, target_modules=["gate_proj", "down_proj"], layers_to_transform=[1],
                   layers_pattern="layers")),
    ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"])),
    ("gpt2", dict(r=3, lora_alpha=5, target_modules=["c_attn", "c_fc"], use_rslora=True,
                  rank_pattern={r"h\.1\.attn\.c_attn": 5})),
    ("bert", dict(r=4, lora_alpha=8, target_modules=["query", "value"], lora_dropout=0.1)),
    ("bert", dict(r=2, lora_alpha=4, target_modules=r".*\.attention\.self\.(query|key)",
                  alpha_pattern={"key": 7})),
]
IDS_V = [f"{arch}-{i}" for i, (arch, _) in enumerate(VARIANTS)]


@pytest.fixture(scope="module")
def gms():
    """One traced model per architecture, shared by the tests (each cleans up what it adds)."""
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for arch, config in FIRST.items():
            out[arch] = graphlora.inject(base(arch), config)
    return out


@pytest.fixture
def clean(gms):
    """After a test: only the first adapter remains, active, unmerged."""
    yield gms
    reset_to_default(gms.values())


def _peft_sites(model) -> list[str]:
    from peft.tuners.lora import LoraLayer

    return sorted(name for name, m in model.base_model.model.named_modules() if isinstance(m, LoraLayer))


# ---------------------------------------------------------------------------------- layout
def test_saved_files_follow_peft_layout(clean, tmp_path):
    gm = clean["llama"]
    (written,) = gm.save_adapter(tmp_path)
    assert written == str(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, WEIGHTS_NAME]  # no temporaries left behind
    text = (tmp_path / CONFIG_NAME).read_text()
    data = json.loads(text)
    assert text == json.dumps(data, indent=2, sort_keys=True)
    for key in ("peft_type", "r", "lora_alpha", "target_modules", "use_rslora", "lora_dropout",
                "rank_pattern", "alpha_pattern", "fan_in_fan_out", "base_model_name_or_path"):
        assert key in data, key
    assert data["peft_type"] == "LORA" and data["r"] == 4 and data["target_modules"] == ["q_proj", "v_proj"]
    assert data["inference_mode"] is True and data["fan_in_fan_out"] is False
    with safe_open(str(tmp_path / WEIGHTS_NAME), "pt") as fh:
        assert fh.metadata() == {"format": "pt"}
        keys = set(fh.keys())
    sites = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert keys == {f"base_model.model.{s}.{part}.weight" for s in sites for part in ("lora_A", "lora_B")}
    state = gm.get_adapter_state_dict("default")
    assert set(state) == keys
    assert state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 32)
    assert state["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"].shape == (16, 4)


def test_gpt2_config_records_fan_in_fan_out(clean, tmp_path):
    clean["gpt2"].save_adapter(tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["fan_in_fan_out"] is True


# ---------------------------------------------------------------------------------- both ways
@pytest.mark.parametrize("arch,kwargs", VARIANTS, ids=IDS_V)
def test_graphlora_save_peft_load(clean, tmp_path, arch, kwargs):
    gm = clean[arch]
    gm.add_adapter("mine", LoraConfig(init_lora_weights=False, **kwargs))
    ours = run(gm, IDS)
    (directory,) = gm.save_adapter(tmp_path, "mine")
    assert directory == str(tmp_path / "mine")  # non-default adapters go to a subdirectory, as in PEFT
    ref = peft_from_pretrained(arch, directory)
    assert _peft_sites(ref) == sorted(gm.adapter_state.plans["mine"])
    torch.testing.assert_close(ours, run(ref, IDS), **TOL)
    with ref.disable_adapter():
        assert (ours - run(ref, IDS)).abs().max() > 1e-3  # the adapter does something


@pytest.mark.parametrize("arch,kwargs", VARIANTS, ids=IDS_V)
def test_peft_save_graphlora_load(clean, tmp_path, arch, kwargs):
    import peft

    gm = clean[arch]
    ref = peft_model(arch, **kwargs)
    expected = run(ref, IDS)
    ref.save_pretrained(tmp_path)
    gm.load_adapter(tmp_path, "theirs")
    assert gm.active_adapters == ["default"]  # loading does not switch adapters (PEFT's behaviour)
    gm.set_adapter("theirs", inference_mode=True)  # kept frozen (set_adapter alone makes it trainable, as PEFT)
    torch.testing.assert_close(run(gm, IDS), expected, **TOL)
    assert sorted(gm.adapter_state.plans["theirs"]) == _peft_sites(ref)
    # the in-memory state dict is PEFT's, key for key and value for value
    theirs = peft.get_peft_model_state_dict(ref)
    ours = gm.get_adapter_state_dict("theirs")
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=0)
    assert not any(p.requires_grad for _, _, b in gm.graphlora.branches("theirs") for p in b.parameters())


def test_several_adapters_both_ways(tmp_path):
    """PEFT -> graphlora (inject from a path, second adapter from its subdirectory) -> PEFT."""
    ref = peft_model("llama", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import peft

        ref.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=3, target_modules=["k_proj", "o_proj"],
                                                  init_lora_weights=False, use_rslora=True))
    expected = {}
    for name in ("default", "second"):
        ref.set_adapter(name)
        expected[name] = run(ref, IDS)
    ref.save_pretrained(tmp_path / "peft")
    assert (tmp_path / "peft" / "second" / CONFIG_NAME).is_file()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = graphlora.inject(base("llama"), str(tmp_path / "peft"))
    gm.load_adapter(tmp_path / "peft", "second")  # found in peft/second/, as save_pretrained put it
    for name in ("default", "second"):
        gm.set_adapter(name)
        torch.testing.assert_close(run(gm, IDS), expected[name], **TOL)

    written = gm.save_adapter(tmp_path / "ours", adapter_name=None)
    assert written == [str(tmp_path / "ours"), str(tmp_path / "ours" / "second")]
    back = peft_from_pretrained("llama", str(tmp_path / "ours"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back.load_adapter(str(tmp_path / "ours" / "second"), adapter_name="second")
    for name in ("default", "second"):
        back.set_adapter(name)
        torch.testing.assert_close(run(back, IDS), expected[name], **TOL)


# ---------------------------------------------------------------------------------- hotswap
def test_hotswap_copies_in_place(clean, tmp_path):
    gm = clean["llama"]
    before = {k: v.clone() for k, v in gm.get_adapter_state_dict("default").items()}
    gm.save_adapter(tmp_path / "orig")
    # same sites and shapes, different weights and alpha
    ref = peft_model("llama", r=4, lora_alpha=13, target_modules=["q_proj", "v_proj"])
    ref.save_pretrained(tmp_path / "new")
    graph, code = gm.graph, gm.code
    params = [p for _, _, b in gm.graphlora.branches("default") for p in b.parameters()]
    gm.load_adapter(tmp_path / "new", "default")
    assert gm.graph is graph and gm.code == code  # no rebuild
    assert [p for _, _, b in gm.graphlora.branches("default") for p in b.parameters()] == params
    assert gm.adapters["default"].lora_alpha == 13
    torch.testing.assert_close(run(gm, IDS), run(ref, IDS), **TOL)
    gm.load_adapter(tmp_path / "orig", "default", is_trainable=True)
    for key, value in gm.get_adapter_state_dict("default").items():
        assert torch.equal(value, before[key])
    assert all(p.requires_grad for p in params)


def test_hotswap_with_new_dropout_rebuilds(clean, tmp_path):
    """A dropout that appears needs a call node: the graph is re-spliced, the parameters stay the same objects."""
    gm = clean["bert"]
    params = [p for _, _, b in gm.graphlora.branches("default") for p in b.parameters()]
    ref = peft_model("bert", r=4, lora_alpha=8, target_modules=["query", "value"], lora_dropout=0.2)
    ref.save_pretrained(tmp_path)
    gm.load_adapter(tmp_path, "default")
    assert "lora_dropout" in gm.code and gm.adapters["default"].lora_dropout == 0.2
    assert [p for _, _, b in gm.graphlora.branches("default") for p in b.parameters()] == params
    torch.testing.assert_close(run(gm, IDS), run(ref, IDS), **TOL)  # eval: dropout is the identity
    gm.train()
    try:
        assert all(b.lora_dropout.training and b.lora_dropout.p == 0.2 for _, _, b in gm.graphlora.branches("default"))
    finally:
        gm.eval()
    with pytest.raises(AdapterFileError, match="not a directory"):  # before any tracing
        graphlora.inject(base("bert"), str(tmp_path / "missing"))
    assert graphlora.read_adapter_config(tmp_path).lora_dropout == 0.2


# ---------------------------------------------------------------------------------- errors
def _snapshot(gm):
    return (list(gm.adapters), gm.active_adapters, gm.code,
            {k: v.clone() for k, v in gm.get_adapter_state_dict("default").items()}, run(gm, IDS))


def _assert_unchanged(gm, snap):
    adapters, active, code, state, out = snap
    assert list(gm.adapters) == adapters and gm.active_adapters == active and gm.code == code
    for key, value in gm.get_adapter_state_dict("default").items():
        assert torch.equal(value, state[key])
    assert torch.equal(run(gm, IDS), out)


def _edit_config(directory, **changes):
    path = directory / CONFIG_NAME
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_mismatched_shapes_name_key_and_both_shapes(clean, tmp_path):
    gm = clean["llama"]
    snap = _snapshot(gm)
    peft_model("llama", r=8, target_modules=["q_proj", "v_proj"]).save_pretrained(tmp_path)
    with pytest.raises(AdapterFileError) as info:
        gm.load_adapter(tmp_path, "default")  # existing adapter has r=4
    msg = str(info.value)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in msg
    assert "(8, 32)" in msg and "(4, 32)" in msg
    _assert_unchanged(gm, snap)
    # a file whose config disagrees with its own tensors
    _edit_config(tmp_path, r=2)
    with pytest.raises(AdapterFileError, match=r"\(8, 32\).*\(2, 32\)"):
        gm.load_adapter(tmp_path, "other")
    _assert_unchanged(gm, snap)


def test_missing_and_unexpected_keys(clean, tmp_path):
    gm = clean["llama"]
    snap = _snapshot(gm)
    peft_model("llama", r=4, target_modules=["q_proj", "v_proj"]).save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    save_file({k: v for k, v in tensors.items() if k != key}, str(tmp_path / WEIGHTS_NAME), metadata={"format": "pt"})
    with pytest.raises(AdapterFileError, match=r"missing tensor .*layers\.1\.self_attn\.v_proj\.lora_B\.weight"):
        gm.load_adapter(tmp_path, "other")
    _assert_unchanged(gm, snap)
    extra = dict(tensors, **{"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(4, 32)})
    save_file(extra, str(tmp_path / WEIGHTS_NAME), metadata={"format": "pt"})
    with pytest.raises(AdapterFileError, match=r"unexpected tensor .*mlp\.up_proj\.lora_A\.weight"):
        gm.load_adapter(tmp_path, "other")
    _assert_unchanged(gm, snap)


@pytest.mark.parametrize("change,match", [
    (dict(peft_type="IA3"), r"bias='none' is not an IA3Config field"),  # a LoRA file relabelled
    (dict(peft_type="VERA"), "peft_type='VERA'"),  # a method graphlora does not have
    (dict(peft_type="LOHA"), r"bias='none' is not a LoHaConfig field"),  # a LoRA file relabelled
    (dict(lora_bias=True), r"missing tensor .*lora_B\.bias"),  # the config says lora_bias, the file has no bias
    (dict(modules_to_save=["no_such_head"]), "modules_to_save=.*'no_such_head' names no module"),
    (dict(init_lora_weights="pissa"), "pissa"),
])
def test_unsupported_configs_are_refused(clean, tmp_path, change, match):
    gm = clean["llama"]
    snap = _snapshot(gm)
    peft_model("llama", r=4, target_modules=["q_proj", "v_proj"]).save_pretrained(tmp_path)
    _edit_config(tmp_path, **change)
    with pytest.raises(AdapterFileError, match=match):
        gm.load_adapter(tmp_path, "other")
    _assert_unchanged(gm, snap)


def test_missing_directory(clean, tmp_path):
    with pytest.raises(AdapterFileError, match="no adapter_config.json"):
        clean["llama"].load_adapter(tmp_path, "other")
    with pytest.raises(AdapterFileError, match="not a directory"):
        clean["llama"].load_adapter(tmp_path / "nope", "other")


# ---------------------------------------------------------------------------------- crash safety
def test_interrupted_save_keeps_previous_files(clean, tmp_path, monkeypatch):
    gm = clean["llama"]
    expected = run(gm, IDS)
    gm.save_adapter(tmp_path)
    old = {name: (tmp_path / name).read_bytes() for name in (CONFIG_NAME, WEIGHTS_NAME)}
    branch = next(b for _, _, b in gm.graphlora.branches("default"))
    saved = branch.lora_B.weight.detach().clone()
    calls = []

    def crash(src, dst):
        calls.append(dst)
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", crash)
    try:
        with torch.no_grad():
            branch.lora_B.weight.add_(1.0)
        with pytest.raises(OSError, match="simulated crash"):
            gm.save_adapter(tmp_path)
    finally:
        monkeypatch.undo()
        with torch.no_grad():
            branch.lora_B.weight.copy_(saved)
    assert calls  # the save got as far as the rename
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, WEIGHTS_NAME]  # temporaries removed
    for name, data in old.items():
        assert (tmp_path / name).read_bytes() == data
    torch.testing.assert_close(run(peft_from_pretrained("llama", str(tmp_path)), IDS), expected, **TOL)


def test_peft_config_objects_are_read_as_their_files_are(tmp_path):
    """``inject`` / ``add_adapter`` take PEFT's config objects (same configs, same numbers), and
    ``LoraConfig.from_dict`` takes their ``to_dict()`` (``PeftType`` / ``TaskType`` members, sets);
    a PEFT field graphlora does not implement, set, is refused with the fix."""
    import peft

    from graphlora import ConfigError

    theirs = peft.LoraConfig(r=4, lora_alpha=8, target_modules={"q_proj", "v_proj"}, task_type="CAUSAL_LM",
                             init_lora_weights=False)
    ours = LoraConfig.from_dict(theirs.to_dict())
    assert (ours.r, ours.lora_alpha, sorted(ours.target_modules), ours.task_type) == (4, 8, ["q_proj", "v_proj"],
                                                                                      "CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(base("llama"), theirs).eval()
    ref.save_pretrained(tmp_path)
    gm = graphlora.inject(base("llama"), theirs)  # the object itself
    gm.load_adapter(str(tmp_path), "file")
    # the object reads as its file does (a saved file says inference_mode=True, as PEFT's do; a set's order)
    def plain(c):
        return dataclasses.replace(c, inference_mode=False, target_modules=tuple(sorted(c.target_modules)))

    assert plain(gm.peft_config["default"]) == plain(gm.peft_config["file"])
    trained = {k.replace(".file.", ".default."): v for k, v in gm.state_dict().items() if ".file." in k}
    gm.load_state_dict(trained, strict=False)
    gm.set_adapter("default")
    ids = token_ids(2, 5)
    torch.testing.assert_close(run(gm, ids), run(ref, ids), rtol=1e-5, atol=1e-5)
    gm.add_adapter("ia3", peft.IA3Config(target_modules=["q_proj"], feedforward_modules=[]))
    assert type(gm.peft_config["ia3"]).__name__ == "IA3Config"
    with pytest.raises(ConfigError, match="use_qalora.*leave that field at its default"):
        gm.add_adapter("bad", peft.LoraConfig(r=4, target_modules=["q_proj"], use_qalora=True))
    assert "bad" not in gm.adapters


def test_a_peft_file_adapting_lm_head_loads_with_its_base_weight_copy(tmp_path):
    """PEFT's ``save_embedding_layers="auto"`` writes ``lm_head.base_layer.weight`` beside an adapted
    ``lm_head``'s factors: accepted (the model keeps its own weight), equal outputs."""
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(base("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"],
                                                                 init_lora_weights=False)).eval()
        ref.save_pretrained(tmp_path)
    assert "base_model.model.lm_head.base_layer.weight" in load_file(str(tmp_path / WEIGHTS_NAME))
    gm = graphlora.inject(base("llama"), str(tmp_path))
    ids = token_ids(2, 5)
    torch.testing.assert_close(run(gm, ids), run(ref, ids), rtol=1e-5, atol=1e-5)


def test_peft_method_signatures_and_trainability_of_set_adapter(tmp_path):
    """PEFT's keyword names (``add_adapter(peft_config=)``, ``load_adapter(model_id=)``), and PEFT
    0.21's ``set_adapter``: the adapter it activates trains, even one loaded frozen, unless
    ``inference_mode=True``; the trainable counts equal PEFT's at every step."""
    import peft

    from graphlora import ConfigError

    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(base("llama"), peft.LoraConfig(**config)).save_pretrained(tmp_path / "a")
        ref = peft.PeftModel.from_pretrained(base("llama"), str(tmp_path / "a"))  # frozen
        ref.load_adapter(str(tmp_path / "a"), "other")
    gm = graphlora.inject(base("llama"), str(tmp_path / "a"))
    gm.load_adapter(model_id=str(tmp_path / "a"), adapter_name="other")
    assert gm.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    for args in ((("other",), {}), (("default",), {"inference_mode": True}), (("other",), {"inference_mode": False})):
        ref.set_adapter(*args[0], **args[1])
        gm.set_adapter(*args[0], **args[1])
        assert gm.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters(), args
    gm.add_adapter("third", peft_config=peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert "third" in gm.adapters
    with pytest.raises(ConfigError, match="config= and peft_config="):
        gm.add_adapter("fourth", LoraConfig(r=2, target_modules=["q_proj"]), peft_config=LoraConfig())
    with pytest.raises(ConfigError, match="ties"):  # PEFT's ties options are taken, the combination refused
        gm.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix", combination_type="ties", density=0.5)
    assert "fourth" not in gm.adapters and "mix" not in gm.adapters


def test_graphlora_training_is_reachable_after_import_graphlora():
    import subprocess
    import sys

    code = "import graphlora; print(graphlora.training.AdapterTrainer.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("AdapterTrainer"), out.stderr[-2000:]
