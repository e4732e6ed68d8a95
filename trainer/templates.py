"""Prompt templates for zero-shot classification.

A template turns a class name into a caption (``"a photo of a {}."``). CLIP's default family is the
80 ImageNet templates of its prompt-engineering notebook; dataset-specific families add context
("a photo of the number: "{}"." for MNIST, "a clip art of a {}." for Openclipart). An eval set gets
its family from its config (``EvalSetConfig.templates``) or, when that is empty, from its kind/name.
"""

from __future__ import annotations

from typing import Sequence

# CLIP's 80 ImageNet templates, in the order of openai/CLIP notebooks/Prompt_Engineering_for_ImageNet.ipynb.
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.", "a photo of many {}.",
    "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.",
    "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.",
    "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.",
    "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.",
    "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.",
    "a painting of the {}.", "a painting of a {}.",
    "a pixelated photo of the {}.", "a sculpture of the {}.",
    "a bright photo of the {}.", "a cropped photo of a {}.",
    "a plastic {}.", "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.",
    "a photo of the {}.", "a good photo of the {}.",
    "a rendering of the {}.", "a {} in a video game.",
    "a photo of one {}.", "a doodle of a {}.",
    "a close-up photo of the {}.", "a photo of a {}.",
    "the origami {}.", "the {} in a video game.",
    "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.",
    "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.",
    "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.",
    "a cartoon {}.", "art of a {}.",
    "a sketch of the {}.", "a embroidered {}.",
    "a pixelated photo of a {}.", "itap of the {}.",
    "a jpeg corrupted photo of the {}.", "a good photo of a {}.",
    "a plushie {}.", "a photo of the nice {}.",
    "a photo of the small {}.", "a photo of the weird {}.",
    "the cartoon {}.", "art of the {}.",
    "a drawing of the {}.", "a photo of the large {}.",
    "a black and white photo of a {}.", "the plushie {}.",
    "a dark photo of a {}.", "itap of a {}.",
    "graffiti of the {}.", "a toy {}.",
    "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
)

# The two ablations the CLIP paper reports against the ensemble (bare name; one template).
BARE_TEMPLATE: tuple[str, ...] = ("{}",)
SINGLE_TEMPLATE: tuple[str, ...] = ("a photo of a {}.",)

# CLIP's MNIST prompt (openai/CLIP data/prompts.md); digits are the class names.
MNIST_TEMPLATES: tuple[str, ...] = ('a photo of the number: "{}".',)

# Fashion-MNIST is not in CLIP's list: greyscale 28x28 product photos, so the context is clothing
# and the photo style.
FASHION_MNIST_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}, a type of clothing.",
    "a photo of a {}, a type of fashion product.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
    "a photo of the {}.",
    "a photo of a {}.",
    "a product photo of a {}.",
    "a greyscale photo of a {}.",
)

# Openclipart categories are vector clip art, not photos.
CLIPART_TEMPLATES: tuple[str, ...] = (
    "a clip art of a {}.",
    "a clip art of the {}.",
    "clip art of {}.",
    "a drawing of a {}.",
    "a cartoon {}.",
    "a vector illustration of a {}.",
    "an icon of a {}.",
    "a sketch of a {}.",
    "a doodle of a {}.",
    "art of a {}.",
)

# Emoji drawings, named by their CLDR names ("cat face", "red apple").
EMOJI_TEMPLATES: tuple[str, ...] = (
    "{}",
    "{}.",
    "an emoji of {}.",
    "an icon of {}.",
    "a cartoon of {}.",
    "a drawing of {}.",
)

# Caption-shaped prompts for models trained on "title, keywords" captions, half of them unframed:
# the bare name, then the name followed by a keyword as the captions have them. The first zero-shot
# recipe's prompts (README "The previous recipe"); the current one frames every caption and uses
# the sentence families above ("clipart", "emoji").
CLIPART_CAPTION_TEMPLATES: tuple[str, ...] = (
    "{}", "{}, clip art", "{}, drawing", "{}, icon", "{}, cartoon", "{}, illustration",
)
EMOJI_CAPTION_TEMPLATES: tuple[str, ...] = (
    "{}", "{}, emoji", "{}, icon", "{}, symbol", "{}, cartoon", "{}, drawing",
)

