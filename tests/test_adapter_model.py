"""A PEFT adapter directory is a MODEL: `load_model`, `herd generate/chat/convert/info/eval` and the lm-eval
model type take it, against peft + transformers; its base comes from adapter_config.json or --base; its run's
lineage reaches the leaderboard with the evaluation results."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from eval_tiny import write_tiny_benchmarks
from train_tiny import make_tiny_run_inputs, run_in_process, tiny_args

from llamaherd.cli import main
from llamaherd.errors import CheckpointError, InputError
from llamaherd.leaderboard import record_results
from llamaherd.leaderboard.ranking import board_rows
from llamaherd.leaderboard.registry import Registry
from llamaherd.load import load_model
from llamaherd.lora import lora_layers
from llamaherd.quantize import Int8Linear

pytest.importorskip("peft")

IDS = torch.randint(3, 128, (2, 13), generator=torch.Generator().manual_seed(5))
MAX_NEW = 10
# Stanford Alpaca's prompt without input (tatsu-lab/stanford_alpaca train.py, PROMPT_DICT["prompt_no_input"]).
ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    """(base dir, adapter dir) of a LoRA fine-tune of the tiny model in the Alpaca format: RUN/adapter beside
    RUN/lineage.json, as `herd finetune` writes them."""
    root = tmp_path_factory.mktemp("adapter-model")
    base, data = make_tiny_run_inputs(root)
    args = tiny_args(base, data, root / "acme", method="lora", lora_r=4, lr=3e-2, max_steps=6, eval_every=6,
                     save_every=6)
    run_in_process([*args, "--lora-targets", "q", "v", "o", "down"])
    return base, root / "acme" / "adapter"


@pytest.fixture(scope="module")
def peft_logits(run) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(PeftModel, its merge_and_unload, the bare transformers base) logits on IDS."""
    from transformers import AutoModelForCausalLM

    base, adapter = run
    model = peft_model(base, adapter)
    with torch.no_grad():
        unmerged = model(IDS).logits
        merged = model.merge_and_unload()(IDS).logits
        plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()(IDS).logits
    return unmerged, merged, plain


def peft_model(base: Path, adapter: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)


def test_load_model_merges_the_adapter_as_peft(run, peft_logits):
    base, adapter = run
    unmerged, merged, plain = peft_logits
    assert (unmerged - plain).abs().max() > 0.1  # the trained adapter changes the outputs
    loaded = load_model(adapter)
    assert loaded.source.name == "acme" and loaded.source.base.path.resolve() == base.resolve()
    assert loaded.chat_format == "alpaca"  # the format the adapter was trained with (lineage.json)
    assert not lora_layers(loaded.model)  # merged on load: decode runs the plain layers
    ours = logits(loaded.model)
    assert (ours - merged).abs().max() <= 1e-5
    # Merging rounds W + scaling * B A once in fp32, which moves these logits (|x| ~ 10) off the unmerged ones by
    # as much as PEFT's own merge moves them (2.3e-5 on an AVX2 EPYC VM, where a fixed 1e-5 failed)
    peft_drift = (merged - unmerged).abs().max().item()
    assert (ours - unmerged).abs().max() <= peft_drift + 1e-5


def test_int8_base_keeps_the_adapter_unmerged(run, peft_logits):
    base, adapter = run
    unmerged, _, _ = peft_logits
    loaded = load_model(adapter, quantize="int8")
    layers = lora_layers(loaded.model)
    assert len(layers) == 4 * 2 and all(isinstance(m.base_layer, Int8Linear) for m in layers.values())
    ours, int8_base = logits(loaded.model), logits(load_model(base, quantize="int8").model)
    assert (ours - unmerged).abs().max() < 0.25 * (int8_base - unmerged).abs().max()


