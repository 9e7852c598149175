"""The decode kernels (llamaherd.kernels) and fused projections against PyTorch's products and transformers."""

import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hf_tiny import save_hf_model

from llamaherd import kernels
from llamaherd.engine import Engine, SamplingParams
from llamaherd.load import load_gpt
from llamaherd.lora import LoRAConfig, inject_lora
from llamaherd.model import SlotCache, fuse_projections, prepare_for_decoding

needs_compiler = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                    reason="no C++ compiler: the kernels fall back (tested below)")


def int8_rows(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n) / 100 + 1e-3


def weight_of(dtype: torch.dtype, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """A random (n, k) weight stored as `dtype`, its int8 scales (or None) and its float64 value."""
    if dtype is torch.int8:
        w, scale = int8_rows(n, k)
        return w, scale, w.double() * scale.double()[:, None]
    w = torch.randn(n, k).to(dtype)
    return w, None, w.double()


@needs_compiler
@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_matvec_equals_a_float64_product(rows, weight_dtype):
    """Odd sizes (131 outputs, 67 inputs) cover the row blocks' and vector loops' tails; bias and int8 scales."""
    torch.manual_seed(0)
    n, k = 131, 67
    x, bias = torch.randn(rows, 1, k), torch.randn(n)  # a decode step of `rows` sequences
    w, scale, dense = weight_of(weight_dtype, n, k)
    with torch.no_grad():
        got = kernels.decode_linear(x, w, bias, scale)
        got_b = kernels.decode_linear(x[:4].bfloat16(), w, bias, scale)  # bf16 steps: at most 4 rows (max_rows)
    assert got is not None and got.shape == (rows, 1, n) and got.dtype == torch.float32
    want = x.double() @ dense.T + bias.double()
    assert (got.double() - want).abs().max() <= 1e-4

    # A bf16 input (a bf16 model) gets a bf16 output: PyTorch's product rounded once, up to one bf16 step.
    xb = x[:4].bfloat16()
    want_b = (xb.double() @ dense.T + bias.double())
    assert got_b.dtype == torch.bfloat16
    assert ((got_b.double() - want_b).abs() <= want_b.abs() * 2**-7 + 1e-3).all()


@needs_compiler
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_matvec_rows_are_the_same_whichever_thread_computes_them(weight_dtype):
    """The products share their row blocks out over the threads (runs, then blocks on demand), so which thread
    computes a row changes from call to call: every row must come out, the same for any thread count, and equal
    the float64 product. 1,003 rows: runs, shared blocks and 3 rows past the last whole block; 5 inputs: the
    register tiles (4) and one alone. The weight shifted by 1-7 rows moves rows between the 8-row blocks and the
    rows past them: still the same bits."""
    torch.manual_seed(2)
    n, k = 1003, 64
    x = torch.randn(5, 1, k)
    w, scale, dense = weight_of(weight_dtype, n, k)
    threads = torch.get_num_threads()
    got = {}
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            with torch.no_grad():
                got[t] = [kernels.decode_linear(x, w, None, scale) for _ in range(3)]
    finally:
        torch.set_num_threads(threads)
    first = got[1][0]
    assert all(torch.equal(first, y) for ys in got.values() for y in ys)
    assert (first.double() - x.double() @ dense.T).abs().max() <= 1e-4
    with torch.no_grad():
        for i in range(1, 8):
            shifted = kernels.decode_linear(x, w[i:], None, None if scale is None else scale[i:])
            assert torch.equal(shifted, first[..., i:]), i


@needs_compiler
@pytest.mark.parametrize("rows", [5, 16])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_matvec_of_a_batch_is_each_row_alone_bit_for_bit(rows, weight_dtype):
    """Several sequences go through the register tiles (4 inputs x 4 weight rows with AVX-512, K % 16 == 0; 4
    inputs x 2 rows with AVX2, K % 8 == 0), the rest one at a time: every row's result must be exactly what it
    gets alone (a sequence's tokens may not depend on its batch) and equal the float64 product."""
    torch.manual_seed(1)
    n, k = 37, 96
    x = torch.randn(rows, 1, k)
    w, scale, dense = weight_of(weight_dtype, n, k)
    with torch.no_grad():
        batch = kernels.decode_linear(x, w, None, scale)
        alone = torch.cat([kernels.decode_linear(x[i:i + 1], w, None, scale) for i in range(rows)])
    assert torch.equal(batch, alone)
    assert (batch.double() - x.double() @ dense.T).abs().max() <= 1e-4


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("positions", [1, 3])  # a decode step, or a prompt (in the engine: kernels.generating)
def test_rms_norm_equals_transformers(dtype, positions):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    ref = LlamaRMSNorm(67, eps=1e-5).to(dtype)
    with torch.no_grad():
        ref.weight.normal_()
        x = (torch.randn(4, positions, 67) * 4).to(dtype)
        with kernels.generating():
            got = kernels.rms_norm(x, ref.weight, 1e-5)
        want = ref(x)
    assert got.dtype == dtype and got.shape == x.shape
    tolerance = 1e-5 if dtype is torch.float32 else 0.0  # bf16: the same two roundings, so the same values
    assert (got.float() - want.float()).abs().max() <= tolerance * want.abs().max()


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rotated,hd", [(16, 16), (10, 16), (64, 64), (48, 64)])  # all head dims, or partial
@pytest.mark.parametrize("positions", [1, 5])  # a decode step, or a prefill        rotary (the rest passes through)
def test_rope_qk_and_silu_mul_equal_the_eager_ops(dtype, rotated, hd, positions):
    """Head dims of 16 (scalar loops) and 64 (bf16: 16 dims at a time, 48 rotated: a vector and a tail); bf16
    RoPE rounds as the eager ops do, so it equals them exactly; silu's exp may differ by a bf16 step."""
    from llamaherd.model import apply_rope

    torch.manual_seed(0)
    B, T, n_head, n_kv = 3, positions, 4, 2
    qkv = torch.randn(B, T, (n_head + 2 * n_kv) * hd).to(dtype)
    q, k, _ = qkv.split([n_head * hd, n_kv * hd, n_kv * hd], dim=-1)  # views, as the fused product gives
    angles = torch.randn(B, 1, T, rotated // 2) * 3
    cos, sin = torch.cat((angles, angles), -1).cos().to(dtype), torch.cat((angles, angles), -1).sin().to(dtype)
    gate_up = torch.randn(B, T, 80).mul(3)
    gate_up[0, 0, :6] = torch.tensor([-100.0, 100.0, -1e4, 1e4, 88.0, -88.0])  # exp's clamped range and beyond
    gate, up = gate_up.to(dtype).split(40, dim=-1)  # 40: the vector loop's tail too
    with torch.no_grad(), kernels.generating():  # prompts too, as in the engine
        got_q, got_k = kernels.rope_qk(q, k, cos, sin, n_head, n_kv) or (None, None)
        want_q = apply_rope(q.view(B, T, n_head, hd).transpose(1, 2), cos, sin)
        want_k = apply_rope(k.view(B, T, n_kv, hd).transpose(1, 2), cos, sin)
        got_act, want_act = kernels.silu_mul(gate, up), F.silu(gate) * up
    ulp = 1e-6 if dtype is torch.float32 else 2**-7
    for got, want in ((got_q, want_q), (got_k, want_k), (got_act, want_act)):
        assert got.dtype == dtype and got.shape == want.shape
        assert ((got.float() - want.float()).abs() <= ulp * want.float().abs() + 1e-6).all()
    if dtype is torch.bfloat16:
        assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)


@needs_compiler
def test_row_wise_kernels_take_prompts_only_in_the_engine(tiny, monkeypatch):
    """A plain forward of several positions (evaluation) keeps PyTorch's ops: transformers' logits bit for bit.
    Within kernels.generating (the engine's steps) rms_norm, rope_qk and silu_mul take the prompt, and the
    products too while it has at most KERNEL_ROWS positions: within 1e-4. A longer chunk's products take the
    register tiles (prompt_linear) on an AVX2 CPU, ATen's GEMMs elsewhere."""
    hf, path = tiny
    model, ids = load_gpt(path), torch.tensor([[5, 17, 33, 9, 60, 71, 23]])
    real, calls = kernels.native_ops(), []
    lanes = kernels.tile_lanes()
    monkeypatch.setattr(kernels, "native_ops", lambda: SimpleNamespace(**{
        n: (lambda op: lambda *a: calls.append(op) or getattr(real, op)(*a))(n)
        for n in ("matvec", "rms_norm", "rope_qk", "silu_mul", "prompt_linear", "tile_lanes")}))
    with torch.no_grad():
        want = hf(ids).logits
        plain = model(ids)
        assert not calls  # bit for bit transformers' on the test VM; 1e-6 leaves room for another CPU's ATen
        assert (plain - want).abs().max() <= 1e-6
        with kernels.generating():
            got = model(ids)
        assert {"matvec", "rms_norm", "rope_qk", "silu_mul"} <= set(calls)
        assert (got - want).abs().max() <= 1e-4
        calls.clear()
        long = torch.arange(kernels.KERNEL_ROWS + 1)[None] % 90 + 3
        with kernels.generating():
            got = model(long)
        assert "matvec" not in calls and "silu_mul" in calls
        assert ("prompt_linear" in calls) == (lanes == 8)
        assert (got - hf(long).logits).abs().max() <= 1e-4


def test_decode_linear_declines_what_it_does_not_serve():
    w, x = torch.randn(8, 4), torch.randn(1, 4)
    assert kernels.decode_linear(x, w) is None  # grad mode (training) stays with PyTorch
    with torch.no_grad():
        assert kernels.decode_linear(torch.randn(kernels.KERNEL_ROWS + 1, 1, 4), w) is None  # a GEMM for ATen
        assert kernels.decode_linear(torch.randn(1, 2, 4), w) is None  # two positions: a prefill or a scoring pass
        with kernels.generating():  # the engine's short prompt chunks take it, longer ones do not
            assert (kernels.decode_linear(torch.randn(1, kernels.KERNEL_ROWS, 4), w) is None) \
                == (kernels.native_ops() is None)
            assert kernels.decode_linear(torch.randn(1, kernels.KERNEL_ROWS + 1, 4), w) is None
        assert kernels.decode_linear(x, w.half()) is None
        assert kernels.decode_linear(x, torch.zeros(8, 4, dtype=torch.int8)) is None  # int8 needs its scale


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama-gqa")
    return save_hf_model("llama-gqa", path), path


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """A tiny LLaMA whose head is its embedding (as SmolLM2's)."""
    path = tmp_path_factory.mktemp("llama-tied")
    return save_hf_model("llama-tied", path), path


def decode_logits(model, prompt: list[int], n: int) -> torch.Tensor:
    """(n, V) logits of n greedy decode steps, one token per forward (the kernel's shape)."""
    cache, out = model.new_cache(1, len(prompt) + n), []
    with torch.inference_mode():
        logits = model(torch.tensor([prompt]), cache=cache, last_only=True)[0, -1]
        for _ in range(n):
            out.append(logits)
            logits = model(logits.argmax()[None, None], cache=cache)[0, -1]
    return torch.stack(out)


def assert_transformers_logprobs(hf, prompt: list[int], out, tolerance: float = 1e-4) -> torch.Tensor:
    """The completion's chosen-token logprobs are transformers' forward over prompt + output within `tolerance`;
    returns transformers' log-probabilities (len(output), V) at the positions that chose them."""
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + out.token_ids])).logits[0].float().log_softmax(-1)[len(prompt) - 1:-1]
    want = ref.gather(-1, torch.tensor(out.token_ids)[:, None])[:, 0]
    assert (torch.tensor([e.logprob for e in out.logprobs]) - want).abs().max() <= tolerance
    return ref


