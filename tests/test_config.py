"""Preset hyper-parameters: parameter counts against the published totals, names, info."""

import pytest
import torch

from llamaherd.config import PRESETS, UnknownModelName, preset
from llamaherd.info import weight_bytes
from llamaherd.model import GPT

# Published totals: LLaMA paper (Touvron et al. 2023, table 2), Llama 2 paper (table 1 / model cards:
# 6.74B, 13.02B, 68.98B as counted by the released checkpoints), Falcon model cards, SmolLM2 card.
# Written as published, in billions; the tolerance is 0.5% or, where the figure is rounded more
# coarsely than that (the LLaMA paper's "6.7B" stands for 6.65-6.75B), half of its last digit.
PUBLISHED = {
    "llama-7b": "6.7", "llama-13b": "13.0", "llama-30b": "32.5", "llama-65b": "65.2",
    "llama-2-7b": "6.74", "llama-2-13b": "13.02", "llama-2-70b": "68.98",
    "falcon-7b": "6.92", "falcon-40b": "41.8", "smollm2-135m": "0.1345",
}


def _tolerance(published: str) -> float:
    decimals = len(published.split(".")[1])
    return max(0.005 * float(published), 0.5 * 10**-decimals) * 1e9


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_matches_published(name):
    with torch.device("meta"):
        model = GPT(PRESETS[name])
    n = sum(p.numel() for p in model.parameters())
    published = float(PUBLISHED[name]) * 1e9
    assert abs(n - published) <= _tolerance(PUBLISHED[name]), f"{name}: {n:,} vs {published:,.0f}"
    assert n == PRESETS[name].n_params  # the shape formula used by `herd info` agrees with the module


def test_all_presets_covered():
    assert set(PRESETS) == set(PUBLISHED)


@pytest.mark.parametrize(
    "alias, base, hub, fmt",
    [
        ("llama-2-7b-chat", "llama-2-7b", "meta-llama/Llama-2-7b-chat-hf", "llama-2"),
        ("llama-2-70b-chat", "llama-2-70b", "meta-llama/Llama-2-70b-chat-hf", "llama-2"),
        ("vicuna-7b", "llama-7b", "lmsys/vicuna-7b-v1.3", "vicuna"),
        ("alpaca-7b", "llama-7b", "chavinlo/alpaca-native", "alpaca"),
        ("koala-7b", "llama-7b", "TheBloke/koala-7B-HF", "koala"),
        ("falcon-40b-instruct", "falcon-40b", "tiiuae/falcon-40b-instruct", "falcon"),
        ("freewilly2", "llama-2-70b", "stabilityai/StableBeluga2", "stablebeluga"),
        ("smollm2-135m-instruct", "smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", "chatml"),
    ],
)
def test_derivatives_map_to_base_architecture(alias, base, hub, fmt):
    cfg = preset(alias)
    assert cfg.n_params == PRESETS[base].n_params
    assert (cfg.hub_id, cfg.chat_format) == (hub, fmt)


def test_unknown_name_suggests_closest():
    with pytest.raises(UnknownModelName, match="llama-2-7b"):
        preset("lama-2-7b")


def test_weight_memory_reproduces_known_figures():
    # "a 7B model once needed ~30 GB": 6.74e9 params x 4 bytes = 27 GB for the weights alone.
    assert weight_bytes(PRESETS["llama-7b"])["fp32"] / 1e9 == pytest.approx(27.0, abs=0.1)
    # Falcon-7B in bf16: 6.92e9 x 2 bytes = about 14 GB.
    assert weight_bytes(PRESETS["falcon-7b"])["bf16"] / 1e9 == pytest.approx(13.8, abs=0.1)
    assert weight_bytes(PRESETS["llama-2-70b"])["int8"] < 0.55 * weight_bytes(PRESETS["llama-2-70b"])["bf16"]
