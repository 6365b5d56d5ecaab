#!/usr/bin/env bash
# Build the bids-dmri-ldm images (CPU torch, then the default CUDA torch) and smoke-test each on
# the CPU, on a Debian bookworm machine as root with package registries but no container registry
# (see docs/container.md).
#
# Runs after `make test` in .ci/run.  Steps: install docker.io + debootstrap when missing, start a
# private dockerd in the background, make debian:bookworm-slim locally when it cannot be pulled,
# build the CPU image with the local CPU torch wheel and the CUDA image with PyPI's CUDA torch
# wheel (~2.7 GB of wheels, a ~6 GB image), then run each container the way users do
# (--network none, read-only root filesystem, non-root UID, input mounted read-only) and check
# outputs, provenance (Container.Tag = the image run), exit codes and messages.  Any failed check
# exits non-zero.  dockerd is stopped by its PID and every scratch path is removed on exit.
#
# Environment (all optional):
#   BDL_VARIANTS         images to build and test, in order     (default "cpu cuda")
#   BDL_SKIP_CUDA=1      CPU image only (short of disk or bandwidth: the CUDA image needs
#                        BDL_CUDA_MIN_FREE_GB free on the docker data root, default 16)
#   BDL_IMAGE            CPU image tag to build / test          (default bids-dmri-ldm:ci)
#   BDL_CUDA_IMAGE       CUDA image tag to build / test         (default bids-dmri-ldm:ci-cuda)
#   BDL_DOCKER_ROOT      persistent dockerd data root (keeps base image and layer cache
#                        between local runs; default: a fresh directory removed at exit)
#   BDL_USE_HOST_DOCKER=1  use the docker engine already running (CircleCI) instead of
#                        installing and starting a private one
#   BDL_SKIP_BUILD=1     test the existing images (BDL_IMAGE, BDL_CUDA_IMAGE) instead of
#                        building them
#   BDL_SCRATCH          scratch directory (created; default: mktemp under /var/tmp)
#   BDL_KEEP=1           keep the scratch directory (dataset, outputs, logs) for inspection
#   BDL_DATA_CACHE       directory caching the simulated dataset between runs
#   BDL_PYTHON           python with pip, to fetch the CPU torch wheel (default .venv)
#   BDL_SIF=1            also build an Apptainer .sif from the image and run --version in it
set -Eeuo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
T0=$SECONDS

log() { printf '[container %4ds] %s\n' "$((SECONDS - T0))" "$*" >&2; }
fail() {
    log "FAIL: $*"
    exit 1
}

