"""rlfb's training loop against TRL's at identical settings: completions per second and peak memory.

    python benchmarks/throughput.py --model-size tiny --updates 6
    python benchmarks/throughput.py --model-size gpt2-small --updates 3 --rounds 1
    python benchmarks/throughput.py --model-size llama-small --pairs grpo --updates 3 --rounds 1
    python benchmarks/throughput.py --pairs grpo --device cuda

Two pairs, each run in turns (rlfb, TRL, rlfb, TRL, ... for ``--rounds``), every run in its own
subprocess so peak memory is that run's alone:

* ``grpo``: rlfb's group-baseline agent (``agent: grpo``) against TRL's ``GRPOTrainer``;
* ``ppo``: rlfb's PPO against TRL's ``RLOOTrainer``.

Identical on both sides: the model (weights on disk), the sentiment task's training prompts, completions
per prompt (``num_generations`` = ``budget.group_size``), completions per update (``num_envs`` =
``per_device_train_batch_size``, one optimizer pass per generation batch), completion length cap, sampling
temperature 1, learning rate (constant), LoRA (r, alpha, on ``c_attn``; q, k, v for the Llama), the KL coefficient (as a k3 loss
term for GRPO, as TRL does; in the reward for PPO/RLOO), the reward (VADER), the number of updates and
the number of torch threads. ``--ppo-epochs`` sets PPO's passes over each batch and TRL's
``num_iterations`` alike (default 1 for both: the same number of optimizer steps).

Measured: completions per second of the whole loop (generation, reward, update), from the end of the
first update to the end of the last (the first update is warm-up on both sides); completion tokens per
second (completions per second times the mean completion length each side logs: the policies drift
apart as they learn, and a side whose completions got shorter would look faster per completion); the same per second of
this process's CPU time (with ``--threads 1`` on a machine shared with other jobs, the wall clock measures
the neighbours too, CPU time much less so); and peak memory: the process's peak resident set
(``ru_maxrss``) on CPU, ``torch.cuda.max_memory_allocated`` on CUDA.

``--model-size gpt2-small`` builds a randomly initialized GPT-2 small (124M parameters,
``GPT2Config()``) and, since nothing is downloaded, a tokenizer of GPT-2's size: the built-in model's BPE
plus placeholder tokens up to 50,257. Completions are random text, which is fine for a speed measurement.
``--model-size llama-small`` is the same with a random Llama of that shape (12 layers of width 768, 12
heads, a gated MLP of 2,048, tied embeddings: 124M parameters), sampled by rlfb's Llama decoder.
``--model-size qwen2.5-0.5b`` is a random Qwen2 of Qwen2.5-0.5B's configuration (494M parameters, a
vocabulary of 151,936), for the GPU figures of benchmarks/gpu.sh. On CUDA both sides train under bf16
autocast over float32 weights (rlfb's ``Policy.autocast``; TRL's ``bf16=True``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

GPT2_VOCAB_SIZE = 50257
QWEN_VOCAB_SIZE = 151936  # Qwen2.5's embedding rows
PAIRS = {"grpo": ("rlfb-grpo", "trl-grpo"), "ppo": ("rlfb-ppo", "trl-rloo")}


# --------------------------------------------------------------------------------------------- settings
def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The settings both sides share (also used by benchmarks/time_to_target.py)."""
    parser.add_argument("--model-size", choices=("tiny", "gpt2-small", "llama-small", "qwen2.5-0.5b"), default="tiny",
                        help="tiny: the built-in rlfb-tiny; gpt2-small: a random 124M GPT-2 built from its config; "
                             "llama-small: a random Llama of GPT-2 small's width, depth and size; qwen2.5-0.5b: a "
                             "random Qwen2 of Qwen2.5-0.5B's configuration (494M parameters; for a GPU)")
    parser.add_argument("--model", default="rlfb-tiny",
                        help="the built-in model name or a directory (its tokenizer is used for gpt2-small too)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--num-envs", type=int, default=32, help="completions per update")
    parser.add_argument("--group-size", type=int, default=4, help="completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=20, help="completion length cap")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--beta", type=float, default=0.04, help="KL coefficient on both sides")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=16.0)
    parser.add_argument("--ppo-epochs", type=int, default=1, help="PPO epochs = TRL RLOO's num_iterations")
    parser.add_argument("--ppo-minibatches", type=int, default=1, help="PPO minibatches per epoch")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on both sides (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)


