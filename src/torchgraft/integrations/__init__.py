"""Framework integrations: mmengine / OpenMMLab, timm, Hugging Face transformers.

Importing this package imports no framework. Each submodule imports its framework lazily or on
import, as documented there:

* :mod:`torchgraft.integrations.mmengine`: ``import`` it (or name it in a config's
  ``custom_imports``) to register the ``TorchgraftPretrained`` weight initializer;
  :func:`~torchgraft.integrations.mmengine.install_runner_loading` (or ``custom_imports`` of
  :mod:`torchgraft.integrations.mmengine_runner`) makes ``Runner(load_from=...)`` and
  ``Runner(resume=True)`` read checkpoints safely and load weights with ``tg.load``.
* :mod:`torchgraft.integrations.lightning`:
  :func:`~torchgraft.integrations.lightning.load_from_checkpoint` (``Cls.load_from_checkpoint``
  without running the pickle; Namespace and OmegaConf hyper-parameters rebuilt from plain
  data) and :func:`~torchgraft.integrations.lightning.fine_tune_from` (weights only), for
  ``pytorch_lightning`` and ``lightning``.
* :mod:`torchgraft.integrations.timm`: :func:`~torchgraft.integrations.timm.classifier_names`
  and :func:`~torchgraft.integrations.timm.timm_filter`, used by ``tg.load`` for timm models.
* :mod:`torchgraft.integrations.transformers`:
  :func:`~torchgraft.integrations.transformers.hf_renamer`, the hub-name → module-name renaming
  of transformers' own conversion mapping.

Loading a Lightning ``.ckpt``'s weights needs no integration: ``tg.load(inner_module,
"last.ckpt")`` strips the ``model.`` prefix by itself. Nor does a transformers model built from
its config: ``tg.load(AutoModel.from_config(cfg), path)`` reads wrapped or renamed state dicts
that ``from_pretrained`` cannot.

Example:
    >>> import torch
    >>> from torchgraft.integrations.timm import classifier_names
    >>> classifier_names(torch.nn.Linear(2, 2))   # not a timm model
    []
"""

from __future__ import annotations

__all__: list[str] = []
