"""Two-process scenarios, launched by ``tests/distributed/conftest.py`` with torchrun (gloo, CPU).

Usage: ``torchrun --nproc_per_node 2 -m tests.distributed._worker OUT_DIR SCENARIO [SCENARIO ...]``.
Every rank trains on its half of a global batch; each rank also trains the
same model in one process on the whole batch (the reference, no
collectives), and writes ``OUT_DIR/SCENARIO.rankK.json`` with the numbers the
tests assert on.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist
from torch import nn

import hf_galore
from hf_galore.distributed import (
    optimizer_state_bytes,
    register_layerwise_ddp_hook,
    synchronize_bases,
)
from hf_galore.distributed._shards import Rows
from hf_galore.optim.layerwise import LayerwiseOptimizer
from hf_galore.projectors import register_projector
from hf_galore.projectors.svd import SVDFinder, top_singular_basis
from tests.helpers import split_groups, tiny_mlp

DIMS = (30, 45, 21, 7)  # odd sizes: uneven FSDP shards on both sides
GLOBAL_BATCH = 16
STEPS = 7
LOWRANK = {"rank": 4, "update_proj_gap": 3, "scale": 0.25}
COLLECTIVE_TIMEOUT = 120  # seconds


class RankSkewedSVD(SVDFinder):
    """The SVD basis of a gradient perturbed differently on every rank (a deliberately non-reproducible finder)."""

    name = "rank_skewed_svd"

    def find(self, matrix, rank, side, *, previous, state, group):
        g = torch.Generator().manual_seed(1000 + dist.get_rank())
        noise = torch.randn(matrix.shape, generator=g) * matrix.abs().mean()
        return top_singular_basis(matrix + noise, rank, side)


class FailingSVD(SVDFinder):
    """An SVD that never converges: every refresh falls back to the randomized finder (``lowrank._fallback_basis``)."""

    name = "failing_svd"

    def find(self, matrix, rank, side, *, previous, state, group):
        raise RuntimeError("SVD did not converge (test finder)")


register_projector(RankSkewedSVD())
register_projector(FailingSVD())


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(GLOBAL_BATCH, DIMS[0], generator=g), torch.randn(
        GLOBAL_BATCH, DIMS[-1], generator=g
    )


def local_rows(t: torch.Tensor) -> torch.Tensor:
    world, rank = dist.get_world_size(), dist.get_rank()
    per = t.shape[0] // world
    return t[rank * per : (rank + 1) * per]


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (model(x) - y).square().mean() * 10.0


def reference(
    lowrank: dict, steps: int = STEPS
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """One process, whole global batch."""
    model = tiny_mlp(0, DIMS)
    opt = hf_galore.GaLoreAdamW(split_groups(model, **lowrank), lr=1e-2)
    for step in range(steps):
        x, y = batch(step)
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
    return model, opt


def fingerprint(model: nn.Module, opt: torch.optim.Optimizer) -> torch.Tensor:
    """Every parameter and basis of this rank, flattened (to compare ranks bit for bit)."""
    parts = [p.detach().reshape(-1) for p in model.parameters()]
    for group in opt.param_groups:
        for p in group["params"]:
            parts += [
                v.reshape(-1).float()
                for k, v in opt.state[p].items()
                if k.startswith("basis_")
            ]
    return torch.cat(parts)


def ranks_identical(vec: torch.Tensor) -> bool:
    gathered = [torch.empty_like(vec) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, vec.contiguous())
    return all(torch.equal(gathered[0], other) for other in gathered[1:])


def max_diff(a: nn.Module, b: nn.Module) -> float:
    out = 0.0
    for p, q in zip(a.parameters(), b.parameters()):
        p = p.full_tensor() if hasattr(p, "full_tensor") else p
        out = max(out, (p.detach() - q.detach()).abs().max().item())
    return out


# ------------------------------------------------------------------------ scenarios
def ddp_loop(projector: str = "svd", sync: str = "auto") -> dict:
    """``sync``: ``"auto"`` (nothing called: the optimizer turns the broadcast on), ``"on"`` or ``"off"``."""
    lowrank = {**LOWRANK, "projector": projector}
    model = tiny_mlp(0, DIMS)
    opt = hf_galore.GaLoreAdamW(split_groups(model, **lowrank), lr=1e-2)
    ddp = nn.parallel.DistributedDataParallel(model)
    if sync != "auto":
        synchronize_bases(opt, enabled=sync == "on")
    for step in range(STEPS):
        x, y = batch(step)
        opt.zero_grad()
        loss_fn(ddp, local_rows(x), local_rows(y)).backward()
        opt.step()
    ref, _ = reference(lowrank)
    return {
        "max_diff_vs_one_process": max_diff(model, ref),
        "ranks_identical": ranks_identical(fingerprint(model, opt)),
        "refreshes": opt.galore_stats.refreshes,
        "synced": opt.basis_sync is not None,
    }


def ddp_skewed(sync: str) -> dict:
    out = ddp_loop("rank_skewed_svd", sync=sync)
    del out["max_diff_vs_one_process"]
    return out


def independent_ranks() -> dict:
    """No DDP: every rank trains its own model on its own data in one process group; no basis is broadcast."""
    model = tiny_mlp(dist.get_rank(), DIMS)
    opt = hf_galore.GaLoreAdamW(split_groups(model, **LOWRANK), lr=1e-2)
    for step in range(2):
        x, y = batch(step)
        opt.zero_grad()
        loss_fn(model, local_rows(x), local_rows(y)).backward()
        opt.step()
    return {"synced": opt.basis_sync is not None, "decided": opt.basis_sync_decided}


def ddp_layerwise() -> dict:
    """Layer-wise updates from the DDP communication hook, with two micro-batches per step (no_sync)."""
    model = tiny_mlp(0, DIMS)
    inner = hf_galore.GaLoreAdamW(split_groups(model, **LOWRANK), lr=1e-2)
    opt = LayerwiseOptimizer(inner, register_hooks=False)
    ddp = nn.parallel.DistributedDataParallel(model)
    register_layerwise_ddp_hook(ddp, opt)
    grads_freed, updated_in_backward = True, True
    for step in range(STEPS):
        x, y = batch(step)
        x, y = local_rows(x), local_rows(y)
        half = x.shape[0] // 2
        before = [p.detach().clone() for p in model.parameters()]
        with ddp.no_sync():
            (loss_fn(ddp, x[:half], y[:half]) / 2).backward()
        moved_early = any(
            not torch.equal(b, p) for b, p in zip(before, model.parameters())
        )
        (loss_fn(ddp, x[half:], y[half:]) / 2).backward()
        grads_freed &= all(p.grad is None for p in model.parameters())
        updated_in_backward &= not moved_early and all(
            not torch.equal(b, p) for b, p in zip(before, model.parameters())
        )
        opt.step()
        opt.zero_grad()
    ref, _ = reference(LOWRANK)
    return {
        "max_diff_vs_one_process": max_diff(model, ref),
        "ranks_identical": ranks_identical(fingerprint(model, inner)),
        "grads_freed": grads_freed,
        "updated_in_backward": updated_in_backward,
        "steps": [int(inner.state[p]["step"]) for p in model.parameters()],
        "synced": inner.basis_sync is not None,
    }


def fsdp2(
    proj_type: str, steps: int = STEPS, projector: str = "svd", checkpoint: bool = False, **options
) -> dict:
    """``options``: more group keys (a codec, a refresh policy, ...), the same in one process."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    lowrank = {**LOWRANK, "proj_type": proj_type, "projector": projector, **options}
    model = tiny_mlp(0, DIMS)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = hf_galore.GaLoreAdamW(split_groups(model, **lowrank), lr=1e-2)
    for step in range(steps):
        x, y = batch(step)
        opt.zero_grad()
        loss_fn(model, local_rows(x), local_rows(y)).backward()
        opt.step()
    ref, ref_opt = reference(lowrank, steps)
    lowrank_states_local = all(
        not isinstance(v, DTensor)
        for group in opt.param_groups
        if "rank" in group
        for p in group["params"]
        for v in opt.state[p].values()
    )
    return {
        "per_rank_file_into_one_process": per_rank_file_into_one_process(opt, lowrank) if checkpoint else None,
        "max_diff_vs_one_process": max_diff(model, ref),
        "moments_rel_diff": moments_rel_diff(model, opt, ref, ref_opt),
        "checkpoint": checkpoint_round_trip(model, opt, ref, ref_opt)
        if checkpoint
        else None,
        "state_bytes": optimizer_state_bytes(opt),
        "state_bytes_one_process": optimizer_state_bytes(ref_opt),
        "lowrank_states_local": lowrank_states_local,
        "refreshes": opt.galore_stats.refreshes,
        "ref_refreshes": ref_opt.galore_stats.refreshes,
        "stats": _counters(opt.galore_stats),
        "ref_stats": _counters(ref_opt.galore_stats),
    }


