"""Every documented error (docs/errors.md): its type, the built-in it subclasses, a message that
names the offending value and the fix, and, after it, the model, the graph (``gm.code`` of every
traced signature) and every adapter (weights, configs, active set, gates) exactly as before."""

from __future__ import annotations

import json
import os

import pytest
import torch
from models import FunctionalMLP, tiny_llama, token_ids
from snapshot import assert_unchanged, snapshot
from torch import nn

import graphlora
from graphlora import LoraConfig
from graphlora.errors import (
    AdapterExistsError,
    AdapterFileError,
    AdapterNotFoundError,
    AdapterStateError,
    ConfigError,
    NoTargetError,
    PlacementError,
    SignatureError,
    TargetTypeError,
    TraceError,
    UnknownFieldError,
)


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.act = nn.GELU()

    def forward(self, x):
        return self.act(self.fc(x))


class Body(nn.Module):
    def __init__(self, d: int = 8, n: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(d) for _ in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class Stack(nn.Module):
    """fx-traceable; paths ``body.layers.<i>.fc`` carry a layer index (no ``model.config``)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = Body()
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.body(x))


def _random_b(gm, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, branch in gm.graphlora.branches():
            branch.lora_B.weight.copy_(torch.randn(branch.lora_B.weight.shape, generator=gen))


@pytest.fixture
def mlp():
    """A fx-traced MLP with two adapters (random B), 'b' weighted, and a second traced program."""
    model = FunctionalMLP()
    gm = graphlora.inject(model, LoraConfig(r=2, target_modules=["fc1", "proj"]))
    gm.add_adapter("b", LoraConfig(r=3, lora_alpha=6, target_modules=["fc2"], lora_dropout=0.1))
    gm.set_adapter_weights({"default": 1.0, "b": 0.5})
    _random_b(gm)
    gm.eval()
    return model, gm


@pytest.fixture(scope="module")
def llama():
    model = tiny_llama(layers=2)
    gm = graphlora.inject(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    gm.add_adapter("other", LoraConfig(r=4, target_modules=["o_proj"]))
    gm.set_adapter("default")
    _random_b(gm)
    gm(token_ids(2, 5))
    gm(input_ids=token_ids(2, 5), attention_mask=torch.ones(2, 5, dtype=torch.long))  # a second program
    assert len(gm.programs) == 2
    return model, gm


@pytest.fixture
def unchanged(request):
    """``check(model, gm)`` context: snapshot, run the body, compare."""

    class _Check:
        def __init__(self, model, gm=None):
            self.model, self.gm = model, gm

        def __enter__(self):
            self.before = snapshot(self.gm, self.model)
            return self

        def __exit__(self, *exc):
            assert_unchanged(self.before, snapshot(self.gm, self.model))
            return False

    return _Check


def _saved(gm, tmp_path, name="default"):
    directory = tmp_path / "saved"
    gm.save_adapter(directory, name)
    return directory if name == "default" else directory / name


# ---------------------------------------------------------------------------------------- config
def test_no_site_matches_lists_closest_paths(mlp, unchanged):
    model, gm = mlp
    with unchanged(model, gm):
        with pytest.raises(NoTargetError) as info:
            gm.add_adapter("c", LoraConfig(target_modules=["fc3"]))
    assert isinstance(info.value, ValueError)
    msg = str(info.value)
    assert "'fc3'" in msg and "fc1" in msg and "fc2" in msg and "list_sites" in msg


@pytest.mark.parametrize("kwargs,match", [
    (dict(r=0), r"r=0 must be a positive integer"),
    (dict(r=-3), r"r=-3 must be a positive integer"),
    (dict(r=2.5), r"r=2.5 must be a positive integer"),
    (dict(lora_alpha="16"), r"lora_alpha='16' must be a finite number"),
    (dict(lora_alpha=float("nan")), r"lora_alpha=nan must be a finite number"),
    (dict(target_modules="fc(1"), r"target_modules='fc\(1' is not a valid regular expression"),
    (dict(exclude_modules="[a-"), r"exclude_modules='\[a-' is not a valid regular expression"),
    (dict(rank_pattern={"fc(": 2}), r"rank_pattern key='fc\(' is not a valid regular expression"),
    (dict(target_modules=["fc1"], layers_to_transform=[-1]), r"negative index"),
    (dict(lora_dropout=1.5), r"lora_dropout=1.5 must be a number in \[0, 1\)"),
])
def test_bad_config_values_name_the_field(kwargs, match):
    with pytest.raises(ConfigError, match=match) as info:
        LoraConfig(**kwargs)
    assert isinstance(info.value, ValueError)


def test_unknown_field_names_the_closest_one():
    with pytest.raises(UnknownFieldError, match=r"no field 'target_module'.*'target_modules'") as info:
        LoraConfig(target_module=["q_proj"])
    assert isinstance(info.value, TypeError) and isinstance(info.value, ConfigError)
    with pytest.raises(TypeError, match=r"'lora_alfa'.*'lora_alpha'"):
        LoraConfig(lora_alfa=16)
    with pytest.raises(ConfigError, match=r"unknown LoraConfig field 'lora_dropuot'.*'lora_dropout'"):
        LoraConfig.from_dict({"peft_type": "LORA", "lora_dropuot": 0.1}, strict=True)
    assert LoraConfig.from_dict({"peft_type": "LORA", "lora_dropuot": 0.1}).lora_dropout == 0.0  # lenient default


def test_layers_out_of_range_from_model_config(llama, unchanged):
    model, gm = llama
    with unchanged(model, gm):
        with pytest.raises(ConfigError, match=r"layers_to_transform=\(0, 5\): layer\(s\) \[5\] do not exist; "
                                              r"the model has 2 layers .*num_hidden_layers"):
            gm.add_adapter("c", LoraConfig(target_modules=["k_proj"], layers_to_transform=[0, 5]))


def test_layers_out_of_range_from_site_paths(unchanged):
    model = Stack()
    gm = graphlora.inject(model, LoraConfig(target_modules=["fc"], layers_to_transform=[2]))
    assert [s.name for s in gm.sites if s.ranks] == ["body.layers.2.fc"]
    with unchanged(model, gm):
        with pytest.raises(ConfigError, match=r"layer\(s\) \[3\] do not exist; the model has 3 layers .*site paths"):
            gm.add_adapter("c", LoraConfig(target_modules=["fc"], layers_to_transform=3))


def test_layers_without_any_layer_index(mlp, unchanged):
    model, gm = mlp
    with unchanged(model, gm):
        with pytest.raises(ConfigError, match=r"no linear site path has a layer index.*layers_pattern"):
            gm.add_adapter("c", LoraConfig(target_modules=["fc1"], layers_to_transform=[0]))


def test_errors_at_inject_leave_the_model_alone(unchanged):
    model = Stack().train()
    with unchanged(model):
        with pytest.raises(NoTargetError):
            graphlora.inject(model, LoraConfig(target_modules=["nope"]))
        with pytest.raises(TargetTypeError, match=r"selects 'body', which is .*Body \(a container of \['layers'\]\)"):
            graphlora.inject(model, LoraConfig(target_modules=".*"))
        with pytest.raises(ConfigError, match=r"layer\(s\) \[4\] do not exist"):
            graphlora.inject(model, LoraConfig(target_modules=["fc"], layers_to_transform=[4]))
        with pytest.raises(ConfigError, match="config must be"):
            graphlora.inject(model, {"r": 8})
    assert all(p.requires_grad for p in model.parameters())


# ----------------------------------------------------------------------------------------- model
class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: neither fx nor export can trace it
            return self.fc(x)
        return x


def test_untraceable_names_each_frontend_and_the_fix(unchanged):
    model = Untraceable().train()
    with unchanged(model):
        with pytest.raises(TraceError) as info:
            graphlora.inject(model, LoraConfig(target_modules=["fc"]))
    msg = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert "fx.symbolic_trace: TraceError" in msg and "control flow" in msg
    assert "torch.export: not tried, it needs example inputs" in msg
    assert "example_inputs" in msg and "is_leaf_module" in msg
    with unchanged(model):
        with pytest.raises(TraceError) as info:
            graphlora.inject(model, LoraConfig(target_modules=["fc"]), example_inputs=(torch.randn(2, 4),))
    assert "torch.export (strict=False): " in str(info.value) and "data-dependent" in str(info.value)


@pytest.mark.parametrize("target,what", [
    (["act_fn"], "SiLUActivation"),
    (["mlp"], r"LlamaMLP \(a container of \['gate_proj', 'up_proj', 'down_proj', 'act_fn'\]\).*inside it"),
])
def test_target_that_is_not_linear_says_what_it_is(llama, unchanged, target, what):
    model, gm = llama
    with unchanged(model, gm):
        with pytest.raises(TargetTypeError, match=r"selects 'model\.[a-z_.0-9]+', which is .*" + what) as info:
            gm.add_adapter("c", LoraConfig(target_modules=target))
    assert isinstance(info.value, ValueError) and "not a linear op" in str(info.value)


def test_dtype_mismatch_between_base_and_adapters(mlp, unchanged, tmp_path):
    model, gm = mlp
    directory = _saved(gm, tmp_path)
    model.to(torch.float64)  # the original model, behind gm's back: shared weights are now float64
    try:
        with unchanged(model, gm):
            with pytest.raises(PlacementError, match=r"site 'fc1' the base weight is torch.float64 on cpu but "
                                                     r"adapter 'default' has lora_A.weight in torch.float32.*gm.to"):
                gm.add_adapter("c", LoraConfig(target_modules=["fc1"]))
            with pytest.raises(PlacementError, match="float64"):
                gm.load_adapter(directory, "c")
            with pytest.raises(PlacementError, match="float64"):
                gm.load_adapter(directory, "default")  # hotswap
    finally:
        model.to(torch.float32)
    gm.to(torch.float64)  # the fix
    gm.load_adapter(directory, "c")
    assert gm.graphlora.branch("fc1", "c").lora_A.weight.dtype == torch.float64


def test_loading_onto_meta_base_weights_is_refused(tmp_path, unchanged):
    src = graphlora.inject(FunctionalMLP(), LoraConfig(target_modules=["fc1"]))
    directory = _saved(src, tmp_path)
    with torch.device("meta"):
        model = FunctionalMLP()
    gm = graphlora.inject(model, LoraConfig(target_modules=["fc2"]))
    with unchanged(model, gm):
        with pytest.raises(PlacementError, match=r"'fc1' is on the meta device.*to_empty"):
            gm.load_adapter(directory, "x")


# -------------------------------------------------------------------------------------- adapters
def test_unknown_adapter_everywhere(mlp, unchanged, tmp_path):
    model, gm = mlp
    calls = [
        lambda: gm.set_adapter("nope"),
        lambda: gm.set_adapter(["default", "nope"]),
        lambda: gm.set_adapter_weights({"nope": 1.0}),
        lambda: gm.delete_adapter("nope"),
        lambda: gm.save_adapter(tmp_path / "x", "nope"),
        lambda: gm.get_adapter_state_dict("nope"),
        lambda: gm.merge_adapter(["nope"]),
        lambda: gm(torch.randn(2, 12), adapter_names=["default", "nope"]),
    ]
    with unchanged(model, gm):
        for call in calls:
            with pytest.raises(AdapterNotFoundError, match=r"'nope'.*\['default', 'b'\]") as info:
                call()
            assert isinstance(info.value, KeyError)
    assert not (tmp_path / "x").exists()


def test_duplicate_and_bad_names(mlp, unchanged):
    model, gm = mlp
    with unchanged(model, gm):
        with pytest.raises(AdapterExistsError, match=r"'b' already exists .*delete_adapter") as info:
            gm.add_adapter("b", LoraConfig(target_modules=["fc1"]))
        assert isinstance(info.value, ValueError)
        for bad in ("a.b", "", "__base__", 3):
            with pytest.raises(ConfigError, match="not usable"):
                gm.add_adapter(bad, LoraConfig(target_modules=["fc1"]))
        with pytest.raises(ConfigError, match="finite number"):
            gm.set_adapter_weights({"b": float("inf")})
        with pytest.raises(ConfigError, match="at least one"):
            gm.set_adapter([])


def test_deleting_the_only_adapter(unchanged):
    model = FunctionalMLP()
    gm = graphlora.inject(model, LoraConfig(target_modules=["fc1"]))
    with unchanged(model, gm):
        with pytest.raises(AdapterStateError, match=r"'default' is the only adapter.*disable_adapters") as info:
            gm.delete_adapter("default")
    assert isinstance(info.value, ValueError)


def _rewrite_weights(directory, change):
    from safetensors.torch import load_file, save_file

    path = os.path.join(directory, "adapter_model.safetensors")
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _rewrite_config(directory, change):
    path = os.path.join(directory, "adapter_config.json")
    with open(path) as fh:
        data = json.load(fh)
    change(data)
    with open(path, "w") as fh:
        json.dump(data, fh)


@pytest.mark.parametrize("name", ["new", "default"], ids=["new-name", "hotswap"])
def test_bad_files_are_refused_and_change_nothing(llama, unchanged, tmp_path, name):
    model, gm = llama
    good = _saved(gm, tmp_path)
    key_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"

    def copy_dir(tag):
        target = tmp_path / tag
        target.mkdir()
        for f in os.listdir(good):
            if os.path.isfile(good / f):
                (target / f).write_bytes((good / f).read_bytes())
        return target

    wrong_shape = copy_dir("shape")
    _rewrite_weights(wrong_shape, lambda t: t.__setitem__(key_a, torch.zeros(3, 32)))
    missing = copy_dir("missing")
    _rewrite_weights(missing, lambda t: t.pop(key_a))
    extra = copy_dir("extra")
    _rewrite_weights(extra, lambda t: t.__setitem__(key_a.replace("q_proj", "k_proj"), torch.zeros(2, 32)))
    truncated = copy_dir("truncated")
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    garbage = copy_dir("garbage")
    (garbage / "adapter_model.safetensors").write_bytes(b"PK\x03\x04 this is a zip, not safetensors")
    pickled = copy_dir("pickled")  # a torch.save pickle under the safetensors name
    (pickled / "adapter_model.safetensors").unlink()
    torch.save({key_a: torch.zeros(2, 32)}, pickled / "adapter_model.safetensors")
    other_type = copy_dir("ia3prefix")
    _rewrite_config(other_type, lambda d: d.update(peft_type="PREFIX_TUNING"))
    bad_r = copy_dir("bad_r")
    _rewrite_config(bad_r, lambda d: d.update(r=0))
    bad_json = copy_dir("bad_json")
    (bad_json / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    no_weights = copy_dir("no_weights")
    (no_weights / "adapter_model.safetensors").unlink()
    int_weights = copy_dir("int_weights")
    _rewrite_weights(int_weights, lambda t: t.__setitem__(key_a, torch.zeros(2, 32, dtype=torch.int32)))

    cases = [
        (wrong_shape, r"tensor '.*q_proj\.lora_A\.weight' has shape \(3, 32\) in the file but the model expects \(2, 32\)"),
        (missing, r"missing tensor '.*layers\.0\.self_attn\.q_proj\.lora_A\.weight' \(expected shape \(2, 32\)"),
        (extra, r"unexpected tensor '.*k_proj\.lora_A\.weight'.*another model"),
        (truncated, r"cannot read the adapter weights .*SafetensorError.*truncated, corrupt"),
        (garbage, r"cannot read the adapter weights .*SafetensorError.*truncated, corrupt or not in the format"),
        (pickled, r"cannot read the adapter weights .*save or download it again"),
        (other_type, r"peft_type='PREFIX_TUNING' is not supported.*'LORA'"),
        (bad_r, r"r=0 must be a positive integer"),
        (bad_json, r"cannot read .*adapter_config\.json"),
        (no_weights, r"no adapter_model\.safetensors \(or adapter_model\.bin\)"),
        (int_weights, r"dtype torch\.int32; .*weights are floating point"),
    ]
    with unchanged(model, gm):
        for directory, match in cases:
            with pytest.raises(AdapterFileError, match=match) as info:
                gm.load_adapter(directory, name)
            assert isinstance(info.value, ValueError)
            assert str(directory) in str(info.value)  # names the file it refused
    assert gm.load_adapter(good, name) is None  # the good directory still loads


def test_hotswap_with_other_sites_is_refused(llama, unchanged, tmp_path):
    model, gm = llama
    other = _saved(gm, tmp_path, "other")  # o_proj, r=4
    with unchanged(model, gm):
        with pytest.raises(AdapterFileError, match=r"delete_adapter\('default'\) first or load under another name"):
            gm.load_adapter(other, "default")


# ----------------------------------------------------------------------------------------- calls
def test_fx_call_that_does_not_fit_names_the_traced_signature(mlp, unchanged):
    model, gm = mlp
    with unchanged(model, gm):
        with pytest.raises(SignatureError, match=r"traced signature forward\(x: 'torch.Tensor'\).*: too many positional") as info:
            gm(torch.randn(2, 12), torch.randn(2, 12))
        assert isinstance(info.value, TypeError)
        with pytest.raises(SignatureError, match=r"\(y=<Tensor>\) does not fit the traced signature forward\(x"):
            gm(y=torch.randn(2, 12))
    with pytest.raises(RuntimeError):  # an error inside the model is not reported as a signature error
        gm(torch.randn(2, 5))


def test_export_call_that_does_not_fit(llama, unchanged):
    model, gm = llama
    with unchanged(model, gm):
        with pytest.raises(SignatureError, match=r"takes at most \d+ positional arguments \(input_ids, ") as info:
            gm(*([token_ids(2, 5)] * 40))
        assert isinstance(info.value, TypeError)
        with pytest.raises(SignatureError, match=r"multiple values for argument\(s\) \['input_ids'\]"):
            gm(token_ids(2, 5), input_ids=token_ids(2, 5))
    # an unseen signature that cannot be traced lists the traced ones; nothing is added
    with unchanged(model, gm):
        with pytest.raises(SignatureError, match=r"Traced signatures: \(input_ids=<tensor>, use_cache=False\)"):
            gm(input_ids=token_ids(2, 5)[0])  # 1-D token ids: the model cannot trace them


def test_a_base_cast_behind_the_modules_back_is_caught_whichever_adapter_shows_it():
    """float32 adapters over a bf16 base are fine (autocast_adapter_dtype), so the first adapter of a
    site cannot stand for the others: a bf16 one shows that the base went to float32."""
    src = tiny_llama().to(torch.bfloat16)
    gm = graphlora.inject(src, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    gm.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj"]), autocast_adapter_dtype=False)
    src.float()  # the original model, not the adapted module
    before = snapshot(gm)
    with pytest.raises(PlacementError, match=r"adapter 'b' has lora_A.weight in torch.bfloat16"):
        gm.add_adapter("c", LoraConfig(r=2, target_modules=["q_proj"]))
    assert_unchanged(before, snapshot(gm))
