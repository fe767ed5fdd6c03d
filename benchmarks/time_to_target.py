"""Time to target: wall-clock seconds until the held-out mean reward first reaches a threshold.

    python benchmarks/time_to_target.py                      # rlfb grpo, rlfb ppo, TRL GRPOTrainer; 0.7 VADER
    python benchmarks/time_to_target.py --max-seconds 300 --sides rlfb-grpo trl-grpo

Every side trains the built-in model on the sentiment task with the same reward function (VADER),
batch (``--num-envs`` completions, ``--group-size`` per prompt), completion length cap, learning rate,
LoRA, KL coefficient and torch threads (see benchmarks/throughput.py, whose settings this script shares),
each in its own subprocess, taking turns. Every ``--eval-every`` updates the policy is evaluated on the
same held-out prompts with the same code and sampling seed (:func:`rlfb.evaluation.evaluate_policy`,
one completion per prompt); the clock stops when the mean VADER reaches ``--threshold``. The clock runs
from before the trainer is constructed, so both sides pay for loading the model and wrapping it with
LoRA (TRL's GRPOTrainer does it in its constructor, rlfb's Trainer at the start of ``train()``; until
session 7 the clock started after construction, which charged the loading to rlfb alone), and it
excludes the evaluations themselves. The updates to the threshold vary with the seed (110-175 for either
side over seeds 0-2), so compare over several ``--seed`` values. A side that does not reach the threshold
within ``--max-seconds`` of training time is reported as "not reached" with its best held-out reward.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import (  # noqa: E402
    add_common_arguments,
    add_driver_arguments,
    drive,
    model_path,
    rlfb_trainer,
    trl_trainer,
)

SIDES = ("rlfb-grpo", "rlfb-ppo", "trl-grpo")


class TargetClock:
    """Training time (wall clock minus evaluations) and held-out evaluations every ``every`` updates."""

    def __init__(self, args: argparse.Namespace) -> None:
        from rlfb.envs.tasks import make_task
        from rlfb.models.sampler import SamplingConfig
        from rlfb.rewards import RewardSet

        self.args = args
        self.rows = make_task("sentiment").eval_rows()[: args.eval_prompts]
        self.rewards = RewardSet(["sentiment"])
        self.sampling = SamplingConfig(temperature=1.0, max_new_tokens=args.max_new_tokens)
        self.started = 0.0
        self.eval_seconds = 0.0
        self.history: list[tuple[int, float, float]] = []  # (update, training seconds, held-out reward)
        self.reached_at: float | None = None

    def start(self) -> None:
        self.started = time.perf_counter()

    def training_seconds(self) -> float:
        return time.perf_counter() - self.started - self.eval_seconds

    def after_update(self, update: int, policy: Any) -> bool:
        """Evaluate when due; return True when training should stop (target reached or time spent)."""
        seconds = self.training_seconds()
        if update % self.args.eval_every == 0:
            from rlfb.evaluation import evaluate_policy

            evaluation_started = time.perf_counter()
            result = evaluate_policy(policy, self.rows, self.rewards, self.sampling, seed=1234, num_samples=0)
            self.eval_seconds += time.perf_counter() - evaluation_started
            reward = result.rewards["sentiment"]
            self.history.append((update, seconds, reward))
            print(f"update {update}: {seconds:.1f} s, held-out VADER {reward:.3f}", file=sys.stderr, flush=True)
            if reward >= self.args.threshold:
                self.reached_at = seconds
                return True
        return seconds >= self.args.max_seconds

    def report(self, side: str) -> dict[str, Any]:
        best = max((reward for _, _, reward in self.history), default=float("nan"))
        return {"side": side, "seconds_to_target": self.reached_at, "updates": self.history[-1][0] if self.history else 0,
                "best_reward": best, "history": self.history}


def worker(args: argparse.Namespace, side: str) -> dict[str, Any]:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    model = model_path(args, workdir)
    clock = TargetClock(args)
    with tempfile.TemporaryDirectory(dir=workdir) as output_dir:
        # The clock starts before either trainer is made: TRL's GRPOTrainer loads the model and wraps it with
        # LoRA when it is constructed, rlfb's Trainer when train() starts; both pay it on the clock.
        clock.start()
        if side.startswith("rlfb"):
            trainer: Any = None

            def callback(step: int, metrics: dict[str, float]) -> bool:
                return not clock.after_update(step, trainer.policy)

            trainer = rlfb_trainer(args, side.split("-")[1], model, Path(output_dir), updates=None,
                                   callbacks=[callback], time_limit_s=float(args.max_seconds) * 10)
        else:
            trainer = trl_trainer(args, side.split("-")[1], model, Path(output_dir), updates=100_000,
                                  callbacks=[trl_target_callback(clock, args)])
        trainer.train()
    return clock.report(side)


def trl_target_callback(clock: TargetClock, args: argparse.Namespace) -> Any:
    """Evaluate TRL's policy with rlfb's evaluation (wrapped as an rlfb Policy) and stop at the target."""
    from transformers import TrainerCallback

    from rlfb.models.loading import load_tokenizer
    from rlfb.models.policy import Policy

    tokenizer = load_tokenizer(model_path(args, Path(args.workdir)))

    class StopAtTarget(TrainerCallback):
        def on_step_end(self, trainer_args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            policy = Policy(model, tokenizer, value_head=False, device=args.device)  # wraps, does not copy
            if clock.after_update(state.global_step, policy):
                control.should_training_stop = True
            model.train()

    return StopAtTarget()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--threshold", type=float, default=0.7, help="held-out mean VADER to reach")
    parser.add_argument("--max-seconds", type=float, default=600.0, help="training time limit per side")
    parser.add_argument("--eval-every", type=int, default=5, help="updates between held-out evaluations")
    parser.add_argument("--eval-prompts", type=int, default=64, help="held-out prompts per evaluation")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument("--rounds", type=int, default=1, help="turns per side; the median time is reported")
    add_driver_arguments(parser)
    parser.set_defaults(ppo_epochs=4, ppo_minibatches=4)  # rlfb's PPO defaults: time to target as users run it
    args = parser.parse_args()
    results = drive(args, worker, list(args.sides), str(Path(__file__).resolve()), extra=[
        "--threshold", str(args.threshold), "--max-seconds", str(args.max_seconds),
        "--eval-every", str(args.eval_every), "--eval-prompts", str(args.eval_prompts)])
    if results is None:
        return
    print(f"\nthreshold: held-out mean VADER >= {args.threshold} on {args.eval_prompts} prompts; model "
          f"{args.model_size}, {args.num_envs} completions/update ({args.group_size} per prompt), <= "
          f"{args.max_new_tokens} tokens, lr {args.learning_rate}, beta {args.beta}, eval every {args.eval_every} "
          f"updates, limit {args.max_seconds:.0f} s of training per side")
    print(f"{'side':<10} {'seconds to target':>18} {'updates':>8} {'best held-out':>14}")
    medians = {}
    for side, runs in results.items():
        times = [run["seconds_to_target"] for run in runs]
        reached = all(t is not None for t in times)
        medians[side] = statistics.median(times) if reached else None
        shown = f"{medians[side]:.1f}" if reached else "not reached"
        print(f"{side:<10} {shown:>18} {statistics.median(run['updates'] for run in runs):>8.0f} "
              f"{max(run['best_reward'] for run in runs):>14.3f}")
    if medians.get("trl-grpo"):
        for side in ("rlfb-grpo", "rlfb-ppo"):
            if medians.get(side):
                print(f"{side} / trl-grpo: time to target x{medians[side] / medians['trl-grpo']:.2f}")


if __name__ == "__main__":
    main()