DOCKER=/usr/bin/docker # Debian's client: supports BuildKit (RUN --mount); others may not
DOCKERD=/usr/sbin/dockerd
VARIANTS=${BDL_VARIANTS:-cpu cuda}
if [ "${BDL_SKIP_CUDA:-0}" = 1 ]; then VARIANTS=${VARIANTS//cuda/}; fi
IMAGE=""   # the image under test (set per variant)
VARIANT="" # cpu or cuda
RUN_UID=4242 # deliberately without an /etc/passwd entry in the image
RUN_GID=4242
VERSION=$(tr -d '[:space:]' <version)
# The small dataset: one participant, the simulator's coarse grid.
SIM_ARGS=(--subjects 1 --voxel-scale 4 --seed 1)

if [ -n "${BDL_SCRATCH:-}" ]; then
    SCRATCH=$BDL_SCRATCH
    mkdir -p "$SCRATCH"
else
    SCRATCH=$(mktemp -d /var/tmp/bdl-ci.XXXXXX)
fi
chmod 0755 "$SCRATCH"
DOCKER_ROOT=${BDL_DOCKER_ROOT:-$SCRATCH/root}
SOCK=$SCRATCH/d.sock
DOCKERD_PID=""
MADE_WHEEL_DIR=""
BUILD_S=0
PARTICIPANT_S=0
TORCH_VERSION=""
SUMMARY=()
export DOCKER_BUILDKIT=1
if [ "${BDL_USE_HOST_DOCKER:-0}" = 1 ]; then
    DOCKER=$(command -v docker) || fail "BDL_USE_HOST_DOCKER=1 but no docker client on PATH"
else
    export DOCKER_HOST=unix://$SOCK DOCKER_CONFIG=$SCRATCH/client
fi

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    if [ -n "$DOCKERD_PID" ] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
        "$DOCKER" ps -aq 2>/dev/null | xargs -r "$DOCKER" rm -f >/dev/null 2>&1
        kill -TERM "$DOCKERD_PID"
        for _ in $(seq 60); do
            kill -0 "$DOCKERD_PID" 2>/dev/null || break
            sleep 0.5
        done
        kill -0 "$DOCKERD_PID" 2>/dev/null && kill -KILL "$DOCKERD_PID"
        wait "$DOCKERD_PID" 2>/dev/null
    fi
    # Unmount anything dockerd left mounted under our private paths, deepest first.
    local mounts
    mounts=$(awk -v a="$SCRATCH" -v b="$DOCKER_ROOT" \
        'index($2, a) == 1 || index($2, b) == 1 {print $2}' /proc/self/mounts | sort -r)
    for m in $mounts; do umount -l "$m"; done
    [ -n "$MADE_WHEEL_DIR" ] && rm -rf "$MADE_WHEEL_DIR"
    if [ "${BDL_KEEP:-0}" = 1 ]; then
        rm -rf "$SCRATCH/root" "$SCRATCH/exec" "$SCRATCH/client" # dockerd's private state
        log "kept $SCRATCH"
    else
        rm -rf "$SCRATCH"
    fi
    if [ "$rc" -ne 0 ]; then
        log "container smoke test FAILED (exit $rc) after $((SECONDS - T0)) s"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------------------------
install_tools() {
    if [ -x "$DOCKERD" ] && [ -x "$DOCKER" ] && command -v debootstrap >/dev/null; then
        return
    fi
    log "installing docker.io and debootstrap (Debian packages)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
        docker.io debootstrap >"$SCRATCH/apt.log" 2>&1 ||
        {
            tail -20 "$SCRATCH/apt.log" >&2
            fail "apt-get install docker.io debootstrap"
        }
}

start_dockerd() {
    log "starting dockerd (data root $DOCKER_ROOT)"
    mkdir -p "$DOCKER_ROOT" "$SCRATCH/exec" "$DOCKER_CONFIG"
    "$DOCKERD" --data-root "$DOCKER_ROOT" --exec-root "$SCRATCH/exec" \
        --host "unix://$SOCK" --pidfile "$SCRATCH/dockerd.pid" \
        --storage-driver=overlay2 --iptables=false --ip-masq=false --bridge=none \
        >"$SCRATCH/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 120); do
        if "$DOCKER" version >/dev/null 2>&1; then
            log "dockerd $("$DOCKER" version -f '{{.Server.Version}}') is up (pid $DOCKERD_PID)"
            return
        fi
        kill -0 "$DOCKERD_PID" 2>/dev/null || break
        sleep 0.5
    done
    tail -30 "$SCRATCH/dockerd.log" >&2
    fail "dockerd did not start"
}

debian_mirror() {
    # The machine's own Debian mirror (deb822 or one-line sources), else deb.debian.org.
    local uri
    uri=$(grep -hsE '^URIs:.*debian/?$' /etc/apt/sources.list.d/*.sources | head -1 | awk '{print $2}')
    [ -n "$uri" ] || uri=$(grep -hsE '^deb +(\[[^]]*\] +)?https?://[^ ]*/debian/? +bookworm ' \
        /etc/apt/sources.list /etc/apt/sources.list.d/*.list | head -1 | sed -E 's/^deb +(\[[^]]*\] +)?//' | awk '{print $1}')
    echo "${uri:-http://deb.debian.org/debian}"
}

ensure_base_image() {
    local base=debian:bookworm-slim
    if "$DOCKER" image inspect "$base" >/dev/null 2>&1; then
        log "base image $base present"
        return
    fi
    if timeout 60 "$DOCKER" pull -q "$base" >/dev/null 2>&1; then
        log "pulled $base"
        return
    fi
    local mirror rootfs=$SCRATCH/rootfs
    mirror=$(debian_mirror)
    log "no registry: making $base with debootstrap from $mirror"
    debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$SCRATCH/debootstrap.log" 2>&1 ||
        {
            tail -20 "$SCRATCH/debootstrap.log" >&2
            fail "debootstrap"
        }
    # Same apt sources as the official image, and no package caches.
    rm -f "$rootfs/etc/apt/sources.list"
    cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${mirror%/debian}/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/dev/*
    tar -C "$rootfs" -c . | "$DOCKER" import - "$base" >/dev/null
    rm -rf "$rootfs"
    log "imported $base ($("$DOCKER" image inspect -f '{{.Size}}' "$base") bytes)"
}

image_of() {
    case $1 in
    cpu) echo "${BDL_IMAGE:-bids-dmri-ldm:ci}" ;;
    cuda) echo "${BDL_CUDA_IMAGE:-bids-dmri-ldm:ci-cuda}" ;;
    esac
}

torch_pin() {
    TORCH_VERSION=$(sed -nE 's/.*"torch==([^"]+)".*/\1/p' pyproject.toml | head -1)
    [ -n "$TORCH_VERSION" ] || fail "cannot read the torch pin from pyproject.toml"
}

check_cuda_disk() {
    # The CUDA build downloads ~2.7 GB of wheels and leaves a ~6 GB image: fail early and say
    # how to skip it, rather than fail half-way with "no space left on device".
    local need=${BDL_CUDA_MIN_FREE_GB:-16} root free
    if [ "${BDL_USE_HOST_DOCKER:-0}" = 1 ]; then
        root=$("$DOCKER" info -f '{{.DockerRootDir}}')
    else
        root=$DOCKER_ROOT
    fi
    free=$(df -P -BG "$root" | awk 'NR == 2 {print int($4)}')
    [ "$free" -ge "$need" ] || fail "the CUDA image needs about $need GB free on $root, found" \
        "$free GB: free some space, or set BDL_SKIP_CUDA=1 to build and test the CPU image only"
    log "$free GB free on $root (the CUDA build needs about $need GB)"
}

fetch_cpu_torch_wheel() {
    # The CPU torch wheel for Python 3.11, into .whl/ in the build context (bind-mounted by the
    # Dockerfile, never a layer).  Local pip caches/find-links first, then PyTorch's CPU index.
    local torch_version python=${BDL_PYTHON:-$REPO/.venv/bin/python}
    [ -x "$python" ] || python=python3
    torch_pin
    torch_version=$TORCH_VERSION
    if ! ls .whl/torch-"$torch_version"+cpu-cp311-*.whl >/dev/null 2>&1; then
        [ -d .whl ] || MADE_WHEEL_DIR=$REPO/.whl
        "$python" -m pip download -q --no-index --no-deps "torch==$torch_version" -d .whl 2>/dev/null ||
            "$python" -m pip download -q --no-deps --only-binary :all: --python-version 3.11 \
                --platform manylinux_2_28_x86_64 --index-url https://download.pytorch.org/whl/cpu \
                "torch==$torch_version" -d .whl
    fi
    ls .whl/torch-"$torch_version"+cpu-cp311-*.whl >/dev/null 2>&1 ||
        fail "no CPU torch $torch_version wheel for cp311 in .whl/ (found: $(ls .whl 2>/dev/null))"
    TORCH_VERSION=$torch_version
}

build_image() {
    local secret=()
    local ca=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
    # Trust this machine's CA bundle (an intercepting proxy's CA lives there) during the pip
    # steps only: a BuildKit secret is never written to a layer.
    [ -s "$ca" ] && secret=(--secret "id=cacert,src=$ca")
    if [ "$VARIANT" = cpu ]; then
        fetch_cpu_torch_wheel
    else
        torch_pin
        check_cuda_disk
    fi
    log "building $IMAGE (torch $TORCH_VERSION, $VARIANT)"
    local t=$SECONDS
    "$DOCKER" build --progress plain --network host \
        --build-arg "TORCH_VARIANT=$VARIANT" --build-arg "TORCH_VERSION=$TORCH_VERSION" \
        --build-arg "VERSION=$VERSION" --build-arg "IMAGE_TAG=$IMAGE" \
        --build-arg "VCS_REF=$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
        --build-arg "BUILD_DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
        "${secret[@]}" --target production -t "$IMAGE" . >"$SCRATCH/build-$VARIANT.log" 2>&1 ||
        {
            tail -40 "$SCRATCH/build-$VARIANT.log" >&2
            fail "docker build ($VARIANT)"
        }
    BUILD_S=$((SECONDS - t))
    log "built $IMAGE in ${BUILD_S} s"
    check_image
}

check_image() {
    IMAGE_BYTES=$("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE")
    log "image $IMAGE: $((IMAGE_BYTES / 1000000)) MB"
    local label
    label=$("$DOCKER" image inspect -f '{{index .Config.Labels "org.opencontainers.image.version"}}' "$IMAGE")
    [ "$label" = "$VERSION" ] || fail "OCI version label is '$label', expected '$VERSION'"
    # The CA bundle (build secret), the wheels and the source tree (bind mounts) must be in no
    # layer of the image: only their empty mount points may remain.
    local leftovers
    leftovers=$("$DOCKER" run --rm --network none --entrypoint sh "$IMAGE" -c \
        'find /run/secrets /tmp /src /wheels -type f 2>/dev/null; find / -xdev -name "torch-*.whl" 2>/dev/null')
    [ -z "$leftovers" ] || fail "build-time files left in the image: $leftovers"
    local torch
    torch=$("$DOCKER" run --rm --network none --entrypoint python "$IMAGE" -c \
        'import torch; print(torch.__version__, torch.version.cuda or "cpu-only", torch.cuda.is_available())')
    log "$IMAGE: torch $torch (version, CUDA runtime, GPU visible)"
    case "$VARIANT:$torch" in
    cpu:*cpu-only*) ;;
    cuda:*cpu-only*) fail "$IMAGE is the CUDA variant but its torch has no CUDA runtime: $torch" ;;
    cuda:*) ;;
    *) fail "$IMAGE is the CPU variant but its torch is a CUDA build: $torch" ;;
    esac
}

