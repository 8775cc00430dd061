"""Tap names: the taps a UNet offers, the presets and the resolution of names.

The catalogue (:func:`tap_names`) lists every valid tap of a module tree in execution order
with its kind and channels, without a forward pass; :data:`PRESETS` name sets of taps
(``dhf``, ``layer-4``, ``attention``...); :func:`resolve_taps` turns names, presets or a
``{name: alias}`` dict into ``{tap name: alias}``, or raises a :class:`TapError` that names
the close matches and how to list the valid taps. The naming scheme and the hooks that
capture the taps are in :mod:`hyperfeatures.taps`, which re-exports these names.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = ["PRESETS", "TapError", "TapInfo", "resolve_taps", "tap_names"]


class TapError(ValueError):
    """An unknown or unusable tap name."""


@dataclass(frozen=True)
class TapInfo:
    """Metadata of one tap, for sizing consumers (aggregation networks, caches).

    Attributes:
        name: tap name (``"up_blocks.1.resnets.0"``).
        kind: ``resnet | resnet-out | transformer | block | attn-q | attn-k | attn-v |
            attn-out | cross-q | cross-out | ff | upsampler | downsampler``.
        channels: channels C of the map.
        size: ``(h, w)`` of the map for the probed latent size (``None`` before probing).
        stride: latent pixels per map pixel (``None`` before probing).
    """

    name: str
    kind: str
    channels: int
    size: tuple[int, int] | None = None
    stride: int | None = None

    @property
    def module(self) -> str:
        return self.name.split(":", 1)[0]

    @property
    def part(self) -> str | None:
        return self.name.split(":", 1)[1] if ":" in self.name else None


# --------------------------------------------------------------------------- catalogue
def _class_name(module: nn.Module) -> str:
    return type(module).__name__


_SECTION_ORDER = {"conv_in": 0, "down_blocks": 1, "mid_block": 2, "up_blocks": 3}
_CHILD_ORDER = {"resnets": 0, "attentions": 1, "upsamplers": 2, "downsamplers": 2}
_LEAF_ORDER = {"attn1": 1, "attn2": 2, "ff": 3}


def _execution_key(name: str) -> tuple[int, ...]:
    """Sort key that follows the UNet's execution order (resnet j, attention j, sampler)."""
    path, _, part = name.partition(":")
    parts = path.split(".")
    key: list[int] = [_SECTION_ORDER.get(parts[0], 9)]
    rest = parts[1:]
    if parts[0] != "mid_block" and rest and rest[0].isdigit():
        key.append(int(rest[0]))
        rest = rest[1:]
    if len(rest) >= 2 and rest[0] in _CHILD_ORDER:
        index = 99 if rest[0].endswith("samplers") else int(rest[1])
        key += [index, _CHILD_ORDER[rest[0]]]
        rest = rest[2:]
    for token in rest:
        key.append(int(token) if token.isdigit() else _LEAF_ORDER.get(token, 0))
    # children of a module run before the module's own output is complete
    key += [50] * (8 - len(key)) if len(key) < 8 else []
    key.append({"": 0, "q": -3, "k": -2, "v": -1, "out": 1}.get(part, 0))
    return tuple(key)


def _catalogue(unet: nn.Module) -> dict[str, tuple[str, int]]:
    """``{tap name: (kind, channels)}`` in execution order, from the module tree alone."""
    found: dict[str, tuple[str, int]] = {}
    for path, module in unet.named_modules():
        cls = _class_name(module)
        if cls == "ResnetBlock2D":
            found[path] = ("resnet", module.conv2.out_channels)
            found[f"{path}:out"] = ("resnet-out", module.conv2.out_channels)
        elif cls in {"Transformer2DModel", "DualTransformer2DModel"}:
            found[path] = ("transformer", _transformer_channels(module))
        elif cls == "BasicTransformerBlock":
            found[path] = ("block", module.norm1.normalized_shape[0])
            for sub in ("attn1", "attn2"):
                attn = getattr(module, sub, None)
                if attn is None:
                    continue
                out_dim = attn.to_out[0].out_features
                found[f"{path}.{sub}"] = (
                    "cross-out" if attn.is_cross_attention else "attn-out",
                    out_dim,
                )
                found[f"{path}.{sub}:q"] = (
                    "cross-q" if attn.is_cross_attention else "attn-q",
                    attn.to_q.out_features,
                )
                if not attn.is_cross_attention:
                    found[f"{path}.{sub}:k"] = ("attn-k", attn.to_k.out_features)
                    found[f"{path}.{sub}:v"] = ("attn-v", attn.to_v.out_features)
            if getattr(module, "ff", None) is not None:
                found[f"{path}.ff"] = ("ff", module.norm1.normalized_shape[0])
        elif cls == "Upsample2D":
            found[path] = ("upsampler", module.out_channels)
        elif cls == "Downsample2D":
            found[path] = ("downsampler", module.out_channels)
    return dict(sorted(found.items(), key=lambda kv: _execution_key(kv[0])))


def _transformer_channels(module: nn.Module) -> int:
    return int(getattr(module, "in_channels", None) or module.config.in_channels)


