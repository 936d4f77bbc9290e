#!/usr/bin/env bash
# The GPU benchmarks and the one-node GPU cluster check, on a Linux machine with an NVIDIA GPU,
# from this repository's root, with the wheels wheels.sh downloaded (no network needed here):
#     benchmarks/gpu/run.sh WHEELS_DIR [WORK_DIR] [--with-8b]
# Installs the wheels into WORK_DIR/site (the machine's own packages stay as they are), writes
# the models (prepare_models.py), checks a one-node cluster on the GPU (cluster_check.py), then
# runs each benchmark under gpu_load.py, which prints the GPU's load beside its figures:
#   1. time to first token at 4,000 tokens, cold and warm, over mlx_lm.server (prefill_ttft.py);
#   2. aggregate tokens/s at 1, 8, 32 and 64 streams over mlx_lm.server with each server's
#      defaults (concurrent_streams.py --defaults);
#   3. single stream: ours over mlx-lm in process (decode_throughput.py), 1,024 tokens a run
#      (runs of 256 tokens took under a second on an H100, and their rounds' ratios scattered
#      from 0.52 to 1.22), with --with-8b on Llama 3.1 8B's shape in bfloat16 too;
#   4. 2 again with both servers batching 64;
#   5. where a decode step's time goes: the engine's step against the bare forward pass at 1 to 64
#      sequences (decode_step_profile.py), with the quantized layers as mlx-lm loads them (each
#      sequence's row multiplied apart: the "before"), as the dispatcher makes them (a batch's
#      rows as one matrix), and dequantizing where measured faster, keeping copies dequantized
#      once where memory is spare (its default on CUDA in a cluster), and that again with each
#      block's MLP building its graph in Python every step (--plain-mlps), and with each of a
#      block's projections a product of its own (--separate-projections), and with a lone
#      sequence's step built by the model's call rather than compiled (--plain-step); MLX's quantized kernel
#      against a dequantized weight by row count (quantized_matmul.py); the step at 64 sequences
#      kernel by kernel, on the kernel and through the copies (gpu/step_kernels.py, Nsight
#      Compute); the serving process's interpreter lock at 64 streams (serving_profile.py, py-spy);
#   6. 1 and 2 again with ours on MLX's quantized kernel only (--dequantize-rows 0), the "before";
#   7. a two-rank group of a CUDA rank and a rank of MLX's CPU build (gpu/mixed_group.py).
set -euo pipefail
with_8b=
positional=()
for arg in "$@"; do
	if [ "$arg" = --with-8b ]; then with_8b=1; else positional+=("$arg"); fi
done
wheels=${positional[0]:?usage: run.sh WHEELS_DIR [WORK_DIR] [--with-8b]}
work=${positional[1]:-/tmp/genmlx-gpu}
python3 -m pip install --quiet --no-index --no-deps --no-compile --upgrade --target "$work/site" \
	$(ls "$wheels"/*.whl | grep -v /mlx_cpu-)
python3 -m pip install --quiet --no-index --no-deps --no-compile --upgrade --target "$work/cpu" \
	"$wheels"/mlx-[0-9]*.whl "$wheels"/mlx_cpu-*.whl
export PYTHONPATH="$PWD:$work/site" PATH="$work/site/bin:$PATH" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -c 'import mlx.core as mx; assert mx.cuda.is_available(), "MLX sees no CUDA GPU"; print("MLX", mx.__version__, "on", mx.default_device())'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

python3 benchmarks/gpu/prepare_models.py --out "$work/models" ${with_8b:+--with-8b}
small="$work/models/llama-1b-4bit"
echo "== one-node cluster on the GPU"
python3 benchmarks/gpu/cluster_check.py --model "$small" --work "$work/cluster"

load() { python3 "$OLDPWD/benchmarks/gpu/gpu_load.py" -- python3 "$@"; }
cd benchmarks
echo "== time to first token at 4,000 tokens"
load prefill_ttft.py --model "$small" --prompt-tokens 4000 --rounds 5
echo "== aggregate tokens/s, each server's defaults"
load concurrent_streams.py --model "$small" --levels 1 8 32 64 --tokens 128 --rounds 2 --defaults
for model in "$small" ${with_8b:+"$work/models/llama-8b-bf16"}; do
	echo "== single stream, $(basename "$model")"
	load decode_throughput.py --model "$model" --tokens 1024 --rounds 5
done
echo "== aggregate tokens/s, both servers batching 64"
load concurrent_streams.py --model "$small" --levels 1 8 32 64 --tokens 128 --rounds 2 --batch 64
echo "== where a decode step's time goes"
python3 decode_step_profile.py --model "$small" --rows-apart
python3 decode_step_profile.py --model "$small"
python3 decode_step_profile.py --model "$small" --dequantize-rows measure
python3 decode_step_profile.py --model "$small" --dequantize-rows measure --spare-gb 8
python3 decode_step_profile.py --model "$small" --dequantize-rows measure --spare-gb 8 --plain-mlps
python3 decode_step_profile.py --model "$small" --dequantize-rows measure --spare-gb 8 --separate-projections
python3 decode_step_profile.py --model "$small" --dequantize-rows measure --spare-gb 8 --plain-step --batches 1
python3 quantized_matmul.py
python3 gpu/step_kernels.py --model "$small" --batch 64
python3 gpu/step_kernels.py --model "$small" --batch 64 --dequantize-rows measure --spare-gb 8
python3 serving_profile.py --model "$small" --streams 64
echo "== ours on MLX's quantized kernel only: time to first token, then each server's defaults"
load prefill_ttft.py --model "$small" --prompt-tokens 4000 --rounds 5 --dequantize-rows 0
load concurrent_streams.py --model "$small" --levels 1 8 32 64 --tokens 128 --rounds 2 --defaults --dequantize-rows 0
cd ..
echo "== a CUDA rank and a CPU rank in one group"
python3 benchmarks/gpu/mixed_group.py --cuda-path "$work/site" --cpu-path "$work/cpu:$work/site" --work "$work/mixed"
