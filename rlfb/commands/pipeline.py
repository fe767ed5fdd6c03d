"""``rlfb pipeline CONFIG [--status] [--set KEY=VALUE ...]``: run a multi-stage pipeline (docs/pipelines.md).

Stages whose artefacts are already in the pipeline directory with the same key are skipped, so a rerun
after a crash, a kill or a config change does only what is missing or changed.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML pipeline config, e.g. configs/pipeline_sentiment.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set stages.2.agent.learning_rate=1e-4 (repeatable)")
    parser.add_argument("--status", action="store_true",
                        help="show each stage run (done, stale, running, interrupted, failed, pending) and exit")
    parser.add_argument("--output-dir", help="the pipeline directory (default: the config's output_dir)")


def run(args: argparse.Namespace) -> int:
    from rlfb.cpu_threads import configure_threads
    from rlfb.pipeline.config import load_pipeline_config
    from rlfb.pipeline.runner import check_pipeline_directory, pipeline_status, status_table

    config = load_pipeline_config(args.config, args.overrides)
    out = Path(args.output_dir or config.output_dir)
    if args.status:
        print(status_table(pipeline_status(config, out)))
        return 0
    check_pipeline_directory(out)
    configure_threads(config.shared_run_config(out, config.seed).threads)  # before torch is imported
    from rlfb.pipeline.runner import run_pipeline

    result = run_pipeline(config, out)
    ran = [run.name for run in result.runs if run.name not in result.skipped]
    print(f"pipeline: {len(ran)} stage runs ran, {len(result.skipped)} were done already"
          + (f"; rounds: {result.stop_reason}" if result.rounds else ""))
    if result.final_metrics:
        print("pipeline: final " + ", ".join(f"{key} {value:.3f}" for key, value in result.final_metrics.items()))
    print(f"pipeline: summary in {out / 'summary.md'}")
    return 0
