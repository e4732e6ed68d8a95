"""Evaluation: the maths on features built so the right answer is known, then the runner end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trainer.eval import (
    ClassifierCache,
    build_zeroshot_classifier,
    classification_metrics,
    confusion_matrix,
    ensemble_classifier,
    l2_normalize,
    linear_probe,
    per_class_accuracy,
    retrieval_recall,
    stratified_split,
    topk_accuracy,
    zeroshot_logits,
    zeroshot_report,
    _fit_logistic,
)
from trainer.templates import format_prompts

DIM = 48


def _prototypes(num_classes: int, rng: np.random.Generator) -> np.ndarray:
    return l2_normalize(rng.normal(size=(num_classes, DIM)))


def _fake_text_encoder(class_names, templates, prototypes, noise, rng):
    """A text 'model' whose prompt embeddings are the class prototype plus per-prompt noise."""
    table = {}
    for c, name in enumerate(class_names):
        for prompt in format_prompts(templates, name):
            table[prompt] = prototypes[c] + noise * rng.normal(size=DIM)
    calls = []

    def encode(texts: list[str]) -> np.ndarray:
        calls.append(len(texts))
        return np.stack([table[t] for t in texts]) * 3.0  # unnormalised on purpose

    return encode, calls


def _binomial_band(p: float, n: int, sigmas: float = 4.0) -> float:
    return sigmas * math.sqrt(p * (1 - p) / n)


# ------------------------------------------------------------------------------------------------
# Zero-shot on separable-by-construction features
# ------------------------------------------------------------------------------------------------


def test_zeroshot_separable_is_high_and_shuffled_labels_at_chance():
    rng = np.random.default_rng(0)
    names = [f"class_{i}" for i in range(10)]
    templates = ("a photo of a {}.", "a drawing of a {}.", "{}")
    protos = _prototypes(10, rng)
    encode, _ = _fake_text_encoder(names, templates, protos, noise=0.05, rng=rng)
    classifier = build_zeroshot_classifier(encode, names, templates, batch_size=7)
    n = 2000
    labels = rng.integers(0, 10, n)
    images = protos[labels] + 0.08 * rng.normal(size=(n, DIM))

    m = classification_metrics(zeroshot_logits(images, classifier), labels, names)
    assert m["top1"] > 0.95
    assert m["top5"] >= m["top1"]
    assert m["chance_top1"] == pytest.approx(0.1)
    assert m["chance_top5"] == pytest.approx(0.5)
    assert sum(m["support"].values()) == n

    shuffled = rng.permutation(labels)
    control = classification_metrics(zeroshot_logits(images, classifier), shuffled, names)
    assert abs(control["top1"] - 0.1) <= _binomial_band(0.1, n)
    assert abs(control["top5"] - 0.5) <= _binomial_band(0.5, n)


def test_ensembling_beats_a_single_noisy_template():
    rng = np.random.default_rng(1)
    names = [f"c{i}" for i in range(20)]
    templates = tuple(f"template {i} of a {{}}." for i in range(40))
    protos = _prototypes(20, rng)
    # Each prompt is very noisy; averaging 40 of them cancels most of the noise.
    encode, _ = _fake_text_encoder(names, templates, protos, noise=0.35, rng=rng)
    n = 3000
    labels = rng.integers(0, 20, n)
    images = protos[labels] + 0.15 * rng.normal(size=(n, DIM))
    report = zeroshot_report(images, labels, {
        "single": build_zeroshot_classifier(encode, names, templates[:1]),
        "ensemble": build_zeroshot_classifier(encode, names, templates),
    }, names)
    assert report["ensemble"]["top1"] > report["single"]["top1"] + 0.05
    assert report["ensemble"]["top1"] > 0.9


def test_ensemble_is_mean_of_normalised_embeddings_renormalised():
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(4, 5, 8))
    got = ensemble_classifier(feats)
    for c in range(4):
        units = [v / np.linalg.norm(v) for v in feats[c]]
        mean = np.mean(units, axis=0)
        np.testing.assert_allclose(got[c], mean / np.linalg.norm(mean), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    # Normalising before averaging: one template with a huge norm must not dominate its class.
    scaled = feats.copy()
    scaled[:, 0] *= 1000.0
    np.testing.assert_allclose(ensemble_classifier(scaled), got, rtol=1e-4, atol=1e-5)
    naive = l2_normalize(scaled.mean(axis=1))
    assert not np.allclose(naive, got, atol=1e-2)
    with pytest.raises(ValueError, match="classes, templates, dim"):
        ensemble_classifier(feats[0])


def test_classifier_cache_builds_once_per_key(tmp_path):
    rng = np.random.default_rng(3)
    names = ["cat", "dog"]
    protos = _prototypes(2, rng)
    encode, calls = _fake_text_encoder(names, ("a {}.", "the {}."), protos, 0.0, rng)
    cache = ClassifierCache(tmp_path / "cache")

    def build(templates):
        return lambda: build_zeroshot_classifier(encode, names, templates)

    a = cache.get_or_build("model-a", "pets", names, ("a {}.", "the {}."), build(("a {}.", "the {}.")))
    b = cache.get_or_build("model-a", "pets", names, ("a {}.", "the {}."), build(("a {}.", "the {}.")))
    assert a is b and len(calls) == 1 and (cache.hits, cache.misses) == (1, 1)
    cache.get_or_build("model-a", "pets", names, ("a {}.",), build(("a {}.",)))  # other templates
    cache.get_or_build("model-b", "pets", names, ("a {}.",), build(("a {}.",)))  # other model
    assert len(calls) == 3 and cache.misses == 3
    # A fresh cache over the same directory reads from disk instead of encoding.
    again = ClassifierCache(tmp_path / "cache")
    c = again.get_or_build("model-a", "pets", names, ("a {}.", "the {}."), build(("a {}.", "the {}.")))
    np.testing.assert_array_equal(c, a)
    assert len(calls) == 3 and again.hits == 1
    with pytest.raises(ValueError, match="expected \\[2, D\\]"):
        cache.get_or_build("m", "x", names, ("{}",), lambda: np.zeros((3, 4)))


# ------------------------------------------------------------------------------------------------
# Metrics against a direct numpy computation
# ------------------------------------------------------------------------------------------------


def test_topk_and_confusion_agree_with_direct_numpy():
    rng = np.random.default_rng(4)
    n, c = 500, 12
    logits = rng.normal(size=(n, c))
    labels = rng.integers(0, c, n)
    order = np.argsort(-logits, axis=1)
    for k in (1, 3, 5, 12, 20):
        direct = np.mean([labels[i] in order[i, :k] for i in range(n)])
        assert topk_accuracy(logits, labels, (k,))[k] == pytest.approx(direct)
    preds = logits.argmax(1)
    cm = confusion_matrix(labels, preds, c)
    direct_cm = np.zeros((c, c), np.int64)
    for t, p in zip(labels, preds):
        direct_cm[t, p] += 1
    np.testing.assert_array_equal(cm, direct_cm)
    pca = per_class_accuracy(cm)
    for k in range(c):
        assert pca[k] == pytest.approx(np.mean(preds[labels == k] == k))
    m = classification_metrics(logits, labels, [str(i) for i in range(c)])
    assert m["top1"] == pytest.approx(np.mean(preds == labels))
    assert m["confusion"] == direct_cm.tolist()
    assert m["mean_per_class"] == pytest.approx(np.mean(pca))


def test_absent_class_and_bad_labels():
    cm = confusion_matrix(np.array([0, 0, 1]), np.array([0, 1, 1]), 3)
    pca = per_class_accuracy(cm)
    assert pca[0] == 0.5 and pca[1] == 1.0 and np.isnan(pca[2])
    m = classification_metrics(np.array([[1.0, 0, 0], [0, 1.0, 0]]), np.array([0, 1]), ["a", "b", "c"])
    assert m["per_class"]["c"] is None and m["support"]["c"] == 0
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(np.array([0, 3]), np.array([0, 0]), 3)
    with pytest.raises(ValueError, match="do not match"):
        topk_accuracy(np.zeros((3, 2)), np.zeros(4, np.int64))


def test_retrieval_recall_agrees_with_direct_numpy_with_multiple_captions():
    rng = np.random.default_rng(5)
    n_img = 60
    owner = np.concatenate([np.arange(n_img), rng.integers(0, n_img, 90)])  # 1..n captions per image
    img = rng.normal(size=(n_img, DIM))
    txt = img[owner] + 4.0 * rng.normal(size=(len(owner), DIM))
    got = retrieval_recall(img, txt, owner, ks=(1, 5, 10))
    sim = l2_normalize(img) @ l2_normalize(txt).T
    for k in (1, 5, 10):
        i2t = np.mean([np.isin(np.argsort(-sim[i])[:k], np.flatnonzero(owner == i)).any() for i in range(n_img)])
        t2i = np.mean([owner[j] in np.argsort(-sim[:, j])[:k] for j in range(len(owner))])
        assert got[f"image_to_text_R@{k}"] == pytest.approx(i2t)
        assert got[f"text_to_image_R@{k}"] == pytest.approx(t2i)
    assert got["images"] == n_img and got["texts"] == len(owner)
    assert got["image_to_text_R@1"] < got["image_to_text_R@10"] <= 1.0
    assert got["chance_text_to_image_R@5"] == pytest.approx(5 / n_img)


def test_retrieval_random_features_at_chance_and_matched_features_perfect():
    rng = np.random.default_rng(6)
    n = 400
    owner = np.arange(n)
    img = rng.normal(size=(n, DIM))
    perfect = retrieval_recall(img, img * 2.0, owner)
    assert perfect["image_to_text_R@1"] == 1.0 and perfect["text_to_image_R@1"] == 1.0
    rnd = retrieval_recall(img, rng.normal(size=(n, DIM)), owner)
    p = rnd["chance_text_to_image_R@10"]
    assert p == pytest.approx(10 / n)
    assert abs(rnd["text_to_image_R@10"] - p) <= _binomial_band(p, n)
    assert abs(rnd["image_to_text_R@10"] - rnd["chance_image_to_text_R@10"]) <= _binomial_band(p, n)
    with pytest.raises(ValueError, match="indices outside"):
        retrieval_recall(img, img, owner + 1)


# ------------------------------------------------------------------------------------------------
# Linear probe
# ------------------------------------------------------------------------------------------------


def _gaussian_problem(n, d, sep, flip, seed, num_classes=2, n_test=2000):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(num_classes, d))
    means *= sep / np.linalg.norm(means, axis=1, keepdims=True)

    def draw(m, flip_rate):
        y = rng.integers(0, num_classes, m)
        x = means[y] + rng.normal(size=(m, d))
        flipped = rng.random(m) < flip_rate
        return x, np.where(flipped, rng.integers(0, num_classes, m), y)

    return (*draw(n, flip), *draw(n_test, 0.0))


def test_linear_probe_picks_strong_regularisation_where_labels_are_noisy():
    # Few samples, many dimensions, 30% label noise: weak regularisation fits the noise, so the
    # right C sits well inside the sweep, far from the unregularised end.
    cs = np.logspace(-4, 4, 9)
    x, y, xt, yt = _gaussian_problem(300, 100, 1.5, 0.3, seed=0)
    result = linear_probe(x, y, xt, yt, cs=cs, val_fraction=0.3)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):  # as linear_probe does: threaded BLAS is slower on tiny fits
        oracle = {c: float((_fit_logistic(x, y, c, 1000, 0).predict(xt) == yt).mean()) for c in cs}
    assert 1e-4 < result["best_C"] < 1e-1
    assert result["top1"] >= max(oracle.values()) - 0.04
    assert result["top1"] > oracle[1e4] + 0.02  # it beat the barely regularised fit
    assert result["n_train"] + result["n_val"] == 300 and result["n_test"] == 2000
    assert len(result["val_accuracy"]) == 9 + 4  # the sweep plus two bisection rounds


def test_linear_probe_avoids_underfitting_on_a_clean_problem():
    cs = np.logspace(-4, 4, 9)
    x, y, xt, yt = _gaussian_problem(200, 10, 5.0, 0.0, seed=1, num_classes=3)
    result = linear_probe(x, y, xt, yt, cs=cs)
    assert result["best_C"] >= 1e-2  # tiny C predicts the intercept only
    assert result["top1"] > 0.95
    assert result["chance_top1"] == pytest.approx(1 / 3)


def test_linear_probe_rejects_degenerate_inputs():
    x = np.zeros((10, 3))
    with pytest.raises(ValueError, match="two classes"):
        linear_probe(x, np.zeros(10, np.int64), x, np.zeros(10, np.int64))
    with pytest.raises(ValueError, match="positive"):
        linear_probe(x, np.arange(10) % 2, x, np.arange(10) % 2, cs=(0.0, 1.0))


def test_stratified_split_keeps_every_class_on_both_sides():
    labels = np.array([0] * 10 + [1] * 4 + [2] * 1)
    rest, part = stratified_split(labels, 0.25, seed=0)
    assert sorted(np.concatenate([rest, part]).tolist()) == list(range(15))
    assert set(labels[part]) == {0, 1} and set(labels[rest]) == {0, 1, 2}
    again = stratified_split(labels, 0.25, seed=0)
    np.testing.assert_array_equal(again[1], part)


# ------------------------------------------------------------------------------------------------
# The runner end to end: a tiny randomly initialised model from the trainer, a handful of images
# ------------------------------------------------------------------------------------------------

COLOURS = {"red": (230, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 220)}


def _png(rgb, size=(24, 18)) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    import torch

    from trainer.model import CLIP, load_model_config, save_exported

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("ckpt")
    model = CLIP(load_model_config("tiny"))
    save_exported(model, root / "train" / "export")
    return root / "train" / "export"


@pytest.fixture()
def colour_folder(tmp_path):
    """An ImageFolder eval set: <class>/<image>.png, 6 per class, one more image that is corrupt."""
    root = tmp_path / "colours"
    for c, (name, rgb) in enumerate(COLOURS.items()):
        (root / name).mkdir(parents=True)
        for i in range(6):
            (root / name / f"{i}.png").write_bytes(_png(rgb, (20 + i + c, 18)))
    (root / "red" / "zz-corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"truncated")
    return root


@pytest.fixture()
def colour_set():
    from trainer.evaluate import ClassificationSet

    names = list(COLOURS)
    images = [_png(COLOURS[names[i % 3]], (20 + i, 18)) for i in range(18)]
    return ClassificationSet("colours", names, images, np.array([i % 3 for i in range(18)]))


def _colour_rows(rows: range, repeat_last: bool = False):
    import pyarrow as pa

    images = [_png(COLOURS[list(COLOURS)[i % 3]], (16 + i, 16)) for i in rows]
    if repeat_last:
        images[-1] = images[-2]  # the same picture with a second caption
    return pa.table({"sample_id": [f"s{i}" for i in rows], "source": ["test"] * len(rows),
                     "caption": [f"a {list(COLOURS)[i % 3]} square number {i}" for i in rows], "image": images})


def _write_build(root, shards: list, holdout: list = ()) -> None:
    """Shards and a manifest, written as a build writes them (tasks.shards, infra.manifest)."""
    from infra.manifest import build_manifest, write_manifest
    from infra.storage import ObjectStore
    from tasks.shards import write_shard

    store = ObjectStore(str(root))
    written = [write_shard(store, i, table) for i, table in enumerate(shards)]
    held = [write_shard(store, i, table, prefix="holdout") for i, table in enumerate(holdout)]
    write_manifest(store, build_manifest(config={}, shards=written, funnel={}, queries=None, eval_index=None,
                                         holdout=held))


@pytest.fixture()
def tiny_dataset(tmp_path):
    """A build of 2 training shards of 6 rows and a held-out shard of 8 (two of its rows share an image)."""
    root = tmp_path / "dataset"
    _write_build(root, [_colour_rows(range(0, 6)), _colour_rows(range(6, 12))],
                 holdout=[_colour_rows(range(12, 20), repeat_last=True)])
    return root


def test_runner_end_to_end_writes_results_table_and_plots(tiny_export, colour_folder, tiny_dataset):
    import json

    from PIL import Image

    from infra.config import EvalConfig, EvalSetConfig
    from trainer.evaluate import evaluate_checkpoint

    sets = [EvalSetConfig(name="colours", kind="imagefolder", path=str(colour_folder),
                          templates=("a {} square.", "@single")),
            EvalSetConfig(name="broken", kind="imagefolder", path="/nonexistent")]
    cfg = EvalConfig(batch_size=8)
    out = tiny_export / "eval"
    results = evaluate_checkpoint(str(tiny_export), sets, cfg, results_uri=str(out),
                                  dataset_uri=str(tiny_dataset))  # real registry
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["model_id"] == results["model_id"] and len(results["model_id"]) == 64
    r = on_disk["eval_sets"]["colours"]
    assert r["images"] == 18 and r["funnel"]["stages"][0]["dropped"] == {"undecodable_image": 1}
    assert set(r["zeroshot"]) == {"bare", "single", "ensemble"}
    assert r["templates"]["count"] == 2  # the config override, "@single" expanded
    for m in r["zeroshot"].values():
        cm = np.array(m["confusion"])
        assert cm.shape == (3, 3) and cm.sum() == 18
        assert m["top1"] == pytest.approx(np.trace(cm) / 18)
        assert 0.0 <= m["top1"] <= m["top5"] == 1.0  # top-5 of 3 classes always hits
        assert m["chance_top1"] == pytest.approx(1 / 3) and set(m["per_class"]) == set(COLOURS)
    # Pure-colour images are trivially separable in pixel space, so even random features probe well.
    assert r["linear_probe"]["top1"] >= 0.8 and r["linear_probe"]["n_test"] == 9
    assert "broken" in on_disk["errors"] and "not found: /nonexistent" in on_disk["errors"]["broken"]

    ret = on_disk["retrieval"]
    assert ret["rows"] == 8 and ret["texts"] == 8 and ret["images"] == 7  # two captions share an image
    # This export records no training ids (it was never trained): exclusion cannot be checked, so
    # it is not claimed (tests/test_provenance.py has a trained checkpoint, both ways).
    assert ret["excluded_from_training"] is None and ret["excluded_check"].startswith("not checked")
    for k in (1, 5, 10):
        assert 0.0 <= ret[f"image_to_text_R@{k}"] <= 1.0 and 0.0 <= ret[f"text_to_image_R@{k}"] <= 1.0
    assert ret["image_to_text_R@10"] == 1.0 and ret["text_to_image_R@10"] == 1.0  # 10 >= 7 images

    md = (out / "results.md").read_text()
    assert "| colours | 3 | 18 | 33.3% |" in md and "broken" in md and "text → image" in md
    zs = on_disk["eval_sets"]["colours"]["zeroshot"]
    ratio = zs["ensemble"]["mean_per_class"] * 3
    assert (f"| colours | 3 | 33.3% | {100 * zs['bare']['mean_per_class']:.1f}% |" in md
            and f"| {ratio:.2f}x |" in md)  # mean per-class accuracy and its ratio to chance (1/K)
    with Image.open(out / "plots" / "colours.png") as im:
        assert im.format == "PNG" and im.size[0] >= 300
    # Each image's prediction per variant, beside the results: they rebuild every confusion matrix.
    import pyarrow.parquet as pq

    preds = pq.read_table(out / "predictions" / "colours.parquet").to_pydict()
    assert on_disk["outputs"]["predictions"]["colours"].endswith("predictions/colours.parquet")
    assert set(preds) == {"id", "label", "bare", "single", "ensemble"} and len(preds["id"]) == 18
    assert len(set(preds["id"])) == 18 and "predictions" not in r
    for variant, m in r["zeroshot"].items():
        cm = np.zeros((3, 3), np.int64)
        np.add.at(cm, (preds["label"], preds[variant]), 1)
        assert cm.tolist() == m["confusion"]

    # A rerun reuses the classifiers cached beside the results instead of re-encoding prompts.
    again = evaluate_checkpoint(str(tiny_export), sets[:1], cfg, results_uri=str(out))
    assert again["classifier_cache"] == {"hits": 3, "misses": 0}
    assert again["eval_sets"]["colours"]["zeroshot"] == results["eval_sets"]["colours"]["zeroshot"]


def test_plain_state_dict_loads_with_its_config(tiny_export, tmp_path):
    import torch

    from trainer.evaluate import ClipEncoder, load_checkpoint

    plain = tmp_path / "weights" / "openai_layout.pt"
    plain.parent.mkdir()
    plain.write_bytes((tiny_export / "model.pt").read_bytes())
    exported = load_checkpoint(str(tiny_export))
    named = load_checkpoint(str(plain), model_config="tiny")
    assert named.model_id == exported.model_id
    assert named.weights_uri == str(plain) and exported.weights_uri == str(tiny_export / "model.pt")
    texts = ["a red square", "a photo of a dog"]
    reference = ClipEncoder(exported.model, 32).encode_texts(texts)
    np.testing.assert_allclose(ClipEncoder(named.model, 32).encode_texts(texts), reference, atol=1e-5)
    assert torch.equal(named.model.logit_scale, exported.model.logit_scale)
    # Shapes fix every size but not the head counts (OpenAI's width/64 rule would give tiny 1 head,
    # not 2): a bare state dict of a non-OpenAI model is refused, not loaded wrong.
    from trainer.model import UnknownArchitecture

    with pytest.raises(UnknownArchitecture, match="openai_layout.pt: no model_config.json.*evaluate.model_config"):
        load_checkpoint(str(plain))
    # The OpenCLIP config beside it is enough (as an export from another tool would bring).
    (plain.parent / "open_clip_config.json").write_bytes((tiny_export / "open_clip_config.json").read_bytes())
    beside = load_checkpoint(str(plain))
    assert beside.model_config.resolved_vision_heads == 2
    np.testing.assert_allclose(ClipEncoder(beside.model, 32).encode_texts(texts), reference, atol=1e-5)

    with pytest.raises(ValueError, match="do not fit model config 'ViT-B-32'"):
        load_checkpoint(str(plain), model_config="ViT-B-32")
    with pytest.raises(FileNotFoundError, match="no checkpoint weights"):
        load_checkpoint(str(tmp_path / "nowhere"))


def test_flow_task_resolves_checkpoint_and_results_from_the_config(tiny_export, colour_folder, tmp_path):
    from flows.evaluate import evaluate_checkpoint_task
    from infra.config import Config, EvalSetConfig, TrainConfig
    from trainer.results import SET_COLUMNS, markdown_table, result_rows

    config = Config(output=str(tmp_path / "run"), train=TrainConfig(output=str(tiny_export.parent)),
                    eval_sets=(EvalSetConfig(name="colours", kind="imagefolder", path=str(colour_folder)),))
    assert config.export_uri() == str(tiny_export)
    results = evaluate_checkpoint_task.fn(config, config.export_uri())
    assert results["outputs"]["json"] == str(tiny_export / "eval" / "results.json")
    assert "retrieval" not in results  # no dataset manifest in this run: skipped, not failed
    rows = result_rows(results)
    assert len(rows) == 1 and tuple(rows[0]) == SET_COLUMNS
    assert rows[0]["eval set"] == "colours" and rows[0]["chance"] == "33.3%" and rows[0]["classes"] == 3
    # The table artifact's rows are the rows of results.md.
    cells = " | ".join(str(v) for v in rows[0].values())
    assert f"| {cells} |" in markdown_table(results).splitlines()
    assert (tiny_export / "eval" / "results.md").read_text() == markdown_table(results)


def test_heldout_pairs_follow_the_manifest(tiny_dataset, tmp_path):
    from trainer.evaluate import load_heldout_pairs

    # The held-out shards, all of them, never the training shards.
    table, info = load_heldout_pairs(str(tiny_dataset))
    assert table.column("sample_id").to_pylist() == [f"s{i}" for i in range(12, 20)]
    assert info["rows"] == 8
    assert info["source"] == "the manifest's held-out shards"

    # No held-out shards: nothing to score on (training saw every other pair), said in one line.
    bare = tmp_path / "bare"
    _write_build(bare, [_colour_rows(range(0, 6))])
    with pytest.raises(LookupError, match="lists no held-out shards: build with shards.holdout_rows > 0"):
        load_heldout_pairs(str(bare))
    with pytest.raises(FileNotFoundError, match="no dataset manifest"):
        load_heldout_pairs(str(tiny_dataset / "nowhere"))


def test_checkpoint_on_s3_results_written_beside_it(tiny_export, colour_set, s3_store):
    """The same run against a real S3 server (SeaweedFS on loopback): weights read from and
    results written to the bucket, beside the checkpoint."""
    from infra.config import Config, EvalConfig, EvalSetConfig
    from trainer.evaluate import evaluate_checkpoint

    for name in ("model.pt", "model_config.json"):
        s3_store.write_bytes(f"train/export/{name}", (tiny_export / name).read_bytes())
    checkpoint = s3_store.uri("train/export")
    results = evaluate_checkpoint(checkpoint, [EvalSetConfig(name="colours", kind="parquet", path="/in-memory")],
                                  EvalConfig(linear_probe=False, ensembles=False),
                                  results_uri=Config().eval_uri(checkpoint), storage=s3_store.config,
                                  load_set=lambda cfg: colour_set)
    assert results["outputs"]["json"] == s3_store.uri("train/export/eval/results.json")
    assert s3_store.list("train/export/eval") == ["train/export/eval/plots/colours.png",
                                                  "train/export/eval/predictions/colours.parquet",
                                                  "train/export/eval/results.json", "train/export/eval/results.md"]
    saved = s3_store.read_json("train/export/eval/results.json")
    assert set(saved["eval_sets"]["colours"]["zeroshot"]) == {"ensemble"}
    assert saved["model_id"] == results["model_id"]
