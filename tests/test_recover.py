"""Recovery by distillation (compressor/recover): on tiny random models, the pruned student moves
towards the dense teacher on text it did not train on, in full and with LoRA (merged back: the
architecture is the pruned one), and the training text never holds evaluation text."""

from __future__ import annotations

import copy

import pytest
import torch

from compressor.prune.driver import Compute, PruneSpec, prune
from compressor.recover.distill import LoRALinear, distill, full_lr, recovery_windows, teacher_targets, topk_kl
from tests.conftest import tiny_model


def _pruned_pair(seed: int = 0):
    from compressor.model import adapter_for

    torch.manual_seed(seed)
    teacher = tiny_model("llama-gqa", seed=seed, layers=2, vocab_size=128, hidden_size=48, intermediate_size=96)
    with torch.no_grad():  # peaked next-token distributions, as a trained model's (a random one's are flat)
        teacher.lm_head.weight.mul_(30)
    student = copy.deepcopy(teacher)
    adapter = adapter_for(student)
    calib = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(seed))
    prune(student, adapter, calib, PruneSpec(metric="flap", compensation="lsq+bias", structure="uniform", ratio=0.5,
                                             round_to=8), Compute())
    return teacher, student, adapter


def _kl(student, targets) -> float:
    with torch.no_grad():
        return float(topk_kl(student(input_ids=targets.windows, use_cache=False).logits[:, :-1],
                             targets.top_ids, targets.top_logp))


def test_topk_kl_is_zero_for_the_teacher_itself_and_positive_otherwise():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 40)
    t = torch.log_softmax(logits, -1).topk(8, -1)
    assert float(topk_kl(logits, t.indices, t.values.half())) < 1e-3
    assert float(topk_kl(torch.randn(2, 5, 40), t.indices, t.values.half())) > 0.05


def test_the_learning_rate_grows_with_what_pruning_removed():
    assert [full_lr(k) for k in (1.0, 0.8, 0.5)] == [1.6e-4, 2e-4, 3.2e-4]
    assert full_lr(0.0) == full_lr(0.05) and full_lr(1.5) == full_lr(1.0)  # clamped
    teacher, student, _ = _pruned_pair()
    train = teacher_targets(teacher, torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(3)), k=8)
    with pytest.raises(ValueError, match="needs `kept`"):  # no silent unpruned rate for a pruned model
        distill(student, train, tokens=31 * 4)


def test_distillation_brings_the_pruned_model_towards_the_dense_one_on_unseen_text():
    teacher, student, _ = _pruned_pair()
    gen = torch.Generator().manual_seed(1)
    train = teacher_targets(teacher, torch.randint(0, 128, (16, 32), generator=gen), k=16)
    unseen = teacher_targets(teacher, torch.randint(0, 128, (8, 32), generator=gen), k=16)
    before = _kl(student, unseen)
    res = distill(student, train, tokens=16 * 31 * 6, lr=1e-4, batch_size=4)
    after = _kl(student, unseen)
    assert res.mode == "full, embeddings frozen" and res.tokens >= 16 * 31 * 6 and res.loss_last < 0.5 * res.loss_first
    assert after < 0.9 * before, (before, after)  # measured 0.062 -> 0.048


