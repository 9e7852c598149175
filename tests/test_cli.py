"""The `herd` command line: info, models, offline download, bad names, convert, chat."""

import subprocess
import sys

import pytest
import torch

from llamaherd.cli import main


def test_info_reproduces_known_memory_figures(capsys):
    assert main(["info", "llama-7b"]) == 0
    out = capsys.readouterr().out
    assert "6.74B parameters" in out and "fp32     27.0 GB" in out
    assert main(["info", "falcon-7b"]) == 0
    assert "bf16     13.8 GB" in capsys.readouterr().out


def test_models_lists_presets_and_aliases(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("llama-2-70b", "falcon-40b", "vicuna-7b", "freewilly2", "smollm2-135m-instruct"):
        assert name in out


def test_download_offline_is_one_clear_line(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["download", "meta-llama/Llama-2-7b-hf"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("error: offline:") and "pass a local path" in err


def test_unknown_model_name_suggests_closest(capsys):
    assert main(["chat", "falcon-7b-instrct", "--prompt", "hi"]) == 2
    assert "Did you mean 'falcon-7b-instruct'" in capsys.readouterr().err


def test_missing_path_is_clear(capsys, tmp_path):
    assert main(["generate", str(tmp_path / "nope.gguf"), "--prompt", "x"]) == 2
    assert "nope.gguf: no such file or directory" in capsys.readouterr().err


@pytest.mark.slow
def test_convert_embedded_gguf_opens_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llamaherd.load import load_model

    assert main(["convert", "smollm2-135m-instruct", str(tmp_path)]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path)
    ours = load_model()
    text = "Converted checkpoints must open in the tools people already use: 12 llamas, 3 alpacas."
    ids = ours.tokenizer.encode(text)
    assert tok(text, add_special_tokens=False).input_ids == ids
    with torch.no_grad():
        x = torch.tensor([ids])
        assert (hf(x).logits - ours.model(x)).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_interactive_chat_session():
    proc = subprocess.run(
        [sys.executable, "-m", "llamaherd.cli", "chat", "--max-new-tokens", "12", "--system", "Be brief."],
        input="What is 2+2?\n/reset\nName a colour.\n/exit\n", capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    replies = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(replies) >= 2  # one streamed reply per user message


@pytest.mark.parametrize(("flags", "message"), [
    (["--temperature", "-1"], "error: --temperature must be >= 0, got -1.0"),
    (["--max-new-tokens", "0"], "error: --max-new-tokens must be >= 1, got 0"),
    (["--top-p", "2"], "error: --top-p must be in (0, 1], got 2.0"),
])
def test_bad_sampling_flags_fail_first_naming_the_flag(capsys, tmp_path, flags, message):
    """Before the model loads (the path does not exist) and before the prompt is echoed."""
    assert main(["generate", str(tmp_path / "no-model"), "--prompt", "echoed?", *flags]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip() == message


def test_help_does_not_import_torch():
    """Building every sub-command's parser (what `herd --help` does) stays torch-free: torch takes seconds to load."""
    code = ("import sys, llamaherd.cli as c; c.build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
