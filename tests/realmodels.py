"""Builders for small *real* models and the checkpoints their frameworks write.

Plain helper functions (not pytest fixtures) used by the test-suite to produce
checkpoints exactly the way users of timm, mmpretrain / mmengine, PyTorch
Lightning, Hugging Face transformers, DDP and ``torch.compile`` meet them.

Rules followed by every builder:

* nothing is downloaded: all models are randomly initialised from code/config;
* everything is seeded with :func:`torch.manual_seed`, so two calls give
  bit-identical weights;
* every builder is small and runs in seconds on a CPU.

The heavy frameworks are imported lazily inside each function so importing this
module is cheap.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import logging
import os
import pathlib
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = [
    "SEED",
    "timm_model",
    "mmpretrain_convnext_v2",
    "mmpretrain_convnext_v2_backbone",
    "mm_wrapped_checkpoint",
    "mmengine_runner_checkpoint",
    "lightning_checkpoint",
    "hf_folder",
    "hf_model",
    "hf_from_pretrained",
    "HF_KINDS",
    "ddp_prefixed",
    "compiled_state_dict",
    "timm_original_vit_model",
    "timm_original_vit_checkpoint",
]

#: Seed used by every builder (``hf_model`` deliberately uses ``SEED + 1``).
SEED = 0


# --------------------------------------------------------------------------- utilities
@contextlib.contextmanager
def _quiet_loggers(*names: str, level: int = logging.WARNING) -> Iterator[None]:
    """Temporarily raise the level of the named :mod:`logging` loggers."""
    saved = []
    for name in names:
        lg = logging.getLogger(name)
        saved.append((lg, lg.level))
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, lvl in saved:
            lg.setLevel(lvl)


@contextlib.contextmanager
def _quiet_mmengine() -> Iterator[None]:
    """Silence the INFO chatter of mmengine's ``MMLogger`` (e.g. from ``init_weights``)."""
    from mmengine.logging import MMLogger

    logger = MMLogger.get_current_instance()
    old = logger.level
    old_handlers = [(h, h.level) for h in logger.handlers]
    logger.setLevel(logging.WARNING)
    for h, _ in old_handlers:
        h.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(old)
        for h, lvl in old_handlers:
            h.setLevel(lvl)


