"""Seeds fold deterministically; per-sample generators make an image's noise independent of the batch."""

import torch

from ldm.seeding import StackedRandomGenerator, fold_seed, step_generator


def test_fold_seed_is_deterministic_and_separates_inputs():
    assert fold_seed(42, 0, 7) == fold_seed(42, 0, 7)
    seeds = {fold_seed(42, rank, step) for rank in range(4) for step in range(100)}
    assert len(seeds) == 400
    assert all(0 <= s < 2**63 for s in seeds)


def test_step_generator_differs_per_rank_and_repeats_per_step():
    a = torch.randn(8, generator=step_generator(1, 0, 5))
    b = torch.randn(8, generator=step_generator(1, 1, 5))
    c = torch.randn(8, generator=step_generator(1, 0, 5))
    assert not torch.equal(a, b)
    assert torch.equal(a, c)


def test_micro_batches_draw_by_step_and_position_so_no_accumulation_repeats_another():
    """Under gradient accumulation the draws depend on (step, micro-batch in the step), not on step * k + micro, which
    repeated earlier draws after a resume with a smaller k; the first micro-batch draws what the step alone does."""
    draws = {(step, micro): tuple(torch.randn(4, generator=step_generator(1, 0, step, micro=micro)).tolist())
             for step in range(6) for micro in range(3)}
    assert len(set(draws.values())) == 18
    assert all(draws[step, 0] == tuple(torch.randn(4, generator=step_generator(1, 0, step)).tolist())
               for step in range(6))


def test_stacked_generator_is_batch_size_independent():
    batch = StackedRandomGenerator([10, 11, 12, 13]).randn((4, 3, 5, 5))
    singles = torch.cat([StackedRandomGenerator([s]).randn((1, 3, 5, 5)) for s in [10, 11, 12, 13]])
    assert torch.equal(batch, singles)
