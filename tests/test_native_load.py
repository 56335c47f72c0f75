"""Differential tests: ``tg.load`` leaves the model exactly as ``load_state_dict(strict=False)``.

Each case is a model factory and a checkpoint; torch's own ``load_state_dict`` on one fresh
model is the reference, ``tg.load`` (from memory and from a ``torch.save`` file) on another.
Models here have load pre/post hooks, ``_load_from_state_dict`` overrides, extra state, lazy
and quantized modules, BatchNorm version rules. Add a case: one ``Case(...)`` line in CASES.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import torchgraft as tg

torch.manual_seed(0)


# --- modules with their own loading code --------------------------------------------------


class Resizing(nn.Module):
    """A pos-embed whose pre-hook resamples the checkpoint's grid (mmpretrain ViT style)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, n, 4))
        self.fc = nn.Linear(4, 4)
        self._register_load_state_dict_pre_hook(self._resize)

    def _resize(self, sd: dict, prefix: str, *args: Any) -> None:
        key = prefix + "pos"
        if key in sd and sd[key].shape != self.pos.shape:
            grid = sd[key].permute(0, 2, 1)
            sd[key] = nn.functional.interpolate(grid, size=self.pos.shape[1]).permute(0, 2, 1)


class Transposing(nn.Linear):
    """Stores its weight transposed in checkpoints (a ``_load_from_state_dict`` override)."""

    def _load_from_state_dict(self, sd, prefix, *args):  # noqa: ANN001
        key = prefix + "weight_t"
        if key in sd:
            sd[prefix + "weight"] = sd.pop(key).t()
        super()._load_from_state_dict(sd, prefix, *args)


