"""LoRA against Hugging Face PEFT on the transformers model: adapters both ways, merge + export, int8 base."""

from __future__ import annotations

import json
from contextlib import nullcontext

import pytest
import torch
from hf_tiny import save_hf_model

from llamaherd.checkpoints.hf import save_hf
from llamaherd.errors import CheckpointError, InputError
from llamaherd.load import load_gpt
from llamaherd.lora import (
    LoRAConfig,
    LoRALinear,
    count_parameters,
    inject_lora,
    load_adapter,
    lora_layers,
    lora_state_dict,
    merge_lora,
    quantize_nf4,
    save_adapter,
)
from llamaherd.model import Linear
from llamaherd.quantize import Int8Linear

pytest.importorskip("peft")
ALL = ("q", "k", "v", "o", "gate", "up", "down", "lm_head")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf-llama")
    save_hf_model("llama-gqa", path)
    return path


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(3))


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def randomize_b(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


def test_inject_freezes_base_and_starts_at_identity(base_dir, ids):
    model = load_gpt(base_dir)
    before = model(ids)
    inject_lora(model, LoRAConfig(r=4, alpha=8, targets=ALL))
    assert torch.equal(model(ids), before)  # B starts at zero
    trainable, total = count_parameters(model)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == set(lora_state_dict(model))
    assert all(".lora_A." in n or ".lora_B." in n for n in names)
    layers = lora_layers(model)
    assert len(layers) == 2 * 7 + 1
    assert trainable == sum(m.r * (m.in_features + m.out_features) for m in layers.values())
    assert total == model.config.n_params + trainable


def test_llamaherd_adapter_opens_in_peft_with_same_logits(base_dir, ids, tmp_path):
    from peft import PeftModel

    model = inject_lora(load_gpt(base_dir), LoRAConfig(r=4, alpha=8, dropout=0.1, targets=ALL))
    randomize_b(model)
    model.eval()
    ours = model(ids)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base_dir))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["lora_dropout"] == 0.1
    assert cfg["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj", "lm_head"])
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.lm_head.lora_B.weight" in keys
    peft_model = PeftModel.from_pretrained(hf_model(base_dir), tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = peft_model(ids).logits
    torch.testing.assert_close(ours.detach(), theirs, atol=1e-4, rtol=0)
    assert (theirs - hf_model(base_dir)(ids).logits).abs().max() > 1e-2  # the adapter really changes the logits


def test_merge_then_save_hf_opens_in_transformers(base_dir, ids, tmp_path):
    model = inject_lora(load_gpt(base_dir), LoRAConfig(r=4, alpha=16, targets=("q", "v", "down", "lm_head")))
    randomize_b(model, seed=1)
    with torch.no_grad():
        unmerged = model(ids)
    merge_lora(model)
    assert not lora_layers(model)
    assert set(model.state_dict()) == set(load_gpt(base_dir).state_dict())
    save_hf(model.state_dict(), model.config, tmp_path / "merged")
    with torch.no_grad():
        theirs = hf_model(tmp_path / "merged")(ids).logits
    torch.testing.assert_close(theirs, unmerged, atol=1e-4, rtol=0)


def test_peft_adapter_loads_into_llamaherd(base_dir, ids, tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "k_proj", "o_proj", "up_proj", "lm_head"],
                     alpha_pattern={"k_proj": 2}, rank_pattern={"o_proj": 2}, use_rslora=True, lora_dropout=0.1,
                     init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(hf_model(base_dir), cfg).eval()
    with torch.no_grad():
        theirs = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path / "peft")
    model = load_adapter(load_gpt(base_dir), tmp_path / "peft")
    assert model.model.layers[0].self_attn.o_proj.r == 2
    assert not any(m.training for m in model.modules())  # an eval-mode model gets eval-mode adapters (no dropout)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), theirs, atol=1e-4, rtol=0)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(lora_state_dict(model))


