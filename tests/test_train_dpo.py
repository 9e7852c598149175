"""DPO on a tiny random Llama against independent references: TRL's DPOTrainer (+ peft) step by step for the
sigmoid, conservative (label-smoothed) and IPO losses, transformers' log-probs for both batch layouts, a frozen
copy of the model for the LoRA reference, and one process for two (DDP, FSDP2 + LoRA); the reference cache."""

from __future__ import annotations

import functools
import json
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from eval_tiny import save_tiny_eval_model
from train_tiny import WORDS, Crash, crash_at, losses, run_in_process, subprocess_env, torchrun_cmd

from llamaherd.load import load_model
from llamaherd.lora import adapters_disabled, lora_layers
from llamaherd.train import distributed as D
from llamaherd.train import dpo
from llamaherd.train.config import TrainConfig
from llamaherd.train.core import Trainer
from llamaherd.train.head_loss import head_log_probs
from llamaherd.train.run import prepare_model

METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected")


@dataclass
class Pair:
    """The fields of llamaherd.data.preference.PreferencePair that DPO reads."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    margin: float = 0.0
    source: str = ""


def token_pairs(n: int, seed: int = 0) -> list[Pair]:
    """Random pairs over the tiny vocabulary: BOS + prompt, answers ending in EOS (ids 1 and 2)."""
    rng = random.Random(seed)

    def ids(lo: int, hi: int) -> list[int]:
        return [rng.randrange(3, 128) for _ in range(rng.randint(lo, hi))]

    return [Pair([1, *ids(2, 8)], [*ids(1, 6), 2], [*ids(1, 6), 2]) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model dir, preference JSON file): a tiny random Llama with its BPE tokenizer, 40 text pairs."""
    root = tmp_path_factory.mktemp("dpo")
    model = save_tiny_eval_model(root / "tiny")
    rng = random.Random(0)
    rows = []
    while len(rows) < 40:
        good, bad = (" ".join(rng.choices(WORDS, k=rng.randint(1, 4))) for _ in range(2))
        if good != bad:
            rows.append({"prompt": "Repeat: " + " ".join(rng.choices(WORDS, k=rng.randint(2, 5))),
                         "chosen": good, "rejected": bad})
    data = root / "pairs.json"
    data.write_text(json.dumps(rows))
    return model, data


# ---- the pieces -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [False, True])
def test_head_log_probs_and_gradients_match_log_softmax(tied):
    from llamaherd.config import Config
    from llamaherd.model import GPT
    from llamaherd.train import head_loss

    torch.manual_seed(0)
    model = GPT(Config(vocab_size=100, n_embd=32, n_layer=1, n_head=4, intermediate_size=64, block_size=64,
                       tie_embeddings=tied)).double()
    h = torch.randn(37, 32, dtype=torch.float64, requires_grad=True)
    targets, upstream = torch.randint(0, 100, (37,)), torch.randn(37, dtype=torch.float64)
    expected = torch.log_softmax(h @ model.output_weight.t(), dim=-1).gather(1, targets[:, None]).squeeze(1)
    want = torch.autograd.grad((expected * upstream).sum(), (h, model.output_weight))
    old = head_loss.SLICE_BYTES
    head_loss.SLICE_BYTES = 4 * 100 * 5  # slices of 5 rows: the last one partial
    try:
        got = head_log_probs(model, h, targets)
    finally:
        head_loss.SLICE_BYTES = old
    grads = torch.autograd.grad((got * upstream).sum(), (h, model.output_weight))
    assert torch.allclose(got, expected, atol=1e-12)
    for g, w in zip(grads, want, strict=True):
        assert torch.allclose(g, w, atol=1e-12)


def _lora_model(model_dir: Path, seed: int = 0):
    """The tiny model with q/v adapters whose B is random too, so the adapters change the outputs."""
    model = prepare_model(load_model(model_dir).model, TrainConfig(method="lora", lora_dropout=0.0))
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.1)
    return model


def _hf_sequence_logps(hf, pairs) -> torch.Tensor:
    """transformers' summed log-probs of each answer (2B,): chosen answers, then rejected."""
    out = []
    for key in ("chosen_ids", "rejected_ids"):
        for p in pairs:
            ids = torch.tensor([p.prompt_ids + getattr(p, key)])
            logp = torch.log_softmax(hf(ids).logits[0, :-1].double(), dim=-1).gather(1, ids[0, 1:, None]).squeeze(1)
            out.append(logp[len(p.prompt_ids) - 1:].sum())
    return torch.stack(out)


