"""CLIP (Radford et al. 2021) with OpenAI's parameter names and shapes.

One file, like nanoGPT's ``model.py``: a frozen ``ModelConfig`` read from a small JSON file in
``trainer/model_configs/`` and the model. Every parameter name and shape matches OpenAI's released
state dict (``visual.conv1.weight``, ``transformer.resblocks.0.attn.in_proj_weight``, ...), so OpenAI
and OpenCLIP checkpoints load strictly and our exports load into theirs. One deliberate difference:
``logit_scale`` has shape ``[1]`` here (DeepSpeed 0.19.8 crashes on 0-dim parameters); it is
reshaped on load and export.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
EXPORT_WEIGHTS_NAME = "model.pt"
EXPORT_CONFIG_NAME = "model_config.json"
OPEN_CLIP_CONFIG_NAME = "open_clip_config.json"  # for open_clip.create_model("local-dir:<export>")
# OpenAI's released architectures: the only shapes whose head counts OpenAI's rule (width / 64)
# is known to give. Their configs are in model_configs/ under these names.
OPENAI_MODELS = ("RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336")
# The eval preprocessing an export expects (OpenCLIP's preprocess_cfg): trainer.data's eval transform.
_PREPROCESS = {"mean": (0.48145466, 0.4578275, 0.40821073), "std": (0.26862954, 0.26130258, 0.27577711),
               "interpolation": "bicubic", "resize_mode": "shortest"}
MAX_LOGIT_SCALE = 100.0
# Keys OpenAI's JIT archives carry in their state dict that are not parameters.
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one CLIP model (OpenAI's ``build_model`` arguments, named plainly)."""

    embed_dim: int
    image_size: int
    vision_layers: int | tuple[int, int, int, int]  # an int: ViT depth; four ints: ResNet stages
    vision_width: int
    vision_patch_size: int | None  # None: the modified ResNet
    text_width: int
    text_heads: int
    text_layers: int
    vision_heads: int | None = None  # None: OpenAI's rule (ViT width/64, ResNet width*32/64)
    context_length: int = 77
    vocab_size: int = 49408
    quick_gelu: bool = True  # OpenAI's models use x*sigmoid(1.702x); needed to load their weights

    def __post_init__(self) -> None:
        if self.is_vit:
            if not isinstance(self.vision_layers, int):
                raise ValueError("vision_layers must be an int for a ViT (vision_patch_size set)")
            if self.image_size % self.vision_patch_size:
                raise ValueError(f"image_size {self.image_size} is not a multiple of patch size {self.vision_patch_size}")
        else:
            if isinstance(self.vision_layers, int) or len(self.vision_layers) != 4:
                raise ValueError("vision_layers must be four ints for a ResNet (vision_patch_size null)")
            if self.image_size % 32:
                raise ValueError("a ResNet image tower needs image_size divisible by 32")
        if self.vision_width % self.resolved_vision_heads or self.text_width % self.text_heads:
            raise ValueError("widths must be divisible by their head counts")

    @property
    def is_vit(self) -> bool:
        return self.vision_patch_size is not None

    @property
    def resolved_vision_heads(self) -> int:
        if self.vision_heads is not None:
            return self.vision_heads
        return self.vision_width // 64 if self.is_vit else self.vision_width * 32 // 64

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if isinstance(data["vision_layers"], tuple):
            data["vision_layers"] = list(data["vision_layers"])
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        """Build from plain data; unknown keys are rejected, as nanoGPT does."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config key(s): {unknown} (known: {sorted(known)})")
        values = dict(data)
        if isinstance(values.get("vision_layers"), list):
            values["vision_layers"] = tuple(values["vision_layers"])
        try:
            return cls(**values)
        except TypeError as e:
            raise ValueError(f"bad model config: {e}") from None

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> "ModelConfig":
        """Infer the architecture from an OpenAI-layout state dict (as OpenAI's ``build_model`` does)."""
        sd = state_dict
        if "visual.proj" in sd:
            width = sd["visual.conv1.weight"].shape[0]
            layers: int | tuple[int, int, int, int] = len(
                {k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
            patch = sd["visual.conv1.weight"].shape[-1]
            grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
            image_size = patch * grid
        else:
            layers = tuple(len({k.split(".")[2] for k in sd if k.startswith(f"visual.layer{b}.")})
                           for b in (1, 2, 3, 4))  # type: ignore[assignment]
            width = sd["visual.layer1.0.conv1.weight"].shape[0]
            patch = None
            grid = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
            image_size = grid * 32
        text_width = sd["ln_final.weight"].shape[0]
        return cls(
            embed_dim=sd["text_projection"].shape[1], image_size=image_size, vision_layers=layers,
            vision_width=width, vision_patch_size=patch, text_width=text_width,
            text_heads=text_width // 64,
            text_layers=len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")}),
            context_length=sd["positional_embedding"].shape[0], vocab_size=sd["token_embedding.weight"].shape[0])


class UnknownArchitecture(ValueError):
    """Weights whose architecture cannot be read from their shapes alone; the message says what to pass."""


def open_clip_config(config: ModelConfig) -> dict[str, Any]:
    """The model as an OpenCLIP model config (``model_configs/*.json``'s shape): ``open_clip``'s
    ``CLIP(**cfg)`` builds the same modules, with the same parameter names and shapes."""
    heads = config.resolved_vision_heads
    # OpenCLIP derives heads as width // head_width (ViT) or width * 32 // head_width (ResNet).
    vision_width = config.vision_width if config.is_vit else config.vision_width * 32
    vision: dict[str, Any] = {
        "image_size": config.image_size,
        "layers": list(config.vision_layers) if isinstance(config.vision_layers, tuple) else config.vision_layers,
        "width": config.vision_width, "patch_size": config.vision_patch_size, "head_width": vision_width // heads}
    text = {"context_length": config.context_length, "vocab_size": config.vocab_size, "width": config.text_width,
            "heads": config.text_heads, "layers": config.text_layers}
    return {"embed_dim": config.embed_dim, "quick_gelu": config.quick_gelu, "vision_cfg": vision, "text_cfg": text}


def from_open_clip_config(data: Mapping[str, Any]) -> ModelConfig:
    """The inverse of :func:`open_clip_config` (also accepts an ``open_clip_config.json``'s ``model_cfg``)."""
    cfg = data.get("model_cfg", data)
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    layers = vision["layers"]
    patch = vision.get("patch_size")
    head_width = vision.get("head_width", 64)
    heads = (vision["width"] if patch is not None else vision["width"] * 32) // head_width
    return ModelConfig(embed_dim=cfg["embed_dim"], image_size=vision["image_size"],
                       vision_layers=tuple(layers) if isinstance(layers, list) else layers,
                       vision_width=vision["width"], vision_patch_size=patch, vision_heads=heads,
                       text_width=text["width"], text_heads=text["heads"], text_layers=text["layers"],
                       context_length=text.get("context_length", 77), vocab_size=text.get("vocab_size", 49408),
                       quick_gelu=bool(cfg.get("quick_gelu", False)))


def openai_architecture(state_dict: Mapping[str, torch.Tensor], where: str = "weights") -> ModelConfig:
    """The architecture of a bare OpenAI-layout state dict, when its shapes are one of OpenAI's models.

    Head counts are not in the weights (``in_proj_weight`` is ``3w x w`` for any count); OpenAI's
    ``build_model`` assumes width / 64, which is right for their models and wrong for others (the
    ``tiny`` model has 2 heads of width 48). Any other shapes raise :class:`UnknownArchitecture`.
    """
    inferred = ModelConfig.from_state_dict(state_dict)
    for name in OPENAI_MODELS:
        if load_model_config(name) == inferred:
            return inferred
    shape = (f"{'ViT' if inferred.is_vit else 'ResNet'} width {inferred.vision_width}, text width "
             f"{inferred.text_width}, embed {inferred.embed_dim}")
    raise UnknownArchitecture(
        f"{where}: no {EXPORT_CONFIG_NAME} or {OPEN_CLIP_CONFIG_NAME} beside it, and its shapes ({shape}) are not "
        f"one of OpenAI's models ({', '.join(OPENAI_MODELS)}), so the attention head counts cannot be inferred: "
        f"pass the architecture (evaluate.model_config=NAME or a JSON path) or put {EXPORT_CONFIG_NAME} beside it")


def load_model_config(name_or_path: str | Path) -> ModelConfig:
    """A named config (``tiny``, ``ViT-B-32``, ``ViT-B-16``, ``ViT-L-14``, ``RN50``) or a JSON file."""
    path = Path(name_or_path)
    if not path.is_file():
        path = MODEL_CONFIG_DIR / f"{name_or_path}.json"
        if not path.is_file():
            names = sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))
            raise ValueError(f"unknown model config {str(name_or_path)!r}: not a file and not one of {names}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    return ModelConfig.from_dict(data)


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class SelfAttention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameter names, run through SDPA."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, quick_gelu: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, width * 4)),
            ("gelu", QuickGELU() if quick_gelu else nn.GELU()),
            ("c_proj", nn.Linear(width * 4, width)),
        ]))

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, quick_gelu: bool, causal: bool):
        super().__init__()
        self.causal = causal
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, quick_gelu) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, self.causal, use_reentrant=False)
            else:
                x = block(x, self.causal)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int,
                 output_dim: int, quick_gelu: bool):
        super().__init__()
        scale = width ** -0.5
        grid = image_size // patch_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, quick_gelu, causal=False)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).flatten(2).transpose(1, 2)  # [B, grid*grid, width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


