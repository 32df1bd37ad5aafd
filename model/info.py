"""`python -m model info --model gpt2`: where a GPT-2's parameters are, and the exact total.

Counts come from the parameters of a real GPT built on the `meta` device (shapes, no memory), so the table is
whatever model/gpt.py builds, never a formula that could drift from it.
"""
from __future__ import annotations

import json
import re

from common import cli

from .config import PRESETS, GPTConfig

# (component, pattern over GPT's parameter names); block parameters are grouped across layers.
COMPONENTS = [
    ("token embedding (wte)", r"transformer\.wte\."),
    ("position embedding (wpe)", r"transformer\.wpe\."),
    ("attention (c_attn, c_proj)", r"transformer\.h\.\d+\.attn\."),
    ("MLP (c_fc, c_proj)", r"transformer\.h\.\d+\.mlp\."),
    ("layernorms (ln_1, ln_2)", r"transformer\.h\.\d+\.ln_"),
    ("final layernorm (ln_f)", r"transformer\.ln_f\."),
    ("LM head (tied to wte)", r"lm_head\."),
]


def parameter_table(config: GPTConfig) -> dict:
    """{"components": [{name, per_block, params}], "total", "padding"}; the tied head counts once, in wte."""
    from .gpt import GPT
    model = GPT.empty(config)
    counts = {name: 0 for name, _ in COMPONENTS}
    for param_name, p in model.named_parameters():  # yields the tied weight once, as wte
        component = next(name for name, pattern in COMPONENTS if re.match(pattern, param_name))
        counts[component] += p.numel()
    padding = (config.embedding_rows - config.vocab_size) * config.n_embd
    counts["token embedding (wte)"] -= padding  # padding rows never become predictions: not model capacity
    in_blocks = {name for name, pattern in COMPONENTS if pattern.startswith(r"transformer\.h")}
    rows = [{"name": name, "per_block": counts[name] // config.n_layer if name in in_blocks else None,
             "params": counts[name]} for name, _ in COMPONENTS]
    total = sum(counts.values())
    assert total == model.num_params()
    return {"components": rows, "total": total, "padding": padding}


def format_table(title: str, config: GPTConfig, table: dict) -> str:
    lines = [f"model {title}: " + ", ".join(f"{k}={v}" for k, v in config.to_dict().items()),
             f"{'component':<28} {'per block':>12} {'x n_layer':>9} {'parameters':>15} {'share':>7}"]
    for row in table["components"]:
        per_block = f"{row['per_block']:,}" if row["per_block"] is not None else ""
        times = str(config.n_layer) if row["per_block"] is not None else ""
        share = 100.0 * row["params"] / table["total"]
        lines.append(f"{row['name']:<28} {per_block:>12} {times:>9} {row['params']:>15,} {share:>6.2f}%")
    lines.append(f"{'total':<28} {'':>12} {'':>9} {table['total']:>15,} {100:>6.2f}%")
    if table["padding"]:
        lines.append(f"(+{table['padding']:,} vocabulary padding parameters in memory, "
                     f"rows {config.vocab_size}..{config.embedding_rows - 1}, not counted)")
    return "\n".join(lines)


def run(args) -> int:
    config = GPTConfig.resolve(args.model)
    table = parameter_table(config)
    if args.json:
        print(json.dumps({"model": args.model, "config": config.to_dict(), **table}, indent=2))
    else:
        print(format_table(args.model, config, table))
    return 0


def register(subparsers) -> None:
    p = cli.add_command(subparsers, "info", run, help="per-component parameter table and exact total",
                        description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, type=cli.preset_or_file(PRESETS),
                   help=f"a preset ({', '.join(PRESETS)}) or a YAML file with model keys or a recipe's model: section")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
