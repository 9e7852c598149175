"""PPO (train/ppo.py): per-token KL penalty and GAE by hand, rollout log-probs against transformers, the toy task with
a known reward, stops (KL, collapse, a failing reward) and exact resume after SIGKILL mid-rollout and mid-update."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from eval_tiny import save_tiny_eval_model
from train_tiny import herd_cmd, run_in_process, subprocess_env

from llamaherd.errors import InputError
from llamaherd.train import distributed as D
from llamaherd.train.config import TrainConfig
from llamaherd.train.ppo import KLController, PPORecipe, PPOStopped, collapse, gae, k3, token_rewards

TARGET = 7  # the toy task's token: reward = how often a response holds it, at most CAP
CAP = 4
WORDS = "fox dog water ice car soap hose spider legs capital quick brown lazy jumps over the".split()
REWARDS = f'''
import os, pathlib
def count(prompts, completions, completion_ids):
    return [min(sum(t == {TARGET} for t in ids), {CAP}) for ids in completion_ids]
def stalls(prompts, completions, completion_ids):
    if os.environ.get("PPO_STALL_AT"):  # sleep in the n-th call, after flagging it
        flag = pathlib.Path(os.environ["PPO_STALL_FLAG"])
        calls = flag.with_suffix(".calls")
        n = int(calls.read_text()) + 1 if calls.exists() else 1
        calls.write_text(str(n))
        if os.environ["PPO_STALL_AT"] == str(n):
            flag.write_text("in the rollout")
            import time; time.sleep(120)
    return count(prompts, completions, completion_ids)
def fails_second(prompts, completions, completion_ids):
    calls = pathlib.Path(os.environ["PPO_CALLS"])
    n = int(calls.read_text()) + 1 if calls.exists() else 1
    calls.write_text(str(n))
    if n == 2:
        raise ValueError("the scoring service is down")
    return count(prompts, completions, completion_ids)
def nan_second(prompts, completions, completion_ids):
    calls = pathlib.Path(os.environ["PPO_CALLS"])
    n = int(calls.read_text()) + 1 if calls.exists() else 1
    calls.write_text(str(n))
    return [float("nan") if n == 2 else 1.0 for _ in completions]
'''


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo")
    model = save_tiny_eval_model(root / "tiny")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about the {w}"}) + "\n" for w in WORDS))
    rewards = root / "rewards.py"
    rewards.write_text(REWARDS)
    return model, prompts, rewards


def config(inputs, out: Path, fn: str = "count", **kw) -> TrainConfig:
    model, prompts, rewards = inputs
    base = dict(task="ppo", model=str(model), data=[str(prompts)], out_dir=str(out), reward_fn=f"{rewards}:{fn}",
                method="full", lora_dropout=0.0, chat_format="alpaca", max_new_tokens=8, max_seq_len=160,
                rollout_batch_size=16, batch_size=8, micro_batch_size=8, ppo_epochs=2, lr=3e-4, warmup_steps=0,
                schedule="constant", progress=False, plot=False, save_every=1000)
    return TrainConfig(**(base | kw))


def build(cfg: TrainConfig):
    """What run_training builds before fit: the PPOTrainer (for looking at its rollouts)."""
    recipe = PPORecipe()
    loaded = recipe.load(cfg, None)
    train, val = recipe.datasets(cfg, loaded.tokenizer, cfg.chat_format, lambda msg: None)
    model = recipe.prepare(loaded.model, cfg)
    return recipe.trainer(recipe.objective(model, cfg), train, val, recipe.collate(cfg, 0), cfg,
                          D.init_distributed(), None)


def ppo_args(inputs, out: Path, fn: str = "count", **kw) -> list[str]:
    model, prompts, rewards = inputs
    opts = {"prompts": prompts, "reward": f"{rewards}:{fn}", "out-dir": out, "method": "full", "chat-format": "alpaca",
            "max-new-tokens": 8, "max-seq-len": 160, "rollout-batch-size": 16, "batch-size": 8,
            "micro-batch-size": 8, "ppo-epochs": 2, "lr": 3e-4, "warmup-steps": 0, "schedule": "constant",
            "progress": False, "plot": False} | {k.replace("_", "-"): v for k, v in kw.items()}
    args = ["ppo", str(model)]
    for key, value in opts.items():
        args += [f"--{key}"] if value is True else [f"--no-{key}"] if value is False else [f"--{key}", str(value)]
    return args


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---- the maths, by hand -----------------------------------------------------------------------------------------
def test_per_token_kl_penalty_gae_and_k3_by_hand():
    logp = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64)
    ref = torch.tensor([-1.5, -1.0, -0.5], dtype=torch.float64)
    rewards = token_rewards(2.0, logp, ref, kl_coef=0.1)
    assert rewards.tolist() == pytest.approx([-0.05, 0.1, 2.0])  # -0.1 * (0.5, -1, 0), the score on the last
    values = torch.tensor([0.5, 0.4, 0.3], dtype=torch.float64)
    adv, ret = gae(rewards, values, gamma=0.9, lam=0.8)
    # delta_2 = 2 - 0.3 = 1.7; delta_1 = 0.1 + 0.9 * 0.3 - 0.4 = -0.03; delta_0 = -0.05 + 0.9 * 0.4 - 0.5 = -0.19
    a2 = 1.7
    a1 = -0.03 + 0.72 * a2
    a0 = -0.19 + 0.72 * a1
    assert adv.tolist() == pytest.approx([a0, a1, a2])
    assert ret.tolist() == pytest.approx([a0 + 0.5, a1 + 0.4, a2 + 0.3])
    assert k3(logp, ref).tolist() == pytest.approx([math.exp(-0.5) - 0.5, math.e - 2, 0.0])


def test_adaptive_kl_controller_by_hand():
    kl = KLController(0.1, target=2.0, horizon=100)
    kl.update(3.0, 10)  # error clipped to +0.2: 0.1 * (1 + 0.2 * 10 / 100)
    assert kl.value == pytest.approx(0.102)
    kl.update(1.8, 10)  # error 1.8 / 2 - 1 = -0.1
    assert kl.value == pytest.approx(0.102 * 0.99)
    fixed = KLController(0.1)
    fixed.update(50.0, 10)
    assert fixed.value == 0.1


def test_collapse():
    assert collapse([[5, 6, 2], [5, 6, 2]], {2}) is not None
    assert collapse([[9, 9, 9], [9, 2], [9, 9]], {2}) is not None
    assert collapse([[9, 9, 9], [9, 8]], {2}) is None
    assert collapse([[1]], {2}) is None


# ---- rollouts against transformers ------------------------------------------------------------------------------
def _hf_logprobs(hf, prompt: list[int], response: list[int], temperature: float) -> torch.Tensor:
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + response])).logits[0].double() / temperature
    return logits.log_softmax(-1)[len(prompt) - 1:-1].gather(1, torch.tensor(response)[:, None])[:, 0]


def test_rollout_logprobs_and_per_token_kl_penalty_match_transformers(inputs, tmp_path):
    """The rollout's log-probabilities (temperature 0.7) equal transformers' log-softmax(logits / T) of the sampled
    tokens, the engine's and the first update's equal the rollout's; after an update, each token's reward is
    -beta (log pi - log ref), plus the toy score on the last, with pi and ref computed by transformers
    (gamma = lam = 1: rewards = return differences)."""
    from transformers import AutoModelForCausalLM

    model_dir = inputs[0]
    cfg = config(inputs, tmp_path, temperature=0.7, kl_coef=0.2, gamma=1.0, lam=1.0, lr=1e-3)
    trainer = build(cfg)
    first = trainer.train_step()
    assert first["logprob_gap"] < 1e-4  # the engine's log-probs vs the training pass's
    assert first["ratio"] == pytest.approx(1, abs=1e-5) and first["approx_kl"] < 1e-10  # the update's, same weights
    assert first["kl"] == 0 and first["kl_exact"] == pytest.approx(0, abs=1e-6)  # the policy is the reference
    ref_hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    for sample in trainer.buffer:
        ours = torch.tensor(sample.logprobs, dtype=torch.float64)
        theirs = _hf_logprobs(ref_hf, sample.prompt_ids, sample.response_ids, 0.7)
        assert (ours - theirs).abs().max() < 1e-4
    while trainer.step < trainer.updates:
        trainer.train_step()
    second = trainer.rollout(1)  # after 4 updates
    assert second["logprob_gap"] < 1e-4 and second["kl_exact"] > 0.05
    policy_hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    state = {k: v for k, v in trainer.objective.model.state_dict().items() if not k.startswith("value_head.")}
    missing, unexpected = policy_hf.load_state_dict(state, strict=False)
    assert not missing and not [k for k in unexpected if "rotary" not in k and "inv_freq" not in k]
    beta = second["kl_coef"]
    for sample in trainer.buffer:
        ret = torch.tensor(sample.returns + [0.0], dtype=torch.float64)
        rewards = ret[:-1] - ret[1:]
        pi = _hf_logprobs(policy_hf, sample.prompt_ids, sample.response_ids, 0.7)
        ref = _hf_logprobs(ref_hf, sample.prompt_ids, sample.response_ids, 0.7)
        expected = -beta * (pi - ref)
        expected[-1] += min(sample.response_ids.count(TARGET), CAP)
        assert (rewards - expected).abs().max() < 1e-4
        assert (torch.tensor(sample.logprobs, dtype=torch.float64) - pi).abs().max() < 1e-4


def test_a_reward_model_with_another_tokenizer_scores_the_decoded_text(inputs, tmp_path):
    """The reward model's tokenizer is not the policy's: the rollout's scores are transformers' rewards of the
    responses' text as the reward model's tokenizer and chat format encode it."""
    from rm_tiny import save_tiny_reward_model, transformers_scores

    from llamaherd.tokenizer import Tokenizer

    rm = save_tiny_reward_model(tmp_path / "rm")
    trainer = build(config(inputs, tmp_path / "run", reward_fn=None, reward_model=str(rm), rm_chat_format="vicuna"))
    stats = trainer.rollout(0)
    policy_tokenizer = Tokenizer.from_path(inputs[0])
    prompts = {tuple(p.ids): p.messages for p in trainer.train_set}
    conversations = [[*prompts[tuple(s.prompt_ids)], {"role": "assistant", "content": policy_tokenizer.decode(
        s.response_ids, skip_special_tokens=True)}] for s in trainer.buffer]
    expected = transformers_scores(rm, conversations, "vicuna")
    assert stats["score"] == pytest.approx(sum(expected) / len(expected), abs=1e-5)
    assert stats["score_std"] > 0.01


# ---- the toy task -----------------------------------------------------------------------------------------------
def test_toy_task_reward_rises_while_kl_stays_below_target(inputs, tmp_path):
    """reward = occurrences of one token (at most 4): it rises over 15 rollouts, the KL to the reference stays below
    target_kl, and beta follows Ziegler et al.'s controller from the logged KL."""
    target, horizon = 8.0, 50
    run_in_process(ppo_args(inputs, tmp_path, max_steps=60, target_kl=target, kl_coef=0.2, kl_horizon=horizon,
                            lr=2e-4, save_every=60))
    rollouts = [r for r in records(tmp_path) if "kl" in r]
    scores = [r["score"] for r in rollouts]
    assert len(rollouts) == 15
    assert sum(scores[-3:]) / 3 > sum(scores[:3]) / 3 + 0.6, scores
    assert max(r["kl_exact"] for r in rollouts) < target and max(r["kl"] for r in rollouts) < target
    for before, after in zip(rollouts, rollouts[1:]):
        error = min(max(before["kl"] / target - 1, -0.2), 0.2)
        assert after["kl_coef"] == pytest.approx(before["kl_coef"] * (1 + error * 16 / horizon))
    lineage = json.loads((tmp_path / "lineage.json").read_text())
    assert lineage["method"] == "rlhf" and lineage["hyperparameters"]["target_kl"] == target
    assert (tmp_path / "model" / "model.safetensors").exists()


