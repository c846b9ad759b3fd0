"""Config loading: overrides by path and by task name, strict keys, clear errors."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import build_config
from training.config import ConfigError, config_from_dict, load_config, save_config
from training.data.manifest import ManifestError, Vocabulary, folder_manifest, read_manifest


def test_overrides_by_dotted_path_and_task_name(tiny_config: dict[str, Any]) -> None:
    cfg = build_config(tiny_config, "optim.lr=0.2", "tasks.category.weight=3", "tasks.0.num_sampled=4",
                       "model.trunk_kwargs={drop_path_rate: 0.1}")
    assert cfg.optim.lr == 0.2 and cfg.task("category").weight == 3.0 and cfg.task("identity").num_sampled == 4
    assert cfg.model.trunk_kwargs == {"drop_path_rate": 0.1}
    assert cfg.task("pairs").label_key == "identity" and cfg.task("category").label_key == "category"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=1", "unknown keys"),
        ("optim.optimizer=lamb", "not one of"),
        ("tasks.nope.weight=1", "no list item named"),
        ("train.epochs=zero", "expected an integer"),
        ("tasks.identity.head=softmax", "not one of"),
        ("optim.head_warmup_epochs=5", "head_warmup_epochs"),
        ("preprocess.resize=zoom", "preprocess"),
        ("justakey", "key=value"),
        ("optim.proxy_imprint=1.5", "proxy_imprint"),
        ("train.low_res_size=32", "low_res_size"),  # not below the 32 px input
        ("train.low_res_size=16", "low_res_fraction"),
        ("model.color_layout=-1", "color_layout must be >= 0"),
        ("model.saturation=-1", "saturation must be a finite number >= 0"),
        ("optim.sign_loss_weight=-0.5", "sign_loss_weight must be >= 0"),
        ("optim.quantization_weight=-1", "quantization_weight must be >= 0"),
        ("optim.koleo_weight=-1", "koleo_weight must be >= 0"),
        ("optim.koleo_exclude=colour", "koleo_exclude 'colour' is not a single-label task"),
        ("optim.koleo_exclude=attributes", "not a single-label task"),  # multi-label
        ("model.color_layout=5", "input_size \\(32\\) must be a multiple of model.color_layout"),
    ],
)
def test_bad_configs_name_the_key(tiny_config: dict[str, Any], override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config(tiny_config, override)


def test_resolved_config_round_trips(tiny_config: dict[str, Any], tmp_path: Path) -> None:
    cfg = build_config(tiny_config)
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_shipped_configs_load() -> None:
    root = Path(__file__).resolve().parents[2] / "configs"
    for path in root.glob("*.yaml"):
        assert load_config(path).tasks, path


def test_a_config_on_a_base_merges_mappings_and_replaces_lists(tiny_config: dict[str, Any], tmp_path: Path) -> None:
    save_config(build_config(tiny_config), tmp_path / "base.yaml")
    (tmp_path / "sub").mkdir()
    child = tmp_path / "sub" / "child.yaml"
    manifest = tiny_config["tasks"][0]["manifest"]
    child.write_text("base: ../base.yaml\noptim: {sign_loss_weight: 2.0, lr: 0.01}\n"
                     f"tasks:\n  - {{name: identity, manifest: {manifest}, head: norm_softmax}}\n")
    cfg = load_config(child, ["train.epochs=5"])
    assert cfg.optim.sign_loss_weight == 2.0 and cfg.optim.lr == 0.01
    assert cfg.optim.proxy_lr == 1.0 and cfg.model.embedding_dim == 32  # kept from the base
    assert [t.name for t in cfg.tasks] == ["identity"] and cfg.train.epochs == 5
    (tmp_path / "base.yaml").write_text("base: sub/child.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(child)
    child.write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="not found"):
        load_config(child)


def test_manifest_errors_name_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "m.jsonl"
    bad.write_text('{"image": "a.png", "labels": {"t": "x"}}\n{"labels": {}}\n')
    with pytest.raises(ManifestError, match=r"m.jsonl:2"):
        read_manifest(bad)
    bad.write_text('{"image": "a.png", "labels": {"t": []}}\n')
    with pytest.raises(ManifestError, match="empty label list"):
        read_manifest(bad)


def test_folder_tree_and_vocabulary(tmp_path: Path, synth_dir: Path) -> None:
    from PIL import Image

    from uembed.preprocess import PreprocessSpec  # also registers the HEIF opener

    for cls, suffixes in (("shoes", (".png", ".png")), ("bags", (".heic", ".avif"))):  # phone photos too
        (tmp_path / "tree" / cls).mkdir(parents=True)
        for i, suffix in enumerate(suffixes):
            Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "tree" / cls / f"{i}{suffix}")
    recs = folder_manifest(tmp_path / "tree", "product")
    assert [r.labels["product"] for r in recs] == ["bags", "bags", "shoes", "shoes"]
    assert read_manifest(tmp_path / "tree")[0].labels == {"label": "bags"}
    for rec in recs[:2]:  # training reads them as it reads a PNG
        arr = PreprocessSpec(input_size=8).load(str(tmp_path / "tree" / rec.image))
        assert arr.shape == (3, 8, 8) and arr[0].mean() > arr[1].mean()  # red
    vocab = Vocabulary.from_records(read_manifest(synth_dir / "train.jsonl"), "attributes")
    assert vocab.names == sorted(vocab.names) and vocab.encode(["circle"]) == [vocab.index["circle"]]


def test_only_tasks_keeps_the_named_tasks_and_their_datasets(tiny_config: dict[str, Any]) -> None:
    cfg = config_from_dict(copy.deepcopy(tiny_config), ["tasks.identity.num_sampled=5"], only_tasks=["identity"])
    assert [t.name for t in cfg.tasks] == ["identity"] and cfg.task("identity").num_sampled == 5
    assert [d.manifest for d in cfg.data.datasets] == cfg.manifests()
    cfg = config_from_dict(copy.deepcopy(tiny_config), only_tasks=["attributes", "pairs"])
    assert [t.name for t in cfg.tasks] == ["attributes", "pairs"] and len(cfg.manifests()) == 2
    with pytest.raises(ConfigError, match="no task named colour"):
        config_from_dict(copy.deepcopy(tiny_config), only_tasks=["identity", "colour"])


def test_init_trunk_and_init_from_are_exclusive(tiny_config: dict[str, Any]) -> None:
    tiny_config["train"]["init_from"] = "runs/a"
    with pytest.raises(ConfigError, match=r"init_trunk and train\.init_from both set"):
        build_config(tiny_config, "train.init_trunk=trunk.safetensors")
