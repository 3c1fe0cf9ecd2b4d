#!/usr/bin/env bash
# MLX's CUDA back-end for the device machine (no MLX there, no network): download the wheels
# HERE, split the one that is too big for a call, and lay them out so they travel in two calls
# to the same warm machine and are joined there. Also stages the data the calls read from
# ../shared (which does not travel): the E2E test split and the DialogSum splits.
#
#   examples/gpu/fetch_mlx_cuda.sh            # download (once), stage data, plan, print the calls
#   examples/gpu/fetch_mlx_cuda.sh --no-download   # re-plan from what is downloaded (tree grew?)
#   examples/gpu/fetch_mlx_cuda.sh --clean    # delete .gpu_wheels/ and .gpu_data/ (~110 MB)
#
# Run from anywhere; works in the repository root. Both folders are ignored through
# .git/info/exclude (added if missing), never committed. The device is Python 3.12,
# manylinux x86_64 (examples/gpu/README.md, /work/.library/device/KINDS.md).
#
# Layout (DEST = .gpu_wheels):
#   DEST/all/     every wheel as downloaded (mlx, mlx-cuda-13, mlx-lm; nltk, defusedxml,
#                 rouge-score for the bench's ROUGE; mlx-cpu for the DialogSum call)
#   DEST/call1/   part 00 of the CUDA wheel + the small bench wheels + stash.sh   (call 1)
#   DEST/call2/   part 01 of the CUDA wheel + mlx + mlx-lm + install.sh          (call 2)
#   DEST/cpu/     mlx + mlx-cpu + mlx-lm + install.sh (MLX importable for PyTorch training, call 3)
# On the device: call 1 runs `bash .gpu_wheels/call1/stash.sh` (copies its files to /tmp/mlx_wheels);
# call 2 sources `.gpu_wheels/call2/install.sh`: copies its files there too, joins
# (`cat WHEEL.part-* > WHEEL`, sha256 checked), pip-installs into /tmp/site and exports
# PYTHONPATH / LD_LIBRARY_PATH / CUDA_HOME (also written to /tmp/mlx_env.sh for later calls).
#
# Options: --dest DIR, --data-dir DIR (default .gpu_data), --stage DIR (device staging folder,
# default /tmp/mlx_wheels), --limit-mib N (per-call limit, 64), --margin-mib N (2),
# --tree-bytes N (size of the travelling working tree; default: measured with git),
# --no-download, --no-data, --clean.
# Versions: MLX_VERSION / MLX_LM_VERSION (default: this venv's mlx / mlx-lm, else 0.32.4 / 0.32.2).
set -euo pipefail

cd "$(dirname "$0")/../.."
DEST=.gpu_wheels
DATA=.gpu_data
STAGE=/tmp/mlx_wheels
LIMIT_MIB=64
MARGIN_MIB=2
TREE_BYTES=
DOWNLOAD=1
STAGE_DATA=1
CLEAN=0
while [ $# -gt 0 ]; do
    case "$1" in
        --dest) DEST=$2; shift 2 ;;
        --data-dir) DATA=$2; shift 2 ;;
        --stage) STAGE=$2; shift 2 ;;
        --limit-mib) LIMIT_MIB=$2; shift 2 ;;
        --margin-mib) MARGIN_MIB=$2; shift 2 ;;
        --tree-bytes) TREE_BYTES=$2; shift 2 ;;
        --no-download) DOWNLOAD=0; shift ;;
        --no-data) STAGE_DATA=0; shift ;;
        --clean) CLEAN=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
        *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

if [ "$CLEAN" = 1 ]; then
    rm -rf "$DEST" "$DATA"
    echo "removed $DEST and $DATA"
    exit 0
fi

PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
version_of() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || echo "$2"; }
MLX_VERSION=${MLX_VERSION:-$(version_of mlx 0.32.4)}
MLX_LM_VERSION=${MLX_LM_VERSION:-$(version_of mlx-lm 0.32.2)}
NLTK_VERSION=${NLTK_VERSION:-3.10.4}
DEFUSEDXML_VERSION=${DEFUSEDXML_VERSION:-0.7.1}
ROUGE_VERSION=${ROUGE_VERSION:-0.1.2}

