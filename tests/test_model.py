"""trainer.model: configs, OpenAI state-dict layout, forward shapes, export round trip."""

from __future__ import annotations

import json
import math

import pytest
import torch

from trainer.model import (CLIP, ModelConfig, UnknownArchitecture, load_exported, load_model_config,
                           load_openai_state_dict, openai_architecture, openai_state_dict, save_exported)
from trainer.tokenizer import tokenize


def openai_vit_b32_shapes() -> dict[str, tuple[int, ...]]:
    """Every key and shape of OpenAI's ViT-B/32 state dict, written out from the released layout
    (openai/CLIP model.py: VisionTransformer(224, 32, 768, 12, 12, 512), text 512 wide, 12 layers)."""
    shapes: dict[str, tuple[int, ...]] = {
        "positional_embedding": (77, 512), "text_projection": (512, 512), "logit_scale": (),
        "visual.class_embedding": (768,), "visual.positional_embedding": (50, 768), "visual.proj": (768, 512),
        "visual.conv1.weight": (768, 3, 32, 32), "visual.ln_pre.weight": (768,), "visual.ln_pre.bias": (768,),
        "visual.ln_post.weight": (768,), "visual.ln_post.bias": (768,),
        "token_embedding.weight": (49408, 512), "ln_final.weight": (512,), "ln_final.bias": (512,),
    }
    for prefix, width in (("visual.transformer", 768), ("transformer", 512)):
        for i in range(12):
            block = f"{prefix}.resblocks.{i}"
            shapes.update({
                f"{block}.attn.in_proj_weight": (3 * width, width), f"{block}.attn.in_proj_bias": (3 * width,),
                f"{block}.attn.out_proj.weight": (width, width), f"{block}.attn.out_proj.bias": (width,),
                f"{block}.ln_1.weight": (width,), f"{block}.ln_1.bias": (width,),
                f"{block}.mlp.c_fc.weight": (4 * width, width), f"{block}.mlp.c_fc.bias": (4 * width,),
                f"{block}.mlp.c_proj.weight": (width, 4 * width), f"{block}.mlp.c_proj.bias": (width,),
                f"{block}.ln_2.weight": (width,), f"{block}.ln_2.bias": (width,),
            })
    return shapes


def test_named_configs_load_and_reject_unknown_keys(tmp_path):
    for name in ("tiny", "ViT-B-32", "ViT-B-16", "ViT-L-14", "RN50"):
        assert isinstance(load_model_config(name), ModelConfig)
    assert load_model_config("RN50").vision_layers == (3, 4, 6, 3)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**load_model_config("tiny").to_dict(), "dropout": 0.1}))
    with pytest.raises(ValueError, match="unknown model config key.*dropout"):
        load_model_config(bad)
    with pytest.raises(ValueError, match="unknown model config 'ViT-Z-99'"):
        load_model_config("ViT-Z-99")
    with pytest.raises(ValueError, match="multiple of patch size"):
        ModelConfig.from_dict({**load_model_config("tiny").to_dict(), "image_size": 30})


def test_openai_vit_b32_state_dict_loads_strictly_and_exports_back():
    shapes = openai_vit_b32_shapes()
    generator = torch.Generator().manual_seed(0)
    # A JIT archive's extra int entries must be tolerated, as OpenAI's build_model does.
    openai_sd = {k: torch.randn(s, generator=generator) if s else torch.tensor(4.6052) for k, s in shapes.items()}
    openai_sd["input_resolution"] = torch.tensor(224)
    assert ModelConfig.from_state_dict(openai_sd) == load_model_config("ViT-B-32")
    model = CLIP(load_model_config("ViT-B-32"))
    assert {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "logit_scale"} == \
        {k: s for k, s in shapes.items() if k != "logit_scale"}
    assert tuple(model.logit_scale.shape) == (1,)  # DeepSpeed needs >= 1-dim parameters
    load_openai_state_dict(model, openai_sd)
    assert torch.equal(model.visual.transformer.resblocks[11].attn.in_proj_weight,
                       openai_sd["visual.transformer.resblocks.11.attn.in_proj_weight"])
    exported = openai_state_dict(model)
    assert {k: tuple(v.shape) for k, v in exported.items()} == shapes
    assert exported["logit_scale"].item() == pytest.approx(4.6052)
    openai_sd.pop("visual.proj")
    with pytest.raises(RuntimeError, match="visual.proj"):
        load_openai_state_dict(model, openai_sd)


