"""The ``torchgraft`` command line, end to end on real checkpoints.

Every command runs at least once as a real subprocess (``python -m torchgraft``: exit codes,
stdout/stderr, no colour when piped); the rest runs in-process through ``main(argv)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import torchgraft as tg
from torchgraft import demo
from torchgraft.cli import main
from torchgraft.cli.common import Style, parse_rename
from torchgraft.cli.specs import build_model, looks_like_spec, parse_spec, parse_value
from torchgraft.compare import suggest

try:
    import realmodels as rm
except ImportError:  # pragma: no cover - tests/ imported as a package
    from tests import realmodels as rm

BACKBONE = "torchgraft.demo:ConvNeXtV2"
CLF10 = "torchgraft.demo:Classifier?num_classes=10"


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m torchgraft ARGS`` as users do; output is piped, so never coloured."""
    env = {**os.environ, "COLUMNS": "120"}
    proc = subprocess.run([sys.executable, "-m", "torchgraft", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=300)
    assert "\x1b[" not in proc.stdout + proc.stderr
    return proc


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def dtype_zoo() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 4, generator=g, dtype=torch.float64)
    shared = torch.randn(5, 3, generator=g)
    nan = torch.randn(7, generator=g)
    nan[2], nan[4] = float("nan"), float("inf")
    return {
        "f64": base, "f32": base.float(), "f16": base.half(), "bf16": base.bfloat16(),
        "f8_e4m3": base.float().to(torch.float8_e4m3fn),
        "f8_e5m2": base.float().to(torch.float8_e5m2),
        "i64": torch.arange(-5, 5), "i32": torch.arange(6, dtype=torch.int32),
        "i16": torch.arange(3, dtype=torch.int16),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 1, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]), "nan": nan, "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3), "zeros": torch.zeros(4),
        "tied_a": shared, "tied_b": shared, "transposed": base.float().t(),
    }


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> SimpleNamespace:
    """Real checkpoints: mmengine-wrapped classifier, DDP, and a dtype zoo."""
    d = tmp_path_factory.mktemp("cli")
    clf, _ = demo.trained_classifier(1000)
    rm.mm_wrapped_checkpoint(clf, d / "wrapped.pth", epoch=100)
    clf10, _ = demo.trained_classifier(10, seed=3)
    torch.save(rm.ddp_prefixed(clf10.state_dict()), d / "ddp.pth")
    zoo = dtype_zoo()
    torch.save({"state_dict": zoo, "epoch": 3}, d / "zoo.pth")
    return SimpleNamespace(dir=d, clf=clf, clf10=clf10, zoo=zoo, wrapped=d / "wrapped.pth",
                           ddp=d / "ddp.pth", zoo_path=d / "zoo.pth")


# --- subprocess: every command as users run it ---------------------------------------------------


def test_version_and_usage_errors():
    proc = cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"torchgraft {tg.__version__}"
    proc = cli("inspect")
    assert proc.returncode == 2
    assert proc.stderr.startswith("torchgraft: error: ") and len(proc.stderr.splitlines()) == 1


def test_inspect_wrapped(ws):
    proc = cli("inspect", ws.wrapped)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "torch-zip" in out and "epoch" in out and "int: 100" in out
    assert "optimizer" in out and "mmengine_version" in out  # the meta dict, inline
    assert "*  state_dict  70 tensors" in out
    assert "backbone.stages.{0..3}.{0..1}.grn.gamma" in out and "x5" in out


