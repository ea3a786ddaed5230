"""Fitting: measurements read from results.csv, non-negative least squares per (algorithm, op),
and `CostModel`, which predicts and refuses what its fit cannot determine."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from .features import *  # noqa: F401,F403  (the constants and feature functions)
from .features import Features, features

# -- non-negative least squares ----------------------------------------------------------------

def nnls(A, b, max_iter: int | None = None) -> np.ndarray:
    """argmin ||A x - b|| subject to x >= 0 (Lawson and Hanson's active-set method)."""
    A, b = np.asarray(A, float), np.asarray(b, float)
    m, n = A.shape
    x = np.zeros(n)
    passive = np.zeros(n, bool)  # the set of variables free to be > 0
    barred = np.zeros(n, bool)  # could not enter for round-off; offered again once x moves
    tol = 10 * np.finfo(float).eps * max(np.linalg.norm(A, 1), 1.0) * max(m, n)
    max_iter = max_iter or 30 * (n + 1)

    def solve(mask):
        z = np.zeros(n)
        if mask.any():
            z[mask] = np.linalg.lstsq(A[:, mask], b, rcond=None)[0]
        return z

    for _ in range(max_iter):
        w = A.T @ (b - A @ x)
        free = ~passive & ~barred
        if not free.any() or not (w[free] > tol).any():
            return x
        j = int(np.argmax(np.where(free, w, -np.inf)))
        passive[j] = True
        z = solve(passive)
        if z[j] <= 0:  # the gradient says j should enter, the solve disagrees: round-off
            passive[j], barred[j] = False, True
            continue
        for _ in range(max_iter):
            neg = passive & (z <= 0)
            if not neg.any():
                break
            ratios = x[neg] / (x[neg] - z[neg])
            k = np.flatnonzero(neg)[int(np.argmin(ratios))]
            x = x + float(ratios.min()) * (z - x)
            x[k] = 0.0
            passive &= x > 0
            x[~passive] = 0.0
            z = solve(passive)
        else:
            raise RuntimeError("nnls: the inner loop did not converge")
        x = z
        barred[:] = False
    raise RuntimeError("nnls did not converge")


# -- measurements ------------------------------------------------------------------------------

class InputError(ValueError):
    """Bad input to the CLI: the message names the argument (and file)."""


class UnevenLayout(ValueError):
    """A row whose nodes hold different numbers of ranks: no node-major N x P to model."""


@dataclass(frozen=True)
class Measurement:
    """One results.csv row, as the model reads it."""

    op: str
    algorithm: str
    nodes: int
    ranks_per_node: int
    size_bytes: int
    seconds: float
    dtype: str = "float32"
    source: str = ""

    @property
    def layout(self) -> str:
        return f"{self.nodes}x{self.ranks_per_node}"

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    @classmethod
    def from_mapping(cls, d: Mapping, source: str = "") -> "Measurement":
        """From a results.csv row (strings) or a dict with the same keys; a row without nodes /
        ranks_per_node is one node of world_size ranks."""
        world = int(d["world_size"])
        nodes = d.get("nodes")
        nodes = 1 if nodes in (None, "") else int(nodes)
        if "ranks_per_node" not in d:  # a file from before the layout columns: one node
            if world % nodes:
                raise UnevenLayout(f"world_size {world} is not a multiple of nodes {nodes}")
            rpn = world // nodes
        elif d["ranks_per_node"] in (None, ""):
            raise UnevenLayout(f"{nodes} nodes holding different numbers of the {world} ranks")
        else:
            rpn = int(d["ranks_per_node"])
        if nodes * rpn != world:
            raise ValueError(f"nodes {nodes} x ranks_per_node {rpn} != world_size {world}")
        op = str(d["op"])
        if op not in OPS:
            raise ValueError(f"unknown op {op!r} (ops: {', '.join(OPS)})")
        return cls(op, str(d["algorithm"]), nodes, rpn, int(float(d["size_bytes"])),
                   float(d["time_us"]) * 1e-6, str(d.get("dtype") or "float32"), source)


def _json_layout(csv_path: Path) -> tuple[dict | None, str | None]:
    """The layout in results.json's meta beside a results.csv without layout columns:
    ({"world_size", "nodes", "ranks_per_node"}, note) or (None, note-or-None)."""
    j = csv_path.with_suffix(".json")
    if not j.is_file():
        return None, None
    try:
        meta = json.loads(j.read_text()).get("meta", {})
        layout = {k: meta[k] for k in ("world_size", "nodes", "ranks_per_node")}
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, KeyError, TypeError):
        return None, f"{j}: no layout in its meta; rows of {csv_path} taken as one node"
    return layout, f"{csv_path}: layout {layout['nodes']}x{layout['ranks_per_node']} from {j.name}'s meta"