def test_rn50_layout_matches_openai_names():
    sd = CLIP(load_model_config("RN50")).state_dict()
    assert tuple(sd["visual.conv1.weight"].shape) == (32, 3, 3, 3)  # 3-conv stem, width/2
    assert tuple(sd["visual.conv3.weight"].shape) == (64, 32, 3, 3)
    assert tuple(sd["visual.layer1.0.downsample.0.weight"].shape) == (256, 64, 1, 1)
    assert tuple(sd["visual.attnpool.positional_embedding"].shape) == (50, 2048)
    assert tuple(sd["visual.attnpool.c_proj.weight"].shape) == (1024, 2048)
    assert sum(v.numel() for k, v in sd.items() if "num_batches_tracked" not in k and "running_" not in k) \
        == 102_007_137  # OpenAI's RN50 parameter count
    assert ModelConfig.from_state_dict(sd) == load_model_config("RN50")


@pytest.mark.parametrize("name", ["tiny", "RN50"])
def test_forward_shapes_normalised_features_and_clamped_scale(name):
    torch.manual_seed(0)
    config = load_model_config(name)
    if name == "RN50":  # a 64-px RN50 keeps the test quick; same code paths
        config = ModelConfig.from_dict({**config.to_dict(), "image_size": 64})
    model = CLIP(config)
    images = torch.randn(2, 3, config.image_size, config.image_size)
    tokens = tokenize(["a photo of a cat", "a drawing of a dog"])
    image_features, text_features, scale = model(images, tokens)
    assert image_features.shape == text_features.shape == (2, config.embed_dim)
    assert torch.allclose(image_features.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.scale().item() == pytest.approx(100.0, rel=1e-5)


def test_text_features_read_at_eot_behind_a_causal_mask():
    torch.manual_seed(0)
    model = CLIP(load_model_config("tiny")).eval()
    tokens = tokenize(["a red bicycle", "a red bicycle"])
    tokens[1, 10:] = 7  # tokens after EOT: only the causal mask keeps them out of the EOT feature
    features = model.encode_text(tokens)
    assert torch.allclose(features[0], features[1], atol=1e-5)
    model.transformer.causal = False  # the same check fails without the mask: the test has teeth
    unmasked = model.encode_text(tokens)
    assert not torch.allclose(unmasked[0], unmasked[1], atol=1e-4)


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = CLIP(load_model_config("tiny"))
    images = torch.randn(4, 3, 32, 32)
    tokens = tokenize(["one", "two", "three", "four"])

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        image_features, text_features, scale = model(images, tokens)
        (scale * image_features @ text_features.T).logsumexp(dim=1).sum().backward()
        return {k: p.grad.clone() for k, p in model.named_parameters()}

    plain = grads()
    model.set_grad_checkpointing(True)
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for key in plain:
        assert torch.allclose(plain[key], checkpointed[key], atol=1e-6), key


def test_export_round_trip_and_bare_openai_file(tmp_path):
    torch.manual_seed(0)
    model = CLIP(load_model_config("tiny"))
    save_exported(model, tmp_path / "export")
    saved = torch.load(tmp_path / "export" / "model.pt", weights_only=True)
    assert saved["logit_scale"].shape == ()  # OpenAI's layout on disk
    loaded, config = load_exported(tmp_path / "export")
    assert config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    # A bare .pt with no config beside it: tiny's heads (2 of width 48) are not OpenAI's width/64
    # rule (1 head), so it must not load with heads guessed.
    bare = tmp_path / "bare" / "model.pt"
    bare.parent.mkdir()
    torch.save(saved, bare)
    assert ModelConfig.from_state_dict(saved).resolved_vision_heads == 1 != model.config.resolved_vision_heads
    with pytest.raises(UnknownArchitecture, match="bare/model.pt: no model_config.json.*head counts cannot be inferred"):
        load_exported(bare)
    # With only the OpenCLIP config beside it, it loads with the right heads.
    (bare.parent / "open_clip_config.json").write_bytes((tmp_path / "export" / "open_clip_config.json").read_bytes())
    inferred, inferred_config = load_exported(bare)
    assert inferred_config.resolved_vision_heads == 2 and inferred_config.text_heads == 2
    assert math.isclose(inferred.logit_scale.item(), model.logit_scale.item())
    images, tokens = torch.randn(2, 3, 32, 32), tokenize(["a cat", "a dog"])
    assert torch.allclose(inferred.encode_image(images), model.eval().encode_image(images), atol=1e-6)
    assert torch.allclose(inferred.encode_text(tokens), model.encode_text(tokens), atol=1e-6)
    with pytest.raises(FileNotFoundError):
        load_exported(tmp_path / "nowhere")


def test_bare_openai_shapes_load_with_openais_head_rule(tmp_path):
    """OpenAI's own released shapes are the case where width/64 is right: they still load bare."""
    shapes = openai_vit_b32_shapes()
    generator = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=generator) if s else torch.tensor(4.6052) for k, s in shapes.items()}
    assert openai_architecture(sd) == load_model_config("ViT-B-32")
    torch.save(sd, tmp_path / "ViT-B-32.pt")
    _, config = load_exported(tmp_path / "ViT-B-32.pt")
    assert config == load_model_config("ViT-B-32") and config.resolved_vision_heads == 12