def model_path(args: argparse.Namespace, workdir: Path) -> str:
    """The model directory both sides load: the built-in model, or a random 124M model saved once."""
    from rlfb.models.loading import resolve_model_path

    base = resolve_model_path(args.model)
    if args.model_size == "tiny":
        return base
    path = workdir / f"{args.model_size}-random"
    if not (path / "config.json").is_file():
        import torch
        from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(base)
        # The real vocabulary's size (no download): the built-in BPE plus placeholder tokens, so every id the
        # random model samples is a real token on both sides, and the LM head has the real model's size.
        vocab_size = QWEN_VOCAB_SIZE if args.model_size == "qwen2.5-0.5b" else GPT2_VOCAB_SIZE
        tokenizer.add_tokens([f"<gpt2_{index}>" for index in range(vocab_size - len(tokenizer))])
        eos = tokenizer.eos_token_id
        torch.manual_seed(0)
        if args.model_size == "qwen2.5-0.5b":
            from transformers import Qwen2Config, Qwen2ForCausalLM

            # Qwen2.5-0.5B's config.json (Qwen Team 2024): 24 layers of width 896, 14 query and 2 key-value
            # heads, a gated MLP of 4,864, tied embeddings, RoPE base 1e6 (494M parameters).
            model = Qwen2ForCausalLM(Qwen2Config(
                vocab_size=len(tokenizer), hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos))
        elif args.model_size == "gpt2-small":
            model = GPT2LMHeadModel(GPT2Config(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos))  # 124M
        else:  # GPT-2 small's shape as a Llama: 12 layers of width 768, a gated MLP of 2,048 (124M, tied)
            model = LlamaForCausalLM(LlamaConfig(
                vocab_size=len(tokenizer), hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=1024,
                tie_word_embeddings=True, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos))
        model.generation_config.pad_token_id = eos
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return str(path)


def lora_targets(args: argparse.Namespace) -> list[str]:
    """The LoRA modules of both sides: rlfb's rule for the family (GPT-2: c_attn; Llama: q, k, v)."""
    return ["q_proj", "k_proj", "v_proj"] if args.model_size in ("llama-small", "qwen2.5-0.5b") else ["c_attn"]


def train_prompts() -> list[str]:
    from rlfb.envs.tasks import make_task

    return [row["prompt"] for row in make_task("sentiment").train_rows()]