def count_native_steps(monkeypatch) -> list:
    """From here on the native ops run as before, and each llama_decode_layers call appends to the list returned."""
    calls, real = [], kernels.native_ops()
    monkeypatch.setattr(kernels, "native_ops", lambda: SimpleNamespace(
        **{n: getattr(real, n) for n in ("matvec", "rms_norm", "rope_qk", "silu_mul", "prompt_attention",
                                         "prompt_linear", "tile_lanes")},
        llama_decode_layers=lambda *a: calls.append(1) or real.llama_decode_layers(*a)))
    return calls


def engine_logprobs(engine: Engine, prompts: list[list[int]], n: int) -> list[torch.Tensor]:
    """Each prompt's log-probabilities of its n greedy tokens (no stop ids), all prompts added before the engine
    runs."""
    params = SamplingParams(max_new_tokens=n, stop_ids=frozenset(), logprobs=0)
    requests = [engine.add_request(p, params) for p in prompts]
    list(engine.stream())
    return [torch.tensor([e.logprob for e in r.completions[0].logprobs]) for r in requests]


@needs_compiler
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_fused_kernel_decode_equals_eager(tiny, quantize, monkeypatch):
    """Fused q/k/v and gate/up through the kernel: logits within 1e-4 of the unfused PyTorch model."""
    _, path = tiny
    fast, eager = load_gpt(path, quantize=quantize), load_gpt(path, quantize=quantize)
    fuse_projections(fast)
    assert fast.model.layers[0].self_attn.q_proj.fused is not None
    prompt = [5, 17, 33, 9, 60]
    got = decode_logits(fast, prompt, 12)
    monkeypatch.setattr(kernels, "native_ops", lambda: None)  # PyTorch's own products from here
    want = decode_logits(eager, prompt, 12)
    assert (got - want).abs().max() <= 1e-4


