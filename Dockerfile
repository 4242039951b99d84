# EPAS training image: NVIDIA's PyTorch container plus megatron-core and this project.
#
#   docker build -t epas:latest .                        # on a machine with Docker (GPU not needed)
#   docker run --rm epas:latest                          # runs the CPU test-suite
#   docker run --gpus all --ipc=host --rm epas:latest launch/torchrun.sh \
#       --config configs/tinyllama_1.1b.yaml device=cuda spec=te data.mock=true
#
# Base image: nvcr.io/nvidia/pytorch:25.12-py3, per NVIDIA's release notes PyTorch 2.10.0a0
# (within pyproject.toml's torch>=2.6,<=2.13.0), Python 3.12, CUDA 13.1, Ubuntu 24.04; NVIDIA's
# PyTorch images come with Transformer Engine, Apex and flash-attn built against that torch. The
# build checks the torch and Python versions below and that Transformer Engine is present, and
# reports Apex and flash-attn. tests/test_launch.py checks these pins against pyproject.toml.
#
# Our CI has no Docker engine: there this file is only linted (hadolint); it is built on GPU hosts.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.12-py3
FROM ${BASE_IMAGE}

# What the base image must provide, and the megatron-core release line we train with.
ARG EXPECTED_TORCH=2.10
ARG EXPECTED_PYTHON=3.12
ARG MEGATRON_CORE="megatron-core>=0.16.1,<0.17"
# Set to a UID (e.g. --build-arg EPAS_UID=$(id -u)) to run as an unprivileged user "epas"; the
# UID may already exist (Ubuntu images have "ubuntu" as 1000). Under pyxis/enroot the container
# runs as the submitting user anyway.
ARG EPAS_UID=

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /opt/epas

# 1. Never replace the container's torch, which NVIDIA built with CUDA, NCCL, Transformer Engine
#    and Apex. NVIDIA's own /etc/pip/constraint.txt (PIP_CONSTRAINT) pins what the image ships;
#    this file pins torch explicitly as well, and the check fails the build on a different base.
RUN python -c "import sys, torch; \
assert torch.__version__.startswith('${EXPECTED_TORCH}.'), f'torch {torch.__version__}, expected ${EXPECTED_TORCH}'; \
assert sys.version.startswith('${EXPECTED_PYTHON}.'), f'Python {sys.version}, expected ${EXPECTED_PYTHON}'; \
print(f'torch=={torch.__version__}')" > /opt/torch-constraint.txt \
    && cat /opt/torch-constraint.txt

# 2. The lock (locks/cpu.txt, what CI tests), less every package the base image already has: those
#    NVIDIA built against its torch and pins in its own /etc/pip/constraint.txt. What goes on top is
#    then exactly the tested versions.
COPY pyproject.toml locks/cpu.txt ./
RUN python -c "import re; from importlib.metadata import distributions; \
from packaging.utils import canonicalize_name as canonical; \
image = {canonical(d.metadata['Name']) for d in distributions()}; \
pins = [line for line in open('cpu.txt') if line.strip() and not line.startswith('#')]; \
print(''.join(line for line in pins if canonical(re.split('[=<>~!@ ]', line)[0]) not in image), end='')" \
        > /opt/lock-on-top.txt \
    && rm cpu.txt && cat /opt/lock-on-top.txt

# 3. megatron-core and the project's other dependencies (and the test tools of its "dev" extra),
#    read from pyproject.toml so the list has one home; torch is left out. megatron-core's
#    manylinux wheels (cp312 among them) ship the dataset index helpers already compiled
#    (megatron/core/datasets/helpers_cpp), so no "make" step is needed at run time; importing them
#    here proves it.
RUN python -c "import tomllib; from packaging.requirements import Requirement; \
project = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
requirements = project['dependencies'] + project.get('optional-dependencies', {}).get('dev', []); \
print('\n'.join(r for r in requirements if Requirement(r).name not in ('torch', 'megatron-core')))" > /tmp/requirements.txt \
    && pip install --constraint /opt/torch-constraint.txt --constraint /opt/lock-on-top.txt \
        "${MEGATRON_CORE}" --requirement /tmp/requirements.txt \
    && rm /tmp/requirements.txt \
    && python -c "from megatron.core.datasets import helpers_cpp; import megatron.core; print('megatron-core', megatron.core.__version__)"

# 4. The project itself, without dependencies (all installed above). Editable, so that
#    /opt/epas (configs/, launch/, pretrain_epas.py, tests/) and the package are one copy.
COPY . .
RUN pip install --no-deps --editable . \
    && python -c "import importlib.util as u, torch, megatron_patches; \
missing = [m for m in ('apex', 'flash_attn') if u.find_spec(m) is None]; \
assert u.find_spec('transformer_engine'), 'the base image has no Transformer Engine'; \
print('torch', torch.__version__, '| transformer_engine found |', 'missing: ' + ', '.join(missing) if missing else 'apex and flash_attn found')"

RUN if [[ -n "${EPAS_UID}" ]]; then \
        useradd --create-home --non-unique --uid "${EPAS_UID}" epas && chown -R epas /opt/epas; \
    fi
# (numeric either way: the UID, or 0 for root; hadolint cannot see through the variable)
# hadolint ignore=DL3066
USER ${EPAS_UID:-0}

CMD ["python", "-m", "pytest", "-q"]
