"""Calibration and evaluation text: the one place that says which text is calibrated on and which
is held out.

`--calib` accepts:
  * `builtin` (default): real English text present on every Python install (the pydoc topic
    pages of `pydoc_data`). Its token stream is split into three disjoint regions: calibration
    (first 70%), validation (next 10%, used by searches) and held-out test (last 20%, used for the
    reported perplexity);
  * a local `.txt` file, or a `.jsonl` file with a "text" field per line;
  * `hf:NAME[:CONFIG[:SPLIT]]`, a Hugging Face dataset (needs the hub and the `datasets` package);
  * `self`: text the model generates itself from its BOS token (sampled, seeded).

Several sources are mixed by joining them with `+` (`builtin+self`, `builtin+notes.txt+hf:NAME`);
each contributes an equal share of the N calibration windows (the first N mod k sources one more),
and the windows are interleaved source by source so any prefix of them is mixed too. `builtin`'s
share comes from its calibration region only. A file whose own name holds a `+` is taken whole when
it exists.

N samples of L tokens are drawn as seeded random windows of each source's calibration token stream
(`self`'s text, generated for the run, is cut into consecutive windows, none repeated).

Evaluation text of other domains, never calibrated on by `builtin` (`domain_windows`): Python
source code, licence texts, Debian package changelogs and the prose of standard-library docstrings
(`docstring_paragraphs`, which the lm-eval cloze task draws on too). A method is judged on these, not
only on the held-out region of the calibration text's own stream, which flatters methods that
re-fit weights to the calibration domain.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError

REGIONS = {"calibration": (0.0, 0.7), "validation": (0.7, 0.8), "test": (0.8, 1.0)}
HELDOUT = "builtin held-out region (last 20% of the pydoc topics token stream)"


def builtin_text() -> str:
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def _read_file(path: Path) -> str:
    if path.is_dir():
        raise UserError(f"The calibration file {path} is a directory; give a .txt or .jsonl file.")
    if path.exists() and not path.is_file():
        raise UserError(f"The calibration file {path} is not a regular file (a device, pipe or socket); "
                        "give a .txt or .jsonl file.")
    if not path.is_file():
        raise UserError(f"The calibration file {path} does not exist.")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"The calibration file {path} is not UTF-8 text (bad byte at offset {exc.start}).") from exc
    if path.suffix == ".jsonl":
        parts = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                parts.append(str(json.loads(line)["text"]))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise UserError(f"Line {n} of {path} is not a JSON object with a 'text' field.") from exc
        return "\n\n".join(parts)
    return text


def _hf_text(spec: str) -> str:
    name, config, split = (spec.split(":") + [None, None])[:3]
    try:
        import datasets
    except ImportError as exc:
        raise UserError("Hugging Face datasets as calibration need the package 'datasets'.") from exc
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as exc:  # the hub is unreachable, or no such dataset
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"Could not load the dataset {name} from the Hugging Face hub: {first}") from exc
    column = "text" if "text" in ds.column_names else ds.column_names[0]
    return "\n\n".join(str(t) for t in ds[column] if t)


def self_generated_ids(model, tokenizer, n_tokens: int, seed: int, chunk: int = 256) -> torch.Tensor:
    """Tokens the model samples itself, starting from its BOS token (data-free calibration)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    out: list[torch.Tensor] = []
    total = 0
    batch = 8
    while total < n_tokens:
        start = torch.full((batch, 1), bos, dtype=torch.long)
        # vary the first real token so the sequences differ
        first = torch.randint(0, model.config.vocab_size, (batch, 1), generator=gen)
        prompt = torch.cat([start, first], 1).to(next(model.parameters()).device)
        ids = model.generate(prompt, do_sample=True, top_p=0.95, temperature=1.0,
                             max_new_tokens=chunk, min_new_tokens=chunk, pad_token_id=bos)
        out.append(ids[:, 1:].reshape(-1).cpu())
        total += out[-1].numel()
    return torch.cat(out)[:n_tokens]


