"""Reward model (`herd reward`): per-step losses and metrics against TRL's RewardTrainer (full, and LoRA against
peft), scores that do not move with padding side, pad == eos or batch size (against transformers' scores of
each sequence alone), the Hugging Face sequence-classification export, `herd reward score`, resume after a
crash, lineage, and one-line errors for bad input."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
import yaml
from eval_tiny import save_tiny_tokenizer
from hf_tiny import save_hf_model
from train_tiny import WORDS, Crash, crash_at, losses, make_tiny_run_inputs, run_in_process

from llamaherd.cli import main
from llamaherd.data.preference import load_preference_data
from llamaherd.train.reward import (
    RewardObjective,
    RewardRecipe,
    add_score_head,
    load_reward_model,
    save_reward_model,
    sequence_rewards,
    shared_prompt_rewards,
)

SEED = 1337


def _pairs(rng: random.Random, n: int) -> list[dict]:
    """{prompt, chosen, rejected} rows: the chosen answer repeats the prompt's words; margins 0, 0.5 and 1."""
    rows = []
    for i in range(n):
        answer = " ".join(rng.choices(WORDS, k=rng.randint(2, 5)))
        other = " ".join(rng.choices(WORDS, k=rng.randint(2, 5)))
        rows.append({"prompt": f"Repeat: {answer}", "chosen": answer, "rejected": other, "margin": (i % 3) / 2})
    return rows


def _write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny causal LM, train/val pair files, and a transformers reward model made from the LM: a seeded score
    head and a pad id no pair uses (transformers freezes the embedding row of its pad id: `padding_idx`)."""
    from transformers import AutoModelForSequenceClassification

    from llamaherd.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("reward")
    model, _ = make_tiny_run_inputs(root)
    rng = random.Random(0)
    train, val = root / "train.jsonl", root / "val.jsonl"
    _write_jsonl(train, _pairs(rng, 32))
    _write_jsonl(val, _pairs(rng, 8))
    pairs, _ = load_preference_data([train, val], Tokenizer.from_path(model), "alpaca", 512)
    used = {t for p in pairs for t in p.prompt_ids + p.chosen_ids + p.rejected_ids}
    pad = min(set(range(3, 128)) - used)
    torch.manual_seed(1)
    hf = AutoModelForSequenceClassification.from_pretrained(model, num_labels=1)
    with torch.no_grad():
        hf.score.weight.normal_(0.0, 0.2)  # rewards well away from 0
    hf.config.pad_token_id = pad
    rm = root / "rm"
    hf.save_pretrained(rm)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model / name, rm / name)
    return {"root": root, "model": model, "train": train, "val": val, "rm": rm, "pad": pad}


def _reward_args(model, out, **overrides) -> list[str]:
    opts = {"data": None, "out-dir": out, "method": "full", "max-steps": 6, "batch-size": 4, "micro-batch-size": 2,
            "lr": 1e-3, "schedule": "linear", "warmup-steps": 2, "chat-format": "alpaca", "eval-every": 100,
            "save-every": 100, "lora-dropout": 0.0, "seed": SEED, "progress": False, "plot": False}
    opts |= {k.replace("_", "-"): v for k, v in overrides.items()}
    args = ["reward", str(model)]
    for key, value in opts.items():
        if value is True or value is False:
            args.append(f"--{'' if value else 'no-'}{key}")
        elif isinstance(value, list):
            args += [f"--{key}", *map(str, value)]
        elif value is not None:
            args += [f"--{key}", str(value)]
    return args


def _records(out, key: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if key in r]


# ---- against TRL's RewardTrainer ----------------------------------------------------------------------------
def _trl_run(tiny, model, train_pairs, val_pairs, steps: int, center: float | None):
    """TRL's RewardTrainer on the same token ids, in the shared loop's order (Trainer._epoch_order: a permutation
    seeded with the seed), with the same batches, AdamW, schedule and clipping; returns its log history."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    class InOrder(RewardTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    def dataset(pairs):
        return Dataset.from_list([{"chosen_ids": p.prompt_ids + p.chosen_ids,
                                   "rejected_ids": p.prompt_ids + p.rejected_ids, "margin": p.margin} for p in pairs])

    order = torch.randperm(len(train_pairs), generator=torch.Generator().manual_seed(SEED)).tolist()
    tokenizer = AutoTokenizer.from_pretrained(tiny["rm"])
    args = RewardConfig(
        output_dir=str(tiny["root"] / "trl"), per_device_train_batch_size=2, gradient_accumulation_steps=2,
        per_device_eval_batch_size=2, learning_rate=1e-3, lr_scheduler_type="linear", warmup_steps=2,
        max_steps=steps, logging_steps=1, max_grad_norm=1.0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
        adam_epsilon=1e-8, optim="adamw_torch", center_rewards_coefficient=center, seed=SEED, bf16=False,
        use_cpu=True, report_to="none", save_strategy="no", eval_strategy="no", dataloader_num_workers=0,
        max_length=None, pad_token=tokenizer.convert_ids_to_tokens(tiny["pad"]), disable_tqdm=True,
    )
    trainer = InOrder(model=model, args=args, train_dataset=dataset([train_pairs[i] for i in order]),
                      processing_class=tokenizer)
    trainer.train()
    return [r for r in trainer.state.log_history if "loss" in r], trainer.evaluate(dataset(val_pairs))


