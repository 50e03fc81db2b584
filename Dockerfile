# fitprune's own image: `docker run fitprune --profile a10g-24gb MODEL`
# CPU by default; for CUDA build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG EXTRAS=demo
ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 FITPRUNE_CACHE=/home/fitprune/.cache/fitprune
RUN useradd --create-home --uid 10001 fitprune
WORKDIR /opt/fitprune
COPY pyproject.toml README.md ./
COPY compressor ./compressor
COPY exporters ./exporters
COPY runtimes ./runtimes
COPY profiles ./profiles
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}" \
 && pip install --no-cache-dir ".[${EXTRAS}]"
USER fitprune
WORKDIR /home/fitprune
ENTRYPOINT ["compress"]
CMD ["--help"]