class WithPostHook(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.seen_missing: list[str] | None = None
        self.register_load_state_dict_post_hook(self._post)

    @staticmethod
    def _post(module: WithPostHook, keys: Any) -> None:
        module.seen_missing = sorted(keys.missing_keys)


class DictExtra(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.config = {"scale": 1.0}

    def get_extra_state(self) -> Any:
        return dict(self.config)

    def set_extra_state(self, state: Any) -> None:
        self.config = dict(state)


class TensorExtra(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.calib = torch.zeros(3)

    def get_extra_state(self) -> Any:
        return self.calib

    def set_extra_state(self, state: Any) -> None:
        self.calib = state.clone()


class Renaming(nn.Module):
    """A root pre-hook that converts an old key layout (mmpretrain ``_checkpoint_filter``)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 4)
        self._register_load_state_dict_pre_hook(self._convert)

    @staticmethod
    def _convert(sd: dict, prefix: str, *args: Any) -> None:
        for key in [k for k in sd if k.startswith(prefix + "ln1.")]:
            sd[prefix + "norm1." + key[len(prefix + "ln1."):]] = sd.pop(key)


def _failing_hook(sd: dict, prefix: str, *args: Any) -> None:
    raise ValueError("checkpoint from the wrong family")


def failing() -> nn.Module:
    m = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    m[1]._register_load_state_dict_pre_hook(_failing_hook)
    return m


def _rand(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for t in model.state_dict(keep_vars=True).values():
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                t.copy_(torch.randn_like(t))
    return model


def _sd(model: nn.Module) -> dict[str, Any]:
    return {k: (v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v))
            for k, v in _rand(model).state_dict().items()}


def _bn_v1() -> dict[str, Any]:
    """A checkpoint of a conv+BN written before num_batches_tracked existed (version 1)."""
    sd = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).state_dict()
    out = type(sd)((k, v) for k, v in sd.items() if "num_batches" not in k)
    out._metadata = {"": {"version": 1}, "0": {"version": 1}, "1": {"version": 1}}
    return out


def _quantized_linear() -> nn.Module:
    return torch.ao.nn.quantized.Linear(4, 3)


def _dict_extra_src() -> dict[str, Any]:
    m = DictExtra()
    m.config = {"scale": 2.5, "name": "calibrated"}
    return _sd(m)


def _tensor_extra_src() -> dict[str, Any]:
    m = TensorExtra()
    m.calib = torch.arange(3.0)
    return _sd(m)


def _renamed_src() -> dict[str, Any]:
    sd = _sd(Renaming())
    return {k.replace("norm1.", "ln1."): v for k, v in sd.items()}


@dataclass
class Case:
    name: str
    model: Callable[[], nn.Module]
    checkpoint: Callable[[], dict[str, Any]]
    options: dict[str, Any] | None = None


CASES = [
    Case("pre-hook resizes", lambda: nn.Sequential(Resizing(8)), lambda: _sd(nn.Sequential(
        Resizing(4)))),
    Case("pre-hook, same shape", lambda: nn.Sequential(Resizing(4)),
         lambda: _sd(nn.Sequential(Resizing(4)))),
    Case("override transposes", lambda: nn.Sequential(Transposing(3, 2)),
         lambda: {"0.weight_t": torch.randn(3, 2), "0.bias": torch.randn(2)}),
    Case("post-hook sees missing", lambda: nn.Sequential(WithPostHook(), nn.Linear(3, 1)),
         lambda: {"0.lin.weight": torch.randn(3, 3)}),
    Case("dict extra state", DictExtra, _dict_extra_src),
    Case("tensor extra state", TensorExtra, _tensor_extra_src),
    Case("root pre-hook renames", Renaming, _renamed_src),
    Case("BatchNorm without num_batches_tracked, no metadata",
         lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)),
         lambda: {k: v for k, v in _sd(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
                  .items() if "num_batches" not in k}),
    Case("BatchNorm version 1 file", lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)),
         _bn_v1),
    Case("lazy module", lambda: nn.Sequential(nn.LazyLinear(3)), lambda: _sd(nn.Sequential(
        nn.Linear(5, 3)))),
    Case("0-dim from 1-element", lambda: _Scalar(), lambda: {"s": torch.tensor([3.5])}),
    Case("quantized Linear", _quantized_linear, lambda: _quantized_linear().state_dict()),
    Case("sparse COO buffer", lambda: SparseBuffer(), lambda: _sparse_src()),
    Case("mismatch skipped inside a hooked module", lambda: nn.Sequential(Resizing(4),
                                                                        nn.Linear(4, 10)),
         lambda: _sd(nn.Sequential(Resizing(4), nn.Linear(4, 1000))), {"mismatch": "skip"}),
]


class SparseBuffer(nn.Module):
    """A sparse COO buffer: torch's own copy_ loads it; torchgraft routes it natively."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("adj", torch.zeros(4, 4).to_sparse())
        self.lin = nn.Linear(4, 4)


def _sparse_src() -> dict[str, Any]:
    m = SparseBuffer()
    m.adj = (torch.eye(4) * 3).to_sparse()
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


class _Scalar(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.tensor(0.0))


def _state(model: nn.Module) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in model.state_dict().items():
        if isinstance(v, torch.Tensor) and v.layout != torch.strided:
            out[k] = (str(v.layout), v.to_dense())
        elif isinstance(v, torch.Tensor) and v.is_quantized:
            out[k] = (v.int_repr(), v.q_scale() if v.qscheme() == torch.per_tensor_affine
                      else v.q_per_channel_scales())
        else:
            out[k] = v
    for name, mod in model.named_modules():  # attributes hooks set (post-hook records)
        for attr in ("seen_missing", "config"):
            if hasattr(mod, attr):
                out[f"{name}.{attr}"] = getattr(mod, attr)
    return out


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, tuple):
            assert all(torch.equal(p, q) if isinstance(p, torch.Tensor) else p == q
                       for p, q in zip(x, y)), k
        elif isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and x.shape == y.shape, k
            assert torch.equal(x, y), k
        else:
            assert x == y, k


def _reference(case: Case, ckpt: dict[str, Any]) -> tuple[nn.Module, Any]:
    torch.manual_seed(1)
    model = case.model()
    if case.options and case.options.get("mismatch") == "skip":  # torch has no skip: drop them
        shapes = {k: v.shape for k, v in model.state_dict().items()}
        ckpt = {k: v for k, v in ckpt.items() if k not in shapes or shapes[k] == v.shape
                or k.endswith("pos")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        keys = model.load_state_dict(copy.copy(ckpt), strict=False)
    return model, keys


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@pytest.mark.parametrize("via", ["memory", "file"])
def test_same_as_load_state_dict(case: Case, via: str, tmp_path):
    torch.manual_seed(0)
    ckpt = case.checkpoint()
    ref, keys = _reference(case, ckpt)
    torch.manual_seed(1)
    ours = case.model()
    source: Any = ckpt
    if via == "file":
        torch.save(ckpt, tmp_path / "c.pth")
        source = tmp_path / "c.pth"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = tg.load(ours, source, progress=False, **(case.options or {}))
    _same(_state(ref), _state(ours))
    skipped = {e.target for e in report.mismatched}  # torch's reference saw them as missing
    assert sorted(report.missing_keys) == sorted(set(keys.missing_keys) - skipped)


def test_resized_tensor_is_reported_with_hook_and_both_shapes():
    src = nn.Sequential(Resizing(4))
    report = tg.plan(nn.Sequential(Resizing(8)), _sd(src))
    (entry,) = report.by_action("adapted")
    assert entry.target == "0.pos" and entry.source == "0.pos"
    assert entry.source_shape == (1, 4, 4) and entry.target_shape == (1, 8, 4)
    assert "Resizing._resize" in entry.reason
    assert "adapted (1):" in str(report) and "[1, 4, 4] -> [1, 8, 4]" in str(report)
    assert report.loaded_fraction == 1.0


def test_renamed_by_hook_is_reported_with_its_file_name():
    report = tg.plan(Renaming(), _renamed_src(), auto=False)
    entry = next(e for e in report.entries if e.target == "norm1.weight")
    assert entry.action == "copied" and entry.source == "ln1.weight"
    assert "renamed" in entry.reason and "_convert" in entry.reason
    assert not report.unexpected_keys


def test_failing_hook_is_an_error_before_any_write():
    model = failing()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(tg.LoadHookError, match="_failing_hook") as err:
        tg.load(model, _sd(failing()))
    assert "wrong family" in str(err.value) and "hooks=False" in str(err.value)
    _same(before, dict(model.state_dict()))
    tg.load(model, _sd(failing()), hooks=False)  # the escape hatch copies plainly


def test_hooks_run_on_copies_while_planning():
    calls: list[int] = []
    model = nn.Sequential(nn.Linear(2, 2))
    model[0].register_load_state_dict_post_hook(lambda m, k: calls.append(id(m)))
    before = model[0].weight.clone()
    tg.plan(model, _sd(nn.Sequential(nn.Linear(2, 2))))
    assert calls and id(model[0]) not in calls  # ran, but on a copy
    assert torch.equal(model[0].weight, before)
    tg.load(model, _sd(nn.Sequential(nn.Linear(2, 2))))
    assert calls[-1] == id(model[0])


def test_shape_mismatch_after_hook_is_refused():
    src = _sd(nn.Sequential(Resizing(4), nn.Linear(4, 1000)))
    with pytest.raises(tg.ShapeMismatchError, match="1.weight"):
        tg.load(nn.Sequential(Resizing(8), nn.Linear(4, 10)), src)


def test_plain_models_keep_the_fast_path():
    report = tg.plan(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2)),
                     nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4),
                                   nn.Linear(4, 2)).state_dict())
    assert not any("own loading code" in n for n in report.notes)


