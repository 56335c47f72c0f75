"""Framework integrations: mmengine / OpenMMLab, timm, Hugging Face transformers.

Importing this package imports no framework. Each submodule imports its framework lazily or on
import, as documented there:

* :mod:`torchgraft.integrations.mmengine`: ``import`` it (or name it in a config's
  ``custom_imports``) to register the ``TorchgraftPretrained`` weight initializer.
* :mod:`torchgraft.integrations.timm`: :func:`~torchgraft.integrations.timm.classifier_names`
  and :func:`~torchgraft.integrations.timm.timm_filter`, used by ``tg.load`` for timm models.
* :mod:`torchgraft.integrations.transformers`:
  :func:`~torchgraft.integrations.transformers.hf_renamer`, the hub-name → module-name renaming
  of transformers' own conversion mapping.

Lightning ``.ckpt`` files need no integration: ``tg.load(inner_module, "last.ckpt")`` strips the
``model.`` prefix by itself.

Example:
    >>> import torch
    >>> from torchgraft.integrations.timm import classifier_names
    >>> classifier_names(torch.nn.Linear(2, 2))   # not a timm model
    []
"""

from __future__ import annotations

__all__: list[str] = []
