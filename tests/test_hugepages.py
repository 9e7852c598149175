"""Weights moved onto transparent huge pages (llamaherd.hugepages): same values, ties and objects; advised memory."""

import pytest
import torch
from hf_tiny import save_hf_model

from llamaherd import hugepages
from llamaherd import model as model_module
from llamaherd.engine import Engine, SamplingParams
from llamaherd.load import load_gpt
from llamaherd.lora import LoRAConfig, inject_lora
from llamaherd.model import fuse_projections, place_on_huge_pages

needs_thp = pytest.mark.skipif(not hugepages.available(), reason="no transparent huge pages on this system")


def vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping holding `address` (/proc/self/smaps; "hg": advised for huge pages)."""
    inside = False
    for line in open("/proc/self/smaps"):
        first = line.split()[0]
        if "-" in first and all(c in "0123456789abcdef-" for c in first):
            start, end = (int(a, 16) for a in first.split("-"))
            inside = start <= address < end
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@needs_thp
def test_relocated_model_keeps_its_logits_ties_and_parameter_objects(tmp_path):
    save_hf_model("llama-tied", tmp_path)
    model = load_gpt(tmp_path)
    fuse_projections(model)
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        before = model(ids)
    params = dict(model.named_parameters())
    assert place_on_huge_pages(model)
    with torch.no_grad():
        assert torch.equal(model(ids), before)
    assert dict(model.named_parameters()) == params  # the same objects: an optimizer built before still works
    storages = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    assert len(storages) == 1
    start = storages.pop()
    first = min(p.data_ptr() for p in model.parameters())
    assert first % hugepages.HUGE_PAGE == 0 and first >= start
    assert "hg" in vm_flags(first)
    assert model.output_weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.fused.serves((attn.q_proj, attn.k_proj, attn.v_proj))  # views of the moved fused weight
    with torch.no_grad():
        model.model.embed_tokens.weight[3] += 1.0  # one tensor, so the head sees the change
    assert torch.equal(model.output_weight[3], model.model.embed_tokens.weight[3])
    assert place_on_huge_pages(model) and model.output_weight.data_ptr() == first  # a second call moves nothing


@needs_thp
def test_a_tensor_listed_twice_and_its_view_keep_their_values():
    weight = torch.arange(6000.0).view(60, 100)
    view = weight[10:20, 5:]  # a storage offset: where a second move of `weight` shifted the offset again
    want, want_view = weight.clone(), view.clone()
    assert hugepages.relocate([weight, view, weight])
    assert torch.equal(weight, want) and torch.equal(view, want_view)
    assert view.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()


@needs_thp
def test_relocated_parameters_still_train(tmp_path):
    save_hf_model("llama-gqa", tmp_path)
    model = load_gpt(tmp_path)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    place_on_huge_pages(model)
    weight = model.model.layers[0].mlp.down_proj.weight
    old = weight.detach().clone()
    model(torch.tensor([[1, 2, 3]])).logsumexp(-1).sum().backward()
    optimizer.step()
    assert weight.grad is not None and not torch.equal(weight, old)


def test_switched_off_or_off_the_cpu_leaves_tensors_in_place(tmp_path, monkeypatch):
    save_hf_model("llama-gqa", tmp_path)
    model = load_gpt(tmp_path)
    pointers = [p.data_ptr() for p in model.parameters()]
    monkeypatch.setenv("LLAMAHERD_HUGEPAGES", "0")
    assert not place_on_huge_pages(model)
    monkeypatch.delenv("LLAMAHERD_HUGEPAGES")
    assert not hugepages.relocate([torch.zeros(3, device="meta")])
    assert [p.data_ptr() for p in model.parameters()] == pointers


def test_engine_tokens_equal_before_and_after_the_move(tmp_path, monkeypatch):
    """The engine moves the weights when it starts; greedy tokens equal those of an engine that did not."""
    save_hf_model("llama-gqa", tmp_path)
    params = SamplingParams(max_new_tokens=12, stop_ids=frozenset())
    runs = []
    for setting in ("0", "1"):
        monkeypatch.setenv("LLAMAHERD_HUGEPAGES", setting)
        engine = Engine(load_gpt(tmp_path), max_batch=2)
        requests = [engine.add_request([1, 4, 9, 3], params), engine.add_request([2, 8], params)]
        while engine.has_work:
            engine.step()
        runs.append([r.completions[0].token_ids for r in requests])
    assert runs[0] == runs[1] and len(runs[0][0]) == 12


def test_an_engine_prepares_the_model_again_only_after_it_changed(tmp_path, monkeypatch):
    """Engines after the first on an unchanged model skip fusing and moving it (`prepare_for_decoding`; an engine's
    own cache is no change); a weight given new data, or a LoRA injected, makes the next engine do both again."""
    save_hf_model("llama-gqa", tmp_path)
    model, calls = load_gpt(tmp_path), []
    real = model_module.fuse_projections
    monkeypatch.setattr(model_module, "fuse_projections", lambda m: calls.append(1) or real(m))
    Engine(model, max_batch=1, max_len=16)
    Engine(model, max_batch=2, max_len=32)
    assert len(calls) == 1
    gate = model.model.layers[0].mlp.gate_proj
    gate.weight.data = gate.weight.data * 2
    Engine(model, max_batch=1, max_len=16)
    assert len(calls) == 2 and gate.fused.serves((gate, model.model.layers[0].mlp.up_proj))
    inject_lora(model, LoRAConfig(r=2, alpha=4, targets=("v",)))
    Engine(model, max_batch=1, max_len=16)
    assert len(calls) == 3
