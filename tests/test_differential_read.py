"""Differential read harness: ``tg.read`` against ``torch.load`` / safetensors, bit for bit.

Files are written by real ``torch.save`` (every save option below) holding every dtype x view
kind x tensor kind; each tensor tg.read gives must equal torch.load's (same dtype, layout, shape,
quantizer, and the same bytes, so NaN payloads and -0.0 count), or raise the specific
TorchgraftError a case names. Adding a case is one line in DTYPES, VIEWS, KINDS, SAVES or
ERROR_CASES.
"""

from __future__ import annotations

import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import torchgraft as tg
from torchgraft.errors import (
    CorruptCheckpointError,
    SelectError,
    TorchgraftError,
    UnsupportedFormatError,
    UnsupportedTensorError,
)
from torchgraft.inspect_ import inspect_checkpoint

warnings.filterwarnings("ignore", message=".*quantiz.*")
warnings.filterwarnings("ignore", message=".*[Nn]ested.*")
warnings.filterwarnings("ignore", message=".*ComplexHalf.*")

# --- what goes into the files -------------------------------------------------------------------

DTYPES: list[torch.dtype] = [
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex32,
    torch.complex64, torch.complex128, torch.bool, torch.int8, torch.int16, torch.int32,
    torch.int64, torch.uint8, torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn,
    torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz, torch.float8_e8m0fnu,
    torch.float4_e2m1fn_x2, torch.bits8, torch.bits16,
]


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random bit patterns of ``dtype`` (NaNs, infinities, -0.0 included); bools are 0/1."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    raw = torch.randint(0, 256, (*shape[:-1], shape[-1] * dtype.itemsize), dtype=torch.uint8,
                        generator=g)
    return raw.view(dtype)


# view kind -> function of a (4, 6) tensor; a view a dtype does not support is skipped
VIEWS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "contiguous": lambda t: t,
    "transposed": lambda t: t.t(),
    "sliced": lambda t: t[:, ::2],
    "offset": lambda t: t[1:, 2:],
    "expanded": lambda t: t[:1].expand(3, 6),
    "conj": lambda t: t.conj() if t.is_complex() else None,
    "conj_imag": lambda t: t.clone().conj().imag if t.is_complex() and t.dtype != torch.complex32
    else None,
    "neg": lambda t: t._neg_view() if t.dtype in (torch.float32, torch.float64, torch.int32,
                                                  torch.complex64, torch.int64) else None,
}


def _q(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.quantize_per_tensor(x, 0.05, 3 if dtype != torch.qint32 else -7, dtype)


def _jagged() -> torch.Tensor:
    return torch.nested.nested_tensor([torch.randn(2, 3), torch.randn(4, 3)], layout=torch.jagged)


# tensor kinds beyond dense storage views
KINDS: dict[str, Callable[[], torch.Tensor]] = {
    "qint8": lambda: _q(torch.randn(3, 4), torch.qint8),
    "quint8": lambda: _q(torch.randn(3, 4), torch.quint8),
    "qint32": lambda: _q(torch.randn(3, 4), torch.qint32),
    "qint8_transposed": lambda: _q(torch.randn(3, 4), torch.qint8).t(),
    "per_channel_quint8": lambda: torch.quantize_per_channel(
        torch.randn(3, 4), torch.tensor([0.1, 0.2, 0.3]), torch.tensor([1, 2, 3]), 0,
        torch.quint8),
    "per_channel_qint8_axis1": lambda: torch.quantize_per_channel(
        torch.randn(3, 4), torch.rand(4) + 0.01, torch.zeros(4, dtype=torch.long), 1,
        torch.qint8),
    "sparse_coo": lambda: torch.randn(4, 5).relu().to_sparse(),
    "sparse_coo_uncoalesced": lambda: torch.sparse_coo_tensor(
        torch.tensor([[0, 0, 2], [1, 1, 3]]), torch.tensor([1.0, 2.0, 3.0]), (3, 4)),
    "sparse_coo_hybrid": lambda: torch.randn(4, 5, 2).to_sparse(1),
    "sparse_coo_complex": lambda: torch.randn(3, 3, dtype=torch.complex64).to_sparse(),
    "sparse_csr": lambda: torch.randn(4, 5).relu().to_sparse_csr(),
    "sparse_csc": lambda: torch.randn(4, 5).relu().to_sparse_csc(),
    "sparse_bsr": lambda: torch.randn(4, 6).to_sparse_bsr((2, 2)),
    "sparse_bsc": lambda: torch.randn(4, 6).to_sparse_bsc((2, 3)),
    "sparse_csr_int32": lambda: torch.sparse_csr_tensor(
        torch.tensor([0, 1, 2], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32),
        torch.tensor([5.0, 6.0]), (2, 2)),
    "nested_strided": lambda: torch.nested.nested_tensor([torch.randn(2, 3), torch.randn(4, 3)]),
    "nested_jagged": _jagged,
    "meta": lambda: torch.empty(3, 4, device="meta"),
    "meta_strided": lambda: torch.empty_strided((3, 4), (1, 3), device="meta"),
    "empty": lambda: torch.empty(0, 3),
    "scalar": lambda: torch.tensor(2.5),
    "parameter": lambda: torch.nn.Parameter(torch.randn(2, 2)),
}


def write_state(path: Path, obj: object, **kw: object) -> None:
    torch.save(obj, path, **kw)


def _deflate(path: Path, obj: object) -> None:
    plain = path.with_suffix(".stored")
    torch.save(obj, plain)
    with zipfile.ZipFile(plain) as zin, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))


