"""``rlfb feedback ACTION``: people in the loop (see docs/feedback.md).

* ``serve``: the rating page and its HTTP API over a SQLite store;
* ``add-rater NAME``: create a rater and print their token;
* ``stats``, ``export``, ``import``: the store's counts, JSONL for ``rlfb reward-model train``, and back;
* ``simulate``: a simulated rater (VADER plus noise) judging through the HTTP API;
* ``synthesize``: feedback data for the built-in tasks, labelled by their gold reward.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

DEFAULT_STORE = "feedback.sqlite"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from rlfb.feedback.exchange import EXPORT_KINDS
    from rlfb.feedback.judgments import RATER_KINDS
    from rlfb.rewards.feedback import KINDS, TASKS

    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    def with_store(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument("--store", default=None, help=f"the SQLite store (default: {DEFAULT_STORE}, or the "
                                                       "feedback.dir of a run config given to serve)")
        return sub

    serve = with_store(actions.add_parser(
        "serve", help="serve the rating page", description="Serve the rating page and its HTTP API. TARGET is a "
        "run config with a feedback section (completions from the adapter its training publishes), a run "
        "directory (its newest checkpoint), or a model (default rlfb-tiny)."))
    serve.add_argument("target", nargs="?", default="rlfb-tiny", metavar="TARGET",
                       help="run config (.yaml), run directory or model name (default rlfb-tiny)")
    serve.add_argument("--task", default=None, help="task whose train prompts are shown (default: the run's, or sentiment)")
    serve.add_argument("--grammar", action="store_true",
                       help="completions from the sentiment task's built-in grammar instead of a model (demos, load tests)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--kinds", default=",".join(RATER_KINDS),
                       help=f"judgment kinds raters may give, comma-separated (default {','.join(RATER_KINDS)})")
    serve.add_argument("--scale", type=float, nargs=2, default=(1.0, 5.0), metavar=("LOW", "HIGH"),
                       help="rating scale (default 1 5)")
    serve.add_argument("--pair-fraction", type=float, default=None,
                       help="share of items with two completions to choose between (default 0.5 with choice, else 0)")
    serve.add_argument("--goal", type=int, default=0, help="judgments per rater the progress bar counts to")
    serve.add_argument("--seed", type=int, default=0, help="seed of prompts and sampling (default 0)")
    serve.add_argument("--device", default="cpu", help="device of the policy (default cpu)")
    serve.add_argument("--synchronous", choices=("NORMAL", "FULL"), default="NORMAL",
                       help="SQLite synchronous: NORMAL survives kill -9, FULL also a power cut (slower)")

    rater = with_store(actions.add_parser("add-rater", help="create a rater and print their token"))
    rater.add_argument("name", help="rater name: letters, digits, '.', '-', '_'")
    rater.add_argument("--replace", action="store_true", help="give an existing rater a new token")

    with_store(actions.add_parser("stats", help="counts of the store's judgments by kind, rater and policy"))

    export = with_store(actions.add_parser("export", help="write judgments as reward-model JSONL"))
    export.add_argument("--kind", required=True, choices=EXPORT_KINDS,
                        help="pairwise, pointwise, rating, token (reward-model formats) or sft (edited targets)")
    export.add_argument("--out", required=True, help="output JSONL file")
    export.add_argument("--max-staleness", type=int, default=None,
                        help="keep judgments of policies at most this many updates older than --current-step")
    export.add_argument("--current-step", type=int, default=None, help="the update staleness is counted from")

    imported = with_store(actions.add_parser("import", help="read a reward-model JSONL file into the store"))
    imported.add_argument("file", help="feedback JSONL (as rlfb feedback synthesize writes)")
    imported.add_argument("--kind", required=True, choices=KINDS, help="the file's kind")
    imported.add_argument("--rater", default="imported", help="rater name the rows are stored under")

    simulate = actions.add_parser("simulate", help="a simulated rater judging through the HTTP API")
    simulate.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default http://127.0.0.1:8000)")
    simulate.add_argument("--token", required=True, help="a rater token (rlfb feedback add-rater)")
    simulate.add_argument("--judgments", type=int, default=100, help="how many judgments (default 100)")
    simulate.add_argument("--noise", type=float, default=0.1, help="share of random judgments (default 0.1)")
    simulate.add_argument("--kinds", default=None, help="kinds this rater gives, comma-separated (default any)")
    simulate.add_argument("--seed", type=int, default=0, help="random seed (default 0)")

    synthesize = actions.add_parser(
        "synthesize", help="write a JSONL file of synthetic feedback",
        description="Completions come from the built-in grammar (or a model with --model); labels come from the task's gold reward "
                    "(VADER for sentiment, correctness for arithmetic) with a share of them corrupted.")
    synthesize.add_argument("--task", required=True, choices=TASKS, help="built-in task")
    synthesize.add_argument("--kind", required=True, choices=KINDS,
                            help="pairwise (prompt, chosen, rejected), pointwise (binary label), "
                                 "rating (scalar), token (labelled segments)")
    synthesize.add_argument("--size", type=int, default=2000, help="number of rows (default 2000)")
    synthesize.add_argument("--noise", type=float, default=0.1,
                            help="share of labels corrupted, in [0, 1] (default 0.1)")
    synthesize.add_argument("--split", choices=("train", "eval"), default="train",
                            help="prompts from the task's train or held-out eval split (default train)")
    synthesize.add_argument("--model", default=None,
                            help="sample the completions from this causal LM (built-in name, directory or hub id) "
                                 "instead of the built-in grammar")
    synthesize.add_argument("--max-new-tokens", type=int, default=24,
                            help="longest sampled completion with --model (default 24)")
    synthesize.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    synthesize.add_argument("--out", required=True, help="output JSONL file")


def run(args: argparse.Namespace) -> int:
    from rlfb.errors import RlfbError
    from rlfb.feedback.judgments import JudgmentError

    handlers = {"serve": _serve, "add-rater": _add_rater, "stats": _stats, "export": _export, "import": _import,
                "simulate": _simulate, "synthesize": _synthesize}
    try:
        return handlers[args.action](args)
    except JudgmentError as error:
        raise RlfbError(str(error)) from None
    except ImportError as error:
        from rlfb.feedback.server import INSTALL_HINT

        if INSTALL_HINT in str(error) or getattr(error, "name", None) in ("fastapi", "uvicorn", "httpx"):
            raise RlfbError(INSTALL_HINT) from None
        raise


def _open_store(args: argparse.Namespace, default: str = DEFAULT_STORE) -> Any:
    from rlfb.feedback.store import FeedbackStore

    return FeedbackStore(args.store or default, synchronous=getattr(args, "synchronous", "NORMAL"))


def _add_rater(args: argparse.Namespace) -> int:
    store = _open_store(args)
    token = store.add_rater(args.name, replace=args.replace)
    print(f"rater {args.name}: token {token}")
    print(f"open http://127.0.0.1:PORT/#token={token} (the token is shown once; only its hash is stored in {store.path})")
    return 0


def _stats(args: argparse.Namespace) -> int:
    print(json.dumps(_open_store(args).stats(), indent=2))
    return 0


def _export(args: argparse.Namespace) -> int:
    from rlfb.feedback.exchange import export_rows
    from rlfb.rewards.feedback import write_jsonl

    rows = export_rows(_open_store(args), args.kind, current_step=args.current_step, max_staleness=args.max_staleness)
    count = write_jsonl(rows, args.out)
    print(f"wrote {count} {args.kind} rows to {args.out}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from rlfb.feedback.exchange import import_file

    count = import_file(_open_store(args), args.file, args.kind, args.rater)
    print(f"imported {count} {args.kind} rows from {args.file} as rater {args.rater}")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    import statistics

    from rlfb.feedback.simulated import SimulatedRater

    kinds = args.kinds.split(",") if args.kinds else None
    report = SimulatedRater(args.url, args.token, noise=args.noise, seed=args.seed, kinds=kinds).run(args.judgments)
    latencies = sorted(report.post_latencies_s)
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else float("nan")
    print(f"{len(report.acknowledged)} judgments acknowledged ({report.retries} retries); POST latency median "
          f"{statistics.median(latencies) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms")
    return 0


def _synthesize(args: argparse.Namespace) -> int:
    from rlfb.errors import DatasetError
    from rlfb.rewards.feedback import synthesize, write_jsonl

    if args.size < 1:
        raise DatasetError(f"--size must be at least 1, got {args.size}")
    rows = synthesize(args.task, args.kind, size=args.size, noise=args.noise, seed=args.seed, split=args.split,
                      model=args.model, max_new_tokens=args.max_new_tokens)
    count = write_jsonl(rows, args.out)
    print(f"wrote {count} {args.kind} rows for {args.task} (noise {args.noise:g}, {args.split} prompts) to {args.out}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from rlfb.errors import ConfigError
    from rlfb.feedback.items import ItemPool
    from rlfb.feedback.server import ServerSettings, check_settings, require_web_libraries, serve

    require_web_libraries()  # before a model is loaded
    kinds = tuple(kind.strip() for kind in args.kinds.split(",") if kind.strip())
    settings = ServerSettings(kinds=kinds, scale=tuple(args.scale), goal=args.goal)  # type: ignore[arg-type]
    try:
        check_settings(settings)
    except ValueError as error:
        raise ConfigError(f"--kinds/--scale: {error}") from None
    pair_fraction = args.pair_fraction if args.pair_fraction is not None else (
        (1.0 if kinds == ("choice",) else 0.5) if "choice" in kinds else 0.0)
    if not 0.0 <= pair_fraction <= 1.0:
        raise ConfigError(f"--pair-fraction is {pair_fraction}; it must be in [0, 1]")
    source, task_name, default_store = _completion_source(args)
    from rlfb.envs.tasks import make_task

    prompts = make_task(args.task or task_name).train_prompts()
    store = _open_store(args, default_store)
    pool = ItemPool(store, source, prompts, pair_fraction=pair_fraction, seed=args.seed)
    raters = store.raters()
    print(f"rlfb feedback: serving http://{args.host}:{args.port}/ (store {store.path}, "
          f"policy {source.version[0]}, {len(raters)} rater(s){'' if raters else ': add one with rlfb feedback add-rater NAME'})",
          file=sys.stderr)
    serve(store, pool, settings, host=args.host, port=args.port)
    return 0


def _completion_source(args: argparse.Namespace) -> tuple[Any, str, str]:
    """(completion source, the target's task name, the default store path) for ``serve``'s TARGET."""
    from rlfb.feedback.items import GrammarSource

    if args.grammar:
        return GrammarSource(args.seed), "sentiment", DEFAULT_STORE
    import torch

    from rlfb.feedback.items import POLICY_DIR, PolicySource
    from rlfb.models.sampler import SamplingConfig

    torch.set_num_threads(1)  # the server shares the machine with raters' browsers and often a training run
    target = Path(args.target)
    if target.suffix in (".yaml", ".yml") and target.is_file():
        from rlfb.config import load_config
        from rlfb.errors import ConfigError
        from rlfb.models.policy import LoraSettings, Policy

        config = load_config(target)
        if config.feedback.dir is None:
            raise ConfigError(f"{target} has no feedback.dir; serve a run config with a feedback section, a run "
                              "directory or a model")
        lora = config.lora
        policy = Policy.from_pretrained(config.model.name, lora=LoraSettings(
            r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules),
            value_head=False, device=args.device)
        source = PolicySource(policy, _sampling(config.sampling), follow=Path(config.feedback.dir) / POLICY_DIR,
                              max_prompt_tokens=config.sampling.max_prompt_tokens, seed=args.seed)
        return source, config.task.name, str(Path(config.feedback.dir) / "store.sqlite")
    from rlfb.evaluation import load_policy
    from rlfb.run_directory import open_run

    run = open_run(target, "feedback serve")
    policy, config = load_policy(run[0] if run is not None else args.target, device=args.device)
    if run is not None:
        step = int(json.loads((run[0] / "trainer_state.json").read_text())["step"]) \
            if (run[0] / "trainer_state.json").is_file() else None
        source = PolicySource(policy, _sampling(run[1].sampling), version=f"{Path(args.target).name}/{run[0].name}",
                              step=step, max_prompt_tokens=run[1].sampling.max_prompt_tokens, seed=args.seed)
        return source, run[1].task.name, str(target / "feedback.sqlite")
    return PolicySource(policy, SamplingConfig(max_new_tokens=24), version=str(args.target), seed=args.seed), \
        "sentiment", DEFAULT_STORE


def _sampling(section: Any) -> Any:
    from rlfb.models.sampler import SamplingConfig

    return SamplingConfig(temperature=section.temperature, top_k=section.top_k, top_p=section.top_p,
                          max_new_tokens=section.max_new_tokens)
