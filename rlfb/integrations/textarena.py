"""TextArena's single-player games as a protocol of ``rlfb/MultiTurn-v0``.

TextArena (Guertler et al. 2025, https://github.com/LeonGuertler/TextArena) is a collection of text games
for language models, each behind ``textarena.make(env_id)`` with ``reset`` / ``get_observation`` /
``step`` / ``close``. The ``textarena`` protocol drives one game per episode through rlfb's multi-turn
environment, so every agent trains on it with no game code in rlfb: install the extra with
``pip install 'rlfb[textarena]'``.

* The game is made from the ``-raw`` form of ``env_id`` (TextArena's raw observations: a list of
  ``(sender, message, type)``), reset with a seed drawn from the environment's generator, so a seeded
  rlfb reset replays the same game.
* The opening is the game's first message (``opening: game``), or the task row's prompt when the game's
  instructions do not fit a small model's context (``opening: row``).
* A model turn is the game's action (TextArena games parse it themselves, e.g. ``[12]`` in
  GuessTheNumber); the reply is what the game said since, truncated to ``max_reply_chars``.
* When the game ends, the turn's reward is player 0's reward from ``close()`` (1 for a win in most
  games; some pay partial credit). The last step's info says whether the game itself ended
  (``game_over``): an episode cut by rlfb's caps first did not.

Example (with textarena installed):
    >>> import numpy as np
    >>> game = TextArenaGame("GuessTheNumber-v0", opening="row")
    >>> opening, state = game.start({"prompt": "Guess 1-20:"}, np.random.default_rng(0))
    >>> opening, game.respond(state, "[10]").text.startswith("The target number is")
    ('Guess 1-20:', True)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from rlfb.envs.protocol import MultiTurnProtocol, Reply, register_protocol
from rlfb.errors import ConfigError
from rlfb.integrations import import_optional

__all__ = ["OPENINGS", "TextArenaGame", "TextArenaState"]

OPENINGS = ("game", "row")
PLAYER = 0


@dataclass
class TextArenaState:
    """One game: TextArena's env object and whether the game ended."""

    game: Any
    game_over: bool = False


@register_protocol("textarena")
class TextArenaGame(MultiTurnProtocol[TextArenaState]):
    """A TextArena single-player game (GuessTheNumber-v0, Wordle-v0, ...); its reward at the end.

    Args:
        env_id: A TextArena id, e.g. ``"GuessTheNumber-v0"`` (its ``-raw`` form is used).
        opening: ``"game"``: the game's first message; ``"row"``: the task row's prompt.
        max_reply_chars: Replies longer than this are cut (a small model's context is short); None keeps all.
        env_kwargs: Options for ``textarena.make``.
    """

    default_task = "guess_number"

    def __init__(self, env_id: str, opening: str = "game", max_reply_chars: int | None = 200,
                 env_kwargs: Mapping[str, Any] | None = None) -> None:
        if opening not in OPENINGS:
            raise ConfigError(f"textarena: opening {opening!r} is not one of {OPENINGS}")
        if max_reply_chars is not None and max_reply_chars < 1:
            raise ConfigError(f"textarena: max_reply_chars must be >= 1 or None, got {max_reply_chars}")
        textarena = import_optional("textarena", "textarena", "the textarena protocol")
        self.env_id = env_id if env_id.endswith("-raw") else f"{env_id}-raw"
        from textarena.envs.registration import ENV_REGISTRY

        if self.env_id not in ENV_REGISTRY:
            raise ConfigError(f"textarena: unknown game {env_id!r}; list them with "
                              "`python -c 'import textarena; textarena.pprint_registry_detailed()'`")
        self.opening = opening
        self.max_reply_chars = max_reply_chars
        self.env_kwargs = dict(env_kwargs or {})
        self._textarena = textarena

    def start(self, row: Mapping[str, Any], rng: np.random.Generator) -> tuple[str, TextArenaState]:
        game = self._textarena.make(self.env_id, **self.env_kwargs)
        game.reset(num_players=1, seed=int(rng.integers(2**31)))
        first_messages = self._messages(game)
        return (first_messages if self.opening == "game" else row["prompt"]), TextArenaState(game)

    def respond(self, state: TextArenaState, turn: str) -> Reply:
        done, _ = state.game.step(turn)
        if done:
            state.game_over = True
            rewards, _ = state.game.close()
            reward = float(rewards[PLAYER]) if rewards else 0.0
            return Reply("", reward=reward, done=True, components={"game": reward})
        return Reply(self._messages(state.game))

    def finish(self, state: TextArenaState) -> dict[str, Any]:
        return {"game_over": state.game_over}

    def _messages(self, game: Any) -> str:
        """What the game said since the last observation (not the echo of the player's own action)."""
        _, observation = game.get_observation()
        text = "\n".join(str(message) for sender, message, *_ in observation if sender != PLAYER).strip()
        if self.max_reply_chars is not None:
            text = text[: self.max_reply_chars]
        return text