def vader_reward(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
    """VADER compound score of each completion (what rlfb's ``sentiment`` reward computes)."""
    from rlfb.rewards.builtin import vader_compound

    return [vader_compound(text) for text in completions]


# --------------------------------------------------------------------------------------------- rlfb side
def rlfb_trainer(args: argparse.Namespace, agent: str, model: str, output_dir: Path, updates: int | None,
                 callbacks: list[Any], time_limit_s: float | None = None) -> Any:
    """rlfb's Trainer with the shared settings (no evaluation, no checkpoints but the final one, no TensorBoard)."""
    from rlfb.config import config_from_dict
    from rlfb.trainer import Trainer

    agent_params: dict[str, Any] = {"name": agent, "learning_rate": args.learning_rate, "kl_coef": args.beta,
                                    "kl_target": None}
    if agent == "grpo":
        agent_params["kl_penalty"] = "loss"  # k3 estimator in the loss, as TRL's GRPOTrainer
    else:
        agent_params.update(epochs=args.ppo_epochs, num_minibatches=args.ppo_minibatches)
    config = config_from_dict({
        "task": "sentiment", "model": model, "rewards": ["sentiment"], "agent": agent_params,
        "lora": {"r": args.lora_r, "alpha": args.lora_alpha, "target_modules": lora_targets(args)},
        "sampling": {"temperature": 1.0, "max_new_tokens": args.max_new_tokens},
        "budget": {"updates": updates, "time_limit_s": time_limit_s, "num_envs": args.num_envs,
                   "group_size": args.group_size if agent == "grpo" else None},
        "eval": {"num_prompts": 0}, "checkpoint": {"every": 0},
        "logging": {"tensorboard": False, "progress_bar": True, "samples_every": 0},
        "seed": args.seed, "device": args.device, "output_dir": str(output_dir)})
    return Trainer(config, callbacks=callbacks)


# --------------------------------------------------------------------------------------------- TRL side
def trl_trainer(args: argparse.Namespace, kind: str, model: str, output_dir: Path, updates: int,
                callbacks: list[Any]) -> Any:
    """TRL's GRPOTrainer or RLOOTrainer with the shared settings."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from rlfb.models.loading import load_tokenizer

    common = dict(
        output_dir=str(output_dir), per_device_train_batch_size=args.num_envs, gradient_accumulation_steps=1,
        num_generations=args.group_size, max_completion_length=args.max_new_tokens, temperature=1.0,
        learning_rate=args.learning_rate, lr_scheduler_type="constant", warmup_steps=0, max_steps=updates,
        beta=args.beta, num_iterations=args.ppo_epochs if kind == "rloo" else 1,
        # bf16 autocast over float32 weights on CUDA, as rlfb's Policy.autocast; float32 on CPU, both sides
        use_cpu=args.device == "cpu", bf16=args.device.startswith("cuda"), fp16=False, gradient_checkpointing=False,
        report_to="none",
        save_strategy="no", logging_steps=1, seed=args.seed, dataloader_num_workers=0, disable_tqdm=False)
    if kind == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        config, trainer_class = GRPOConfig(**common), GRPOTrainer
    else:
        from trl import RLOOConfig, RLOOTrainer

        config, trainer_class = RLOOConfig(**common), RLOOTrainer
    tokenizer = load_tokenizer(model)
    policy = AutoModelForCausalLM.from_pretrained(model)
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0, target_modules=lora_targets(args),
                      task_type="CAUSAL_LM")
    dataset = Dataset.from_dict({"prompt": train_prompts()})
    return trainer_class(model=policy, reward_funcs=vader_reward, args=config, train_dataset=dataset,
                         processing_class=tokenizer, peft_config=lora, callbacks=callbacks)


def trl_step_clock(tick: Any) -> Any:
    """A transformers callback calling ``tick()`` at the end of every optimizer step."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            tick()

    return StepClock()


# --------------------------------------------------------------------------------------------- one run
def worker(args: argparse.Namespace, side: str) -> dict[str, Any]:
    """Train ``side`` for ``args.updates`` updates in this process; return its measures."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    model = model_path(args, workdir)
    times: list[float] = []
    cpu_times: list[float] = []  # this process's CPU time: what a neighbour's load does not inflate
    lengths: list[float] = []  # mean completion length of each update, as each side logs it

    def tick() -> None:
        times.append(time.perf_counter())
        cpu_times.append(time.process_time())

    def rlfb_tick(step: int, metrics: dict[str, float]) -> None:
        tick()
        lengths.append(metrics["rollout/completion_length"])

    with tempfile.TemporaryDirectory(dir=workdir) as output_dir:
        if side.startswith("rlfb"):
            trainer = rlfb_trainer(args, side.split("-")[1], model, Path(output_dir), args.updates, [rlfb_tick])
        else:
            trainer = trl_trainer(args, side.split("-")[1], model, Path(output_dir), args.updates,
                                  [trl_step_clock(tick)])
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        trainer.train()
        total_s = time.perf_counter() - started
        if not side.startswith("rlfb"):
            lengths = [row["completions/mean_length"] for row in trainer.state.log_history
                       if "completions/mean_length" in row]
    if len(times) < 2:
        raise SystemExit(f"{side}: need at least 2 updates to time the loop, got {len(times)}")
    steady_s = times[-1] - times[0]
    peak_mb = (torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda")
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    cpu_s = cpu_times[-1] - cpu_times[0]
    completions_per_s = (len(times) - 1) * args.num_envs / steady_s
    mean_length = statistics.fmean(lengths[1:])  # over the timed updates (the first is warm-up)
    return {"side": side, "updates": len(times), "completions_per_s": completions_per_s,
            "completions_per_cpu_s": (len(times) - 1) * args.num_envs / cpu_s,
            "mean_completion_length": mean_length, "tokens_per_s": completions_per_s * mean_length,
            "seconds_per_update": steady_s / (len(times) - 1), "train_call_s": total_s, "peak_mb": peak_mb}


# --------------------------------------------------------------------------------------------- main
def run_turns(args: argparse.Namespace, sides: list[str], script: str,
              extra: list[str] = ()) -> dict[str, list[dict[str, Any]]]:
    """Run every side ``args.rounds`` times, taking turns, each in a fresh subprocess (``extra``: more arguments)."""
    results: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    for round_index in range(args.rounds):
        for side in sides:
            command = [sys.executable, script, "--worker", side, "--workdir", str(args.workdir),
                       *forwarded(args), *extra]
            print(f"[round {round_index + 1}/{args.rounds}] {side} ...", flush=True)
            completed = subprocess.run(command, capture_output=True, text=True, env={**os.environ,
                                       "TOKENIZERS_PARALLELISM": "false"})
            line = next((line for line in reversed(completed.stdout.splitlines()) if line.startswith("{")), None)
            if completed.returncode != 0 or line is None:
                print(completed.stdout[-3000:], completed.stderr[-6000:], sep="\n", file=sys.stderr)
                raise SystemExit(f"{side} failed (exit code {completed.returncode})")
            results[side].append(json.loads(line))
            shown = {key: value for key, value in results[side][-1].items() if key != "history"}
            print(f"    {shown}", flush=True)
    return results


def add_driver_arguments(parser: argparse.ArgumentParser) -> None:
    """The scratch directory and the hidden worker switch (also used by benchmarks/time_to_target.py)."""
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)


def drive(args: argparse.Namespace, run_side: Callable[[argparse.Namespace, str], dict[str, Any]],
          sides: list[str], script: str, extra: list[str]) -> dict[str, list[dict[str, Any]]] | None:
    """As a worker (``--worker SIDE``): run that side and print its JSON result; returns None.

    As the driver: build the model once in the scratch directory, before the timed runs, then let the
    sides take turns (:func:`run_turns`) and return their results.
    """
    if args.worker:
        print(json.dumps(run_side(args, args.worker)), flush=True)
        return None
    with tempfile.TemporaryDirectory() as scratch:
        args.workdir = Path(args.workdir or scratch)
        args.workdir.mkdir(parents=True, exist_ok=True)
        model_path(args, args.workdir)
        return run_turns(args, sides, script, extra)


def forwarded(args: argparse.Namespace) -> list[str]:
    """The shared settings as command-line arguments for a worker."""
    keys = ("model_size", "model", "device", "num_envs", "group_size", "max_new_tokens", "learning_rate", "beta",
            "lora_r", "lora_alpha", "ppo_epochs", "ppo_minibatches", "threads", "seed")
    return [item for key in keys for item in (f"--{key.replace('_', '-')}", str(getattr(args, key)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--updates", type=int, default=6, help="updates per run (the first is warm-up)")
    parser.add_argument("--rounds", type=int, default=1, help="turns per side; the median is reported")
    parser.add_argument("--pairs", nargs="+", choices=sorted(PAIRS), default=["grpo", "ppo"])
    add_driver_arguments(parser)
    args = parser.parse_args()
    sides = [side for pair in args.pairs for side in PAIRS[pair]]
    results = drive(args, worker, sides, str(Path(__file__).resolve()), extra=["--updates", str(args.updates)])
    if results is not None:
        print_report(args, results)


def print_report(args: argparse.Namespace, results: dict[str, list[dict[str, Any]]]) -> None:
    def median(side: str, key: str) -> float:
        return statistics.median(run[key] for run in results[side])

    print(f"\nmodel {args.model_size}, device {args.device}, {args.num_envs} completions/update "
          f"({args.group_size} per prompt), <= {args.max_new_tokens} tokens, {args.updates} updates, "
          f"{args.rounds} round(s), torch threads {args.threads or 'default'}; median over rounds")
    print(f"{'side':<10} {'completions/s':>14} {'per CPU-s':>10} {'mean len':>9} {'tokens/s':>9} {'s/update':>9} "
          f"{'peak MB':>9}")
    for side in results:
        print(f"{side:<10} {median(side, 'completions_per_s'):>14.2f} {median(side, 'completions_per_cpu_s'):>10.2f} "
              f"{median(side, 'mean_completion_length'):>9.2f} {median(side, 'tokens_per_s'):>9.0f} "
              f"{median(side, 'seconds_per_update'):>9.3f} {median(side, 'peak_mb'):>9.0f}")
    for pair in args.pairs:
        ours, theirs = PAIRS[pair]
        speed = median(ours, "completions_per_s") / median(theirs, "completions_per_s")
        cpu_speed = median(ours, "completions_per_cpu_s") / median(theirs, "completions_per_cpu_s")
        token_speed = median(ours, "tokens_per_s") / median(theirs, "tokens_per_s")
        memory = median(ours, "peak_mb") / median(theirs, "peak_mb")
        print(f"{ours} / {theirs}: throughput x{speed:.2f} (per CPU-second x{cpu_speed:.2f}; in completion tokens "
              f"per second x{token_speed:.2f}), peak memory x{memory:.2f}")


if __name__ == "__main__":
    main()
