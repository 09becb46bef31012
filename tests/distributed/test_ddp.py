"""DDP: two gloo processes equal one process on the same global batch, and ranks never diverge."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.distributed

TOLERANCE = 1e-6  # float32 re-association of the gradient average; measured about 5e-8


@pytest.mark.parametrize("name", ["ddp", "ddp_explicit"])
def test_ddp_plain_loop_equals_one_process(scenario, name):
    """``ddp``: nothing but the optimizer (the broadcast turns itself on); ``ddp_explicit``: ``synchronize_bases``."""
    for rank in scenario(name):
        assert rank["max_diff_vs_one_process"] < TOLERANCE
        assert rank["synced"]
        assert rank["refreshes"] == 9  # 3 weights x steps 0, 3, 6


def test_ranks_that_are_not_replicas_keep_their_own_basis(scenario):
    """One process group, no DDP, a different model per rank: no DDP module wraps the weights, no broadcast."""
    for rank in scenario("independent_ranks"):
        assert rank["decided"]
        assert not rank["synced"]


def test_ddp_ranks_hold_identical_parameters_and_bases(scenario):
    assert all(rank["ranks_identical"] for rank in scenario("ddp"))


def test_basis_broadcast_keeps_ranks_identical_even_with_a_rank_dependent_finder(
    scenario,
):
    """By construction: a finder returning a different basis on every rank cannot split the ranks.

    Nothing is called to get there: the optimizer turns the broadcast on itself.
    """
    assert all(rank["ranks_identical"] and rank["synced"] for rank in scenario("ddp_skewed_synced"))
    # the same finder with the broadcast turned off does split them, so the check above can fail
    assert not any(rank["ranks_identical"] or rank["synced"] for rank in scenario("ddp_skewed_unsynced"))


def test_layerwise_under_ddp_updates_with_reduced_gradients(scenario):
    """Comm-hook updates, two micro-batches per step (``no_sync``), equal the regular optimizer in one process."""
    for rank in scenario("ddp_layerwise"):
        assert rank["max_diff_vs_one_process"] < TOLERANCE
        assert rank["ranks_identical"]
        assert rank[
            "updated_in_backward"
        ]  # during the synchronizing backward, not on no_sync ones
        assert rank["grads_freed"]
        assert (
            rank["steps"] == [7] * 6
        )  # one step per optimizer step, not per micro-batch
        assert rank["synced"]  # turned on from inside the communication hook's first update


def test_trainer_under_ddp_equals_a_one_process_loop(scenario):
    """``Trainer(optim="galore_adamw")`` on 2 ranks vs ``create_optimizer`` in a plain one-process loop."""
    for rank in scenario("trainer_ddp"):
        assert rank["optimizer"] == "GaLoreAdamW"
        assert rank["max_diff_vs_one_process"] < TOLERANCE
        assert rank["ranks_identical"]
        assert rank["synced"]
        assert rank["refreshes"] == 6  # 3 weights x steps 0 and 3 of 5


def test_trainer_under_ddp_keeps_ranks_identical_without_the_callback(scenario):
    """Correctness never depends on a callback: GaLoreCallback removed, a finder that differs per rank."""
    for rank in scenario("trainer_ddp_no_callback"):
        assert not any("GaLoreCallback" in name for name in rank["callbacks"])
        assert rank["synced"]
        assert rank["ranks_identical"]