@dataclass
class TextSource:
    """A token stream with its regions; what `--calib` names."""

    spec: str
    ids: torch.Tensor  # 1-D token ids
    split_regions: bool  # True when calibration, validation and test come from this one stream

    def region(self, name: str) -> torch.Tensor:
        if not self.split_regions:
            return self.ids
        lo, hi = REGIONS[name]
        n = self.ids.numel()
        return self.ids[int(lo * n): int(hi * n)]


def tokenize(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def load_source(spec: str, tokenizer, model=None, n_tokens: int = 0, seed: int = 0) -> TextSource:
    if spec == "builtin":
        return TextSource(spec, tokenize(tokenizer, builtin_text()), split_regions=True)
    if spec == "self":
        if model is None:
            raise UserError("'--calib self' needs the model to generate its own text.")
        return TextSource(spec, self_generated_ids(model, tokenizer, n_tokens, seed), split_regions=False)
    if spec.startswith("hf:"):
        return TextSource(spec, tokenize(tokenizer, _hf_text(spec[3:])), split_regions=False)
    return TextSource(spec, tokenize(tokenizer, _read_file(Path(spec).expanduser())), split_regions=False)


def sample_windows(ids: torch.Tensor, n: int, seqlen: int, seed: int, what: str = "calibration") -> torch.Tensor:
    """N seeded random windows of `seqlen` tokens; refuses a stream shorter than N x L tokens."""
    if n < 1 or seqlen < 2:
        raise UserError("--nsamples must be at least 1 and --seqlen at least 2.")
    if ids.numel() < n * seqlen:
        raise UserError(
            f"The {what} text has {ids.numel()} tokens, fewer than the {n} x {seqlen} = {n * seqlen} asked for; "
            "give more text or lower --nsamples / --seqlen."
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (n,), generator=gen)
    return torch.stack([ids[s: s + seqlen] for s in starts.tolist()])


def contiguous_chunks(ids: torch.Tensor, seqlen: int, max_chunks: int | None = None) -> torch.Tensor:
    """Non-overlapping windows, in order: the held-out perplexity text."""
    n = ids.numel() // seqlen
    if max_chunks is not None:
        n = min(n, max_chunks)
    if n == 0:
        raise UserError(f"The evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}.")
    return ids[: n * seqlen].view(n, seqlen)


@dataclass
class Texts:
    """The token windows of one run."""

    calib: torch.Tensor  # [nsamples, seqlen] calibration windows
    heldout: torch.Tensor  # [windows, seqlen] held-out windows: the reported perplexity, never calibrated on
    heldout_text: str  # the same held-out region as text (the lm-eval tasks are built from it)
    validation: torch.Tensor  # token stream for searches: neither calibration nor held-out


MIX = "+"  # joins the sources of a mixed --calib; not in a source name, and in practice in no path


def calib_parts(calib: str) -> list[str]:
    """The sources `calib` names: one, or several joined by `+` (a file that exists under the whole
    name, `+` and all, is one source). An empty or repeated part is refused with one sentence."""
    if MIX not in calib or Path(calib).expanduser().is_file():
        return [calib]
    parts = [p.strip() for p in calib.split(MIX)]
    if any(not p for p in parts):
        raise UserError(f"--calib '{calib}' has an empty part; join sources with '{MIX}', "
                        f"e.g. builtin{MIX}self.")
    repeated = sorted({p for p in parts if parts.count(p) > 1})
    if repeated:
        raise UserError(f"--calib '{calib}' names {repeated[0]} twice; each source is one equal share.")
    return parts


def shares(n: int, k: int) -> list[int]:
    """N windows split over k sources as evenly as possible (the first N mod k get one more)."""
    return [n // k + (i < n % k) for i in range(k)]


def interleave(blocks: list[torch.Tensor]) -> torch.Tensor:
    """Rows of each block taken in turn (a0, b0, a1, b1, ..., then the longer blocks' rest), so any
    prefix of the calibration windows (a search's subset, a metric's gradient samples) is mixed too."""
    rows = [b[i] for i in range(max(b.shape[0] for b in blocks)) for b in blocks if i < b.shape[0]]
    return torch.stack(rows)


def calib_windows(calib: str, tokenizer, model, nsamples: int, seqlen: int, seed: int,
                  builtin: TextSource | None = None) -> torch.Tensor:
    """The [nsamples, seqlen] calibration windows of `calib` (one source or a `+` mix of several)."""
    parts = calib_parts(calib)
    if len(parts) > 1 and nsamples < len(parts):
        raise UserError(f"--calib mixes {len(parts)} sources but --nsamples is {nsamples}; each source needs at "
                        "least one window.")
    blocks = []
    for spec, n in zip(parts, shares(nsamples, len(parts)), strict=True):
        if spec == "builtin":
            src = builtin or load_source("builtin", tokenizer)
        else:
            src = load_source(spec, tokenizer, model=model, n_tokens=n * seqlen, seed=seed)
        what = "calibration" if len(parts) == 1 else f"calibration ('{spec}')"
        if spec == "self" and n >= 1 and seqlen >= 2:
            # generated for exactly these windows: consecutive, so no token is calibrated on twice
            blocks.append(contiguous_chunks(src.ids, seqlen, n))
        else:
            blocks.append(sample_windows(src.region("calibration"), n, seqlen, seed, what))
    return blocks[0] if len(blocks) == 1 else interleave(blocks)


def load_texts(calib: str, tokenizer, model, nsamples: int, seqlen: int, eval_samples: int, seed: int) -> Texts:
    """Calibration windows from `calib`; held-out and validation text from the builtin text's own
    regions (whatever `calib` is, so figures stay comparable across calibration sources)."""
    builtin = load_source("builtin", tokenizer)
    test = builtin.region("test")
    heldout = contiguous_chunks(test, seqlen, eval_samples)
    windows = calib_windows(calib, tokenizer, model, nsamples, seqlen, seed, builtin)
    return Texts(windows, heldout, tokenizer.decode(test.tolist()), builtin.region("validation"))


# Standard-library modules (paths under the stdlib folder) whose docstrings hold the most prose; a
# file missing in some Python version is skipped. Nothing is imported.
DOCSTRING_FILES = (
    "argparse.py", "bdb.py", "configparser.py", "difflib.py", "doctest.py", "email/message.py", "ftplib.py",
    "http/client.py", "http/cookiejar.py", "http/server.py", "inspect.py", "ipaddress.py", "json/__init__.py",
    "logging/__init__.py", "logging/handlers.py", "optparse.py", "pdb.py", "shutil.py", "smtplib.py",
    "socketserver.py", "ssl.py", "statistics.py", "subprocess.py", "tarfile.py", "threading.py",
    "traceback.py", "typing.py", "unittest/case.py", "unittest/mock.py", "urllib/parse.py", "urllib/request.py",
)
DOCSTRINGS = "docstrings of 31 standard-library modules (prose paragraphs, read from their source)"


def is_prose(paragraph: str) -> bool:
    """Mostly plain words: not code, tables or doctests."""
    words = paragraph.split()
    plain = sum(bool(re.fullmatch(r"[A-Za-z][a-z'\u2019-]*[,.;:]?", w)) for w in words)
    return ">>>" not in paragraph and plain >= 0.8 * len(words)


def docstring_paragraphs(min_words: int = 24) -> list[str]:
    """Prose paragraphs (whitespace collapsed) of the docstrings of standard-library modules: a second
    evaluation domain present on every Python install and never calibrated on by `builtin` (API
    documentation, where the pydoc topics are the language reference). The text follows the Python
    version, as the pydoc topics do. The triple-quoted strings of the source are read with a regular
    expression (parsing the modules took seconds on a loaded 2-core host; this takes well under one);
    the few that are not docstrings (usage texts) are prose of the same kind."""
    import inspect

    stdlib = _stdlib()
    out: list[str] = []
    for rel in DOCSTRING_FILES:
        try:
            source = (stdlib / rel).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        for m in re.finditer(r'(?s)("""|\'\'\')(.*?)\1', source):
            for para in re.split(r"\n\s*\n", inspect.cleandoc(m.group(2))):
                text = re.sub(r"\s+", " ", para).strip()
                if len(text.split()) >= min_words and is_prose(text):
                    out.append(text)
    return out


def heldout_text(tokenizer) -> str:
    """The held-out region of the builtin text, as text (what the lm-eval tasks are built from)."""
    return tokenizer.decode(load_source("builtin", tokenizer).region("test").tolist())


# ---- evaluation text of other domains -----------------------------------------------------------

# Standard-library modules read as source code (comments and all); none is among DOCSTRING_FILES.
CODE_FILES = (
    "heapq.py", "bisect.py", "fractions.py", "textwrap.py", "string.py", "csv.py", "calendar.py", "colorsys.py",
    "dataclasses.py", "functools.py", "contextlib.py", "enum.py", "pathlib.py", "random.py", "queue.py",
    "sched.py", "shlex.py", "tokenize.py", "zipfile.py", "gzip.py", "base64.py", "pprint.py", "copy.py",
)
# Licence texts: Python's own LICENSE.txt, then Debian's common licences where the system has them.
LICENSES = ("GPL-3", "Apache-2.0", "MPL-2.0", "LGPL-3", "Artistic", "GFDL-1.3", "CC0-1.0", "GPL-2")
DOMAIN_CHARS = 400_000  # at most this much text of a domain is tokenized (a few seconds at most)


def _stdlib() -> Path:
    import sysconfig

    return Path(sysconfig.get_paths()["stdlib"])


def _read_all(paths, limit: int = DOMAIN_CHARS) -> str:
    parts, size = [], 0
    for path in paths:
        try:
            if str(path).endswith(".gz"):
                import gzip

                text = gzip.decompress(Path(path).read_bytes()).decode("utf-8")
            else:
                text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError, EOFError):
            continue
        parts.append(text)
        size += len(text)
        if size >= limit:
            break
    return "\n\n".join(parts)[:limit]


def code_text() -> str:
    return _read_all(_stdlib() / f for f in CODE_FILES)


def legal_text() -> str:
    return _read_all([_stdlib() / "LICENSE.txt"] + [Path("/usr/share/common-licenses") / n for n in LICENSES])


def changelog_text() -> str:
    """Debian packages' changelogs (terse English with names, versions and bug numbers), in package order."""
    return _read_all(sorted(Path("/usr/share/doc").glob("*/changelog.Debian.gz")))


def docstring_text() -> str:
    return "\n\n".join(docstring_paragraphs())[:DOMAIN_CHARS]


# name -> (what it is, the function that reads it). A domain whose text this machine lacks is skipped,
# and the report names the domains it used.
DOMAINS = {
    "code": ("Python source of 23 standard-library modules", code_text),
    "legal": ("licence texts (Python's LICENSE.txt, /usr/share/common-licenses)", legal_text),
    "changelogs": ("Debian package changelogs (/usr/share/doc/*/changelog.Debian.gz)", changelog_text),
    "docstrings": (DOCSTRINGS, docstring_text),
}


@dataclass
class Domain:
    name: str
    description: str
    windows: torch.Tensor  # [n, seqlen], spread evenly over the domain's token stream


def domain_windows(tokenizer, seqlen: int, windows: int, names=None) -> list[Domain]:
    """`windows` windows of `seqlen` tokens from each domain of `names` (default: all) that this
    machine has text for (at least one window's worth), spread evenly over the domain's text."""
    out = []
    for name in names or DOMAINS:
        description, read = DOMAINS[name]
        ids = tokenize(tokenizer, read())
        n_all = ids.numel() // seqlen
        if n_all == 0:
            continue
        picks = torch.linspace(0, n_all - 1, min(windows, n_all)).round().long().unique()
        out.append(Domain(name, description, torch.stack([ids[i * seqlen:(i + 1) * seqlen] for i in picks.tolist()])))
    return out
