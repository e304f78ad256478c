# The code location's image for Dagster+ Hybrid (agents on Kubernetes, ECS or Docker) and for
# Serverless deploys that build with Docker. One image serves CPU and GPU runs: PyPI's Linux torch
# wheels carry CUDA, and a GPU node supplies the driver. For a smaller CPU-only image:
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t mnist-dagster .
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-bookworm

ARG TORCH_INDEX_URL=""
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /opt/dagster/app

# Dependencies first, in their own layer: code changes then rebuild in seconds, not minutes.
COPY pyproject.toml README.md ./
RUN mkdir mnist_dagster && touch mnist_dagster/__init__.py \
    && pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} . \
    && pip uninstall -y mnist-dagster && rm -rf mnist_dagster build *.egg-info

COPY mnist_dagster ./mnist_dagster
RUN pip install --no-deps . && rm -rf build *.egg-info \
    # Fail the build, not the deploy: the agent needs dagster-cloud, and the definitions must load.
    && python -c "import dagster_cloud" \
    && dagster definitions validate -m mnist_dagster.definitions -a defs

# No DAGSTER_DEPLOYMENT here: Dagster+ sets DAGSTER_CLOUD_DEPLOYMENT_NAME, which selects prod (or
# branch). Secrets come from the deployment's environment variables, never from the image.