def _counters(stats) -> dict:
    keys = ("refreshes", "fallbacks", "refresh_failures", "skipped_nonfinite", "energy_fallbacks")
    return {key: int(getattr(stats, key)) for key in keys}


def fsdp2_nonfinite(proj_type: str) -> dict:
    """A NaN in one rank's shard of one gradient, at a refresh step (3) and between refreshes (4):
    every rank skips the step and keeps its weights and state (the flag is all-reduced)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    def local(t: torch.Tensor) -> torch.Tensor:
        return (t.to_local() if isinstance(t, DTensor) else t).clone()

    def snapshot() -> list:
        weights = [local(p) for p in model.parameters()]
        state = [{k: local(v) for k, v in s.items() if isinstance(v, torch.Tensor)} for s in opt.state.values()]
        return [weights, state]

    def same(a: list, b: list) -> bool:
        weights = all(torch.equal(x, y) for x, y in zip(a[0], b[0]))
        states = all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a[1], b[1]))
        return weights and states and len(a[1]) == len(b[1])

    model = tiny_mlp(0, DIMS)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = hf_galore.GaLoreAdamW(split_groups(model, **LOWRANK, proj_type=proj_type), lr=1e-2)
    kept = []
    for step in range(6):  # refreshes at steps 0 and 3
        x, y = batch(step)
        opt.zero_grad()
        loss_fn(model, local_rows(x), local_rows(y)).backward()
        if step in (3, 4):
            if dist.get_rank() == 0:
                model[0 if step == 4 else 2].weight.grad.to_local()[0, 0] = float("nan")
            before = snapshot()
        opt.step()
        if step in (3, 4):
            kept.append(same(before, snapshot()))
    return {
        "kept": kept,
        "skipped": opt.galore_stats.skipped_steps,
        "finite": all(bool(torch.isfinite(local(p)).all()) for p in model.parameters()),
    }


class Regressor(nn.Module):
    """``tiny_mlp`` with the Trainer's calling convention (keyword inputs, a dict with ``loss``)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_mlp(0, DIMS)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": loss_fn(self.net, x, labels)}