@needs_compiler
def test_engine_with_kernels_gives_transformers_logprobs(tiny):
    hf, path = tiny
    prompt = [5, 17, 33, 9, 60, 71, 23]
    engine = Engine(load_gpt(path), max_batch=2, max_len=64)
    request = engine.add_request(prompt, SamplingParams(max_new_tokens=10, stop_ids=frozenset(), logprobs=0))
    list(engine.stream())
    out = request.completions[0]
    ref = assert_transformers_logprobs(hf, prompt, out)
    assert out.token_ids == ref.argmax(-1).tolist()


@needs_compiler
@pytest.mark.parametrize("quantize", [None, "int8"])
@pytest.mark.parametrize("checkpoint", ["tiny", "tied"])
def test_native_decode_blocks_equal_the_modules_in_a_mixed_batch(checkpoint, quantize, request, monkeypatch):
    """The engine's decode steps through llama_decode_layers, final norm and head included (rows at different
    positions, each attending to its own length; rows that are not neighbours, each read in its own slot) give the
    logprobs of the module-by-module PyTorch path within 1e-4; for an untied head and for the tied embedding."""
    _, path = request.getfixturevalue(checkpoint)
    prompts = [[5, 17, 33, 9, 60], [40], [3, 4, 5, 6, 7, 8, 9, 10, 11]]

    def run():
        engine = Engine(load_gpt(path, quantize=quantize), max_batch=4, max_len=64)
        first = engine.add_request([1, 2], SamplingParams(max_new_tokens=1, stop_ids=frozenset()))
        engine.step()  # row 0 is taken and freed: the others sit in rows 1..3, or later with gaps
        assert first.done
        return engine_logprobs(engine, prompts, 10), engine.model

    calls = count_native_steps(monkeypatch)
    got, model = run()
    assert calls and model._decode_plan.head is not None  # the native blocks ran, the final norm and head with them
    monkeypatch.setattr(kernels, "native_ops", lambda: None)
    want, _ = run()
    assert all((g - w).abs().max() <= 1e-4 for g, w in zip(got, want))


