# fitprune's own image: `docker run --rm -v "$PWD/out:/home/fitprune/out" fitprune --profile a10g-24gb MODEL`
# CPU (default):  docker build -t fitprune .
# CUDA:           docker build -t fitprune:cuda --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 \
#                   --build-arg EXTRAS=demo,vllm .
# Versions are pinned by build argument; the base image by tag (override BASE_IMAGE with a digest to pin harder).
ARG BASE_IMAGE=python:3.11.11-slim-bookworm
FROM ${BASE_IMAGE}
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG EXTRAS=demo
ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 FITPRUNE_CACHE=/home/fitprune/.cache/fitprune
RUN groupadd --system --gid 10001 fitprune \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/fitprune fitprune
WORKDIR /opt/fitprune
COPY pyproject.toml README.md ./
COPY compressor ./compressor
COPY exporters ./exporters
COPY runtimes ./runtimes
COPY profiles ./profiles
# torch first, from the index for the variant, so that fitprune's unpinned `torch>=2.4` is already met
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}" \
 && pip install --no-cache-dir "/opt/fitprune[${EXTRAS}]"
USER 10001:10001
WORKDIR /home/fitprune
ENTRYPOINT ["compress"]
CMD ["--help"]