# Run the image the way users are told to: no network, read-only root, tmpfs scratch, any UID.
run_app() {
    "$DOCKER" run --rm --network none --read-only --tmpfs /tmp:rw,exec,size=6g \
        -u "$RUN_UID:$RUN_GID" "$@"
}

expect_exit() {
    # expect_exit CODE NAME [docker run args...]: run, check the exit code and that the error
    # is one line without a Python traceback.
    local want=$1 name=$2
    shift 2
    local got=0
    run_app "$@" >"$SCRATCH/$name.out" 2>"$SCRATCH/$name.err" || got=$?
    if [ "$got" -ne "$want" ]; then
        cat "$SCRATCH/$name.out" "$SCRATCH/$name.err" >&2
        fail "$name: exit $got, expected $want"
    fi
    if grep -q Traceback "$SCRATCH/$name.err"; then
        cat "$SCRATCH/$name.err" >&2
        fail "$name: Python traceback instead of a one-line error"
    fi
    log "ok: $name exits $want: $(grep -v '^usage:\|^ ' "$SCRATCH/$name.err" | tail -1)"
}

simulate_dataset() {
    # The project's simulator, run inside the image (no network, non-root, read-only root).
    local data=$SCRATCH/data
    if [ -n "${BDL_DATA_CACHE:-}" ] && [ -f "$BDL_DATA_CACHE/bids/dataset_description.json" ]; then
        log "test dataset from the cache $BDL_DATA_CACHE"
        mkdir -p "$data"
        cp -a "$BDL_DATA_CACHE/bids" "$data/bids"
    else
        log "simulating a small BIDS dataset (${SIM_ARGS[*]}) in the image"
        install -d -m 0755 -o "$RUN_UID" -g "$RUN_GID" "$data"
        run_app -v "$data:/data" --entrypoint python "$IMAGE" \
            -m bids_dmri_ldm.simulate /data/bids "${SIM_ARGS[@]}" \
            >"$SCRATCH/simulate.log" 2>&1 || {
            tail -20 "$SCRATCH/simulate.log" >&2
            fail "simulator (python -m bids_dmri_ldm.simulate) in the image"
        }
        if [ -n "${BDL_DATA_CACHE:-}" ]; then
            mkdir -p "$BDL_DATA_CACHE"
            rm -rf "$BDL_DATA_CACHE/bids"
            cp -a "$data/bids" "$BDL_DATA_CACHE/bids"
        fi
    fi
    BIDS=$data/bids
    chmod -R a+rX "$BIDS"
    log "dataset: $(find "$BIDS" -name '*_dwi.nii*' | wc -l) DWI runs," \
        "$(du -sh "$BIDS" | cut -f1)"
}

