"""Zero-shot eval throughput: the cached text classifier vs recomputing text embeddings per batch.

CLIP computes the zero-shot classifier (class x template prompt embeddings, ensembled) once per
eval set and then only encodes images. The naive baseline re-encodes every prompt for every image
batch. Both run here on the same images and model, and must predict the same classes.

    .venv/bin/python bench/eval.py [--quick] [--model tiny] [--images 512] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from trainer.eval import build_zeroshot_classifier, zeroshot_logits  # noqa: E402
from trainer.templates import IMAGENET_TEMPLATES  # noqa: E402


def load_images(n: int) -> tuple[str, list[str], list[bytes], np.ndarray]:
    """Fashion-MNIST test images from the registry; random images when it is not available."""
    try:
        from infra.config import EvalSetConfig
        from infra.eval_sets import load_eval_set

        es = load_eval_set(EvalSetConfig(name="fashion-mnist", kind="fashion-mnist"), max_images=n)
        return "fashion-mnist", list(es.classes), list(es.images), np.asarray(es.labels)
    except (ImportError, OSError, ValueError) as e:
        print(f"(fashion-mnist unavailable: {e}; using random images)")
        from PIL import Image

        rng = np.random.default_rng(0)
        images = []
        for _ in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(buf, "PNG")
            images.append(buf.getvalue())
        classes = [f"class {i}" for i in range(10)]
        return "random", classes, images, rng.integers(0, 10, n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="128 images")
    parser.add_argument("--model", default="tiny", help="model config name (randomly initialised)")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    n = 128 if args.quick else args.images
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

    from trainer.evaluate import ClipEncoder
    from trainer.model import CLIP, load_model_config

    torch.manual_seed(0)
    config = load_model_config(args.model)
    model = CLIP(config).eval()
    encoder = ClipEncoder(model, config.image_size, batch_size=args.batch_size)
    name, classes, images, labels = load_images(n)
    templates = IMAGENET_TEMPLATES  # CLIP's 80, the default family: the cost a real eval pays
    batches = [images[i:i + args.batch_size] for i in range(0, len(images), args.batch_size)]
    encoder.encode_images(batches[0][:2])  # warm-up (allocator, kernels)
    encoder.encode_texts(["warm up"])

    start = time.perf_counter()
    classifier = build_zeroshot_classifier(encoder.encode_texts, classes, templates, args.batch_size * 4)
    cached_preds = []
    for batch in batches:
        feats, _ = encoder.encode_images(batch)
        cached_preds.append(zeroshot_logits(feats, classifier).argmax(1))
    cached_s = time.perf_counter() - start

    start = time.perf_counter()
    naive_preds = []
    for batch in batches:
        per_batch = build_zeroshot_classifier(encoder.encode_texts, classes, templates, args.batch_size * 4)
        feats, _ = encoder.encode_images(batch)
        naive_preds.append(zeroshot_logits(feats, per_batch).argmax(1))
    naive_s = time.perf_counter() - start

    cached_preds, naive_preds = np.concatenate(cached_preds), np.concatenate(naive_preds)
    agree = float((cached_preds == naive_preds).mean())
    if agree < 0.99:
        raise SystemExit(f"cached and per-batch classifiers disagree on {1 - agree:.1%} of images")
    ours, base = n / cached_s, n / naive_s
    print(f"images={n} batch={args.batch_size} classes={len(classes)} templates={len(templates)} "
          f"prompts={len(classes) * len(templates)} model={args.model} set={name} agreement={agree:.3f}")
    print(f"baseline (text re-encoded per batch): {base:.1f} images/s ({naive_s:.2f} s)")
    print(f"ours (classifier cached):            {ours:.1f} images/s ({cached_s:.2f} s)")
    print(f"zero-shot eval throughput, cached classifier vs per-batch text: {ours:.1f} vs {base:.1f} images/s "
          f"ratio={ours / base:.2f}")


if __name__ == "__main__":
    main()
