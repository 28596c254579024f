"""fastgrpo export: merged models and PEFT adapters that plain transformers / peft load with the run's numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fastgrpo.cli import main
from fastgrpo.config import load_config
from fastgrpo.export import export_run, run_checkpoint
from fastgrpo.models import eval_mode
from fastgrpo.tiny import tiny_model_and_tokenizer
from fastgrpo.trainer import Trainer

pytest.importorskip("peft")

TINY = [
    "model.name=tiny",
    "train.progress=false",
    "train.plot=false",
    "train.eval_prompts=0",
    "train.steps=2",
    "train.seed=3",
    "task.num_train=8",
    "task.num_eval=2",
    "rollout.group_size=4",
    "rollout.prompts_per_step=2",
    "rollout.max_new_tokens=8",
    "optim.lr=1e-2",  # two steps that move the weights well past rounding
    # a reward with spread on the untrained tiny model (about half its samples hold a digit): non-zero advantages
    "rewards=[{name: format, weight: 1.0, params: {pattern: '.*[0-9].*'}}]",
]

# Loads every export with transformers / peft alone: importing fastgrpo fails in this process, and -I keeps the
# working directory, PYTHONPATH and user site out of sys.path.
LOADER = r"""
import json, sys
sys.modules["fastgrpo"] = None
import torch
from peft import AutoPeftModelForCausalLM
from transformers import AutoModelForCausalLM, AutoTokenizer

ids = torch.tensor(json.loads(sys.argv[1]))
result = {}
for name, path, kind in json.loads(sys.argv[2]):
    cls = AutoPeftModelForCausalLM if kind == "adapter" else AutoModelForCausalLM
    model = cls.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
    tok = AutoTokenizer.from_pretrained(path)
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    result[name] = {"logp": logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0].tolist(),
                    "class": type(model).__name__, "chat": chat, "pad": tok.pad_token}
print(json.dumps(result))
"""


def _logprobs(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Per-token log-probs ``[B, T-1]`` fp32 of ``ids`` under ``model`` (eval mode, no grad)."""
    with eval_mode(model), torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
    return logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2-step tiny run with LoRA and one without: ``{name: (run_dir, final log-probs, initial log-probs)}``."""
    root = tmp_path_factory.mktemp("runs")
    ids = torch.randint(3, 400, (2, 14), generator=torch.Generator().manual_seed(0))
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # one reduction order for the comparisons below
    try:
        out = {}
        for name, extra in (("lora", ["model.lora.enabled=true", "model.lora.r=4"]), ("full", [])):
            cfg = load_config(None, [*TINY, *extra, f"train.output_dir={root}", f"train.run_name={name}"])
            trainer = Trainer(cfg)
            trainer.train()
            initial, _ = tiny_model_and_tokenizer(seed=3)
            out[name] = (trainer.run_dir, _logprobs(trainer.model, ids), _logprobs(initial, ids))
    finally:
        torch.set_num_threads(before)
    return ids, out


def test_exports_load_without_fastgrpo_and_match_the_run(runs, tmp_path):
    ids, out = runs
    exports = [
        ("lora-merged", export_run(out["lora"][0], tmp_path / "lora-merged", mode="merged"), "merged"),
        ("lora-adapter", export_run(out["lora"][0], tmp_path / "lora-adapter", mode="adapter"), "adapter"),
        ("full-merged", export_run(out["full"][0], tmp_path / "full-merged"), "merged"),
    ]
    args = [json.dumps(ids.tolist()), json.dumps([(n, str(p), k) for n, p, k in exports])]
    proc = subprocess.run([sys.executable, "-I", "-c", LOADER, *args], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, _, kind in exports:
        final, initial = out[name.split("-")[0]][1:]
        got = torch.tensor(loaded[name]["logp"])
        # fp32 rounding: merging W + s B A reorders the sums
        torch.testing.assert_close(got, final, rtol=1e-5, atol=2e-5, msg=name)
        # ... and the trained weights really are in it: the initial model is far off
        assert (initial - final).abs().max() > 100 * 2e-5, name
        assert loaded[name]["class"] == ("PeftModelForCausalLM" if kind == "adapter" else "Qwen2ForCausalLM")
        assert loaded[name]["chat"].endswith("<|im_start|>assistant\n") and loaded[name]["pad"] == "<|pad|>"


def test_what_is_written(runs, tmp_path):
    _, out = runs
    merged = export_run(out["lora"][0], tmp_path / "m", mode="merged")
    files = {p.name for p in merged.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))]
    config = json.loads((merged / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and "auto_map" not in config
    assert "fastgrpo" not in (merged / "config.json").read_text().lower()
    with safe_open(str(merged / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "lora" in k]  # merged: no adapter weights left
    adapter = export_run(out["lora"][0], tmp_path / "a", mode="adapter")
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == 4
    # the tiny base model exists nowhere on disk: it is written beside the adapter and the adapter points to it
    assert Path(adapter_config["base_model_name_or_path"]) == (adapter / "base").resolve()
    assert (adapter / "base" / "model.safetensors").is_file() and (
        adapter / "adapter_model.safetensors"
    ).is_file()
    with safe_open(str(adapter / "base" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "lora" in k]


def test_dtype_and_checkpoint_choice(runs, tmp_path):
    _, out = runs
    run_dir = out["full"][0]
    assert run_checkpoint(run_dir).name == "step-000002" and run_checkpoint(run_dir, 2) == run_checkpoint(
        run_dir
    )
    with pytest.raises(FileNotFoundError, match="no checkpoint for step 7"):
        run_checkpoint(run_dir, 7)
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        run_checkpoint(tmp_path)
    path = export_run(run_dir, tmp_path / "bf16", dtype="bfloat16", checkpoint=run_checkpoint(run_dir).path)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="dtype must be one of"):
        export_run(run_dir, tmp_path / "x", dtype="int8")
    with pytest.raises(ValueError, match="mode must be one of"):
        export_run(run_dir, tmp_path / "x", mode="gguf")


def test_cli(runs, tmp_path, capsys):
    _, out = runs
    full, lora = str(out["full"][0]), str(out["lora"][0])
    # --adapter on a full fine-tuning run: a clear error, nothing written
    assert main(["export", full, str(tmp_path / "a"), "--adapter"]) == 2
    err = capsys.readouterr().err
    assert "trained the full model" in err and "--merged" in err and not (tmp_path / "a").exists()
    assert main(["export", lora, str(tmp_path / "a"), "--adapter", "--checkpoint", "2"]) == 0
    assert (tmp_path / "a" / "adapter_config.json").is_file()
    # an existing export is not overwritten unless asked
    assert main(["export", lora, str(tmp_path / "a"), "--merged"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["export", lora, str(tmp_path / "a"), "--merged", "--force"]) == 0
    assert (tmp_path / "a" / "model.safetensors").is_file() and not (
        tmp_path / "a" / "adapter_config.json"
    ).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left
    assert main(["export", str(tmp_path / "nope"), str(tmp_path / "b")]) == 2
    assert "does not exist" in capsys.readouterr().err
