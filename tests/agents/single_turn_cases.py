"""Fixed-seed single-turn updates of every agent, and their numbers as recorded before multi-turn rollouts.

``tests/agents/data/single_turn_updates.json`` holds, for each case, the metrics of two consecutive updates
and a digest of the trained parameters, recorded on the code before rollouts gained an action mask and
turns (commit 0542bf1). ``test_single_turn_updates.py`` replays the cases and compares. To record again
(only on purpose, when an update is meant to change)::

    python tests/agents/single_turn_cases.py --write
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))  # conftest's helpers, also when run as a script
from conftest import VOCAB_SIZE, contains_token, sample_rollout, tiny_policy  # noqa: E402

from rlfb.agents import make_agent  # noqa: E402
from rlfb.agents.rollout import Rollout  # noqa: E402

RECORDED = Path(__file__).parent / "data" / "single_turn_updates.json"

# name -> (agent, options, group size of the rollouts). Together they reach every branch of the updates:
# PPO with several minibatches (no-grad old pass) and with one (pi_old from the first step), an entropy
# bonus, dense rewards, left-padded prompts; REINFORCE in chunks; RLOO; GRPO with the KL in the loss.
CASES: dict[str, tuple[str, dict[str, Any], int]] = {
    "ppo_minibatches": ("ppo", {"learning_rate": 1e-2, "entropy_coef": 0.01}, 1),
    "ppo_one_minibatch": ("ppo", {"learning_rate": 1e-2, "num_minibatches": 1, "epochs": 2, "kl_target": None,
                                  "gamma": 0.9, "gae_lambda": 0.8}, 1),
    "reinforce_chunks": ("reinforce", {"learning_rate": 1e-2, "minibatch_size": 4, "entropy_coef": 0.01}, 1),
    "rloo": ("rloo", {"learning_rate": 1e-2, "group_size": 4}, 4),
    "grpo": ("grpo", {"learning_rate": 1e-2, "group_size": 4}, 4),
}


def _with_padded_prompts_and_dense_rewards(rollout: Rollout, generator: torch.Generator) -> Rollout:
    """Three-token prompts, every other row left-padded by one or two, and seeded dense rewards."""
    batch = rollout.batch_size
    padding = torch.tensor([0, 1, 0, 2] * (batch // 4))
    prompt_mask = (torch.arange(3) >= padding[:, None]).long()
    prompt_ids = torch.randint(1, VOCAB_SIZE, (batch, 3), generator=generator) * prompt_mask
    prompt_ids[:, -1] = rollout.prompt_ids[:, 0]  # rows of a group still share their prompt
    dense = torch.randn(rollout.completion_ids.shape, generator=generator) * 0.1 * rollout.completion_mask
    return rollout._replace(prompt_ids=prompt_ids, prompt_mask=prompt_mask, per_token_rewards=dense)


def run_case(name: str, rows: list[int] | None = None) -> dict[str, Any]:
    """Two updates of the case's agent on rollouts it samples itself; their metrics and a parameter digest.

    ``rows``: update on these rows of each rollout only (a rank's share, in tests/agents/test_distributed_updates.py).
    """
    agent_name, options, group_size = CASES[name]
    policy = tiny_policy(seed=3, value_head=agent_name == "ppo")
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():  # leave the reference, so the KL terms are not 0 from the start
        for parameter in policy.trainable_parameters():
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
    agent = make_agent(agent_name, policy, options)
    updates = []
    for _ in range(2):
        rollout = sample_rollout(policy, contains_token(5), 8, generator, max_new_tokens=6, group_size=group_size)
        rollout = _with_padded_prompts_and_dense_rewards(rollout, generator)
        if rows is not None:
            rollout = rollout.select(torch.tensor(rows))
        updates.append(agent.update(rollout))
    digest = [float(p.detach().double().sum()) for p in policy.trainable_parameters()]
    return {"updates": updates, "parameter_sums": digest}


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(f"usage: python {sys.argv[0]} --write   (records {RECORDED.name} from the current code)")
    torch.set_num_threads(1)
    RECORDED.write_text(json.dumps({name: run_case(name) for name in CASES}, indent=1) + "\n")
    print(f"wrote {RECORDED}")