def test_shared_prompt_layout_equals_separate_and_transformers(tiny):
    """One row per pair (the prompt once) and 2B rows give the same log-probs, losses and gradients (1e-5)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model_dir, _ = tiny
    model = _lora_model(model_dir)
    pairs = token_pairs(5, seed=1)
    hf = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if ".lora_" in name:
                p.copy_(model.get_parameter(name.removeprefix("base_model.model.").replace(".default", "")))
        expected = _hf_sequence_logps(hf, pairs)
    objective = dpo.DPOObjective(model, beta=0.5)
    results = {}
    for shared in (True, False):
        batch = dpo.collate_dpo(pairs, pad_id=0, shared_prompt=shared)
        logps = objective.sequence_logps(batch)
        loss = objective(batch).loss_sum / len(pairs)  # the mean per pair, as logged
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
        results[shared] = logps.detach(), loss.detach(), grads
        assert torch.allclose(logps.double(), expected, atol=1e-4, rtol=1e-5)
    assert dpo.collate_dpo(pairs, 0, True)["input_ids"].numel() < dpo.collate_dpo(pairs, 0, False)["input_ids"].numel()
    (a_logps, a_loss, a_grads), (b_logps, b_loss, b_grads) = results[True], results[False]
    assert torch.allclose(a_logps, b_logps, atol=1e-5, rtol=0)
    assert abs(a_loss - b_loss) < 1e-5
    for a, b in zip(a_grads, b_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_reference_with_adapters_disabled_equals_a_frozen_copy(tiny):
    model_dir, _ = tiny
    frozen = load_model(model_dir).model.requires_grad_(False)
    policy = _lora_model(model_dir)
    batch = dpo.collate_dpo(token_pairs(4, seed=2), pad_id=0)
    with torch.no_grad():
        reference = dpo.DPOObjective(frozen).sequence_logps(batch)
        adapted = dpo.DPOObjective(policy).sequence_logps(batch)
        with adapters_disabled(policy):
            disabled = dpo.DPOObjective(policy).sequence_logps(batch)
    got = dpo.DPOObjective(policy).reference_logps(batch)
    assert not got.requires_grad
    assert torch.equal(got, reference) and torch.equal(disabled, reference)
    assert (adapted - reference).abs().max() > 1e-2  # the adapters do change the policy
    assert not any(layer.disabled for layer in lora_layers(policy).values())  # and are back on afterwards


# ---- TRL parity -------------------------------------------------------------------------------------------------
STEPS, BATCH, LR, BETA = 5, 4, 5e-3, 0.5


def _ours(model_dir: Path, pairs, out: Path, method: str, loss_type: str, smoothing: float):
    """Five steps of our Trainer: (per-step records, the data order, the initial LoRA A matrices)."""
    cfg = TrainConfig(model=str(model_dir), method=method, out_dir=str(out), max_steps=STEPS, batch_size=BATCH,
                      micro_batch_size=2, lr=LR, schedule="constant", lora_dropout=0.0, progress=False, plot=False,
                      save_every=100, eval_every=100, loss_type=loss_type, beta=BETA, label_smoothing=smoothing)
    model = prepare_model(load_model(model_dir).model, cfg)
    reference = dpo.reference_mode(cfg)
    objective = dpo.DPOObjective(model, BETA, loss_type, smoothing, reference)
    collate = functools.partial(dpo.collate_dpo, pad_id=0)
    train = pairs
    if reference == "precomputed":
        (train,) = dpo.precompute_reference(objective, [pairs], collate, D.init_distributed(), None, None,
                                            progress=False)
    lora_a = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
    trainer = Trainer(objective, train, [], collate, cfg)
    order = trainer._epoch_order(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer.fit()
    finally:
        torch.set_num_threads(threads)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r], order, lora_a


def _trl(model_dir: Path, pairs, out: Path, method: str, loss_type: str, smoothing: float, lora_a):
    """The same five steps with TRL's DPOTrainer (peft for LoRA): same pairs in the same order, same optimizer."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class Tokenized(DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):  # the pairs are token ids already
            return dataset

    class Logs(TrainerCallback):
        def __init__(self) -> None:
            self.records = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.records.append(dict(logs))

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():  # PEFT's random A as ours (B starts at zero on both sides)
            for name, p in model.named_parameters():
                if "lora_A" in name:
                    p.copy_(lora_a[name.removeprefix("base_model.model.").replace(".default", "")])
    losses_, weights = [loss_type], None
    if smoothing:
        # Conservative DPO, -(1-e) log s(bh) - e log s(-bh), which TRL 1.x no longer applies to "sigmoid", is
        # 2(1-e) x sigmoid - (1-2e) x robust, TRL's robust loss being that with +e log s(-bh), divided by (1-2e).
        losses_, weights = ["sigmoid", "robust"], [2 * (1 - smoothing), -(1 - 2 * smoothing)]
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.eos_token
    args = DPOConfig(output_dir=str(out), per_device_train_batch_size=BATCH, learning_rate=LR,
                     lr_scheduler_type="constant", max_steps=STEPS, logging_steps=1, bf16=False,
                     gradient_checkpointing=False, beta=BETA, loss_type=losses_, loss_weights=weights,
                     label_smoothing=smoothing, max_grad_norm=1.0, weight_decay=0.0, report_to=[],
                     save_strategy="no", use_cpu=True, max_length=None, train_sampling_strategy="sequential",
                     disable_tqdm=True)
    logs = Logs()
    rows = [{"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids, "rejected_ids": p.rejected_ids} for p in pairs]
    Tokenized(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
              callbacks=[logs]).train()
    return logs.records


@pytest.mark.parametrize(("method", "loss_type", "smoothing"), [
    ("full", "sigmoid", 0.0), ("full", "ipo", 0.0), ("full", "sigmoid", 0.2), ("lora", "sigmoid", 0.0),
])
def test_steps_match_trl_dpo_trainer(tiny, tmp_path, method, loss_type, smoothing):
    """Full fine-tuning (reference precomputed) and LoRA (reference = adapters off) vs DPOTrainer: 5 steps, 1e-4."""
    model_dir, _ = tiny
    pairs = token_pairs(24)
    ours, order, lora_a = _ours(model_dir, pairs, tmp_path / "ours", method, loss_type, smoothing)
    theirs = _trl(model_dir, [pairs[i] for i in order], tmp_path / "trl", method, loss_type, smoothing, lora_a)
    assert len(ours) == len(theirs) == STEPS
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True), 1):
        for key in METRICS:
            assert a[key] == pytest.approx(b[key], abs=1e-4), f"step {step}: {key}"
    assert len({round(r["loss"], 3) for r in ours}) == STEPS  # the policy really moved
    assert any(r["rewards/accuracies"] not in (0.0, 1.0) for r in ours)


