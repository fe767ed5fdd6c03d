#!/usr/bin/env bash
# Issue 17's GPU figures, on a lent GPU only (never in tests or CI), in one command of a few minutes.
#
# On a random model of Qwen2.5-0.5B's configuration (494M parameters, built from its config, nothing
# downloaded; benchmarks/throughput.py --model-size qwen2.5-0.5b):
#   1. the whole loop: rlfb's GRPO against TRL's GRPOTrainer and rlfb's PPO against TRL's RLOOTrainer, 32
#      completions of <= 20 tokens per update, identical settings, both under bf16 autocast; completions per
#      second and each side's peak GPU memory (torch.cuda.max_memory_allocated; target: PPO within 16 GB);
#   2. rollouts of 64 rows: rlfb's vector env and sampler against transformers' generate on the same prompts
#      (benchmarks/env_throughput.py; target: >= 3x generate's tokens per second).
# Record the printed figures in benchmarks/RESULTS.md with the card's name (printed first).
#
# The developers' device machine lacks some of rlfb's dependencies; carry them as wheels (its README):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl trl==1.16.0 \
#       gymnasium==1.4.0 farama-notifications vaderSentiment==3.3.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
# then run `bash benchmarks/gpu.sh` there with `.whl` carried. Written without a GPU to try it on: the CUDA
# runs are unmeasured until a session with one runs this.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-deps --no-index .whl/*.whl
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
work=$(mktemp -d)  # the 2 GB model: not under $OUT, whose files come back
python3 -c "import torch; print('device:', torch.cuda.get_device_name(0), torch.__version__)"
python3 benchmarks/throughput.py --model-size qwen2.5-0.5b --device cuda --pairs grpo ppo --updates 4 --rounds 1 \
  --workdir "$work"
python3 benchmarks/env_throughput.py --model "$work/qwen2.5-0.5b-random" --device cuda --repeats 3 --resets 20