def _crc_off(path: Path, obj: object) -> None:
    from torch.utils.serialization import config

    old = config.save.compute_crc32
    config.save.compute_crc32 = False
    try:
        torch.save(obj, path)
    finally:
        config.save.compute_crc32 = old


# save option -> writer(path, object)
SAVES: dict[str, Callable[[Path, object], None]] = {
    "zip": lambda p, o: torch.save(o, p),
    "zip_protocol4": lambda p, o: torch.save(o, p, pickle_protocol=4),
    "legacy_p1": lambda p, o: torch.save(o, p, _use_new_zipfile_serialization=False,
                                         pickle_protocol=1),
    "legacy_p2": lambda p, o: torch.save(o, p, _use_new_zipfile_serialization=False),
    "legacy_p3": lambda p, o: torch.save(o, p, _use_new_zipfile_serialization=False,
                                         pickle_protocol=3),
    "legacy_p4": lambda p, o: torch.save(o, p, _use_new_zipfile_serialization=False,
                                         pickle_protocol=4),
    "legacy_p5": lambda p, o: torch.save(o, p, _use_new_zipfile_serialization=False,
                                         pickle_protocol=5),
    "crc_off": _crc_off,
    "deflated": _deflate,
}


def state_dict() -> dict[str, torch.Tensor]:
    """Every dtype x view kind, plus every tensor kind, in one dict."""
    torch.manual_seed(0)
    out: dict[str, torch.Tensor] = {}
    for i, dtype in enumerate(DTYPES):
        base = random_tensor(dtype, (4, 6), seed=i)
        for view, make in VIEWS.items():
            try:
                t = make(base)
            except (RuntimeError, NotImplementedError):
                t = None
            if t is not None:
                out[f"{str(dtype)[6:]}.{view}"] = t
    out["shared.a"] = out["shared.b"] = torch.randn(3)  # one storage, two names
    for name, make in KINDS.items():
        out[f"kind.{name}"] = make()
    return out


# --- comparison ---------------------------------------------------------------------------------


def _bytes(t: torch.Tensor) -> torch.Tensor:
    t = t.resolve_conj().resolve_neg().contiguous()
    return t.reshape(-1).view(torch.uint8) if t.numel() else t.reshape(-1)


