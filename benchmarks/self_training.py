"""Self-training on sums: held-out exact match, time to +15 points, and the drift of review text with lambda.

    python benchmarks/self_training.py                       # configs/arithmetic_self_training.yaml, seeds 0 1,
                                                             # lm_coef (lambda) 0.5 as shipped and 0
    python benchmarks/self_training.py --seeds 0 --lm-coefs 0.5 0.2 0
    python benchmarks/self_training.py --lm-coefs 0 --set budget.time_limit_s=270   # longer: more drift

Each run trains the config (its ``budget``), then measures:

* held-out exact match before and after (``eval/reward/exact_match``, sampled at the config's temperature on
  the task's 300 held-out sums) and the training seconds (``time/elapsed_s``) and wall seconds to the first
  evaluation at +15 points or more;
* the **fluency drop on review text**: the trained policy completes the sentiment task's held-out review
  openings, and the base model scores them (``eval/fluency``, its log-likelihood per token,
  rlfb/evaluation.py); the drop is the base model's own fluency on the same openings (same seed) minus the
  trained policy's. Arithmetic self-training never sees a review, so whatever it changes there is drift;
  the LM term on real text (lambda > 0) is meant to hold it back. 1024 completions (the held-out openings,
  repeated) keep the sampling noise of this mean near 0.01 nats;
* the **review NLL**: the trained policy's own negative log-likelihood per token of 512 review sentences drawn
  fresh from the built-in grammar (no sampling: a noise-free view of the same drift), minus the base model's.

Targets (2 CPU cores, rlfb-tiny): +15 points of exact match within 5 minutes; with lambda > 0 the mean
fluency drop is at most half the one with lambda = 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rlfb.cpu_threads import configure_threads

configure_threads(None)  # OpenMP's sleeping wait policy, as rlfb train sets it: before torch is imported

import torch  # noqa: E402

from rlfb.agents.lm_mix import RealTextBatches, language_model_loss  # noqa: E402
from rlfb.config import load_config  # noqa: E402
from rlfb.envs.tasks import make_task  # noqa: E402
from rlfb.evaluation import evaluate_policy  # noqa: E402
from rlfb.logging import read_metrics  # noqa: E402
from rlfb.models import corpus  # noqa: E402
from rlfb.models.policy import Policy  # noqa: E402
from rlfb.models.sampler import SamplingConfig  # noqa: E402
from rlfb.rewards import RewardSet  # noqa: E402
from rlfb.trainer import Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "configs/arithmetic_self_training.yaml"
GAIN_TARGET = 0.15  # exact-match points
MAX_MINUTES = 5.0
REVIEW_PROMPTS = 1024  # held-out review openings of the sentiment task, repeated, one completion each
REVIEW_SENTENCES = 512
REVIEW_SAMPLING = SamplingConfig(temperature=1.0, max_new_tokens=24)  # as configs/sentiment_*.yaml
REVIEW_SEED = 1234


def review_fluency(policy: Policy) -> float:
    """Base-model log-likelihood per token of ``policy``'s completions of held-out review openings."""
    rows = list(make_task("sentiment", num_eval=REVIEW_PROMPTS).eval_rows())
    return evaluate_policy(policy, rows, RewardSet("sentiment"), REVIEW_SAMPLING, seed=REVIEW_SEED).fluency


