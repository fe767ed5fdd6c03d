"""Each agent's update on 2 gloo ranks, each holding half the rollout, against one process on all of it.

The rows of the hand-sampled rollouts (tests/agents/single_turn_cases.py) end at different lengths (EOS
is one of 16 tokens), so the ranks hold different numbers of model tokens: a token mean that ignored
the other rank's count, a whitening over one rank's tokens or a KL controller fed one rank's KL would
show here. PPO with several minibatches is left out: each rank shuffles its own rows into minibatches,
so its steps are not one process's, only equal in distribution.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from single_turn_cases import run_case

from rlfb import distributed

# Each rank's rows of run_case's rollouts of 8. Rows 1 and 5 of the first PPO rollout end early (4 model
# tokens, the others 6): on rank 0 with the first split, so the ranks hold 20 and 24 tokens. The group
# baselines keep their groups of 4 (rows 0-3, 4-7) on one rank.
SPLITS = {"ppo_one_minibatch": ([1, 5, 0, 2], [3, 4, 6, 7]), "reinforce_chunks": ([0, 1, 2, 3], [4, 5, 6, 7]),
          "rloo": ([0, 1, 2, 3], [4, 5, 6, 7]), "grpo": ([0, 1, 2, 3], [4, 5, 6, 7])}
EXACT_CASES = tuple(SPLITS)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    distributed.init_from_environment("cpu", timeout_s=30)
    results = {name: run_case(name, rows=SPLITS[name][rank]) for name in EXACT_CASES}
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_updates(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("updates")
    mp.spawn(worker, args=(free_port(), str(out_dir)), nprocs=2, join=True)
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.parametrize("name", EXACT_CASES)
def test_two_ranks_update_like_one_process_on_the_joined_rollout(two_rank_updates: list[dict], name: str) -> None:
    torch.set_num_threads(1)
    expected = run_case(name)
    for rank_results in two_rank_updates:
        result = rank_results[name]
        for update, reference in zip(result["updates"], expected["updates"], strict=True):
            assert update.keys() == reference.keys()
            for key, value in reference.items():
                # float32 sums in another order (two halves, then the all-reduce): a few ulps per term, ~1e-6
                # relative after two updates. A clip fraction counts tokens past a threshold: one of ~100
                # tokens sitting on the clip boundary may flip (1e-2).
                tolerance = {"atol": 0.02} if key.endswith("clip_fraction") else {"rtol": 1e-4, "atol": 1e-6}
                np.testing.assert_allclose(update[key], value, **tolerance, err_msg=f"{name} {key}")
        np.testing.assert_allclose(result["parameter_sums"], expected["parameter_sums"], rtol=1e-5, atol=1e-6)