def test_a_bfloat16_student_trains_in_float32_and_comes_back_in_bfloat16():
    """A checkpoint held in bfloat16 (--dtype auto) recovers like a float32 one: its parameters train
    in float32 and are handed back in bfloat16, moved towards the teacher."""
    teacher, student, _ = _pruned_pair()
    student.to(torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    train = teacher_targets(teacher, torch.randint(0, 128, (16, 32), generator=gen), k=16)
    buffers = {n: b.dtype for n, b in student.named_buffers()}
    before = _kl(student, train)
    start = {n: p.clone() for n, p in student.named_parameters()}
    distill(student, train, tokens=16 * 31 * 6, lr=1e-4, batch_size=4)
    assert {p.dtype for p in student.parameters()} == {torch.bfloat16}
    assert {n: b.dtype for n, b in student.named_buffers()} == buffers
    assert any(not torch.equal(p, start[n]) for n, p in student.named_parameters())
    assert _kl(student, train) < 0.9 * before


def test_lora_recovery_is_merged_back_into_the_pruned_shapes():
    teacher, student, adapter = _pruned_pair()
    shapes = {n: p.shape for n, p in student.named_parameters()}
    gen = torch.Generator().manual_seed(2)
    train = teacher_targets(teacher, torch.randint(0, 128, (16, 32), generator=gen), k=16)
    before = _kl(student, train)
    res = distill(student, train, tokens=16 * 31 * 6, lr=1.5e-4, batch_size=4, lora_rank=4,
                  decoder_layers=adapter.layers(student))
    assert res.mode == "lora (rank 4)"
    assert not any(isinstance(m, LoRALinear) for m in student.modules())
    assert {n: p.shape for n, p in student.named_parameters()} == shapes
    assert _kl(student, train) < 0.9 * before


def test_recovery_text_holds_no_evaluation_text(tiny_model_dir):
    """The recovery windows are the calibration region of the builtin text (found there, inside it)
    and the model's own samples (found nowhere in it); no held-out window (the reported perplexity, and
    the region the lm-eval items are cut from) and no cross-domain window is one of them. (The builtin
    text repeats some sentences verbatim across its regions, so shorter shared runs are no leak.)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compressor.data import REGIONS, domain_windows, load_source, load_texts

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    windows = recovery_windows("builtin", tok, model, 24, 64, seed=0)
    assert windows.shape == (24, 64)
    stream = load_source("builtin", tok).ids
    calib_end = int(REGIONS["calibration"][1] * stream.numel())
    haystack = stream.to(torch.int32).numpy().tobytes()
    in_builtin = 0
    for w in windows:
        needle = w.to(torch.int32).numpy().tobytes()
        hits, at = [], haystack.find(needle)
        while at != -1:
            if at % 4 == 0:
                hits.append(at // 4)
            at = haystack.find(needle, at + 1)
        if hits:
            in_builtin += 1
            assert any(h + 64 <= calib_end for h in hits), hits
    assert in_builtin == 12  # half the windows: the builtin share; the other half the model's samples
    texts = load_texts("builtin", tok, model, 4, 64, 40, 0)
    trained = {tuple(w.tolist()) for w in windows}
    for block in [texts.heldout] + [d.windows for d in domain_windows(tok, 64, 8)]:
        assert not trained & {tuple(w.tolist()) for w in block}


@pytest.mark.parametrize("where", ["off", "on"])
def test_the_main_command_recovers_and_reports_it(tmp_path, tiny_model_dir, where):
    """In memory (every parameter trains) and out of core (LoRA, streamed; the adapters added to the
    export's shards, which then load as a plain checkpoint)."""
    from tests.conftest import run_main

    out = tmp_path / "o"
    p = run_main(str(tiny_model_dir), "--ratio", "0.3", "--no-checks", "--nsamples", "4", "--seqlen", "64",
                 "--round-to", "8", "--domain-windows", "2", "--recover-tokens", "1000", "--out-of-core", where,
                 "--out", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    import json

    r = json.loads((out / "report.json").read_text())
    rec = r["recovery"]
    assert rec["tokens"] >= 1000 and rec["tokens_requested"] == 1000
    assert rec["mode"] == ("full, embeddings frozen" if where == "off"
                           else "lora (rank 16), streamed one layer at a time")
    assert rec["before"]["heldout_perplexity"] > 0 and rec["before"]["cross_domain_perplexity"] > 0
    assert rec["before"]["heldout_perplexity"] != r["perplexity"]["pruned"]
    assert {"recover_teacher", "recover"} <= set(r["seconds"])
    assert "recovery: " in p.stderr
    if where == "on":
        from transformers import AutoModelForCausalLM

        assert AutoModelForCausalLM.from_pretrained(out) is not None
        assert not list(out.parent.glob(".*fitprune-work*"))


def test_adapters_are_added_to_the_shards_once(tmp_path):
    """A resumed run merging again leaves the weights as the first merge wrote them."""
    from safetensors.torch import load_file, save_file

    from compressor.recover.streamed import merge_into_shards

    save_file({"a.weight": torch.ones(2, 2), "b.weight": torch.zeros(3)}, str(tmp_path / "model.safetensors"))
    factors = {"a.weight.lora_a": torch.ones(1, 2), "a.weight.lora_b": torch.ones(2, 1),
               "lora_scale": torch.tensor(0.5)}
    assert merge_into_shards(tmp_path, factors) == 1
    assert merge_into_shards(tmp_path, factors) == 1
    got = load_file(str(tmp_path / "model.safetensors"))
    assert torch.equal(got["a.weight"], torch.full((2, 2), 1.5)) and torch.equal(got["b.weight"], torch.zeros(3))
    assert [f.name for f in tmp_path.iterdir()] == ["model.safetensors"]


def test_streamed_recovery_takes_the_in_memory_steps():
    """Layer by layer (the teacher's targets with the LM head a vocabulary slice at a time, the LoRA
    training with each layer read again and recomputed for its backward pass) the tiny pair gives the
    in-memory targets and the in-memory LoRA recovery's weights."""
    from compressor.model.lazy import Resident
    from compressor.recover.streamed import delta, distill_streamed, streamed_teacher_targets

    teacher, student, adapter = _pruned_pair()
    windows = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(3))
    whole = teacher_targets(teacher, windows, k=16)
    streamed = streamed_teacher_targets(Resident(teacher), adapter_of(teacher), windows, k=16, vocab_chunk=48)
    assert torch.equal(whole.top_ids, streamed.top_ids)
    assert torch.allclose(whole.top_logp.float(), streamed.top_logp.float(), atol=2e-3)
    other = copy.deepcopy(student)
    res = distill(student, whole, tokens=8 * 31 * 3, batch_size=4, lora_rank=4, decoder_layers=adapter.layers(student))
    res2, factors = distill_streamed(Resident(other), adapter_of(other), whole, tokens=8 * 31 * 3, lora_rank=4,
                                    batch_size=4)
    assert res2.steps == res.steps and abs(res2.loss_first - res.loss_first) < 1e-5
    moved, gap = 0.0, 0.0
    with torch.no_grad():
        for name, p in other.named_parameters():
            if f"{name}.lora_a" in factors:
                p += delta(factors, name)
        before = dict(_pruned_pair()[1].named_parameters())
        for (name, a), (_, b) in zip(student.named_parameters(), other.named_parameters(), strict=True):
            moved = max(moved, float((a - before[name]).abs().max()))
            gap = max(gap, float((a - b).abs().max()))
    assert len(factors) == 1 + 2 * 2 * 7 and moved > 1e-4 and gap < 1e-6, (moved, gap)


def adapter_of(model):
    from compressor.model import adapter_for

    return adapter_for(model)


@pytest.mark.parametrize("args, match", [
    (["--recover-tokens", "1000", "--quantize", "w8a8-int8"], "without --ratio prunes nothing"),
    (["--ratio", "0.3", "--recover-lora", "8"], "--recover-lora 8 shapes a recovery"),
    (["--ratio", "0.3", "--recover-tokens", "-5"], "--recover-tokens must be between 0 and"),
], ids=["quantize-only", "lora-alone", "negative"])
def test_recovery_options_refused_in_one_sentence(tmp_path, tiny_model_dir, args, match):
    from tests.conftest import assert_clean_failure, run_main

    out = tmp_path / "o"
    p = run_main(str(tiny_model_dir), "--no-checks", *args, "--out", str(out))
    assert_clean_failure(p, out, match)


# ---- compress recover: an existing export, on one process or two (torchrun, gloo) -----------------

@pytest.fixture(scope="module")
def pruned_tiny_dir(tmp_path_factory, tiny_model_dir):
    """tiny_model_dir pruned 50% (uniform) and exported with its tokenizer."""
    from compressor.model import adapter_for
    from compressor.model.loading import load
    from exporters import export_hf

    loaded = load(str(tiny_model_dir))
    calib = torch.randint(0, 1024, (8, 32), generator=torch.Generator().manual_seed(0))
    prune(loaded.model, adapter_for(loaded.model), calib, PruneSpec(metric="flap", compensation="lsq+bias",
                                                                    structure="uniform", ratio=0.5, round_to=8),
          Compute())
    path = tmp_path_factory.mktemp("pruned-tiny")
    export_hf(loaded.model, loaded.tokenizer, path)
    return path


def _weights(folder):
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


RECOVER = ["--tokens", "2048", "--seqlen", "32", "--batch-size", "4", "--seed", "3"]


def test_recover_command_on_two_processes_matches_one_process(tmp_path, tiny_model_dir, pruned_tiny_dir):
    """The same global batch on 1 process and on 2 (torchrun, gloo): the same recovered weights within
    1% of how far recovery moved them; the gradients are averaged in another order over 17 AdamW
    steps, whose normalised updates carry that rounding on."""
    import json
    import socket
    import subprocess
    import sys

    from tests.conftest import ROOT, run_main

    one, two = tmp_path / "one", tmp_path / "two"
    p = run_main("recover", str(pruned_tiny_dir), "--teacher", str(tiny_model_dir), *RECOVER, "--out", str(one))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "recovery: 2,108 tokens" in " ".join(p.stderr.split())  # 17 steps of 4 x 31 positions
    with socket.socket() as s:  # a free port for the processes' rendezvous
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                        port, "-m", "compressor", "recover", str(pruned_tiny_dir), "--teacher", str(tiny_model_dir),
                        *RECOVER, "--out", str(two)], capture_output=True, text=True, cwd=ROOT, timeout=600,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    figures = json.loads((two / "recovery.json").read_text())
    assert figures["processes"] == 2 and figures["tokens"] == 2108 and "2 processes" in figures["mode"]
    w0, w1, w2 = _weights(pruned_tiny_dir), _weights(one), _weights(two)
    assert w0.keys() == w1.keys() == w2.keys()
    assert all(w1[k].shape == w0[k].shape for k in w0)  # the pruned architecture, recovered
    moved = max(float((w1[k].float() - w0[k].float()).abs().max()) for k in w0)
    diff = max(float((w1[k].float() - w2[k].float()).abs().max()) for k in w0)
    print(f"recovery moved weights by up to {moved:.2e}; 1 vs 2 processes differ by {diff:.2e}")
    assert moved > 1e-4 and diff <= 0.01 * moved, (moved, diff)  # measured 1.75e-3 and 1.3e-6


@pytest.mark.parametrize("args, match", [
    (["--tokens", "0"], "--tokens must be at least 1"),
    (["--tokens", "100", "--lora", "-1"], "--lora must be 0"),
    (["--tokens", "100", "--device", "cuda"], "is not available on this machine"),
], ids=["tokens", "lora", "device"])
def test_recover_command_refuses_bad_options_in_one_sentence(tmp_path, tiny_model_dir, pruned_tiny_dir, args, match):
    from tests.conftest import assert_clean_failure, run_main

    out = tmp_path / "o"
    p = run_main("recover", str(pruned_tiny_dir), "--teacher", str(tiny_model_dir), *args, "--out", str(out))
    assert_clean_failure(p, out, match)


def test_recover_command_refuses_a_folder_that_is_no_export(tmp_path, tiny_model_dir):
    from tests.conftest import assert_clean_failure, run_main

    out = tmp_path / "o"
    p = run_main("recover", str(tmp_path), "--teacher", str(tiny_model_dir), "--tokens", "100", "--out", str(out))
    assert_clean_failure(p, out, "is not an exported model directory")
