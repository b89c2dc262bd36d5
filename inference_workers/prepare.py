"""`ragbus models prepare`: turn the packaged SmolLM2 GGUF into the Hugging Face safetensors folder
vLLM loads, once, under `<home>/models/` (outside git).

transformers reads the GGUF (dequantizing to float32) but refuses to save a model it loaded from
GGUF, so the weights go into a freshly built model of the same config (exact: same logits) which
is then saved. Needs `gguf` and `accelerate` (pip install 'ragbus[convert]').
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from infra.settings import Settings

log = logging.getLogger(__name__)

PREPARED_NAME = "smollm2-135m-instruct-hf"


def prepared_dir(settings: Settings) -> Path:
    return settings.home / "models" / PREPARED_NAME


def prepare_packaged(settings: Settings, *, force: bool = False) -> Path:
    """Convert the packaged GGUF (idempotent: an existing folder is kept unless `force`)."""
    target = prepared_dir(settings)
    if (target / "config.json").is_file() and not force:
        return target
    try:
        import accelerate  # noqa: F401
        import gguf  # noqa: F401
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise RuntimeError(
            f"converting needs transformers, gguf and accelerate ({e}): pip install 'ragbus[convert]'"
        ) from None

    from inference_workers.engines.llamacpp import packaged_gguf

    gguf_path = packaged_gguf()
    folder, name = str(gguf_path.parent), gguf_path.name
    log.info("reading %s", gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = type(loaded)(config)
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    fresh.generation_config = loaded.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".prepare-", dir=target.parent))
    try:
        tmp.chmod(0o755)
        fresh.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)  # atomic: a half-written folder never looks prepared
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote %s", target)
    return target
