"""Prompt templates: ``{category}`` in ``settings.prompt`` is filled per image.

DIFT conditions real images on ``"a photo of a {category}"``. Where the category of an image
is known (the pairs of an evaluation) the caller fills the template (:func:`fill_prompt`)
before running the source; a source given a prompt that is still a template refuses it
(:func:`real_image_prompt`) rather than condition on the literal text ``{category}``.
"""

from __future__ import annotations

from ..config import Settings, SettingsError

__all__ = ["CATEGORY_FIELD", "fill_prompt", "real_image_prompt", "uses_category"]

CATEGORY_FIELD = "{category}"
"""The placeholder of a prompt template (``"a photo of a {category}"``)."""


def uses_category(prompt: str) -> bool:
    """Whether ``prompt`` is a template that needs a category."""
    return CATEGORY_FIELD in prompt


def fill_prompt(template: str, category: str | None) -> str:
    """``template`` with every ``{category}`` replaced by ``category`` (other braces are
    left alone); a prompt without the placeholder is returned unchanged.

    Raises:
        SettingsError: the template has the placeholder and ``category`` is ``None`` or empty.
    """
    if CATEGORY_FIELD not in template:
        return template
    if not isinstance(category, str) or not category.strip():
        raise _template_error(template)
    return template.replace(CATEGORY_FIELD, category.strip())


def real_image_prompt(settings: Settings) -> str:
    """The prompt of a run on real images: ``settings.prompt``, refused while it is still a
    ``{category}`` template (the caller fills it per image: :func:`fill_prompt`).

    Raises:
        SettingsError: the prompt holds ``{category}``.
    """
    return fill_prompt(settings.prompt, None)


def _template_error(template: str) -> SettingsError:
    return SettingsError(
        f"settings field 'prompt': {template!r} is a template; {CATEGORY_FIELD} is filled with "
        "each image's category where one is known (evaluation pairs), and these images have "
        "none: write the category into the prompt instead (e.g. --prompt 'a photo of a cat')"
    )
