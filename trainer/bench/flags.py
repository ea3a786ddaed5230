"""The flags every benchmark takes, defined once: the model shape and the run options.

    ap = flags.parser("ddp", __doc__, shape=("attention", "d_model", ...), defaults={"batch": 16})
    ap.add_argument(...)                          # the benchmark's own flags
    a = flags.parse(ap, argv)                     # a bad value exits (status 2) naming its flag

Shape (`SHAPE`): --attention, --d-model, --n-layers, --n-heads, --mlp-ratio, --seq-len,
--batch; a benchmark takes those it uses (one attention layer has no --n-layers) with its
own defaults. Run options (`RUN`), every benchmark: --warmup (untimed calls before each
trial), --iters (timed calls per trial), --trials (interleaved trials; figures are medians
over them), --seed, --out. Each value is checked while parsing, so argparse's message names
the flag; the shape as a whole is checked by the model's own validation
(`ModelConfig.validate`), its config keys translated to flag names. Nothing has started
then: no process group, no subprocess. `argv_of` and `child_env` hand the flags on to a
benchmark's child processes (one per launch or case).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from models.config import ATTENTION_KINDS, AttentionConfig, ModelConfig, MoEConfig


def number(kind: type = int, low: float = 1, *, above: bool = False):
    """argparse type: a `kind` value >= low (> low with `above`)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expects {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not (value > low if above else value >= low):  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be {'>' if above else '>='} {low:g}, got {value:g}")
        return value
    parse.__name__ = kind.__name__
    return parse


def names(allowed):
    """argparse type: a comma-separated list of distinct names from `allowed`."""
    def parse(text: str) -> list[str]:
        got = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in got if s not in allowed]
        if bad or not got:
            raise argparse.ArgumentTypeError(f"takes a comma-separated list of {','.join(allowed)}; "
                                             f"got {','.join(bad) or 'nothing'}")
        if len(set(got)) != len(got):
            raise argparse.ArgumentTypeError(f"lists a name twice: {text}")
        return got
    parse.__name__ = "list"
    return parse


def tuning_file(text: str):
    """argparse type: a tuning file (parallel/collectives/autotune.py), read and checked."""
    from parallel.collectives import TuningTable
    try:
        return TuningTable.load(text, key="--tuning")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


SHAPE = {
    "attention": dict(default="softmax", help=f"attention kind ({' | '.join(ATTENTION_KINDS)})"),
    "d_model": dict(type=number(), default=128, help="residual width"),
    "n_layers": dict(type=number(), default=4, help="decoder blocks"),
    "n_heads": dict(type=number(), default=4, help="attention heads (GAU is single-headed)"),
    "mlp_ratio": dict(type=number(float, 0, above=True), default=4.0, help="MLP (and expert) width / d_model"),
    "seq_len": dict(type=number(), default=128, help="tokens per sequence"),
    "batch": dict(type=number(), default=16, help="sequences per rank per step"),
}
RUN = {
    "warmup": dict(type=number(int, 0), default=1, help="untimed calls before each trial's timed ones"),
    "iters": dict(type=number(), default=5, help="timed calls (steps, passes) per trial"),
    "trials": dict(type=number(), default=5, help="interleaved trials; the figures are medians over them"),
    "seed": dict(type=int, default=0, help="seed of the weights and the data"),
}
# the model's config keys as this command line spells them (longest first)
_FLAG_OF = {"model.moe.num_experts": "--experts", "model.moe.top_k": "--top-k",
            "model.moe.capacity_factor": "--capacity-factor", "model.mlp_ratio": "--mlp-ratio",
            "model.d_model": "--d-model", "model.n_layers": "--n-layers", "model.n_heads": "--n-heads",
            "model.seq_len": "--seq-len", "attention.kind": "--attention"}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _one_of(allowed):
    def parse(text: str) -> str:
        if text not in allowed:
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(allowed)}, got {text!r}")
        return text
    parse.__name__ = "name"
    return parse


def parser(name: str, doc: str, *, shape: tuple[str, ...], defaults: dict | None = None,
           many_kinds: bool = False) -> argparse.ArgumentParser:
    """The benchmark `name`'s parser with the shape flags it takes and every run option;
    `defaults` overrides the shared defaults; `many_kinds`: --attention takes a comma list."""
    defaults = {"out": f"runs/bench/{name}", **(defaults or {})}
    ap = argparse.ArgumentParser(prog=f"python -m trainer.bench.{name}", description=doc.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    shared = ap.add_argument_group("model shape")
    for key in shape:
        spec = dict(SHAPE[key])
        if key == "attention":
            spec["type"] = names(ATTENTION_KINDS) if many_kinds else _one_of(ATTENTION_KINDS)
        spec["default"] = defaults.get(key, spec["default"])
        shared.add_argument(flag(key), **spec)
    run = ap.add_argument_group("run")
    for key, spec in RUN.items():
        run.add_argument(flag(key), **{**spec, "default": defaults.get(key, spec["default"])})
    run.add_argument("--out", default=defaults["out"],
                     help="folder for table.txt, <name>.csv, <name>.json and <name>.png")
    return ap


def parse(ap: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parses `argv` and checks the shape (`check_shape`)."""
    a = ap.parse_args(argv)
    check_shape(ap, a)
    return a


def check_shape(ap: argparse.ArgumentParser, a: argparse.Namespace, moe: MoEConfig | None = None) -> None:
    """Exits naming the flags when the model's validation refuses the shape (with `moe`: and these experts)."""
    try:
        for model, attention in model_configs(a, moe):
            model.validate(attention)
    except ValueError as e:
        message = str(e)
        for key, name in _FLAG_OF.items():
            message = message.replace(key, name)
        ap.error(message)


def model_configs(a: argparse.Namespace, moe: MoEConfig | None = None) -> list[tuple[ModelConfig, AttentionConfig]]:
    """(ModelConfig, AttentionConfig) per attention kind in `a`; shape flags a benchmark does not
    take keep ModelConfig's defaults."""
    fields = {k: getattr(a, k) for k in ("seq_len", "d_model", "n_layers", "n_heads", "mlp_ratio") if hasattr(a, k)}
    kinds = a.attention if isinstance(a.attention, list) else [a.attention]
    return [(ModelConfig(**fields, moe=moe or MoEConfig()), AttentionConfig(kind=k)) for k in kinds]


def argv_of(a: argparse.Namespace, keys) -> list[str]:
    """The flags that give `keys` their values in `a`, to hand them to a child process."""
    out = []
    for key in keys:
        value = getattr(a, key)
        out += [flag(key), ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return out


def child_env() -> tuple[str, dict]:
    """(cwd, environment) for a child process that must import this checkout (not an installed copy)."""
    root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH")
    return root, {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}


def launch_world_size() -> int:
    """The world size torchrun announces (1 without torchrun): known before any process group."""
    return int(os.environ.get("WORLD_SIZE", "1"))