def _assert_same_steps(ours_dir, trl_log, trl_eval) -> None:
    ours = _records(ours_dir, "loss")
    assert len(ours) == len(trl_log) == 6
    for key, theirs in (("loss", "loss"), ("accuracy", "accuracy"), ("margin", "margin"),
                        ("mean_reward", "mean_reward"), ("grad_norm", "grad_norm"), ("lr", "learning_rate")):
        assert [r[key] for r in ours] == pytest.approx([r[theirs] for r in trl_log], abs=1e-4, rel=1e-4), key
    val = _records(ours_dir, "val_loss")[-1]
    for key in ("loss", "accuracy", "margin", "mean_reward"):
        assert val[f"val_{key}"] == pytest.approx(trl_eval[f"eval_{key}"], abs=1e-4, rel=1e-4), key


def _pairs_of(tiny):
    from llamaherd.tokenizer import Tokenizer

    tok = Tokenizer.from_path(tiny["rm"])
    return (load_preference_data(tiny["train"], tok, "alpaca", 512)[0],
            load_preference_data(tiny["val"], tok, "alpaca", 512)[0])


def test_full_training_matches_trl_reward_trainer(tiny):
    """Margins and reward centring on; two micro-batches accumulated per step; per-step loss, grad norm, lr and
    TRL's metrics (accuracy, margin, mean_reward), then the held-out ones."""
    from transformers import AutoModelForSequenceClassification

    out = tiny["root"] / "full"
    run_in_process(_reward_args(tiny["rm"], out, data=tiny["train"], val_data=tiny["val"],
                                center_rewards_coefficient=0.01))
    train_pairs, val_pairs = _pairs_of(tiny)
    trl_log, trl_eval = _trl_run(tiny, AutoModelForSequenceClassification.from_pretrained(tiny["rm"]), train_pairs,
                                 val_pairs, steps=6, center=0.01)
    _assert_same_steps(out, trl_log, trl_eval)


