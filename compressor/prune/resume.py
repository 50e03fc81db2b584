"""Resumable runs: the per-layer state of an out-of-core prune, kept in a work directory beside
`--out` so that an interrupted run (Ctrl-C, SIGTERM, killed) continues where it stopped.

What is kept:
- pass 1 (score): each finished layer's scores and light statistics (`pass1/layer-0000i.safetensors`);
- pass 2 (prune + write): the layers already written to the output's shards (the shard writer's
  parts) and the kept units of every layer written so far;
- the activations entering the next layer (`acts-PASS-NNNNN.safetensors`), so the engine restarts there.

Everything is written atomically (temporary name + rename) and in float64 where the run holds
float64, so a resumed run computes exactly what an uninterrupted one does. A fingerprint of the
run's settings guards against resuming with other settings.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import UserError
from .allocation import LayerScores
from .engine import LayerStats, RunningStats
from .surgery import LayerKeep

WORK_SUFFIX = ".fitprune-work"


def work_dir_for(out: Path) -> Path:
    out = Path(out).absolute()
    return out.parent / f".{out.name}{WORK_SUFFIX}"


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".partial")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _stats_tensors(prefix: str, st: RunningStats) -> dict[str, torch.Tensor]:
    t = {f"{prefix}.n": torch.tensor([st.n], dtype=torch.int64), f"{prefix}.mean": st.mean.cpu(),
         f"{prefix}.m2": st.m2.cpu()}
    if st.gram is not None:
        t[f"{prefix}.gram"] = st.gram.cpu()
    return t


def _stats_from(prefix: str, t: dict[str, torch.Tensor]) -> RunningStats:
    st = RunningStats(t[f"{prefix}.mean"].numel())
    st.n, st.mean, st.m2 = int(t[f"{prefix}.n"][0]), t[f"{prefix}.mean"], t[f"{prefix}.m2"]
    st.gram = t.get(f"{prefix}.gram")
    return st


def _flat_extra(extra: dict) -> dict[str, torch.Tensor] | None:
    """A metric's per-layer extras as named tensors (one level of dicts), or None if it has others."""
    out = {}
    for k, v in extra.items():
        items = v.items() if isinstance(v, dict) else [("", v)]
        for k2, v2 in items:
            if not isinstance(v2, torch.Tensor):
                return None
            out[f"extra.{k}.{k2}"] = v2.cpu()
    return out


def _extra_from(t: dict[str, torch.Tensor]) -> dict:
    extra: dict = {}
    for name, v in t.items():
        if name.startswith("extra."):
            _, k, k2 = name.split(".", 2)
            if k2:
                extra.setdefault(k, {})[k2] = v
            else:
                extra[k] = v
    return extra


