"""Text generation as Gymnasium environments; importing this module registers their ids.

* ``rlfb/TextGeneration-v0``: one token per step (:class:`~rlfb.envs.token_env.TextGenerationEnv`); its
  batched form, :class:`~rlfb.envs.vector_env.TextGenerationVectorEnv`, comes from
  ``gymnasium.make_vec(..., vectorization_mode="vector_entry_point")``: torch tensors on its device, or NumPy
  arrays through :class:`~rlfb.envs.numpy_vector_env.NumpyVectorEnv` (for NumPy code and Gymnasium's wrappers).
* ``rlfb/Completion-v0``: one whole completion per step (:class:`~rlfb.envs.completion_env.CompletionEnv`).
* ``rlfb/MultiTurn-v0``: a conversation, one whole model turn per step, answered by a
  :class:`~rlfb.envs.protocol.MultiTurnProtocol` (:class:`~rlfb.envs.multiturn_env.MultiTurnEnv`); its batched
  form :class:`~rlfb.envs.multiturn_vector_env.MultiTurnVectorEnv` via ``vectorization_mode="vector_entry_point"``.

Prompts come from tasks (:mod:`rlfb.envs.tasks`). See docs/envs.md. Entry points are strings, so this
import stays cheap: torch and transformers load when an environment is made.

Example:
    >>> import gymnasium as gym
    >>> import rlfb.envs
    >>> sorted(env_id for env_id in gym.registry if env_id.startswith("rlfb/"))
    ['rlfb/Completion-v0', 'rlfb/MultiTurn-v0', 'rlfb/TextGeneration-v0']
"""

from __future__ import annotations

from gymnasium.envs.registration import register, registry

from rlfb.envs import builtin_protocols  # noqa: F401  (registers the built-in protocols)
from rlfb.envs.numpy_vector_env import NumpyVectorEnv
from rlfb.envs.protocol import MultiTurnProtocol, Reply, list_protocols, register_protocol
from rlfb.integrations import textarena as _textarena  # noqa: F401  (registers the textarena protocol)

__all__ = ["ENV_IDS", "MultiTurnProtocol", "NumpyVectorEnv", "Reply", "list_protocols", "register_protocol"]

ENV_IDS: dict[str, dict[str, str]] = {
    "rlfb/TextGeneration-v0": {
        "entry_point": "rlfb.envs.token_env:TextGenerationEnv",
        "vector_entry_point": "rlfb.envs.vector_env:TextGenerationVectorEnv",
    },
    "rlfb/Completion-v0": {"entry_point": "rlfb.envs.completion_env:CompletionEnv"},
    "rlfb/MultiTurn-v0": {
        "entry_point": "rlfb.envs.multiturn_env:MultiTurnEnv",
        "vector_entry_point": "rlfb.envs.multiturn_vector_env:MultiTurnVectorEnv",
    },
}

for _env_id, _entry_points in ENV_IDS.items():
    if _env_id not in registry:  # importlib.reload must not re-register (Gymnasium would warn)
        register(id=_env_id, entry_point=_entry_points["entry_point"],
                 vector_entry_point=_entry_points.get("vector_entry_point"))
