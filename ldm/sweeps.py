"""Hyperparameter search: an Optuna sampler for studies that are continued (`conf/hparams_search/ldm_optuna.yaml`).

The study lives in an SQLite file, and running the sweep command again continues it. A TPE sampler seeded with the same
`seed` in every invocation draws the same random startup trials again, so the continued study repeated its first
trials' parameters. `ContinuingTPESampler` seeds its TPE sampler with `seed + the number of trials the study holds`
when the invocation samples its first trial: reproducible (the same history gives the same seed), and new draws in
every continuation.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState


class ContinuingTPESampler(optuna.samplers.BaseSampler):
    """`optuna.samplers.TPESampler(seed=seed + len(study.trials), **kwargs)`, built at the first trial it samples.

    Args:
        seed: the base seed; None: unseeded (not reproducible).
        **kwargs: TPESampler's other arguments (n_startup_trials, ...).
    """

    def __init__(self, seed: int | None = None, **kwargs: Any):
        self.seed = seed
        self.kwargs = kwargs
        self.sampler: optuna.samplers.TPESampler | None = None

    def _for(self, study: Study) -> optuna.samplers.TPESampler:
        if self.sampler is None:
            seed = None if self.seed is None else self.seed + len(study.trials)
            self.sampler = optuna.samplers.TPESampler(seed=seed, **self.kwargs)
        return self.sampler

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._for(study).infer_relative_search_space(study, trial)

    def sample_relative(self, study: Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self._for(study).sample_relative(study, trial, search_space)

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self._for(study).sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState, values: Any) -> None:
        self._for(study).after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        if self.sampler is not None:
            self.sampler.reseed_rng()
