"""Stable Diffusion XL's UNet as a guidelab denoiser: the pooled text embedding and the size / crop ids
(diffusers' ``added_cond_kwargs``) travel as two flat conditioning keys, so branches batch like any others.

* ``text_embeds`` [B, D]: the pooled embedding of the last text encoder (the negative prompt's, or zeros with
  ``force_zeros_for_empty_prompt``, on the reference branch);
* ``time_ids`` [B, 6]: ``original_size + crops_coords_top_left + target_size``, the same on every branch.
"""

from __future__ import annotations

from typing import Any

import torch

from ...guidance.protocols import Condition
from .adapter import DiffusersDenoiser

#: The conditioning keys SDXL's UNet takes as ``added_cond_kwargs``.
ADDED = ("text_embeds", "time_ids")


class SDXLDenoiser(DiffusersDenoiser):
    """A :class:`DiffusersDenoiser` of an SDXL UNet; ``null_pooled`` ([1, D]) is the reference branch's pooled
    embedding (with ``null_text``, the negative prompt's or zeros as diffusers builds them)."""

    def __init__(
        self, model: torch.nn.Module, scheduler_config: dict[str, Any], *, null_pooled: torch.Tensor | None = None, **kw: Any
    ) -> None:
        super().__init__(model, scheduler_config, **kw)
        self.null_pooled = null_pooled

    @property
    def condition(self) -> Condition:
        over = dict(self.null_text_overrides())
        if self.null_pooled is not None:
            pooled = self.null_pooled
            over["text_embeds"] = lambda old: pooled.to(old).expand(old.shape[0], *pooled.shape[1:])
        return Condition(self.cond_key, over)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        added = {k: cond.pop(k).to(dtype) for k in ADDED if cond.get(k) is not None}
        if added:
            cond["added_cond_kwargs"] = added
        return super().__call__(x, sigma, **cond)