@needs_compiler
def test_a_native_decode_step_returns_hidden_states_when_asked(tiny, monkeypatch):
    """return_hidden on decode steps through llama_decode_layers gives the final-norm hidden states (B, 1, n_embd)
    of the module-by-module path within 1e-4, not logits (the op runs the head only when logits are wanted)."""
    _, path = tiny

    def hidden(model):
        cache = SlotCache(model.config, 1, 8, torch.float32)
        with torch.inference_mode():
            return torch.cat([model(torch.tensor([[t]]), cache=cache.rows(torch.tensor([0]), torch.tensor([[p]])),
                                    return_hidden=True) for p, t in enumerate([5, 17, 33])], dim=1)

    fast = load_gpt(path)
    prepare_for_decoding(fast)
    got = hidden(fast)
    assert fast._decode_plan.layer_args is not None  # the steps ran natively
    monkeypatch.setattr(kernels, "native_ops", lambda: None)
    want = hidden(load_gpt(path))
    assert got.shape == want.shape == (1, 3, fast.config.n_embd) and (got - want).abs().max() <= 1e-4


@needs_compiler
@pytest.mark.parametrize("change", ["lora", "weight data"])
def test_native_decode_follows_changes_made_after_it_ran(tiny, change, monkeypatch):
    """The native steps' weights are worked out once (model.DecodePlan). A LoRA injected, or a fused projection's
    weight given new data, after an engine decoded: that engine and a new one give the logprobs of a model changed
    the same way that never decoded natively, within 1e-4 (a stale plan would ignore the change)."""
    _, path = tiny

    def modify(model):
        torch.manual_seed(1)
        with torch.no_grad():
            if change == "lora":
                inject_lora(model, LoRAConfig(r=2, alpha=4, targets=("v",)))
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.normal_()
            else:
                gate = model.model.layers[0].mlp.gate_proj
                gate.weight.data = gate.weight.data * 2

    def logprobs(engine):
        return engine_logprobs(engine, [[5, 17, 33]], 6)[0]

    model = load_gpt(path)
    engine = Engine(model, max_batch=1, max_len=32, prefix_reuse=False)
    before = logprobs(engine)
    assert model._decode_plan.layer_args is not None  # the steps ran natively
    modify(model)
    got, fresh = logprobs(engine), logprobs(Engine(model, max_batch=1, max_len=32))
    reference = load_gpt(path)
    modify(reference)
    monkeypatch.setattr(kernels, "native_ops", lambda: None)
    want = logprobs(Engine(reference, max_batch=1, max_len=32, fuse=False))
    assert (got - want).abs().max() <= 1e-4 and (fresh - want).abs().max() <= 1e-4
    assert (before - want).abs().max() > 1e-3  # the change matters


@needs_compiler
def test_an_fp16_model_decodes_through_its_modules(tiny, monkeypatch):
    """The kernels read fp32, bf16 and int8 weights, not fp16: an fp16 model's engine steps run the modules (the
    native block raised 'unsupported weight dtype Half' before) and match the steps with the kernels off."""
    _, path = tiny

    def run():
        return engine_logprobs(Engine(load_gpt(path, dtype=torch.float16), max_batch=2, max_len=32),
                               [[5, 17, 33], [40]], 8)

    got = run()
    monkeypatch.setattr(kernels, "native_ops", lambda: None)
    want = run()
    assert all((g - w).abs().max() <= 1e-3 for g, w in zip(got, want))


def test_fusing_keeps_parameter_names_and_values_and_yields_to_lora(tiny):
    _, path = tiny
    model, reference = load_gpt(path), load_gpt(path)
    fuse_projections(model)
    state, want = model.state_dict(), reference.state_dict()
    assert list(state) == list(want)
    assert all(torch.equal(state[k], want[k]) for k in want)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.k_proj.weight.untyped_storage().data_ptr()

    # LoRA replaces the projections after fusing: the adapted modules are computed, not the stale fused weight.
    inject_lora(model, LoRAConfig(r=2, alpha=4, targets=("q", "v")))
    inject_lora(reference, LoRAConfig(r=2, alpha=4, targets=("q", "v")))
    reference.load_state_dict(model.state_dict())
    for name, p in model.named_parameters():
        if "lora_B" in name:
            with torch.no_grad():
                p.normal_()
                reference.get_parameter(name).copy_(p)
    idx = torch.tensor([[5, 17, 33]])
    with torch.inference_mode():
        assert torch.allclose(model(idx), reference(idx), atol=1e-5)
        # And the unfused reference differs from the base model, so the check above can fail.
        assert not torch.allclose(reference(idx), load_gpt(path)(idx), atol=1e-3)


