#!/usr/bin/env bash
# One call on a GPU machine without internet: the wheels it lacks travel in .whl, downloaded beforehand
# on a machine with the package index (the versions measured in bench/README.md):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 -d .whl \
#     liger-kernel==0.8.5 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection \
#     bitsandbytes==0.50.2 datasketch==2.0.0 phonenumbers==9.0.43 nltk==3.10.4 gguf==0.19.0 \
#     sqlalchemy==2.1.9 alembic==1.20.1 mako==1.4.3 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 \
#     opentelemetry-api==1.45.2
#   pip wheel --no-deps rouge-score==0.1.2 -w .whl        # published as a source archive only
# (about 56 MB: within the 64 MiB a call may carry). bitsandbytes is for qlora; the others are what a
# whole `run` (the registry included) and the server import beyond the machine's image.
# Runs the GPU tests (the speed paths, qlora, a whole run evaluated on the GPU, `eval` reproducing it,
# serving there, the fused LoRA forward under autocast, bfloat16 AdamW, FSDP over NCCL; 91 s on an H100 before FSDP), bench/bf16_adamw.py
# (the optimiser step against torch's fused AdamW), where the time of a 1B LoRA and full step goes
# (gpu_train.py --profile), then bench/gpu_train.py, its variants in order until BUDGET; logs and the JSON
# go to ${OUT:-.}. At most 150 + 50 + 90 + 300 s: within one 600 s call (BUDGET=... VARIANT_TIMEOUT=...
# change the last part; arguments go to the last gpu_train.py, e.g. --only NAME...).
set -u
OUT=${OUT:-.}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft, liger_kernel, importlib.metadata as m; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'liger-kernel', m.version('liger-kernel'))"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_speed.py tests/test_packing.py \
  tests/test_methods.py tests/test_pipeline.py tests/test_run_eval.py tests/test_serve.py tests/test_fused_lora.py tests/test_bf16_adamw.py \
  tests/test_fsdp.py \
  -k "gpu or cuda or speed or packing or varlen or packed or sft_run or placed" 2>&1 | tee $OUT/pytest_gpu.log | tail -8
timeout 50 python3 bench/bf16_adamw.py 2>&1 | tee $OUT/bf16_adamw.log
timeout 90 python3 bench/gpu_train.py --profile --only lora-1b-auto full-1b-auto --out $OUT/gpu_profile.json \
  > $OUT/gpu_profile.log 2>&1
python3 bench/gpu_train.py --timeout ${VARIANT_TIMEOUT:-150} --budget ${BUDGET:-300} --out $OUT/gpu_train.json "$@" 2>&1 | tee $OUT/gpu_train.log
