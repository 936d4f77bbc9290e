"""The demo model in a shape mlx-lm can split into a pipeline: the demo llama rewritten as a qwen2
(a llama with q/k/v biases, here zero; mlx-lm's llama splits for tensor parallelism only), with a
third layer, a copy of the second, so that an uneven layer split differs from the even one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from genmlx.demo.random_model import write_demo_model


def write_demo_pipeline_model(directory: Path) -> Path:
    """Write the three-layer qwen2 into ``directory`` (the demo llama beside it, in
    ``directory``'s sibling ``<name>-llama``); its path."""
    import mlx.core as mx

    llama = write_demo_model(directory.with_name(f"{directory.name}-llama"))
    shutil.copytree(llama, directory, dirs_exist_ok=True)
    config = json.loads((directory / "config.json").read_text())
    config.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"], num_hidden_layers=3)
    (directory / "config.json").write_text(json.dumps(config))
    weights = mx.load(str(directory / "model.safetensors"))
    weights |= {k.replace("layers.1.", "layers.2."): v for k, v in weights.items() if "layers.1." in k}
    for name, weight in list(weights.items()):
        if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
            weights[name.replace(".weight", ".bias")] = mx.zeros((weight.shape[0],), dtype=weight.dtype)
    mx.save_safetensors(str(directory / "model.safetensors"), weights, metadata={"format": "mlx"})
    return directory
