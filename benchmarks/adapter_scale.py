"""What scaling a LoRA adapter's update trades: held-out skill against drift and abstention.

    .venv/bin/python benchmarks/adapter_scale.py --adapter WORK_DIR/adapters/v0001 [--scale 0.8 ...] [--out F.json]

A LoRA adapter adds ``s * B @ A`` to each target weight; multiplying ``B`` by ``alpha`` in [0, 1]
moves the weights ``alpha`` of the way from the base model to the tuned one (weight-space
interpolation, as WiSE-FT does for full fine-tuning). For the base weights and the adapter at each
scale this prints what the benchmark's gate sees: held-out accuracy, the never-trained suites
(``selftune bench self-improvement``'s evaluation, same split and samples) and the rise in
reference cross-entropy, all in one run. The adapter's saved no-call bias is kept at every scale.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer
from safetensors.torch import load_file, save_file

from selftune.bench.self_improvement import HELDOUT, SPLIT_FILE, UNTRAINED_SUITES, Split, _evaluate, _local_chat
from selftune.settings import load_settings


def scaled_copy(adapter: Path, scale: float, into: Path) -> Path:
    """A copy of the LoRA ``adapter`` directory whose update is multiplied by ``scale``."""
    target = into / f"{adapter.name}-x{scale:g}"
    shutil.copytree(adapter, target)
    weights = target / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({name: tensor * scale if "lora_B" in name else tensor for name, tensor in tensors.items()}, weights)
    return target


def main(
    adapter: Annotated[Path, typer.Option(help="LoRA adapter directory (safetensors).")],
    scale: Annotated[list[float], typer.Option(help="Scales of the adapter's update to evaluate.")] = [1.0, 0.8, 0.6],
    model: Annotated[str, typer.Option(help="Model name.")] = "smollm2-135m-instruct",
    eval_limit: Annotated[int, typer.Option(help="Questions per never-trained suite.")] = 50,
    out: Annotated[Optional[Path], typer.Option(help="Write the results as JSON.")] = None,
) -> None:
    settings = load_settings(model={"name": model})
    chat = _local_chat(settings)
    split = Split.model_validate_json(SPLIT_FILE.read_text())
    reference = settings.tuning.reference_file.read_text()
    names = (HELDOUT, *UNTRAINED_SUITES)
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="selftune-scale-") as scratch:
        for label, path in [("base", None)] + [(f"x{s:g}", scaled_copy(adapter, s, Path(scratch))) for s in scale]:
            chat.use_adapter(path, path.name if path else None)
            suites = _evaluate(chat, split, eval_limit, settings.tuning.seed)
            rows[label] = {name: suites[name].accuracy for name in names} | {"reference_ce": chat.cross_entropy(reference)}
            typer.echo(f"{label}: " + ", ".join(f"{k} {v:.3f}" for k, v in rows[label].items()), err=True)
    base_ce = rows["base"]["reference_ce"]
    typer.echo("| model | " + " | ".join(names) + " | reference CE rise (nats) |")
    typer.echo("| --- | " + " | ".join("---:" for _ in names) + " | ---: |")
    for label, row in rows.items():
        typer.echo(f"| {label} | " + " | ".join(f"{row[n]:.2f}" for n in names)
                   + f" | {row['reference_ce'] - base_ce:+.3f} |")
    if out is not None:
        out.write_text(json.dumps({"adapter": str(adapter), "eval_limit": eval_limit, "results": rows}, indent=1))


if __name__ == "__main__":
    typer.run(main)
