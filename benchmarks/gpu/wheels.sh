#!/usr/bin/env bash
# Downloads, on a machine with network access, the wheels run.sh installs on a Linux GPU machine
# that has none: MLX's CUDA 13 build (and its CPU build, for the mixed group check) and what GenMLX
# and the benchmarks need beyond the CUDA
# libraries, NumPy, transformers, tokenizers and the like that such a machine's image carries.
#     benchmarks/gpu/wheels.sh DIR [PYTHON_VERSION]      (default 3.12: the GPU machine's Python)
set -euo pipefail
dir=${1:?usage: wheels.sh DIR [PYTHON_VERSION]}
version=${2:-3.12}
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$version" \
	--implementation cp --platform manylinux_2_35_x86_64 --platform manylinux_2_34_x86_64 \
	--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	--platform manylinux1_x86_64 --platform any -d "$dir" \
	mlx==0.32.4 mlx-cuda-13==0.32.4 mlx-lm==0.32.2 tornado zeroconf ifaddr jsonschema \
	jsonschema-specifications referencing rpds-py watchfiles tenacity llguidance cryptography cffi \
	pycparser hatchling trove-classifiers openai pydantic pydantic-core annotated-types \
	typing-inspection jiter distro sniffio httpx2 httpcore2 truststore py-spy mlx-cpu==0.32.4
ls "$dir"