# ---- stops ------------------------------------------------------------------------------------------------------
def test_kl_explosion_stops_with_the_checkpoint_kept(inputs, tmp_path):
    cfg = config(inputs, tmp_path, lr=3e-3, max_kl=0.5, max_steps=40, save_every=4)
    with pytest.raises(PPOStopped, match=r"KL to the reference is .* nats per response .* above max_kl=0.5"):
        build_and_fit(cfg)
    assert (tmp_path / "checkpoints" / "step-00000004").is_dir()


def test_a_negative_mean_kl_is_reported_and_a_collapsed_policy_stops(inputs, tmp_path, capsys):
    trainer = build(config(inputs, tmp_path))
    stats = {"kl": -0.4, "kl_k3": 0.01, "kl_exact": 0.02}
    trainer._check(stats, [[5, 9, 2], [6, 2]], 3)
    warning = capsys.readouterr().err
    assert "mean KL estimate (k1) is negative at step 1 (rollout 3): -0.4 nats per response" in warning
    assert "k3 0.01, exact 0.02" in warning
    with pytest.raises(PPOStopped, match="collapsed at step 1 .*every response repeats one token"):
        trainer._check({"kl": 0.1, "kl_exact": 0.1}, [[9, 9, 9], [9, 9, 2]], 0)
    with pytest.raises(PPOStopped, match="collapsed .*all 2 responses of the rollout are the same"):
        trainer._check({"kl": 0.1, "kl_exact": 0.1}, [[9, 8], [9, 8]], 0)


