"""What every stage of a run shares: stage timing and memory (`Stages`), the prepared inputs
(`Prepared`), the lm-eval tasks in the serving precision, and the per-pass progress bar."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..config import RunConfig
from ..data import Texts
from ..evaluate.lm_eval import Tasks
from ..memory import StageMemory
from ..model.adapters import Adapter
from ..model.loading import LoadedModel


class Stages:
    """Seconds per stage, summed when a stage runs more than once, and each stage's peak memory."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.memory = StageMemory()

    @contextmanager
    def timed(self, name: str):
        t = time.perf_counter()
        self.memory.start()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t, 3)
            self.memory.stop(name)


@dataclass
class Prepared:
    """The inputs of a run after loading: the model (resident, or a skeleton on the meta device out
    of core), its adapter and the token windows."""

    loaded: LoadedModel
    adapter: Adapter
    texts: Texts
    domains: list = field(default_factory=list)  # data.Domain: evaluation text of other domains

    # the windows under the names the benchmarks and tests use
    @property
    def calib(self) -> torch.Tensor:
        return self.texts.calib

    @property
    def heldout(self) -> torch.Tensor:
        return self.texts.heldout

    @property
    def validation(self) -> torch.Tensor:
        return self.texts.validation


def serving_precision(profile) -> str | None:
    """The autocast dtype in which the dense and the pruned model are judged (perplexities, lm-eval)
    for a profile: bfloat16 where the profile serves bfloat16 (the precision the export will be
    served in), None (the model's own dtype) otherwise. What chooses or re-fits weights
    (statistics, the allocation search, compensation, recovery) stays in full precision
    (docs/benchmarks.md, "Does judging in the served precision change the figures?")."""
    return "bfloat16" if profile.dtype == "bfloat16" else None


def run_tasks(heldout_text: str, cfg: RunConfig, profile) -> Tasks:
    """The run's lm-eval tasks (disabled with --no-checks), scored in `serving_precision`."""
    return Tasks(heldout_text, cfg.checks, vllm=cfg.lm_eval_backend == "vllm", n_cloze=cfg.eval_items,
                 precision=serving_precision(profile))


@contextmanager
def layer_progress(console, layers: int):
    """A progress bar over the layers, restarted with the pass's name whenever the driver starts
    another pass; yields the `progress(pass_name, done, total)` callback the drivers call."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} layers"),
                  TimeElapsedColumn(), console=console, transient=False) as bar:
        task = bar.add_task("", total=layers, visible=False)

        def progress(pass_name: str, done: int, total: int) -> None:
            if bar.tasks[task].description != pass_name:  # the driver started another pass
                bar.reset(task, total=total, description=pass_name, visible=True)
            bar.update(task, completed=done)

        yield progress


