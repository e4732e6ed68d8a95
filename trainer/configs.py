"""Named model configs (``trainer/model_configs/<name>.json``) and the export's file names: where
they live and how a name resolves, without importing torch, so the CLI can check ``train.model``
and a checkpoint before anything starts."""

from __future__ import annotations

from pathlib import Path

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
EXPORT_WEIGHTS_NAME = "model.pt"  # an export directory: OpenAI-layout weights ...
EXPORT_CONFIG_NAME = "model_config.json"  # ... and the model config they were trained with


def model_config_names() -> list[str]:
    """The named model configs, sorted."""
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))


def model_config_path(name_or_path: str | Path) -> Path:
    """The JSON file of a named config or a path to one; ValueError naming the known names if neither."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    named = MODEL_CONFIG_DIR / f"{name_or_path}.json"
    if named.is_file():
        return named
    raise ValueError(f"unknown model config {str(name_or_path)!r}: not a file and not one of {model_config_names()}")