def test_lora_training_matches_trl_with_peft(tiny, monkeypatch):
    """LoRA on q and v, the score head trained whole (peft's SEQ_CLS modules_to_save); both start from the same
    adapter (peft's random A, copied into ours; B = 0)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    peft_model = get_peft_model(AutoModelForSequenceClassification.from_pretrained(tiny["rm"]),
                                LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=0.0,
                                           target_modules=["q_proj", "v_proj"]))
    start = {n.removeprefix("base_model.model.").replace(".default", ""): p.detach().clone()
             for n, p in peft_model.named_parameters() if "lora_A" in n}
    prepare = RewardRecipe.prepare

    def prepare_from_peft_start(self, model, cfg):
        model = prepare(self, model, cfg)
        with torch.no_grad():
            for name, value in start.items():
                model.get_parameter(name).copy_(value)
        return model

    monkeypatch.setattr(RewardRecipe, "prepare", prepare_from_peft_start)
    out = tiny["root"] / "lora"
    run_in_process(_reward_args(tiny["rm"], out, data=tiny["train"], val_data=tiny["val"], method="lora",
                                lora_r=4, lora_alpha=8, lora_targets=["q", "v"]))
    train_pairs, val_pairs = _pairs_of(tiny)
    trl_log, trl_eval = _trl_run(tiny, peft_model, train_pairs, val_pairs, steps=6, center=None)
    _assert_same_steps(out, trl_log, trl_eval)


# ---- scores: padding, batch size, transformers --------------------------------------------------------------
def _padded(seqs: list[list[int]], pad: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, s in enumerate(seqs):
        where = slice(T - len(s), T) if left else slice(0, len(s))
        ids[i, where], mask[i, where] = torch.tensor(s), True
    return ids, mask


def test_scores_do_not_move_with_padding_side_pad_or_batch_size(tiny):
    """Each sequence ends in EOS; padded left or right, with the EOS as pad or another id, in batches of 1, 2 or
    5, padding-free or padded: every score equals transformers' score of the sequence alone (within 1e-5)."""
    from transformers import AutoModelForSequenceClassification

    rm = load_reward_model(tiny["rm"]).model
    hf = AutoModelForSequenceClassification.from_pretrained(tiny["rm"]).eval()
    eos = rm.config.eos_token_id
    g = torch.Generator().manual_seed(0)
    seqs = [[1, *torch.randint(3, 128, (n,), generator=g).tolist(), eos] for n in (1, 13, 5, 20, 8)]
    seqs = [[t if t != tiny["pad"] else 3 for t in s] for s in seqs]  # transformers finds the end by its pad id
    with torch.no_grad():
        alone = [hf(torch.tensor([s])).logits[0, 0].item() for s in seqs]
        for pad in (eos, tiny["pad"]):
            for left in (False, True):
                for size in (1, 2, 5):
                    for padding_free in (True, False):
                        got = []
                        for start in range(0, len(seqs), size):
                            ids, mask = _padded(seqs[start:start + size], pad, left)
                            got += sequence_rewards(rm, ids, mask, padding_free).tolist()
                        assert got == pytest.approx(alone, abs=1e-5), (pad, left, size, padding_free)


def test_shared_prompt_rows_give_each_sequences_own_reward_and_the_same_gradients(tiny):
    """One row per pair (the prompt run once) and the 2B-row layout: every reward equals transformers' score of
    prompt + answer alone, and loss, metrics and gradients agree between the layouts."""
    from transformers import AutoModelForSequenceClassification

    from llamaherd.data.preference import collate_pairs, collate_shared_pairs

    pairs = _pairs_of(tiny)[0][:5]
    hf = AutoModelForSequenceClassification.from_pretrained(tiny["rm"]).eval()
    with torch.no_grad():
        alone = [hf(torch.tensor([p.prompt_ids + answer])).logits[0, 0].item()
                 for side in ("chosen_ids", "rejected_ids") for p in pairs for answer in [getattr(p, side)]]
    results = []
    for collate in (collate_shared_pairs, collate_pairs):
        model = load_reward_model(tiny["rm"]).model.train().requires_grad_(True)
        objective = RewardObjective(model, center_rewards_coefficient=0.1)
        out = objective(collate(pairs, pad_id=2))
        out.loss_sum.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        results.append((out.loss_sum.item(), out.metrics["margin"].item(), grads))
        if collate is collate_shared_pairs:
            with torch.no_grad():
                rewards = torch.cat(shared_prompt_rewards(model, collate(pairs, pad_id=2)))
            assert rewards.tolist() == pytest.approx(alone, abs=1e-5)
    (loss_a, gap_a, grads_a), (loss_b, gap_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, abs=1e-5) and gap_a == pytest.approx(gap_b, abs=1e-5)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert collate_shared_pairs(pairs, 0)["input_ids"].numel() < collate_pairs(pairs, 0)["input_ids"].numel()