class Bottleneck(nn.Module):
    """ResNet-D bottleneck; strided blocks downsample by average pooling (anti-aliasing), not stride."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride > 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, stride=1, bias=False)),
                ("1", nn.BatchNorm2d(planes * self.expansion)),
            ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu3(out + identity)


class AttentionPool2d(nn.Module):
    """CLIP's attention pooling: the mean feature queries all spatial features."""

    def __init__(self, spacial_dim: int, embed_dim: int, heads: int, output_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spacial_dim ** 2 + 1, embed_dim) / embed_dim ** 0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).transpose(1, 2)  # [B, HW, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)
        batch, length, width = x.shape
        head_dim = width // self.heads
        q = self.q_proj(x[:, :1]).view(batch, 1, self.heads, head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.heads, head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.c_proj(out.transpose(1, 2).reshape(batch, width))


class ModifiedResNet(nn.Module):
    """ResNet with a 3-conv stem, average-pool downsampling and attention pooling (CLIP's RN50...)."""

    def __init__(self, layers: tuple[int, int, int, int], output_dim: int, heads: int, image_size: int, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)
        self._inplanes = width
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        self.attnpool = AttentionPool2d(image_size // 32, width * 32, heads, output_dim)
        self.grad_checkpointing = False

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.avgpool(self.relu3(self.bn3(self.conv3(x))))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
        return self.attnpool(x)


# --------------------------------------------------------------------------------------------
# CLIP
# --------------------------------------------------------------------------------------------


class CLIP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        if config.is_vit:
            self.visual: nn.Module = VisionTransformer(
                config.image_size, config.vision_patch_size, config.vision_width, config.vision_layers,
                config.resolved_vision_heads, config.embed_dim, config.quick_gelu)
        else:
            self.visual = ModifiedResNet(config.vision_layers, config.embed_dim, config.resolved_vision_heads,
                                         config.image_size, config.vision_width)
        self.transformer = Transformer(config.text_width, config.text_layers, config.text_heads,
                                       config.quick_gelu, causal=True)
        self.token_embedding = nn.Embedding(config.vocab_size, config.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, config.text_width))
        self.ln_final = nn.LayerNorm(config.text_width)
        self.text_projection = nn.Parameter(torch.empty(config.text_width, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.full([1], math.log(1 / 0.07)))
        self._init_parameters()

    def _init_parameters(self) -> None:
        """OpenAI's initialisation (``CLIP.initialize_parameters``)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if isinstance(self.visual, ModifiedResNet):
            std = self.visual.attnpool.c_proj.in_features ** -0.5
            for proj in (self.visual.attnpool.q_proj, self.visual.attnpool.k_proj,
                         self.visual.attnpool.v_proj, self.visual.attnpool.c_proj):
                nn.init.normal_(proj.weight, std=std)
            for stage in (self.visual.layer1, self.visual.layer2, self.visual.layer3, self.visual.layer4):
                for name, param in stage.named_parameters():
                    if name.endswith("bn3.weight"):  # each residual branch starts as identity
                        nn.init.zeros_(param)
        else:
            for block in self.visual.transformer.resblocks:  # nn.MultiheadAttention's defaults
                nn.init.xavier_uniform_(block.attn.in_proj_weight)
                nn.init.zeros_(block.attn.out_proj.bias)
        width, layers = self.config.text_width, self.config.text_layers
        proj_std = (width ** -0.5) * ((2 * layers) ** -0.5)
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width ** -0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute block activations in backward: less memory for ~30% more compute."""
        self.transformer.grad_checkpointing = enabled
        inner = self.visual.transformer if isinstance(self.visual, VisionTransformer) else self.visual
        inner.grad_checkpointing = enabled

    @property
    def dtype(self) -> torch.dtype:
        return self.token_embedding.weight.dtype

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Unnormalised image features ``[B, embed_dim]`` from images ``[B, 3, H, W]``."""
        return self.visual(images.to(self.dtype))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Unnormalised text features ``[B, embed_dim]`` from token ids ``[B, context_length]``."""
        x = self.token_embedding(tokens) + self.positional_embedding.to(self.dtype)
        x = self.ln_final(self.transformer(x))
        # The end-of-text token has the largest id in the vocabulary, so argmax finds it.
        eot = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        return eot @ self.text_projection

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped at 100; clamping here (not in the optimizer) is ZeRO-3 safe."""
        return self.logit_scale.clamp(max=math.log(MAX_LOGIT_SCALE)).exp()

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """L2-normalised image and text features and the logit scale, as ``ClipLoss`` takes them."""
        image_features = F.normalize(self.encode_image(images), dim=-1)
        text_features = F.normalize(self.encode_text(tokens), dim=-1)
        return image_features, text_features, self.scale()


# --------------------------------------------------------------------------------------------
# OpenAI layout: load and export
# --------------------------------------------------------------------------------------------


def openai_state_dict(model: CLIP) -> dict[str, torch.Tensor]:
    """The model's state dict in OpenAI's exact layout (``logit_scale`` 0-dim), on CPU."""
    sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    sd["logit_scale"] = sd["logit_scale"].reshape(())
    return sd


def load_openai_state_dict(model: CLIP, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load an OpenAI/OpenCLIP-layout state dict strictly (extra JIT keys dropped, logit_scale reshaped)."""
    sd = {k.removeprefix("module."): v for k, v in state_dict.items() if k not in _OPENAI_EXTRA_KEYS}
    if "logit_scale" in sd:
        sd["logit_scale"] = sd["logit_scale"].reshape([1])
    model.load_state_dict(sd, strict=True)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def save_exported(model: CLIP, export_dir: str | Path) -> Path:
    """Write ``model.pt`` (OpenAI layout), ``model_config.json`` and ``open_clip_config.json`` (the
    same architecture for ``open_clip.create_model("local-dir:<export_dir>")`` and its eval
    preprocessing) into ``export_dir``."""
    export_dir = Path(export_dir)
    export_dir.mkdir(parents=True, exist_ok=True)
    tmp = export_dir / (EXPORT_WEIGHTS_NAME + ".tmp")
    torch.save(openai_state_dict(model), tmp)
    tmp.replace(export_dir / EXPORT_WEIGHTS_NAME)
    _write_json(export_dir / EXPORT_CONFIG_NAME, model.config.to_dict())
    _write_json(export_dir / OPEN_CLIP_CONFIG_NAME, {
        "model_cfg": open_clip_config(model.config),
        "preprocess_cfg": {**_PREPROCESS, "size": model.config.image_size}})
    return export_dir


def exported_config(weights: Path, state_dict: Mapping[str, torch.Tensor], where: str | None = None) -> ModelConfig:
    """The architecture of exported weights: ``model_config.json`` beside them, else
    ``open_clip_config.json``, else their shapes when they are one of OpenAI's models (else
    :class:`UnknownArchitecture`)."""
    if (weights.parent / EXPORT_CONFIG_NAME).is_file():
        return load_model_config(weights.parent / EXPORT_CONFIG_NAME)
    if (weights.parent / OPEN_CLIP_CONFIG_NAME).is_file():
        return from_open_clip_config(json.loads((weights.parent / OPEN_CLIP_CONFIG_NAME).read_text()))
    return openai_architecture({k.removeprefix("module."): v for k, v in state_dict.items()}, where or str(weights))


def load_exported(path: str | Path, map_location: str | torch.device = "cpu",
                  where: str | None = None) -> tuple[CLIP, ModelConfig]:
    """Load an export dir (``model.pt`` + its config) or a bare OpenAI-layout ``.pt``.

    The architecture comes from :func:`exported_config`: a bare state dict loads only when its
    shapes are one of OpenAI's released models (their own non-JIT checkpoints load that way).
    ``where`` names the weights in errors (e.g. the URI a local copy came from).
    """
    path = Path(path)
    weights = path / EXPORT_WEIGHTS_NAME if path.is_dir() else path
    if not weights.is_file():
        raise FileNotFoundError(f"no exported model at {weights}")
    state_dict = torch.load(weights, map_location=map_location, weights_only=True)
    if isinstance(state_dict, dict) and "state_dict" in state_dict:
        state_dict = state_dict["state_dict"]
    config = exported_config(weights, state_dict, where)
    model = CLIP(config)
    load_openai_state_dict(model, state_dict)
    return model.eval(), config
