"""Prompt templates: CLIP's 80, the dataset families, and how an eval set picks its family."""

from __future__ import annotations

import hashlib

import pytest

from trainer.templates import (
    BARE_TEMPLATE,
    CLIPART_TEMPLATES,
    FAMILIES,
    IMAGENET_TEMPLATES,
    MNIST_TEMPLATES,
    SINGLE_TEMPLATE,
    format_prompts,
    resolve_templates,
    templates_for,
    validate_templates,
)


def test_imagenet_family_is_clips_80_in_order():
    assert len(IMAGENET_TEMPLATES) == 80
    assert len(set(IMAGENET_TEMPLATES)) == 80
    assert IMAGENET_TEMPLATES[:3] == ("a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.")
    assert IMAGENET_TEMPLATES[-1] == "a tattoo of the {}."
    for t in ("itap of my {}.", "a {} in a video game.", "a origami {}.", "a jpeg corrupted photo of the {}."):
        assert t in IMAGENET_TEMPLATES
    # Checksum of the list as published in openai/CLIP's prompt-engineering notebook (also open_clip's
    # OPENAI_IMAGENET_TEMPLATES): guards against a silent typo in any of the 80.
    digest = hashlib.sha256("\n".join(IMAGENET_TEMPLATES).encode()).hexdigest()
    assert digest == "4f976686fb651bb5803d4689dcd849f75efe0ef19a3c801355bc9a6f03c8a5af"


def test_every_family_is_valid():
    for name, family in FAMILIES.items():
        assert validate_templates(family) == family, name
    assert SINGLE_TEMPLATE == ("a photo of a {}.",)
    assert BARE_TEMPLATE == ("{}",)


def test_family_chosen_by_kind_then_name_then_default():
    assert templates_for("digits", kind="mnist") == MNIST_TEMPLATES
    assert templates_for("held", kind="openclipart-heldout") == CLIPART_TEMPLATES
    assert "a clip art of a {}." in CLIPART_TEMPLATES
    assert templates_for("fashion-mnist", kind="parquet") == FAMILIES["fashion-mnist"]
    assert templates_for("animal-mnist") == FAMILIES["animal"]
    assert templates_for("my-photos", kind="imagefolder") == IMAGENET_TEMPLATES


def test_config_override_wins_and_expands_families():
    assert templates_for("x", kind="mnist", override=("a {} digit.",)) == ("a {} digit.",)
    got = resolve_templates(["@single", "a {} digit.", "a photo of a {}."])
    assert got == ("a photo of a {}.", "a {} digit.")  # duplicates dropped, order kept
    assert len(resolve_templates(["@imagenet", "@pets"])) == 81


@pytest.mark.parametrize("bad", [(), ("no slot",), ("two {} {}",), ("{0} {}",), ("{name}",)])
def test_bad_templates_are_rejected(bad):
    with pytest.raises(ValueError):
        validate_templates(bad)


def test_unknown_family_names_the_known_ones():
    with pytest.raises(ValueError, match="@imagenet"):
        resolve_templates(["@nope"])


def test_format_prompts_reads_underscores_as_spaces():
    assert format_prompts(("a photo of a {}.", "{}"), "ankle_boot") == ["a photo of a ankle boot.", "ankle boot"]
