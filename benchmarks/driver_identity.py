"""Bit-identity of the pruning driver across a refactor: prune the embedded SmolLM2 through
`prune/driver.py: prune` in many metric/compensation/structure configurations (8 x 128 calibration
tokens, seed 1, 30%, one thread) and print the SHA-256 of each pruned state dict in float32. Run it
on two checkouts and compare the lines (it does not go through the CLI, so `--structure auto`'s
search does not hide the driver):

    PYTHONPATH=/path/to/old/checkout python benchmarks/driver_identity.py > old.txt
    PYTHONPATH=. python benchmarks/driver_identity.py > new.txt && diff old.txt new.txt
"""

from __future__ import annotations

import hashlib

import torch

CONFIGS = [("flap", "bias", "global"), ("flap", "lsq+bias", "global"), ("flap", "bias", "uniform"),
           ("wanda-sp", "lsq", "global"), ("output-approx", "lsq+bias", "global"),
           ("output-approx", "lsq+bias", "uniform"), ("mi", "fold", "global"), ("taylor", "none", "global"),
           ("flap", "lsq-dense+bias", "global"), ("obs", "lsq", "global")]


def main() -> None:
    from compressor.config import RunConfig
    from compressor.pipeline import prepare
    from compressor.prune.driver import Compute, PruneSpec, prune

    torch.set_num_threads(1)
    cfg = RunConfig(nsamples=8, seqlen=128, seed=1)
    for metric, comp, structure in CONFIGS:
        torch.manual_seed(1)
        prep = prepare(cfg)
        spec = PruneSpec(metric=metric, compensation=comp, structure=structure, ratio=0.3)
        res = prune(prep.loaded.model, prep.adapter, prep.calib, spec, Compute(batch_size=4))
        h = hashlib.sha256()
        for k, v in sorted(prep.loaded.model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().float().contiguous().numpy().tobytes())
        print(metric, comp, structure, res.passes, h.hexdigest()[:16], flush=True)


if __name__ == "__main__":
    main()
