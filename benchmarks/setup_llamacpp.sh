#!/usr/bin/env bash
# llama.cpp built from source for the side-by-side benchmarks (generate.py, serve_load.py), kept out of the
# project venv: llama-cpp-python from its sdist in benchmarks/.venv-llamacpp, llama-server from the same
# vendored llama.cpp in benchmarks/.llamacpp/, and the embedded SmolLM2 Q4_1 GGUF re-saved by llama.cpp at
# F32, F16 and Q8_0 beside it. Idempotent: each step is skipped when its result is already there.
#
#   nice -n 10 bash benchmarks/setup_llamacpp.sh      # ~15 min on 2 cores (two native builds)
#
# Environment: PYTHON (interpreter for the new venv, default python3), PROJECT_PYTHON (the project venv's
# python, used to find the embedded model and check the F32 weights; default .venv/bin/python), JOBS.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=0.3.36
VENV=benchmarks/.venv-llamacpp
OUT=benchmarks/.llamacpp
PYTHON=${PYTHON:-python3}
PROJECT_PYTHON=${PROJECT_PYTHON:-.venv/bin/python}
JOBS=${JOBS:-$(nproc)}
SDIST=$OUT/llama_cpp_python-$VERSION.tar.gz
SRC=$OUT/llama_cpp_python-$VERSION
# -march=native kernels, as llama.cpp's own build chooses on the machine it runs on, less AMX-INT8: its
# kernels segfault here in ggml_backend_amx_mul_mat on Q8_0 weights (llama.cpp issue #20824, unfixed). The
# repacked AVX-512 kernels stay. GCC's explicit -mno-* wins over -march=native whatever their order.
FLAGS="-DGGML_NATIVE=ON -DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8"

mkdir -p "$OUT"

if [ ! -x "$VENV/bin/python" ]; then
    echo "== venv $VENV (no system site-packages)"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
fi

if [ ! -f "$SDIST" ]; then
    echo "== sdist llama-cpp-python==$VERSION"
    "$VENV/bin/pip" download -q --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$OUT"
fi
if [ ! -d "$SRC/vendor/llama.cpp" ]; then
    tar -xzf "$SDIST" -C "$OUT"
fi

# Each build records its flags in a stamp file once it succeeded; it is redone when they differ.
stamped() { [ "$(cat "$1" 2>/dev/null)" = "$FLAGS" ]; }

if ! stamped "$VENV/cmake-args" \
        || [ "$("$VENV/bin/python" -c 'import llama_cpp; print(llama_cpp.__version__)' 2>/dev/null)" != "$VERSION" ]; then
    echo "== llama-cpp-python $VERSION from its sdist, CMAKE_ARGS=$FLAGS (~7 min on 2 cores)"
    # --no-cache-dir: pip would otherwise reuse a wheel it built from this sdist with other flags
    CMAKE_ARGS="$FLAGS" CMAKE_BUILD_PARALLEL_LEVEL=$JOBS \
        "$VENV/bin/pip" install --no-cache-dir --force-reinstall --no-binary llama-cpp-python "$SDIST"
    echo "$FLAGS" > "$VENV/cmake-args"
fi

if ! stamped "$OUT/llama-server.cmake-args" || [ ! -x "$OUT/llama-server" ]; then
    echo "== llama-server from $SRC/vendor/llama.cpp (~7 min on 2 cores)"
    # LLAMA_CURL is deprecated in this llama.cpp (a no-op with a warning); LLAMA_OPENSSL=OFF is what now keeps
    # model downloading out, and the two UI flags keep the build from fetching the web UI from the network.
    cmake -S "$SRC/vendor/llama.cpp" -B "$OUT/build" -DCMAKE_BUILD_TYPE=Release $FLAGS \
        -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DBUILD_SHARED_LIBS=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON
    cmake --build "$OUT/build" --target llama-server -j "$JOBS"
    cp "$OUT/build/bin/llama-server" "$OUT/llama-server.tmp"
    mv "$OUT/llama-server.tmp" "$OUT/llama-server"
    echo "$FLAGS" > "$OUT/llama-server.cmake-args"
fi

EMBEDDED=$("$PROJECT_PYTHON" -c 'from llamaherd.embedded import embedded_model_path; print(embedded_model_path())')
STEM=$(basename "$EMBEDDED" .Q4_1.gguf)
for FTYPE in F32 F16 Q8_0; do
    DST=$OUT/$STEM.$FTYPE.gguf
    [ -f "$DST" ] && continue
    echo "== $DST"
    "$VENV/bin/python" - "$EMBEDDED" "$DST" "$FTYPE" "$JOBS" <<'EOF'
import ctypes
import os
import sys

import llama_cpp

src, dst, ftype, jobs = sys.argv[1:]
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = {"F32": llama_cpp.LLAMA_FTYPE_ALL_F32, "F16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16,
                "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}[ftype]
params.allow_requantize = True  # the source is Q4_1: without it llama.cpp refuses even the F32 target
params.nthread = int(jobs)
if llama_cpp.llama_model_quantize(src.encode(), (dst + ".tmp").encode(), ctypes.byref(params)) != 0:
    sys.exit(f"llama_model_quantize {src} -> {ftype} failed")
os.replace(dst + ".tmp", dst)
EOF
done

echo "== F32 file vs llamaherd's dequantized Q4_1"
"$PROJECT_PYTHON" - "$EMBEDDED" "$OUT/$STEM.F32.gguf" <<'EOF'
import sys

from llamaherd.load import iter_tensors, read_config, resolve

q4, f32 = (resolve(p) for p in sys.argv[1:])
names = ("model.layers.0.self_attn.q_proj.weight", "model.layers.29.mlp.down_proj.weight", "model.embed_tokens.weight")
ours = {n: t for n, t in iter_tensors(q4, read_config(q4)) if n in names}
theirs = {n: t for n, t in iter_tensors(f32, read_config(f32)) if n in names}
for n in names:
    diff = (ours[n].float() - theirs[n].float()).abs().max().item()
    print(f"  {n} {tuple(ours[n].shape)}: max |llamaherd - llama.cpp F32| = {diff:.3g}")
    if diff != 0:
        sys.exit(f"{f32}: {n} differs from llamaherd's dequantized Q4_1; delete the file and rerun")
EOF
echo "done: $VENV, $OUT/llama-server, $OUT/$STEM.{F32,F16,Q8_0}.gguf"
