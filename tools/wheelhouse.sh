#!/usr/bin/env bash
# Build a wheelhouse for an offline GPU host that already has torch (and CUDA) installed:
# the pure-Python and manylinux wheels wanctl needs beyond torch, for one Python version.
#   PYVER=3.12 OUT=.wheelhouse bash tools/wheelhouse.sh
# On the GPU host:
#   python3 -m pip install --no-index --no-deps --target /opt/wanctl-site .wheelhouse/*.whl
#   export PYTHONPATH=/opt/wanctl-site:$PWD
set -euo pipefail
PYVER="${PYVER:-3.12}"
OUT="${OUT:-.wheelhouse}"
PY="${PY:-python3}"
# What a typical CUDA+torch image lacks (imageio-ffmpeg is 68 MB: add it with PKGS=... when the host has no
# OpenCV; without either, wanctl writes no mp4 and says so). Pinned to versions tested on the H100 (see BENCHMARKS.md).
# The server (python -m wan_runtime serve): starlette and uvicorn, and what they need beyond the standard library
# (anyio 4.16 wants typing-extensions >= 4.16, newer than some torch images carry).
PKGS=(${PKGS:-diffusers==0.42.1 optuna==5.0.0 alembic sqlalchemy mako colorlog tomli-w ftfy wcwidth
      torchao==0.18.0 sageattention==1.0.6 nvidia-ml-py greenlet peft==0.21.2 accelerate
      starlette==1.10.0 uvicorn==0.55.0 h11==0.16.0 click==8.5.1 anyio==4.16.0 idna typing-extensions==4.16.0})
# FA4=1 adds flash-attn-4 and its CuTe DSL runtime for CUDA 13 (~110 MB; torch >= 2.11 plugs it in as the
# torch_fa4 attention). pip --target does not run .pth files: on the GPU host also put
# /opt/wanctl-site/nvidia_cutlass_dsl/dsl_packages on PYTHONPATH. Tested on the H100: BENCHMARKS.md.
if [ "${FA4:-0}" = 1 ]; then
  PKGS+=(flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1
         nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 apache-tvm-ffi==0.1.15.post2
         torch-c-dlpack-ext quack-kernels==0.6.5 einops cuda-bindings==13.5.0 cuda-pathfinder)
fi
# TE=1 adds Transformer Engine (the te_* quant values): its core wheel for CUDA ${TE_CUDA:-13} (~277 MB, every GPU
# architecture inside), the metapackage, pydantic, and the torch extension's source in $OUT/src, which PyPI ships
# only as an sdist: build it on the GPU host with KERNEL=te tools/build_kernel.sh (BENCHMARKS.md, 2026-12-01).
TE_VERSION="${TE_VERSION:-2.20.2}"
if [ "${TE:-0}" = 1 ]; then
  # pydantic pins its core exactly and --no-deps checks nothing: the set that ran with TE 2.20.2 on the H200
  PKGS+=(transformer-engine=="$TE_VERSION" transformer-engine-cu"${TE_CUDA:-13}"=="$TE_VERSION" pydantic==2.14.4
         pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 einops)
fi
mkdir -p "$OUT"
plat=()
for n in 17 27 28 31 34; do plat+=(--platform "manylinux_2_${n}_x86_64"); done
plat+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  "${plat[@]}" -d "$OUT" "${PKGS[@]}"
if [ "${TE:-0}" = 1 ]; then
  mkdir -p "$OUT/src" "$OUT/build-tools"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    "${plat[@]}" -d "$OUT/build-tools" ninja==1.13.2 wheel==0.48.0 setuptools==84.2.1
  # pip cannot download this sdist without building its metadata (which needs torch and CUDA): fetch it from the
  # index pip uses (PIP_INDEX_URL / pip.conf, PyPI when none; its PIP_CERT and user:token@ too) and check the
  # sha256 the index gives.
  INDEX="${PIP_INDEX_URL:-$("$PY" -m pip config get global.index-url 2>/dev/null || echo https://pypi.org/simple)}"
  CERT="${PIP_CERT:-$("$PY" -m pip config get global.cert 2>/dev/null || true)}"
  "$PY" - "$TE_VERSION" "$OUT/src" "$INDEX" "$CERT" <<'PY'
import base64, hashlib, pathlib, re, ssl, sys, urllib.parse, urllib.request
version, out, index, cert = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3].rstrip("/"), sys.argv[4]
parts = urllib.parse.urlsplit(index)
headers = {}
if parts.username:  # user:token@host, as pip takes it: sent as Basic auth, never printed
    token = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
    headers["Authorization"] = "Basic " + base64.b64encode(token.encode()).decode()
    parts = parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else ""))
context = ssl.create_default_context(cafile=cert or None)
def get(url: str, timeout: float) -> bytes:
    same_host = urllib.parse.urlsplit(url).hostname == parts.hostname
    req = urllib.request.Request(url, headers=headers if same_host else {})
    return urllib.request.urlopen(req, timeout=timeout, context=context).read()
name = f"transformer_engine_torch-{version}.tar.gz"
listing = urllib.parse.urlunsplit(parts) + "/transformer-engine-torch/"
page = get(listing, 60).decode()
found = re.search(r'href="([^"#]*' + re.escape(name) + r')#sha256=([0-9a-f]{64})"', page)
if found is None:
    sys.exit(f"{name} is not listed at {listing} (TE_VERSION={version})")
data = get(urllib.parse.urljoin(listing, found.group(1)), 600)
if hashlib.sha256(data).hexdigest() != found.group(2):
    sys.exit(f"{name}: sha256 does not match the index's")
(out / name).write_bytes(data)
PY
fi
# KERNELS=1 adds what tools/build_kernel.sh needs to compile attention kernels on an offline GPU host with nvcc:
# the build tools' wheels in $OUT/build-tools and, packed from local checkouts, the sources in $OUT/src:
#   FA3_REPO=path/to/flash-attention (with `git submodule update --init csrc/cutlass` done), SAGE_REPO=path/to/SageAttention
if [ "${KERNELS:-0}" = 1 ]; then
  mkdir -p "$OUT/build-tools" "$OUT/src"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    "${plat[@]}" -d "$OUT/build-tools" ninja==1.13.2 wheel==0.48.0 setuptools==84.2.1
  if [ -n "${FA3_REPO:-}" ]; then
    [ -d "$FA3_REPO/csrc/cutlass/include/cute" ] || {
      echo "$FA3_REPO/csrc/cutlass is empty: run 'git submodule update --init csrc/cutlass' there" >&2; exit 2; }
    # Only what FA3's hopper/setup.py reads: hopper/, cutlass's headers and the README it opens.
    tar czf "$OUT/src/flash-attention-fa3.tar.gz" -C "$FA3_REPO" --exclude='hopper/test_*' \
      --exclude='hopper/benchmark_*' --transform 's,^,flash-attention/,' hopper csrc/cutlass/include README.md
  fi
  if [ -n "${SAGE_REPO:-}" ]; then
    tar czf "$OUT/src/SageAttention.tar.gz" -C "$SAGE_REPO" --exclude=.git --transform 's,^\./,SageAttention/,' .
  fi
fi
ls -la "$OUT"
du -sh "$OUT"