# ---- the precomputed reference --------------------------------------------------------------------------------
def _counting_score(monkeypatch) -> list[int]:
    """Count the pairs the reference pass scores."""
    calls: list[int] = []
    real = dpo._score

    def counting(objective, pairs, *args, **kwargs):
        calls.append(len(pairs))
        return real(objective, pairs, *args, **kwargs)

    monkeypatch.setattr(dpo, "_score", counting)
    return calls


def test_reference_file_is_keyed_and_reused(tiny, tmp_path, monkeypatch):
    model_dir, _ = tiny
    objective = dpo.DPOObjective(load_model(model_dir).model, reference="precomputed")
    collate = functools.partial(dpo.collate_dpo, pad_id=0)
    info = D.init_distributed()
    pairs = token_pairs(6, seed=3)
    key = dpo.reference_key("sha256:model", ["sha256:data"], "alpaca", "torch.float32")
    path = dpo.reference_path(tmp_path, key)
    calls = _counting_score(monkeypatch)

    def run(items, k=key, p=path):
        return dpo.precompute_reference(objective, [items], collate, info, p, k, progress=False, log=lambda m: None)

    (first,) = run(pairs)
    with torch.no_grad():  # independent of the store: the plain forward of the same pairs
        expected = objective.sequence_logps(collate(pairs)).double()
    got = torch.tensor([[s.ref_chosen for s in first], [s.ref_rejected for s in first]], dtype=torch.float64).flatten()
    assert torch.allclose(got, expected, atol=1e-5)
    assert calls == [6] and path.exists()
    (again,) = run(list(reversed(pairs)))  # the same pairs in another order: all read from the file
    assert calls == [6] and [s.ref_chosen for s in again] == [s.ref_chosen for s in reversed(first)]
    run(pairs + token_pairs(2, seed=4))  # two new pairs: only they are scored, then the file holds all 8
    assert calls == [6, 2] and len(dpo._read_reference(path, key)) == 8
    for other in (dpo.reference_key("sha256:other", ["sha256:data"], "alpaca", "torch.float32"),
                  dpo.reference_key("sha256:model", ["sha256:data2"], "alpaca", "torch.float32"),
                  dpo.reference_key("sha256:model", ["sha256:data"], "vicuna", "torch.float32"),
                  dpo.reference_key("sha256:model", ["sha256:data"], "alpaca", "torch.bfloat16")):
        assert dpo.reference_path(tmp_path, other) != path
        assert dpo._read_reference(path, other) == {}  # a file found under another key's name is not trusted
    run(pairs, p=dpo.reference_path(tmp_path, other), k=other)
    assert calls == [6, 2, 6]


