"""The "llamaherd" model type inside lm-eval: its CLI on one task, and the rolling/generation requests,
each against lm-eval's own hf model on the same checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from eval_tiny import save_tiny_eval_model

pytest.importorskip("lm_eval")

DOCS = [
    {"question": "What is the capital of France?", "choices": ["Paris", "the lazy dog", "water"], "label": 0},
    {"question": "How many legs does a spider have?", "choices": ["Eight legs.", "one", "ice"], "label": 0},
    {"question": "What melts at zero degrees?", "choices": ["ice", "a fox", "the soap", "car"], "label": 0},
    {"question": "Who jumps over the lazy dog?", "choices": ["The quick brown fox", "water"], "label": 1},
    {"question": "What does a person wash?", "choices": ["a car", "questions", "biology"], "label": 0},
    {"question": "What boils at one hundred degrees?", "choices": ["water", "answers"], "label": 0},
]
TASK_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{{{choices}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_eval_model(tmp_path_factory.mktemp("tiny-lm-eval"))


def _run_lm_eval(args: list[str], out, task_dir) -> tuple[dict, list[dict]]:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [*args, "--tasks", "tiny_mc", "--include_path", str(task_dir), "--device", "cpu",
           "--batch_size", "3", "--log_samples", "--output_path", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["tiny_mc"]
    samples = [json.loads(line) for line in next(out.rglob("samples_tiny_mc_*.jsonl")).read_text().splitlines()]
    return results, sorted(samples, key=lambda s: s["doc_id"])


@pytest.mark.slow
def test_lm_eval_cli_runs_llamaherd_model_type(tiny_dir, tmp_path):
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    (task_dir / "tiny_mc.yaml").write_text(TASK_YAML.format(data=data))

    # The bare `lm_eval` command, as a user types it: the start-up hook that `make setup` installs registers
    # the model type (installing it again here is harmless).
    from llamaherd.evaluate import lm_eval_hook

    assert lm_eval_hook.main(["install"]) == 0
    ours, our_samples = _run_lm_eval(
        [str(Path(sys.executable).parent / "lm_eval"), "--model", "llamaherd",
         "--model_args", f"model={tiny_dir},dtype=fp32"], tmp_path / "ours", task_dir)
    ref, ref_samples = _run_lm_eval(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={tiny_dir},dtype=float32"],
        tmp_path / "ref", task_dir)

    assert len(our_samples) == len(DOCS)
    for key in ("acc,none", "acc_norm,none"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-9)
    for a, b in zip(our_samples, ref_samples, strict=True):
        ll_a = [float(r[0]) for r in a["filtered_resps"]]
        ll_b = [float(r[0]) for r in b["filtered_resps"]]
        assert ll_a == pytest.approx(ll_b, abs=1e-4)
        assert a["acc"] == b["acc"] and a["acc_norm"] == b["acc_norm"]


def test_rolling_and_generation_match_lm_eval_hf(tiny_dir):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from llamaherd.evaluate.lm_eval_adapter import LlamaherdLM

    ours = LlamaherdLM(model=str(tiny_dir), max_length=16, batch_size=2, device="cpu")
    ref = HFLM(pretrained=str(tiny_dir), device="cpu", dtype="float32", max_length=16, batch_size=2)
    texts = ["The quick brown fox jumps over the lazy dog. water boils at one hundred degrees", "Q: legs?"]
    rolling = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    assert ours.loglikelihood_rolling(rolling, True) == pytest.approx(ref.loglikelihood_rolling(rolling, True),
                                                                       abs=1e-4)
    # More requests than batch rows, each with its own stop strings (a list or one string) and length; the
    # second stops after a generated "<s>" that both leave out of the text.
    gen = [Instance("generate_until", {}, args, i) for i, args in enumerate([
        ("Question: What is", {"until": ["ce"], "max_gen_toks": 10}),
        ("The quick brown fox", {"until": ["Tre", "xyz"], "max_gen_toks": 10}),
        ("Q: legs?", {"until": "ap", "max_gen_toks": 10}),
        ("water boils at", {"until": ["\n"], "max_gen_toks": 3}),
    ])]
    expected = ref.generate_until(gen, True)
    assert expected == ["ck", "esT.?\nAice", "ian.: bm", ") ofH"]  # each request ends its own way
    assert ours.generate_until(gen, True) == expected
