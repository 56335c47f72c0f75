"""Opt-in, for mmengine configs: importing this module makes the ``Runner`` load through torchgraft.

``custom_imports = dict(imports=['torchgraft.integrations.mmengine_runner'],
allow_failed_imports=False)`` in a config makes ``Runner(load_from=...)`` and
``Runner(resume=True)`` read checkpoints with torchgraft's safe reader and load the weights with
:func:`tg.load`; see :func:`torchgraft.integrations.mmengine.install_runner_loading` (call it
directly to pass ``tg.load`` options). It also registers ``TorchgraftPretrained``.

Example:
    >>> import torchgraft.integrations.mmengine_runner  # doctest: +SKIP
"""

from __future__ import annotations

from .mmengine import install_runner_loading

install_runner_loading()

__all__: list[str] = []