def _dpo_args(model: Path, data: Path, out: Path, **overrides: object) -> list[str]:
    opts: dict[str, object] = {
        "data": data, "out-dir": out, "method": "full", "max-steps": 6, "batch-size": 4, "micro-batch-size": 2,
        "eval-every": 3, "save-every": 2, "lr": 1e-3, "chat-format": "alpaca", "lora-dropout": 0.0,
        "val-fraction": 0.2, "beta": 0.5, "progress": False, "plot": False,
    } | {k.replace("_", "-"): v for k, v in overrides.items()}
    args = ["dpo", str(model)]
    for key, value in opts.items():
        args += [f"--{key}"] if value is True else [f"--no-{key}"] if value is False else [f"--{key}", str(value)]
    return args


def test_full_dpo_resumes_exactly_without_recomputing_the_reference(tiny, tmp_path, monkeypatch):
    model_dir, data = tiny
    calls = _counting_score(monkeypatch)
    run_in_process(_dpo_args(model_dir, data, tmp_path / "ref", reference_dir=tmp_path / "ref-logps"))
    assert calls == [40]  # every pair once: 32 training + 8 held out

    train_step = Trainer.train_step
    crash_at(monkeypatch, 2)  # after the checkpoint of step 2
    out = tmp_path / "runs" / "killed"
    with pytest.raises(Crash):
        run_in_process(_dpo_args(model_dir, data, out))
    assert calls == [40, 40] and len(list((tmp_path / "runs" / "reference_logps").iterdir())) == 1  # beside out
    monkeypatch.setattr(Trainer, "train_step", train_step)
    run_in_process(_dpo_args(model_dir, data, out, resume=True))
    assert calls == [40, 40]  # read back from the file
    assert losses(out) == pytest.approx(losses(tmp_path / "ref"), abs=1e-6)
    assert losses(out, "val_rewards/margins") == pytest.approx(losses(tmp_path / "ref", "val_rewards/margins"),
                                                                abs=1e-6)
    run_in_process(_dpo_args(model_dir, data, tmp_path / "runs" / "later", max_steps=1))
    assert calls == [40, 40]  # a later run beside it, same key: nothing recomputed
    run_in_process(_dpo_args(model_dir, data, tmp_path / "runs" / "vicuna", max_steps=1, chat_format="vicuna"))
    assert calls == [40, 40, 40]  # another template: another key
    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["method"] == "dpo" and (out / "model" / "model.safetensors").exists()


# ---- two processes ---------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "method"), [("ddp", "full"), ("fsdp", "lora")])
def test_two_processes_match_one(tiny, tmp_path, strategy, method):
    """Two gloo processes x 1 pair per micro-batch = one process x 2 micro-batches of 2 (same global batch)."""
    model_dir, data = tiny
    run = {"method": method, "max_steps": 4, "micro_batch_size": 1}
    single = tmp_path / "single"
    run_in_process(_dpo_args(model_dir, data, single, micro_batch_size=2, **{k: v for k, v in run.items()
                                                                            if k != "micro_batch_size"}))
    out = tmp_path / "two"  # its own reference_dir: the two processes compute the reference themselves
    done = subprocess.run(torchrun_cmd(2, *_dpo_args(model_dir, data, out, distributed=strategy,
                                                     reference_dir=tmp_path / "two-logps", **run)),
                          check=False, env=subprocess_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(losses(out)) == 4
    for key in ("loss", "rewards/margins", "rewards/accuracies", "val_loss", "val_rewards/margins"):
        assert losses(out, key) == pytest.approx(losses(single, key), rel=1e-5, abs=1e-5), key
    saved = "model/model.safetensors" if method == "full" else "adapter/adapter_model.safetensors"
    assert (out / saved).exists() and json.loads((out / "lineage.json").read_text())["method"] == "dpo"
