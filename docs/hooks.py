"""MkDocs hook: write one page per shipped model from its card (weights/*.json) before each build,
so the pages can never disagree with the cards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _metrics_table(metrics: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if metrics and not any(
        isinstance(v, dict) and all(isinstance(r, dict) and "pooled_corr" in r for r in v.values())
        for v in metrics.values()
    ):
        # other kinds of models (assimilation): show the stored measurements as they are
        return ["```json", json.dumps(metrics, indent=1), "```", ""]
    for label, rows in metrics.items():
        if not isinstance(rows, dict) or not all(isinstance(v, dict) for v in rows.values()):
            continue
        if all("crps" in v for v in rows.values()):  # a paired test: scored day by day
            lines += _table(
                f"**{label.removeprefix('paired: ')} (paired, day by day)**",
                ["method", "CRPS", "spread/skill", "days", "s / field"],
                [
                    [
                        m,
                        f"{r['crps']:.3f}",
                        _number(r.get("spread_skill"), ".2f"),
                        str(r["days"]),
                        f"{r['seconds_per_field']:.4f}",
                    ]
                    for m, r in rows.items()
                ],
            )
        elif all("pooled_corr" in v and "mae" in v for v in rows.values()):
            lines += _table(
                f"**{label} as input**",
                ["method", "pooled corr", "mean abs err (reduction)", "p95 abs err (reduction)", "s / field"],
                [
                    [
                        m,
                        f"{r['pooled_corr']:.3f}",
                        f"{r['mae']:.3f} ({100 * r['mae_reduction']:.1f}%)",
                        f"{r['p95']:.3f} ({100 * r['p95_reduction']:.1f}%)",
                        f"{r['seconds_per_field']:.4f}",
                    ]
                    for m, r in rows.items()
                ],
            )
    return lines


def _table(title: str, header: list[str], rows: list[list[str]]) -> list[str]:
    """A titled markdown table."""
    return [
        title,
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
    ]


def _number(value: float | None, spec: str) -> str:
    """``value`` formatted, or "-" when missing or NaN."""
    return "-" if value is None or value != value else format(value, spec)


def _method(kind: str) -> str:
    return f"downscale.{kind}" if kind in ("cm", "sde") else f"assimilate.{kind}"


def _variable_names(card: dict[str, Any]) -> str:
    return "+".join(v["name"] for v in card.get("variables") or [card["variable"]])


def model_page(card: dict[str, Any]) -> str:
    variables = card.get("variables") or [card["variable"]]
    training = card.get("training", {})
    grid = card["grid"]
    call = (
        f'out = ds.downscale.cm(model="{card["name"]}")  # a Dataset with {", ".join(v["name"] for v in variables)}'
        if card.get("variables")
        else f'out = da.{_method(card["kind"])}(model="{card["name"]}")'
    )
    lines = [
        f"# {card['name']}",
        "",
        f"*{card['kind'].upper()} model, version {card['version']}; page generated from "
        f"`weights/{card['name']}.json`.*",
        "",
        "```python",
        call,
        "```",
        "",
        "## Intended use",
        "",
        card.get("intended_use", "Not stated."),
        "",
        "## Limitations",
        "",
        *[f"* {x}" for x in card.get("limitations", [])],
        "",
        "## Data and training",
        "",
        *[
            f"* Variable{f' (channel {i})' if len(variables) > 1 else ''}: `{var['name']}` "
            f"({var.get('long_name', '')}), {var['units']}, standard name `{var.get('standard_name', '')}`"
            for i, var in enumerate(variables)
        ],
        f"* Grid: {grid['shape'][0]} x {grid['shape'][1]} cells, periodic: {grid.get('periodic')}, "
        f"{grid.get('mask', {}).get('valid_cells', '?')} valid (land) cells",
        f"* Training data: {training.get('data', training.get('description', ''))}",
        f"* Training period: {training.get('period')}, validation: {training.get('validation_period')}",
        f"* Licence / terms: {training.get('licence', '')}",
        f"* Steps: {training.get('steps')}, batch size {training.get('batch_size')}, loss "
        f"`{training.get('loss')}`, "
        f"hardware: {training.get('hardware', '?')}, {training.get('hours', '?')} h",
        f"* Architecture: `{json.dumps(card.get('architecture'))}`",
        f"* Noise range: {json.dumps(card.get('sigma'))}" if card.get("sigma") else "",
        f"* sha256 of the weights: `{card.get('sha256')}`",
        "",
        "## Measured skill",
        "",
    ]
    metrics = card.get("metrics") or {}
    table = _metrics_table(metrics)
    lines += table if table else ["No measurements stored in the card yet."]
    report = (
        "../evaluation-tas.md"
        if any(v.get("kind") == "temperature" for v in variables)
        else "../evaluation.md"
    )
    lines += ["", f"Full report: [Evaluation]({report}).", ""]
    return "\n".join(lines)


def write_pages(docs_dir: Path) -> None:
    out = docs_dir / "models"
    out.mkdir(exist_ok=True)
    cards = sorted((ROOT / "weights").glob("*.json"))
    names = []
    for path in cards:
        card = json.loads(path.read_text())
        if "kind" not in card or "grid" not in card:
            continue
        page = out / f"{card['name']}.md"
        text = model_page(card)
        if not page.exists() or page.read_text() != text:
            page.write_text(text)
        names.append(card)
    index = [
        "# Shipped models",
        "",
        "Each model is `NAME.safetensors` (weights) plus `NAME.json` (its card) in `weights/`; "
        "`xdownscale.list_models()` lists them and `xdownscale.load_model(NAME)` loads one, "
        "verifying its "
        "sha256.",
        "",
        "| model | kind | variable | grid |",
        "|---|---|---|---|",
    ]
    for card in names:
        index.append(
            f"| [{card['name']}]({card['name']}.md) | {card['kind']} | {_variable_names(card)} | "
            f"{card['grid']['shape'][0]} x {card['grid']['shape'][1]} |"
        )
    text = "\n".join(index) + "\n"
    idx = out / "index.md"
    if not idx.exists() or idx.read_text() != text:
        idx.write_text(text)


def on_pre_build(config: Any, **kwargs: Any) -> None:
    write_pages(Path(config["docs_dir"]))