@pytest.mark.parametrize("kind", ["llama-gqa", "llama-tied", "falcon-7b-style"])
def test_export_opens_in_transformers_with_the_same_scores(tmp_path, kind):
    """A reward head on a causal LM, written by save_reward_model: transformers' AutoModelForSequenceClassification
    reads one label and a pad id that never ends a sequence (the EOS is the tokenizer's pad here), and scores a
    right-padded batch as llamaherd does (<= 1e-4); load_reward_model reads it back unchanged."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from llamaherd.load import load_model

    src = tmp_path / "lm"
    save_hf_model(kind, src)
    save_tiny_tokenizer(src)
    loaded = load_model(src)
    loaded.tokenizer.pad_id = loaded.tokenizer.eos_id  # as SmolLM2's: pad == eos
    model = add_score_head(loaded.model)
    with torch.no_grad():
        model.score.weight.normal_(0.0, 0.2)
    out = save_reward_model(model.state_dict(), model.config, loaded.tokenizer, tmp_path / "rm")

    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    config = json.loads((out / "config.json").read_text())
    family = "Falcon" if kind.startswith("falcon") else "Llama"
    assert config["architectures"] == [f"{family}ForSequenceClassification"] and hf.config.num_labels == 1
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.pad_token_id == hf.config.pad_token_id not in (tokenizer.eos_token_id, tokenizer.bos_token_id)
    texts = ["The quick brown fox jumps over the lazy dog.", "water boils", "A spider has eight legs; ice melts."]
    seqs = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    ids, mask = _padded(seqs, tokenizer.pad_token_id, left=False)
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask.long()).logits[:, 0]
        ours = sequence_rewards(model, ids, mask)
        back = sequence_rewards(load_reward_model(out).model, ids, mask)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(back, ours, atol=1e-6, rtol=1e-6)


def test_herd_reward_score_writes_transformers_scores(tiny, tmp_path, capsys):
    """Pairs (a {prompt, chosen, rejected} row and an HH-RLHF transcript pair), a {prompt, response} and a
    {prompt, responses} row: each response's score is transformers' score of the tokens a training pair of it
    holds (prompt_ids + answer_ids); the summary gives the pairs' accuracy. A transcript pair whose sides differ
    before the last answer is left unscored (null)."""
    from transformers import AutoModelForSequenceClassification

    from llamaherd.tokenizer import Tokenizer

    rows = [
        {"prompt": "Repeat: water boils", "chosen": "water boils", "rejected": "ice melts"},
        {"chosen": "\n\nHuman: Repeat: the dog\n\nAssistant: the dog",
         "rejected": "\n\nHuman: Repeat: the dog\n\nAssistant: lazy fox jumps"},
        {"prompt": "Repeat: brown fox", "response": "brown fox"},
        {"prompt": [{"role": "user", "content": "Repeat: spider legs"}], "responses": ["spider legs", "the", "ice"]},
        {"chosen": "\n\nHuman: Repeat: ice\n\nAssistant: ice\n\nHuman: again\n\nAssistant: ice",
         "rejected": "\n\nHuman: Repeat: ice\n\nAssistant: dog\n\nHuman: again\n\nAssistant: ice"},
    ]
    data, out = tmp_path / "rows.jsonl", tmp_path / "scored.jsonl"
    _write_jsonl(data, rows)
    assert main(["reward", "score", str(tiny["rm"]), "--data", str(data), "--out", str(out),
                 "--chat-format", "alpaca", "--batch-size", "3"]) == 0
    scored = [json.loads(line) for line in out.read_text().splitlines()]

    as_pairs = tmp_path / "as_pairs.jsonl"  # every response as a training pair, tokenized by the data module
    prompts = {2: "Repeat: brown fox", 3: "Repeat: spider legs"}
    answers = [(2, "brown fox"), (3, "spider legs"), (3, "the"), (3, "ice")]
    _write_jsonl(as_pairs, rows[:2] + [{"prompt": prompts[i], "chosen": a, "rejected": a + " dog"} for i, a in answers])
    pairs, _ = load_preference_data(as_pairs, Tokenizer.from_path(tiny["rm"]), "alpaca", 512)
    hf = AutoModelForSequenceClassification.from_pretrained(tiny["rm"]).eval()
    with torch.no_grad():
        def score(ids):
            return hf(torch.tensor([ids])).logits[0, 0].item()

        expected = [(score(p.prompt_ids + p.chosen_ids), score(p.prompt_ids + p.rejected_ids)) for p in pairs]
    assert [scored[0]["chosen_score"], scored[0]["rejected_score"]] == pytest.approx(expected[0], abs=1e-4)
    assert [scored[1]["chosen_score"], scored[1]["rejected_score"]] == pytest.approx(expected[1], abs=1e-4)
    assert scored[2]["score"] == pytest.approx(expected[2][0], abs=1e-4)
    assert scored[3]["scores"] == pytest.approx([c for c, _ in expected[3:]], abs=1e-4)
    assert {k: v for k, v in scored[2].items() if k != "score"} == rows[2]  # the record, plus its score
    assert scored[4] == rows[4] | {"chosen_score": None, "rejected_score": None}  # no shared prompt: unscored
    accuracy = sum(c > r for c, r in expected[:2]) / 2
    assert f"pairs: accuracy {accuracy:.4f}" in capsys.readouterr().out


def test_crash_then_resume_is_exact_and_lineage_names_the_method(tiny, tmp_path, monkeypatch):
    """LoRA with dropout (the restored RNG matters) and reward centring, killed after step 4 (checkpoint at 3):
    resuming gives the uninterrupted run's losses and held-out metrics bit for bit; lineage.json (method
    "reward") appears only when the run is done, and the leaderboard imports it."""
    from llamaherd.leaderboard.ingest import import_lineage

    common = {"data": tiny["train"], "val_data": tiny["val"], "method": "lora", "lora_dropout": 0.1,
              "center_rewards_coefficient": 0.05, "save_every": 3, "eval_every": 2}
    ref = tmp_path / "ref"
    run_in_process(_reward_args(tiny["model"], ref, **common))
    out = tmp_path / "crashed"
    crash_at(monkeypatch, 4)
    with pytest.raises(Crash):
        run_in_process(_reward_args(tiny["model"], out, **common))
    monkeypatch.undo()
    assert not (out / "lineage.json").exists()
    run_in_process(_reward_args(tiny["model"], out, resume=True, **common))
    assert losses(out) == losses(ref)
    assert _records(out, "val_loss") == _records(ref, "val_loss")
    assert [r["step"] for r in _records(out, "loss")] == list(range(1, 7))

    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["method"] == "reward" and lineage["hyperparameters"]["task"] == "reward"
    assert lineage["parent"]["path"] == str(tiny["model"].resolve())
    assert lineage["child"]["path"] == str((out / "model").resolve())
    assert [f["path"] for f in lineage["data_files"]] == [str(tiny["train"].resolve()), str(tiny["val"].resolve())]
    assert import_lineage(tmp_path / "board.sqlite", out / "lineage.json") is not None
    assert load_reward_model(out / "model").chat_format == "alpaca"  # what it was trained with, from lineage.json


# ---- bad input ------------------------------------------------------------------------------------------------
def _one_line_error(capsys, args: list[str]) -> str:
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_bad_input_is_a_one_line_error(tiny, tmp_path, capsys):
    def train(data, **overrides):
        return _reward_args(tiny["model"], tmp_path / "run", data=data, **overrides)

    assert "missing.jsonl: data file not found" in _one_line_error(capsys, train(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_pairs(random.Random(1), 1)[0]) + "\n{not json\n")
    assert "bad.jsonl:2" in _one_line_error(capsys, train(bad))
    empty = tmp_path / "empty.jsonl"
    _write_jsonl(empty, [{"prompt": "Repeat: dog", "chosen": " ", "rejected": "dog"}])
    assert "empty.jsonl:1: field 'chosen'" in _one_line_error(capsys, train(empty))
    _write_jsonl(empty, [{"prompt": "Repeat: dog", "chosen": " ", "rejected": "dog"}, *_pairs(random.Random(2), 4)])
    with pytest.warns(UserWarning, match="1 empty"):  # dropped and counted instead
        run_in_process(train(empty, skip_empty=True, max_steps=1, batch_size=2, micro_batch_size=2))
    config = tmp_path / "sft.yaml"
    config.write_text(yaml.safe_dump({"task": "sft"}))
    assert "'task'" in _one_line_error(capsys, train(tiny["train"], config=config))

    rows = tmp_path / "rows.jsonl"
    _write_jsonl(rows, [{"prompt": "Repeat: dog", "answer": "dog"}])
    assert "rows.jsonl:1: expected 'prompt' with 'response'" in _one_line_error(
        capsys, ["reward", "score", str(tiny["rm"]), "--data", str(rows)])
    assert "not a reward model" in _one_line_error(capsys, ["reward", "score", str(tiny["model"]), "--data", str(rows)])
    two = tmp_path / "two-labels"
    shutil.copytree(tiny["rm"], two)
    config = json.loads((two / "config.json").read_text())
    config["id2label"], config["label2id"] = {"0": "bad", "1": "good"}, {"bad": 0, "good": 1}
    (two / "config.json").write_text(json.dumps(config))
    assert "num_labels 2" in _one_line_error(capsys, ["reward", "score", str(two), "--data", str(rows)])