def trainer_ddp(projector: str = "svd", callback: bool = True) -> dict:
    """``Trainer`` with ``optim="galore_adamw"`` on 2 ranks vs a plain one-process loop with the same optimizer.

    ``callback=False`` removes ``GaLoreCallback`` before training: the basis broadcast must not depend on it.
    """
    import tempfile

    from transformers import Trainer, TrainingArguments

    x, y = batch(0)
    data = [
        {"x": x[i], "labels": y[i]} for i in range(GLOBAL_BATCH)
    ]  # one step = the whole set
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=GLOBAL_BATCH // dist.get_world_size(),
            max_steps=5,
            learning_rate=1e-2,
            lr_scheduler_type="constant",
            weight_decay=0.0,
            max_grad_norm=0.0,
            optim="galore_adamw",
            optim_target_modules=["net.0", "net.2", "net.4"],
            optim_args=f"rank=4,update_proj_gap=3,scale=0.25,projector={projector}",
            use_cpu=True,
            ddp_backend="gloo",
            report_to="none",
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            remove_unused_columns=False,
            seed=0,
        )
        model = Regressor()
        trainer = Trainer(model=model, args=args, train_dataset=data)
        if not callback:
            from hf_galore.callback import GaLoreCallback

            while any(isinstance(c, GaLoreCallback) for c in trainer.callback_handler.callbacks):
                trainer.remove_callback(GaLoreCallback)
        callbacks = [type(c).__name__ for c in trainer.callback_handler.callbacks]
        trainer.train()
        inner = (
            trainer.optimizer.optimizer
            if hasattr(trainer.optimizer, "optimizer")
            else trainer.optimizer
        )
        ref = Regressor()
        ref_opt = hf_galore.create_optimizer(ref, args)
        xs, ys = (
            torch.stack([d["x"] for d in data]),
            torch.stack([d["labels"] for d in data]),
        )
        for _ in range(5):
            ref_opt.zero_grad()
            ref(xs, ys)["loss"].backward()
            ref_opt.step()
    return {
        "max_diff_vs_one_process": max_diff(model, ref),
        "ranks_identical": ranks_identical(fingerprint(model, inner)),
        "synced": getattr(inner, "basis_sync", None) is not None,
        "optimizer": type(inner).__name__,
        "refreshes": inner.galore_stats.refreshes,
        "callbacks": callbacks,
    }


