"""``NumpyVectorEnv``: the batched ``rlfb/TextGeneration-v0`` with NumPy outputs, for NumPy code and Gymnasium's wrappers.

:class:`~rlfb.envs.vector_env.TextGenerationVectorEnv` returns torch tensors on its device, which is what
rlfb's agents and sampler want. This wrapper turns every output into NumPy (observations ``int64``, rewards
``float32``, ``terminated`` / ``truncated`` ``bool``) and every ``info`` value into a plain NumPy array: texts
as ``str`` arrays (``""`` where the row's mask is False) and per-token rewards as a ``(num_envs,
max_new_tokens)`` ``float64`` array, zero after each episode's last token. No object arrays remain, so code
that saves, compares or sums info needs nothing rlfb-specific, and Gymnasium's NumPy vector wrappers
(``RecordEpisodeStatistics``, ``NormalizeReward``, ...) apply on top. Actions may be NumPy arrays (as
``action_space.sample()`` gives), lists or tensors.

Gymnasium's ``ArrayConversion`` (and ``NumpyToTorch`` / ``JaxToNumpy``, built on it) cannot take the place of
this wrapper: it moves arrays through DLPack, which has no string type, so the text in ``info`` stops it.

Example:
    >>> import gymnasium as gym, numpy as np, rlfb
    >>> from gymnasium.wrappers.vector import RecordEpisodeStatistics
    >>> venv = RecordEpisodeStatistics(rlfb.envs.NumpyVectorEnv(gym.make_vec(
    ...     "rlfb/TextGeneration-v0", num_envs=4, vectorization_mode="vector_entry_point", task="arithmetic",
    ...     model="rlfb-tiny", rewards=["exact_match"], max_new_tokens=4, device="cpu")))  # doctest: +SKIP
    >>> obs, info = venv.reset(seed=0)  # doctest: +SKIP
    >>> done = np.zeros(venv.num_envs, dtype=bool)  # doctest: +SKIP
    >>> while not done.all():  # doctest: +SKIP
    ...     obs, rewards, terminated, truncated, info = venv.step(venv.action_space.sample())
    ...     done |= terminated | truncated
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from gymnasium.vector import VectorEnv, VectorWrapper

if TYPE_CHECKING:
    import torch

__all__ = ["NumpyVectorEnv"]

TEXT_INFO_KEYS = ("prompt", "completion")
"""Info keys whose values are texts (object arrays of ``str`` / ``None`` in the torch env)."""


class NumpyVectorEnv(VectorWrapper):
    """Wraps a :class:`~rlfb.envs.vector_env.TextGenerationVectorEnv` so that it speaks NumPy only.

    Spaces, autoreset mode (``DISABLED``), reset options and the meaning of every output are those of the
    wrapped environment; only the array types change (see the module docstring).

    Args:
        env: The vector environment of ``gymnasium.make_vec("rlfb/TextGeneration-v0", ...,
            vectorization_mode="vector_entry_point")``, possibly already wrapped.

    Raises:
        TypeError: ``env`` is not (a wrapper of) a TextGenerationVectorEnv.
    """

    def __init__(self, env: VectorEnv) -> None:
        from rlfb.envs.vector_env import TextGenerationVectorEnv

        text_env = getattr(env, "unwrapped", None)
        if not isinstance(text_env, TextGenerationVectorEnv):
            raise TypeError("NumpyVectorEnv wraps the vector env of gym.make_vec('rlfb/TextGeneration-v0', ..., "
                            f"vectorization_mode='vector_entry_point'), got {type(env).__name__}")
        super().__init__(env)
        self._max_new_tokens = text_env.max_new_tokens

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Reset as the wrapped environment does; the observation and info come back as NumPy arrays."""
        observation, info = self.env.reset(seed=seed, options=options)
        return _numpy_observation(observation), self._numpy_info(info)

    def step(self, actions: Any) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray,
                                          dict[str, Any]]:
        """Step the wrapped environment with ``actions`` ((N,) token ids: an array, list or tensor).

        Returns:
            observation (dict of (N, L) int64 arrays), rewards (N,) float32, terminated (N,) bool,
            truncated (N,) bool and info, all NumPy.
        """
        observation, rewards, terminated, truncated, info = self.env.step(actions)
        return (_numpy_observation(observation), _to_numpy(rewards), _to_numpy(terminated), _to_numpy(truncated),
                self._numpy_info(info))

    def _numpy_info(self, info: dict[str, Any]) -> dict[str, Any]:
        converted = dict(info)
        for key in TEXT_INFO_KEYS:
            if key in info:
                converted[key] = np.array(["" if text is None else text for text in info[key]], dtype=np.str_)
        if "token_rewards" in info:
            converted["token_rewards"] = self._padded_token_rewards(info["token_rewards"])
        return converted

    def _padded_token_rewards(self, column: np.ndarray) -> np.ndarray:
        padded = np.zeros((len(column), self._max_new_tokens), dtype=np.float64)  # (N, max_new_tokens)
        for row, values in enumerate(column):
            if values is not None:
                padded[row, :len(values)] = values
        return padded


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    # The environment hands out fresh tensors on every call, so a view of the CPU copy is safe to keep.
    return tensor.cpu().numpy()


def _numpy_observation(observation: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {key: _to_numpy(value) for key, value in observation.items()}