def build_and_fit(cfg: TrainConfig):
    from llamaherd.train.ppo import run_ppo

    return run_ppo(cfg)


@pytest.mark.parametrize(("fn", "message"), [
    ("fails_second", r"--reward .*rewards\.py:fails_second raised ValueError: the scoring service is down"),
    ("nan_second", r"--reward .*rewards\.py:nan_second returned nan for completion 0 of 16"),
])
def test_a_failing_reward_function_is_one_line_and_keeps_the_checkpoint(inputs, tmp_path, monkeypatch, capsys, fn,
                                                                         message):
    from llamaherd.cli import main

    monkeypatch.setenv("PPO_CALLS", str(tmp_path / "calls"))
    assert main(ppo_args(inputs, tmp_path / "run", fn=fn, max_steps=8, save_every=4)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and __import__("re").search(message, err), err
    assert "finished work is kept" in err
    assert (tmp_path / "run" / "checkpoints" / "step-00000004").is_dir()


def test_bad_settings_are_one_line_errors(inputs, tmp_path):
    with pytest.raises(InputError, match="'lora_dropout' = 0.05: must be 0 for PPO"):
        config(inputs, tmp_path, method="lora", lora_dropout=0.05)
    with pytest.raises(InputError, match="rollout_batch_size.*multiple of batch_size=8"):
        config(inputs, tmp_path, rollout_batch_size=12)
    with pytest.raises(InputError, match="exactly one of --rm REWARD_MODEL and --reward"):
        build(config(inputs, tmp_path, reward_fn=None))
    with pytest.raises(InputError, match="has no function 'nope'"):
        build(config(inputs, tmp_path, fn="nope"))
    with pytest.raises(InputError, match="'kl_horizon' = 0: must be >= 1"):
        config(inputs, tmp_path, target_kl=1.0, kl_horizon=0)
    with pytest.raises(InputError, match="'gamma' = 1.5: gamma and lam must be in"):
        config(inputs, tmp_path, gamma=1.5)
    with pytest.raises(InputError, match="'max_seq_len' = 100000: longer than the policy's context"):
        build(config(inputs, tmp_path, max_seq_len=100_000))


def test_every_rollout_is_logged_whatever_log_every(inputs, tmp_path):
    """A rollout's score and KL ride on its first update step: that step is logged even between log_every steps."""
    run_in_process(ppo_args(inputs, tmp_path, max_steps=8, log_every=5, save_every=8))
    assert [(r["step"], "kl" in r) for r in records(tmp_path)] == [(1, True), (5, True), (8, False)]


# ---- exact resume -----------------------------------------------------------------------------------------------
def _kill_when(proc: subprocess.Popen, ready) -> None:
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if ready():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"


def _without_timings(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.endswith("_s") and not k.endswith("per_s")} for r in rows]