def test_save_load_round_trip(base_dir, ids, tmp_path):
    model = inject_lora(load_gpt(base_dir), LoRAConfig(r=2, alpha=4, targets=("q", "gate")))
    randomize_b(model, seed=2)
    save_adapter(model, tmp_path / "a")
    again = load_adapter(load_gpt(base_dir), tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))


def test_int8_base_lora_trains_and_merges(base_dir, ids):
    """Frozen int8 base (QLoRA-style on CPU) against a float model holding the same dequantized weights."""
    q = inject_lora(load_gpt(base_dir, quantize="int8"), LoRAConfig(r=4, alpha=8, targets=("q", "v", "down")))
    assert isinstance(q.model.layers[0].self_attn.q_proj.base_layer, Int8Linear)
    ref = load_gpt(base_dir)
    with torch.no_grad():
        for name, module in q.named_modules():
            if isinstance(module, Int8Linear):
                ref.get_submodule(name.removesuffix(".base_layer")).weight.copy_(module.dequantized(torch.float32))
    inject_lora(ref, LoRAConfig(r=4, alpha=8, targets=("q", "v", "down")))
    randomize_b(q, seed=4)
    ref.load_state_dict(lora_state_dict(q), strict=False)
    for m in (q, ref):
        torch.nn.functional.cross_entropy(m(ids).flatten(0, 1), ids.roll(-1, 1).flatten()).backward()
    # the gradient reaches layer 0's adapters through frozen int8 layers above it
    for name in lora_state_dict(q):
        grad_q = q.get_parameter(name).grad
        grad_ref = ref.get_parameter(name).grad
        assert grad_q is not None and grad_q.abs().sum() > 0, name
        torch.testing.assert_close(grad_q, grad_ref, atol=1e-4, rtol=1e-3)
    with torch.no_grad():
        before = q(ids)
        merge_lora(q)
        assert type(q.model.layers[0].self_attn.q_proj) is Linear  # a plain float layer again
        assert isinstance(q.model.layers[0].self_attn.k_proj, Int8Linear)  # untargeted layers stay int8
        torch.testing.assert_close(q(ids), before, atol=1e-4, rtol=0)


def test_clear_errors(base_dir, tmp_path):
    with pytest.raises(InputError, match="unknown LoRA target 'qkv'"):
        LoRAConfig(targets=("qkv",))
    tied = tmp_path / "tied"
    save_hf_model("llama-tied", tied)
    with pytest.raises(InputError, match="ties lm_head"):
        inject_lora(load_gpt(tied), LoRAConfig(targets=("q", "lm_head")))
    falcon = tmp_path / "falcon"
    save_hf_model("falcon-7b-style", falcon)
    with pytest.raises(InputError, match="gate_proj"):
        inject_lora(load_gpt(falcon), LoRAConfig(targets=("gate",)))
    with pytest.raises(CheckpointError, match="adapter_config.json: not found"):
        load_adapter(load_gpt(base_dir), tmp_path)
    model = inject_lora(load_gpt(base_dir), LoRAConfig(r=2, targets=("k",)))
    save_adapter(model, tmp_path / "a")
    mha = tmp_path / "mha"
    save_hf_model("llama-mha", mha)
    with pytest.raises(CheckpointError, match=r"k_proj has lora_A \(2, 64\) / lora_B \(32, 2\).*do not fit"):
        load_adapter(load_gpt(mha), tmp_path / "a")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="int8"):
            quantize_nf4(load_gpt(base_dir))