class WorkState:
    """The work directory of one out-of-core run."""

    def __init__(self, folder: Path, fingerprint: dict):
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.state: dict = {"fingerprint": fingerprint, "pass1_done": 0, "pass2_done": 0, "keeps": [], "parts": [],
                            "allocated": None, "resumable": True}

    # ---- lifecycle ---------------------------------------------------------------------------
    @property
    def export_dir(self) -> Path:
        return self.folder / "export"

    def create(self) -> None:
        (self.folder / "pass1").mkdir(parents=True, exist_ok=True)
        self.export_dir.mkdir(exist_ok=True)
        self.save()

    def load(self) -> None:
        """Read the state of an interrupted run; refused if it was started with other settings."""
        try:
            state = json.loads((self.folder / "state.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"The work directory {self.folder} has no readable state; remove it and run "
                            "again without --resume.") from exc
        if state.get("fingerprint") != self.fingerprint:
            diff = sorted(k for k in set(self.fingerprint) | set(state.get("fingerprint", {}))
                          if self.fingerprint.get(k) != state.get("fingerprint", {}).get(k))
            raise UserError(f"Cannot resume: the interrupted run in {self.folder} used other settings "
                            f"({', '.join(diff)}); rerun with the same options, or without --resume.")
        if not state.get("resumable", True):
            raise UserError(f"The interrupted run in {self.folder} cannot be resumed (its metric keeps state that is "
                            "not saved); run again without --resume.")
        self._check(state)
        self.state = state
        # parts written after the last saved state are not part of it: drop them
        known = {p["file"] for p in state["parts"]}
        for f in self.export_dir.glob("part-*"):
            if f.name not in known:
                f.unlink()

    def _check(self, state: dict) -> None:
        """The state's fields have their types and the files it names are there (a damaged or
        hand-edited work directory is one sentence, not a traceback half-way through the run)."""
        def damaged(what: str) -> UserError:
            return UserError(f"The work directory {self.folder} is damaged ({what}); remove it and run again "
                             "without --resume.")

        counts = [state.get(k) for k in ("pass1_done", "pass2_done")]
        if not all(type(c) is int and c >= 0 for c in counts):
            raise damaged("its layer counts are not non-negative integers")
        if not all(isinstance(state.get(k), list) for k in ("keeps", "parts")):
            raise damaged("its kept units or written parts are not lists")
        for i in range(state["pass1_done"]):
            if not (self.folder / "pass1" / f"layer-{i:05d}.safetensors").is_file():
                raise damaged(f"pass1/layer-{i:05d}.safetensors, which its state names, is missing")
        parts = state["parts"]
        n = len(parts)
        final = ["model.safetensors"] if n == 1 else [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
        for part, name in zip(parts, final, strict=True):
            file = part.get("file") if isinstance(part, dict) else None
            if not isinstance(file, str) or Path(file).name != file or not isinstance(part.get("keys"), list):
                raise damaged("a written part is not a file name with its tensor names")
            if not (self.export_dir / file).is_file() and not (self.export_dir / name).is_file():
                raise damaged(f"export/{file}, which its state names, is missing")

    def _load(self, path: Path) -> dict[str, torch.Tensor]:
        """A file of the work directory, or one sentence when it is missing or unreadable."""
        try:
            return load_file(str(path))
        except Exception as exc:  # OSError, or safetensors' own error types for a corrupt file
            raise UserError(f"The work directory {self.folder} is damaged ({path.relative_to(self.folder)} is "
                            "missing or unreadable); remove it and run again without --resume.") from exc

    def save(self) -> None:
        """Write the state as it is now (atomically)."""
        tmp = self.folder / "state.json.partial"
        tmp.write_text(json.dumps(self.state))
        os.replace(tmp, self.folder / "state.json")

    # ---- pass 1 --------------------------------------------------------------------------------
    @property
    def pass1_done(self) -> int:
        return int(self.state["pass1_done"])

    def save_pass1_layer(self, i: int, scores: LayerScores, stats: LayerStats, acts: dict[str, torch.Tensor]) -> None:
        t = {"scores.attn": scores.attn, "scores.mlp": scores.mlp,
             **_stats_tensors("attn", stats.attn), **_stats_tensors("mlp", stats.mlp)}
        extra = _flat_extra(stats.extra)
        if extra is None:
            self.state["resumable"] = False
        else:
            t.update(extra)
        _atomic_save(t, self.folder / "pass1" / f"layer-{i:05d}.safetensors")
        kept = self.save_acts(acts, "pass1", i + 1)
        self.state["pass1_done"] = i + 1
        self.save()
        self._drop_acts(kept)

    def load_pass1_layer(self, i: int, shape, hidden: int) -> tuple[LayerScores, LayerStats]:
        path = self.folder / "pass1" / f"layer-{i:05d}.safetensors"
        t = self._load(path)
        try:
            scores = LayerScores(shape, hidden, t["scores.attn"], t["scores.mlp"])
            return scores, LayerStats(_stats_from("attn", t), _stats_from("mlp", t), _extra_from(t))
        except KeyError as exc:
            raise UserError(f"The work directory {self.folder} is damaged (pass1/{path.name} has no {exc}); "
                            "remove it and run again without --resume.") from exc

    def save_allocation(self, keeps: list[LayerKeep]) -> None:
        self.state["allocated"] = [_keep_dict(k) for k in keeps]
        self.save()

    def allocation(self) -> list[LayerKeep] | None:
        a = self.state.get("allocated")
        return None if a is None else [LayerKeep(**k) for k in a]

    # ---- pass 2 --------------------------------------------------------------------------------
    @property
    def pass2_done(self) -> int:
        return int(self.state["pass2_done"])

    def keeps(self) -> list[LayerKeep]:
        return [LayerKeep(**k) for k in self.state["keeps"]]

    def save_pass2(self, done: int, keeps: list[LayerKeep], parts: list[dict], acts: dict | None) -> None:
        kept = self.save_acts(acts, "pass2", done) if acts is not None else None
        self.state.update(pass2_done=done, keeps=[_keep_dict(k) for k in keeps[:done]], parts=parts)
        self.save()
        if kept is not None:
            self._drop_acts(kept)

    # ---- activations -----------------------------------------------------------------------------
    def save_acts(self, acts: dict[str, torch.Tensor], which: str, start: int) -> Path:
        """The inputs of layer `start` of pass `which`, under a name of their own: the state saved
        after them points at them, and the ones it pointed at before stay until then."""
        path = self.folder / f"acts-{which}-{start:05d}.safetensors"
        _atomic_save({k: v.cpu() for k, v in acts.items()}, path)
        return path

    def _drop_acts(self, keep: Path) -> None:
        for f in self.folder.glob("acts-*.safetensors"):
            if f != keep:
                f.unlink(missing_ok=True)

    def acts(self, which: str, start: int) -> dict[str, torch.Tensor]:
        return self._load(self.folder / f"acts-{which}-{start:05d}.safetensors")


def _keep_dict(k: LayerKeep) -> dict:
    return {"q_heads": list(map(int, k.q_heads)), "kv_heads": list(map(int, k.kv_heads)),
            "channels": list(map(int, k.channels))}
