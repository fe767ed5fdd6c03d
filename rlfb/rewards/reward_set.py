"""Combining reward functions: validation, weighted sum, dense rewards, clipping and running normalization.

A :class:`RewardSet` calls each reward with TRL's keyword arguments (``prompts``, ``completions``,
``completion_ids``, and every extra task column by name), checks what comes back, and combines it:

    total_i = sum_k w_k * r_k(i)    over the sequence-level rewards k that scored sample i

A ``None`` score is left out of that sum for its sample (TRL's ``nansum``), not counted as zero; a sample
that no reward scored at all gets ``total = NaN`` and ``scored = False``, as TRL marks it unscorable.
Rewards that return per-token lists (dense rewards) are summed, weighted, into ``per_token`` instead.

Example:
    >>> from rlfb.rewards import RewardSet
    >>> rewards = RewardSet([{"name": "length", "kwargs": {"target": 2, "unit": "words"}, "weight": 0.5},
    ...                      "exact_match"])
    >>> result = rewards(["1+1="], ["2"], completion_ids=[[17]], answer=["2"])
    >>> result.components["length"].tolist(), result.components["exact_match"].tolist()
    ([-0.5], [1.0])
    >>> result.total.tolist()
    [0.75]
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import math
import numbers
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from rlfb.errors import ConfigError, RewardError
from rlfb.rewards.registry import RewardFunction, build_reward, resolve

if TYPE_CHECKING:
    from rlfb.rewards.scoring import LogProbScorer

# The logs name a log_metric value after its family: rollout/reward_metric/NAME, eval/reward_metric/NAME.
LOGGED_METRIC_PREFIX = "reward_metric/"
_SPEC_KEYS = ("name", "kwargs", "weight", "label", "conversational")
_PREVIEW_CHARS = 200  # how much of an offending prompt / completion an error message shows


@dataclass
class RewardSpec:
    """One entry of a run config's ``rewards`` list.

    Attributes:
        name: A registered reward name, a ``package.module:attr`` path, or a callable.
        kwargs: Constructor arguments of a factory, or fixed keyword arguments of a reward function.
        weight: Factor of this reward in the total.
        label: The name it is logged under (``reward/LABEL``); defaults to the name (the attribute of a path).
        conversational: Pass prompts and completions as chat messages (``[{"role": ..., "content": ...}]``)
            as TRL's conversational rewards expect. ``None`` = automatic: on for rewards from ``trl.rewards``.
    """

    name: str | Callable[..., Any]
    kwargs: dict[str, Any] = field(default_factory=dict)
    weight: float = 1.0
    label: str | None = None
    conversational: bool | None = None

    @classmethod
    def coerce(cls, entry: RewardSpec | str | Callable[..., Any] | Mapping[str, Any]) -> RewardSpec:
        """Build a spec from a config entry: a spec, a name or path, a callable, or a mapping."""
        if isinstance(entry, RewardSpec):
            return entry
        if isinstance(entry, str) or callable(entry):
            return cls(name=entry)
        if isinstance(entry, Mapping):
            unknown = sorted(set(entry) - set(_SPEC_KEYS))
            if unknown:
                raise ConfigError(f"reward entry {dict(entry)}: unknown key(s) {unknown}; allowed: {list(_SPEC_KEYS)}")
            if "name" not in entry:
                raise ConfigError(f"reward entry {dict(entry)} has no 'name' (a registered reward or 'pkg.module:attr')")
            kwargs = entry.get("kwargs") or {}
            if not isinstance(kwargs, Mapping):
                raise ConfigError(f"reward {entry['name']!r}: 'kwargs' must be a mapping, got {kwargs!r}")
            try:
                weight = float(entry.get("weight", 1.0))
            except (TypeError, ValueError):
                raise ConfigError(f"reward {entry['name']!r}: 'weight' must be a number, "
                                  f"got {entry.get('weight')!r}") from None
            return cls(name=entry["name"], kwargs=dict(kwargs), weight=weight, label=entry.get("label"),
                       conversational=entry.get("conversational"))
        raise ConfigError(f"cannot use {entry!r} as a reward: give a name, a 'pkg.module:attr' path, "
                          "a callable, or a mapping with 'name'")

    def default_label(self) -> str:
        """The label used when none is given: the registered name, a path's attribute, a function's name."""
        if isinstance(self.name, str):
            return self.name.rpartition(":")[2].rpartition(".")[2] if ":" in self.name else self.name
        return getattr(self.name, "__name__", type(self.name).__name__)


@dataclass
class RewardResult:
    """Rewards of one batch of B samples.

    Attributes:
        total: (B,) float64 weighted sum of the sequence-level components (``None`` scores left out), after
            the set's optional normalization and clipping; NaN where no reward scored the sample.
        components: label -> (B,) float64 unweighted scores, NaN where the reward returned ``None``.
            A dense reward's entry is the sum of its per-token rewards (for logging).
        per_token: Weighted sum of the dense components, one (len(completion_ids[i]),) array per sample,
            or ``None`` when no reward is dense. Not included in ``total``.
        scored: (B,) bool, False where every reward returned ``None`` for the sample.
        metrics: Scalars the rewards logged through their ``log_metric`` keyword argument (a name logged
            several times in the call: the mean of its values, as TRL averages them).
        extra: Columns the rewards logged through their ``log_extra`` keyword argument.
    """

    total: np.ndarray
    components: dict[str, np.ndarray]
    per_token: list[np.ndarray] | None = None
    scored: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    metrics: dict[str, float] = field(default_factory=dict)
    extra: dict[str, list[Any]] = field(default_factory=dict)


@dataclass
class RewardLogs:
    """What the rewards logged over several calls, as :meth:`RewardSet.pop_logged` returns it.

    Attributes:
        metrics: name -> value: each ``log_metric`` name averaged over the calls that logged it, each call
            weighted by its number of completions (an environment scores a rollout in several calls, as its
            completions end; for a per-batch mean or fraction this is the whole batch's value).
        extra: One row per completion of the calls that used ``log_extra``: its ``prompt``, its ``completion``
            and the logged columns (None where a call did not log a column).
    """

    metrics: dict[str, float] = field(default_factory=dict)
    extra: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Component:
    label: str
    weight: float
    function: RewardFunction
    conversational: bool
    accepts_any_keyword: bool
    accepted_keywords: frozenset[str]


class RewardSet:
    """Several reward functions called together and combined as a weighted sum.

    Args:
        specs: Config entries (see :class:`RewardSpec`); a single entry is accepted too.
        clip: Clip the total to ``[-clip, clip]`` (after normalization). ``None`` = no clipping.
        normalize: Divide the total by a running estimate of its standard deviation after subtracting
            its running mean (statistics over every scored sample seen; checkpoint them with
            :meth:`state_dict`).
        normalize_epsilon: Added to the standard deviation.
    """

    def __init__(self, specs: Sequence[RewardSpec | str | Callable[..., Any] | Mapping[str, Any]] | RewardSpec | str
                 | Mapping[str, Any] | Callable[..., Any], *, clip: float | None = None, normalize: bool = False,
                 normalize_epsilon: float = 1e-8) -> None:
        if isinstance(specs, (str, Mapping, RewardSpec)) or callable(specs):
            specs = [specs]
        self.specs = [RewardSpec.coerce(entry) for entry in specs]
        if not self.specs:
            raise ConfigError("no rewards given; name at least one (see `rlfb rewards` for the registered ones)")
        if clip is not None and clip <= 0:
            raise ConfigError(f"reward clip must be positive, got {clip}")
        self.clip = clip
        self.normalize = normalize
        self.normalize_epsilon = normalize_epsilon
        self.update_normalization = True  # set False during evaluation to freeze the running statistics
        self._count = 0.0
        self._mean = 0.0
        self._sum_squares = 0.0  # sum of squared deviations from the mean (Chan et al. parallel variance)
        self._logged_sums: dict[str, list[float]] = {}  # log_metric name -> [sum of value x batch, batch total]
        self._logged_extra: list[dict[str, Any]] = []
        self._components = [self._build(spec) for spec in self.specs]
        labels = [component.label for component in self._components]
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise ConfigError(f"two rewards share the label(s) {duplicates}; give each a distinct 'label'")

    @classmethod
    def coerce(cls, rewards: Any) -> RewardSet:
        """Return ``rewards`` if it is a RewardSet, else build one from it."""
        return rewards if isinstance(rewards, RewardSet) else cls(rewards)

    @staticmethod
    def _build(spec: RewardSpec) -> _Component:
        function = build_reward(spec.name, spec.kwargs)
        conversational = spec.conversational
        if conversational is None:  # TRL's own rewards read chat messages; judge by what the entry named
            target = resolve(spec.name) if isinstance(spec.name, str) else spec.name
            module = getattr(target, "__module__", None) or type(target).__module__
            conversational = module.startswith("trl.rewards")
        try:
            parameters = inspect.signature(function).parameters.values()
            accepts_any = any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters)
            accepted = frozenset(parameter.name for parameter in parameters)
        except (TypeError, ValueError):
            accepts_any, accepted = True, frozenset()
        return _Component(label=spec.label or spec.default_label(), weight=spec.weight, function=function,
                          conversational=conversational, accepts_any_keyword=accepts_any, accepted_keywords=accepted)

    @property
    def names(self) -> list[str]:
        """Component labels, in order."""
        return [component.label for component in self._components]

    @property
    def weights(self) -> dict[str, float]:
        """Label -> weight."""
        return {component.label: component.weight for component in self._components}

    @property
    def needs_scorer(self) -> bool:
        """Whether a component (``likelihood``) needs a model: call :meth:`bind_scorer` before use."""
        return any(getattr(component.function, "needs_scorer", False) for component in self._components)

    def bind_scorer(self, scorer: LogProbScorer) -> None:
        """Give model-based rewards the policy's scorer (also moves ``reward_model`` to the policy's device)."""
        for component in self._components:
            bind = getattr(component.function, "bind_scorer", None)
            if bind is not None:
                bind(scorer)

    # ---- calling --------------------------------------------------------------------------------------

    def __call__(self, prompts: Sequence[str], completions: Sequence[str],
                 completion_ids: Sequence[Sequence[int]] | None = None, **columns: Any) -> RewardResult:
        """Score a batch; see :class:`RewardResult`.

        Args:
            prompts: B prompt texts.
            completions: B completion texts (decoded without special tokens).
            completion_ids: B lists of completion token ids (required by dense and token-based rewards).
            **columns: Extra task columns by name (each a list of B values), passed on to every reward.

        Raises:
            RewardError: a reward raised, or returned the wrong length, a non-number, NaN or inf.
        """
        prompts, completions = list(prompts), list(completions)
        if len(completions) != len(prompts):
            raise RewardError(f"got {len(prompts)} prompts but {len(completions)} completions")
        ids: list[list[int]] | None = None
        if completion_ids is not None:
            ids = [list(token_ids) for token_ids in completion_ids]
            if len(ids) != len(prompts):
                raise RewardError(f"got {len(prompts)} prompts but {len(ids)} completion_ids")
        logged: dict[str, list[float]] = {}
        extra: dict[str, list[Any]] = {}
        keyword_arguments = dict(columns, prompts=prompts, completions=completions,
                                 log_metric=lambda name, value: logged.setdefault(name, []).append(float(value)),
                                 log_extra=lambda name, values: extra.__setitem__(name, list(values)))
        if ids is not None:
            keyword_arguments["completion_ids"] = ids

        outputs: dict[str, Any] = {}
        pending: dict[str, Any] = {}
        for component in self._components:
            try:
                output = component.function(**self._arguments_for(component, keyword_arguments))
            except Exception as error:  # any failure of user code becomes one clear error naming the reward
                for awaitable in pending.values():  # no "coroutine was never awaited" warnings on the way out
                    getattr(awaitable, "close", lambda: None)()
                raise self._error(component.label, f"raised {type(error).__name__}: {error}", prompts, completions,
                                  0) from error
            if inspect.isawaitable(output):
                pending[component.label] = output
            else:
                outputs[component.label] = output
        outputs.update(self._await_all(pending, prompts, completions))

        components: dict[str, np.ndarray] = {}
        dense: dict[str, list[np.ndarray | None]] = {}
        for component in self._components:
            scores, per_token = self._validate(component.label, outputs[component.label], prompts, completions,
                                               ids)
            components[component.label] = scores
            if per_token is not None:
                dense[component.label] = per_token
        metrics = {name: float(np.mean(values)) for name, values in logged.items()}
        self._keep_logs(metrics, extra, prompts, completions)
        return self._combine(components, dense, ids, metrics, extra)

    def _keep_logs(self, metrics: dict[str, float], extra: dict[str, list[Any]], prompts: list[str],
                   completions: list[str]) -> None:
        """Add one call's ``log_metric`` / ``log_extra`` values to what :meth:`pop_logged` returns."""
        batch_size = len(prompts)
        for column, values in extra.items():
            if len(values) != batch_size:
                raise RewardError(f"log_extra({column!r}, values) got {len(values)} values for {batch_size} "
                                  "completions; log one value per completion")
        for name, value in metrics.items():
            sums = self._logged_sums.setdefault(name, [0.0, 0.0])
            sums[0] += value * batch_size
            sums[1] += batch_size
        if extra:
            self._logged_extra.extend(
                {"prompt": prompt, "completion": completion, **{column: values[index] for column, values in
                                                                extra.items()}}
                for index, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)))

    def pop_logged(self) -> RewardLogs:
        """What the rewards logged (``log_metric``, ``log_extra``) since the last call; see :class:`RewardLogs`.

        The trainer calls it after each rollout and each evaluation and writes the result to its logs.
        """
        metrics = {name: total / count for name, (total, count) in self._logged_sums.items() if count}
        logs = RewardLogs(metrics=metrics, extra=self._logged_extra)
        self._logged_sums, self._logged_extra = {}, []
        return logs

    @staticmethod
    def _arguments_for(component: _Component, keyword_arguments: dict[str, Any]) -> dict[str, Any]:
        arguments = keyword_arguments
        if not component.accepts_any_keyword:
            arguments = {key: value for key, value in arguments.items() if key in component.accepted_keywords}
        if component.conversational:
            arguments = dict(arguments)
            if "prompts" in arguments:
                arguments["prompts"] = [[{"role": "user", "content": text}] for text in arguments["prompts"]]
            if "completions" in arguments:
                arguments["completions"] = [[{"role": "assistant", "content": text}]
                                            for text in arguments["completions"]]
        return arguments

    def _await_all(self, pending: dict[str, Any], prompts: list[str], completions: list[str]) -> dict[str, Any]:
        """Await the async rewards concurrently (in a helper thread when an event loop already runs)."""
        if not pending:
            return {}

        async def guarded(awaitable: Any) -> Any:
            try:
                return await awaitable
            except Exception as error:  # keep which reward failed; re-raised below with its label
                return _Failure(error)

        async def gather() -> list[Any]:
            return await asyncio.gather(*(guarded(awaitable) for awaitable in pending.values()))

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            results = asyncio.run(gather())
        else:
            with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
                results = pool.submit(asyncio.run, gather()).result()
        for label, result in zip(pending, results, strict=True):
            if isinstance(result, _Failure):
                raise self._error(label, f"raised {type(result.error).__name__}: {result.error}", prompts,
                                  completions, 0) from result.error
        return dict(zip(pending, results, strict=True))

    def _validate(self, label: str, output: Any, prompts: list[str], completions: list[str],
                  completion_ids: list[list[int]] | None) -> tuple[np.ndarray, list[np.ndarray | None] | None]:
        """Check one reward's output; return its (B,) scores and, for a dense reward, its per-token arrays."""
        batch_size = len(prompts)
        if hasattr(output, "tolist") and not isinstance(output, list):  # numpy arrays, torch tensors
            output = output.tolist()
        if not isinstance(output, (list, tuple)):
            raise self._error(label, f"returned a {type(output).__name__}, expected a list of {batch_size} scores",
                              prompts, completions, 0)
        if len(output) != batch_size:
            raise self._error(label, f"returned {len(output)} scores for {batch_size} completions (one per "
                              "completion expected)", prompts, completions, 0)
        is_dense = any(_is_sequence(value) for value in output)
        scores = np.full(batch_size, np.nan)
        per_token: list[np.ndarray | None] = []
        for index, value in enumerate(output):
            if value is None:
                per_token.append(None)
                continue
            if is_dense:
                values = self._dense_values(label, value, index, prompts, completions, completion_ids)
                per_token.append(values)
                scores[index] = float(values.sum())
                continue
            if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # numpy / torch scalars
                value = value.item()
            if not isinstance(value, numbers.Real):
                raise self._error(label, f"returned {value!r} ({type(value).__name__}) for a sample; expected a "
                                  "float or None", prompts, completions, index)
            if not math.isfinite(float(value)):
                raise self._error(label, f"returned {value} for a sample", prompts, completions, index)
            scores[index] = float(value)
        if np.isnan(scores).all():
            warnings.warn(f"reward {label!r} returned None for every sample of the batch ({batch_size}); "
                          "it contributes nothing to the total", RuntimeWarning, stacklevel=3)
        return scores, (per_token if is_dense else None)

    def _dense_values(self, label: str, value: Any, index: int, prompts: list[str], completions: list[str],
                      completion_ids: list[list[int]] | None) -> np.ndarray:
        if not _is_sequence(value):
            raise self._error(label, f"mixed per-token lists with a scalar ({value!r}); a dense reward returns a "
                              "list (or None) for every sample", prompts, completions, index)
        if completion_ids is None:
            raise self._error(label, "returned per-token rewards but no completion_ids were given to align them",
                              prompts, completions, index)
        try:
            values = np.asarray(value.tolist() if hasattr(value, "tolist") else value, dtype=np.float64)
        except (TypeError, ValueError):
            raise self._error(label, f"returned a per-token list with a non-number: {value!r}", prompts,
                              completions, index) from None
        if values.shape != (len(completion_ids[index]),):
            raise self._error(label, f"returned {values.size} per-token rewards for a completion of "
                              f"{len(completion_ids[index])} tokens", prompts, completions, index)
        if not np.isfinite(values).all():
            raise self._error(label, f"returned a per-token reward of {values[~np.isfinite(values)][0]}", prompts,
                              completions, index)
        return values

    def _combine(self, components: dict[str, np.ndarray], dense: dict[str, list[np.ndarray | None]],
                 completion_ids: list[list[int]] | None, metrics: dict[str, float],
                 extra: dict[str, list[Any]]) -> RewardResult:
        weights = self.weights
        batch_size = len(next(iter(components.values())))
        sequence_labels = [label for label in components if label not in dense]
        scored = np.zeros(batch_size, dtype=bool)
        for scores in components.values():
            scored |= ~np.isnan(scores)
        total = np.zeros(batch_size)
        for label in sequence_labels:
            total += np.nan_to_num(components[label], nan=0.0) * weights[label]  # None left out, as TRL's nansum
        total[~scored] = np.nan
        if not scored.all():
            first = int(np.flatnonzero(~scored)[0])
            warnings.warn(f"every reward returned None for {int((~scored).sum())} of {batch_size} samples (first: "
                          f"sample {first}); their total is NaN and they should be left out", RuntimeWarning,
                          stacklevel=3)
        total = self._normalize_and_clip(total)
        per_token = None
        if dense:
            assert completion_ids is not None  # checked in _dense_values
            per_token = [np.zeros(len(ids)) for ids in completion_ids]
            for label, arrays in dense.items():
                for index, values in enumerate(arrays):
                    if values is not None:
                        per_token[index] += weights[label] * values
        return RewardResult(total=total, components=components, per_token=per_token, scored=scored,
                            metrics=metrics, extra=extra)

    # ---- normalization ------------------------------------------------------------------------------

    def _normalize_and_clip(self, total: np.ndarray) -> np.ndarray:
        finite = total[np.isfinite(total)]
        if self.normalize:
            if self.update_normalization and finite.size:
                # Chan et al. (1979): merge the batch's (count, mean, M2) into the running ones.
                batch_count, batch_mean = float(finite.size), float(finite.mean())
                batch_sum_squares = float(((finite - batch_mean) ** 2).sum())
                delta = batch_mean - self._mean
                count = self._count + batch_count
                self._mean += delta * batch_count / count
                self._sum_squares += batch_sum_squares + delta**2 * self._count * batch_count / count
                self._count = count
            std = math.sqrt(self._sum_squares / self._count) if self._count > 1 else 1.0
            total = (total - self._mean) / (std + self.normalize_epsilon)
        if self.clip is not None:
            total = np.clip(total, -self.clip, self.clip)
        return total

    def state_dict(self) -> dict[str, float]:
        """Running normalization statistics, for checkpoints."""
        return {"count": self._count, "mean": self._mean, "sum_squares": self._sum_squares}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self._count = float(state["count"])
        self._mean = float(state["mean"])
        self._sum_squares = float(state["sum_squares"])

    # ---- errors -------------------------------------------------------------------------------------

    @staticmethod
    def _error(label: str, problem: str, prompts: list[str], completions: list[str], index: int) -> RewardError:
        if not prompts:
            return RewardError(f"reward {label!r} {problem}")
        return RewardError(f"reward {label!r} {problem}\n  sample {index} prompt: {_preview(prompts[index])}\n"
                           f"  sample {index} completion: {_preview(completions[index])}")

    def __repr__(self) -> str:
        parts = ", ".join(f"{component.label}*{component.weight:g}" for component in self._components)
        return f"RewardSet({parts}, clip={self.clip}, normalize={self.normalize})"


@dataclass
class _Failure:
    error: Exception


def _is_sequence(value: Any) -> bool:
    if isinstance(value, (str, bytes)):
        return False
    if hasattr(value, "ndim"):  # numpy / torch scalars have ndim 0
        return bool(value.ndim >= 1)
    return isinstance(value, Sequence)


def _preview(text: str) -> str:
    return repr(text if len(text) <= _PREVIEW_CHARS else text[:_PREVIEW_CHARS] + "...")