STALL_IN_UPDATE = """
import os, pathlib, time
from llamaherd.train import core
train_step = core.Trainer.train_step
def stalling(self):  # PPOTrainer's update: the optimizer step after its rollout (if any)
    if self.step + 1 == int(os.environ["PPO_STALL_STEP"]):
        pathlib.Path(os.environ["PPO_STALL_FLAG"]).write_text("in the update")
        time.sleep(120)
    return train_step(self)
core.Trainer.train_step = stalling
"""


def test_sigkill_mid_update_and_mid_rollout_then_resume_matches_uninterrupted_run(inputs, tmp_path, capsys):
    """4 updates per rollout, a checkpoint every 3 steps: killed in the update of step 8 (checkpoint 6 is between
    rollout 1's updates, so the rollout comes back from the checkpoint), resumed and killed while rollout 3 is
    scored (step 13; checkpoint 12 ends rollout 2), resumed to the end: the same metrics, step by step, as a run
    never killed."""
    common = {"fn": "stalls", "max_steps": 16, "save_every": 3, "lora_dropout": 0.0, "method": "lora", "lr": 3e-3,
              "target_kl": 1.0, "kl_horizon": 50}  # beta moves every rollout: the checkpoint must carry it
    ref = tmp_path / "ref"
    run_in_process(ppo_args(inputs, ref, **common))

    out = tmp_path / "killed"
    flag = tmp_path / "stall.flag"
    (tmp_path / "stall_in_update.py").write_text(STALL_IN_UPDATE)
    env = subprocess_env()
    env |= {"PPO_STALL_FLAG": str(flag), "PYTHONPATH": f"{tmp_path}:{env['PYTHONPATH']}"}
    patched = [sys.executable, "-c", "import stall_in_update, sys; from llamaherd.cli import main; "
                                     "sys.exit(main(sys.argv[1:]))"]
    proc = subprocess.Popen(patched + ppo_args(inputs, out, **common), env=env | {"PPO_STALL_STEP": "8"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _kill_when(proc, flag.exists)
    assert [r["step"] for r in records(out)] == list(range(1, 8))
    state = json.loads((out / "checkpoints" / "step-00000006" / "ppo_state.json").read_text())
    assert state["buffer_iteration"] == 1 and len(state["buffer"]) == 16

    flag.unlink()
    proc = subprocess.Popen(herd_cmd(*ppo_args(inputs, out, resume=True, **common)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env | {"PPO_STALL_AT": "2"})  # rollouts 2, then 3
    _kill_when(proc, flag.exists)
    assert [r["step"] for r in records(out)] == list(range(1, 13))

    capsys.readouterr()
    run_in_process(ppo_args(inputs, out, resume=True, **common))
    assert "resumed from" in (stdout := capsys.readouterr().out) and "step-00000012" in stdout
    assert _without_timings(records(out)) == _without_timings(records(ref))
    assert [r["step"] for r in records(out)] == list(range(1, 17))
