"""The training step on real (tiny) data: masking, sparse proxy rows, warm-up, exact resume."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import build_config
from training.checkpoint import CheckpointError, latest_checkpoint, load_model
from training.proxies import IGNORE
from training.train import Trainer, koleo_loss, quantization_loss, sign_code


def _batch(trainer: Trainer, step: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    trainer.sampler.set_epoch(0, step)
    return next(iter(trainer.loader))


def test_batches_mix_both_datasets_and_mask_unlabelled_tasks(tiny_config: dict[str, Any], tmp_path: Path) -> None:
    trainer = Trainer(build_config(tiny_config), tmp_path / "run")
    images, labels = _batch(trainer)
    assert images.shape == (16, 3, 32, 32)  # 8 from each manifest
    # the attributes-only manifest has no identity/category labels: masked, not faked
    assert bool((labels["identity"][:8] != IGNORE).all()) and bool((labels["identity"][8:] == IGNORE).all())
    assert bool((labels["attributes"] != IGNORE).any(dim=1).all())
    longest = max(len(d) for d in trainer.datasets)
    assert trainer.steps_per_epoch == -(-longest // 8)


def test_masking_removes_a_tasks_gradient_for_unlabelled_images(tiny_config: dict[str, Any], tmp_path: Path) -> None:
    trainer = Trainer(build_config(tiny_config), tmp_path / "run")
    _, labels = _batch(trainer)
    emb = torch.nn.functional.normalize(torch.randn(16, 32), dim=1).requires_grad_()
    for task in ("identity", "category", "pairs"):
        emb.grad = None
        trainer.task_losses(emb, labels, step=0)[task].backward()
        grad_norm = emb.grad.norm(dim=1)
        assert bool((grad_norm[8:] == 0).all()), task  # unlabeled rows: exactly zero gradient
        assert bool((grad_norm[:8] > 0).all()), task
    emb.grad = None
    trainer.task_losses(emb, labels, step=0)["attributes"].backward()
    assert bool((emb.grad.norm(dim=1) > 0).all())  # both datasets carry attribute labels


def test_a_training_step_updates_only_the_sampled_proxy_rows(tiny_config: dict[str, Any], tmp_path: Path) -> None:
    trainer = Trainer(build_config(tiny_config), tmp_path / "run")
    bank = trainer.banks["identity"]
    assert bank.num_classes == 18
    before = bank.weight.detach().clone()
    images, labels = _batch(trainer)
    batch_ids = set(labels["identity"][labels["identity"] != IGNORE].tolist())
    assert len(batch_ids) == 2  # m_per_class=4 with 8 images per batch
    trainer.train_step(images, labels)
    changed = set((bank.weight.detach() != before).any(dim=1).nonzero().flatten().tolist())
    assert len(changed) == 6  # num_sampled, out of 18
    assert batch_ids <= changed
    # the dense side did move
    assert trainer.step == 1


def test_resume_continues_bit_for_bit(tiny_config: dict[str, Any], tmp_path: Path) -> None:
    tiny_config["train"].update(max_steps=6, checkpoint_every=3)
    tiny_config["data"]["num_workers"] = 2
    # Not fork: the test process may already run threads (served HTTP in other tests), and a
    # forked worker of such a process hung a CI run.
    tiny_config["data"]["worker_start"] = "forkserver"
    cfg = build_config(tiny_config)
    Trainer(cfg, tmp_path / "straight").fit()

    class Interrupt(Exception):
        pass

    def stop_after_3(trainer: Trainer, _: dict[str, float]) -> None:
        if trainer.step == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        Trainer(build_config(tiny_config), tmp_path / "resumed").fit(on_step=stop_after_3)
    assert latest_checkpoint(tmp_path / "resumed").name == "step_00000003"
    resumed = Trainer(build_config(tiny_config), tmp_path / "resumed")
    assert resumed.step == 3
    resumed.fit()

    a, b = latest_checkpoint(tmp_path / "straight"), latest_checkpoint(tmp_path / "resumed")
    assert a.name == b.name == "step_00000006"
    for name in ("model.safetensors", "proxies.safetensors"):
        ta, tb = load_file(a / name), load_file(b / name)
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{name}:{k}"


@pytest.mark.parametrize("grid", [0, 4])
def test_head_warmup_freezes_the_trunk(grid: int, tiny_config: dict[str, Any], tmp_path: Path) -> None:
    tiny_config["optim"]["head_warmup_epochs"] = 1
    tiny_config["preprocess"]["input_size"] = 64  # 2x2 feature maps: on 1x1 maps GeM's p has no gradient
    tiny_config["model"]["color_layout"] = grid
    trainer = Trainer(build_config(tiny_config), tmp_path / "run")
    trunk_before = {k: v.clone() for k, v in trainer.model.trunk.state_dict().items()}
    head_before = trainer.model.head.proj.weight.detach().clone()
    images, labels = _batch(trainer)
    trainer.train_step(images, labels)
    for k, v in trainer.model.trunk.state_dict().items():
        assert torch.equal(v, trunk_before[k]), k  # weights and BatchNorm statistics
    assert not torch.equal(trainer.model.head.proj.weight, head_before)
    # GeM's p trains too; its first-step update (~1e-8) is below float32 resolution at 3.0,
    # so check its gradient rather than its value.
    assert trainer.model.pool.p.grad is not None and float(trainer.model.pool.p.grad.abs()) > 0
    assert all(p.grad is None for p in trainer.model.trunk.parameters())
    if grid:  # the colour layout's columns of the projection learn as well
        layout_cols = trainer.model.head.proj.weight[:, trainer.model.num_features:]
        assert layout_cols.shape[1] == 48 and not torch.equal(layout_cols, head_before[:, trainer.model.num_features:])


@pytest.mark.parametrize("grid", [0, 4])
def test_checkpoint_loads_as_an_eval_model(grid: int, tiny_config: dict[str, Any], tmp_path: Path) -> None:
    tiny_config["train"]["max_steps"] = 2
    tiny_config["model"]["color_layout"] = grid
    Trainer(build_config(tiny_config), tmp_path / "run").fit()
    model, cfg = load_model(tmp_path / "run")
    assert not model.training and cfg.model.embedding_dim == 32 and cfg.model.color_layout == grid
    assert model.head.proj.weight.shape[1] == model.num_features + 3 * grid**2
    out = model(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 32)
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)
    log = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert '"event": "train"' in log and '"event": "checkpoint"' in log and '"images_per_s"' in log


def test_imprinting_sets_batch_proxies_to_class_means(tiny_config: dict[str, Any], tmp_path: Path) -> None:
    trainer = Trainer(build_config(tiny_config, "optim.proxy_imprint=1"), tmp_path / "run")
    _, labels = _batch(trainer)
    emb = torch.nn.functional.normalize(torch.randn(16, 32, generator=torch.Generator().manual_seed(0)), dim=1)
    trainer.task_losses(emb, labels, step=0)
    ids = labels["identity"]
    for c in set(ids[ids != IGNORE].tolist()):
        mean = torch.nn.functional.normalize(emb[ids == c].mean(0), dim=0)
        torch.testing.assert_close(trainer.banks["identity"].weight.detach()[c], mean)


def test_low_res_phase_trains_on_downsampled_batches(tiny_config: dict[str, Any], tmp_path: Path) -> None:
    cfg = build_config(tiny_config, "train.low_res_size=16", "train.low_res_fraction=0.5", "train.max_steps=4")
    trainer = Trainer(cfg, tmp_path / "run")
    seen: list[int] = []
    trainer.model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[-1]))
    for step in range(4):
        trainer.train_step(*_batch(trainer, step))
    assert seen == [16, 16, 32, 32]


def test_a_nonfinite_step_changes_nothing_and_a_run_of_them_stops_training(tiny_config: dict[str, Any],
                                                                              tmp_path: Path) -> None:
    tiny_config["train"]["max_nonfinite_steps"] = 3
    trainer = Trainer(build_config(tiny_config), tmp_path / "run")
    images, labels = _batch(trainer)
    trainer.train_step(images, labels)  # a normal step first: the optimizer has moments to keep
    model = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    banks = {n: b.weight.detach().clone() for n, b in trainer.banks.items()}
    moments = [t.clone() for st in trainer.optimizer.state.values() for t in st.values() if torch.is_tensor(t)]
    corrupt = images.clone()
    corrupt[0] = float("nan")  # one bad image: a NaN loss, NaN gradients, NaN BatchNorm statistics
    out = trainer.train_step(corrupt, labels)
    assert math.isnan(out["total"]) and trainer.step == 2
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, model[k]), k  # weights and BatchNorm running statistics
    assert all(torch.equal(b.weight, banks[n]) for n, b in trainer.banks.items())
    after = [t for st in trainer.optimizer.state.values() for t in st.values() if torch.is_tensor(t)]
    assert len(after) == len(moments) and all(torch.equal(a, b) for a, b in zip(after, moments, strict=True))
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["event"] == "nonfinite_step"] == [1]
    ok = trainer.train_step(images, labels)  # training goes on from the same weights
    assert math.isfinite(ok["total"]) and not torch.equal(trainer.model.head.proj.weight, model["head.proj.weight"])
    for _ in range(2):
        trainer.train_step(corrupt, labels)
    with pytest.raises(RuntimeError, match="3 steps in a row"):
        trainer.train_step(corrupt, labels)


def test_sign_code_is_the_served_binary_code_with_a_straight_through_gradient() -> None:
    emb = torch.nn.functional.normalize(torch.randn(5, 16, generator=torch.Generator().manual_seed(1)), dim=1)
    emb[0, 3] = 0.0  # served as bit 0, like numpy.packbits(float > 0)
    emb.requires_grad_()
    code = sign_code(emb)
    assert torch.allclose(code.norm(dim=1), torch.ones(5))
    assert torch.equal(code > 0, emb > 0) and float(code[0, 3].detach()) == -0.25
    weights = torch.randn(5, 16)
    (code * weights).sum().backward()
    assert torch.equal(emb.grad, weights)  # identity backward


def test_sign_and_quantization_losses_add_to_the_task_losses(tiny_config: dict[str, Any], tmp_path: Path) -> None:
    plain = Trainer(build_config(tiny_config), tmp_path / "plain")
    signed = Trainer(build_config(tiny_config, "optim.sign_loss_weight=0.5"), tmp_path / "signed")
    images, labels = _batch(plain)
    a, b = plain.train_step(images, labels), signed.train_step(images, labels)
    assert "sign" not in a and b["sign"] > 0
    # same init, same batch, same proxy sample: the float losses agree, the total adds half the code's
    for task in ("identity", "category", "attributes", "pairs"):
        assert math.isclose(a[task], b[task], rel_tol=1e-5), task
    assert math.isclose(b["total"], a["total"] + 0.5 * b["sign"], rel_tol=1e-5)
    pulled = Trainer(build_config(tiny_config, "optim.quantization_weight=2"), tmp_path / "pulled")
    c = pulled.train_step(images, labels)
    assert 0 < c["quantization"] < 1 and math.isclose(c["total"], a["total"] + 2 * c["quantization"], rel_tol=1e-5)
    spread = Trainer(build_config(tiny_config, "optim.koleo_weight=0.5", "optim.koleo_exclude=identity"),
                     tmp_path / "spread")
    d = spread.train_step(images, labels)
    assert math.isfinite(d["koleo"]) and math.isclose(d["total"], a["total"] + 0.5 * d["koleo"], rel_tol=1e-5)


def test_init_from_copies_weights_and_proxies_by_class_name_and_starts_fresh(
        tiny_config: dict[str, Any], tiny_checkpoint: Path, tmp_path: Path) -> None:
    source = latest_checkpoint(tiny_checkpoint)
    trainer = Trainer(build_config(tiny_config, f"train.init_from={tiny_checkpoint}"), tmp_path / "ft")
    assert trainer.step == 0 and trainer.init_record is not None
    state = load_file(source / "model.safetensors")
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, state[k]), k
    proxies = load_file(source / "proxies.safetensors")
    classes = json.loads((source / "classes.json").read_text())
    for task in ("identity", "category", "attributes"):
        names = next(t.vocab.names for t in trainer.task_labels if t.name == task)
        rows = [classes[task].index(n) for n in names]
        assert torch.equal(trainer.banks[task].weight.detach(), proxies[task][rows]), task
    assert trainer.init_record["proxies_copied"]["identity"] == 18
    trainer.train_step(*_batch(trainer))
    trainer.checkpoint()
    # The run's own checkpoint now wins over init_from: it resumes, it does not start again.
    again = Trainer(build_config(tiny_config, f"train.init_from={tiny_checkpoint}"), tmp_path / "ft")
    assert again.step == 1 and again.init_record is None


def test_init_from_a_different_model_is_a_clear_error(tiny_config: dict[str, Any], tiny_checkpoint: Path,
                                                       tmp_path: Path) -> None:
    cfg = build_config(tiny_config, f"train.init_from={tiny_checkpoint}", "model.embedding_dim=16")
    with pytest.raises(CheckpointError, match="do not match this config"):
        Trainer(cfg, tmp_path / "ft")


def test_init_trunk_loads_pretrained_trunk_weights_and_nothing_else(tiny_config: dict[str, Any],
                                                                   tmp_path: Path) -> None:
    from safetensors.torch import save_file

    plain = Trainer(build_config(tiny_config), tmp_path / "plain")
    pretrained = {k: torch.randn_like(v) if v.is_floating_point() else v
                  for k, v in plain.model.trunk.state_dict().items()}
    path = tmp_path / "trunk.safetensors"
    save_file(pretrained, str(path))
    trainer = Trainer(build_config(tiny_config, f"train.init_trunk={path}"), tmp_path / "run")
    for k, v in trainer.model.trunk.state_dict().items():
        assert torch.equal(v, pretrained[k]), k
    for k, v in trainer.model.head.state_dict().items():  # the head starts as it would without
        assert torch.equal(v, plain.model.head.state_dict()[k]), k
    assert trainer.init_record is not None and trainer.init_record["tensors"] == len(pretrained)

    wrong = {k: torch.zeros(3) for k in list(pretrained)[:2]}
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(CheckpointError, match="2 tensors do not fit trunk"):
        Trainer(build_config(tiny_config, f"train.init_trunk={tmp_path / 'wrong.safetensors'}"), tmp_path / "w")
    with pytest.raises(CheckpointError, match="no such file"):
        Trainer(build_config(tiny_config, f"train.init_trunk={tmp_path / 'none.safetensors'}"), tmp_path / "n")


def test_quantization_loss_is_zero_on_a_code_and_pulls_toward_it() -> None:
    code = torch.where(torch.randn(4, 64) > 0, 1.0, -1.0) / 8.0
    assert float(quantization_loss(code)) == pytest.approx(0.0, abs=1e-6)
    emb = torch.nn.functional.normalize(torch.randn(4, 64, generator=torch.Generator().manual_seed(2)), dim=1)
    loss = quantization_loss(emb.requires_grad_())
    assert 0.1 < float(loss.detach()) < 0.35  # Gaussian-like embeddings: 1 - sqrt(2/pi) ~ 0.2
    loss.backward()
    step = torch.nn.functional.normalize(emb.detach() - 0.5 * emb.grad, dim=1)
    assert float(quantization_loss(step)) < float(loss.detach())


def test_koleo_loss_is_the_log_nearest_distance_and_spreads_the_rows() -> None:
    e = torch.tensor([[1.0, 0.0], [0.6, 0.8], [-1.0, 0.0]])
    # nearest neighbours: 0 <-> 1 (distance sqrt(0.8)), 2 -> 1 (distance sqrt(3.2))
    want = -(2 * math.log(math.sqrt(0.8)) + math.log(math.sqrt(3.2))) / 3
    assert float(koleo_loss(e)) == pytest.approx(want, rel=1e-5)
    # rows 0 and 1 share a class: they are no longer each other's neighbours
    same = torch.tensor([[True, True, False], [True, True, False], [False, False, True]])
    want = -(math.log(2.0) + math.log(math.sqrt(3.2)) + math.log(math.sqrt(3.2))) / 3
    assert float(koleo_loss(e, same)) == pytest.approx(want, rel=1e-5)
    # a row with no candidate at all is left out, and all blocked gives 0 without NaN
    assert float(koleo_loss(e, torch.ones(3, 3, dtype=torch.bool))) == 0.0
    # a gradient step on the loss moves the closest pair apart
    emb = torch.nn.functional.normalize(torch.randn(16, 8, generator=torch.Generator().manual_seed(3)), dim=1)
    closest = float(torch.pdist(emb).min())
    x = emb.clone().requires_grad_()
    koleo_loss(x).backward()
    stepped = torch.nn.functional.normalize(emb - 0.05 * x.grad, dim=1)
    assert float(torch.pdist(stepped).min()) > closest
