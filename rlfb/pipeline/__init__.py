"""Multi-stage pipelines: base -> sft -> reward model -> rl -> feedback -> eval, as hash-keyed artefacts.

``rlfb pipeline CONFIG`` runs :func:`run_pipeline`; ``--status`` prints :func:`pipeline_status`. See
docs/pipelines.md, :mod:`rlfb.pipeline.config` for the schema and :mod:`rlfb.pipeline.plan` for what
each stage reads and how its key is made.
"""

from rlfb.pipeline.config import PipelineConfig, load_pipeline_config, pipeline_config_from_dict
from rlfb.pipeline.plan import StageRun, plan
from rlfb.pipeline.runner import PipelineResult, StageStatus, pipeline_status, run_pipeline, status_table

__all__ = ["PipelineConfig", "PipelineResult", "StageRun", "StageStatus", "load_pipeline_config", "pipeline_status",
           "pipeline_config_from_dict", "plan", "run_pipeline", "status_table"]
