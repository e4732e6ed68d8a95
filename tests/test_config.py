"""The typed config: loading, rejection of bad keys/types with the key path, overrides, dumping."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from infra.config import Config, ConfigError, config_from_dict, dump_config, load_config, to_dict


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_are_the_recipe_values():
    cfg = load_config(None)
    assert cfg.balance.max_per_query == 20_000
    assert cfg.queries.max_queries == 500_000
    assert cfg.queries.min_unigram_count == 100
    assert cfg.train.train_batch == cfg.train.micro_batch * cfg.train.grad_accum * cfg.train.world_size


def test_foreign_languages_default_is_every_latin_script_wordfreq_language():
    import unicodedata

    import wordfreq

    languages = load_config(None).text_filter.foreign_languages
    assert len(languages) == 26 and "en" not in languages and {"sv", "cs", "fi", "pl", "it", "de"} <= set(languages)
    for language, path in wordfreq.available_languages("best").items():  # decided by script, not by scores
        top = wordfreq.top_n_list(language, 300)
        letters = [ch for w in top for ch in w if ch.isalpha()]
        latin = sum(unicodedata.name(ch, "").startswith("LATIN") for ch in letters) / len(letters)
        assert (language in languages) == (latin > 0.99 and language != "en"), (language, latin)


def test_neutral_lid_languages_default_are_lingua_languages_of_no_list_or_of_compounds(tmp_path: Path):
    """The default: languages wordfreq has no list for (et, ga, cy, eu), and since round 9 Swedish,
    Danish and Norwegian Bokmål, whose compounds their lists lack ("brandslukker")."""
    import wordfreq
    from lingua import IsoCode639_1

    languages = load_config(None).text_filter.neutral_lid_languages
    compounding = {"sv", "da", "nb"}
    assert languages and not (set(languages) - compounding) & set(wordfreq.available_languages("best"))
    assert compounding <= set(languages)
    for code in languages:
        IsoCode639_1.from_str(code)  # raises ValueError for a language lingua lacks
    cfg = load_config(write(tmp_path, "text_filter:\n  neutral_lid_languages: [et]\n  neutral_lid_min_prob: 0.9\n"))
    assert cfg.text_filter.neutral_lid_languages == ("et",) and cfg.text_filter.neutral_lid_min_prob == 0.9
    with pytest.raises(ConfigError, match="neutral_lid_languages"):
        load_config(write(tmp_path, "text_filter:\n  neutral_lid_languages: [en, et]\n"))


def test_demo_config_loads(repo_root: Path):
    cfg = load_config(repo_root / "configs" / "demo.yaml")
    assert cfg.name == "demo"
    assert cfg.sources and cfg.sources[0].kind == "openclipart"
    assert {e.name for e in cfg.eval_sets} >= {"openclipart-heldout"}


def test_zeroshot_config_loads_with_its_frames_and_the_second_concept_set(repo_root: Path):
    cfg = load_config(repo_root / "configs" / "zeroshot.yaml")
    assert cfg.train.caption_frames and all(f.count("{}") == 1 for f in cfg.train.caption_frames)
    kinds = {e.name: (e.kind, e.split) for e in cfg.eval_sets}
    assert kinds["openclipart-concepts-b"] == ("openclipart-concepts-b", "all")
    assert "openclipart-concepts-b" not in cfg.train.curve_eval_sets  # looked at once, at the end
    assert kinds["openclipart-concepts-c"] == ("openclipart-concepts-c", "all")
    assert "openclipart-concepts-c" not in cfg.train.curve_eval_sets
    from trainer.templates import FAMILIES

    def plain(text: str) -> str:  # up to punctuation and articles
        return " ".join(w for w in re.sub(r"[^\w{}]+", " ", text.lower()).split() if w not in ("a", "an", "the"))

    prompts = {plain(t) for family in FAMILIES.values() for t in family}
    assert not {plain(f) for f in cfg.train.caption_frames} & prompts  # no frame is an eval prompt
    assert plain("A drawing of {}.") in prompts  # the check sees through articles and the full stop


def test_zeroshot_config_registers_the_fresh_fluent_set_outside_the_curve(repo_root: Path):
    cfg = load_config(repo_root / "configs" / "zeroshot.yaml")
    fresh = {e.name: e for e in cfg.eval_sets}["emoji-heldout-fluent"]
    assert (fresh.kind, fresh.path, fresh.split) == ("emoji-heldout", "runs/sources/emoji_fluent.parquet", "all")
    emoji_tune = {e.name: e for e in cfg.eval_sets}["emoji-heldout"]
    assert fresh.templates == emoji_tune.templates  # the prompts chosen on the tune split, unchanged
    assert fresh.name not in cfg.train.curve_eval_sets
    assert not any("fluent" in s.path for s in cfg.sources)  # eval only: never a training source


def test_unknown_key_is_rejected_with_its_path(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"train\.zero_stgae"):
        load_config(write(tmp_path, "train:\n  zero_stgae: 2\n"))
    with pytest.raises(ConfigError, match=r"unknown key\(s\): bogus"):
        load_config(write(tmp_path, "bogus: 1\n"))
    with pytest.raises(ConfigError, match=r"sources\.0\.colour"):
        load_config(write(tmp_path, "sources:\n  - kind: parquet\n    path: x\n    colour: red\n"))


@pytest.mark.parametrize("text, key", [
    ("train:\n  micro_batch: many\n", "train.micro_batch"),
    ("train:\n  lr: fast\n", "train.lr"),
    ("dedup:\n  within_dataset: 1\n", "dedup.within_dataset"),
    ("train:\n  zero_stage: 4\n", "train.zero_stage"),
    ("train:\n  betas: [0.9]\n", "train.betas"),
    ("sources:\n  - kind: ftp\n    path: x\n", "sources.0.kind"),
    ("sources:\n  - path: x\n", "sources.0.kind"),
    ("eval_sets: {a: 1}\n", "eval_sets"),
])
def test_wrong_types_name_the_key(tmp_path: Path, text: str, key: str):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    assert key in str(e.value)


def test_cross_field_checks_run_at_load(tmp_path: Path):
    with pytest.raises(ConfigError, match="access_key_id and storage.secret_access_key"):
        load_config(write(tmp_path, "storage:\n  access_key_id: AKIA\n"))
    with pytest.raises(ConfigError, match="duplicate names"):
        load_config(write(tmp_path, "eval_sets:\n  - {name: a, kind: fashion-mnist}\n  - {name: a, kind: mnist}\n"))
    with pytest.raises(ConfigError, match="balance.max_per_query"):
        load_config(None, ["balance.max_per_query=0"])
    with pytest.raises(ConfigError, match="shards.rows_per_shard"):
        load_config(None, ["shards.rows_per_shard=0"])
    with pytest.raises(ConfigError, match="shards.holdout_rows must be >= 0"):
        load_config(None, ["shards.holdout_rows=-1"])


def test_overrides_parse_yaml_values_and_reach_nested_lists(tmp_path: Path):
    p = write(tmp_path, "sources:\n  - kind: parquet\n    path: a.parquet\n")
    cfg = load_config(p, ["train.zero_stage=3", "train.lr=1e-3", "sources.0.path=b.parquet",
                          "text_filter.english=false", "queries.pageviews=[x.gz, y.gz]"])
    assert cfg.train.zero_stage == 3 and cfg.train.lr == pytest.approx(1e-3)
    assert cfg.sources[0].path == "b.parquet"
    assert cfg.text_filter.english is False
    assert cfg.queries.pageviews == ("x.gz", "y.gz")
    with pytest.raises(ConfigError, match="train.nope"):
        load_config(p, ["train.nope=1"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(p, ["train.lr"])


def test_configs_are_frozen():
    cfg = load_config(None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0  # type: ignore[misc]


def test_dump_round_trips_and_redacts_secrets():
    cfg = load_config(None, ["storage.access_key_id=AKIAEXAMPLE", "storage.secret_access_key=s3cr3t",
                             "train.zero_stage=3"])
    text = dump_config(cfg)
    assert "s3cr3t" not in text and "AKIAEXAMPLE" not in text and "s3cr3t" not in repr(cfg.storage)
    data = yaml.safe_load(text)
    data["storage"]["access_key_id"] = data["storage"]["secret_access_key"] = None
    again = config_from_dict(data)
    assert again.train == cfg.train and again.sources == cfg.sources
    assert to_dict(again)["train"]["betas"] == [0.9, 0.98]


def test_missing_file_and_bad_yaml(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_uri_resolution():
    cfg = Config(output="s3://bucket/run")
    assert cfg.uri("dataset") == "s3://bucket/run/dataset"
    assert cfg.uri("/abs/path") == "/abs/path"
    assert cfg.uri("file:///x") == "file:///x"


def test_output_locations():
    local = Config(name="r", output="runs/r")
    assert (local.queries_uri(), local.dataset_uri(), local.manifest_uri(), local.eval_index_uri()) == (
        "runs/r/queries", "runs/r/dataset", "runs/r/dataset/manifest.json", "runs/r/eval_index")
    assert (local.train_uri(), local.train_dir(), local.export_uri(), local.eval_uri()) == (
        "runs/r/train", Path("runs/r/train"), "runs/r/train/export", "runs/r/train/export/eval")

    s3 = config_from_dict({"name": "r", "output": "s3://b/run/", "shards": {"output": "s3://other/ds/"},
                           "train": {"output": "file:///scratch/t"}, "queries": {"output": "/abs/q"}})
    assert s3.queries_uri() == "/abs/q" and s3.eval_index_uri() == "s3://b/run/eval_index"
    assert s3.dataset_uri() == "s3://other/ds/" and s3.manifest_uri() == "s3://other/ds/manifest.json"
    assert s3.train_dir() == Path("/scratch/t") and s3.export_uri() == "file:///scratch/t/export"
    # DeepSpeed writes files: a training bound for object storage runs in a local cache named after the run.
    remote = Config(name="r", output="s3://b/run")
    assert remote.train_dir() == Path("runs/.train-cache/r") and remote.export_uri() == "s3://b/run/train/export"


def test_eval_results_go_beside_the_weights_unless_absolute():
    cfg = Config()
    assert cfg.eval_uri("s3://b/run/train/export/") == "s3://b/run/train/export/eval"
    assert cfg.eval_uri("/w/openai_layout.pt") == "/w/eval" and cfg.eval_uri("model.bin") == "./eval"
    for output in ("/abs/where/", "s3://b/evals"):
        absolute = config_from_dict({"evaluate": {"output": output}})
        assert absolute.eval_uri("/w/openai_layout.pt") == output.rstrip("/")
    nested = config_from_dict({"evaluate": {"output": "eval/v2/"}})
    assert nested.eval_uri("/w/export") == "/w/export/eval/v2"
