"""Parameter counts of the registered models; `python -m usam.models.summary` prints the table
that docs/models.md carries."""
from __future__ import annotations

import torch

from usam.models.registry import create_model, list_models


def parameter_counts(name: str, num_classes: int = 3, **kwargs) -> dict[str, int]:
    """Total, trainable, frozen, encoder-group and decoder-group parameter counts."""
    try:
        with torch.device("meta"):  # shapes only, nothing allocated
            model = create_model(name, num_classes=num_classes, **kwargs)
    except (RuntimeError, NotImplementedError):  # a library's constructor reads a tensor's value (MONAI's Swin)
        model = create_model(name, num_classes=num_classes, **kwargs)
    groups = model.parameter_groups()
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "total": total,
        "trainable": trainable,
        "frozen": total - trainable,
        "encoder": sum(p.numel() for p in groups["encoder"]),
        "decoder": sum(p.numel() for p in groups["decoder"]),
    }


def parameter_table(num_classes: int = 3) -> str:
    """Markdown table of `parameter_counts` for every registered model."""
    lines = [
        "| model | parameters | trainable | frozen | encoder group | decoder group |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in list_models():
        c = parameter_counts(name, num_classes=num_classes)
        lines.append(
            f"| `{name}` | {c['total']:,} | {c['trainable']:,} | {c['frozen']:,} "
            f"| {c['encoder']:,} | {c['decoder']:,} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(parameter_table())