def _reference_greedy(base: Path, adapter: Path, text: str) -> tuple[str, str]:
    """(prompt, continuation) as decoded text: PEFT's greedy tokens, tokenized and decoded by `tokenizers`."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(base / "tokenizer.json"))
    ids = tok.encode(text).ids  # <s> first, as the tokenizer's post-processor adds it
    with torch.no_grad():
        out = peft_model(base, adapter).generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False,
                                                 eos_token_id=2, pad_token_id=2)[0].tolist()
    new = out[len(ids):]
    new = new[: new.index(2)] if 2 in new else new
    prompt = tok.decode(ids, skip_special_tokens=False)
    return prompt, tok.decode(ids + new, skip_special_tokens=False)[len(prompt):]


def test_generate_and_chat_give_peft_greedy_text(run, capsys):
    base, adapter = run
    text = "the quick brown fox"
    assert main(["generate", str(adapter), "--prompt", text, "--max-new-tokens", str(MAX_NEW)]) == 0
    _, continuation = _reference_greedy(base, adapter, text)
    assert capsys.readouterr().out == text + continuation + "\n"
    # The run's lineage.json says it was trained in the Alpaca format, so chat renders that without --chat-format.
    instruction = "Repeat: the lazy dog"
    assert main(["chat", str(adapter), "--prompt", instruction, "--max-new-tokens", str(MAX_NEW)]) == 0
    _, reply = _reference_greedy(base, adapter, ALPACA.format(instruction=instruction))
    assert capsys.readouterr().out == reply + "\n"


def test_convert_writes_the_merged_checkpoint_and_merge_is_the_same(run, peft_logits, tmp_path):
    from transformers import AutoModelForCausalLM

    base, adapter = run
    _, merged, _ = peft_logits
    assert main(["convert", str(adapter), str(tmp_path / "convert")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "convert", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (hf(IDS).logits - merged).abs().max() <= 1e-5
    assert (tmp_path / "convert" / "tokenizer.json").is_file()
    # `herd merge BASE ADAPTER OUT` is `herd convert ADAPTER OUT --base BASE`: the same bytes.
    assert main(["merge", str(base), str(adapter), str(tmp_path / "merge")]) == 0
    weights = "model.safetensors"
    assert (tmp_path / "merge" / weights).read_bytes() == (tmp_path / "convert" / weights).read_bytes()


def test_info_names_adapter_and_base(run, capsys):
    base, adapter = run
    assert main(["info", str(adapter)]) == 0
    out = capsys.readouterr().out
    assert f"PEFT adapter {adapter} on base tiny" in out and "parameters" in out


def test_eval_of_an_adapter_carries_its_lineage_to_the_leaderboard(run, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, adapter = run
    write_tiny_benchmarks(tmp_path / "data")
    db = tmp_path / "board.sqlite"
    monkeypatch.chdir(tmp_path)
    common = ["--suite", "harness", "--tasks", "arc_challenge", "--limit", "6", "--data-dir", str(tmp_path / "data"),
              "--batch-size", "4", "--no-progress", "--db", str(db)]
    assert main(["eval", str(adapter), *common]) == 0
    results = json.loads((tmp_path / "eval-results" / "acme-harness" / "results.json").read_text())
    lineage = json.loads((adapter.parent / "lineage.json").read_text())
    model = results["model"]
    assert model["name"] == "acme" and model["fingerprint"] == lineage["child"]["fingerprint"]
    assert model["base"]["fingerprint"] == lineage["parent"]["fingerprint"] and model["lineage"] == lineage
    with Registry(db) as reg:
        rows = {r.name: r for r in board_rows(reg)}
    assert rows["acme"].parent == "tiny" and rows["acme"].method == "lora-sft"

    # The scores are those of PEFT's merged model, saved by transformers and evaluated as a plain checkpoint.
    merged = tmp_path / "peft-merged"
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload().save_pretrained(
        merged)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (base / name).is_file():
            (merged / name).write_bytes((base / name).read_bytes())
    assert main(["eval", str(merged), *common, "--no-record"]) == 0
    theirs = json.loads((tmp_path / "eval-results" / "peft-merged-harness" / "results.json").read_text())
    ours_docs = (tmp_path / "eval-results" / "acme-harness" / "samples_arc_challenge.jsonl").read_text().splitlines()
    their_docs = (tmp_path / "eval-results" / "peft-merged-harness" / "samples_arc_challenge.jsonl").read_text()
    for a, b in zip(ours_docs, their_docs.splitlines(), strict=True):
        for x, y in zip(json.loads(a)["requests"], json.loads(b)["requests"], strict=True):
            assert abs(x["logprob"] - y["logprob"]) <= 1e-4
    assert results["tasks"]["arc_challenge"]["metrics"] == theirs["tasks"]["arc_challenge"]["metrics"]

    # The results carry the lineage: imported elsewhere, without the run directory, the parent is still known.
    model["path"] = str(tmp_path / "moved-away")
    (tmp_path / "copy.json").write_text(json.dumps(results))
    done = record_results(tmp_path / "other.sqlite", tmp_path / "copy.json")
    assert done.lineage is not None and (done.lineage.parent, done.lineage.child) == ("tiny", "acme")
    # An adapter no run of ours wrote (no lineage): its base is its parent.
    del model["lineage"]
    (tmp_path / "copy.json").write_text(json.dumps(results))
    done = record_results(tmp_path / "third.sqlite", tmp_path / "copy.json")
    assert done.lineage is not None and (done.lineage.parent, done.lineage.method) == ("tiny", "lora")


def _peft_adapter(base: Path, out: Path, base_field: str | None) -> Path:
    """A PEFT-made adapter (random B, no lineage.json) whose base_model_name_or_path is `base_field`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps(cfg | {"base_model_name_or_path": base_field}))
    return out