def read_results(path, arg: str = "--fit") -> tuple[list[Measurement], list[str]]:
    """(measurements, notes) of one results.csv; rows that cannot be used (a wrong result, a
    non-positive time, an uneven layout) are left out with a note. Without nodes /
    ranks_per_node columns the layout comes from results.json's meta beside it, else one node.
    Anything else wrong raises InputError naming `arg` and the file."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{arg} {path}: no such file")
    try:
        with open(p, newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in REQUIRED_COLUMNS if c not in header]
            if missing:
                raise InputError(f"{arg} {path}: not a results.csv: missing column(s) {', '.join(missing)}")
            rows, notes, skipped = [], [], Counter()
            layout = None
            if "nodes" not in header and "ranks_per_node" not in header:
                layout, note = _json_layout(p)
                notes += [note] if note else []
            for i, d in enumerate(reader, start=2):
                if layout is not None and str(d.get("world_size")) == str(layout["world_size"]):
                    d = {**d, "nodes": layout["nodes"],
                         "ranks_per_node": "" if layout["ranks_per_node"] is None else layout["ranks_per_node"]}
                try:
                    m = Measurement.from_mapping(d, str(path))
                    wrong = int(float(d.get("wrong") or 0))
                except UnevenLayout:
                    skipped["an uneven layout (the model needs N x P)"] += 1
                    continue
                except (ValueError, TypeError, KeyError) as e:
                    raise InputError(f"{arg} {path}: line {i}: {e}") from None
                if wrong:
                    skipped["a wrong result"] += 1
                elif not m.seconds > 0:
                    skipped["time_us <= 0"] += 1
                else:
                    rows.append(m)
            notes += [f"{path}: left out {c} row(s): {why}" for why, c in skipped.items()]
            return rows, notes
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"{arg} {path}: cannot read it ({e})") from None


# -- the model ---------------------------------------------------------------------------------

@dataclass
class Fit:
    """The fitted parameters of one (algorithm, op)."""

    algorithm: str
    op: str
    params: np.ndarray  # seconds per step / per byte; nan where undetermined
    status: list[str]  # per parameter: fitted | given | confounded | undetermined
    basis: np.ndarray  # orthonormal rows spanning the scaled fitting features
    scale: np.ndarray  # column scale the basis is expressed in
    rows: int = 0
    layouts: dict[str, int] = field(default_factory=dict)
    fit_median_abs_error_pct: float | None = None
    confounded_with: dict[str, list[str]] = field(default_factory=dict)

    def estimable(self, x: np.ndarray) -> bool:
        xs = x / self.scale
        norm = float(np.linalg.norm(xs))
        if norm == 0:
            return True
        res = xs - self.basis.T @ (self.basis @ xs) if len(self.basis) else xs
        return float(np.linalg.norm(res)) <= 1e-6 * norm

    def to_json(self) -> dict:
        nums = lambda a: [None if not math.isfinite(v) else float(v) for v in a]  # noqa: E731
        return {"algorithm": self.algorithm, "op": self.op,
                "params": dict(zip(PARAMS, nums(self.params))), "status": dict(zip(PARAMS, self.status)),
                "confounded_with": self.confounded_with, "rows": self.rows, "layouts": self.layouts,
                "fit_median_abs_error_pct": self.fit_median_abs_error_pct,
                "scale": nums(self.scale), "basis": [nums(r) for r in self.basis]}

    @classmethod
    def from_json(cls, d: dict) -> "Fit":
        params = np.array([np.nan if d["params"][k] is None else float(d["params"][k]) for k in PARAMS])
        basis = np.array([[float(v) for v in r] for r in d["basis"]], dtype=float).reshape(-1, 5)
        return cls(d["algorithm"], d["op"], params, [str(d["status"][k]) for k in PARAMS], basis,
                   np.array([float(v) for v in d["scale"]]), int(d.get("rows", 0)),
                   {str(k): int(v) for k, v in d.get("layouts", {}).items()},
                   d.get("fit_median_abs_error_pct"), dict(d.get("confounded_with", {})))


def _rank(M: np.ndarray) -> int:
    if M.size == 0:
        return 0
    s = np.linalg.svd(M, compute_uv=False)
    return int((s > 1e-9 * s[0]).sum()) if s[0] > 0 else 0


def _fit_group(algorithm: str, op: str, X: np.ndarray, y: np.ndarray, layouts: dict[str, int]) -> Fit:
    A = X / y[:, None]
    scale = np.abs(A).max(axis=0)
    used = scale > 0
    safe = np.where(used, scale, 1.0)
    As = A / safe
    kept: list[int] = []
    for j in range(5):  # alphas, then betas, then gamma: gamma is the one left out when confounded
        if used[j] and _rank(As[:, kept + [j]]) == len(kept) + 1:
            kept.append(j)
    theta = np.full(5, np.nan)
    theta[used] = 0.0
    theta[kept] = nnls(As[:, kept], np.ones(len(y))) / safe[kept]
    status, confounded = [], {}
    for j in range(5):
        if not used[j]:
            status.append("undetermined")
        elif j in kept:
            status.append("fitted")
        else:
            status.append("confounded")
            c = np.linalg.lstsq(As[:, kept], As[:, j], rcond=None)[0]
            confounded[PARAMS[j]] = [PARAMS[kept[i]] for i in range(len(kept)) if abs(c[i]) > 1e-9]
    _, s, vt = np.linalg.svd(As, full_matrices=False)
    basis = vt[: int((s > 1e-9 * s[0]).sum())] if s.size and s[0] > 0 else np.zeros((0, 5))
    pred = X @ np.nan_to_num(theta)
    err = float(np.median(np.abs(pred - y) / y) * 100)
    return Fit(algorithm, op, theta, status, basis, safe, len(y), dict(sorted(layouts.items())), round(err, 3),
               confounded)


class CostModel:
    """Fitted (or given) parameters per (algorithm, op); `predict` in seconds."""

    def __init__(self, fits: Mapping[tuple[str, str], Fit], nics: int = 1, sources: Iterable[str] = (),
                 notes: Iterable[str] = ()):
        self.fits = dict(fits)
        self.nics = int(nics)
        self.sources = list(sources)
        self.notes = list(notes)

    # -- building -----------------------------------------------------------------------------
    @classmethod
    def fit(cls, rows: Iterable, *, nics: int = 1) -> "CostModel":
        """Fits every (algorithm, op) present in `rows` (Measurement objects or results.csv-like
        mappings). auto rows, worlds of one and pairs without a model are left out (see .notes)."""
        groups: dict[tuple[str, str], list[Measurement]] = {}
        sources, skipped = [], Counter()
        for r in rows:
            m = r if isinstance(r, Measurement) else Measurement.from_mapping(r)
            if m.source and m.source not in sources:
                sources.append(m.source)
            if m.algorithm == "auto":
                skipped["auto rows (predicted as the fastest other algorithm, never fitted)"] += 1
            elif m.algorithm not in MODELLED or m.op not in MODELLED[m.algorithm]:
                skipped[f"{m.algorithm} {m.op} rows (no model)"] += 1
            elif m.world_size == 1:
                skipped["rows of a world of one (nothing moves)"] += 1
            elif not m.seconds > 0:
                skipped["rows with time <= 0"] += 1
            else:
                groups.setdefault((m.algorithm, m.op), []).append(m)
        fits = {}
        for (algorithm, op), ms in groups.items():
            X = np.array([features(op, algorithm, m.size_bytes, m.nodes, m.ranks_per_node, dtype=m.dtype,
                                   nics=nics) for m in ms])
            y = np.array([m.seconds for m in ms])
            fits[(algorithm, op)] = _fit_group(algorithm, op, X, y, dict(Counter(m.layout for m in ms)))
        notes = [f"left out {c} {why}" for why, c in skipped.items()]
        return cls(fits, nics, sources, notes)

    @classmethod
    def from_params(cls, params: Mapping[tuple[str, str], Mapping[str, float]], nics: int = 1) -> "CostModel":
        """A model from stated parameters ({(algorithm, op): {"alpha_intra": s, ...}}); a parameter
        left out is undetermined."""
        fits = {}
        for (algorithm, op), ps in params.items():
            unknown = set(ps) - set(PARAMS)
            if unknown:
                raise ValueError(f"unknown parameter(s) {sorted(unknown)}; parameters: {list(PARAMS)}")
            theta = np.array([float(ps[k]) if k in ps else np.nan for k in PARAMS])
            if (theta[np.isfinite(theta)] < 0).any():
                raise ValueError(f"parameters must be >= 0, got {dict(ps)}")
            given = np.isfinite(theta)
            fits[(algorithm, op)] = Fit(algorithm, op, theta, ["given" if g else "undetermined" for g in given],
                                        np.eye(5)[given], np.ones(5))
        return cls(fits, nics)

    @classmethod
    def load(cls, path) -> "CostModel":
        """Reads what `save` wrote; a bad file is a ValueError naming it."""
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ValueError(f"{path}: no such file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a readable JSON file ({e})") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ValueError(f"{path}: not a cost-model parameter file (format must be {FORMAT!r})")
        try:
            fits = [Fit.from_json(d) for d in raw["models"]]
            return cls({(f.algorithm, f.op): f for f in fits}, int(raw.get("nics", 1)), raw.get("sources", []))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: malformed cost-model file ({type(e).__name__}: {e})") from None

    def save(self, path) -> None:
        """JSON: per (algorithm, op) the parameters (seconds per step / per byte; null where
        undetermined), their status, the rows and layouts they were fitted from."""
        doc = {"format": FORMAT, "units": {"alpha": "seconds per latency step", "beta": "seconds per byte",
                                           "gamma": "seconds per byte reduced"},
               "nics": self.nics, "sources": self.sources,
               "models": [f.to_json() for _, f in sorted(self.fits.items())]}
        Path(path).write_text(json.dumps(doc, indent=1) + "\n")

    # -- using --------------------------------------------------------------------------------
    def features(self, op: str, algorithm: str, nbytes: float, nodes: int, ranks_per_node: int,
                 dtype: str = "float32") -> Features:
        return features(op, algorithm, nbytes, nodes, ranks_per_node, dtype=dtype, nics=self.nics)

    def predict(self, op: str, algorithm: str, nbytes: float, nodes: int, ranks_per_node: int,
                dtype: str = "float32") -> float:
        """Predicted seconds of one call. Raises Undetermined when the fit cannot answer (a
        parameter the query needs was never determined, or no fit for the pair), ValueError on
        a bad argument."""
        if op not in OPS:
            raise ValueError(f"op must be one of {list(OPS)}, got {op!r}")
        if algorithm == "auto":
            return self._predict_auto(op, nbytes, nodes, ranks_per_node, dtype)
        x = self.features(op, algorithm, nbytes, nodes, ranks_per_node, dtype).as_array()
        fit = self.fits.get((algorithm, op))
        if fit is None:
            raise Undetermined(f"no fit for {algorithm} {op}: the fitting data had no such rows")
        if not fit.estimable(x):
            need = [PARAMS[j] for j in range(5) if x[j] != 0 and fit.status[j] not in ("fitted", "given")]
            need = need or [PARAMS[j] for j in range(5) if x[j] != 0]
            parts = []
            for k in need:
                if k in fit.confounded_with:
                    parts.append(f"{k} (confounded with {', '.join(fit.confounded_with[k])} in the fit)")
                else:
                    parts.append(k)
            seen = ", ".join(fit.layouts) if fit.layouts else "none"
            raise Undetermined(f"cannot predict {algorithm} {op} on {nodes}x{ranks_per_node}: it needs "
                               f"{', '.join(parts)}, which the fitting rows (layouts {seen}) do not determine")
        return float(np.nan_to_num(fit.params) @ x)

    def _predict_auto(self, op, nbytes, nodes, ranks_per_node, dtype) -> float:
        best, why = None, []
        for (algorithm, o) in sorted(self.fits):
            if o != op or algorithm == "auto":
                continue
            try:
                t = self.predict(op, algorithm, nbytes, nodes, ranks_per_node, dtype)
            except Undetermined as e:
                why.append(str(e))
                continue
            best = t if best is None else min(best, t)
        if best is None:
            raise Undetermined(f"cannot predict auto {op} on {nodes}x{ranks_per_node}: no other algorithm "
                               f"can be predicted there" + (f" ({'; '.join(why)})" if why else ""))
        return best

    def summary(self) -> str:
        """The parameters as a table: alpha in us, beta and gamma as GB/s (1 / value)."""
        def show(f: Fit, j: int) -> str:
            st = f.status[j]
            if st == "undetermined":
                return "n/a" if (j == 4 and f.op not in REDUCING) else "undetermined"
            if st == "confounded":
                return "confounded"
            v = f.params[j]
            if j < 2:
                return f"{v * 1e6:.2f} us"
            return "inf GB/s" if v == 0 else f"{1 / v / 1e9:.4g} GB/s"
        head = (f"#{'algorithm':>9} {'op':>14} {'rows':>5} {'layouts':>16} " +
                " ".join(f"{k:>13}" for k in PARAMS) + f" {'fit err':>8}")
        lines = [f"# cost model ({len(self.fits)} algorithm/op pairs, links per node {self.nics}); "
                 f"alpha per step, beta and gamma as GB/s = 1/value", head]
        for (algorithm, op), f in sorted(self.fits.items()):
            err = "-" if f.fit_median_abs_error_pct is None else f"{f.fit_median_abs_error_pct:.1f}%"
            lays = ",".join(f.layouts) or "-"
            lines.append(f" {algorithm:>9} {op:>14} {f.rows:>5} {lays:>16} " +
                         " ".join(f"{show(f, j):>13}" for j in range(5)) + f" {err:>8}")
            for k, others in f.confounded_with.items():
                lines.append(f"#   {algorithm} {op}: {k} is confounded with {', '.join(others)} in this data "
                             f"(set to 0; they carry its cost)")
        return "\n".join(lines)
