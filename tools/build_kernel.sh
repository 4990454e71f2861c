#!/usr/bin/env bash
# Build an attention-kernel wheel on a GPU host that has nvcc but no internet, for that host's torch:
#   KERNEL=sage: SageAttention 2 (PyPI carries only 1.0.6, which diffusers' `sage` backend refuses: it needs
#     >= 2.1.1). SRC = a git archive of thu-ml/SageAttention.
#   KERNEL=fa3: FlashAttention-3 (flash-attention's hopper/ folder; not on PyPI). SRC = a flash-attention
#     tree with csrc/cutlass/include filled in (the submodule). Forward only, head dim FA3_HDIMS (default 128,
#     Wan2.2's), bf16 and e4m3 (fp8): what inference needs, and minutes instead of an hour.
#   KERNEL=te: Transformer Engine's torch extension (transformer_engine_torch; PyPI has only its sdist). SRC = the
#     unpacked transformer_engine_torch-VERSION.tar.gz (TE=1 make wheelhouse); install the wheel with the same
#     version's transformer-engine and transformer-engine-cu13 wheels. C++ only (no nvcc work): ~2 minutes.
# Bring ninja / wheel / setuptools wheels with you (TOOLS); only the listed compute capabilities are compiled:
#   KERNEL=sage SRC=path TOOLS=dir OUT=dir ARCHS=9.0 bash tools/build_kernel.sh
set -euo pipefail
KERNEL="${KERNEL:?set KERNEL to sage, fa3 or te}"
SRC="${SRC:?set SRC to the kernel source folder}"
OUT="${OUT:-.wheelhouse}"
ARCHS="${ARCHS:-9.0}"
BUILD_SITE="${BUILD_SITE:-/tmp/wanctl-build-tools}"
if [ -n "${TOOLS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --target "$BUILD_SITE" "$TOOLS"/*.whl
  export PYTHONPATH="$BUILD_SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$BUILD_SITE/bin:$PATH"
fi
[ "$KERNEL" = te ] || command -v nvcc >/dev/null || { echo "nvcc not found: $KERNEL compiles CUDA kernels (set CUDA_HOME / PATH)" >&2; exit 2; }
OUT="$(mkdir -p "$OUT" && cd "$OUT" && pwd)"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
case "$KERNEL" in
  sage)
    cd "$SRC"
    TORCH_CUDA_ARCH_LIST="$ARCHS" python3 setup.py -q bdist_wheel -d "$OUT"
    ls -la "$OUT"/sageattention-*.whl ;;
  fa3)
    [ -d "$SRC/csrc/cutlass/include/cute" ] || { echo "$SRC/csrc/cutlass/include is empty: fill the cutlass submodule" >&2; exit 2; }
    export FLASH_ATTENTION_FORCE_BUILD=TRUE  # never try to download a prebuilt wheel
    for f in BACKWARD SPLIT PAGEDKV APPENDKV LOCAL SOFTCAP PACKGQA FP16 VARLEN CLUSTER SM80 HDIMDIFF64 HDIMDIFF192; do
      export "FLASH_ATTENTION_DISABLE_$f=TRUE"
    done
    for d in 64 96 128 192 256; do
      case " ${FA3_HDIMS:-128} " in *" $d "*) ;; *) export "FLASH_ATTENTION_DISABLE_HDIM$d=TRUE" ;; esac
    done
    cd "$SRC/hopper"
    python3 setup.py -q bdist_wheel -d "$OUT"
    ls -la "$OUT"/flash_attn_3-*.whl ;;
  te)
    [ -f "$SRC/setup.py" ] || { echo "$SRC has no setup.py: unpack transformer_engine_torch-VERSION.tar.gz there" >&2; exit 2; }
    # C++ only, but against CUDA's headers (the toolkit's, as on the H200 host where this compile ran)
    CUDA_INC="${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)")")}/include"
    [ -f "$CUDA_INC/cuda_runtime.h" ] || { echo "no CUDA toolkit headers at $CUDA_INC: set CUDA_HOME" >&2; exit 2; }
    # cuDNN, NCCL and NVRTC headers come from the nvidia-* wheels torch was installed with
    NV_INC="$(python3 -c 'import glob, nvidia; print(":".join(d for p in nvidia.__path__ for d in sorted(glob.glob(p + "/*/include"))))')" || {
      echo "the nvidia-* wheels torch uses are not importable: install torch with CUDA from PyPI" >&2; exit 2; }
    [ -n "$NV_INC" ] || { echo "the nvidia-* wheels hold no headers (include/ folders)" >&2; exit 2; }
    export CPATH="$NV_INC${CPATH:+:$CPATH}" CUDA_HOME="${CUDA_HOME:-$(dirname "$CUDA_INC")}"
    export NVTE_PYTORCH_FORCE_BUILD=TRUE NVTE_WITH_NCCL_EP="${NVTE_WITH_NCCL_EP:-0}"
    export NVTE_CUDA_ARCHS="${NVTE_CUDA_ARCHS:-${ARCHS//./}}"
    # setup.py deletes its build_tools/ and common_headers/ after bdist_wheel: build a copy, keep SRC rebuildable
    WORK="$(mktemp -d)"; trap 'rm -rf "$WORK"' EXIT
    cp -a "$SRC"/. "$WORK"/ && cd "$WORK"
    python3 setup.py -q bdist_wheel -d "$OUT"
    ls -la "$OUT"/transformer_engine_torch-*.whl ;;
  *) echo "KERNEL must be sage, fa3 or te, not $KERNEL" >&2; exit 2 ;;
esac