def difference(got: torch.Tensor, want: torch.Tensor) -> str | None:
    """Why ``got`` is not exactly ``want`` (None when it is)."""
    if (got.dtype, got.layout, got.is_nested, got.is_meta) != (
            want.dtype, want.layout, want.is_nested, want.is_meta):
        return (f"kind {got.dtype}/{got.layout}/nested={got.is_nested}/meta={got.is_meta} vs "
                f"{want.dtype}/{want.layout}/nested={want.is_nested}/meta={want.is_meta}")
    if want.is_nested:
        pairs = list(zip(got.unbind(), want.unbind()))
        if len(pairs) != want.size(0):
            return "nested component count"
        bad = [i for i, (a, b) in enumerate(pairs) if difference(a, b)]
        return f"nested components {bad} differ" if bad else None
    if got.shape != want.shape:
        return f"shape {list(got.shape)} vs {list(want.shape)}"
    if want.is_meta:
        return None
    if want.is_quantized:
        if got.qscheme() != want.qscheme():
            return f"qscheme {got.qscheme()} vs {want.qscheme()}"
        if want.qscheme() == torch.per_tensor_affine:
            params = [(got.q_scale(), got.q_zero_point()), (want.q_scale(), want.q_zero_point())]
            if params[0] != params[1]:
                return f"quantizer {params[0]} vs {params[1]}"
        elif not (torch.equal(got.q_per_channel_scales(), want.q_per_channel_scales())
                  and torch.equal(got.q_per_channel_zero_points(),
                                  want.q_per_channel_zero_points())
                  and got.q_per_channel_axis() == want.q_per_channel_axis()):
            return "per-channel quantizer differs"
        got, want = got.int_repr(), want.int_repr()
    elif want.layout != torch.strided:
        if want.layout == torch.sparse_coo and got.is_coalesced() != want.is_coalesced():
            return "coalesced flag"
        got, want = got.to_dense(), want.to_dense()
    if not torch.equal(_bytes(got), _bytes(want)):
        return "values differ"
    return None


def assert_reads_like_torch(path: Path, expected: dict[str, torch.Tensor]) -> None:
    loaded = torch.load(path, weights_only=False, map_location="cpu")
    got = tg.read(path)
    assert sorted(got) == sorted(loaded), "tg.read lists other names than torch.load"
    bad = {}
    for name, want in loaded.items():
        why = difference(got[name], want)
        if why:
            bad[name] = why
    assert not bad, f"{len(bad)} tensor(s) differ from torch.load: {bad}"


def torch_legacy_unreadable(t: torch.Tensor) -> bool:
    """torch 2.14's legacy loader fails on the dtypes saved as untyped storages, and rebuilds
    strided nested tensors from garbage sizes."""
    return t.dtype in torch.storage._new_dtypes() or (t.is_nested and t.layout == torch.strided)


# --- the matrix ---------------------------------------------------------------------------------


@pytest.mark.parametrize("save", list(SAVES))
def test_every_dtype_view_and_kind_reads_like_torch_load(tmp_path: Path, save: str) -> None:
    sd = state_dict()
    path = tmp_path / f"{save}.pth"
    if save.startswith("legacy"):
        # torch.load itself cannot read these back from legacy files: compare tg.read with the
        # tensors that were saved, then the rest with torch.load
        odd = {k: v for k, v in sd.items() if torch_legacy_unreadable(v)}
        SAVES[save](path, odd)
        got = tg.read(path)
        bad = {n: difference(got[n], w) for n, w in odd.items() if difference(got[n], w)}
        assert not bad, bad
        sd = {k: v for k, v in sd.items() if k not in odd}
    SAVES[save](path, sd)
    assert_reads_like_torch(path, sd)


def test_safetensors_every_dtype_it_writes(tmp_path: Path) -> None:
    from safetensors.torch import _SIZE, load_file, save_file

    tensors = {str(dtype)[6:]: random_tensor(dtype, (3, 4), seed=7) for dtype in _SIZE
               if dtype is not None}
    tensors["empty"] = torch.empty(0, 2)
    path = tmp_path / "all.safetensors"
    save_file(tensors, path)
    want, got = load_file(path), tg.read(path)
    assert sorted(got) == sorted(want)
    bad = {n: difference(got[n], w) for n, w in want.items() if difference(got[n], w)}
    assert not bad, bad


def test_inspect_stats_on_every_dtype_and_kind(tmp_path: Path) -> None:
    path = tmp_path / "all.pth"
    torch.save(state_dict(), path)
    info = inspect_checkpoint(path, stats=True)
    assert len(info["tensors"]) == len(torch.load(path, weights_only=False))
    no_stats = {t["name"]: t["na"] for t in info["tensors"] if "na" in t}
    assert all(reason.startswith("n/a: ") for reason in no_stats.values())
    # only dtypes without arithmetic and meta tensors lack statistics
    assert {n.split(".")[0] for n in no_stats} == {"float4_e2m1fn_x2", "bits8", "bits16", "kind"}
    assert {n for n in no_stats if n.startswith("kind.")} == {"kind.meta", "kind.meta_strided"}