@torch.no_grad()
def review_nll(policy: Policy) -> float:
    """``policy``'s negative log-likelihood per token of fresh review sentences (the same ones every call)."""
    sentences = [sentence for _, sentence in corpus.labelled_reviews(REVIEW_SENTENCES, seed=REVIEW_SEED)]
    stream = RealTextBatches(sentences, policy.tokenizer, batch_size=64, seed=REVIEW_SEED, device=policy.device)
    return statistics.fmean(float(language_model_loss(policy, *stream.next_batch()))
                            for _ in range(REVIEW_SENTENCES // 64))


def run_once(config_path: Path, seed: int, lm_coef: float, output_dir: Path,
             overrides: list[str] | None = None) -> dict[str, Any]:
    """Train one seed at one lambda; return its measures."""
    config = load_config(config_path, [f"seed={seed}", f"agent.lm_coef={lm_coef}", f"output_dir={output_dir}",
                                       "logging.progress_bar=false", "logging.tensorboard=false", *(overrides or [])])
    configure_threads(config.threads)
    started = time.perf_counter()
    trainer = Trainer(config)
    result = trainer.train()
    wall_s = time.perf_counter() - started
    assert result.before is not None and result.after is not None, "the config evaluates no prompts"
    component = config.rewards[0].label or config.rewards[0].name
    before = result.before.rewards[component]
    evaluations = [row for row in read_metrics(result.run_dir) if f"eval/reward/{component}" in row]
    reached = [row for row in evaluations if row[f"eval/reward/{component}"] >= before + GAIN_TARGET]
    # The eval rows carry the update they followed; time/elapsed_s of that update is its training time.
    elapsed = {row["step"]: row["time/elapsed_s"] for row in read_metrics(result.run_dir) if "time/elapsed_s" in row}
    return {"seed": seed, "lm_coef": lm_coef, "before": before, "after": result.after.rewards[component],
            "updates": result.step, "wall_s": wall_s,
            "target_update": reached[0]["step"] if reached else None,
            "target_train_s": elapsed.get(reached[0]["step"]) if reached else None,
            "review_fluency": review_fluency(trainer.policy), "review_nll": review_nll(trainer.policy)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", default=CONFIG)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--lm-coefs", type=float, nargs="+", default=[0.5, 0.0],
                        help="lambda values; the first > 0 is compared with 0")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set budget.time_limit_s=270")
    args = parser.parse_args(argv)
    config_path = ROOT / args.config if not Path(args.config).exists() else Path(args.config)

    base = Policy.from_pretrained("rlfb-tiny", value_head=False)  # a zero adapter: the base model
    base_fluency, base_nll = review_fluency(base), review_nll(base)
    print(f"base model: fluency {base_fluency:.3f} nats/token on review openings, NLL {base_nll:.3f} on reviews")
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as output_dir:
        for lm_coef in args.lm_coefs:
            for seed in args.seeds:
                run = run_once(config_path, seed, lm_coef, Path(output_dir), args.overrides)
                run["fluency_drop"] = base_fluency - run["review_fluency"]
                run["nll_rise"] = run["review_nll"] - base_nll
                runs.append(run)
                target = (f"+{GAIN_TARGET:.2f} after {run['target_train_s']:.0f} s of training (update "
                          f"{run['target_update']})" if run["target_update"] is not None else "+0.15 not reached")
                print(f"lambda {lm_coef:g} seed {seed}: exact match {run['before']:.3f} -> {run['after']:.3f} in "
                      f"{run['updates']} updates, {run['wall_s'] / 60:.1f} min wall; {target}; review fluency "
                      f"{run['review_fluency']:.3f} (drop {run['fluency_drop']:+.3f}); review NLL {run['review_nll']:.3f} "
                      f"(rise {run['nll_rise']:+.3f})", flush=True)

    def mean_std(values: list[float]) -> str:
        return f"{statistics.fmean(values):.3f} +- {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"

    drops: dict[float, float] = {}
    ok = True
    for lm_coef in args.lm_coefs:
        group = [run for run in runs if run["lm_coef"] == lm_coef]
        drops[lm_coef] = statistics.fmean(run["fluency_drop"] for run in group)
        fast = all(run["target_train_s"] is not None and run["wall_s"] <= MAX_MINUTES * 60 for run in group)
        ok &= fast
        print(f"lambda {lm_coef:g}: exact match {mean_std([r['before'] for r in group])} -> "
              f"{mean_std([r['after'] for r in group])}; fluency drop {mean_std([r['fluency_drop'] for r in group])}; "
              f"review NLL rise {mean_std([r['nll_rise'] for r in group])}; "
              f"+15 points within {MAX_MINUTES:g} min: {'yes' if fast else 'NO'}")
    positive = [lm_coef for lm_coef in args.lm_coefs if lm_coef > 0]
    if positive and 0.0 in drops:
        halved = drops[positive[0]] <= 0.5 * drops[0.0]
        ok &= halved
        print(f"fluency drop with lambda {positive[0]:g} ({drops[positive[0]]:.3f}) <= half of lambda 0's "
              f"({drops[0.0]:.3f}): {'yes' if halved else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
