# bids-dmri-ldm BIDS App image.
#
#   docker build --build-arg IMAGE_TAG=bids-dmri-ldm -t bids-dmri-ldm .     # CUDA torch (default)
#   docker build --build-arg TORCH_VARIANT=cpu --build-arg IMAGE_TAG=bids-dmri-ldm:cpu \
#       -t bids-dmri-ldm:cpu .                                                 # CPU torch, small
#
# IMAGE_TAG is the name the image is built as (give the same as -t): the app records it as
# GeneratedBy.Container.Tag in its outputs. The default (CUDA) image carries PyPI's torch wheel
# for CUDA 13.0, which needs an NVIDIA driver >= 580 on the host (docs/container.md).
#
# Needs BuildKit (DOCKER_BUILDKIT=1 or `docker buildx build`) for the RUN --mount steps.
# A directory `.whl/` in the build context, if present, is a pip --find-links source that is
# bind-mounted, never a layer of the image: CI puts the CPU torch wheel there (docs/container.md).
# Where HTTPS goes through an intercepting proxy, pass its CA bundle as a build secret:
#   docker build --secret id=cacert,src=/etc/ssl/certs/ca-certificates.crt ...
# It is used by pip during the install step only and is never stored in the image.

ARG BASE_IMAGE=debian:bookworm-slim

# ---------------------------------------------------------------------------------------------
# base: Debian's Python 3.11 and nothing else; shared by the build and production stages.
FROM ${BASE_IMAGE} AS base
ENV DEBIAN_FRONTEND=noninteractive \
    LANG=C.UTF-8 \
    LC_ALL=C.UTF-8
# Versions come from the Debian stable point release of the base image (pinning them would
# break the build at every point release); python3 is pinned to the 3.11 series.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3=3.11.* \
        python3-venv=3.11.* \
        ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# ---------------------------------------------------------------------------------------------
# wheels: optional local wheels (CI's CPU torch) from `.whl/` in the build context.  Only
# bind-mounted by the build stage, so they are in no layer of the image.  LICENSE makes the
# COPY valid when `.whl/` is absent.
FROM scratch AS wheels
COPY LICENSE .whl* /wheels/

