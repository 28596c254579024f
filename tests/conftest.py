"""Shared test helpers: the STYLE.md error budget (its one definition lives in bench/_harness.py, which the
benchmark checks share) and random inputs."""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from pathlib import Path

# Triton reads TRITON_INTERPRET once, when it is first imported: set before anything imports it so the Triton
# kernels run on CPU tensors under the interpreter (tests that need the "no interpreter" error unset it).
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import fastgrpo  # noqa: E402, F401  (before any third-party package: its log filters must be in place)
from bench._harness import ATOL, error_budget  # noqa: E402
from bench._harness import abs_err as max_err  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


class _CheckoutKernels(importlib.abc.MetaPathFinder):
    """``fastgrpo.kernels`` from this checkout's ``kernels/``, like ``fastgrpo`` itself (``pythonpath``), whatever
    checkout an editable install maps it to (a git worktree shares its main checkout's install)."""

    root = Path(__file__).resolve().parent.parent / "kernels"

    def find_spec(self, name, path=None, target=None):
        if name != "fastgrpo.kernels":
            return None
        return importlib.util.spec_from_file_location(
            name, self.root / "__init__.py", submodule_search_locations=[str(self.root)]
        )


if "fastgrpo.kernels" not in sys.modules and (_CheckoutKernels.root / "__init__.py").is_file():
    sys.meta_path.insert(0, _CheckoutKernels())

__all__ = ["ATOL", "assert_budget", "loss_batch", "max_err", "padded_logprobs", "rand_ids"]


def assert_budget(
    out, gt, ref_lowp, dtype, what: str = "", factor: float = 2.0, relative_atol: bool = True
) -> None:
    """``err(out) <= factor * err(ref_lowp) + atol[dtype]``, errors against the fp64 ground truth ``gt``.

    ``relative_atol``: the atol scales with the magnitude of ``gt`` when it is large (gradients of losses with
    big logits); off, it is absolute."""
    assert out.shape == gt.shape, f"{what}: shape {tuple(out.shape)} != {tuple(gt.shape)}"
    e_out, e_ref = max_err(out, gt), max_err(ref_lowp, gt)
    scale = max(1.0, float(gt.detach().abs().max())) if gt.numel() and relative_atol else 1.0
    bound = error_budget(e_ref, dtype, scale=scale, factor=factor)
    assert e_out <= bound, f"{what}: err {e_out:.3e} > budget {bound:.3e} (ref_lowp err {e_ref:.3e})"


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


def loss_batch(gen: torch.Generator, b: int, t: int, d: int, v: int, mask_p: float = 0.3) -> dict:
    """Random fp64 inputs of a padded GRPO loss: ``h [B, T, D]``, ``w [V, D]``, ``bias [V]``, ``y [B, T]``, a
    ``mask`` with every row's first token valid, behaviour / reference log-probs near the current ones (so ratios
    straddle the clip range) and per-sequence advantages ``adv [B]``."""
    h = torch.randn(b, t, d, generator=gen, dtype=torch.float64)
    w = torch.randn(v, d, generator=gen, dtype=torch.float64) / d**0.5
    bias = torch.randn(v, generator=gen, dtype=torch.float64) * 0.1
    y = torch.randint(0, v, (b, t), generator=gen)
    mask = (torch.rand(b, t, generator=gen) > mask_p).double()
    mask[:, 0] = 1.0
    with torch.no_grad():
        lp = torch.log_softmax(h @ w.t() + bias, -1).gather(-1, y[..., None]).squeeze(-1)
    old = lp + 0.3 * torch.randn(b, t, generator=gen, dtype=torch.float64)
    ref = lp + 0.3 * torch.randn(b, t, generator=gen, dtype=torch.float64)
    adv = torch.randn(b, generator=gen, dtype=torch.float64)
    return dict(h=h, w=w, bias=bias, y=y, mask=mask, old=old, ref=ref, adv=adv)


def eos_biased_tiny(eos_bias: float):
    """The tiny model (seed 0) with an lm_head bias of ``eos_bias`` on EOS: completions that end at many
    different lengths. Returns ``(model, tokenizer)``."""
    from fastgrpo.tiny import tiny_model_and_tokenizer

    model, tok = tiny_model_and_tokenizer(seed=0)
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[tok.eos_token_id] = eos_bias
    model.lm_head = head
    return model, tok


def rand_ids(gen: torch.Generator, vocab: int, lens: list[int]) -> list[torch.Tensor]:
    """Random token ids (ids 0-3 left free for special tokens), one tensor per length."""
    return [torch.randint(4, vocab, (n,), generator=gen) for n in lens]


def padded_logprobs(model, prompts, completions) -> torch.Tensor:
    """``[M]`` log-probs of every completion token from a right-padded batch with full logits (log_softmax +
    gather), in packing order; the model's current mode, differentiable."""
    seqs = [torch.cat([p, c]) for p, c in zip(prompts, completions)]
    t = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), t, dtype=torch.long)
    mask = torch.zeros(len(seqs), t, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
    out = []
    for i, (p, c) in enumerate(zip(prompts, completions)):
        pos = torch.arange(len(p) - 1, len(p) + len(c) - 1)
        out.append(logp[i, pos, c])
    return torch.cat(out)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer, offline: the converted cache when present, else the package's GGUF (~5 s)."""
    from transformers import AutoTokenizer

    from fastgrpo.models import SMOLLM2_GGUF, _smollm2_package_dir, cache_dir

    converted = cache_dir() / "SmolLM2-135M-Instruct"
    if (converted / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(converted, local_files_only=True)
    return AutoTokenizer.from_pretrained(_smollm2_package_dir(), gguf_file=SMOLLM2_GGUF)


# --- short trainer runs on the tiny model (test_trainer, test_trainer_pinned, test_resume, test_trust) -----------
TINY_RUN = [
    "model.name=tiny",
    "train.progress=false",
    "train.plot=false",
    "train.eval_prompts=0",
    "task.num_train=16",
    "task.num_eval=4",
    "rollout.max_new_tokens=8",
]
# ... with updates that move the weights: 2 prompts x 4 completions a step, a large learning rate
TINY_TRAINING = [*TINY_RUN, "rollout.group_size=4", "rollout.prompts_per_step=2", "optim.lr=5e-3"]
# a reward with spread on the untrained tiny model (about half its samples hold a digit): non-zero advantages
DIGIT_REWARD = "rewards=[{name: format, weight: 1.0, params: {pattern: '.*[0-9].*'}}]"


@pytest.fixture
def one_thread():
    """Bitwise-exact comparisons need a fixed reduction order: MKL may change its thread count under load
    (MKL_DYNAMIC), which changes GEMM rounding. One thread is also the fastest on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
