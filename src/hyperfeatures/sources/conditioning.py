"""Text conditioning of a UNet call (prompt embeddings, and SDXL's added text/time inputs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Conditioning"]


@dataclass
class Conditioning:
    """Text conditioning for a UNet call.

    Attributes:
        encoder_hidden_states: ``(B, 77, D)`` token embeddings.
        added_cond_kwargs: SDXL only: ``{"text_embeds": (B, P), "time_ids": (B, 6)}``.
    """

    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.encoder_hidden_states.shape[0]

    def unet_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"encoder_hidden_states": self.encoder_hidden_states}
        if self.added_cond_kwargs is not None:
            kwargs["added_cond_kwargs"] = self.added_cond_kwargs
        return kwargs

    def cat(self, other: Conditioning) -> Conditioning:
        """Concatenate along the batch (``[self; other]``), e.g. unconditional then conditional."""
        added = None
        if self.added_cond_kwargs is not None and other.added_cond_kwargs is not None:
            added = {
                k: torch.cat([v, other.added_cond_kwargs[k]])
                for k, v in self.added_cond_kwargs.items()
            }
        return Conditioning(
            torch.cat([self.encoder_hidden_states, other.encoder_hidden_states]), added
        )

    def repeat(self, n: int) -> Conditioning:
        """Repeat a batch-1 conditioning ``n`` times along the batch."""
        added = None
        if self.added_cond_kwargs is not None:
            added = {k: v.expand(n, *v.shape[1:]) for k, v in self.added_cond_kwargs.items()}
        hidden = self.encoder_hidden_states.expand(n, *self.encoder_hidden_states.shape[1:])
        return Conditioning(hidden, added)
