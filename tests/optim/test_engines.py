"""The engine interface on one process: the local placement, and who decides the basis broadcast."""

from __future__ import annotations

import pytest
import torch

import hf_galore
from hf_galore.distributed import synchronize_bases
from hf_galore.optim import engines, lowrank
from hf_galore.optim.stats import RefreshStats
from hf_galore.projectors.svd import top_singular_basis
from tests.helpers import regression_batch, split_groups, tiny_mlp, train

GROUP = {"rank": 3, "proj_type": "std", "projector": "svd", "quant": None, "refresh": "fixed", "update_proj_gap": 2}


class RecordingSync:
    """A basis broadcast stand-in: counts calls; ``agree`` answers from ``verdicts`` (then True) as other ranks would."""

    def __init__(self, *verdicts: bool) -> None:
        self.calls, self.verdicts = 0, list(verdicts)

    def __call__(self, basis: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return basis

    def agree(self, flag: bool) -> bool:
        return flag and (self.verdicts.pop(0) if self.verdicts else True)


def test_local_placement_refreshes_to_the_svd_basis():
    """The one refresh, through the local placement: the top singular vectors (an independent SVD)."""
    grad = torch.randn(20, 12, generator=torch.Generator().manual_seed(0))
    state, stats = {"step": torch.tensor(0.0)}, RefreshStats()
    lowrank.refresh_basis(grad, state, dict(GROUP), 0, stats, dtype=torch.float32)
    expected = top_singular_basis(grad, 3, "right")
    assert torch.allclose(state["basis_right"].abs(), expected.abs(), atol=1e-5)
    assert stats.refreshes == 1 and stats.fallbacks == 0


def test_a_refresh_that_fails_on_another_rank_keeps_the_old_basis_here():
    """``sync.agree`` says another rank failed: nothing is broadcast or stored, a failure is counted."""
    gen = torch.Generator().manual_seed(1)
    state, stats = {"step": torch.tensor(0.0)}, RefreshStats()
    lowrank.refresh_basis(torch.randn(20, 12, generator=gen), state, dict(GROUP), 0, stats, dtype=torch.float32)
    before = state["basis_right"].clone()
    sync = RecordingSync(True, False)  # the gradient is finite everywhere; the finder failed on another rank
    lowrank.refresh_basis(
        torch.randn(20, 12, generator=gen), state, dict(GROUP), 2, stats, dtype=torch.float32, sync=sync
    )
    assert torch.equal(state["basis_right"], before)
    assert sync.calls == 0
    assert stats.refreshes == 1 and stats.refresh_failures == 1 and stats.skipped_nonfinite == 0


class OfferingEngine:
    """An engine that owns no tensor and offers a basis broadcast, counting how often it is asked."""

    def __init__(self) -> None:
        self.sync, self.asked = RecordingSync(), 0

    def handles(self, tensor):
        return False

    def placement(self, tensor, group):
        raise AssertionError("owns no tensor")

    def basis_sync_for(self, params, grads):
        self.asked += 1
        return self.sync

    def state_dict_post_hook(self, optimizer, state_dict):
        return None

    def load_state_dict_pre_hook(self, optimizer, state_dict):
        return None


@pytest.fixture
def offering_engine():
    engine = engines.register_engine(OfferingEngine())
    try:
        yield engine
    finally:
        engines._ENGINES.remove(engine)


def test_the_optimizer_takes_the_engines_broadcast_at_its_first_step(offering_engine):
    """No callback and no call: the optimizer asks the engines once and uses the answer for every new basis."""
    model = tiny_mlp()
    opt = hf_galore.GaLoreAdamW(split_groups(model, rank=4, update_proj_gap=2), lr=1e-2)
    assert opt.basis_sync is None and not opt.basis_sync_decided
    train(model, opt, steps=3)
    assert offering_engine.asked == 1
    assert opt.basis_sync is offering_engine.sync and opt.basis_sync_decided
    # 3 weights, refreshed at steps 0 and 2, one sync call per basis plus one for the fallback count
    assert offering_engine.sync.calls == 3 * 2 * 2


def test_an_explicit_choice_is_kept(offering_engine):
    model = tiny_mlp()
    opt = synchronize_bases(hf_galore.GaLoreAdamW(split_groups(model, rank=4), lr=1e-2), enabled=False)
    train(model, opt, steps=1)
    assert offering_engine.asked == 0 and opt.basis_sync is None
    mine = RecordingSync()
    model = tiny_mlp()
    opt = hf_galore.GaLoreAdamW(split_groups(model, rank=4), lr=1e-2)
    opt.basis_sync = mine
    train(model, opt, steps=1)
    assert opt.basis_sync is mine and mine.calls > 0


def test_without_a_process_group_no_engine_offers_a_broadcast():
    """The shipped engines (DDP, FSDP2) decline on one process, without any collective."""
    model = tiny_mlp()
    opt = hf_galore.GaLoreAdamW(split_groups(model, rank=4), lr=1e-2)
    x, y = regression_batch()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    assert opt.basis_sync_decided and opt.basis_sync is None


def test_synchronize_bases_names_a_bad_enabled_value():
    opt = hf_galore.GaLoreAdamW(split_groups(tiny_mlp(), rank=4))
    with pytest.raises(ValueError, match=r"`enabled` must be True or False, got 'yes'"):
        synchronize_bases(opt, enabled="yes")
