"""Data-parallel training on 2 gloo ranks (spawned, one thread each) against one process on the joined batch.

The runs sample deterministically (``sampling.top_k=1``, temperature 1): each rank samples from its own
stream (rlfb.distributed.rank_seed), so only greedy sampling makes the two ranks' completions those one
process draws for the same prompts; what is compared is then everything the ranks reduce (gradients,
whitening, the KL controller's input, logged metrics).
"""

from __future__ import annotations

import copy
import json
import os
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_trainer import reproducible, tiny_config

from rlfb.agents.configs import check_world_size
from rlfb.checkpoint import find_checkpoint, read_trainer_state
from rlfb.errors import ConfigError
from rlfb.logging import read_metrics
from rlfb.trainer import Trainer, rank_prompt_indices

GREEDY = ("sampling.top_k=1", "budget.updates=5", "budget.num_envs=8", "checkpoint.every=2")
# One minibatch: with several, each rank shuffles its own rows into its minibatches (the same number of
# rows per step as one process, not the same rows), equal in distribution but not number for number.
PPO = (*GREEDY, "agent.num_minibatches=1")
GRPO = (*GREEDY, "budget.group_size=4")
# Sampled: ES's members draw from seeds of their own (common random numbers), whichever rank evaluates them.
# An adaptive KL penalty: the members' fitness and the controller's measured KL both cross ranks.
ES = ("agent.population_size=4", "budget.updates=3", "budget.num_envs=4", "checkpoint.every=2",
      "agent.kl_coef=0.1", "agent.kl_target=1.0")