def test_without_a_compiler_decoding_falls_back_with_one_notice(tiny, monkeypatch, capsys, tmp_path):
    """One line per run, naming the log; the failure is remembered, so the next run does not build again."""
    _, path = tiny
    import torch.utils.cpp_extension

    builds = []

    def no_compiler(*args, **kwargs):
        builds.append(1)
        raise RuntimeError("Error building extension 'x': [1/2] c++ -MMD\nc++: not found")

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # not the real kernel cache
    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    kernels.native_ops.cache_clear()
    try:
        model = load_gpt(path)
        with torch.no_grad():
            assert kernels.decode_linear(torch.randn(1, 4), torch.randn(8, 4)) is None
        got = decode_logits(model, [5, 17, 33], 4)
        err = capsys.readouterr().err
        notices = [line for line in err.splitlines() if "decode kernels unavailable" in line]
        log = next((tmp_path / "llamaherd" / "kernels").glob("*/FAILED.log"))
        assert len(notices) == 1 and str(log) in notices[0] and "LLAMAHERD_KERNELS=0" in notices[0]
        assert "c++: not found" in log.read_text() and "c++: not found" not in err
        with torch.no_grad():
            ids = [5, 17, 33, *got.argmax(-1).tolist()[:-1]]
            full = model(torch.tensor([ids]))[0, 2:]
        assert (got - full).abs().max() <= 1e-4

        kernels.native_ops.cache_clear()  # a new process: remembers the failure, does not build again
        assert kernels.native_ops() is None and builds == [1]
        assert "failed before" in capsys.readouterr().err
    finally:
        kernels.native_ops.cache_clear()


def test_kernels_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("LLAMAHERD_KERNELS", "off")
    kernels.native_ops.cache_clear()
    try:
        with torch.no_grad():
            assert kernels.decode_linear(torch.randn(1, 4), torch.randn(8, 4)) is None
    finally:
        kernels.native_ops.cache_clear()


def test_linear_layers_use_the_kernel_only_without_autograd(monkeypatch):
    calls = []
    real = kernels.native_ops

    def counting():
        ops = real()
        return None if ops is None else SimpleNamespace(matvec=lambda *a: calls.append(1) or ops.matvec(*a))

    monkeypatch.setattr(kernels, "native_ops", counting)
    from llamaherd.model import linear

    x, w = torch.randn(2, 1, 4), torch.randn(8, 4)
    with torch.no_grad():
        y = linear(x, w)
    assert torch.allclose(y, F.linear(x, w), atol=1e-6)
    if real() is not None:
        assert calls == [1]
    linear(x, w)  # grad mode
    assert len(calls) <= 1


@pytest.mark.slow
@needs_compiler
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_embedded_model_decode_logits_within_1e4_of_eager(quantize, monkeypatch):
    """The real SmolLM2-135M (fp32 and weight-only int8): 24 decode steps, fused + kernels vs PyTorch's products."""
    from llamaherd.embedded import embedded_model_path

    fast = load_gpt(embedded_model_path(), quantize=quantize)
    fuse_projections(fast)
    prompt = list(range(1000, 1100))
    got = decode_logits(fast, prompt, 24)
    monkeypatch.setattr(kernels, "native_ops", lambda: None)
    want = decode_logits(load_gpt(embedded_model_path(), quantize=quantize), prompt, 24)
    assert (got - want).abs().max() <= 1e-4


def test_bf16_steps_beyond_four_rows_go_to_onednn_unless_the_kernel_has_matrix_units():
    """bf16 steps of 5 to 16 rows go to oneDNN's matrix units where it has some, unless the kernel runs them on
    the AMX tile unit itself (`bf16_tiles`); then they stay in the kernel like fp32 steps."""
    w = torch.randn(8, 32).bfloat16()
    with torch.no_grad():
        five = kernels.decode_linear(torch.randn(5, 1, 32).bfloat16(), w)
        four = kernels.decode_linear(torch.randn(4, 1, 32).bfloat16(), w)
    if kernels.native_ops() is None:
        return
    assert four is not None
    assert (five is None) == (kernels.half_matrix_units(torch.bfloat16) and not kernels.bf16_tiles())


def cpu_flags() -> set[str]:
    try:
        line = next(x for x in open("/proc/cpuinfo").read().splitlines() if x.startswith("flags"))
    except (OSError, StopIteration):
        return set()
    return set(line.split(":", 1)[1].split())


@needs_compiler
def test_bf16_products_take_the_tile_unit_where_the_cpu_has_one():
    """AMX-BF16 in /proc/cpuinfo (Linux lists it once it can hand out the tile registers): bf16 x bf16 products
    run on it; without it they never claim to."""
    if kernels.native_ops() is None:
        pytest.skip("kernels unavailable")
    assert kernels.bf16_tiles() == ({"amx_bf16", "amx_tile"} <= cpu_flags())