check_cli() {
    local out
    out=$(run_app "$IMAGE" --version) || fail "--version exited $?"
    [[ "$out" == *"$VERSION"* ]] || fail "--version printed '$out', expected it to contain $VERSION"
    log "ok: --version -> $out"
    expect_exit 64 no-arguments "$IMAGE"
    grep -qiE '^usage:|--help' "$SCRATCH/no-arguments.err" ||
        fail "no-arguments: neither usage nor a pointer to --help printed"
    expect_exit 64 bad-option "$IMAGE" /bids /out participant --no-such-option
    mkdir -p "$SCRATCH/empty" "$SCRATCH/out-empty"
    chmod a+rwx "$SCRATCH/empty" "$SCRATCH/out-empty"
    expect_exit 66 empty-bids -v "$SCRATCH/empty:/bids:ro" -v "$SCRATCH/out-empty:/out" \
        "$IMAGE" /bids /out participant
    expect_exit 66 unmounted-bids "$IMAGE" /bids /tmp/out participant
    expect_exit 64 cuda-without-gpu -v "$BIDS:/bids:ro" "$IMAGE" \
        /bids /tmp/out participant --device cuda
    grep -q -- '--gpus all' "$SCRATCH/cuda-without-gpu.err" ||
        fail "cuda-without-gpu: message does not say how to pass the GPU (--gpus all / --nv)"
}