def test_dtensor_target_is_refused_not_crashed(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch built without distributed")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29541")
    dist.init_process_group("gloo", rank=0, world_size=1,
                            init_method=f"file://{tmp_path / 'rdzv'}")
    try:
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        sd = _sd(copy.deepcopy(model))
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        for hooks in (True, False):
            with pytest.raises(tg.UnsupportedTargetError, match="DTensor"):
                tg.load(model, sd, hooks=hooks)
    finally:
        dist.destroy_process_group()


# --- mmpretrain: the seed's own framework ------------------------------------------------


def test_mmpretrain_vit_finetuned_at_another_resolution(tmp_path):
    pytest.importorskip("mmpretrain")
    from mmpretrain.models.backbones import VisionTransformer

    def vit(size: int) -> nn.Module:
        torch.manual_seed(size)
        return VisionTransformer(arch="deit-tiny", img_size=size, patch_size=16)

    src = vit(224)
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in src.state_dict().items()}},
               tmp_path / "vit224.pth")
    ref = vit(384)
    ref.load_state_dict(src.state_dict(), strict=False)  # mmpretrain's hook resizes pos_embed
    ours = vit(384)
    report = tg.load(ours, tmp_path / "vit224.pth", prefix="backbone")
    _same(dict(ref.state_dict()), dict(ours.state_dict()))
    (entry,) = report.by_action("adapted")
    assert entry.target == "pos_embed" and entry.source_shape == (1, 197, 192)
    assert entry.target_shape == (1, 577, 192) and "_prepare_pos_embed" in entry.reason
    from torchgraft.convert import convert  # the file convert --model writes needs no hook

    result = convert(tmp_path / "vit224.pth", tmp_path / "vit384.safetensors", model=vit(384),
                     prefix="backbone", verify=True)
    assert result.verified and "pos_embed" in result.names
    again = vit(384)
    report = tg.load(again, tmp_path / "vit384.safetensors")
    assert report.ok and not report.by_action("adapted") and report.loaded_fraction == 1.0
    _same(dict(ref.state_dict()), dict(again.state_dict()))


