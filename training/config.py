"""Training configuration: YAML file -> `key=value` overrides -> validated dataclasses.

The resolved config is saved next to every checkpoint so a run can be resumed, evaluated and
exported without the original file. Unknown keys are errors, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from uembed.errors import UserError
from uembed.preprocess import PreprocessSpec

HeadKind = Literal["norm_softmax", "arcface", "multilabel_softmax", "multilabel_arcface", "double_margin"]
MULTI_LABEL_HEADS = ("multilabel_softmax", "multilabel_arcface")
PROXY_HEADS = ("norm_softmax", "arcface", "multilabel_softmax", "multilabel_arcface")


class ConfigError(UserError, ValueError):
    """A configuration that cannot be trained: the message names the key."""


@dataclass
class ModelConfig:
    trunk: str = "resnet18"
    pretrained: bool = False
    embedding_dim: int = 256
    gem_p: float = 3.0
    gem_eps: float = 1e-6
    drop_rate: float = 0.0
    # The input's average colour on a color_layout x color_layout grid (3 * grid**2 values), fed to
    # the embedding head beside the pooled trunk features; 0 = off. docs/results.md, recipe v5.
    color_layout: int = 0
    # HashNet's continuation made fixed: e = normalize(tanh(saturation * sqrt(D) * normalize(W x))),
    # 0 = off. The sign bits are those of W x at any value, so the served binary code is unchanged
    # while the float embedding nears the code it is binarized to. docs/results.md, recipe v7 (tried,
    # not in the shipped recipe).
    saturation: float = 0.0
    trunk_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskConfig:
    """One task: where its labels come from, its head/loss and its weight in the sum."""

    name: str
    manifest: list[str]
    head: HeadKind = "norm_softmax"
    label_key: str = ""  # defaults to the task name
    weight: float = 1.0
    temperature: float = 0.05  # normalized softmax / multi-label softmax
    margin: float = 0.5  # ArcFace additive angular margin (radians)
    scale: float = 64.0  # ArcFace scale
    num_sampled: int = 0  # proxies per step (0 = all classes); always holds every batch label
    pos_margin: float = 0.8  # double margin: positives are pulled above this cosine
    neg_margin: float = 0.3  # double margin: negatives are pushed below this cosine

    @property
    def multi_label(self) -> bool:
        return self.head in MULTI_LABEL_HEADS

    @property
    def has_proxies(self) -> bool:
        return self.head in PROXY_HEADS


@dataclass
class DatasetOptions:
    """Per-manifest sampling options (optional)."""

    manifest: str
    images_per_batch: int = 0  # 0 = data.images_per_dataset
    m_per_class: int = 0  # > 0: sample m images of each drawn class (identity tasks)
    class_key: str = ""  # the label that m_per_class groups by


@dataclass
class SyntheticDataConfig:
    """Generate the synthetic dataset into `out` when its manifests are missing (tests, smoke)."""

    out: str
    identities: int = 64
    holdout: int = 16
    views: int = 6
    image_size: int = 64
    categories: int = 8
    seed: int = 0


@dataclass
class DataConfig:
    images_per_dataset: int = 32
    num_workers: int = 2
    datasets: list[DatasetOptions] = field(default_factory=list)
    synthetic: SyntheticDataConfig | None = None
    augment: Literal["none", "light", "camera"] = "light"
    # How loader workers start: fork is quickest on Linux; forkserver or spawn when the process
    # already runs threads (forking then can deadlock a worker: a CI run hung that way in a test
    # process that had served HTTP before).
    worker_start: Literal["fork", "forkserver", "spawn"] = "fork"


@dataclass
class OptimConfig:
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    gem_lr_mult: float = 10.0
    proxy_optimizer: Literal["sgd", "sparse_adam"] = "sgd"
    proxy_lr: float = 1.0
    # Weight imprinting (0 = off): before each step, the proxies of the batch's classes move this far
    # toward their class's mean batch embedding (training/proxies.py, ProxyBank.imprint).
    proxy_imprint: float = 0.0
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    step_milestones: list[float] = field(default_factory=lambda: [0.6, 0.85])  # fractions of training
    step_gamma: float = 0.1
    head_warmup_epochs: int = 0  # epochs that train only GeM, embedding head and proxies
    grad_clip: float = 5.0  # max global grad norm of trunk+head; 0 disables
    # Train on the code the service hands out too: every task loss is computed a second time on the
    # sign code sign(e) / sqrt(D) (the binary embedding as a unit vector; straight-through gradient,
    # Greedy Hash, Su et al. 2018) and added with this weight. 0 = off.
    sign_loss_weight: float = 0.0
    # Pull each float embedding toward its own sign code: weight x mean(1 - cos(e, sign(e)/sqrt(D))),
    # the code held constant (Greedy Hash's quantization term). Float and binary cosines agree more
    # the closer every |e_i| is to 1/sqrt(D). 0 = off.
    quantization_weight: float = 0.0
    # Spread the embeddings over the sphere: weight x the KoLeo entropy estimate, -mean log of each
    # embedding's distance to its nearest neighbour in the batch (Sablayrolles et al. 2019,
    # "Spreading vectors for similarity search"; DINOv2 uses it too). Rows that share a label of
    # the task `koleo_exclude` are not each other's neighbours, so it spreads classes apart, not an
    # identity's images. 0 = off.
    koleo_weight: float = 0.0
    koleo_exclude: str | None = None
    amp: Literal["auto", "on", "off"] = "auto"  # auto: fp16 autocast on CUDA only


@dataclass
class TrainLoopConfig:
    epochs: int = 10
    max_steps: int = 0  # > 0 stops early (smoke runs, tests)
    log_every: int = 10
    checkpoint_every: int = 0  # steps; 0 = once per epoch
    keep_checkpoints: int = 2
    # A step whose loss or gradient norm is not finite changes nothing (weights, proxies, optimizer
    # state) and is logged; this many in a row stop the run with an error instead of training on NaN.
    max_nonfinite_steps: int = 20
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    progress: bool = True
    # Progressive resizing: the first `low_res_fraction` of the steps train on the batch downsampled
    # to `low_res_size` px (a 64 px step costs a third of a 128 px one on CPU); the rest of the run
    # trains at the model's input size, so BatchNorm and filters settle at the resolution it serves.
    low_res_size: int = 0
    low_res_fraction: float = 0.0
    # Start from another run's weights (a run or checkpoint directory): the model and the proxies of
    # the tasks both runs have; the optimizer, the schedule and the step start fresh. A run that has
    # its own checkpoint resumes from that instead.
    init_from: str = ""
    # Start the trunk from pretrained weights: a safetensors file of the timm trunk's state dict
    # (`uembed data trunk` writes one). Every tensor in the file must match the trunk; the head,
    # GeM and the proxies start fresh. Ignored when the run resumes or has init_from.
    init_trunk: str = ""


@dataclass
class CodeRotationConfig:
    """After training, an orthogonal rotation R of the embedding, learned for its sign bits and
    folded into the projection (training/code_rotation.py). Float cosines do not change (R keeps
    angles); the bits become the signs of e R. 0 steps = off."""

    steps: int = 0
    lr: float = 0.001  # Adam on the skew-symmetric generator A, R = exp(A - A^T)
    beta: float = 40.0  # tanh(beta * e) relaxes sign(e) for unit-norm e (|e_i| about 1/sqrt(D))
    temperature: float = 0.05
    queries_per_step: int = 1024  # images per step; each queries with its clean view and every drawn view
    # Camera views and scene crops rendered per image (one of each per draw, each draw seeded apart):
    # more draws, more of the shifts the bits must survive, for the cost of embedding them.
    draws: int = 1
    gallery_size: int = 8192  # clean images per step (whole classes, drawn at random when there are more)
    manifest: str = ""  # default: the first of data.datasets (else the first task's manifest)
    label_key: str = ""  # what makes two images a match; default: that dataset's class_key
    # Other single-valued labels of the same manifest whose matches the bits should also rank first,
    # each with its loss weight (e.g. {subcategory: 1.0}, so that browsing keeps its bits too).
    extra_labels: dict[str, float] = field(default_factory=dict)
    # Fraction of the label values left out of the fit and measured before and after (for choosing
    # the settings); 0 fits on everything and measures on the fit set.
    holdout: float = 0.0


@dataclass
class EvalSetConfig:
    name: str
    query: str
    gallery: str
    label_key: str
    exclude_self: bool = False  # query and gallery are the same images: skip the query itself


@dataclass
class TrainConfig:
    name: str = "uembed"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    preprocess: dict[str, Any] = field(default_factory=lambda: {"input_size": 224})
    data: DataConfig = field(default_factory=DataConfig)
    tasks: list[TaskConfig] = field(default_factory=list)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    code_rotation: CodeRotationConfig = field(default_factory=CodeRotationConfig)
    eval: list[EvalSetConfig] = field(default_factory=list)

    @property
    def preprocess_spec(self) -> PreprocessSpec:
        return PreprocessSpec.from_dict(self.preprocess)

    def task(self, name: str) -> TaskConfig:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(name)

    def manifests(self) -> list[str]:
        """Every training manifest, in first-use order: each is one dataset of the batch mix."""
        seen: list[str] = []
        for t in self.tasks:
            for m in t.manifest:
                if m not in seen:
                    seen.append(m)
        return seen

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> TrainConfig:
        if not self.tasks:
            raise ConfigError("tasks: at least one task is required")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ConfigError(f"tasks: duplicate task names {names}")
        for t in self.tasks:
            if not t.label_key:
                t.label_key = t.name
            if not t.manifest:
                raise ConfigError(f"tasks.{t.name}.manifest: at least one manifest")
            if t.weight < 0:
                raise ConfigError(f"tasks.{t.name}.weight must be >= 0")
            if t.temperature <= 0 or t.scale <= 0:
                raise ConfigError(f"tasks.{t.name}: temperature and scale must be > 0")
            if not 0 <= t.margin < 3.14159:
                raise ConfigError(f"tasks.{t.name}.margin must be in [0, pi)")
            if t.num_sampled < 0:
                raise ConfigError(f"tasks.{t.name}.num_sampled must be >= 0")
            if t.head == "double_margin" and not -1 <= t.neg_margin < t.pos_margin <= 1:
                raise ConfigError(f"tasks.{t.name}: need -1 <= neg_margin < pos_margin <= 1")
        if self.model.embedding_dim < 8:
            raise ConfigError("model.embedding_dim must be >= 8")
        if self.model.color_layout < 0:
            raise ConfigError("model.color_layout must be >= 0 (0 = off)")
        if not (0.0 <= self.model.saturation < float("inf")):
            raise ConfigError("model.saturation must be a finite number >= 0 (0 = off)")
        if self.data.images_per_dataset < 1:
            raise ConfigError("data.images_per_dataset must be >= 1")
        manifests = self.manifests()
        for d in self.data.datasets:
            if d.manifest not in manifests:
                raise ConfigError(f"data.datasets: {d.manifest} is not the manifest of any task")
            if d.m_per_class and not d.class_key:
                raise ConfigError(f"data.datasets[{d.manifest}]: m_per_class needs class_key")
        if self.train.epochs < 1:
            raise ConfigError("train.epochs must be >= 1")
        if self.train.low_res_size:
            if not 16 <= self.train.low_res_size < self.preprocess_spec.input_size:
                raise ConfigError("train.low_res_size must be in [16, preprocess.input_size)")
            if not 0 < self.train.low_res_fraction < 1:
                raise ConfigError("train.low_res_fraction must be in (0, 1) when train.low_res_size is set")
        if not 0 <= self.optim.proxy_imprint <= 1:
            raise ConfigError("optim.proxy_imprint must be in [0, 1]")
        if self.optim.sign_loss_weight < 0:
            raise ConfigError("optim.sign_loss_weight must be >= 0 (0 = off)")
        if self.optim.quantization_weight < 0:
            raise ConfigError("optim.quantization_weight must be >= 0 (0 = off)")
        if self.optim.koleo_weight < 0:
            raise ConfigError("optim.koleo_weight must be >= 0 (0 = off)")
        if self.optim.koleo_exclude is not None and self.optim.koleo_exclude not in {
                t.name for t in self.tasks if t.head != "multilabel_softmax"}:
            raise ConfigError(f"optim.koleo_exclude {self.optim.koleo_exclude!r} is not a single-label task")
        if self.train.init_trunk and self.train.init_from:
            raise ConfigError("train.init_trunk and train.init_from both set: init_from already holds a trunk")
        cr = self.code_rotation
        if cr.steps < 0 or cr.lr <= 0 or cr.beta <= 0 or cr.temperature <= 0:
            raise ConfigError("code_rotation: steps must be >= 0 (0 = off); lr, beta and temperature > 0")
        if cr.queries_per_step < 1 or cr.gallery_size < 2 or not 0 <= cr.holdout < 1 or cr.draws < 1:
            raise ConfigError("code_rotation: queries_per_step >= 1, gallery_size >= 2, draws >= 1, holdout in [0, 1)")
        bad = {k: w for k, w in cr.extra_labels.items()
               if isinstance(w, bool) or not isinstance(w, int | float) or w <= 0}
        if bad:
            raise ConfigError(f"code_rotation.extra_labels: weights must be numbers > 0, got {bad}")
        if cr.steps and self.model.saturation:
            raise ConfigError("code_rotation needs model.saturation 0: tanh does not commute with a rotation")
        if self.optim.head_warmup_epochs >= self.train.epochs:
            raise ConfigError("optim.head_warmup_epochs must be < train.epochs")
        try:
            size = self.preprocess_spec.input_size
        except (TypeError, ValueError) as e:
            raise ConfigError(f"preprocess: {e}") from e
        grid = self.model.color_layout
        # Divisible sizes make the colour grid a plain average pool, the same in every export.
        for name, side in (("preprocess.input_size", size), ("train.low_res_size", self.train.low_res_size)):
            if grid and side and side % grid:
                raise ConfigError(f"{name} ({side}) must be a multiple of model.color_layout ({grid})")
        return self

    def dataset_options(self, manifest: str) -> DatasetOptions:
        for d in self.data.datasets:
            if d.manifest == manifest:
                return d
        return DatasetOptions(manifest=manifest)


# -- building dataclasses from plain dicts, strictly ------------------------------------------------
def _build(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _build(inner[0], value, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp) if f.init}
        unknown = set(value) - set(fields)
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(fields)}")
        kwargs = {k: _build(hints[k], v, f"{where}.{k}" if where else k) for k, v in value.items()}
        try:
            return tp(**kwargs)
        except TypeError as e:
            raise ConfigError(f"{where or 'config'}: {e}") from e
    if origin is list:
        if tp is not None and args and args[0] is str and isinstance(value, str):
            value = [value]  # a single manifest may be written as a string
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return [_build(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping")
        return dict(value)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str | int | float):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict; list items by index or, for named lists, by name."""
    parts = dotted.split(".")
    node: Any = tree
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            idx = next((j for j, item in enumerate(node) if isinstance(item, dict) and item.get("name") == part),
                       None)
            if idx is None:
                if not part.lstrip("-").isdigit():
                    raise ConfigError(f"override {dotted}: no list item named {part!r}")
                idx = int(part)
                if not -len(node) <= idx < len(node):
                    raise ConfigError(f"override {dotted}: index {idx} out of range")
            if last:
                node[idx] = value
            else:
                node = node[idx]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {'.'.join(parts[:i])} is not a mapping")
        if last:
            node[part] = value
        else:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value")
        out.append((key.strip(), yaml.safe_load(raw) if raw.strip() else ""))
    return out