# Two ranks average their gradients, whiten and reduce in another summation order and pad their
# (smaller) batches differently than one process: float32 rounding, a few ulps per step, compounding
# over 5 AdamW updates. Far below any difference a wrong reduction makes (>= 1e-2 relative).
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def worker(rank: int, world_size: int, port: int, model_dir: str, output_dir: str, agent: str,
           overrides: tuple[str, ...], plan: str, out_dir: str) -> None:
    """Train as ``plan`` says on this rank; write what train() returned to ``out_dir/rank{rank}.json``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    config = tiny_config(Path(model_dir), Path(output_dir), *overrides, agent=agent)
    results: list[dict[str, Any]] = []
    if plan == "straight":
        runs = [Trainer(config)]
    elif plan == "rank1_callback_stops_at_2":
        runs = [Trainer(config, callbacks=[lambda step, metrics: False if rank == 1 and step == 2 else None])]
    elif plan == "straight_then_rank0_ctrl_c_at_2_then_resume":
        straight = tiny_config(Path(model_dir), Path(output_dir) / "straight", *overrides, agent=agent)
        trainer = Trainer(config)

        def ctrl_c_on_rank0(step: int, metrics: dict) -> None:
            if rank == 0 and step == 2:
                trainer._stop_requested = True  # what the SIGINT handler sets

        trainer.callbacks.append(ctrl_c_on_rank0)
        runs = [Trainer(straight), trainer]
    else:
        raise ValueError(plan)
    for trainer in runs:
        result = trainer.train()
        results.append({"run_dir": str(result.run_dir), "step": result.step, "interrupted": result.interrupted})
    if plan == "straight_then_rank0_ctrl_c_at_2_then_resume":
        result = Trainer(config, resume_from=results[1]["run_dir"]).train()
        results.append({"run_dir": str(result.run_dir), "step": result.step, "interrupted": result.interrupted})
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def two_ranks(tmp_path: Path, model_dir: Path, agent: str, overrides: tuple[str, ...],
              plan: str = "straight") -> list[list[dict[str, Any]]]:
    """Run ``plan`` on 2 spawned gloo ranks; each rank's list of train() results."""
    out_dir = tmp_path / "results"
    out_dir.mkdir()
    mp.spawn(worker, args=(2, free_port(), str(model_dir), str(tmp_path / "runs"), agent, overrides, plan,
                           str(out_dir)), nprocs=2, join=True)
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.fixture(scope="module")
def ppo_two_ranks(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    """One 2-rank PPO run, shared by the tests that read it."""
    tmp_path = tmp_path_factory.mktemp("ppo-two-ranks")
    return tmp_path, two_ranks(tmp_path, tiny_model_dir, "ppo", PPO)


def assert_same_metrics(rows: list[dict], expected: list[dict]) -> None:
    rows, expected = reproducible(rows), reproducible(expected)
    assert [row["step"] for row in rows] == [row["step"] for row in expected]
    for row, reference in zip(rows, expected, strict=True):
        assert row.keys() == reference.keys()
        for key, value in reference.items():
            np.testing.assert_allclose(row[key], value, **TOLERANCE, err_msg=f"step {row['step']} {key}")


def test_two_ranks_train_ppo_like_one_process_on_the_joined_batch(
        ppo_two_ranks: tuple[Path, list], tiny_model_dir: Path, tmp_path: Path) -> None:
    _, results = ppo_two_ranks
    one = Trainer(tiny_config(tiny_model_dir, tmp_path, *PPO, agent="ppo")).train()
    run_dir = Path(results[0][0]["run_dir"])
    assert_same_metrics(read_metrics(run_dir), read_metrics(one.run_dir))


def test_two_ranks_train_grpo_like_one_process_on_the_joined_batch(tiny_model_dir: Path, tmp_path: Path) -> None:
    results = two_ranks(tmp_path, tiny_model_dir, "grpo", GRPO)
    one = Trainer(tiny_config(tiny_model_dir, tmp_path / "one", *GRPO, agent="grpo")).train()
    assert_same_metrics(read_metrics(Path(results[0][0]["run_dir"])), read_metrics(one.run_dir))


def test_two_ranks_split_an_es_population_and_take_one_process_s_steps(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Each rank evaluates 2 of the 4 members on full batches: the same rollouts, number for number, as one
    # process evaluating all 4 (common random numbers: a member's draws depend on its index alone).
    results = two_ranks(tmp_path, tiny_model_dir, "es", ES)
    one = Trainer(tiny_config(tiny_model_dir, tmp_path / "one", *ES, agent="es")).train()
    rows, expected = read_metrics(Path(results[0][0]["run_dir"])), read_metrics(one.run_dir)
    assert reproducible(rows) == reproducible(expected)  # exact: only the fitness values travel
    assert [row["train/population_size"] for row in rows if "train/population_size" in row] == [4.0] * 3


def test_rank_0_alone_writes_one_run_directory(ppo_two_ranks: tuple[Path, list]) -> None:
    tmp_path, results = ppo_two_ranks
    run_dirs = [path for path in (tmp_path / "runs").iterdir() if path.is_dir()]
    assert len(run_dirs) == 1
    assert results[0][0]["run_dir"] == results[1][0]["run_dir"] == str(run_dirs[0])
    training_steps = [row["step"] for row in read_metrics(run_dirs[0]) if "rollout/reward_mean" in row]
    assert training_steps == [1, 2, 3, 4, 5]  # each update logged once
    assert (run_dirs[0] / "final").is_dir() and read_trainer_state(find_checkpoint(run_dirs[0]))["step"] == 5


def test_a_callback_stopping_one_rank_stops_both_after_the_same_update(tiny_model_dir: Path, tmp_path: Path) -> None:
    results = two_ranks(tmp_path, tiny_model_dir, "ppo", PPO, plan="rank1_callback_stops_at_2")
    assert [rank_results[0]["step"] for rank_results in results] == [2, 2]


def test_ctrl_c_on_one_rank_saves_and_a_two_rank_resume_continues_like_an_uninterrupted_run(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    # Sampled (not greedy): the ranks' own sampling streams must come back from the checkpoint.
    overrides = ("budget.updates=4", "budget.num_envs=8", "agent.num_minibatches=1", "checkpoint.every=0")
    results = two_ranks(tmp_path, tiny_model_dir, "ppo", overrides, plan="straight_then_rank0_ctrl_c_at_2_then_resume")
    for straight, interrupted, resumed in results:
        assert straight["step"] == 4 and interrupted["interrupted"] and interrupted["step"] == 2
        assert resumed["step"] == 4 and resumed["run_dir"] == interrupted["run_dir"]
    run_dir = Path(results[0][2]["run_dir"])
    assert reproducible(read_metrics(run_dir)) == reproducible(read_metrics(Path(results[0][0]["run_dir"])))
    # One process cannot continue what two ranks saved (each rank's streams are in the checkpoint).
    config = tiny_config(tiny_model_dir, tmp_path / "runs", *overrides, agent="ppo")
    with pytest.raises(ConfigError, match=r"saved by 2 rank\(s\) and this run has 1; resume with the same number"):
        Trainer(config, resume_from=run_dir).train()


def test_one_rank_draws_the_prompts_the_env_draws(tiny_model_dir: Path, tmp_path: Path) -> None:
    """rank_prompt_indices with one rank is the env's own draw: the prompts 2 ranks share out are one
    process's."""
    import gymnasium

    trainer = Trainer(tiny_config(tiny_model_dir, tmp_path, "budget.num_envs=8", "budget.group_size=2",
                                  agent="grpo"))
    trainer._build()
    rng = gymnasium.utils.seeding.np_random(trainer.config.seed)[0]
    rank_prompt_indices(rng, len(trainer.task.train), 4, 0, 1)  # the seeding reset's draw
    try:
        for _ in range(3):
            _, info = trainer.venv.reset()
            # Each rank has its own copy of the generator; rank 0 and rank 1 of 2 split one process's draw.
            drawn = [rank_prompt_indices(copy.deepcopy(rng), len(trainer.task.train), 4, rank, 2) for rank in range(2)]
            whole = rank_prompt_indices(rng, len(trainer.task.train), 4, 0, 1)
            assert np.concatenate(drawn).tolist() == whole.tolist()
            assert whole.repeat(2).tolist() == info["prompt_index"].tolist()  # 4 groups of 2 rows
    finally:
        trainer._close_envs()


@pytest.mark.parametrize(("overrides", "agent", "message"), [
    (("agent.population_size=6",), "es", "'agent.population_size' is 6; with WORLD_SIZE=4 ranks it must be a "
                                         "multiple of 4"),
    (("agent.population_size=4", "agent.common_random_numbers=false"), "es",
     "agent es on several ranks (WORLD_SIZE=4) needs common_random_numbers: true"),
    ((), "self_training", "agent self_training does not support several ranks yet"),
    (("reward_scale.normalize=true",), "ppo", "reward_scale.normalize does not support several ranks yet"),
    (("budget.num_envs=6",), "ppo", "'budget.num_envs' is 6, the global batch; with WORLD_SIZE=4 ranks and group "
                                    "size 1 it must be a multiple of 4"),
    (("budget.num_envs=8",), "grpo", "with WORLD_SIZE=4 ranks and group size 4 it must be a multiple of 16"),
])
def test_what_cannot_run_on_several_ranks_is_a_one_line_error(
        tiny_model_dir: Path, tmp_path: Path, overrides: tuple[str, ...], agent: str, message: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    config = tiny_config(tiny_model_dir, tmp_path, *overrides, agent=agent)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        check_world_size(config, 4)
    assert "\n" not in str(error.value)
    check_world_size(config, 1)  # one process: nothing refused
    monkeypatch.setenv("WORLD_SIZE", "4")  # the trainer refuses before joining a process group
    with pytest.raises(ConfigError, match="several ranks|multiple of"):
        Trainer(config)
