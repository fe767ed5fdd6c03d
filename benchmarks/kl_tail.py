"""The distribution of single completions' KL under a trained policy: where held-out KL spikes come from.

    python benchmarks/kl_tail.py --seed 1 --updates 1000      # train configs/sentiment_ppo.yaml, then measure

Trains the config (``--updates`` updates, no evaluation), then samples every held-out prompt
``--copies`` times at the config's sampling settings and scores each completion's KL to the base model
(sum over its tokens of log pi - log pi_ref, as ``eval/kl`` does). Prints the mean, median, upper
percentiles and largest values with their text, the share of the KL the top 1% of completions carry, and
the spread of the mean of 39, 64 and 234 completions drawn from these (what one evaluation of that size
would read).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "sentiment_ppo.yaml"


def completion_kls(run_dir: Path, copies: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """KL of each of the held-out prompts' ``copies`` completions under the run's policy, and their texts."""
    import torch

    from rlfb.envs.tasks import make_task
    from rlfb.evaluation import encode_for_generation, load_policy
    from rlfb.models.sampler import SamplingConfig, generate

    policy, config = load_policy(run_dir, device="cpu")
    assert config is not None
    rows = list(make_task(config.task.name, **config.task.kwargs).eval_rows()) * copies
    sampling = SamplingConfig(temperature=config.sampling.temperature, max_new_tokens=config.sampling.max_new_tokens)
    generator = torch.Generator().manual_seed(seed)
    kls: list[float] = []
    texts: list[str] = []
    with torch.no_grad():
        for first in range(0, len(rows), 64):
            prompts = [row["prompt"] for row in rows[first:first + 64]]
            ids, mask = encode_for_generation(policy.tokenizer, prompts, sampling, None, "cpu")
            generation = generate(policy.model, ids, mask, sampling, eos_token_id=policy.tokenizer.eos_token_id,
                                  pad_token_id=policy.tokenizer.pad_token_id, generator=generator)
            completion_mask = generation.completion_mask
            full = torch.cat([ids, generation.completion_ids], 1)
            full_mask = torch.cat([mask, completion_mask], 1)
            logprobs = policy.forward_logprobs_values(full, full_mask, ids.shape[1], with_values=False,
                                                      with_entropy=False).logprobs
            reference = policy.reference_logprobs(full, full_mask, ids.shape[1])
            kls += ((logprobs - reference) * completion_mask).sum(1).tolist()
            for row in range(len(prompts)):
                length = int(completion_mask[row].sum())
                texts.append(policy.tokenizer.decode(generation.completion_ids[row][:length], skip_special_tokens=True))
    return np.array(kls), texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--updates", type=int, default=1000)
    parser.add_argument("--copies", type=int, default=52, help="completions per held-out prompt (39 x 52 = 2,028)")
    args = parser.parse_args()

    import torch

    from rlfb.config import load_config
    from rlfb.trainer import Trainer

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as output_dir:
        config = load_config(args.config, [f"seed={args.seed}", f"budget.updates={args.updates}",
                                           "budget.time_limit_s=null", f"output_dir={output_dir}",
                                           "logging.progress_bar=false", "eval.every=0", "checkpoint.every=0"])
        run_dir = Trainer(config).train().run_dir
        kls, texts = completion_kls(run_dir, args.copies, seed=123)
    print(f"seed {args.seed}, {args.updates} updates, {len(kls)} completions: mean KL {kls.mean():.3f}, "
          f"median {np.median(kls):.2f}, p99 {np.percentile(kls, 99):.1f}, p99.9 {np.percentile(kls, 99.9):.1f}, "
          f"max {kls.max():.1f}")
    for index in np.argsort(-kls)[:8]:
        print(f"  {kls[index]:7.1f} nats: {texts[index]!r}")
    ordered = np.sort(kls)[::-1]
    print(f"  the top 1% of completions carry {ordered[:len(kls) // 100].sum() / kls.sum():.1%} of the KL")
    rng = np.random.default_rng(0)
    for size in (39, 64, 234):
        means = np.array([kls[rng.choice(len(kls), size, replace=False)].mean() for _ in range(20_000)])
        print(f"  mean of {size} completions: sd {means.std():.2f}, max of 20,000 draws {means.max():.2f}")


if __name__ == "__main__":
    main()
