"""Fault injection: an exception raised at any step of a save leaves the previous files byte for
byte as they were (and loadable, and no temporaries behind); an exception at any step of a load
leaves the module (graph, weights, adapters, active set) exactly as it was.

Each test first counts how often the patched function is called by a successful run, then
fails each of those calls in turn ("at each step").
"""

from __future__ import annotations

import contextlib
import json
import os

import pytest
import safetensors.torch
import torch
from models import FunctionalMLP
from snapshot import assert_unchanged, snapshot

import graphlora
from graphlora import LoraConfig
from graphlora.banks import SiteBank
from graphlora.methods.lora import LoraBranch
from graphlora.module import AdaptedGraphModule
from graphlora.programs import ProgramSet
from graphlora.state import AdapterState


class Boom(OSError):
    pass


@contextlib.contextmanager
def fail_at(monkeypatch, owner, name: str, n: int | None):
    """Patch ``owner.name`` so that its ``n``-th call raises :class:`Boom` (``None``: never; count calls)."""
    original = getattr(owner, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise Boom(f"simulated failure in {name} (call {n})")
        return original(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(owner, name, wrapper)
        yield calls


def _randomize(gm, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, branch in gm.graphlora.branches():
            for layer in (branch.lora_A, branch.lora_B):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen))


def _files(root) -> dict[str, bytes]:
    out = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = fh.read()
    return out


def _module():
    model = FunctionalMLP()
    gm = graphlora.inject(model, LoraConfig(r=2, target_modules=["fc1", "proj"]))
    gm.add_adapter("b", LoraConfig(r=3, lora_alpha=6, target_modules=["fc2"]))
    _randomize(gm, 0)
    return model, gm


# The steps of a save, as (owner, attribute): every one is made to fail at each of its calls.
SAVE_STEPS = [
    (safetensors.torch, "save"),  # serializing the tensors (per adapter)
    (json, "dumps"),  # the config (per adapter)
    (os, "makedirs"),  # the adapter subdirectory
    (os, "fsync"),  # flushing each staged file
    (os, "replace"),  # renaming each staged file into place
    (os, "link"),  # keeping the previous file's contents before replacing it
]


@pytest.mark.parametrize("which", [["default"], None], ids=["one-adapter", "all-adapters"])
@pytest.mark.parametrize("owner,name", SAVE_STEPS, ids=[n for _, n in SAVE_STEPS])
def test_interrupted_save_keeps_previous_files(monkeypatch, tmp_path, owner, name, which):
    model, gm = _module()
    gm.save_adapter(tmp_path, which)
    previous = _files(tmp_path)
    expected = {n: {k: v.clone() for k, v in gm.get_adapter_state_dict(n).items()} for n in gm.adapters}
    _randomize(gm, 1)  # new weights: a successful save would change the files
    with fail_at(monkeypatch, owner, name, None) as calls:
        gm.save_adapter(tmp_path / "probe", which)
    assert calls["n"] > 0 or name == "link", f"{name} is not a step of save_adapter"
    for n in range(1, calls["n"] + 1):
        with fail_at(monkeypatch, owner, name, n):
            with pytest.raises(Boom):
                gm.save_adapter(tmp_path, which)
        now = {k: v for k, v in _files(tmp_path).items() if not k.startswith("probe")}
        assert now == previous, f"save failing at {name} call {n} changed {set(now) ^ set(previous) or 'contents'}"
    # the previous files still load, with the previous weights
    fresh = graphlora.inject(FunctionalMLP(), tmp_path)
    for adapter in ([] if which else ["b"]):
        fresh.load_adapter(tmp_path, adapter)
    for adapter, tensors in fresh_state(fresh).items():
        for key, value in tensors.items():
            assert torch.equal(value, expected[adapter][key])


def fresh_state(gm):
    return {n: gm.get_adapter_state_dict(n) for n in gm.adapters}


def test_interrupted_save_into_new_directory_writes_no_adapter_file(monkeypatch, tmp_path):
    _, gm = _module()
    with fail_at(monkeypatch, os, "replace", 2):  # after the first file of two was renamed
        with pytest.raises(Boom):
            gm.save_adapter(tmp_path / "new")
    assert _files(tmp_path / "new") == {}


def test_save_after_failures_succeeds(monkeypatch, tmp_path):
    _, gm = _module()
    with fail_at(monkeypatch, os, "fsync", 1):
        with pytest.raises(Boom):
            gm.save_adapter(tmp_path, None)
    gm.save_adapter(tmp_path, None)
    assert sorted(_files(tmp_path)) == sorted(
        ["adapter_config.json", "adapter_model.safetensors", "b/adapter_config.json", "b/adapter_model.safetensors"]
    )


# ------------------------------------------------------------------------------------ loading
def _saved_variant(tmp_path, dropout: float):
    """An adapter 'default' with the module's sites but new weights (and maybe a dropout)."""
    _, other = _module()
    _randomize(other, 7)
    if dropout:
        other.delete_adapter("b")
        other.add_adapter("d", LoraConfig(r=2, target_modules=["fc1", "proj"], lora_dropout=dropout))
        _randomize(other, 7)
        other.save_adapter(tmp_path / "v", "d")
        return tmp_path / "v" / "d"
    other.save_adapter(tmp_path / "v", "default")
    return tmp_path / "v"


LOAD_STEPS = [
    ("graphlora.peft_io", "read_adapter_dir"),
    (torch.Tensor, "copy_"),
    (AdapterState, "sync"),
    (ProgramSet, "rebuild"),
    (AdaptedGraphModule, "add_adapter"),
    (AdapterState, "set_active"),
    (AdaptedGraphModule, "recompile"),
]


def _owner(owner):
    if isinstance(owner, str):
        import importlib

        return importlib.import_module(owner)
    return owner


def _fail_each_call(monkeypatch, owner, name, prepare, act, serve_eval: bool = False):
    """Run ``act(gm)`` on a fresh ``prepare()``d module with the 1st, 2nd, ... call of
    ``owner.name`` failing, until a run makes every call: after each failure the module (snapshot
    and outputs) is as before. Returns (the last module, calls made by the last run, failures seen)."""
    n = 1
    while True:
        model, gm = _module()
        prepare(gm)
        x = torch.randn(3, 12)
        training = gm.training
        if serve_eval:
            gm.eval()  # the serving program, from the banks
        with torch.no_grad():
            y = gm(x)
        gm.train(training)
        before = snapshot(gm, model)
        with fail_at(monkeypatch, owner, name, n) as calls:
            try:
                act(gm)
            except Boom:
                failed = True
            else:
                failed = False
        if not failed:
            return gm, calls["n"], n - 1
        assert_unchanged(before, snapshot(gm, model))
        if serve_eval:
            gm.eval()
        with torch.no_grad():
            assert torch.equal(gm(x), y)
        n += 1


@pytest.mark.parametrize("mode", ["new-name", "hotswap", "hotswap-new-dropout"])
@pytest.mark.parametrize("owner,name", LOAD_STEPS, ids=[n for _, n in LOAD_STEPS])
def test_load_failing_half_way_leaves_module_unchanged(monkeypatch, tmp_path, owner, name, mode):
    directory = _saved_variant(tmp_path, 0.25 if mode == "hotswap-new-dropout" else 0.0)
    target = "fresh" if mode == "new-name" else "default"
    gm, calls, failures = _fail_each_call(
        monkeypatch, _owner(owner), name, lambda gm: gm.set_adapter_weights({"default": 0.5, "b": 2.0}),
        lambda gm: gm.load_adapter(directory, target))
    # the last run made every call without failing; the loaded adapter works
    assert calls >= failures
    assert target in gm.adapters
    if name in ("copy_", "read_adapter_dir", "sync"):
        assert failures > 0, f"{name} was never failed: not a step of this load"


# ------------------------------------------------------------------------------------ adding
ADD_STEPS = [
    (AdapterState, "sync"),
    (LoraBranch, "apply_state"),  # some gates written, the rest not
    ("graphlora.banks", "place_one"),
    ("graphlora.banks", "write_state"),
    (SiteBank, "gather"),  # some sites' gathered factors written in place, the rest not
    (ProgramSet, "invalidate"),
    (torch.Tensor, "copy_"),
]


@pytest.mark.parametrize("owner,name", ADD_STEPS, ids=[n for _, n in ADD_STEPS])
def test_add_failing_half_way_leaves_module_unchanged(monkeypatch, owner, name):
    """add_adapter snapshots only what it can change (the loaded adapters' branches are left out of
    the snapshot): a failure at any call still leaves every adapter's gates, requires_grad, bank
    slots and outputs as they were, in training mode (where adding flips the others' requires_grad)."""
    gm, calls, failures = _fail_each_call(
        monkeypatch, _owner(owner), name, lambda gm: gm.set_adapter(["default", "b"]),
        lambda gm: gm.add_adapter("fresh", LoraConfig(r=2, target_modules=["fc1", "fc2"], init_lora_weights=False)),
        serve_eval=True)
    assert calls >= failures and failures > 0, f"{name} was never failed: not a step of this add"
    assert gm.active_adapters == ["fresh"]


def test_an_interrupt_at_any_line_of_a_hooked_call_leaves_no_lock_no_lent_forward_and_the_hooks(monkeypatch):
    """A call with hooks takes the lent-forward lock and the module's pre-hooks off it for the call;
    a ``KeyboardInterrupt`` delivered at any line of its two frames (outside the ``finally`` that
    puts them back) leaves the lock free for another thread, no ``forward`` on the instance and
    the hooks registered."""
    import sys
    import threading

    from models import tiny_llama, token_ids

    from graphlora import _compat

    gm = graphlora.inject(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"])).eval()
    gm.register_forward_pre_hook(lambda module, args: None)
    gm.register_forward_hook(lambda module, args, out: out)
    ids = token_ids(2, 5)
    frames = ("_hooked_call", "_serve")

    def lines() -> list[int]:
        seen = []

        def tracer(frame, event, arg):
            if frame.f_code.co_name not in frames:
                return None

            def local(f, e, a):
                if e == "line":
                    seen.append(f.f_lineno)
                return local
            return local
        sys.settrace(tracer)
        try:
            gm(ids, use_cache=False)
        finally:
            sys.settrace(None)
        import linecache

        source = AdaptedGraphModule._serve.__wrapped__.__code__.co_filename
        return sorted({n for n in seen if "restore_pre_hooks(" not in linecache.getline(source, n)
                       and "return_forward(" not in linecache.getline(source, n)})

    def lock_free() -> bool:
        got = []

        def take() -> None:
            got.append(_compat._LENT_FORWARD.acquire(timeout=2))
            if got[0]:
                _compat._LENT_FORWARD.release()
        thread = threading.Thread(target=take)
        thread.start()
        thread.join()
        return bool(got and got[0])

    with torch.no_grad():
        want = gm(ids, use_cache=False).logits
        targets = lines()
        assert len(targets) > 5
        for target in targets:
            fired = []

            def tracer(frame, event, arg):
                if frame.f_code.co_name not in frames:
                    return None

                def local(f, e, a):
                    if e == "line" and f.f_lineno == target and not fired:
                        fired.append(target)
                        raise KeyboardInterrupt
                    return local
                return local
            sys.settrace(tracer)
            try:
                with pytest.raises(KeyboardInterrupt):
                    gm(ids, use_cache=False)
            finally:
                sys.settrace(None)
            assert fired == [target]
            assert lock_free(), f"line {target}: the lock is still held"
            assert "forward" not in gm.__dict__, f"line {target}: the forward is still lent"
            assert len(gm._forward_pre_hooks) == 1 and len(gm._forward_hooks) == 1, f"line {target}"
        torch.testing.assert_close(gm(ids, use_cache=False).logits, want)
