"""A descriptor method of the registry: a descriptor pipeline with a name.

:class:`DescriptorMethod` wraps a :class:`~hyperfeatures.pipeline.DescriptorPipeline`
(source + settings + head) as a :class:`~hyperfeatures.evaluation.methods.Method`: its
descriptors, matching grid, ``{category}`` prompt templates (one pipeline per filled prompt)
and its ``describe()`` record. Built by :func:`~hyperfeatures.evaluation.create_method`;
re-exported by :mod:`hyperfeatures.evaluation.methods`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from PIL import Image

from ..config import Settings, SettingsError
from ..sources.prompts import fill_prompt, uses_category

__all__ = ["DescriptorMethod"]


class DescriptorMethod:
    """A method of the registry: a :class:`~hyperfeatures.pipeline.DescriptorPipeline`
    (source + settings + head) with a name.

    Attributes:
        name, label: registry name and table label.
        pipeline: the descriptor pipeline.
        aggregator: where the aggregation network came from (``None``: untrained or none).
        batch_size: images per source run.
    """

    def __init__(
        self,
        name: str,
        label: str,
        pipeline: Any,
        *,
        aggregator: str | None = None,
        batch_size: int = 8,
    ) -> None:
        self.name = name
        self.label = label
        self.pipeline = pipeline
        self.aggregator = aggregator
        self.batch_size = batch_size
        self._filled: dict[str, Any] = {}  # filled prompt -> pipeline of that prompt

    @property
    def settings(self) -> Settings:
        """The effective settings (taps resolved, input size filled in)."""
        return self.pipeline.settings

    @property
    def match_size(self) -> int:
        """Matching grid side: ``settings.matching_size`` (match_size, else load_size, else
        image_size)."""
        size = self.settings.matching_size
        assert size is not None  # image_size is always filled in by the extractor
        return size

    @property
    def uses_category(self) -> bool:
        """Whether the descriptors need the images' category: the prompt is a ``{category}``
        template (``dift``: ``"a photo of a {category}"``)."""
        return uses_category(self.settings.prompt)

    @torch.no_grad()
    def descriptors(
        self, images: list[Image.Image], *, category: str | None = None
    ) -> torch.Tensor:
        """``(B, C, h, w)`` float32 descriptors.

        Args:
            images: B RGB images of any sizes.
            category: the images' category (``"cat"``), filled into a ``{category}`` prompt
                template; not used when the prompt has none.

        Raises:
            SettingsError: the prompt is a template and no category is given.
        """
        return self._pipeline_for(category)(list(images), batch_size=self.batch_size)

    def _pipeline_for(self, category: str | None) -> Any:
        """The pipeline whose prompt is the template filled with ``category`` (the method's
        own pipeline when the prompt is no template). The filled pipelines share the source
        and the head; only their settings' ``prompt`` differs."""
        if not self.uses_category:
            return self.pipeline
        try:
            prompt = fill_prompt(self.settings.prompt, category)
        except SettingsError as err:
            raise SettingsError(f"method {self.name!r}: {err}") from None
        filled = self._filled.get(prompt)
        if filled is None:
            from ..pipeline import FeatureExtractor

            extractor = self.pipeline.extractor
            filled = copy.copy(self.pipeline)
            filled.extractor = FeatureExtractor(
                extractor.source, extractor.settings.replace(prompt=prompt)
            )
            self._filled[prompt] = filled
        return filled

    def describe(self) -> dict[str, Any]:
        source = self.pipeline.source
        record: dict[str, Any] = {
            "method": self.name,
            "label": self.label,
            "model": source.name,
            "source": source.describe(),
            "settings": self.settings.to_dict(),
            "match_size": self.match_size,
            "output_channels": self.pipeline.channels,
        }
        network = getattr(self.pipeline, "network", None)
        if network is not None:
            untrained = self.aggregator is None
            steps = list(self.settings.steps)
            record.update(
                label=f"Hyperfeatures ({source.name}, S={len(steps)})"
                + (" UNTRAINED" if untrained else ""),
                aggregator=self.aggregator,
                untrained=untrained,
                first_k=self.pipeline.first_k,
                top1=self.pipeline.top1,
                top1_pair=list(self.pipeline.top1_pair) if self.pipeline.top1_pair else None,
                output_size=network.output_size,
            )
        return record