run_participant() {
    local out=$SCRATCH/out-$VARIANT
    install -d -m 0755 -o "$RUN_UID" -g "$RUN_GID" "$out"
    log "participant level (--network none, read-only root, uid $RUN_UID, /bids read-only)"
    local t=$SECONDS
    # No -w: the default work dir (beside /out) cannot be created on the read-only root, so
    # the app must fall back to a folder under /tmp by itself.  The output grid is the
    # simulated 7T grid (1.05 mm x voxel scale 4 = 4.2 mm); the default 1.05 mm would turn this
    # 5 mm dataset into a 171x210x171x108 image (2.6 GB), too big for a smoke test.
    run_app -v "$BIDS:/bids:ro" -v "$out:/out" "$IMAGE" \
        /bids /out participant --nprocs 2 --output-resolution 4.2 \
        >"$SCRATCH/participant-$VARIANT.log" 2>&1 || {
        tail -40 "$SCRATCH/participant-$VARIANT.log" >&2
        fail "participant run exited non-zero ($IMAGE)"
    }
    PARTICIPANT_S=$((SECONDS - t))
    log "participant run took ${PARTICIPANT_S} s"
    # Check the derivatives inside the image (it has nibabel and numpy), as the run's UID.
    "$DOCKER" run --rm -i --network none --read-only --tmpfs /tmp -u "$RUN_UID:$RUN_GID" \
        -v "$BIDS:/bids:ro" -v "$out:/out:ro" --entrypoint python "$IMAGE" \
        - /bids /out "$VERSION" "$RUN_UID" "$IMAGE" "$VARIANT" <<'EOF' || fail "output checks ($IMAGE)"
"""Check the participant-level derivatives written by the container (runs in the image)."""
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

bids, out, version, uid = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
image, variant = sys.argv[5], sys.argv[6]
problems = []


def entities(name):
    """BIDS entities of a file name, e.g. {'sub': '01', 'ses': '3T'}."""
    return dict(p.split("-", 1) for p in name.split(".")[0].split("_")[:-1] if "-" in p)


def metadata(image):
    """JSON metadata of a raw image by the inheritance principle (nearest file wins)."""
    ents, suffix = entities(image.name), image.name.split(".")[0].split("_")[-1]
    folders = [image.parent, *image.parent.parents]
    folders = folders[: folders.index(bids) + 1]
    merged = {}
    for folder in reversed(folders):
        for side in sorted(folder.glob(f"*{suffix}.json")):
            if set(entities(side.name).items()) <= set(ents.items()):
                merged.update(json.loads(side.read_text()))
    return merged


desc_path = out / "dataset_description.json"
if not desc_path.is_file():
    sys.exit(f"missing {desc_path}")
desc = json.loads(desc_path.read_text())
if desc.get("DatasetType") != "derivative":
    problems.append(f"DatasetType is {desc.get('DatasetType')!r}")
gen = {g.get("Name"): g.get("Version") for g in desc.get("GeneratedBy", [])}
if gen.get("bids-dmri-ldm") != version:
    problems.append(f"GeneratedBy does not name bids-dmri-ldm {version}: {gen}")
# Provenance that travels: the tag of the image that ran, the input by a relative link.
container = desc.get("GeneratedBy", [{}])[0].get("Container", {})
if container != {"Type": "docker", "Tag": image}:
    problems.append(f"GeneratedBy.Container is {container}, expected docker {image}")
link = desc.get("DatasetLinks", {}).get("raw", "")
if not link or link.startswith("/") or ":" in link:
    problems.append(f"DatasetLinks.raw {link!r} is not a relative path")

# One 7T-like DWI (+ mask and RISH/scale maps) per 3T (source) DWI run of the dataset.
sources = sorted(p for p in bids.glob("sub-*/**/dwi/*_dwi.nii*")
                 if metadata(p).get("MagneticFieldStrength", 0) < 5)
outputs = sorted(out.glob("sub-*/**/dwi/*_desc-7Tlike_dwi.nii.gz"))
if not sources:
    problems.append("the simulated dataset has no 3T DWI run")
if len(outputs) != len(sources):
    problems.append(f"{len(outputs)} 7T-like DWI for {len(sources)} source runs")
for src in sources:
    prefix = src.name.split("_dwi.nii")[0]
    found = [p for p in outputs if p.name.startswith(prefix + "_")]
    if len(found) != 1:
        problems.append(f"{src.name}: {len(found)} 7T-like outputs")
        continue
    dwi = found[0]
    stem = dwi.name[: -len("_desc-7Tlike_dwi.nii.gz")]
    for name in ("desc-7Tlike_dwi.bval", "desc-7Tlike_dwi.bvec", "desc-7Tlike_dwi.json",
                 "desc-brain_mask.nii.gz", "desc-brain_mask.json",
                 "model-rish_desc-source_dwimap.nii.gz", "model-rish_desc-7Tlike_dwimap.nii.gz",
                 "model-rish_desc-scale_dwimap.nii.gz"):
        if not (dwi.parent / f"{stem}_{name}").is_file():
            problems.append(f"{stem}: missing _{name}")
    img = nib.load(dwi)
    data = np.asarray(img.dataobj, dtype=np.float32)
    bvals = np.loadtxt(dwi.parent / f"{stem}_desc-7Tlike_dwi.bval", ndmin=1)
    bvecs = np.loadtxt(dwi.parent / f"{stem}_desc-7Tlike_dwi.bvec", ndmin=2)
    if data.ndim != 4 or data.shape[3] != bvals.size or bvecs.shape != (3, bvals.size):
        problems.append(f"{dwi.name}: shape {data.shape}, {bvals.size} b-values, "
                        f"bvec {bvecs.shape}")
    if not np.isfinite(data).all() or not (data > 0).any():
        problems.append(f"{dwi.name}: non-finite or all-zero data")
    sidecar = json.loads((dwi.parent / f"{stem}_desc-7Tlike_dwi.json").read_text())
    for key in ("Sources", "Method", "Software"):
        if key not in sidecar:
            problems.append(f"{dwi.name}: sidecar lacks {key} (provenance)")
    torch_version = sidecar.get("Software", {}).get("torch", "")
    if (variant == "cpu") != torch_version.endswith("+cpu"):
        problems.append(f"{dwi.name}: torch {torch_version} recorded by the {variant} image")
    print(f"{dwi.relative_to(out)}: {data.shape}, zooms {img.header.get_zooms()[:3]}, "
          f"b-values {sorted(set(bvals.round().astype(int).tolist()))}")
for path in out.rglob("*"):
    if path.is_file() and path.stat().st_uid != uid:
        problems.append(f"{path.relative_to(out)} owned by uid {path.stat().st_uid}, not {uid}")
    if path.name.startswith(".") and path.name != ".bidsignore":
        problems.append(f"temporary file left in the output: {path.relative_to(out)}")
files = sorted(p for p in out.rglob("*") if p.is_file())
print(f"{len(sources)} source run(s) -> {len(outputs)} 7T-like DWI, {len(files)} files:")
for path in files:
    print("   ", path.relative_to(out))
if problems:
    sys.exit("\n".join(problems))
EOF
    if "$DOCKER" run --rm --entrypoint sh "$IMAGE" -c 'command -v bids-validator-deno' >/dev/null; then
        run_app -v "$out:/out:ro" --entrypoint bids-validator-deno "$IMAGE" /out \
            >"$SCRATCH/validator-$VARIANT.log" 2>&1 || {
            tail -40 "$SCRATCH/validator-$VARIANT.log" >&2
            fail "bids-validator-deno rejects the derivatives ($IMAGE)"
        }
        log "ok: bids-validator-deno (in the image, no network) accepts the derivatives"
    fi
}

