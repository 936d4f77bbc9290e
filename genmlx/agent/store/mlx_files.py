"""Which files of a model repository mlx-lm loads, so that a download fetches those and no others.

A Hub repo often also holds the same weights as ``consolidated.safetensors``, ``*.bin``, ``*.pth``
or ``*.gguf``, ONNX exports, images and docs, which can double a download. Paths are relative and
"/" separated; a pattern matches only at its own depth, so ``*.jinja`` does not reach into
``original/`` or any other subfolder.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from fnmatch import fnmatchcase
from pathlib import Path

log = logging.getLogger(__name__)

# Weights: mlx-lm loads exactly glob("model*.safetensors"), with the index beside them. The
# tokenizer comes in one of several formats (tokenizer.json; sentencepiece tokenizer.model;
# tiktoken; vocab and merges), with its config, special tokens and chat templates.
MLX_LM_FILES: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "model*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "tiktoken.model",
    "*.tiktoken",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.json",
    "*.jinja",
    "additional_chat_templates/*.jinja",
)
WEIGHTS = "model*.safetensors"
# The files whose ``auto_map`` may name code of the repo (a model class, a tokenizer class).
AUTO_MAP_FILES: tuple[str, ...] = ("config.json", "tokenizer_config.json")
REMOTE_CODE = "*.py"


def needed_by_mlx_lm(path: str, remote_code: bool) -> bool:
    """Whether mlx-lm reads ``path``; top-level ``*.py`` files count when ``remote_code``."""
    patterns = MLX_LM_FILES + ((REMOTE_CODE,) if remote_code else ())
    return any(matches_at_depth(path, pattern) for pattern in patterns)


def matches_at_depth(path: str, pattern: str) -> bool:
    return path.count("/") == pattern.count("/") and fnmatchcase(path, pattern)


def loadable(paths: Iterable[str]) -> bool:
    """Whether these files give mlx-lm something to load: a config and safetensors weights."""
    found = set(paths)
    return "config.json" in found and any(matches_at_depth(p, WEIGHTS) for p in found)


def needs_remote_code(directory: Path) -> bool:
    """Whether config.json or tokenizer_config.json in ``directory`` maps a class to a module of
    the repo ("module.Class"; "other/repo--module.Class" lives in another repo). Such a module may
    import its siblings, so when one is needed every top-level ``*.py`` is."""
    for name in AUTO_MAP_FILES:
        try:
            auto_map = json.loads((directory / name).read_text()).get("auto_map") or {}
            refs = [r for v in auto_map.values() for r in (v if isinstance(v, list) else [v])]
        except (OSError, ValueError, AttributeError):
            continue  # absent or not a JSON object: it names no code
        if any(isinstance(r, str) and "--" not in r for r in refs):
            return True
    return False


def remove_stale_model_files(directory: Path, keep: set[str]) -> None:
    """Delete files mlx-lm would read that are not in ``keep``: what an earlier download of another
    commit left (a stale ``model-00003-of-00003.safetensors`` would be loaded by mlx-lm's glob).
    Other files, the store's own hidden ones included, are left alone."""
    for path in directory.rglob("*"):
        rel = path.relative_to(directory).as_posix()
        if rel not in keep and path.is_file() and needed_by_mlx_lm(rel, remote_code=False):
            log.info("removing %s: not part of this model's commit", path)
            path.unlink()
