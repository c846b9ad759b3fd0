"""A rotation of the embedding learned for its sign bits, folded into the trained model.

The service hands out the sign bits of the float embedding e. Any orthogonal R keeps every float
cosine (e R . f R = e . f), so replacing the projection W by R^T W changes nothing a float user
sees and changes only which D hyperplanes the bits cut the sphere with. Random hyperplanes are
what the trained model's own axes amount to (docs/results.md: its bits rank like 30 random
rotations' bits); ITQ (Gong & Lazebnik 2011), which minimizes quantization error without labels,
did no better. This fits R with labels instead, for the retrieval the bits serve: each image of
the training set queries, with its clean drawing and with a camera view and a scene crop
rendered by the training augmentations (`draws` of each), a gallery of clean images, and a
softmax over relaxed Hamming similarities (tanh(beta e R), the Hamming distance's continuous form)
is trained to rank the query's own class first (its own image left out). `extra_labels` adds the
same term for other labels (a subcategory, so that browsing by the bits keeps its matches too),
each with its weight. R = exp(A - A^T) stays exactly orthogonal while Adam moves the
skew-symmetric generator.

`rotate_run` embeds the views once with the frozen model, fits R on those embeddings (D x D
numbers; seconds to minutes on a CPU), and writes the checkpoint again with the projection and
every task's proxies rotated (proxy logits are e . p, so they do not change either), plus
`code_rotation.json` recording what was done. `uembed train` runs it after the last step when
`code_rotation.steps` > 0; `uembed rotate --run RUN` applies it to a finished run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from training.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint_config,
    load_classes,
    load_model,
    load_proxies,
    load_trainer_state,
    resolve_checkpoint,
    save_checkpoint,
)
from training.config import CodeRotationConfig, ConfigError, TrainConfig, save_config
from training.data.augment import camera_view, product_scene
from training.data.datasets import derive_seed
from training.data.manifest import Record, read_manifest
from training.evaluate import retrieval_metrics
from uembed.preprocess import PreprocessSpec

VIEWS = ("clean", "camera", "scene")  # the first three views of every image; later draws repeat camera, scene
RECORD_FILE = "code_rotation.json"
PROJECTION = "head.proj.weight"


def view_names(draws: int) -> tuple[str, ...]:
    """clean, camera, scene, then camera_2, scene_2, ... for each further draw."""
    return VIEWS + tuple(f"{v}_{k}" for k in range(2, draws + 1) for v in VIEWS[1:])


class ViewsDataset(Dataset):
    """Each image as (1 + 2 draws, C, S, S): its clean drawing, then per draw a camera view and a
    scene crop (view_names order), seeded by index; draw k uses seed + k - 1, so the first draw is
    the same whatever the number of draws.

    The camera view renders the drawing at the input size, as the camera eval set does; the scene
    crop cuts it out of a scene of 2 to 4 other images of the set (training/data/augment.py,
    product_scene).
    """

    def __init__(self, records: Sequence[Record], spec: PreprocessSpec, seed: int, draws: int = 1) -> None:
        if draws < 1:
            raise ValueError(f"draws must be >= 1, got {draws}")
        self.records, self.spec, self.seed, self.draws = list(records), spec, seed, draws

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> torch.Tensor:
        size = self.spec.input_size
        with Image.open(self.records[i].image) as im:
            rgba = im.convert("RGBA")
        product = rgba.resize((size, size), Image.Resampling.BICUBIC)
        views = [self.spec.to_array(rgba)]
        for k in range(self.draws):
            rng = np.random.default_rng(derive_seed(self.seed + k, 31, i))
            others = []
            for j in rng.integers(0, len(self.records), int(rng.integers(2, 5))):
                with Image.open(self.records[int(j)].image) as im:
                    others.append(im.convert("RGBA"))
            views.append(self.spec.to_array(camera_view(product, rng)))
            views.append(self.spec.to_array(product_scene(rgba, others, rng, size)))
        return torch.from_numpy(np.stack(views))


@torch.no_grad()
def embed_views(model: torch.nn.Module, dataset: Dataset, *, batch_size: int = 32, num_workers: int = 0,
                worker_start: str = "fork", device: str | torch.device = "cpu") -> torch.Tensor:
    """(N, V, D) float32 embeddings of every image's V views (the dataset's order)."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                        multiprocessing_context=worker_start if num_workers else None)
    out = []
    model.eval()
    for views in loader:
        n, v = views.shape[:2]
        emb = model(views.flatten(0, 1).to(device))
        out.append(emb.float().cpu().reshape(n, v, -1))
    return torch.cat(out)