build_sif() {
    # Stretch: Apptainer from Debian sid inside a container built from a debootstrapped sid
    # rootfs turns `docker save` of the image into a .sif, then runs --version in it.
    log "building an Apptainer .sif (Debian sid apptainer in a container)"
    local t=$SECONDS sid=$SCRATCH/sid mirror
    mirror=$(debian_mirror)
    if ! "$DOCKER" image inspect bdl-apptainer:sid >/dev/null 2>&1; then
        debootstrap --variant=minbase sid "$sid" "$mirror" >"$SCRATCH/debootstrap-sid.log" 2>&1 ||
            fail "debootstrap sid"
        rm -rf "$sid"/var/cache/apt/archives/*.deb "$sid"/dev/*
        tar -C "$sid" -c . | "$DOCKER" import - bdl-sid:base >/dev/null
        rm -rf "$sid"
        "$DOCKER" run --network host --name bdl-apptainer-build bdl-sid:base sh -c \
            'apt-get -o Acquire::Check-Valid-Until=false update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends apptainer squashfs-tools >/dev/null && rm -rf /var/lib/apt/lists/*' ||
            fail "apt-get install apptainer (sid)"
        "$DOCKER" commit bdl-apptainer-build bdl-apptainer:sid >/dev/null
        "$DOCKER" rm bdl-apptainer-build >/dev/null
    fi
    "$DOCKER" save "$IMAGE" -o "$SCRATCH/image.tar"
    chmod a+r "$SCRATCH/image.tar"
    "$DOCKER" run --rm --network none -v "$SCRATCH:/w" bdl-apptainer:sid \
        apptainer build /w/bids-dmri-ldm.sif docker-archive:///w/image.tar \
        >"$SCRATCH/sif.log" 2>&1 || {
        tail -20 "$SCRATCH/sif.log" >&2
        fail "apptainer build"
    }
    local sif_mb=$(($(stat -c %s "$SCRATCH/bids-dmri-ldm.sif") / 1000000))
    log "built bids-dmri-ldm.sif ($sif_mb MB) in $((SECONDS - t)) s"
    local out
    out=$("$DOCKER" run --rm --network none --cap-add ALL --cap-drop SYS_RESOURCE \
        --security-opt seccomp=unconfined --security-opt apparmor=unconfined \
        --device /dev/loop-control $(for d in /dev/loop[0-9]*; do printf -- '--device %s ' "$d"; done) \
        -v "$SCRATCH:/w" bdl-apptainer:sid \
        apptainer run --no-privs --cleanenv /w/bids-dmri-ldm.sif --version 2>"$SCRATCH/sif-run.err") ||
        {
            cat "$SCRATCH/sif-run.err" >&2
            fail "apptainer run --version"
        }
    [[ "$out" == *"$VERSION"* ]] || fail "apptainer run --version printed '$out'"
    log "ok: apptainer run bids-dmri-ldm.sif --version -> $out (sif total $((SECONDS - t)) s)"
}

# ---------------------------------------------------------------------------------------------
[ -n "${VARIANTS// /}" ] || fail "no image variant to test (BDL_VARIANTS='${BDL_VARIANTS:-}')"
for VARIANT in $VARIANTS; do
    case $VARIANT in cpu | cuda) ;; *) fail "unknown image variant '$VARIANT' in BDL_VARIANTS (cpu, cuda)" ;; esac
done
if [ "${BDL_USE_HOST_DOCKER:-0}" = 1 ]; then
    log "using the running docker engine ($("$DOCKER" version -f '{{.Server.Version}}'))"
else
    install_tools
    start_dockerd
fi
[ "${BDL_SKIP_BUILD:-0}" = 1 ] || ensure_base_image
[ "${BDL_SKIP_CUDA:-0}" = 1 ] && log "BDL_SKIP_CUDA=1: the CUDA image is not built or tested"
simulated=0
for VARIANT in $VARIANTS; do
    IMAGE=$(image_of "$VARIANT")
    BUILD_S=0
    if [ "${BDL_SKIP_BUILD:-0}" = 1 ]; then
        "$DOCKER" image inspect "$IMAGE" >/dev/null || fail "BDL_SKIP_BUILD=1 but no image $IMAGE"
        check_image
    else
        build_image
    fi
    if [ "$simulated" = 0 ]; then
        simulate_dataset
        simulated=1
    fi
    check_cli
    run_participant
    SUMMARY+=("$VARIANT: build ${BUILD_S} s, participant ${PARTICIPANT_S} s, image $((IMAGE_BYTES / 1000000)) MB")
done
if [ "${BDL_SIF:-0}" = 1 ]; then
    set -- $VARIANTS
    IMAGE=$(image_of "$1") # the first image tested (the CPU one by default: smaller)
    build_sif
fi
log "container smoke test passed in $((SECONDS - T0)) s ($(IFS=';'; echo "${SUMMARY[*]}"))"