def test_cli_inspect_stats_on_every_dtype_and_kind(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    from torchgraft.cli import main

    path = tmp_path / "all.pth"
    torch.save(state_dict(), path)
    assert main(["inspect", str(path), "--stats"]) == 0
    out = capsys.readouterr().out
    assert "float4_e2m1fn_x2.contiguous" in out and "kind.qint8" in out


def test_protocol2_builtins_are_plain_data(tmp_path: Path) -> None:
    meta = {"c": 1 + 2j, "f": frozenset({1, 2}), "b": bytearray(b"xy"), "s": slice(1, 5, 2)}
    path = tmp_path / "p2.pth"
    torch.save({"w": torch.ones(2), "meta": meta}, path, pickle_protocol=2)
    assert b"__builtin__" in zipfile.ZipFile(path).read("p2/data.pkl")
    sd = tg.read(path)
    assert sd.checkpoint.root["meta"] == meta
    assert sd.checkpoint.placeholders == []


# --- files that hold no state dict, and tensors that cannot be rebuilt ---------------------------


def _torchscript(path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    torch.jit.save(torch.jit.trace(model.eval(), torch.randn(4, 3)), path)


def test_torchscript_archive_reads_its_weights(tmp_path: Path) -> None:
    path = tmp_path / "ts.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _torchscript(path)
    want = torch.jit.load(path).state_dict()
    got = tg.read(path)
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert any("TorchScript" in n for n in got.checkpoint.notes)


class _Exported(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.bn = torch.nn.BatchNorm1d(2)
        self.t = torch.nn.Parameter(torch.randn(4, 5).t())  # a transposed view
        self.register_buffer("scratch", torch.ones(1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.lin(x)) + self.scratch + self.t.sum()


def _export(path: Path) -> None:
    ep = torch.export.export(_Exported().eval(), (torch.randn(2, 3),))
    torch.export.save(ep, path)


def test_torch_export_archive_reads_its_weights(tmp_path: Path) -> None:
    path = tmp_path / "prog.pt2"
    _export(path)
    want = torch.export.load(path).state_dict
    got = tg.read(path)
    assert sorted(got) == sorted(want)
    bad = {n: difference(got[n], w) for n, w in want.items() if difference(got[n], w)}
    assert not bad, bad
    assert got.checkpoint.format == "torch-export"


def _export_without_weights_config(path: Path) -> None:
    full = path.with_suffix(".full")
    _export(full)
    with zipfile.ZipFile(full) as zin, zipfile.ZipFile(path, "w") as zout:
        for info in zin.infolist():
            if not info.filename.endswith("_weights_config.json"):
                zout.writestr(info, zin.read(info.filename))


class _StorageLessSubclass:
    """Pickles as torch pickles a tensor subclass without storage (a fake/functional tensor)."""

    def __reduce__(self) -> tuple:
        return (torch._utils._rebuild_wrapper_subclass,
                (torch.Tensor, torch.float32, (3, 4), (4, 1), 0, torch.strided,
                 torch.device("cpu"), False))


def _fake(path: Path) -> None:
    torch.save({"w": torch.ones(2), "fake": _StorageLessSubclass()}, path)


def _unknown_rebuilder(path: Path) -> None:
    class Odd:
        def __reduce__(self) -> tuple:
            return (torch._utils._rebuild_device_tensor_from_numpy, (None, None, "xla", False))

    torch.save({"w": torch.ones(2), "odd": [Odd()]}, path)


def _sparse_out_of_bounds(path: Path) -> None:
    bad = torch.sparse_coo_tensor(torch.tensor([[0, 7]]), torch.tensor([1.0, 2.0]), (3,),
                                  check_invariants=False)
    torch.save({"s": bad}, path)


def _csr_bad_order(path: Path) -> None:
    bad = torch.sparse_csr_tensor(torch.tensor([0, 2, 1]), torch.tensor([0, 1]),
                                  torch.tensor([1.0, 2.0]), (2, 2), check_invariants=False)
    torch.save({"s": bad}, path)


def _deflated_corrupt(path: Path) -> None:
    _deflate(path, {"w": torch.arange(1000.0)})
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("deflated_corrupt/data/0")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    data[start + info.compress_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _future_metadata(path: Path) -> None:
    from tests.corpus import pickle_module

    t = torch.ones(3)

    def newer_torch(func, args):  # noqa: ANN001, ANN202
        return func, args + ({"neg": False, "sparkle": True},)

    torch.save({"w": torch.ones(2), "t": t}, path,
               pickle_module=pickle_module(tensor_hooks={id(t): newer_torch}))


# name -> (writer, error class, words the message must hold)
ERROR_CASES: dict[str, tuple[Callable[[Path], None], type[TorchgraftError], str]] = {
    "single_tensor": (lambda p: torch.save(torch.ones(3), p), SelectError, "single tensor"),
    "tensor_list": (lambda p: torch.save([torch.ones(3), torch.ones(2)], p), SelectError,
                    "list of 2 tensors"),
    "torch_export_unreadable": (_export_without_weights_config, UnsupportedFormatError,
                                "torch.export"),
    "storage_less_subclass": (_fake, UnsupportedTensorError, "'fake'"),
    "unknown_tensor_metadata": (_future_metadata, UnsupportedTensorError, "'t' is a tensor with "
                                "metadata torchgraft does not know: ['sparkle']"),
    "bad_device_tensor": (_unknown_rebuilder, CorruptCheckpointError, "device tensor"),
    "sparse_index_out_of_bounds": (_sparse_out_of_bounds, CorruptCheckpointError, "sparse_coo"),
    "csr_indices_out_of_order": (_csr_bad_order, CorruptCheckpointError, "sparse_csr"),
    "deflated_corrupt": (_deflated_corrupt, CorruptCheckpointError, "data/0"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_clear_error(tmp_path: Path, case: str) -> None:
    write, error, words = ERROR_CASES[case]
    path = tmp_path / f"{case}.pth"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write(path)
    with pytest.raises(error) as info:
        sd = tg.read(path)
        for name in sd:
            sd[name]  # tensor data is checked when it is read
    assert words in str(info.value)
    assert "Traceback" not in str(info.value)


def test_conj_neg_views_keep_their_bits_in_alias_keys(tmp_path: Path) -> None:
    z = torch.tensor([1 + 2j, 3 - 4j])
    path = tmp_path / "c.pth"
    torch.save({"z": z, "zc": z.conj()}, path)
    refs = tg.read(path).refs
    assert refs["z"].alias_key() != refs["zc"].alias_key()
    assert refs["zc"].dtype == torch.complex64 and refs["zc"].shape == (2,)
    out = torch.empty(2, dtype=torch.complex64)
    refs["zc"].read_into(out)
    assert torch.equal(out, z.conj().resolve_conj())


def test_quantized_and_sparse_read_into_same_kind(tmp_path: Path) -> None:
    q = _q(torch.randn(3, 4), torch.qint8)
    s = torch.randn(4, 5).relu().to_sparse()
    path = tmp_path / "k.pth"
    torch.save({"q": q, "s": s}, path)
    refs = tg.read(path).refs
    qout = torch.quantize_per_tensor(torch.zeros(3, 4), 1.0, 0, torch.qint8)
    refs["q"].read_into(qout)
    assert torch.equal(qout.int_repr(), q.int_repr()) and qout.q_scale() == q.q_scale()
    sout = torch.zeros(4, 5).to_sparse()
    refs["s"].read_into(sout)
    assert torch.equal(sout.to_dense(), s.to_dense())
    dense = torch.empty(4, 5)
    refs["s"].read_into(dense)
    assert torch.equal(dense, s.to_dense())
    with pytest.raises(UnsupportedTensorError, match="non-quantized"):
        refs["q"].read_into(torch.empty(3, 4))
    with pytest.raises(UnsupportedTensorError, match="meta"):
        path2 = tmp_path / "m.pth"
        torch.save({"m": torch.empty(2, device="meta")}, path2)
        tg.read(path2).refs["m"].read_into(torch.empty(2))


# --- hostile rebuild arguments (hand-made, as a hostile file would give them) -------------------

HOSTILE_SCRIPT = r"""
import resource, sys, torch
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
from torchgraft.errors import TorchgraftError
from torchgraft.formats import tensor_kinds as tk
from torchgraft.tensors import MemoryRef as M
L = torch.tensor
buf = M(torch.arange(10.0))
cases = {
    "nested_outside": lambda: tk.rebuild_nested_tensor(buf, M(L([[4], [3]])), M(L([[1], [1]])),
                                                        M(L([0, 8]))),
    "nested_wraps_int64": lambda: tk.rebuild_nested_tensor(
        buf, M(L([[2**40, 2**40]])), M(L([[2**40, 2**40]])), M(L([0]))),
    "nested_zero_stride": lambda: tk.rebuild_nested_tensor(buf, M(L([[2**60]])), M(L([[0]])),
                                                           M(L([0]))),
    "nested_negative": lambda: tk.rebuild_nested_tensor(buf, M(L([[2]])), M(L([[-1]])),
                                                        M(L([5]))),
    "coo_index_past_size": lambda: tk.rebuild_sparse_tensor(
        torch.sparse_coo, (M(L([[0, 2**40]])), M(L([1.0, 2.0])), (3,), False)),
    "coo_negative_index": lambda: tk.rebuild_sparse_tensor(
        torch.sparse_coo, (M(L([[-5]])), M(L([1.0])), (3,), True)),
    "csr_plain_past_size": lambda: tk.rebuild_sparse_tensor(
        torch.sparse_csr, (M(L([0, 1, 2])), M(L([0, 99])), M(L([1.0, 2.0])), (2, 2))),
    "csr_compressed_past_nnz": lambda: tk.rebuild_sparse_tensor(
        torch.sparse_csr, (M(L([0, 1, 50])), M(L([0, 1])), M(L([1.0, 2.0])), (2, 2))),
    "jagged_offsets_past_values": lambda: tk.rebuild_njt(
        {"values": M(torch.randn(4, 3)), "offsets": M(L([0, 2, 40]))}),
}
for name, make in cases.items():
    try:
        make().materialize()
    except TorchgraftError as err:
        print(name, "refused:", type(err).__name__)
    else:
        print(name, "ACCEPTED")
"""


def test_hostile_rebuild_arguments_are_refused_in_a_bounded_subprocess(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(Path(tg.__file__).parent.parent))
    run = subprocess.run([sys.executable, "-c", HOSTILE_SCRIPT], capture_output=True, text=True,
                         timeout=120, env=env)
    lines = [ln for ln in run.stdout.splitlines() if ln]
    assert run.returncode == 0, run.stderr[-2000:]
    assert len(lines) == 9 and all("refused: CorruptCheckpointError" in ln for ln in lines), lines


@pytest.mark.parametrize("call, error", [
    (lambda: _kinds().with_metadata(_m([1.0]), {"conj": True}), CorruptCheckpointError),
    (lambda: _kinds().with_metadata(_m([1.0]), {"zap": True}).materialize(),
     UnsupportedTensorError),
    (lambda: _kinds().with_metadata(_m([1.0]), {"neg": "yes"}), CorruptCheckpointError),
    (lambda: _kinds().rebuild_sparse_tensor(torch.sparse_coo, (_m([[0]]), _m([1.0]), (3, 4),
                                                               True)), CorruptCheckpointError),
    (lambda: _kinds().rebuild_sparse_tensor(torch.sparse_coo, (_m([[0.5]]), _m([1.0]), (3,),
                                                               True)), CorruptCheckpointError),
    (lambda: _kinds().rebuild_sparse_tensor(torch.sparse_coo, (_m([[0]]), _m([1.0]), (-3,),
                                                               True)), CorruptCheckpointError),
    (lambda: _kinds().rebuild_sparse_tensor(torch.sparse_csr, ("x", _m([0]), _m([1.0]), (1, 1))),
     CorruptCheckpointError),
    (lambda: _kinds().rebuild_meta_tensor(torch.float32, (2, 3), (1,)), CorruptCheckpointError),
    (lambda: _kinds().rebuild_meta_tensor("float", (2,), (1,)), CorruptCheckpointError),
    (lambda: _kinds().rebuild_njt({"values": _m([1.0]), "offsets": "no"}),
     CorruptCheckpointError),
])
def test_bad_rebuild_arguments_raise_before_reading(call: Callable, error: type) -> None:
    with pytest.raises(error):
        call()


def _kinds():  # noqa: ANN202
    from torchgraft.formats import tensor_kinds

    return tensor_kinds


def _m(values: list) -> tg.tensors.MemoryRef:
    from torchgraft.tensors import MemoryRef

    return MemoryRef(torch.tensor(values))


def test_quantized_parameters_are_checked(tmp_path: Path) -> None:
    """Per-channel scales of the wrong length, an axis out of range, a non-finite scale."""
    from torchgraft.formats import tensor_kinds as tk
    from torchgraft.formats.unpickler import StorageRef

    def storage(n: int) -> StorageRef:
        def make(storage, dt, off, shape, stride):  # noqa: ANN001, ANN202
            from torchgraft.tensors import MemoryRef

            return MemoryRef(torch.zeros(shape, dtype=dt))

        return StorageRef(torch.qint8, n, make)

    scales, zps = _m([0.1, 0.2]), tg.tensors.MemoryRef(torch.tensor([0, 0]))
    bad = [
        ((torch.per_channel_affine, scales, zps, 5), "axis"),
        ((torch.per_channel_affine, scales, zps, 0), "scales"),  # size[0] is 3
        ((torch.per_tensor_affine, float("nan"), 0), "scale"),
        ((torch.per_tensor_affine, 0.1, 0.5), "zero point"),
        (("per_tensor_affine", 0.1, 0), None),
    ]
    for params, words in bad:
        if words is None:
            ref = tk.rebuild_qtensor(storage(12), 0, (3, 4), (4, 1), params)
            assert isinstance(ref, tk.UnsupportedRef)
            continue
        with pytest.raises(CorruptCheckpointError, match=words):
            tk.rebuild_qtensor(storage(12), 0, (3, 4), (4, 1), params)


def test_subclass_with_an_unknown_torch_rebuilder_is_an_error_not_dropped(tmp_path: Path) -> None:
    from tests.corpus import Call, RawGlobal, pickle_module

    future = RawGlobal("torch._utils", "_rebuild_future_kind")  # what a newer torch might write
    sub = Call(RawGlobal("torch._tensor", "_rebuild_from_type_v2"), future,
               RawGlobal("torch", "Tensor"), (1, 2), {})
    path = tmp_path / "sub.pth"
    torch.save({"w": torch.ones(2), "odd": sub}, path, pickle_module=pickle_module())
    with pytest.raises(UnsupportedTensorError, match="'odd'.*_rebuild_future_kind"):
        tg.read(path)


@pytest.mark.parametrize("save", ["zip", "legacy_p4", "crc_off", "deflated"])
def test_load_copies_what_load_state_dict_copies(tmp_path: Path, save: str) -> None:
    """Views with conj/neg bits, offsets and stride 0 land in a model as load_state_dict puts
    them (the copy path, not only tg.read)."""
    sd = {name.replace(".", "_"): t for name, t in state_dict().items()
          if name.split(".")[0] in ("float32", "complex64", "int64", "float16", "bool")}
    path = tmp_path / f"{save}.pth"
    SAVES[save](path, sd)

    def model() -> torch.nn.Module:
        m = torch.nn.Module()
        for name, t in sd.items():
            m.register_buffer(name, torch.zeros(t.shape, dtype=t.dtype))
        return m

    ours, theirs = model(), model()
    report = tg.load(ours, path, strict=True)
    theirs.load_state_dict(torch.load(path, weights_only=False))
    assert report.ok and len(report.entries) == len(sd)
    bad = [n for n, t in theirs.state_dict().items() if difference(ours.state_dict()[n], t)]
    assert not bad, bad


def test_deflated_storages_are_bounded_by_the_decompression_limit(tmp_path: Path) -> None:
    path = tmp_path / "big.pth"
    _deflate(path, {"w": torch.zeros(4096)})  # 16 KiB that deflate to a few bytes
    with tg.limits_raised(max_decompressed_bytes=8192):
        # (a ResourceLimitError; raised inside unpickling, which may re-wrap it)
        with pytest.raises(CorruptCheckpointError, match="max_decompressed_bytes"):
            tg.read(path)
    assert torch.equal(tg.read(path)["w"], torch.zeros(4096))