@needs_compiler
@pytest.mark.parametrize("rows", [1, 5, 16, 17])
@pytest.mark.parametrize("n,k", [(37, 96), (100, 64), (16, 32)])
def test_bf16_products_of_a_batch_are_each_row_alone_and_the_float64_product_rounded(rows, n, k):
    """bf16 x bf16 (a bf16 model's decode step) with K a multiple of 32: the tile unit where there is one (16
    weight rows x up to 16 inputs per tile, groups of four tiles then single tiles, the rows past the last 16 and
    inputs past 16 in a second group). Each row's result is bit for bit what it gets alone, and within half a
    bf16 step (plus fp32 summation error) of the exact product."""
    ops = kernels.native_ops()
    if ops is None:
        pytest.skip("kernels unavailable")
    torch.manual_seed(2)
    x, w, bias = torch.randn(rows, 1, k).bfloat16(), torch.randn(n, k).bfloat16(), torch.randn(n)
    batch = ops.matvec(x, w, None, bias)  # the op itself: decode steps never exceed 16 rows (KERNEL_ROWS)
    alone = [ops.matvec(x[i:i + 1], w, None, bias) for i in range(rows)]
    assert batch.dtype == torch.bfloat16
    assert torch.equal(batch, torch.cat(alone))
    want = x.double() @ w.double().T + bias.double()
    assert ((batch.double() - want).abs() <= want.abs() * 2**-8 + 1e-5).all()


@needs_compiler
def test_bf16_engine_batch_gives_each_sequence_alone_and_transformers_logprobs(tmp_path):
    """A bf16 model decoding six sequences at once (beyond the four that once bounded bf16 steps; on the tile
    unit where there is one). Six one-token prompts (prefills alike batched or not): each sequence's logprobs are
    bit for bit what it gets alone. Prompts of 1 to 30 tokens: the chosen tokens' logprobs are transformers' bf16
    forward over the whole sequence within bf16 noise: 0.15 (measured: 0.054 here, 0.085 with the kernels off;
    k pairs shifted by one in the tile kernel: 10.6)."""
    from hf_tiny import make_hf_model

    hf = make_hf_model("llama-gqa").to(torch.bfloat16)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model = load_gpt(tmp_path, dtype=torch.bfloat16)
    singles = [[t] for t in (3, 17, 40, 41, 90, 127)]
    batch = engine_logprobs(Engine(model, max_batch=6, max_len=64), singles, 12)
    alone = [engine_logprobs(Engine(model, max_batch=1, max_len=64), [p], 12)[0] for p in singles]
    assert all(torch.equal(a, b) for a, b in zip(batch, alone))

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (1, 5, 9, 16, 17, 30)]
    params = SamplingParams(max_new_tokens=8, stop_ids=frozenset(), logprobs=0)
    engine = Engine(model, max_batch=6, max_len=64)
    requests = [engine.add_request(p, params) for p in prompts]
    list(engine.stream())
    for prompt, request in zip(prompts, requests):
        assert_transformers_logprobs(hf, prompt, request.completions[0], tolerance=0.15)


@needs_compiler
@pytest.mark.parametrize("heads,kv_heads,head_dim,dtype", [
    (6, 2, 64, torch.float32), (5, 1, 64, torch.float32), (3, 3, 64, torch.float32), (4, 2, 128, torch.float32),
    (6, 2, 64, torch.bfloat16), (4, 2, 128, torch.bfloat16)])
def test_native_attention_at_real_head_dims_gives_transformers_logprobs(heads, kv_heads, head_dim, dtype, tmp_path,
                                                                       monkeypatch):
    """Head dims of 64 and 128 take the native block's grouped attention (query heads of one kv head together,
    the scores of 16 keys (8 with AVX2) reduced at once). Four rows of 1, 16, 17 and 40 prompt ids decode in one
    batch, so their contexts cross the key blocks at different steps; the chosen tokens' logprobs equal
    transformers' forward over each whole sequence within 1e-4 in float32, and within bf16 noise (0.15, as the
    bf16 engine test) for a bf16 model and cache. Groups of 3 and 5 (chunks of at most 4) and plain multi-head."""
    from hf_tiny import make_hf_model

    hf = make_hf_model("llama-gqa", hidden_size=heads * head_dim, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, head_dim=head_dim, num_hidden_layers=1, intermediate_size=64)
    with torch.no_grad():  # milder weights than hf_tiny's: 384-wide activations stay in a softmax's useful range
        for p in hf.parameters():
            if p.dim() == 2:
                p.mul_(0.25)
    hf = hf.to(dtype)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model = load_gpt(tmp_path, dtype=dtype)
    assert model.config.head_dim == head_dim
    calls = count_native_steps(monkeypatch)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (1, 16, 17, 40)]
    engine = Engine(model, max_batch=4, max_len=64)
    params = SamplingParams(max_new_tokens=6, stop_ids=frozenset(), logprobs=0)
    requests = [engine.add_request(p, params) for p in prompts]
    list(engine.stream())
    assert calls  # the native block ran
    for prompt, request in zip(prompts, requests):
        assert_transformers_logprobs(hf, prompt, request.completions[0], 1e-4 if dtype == torch.float32 else 0.15)


