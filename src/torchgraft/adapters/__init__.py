"""The built-in adapters, one module each, registered in the order they are asked.

| module | adapters | default |
|---|---|---|
| ``channels`` | ``input_channels`` | on |
| ``position`` | ``position_embedding`` (roles from ``position_roles``) | on |
| ``rows`` | ``classifier_rows`` (with ``labels=``), ``token_rows``, ``token_rows_mean`` | asked |

Each module may also register *role finders* (:func:`torchgraft.rules.register_role_finder`):
roles read from module types and attributes (the model's first convolution, ...), consulted
after the framework's own metadata.

Example:
    >>> from torchgraft.transforms import registered_adapters
    >>> "position_embedding" in [a.name for a in registered_adapters()]
    True
"""

from __future__ import annotations

from ..rules import register_role_finder
from ..transforms import register_adapter
from .channels import InputChannels, first_conv_role
from .position import PositionEmbedding
from .rows import TokenRows

for _adapter in (InputChannels(), PositionEmbedding(), TokenRows("model"), TokenRows("mean")):
    register_adapter(_adapter, first=False)
register_role_finder(first_conv_role)