def test_inspect_stats_json(ws):
    proc = cli("inspect", ws.zoo_path, "--stats", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["schema"] == "torchgraft.inspect/1" and info["selected"] == "state_dict"
    rows = {t["name"]: t for t in info["tensors"]}
    assert rows["nan"]["nan"] == 1 and rows["nan"]["inf"] == 1
    assert set(rows["nan"]["flags"]) == {"nan", "inf"} and rows["zeros"]["flags"] == ["all_zero"]
    assert rows["i8"]["min"] == -128 and rows["i8"]["max"] == 127
    assert rows["empty"]["min"] is None and rows["scalar"]["std"] == 0.0
    assert ["tied_a", "tied_b"] in info["shared"]
    assert {r["key"]: r["value"] for r in info["container"]}["epoch"] == 3


def test_errors_are_one_line_and_debug_shows_traceback(tmp_path):
    proc = cli("inspect", tmp_path / "missing.pth")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("torchgraft: error: ") and "no such file" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = cli("inspect", tmp_path / "missing.pth", "--debug")
    assert proc.returncode == 2 and "Traceback" in proc.stderr


@pytest.mark.parametrize("ext", ["safetensors", "pth"])
def test_convert_round_trip_bit_exact(ws, ext):
    dst = ws.dir / f"zoo_rt.{ext}"
    before = sha256(ws.zoo_path)
    proc = cli("convert", ws.zoo_path, dst, "--verify", "--json")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["schema"] == "torchgraft.convert/1" and res["ok"] and res["verified"] is True
    assert res["aliases"] == {"tied_b": "tied_a"} and res["tensors"] == len(ws.zoo)
    assert sha256(ws.zoo_path) == before  # SRC untouched
    if ext == "safetensors":
        got = load_file(dst)  # the reference reader accepts the file
        assert set(got) == set(ws.zoo) - {"tied_b"}
        meta = tg.read(dst).metadata
        assert json.loads(meta["torchgraft.aliases"]) == {"tied_b": "tied_a"}
        prov = json.loads(meta["torchgraft"])
        assert prov["source"]["sha256"] == before and prov["source"]["selected"] == "state_dict"
    else:
        saved = torch.load(dst, weights_only=True)
        got = saved["state_dict"]
        assert json.loads(saved["__torchgraft__"]["torchgraft"])["source"]["file"] == "zoo.pth"
        assert got["tied_a"].data_ptr() == got["tied_b"].data_ptr()  # still one storage
        assert tg.read(dst).selected == "state_dict"
    for name, t in got.items():
        assert same_bits(t, ws.zoo[name]), name


def test_convert_prefix_loads_with_no_options_and_refuses_overwrite(ws):
    dst = ws.dir / "backbone.safetensors"
    proc = cli("convert", ws.wrapped, dst, "--prefix", "backbone", "--verify")
    assert proc.returncode == 0, proc.stderr
    assert "verified: all 68 stored tensors are bit-exact" in proc.stdout
    model = demo.ConvNeXtV2()
    report = tg.load(model, dst, strict=True)
    assert report.loaded_fraction == 1.0 and not report.rules
    want = ws.clf.backbone.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    digest = sha256(dst)
    proc = cli("convert", ws.wrapped, dst, "--prefix", "backbone")
    assert proc.returncode == 2 and "exists" in proc.stderr and "--force" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and sha256(dst) == digest
    assert not [p for p in ws.dir.iterdir() if p.name.endswith(".tmp")]


def test_convert_with_model_uses_the_load_plan(ws):
    dst = ws.dir / "from_ddp.pth"
    proc = cli("convert", ws.ddp, dst, "--model", "torchgraft.demo:Classifier",
               "--kwargs", '{"num_classes": 10}', "--dtype", "bf16")
    assert proc.returncode == 0, proc.stderr
    assert "loads into torchgraft.demo:Classifier with no options: 100%" in proc.stdout
    sd = tg.read(dst)
    assert not any(n.startswith("module.") for n in sd)
    assert {sd.ref(n).dtype for n in sd} == {torch.bfloat16}
    model = demo.Classifier(10).to(torch.bfloat16)
    assert tg.load(model, dst, strict=True).loaded_fraction == 1.0
    assert torch.equal(model.head.weight, ws.clf10.head.weight.bfloat16())


def test_check_exit_codes(ws):
    ok = cli("check", ws.wrapped, "--model", BACKBONE, "--prefix", "backbone")
    assert ok.returncode == 0, ok.stderr
    assert "check OK" in ok.stdout and "copied 68" in ok.stdout
    bad = cli("check", ws.wrapped, "--model", CLF10, "--json")
    assert bad.returncode == 1
    res = json.loads(bad.stdout)
    assert res["schema"] == "torchgraft.check/1" and not res["ok"] and res["exit_code"] == 1
    assert "shape" in res["reasons"][0] and len(res["report"]["mismatched"]) == 2
    err = cli("check", ws.wrapped, "--model", "no_such_pkg.models:Net")
    assert err.returncode == 2 and "no_such_pkg" in err.stderr


def test_diff_plan_json(ws):
    proc = cli("diff", "torchgraft.demo:Classifier", ws.wrapped, "--kwargs",
               '{"num_classes": 10}', "--rename", r"^head\.=>fc.", "--json")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["schema"] == "torchgraft.diff/1" and res["kind"] == "plan" and res["ok"]
    assert res["report"]["counts"]["missing"] == 2 and res["report"]["counts"]["unexpected"] == 2
    hint = res["suggestions"]["missing"]["head.weight"][0]
    assert hint["name"] == "head.weight" and hint["shape"] == [1000, 128]
    assert res["suggestions"]["unexpected"]["head.bias"][0]["name"] == "head.bias"


def test_diff_checkpoints(ws):
    a, b = ws.dir / "diff_a.safetensors", ws.dir / "diff_b.safetensors"
    sd = {k: v.clone() for k, v in ws.clf.backbone.state_dict().items()}
    save_file(sd, a)
    sd["norm.weight"][3] += 0.5
    sd["extra"] = torch.ones(2)
    save_file({k: v for k, v in sd.items() if k != "norm.bias"}, b)
    proc = cli("diff", a, b, "--values")
    assert proc.returncode == 1, proc.stderr
    assert "only in A (1)" in proc.stdout and "norm.bias" in proc.stdout
    assert "only in B (1)" in proc.stdout and "extra" in proc.stdout
    assert "values differ (1)" in proc.stdout and "max |a-b| 0.5" in proc.stdout
    same = cli("diff", a, ws.wrapped, "--values", "--json")  # auto strips 'backbone.'
    res = json.loads(same.stdout)
    assert res["kind"] == "checkpoints" and res["added"] and not res["removed"]
    assert not res["changed"] and not res["values"] and res["same"] == 68


def test_demo():
    proc = cli("demo")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "all 68 backbone tensors equal" in out and "ShapeMismatchError" in out
    assert "rule: auto: strip 'module.'" in out and "demo passed" in out
    assert len(out.splitlines()) < 70


# --- in-process: main(argv) ------------------------------------------------------------------


@pytest.fixture(scope="module")
def lightning(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    return rm.lightning_checkpoint(tmp_path_factory.mktemp("lit"), save_hyperparameters=True,
                                   hparams_namespace=True)


def test_inspect_lightning_and_timm_spec(lightning, capsys):
    path, model = lightning
    code, out, _ = run(capsys, "inspect", path)
    assert code == 0
    assert "epoch                      int: 1" in out and "global_step" in out
    assert "hyper_parameters" in out and "argparse.Namespace(num_classes=10, lr=0.1)" in out
    assert "references argparse.Namespace; it was not executed" in out
    code, out, _ = run(capsys, "inspect", path, "--json")
    rows = {r["key"]: r for r in json.loads(out)["container"]}
    assert rows["global_step"]["value"] == 1
    ns = rows["hyper_parameters"]["value"]["hparams"]
    assert ns == {"object": "argparse.Namespace", "executed": False,
                  "state": {"num_classes": 10, "lr": 0.1}}
    # the Lightning checkpoint's 'model.' names load into the bare timm model
    code, out, _ = run(capsys, "check", path, "--model", "timm:resnet18?num_classes=10",
                       "--strict")
    assert code == 0 and "rule: auto: strip 'model.'" in out
    code, _, err = run(capsys, "check", path, "--model", "timm:resnet_18")
    assert code == 2 and "did you mean" in err and "resnet18" in err


def test_transformers_specs(tmp_path, capsys):
    folder, model = rm.hf_folder(tmp_path, "bert")
    code, out, _ = run(capsys, "check", folder, "--model",
                       f"transformers:BertModel?config={folder}", "--strict")
    assert code == 0, out
    spec = ("transformers:BertModel?config=BertConfig&vocab_size=100&hidden_size=32"
            "&num_hidden_layers=2&num_attention_heads=2&intermediate_size=64"
            "&max_position_embeddings=64")
    code, out, _ = run(capsys, "check", folder, "--model", spec, "--json")
    assert code == 0 and json.loads(out)["loaded_fraction"] == 1.0
    code, _, err = run(capsys, "check", folder, "--model", "transformers:BertModle")
    assert code == 2 and "BertModel" in err
    code, _, err = run(capsys, "check", folder, "--model", "transformers:BertModel?config=nope")
    assert code == 2 and "config" in err


def test_spec_language():
    assert parse_value("10") == 10 and parse_value("0.5") == 0.5 and parse_value("True") is True
    assert parse_value("none") is None and parse_value("[1, 2]") == [1, 2]
    assert parse_value("gelu") == "gelu"
    s = parse_spec("timm:convnext_tiny?num_classes=10&in_chans=1&drop_rate=0.1")
    assert (s.kind, s.target) == ("timm", "convnext_tiny")
    assert s.params == {"num_classes": 10, "in_chans": 1, "drop_rate": 0.1}
    assert parse_spec("torchgraft.demo:Classifier").kind == "python"
    assert looks_like_spec("timm:x") and looks_like_spec("pkg.mod:Net")
    assert not looks_like_spec("model.pth") and not looks_like_spec(__file__)
    m = build_model("torch.nn:Linear?in_features=4", {"out_features": 2})
    assert m.weight.shape == (2, 4) and m.weight.device.type == "meta"
    with pytest.raises(Exception, match="key=value"):
        parse_spec("timm:x?oops")


def test_convert_options(ws, capsys):
    dst = ws.dir / "opts.safetensors"
    code, out, _ = run(capsys, "convert", ws.wrapped, dst, "--rename", r"^backbone\.=>",
                       "--keep", "stages.*", "--drop", "*.grn.*", "--dtype", "fp16", "--json")
    assert code == 0
    res = json.loads(out)
    assert res["names"] and all(n.startswith("stages.") and ".grn." not in n
                                for n in res["names"])
    assert res["dropped"]["head.weight"] == "not matched by --keep"
    assert res["casts"] == {"float32 -> float16": len(res["names"])}
    assert res["provenance"]["options"]["keep"] == ["stages.*"]
    code, out, _ = run(capsys, "convert", ws.zoo_path, ws.dir / "zoo16.pth", "--dtype", "fp16")
    assert code == 0
    sd = tg.read(ws.dir / "zoo16.pth")
    assert sd.ref("f64").dtype == torch.float16 and sd.ref("i64").dtype == torch.int64
    assert sd.ref("bool").dtype == torch.bool
    for args, msg in [((ws.wrapped, ws.dir / "x.txt"), "extension"),
                      ((ws.wrapped, ws.wrapped, "--force"), "source"),
                      ((ws.wrapped, ws.dir / "nope" / "x.pth"), "does not exist"),
                      ((ws.wrapped, ws.dir / "y.pth", "--prefix", "nothere"), "nothere"),
                      ((ws.wrapped, ws.dir / "y.pth", "--rename", "no-arrow"), "REGEX=>"),
                      ((ws.wrapped, ws.dir / "y.pth", "--keep", "zzz*"), "nothing left")]:
        code, _, err = run(capsys, "convert", *args)
        assert code == 2 and msg in err and err.count("\n") == 1, (args, err)
    code, out, _ = run(capsys, "inspect", dst)
    assert "provenance (written by torchgraft convert)" in out and "wrapped.pth" in out


def test_check_options(ws, capsys):
    code, out, _ = run(capsys, "check", ws.wrapped, "--model", BACKBONE, "--strict")
    assert code == 1 and "--strict: 0 missing and 2 unexpected" in out
    code, out, _ = run(capsys, "check", ws.wrapped, "--model", CLF10, "--mismatch", "skip")
    assert code == 0 and "99.53%" in out
    code, out, _ = run(capsys, "check", ws.wrapped, "--model", CLF10, "--mismatch", "skip",
                       "--min-loaded", "100%")
    assert code == 1 and "--min-loaded is 100%" in out
    code, _, err = run(capsys, "check", ws.wrapped, "--model", BACKBONE, "--min-loaded", "7")
    assert code == 2 and "between 0 and 1" in err
    code, _, err = run(capsys, "check", ws.wrapped, "--model", BACKBONE, "--kwargs", "{bad")
    assert code == 2 and "--kwargs" in err


def test_diff_text_and_values(ws, capsys, tmp_path):
    code, out, _ = run(capsys, "diff", ws.wrapped, CLF10)
    assert code == 1 and "shape mismatch (2)" in out and "checkpoint [1000, 128]" in out
    assert "would FAIL" in out
    code, out, _ = run(capsys, "diff", ws.ddp, "torchgraft.demo:Classifier?num_classes=10")
    assert code == 0 and "renamed (70) by auto: strip 'module.'" in out
    code, out, _ = run(capsys, "diff", BACKBONE, ws.wrapped, "--no-auto")
    assert code == 1 and "did you mean backbone.stages.0.0.norm.weight [16]?" in out
    nan = torch.tensor([1.0, float("nan"), float("inf")])
    torch.save({"w": nan, "n": torch.ones(2)}, tmp_path / "a.pth")
    torch.save({"w": nan.clone(), "n": torch.ones(2, dtype=torch.float64)}, tmp_path / "b.pth")
    code, out, _ = run(capsys, "diff", tmp_path / "a.pth", tmp_path / "b.pth", "--values",
                       "--json")
    res = json.loads(out)
    assert code == 1 and not res["values"] and res["same"] == 1
    assert res["changed"][0]["name"] == "n" and res["changed"][0]["max_abs_diff"] == 0.0
    code, _, err = run(capsys, "diff", BACKBONE, CLF10, "--values")
    assert code == 2 and "--values" in err


def test_suggest_prefers_shape_and_layer_index():
    pool = [("blocks.1.mlp.fc1.weight", (64, 16)), ("blocks.0.mlp.fc1.weight", (64, 16)),
            ("blocks.0.mlp.fc1.bias", (64,)), ("stem.weight", (3,))]
    hints = suggest("blocks.0.mlp.fc_1.weight", (64, 16), pool)
    assert hints[0]["name"] == "blocks.0.mlp.fc1.weight"
    assert "stem.weight" not in [h["name"] for h in hints]


def test_colour_and_rename_parsing(monkeypatch):
    class Tty:
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert Style(Tty()).red("x") == "\x1b[31mx\x1b[0m"
    monkeypatch.setenv("NO_COLOR", "1")
    assert Style(Tty()).red("x") == "x"
    assert parse_rename([r"^module\.=>", "a=>b=>c"]) == [(r"^module\.", ""), ("a", "b=>c")]


def test_convert_progress_bar(ws, capsys):
    from torchgraft.convert import convert

    convert(ws.zoo_path, ws.dir / "bar.safetensors", progress=True)
    err = capsys.readouterr().err
    assert "bar.safetensors" in err and "18/18 tensors" in err


def test_inspect_reads_no_tensor_data_without_stats(ws, capsys, monkeypatch):
    from torchgraft.tensors import FileRef

    def boom(*_: object, **__: object) -> None:
        raise AssertionError("tensor data was read")

    flat = ws.dir / "flat.safetensors"
    save_file({k: v.contiguous() for k, v in ws.zoo.items() if k != "tied_b"}, flat)
    monkeypatch.setattr(FileRef, "materialize", boom)
    monkeypatch.setattr(FileRef, "read_into", boom)
    for path in (ws.wrapped, ws.zoo_path, flat):
        code, out, err = run(capsys, "inspect", path, "--json")
        assert code == 0, err
    code, _, err = run(capsys, "inspect", ws.zoo_path, "--stats")
    assert code == 2 and "tensor data was read" in err


class Tied(torch.nn.Module):
    """An embedding tied to the output layer, as language models do."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.lm_head = torch.nn.Linear(4, 10, bias=False)
        self.lm_head.weight = self.embed.weight


@pytest.mark.parametrize("with_model", [False, True])
def test_convert_tied_weights(tmp_path, with_model):
    from torchgraft.convert import convert

    torch.manual_seed(0)
    src_model = Tied()
    torch.save({"model": src_model.state_dict()}, tmp_path / "tied.pth")
    dst = tmp_path / "tied.safetensors"
    res = convert(tmp_path / "tied.pth", dst, model=Tied() if with_model else None, verify=True)
    assert res.verified and res.aliases == {"lm_head.weight": "embed.weight"}
    from safetensors import safe_open

    with safe_open(str(dst), "pt") as f:
        assert list(f.keys()) == ["embed.weight"]  # one copy on disk
    back = tg.read(dst)  # the alias comes back, pointing at the same bytes
    assert set(back) == {"embed.weight", "lm_head.weight"}
    assert back.ref("lm_head.weight").alias_key() == back.ref("embed.weight").alias_key()
    model = Tied()
    report = tg.load(model, dst)
    assert report.ok and report.loaded_fraction == 1.0
    assert model.lm_head.weight is model.embed.weight
    assert torch.equal(model.embed.weight, src_model.embed.weight)
