"""Vision-language inputs: every bad input fails early with the example and the field named; media formats;
the torchvision-free video path against the image path it must agree with."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from fastgrpo.packing import pack, pack_shared_prompt, packed_forward
from fastgrpo.tasks.base import Example
from fastgrpo.tiny import tiny_model_and_tokenizer, tiny_vlm
from fastgrpo.vlm import (
    FrameVideoProcessor,
    VisionInputs,
    encode_prompts,
    generation_inputs,
    load_image,
    load_video,
)


@pytest.fixture(scope="module")
def qwen():
    return tiny_vlm("qwen2-vl")


def _img(h=56, w=56, seed=0, mode="RGB"):
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _ex(images=(), videos=(), parts=("image",)):
    content = [{"type": p} for p in parts] + [{"type": "text", "text": "What is shown?"}]
    return Example([{"role": "user", "content": content}], "x", images=list(images), videos=list(videos))


def test_image_sources_give_the_same_prompt(qwen, tmp_path):
    _, proc = qwen
    img = _img()
    path = tmp_path / "a.png"
    img.save(path)
    sources = [img, str(path), path, _png(img), {"bytes": _png(img), "path": None}, {"path": str(path)},
               np.asarray(img)]  # fmt: skip
    encs = encode_prompts(proc, [_ex([s]) for s in sources])
    keys = {e.vision.images[0].key for e in encs}
    assert len(keys) == 1 and len({tuple(e.ids) for e in encs}) == 1


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_non_rgb_images_are_converted(qwen, mode):
    _, proc = qwen
    img = _img(mode=mode)
    assert load_image(img).mode == "RGB"
    enc = encode_prompts(proc, [_ex([img])])[0]
    want = encode_prompts(proc, [_ex([img.convert("RGB")])])[0]
    assert enc.vision.images[0].key == want.vision.images[0].key


def test_bad_inputs_name_example_and_field(qwen, tmp_path):
    _, proc = qwen
    good = _ex([_img()])
    corrupt = tmp_path / "bad.png"
    corrupt.write_bytes(_png(_img())[:40])  # truncated
    cases = [
        (_ex([str(tmp_path / "missing.png")]), r"example 1: images\[0\].*does not exist"),
        (_ex([corrupt]), r"example 1: images\[0\].*cannot decode"),
        (_ex([b"not an image"]), r"example 1: images\[0\].*cannot decode"),
        (_ex([_img(), _img()]), r"example 1: images: 1 image part\(s\) in the messages but 2 images"),
        (_ex([_img()], parts=("image", "image")), r"example 1: images: 2 image part\(s\).* but 1 images"),
        (_ex([], [[]], parts=("video",)), r"example 1: videos\[0\]: the video has no frames"),
        (
            _ex([], [[_img(), _img(28, 28)]], parts=("video",)),
            r"example 1: videos\[0\]: frames of different sizes",
        ),
        (_ex([], [str(tmp_path / "clip.mp4")], parts=("video",)), r"example 1: videos\[0\].*does not exist"),
        (_ex([42]), r"example 1: images\[0\]: expected a PIL image"),
        (_ex([], parts=("audio",)), r"example 1: messages\[0\]\.content\[0\]: part type"),
    ]
    for bad, msg in cases:
        with pytest.raises(ValueError, match=msg):
            encode_prompts(proc, [good, bad])


def test_video_file_needs_pyav(qwen, tmp_path, monkeypatch):
    _, proc = qwen
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\x00" * 16)
    import builtins

    real_import = builtins.__import__

    def no_av(name, *args, **kwargs):
        if name == "av":
            raise ImportError("No module named 'av'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_av)
    with pytest.raises(ValueError, match=r"example 0: videos\[0\].*needs PyAV \(pip install av\)"):
        encode_prompts(proc, [_ex([], [str(clip)], parts=("video",))])


def test_text_only_model_given_images():
    _, tok = tiny_model_and_tokenizer()
    with pytest.raises(ValueError, match=r"example 0: images: .*text-only"):
        encode_prompts(tok, [_ex([_img()])])
    # text-only examples encode with a tokenizer, as the chat template renders them
    enc = encode_prompts(tok, [Example([{"role": "user", "content": "hi"}], "x")])[0]
    assert enc.vision is None and enc.ids == tok(enc.text, add_special_tokens=False)["input_ids"]


def test_text_only_model_refuses_a_multimodal_row(qwen):
    _, proc = qwen
    model, _ = tiny_model_and_tokenizer()
    enc = encode_prompts(proc, [_ex([_img()])])[0]
    batch = pack([enc.ids], [[5, 6]], vision=[enc.vision])
    with pytest.raises(ValueError, match="text-only model"):
        packed_forward(model, batch)


def test_llava_takes_no_video():
    _, proc = tiny_vlm("llava")
    with pytest.raises(ValueError, match=r"example 0: videos: .*takes no video"):
        encode_prompts(proc, [_ex([], [[_img()]], parts=("video",))])


def test_pack_checks_vision_against_prompts(qwen):
    _, proc = qwen
    enc = encode_prompts(proc, [_ex([_img()])])[0]
    with pytest.raises(ValueError, match=r"2 vision entries for 1 prompts"):
        pack([enc.ids], [[5]], vision=[enc.vision, None])
    with pytest.raises(ValueError, match=r"vision\[0\] describes .* prompt tokens but prompts\[0\] has"):
        pack_shared_prompt([enc.ids[1:]], [[[5]]], vision=[enc.vision])
    with pytest.raises(ValueError, match="they come together"):
        VisionInputs(enc.vision.mm_token_type_ids, [], [])


def test_generation_inputs_pad_types_with_ids(qwen):
    model, proc = qwen
    encs = encode_prompts(proc, [_ex([_img(56, 84)]), Example([{"role": "user", "content": "hi"}], "x")])
    kw = generation_inputs(encs, proc.tokenizer.pad_token_id, model=model)
    b0, b1 = (kw["mm_token_type_ids"][i] for i in range(2))
    assert torch.equal(b0[-len(encs[0].ids) :], encs[0].vision.mm_token_type_ids) and not b1.any()
    assert torch.equal(kw["input_ids"][0, -len(encs[0].ids) :], torch.tensor(encs[0].ids))
    out = model.generate(**kw, max_new_tokens=3, do_sample=True, num_return_sequences=2)
    assert out.shape[0] == 4


def test_frame_video_processor_matches_image_layout(qwen):
    """A video of frames [A, A, B, B] is the patches of image A then image B (the image processor broadcasts one
    frame over the temporal patch), up to the fused vs separate rescale-normalize rounding."""
    _, proc = qwen
    vp = proc.video_processor
    if not isinstance(vp, FrameVideoProcessor):
        pytest.skip("torchvision is usable: transformers' own video processor runs")
    a, b = _img(56, 84, 1), _img(56, 84, 2)
    video = vp([[a, a, b, b]])
    image = proc.image_processor([a, b], return_tensors="pt")
    assert video["video_grid_thw"].tolist() == [[2, 4, 6]]
    assert (video["pixel_values_videos"] - image["pixel_values"]).abs().max().item() < 1e-5
    odd = vp([[a, a, b]])  # the last frame repeats to complete the temporal pair
    assert torch.equal(odd["pixel_values_videos"], video["pixel_values_videos"])
    with pytest.raises(ValueError, match=r"would be resized to 56x56.*pass frames of 56x56"):
        vp([[_img(50, 50)]])


def test_load_video_frames_and_array():
    frames, fps = load_video([_img(), _img()])
    assert len(frames) == 2 and fps == 24.0 and frames[0].mode == "RGB"
    frames, _ = load_video(np.zeros((3, 8, 8, 3), dtype=np.uint8))
    assert len(frames) == 3