def tap_names(unet: nn.Module) -> list[str]:
    """All valid tap names of ``unet`` in execution order (no forward pass needed)."""
    return list(_catalogue(unet))


# --------------------------------------------------------------------------- presets
def _decoder(names: Iterable[str], kinds: set[str]) -> list[str]:
    return [n for n, (k, _c) in names if n.startswith("up_blocks.") and k in kinds]  # type: ignore[misc]


_ATTENTION_KINDS = {
    "attn-q",
    "attn-k",
    "attn-v",
    "attn-out",
    "cross-q",
    "cross-out",
    "ff",
    "block",
}


def _preset_dhf(cat: Mapping[str, tuple[str, int]]) -> list[str]:
    return _decoder(cat.items(), {"resnet"})


def _preset_layer4(cat: Mapping[str, tuple[str, int]]) -> list[str]:
    return _preset_dhf(cat)[3:4]


def _preset_attention(cat: Mapping[str, tuple[str, int]]) -> list[str]:
    return _decoder(cat.items(), _ATTENTION_KINDS)


def _preset_extended(cat: Mapping[str, tuple[str, int]]) -> list[str]:
    kinds = {"resnet", "transformer", "upsampler"} | _ATTENTION_KINDS
    return _decoder(cat.items(), kinds)


PRESETS: dict[str, tuple[Callable[[Mapping[str, tuple[str, int]]], list[str]], str]] = {
    "default": (_preset_dhf, "the default of diffusion sources: the same layers as dhf"),
    "dhf": (_preset_dhf, "the paper's layers: residual branch of every decoder ResNet block"),
    "layer-4": (_preset_layer4, "paper Layer 4 alone (the 4th decoder ResNet block)"),
    "concat-all": (_preset_dhf, "the same decoder ResNet layers, for the SD-Concat-All baseline"),
    "attention": (
        _preset_attention,
        "decoder transformer internals: self-attn q/k/v/out, cross-attn q/out, ff, block out",
    ),
    "extended": (
        _preset_extended,
        "Meng et al.-style candidate set: dhf + transformer outputs + attention internals + "
        "upsamplers of the decoder",
    ),
}


def resolve_taps(
    unet: nn.Module,
    taps: str | Sequence[str] | Mapping[str, str],
    *,
    model: str | None = None,
) -> dict[str, str]:
    """Validate tap names and return ``{tap name: alias}`` in the order given.

    Args:
        taps: a preset name (``"dhf"``, ``"layer-4"``, ``"concat-all"``, ``"attention"``,
            ``"extended"``), a list of names (presets may appear in the list and expand in
            place), or a ``{name: alias}`` dict.
        model: the model's name (``"sd15"``, a hub id...), used in error messages only.

    Raises:
        TapError: unknown name, with the close matches and how to list the valid ones.
    """
    catalogue = _catalogue(unet)
    if isinstance(taps, str):
        taps = [taps]
    pairs: list[tuple[str, str]] = []
    items = taps.items() if isinstance(taps, Mapping) else ((t, t) for t in taps)
    for name, alias in items:
        if name in PRESETS and name not in catalogue:
            expanded = PRESETS[name][0](catalogue)
            if not expanded:
                raise TapError(
                    f"preset {name!r} selects no tap of {_model_words(unet, model)} (no "
                    "decoder layers of that kind); run `hyperfeatures layers --model "
                    f"{model or '<name>'}` to choose taps"
                )
            pairs.extend((n, n) for n in expanded)
        elif name in catalogue:
            pairs.append((name, alias))
        else:
            raise TapError(_unknown_message(unet, name, catalogue, model))
    resolved: dict[str, str] = {}
    for name, alias in pairs:
        if name in resolved:
            continue
        if alias in resolved.values():
            raise TapError(f"alias {alias!r} is used twice; give each tap its own alias")
        resolved[name] = alias
    return resolved


def _model_words(unet: nn.Module, model: str | None) -> str:
    """``"tiny-sd (UNet2DConditionModel)"``, or ``"this UNet2DConditionModel"`` unnamed."""
    cls = type(unet).__name__
    return f"{model} ({cls})" if model else f"this {cls}"


def _unknown_message(
    unet: nn.Module, name: str, catalogue: Mapping[str, Any], model: str | None = None
) -> str:
    """One line: ``name`` is neither a preset nor a tap, the close matches, how to list taps."""
    module = name.split(":", 1)[0]
    extra = ""
    if ":" in name and module in dict(unet.named_modules()):
        parts = sorted(n.split(":", 1)[1] for n in catalogue if n.startswith(module + ":"))
        extra = f" Parts of {module!r}: {parts or 'none'}."
    close = difflib.get_close_matches(name, [*PRESETS, *catalogue], n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    lister = (
        f"`hyperfeatures layers --model {model}`"
        if model
        else "`hyperfeatures layers --model <name>` or `hyperfeatures.taps.list_taps(unet)`"
    )
    return (
        f"{name!r} is neither a tap preset ({', '.join(PRESETS)}) nor a tap of "
        f"{_model_words(unet, model)}.{hint}{extra} Run {lister} to list the valid taps."
    )