# Animal-MNIST: small greyscale animal pictures; context as CLIP's Oxford-Pets "a type of pet.".
ANIMAL_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}, a type of animal.",
    "a black and white photo of a {}, a type of animal.",
    "a low resolution photo of a {}.",
    "a photo of a {}.",
    "a drawing of a {}.",
    "a photo of the {}.",
)

# CLIP's Oxford-IIIT Pets prompt, for ImageFolder/Parquet sets of pets.
PET_TEMPLATES: tuple[str, ...] = ("a photo of a {}, a type of pet.",)

FAMILIES: dict[str, tuple[str, ...]] = {
    "imagenet": IMAGENET_TEMPLATES,
    "bare": BARE_TEMPLATE,
    "single": SINGLE_TEMPLATE,
    "mnist": MNIST_TEMPLATES,
    "fashion-mnist": FASHION_MNIST_TEMPLATES,
    "clipart": CLIPART_TEMPLATES,
    "emoji": EMOJI_TEMPLATES,
    "clipart-caption": CLIPART_CAPTION_TEMPLATES,
    "emoji-caption": EMOJI_CAPTION_TEMPLATES,
    "animal": ANIMAL_TEMPLATES,
    "pets": PET_TEMPLATES,
}

# Eval-set kind (EvalSetConfig.kind) -> family; kinds not listed use the default (imagenet).
FAMILY_BY_KIND: dict[str, str] = {
    "mnist": "mnist",
    "fashion-mnist": "fashion-mnist",
    "animal-mnist": "animal",
    "openclipart-heldout": "clipart",
    "openclipart-concepts": "clipart",
    "openclipart-concepts-b": "clipart",
    "openclipart-concepts-c": "clipart",
    "emoji-heldout": "emoji",
}

DEFAULT_FAMILY = "imagenet"


def validate_templates(templates: Sequence[str]) -> tuple[str, ...]:
    """Check each template has exactly one ``{}`` slot; return them as a tuple."""
    out = tuple(templates)
    if not out:
        raise ValueError("templates: at least one template is needed")
    for t in out:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise ValueError(f"template {t!r}: needs exactly one '{{}}' for the class name")
        try:
            t.format("x")
        except (IndexError, KeyError, ValueError) as e:
            raise ValueError(f"template {t!r}: not a format string with one '{{}}' ({e})") from None
    return out


def resolve_templates(spec: Sequence[str]) -> tuple[str, ...]:
    """Expand a template spec: entries ``@family`` (e.g. ``@imagenet``) expand to that family;
    anything else is a literal template. Duplicates are dropped, first occurrence kept."""
    out: list[str] = []
    for item in spec:
        if isinstance(item, str) and item.startswith("@"):
            name = item[1:]
            if name not in FAMILIES:
                raise ValueError(f"template family {item!r}: unknown (known: {', '.join('@' + f for f in FAMILIES)})")
            out.extend(FAMILIES[name])
        else:
            out.append(item)
    return validate_templates(dict.fromkeys(out))


def templates_for(name: str, kind: str | None = None, override: Sequence[str] = ()) -> tuple[str, ...]:
    """The template family for an eval set: ``override`` (its config's ``templates``) if given,
    else the family for its ``kind``, else one whose name matches ``name``, else CLIP's 80."""
    if override:
        return resolve_templates(override)
    if kind in FAMILY_BY_KIND:
        return FAMILIES[FAMILY_BY_KIND[kind]]
    key = name.lower()
    for k, family in FAMILY_BY_KIND.items():
        if k == key or key.startswith(k):
            return FAMILIES[family]
    return FAMILIES[DEFAULT_FAMILY]


def format_prompts(templates: Sequence[str], class_name: str) -> list[str]:
    """All captions for one class (class names with underscores read as words)."""
    label = class_name.replace("_", " ")
    return [t.format(label) for t in templates]