def test_relative_base_is_found_beside_the_adapter(run, tmp_path, monkeypatch):
    base, _ = run
    adapter = _peft_adapter(base, tmp_path / "adapters" / "mine", os.path.relpath(base, tmp_path / "adapters" / "mine"))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # not a path relative to the working directory
    loaded = load_model(adapter)
    assert loaded.source.base.path.resolve() == base.resolve() and loaded.source.name == "mine"
    with torch.no_grad():
        assert (logits(loaded.model) - peft_model(base, adapter).merge_and_unload()(IDS).logits).abs().max() <= 1e-5


def test_missing_base_names_the_paths_tried_and_base_overrides(run, tmp_path, monkeypatch, capsys):
    base, _ = run
    monkeypatch.chdir(tmp_path)
    gone = tmp_path / "models" / "llama-gone"
    adapter = _peft_adapter(base, tmp_path / "a1", str(gone))
    with pytest.raises(CheckpointError) as e:
        load_model(adapter)
    message = str(e.value)
    assert "\n" not in message and str(adapter / "adapter_config.json") in message
    assert f"tried {gone}" in message and "--base MODEL" in message
    assert main(["generate", str(adapter), "--prompt", "the fox", "--max-new-tokens", "3"]) == 2
    assert f"tried {gone}" in capsys.readouterr().err

    relative = _peft_adapter(base, tmp_path / "a2", "llama-gone")  # tried from here and from the adapter
    with pytest.raises(CheckpointError, match=f"tried llama-gone and {tmp_path / 'a2' / 'llama-gone'}"):
        load_model(relative)
    with pytest.raises(CheckpointError, match="'base_model_name_or_path' is None; pass the base model with --base"):
        load_model(_peft_adapter(base, tmp_path / "a3", None))

    # --base (base= in the library) wins over the recorded path.
    loaded = load_model(adapter, base=base)
    with torch.no_grad():
        assert (logits(loaded.model) - peft_model(base, adapter).merge_and_unload()(IDS).logits).abs().max() <= 1e-5
    text = "the quick brown fox"
    assert main(["generate", str(adapter), "--base", str(base), "--prompt", text,
                 "--max-new-tokens", str(MAX_NEW)]) == 0
    assert capsys.readouterr().out == text + _reference_greedy(base, adapter, text)[1] + "\n"
    with pytest.raises(InputError, match="not a PEFT adapter directory"):
        load_model(base, base=base)


def test_lm_eval_model_type_takes_an_adapter_and_base(run, tmp_path):
    pytest.importorskip("lm_eval")
    from llamaherd.evaluate.lm_eval_adapter import LlamaherdLM

    base, _ = run
    adapter = _peft_adapter(base, tmp_path / "a", str(tmp_path / "nowhere"))
    lm = LlamaherdLM(model=str(adapter), base=str(base), device="cpu")
    with torch.no_grad():
        assert (logits(lm.engine.model) - peft_model(base, adapter).merge_and_unload()(IDS).logits).abs().max() <= 1e-5
