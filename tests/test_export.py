"""fastgrpo export: merged models and PEFT adapters that plain transformers / peft load with the run's numbers."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fastgrpo.cli import main
from fastgrpo.config import load_config
from fastgrpo.export import export_run, run_checkpoint
from fastgrpo.models import eval_mode, load_policy
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
from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import (AutoImageProcessor, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer,
                          PreTrainedTokenizerFast)

ids = torch.tensor(json.loads(sys.argv[1]))
TEXT = "What is 7+1? <answer>8</answer>"
result = {}
for name, path, kind in json.loads(sys.argv[2]):
    if kind == "adapter":
        model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    elif kind == "merged":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    elif kind == "vlm-adapter":  # the adapter names its base model's directory
        base = json.load(open(path + "/adapter_config.json"))["base_model_name_or_path"]
        model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base), path)
    else:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        logp = torch.log_softmax(model.eval()(input_ids=ids).logits.float(), -1)
    tok = AutoTokenizer.from_pretrained(path)
    # the image processor alone: AutoProcessor would need torchvision for Qwen2-VL's video processor
    image = AutoImageProcessor.from_pretrained(path, backend="pil") if kind.startswith("vlm") else None
    content = [{"type": "text", "text": "hi"}] if kind.startswith("vlm") else "hi"
    chat = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    result[name] = {"logp": logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0].tolist(),
                    "class": type(model).__name__, "auto_ids": tok(TEXT)["input_ids"], "chat": chat,
                    "ids": PreTrainedTokenizerFast.from_pretrained(path)(TEXT)["input_ids"],
                    "image": type(image).__name__}
print(json.dumps(result))
"""


def _logprobs(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Per-token log-probs ``[B, T-1]`` fp32 of ``ids`` under ``model`` (eval mode, no grad)."""
    with eval_mode(model), torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
    return logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """2-step tiny runs with LoRA and without, and a vision-language run with LoRA whose adapter was moved by hand
    and saved: ``{name: (run_dir, final log-probs, initial log-probs, the ids of a sentence under the run's
    tokenizer)}``, log-probs on text-only ids."""
    root = tmp_path_factory.mktemp("runs")
    ids = torch.randint(3, 400, (2, 14), generator=torch.Generator().manual_seed(0))
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # one reduction order for the comparisons below
    try:
        out = {}
        lora = ["model.lora.enabled=true", "model.lora.r=4"]
        vlm = [
            "model.name=tiny-qwen2.5-vl",
            "task.name=transit_map",
            "task.num_train=4",
            "rollout.max_new_tokens=4",
        ]
        for name, extra in (("lora", lora), ("full", []), ("vlm", [*lora, *vlm])):
            cfg = load_config(None, [*TINY, *extra, f"train.output_dir={root}", f"train.run_name={name}"])
            trainer = Trainer(cfg)
            if (
                name == "vlm"
            ):  # the export is under test, not vision-language training: move the adapter, save
                with torch.no_grad():
                    for p in trainer.params:
                        p.add_(
                            0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()))
                        )
                trainer.save()
            else:
                trainer.train()
            initial, _ = load_policy(cfg.model.name, seed=3)
            text_ids = trainer.tokenizer("What is 7+1? <answer>8</answer>")["input_ids"]
            out[name] = (trainer.run_dir, _logprobs(trainer.model, ids), _logprobs(initial, ids), text_ids)
    finally:
        torch.set_num_threads(before)
    return ids, out


def test_exports_load_without_fastgrpo_and_match_the_run(runs, tmp_path, caplog):
    ids, out = runs
    exports, warned = [], {}
    for name, run, mode, kind in [
        ("lora-merged", "lora", "merged", "merged"),
        ("lora-adapter", "lora", "adapter", "adapter"),
        ("full-merged", "full", "merged", "merged"),
        ("vlm-merged", "vlm", "merged", "vlm-merged"),
        ("vlm-adapter", "vlm", "adapter", "vlm-adapter"),
    ]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fastgrpo.export"):
            exports.append((name, export_run(out[run][0], tmp_path / name, mode=mode), kind))
        warned[name] = f"AutoTokenizer.from_pretrained({str(tmp_path / name)!r}) gives" in caplog.text
    args = [json.dumps(ids.tolist()), json.dumps([(n, str(p), k) for n, p, k in exports])]
    proc = subprocess.run([sys.executable, "-I", "-c", LOADER, *args], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, _, kind in exports:
        final, initial = out[name.split("-")[0]][1:3]
        got = torch.tensor(loaded[name]["logp"])
        # fp32 rounding: merging W + s B A reorders the sums
        torch.testing.assert_close(got, final, rtol=1e-5, atol=2e-5, msg=name)
        # ... and the trained weights really are in it: the initial model is far off
        assert (initial - final).abs().max() > 100 * 2e-5, name
        want = {"adapter": "PeftModelForCausalLM", "merged": "Qwen2ForCausalLM", "vlm-adapter": "PeftModelForCausalLM",
                "vlm-merged": "Qwen2_5_VLForConditionalGeneration"}  # fmt: skip
        assert loaded[name]["class"] == want[kind], name
        # the saved tokenizer is the run's; AutoTokenizer loads it as such, or the export said it would not
        assert loaded[name]["ids"] == out[name.split("-")[0]][3], name
        assert (loaded[name]["auto_ids"] == loaded[name]["ids"]) != warned[name], name
        assert loaded[name]["image"] == (
            "Qwen2VLImageProcessorPil" if kind.startswith("vlm") else "NoneType"
        ), name
        assert loaded[name]["chat"].rstrip().endswith("assistant"), name


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
    assert run_checkpoint(run_dir).path.name == "step-000002" and run_checkpoint(run_dir, 2).step == 2
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
    # a broken checkpoint file is named, and nothing is written
    broken = tmp_path / "broken" / "checkpoints" / "step-000002"
    shutil.copytree(run_checkpoint(lora).path, broken)
    (broken / "model.safetensors").write_bytes((broken / "model.safetensors").read_bytes()[:100])
    assert main(["export", str(tmp_path / "broken"), str(tmp_path / "c"), "--checkpoint", str(broken)]) == 2
    assert "model.safetensors is unreadable" in capsys.readouterr().err and not (tmp_path / "c").exists()
