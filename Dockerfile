# The app, worker and dashboard image used by compose.yaml.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
WORKDIR /srv

# The CPU build of torch first (a plain `pip install torch` pulls a multi-GB CUDA build).
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

COPY pyproject.toml README.md ./
COPY app app
COPY workers workers
COPY lua lua
COPY schemas schemas
# Editable, so the package finds lua/ and schemas/ beside it. Without the `embedded`
# extra: compose runs real Redis and PostgreSQL, so their wheels would be dead weight.
RUN pip install --no-cache-dir -e .
# Export the ONNX model now, so a container's first start does not spend ~10 s on it.
RUN python -c "from app.embeddings import shared_embedder; shared_embedder().warm()"

EXPOSE 8000 9181
CMD ["backbone", "serve"]