# ---------------------------------------------------------------------------------------------
# build: a virtual environment in /opt/venv with torch (CUDA or CPU build) and the package.
# Three layers, from least to most often changed: torch, the dependencies named in
# pyproject.toml, the package itself.
FROM base AS build
# cuda: PyPI's default Linux torch wheel (bundles the CUDA runtime; the host needs only the
#       NVIDIA driver and, for Docker, the NVIDIA container toolkit).  cpu: the CPU-only wheel.
ARG TORCH_VARIANT=cuda
ARG TORCH_VERSION=2.13.0
# Override to pick another build, e.g. https://download.pytorch.org/whl/cu126
ARG TORCH_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=180
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN python3 -m venv /opt/venv
# The CA bundle secret (if given) is trusted by pip for this step only. Local wheels in .whl/
# are used for the variant they were built for only: for torch==X pip would otherwise prefer a
# local torch-X+cpu wheel (a higher local version) to the CUDA wheel.
RUN --mount=type=bind,from=wheels,source=/wheels,target=/tmp/wheels \
    --mount=type=secret,id=cacert \
    if [ -s /run/secrets/cacert ]; then \
        export PIP_CERT=/run/secrets/cacert SSL_CERT_FILE=/run/secrets/cacert; \
    fi; \
    case "${TORCH_VARIANT}" in cuda|cpu) ;; *) echo "TORCH_VARIANT must be cuda or cpu" >&2; exit 2;; esac; \
    if [ "${TORCH_VARIANT}" = cpu ]; then \
        patterns=("/tmp/wheels/torch-${TORCH_VERSION}+cpu-*.whl"); \
    else \
        patterns=("/tmp/wheels/torch-${TORCH_VERSION}+cu*.whl" "/tmp/wheels/torch-${TORCH_VERSION}-*.whl"); \
    fi; \
    find_links=(); \
    for pattern in "${patterns[@]}"; do \
        if compgen -G "${pattern}" >/dev/null; then find_links=(--find-links /tmp/wheels); fi; \
    done; \
    index=(); \
    if [ -n "${TORCH_INDEX_URL}" ]; then \
        index=(--index-url "${TORCH_INDEX_URL}"); \
    elif [ "${TORCH_VARIANT}" = cpu ] && [ "${#find_links[@]}" -eq 0 ]; then \
        index=(--index-url https://download.pytorch.org/whl/cpu); \
    fi; \
    /opt/venv/bin/pip install "${find_links[@]}" "${index[@]}" "torch==${TORCH_VERSION}" \
    && /opt/venv/bin/python -c "import sys, torch; \
cpu = torch.version.cuda is None; \
sys.exit(0 if cpu == ('${TORCH_VARIANT}' == 'cpu') else \
         f'torch {torch.__version__} is not a ${TORCH_VARIANT} build')"
# Dependencies from pyproject.toml (this layer is rebuilt only when pyproject.toml changes),
# plus the official BIDS validator that the app runs on its input.
RUN --mount=type=bind,source=pyproject.toml,target=/tmp/pyproject.toml \
    --mount=type=secret,id=cacert \
    if [ -s /run/secrets/cacert ]; then \
        export PIP_CERT=/run/secrets/cacert SSL_CERT_FILE=/run/secrets/cacert; \
    fi; \
    /opt/venv/bin/python -c "import tomllib; \
print('\n'.join(tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && /opt/venv/bin/pip install -r /tmp/requirements.txt "bids-validator-deno>=2" \
    && rm /tmp/requirements.txt
# The package itself.  The source is bind-mounted read-write (writes are discarded), so the
# source tree is in no layer; only the installed package is.  (pip fetches the build backend
# named in pyproject.toml, hence the CA secret here too.)
RUN --mount=type=bind,source=.,target=/tmp/src,rw \
    --mount=type=secret,id=cacert \
    if [ -s /run/secrets/cacert ]; then \
        export PIP_CERT=/run/secrets/cacert SSL_CERT_FILE=/run/secrets/cacert; \
    fi; \
    /opt/venv/bin/pip install --no-deps /tmp/src \
    && /opt/venv/bin/pip check

# ---------------------------------------------------------------------------------------------
# runtime: the venv as built (its torch, dependency and package layers stay separate, so a new
# release changes only the small package layer), the shipped model bundles and a
# read-only-friendly environment.
FROM build AS runtime
ARG VERSION=0+unknown
ARG VCS_REF=unknown
ARG BUILD_DATE=unknown
ARG TORCH_VARIANT=cuda
# The name this image is built as (the same as `docker build -t`), recorded by the app in its
# outputs' GeneratedBy.Container.Tag; empty: "bids-dmri-ldm:<package version>".
ARG IMAGE_TAG=""
LABEL org.opencontainers.image.title="bids-dmri-ldm" \
      org.opencontainers.image.description="BIDS App: 3T to 7T-like diffusion MRI with a latent diffusion model (Zhu et al., MICCAI 2024)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/bids-dmri-ldm/bids-dmri-ldm" \
      org.opencontainers.image.url="https://github.com/bids-dmri-ldm/bids-dmri-ldm" \
      org.opencontainers.image.base.name="docker.io/library/debian:bookworm-slim" \
      org.opencontainers.image.ref.name="${IMAGE_TAG}" \
      org.bids-dmri-ldm.torch-variant="${TORCH_VARIANT}"

COPY models/ /opt/bids-dmri-ldm/models/
COPY LICENSE version /opt/bids-dmri-ldm/

# Everything a run may write goes under /tmp, so the image works with
#   docker run --read-only --tmpfs /tmp -u "$(id -u):$(id -g)" --network none ...
# and under Apptainer (which binds a writable /tmp by default).
ENV PATH=/opt/venv/bin:${PATH} \
    VIRTUAL_ENV=/opt/venv \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    XDG_CONFIG_HOME=/tmp/.config \
    MPLCONFIGDIR=/tmp/.config/matplotlib \
    NIPYPE_CONFIG_DIR=/tmp/.config/nipype \
    NIPYPE_NO_ET=1 \
    NO_ET=1 \
    DENO_DIR=/tmp/.cache/deno \
    NUMBA_CACHE_DIR=/tmp/.cache/numba \
    TORCH_HOME=/tmp/.cache/torch \
    TRITON_CACHE_DIR=/tmp/.cache/triton \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    BIDS_DMRI_LDM_MODELS=/opt/bids-dmri-ldm/models \
    BIDS_DMRI_LDM_IN_CONTAINER=1 \
    BIDS_DMRI_LDM_TORCH_VARIANT=${TORCH_VARIANT} \
    BIDS_DMRI_LDM_IMAGE=${IMAGE_TAG}

# pip byte-compiled the venv at install time (it is read-only at run time); check that the
# command line starts.
RUN /opt/venv/bin/bids-dmri-ldm --version

WORKDIR /tmp
ENTRYPOINT ["/opt/venv/bin/bids-dmri-ldm"]

# ---------------------------------------------------------------------------------------------
# test: the runtime plus pytest and the test suite, which then tests the installed package
# (CircleCI: `docker build --target test`, then `docker run --network none IMAGE -n 2`).
FROM runtime AS test
RUN --mount=type=secret,id=cacert \
    if [ -s /run/secrets/cacert ]; then \
        export PIP_CERT=/run/secrets/cacert SSL_CERT_FILE=/run/secrets/cacert; \
    fi; \
    /opt/venv/bin/pip install --no-cache-dir "pytest>=8" "pytest-xdist>=3.5"
COPY pyproject.toml run.py /opt/bids-dmri-ldm/
COPY tests/ /opt/bids-dmri-ldm/tests/
WORKDIR /opt/bids-dmri-ldm
# The container-file checks need the repository and linters; CircleCI's lint job runs them.
ENTRYPOINT ["/opt/venv/bin/python", "-m", "pytest", "-p", "no:cacheprovider", \
            "--ignore=tests/test_container_files.py", "-o", "tmp_path_retention_policy=none"]

# ---------------------------------------------------------------------------------------------
# production (the default target): the runtime image as it is.
FROM runtime AS production
