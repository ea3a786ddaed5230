"""`python -m trainer.export CHECKPOINT OUT`: one consolidated file for inference.

CHECKPOINT is a `checkpoints/step_<N>/` directory (any parallelism: its model.pt is
already the full, gathered model); OUT gets {"model_config", "attention_config",
"step", "state_dict"}, loadable with `load_exported` without Hydra or a process group.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from models.config import AttentionConfig, ModelConfig
from models.transformer import DecoderLM

from parallel.atomic import atomic_write

from . import checkpoint
from .structured import build


def export(checkpoint_dir: str | Path, out: str | Path) -> Path:
    ckpt = Path(checkpoint_dir)
    if not (ckpt / "meta.json").is_file() or not (ckpt / "model.pt").is_file():
        raise ValueError(f"CHECKPOINT={str(ckpt)!r} is not a complete checkpoint directory (meta.json, model.pt)")
    run_config = ckpt.parent.parent / "config.yaml"
    if not run_config.is_file():
        raise ValueError(f"CHECKPOINT={str(ckpt)!r}: the run's config.yaml is not at {run_config}")
    cfg = OmegaConf.to_container(OmegaConf.load(run_config), resolve=True)
    model_cfg = build(ModelConfig, cfg["model"], "model")
    attn_cfg = build(AttentionConfig, cfg["attention"], "attention")
    state = checkpoint.read_model_state(ckpt)
    DecoderLM(model_cfg, attn_cfg).load_state_dict(state)  # refuses a mismatched model before writing
    payload = {"model_config": dataclasses.asdict(model_cfg), "attention_config": dataclasses.asdict(attn_cfg),
               "step": checkpoint.read_meta(ckpt)["step"], "state_dict": state}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda fh: torch.save(payload, fh))
    return out


def load_exported(path: str | Path) -> DecoderLM:
    """The exported model, in eval mode."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    model = DecoderLM(ModelConfig(**payload["model_config"]), AttentionConfig(**payload["attention_config"]))
    model.load_state_dict(payload["state_dict"])
    return model.eval()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", help="a checkpoints/step_<N>/ directory")
    ap.add_argument("out", help="the file to write")
    a = ap.parse_args(argv)
    try:
        path = export(a.checkpoint, a.out)
    except ValueError as e:
        print(f"trainer.export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
