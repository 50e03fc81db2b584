"""The model card (README.md beside the weights): what was done and what was measured."""

from __future__ import annotations

from pathlib import Path

from .schema import Report


def _cross_domain_row(ppl: dict) -> str:
    cd = ppl.get("cross_domain")
    if not cd:
        return ""
    return (f"| cross-domain perplexity (geometric mean over {', '.join(cd['domains'])}; not the calibration "
            f"text's domain) | {cd['dense']:.3f} | {cd['pruned']:.3f} |\n")


def model_card(report: Report) -> str:
    r = report.as_dict()
    m, p, ppl = r["method"], r["params"], r["perplexity"]
    ppl_label = f"held-out perplexity, in-domain ({ppl['windows']} x {ppl['seqlen']} tokens, {ppl['device']})"
    b = r.get("budget")
    verdict = f"- Budget of profile `{r['profile']}`: {b['verdict']} (report.md).\n" if b and b.get("verdict") else ""
    return f"""---
library_name: transformers
tags: [fitprune, structured-pruning]
---
# {Path(r['model']).name} pruned with fitprune

- Method: metric `{m['metric']}`, compensation `{m['compensation']}`, structure `{m['structure']}`,
  {m['ratio_requested']:.0%} of decoder weights requested, widths rounded to {m['round_to']}.
- Calibration: {m['nsamples']} x {m['seqlen']} tokens from `{m['calib']}`, seed {m['seed']}.
- Parameters: {p['before']['total']:,} -> {p['after']['total']:,} total; decoder {p['before']['decoder']:,} ->
  {p['after']['decoder']:,} ({p['achieved_ratio_decoder']:.1%} removed).
- Format: {r['export']['format']} (`{r['export']['architecture']}`, {r['export']['dtype']}).
{verdict}
## Measured
| | dense | pruned |
|---|---|---|
| {ppl_label} | {ppl['dense']:.3f} | {ppl['pruned']:.3f} |
{_cross_domain_row(ppl)}
Per-layer widths (query heads / KV heads / MLP channels): {r['widths']['q_heads']} / {r['widths']['kv_heads']} /
{r['widths']['intermediate']}.

## Load
```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("PATH")  # fitprune-format exports: add trust_remote_code=True
```
"""