def masked_attention_float64(q, k_cache, v_cache, slots, positions) -> torch.Tensor:
    """The reference for prompt_attention: SDPA in float64 over the gathered rows, key j visible to the query at
    position p when j <= p; (B, T, H * hd)."""
    B, H, T, hd = q.shape
    end = int(positions.max()) + 1
    k, v = (c[slots, :, :end].double() for c in (k_cache, v_cache))
    mask = (torch.arange(end) <= positions[..., None])[:, None]  # (B, 1, T, end)
    y = F.scaled_dot_product_attention(q.double(), k, v, attn_mask=mask, enable_gqa=True)
    return y.transpose(1, 2).reshape(B, T, H * hd)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim,T", [(9, 3, 64, 37), (4, 4, 128, 20), (8, 1, 24, 5), (2, 1, 80, 2)])
def test_prompt_attention_is_sdpa_with_each_rows_causal_mask(dtype, heads, kv_heads, head_dim, T):
    """The engine's prompt attention against float64 SDPA with the engine's mask (CacheRows.mask): rows read in
    place from cache slots out of order, each row at its own offset (a later chunk), positions clamped at the end
    (padding), grouped (3 heads a kv head), multi-head and multi-query heads, head dims that are not a multiple of
    the tile width. fp32 within 1e-5; bf16 within its rounding of the result (2^-8 relative)."""
    if kernels.native_ops() is None:
        pytest.skip("no native kernels")
    g = torch.Generator().manual_seed(T)
    rows, max_len, B = 5, 96, 3
    k_cache, v_cache = (torch.randn(rows, kv_heads, max_len, head_dim, generator=g).to(dtype) for _ in range(2))
    q = torch.randn(B, T, heads, head_dim, generator=g).to(dtype).transpose(1, 2)  # the strides rope_qk gives
    slots = torch.tensor([3, 0, 4])
    starts = torch.tensor([0, 17, max_len - T + 3])  # the last row runs past max_len: clamped, as padding is
    positions = (starts[:, None] + torch.arange(T)).clamp(max=max_len - 1)
    with torch.inference_mode(), kernels.generating():
        got = kernels.prompt_attention(q, k_cache, v_cache, slots, positions)
    want = masked_attention_float64(q, k_cache, v_cache, slots, positions)
    assert got.dtype == dtype and got.shape == (B, T, heads * head_dim)
    if dtype == torch.float32:
        assert (got.double() - want).abs().max() <= 1e-5
    else:
        assert ((got.double() - want).abs() <= want.abs() * 2**-8 + 1e-6).all()


def test_prompt_attention_serves_only_the_engines_prompts():
    q, cache = torch.randn(1, 2, 4, 8), torch.zeros(1, 1, 8, 8)
    with torch.inference_mode():
        assert not kernels.serves_prompt_attention(q, cache)  # a plain forward (evaluation): SDPA, bit for bit HF
        with kernels.generating():
            assert kernels.serves_prompt_attention(q, cache) == (kernels.tile_lanes() == 8)  # measured on AVX2
            assert not kernels.serves_prompt_attention(q[:, :, :1], cache)  # a decode step has its own path
            assert not kernels.serves_prompt_attention(q.half(), cache.half())  # fp16 models run their modules
            assert not kernels.serves_prompt_attention(q.bfloat16(), cache)  # mixed dtypes
    with kernels.generating():
        assert not kernels.serves_prompt_attention(q, cache)  # grad mode (training) stays with autograd's ops


@needs_compiler
def test_engine_prompt_chunks_through_the_native_attention_give_transformers_logprobs(tiny, monkeypatch):
    """Prompts of 3 to 45 ids in chunks of 16 (later chunks attend to the keys of earlier ones) and a prompt that
    reuses another's prefix: the engine's prefill runs the native prompt attention, and the chosen tokens' logprobs
    equal transformers' forward over each whole sequence within 1e-4."""
    if kernels.tile_lanes() != 8:
        pytest.skip("the engine takes the native prompt attention on AVX2 CPUs only")
    hf, path = tiny
    calls, real = [], kernels.prompt_attention
    monkeypatch.setattr(kernels, "prompt_attention", lambda *a: calls.append(a[0].shape) or real(*a))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 90, (n,), generator=g).tolist() for n in (3, 45, 20)]
    prompts.append(prompts[1][:40] + [7, 8, 9])  # shares 40 ids with the second prompt
    engine = Engine(load_gpt(path), max_batch=4, max_len=64, prefill_chunk=16)
    params = SamplingParams(max_new_tokens=5, stop_ids=frozenset(), logprobs=0)
    requests = [engine.add_request(p, params) for p in prompts]
    list(engine.stream())
    assert calls and max(shape[2] for shape in calls) > 1
    for prompt, request in zip(prompts, requests):
        assert_transformers_logprobs(hf, prompt, request.completions[0])


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("rows,n,k,bias", [(17, 960, 576, False), (40, 7, 13, True), (6, 33, 64, True)])
def test_prompt_linear_is_the_float64_product(dtype, rows, n, k, bias):
    """The prompt chunks' register-tile product against float64: rows that are not a multiple of the tile's 6,
    outputs that are not a multiple of a panel, an odd K, a bias. fp32 (and int8 weights with their scales, fp32
    activations) within 1e-5 relative to the row's scale; bf16 weights and activations within the result's bf16
    rounding (2^-8 relative). Served on AVX2 CPUs only; the op itself runs on any."""
    ops = kernels.native_ops()
    if ops is None:
        pytest.skip("no native kernels")
    g = torch.Generator().manual_seed(rows)
    act = torch.float32 if dtype == torch.int8 else dtype
    x = torch.randn(2, rows, k, generator=g).to(act)
    scale = None
    if dtype == torch.int8:
        w, scale = int8_rows(n, k)
        dense = w.double() * scale.double()[:, None]
    else:
        w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
        dense = w.double()
    b = torch.randn(n, generator=g).to(act) if bias else None
    with torch.inference_mode():
        got = ops.prompt_linear(x, w, b, scale)
    want = F.linear(x.double(), dense, None if b is None else b.double())
    assert got.dtype == act and got.shape == (2, rows, n)
    if act == torch.float32:
        assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()
    else:
        assert ((got.double() - want).abs() <= want.abs() * 2**-8 + 1e-5).all()


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_prompt_linear_gives_a_row_the_same_bits_in_any_tile(dtype):
    """A chunk's last rows go through a shorter register tile (1-5 rows): every row must come out bit for bit as
    it does inside a full tile, whatever the chunk's length (a prompt's keys may not depend on its chunking)."""
    ops = kernels.native_ops()
    if ops is None:
        pytest.skip("no native kernels")
    g = torch.Generator().manual_seed(7)
    x = torch.randn(13, 96, generator=g).to(torch.float32 if dtype == torch.int8 else dtype)
    w, scale = int8_rows(70, 96) if dtype == torch.int8 else ((torch.randn(70, 96, generator=g) / 10).to(dtype), None)
    with torch.inference_mode():
        whole = ops.prompt_linear(x, w, None, scale)
        for m in range(1, 13):
            assert torch.equal(ops.prompt_linear(x[:m], w, None, scale), whole[:m]), m
            assert torch.equal(ops.prompt_linear(x[m - 1:], w, None, scale), whole[m - 1:]), m


