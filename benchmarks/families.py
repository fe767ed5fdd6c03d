"""Time per update of the whole loop for model families of one size (issue "Any causal LM at full speed").

    python benchmarks/families.py                                   # gpt2, llama, qwen2; GRPO and PPO
    python benchmarks/families.py --families gpt2 llama qwen2 qwen3 mistral --rounds 5

Each family gets a random-weight model of rlfb-tiny's shape (hidden 128, 4 layers, 4 heads, 64 positions,
rlfb-tiny's tokenizer; the gated MLPs of the Llama family get an intermediate size of 344 so that every
model has about the same parameter count), built from its config and saved to a scratch directory. Then, in
rounds, every (family, agent) pair trains ``--updates`` updates on the sentiment task in turn (sides taking
turns, so that a noisy machine loads them alike), and the seconds per update after the first (warm-up) are
recorded; the median over rounds is reported with its ratio to GPT-2's. Completion lengths are printed
too: random models rarely sample EOS, so every family writes about ``--max-new-tokens`` tokens. Also
printed: which sampling path each family took (its lean decoder or the generic forward) and the LoRA
targets the policy chose.

Targets (issue 17, 2 CPU cores, one thread): Llama and Qwen2 within 1.1x of GPT-2's time per update for
GRPO and within 1.15x for PPO.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

FAMILY_SETTINGS: dict[str, dict[str, Any]] = {
    "gpt2": {"n_embd": 128, "n_layer": 4, "n_head": 4, "n_positions": 64},
    "llama": {"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 4, "max_position_embeddings": 64, "tie_word_embeddings": True},
    "qwen2": {"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 4, "max_position_embeddings": 64, "tie_word_embeddings": True},
    "qwen3": {"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 4, "head_dim": 32, "max_position_embeddings": 64, "tie_word_embeddings": True},
    "mistral": {"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 4, "num_attention_heads": 4,
                "num_key_value_heads": 4, "max_position_embeddings": 64, "sliding_window": None,
                "tie_word_embeddings": True},
    "gemma": {"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 4, "head_dim": 32, "max_position_embeddings": 64},
    "olmo2": {"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 4, "max_position_embeddings": 64, "tie_word_embeddings": True},
    "phi3": {"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 4, "max_position_embeddings": 64, "sliding_window": None,
             "tie_word_embeddings": True},
    "smollm3": {"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 4, "num_attention_heads": 4,
                "num_key_value_heads": 4, "max_position_embeddings": 64, "tie_word_embeddings": True},
    "gpt_neox": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
                 "max_position_embeddings": 64, "rotary_pct": 0.25, "partial_rotary_factor": 0.25},
    "opt": {"hidden_size": 128, "ffn_dim": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
            "word_embed_proj_dim": 128, "max_position_embeddings": 64},
}


def build_model(model_type: str, directory: Path) -> int:
    """A random model of ``model_type`` with rlfb-tiny's tokenizer, saved to ``directory``; its parameter count."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlfb.models.loading import load_tokenizer

    tokenizer = load_tokenizer("rlfb-tiny")
    torch.manual_seed(0)
    special = {"bos_token_id": tokenizer.eos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **special, **FAMILY_SETTINGS[model_type])
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return sum(parameter.numel() for parameter in model.parameters())


def time_updates(model_dir: Path, agent: str, args: argparse.Namespace, output_dir: Path) -> dict[str, Any]:
    """Train ``args.updates`` updates; seconds per update after the first, mean completion length, paths."""
    from rlfb.config import config_from_dict
    from rlfb.models.decoding import lean_decoder_for
    from rlfb.trainer import Trainer

    ticks: list[float] = []
    lengths: list[float] = []

    def tick(step: int, metrics: dict[str, float]) -> None:
        ticks.append(time.perf_counter())
        lengths.append(metrics["rollout/completion_length"])

    config = config_from_dict({
        "task": "sentiment", "model": str(model_dir), "rewards": ["sentiment"],
        "agent": {"name": agent, "kl_target": None},
        "sampling": {"temperature": 1.0, "max_new_tokens": args.max_new_tokens},
        "budget": {"updates": args.updates, "num_envs": args.num_envs,
                   "group_size": args.group_size if agent == "grpo" else None},
        "eval": {"num_prompts": 0}, "checkpoint": {"every": 0}, "threads": 1,
        "logging": {"tensorboard": False, "progress_bar": False, "samples_every": 0},
        "seed": 0, "device": "cpu", "output_dir": str(output_dir)})
    trainer = Trainer(config, callbacks=[tick])
    trainer.train()
    policy = trainer.policy
    policy.model.eval()
    decoder = lean_decoder_for(policy.model)
    targets = sorted(policy.model.peft_config["default"].target_modules)
    return {"seconds_per_update": (ticks[-1] - ticks[0]) / (len(ticks) - 1),
            "completion_length": statistics.fmean(lengths[1:]),
            "path": type(decoder).__name__ if decoder is not None else "generic forward", "lora_targets": targets}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=["gpt2", "llama", "qwen2"], choices=sorted(FAMILY_SETTINGS))
    parser.add_argument("--agents", nargs="+", default=["grpo", "ppo"], choices=["grpo", "ppo"])
    parser.add_argument("--rounds", type=int, default=3, help="turns per (family, agent); the median is reported")
    parser.add_argument("--updates", type=int, default=8, help="updates per turn (the first is warm-up)")
    parser.add_argument("--num-envs", type=int, default=32)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()
    if "gpt2" not in args.families:
        parser.error("--families must include gpt2 (the ratios are to GPT-2's time)")

    import torch

    torch.set_num_threads(1)
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        directories = {}
        for family in args.families:
            directories[family] = Path(scratch) / family
            count = build_model(family, directories[family])
            print(f"{family}: {count / 1e6:.2f}M parameters", flush=True)
        for round_index in range(args.rounds):
            for agent in args.agents:
                for family in args.families:
                    run = time_updates(directories[family], agent, args, Path(scratch) / "runs")
                    results.setdefault((family, agent), []).append(run)
                    print(f"round {round_index + 1} {agent} {family}: {run['seconds_per_update']:.3f} s/update",
                          flush=True)
    print(f"\n{args.rounds} rounds x {args.updates} updates, {args.num_envs} completions per update, one thread")
    print(f"{'family':<9} {'agent':<5} {'s/update':>9} {'x GPT-2':>8} {'length':>7}  sampling path, LoRA targets")
    for agent in args.agents:
        reference = statistics.median(run["seconds_per_update"] for run in results[("gpt2", agent)])
        for family in args.families:
            runs = results[(family, agent)]
            seconds = statistics.median(run["seconds_per_update"] for run in runs)
            length = statistics.fmean(run["completion_length"] for run in runs)
            print(f"{family:<9} {agent:<5} {seconds:9.3f} {seconds / reference:8.2f} {length:7.1f}  "
                  f"{runs[0]['path']}, {','.join(runs[0]['lora_targets'])}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
