"""The shared training loop on a tiny random model: schedules and the SFT loss against transformers,
accumulation invariance, activation checkpointing, bf16 autocast, crash + resume, stale checkpoints."""

from __future__ import annotations

import pytest
import torch
from train_tiny import losses, make_tiny_run_inputs, run_in_process, tiny_args

from llamaherd.data import collate, load_sft_data, pack
from llamaherd.errors import CheckpointError
from llamaherd.load import load_model
from llamaherd.train.core import Trainer, lr_multiplier
from llamaherd.train.sft import SFTObjective


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_run_inputs(tmp_path_factory.mktemp("loop"))


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_lr_schedule_matches_transformers(schedule):
    from transformers import get_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    name = {"constant": "constant_with_warmup"}.get(schedule, schedule)
    ref = get_scheduler(name, opt, num_warmup_steps=5, num_training_steps=40)
    expected = []
    for _ in range(40):
        expected.append(ref.get_last_lr()[0])
        opt.step()
        ref.step()
    ours = [lr_multiplier(s, total=40, warmup=5, schedule=schedule, min_ratio=0.0) for s in range(40)]
    assert ours == pytest.approx(expected, abs=1e-12)


def test_sft_loss_matches_transformers_padded_packed_and_padding_free(tiny):
    from transformers import AutoModelForCausalLM

    model_dir, data = tiny
    loaded = load_model(model_dir)
    samples = load_sft_data(data, loaded.tokenizer, "alpaca", max_seq_len=256).samples[:6]
    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    objective = SFTObjective(loaded.model)

    def hf_sum(sample) -> float:  # labels are already shifted: logits[t] predicts labels[t]
        logits = hf(torch.tensor([sample.input_ids])).logits[0]
        return torch.nn.functional.cross_entropy(logits, torch.tensor(sample.labels), reduction="sum").item()

    expected = sum(hf_sum(s) for s in samples)
    n_trained = sum(sum(t != -100 for t in s.labels) for s in samples)
    with torch.no_grad():
        batches = (collate(samples, pad_id=0), collate(pack(samples, 600), pad_id=0),
                   collate(samples, pad_id=0, padding_free=True))
        for batch in batches:
            assert objective.count(batch) == n_trained
            assert objective(batch).loss_sum.item() == pytest.approx(expected, rel=1e-5)
    assert batches[1]["segment_ids"].max() > 1  # packed rows really were packed
    flat = batches[2]  # one row, no padding
    assert flat["input_ids"].shape == (1, sum(len(s) for s in samples)) and bool((flat["segment_ids"] > 0).all())


def _run(tiny, out, **overrides) -> list[float]:
    model_dir, data = tiny
    run_in_process(tiny_args(model_dir, data, out, **overrides))
    return losses(out)


def test_accumulation_and_checkpointing_do_not_change_the_losses(tiny, tmp_path):
    one = _run(tiny, tmp_path / "micro4", micro_batch_size=4, max_steps=4)
    padded = _run(tiny, tmp_path / "padded", micro_batch_size=4, max_steps=4, padding_free=False)
    accumulated = _run(tiny, tmp_path / "micro1", micro_batch_size=1, max_steps=4)
    recomputed = _run(tiny, tmp_path / "ckpt", micro_batch_size=2, max_steps=4, activation_checkpointing=True)
    assert accumulated == pytest.approx(one, rel=1e-5)
    assert padded == pytest.approx(one, rel=1e-5)
    assert recomputed == pytest.approx(one, rel=1e-5)


def test_bf16_autocast_trains_close_to_fp32(tiny, tmp_path):
    fp32 = _run(tiny, tmp_path / "fp32", max_steps=3)
    bf16 = _run(tiny, tmp_path / "bf16", max_steps=3, bf16=True)
    assert bf16 == pytest.approx(fp32, rel=0.03)


def test_crash_then_resume_is_exact_and_ignores_half_written_checkpoints(tiny, tmp_path, monkeypatch):
    common = {"max_steps": 10, "save_every": 3, "eval_every": 4}
    ref = _run(tiny, tmp_path / "ref", **common)
    out = tmp_path / "crash"
    step = Trainer.train_step

    def crash_after_7(self):
        if self.step == 7:
            raise RuntimeError("simulated crash")
        return step(self)

    monkeypatch.setattr(Trainer, "train_step", crash_after_7)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tiny, out, **common)
    monkeypatch.setattr(Trainer, "train_step", step)
    (out / "checkpoints" / "step-00000009.tmp").mkdir()  # a write the crash interrupted
    assert _run(tiny, out, resume=True, **common) == ref
    assert not (out / "checkpoints" / "step-00000009.tmp").exists()
    with pytest.raises(CheckpointError, match="lr"):
        _run(tiny, out, resume=True, lr=5e-4, **common)
    with pytest.raises(CheckpointError, match="--resume"):  # a fresh run never mixes with an earlier one
        _run(tiny, out, **common)


@pytest.mark.parametrize("tied", [True, False])
def test_fused_head_loss_matches_autograd_cross_entropy(tied, monkeypatch):
    """Loss and gradients (hidden states and head weight) against torch's own cross-entropy through autograd,
    with slices smaller than the batch so the slicing is exercised; a LoRA head takes the module path."""
    from llamaherd.config import Config
    from llamaherd.lora import LoRAConfig, inject_lora
    from llamaherd.model import GPT
    from llamaherd.train import head_loss

    torch.manual_seed(0)
    model = GPT(Config(vocab_size=300, n_layer=1, n_head=2, n_embd=16, intermediate_size=24,
                       tie_embeddings=tied)).double().train()  # float64: differences are the method's, not rounding
    monkeypatch.setattr(head_loss, "SLICE_BYTES", 4 * 300 * 7)  # 7 rows per slice
    h0, labels = torch.randn(30, 16, dtype=torch.float64), torch.randint(0, 300, (30,))
    weight = model.output_weight

    def loss_and_grads(fn):
        h = h0.clone().requires_grad_(True)
        weight.grad = None
        loss = fn(h)
        (2.5 * loss).backward()  # a scaled loss, as the trainer's normalisation does
        return loss.detach(), h.grad, weight.grad.clone()

    fused = loss_and_grads(lambda h: head_loss.head_cross_entropy(model, h, labels))
    reference = loss_and_grads(lambda h: torch.nn.functional.cross_entropy(h @ weight.t(), labels, reduction="sum"))
    for got, want in zip(fused, reference, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # validation: the loss only
        torch.testing.assert_close(head_loss.head_cross_entropy(model, h0, labels).double(), reference[0])
    if not tied:
        inject_lora(model, LoRAConfig(r=2, targets=("lm_head",)))
        with torch.no_grad():
            model.lm_head.lora_B.weight.normal_()  # a non-zero adapter, so the module path matters
            want = torch.nn.functional.cross_entropy(model.head(h0), labels, reduction="sum")
            assert not torch.allclose(want, reference[0])
            torch.testing.assert_close(head_loss.head_cross_entropy(model, h0, labels).double(), want)
