"""On-policy distillation against supervised fine-tuning on teacher samples, at equal wall time (issue 13).

    python benchmarks/distillation.py                          # seeds 0 1, 300 s of training per method
    python benchmarks/distillation.py --seeds 0 --seconds 120 --teacher-dir runs/sentiment_teacher

The teacher is a finished rlfb run: configs/sentiment_reinforce.yaml (seed 0) trained on rlfb-tiny into
``--teacher-dir``, built there when the directory holds no run yet (deterministic: the config is seeded).
Its gold reward is its held-out VADER after training (``eval.json``, the same prompts, sampling and
evaluation seed as the students'). Each student is a fresh LoRA on rlfb-tiny (no larger than the teacher:
the same base model) trained two ways, for ``--seconds`` of training time each (evaluation excluded):

* distillation: ``rlfb train configs/sentiment_distillation.yaml`` (the student samples; per-token
  reverse KL to the teacher over the vocabulary), held-out evaluation every ``--eval-every`` updates;
* SFT: each step samples a batch of ``num_envs`` completions from the teacher (the same rollout core and
  prompts) and takes one AdamW step of the plain LM loss -mean log p_s(y_t) on them, at the same learning
  rate, LoRA and gradient clip; the teacher's sampling time counts, as the data costs it.

It prints each method's curve of held-out VADER against training seconds, the seconds at which the mean
of ``--smooth`` (3) consecutive evaluations first reached ``--fraction`` (0.9) of the teacher's gold
reward (one evaluation of 39 prompts is noisy; the first single crossing is printed too), the mean of the
second half of its evaluations (the level it settles at), and the targets: distillation reaches it within
5 minutes on every seed, and sooner than SFT. Timings depend on the machine's load: the script prints the
load average next to them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from rlfb.cpu_threads import configure_threads

configure_threads(None)  # OpenMP's sleeping wait policy, as rlfb train sets it: before torch is imported

from rlfb.config import load_config  # noqa: E402
from rlfb.logging import read_metrics  # noqa: E402
from rlfb.run_directory import read_evaluations  # noqa: E402
from rlfb.trainer import Trainer, seed_everything  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TEACHER_CONFIG = ROOT / "configs" / "sentiment_reinforce.yaml"
STUDENT_CONFIG = ROOT / "configs" / "sentiment_distillation.yaml"
TARGET_MINUTES = 5.0
QUIET = ["logging.progress_bar=false", "logging.tensorboard=false", "logging.samples_every=0"]


def build_teacher(directory: Path) -> float:
    """Train the teacher run into ``directory`` unless it holds a finished one; its held-out VADER."""
    if not (directory / "final").is_dir():
        print(f"building the teacher: {TEACHER_CONFIG.name} (seed 0) -> {directory}", flush=True)
        config = load_config(TEACHER_CONFIG, [f"output_dir={directory.parent}", f"logging.run_name={directory.name}",
                                              "seed=0", *QUIET])
        configure_threads(config.threads)
        Trainer(config).train()
    return float(read_evaluations(directory)["after"]["rewards"]["sentiment"])


Curve = list[tuple[float, int, float]]  # (training seconds, updates, held-out VADER) at each evaluation


def distillation_curve(teacher: Path, seed: int, seconds: float, eval_every: int, output: Path) -> Curve:
    """The evaluations of a distillation run, from its metrics.jsonl."""
    config = load_config(STUDENT_CONFIG, [f"agent.teacher={teacher}", f"seed={seed}", f"output_dir={output}",
                                          f"logging.run_name=distillation_seed{seed}", "budget.updates=100000",
                                          f"budget.time_limit_s={seconds}", f"eval.every={eval_every}",
                                          "checkpoint.every=0", *QUIET])
    configure_threads(config.threads)
    result = Trainer(config).train()
    rows = read_metrics(result.run_dir)
    elapsed = {row["step"]: row["time/elapsed_s"] for row in rows if "time/elapsed_s" in row}
    elapsed[0] = 0.0
    return [(elapsed[row["step"]], row["step"], row["eval/reward/sentiment"]) for row in rows
            if "eval/reward/sentiment" in row]


def sft_curve(teacher: Path, seed: int, seconds: float, eval_every: int) -> Curve:
    """The evaluations of SFT on fresh teacher samples, evaluated as the trainer does."""
    import gymnasium
    import torch

    from rlfb.agents.base import GradientStepper
    from rlfb.agents.rollout import collect_rollout, forward_rollout
    from rlfb.envs.tasks import make_task
    from rlfb.evaluation import evaluate_policy, load_policy
    from rlfb.models.policy import LoraSettings, Policy
    from rlfb.models.sampler import SamplingConfig
    from rlfb.rewards import RewardSet

    config = load_config(STUDENT_CONFIG, [f"agent.teacher={teacher}", f"seed={seed}"])
    configure_threads(config.threads)
    seed_everything(seed)  # LoRA's A matrices, as the trainer draws them
    student = Policy.from_pretrained(config.model.name, lora=LoraSettings(r=config.lora.r, alpha=config.lora.alpha),
                                     value_head=False, device="cpu")
    teacher_policy, _ = load_policy(teacher, device="cpu")
    rewards = RewardSet([reward.name for reward in config.rewards])
    task = make_task(config.task.name)
    venv = gymnasium.make_vec("rlfb/TextGeneration-v0", num_envs=config.budget.num_envs,
                              vectorization_mode="vector_entry_point", task=task, model=config.model.name,
                              tokenizer=student.tokenizer, rewards=rewards, group_size=1,
                              max_new_tokens=config.sampling.max_new_tokens,
                              max_prompt_tokens=config.sampling.max_prompt_tokens, device="cpu")
    venv.reset(seed=seed)
    generator = torch.Generator().manual_seed(seed)
    sampling = SamplingConfig(temperature=config.sampling.temperature, max_new_tokens=config.sampling.max_new_tokens)
    stepper = GradientStepper(student.trainable_parameters(), learning_rate=config.agent.params["learning_rate"])
    eval_rows = list(task.eval_rows())[: config.eval.num_prompts]

    def evaluate() -> float:
        result = evaluate_policy(student, eval_rows, rewards, sampling, seed=config.eval.seed, num_samples=0,
                                 max_prompt_tokens=venv.unwrapped.max_prompt_tokens)
        return float(result.rewards["sentiment"])

    curve: Curve = [(0.0, 0, evaluate())]
    elapsed, step = 0.0, 0
    while elapsed < seconds:
        started = time.perf_counter()
        with torch.no_grad():
            rollout = collect_rollout(venv, teacher_policy, sampling, generator)  # the teacher writes the data
        forward = forward_rollout(student, rollout, temperature=sampling.temperature, with_values=False,
                                  with_entropy=False)
        mask = rollout.action_mask.float()
        loss = -(forward.logprobs * mask).sum() / mask.sum().clamp(min=1)  # plain LM loss on the teacher's tokens
        if stepper.backward(loss):
            stepper.step()
        stepper.finish_update()
        elapsed += time.perf_counter() - started
        step += 1
        if step % eval_every == 0 or elapsed >= seconds:
            curve.append((elapsed, step, evaluate()))
    venv.close()
    return curve


def first_reaching(curve: Curve, threshold: float, smooth: int = 1) -> tuple[float, int] | None:
    """(training seconds, updates) when the mean of the last ``smooth`` evaluations first reaches
    ``threshold`` (None: never). One evaluation of 39 prompts has a standard deviation of about 0.05 VADER,
    so a single lucky evaluation (``smooth=1``) can cross a threshold the policy has not reached."""
    for index in range(smooth - 1, len(curve)):
        if statistics.mean(value for _, _, value in curve[index - smooth + 1:index + 1]) >= threshold:
            return curve[index][0], curve[index][1]
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--seconds", type=float, default=TARGET_MINUTES * 60, help="training seconds per method")
    parser.add_argument("--eval-every", type=int, default=10, help="updates between held-out evaluations")
    parser.add_argument("--fraction", type=float, default=0.9, help="share of the teacher's gold reward to reach")
    parser.add_argument("--smooth", type=int, default=3,
                        help="evaluations averaged before comparing with the target (1: the first single one)")
    parser.add_argument("--teacher-dir", type=Path, default=ROOT / "runs" / "distillation_teacher")
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "distillation_benchmark")
    parser.add_argument("--teacher-only", action="store_true",
                        help="build the teacher and stop (the distillation design of benchmarks/sentiment_agents.yaml "
                             "reads it)")
    args = parser.parse_args(argv)

    load_before = os.getloadavg()
    teacher_gold = build_teacher(args.teacher_dir.resolve())
    threshold = args.fraction * teacher_gold
    print(f"teacher {args.teacher_dir}: held-out VADER {teacher_gold:.3f}; target {args.fraction:.0%} of it = "
          f"{threshold:.3f}", flush=True)
    if args.teacher_only:
        return 0
    reached: dict[str, list[tuple[float, int] | None]] = {"distillation": [], "sft": []}
    for seed in args.seeds:
        curves = {"distillation": distillation_curve(args.teacher_dir.resolve(), seed, args.seconds, args.eval_every,
                                                     args.output.resolve()),
                  "sft": sft_curve(args.teacher_dir.resolve(), seed, args.seconds, args.eval_every)}
        for method, curve in curves.items():
            seconds = first_reaching(curve, threshold, args.smooth)
            single = first_reaching(curve, threshold)
            reached[method].append(seconds)
            points = "  ".join(f"{t:.0f}s:{v:.2f}" for t, _, v in curve)
            late = [value for t, _, value in curve if t >= args.seconds / 2]  # the level the run settles at
            per_update = curve[-1][0] / max(curve[-1][1], 1)

            def when(value: tuple[float, int] | None) -> str:
                return "never" if value is None else f"{value[0]:.1f} s, update {value[1]}"

            print(f"seed {seed} {method:>12}: mean of {args.smooth} evaluations reached {threshold:.3f} at "
                  f"{when(seconds)} (a single one at {when(single)}); mean of the second half "
                  f"{statistics.mean(late):.3f}; {per_update:.3f} s per update; curve {points}", flush=True)

    def summary(values: list[tuple[float, int] | None]) -> str:
        found = [value for value in values if value is not None]
        text = f"{len(found)}/{len(values)} seeds"
        for index, unit in ((0, "s"), (1, "updates")):
            numbers = [value[index] for value in found]
            if numbers:
                text += f", {statistics.mean(numbers):.1f} {unit} mean" + (
                    f" ± {statistics.stdev(numbers):.1f}" if len(numbers) > 1 else "")
        return text

    distilled, sft = reached["distillation"], reached["sft"]
    within = all(value is not None and value[0] <= TARGET_MINUTES * 60 for value in distilled)
    sooner = all(d is not None and (s is None or d[0] < s[0]) for d, s in zip(distilled, sft, strict=True))
    fewer = all(d is not None and (s is None or d[1] < s[1]) for d, s in zip(distilled, sft, strict=True))
    print(f"distillation reached {args.fraction:.0%} of the teacher (mean of {args.smooth} evaluations): "
          f"{summary(distilled)}; SFT: {summary(sft)}")
    print(f"target: distillation within {TARGET_MINUTES:.0f} min on every seed: {'met' if within else 'NOT met'}; "
          f"sooner than SFT on every seed: {'met' if sooner else 'NOT met'} (in updates, which the load does not "
          f"change: {'met' if fewer else 'NOT met'})")
    print(f"load average (1, 5, 15 min) before {tuple(round(x, 2) for x in load_before)}, after "
          f"{tuple(round(x, 2) for x in os.getloadavg())}; {os.cpu_count()} cores")
    return 0 if within and sooner else 1


if __name__ == "__main__":
    sys.exit(main())
