"""Hyperparameter search with Optuna for studies that are continued (`conf/hparams_search/ldm_optuna.yaml`).

The study lives in an SQLite file, and running the sweep command again continues it. A TPE sampler seeded with the same
`seed` in every invocation draws the same random startup trials again, so the continued study repeated its first
trials' parameters. `ContinuingTPESampler` seeds its TPE sampler with `seed + the number of trials the study holds`
when the invocation samples its first trial: reproducible (the same history gives the same seed), and new draws in
every continuation.

`CheckOptunaSweep`, a Hydra callback, checks at the start of the sweep what the sweeper would take as given: every
search-space entry is a distribution Optuna accepts (a log interval from 0 stopped the sweep with a traceback that
named no key), and a continued study is continued with the same fixed settings and search space (a command with
another batch size joined the study, learnt from its scores and reported its best trial as its own).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from ldm.cli.common import EXIT_USER_ERROR


def refuse(message: str) -> NoReturn:
    """End the sweep with `message` and exit status 2, as ldm-train's config checks do. (Hydra callbacks run outside
    the task function, where Hydra prints a traceback for an exception; SystemExit passes through it.)"""
    print(f"ldm-train: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USER_ERROR)


def sweep_space(arguments: Sequence[str], params: Mapping[str, Any] | None
                ) -> tuple[dict[str, Any], dict[str, BaseDistribution]]:
    """The sweep's fixed settings, as the Optuna sweeper records them on each trial (its user attributes), and its
    search space (key -> distribution), as it hands it to Optuna (a key given a value on the command line is not
    searched), from `params` (`hydra.sweeper.params`) and `arguments` (the command line's task overrides), after
    checking that every search entry is a distribution Optuna accepts."""
    parser, fixed, space = OverridesParser.create(), {}, {}
    for line in [*(f"{key}={value}" for key, value in (params or {}).items()), *arguments]:
        key = line.split("=", 1)[0]
        try:
            override = parser.parse_override(line)
            value = create_optuna_distribution_from_override(override)
        except (ValueError, AssertionError, NotImplementedError, HydraException) as err:
            refuse(f"the search space entry {line!r} is not a distribution Optuna accepts ({err}); write "
                   f"{key}=interval(LOW, HIGH) with LOW < HIGH (and LOW > 0 in tag(log, interval(LOW, HIGH))), "
                   f"or {key}=choice(A, B, ...)")
        (space if isinstance(value, BaseDistribution) else fixed)[override.get_key_element()] = value
    return fixed, {key: distribution for key, distribution in space.items() if key not in fixed}


def setting_values(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Recorded fixed settings (override strings by key) as values to compare: the key without its `+` / `++`
    prefix, the value as Hydra parses it (`'abc'` and `abc`, `1e-3` and `0.001` are the same setting)."""
    parser, values = OverridesParser.create(), {}
    for key, value in settings.items():
        try:
            parsed = parser.parse_override(f"{key}={value}").value()
        except HydraException:
            parsed = value
        values[key.lstrip("+")] = parsed
    return values


class CheckOptunaSweep(Callback):
    """Before the Optuna sweeper starts: refuse a search space Optuna would reject, and the continuation of a stored
    study whose newest complete trial was run with other fixed settings or another search space (naming them, and
    `hydra.sweeper.study_name`), and a sweep with no metric to optimize."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweeper = config.hydra.sweeper
        params = OmegaConf.to_container(sweeper.params, resolve=True) if sweeper.get("params") else None
        arguments = OmegaConf.to_container(config.hydra.overrides.task, resolve=False)  # (`${hydra:job.num}`)
        fixed, space = sweep_space(arguments, params)
        fixed = json.loads(json.dumps(fixed))  # as stored
        space = {key.lstrip("+"): distribution for key, distribution in space.items()}
        if not config.get("optimized_metric"):  # (each trial would train, then fail: "Return value must be float")
            refuse("optimized_metric=null: an Optuna sweep minimizes (or maximizes) the metric each trial returns; "
                   "set optimized_metric=val/loss (hparams_search=ldm_optuna's) or another logged metric")
        try:
            study = optuna.load_study(study_name=sweeper.study_name, storage=sweeper.storage)
        except KeyError:  # a new study
            return
        # every trial that drew a key, whatever its state (Optuna checks each new distribution against them all, inside
        # the first trial: another kind of distribution, other choices)
        drawn: dict[str, BaseDistribution] = {}
        for trial in study.trials:
            for key, distribution in trial.distributions.items():
                drawn.setdefault(key.lstrip("+"), distribution)
        differing = []
        for key in sorted(drawn.keys() & space.keys()):
            try:
                optuna.distributions.check_distribution_compatibility(drawn[key], space[key])
            except ValueError:
                differing.append(f"{key}: searched as {drawn[key]} there, {space[key]} here")
        # the newest trial with a score (one left RUNNING, a job stopped or refused after training, scored nothing):
        # its fixed settings and searched keys
        newest = next((t for t in reversed(study.trials) if t.user_attrs and t.state == TrialState.COMPLETE), None)
        if newest is not None:
            recorded = newest.user_attrs

            def side(settings: dict[str, Any], key: str) -> str:
                written = [value for name, value in settings.items() if name.lstrip("+") == key]
                return repr(written[0]) if written else "not set"

            there, here = setting_values(recorded), setting_values(fixed)
            differing += [f"{key}: {side(recorded, key)} there, {side(fixed, key)} here"
                          for key in sorted(there.keys() | here.keys()) if there.get(key, ...) != here.get(key, ...)]
            searched = sorted(key.lstrip("+") for key in newest.distributions)
            if searched != sorted(space):
                differing.append(f"searched: {searched} there, {sorted(space)} here")
        if differing:
            refuse(f"the Optuna study {study.study_name!r} ({sweeper.storage}) holds trials run with other fixed "
                   f"settings or search space ({'; '.join(differing[:5])}): continued, it would mix their scores "
                   f"with this command's. Run the study's own command to continue it, or start another study with "
                   f"hydra.sweeper.study_name=NAME")


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