def _one_adamw_step(model: nn.Module, lr: float = 1e-3) -> dict[str, Any]:
    """Return a real ``torch.optim.AdamW`` state_dict after one step on a copy of ``model``.

    The loss is ``sum(p + p**2)``, which gives every trainable parameter a non-zero
    gradient (also zero-initialised ones) without needing the model's forward signature.
    ``model`` itself is not modified.
    """
    clone = copy.deepcopy(model)
    params = [p for p in clone.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    loss = sum((p.float() + p.float().pow(2)).sum() for p in params)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return opt.state_dict()


# --------------------------------------------------------------------------- timm
def timm_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a randomly initialised timm model ``name`` (``pretrained=False``), in eval mode.

    ``kwargs`` are forwarded to :func:`timm.create_model`; the extra keyword
    ``seed`` (default :data:`SEED`) is popped and used for :func:`torch.manual_seed`.
    Known to work for ``convnext_tiny``, ``vit_tiny_patch16_224`` and ``resnet18``.
    """
    import timm

    seed = kwargs.pop("seed", SEED)
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs)
    model.eval()
    return model


# --------------------------------------------------------------------------- mmpretrain
_CONVNEXT_V2_ATTO = dict(type="ConvNeXt", arch="atto", use_grn=True, layer_scale_init_value=0.0)


def _mmpretrain_classifier_cfg(num_classes: int) -> dict[str, Any]:
    """Config of mmpretrain's ``convnext-v2-atto`` ``ImageClassifier``.

    Mirrors ``configs/_base_/models/convnext_v2/atto.py``.  Note: no neck.  mmpretrain's
    ``ConvNeXt`` backbone already pools (``gap_before_final_norm=True``) and returns
    ``(N, C)`` features, so a ``GlobalAveragePooling`` neck would crash in ``forward``
    ("Input dimension should be at least 3").  GAP has no parameters, so the
    state-dict keys are the same as with the neck.
    """
    return dict(
        type="ImageClassifier",
        backbone=dict(_CONVNEXT_V2_ATTO),
        head=dict(
            type="LinearClsHead",
            num_classes=num_classes,
            in_channels=320,
            loss=dict(type="CrossEntropyLoss", loss_weight=1.0),
        ),
        init_cfg=dict(type="TruncNormal", layer=["Conv2d", "Linear"], std=0.02, bias=0.0),
    )


def mmpretrain_convnext_v2(num_classes: int = 1000) -> nn.Module:
    """mmpretrain ``ImageClassifier`` with a ConvNeXt-V2 ``atto`` backbone (random weights).

    Built through ``mmpretrain.registry.MODELS.build``: backbone
    ``ConvNeXt(arch='atto', use_grn=True, layer_scale_init_value=0.)`` (that is ConvNeXt-V2,
    with GRN ``gamma``/``beta`` parameters), ``LinearClsHead(num_classes, in_channels=320)``.
    ``init_weights()`` is called (as mmengine's Runner does), then the model is
    re-initialised from a fixed seed so the result is deterministic.  State-dict keys
    look like ``backbone.stages.0.0.grn.gamma`` and ``head.fc.weight``.  Eval mode.
    """
    from mmpretrain.registry import MODELS

    torch.manual_seed(SEED)
    model = MODELS.build(_mmpretrain_classifier_cfg(num_classes))
    with _quiet_mmengine():
        torch.manual_seed(SEED)
        model.init_weights()
    model.eval()  # some mm backbones override train() without returning self
    return model


def mmpretrain_convnext_v2_backbone() -> nn.Module:
    """The bare mmpretrain ``ConvNeXt(arch='atto', use_grn=True, layer_scale_init_value=0.)``.

    Keys have no ``backbone.`` prefix (``downsample_layers.0.0.weight``,
    ``stages.0.0.grn.gamma``, ``norm3.weight``...).  Seeded, ``init_weights()`` called,
    eval mode.
    """
    from mmpretrain.registry import MODELS

    torch.manual_seed(SEED)
    model = MODELS.build(dict(_CONVNEXT_V2_ATTO))
    with _quiet_mmengine():
        torch.manual_seed(SEED)
        model.init_weights()
    model.eval()  # some mm backbones override train() without returning self
    return model


def mm_wrapped_checkpoint(
    model: nn.Module, path: str | os.PathLike[str], epoch: int = 100
) -> pathlib.Path:
    """Write an OpenMMLab-style wrapped checkpoint of ``model`` to ``path`` and return the path.

    Layout (saved with plain :func:`torch.save`)::

        {'state_dict': model.state_dict(),
         'optimizer': <torch.optim.AdamW state_dict after one real step>,
         'epoch': epoch,
         'meta': {...plain python data: versions, epoch/iter, seed, dataset_meta...}}

    Everything in it is loadable with ``torch.load(weights_only=True)``.  ``model``
    is not modified (the optimiser step runs on a deep copy).
    """
    import mmengine

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "mmengine_version": mmengine.__version__,
        "torch_version": torch.__version__.split("+")[0],
        "epoch": epoch,
        "iter": epoch * 1251,
        "seed": SEED,
        "experiment_name": "torchgraft_realmodels",
        "time": "20240101_000000",
        "dataset_meta": {"classes": [f"class_{i}" for i in range(10)]},
    }
    ckpt = {
        "state_dict": model.state_dict(),
        "optimizer": _one_adamw_step(model),
        "epoch": epoch,
        "meta": meta,
    }
    torch.save(ckpt, path)
    return path


class _TinyClsDataset(torch.utils.data.Dataset):
    """``n`` random uint8 3x32x32 images with labels, in mmpretrain's packed format."""

    def __init__(self, n: int = 4, num_classes: int = 10) -> None:
        g = torch.Generator().manual_seed(SEED)
        self.images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
        self.labels = torch.randint(0, num_classes, (n,), generator=g).tolist()
        self.metainfo = {"classes": tuple(f"class_{i}" for i in range(num_classes))}

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        from mmpretrain.structures import DataSample

        sample = DataSample().set_gt_label(self.labels[idx])
        return {"inputs": self.images[idx], "data_samples": sample}


def mmengine_runner_checkpoint(tmp_dir: str | os.PathLike[str]) -> pathlib.Path:
    """Train mmpretrain's ConvNeXt-V2-atto classifier with a real mmengine ``Runner``; return ckpt.

    One epoch, 4 random 3x32x32 images, batch size 2, AdamW, ``num_classes=10``,
    ``default_scope='mmpretrain'``, ``CheckpointHook(interval=1)``.  The Runner writes
    ``<tmp_dir>/mmengine_run/epoch_1.pth`` whose top-level keys are ``meta``,
    ``state_dict``, ``message_hub``, ``optimizer``, ``param_schedulers``.
    ``message_hub`` contains mmengine ``HistoryBuffer`` objects and numpy arrays, so
    ``torch.load(path, weights_only=True)`` refuses the file on torch>=2.6.
    """
    from mmengine.dataset import pseudo_collate
    from mmengine.runner import Runner

    work_dir = pathlib.Path(tmp_dir) / "mmengine_run"
    loader = torch.utils.data.DataLoader(
        _TinyClsDataset(),
        batch_size=2,
        shuffle=False,
        num_workers=0,
        collate_fn=pseudo_collate,
    )
    model_cfg = _mmpretrain_classifier_cfg(10)
    model_cfg["data_preprocessor"] = dict(
        type="ClsDataPreprocessor",
        num_classes=10,
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        to_rgb=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runner = Runner(
            model=model_cfg,
            work_dir=str(work_dir),
            train_dataloader=loader,
            train_cfg=dict(by_epoch=True, max_epochs=1),
            optim_wrapper=dict(optimizer=dict(type="AdamW", lr=1e-3, weight_decay=0.05)),
            param_scheduler=dict(type="MultiStepLR", milestones=[1], by_epoch=True),
            default_hooks=dict(
                timer=dict(type="IterTimerHook"),
                logger=dict(type="LoggerHook", interval=1),
                param_scheduler=dict(type="ParamSchedulerHook"),
                checkpoint=dict(type="CheckpointHook", interval=1, by_epoch=True),
            ),
            launcher="none",
            env_cfg=dict(cudnn_benchmark=False, dist_cfg=dict(backend="gloo")),
            log_level="ERROR",
            default_scope="mmpretrain",
            randomness=dict(seed=SEED),
            experiment_name=f"torchgraft_{uuid.uuid4().hex[:12]}",
        )
        runner.train()
        _close_mm_logger(runner)
    ckpt = work_dir / "epoch_1.pth"
    if not ckpt.is_file():  # pragma: no cover - would mean mmengine changed its naming
        raise FileNotFoundError(f"mmengine Runner did not write {ckpt}")
    return ckpt


def _close_mm_logger(runner: Any) -> None:
    """Close the log-file handlers mmengine opened so tmp dirs can be removed cleanly."""
    for h in list(runner.logger.handlers):
        if isinstance(h, logging.FileHandler):
            h.close()
            runner.logger.removeHandler(h)


# --------------------------------------------------------------------------- Lightning
def lightning_checkpoint(
    tmp_dir: str | os.PathLike[str],
    save_hyperparameters: bool,
    hparams_namespace: bool = False,
) -> tuple[pathlib.Path, nn.Module]:
    """Train a ``LightningModule`` for one step and save it with ``trainer.save_checkpoint``.

    The module's ``self.model`` is a timm ``resnet18(num_classes=10)`` (random init),
    trained with ``Trainer(max_steps=1, logger=False, accelerator='cpu', ...)`` on 4
    random 3x32x32 images (batch size 2, SGD with momentum).  The checkpoint's
    ``state_dict`` keys therefore start with ``model.`` and it also holds
    ``optimizer_states``, ``loops``, ``callbacks``, ``pytorch-lightning_version``...

    * ``save_hyperparameters=True``: ``self.save_hyperparameters()`` is called in
      ``__init__``, so the checkpoint gets ``hyper_parameters`` (and ``hparams_name``
      ``'kwargs'``), e.g. ``{'num_classes': 10, 'lr': 0.1}``.
    * ``hparams_namespace=True``: ``__init__`` takes a single ``argparse.Namespace``
      argument ``hparams``; together with ``save_hyperparameters=True`` the checkpoint's
      ``hyper_parameters`` is ``{'hparams': Namespace(num_classes=10, lr=0.1)}``, i.e. it
      holds a real ``argparse.Namespace`` object (which ``weights_only=True`` rejects).

    Returns ``(ckpt_path, lit.model)``: the trained inner ``nn.Module`` (in eval mode)
    whose values match the checkpoint.
    """
    import pytorch_lightning as pl

    class _LitBase(pl.LightningModule):
        model: nn.Module
        lr: float

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self.model(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    # Each __init__ must use zero-argument super(): Lightning finds the init args to save
    # through the frame's ``__class__`` cell.
    class _LitClassifier(_LitBase):
        def __init__(self, num_classes: int = 10, lr: float = 0.1) -> None:
            super().__init__()
            if save_hyperparameters:
                self.save_hyperparameters()
            self.lr = lr
            self.model = timm_model("resnet18", num_classes=num_classes)

    class _LitNamespaceClassifier(_LitBase):
        def __init__(self, hparams: argparse.Namespace) -> None:
            super().__init__()
            if save_hyperparameters:
                self.save_hyperparameters()
            self.lr = hparams.lr
            self.model = timm_model("resnet18", num_classes=hparams.num_classes)

    tmp_dir = pathlib.Path(tmp_dir)
    torch.manual_seed(SEED)
    if hparams_namespace:
        lit: _LitBase = _LitNamespaceClassifier(argparse.Namespace(num_classes=10, lr=0.1))
    else:
        lit = _LitClassifier(num_classes=10, lr=0.1)

    g = torch.Generator().manual_seed(SEED)
    data = torch.utils.data.TensorDataset(
        torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
    )
    loader = torch.utils.data.DataLoader(data, batch_size=2, num_workers=0)

    name = "lit" + ("_hp" if save_hyperparameters else "")
    name += "_ns" if hparams_namespace else ""
    path = fit_and_save(lit, loader, tmp_dir / f"{name}.ckpt")
    return path, lit.model.eval()


def fit_and_save(lit: Any, loader: Any, path: pathlib.Path, max_steps: int = 1) -> pathlib.Path:
    """Train ``lit`` for ``max_steps`` with a real CPU ``Trainer`` of the Lightning package it
    derives from (``pytorch_lightning`` or ``lightning.pytorch``), then ``save_checkpoint``."""
    from torchgraft.integrations.lightning import lightning_package

    pl = lightning_package(type(lit))
    with (
        warnings.catch_warnings(),
        _quiet_loggers("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning"),
    ):
        warnings.simplefilter("ignore")
        trainer = pl.Trainer(max_steps=max_steps, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=False,
                             accelerator="cpu", devices=1, default_root_dir=str(path.parent))
        trainer.fit(lit, loader)
        trainer.save_checkpoint(path)
    return path


# --------------------------------------------------------------------------- transformers
#: kinds understood by :func:`hf_folder` / :func:`hf_model`.
HF_KINDS = ("vit", "vit_cls", "convnext", "bert")


def _hf_build(kind: str) -> nn.Module:
    """Construct (unseeded) the small transformers model of the given kind."""
    import transformers as tf

    vit_cfg = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
    )
    if kind == "vit":
        return tf.ViTModel(tf.ViTConfig(**vit_cfg))
    if kind == "vit_cls":
        return tf.ViTForImageClassification(tf.ViTConfig(num_labels=10, **vit_cfg))
    if kind == "convnext":
        return tf.ConvNextModel(
            tf.ConvNextConfig(
                hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 2, 1], image_size=32, patch_size=4
            )
        )
    if kind == "bert":
        return tf.BertModel(
            tf.BertConfig(
                vocab_size=100,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=64,
            )
        )
    raise ValueError(f"unknown HF kind {kind!r}; expected one of {HF_KINDS}")


def hf_model(kind: str) -> nn.Module:
    """A fresh transformers model of ``kind``, same class/config as :func:`hf_folder`.

    Seeded with ``SEED + 1``, so its weights differ from the saved ones: load the
    folder into it and compare with the model returned by :func:`hf_folder`.
    Eval mode.
    """
    torch.manual_seed(SEED + 1)
    return _hf_build(kind).eval()


def hf_folder(
    tmp_dir: str | os.PathLike[str],
    kind: str,
    sharded: bool = False,
    *,
    original_format: bool = True,
) -> tuple[pathlib.Path, nn.Module]:
    """``save_pretrained`` a small random transformers model into a folder; return (dir, model).

    ``kind`` is one of ``'vit'`` (``ViTModel``), ``'vit_cls'``
    (``ViTForImageClassification``, 10 labels), ``'convnext'`` (``ConvNextModel``) or
    ``'bert'`` (``BertModel``, vocab 100); all tiny (hidden size 32, 2 layers).
    The folder holds ``config.json`` and ``model.safetensors``; with ``sharded=True``
    ``max_shard_size`` is set to about a third of the model's byte size, giving
    ``model-0000i-of-0000n.safetensors`` shards (n >= 2) plus
    ``model.safetensors.index.json``.

    .. warning:: **File keys != module keys for ViT on transformers >= 5.**
       transformers 5 renamed ViT's submodules (``layers.0.attention.q_proj``,
       ``layers.0.mlp.fc1`` ...) but ``save_pretrained`` (``save_original_format=True``,
       the default) writes the historical hub names
       (``encoder.layer.0.attention.attention.query``, ``...intermediate.dense`` ...);
       ``from_pretrained`` renames them back with its conversion mapping.  So for
       ``'vit'``/``'vit_cls'`` the safetensors keys differ from ``model.state_dict()``
       keys (a pure 1:1 renaming, same shapes and values); ``'convnext'``/``'bert'``
       match exactly.  Pass ``original_format=False`` to write the module's own keys
       (only has an effect where transformers supports that flag).  Use
       :func:`hf_from_pretrained` for transformers' own view of the folder.
    """
    import transformers as tf

    torch.manual_seed(SEED)
    model = _hf_build(kind).eval()
    suffix = ("_sharded" if sharded else "") + ("" if original_format else "_native")
    out = pathlib.Path(tmp_dir) / f"hf_{kind}{suffix}"
    kwargs: dict[str, Any] = {}
    if sharded:
        total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        kwargs["max_shard_size"] = max(total // 3, 1)
    else:
        kwargs["max_shard_size"] = "10GB"
    params = inspect.signature(model.save_pretrained).parameters
    # transformers 4.x: opt in to safetensors; 5.x dropped the flag (safetensors only).
    if "safe_serialization" in params:
        kwargs["safe_serialization"] = True
    if "save_original_format" in params:
        kwargs["save_original_format"] = original_format
    tf.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save_pretrained(out, **kwargs)
    finally:
        tf.logging.enable_progress_bar()
    return out, model


def hf_from_pretrained(folder: str | os.PathLike[str], kind: str) -> nn.Module:
    """Reference load: ``<class of kind>.from_pretrained(folder)`` (offline, quiet, eval mode).

    This is transformers' own interpretation of a :func:`hf_folder` folder (including its
    key renaming), handy as ground truth in tests.
    """
    import transformers as tf

    cls = type(_hf_build_class_only(kind))
    tf.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings(), _quiet_loggers("transformers", level=logging.ERROR):
            warnings.simplefilter("ignore")
            model = cls.from_pretrained(str(folder), local_files_only=True)
    finally:
        tf.logging.enable_progress_bar()
    model.eval()
    return model


def _hf_build_class_only(kind: str) -> nn.Module:
    """Instantiate the model of ``kind`` on the meta device (cheap) to learn its class."""
    with torch.device("meta"):
        return _hf_build(kind)


# --------------------------------------------------------------------------- DDP / compile
def ddp_prefixed(sd: dict[str, Any], prefix: str = "module.") -> dict[str, Any]:
    """Return ``sd`` with every key prefixed by ``prefix``, as a DDP/DataParallel model saves it.

    Order is preserved and the ``_metadata`` attribute of a real state_dict is carried
    over (with prefixed keys) just like ``DistributedDataParallel.state_dict()`` does.
    """
    out: OrderedDict[str, Any] = OrderedDict((prefix + k, v) for k, v in sd.items())
    meta = getattr(sd, "_metadata", None)
    if meta is not None:
        new_meta: OrderedDict[str, Any] = OrderedDict()
        new_meta[""] = {"version": 1}  # the wrapper module itself (unversioned -> 1)
        for k, v in meta.items():
            new_meta[(prefix + k) if k else prefix.rstrip(".")] = v
        out._metadata = new_meta  # type: ignore[attr-defined]
    return out


def compiled_state_dict(model: nn.Module) -> dict[str, Any]:
    """Return the real ``torch.compile(model).state_dict()`` (keys prefixed ``_orig_mod.``).

    ``torch.compile`` is lazy: wrapping creates an ``OptimizedModule`` and compiles
    nothing until the first forward, so this is instant and works on CPU without a
    C++ toolchain.  The tensors are shared with ``model``.
    """
    return torch.compile(model).state_dict()


# --------------------------------------------------------------------------- timm "original" ViT
def timm_original_vit_model(seed: int = SEED) -> nn.Module:
    """Tiny timm CLIP-style ViT (seeded, eval) matching :func:`timm_original_vit_checkpoint`.

    ``timm.create_model('vit_base_patch16_clip_224', pretrained=False, ...)`` shrunk to
    img 32, patch 8, width 32, depth 2, 2 heads, ``num_classes=16``.  That timm
    architecture uses ``pre_norm=True`` (``norm_pre``), a bias-free patch conv and
    pre-LN blocks with a fused ``qkv``, exactly like OpenAI CLIP's visual tower.  The head
    bias is zeroed because CLIP's ``visual.proj`` has none (the converter fills zeros).
    """
    model = timm_model(
        "vit_base_patch16_clip_224",
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        num_classes=16,
        seed=seed,
    )
    with torch.no_grad():
        model.head.bias.zero_()
    return model


def timm_original_vit_checkpoint() -> dict[str, torch.Tensor]:
    """A ViT state dict in the **OpenAI CLIP** layout (``visual.*`` keys), built from timm.

    Converted from :func:`timm_original_vit_model`'s weights by inverting timm's
    ``vision_transformer._convert_openai_clip``; ``checkpoint_filter_fn`` detects the
    layout through the ``visual.class_embedding`` key.  Keys/shapes (width W, L tokens)::

        visual.class_embedding            (W,)        <- cls_token (1, 1, W)
        visual.positional_embedding       (L, W)      <- pos_embed (1, L, W)
        visual.conv1.weight               (W,3,p,p)   <- patch_embed.proj.weight (no bias)
        visual.ln_pre.* / visual.ln_post.*            <- norm_pre.* / norm.*
        visual.transformer.resblocks.{i}.ln_1/ln_2.*          <- blocks.{i}.norm1/norm2.*
        visual.transformer.resblocks.{i}.attn.in_proj_weight/bias  <- blocks.{i}.attn.qkv.*
        visual.transformer.resblocks.{i}.attn.out_proj.*      <- blocks.{i}.attn.proj.*
        visual.transformer.resblocks.{i}.mlp.c_fc/c_proj.*    <- blocks.{i}.mlp.fc1/fc2.*
        visual.proj                       (W, 16)     <- head.weight.T (head.bias must be 0)

    plus a few CLIP *text tower* keys (``token_embedding.weight``,
    ``positional_embedding``, ``transformer.resblocks.0.*``, ``ln_final.*``,
    ``text_projection``, ``logit_scale``) which the filter drops, as in a real CLIP file.
    ``timm.models.vision_transformer.checkpoint_filter_fn(d, timm_original_vit_model())``
    returns a timm state dict that loads with ``strict=True`` and equals the model's.
    """
    sd = timm_original_vit_model().state_dict()
    out: dict[str, torch.Tensor] = {}
    block_swaps = [
        ("norm1.", "ln_1."),
        ("norm2.", "ln_2."),
        ("attn.qkv.weight", "attn.in_proj_weight"),
        ("attn.qkv.bias", "attn.in_proj_bias"),
        ("attn.proj.", "attn.out_proj."),
        ("mlp.fc1.", "mlp.c_fc."),
        ("mlp.fc2.", "mlp.c_proj."),
    ]
    for k, v in sd.items():
        v = v.detach().clone()
        if k == "cls_token":
            out["visual.class_embedding"] = v.reshape(-1)
        elif k == "pos_embed":
            out["visual.positional_embedding"] = v.squeeze(0)
        elif k.startswith("patch_embed.proj."):
            out["visual." + k.replace("patch_embed.proj.", "conv1.")] = v
        elif k.startswith("norm_pre."):
            out["visual." + k.replace("norm_pre.", "ln_pre.")] = v
        elif k.startswith("norm."):
            out["visual." + k.replace("norm.", "ln_post.")] = v
        elif k.startswith("blocks."):
            nk = k.replace("blocks.", "transformer.resblocks.", 1)
            for a, b in block_swaps:
                nk = nk.replace(a, b)
            out["visual." + nk] = v
        elif k == "head.weight":
            out["visual.proj"] = v.t().contiguous()
        elif k == "head.bias":
            continue  # CLIP's projection has no bias; the converter inserts zeros
        else:  # pragma: no cover - would mean timm's ViT grew a new parameter
            raise KeyError(f"unexpected timm ViT key {k!r}")

    # A bit of CLIP's text tower, ignored by timm's filter (it keeps only 'visual.*').
    g = torch.Generator().manual_seed(SEED)
    w, ctx, vocab, out_dim = 32, 8, 50, 16
    text = {
        "positional_embedding": torch.randn(ctx, w, generator=g),
        "token_embedding.weight": torch.randn(vocab, w, generator=g),
        "transformer.resblocks.0.ln_1.weight": torch.ones(w),
        "transformer.resblocks.0.ln_1.bias": torch.zeros(w),
        "transformer.resblocks.0.attn.in_proj_weight": torch.randn(3 * w, w, generator=g),
        "transformer.resblocks.0.attn.in_proj_bias": torch.zeros(3 * w),
        "transformer.resblocks.0.attn.out_proj.weight": torch.randn(w, w, generator=g),
        "transformer.resblocks.0.attn.out_proj.bias": torch.zeros(w),
        "transformer.resblocks.0.ln_2.weight": torch.ones(w),
        "transformer.resblocks.0.ln_2.bias": torch.zeros(w),
        "transformer.resblocks.0.mlp.c_fc.weight": torch.randn(4 * w, w, generator=g),
        "transformer.resblocks.0.mlp.c_fc.bias": torch.zeros(4 * w),
        "transformer.resblocks.0.mlp.c_proj.weight": torch.randn(w, 4 * w, generator=g),
        "transformer.resblocks.0.mlp.c_proj.bias": torch.zeros(w),
        "ln_final.weight": torch.ones(w),
        "ln_final.bias": torch.zeros(w),
        "text_projection": torch.randn(w, out_dim, generator=g),
        "logit_scale": torch.tensor(4.6052),
    }
    # OpenAI's file lists the visual tower after the text keys' first entries; keep a
    # realistic mix: a few text keys, the visual tower, then the rest of the text tower.
    first = ["positional_embedding", "text_projection", "logit_scale"]
    ordered = {k: text[k] for k in first}
    ordered.update(out)
    ordered.update({k: v for k, v in text.items() if k not in first})
    return ordered
