"""The built-in adapters, one module each, registered in the order they are asked.

| module | adapters | default |
|---|---|---|
| ``channels`` | ``input_channels`` | on |
| ``position`` | ``position_embedding`` (roles from ``position_roles``) | on |
| ``patch`` | ``patch_embed`` | on |
| ``inflate`` | ``inflate_3d`` (``how="mean"`` or ``"center"``) | asked |
| ``rows`` | ``classifier_rows`` (with ``labels=``), ``token_rows``, ``token_rows_mean`` | asked |
| ``relpos`` | ``rel_pos_table``, ``rel_pos_index`` | on |

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
from .inflate import Inflate3d, conv3d_roles
from .patch import PatchEmbedding, patch_embed_roles
from .position import PositionEmbedding
from .relpos import RelPosIndex, RelPosTable, rel_pos_roles
from .rows import TokenRows

for _adapter in (InputChannels(), PositionEmbedding(), PatchEmbedding(), RelPosTable(),
                 RelPosIndex(), TokenRows("model"), TokenRows("mean"), Inflate3d()):
    register_adapter(_adapter, first=False)
register_role_finder(first_conv_role)  # before conv3d_roles: a first Conv3d stays first_conv
register_role_finder(patch_embed_roles)
register_role_finder(rel_pos_roles)
register_role_finder(conv3d_roles)
