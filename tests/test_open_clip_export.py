"""Exports load into OpenCLIP: ``open_clip_config.json`` beside ``model.pt`` matches what OpenCLIP's
own model configs say for OpenAI's architectures, and ``open_clip.create_model("local-dir:...")``
+ ``open_clip.load_checkpoint`` builds a model whose features equal ours.

OpenCLIP is installed ``--no-deps``; it imports torchvision, whose PyPI build cannot be imported
beside this torch. The round trip runs in a subprocess that puts the pure-Python
``torchvision/transforms`` from the wheel in ``.venv/wheels`` first on the path (see
tests/test_eval_transform.py), with ``torchvision.ops.misc.FrozenBatchNorm2d`` as the one stand-in
(open_clip's utils imports it; building and loading a CLIP never uses it).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_eval_transform import _reference_tree
from trainer.model import (CLIP, OPEN_CLIP_CONFIG_NAME, OPENAI_MODELS, from_open_clip_config, load_model_config,
                           open_clip_config, save_exported)
from trainer.tokenizer import tokenize


def _open_clip_dir() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip_torch is not installed (infra/setup.sh installs it --no-deps)")
    return Path(list(spec.submodule_search_locations)[0])


@pytest.mark.parametrize("name", OPENAI_MODELS)
def test_openai_architectures_match_open_clips_own_configs(name: str) -> None:
    theirs = json.loads((_open_clip_dir() / "model_configs" / f"{name}-quickgelu.json").read_text())
    ours = open_clip_config(load_model_config(name))
    # OpenCLIP's files leave defaults out (CLIPVisionCfg.head_width = 64): fill them in to compare.
    theirs["vision_cfg"].setdefault("head_width", 64)
    assert ours == theirs


@pytest.mark.parametrize("name", ["tiny", "zeroshot-s", "zeroshot-rn", *OPENAI_MODELS])
def test_open_clip_config_round_trips(name: str) -> None:
    config = load_model_config(name)
    back = from_open_clip_config(open_clip_config(config))
    assert back == dataclasses.replace(config, vision_heads=config.resolved_vision_heads)


def test_export_writes_open_clip_config_and_preprocessing(tmp_path: Path) -> None:
    config = load_model_config("tiny")
    save_exported(CLIP(config), tmp_path)
    written = json.loads((tmp_path / OPEN_CLIP_CONFIG_NAME).read_text())
    assert written["model_cfg"] == open_clip_config(config)
    assert written["model_cfg"]["vision_cfg"]["head_width"] == 48  # 2 heads of 96: not OpenCLIP's default 64
    assert written["preprocess_cfg"] == {"mean": [0.48145466, 0.4578275, 0.40821073],
                                         "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic",
                                         "resize_mode": "shortest", "size": 32}


_LOAD_IN_OPEN_CLIP = r'''
import sys
import numpy as np
import torch
root, export, out = sys.argv[1], sys.argv[2], sys.argv[3]
sys.path.insert(0, root + "/tvonly")
import open_clip
model = open_clip.create_model("local-dir:" + export)
open_clip.load_checkpoint(model, export + "/model.pt", strict=True)
model.eval()
data = np.load(out + ".in.npz")
with torch.no_grad():
    image = model.encode_image(torch.from_numpy(data["images"])).numpy()
    text = model.encode_text(torch.from_numpy(data["tokens"])).numpy()
visual = model.visual
heads = visual.attnpool.num_heads if hasattr(visual, "attnpool") else visual.transformer.resblocks[0].attn.num_heads
np.savez(out, image=image, text=text, scale=model.logit_scale.exp().item(), heads=heads)
'''


@pytest.mark.parametrize("name", ["tiny", "zeroshot-s", "zeroshot-rn"])
def test_export_loads_into_open_clip_with_the_same_features(tmp_path: Path, name: str) -> None:
    root = _reference_tree(tmp_path)
    tvonly = tmp_path / "reference" / "tvonly"  # torchvision only: the installed open_clip is imported
    tvonly.mkdir()
    (root / "torchvision").rename(tvonly / "torchvision")
    torch.manual_seed(0)
    model = CLIP(load_model_config(name)).eval()
    with torch.no_grad():  # trained-looking weights, not the zero-initialised ones
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    export = tmp_path / "export"
    save_exported(model, export)
    size = model.config.image_size
    images = torch.randn(3, 3, size, size)
    tokens = tokenize(["a cat", "a red apple on a table", "flag"], model.config.context_length)
    out = tmp_path / "features"
    np.savez(str(out) + ".in.npz", images=images.numpy(), tokens=tokens.numpy())
    script = tmp_path / "load.py"
    script.write_text(_LOAD_IN_OPEN_CLIP)
    subprocess.run([sys.executable, str(script), str(tmp_path / "reference"), str(export), str(out)],
                   check=True, timeout=600)
    theirs = np.load(str(out) + ".npz")
    with torch.no_grad():
        assert int(theirs["heads"]) == model.config.resolved_vision_heads
        np.testing.assert_allclose(theirs["image"], model.encode_image(images).numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(theirs["text"], model.encode_text(tokens).numpy(), rtol=1e-4, atol=1e-5)
        assert float(theirs["scale"]) == pytest.approx(model.scale().item(), rel=1e-6)