# --- options and partial loads --------------------------------------------------------------


def test_options_are_validated():
    model = nn.Linear(2, 2)
    sd = model.state_dict()
    with pytest.raises(tg.OptionError, match="swapped"):
        tg.load("x.pth", model)
    with pytest.raises(tg.OptionError, match="strict='false'"):
        tg.load(model, sd, strict="false")
    with pytest.raises(tg.OptionError, match="mismatch"):
        tg.plan(model, sd, mismatch="ignore")
    with pytest.raises(tg.OptionError, match="min_loaded"):
        tg.load(model, sd, min_loaded=90)
    import inspect

    assert inspect.signature(tg.load).parameters["mismatch"].default is None


def test_min_loaded_refuses_before_any_write_and_low_loads_warn():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 100))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = {"0.weight": torch.ones(2, 2), "0.bias": torch.ones(2)}
    with pytest.raises(tg.TooLittleLoadedError, match="min_loaded=0.9"):
        tg.load(model, small, min_loaded=0.9)
    _same(before, dict(model.state_dict()))
    with pytest.warns(UserWarning, match="only 2.0% of the model"):
        tg.load(model, small)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tg.load(model, small, min_loaded=0.01)  # asked for: no warning


def test_low_load_names_a_shard_of_a_folder(tmp_path):
    from safetensors.torch import save_file

    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(4)])
    sd = model.state_dict()
    names = list(sd)
    save_file({k: sd[k] for k in names[:2]}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({k: sd[k] for k in names[2:]}, tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(tg.TooLittleLoadedError, match="pass the folder"):
        tg.load(model, tmp_path / "model-00001-of-00002.safetensors", min_loaded=0.9)


def test_shape_mismatch_error_lists_every_mismatch():
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(15)])
    src = nn.Sequential(*[nn.Linear(5, 5) for _ in range(15)]).state_dict()
    with pytest.raises(tg.ShapeMismatchError) as err:
        tg.load(model, src, mismatch="error")
    assert str(err.value).startswith("30 tensor(s)")
    assert all(f"{i}.weight" in str(err.value) for i in range(15))


def test_quantized_file_tensor_into_float_model_is_refused_like_torch(tmp_path):
    q = torch.quantize_per_tensor(torch.randn(3, 2), 0.1, 0, torch.qint8)
    torch.save({"weight": q, "bias": torch.zeros(3)}, tmp_path / "q.pth")
    with pytest.raises(RuntimeError, match="quantized"):
        nn.Linear(2, 3).load_state_dict(torch.load(tmp_path / "q.pth", weights_only=False))
    model = nn.Linear(2, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(tg.UnsupportedTargetError, match="weight .quantized per-tensor qint8."):
        tg.load(model, tmp_path / "q.pth")
    _same(before, dict(model.state_dict()))


def _linear_with_pre_hook(hook) -> nn.Module:
    """A real ``nn.Linear`` with a load pre-hook, as frameworks register them."""
    module = nn.Linear(2, 2)
    module._register_load_state_dict_pre_hook(hook)
    return module


def test_a_hook_speaks_once_though_it_runs_on_a_copy_first(capsys, caplog):
    """The dry run on a copy holds back the hook's prints, log records and warnings; the real
    load emits them once. A hook that fails shows what it printed in the error."""
    import logging
    import warnings

    def chatty(state, prefix, *args):
        print("resizing the weight")
        logging.getLogger("chatty").warning("resized")
        warnings.warn("a hook warning", UserWarning, stacklevel=1)

    def broken(state, prefix, *args):
        print("expected key 'proj.w'")
        raise KeyError("proj.w")

    sd = nn.Linear(2, 2).state_dict()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        tg.load(_linear_with_pre_hook(chatty), sd)
    assert capsys.readouterr().out.count("resizing the weight") == 1
    assert [r.getMessage() for r in caplog.records if r.name == "chatty"] == ["resized"]
    assert sum("a hook warning" in str(w.message) for w in seen) == 1
    report = tg.plan(_linear_with_pre_hook(chatty), sd)  # planning alone: only on a copy
    assert report.ok and "resizing" not in capsys.readouterr().out
    with pytest.raises(tg.LoadHookError, match="it printed: expected key 'proj.w'"):
        tg.load(_linear_with_pre_hook(broken), sd)
