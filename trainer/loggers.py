"""Where logged metrics go. metrics.jsonl is always written by rank 0 (MetricsFile);
a logger (`logger._target_`) adds a console line or a wandb run on top."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from parallel.atomic import atomic_write

from .config import LoggerConfig

log = logging.getLogger("ringtrain.train")


def _fmt(v) -> str:
    if isinstance(v, float):
        if v == 0 or math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


class MetricsFile:
    """One JSON object per logged step in <run_dir>/metrics.jsonl, flushed each line so a
    crash loses nothing already logged. A fresh run starts the file anew; a run resumed at
    step N keeps the records up to N (later ones were logged after that checkpoint, by a
    launch that died, and are logged again)."""

    def __init__(self, run_dir: Path, *, resumed_at: int | None):
        self.path = Path(run_dir) / "metrics.jsonl"
        kept = []
        if resumed_at is not None and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= resumed_at:
                        kept.append(line + "\n")
                except (ValueError, KeyError):
                    break  # a line cut by the crash: drop it and what follows
            atomic_write(self.path, lambda fh: fh.write("".join(kept).encode()))
        self._fh = open(self.path, "a" if resumed_at is not None else "w", buffering=1)

    def write(self, record: dict) -> None:
        self._fh.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._fh.close()


class ConsoleLogger:
    """One line per logged step in rank 0's log (the run directory's log file and stderr)."""

    def __init__(self, cfg: LoggerConfig, *, run_dir: Path, config: dict):
        self.run_dir = run_dir

    def log(self, record: dict) -> None:
        step = record.get("step")
        rest = "  ".join(f"{k} {_fmt(v)}" for k, v in record.items() if k != "step")
        log.info(f"step {step}  {rest}")

    def close(self) -> None:
        pass


class WandbLogger(ConsoleLogger):
    """Also logs every record, and the resolved config, to a wandb run (offline by default)."""

    def __init__(self, cfg: LoggerConfig, *, run_dir: Path, config: dict):
        super().__init__(cfg, run_dir=run_dir, config=config)
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self._wandb = wandb
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, mode=cfg.mode,
                              name=cfg.run_name or Path(run_dir).name, tags=list(cfg.tags),
                              dir=str(run_dir), config=config, resume="allow",
                              id=_stable_run_id(run_dir))

    def log(self, record: dict) -> None:
        super().log(record)
        self.run.log({k: v for k, v in record.items() if k != "step"}, step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()


def _stable_run_id(run_dir: Path) -> str:
    """A resumed run (same directory) continues the same wandb run."""
    import hashlib

    return hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]


def build_logger(cfg: LoggerConfig, *, run_dir: Path, config: dict):
    """Instantiates `cfg._target_` (validated to be one of the classes above)."""
    cls = {"trainer.loggers.ConsoleLogger": ConsoleLogger, "trainer.loggers.WandbLogger": WandbLogger}[cfg._target_]
    return cls(cfg, run_dir=run_dir, config=config)