def _retrieval_report(emb: torch.Tensor, labels: torch.Tensor, rotation: torch.Tensor | None,
                      extra: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """P@1 (%) of the first three views against the clean images of the same set (the query's own
    image left out), float and with the sign bits of e R, ranked by training/evaluate.py's
    retrieval_metrics; and for each `extra` label (-1 = none), clean against clean, Avg P@20."""
    clean = emb[:, 0].numpy()
    turned = emb.numpy() if rotation is None else (emb @ rotation).numpy()
    ids, own = labels.numpy(), np.arange(len(labels))
    out: dict[str, float] = {}
    for v, name in enumerate(VIEWS):
        floats = retrieval_metrics(emb[:, v].numpy(), ids, clean, ids, exclude=own)
        bits = retrieval_metrics(turned[:, v] > 0, ids, turned[:, 0] > 0, ids, metric="hamming", exclude=own)
        out[f"{name}_float"] = round(100.0 * floats.p_at_1, 2)
        out[f"{name}_binary"] = round(100.0 * bits.p_at_1, 2)
    for key, values in (extra or {}).items():
        have = values.numpy() >= 0
        if have.sum() < 2:
            continue
        ids, own = values.numpy()[have], np.arange(int(have.sum()))
        floats = retrieval_metrics(clean[have], ids, clean[have], ids, exclude=own)
        bits = retrieval_metrics(turned[have, 0] > 0, ids, turned[have, 0] > 0, ids, metric="hamming", exclude=own)
        out[f"{key}_avg_p@20_float"] = round(100.0 * floats.avg_p_at_20, 2)
        out[f"{key}_avg_p@20_binary"] = round(100.0 * bits.avg_p_at_20, 2)
    return out


def fit_rotation(emb: torch.Tensor, labels: torch.Tensor, cfg: CodeRotationConfig, seed: int = 0,
                 log: Any = None, extra: Sequence[tuple[torch.Tensor, float]] = ()) -> torch.Tensor:
    """An orthogonal (D, D) R for the sign bits of e R, fitted on `emb` (N, V, D: the clean view
    first, unit rows) with integer class `labels` (N,): the gallery is drawn by those classes.
    `extra` adds (labels, weight) terms, labels (N,) with -1 for none. Deterministic for a seed."""
    n, views, dim = emb.shape
    gen = torch.Generator().manual_seed(seed)
    generator = torch.zeros(dim, dim, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([generator], lr=cfg.lr)
    classes = torch.unique(labels)
    scale = 1.0 / (cfg.temperature * dim)
    for step in range(cfg.steps):
        # Gallery: whole classes at random until gallery_size images (all of them on small sets).
        if n > cfg.gallery_size:
            chosen, total = [], 0
            for c in classes[torch.randperm(len(classes), generator=gen)]:
                members = torch.nonzero(labels == c).flatten()
                if total + len(members) > cfg.gallery_size and total:
                    break
                chosen.append(members)
                total += len(members)
            gallery = torch.cat(chosen)
        else:
            gallery = torch.arange(n)
        pick = gallery[torch.randperm(len(gallery), generator=gen)[: cfg.queries_per_step]]
        rotation = torch.matrix_exp(generator - generator.T)
        g_code = torch.tanh(cfg.beta * (emb[gallery, 0] @ rotation))
        q_code = torch.tanh(cfg.beta * (emb[pick].reshape(-1, dim) @ rotation))
        scores = (q_code @ g_code.T) * scale
        # Row k of q_code is image pick[k // views]; its own clean image is not a match for itself.
        position = torch.full((n,), -1, dtype=torch.long)
        position[gallery] = torch.arange(len(gallery))
        own = position[pick].repeat_interleave(views)
        rows = torch.arange(len(own))
        scores[rows, own] = -torch.inf
        denominator = torch.logsumexp(scores, dim=1)
        loss = torch.zeros(())
        for term, (values, weight) in enumerate(((labels, 1.0), *extra)):
            query = values[pick].repeat_interleave(views)
            positive = (values[gallery][None, :] == query[:, None]) & (query[:, None] >= 0)
            positive[rows, own] = False
            has = positive.any(dim=1)
            if not bool(has.any()):
                if term:
                    continue  # this step's gallery holds no match for an extra label
                raise ConfigError("code_rotation: no image has another image of its class in the gallery; "
                                  "the label needs classes with two or more images")
            matched = torch.logsumexp(scores.masked_fill(~positive, -torch.inf), dim=1)
            loss = loss - weight * (matched - denominator)[has].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if log is not None and (step + 1) % 50 == 0:
            log({"event": "code_rotation_step", "step": step + 1, "loss": round(float(loss), 5)})
    with torch.no_grad():
        return torch.matrix_exp(generator - generator.T).detach()


def rotate_state(model_state: dict[str, torch.Tensor], proxies: dict[str, torch.Tensor],
                 rotation: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The model and proxies whose embedding is e R: projection W -> R^T W, each proxy p -> p R."""
    if PROJECTION not in model_state:
        raise CheckpointError(f"no {PROJECTION} in the checkpoint: not a uembed embedding model")
    state = dict(model_state)
    w = state[PROJECTION]
    state[PROJECTION] = (rotation.double().T @ w.double()).to(w.dtype)
    rotated = {k: (p.double() @ rotation.double()).to(p.dtype) for k, p in proxies.items()}
    return state, rotated


def _class_labels(cfg: TrainConfig) -> tuple[str, str]:
    cr = cfg.code_rotation
    manifest = cr.manifest or (cfg.data.datasets[0].manifest if cfg.data.datasets else cfg.manifests()[0])
    key = cr.label_key or cfg.dataset_options(manifest).class_key
    if not key:
        raise ConfigError(f"code_rotation.label_key: {manifest} has no class_key in data.datasets; name the label "
                          "that makes two images a match (an identity)")
    return manifest, key


def rotation_labels(cfg: TrainConfig, extra_labels: Iterable[str] | None = None
                    ) -> tuple[list[Record], torch.Tensor, dict[str, torch.Tensor]]:
    """What the rotation is fitted on, from `cfg.code_rotation`: the images of its manifest that carry the
    match label, their label ids, and the ids of each extra label (default: the config's; -1 where an
    image has none)."""
    extra_labels = list(cfg.code_rotation.extra_labels if extra_labels is None else extra_labels)
    manifest, key = _class_labels(cfg)
    records = [r for r in read_manifest(manifest) if r.labels.get(key) is not None]
    if len(records) < 2:
        raise ConfigError(f"code_rotation: {manifest} has fewer than two images with a {key!r} label")
    labels = _label_ids(records, key, manifest)
    if key in extra_labels:
        raise ConfigError(f"code_rotation.extra_labels: {key!r} is already the label that makes a match")
    extra = {k: _label_ids(records, k, manifest, missing_ok=True) for k in extra_labels}
    return records, labels, extra


def _label_ids(records: Sequence[Record], key: str, manifest: str, missing_ok: bool = False) -> torch.Tensor:
    """Integer ids of one single-valued label (-1 where an image has none and `missing_ok`)."""
    values = [r.labels.get(key) for r in records]
    if not missing_ok and any(v is None for v in values):
        raise ConfigError(f"code_rotation: an image of {manifest} has no {key!r} label")
    if any(v is not None and not isinstance(v, str | int) for v in values):
        raise ConfigError(f"code_rotation.extra_labels: {key!r} in {manifest} has several values per image; "
                          "a match needs one value (an identity, a category)")
    present = [str(v) for v in values if v is not None]
    if not present:
        raise ConfigError(f"code_rotation: no image of {manifest} has a {key!r} label")
    _, inverse = np.unique(np.asarray(present), return_inverse=True)
    ids = torch.full((len(values),), -1, dtype=torch.long)
    ids[torch.tensor([v is not None for v in values])] = torch.from_numpy(inverse.astype(np.int64))
    return ids


def rotate_run(run_dir: str | Path, cfg: TrainConfig, *, device: str | torch.device = "cpu",
               log: Any = None) -> dict[str, Any]:
    """Fit the code rotation on the run's newest checkpoint and write that checkpoint rotated.

    `run_dir` may also name that checkpoint's directory; an older checkpoint is refused.
    `cfg` gives the settings (code_rotation, data, seed). A checkpoint that already holds a
    rotation is refused (CheckpointError): its record would no longer describe its weights.
    """
    cr = cfg.code_rotation
    if cr.steps <= 0:
        raise ConfigError("code_rotation.steps is 0: set it (for example code_rotation.steps=200)")
    ckpt = resolve_checkpoint(run_dir)
    run_dir = ckpt.parent.parent  # a checkpoint directory given: its run
    if latest_checkpoint(run_dir) != ckpt:
        # Writing it again would make an older step the run's LATEST.
        raise CheckpointError(f"{ckpt} is not the newest checkpoint of {run_dir}: rotate the run's newest")
    if rotation_record(ckpt) is not None:
        raise CheckpointError(f"{ckpt} already holds a code rotation ({RECORD_FILE})")
    t0 = time.perf_counter()
    model, ckpt_cfg = load_model(ckpt, device)
    if ckpt_cfg.model.saturation:
        raise ConfigError("code_rotation needs model.saturation 0: tanh does not commute with a rotation")
    manifest, key = _class_labels(cfg)
    records, labels, extra = rotation_labels(cfg)
    emb = embed_views(model, ViewsDataset(records, ckpt_cfg.preprocess_spec, cfg.seed, cr.draws),
                      num_workers=cfg.data.num_workers, worker_start=cfg.data.worker_start, device=device)
    embed_s = time.perf_counter() - t0

    fit = torch.ones(len(labels), dtype=torch.bool)
    if cr.holdout:
        values = torch.unique(labels)
        held = values[torch.randperm(len(values), generator=torch.Generator().manual_seed(cfg.seed))]
        held = held[: max(1, round(cr.holdout * len(values)))]
        fit = ~torch.isin(labels, held)
    rotation = fit_rotation(emb[fit], labels[fit], cr, seed=cfg.seed, log=log,
                            extra=[(v[fit], float(cr.extra_labels[k])) for k, v in extra.items()])
    measured = ~fit if cr.holdout else fit
    shown = {k: v[measured] for k, v in extra.items()}
    report = {
        "measured_on": "held-out classes" if cr.holdout else "the fit set (in-sample)",
        "images": int(measured.sum()),
        "before": _retrieval_report(emb[measured], labels[measured], None, shown),
        "after": _retrieval_report(emb[measured], labels[measured], rotation, shown),
    }
    orth = float((rotation @ rotation.T - torch.eye(rotation.shape[0])).abs().max())

    state, proxies = rotate_state(
        {k: v.cpu() for k, v in model.state_dict().items()}, load_proxies(ckpt), rotation)
    record = {
        "settings": asdict(cr), "manifest": manifest, "label_key": key, "views": list(view_names(cr.draws)),
        "images": len(records),
        "fit_images": int(fit.sum()), "orthogonality_error": orth, "report": report,
        "seconds": {"embed": round(embed_s, 1), "total": round(time.perf_counter() - t0, 1)},
    }
    step = int(ckpt.name.split("_")[-1])
    saved_cfg = load_checkpoint_config(ckpt)
    saved_cfg.code_rotation = cr
    path = save_checkpoint(run_dir, step, model_state=state, proxies=proxies, cfg=saved_cfg,
                           classes=load_classes(ckpt), trainer_state=load_trainer_state(ckpt),
                           keep=cfg.train.keep_checkpoints, notes={RECORD_FILE: record})
    save_config(saved_cfg, run_dir / "config.yaml")
    return {"event": "code_rotation", "checkpoint": str(path), **record}


def rotation_record(ckpt: Path) -> dict[str, Any] | None:
    """What `rotate_run` recorded in a checkpoint, or None if it holds no code rotation."""
    path = Path(ckpt) / RECORD_FILE
    return json.loads(path.read_text()) if path.is_file() else None


__all__ = ["VIEWS", "ViewsDataset", "embed_views", "fit_rotation", "rotate_run", "rotate_state", "rotation_record",
           "view_names"]
