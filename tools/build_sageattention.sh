#!/usr/bin/env bash
# Build a SageAttention 2 wheel on a GPU host that has nvcc but no internet (PyPI carries only 1.0.6, which
# diffusers' `sage` backend refuses: it needs >= 2.1.1). Bring the source (git archive of thu-ml/SageAttention)
# and the ninja / wheel / setuptools wheels with you:
#   SRC=path/to/SageAttention TOOLS=dir/with/ninja+wheel+setuptools/wheels OUT=dir ARCHS=9.0 bash tools/build_sageattention.sh
# Only the listed compute capabilities are compiled (9.0 = Hopper), which keeps the build to minutes.
set -euo pipefail
SRC="${SRC:?set SRC to the SageAttention source folder (with setup.py)}"
OUT="${OUT:-.wheelhouse}"
ARCHS="${ARCHS:-9.0}"
BUILD_SITE="${BUILD_SITE:-/tmp/wanctl-build-tools}"
if [ -n "${TOOLS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --target "$BUILD_SITE" "$TOOLS"/*.whl
  export PYTHONPATH="$BUILD_SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$BUILD_SITE/bin:$PATH"
fi
command -v nvcc >/dev/null || { echo "nvcc not found: SageAttention 2 compiles CUDA kernels (set CUDA_HOME / PATH)" >&2; exit 2; }
OUT="$(mkdir -p "$OUT" && cd "$OUT" && pwd)"
cd "$SRC"
TORCH_CUDA_ARCH_LIST="$ARCHS" MAX_JOBS="${MAX_JOBS:-$(nproc)}" python3 setup.py -q bdist_wheel -d "$OUT"
ls -la "$OUT"/sageattention-*.whl