# Ignored, so they travel only when a call names them in `carry`.
if git rev-parse --git-dir >/dev/null 2>&1; then
    EXCLUDE=$(git rev-parse --git-path info/exclude)
    mkdir -p "$(dirname "$EXCLUDE")"
    for d in "$DEST" "$DATA"; do
        case "$d" in /*|../*) continue ;; esac  # outside the checkout: nothing to ignore
        git check-ignore -q "$d/x" 2>/dev/null || echo "/${d#./}/" >> "$EXCLUDE"
    done
fi

ALL=$DEST/all
mkdir -p "$ALL"
if [ "$DOWNLOAD" = 1 ]; then
    # The device: CPython 3.12, glibc 2.35+ x86_64 (MLX's Linux wheels are manylinux_2_35).
    PLATFORMS=""
    for n in 35 34 31 28 27 24 17; do PLATFORMS="$PLATFORMS --platform manylinux_2_${n}_x86_64"; done
    PIP=("$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
         $PLATFORMS --platform manylinux2014_x86_64 --platform any -d "$ALL")
    "${PIP[@]}" "mlx==$MLX_VERSION" "mlx-cuda-13==$MLX_VERSION" "mlx-cpu==$MLX_VERSION" "mlx-lm==$MLX_LM_VERSION"
    "${PIP[@]}" "nltk==$NLTK_VERSION" "defusedxml==$DEFUSEDXML_VERSION"
    # rouge-score is an sdist only: build its (pure-Python) wheel here.
    "$PY" -m pip wheel --no-deps -w "$ALL" "rouge-score==$ROUGE_VERSION"
fi

one() {  # the single file matching a glob under ALL
    local f
    f=$(ls "$ALL"/$1 2>/dev/null | head -1)
    [ -n "$f" ] || { echo "error: no $1 in $ALL (run without --no-download)" >&2; exit 3; }
    echo "$f"
}
size() { [ $# -gt 0 ] || { echo 0; return; }; stat -c %s "$@" | awk '{s += $1} END {print s + 0}'; }
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }

CUDA=$(one 'mlx_cuda_13-*.whl')
MLX=$(one 'mlx-[0-9]*.whl')
MLXCPU=$(one 'mlx_cpu-*.whl')
MLXLM=$(one 'mlx_lm-*.whl')
SMALL1=("$(one 'nltk-*.whl')" "$(one 'defusedxml-*.whl')" "$(one 'rouge_score-*.whl')")

# Data the calls read from ../shared, copied into the ignored DATA folder (DialogSum is
# CC BY-NC-SA: a working copy for the run, never committed; --clean deletes it).
SHARED=${SPECSTREAM_SHARED:-../shared}
E2E_FILES=()
DS_FILES=()
if [ "$STAGE_DATA" = 1 ]; then
    mkdir -p "$DATA/e2e" "$DATA/dialogsum"
    cp -f "$SHARED/data/e2e/testset_w_refs.csv.gz" "$DATA/e2e/"
    cp -f "$SHARED"/data/dialogsum/{train,dev,test}.jsonl.gz "$DATA/dialogsum/"
    E2E_FILES=("$DATA"/e2e/*)
    DS_FILES=("$DATA"/dialogsum/*)
fi

# Working tree that travels with every call: tracked + untracked-not-ignored files.
if [ -z "$TREE_BYTES" ]; then
    TREE_BYTES=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
fi
LIMIT=$((LIMIT_MIB * 1048576))
ROOM=$((LIMIT - TREE_BYTES - MARGIN_MIB * 1048576))
CUDA_BYTES=$(size "$CUDA")
S1=$(size "${SMALL1[@]}")
S2=$(size "$MLX" "$MLXLM" ${E2E_FILES[@]+"${E2E_FILES[@]}"})
# Two halves (split -b makes every part but the last PART1 bytes: the first is the larger).
PART1=$(( (CUDA_BYTES + 1) / 2 ))
PART2=$((CUDA_BYTES - PART1))
CALL1=$((PART1 + S1))
CALL2=$((PART2 + S2))
if [ "$CALL1" -gt "$ROOM" ] || [ "$CALL2" -gt "$ROOM" ]; then
    echo "error: $(basename "$CUDA") ($(mib "$CUDA_BYTES")) does not fit two calls: $(mib "$ROOM") free per call" \
         "(limit $LIMIT_MIB MiB - tree $(mib "$TREE_BYTES") - margin $MARGIN_MIB MiB). Shrink the tree or use 3 calls." >&2
    exit 4
fi

W=$(basename "$CUDA")
rm -rf "$DEST/call1" "$DEST/call2" "$DEST/cpu" "$DEST/split"
mkdir -p "$DEST/call1" "$DEST/call2" "$DEST/cpu" "$DEST/split"
split -b "$PART1" -d -a 2 "$CUDA" "$DEST/split/$W.part-"
mv "$DEST/split/$W.part-00" "$DEST/call1/"
mv "$DEST/split/$W.part-01" "$DEST/call2/"
rmdir "$DEST/split"  # fails (set -e) if split made a third part
(cd "$ALL" && sha256sum "$W") > "$DEST/call2/$W.sha256"
cp -f "$DEST/call2/$W.sha256" "$DEST/call1/"
cp -f "${SMALL1[@]}" "$DEST/call1/"
cp -f "$MLX" "$MLXLM" "$DEST/call2/"
cp -f "$MLX" "$MLXCPU" "$MLXLM" "$DEST/cpu/"

cat > "$DEST/call1/stash.sh" <<EOF
#!/usr/bin/env bash
# Device, call 1: keep this call's part of $W (and the small wheels) outside the checkout,
# where call 2 finds it if the machine is still warm (30 s after a call).
set -e
here=\$(cd "\$(dirname "\$0")" && pwd)
stage=\${MLX_STAGE:-$STAGE}
mkdir -p "\$stage"
cp -f "\$here"/*.whl* "\$stage"/
ls -l "\$stage"
EOF

cat > "$DEST/call2/install.sh" <<EOF
# Device, call 2 (source it: \`. .gpu_wheels/call2/install.sh && ...\`): join $W from
# both calls' parts, check it, install MLX (CUDA) into /tmp/site, export its environment.
_mlx_cuda_install() {
    local here stage site sp libs n
    here=\$(cd "\$(dirname "\${BASH_SOURCE[0]}")" && pwd)
    stage=\${MLX_STAGE:-$STAGE}
    site=\${MLX_SITE:-/tmp/site}
    mkdir -p "\$stage" && cp -f "\$here"/*.whl* "\$stage"/ || return 1
    n=\$(ls "\$stage"/$W.part-* 2>/dev/null | wc -l)
    if [ "\$n" -ne 2 ]; then
        echo "error: \$n of 2 parts of $W in \$stage: the machine was given back after call 1;" \\
             "rerun call 1, then this call at once" >&2
        return 3
    fi
    cat "\$stage"/$W.part-* > "\$stage/$W" && (cd "\$stage" && sha256sum -c $W.sha256) || return 4
    [ -z "\${MLX_JOIN_ONLY:-}" ] || return 0
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "\$site" \\
        "\$stage"/*.whl || return 5
    # libmlx.so's RPATH is \$ORIGIN/../../nvidia/{cu13,cudnn,nccl,...}/lib: the CUDA 13 libraries of
    # the image's PyTorch venv (nvidia-cublas, -cudnn-cu13, -nccl-cu13, ...); link them into the site.
    sp=\$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    [ -e "\$site/nvidia" ] || ln -s "\$sp/nvidia" "\$site/nvidia"
    libs=\$(ls -d "\$sp"/nvidia/*/lib 2>/dev/null | paste -sd: -)
    {
        echo "export PYTHONPATH=\$site:\$PWD\\\${PYTHONPATH:+:\\\$PYTHONPATH}"
        echo "export LD_LIBRARY_PATH=\$libs\\\${LD_LIBRARY_PATH:+:\\\$LD_LIBRARY_PATH}"
        # MLX JIT-compiles kernels with NVRTC and needs the CUDA headers
        if command -v nvcc >/dev/null; then echo "export CUDA_HOME=\$(dirname "\$(dirname "\$(command -v nvcc)")")"; fi
        echo "export SPECSTREAM_NO_OPENBLAS=1"
    } > /tmp/mlx_env.sh
    . /tmp/mlx_env.sh
    python3 -c "import mlx.core as mx; print('MLX', mx.__version__, mx.default_device(), mx.device_info().get('device_name', '')); print('check', (mx.arange(4) * 2).tolist())"
}
_mlx_cuda_install
EOF

