"""Two real processes (gloo on CPU): DDP keeps the trunk equal and the CPU proxy banks identical."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from tests.conftest import build_config


def _worker(rank: int, world: int, port: int, raw: dict[str, Any], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from training.train import Trainer, init_distributed

    info = init_distributed("cpu")
    trainer = Trainer(build_config(raw), Path(out) / "run", info)
    initial = {f"init.{n}": b.weight.detach().clone() for n, b in trainer.banks.items()}
    trainer.fit()
    state = {f"bank.{n}": b.weight.detach() for n, b in trainer.banks.items()}
    # parameters, not buffers: DDP re-broadcasts BatchNorm statistics from rank 0 at each forward
    state.update({f"model.{k}": v.detach() for k, v in trainer.model.named_parameters()})
    save_file({**state, **initial}, str(Path(out) / f"rank{rank}.safetensors"))
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_ddp_leaves_equal_proxy_banks(tiny_config: dict[str, Any], tmp_path: Path) -> None:
    tiny_config["train"].update(max_steps=4, checkpoint_every=2)
    tiny_config["data"]["images_per_dataset"] = 4  # per rank; m_per_class=4 -> one identity per rank
    mp.spawn(_worker, args=(2, _free_port(), tiny_config, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2))
    assert r0.keys() == r1.keys()
    for key in r0:
        if key.startswith("bank.") or key.startswith("model."):
            assert torch.equal(r0[key], r1[key]), key
    for name in ("identity", "category", "attributes"):
        assert not torch.equal(r0[f"bank.{name}"], r0[f"init.{name}"]), name  # they did train
    # rank 0 wrote the checkpoints, after checking that every rank's banks agree
    assert (tmp_path / "run" / "checkpoints" / "step_00000004" / "proxies.safetensors").exists()
