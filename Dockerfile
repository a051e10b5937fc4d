# GPU image of the VPR server. Weights, indexes and jobs live in the /data volume
# (VPR_HOME), never in the image. Build: docker build -t vpr-distill .
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VPR_HOME=/data \
    VPR_HOST=0.0.0.0 \
    VPR_PORT=8000 \
    OMP_WAIT_POLICY=PASSIVE

RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common curl ca-certificates \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
 && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 vpr \
 && mkdir -p /data /app && chown vpr:vpr /data /app

WORKDIR /app
COPY --chown=vpr:vpr pyproject.toml README.md ./
# The packages (one folder each at the root) and vpr/, which links them under one name.
COPY --chown=vpr:vpr vpr ./vpr
COPY --chown=vpr:vpr model ./model
COPY --chown=vpr:vpr media ./media
COPY --chown=vpr:vpr data ./data
COPY --chown=vpr:vpr describe ./describe
COPY --chown=vpr:vpr index ./index
COPY --chown=vpr:vpr evaluation ./evaluation
COPY --chown=vpr:vpr train ./train
COPY --chown=vpr:vpr server ./server
COPY --chown=vpr:vpr cli ./cli
RUN python3.11 -m venv /opt/venv \
 && /opt/venv/bin/pip install --upgrade pip \
 && /opt/venv/bin/pip install . \
 && chown -R vpr:vpr /opt/venv
ENV PATH=/opt/venv/bin:$PATH

USER vpr
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8000/readyz || exit 1
CMD ["vpr", "serve", "--host", "0.0.0.0", "--port", "8000"]
