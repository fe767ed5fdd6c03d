"""Forward and backward over a pass of rows that share prompts: each prompt encoded once, or every row whole.

    python benchmarks/shared_prompts.py                       # rlfb-tiny, one thread, 16 rows
    python benchmarks/shared_prompts.py --prompt-widths 6 40 --group-sizes 4 8 --repeats 30

A GRPO batch holds k completions per prompt. ``Policy.forward_logprobs_values`` can encode each distinct
prompt once and run the completions on its repeated keys and values (``share_prompts``, see
docs/algorithms.md); by default it does so when the prompt tokens saved times the model's parameters
reach ``MIN_SHARED_PROMPT_WORK``. This script times one training pass (forward with the log-probs' gradient, then backward) of
``--rows`` rows with random prompt and completion tokens, both ways, taking turns, and prints the median
milliseconds of each and their ratio, with the share of columns saved and whether the default rule shares.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from typing import Any


def training_pass(policy: Any, input_ids: Any, attention_mask: Any, prompt_width: int, share: bool) -> None:
    """Log-probs of the completion columns with their gradient, then backward."""
    forward = policy.forward_logprobs_values(input_ids, attention_mask, prompt_width, with_values=False,
                                             with_entropy=False, share_prompts=share)
    forward.logprobs.sum().backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="rlfb-tiny")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--prompt-widths", type=int, nargs="+", default=[6, 20, 40])
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--completion-width", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=20, help="timed passes per way and round")
    parser.add_argument("--rounds", type=int, default=3, help="turns per way; the median is reported")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    from rlfb.models.policy import MIN_SHARED_PROMPT_WORK, Policy, _shared_prompts

    torch.set_num_threads(args.threads)
    policy = Policy.from_pretrained(args.model, value_head=False, device="cpu")
    vocab = policy.model.get_input_embeddings().num_embeddings
    print(f"{args.model}, {args.rows} rows, completions of {args.completion_width} columns, "
          f"{args.threads} thread(s); shared by default when prompt tokens saved x parameters >= "
          f"{MIN_SHARED_PROMPT_WORK:.0e}")
    print(f"{'prompt cols':>11} {'per prompt':>10} {'saved':>6} {'default':>8} {'whole ms':>9} {'shared ms':>10} "
          f"{'speed-up':>9}")
    generator = torch.Generator().manual_seed(args.seed)
    for width in args.prompt_widths:
        for group in args.group_sizes:
            prompts = torch.randint(0, vocab, (-(-args.rows // group), width), generator=generator)
            completions = torch.randint(0, vocab, (args.rows, args.completion_width), generator=generator)
            input_ids = torch.cat([prompts.repeat_interleave(group, 0)[: args.rows], completions], 1)
            attention_mask = torch.ones_like(input_ids)
            one_pass = functools.partial(training_pass, policy, input_ids, attention_mask, width)
            times: dict[bool, list[float]] = {False: [], True: []}
            for share in (False, True):
                one_pass(share)  # warm-up
            for _ in range(args.rounds):
                for share in (False, True):
                    started = time.perf_counter()
                    for _ in range(args.repeats):
                        one_pass(share)
                    times[share].append((time.perf_counter() - started) / args.repeats * 1000)
            whole, shared = statistics.median(times[False]), statistics.median(times[True])
            rows, columns = input_ids.shape
            saved = (rows - len(prompts)) * width / (rows * columns)
            default = _shared_prompts(input_ids, attention_mask, width, policy._parameter_count) is not None
            print(f"{width:>11} {group:>10} {saved:>6.0%} {'shared' if default else 'whole':>8} {whole:>9.1f} "
                  f"{shared:>10.1f} {whole / shared:>8.2f}x")


if __name__ == "__main__":
    main()