def test_lora_layer_math():
    """y = W x + b + (alpha / r) * B A x, as in the LoRA paper (eq. 3)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    lora = LoRALinear(base, r=3, scaling=2.0)
    torch.nn.init.normal_(lora.lora_B.weight)
    x = torch.randn(4, 6)
    expected = x @ base.weight.T + base.bias + 2.0 * x @ lora.lora_A.weight.T @ lora.lora_B.weight.T
    torch.testing.assert_close(lora(x), expected)


@pytest.mark.parametrize("kind", ["falcon-7b-style", "falcon-40b-style"])
def test_falcon_adapters_both_ways(kind, ids, tmp_path):
    """Falcon fuses q, k, v in Hugging Face: q/v adapters become one exact adapter on query_key_value."""
    from peft import LoraConfig, PeftModel, get_peft_model

    save_hf_model(kind, tmp_path / "base")
    model = inject_lora(load_gpt(tmp_path / "base"), LoRAConfig(r=3, alpha=6, targets=("q", "v", "o", "down")))
    randomize_b(model, seed=5)
    with torch.no_grad():
        ours = model(ids)
    save_adapter(model, tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["dense", "dense_4h_to_h", "query_key_value"]
    assert cfg["rank_pattern"] == {"query_key_value": 6} and cfg["alpha_pattern"] == {"query_key_value": 12}
    peft_model = PeftModel.from_pretrained(hf_model(tmp_path / "base"), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours, peft_model(ids).logits, atol=1e-4, rtol=0)

    torch.manual_seed(1)
    theirs = get_peft_model(hf_model(tmp_path / "base"), LoraConfig(
        r=4, lora_alpha=8, target_modules=["query_key_value", "dense_h_to_4h"], init_lora_weights=False,
        task_type="CAUSAL_LM")).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = load_adapter(load_gpt(tmp_path / "base"), tmp_path / "theirs")
    assert set(lora_layers(loaded)) >= {"model.layers.0.self_attn.k_proj", "model.layers.1.mlp.up_proj"}
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), theirs(ids).logits, atol=1e-4, rtol=0)


# PEFT's rank_pattern / alpha_pattern: each key is one regex (alternation included) matched against the end of
# the Hugging Face module name from a name boundary on, the first matching key winning. Several kinds at once:
# alternation, a full dotted path, a layer-index regex, keys matching nothing ("proj" would match every
# projection if the boundary were ignored; "self_attn" names a module that is not adapted).
LLAMA_PATTERNS = {
    "alternation": ({}, {"q_proj|v_proj": 40}),  # r=4, alpha=8: v_proj scales by 40 / 4, not 8 / 4
    "mixed": (
        {"model.layers.0.self_attn.q_proj": 2, r"layers\.1\..*v_proj": 6, "nothing_here": 3, "proj": 5},
        {r"layers\.1\..*v_proj": 20, "q_proj|v_proj": 40, "model.layers.0.self_attn.k_proj": 1, "self_attn": 99},
    ),
}
FALCON_PATTERNS = ({r"h\.1\..*query_key_value": 6, "nothing|proj": 3}, {"query_key_value|dense": 40, "q_proj": 1})


def peft_lora(base_dir, targets, rank_pattern, alpha_pattern, seed=0):
    """PEFT's own model for the patterns (random A and B), and its (rank, scaling) per adapted module."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(seed)
    model = get_peft_model(hf_model(base_dir), LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
        init_lora_weights=False, task_type="CAUSAL_LM")).eval()
    layers = {name.removeprefix("base_model.model."): (m.r["default"], round(m.scaling["default"], 9))
              for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    return model, layers


def ranks_and_scales(model) -> dict[str, tuple[int, float]]:
    return {name: (m.r, round(m.scaling, 9)) for name, m in lora_layers(model).items()}


@pytest.mark.parametrize("case", LLAMA_PATTERNS)
def test_peft_rank_and_alpha_patterns_load_as_peft_reads_them(case, base_dir, ids, tmp_path):
    rank_pattern, alpha_pattern = LLAMA_PATTERNS[case]
    peft_model, peft_layers = peft_lora(base_dir, ["q_proj", "k_proj", "v_proj"], rank_pattern, alpha_pattern)
    with torch.no_grad():
        theirs = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path / "peft")
    model = load_adapter(load_gpt(base_dir), tmp_path / "peft")
    assert ranks_and_scales(model) == peft_layers
    with torch.no_grad():
        torch.testing.assert_close(model(ids), theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", LLAMA_PATTERNS)
def test_training_patterns_match_peft_and_save_for_it(case, base_dir, ids, tmp_path):
    from peft import PeftModel

    rank_pattern, alpha_pattern = LLAMA_PATTERNS[case]
    _, peft_layers = peft_lora(base_dir, ["q_proj", "k_proj", "v_proj"], rank_pattern, alpha_pattern)
    config = LoRAConfig(r=4, alpha=8, targets=("q", "k", "v"), rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    unused = [k for patterns in (rank_pattern, alpha_pattern) for k in patterns if k in ("nothing_here", "proj",
                                                                                           "self_attn")]
    with pytest.warns(UserWarning, match="match none of the adapted layers") if unused else nullcontext():
        model = inject_lora(load_gpt(base_dir), config)
    assert ranks_and_scales(model) == peft_layers
    randomize_b(model, seed=6)
    with torch.no_grad():
        ours = model(ids)
    save_adapter(model, tmp_path / "ours")  # layer-dependent ranks need full-path keys to reach PEFT
    peft_model = PeftModel.from_pretrained(hf_model(base_dir), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["falcon-7b-style", "falcon-40b-style"])
def test_falcon_patterns_on_the_fused_qkv_name(kind, ids, tmp_path):
    """On Falcon a pattern names the fused query_key_value; llamaherd's split q, k, v each take its rank and
    alpha, which is exactly PEFT's fused adapter (loaded) and saves back to one (trained)."""
    from peft import PeftModel

    base = tmp_path / "base"
    save_hf_model(kind, base)
    rank_pattern, alpha_pattern = FALCON_PATTERNS
    peft_model, peft_layers = peft_lora(base, ["query_key_value", "dense"], rank_pattern, alpha_pattern)
    assert peft_layers["transformer.h.1.self_attention.query_key_value"] == (6, round(40 / 6, 9))
    with torch.no_grad():
        theirs = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = load_adapter(load_gpt(base), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), theirs, atol=1e-4, rtol=0)

    config = LoRAConfig(r=4, alpha=8, targets=("q", "k", "v", "o"), rank_pattern=rank_pattern,
                        alpha_pattern=alpha_pattern)
    with pytest.warns(UserWarning, match=r"\['nothing\|proj'\]"):
        model = inject_lora(load_gpt(base), config)
    for name, value in ranks_and_scales(model).items():  # each part has the rank and scale of its fused layer
        block, part = name.split(".")[2], "dense" if name.endswith("o_proj") else "query_key_value"
        assert value == peft_layers[f"transformer.h.{block}.self_attention.{part}"]
    randomize_b(model, seed=7)
    with torch.no_grad():
        ours = model(ids)
    save_adapter(model, tmp_path / "ours")
    peft_model = PeftModel.from_pretrained(hf_model(base), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, ours, atol=1e-4, rtol=0)


def test_pattern_errors_name_the_field(base_dir, tmp_path):
    with pytest.raises(InputError, match="field 'rank_pattern' key 'q_proj' has value 0"):
        LoRAConfig(rank_pattern={"q_proj": 0})
    with pytest.raises(InputError, match=r"field 'alpha_pattern' key 'q_proj\(' is not a valid regex"):
        LoRAConfig(alpha_pattern={"q_proj(": 2})
    model = inject_lora(load_gpt(base_dir), LoRAConfig(r=2, targets=("q",)))
    save_adapter(model, tmp_path / "a")
    cfg_path = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps(cfg | {"rank_pattern": {"q_proj|v_proj": 3}}))
    with pytest.raises(CheckpointError, match=r"adapter_config.json: fields 'r' / 'rank_pattern' give "
                                              r"model.layers.0.self_attn.q_proj rank 3 .* has rank 2"):
        load_adapter(load_gpt(base_dir), tmp_path / "a")