def config_from_dict(raw: dict[str, Any], overrides: list[str] | None = None,
                     only_tasks: list[str] | None = None) -> TrainConfig:
    """Build and validate a config. `only_tasks` keeps just the named tasks (single-task ablations
    of a multi-task config) and drops dataset options of manifests no kept task uses."""
    tree = dict(raw or {})
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    if only_tasks:
        tasks = [t for t in tree.get("tasks") or [] if isinstance(t, dict)]
        unknown = set(only_tasks) - {t.get("name") for t in tasks}
        if unknown:
            raise ConfigError(f"--only-tasks: no task named {', '.join(sorted(unknown))} "
                              f"(the config has {', '.join(str(t.get('name')) for t in tasks)})")
        tree["tasks"] = [t for t in tasks if t.get("name") in only_tasks]
        used = {m for t in tree["tasks"] for m in ([t["manifest"]] if isinstance(t.get("manifest"), str)
                                                    else t.get("manifest") or [])}
        data = tree.get("data")
        if isinstance(data, dict) and data.get("datasets"):
            tree["data"] = data | {"datasets": [d for d in data["datasets"]
                                                if not isinstance(d, dict) or d.get("manifest") in used]}
    cfg = _build(TrainConfig, tree, "")
    return cfg.validate()


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`: mappings merge key by key, anything else (lists too) is replaced."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_tree(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file's mapping, on top of its `base:` file (relative to it) when it names one."""
    if path.resolve() in chain:
        raise ConfigError(f"{path}: base configs form a cycle ({' -> '.join(str(p) for p in (*chain, path))})")
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"config file not found: {path}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: base must be the path of another config file")
    return _merge(_read_tree(path.parent / base, (*chain, path.resolve())), raw)


def load_config(path: str | Path, overrides: list[str] | None = None,
                only_tasks: list[str] | None = None) -> TrainConfig:
    """A YAML config. `base: OTHER.yaml` (relative to this file) starts from another config:
    mappings merge key by key, lists and values replace the base's."""
    return config_from_dict(_read_tree(Path(path)), overrides, only_tasks)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