def per_rank_file_into_one_process(opt, lowrank: dict) -> str:
    """A rank's own ``opt.state_dict()`` file (DTensor shards) loaded into an unsharded optimizer: refused.

    Before the refusal the local shards passed the shape check and the first step failed.
    """
    import io

    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    _, one_process = reference(lowrank, steps=1)
    try:
        one_process.load_state_dict(loaded)
    except hf_galore.StateMismatchError as exc:
        return f"refused: {exc}"
    return "loaded"


def checkpoint_round_trip(model, opt, ref, ref_opt) -> dict:
    """torch.distributed.checkpoint's full optimizer state equals one process's; loading it back is lossless."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    full = get_optimizer_state_dict(
        model, opt, options=StateDictOptions(full_state_dict=True)
    )
    # plain (replicated) entries share storage with the live state: copy before scribbling on it
    full = torch.utils._pytree.tree_map(
        lambda v: v.clone() if isinstance(v, torch.Tensor) else v, full
    )
    ref_state = {name: ref_opt.state[p] for name, p in ref.named_parameters()}
    worst, keys = 0.0, 0
    codes_equal = True
    for name, entry in full["state"].items():
        for key, value in entry.items():
            if not key.startswith(("exp_avg", "basis_")) or not isinstance(value, torch.Tensor):
                continue
            theirs = ref_state[name][key]
            if not value.is_floating_point():  # a quantized basis's codes and shape
                codes_equal &= torch.equal(value, theirs)
            else:
                worst = max(worst, ((value - theirs).abs().max() / theirs.abs().max()).item())
                keys += 1
    before = {
        id(p): {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}
        for p in model.parameters()
    }
    sharded = get_optimizer_state_dict(model, opt)
    for entry in sharded[
        "state"
    ].values():  # scribble, then restore from the checkpoint
        for value in entry.values():
            if (
                isinstance(value, torch.Tensor)
                and value.is_floating_point()
                and value.dim()
            ):
                (value.to_local() if hasattr(value, "to_local") else value).zero_()
    set_optimizer_state_dict(
        model, opt, full, options=StateDictOptions(full_state_dict=True)
    )

    def restored() -> bool:
        return all(
            type(opt.state[p][k]) is type(v)
            and (torch.equal(opt.state[p][k], v) if isinstance(v, torch.Tensor) else opt.state[p][k] == v)
            for p in model.parameters()
            for k, v in before[id(p)].items()
        )

    from_full = restored()
    # the sharded path accelerate's FSDP2 checkpoints take: dcp.save / dcp.load in one directory
    import tempfile

    import torch.distributed.checkpoint as dcp

    where = [tempfile.mkdtemp(prefix="galore_dcp_") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(where)
    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=where[0])
    for state in opt.state.values():
        for value in state.values():
            if (
                isinstance(value, torch.Tensor)
                and value.is_floating_point()
                and value.dim()
            ):
                (value.to_local() if hasattr(value, "to_local") else value).zero_()
    target = {"optim": get_optimizer_state_dict(model, opt)}
    dcp.load(target, checkpoint_id=where[0])
    set_optimizer_state_dict(model, opt, target["optim"])
    from_dcp = restored()
    dist.barrier()
    if dist.get_rank() == 0:
        import shutil

        shutil.rmtree(where[0], ignore_errors=True)
    return {
        "rel_diff_vs_one_process": worst,
        "keys": keys,
        "codes_equal": codes_equal,
        "restored_full": from_full,
        "restored_dcp": from_dcp,
    }


def moments_rel_diff(model, opt, ref, ref_opt) -> float:
    """Largest difference of the low-rank first moments (gathered from the shards) to one process, relative."""
    worst = 0.0
    for p, q in zip(model.parameters(), ref.parameters()):
        if p.dim() < 2:
            continue
        mine, theirs = opt.state[p]["exp_avg"], ref_opt.state[q]["exp_avg"]
        if mine.shape != theirs.shape:  # sharded: rows (G Q) or columns (Pᵀ G)
            rows = Rows(p)
            if mine.shape[1] == theirs.shape[1]:
                mine = rows.all_gather_rows(mine, theirs.shape[0])
            else:
                mine = rows.all_gather_cols(mine, theirs.shape[1])
        worst = max(worst, ((mine - theirs).abs().max() / theirs.abs().max()).item())
    return worst


SCENARIOS = {
    "ddp": ddp_loop,
    "ddp_explicit": lambda: ddp_loop(sync="on"),
    "ddp_skewed_synced": lambda: ddp_skewed("auto"),
    "ddp_skewed_unsynced": lambda: ddp_skewed("off"),
    "independent_ranks": independent_ranks,
    "ddp_layerwise": ddp_layerwise,
    "trainer_ddp": trainer_ddp,
    "trainer_ddp_no_callback": lambda: trainer_ddp("rank_skewed_svd", callback=False),
    "fsdp2_std": lambda: fsdp2("std", checkpoint=True),
    "fsdp2_reverse_std": lambda: fsdp2("reverse_std", checkpoint=True),
    "fsdp2_randomized": lambda: fsdp2("std", projector="randomized", checkpoint=True),
    "fsdp2_online_pca": lambda: fsdp2("std", projector="online_pca", checkpoint=True),
    # Pᵀ G Q with G's own singular vectors is diagonal up to rounding, and Adam turns those
    # rounding-level entries into ±lr steps: only the first step's moments are comparable.
    "fsdp2_full": lambda: fsdp2("full", steps=1),
    # options the algorithm applies: the same on shards as in one process
    "fsdp2_int8": lambda: fsdp2("std", checkpoint=True, quant="int8"),
    "fsdp2_fallback": lambda: fsdp2("std", projector="failing_svd"),
    "fsdp2_lazy_rotate": lambda: fsdp2("reverse_std", refresh="lazy", lazy_queue=1, rotate_moments=True),
    "fsdp2_nonfinite_std": lambda: fsdp2_nonfinite("std"),
    "fsdp2_nonfinite_reverse_std": lambda: fsdp2_nonfinite("reverse_std"),
}


def main(argv: list[str]) -> None:
    out_dir, names = argv[0], argv[1:]
    torch.set_num_threads(1)
    # a collective that never completes (a bug) fails after this instead of hanging
    dist.init_process_group(
        "gloo", timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT)
    )
    rank = dist.get_rank()
    try:
        for name in names:
            try:
                result = SCENARIOS[name]()
            except Exception:  # noqa: BLE001 - reported to the test, which fails with the traceback
                result = {"error": traceback.format_exc()}
            with open(os.path.join(out_dir, f"{name}.rank{rank}.json"), "w") as f:
                json.dump(result, f)
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