cat > "$DEST/cpu/install.sh" <<EOF
# Device, DialogSum call (source it): MLX for the CPU into /tmp/site_cpu, so mlx_specstream
# (whose package imports MLX) imports beside PyTorch. Independent of calls 1-2.
_mlx_cpu_install() {
    local here site
    here=\$(cd "\$(dirname "\${BASH_SOURCE[0]}")" && pwd)
    site=\${MLX_CPU_SITE:-/tmp/site_cpu}
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "\$site" \\
        "\$here"/*.whl || return 5
    export PYTHONPATH=\$site:\$PWD\${PYTHONPATH:+:\$PYTHONPATH}
    python3 -c "import mlx.core as mx, mlx_lm; print('MLX', mx.__version__, mx.default_device())"
}
_mlx_cpu_install
EOF

# ---- the plan --------------------------------------------------------------------------------
CPU_BYTES=$(size "$DEST"/cpu/*.whl)
DS_BYTES=$(size ${DS_FILES[@]+"${DS_FILES[@]}"})
echo
echo "== wheels (Python 3.12, manylinux x86_64) in $ALL"
for f in "$ALL"/*.whl; do printf "  %-66s %11d B  %s\n" "$(basename "$f")" "$(size "$f")" "$(mib "$(size "$f")")"; done
echo
echo "== per call: limit $LIMIT_MIB MiB = working tree $(mib "$TREE_BYTES") + carried files; margin $MARGIN_MIB MiB"
echo "  $W: $(mib "$CUDA_BYTES"), split -b $PART1 -> part-00 $(mib "$PART1") (call 1), part-01 $(mib "$PART2") (call 2)"
echo "  call 1 carries $(mib "$CALL1"), total $(mib $((CALL1 + TREE_BYTES)))"
echo "  call 2 carries $(mib "$CALL2"), total $(mib $((CALL2 + TREE_BYTES)))"
echo "  call 3 carries $(mib $((CPU_BYTES + DS_BYTES))), total $(mib $((CPU_BYTES + DS_BYTES + TREE_BYTES)))"
echo
echo "== the calls (the same warm machine: call 2 must follow call 1 within ~30 s; see examples/gpu/README.md)"
echo "call 1: carry [\"$DEST/call1\"], timeout_s 120"
echo "  bash $DEST/call1/stash.sh && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader && python3 -c 'import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda)' && ls -d \$(python3 -c 'import sysconfig; print(sysconfig.get_paths()[\"purelib\"])')/nvidia/*/lib && (command -v nvcc || true)"
echo "call 2: carry [\"$DEST/call2\", \"$DATA/e2e\"], timeout_s 420"
echo "  . $DEST/call2/install.sh && PYTHONUNBUFFERED=1 python3 examples/gpu/mlx_step_cost.py --device gpu --time-budget 300 --bench-budget 60 --out \$OUT/step_cost.json --bench-e2e $DATA/e2e/testset_w_refs.csv.gz 2>&1 | tee \$OUT/step_cost.log"
echo "call 3: carry [\"$DEST/cpu\", \"$DATA/dialogsum\"], timeout_s 330"
echo "  . $DEST/cpu/install.sh && PYTHONUNBUFFERED=1 python3 examples/gpu/dialogsum_full.py run --data $DATA/dialogsum --out \$OUT --deadline 240 2>&1 | tee \$OUT/dialogsum.log"
echo
echo "Afterwards: examples/gpu/fetch_mlx_cuda.sh --clean"