@needs_compiler
def test_int8_layers_decode_with_the_decode_product_and_prefill_with_the_tiles():
    """An int8 layer within the engine: a decode row (an int8 head, a layer outside the fused block) takes the
    decode product, which streams the int8 rows; a prompt chunk, even of one position, the prompt tiles (one sum
    order for every chunking). The two sum in different orders, so the bits tell which ran."""
    from llamaherd.quantize import int8_linear

    ops = kernels.native_ops()
    w, scale = int8_rows(64, 96)
    x = torch.randn(1, 1, 96)
    with torch.inference_mode(), kernels.generating():
        by_rows, by_tiles = ops.matvec(x, w, scale, None), ops.prompt_linear(x, w, None, scale)
        assert not torch.equal(by_rows, by_tiles)
        assert torch.equal(int8_linear(x, w, scale, None), by_rows)
        with kernels.prefilling():
            want = by_tiles if kernels.tile_lanes() == 8 else by_rows
            assert torch.equal(int8_linear(x, w, scale, None), want)


def test_prompt_linear_serves_only_the_engines_prompts_on_avx2(monkeypatch):
    x, w = torch.randn(1, 20, 8), torch.randn(4, 8)
    with torch.inference_mode():
        assert kernels.prompt_linear(x, w) is None  # evaluation: ATen's GEMM, bit for bit transformers'
        with kernels.generating():
            assert (kernels.prompt_linear(x, w) is None) == (kernels.tile_lanes() != 8)
            assert kernels.prompt_linear(x, w.half()) is None
            assert kernels.prompt_linear(x, torch.zeros(4, 8, dtype=torch.int8)) is None  # int8 without scales
            assert kernels.prompt_linear(x, w, None, torch.ones(4)) is None  # scales without int8
            int8 = kernels.prompt_linear(x, torch.ones(4, 8, dtype=torch.int8), None, torch.full((4,), 0.5))
            assert (int8 is None) == (kernels.tile_lanes() != 8)
            if int8 is not None:
                assert torch.allclose(int8, x.sum(-1, keepdim=True).expand(1, 20, 4) * 0.5, atol=1e-5)
            monkeypatch.setattr(kernels, "half_matrix_units", lambda dtype: True)  # oneDNN's AMX GEMM wins there
            assert kernels.prompt_linear(x.bfloat16(), w.bfloat16()) is None
    with kernels.generating():
        assert kernels.prompt_linear(x, w) is None  # grad mode


@needs_compiler
def test_prompt_attention_takes_empty_batches_and_refuses_zero_kv_heads():
    ops = kernels.native_ops()
    if ops is None:
        pytest.skip("no native kernels")
    cache = torch.zeros(2, 1, 8, 4)
    out = ops.prompt_attention(torch.zeros(0, 2, 3, 4), cache, cache, torch.zeros(0, dtype=torch.long),
                               torch.zeros(0, 3, dtype=torch.long))
    assert out.shape == (0, 3, 8)
    with pytest.raises(RuntimeError, match="multiple of n_kv"):
        empty = torch.zeros(2, 0, 8, 4)
        ops.prompt_attention(torch.zeros(1, 2, 3, 4), empty, empty, torch.zeros(1, dtype=torch.long),
                             torch.zeros(1, 3, dtype=torch.long))
