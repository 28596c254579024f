"""Vision-language models: media, prompts, per-prompt vision inputs, and the model side of the packed forward.

Data flow (images become new fields on one batch object and nothing else)
-------------------------------------------------------------------------
1. :func:`encode_prompts` (processor, examples) validates every example's messages and media first (before any
   model work; errors name the example index and the field), then renders each prompt with the processor's
   chat template and runs the processor: placeholders are expanded to one token per vision feature. It returns
   one :class:`EncodedPrompt` per example: the prompt token ids and, for a prompt with images / video, its
   :class:`VisionInputs` (token types, and one :class:`MediaItem` per image / video with that item's encoder
   inputs and a content hash).
2. Generation: :func:`generation_inputs` collates prompts and their vision inputs into the padded keyword
   arguments of ``model.generate`` (``input_ids``, ``attention_mask``, ``mm_token_type_ids`` padded on the same
   side, ``pixel_values``, ``image_grid_thw``, ...).
3. Training: ``fastgrpo.packing.pack`` / ``pack_shared_prompt`` take ``vision=[VisionInputs | None, ...]`` beside
   the prompt ids; the packed row then carries a ``PackedVision`` (unique media of the row, which media fills
   which placeholder run, token types). ``packed_forward`` runs the vision encoder once per unique media item of
   the row (:func:`encode_media`), scatters the features into the input embeddings at the placeholder tokens,
   builds M-RoPE position ids per sample (:func:`mrope_positions`) and runs the language model: last hidden
   states ``[N, D]``, never logits.

Images are converted to RGB (grayscale, palette, CMYK, RGBA: PIL ``convert("RGB")``; an alpha channel is
dropped, as the processors' ``do_convert_rgb`` does). Videos are lists of frames, or files decoded with PyAV
(``pip install av``; all frames are kept, sample before if needed).

Video without torchvision
-------------------------
transformers 5.24's video processors need torchvision, and the PyPI torchvision wheel that matches torch 2.13
is a CUDA build that does not load against the CPU torch. :func:`make_processor` then builds the processor
without a video processor and attaches :class:`FrameVideoProcessor`, which computes what Qwen2-VL's video
processor computes (same ``smart_resize`` target, fused rescale-and-normalize in fp32 torch ops, the same
``[t, h/m, w/m, m, m, C, tp, p, p]`` patch layout, last frame repeated to a multiple of ``temporal_patch_size``)
for frames that are already at the target size; frames that would need resizing (torchvision's bicubic
anti-aliased resize) are refused with the size to use.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

__all__ = [
    "MediaItem",
    "VisionInputs",
    "EncodedPrompt",
    "FrameVideoProcessor",
    "load_image",
    "load_video",
    "make_processor",
    "load_processor",
    "is_processor",
    "check_example",
    "encode_prompts",
    "generation_inputs",
    "rollout_prompts",
    "vlm_body",
    "is_vlm",
    "uses_mrope",
    "vision_modules",
    "set_vision_trainable",
    "encode_media",
    "mrope_positions",
    "TEXT",
    "IMAGE",
    "VIDEO",
]

# token types, as transformers' processors write them in ``mm_token_type_ids``
TEXT, IMAGE, VIDEO = 0, 1, 2
MODALITY_CODE = {"image": IMAGE, "video": VIDEO}
# fps of a frame list without metadata: transformers' default (``VideoMetadata.sampled_fps``)
DEFAULT_FRAME_FPS = 24.0


# ----------------------------------------------------------------------------------------------------------
# per-prompt vision inputs


@dataclass
class MediaItem:
    """One image or video of a prompt, as the vision encoder takes it.

    Attributes:
        modality: ``"image"`` or ``"video"``.
        inputs: this item's encoder inputs, the processor's output sliced to the item, e.g. Qwen2-VL
            ``{"pixel_values": [n_patches, C*tp*p*p], "image_grid_thw": [1, 3]}``, LLaVA
            ``{"pixel_values": [1, 3, H, W]}``; videos use the ``*_videos`` / ``video_*`` names.
        key: content hash of ``inputs`` (equal items are encoded once per packed row).
        seconds_per_grid: Qwen2.5-VL videos: seconds per temporal grid step (``second_per_grid_ts``), else None.
    """

    modality: str
    inputs: dict[str, Tensor]
    key: str
    seconds_per_grid: float | None = None

    @property
    def grid_thw(self) -> Tensor | None:
        """``[3]`` (t, h, w) patch grid, for the models that have one (Qwen2-VL family)."""
        g = self.inputs.get("image_grid_thw" if self.modality == "image" else "video_grid_thw")
        return None if g is None else g.reshape(-1)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MediaItem:
        moved = {k: v.to(device, non_blocking=non_blocking) for k, v in self.inputs.items()}
        return replace(self, inputs=moved)


def _hash_inputs(modality: str, inputs: dict[str, Tensor]) -> str:
    h = hashlib.sha1(modality.encode())
    for name in sorted(inputs):
        t = inputs[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class VisionInputs:
    """The vision side of one prompt: what ``pack`` / ``pack_shared_prompt`` take beside its token ids.

    Attributes:
        mm_token_type_ids: ``[P]`` int64, per prompt token: 0 text, 1 image placeholder, 2 video placeholder.
        images, videos: the prompt's media items in the order of their placeholders.
    """

    mm_token_type_ids: Tensor
    images: list[MediaItem] = field(default_factory=list)
    videos: list[MediaItem] = field(default_factory=list)

    def __post_init__(self) -> None:
        t = self.mm_token_type_ids
        if not isinstance(t, Tensor) or t.dim() != 1:
            raise ValueError(
                f"mm_token_type_ids must be a 1-D tensor [P], got {getattr(t, 'shape', type(t))}"
            )
        self.mm_token_type_ids = t.detach().to("cpu", torch.long)
        for name, items, code in (("images", self.images, IMAGE), ("videos", self.videos, VIDEO)):
            n_tok = int((self.mm_token_type_ids == code).sum())
            if bool(items) != bool(n_tok):
                raise ValueError(
                    f"VisionInputs: {len(items)} {name} but {n_tok} placeholder tokens of that kind in "
                    "mm_token_type_ids; they come together"
                )

    @property
    def num_prompt_tokens(self) -> int:
        return int(self.mm_token_type_ids.numel())

    def items(self, modality: str) -> list[MediaItem]:
        return self.images if modality == "image" else self.videos


@dataclass
class EncodedPrompt:
    """One prompt ready for generation and packing: ``ids`` (placeholders expanded), ``vision`` (None for a
    text-only prompt) and the rendered ``text`` (before expansion)."""

    ids: list[int]
    vision: VisionInputs | None
    text: str


# ----------------------------------------------------------------------------------------------------------
# media


def _where(index: int | None, fieldname: str) -> str:
    return f"example {index}: {fieldname}" if index is not None else fieldname


def load_image(image: Any, *, where: str = "image") -> Any:
    """A PIL RGB image from a PIL image, a file path, bytes, or the ``datasets`` ``Image`` feature's dict
    (``{"bytes": ..., "path": ...}``); numpy ``[H, W]`` / ``[H, W, 3|4]`` uint8 arrays too.

    Decodes fully (a truncated file fails here, not in the processor). Grayscale, palette, CMYK and RGBA images
    are converted to RGB (the alpha channel is dropped). Raises ``ValueError`` starting with ``where`` for a
    missing / unreadable file or corrupt data.
    """
    from PIL import Image, UnidentifiedImageError

    src = image
    if isinstance(src, dict):  # datasets.Image() feature, decode=False
        if src.get("bytes"):
            src = src["bytes"]
        elif src.get("path"):
            src = src["path"]
        else:
            raise ValueError(f"{where}: an image dict needs 'bytes' or 'path', got keys {sorted(src)}")
    try:
        if isinstance(src, Image.Image):
            img = src
        elif isinstance(src, (str, os.PathLike)):
            path = Path(src).expanduser()
            if not path.is_file():
                raise ValueError(f"{where}: image file {str(path)!r} does not exist")
            img = Image.open(path)
        elif isinstance(src, (bytes, bytearray, memoryview)):
            img = Image.open(io.BytesIO(bytes(src)))
        elif hasattr(src, "__array__"):
            import numpy as np

            arr = np.asarray(src)
            if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
                raise ValueError(
                    f"{where}: an image array must be uint8 [H, W] or [H, W, C], got {arr.dtype} {arr.shape}"
                )
            img = Image.fromarray(arr)
        else:
            raise ValueError(
                f"{where}: expected a PIL image, a file path, bytes or a datasets Image dict, got {type(src).__name__}"
            )
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{where}: cannot decode the image ({type(e).__name__}: {e})") from e
    if img.width == 0 or img.height == 0:
        raise ValueError(f"{where}: empty image ({img.width}x{img.height})")
    return img if img.mode == "RGB" else img.convert("RGB")


def load_video(video: Any, *, where: str = "video") -> tuple[list[Any], float]:
    """``(frames, fps)`` of a video given as a list of frames (anything :func:`load_image` takes) or a file
    (decoded with PyAV, every frame kept). A frame list has ``fps`` 24, transformers' default without metadata.

    Raises ``ValueError`` starting with ``where`` for a video without frames, frames of different sizes, a
    missing file, or a file when PyAV is not installed (with the install hint).
    """
    if isinstance(video, (str, os.PathLike)):
        path = Path(video).expanduser()
        if not path.is_file():
            raise ValueError(f"{where}: video file {str(path)!r} does not exist")
        try:
            import av
        except ImportError as e:
            raise ValueError(
                f"{where}: decoding the video file {str(path)!r} needs PyAV (pip install av), which is not "
                "installed; or pass the video as a list of frames"
            ) from e
        try:
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                fps = float(stream.average_rate) if stream.average_rate else DEFAULT_FRAME_FPS
                frames = [f.to_image() for f in container.decode(stream)]
        except (av.error.FFmpegError, IndexError, OSError) as e:
            raise ValueError(
                f"{where}: cannot decode the video file {str(path)!r} ({type(e).__name__}: {e})"
            ) from e
    elif isinstance(video, (list, tuple)) or (hasattr(video, "__array__") and getattr(video, "ndim", 0) == 4):
        frames, fps = list(video), DEFAULT_FRAME_FPS
    else:
        raise ValueError(
            f"{where}: expected a list of frames or a video file path, got {type(video).__name__}"
        )
    if not frames:
        raise ValueError(f"{where}: the video has no frames")
    frames = [load_image(f, where=f"{where} frame {k}") for k, f in enumerate(frames)]
    sizes = {f.size for f in frames}
    if len(sizes) > 1:
        raise ValueError(
            f"{where}: frames of different sizes {sorted(sizes)}; a video's frames share one size"
        )
    return frames, fps


# ----------------------------------------------------------------------------------------------------------
# processors


def _smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    return smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)


def _push_to_hub_mixin() -> type:
    from transformers.utils import PushToHubMixin

    return PushToHubMixin


class FrameVideoProcessor(_push_to_hub_mixin()):
    """Qwen2-VL-family video processing without torchvision (module docstring: what it computes, and when it
    refuses). Duck-types the processor's ``video_processor``: ``processor(text=..., videos=...)`` works."""

    model_input_names = ["pixel_values_videos", "video_grid_thw"]
    _auto_class = None  # read by ProcessorMixin.save_pretrained

    def __init__(
        self,
        size: dict[str, int] | None = None,
        patch_size: int = 14,
        temporal_patch_size: int = 2,
        merge_size: int = 2,
        image_mean: Sequence[float] = (0.48145466, 0.4578275, 0.40821073),
        image_std: Sequence[float] = (0.26862954, 0.26130258, 0.27577711),
        rescale_factor: float = 1 / 255,
        **unused: Any,
    ) -> None:
        size = dict(size or {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768})
        self.size = {"shortest_edge": int(size.get("shortest_edge", size.get("min_pixels"))),
                     "longest_edge": int(size.get("longest_edge", size.get("max_pixels")))}  # fmt: skip
        self.patch_size, self.temporal_patch_size, self.merge_size = (
            patch_size,
            temporal_patch_size,
            merge_size,
        )
        self.image_mean, self.image_std = list(image_mean), list(image_std)
        self.rescale_factor = rescale_factor

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """The ``(height, width)`` Qwen2-VL's video processor resizes ``height x width`` frames to."""
        return _smart_resize(height, width, self.patch_size * self.merge_size, self.size["shortest_edge"],
                             self.size["longest_edge"])  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {"video_processor_type": "Qwen2VLVideoProcessor", "size": dict(self.size),
                "patch_size": self.patch_size, "temporal_patch_size": self.temporal_patch_size,
                "merge_size": self.merge_size, "image_mean": self.image_mean, "image_std": self.image_std,
                "rescale_factor": self.rescale_factor}  # fmt: skip

    def _one(self, frames: Sequence[Any]) -> tuple[Tensor, list[int]]:
        import numpy as np

        video = torch.from_numpy(np.stack([np.asarray(load_image(f)) for f in frames])).permute(0, 3, 1, 2)
        t, c, h, w = video.shape
        th, tw = self.target_size(h, w)
        if (th, tw) != (h, w):
            raise ValueError(
                f"video frames of {h}x{w} would be resized to {th}x{tw} by the video processor (torchvision's "
                f"bicubic anti-aliased resize), and torchvision is not usable here: pass frames of {th}x{tw}, or "
                "install a torchvision build matching torch"
            )
        mean = torch.tensor(self.image_mean) * (1.0 / self.rescale_factor)
        std = torch.tensor(self.image_std) * (1.0 / self.rescale_factor)
        x = video.to(torch.float32).sub(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))
        tp, p, m = self.temporal_patch_size, self.patch_size, self.merge_size
        if pad := -t % tp:
            x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
            t += pad
        gt, gh, gw = t // tp, h // p, w // p
        x = x.view(1, gt, tp, c, gh // m, m, p, gw // m, m, p).permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
        return x.reshape(gt * gh * gw, c * tp * p * p), [gt, gh, gw]

    def __call__(self, videos: Any, video_metadata: Any = None, **kwargs: Any) -> Any:
        from transformers import BatchFeature
        from transformers.video_utils import VideoMetadata

        if not isinstance(videos, (list, tuple)) or not videos or not isinstance(videos[0], (list, tuple)):
            videos = [videos]
        outs = [self._one(v) for v in videos]
        metas = (
            list(video_metadata)
            if isinstance(video_metadata, (list, tuple))
            else [video_metadata] * len(outs)
        )
        metas = [m if m is not None else VideoMetadata(total_num_frames=len(v), fps=DEFAULT_FRAME_FPS)
                 for m, v in zip(metas, videos)]  # fmt: skip
        return BatchFeature(
            {
                "pixel_values_videos": torch.cat([o[0] for o in outs]),
                "video_grid_thw": torch.tensor([o[1] for o in outs], dtype=torch.long),
                "video_metadata": metas,
            },  # fmt: skip
            skip_tensor_conversion=["video_metadata"],
        )


def _torchvision_usable() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # ImportError, or a CUDA build failing to load against a CPU torch
        return False
    return True


@functools.cache
def _without_video_check(cls: type) -> type:
    # transformers 5.24 checks every processor attribute's class on construction, video_processor=None included,
    # and without torchvision that check fails (its video-processor mapping is a placeholder); skip it for the
    # missing video processor only.
    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None
        return cls.check_argument_for_proper_class(self, argument_name, argument)

    return type(cls.__name__, (cls,), {"check_argument_for_proper_class": check_argument_for_proper_class})


def make_processor(
    processor_cls: type,
    image_processor: Any,
    tokenizer: Any,
    chat_template: str | None,
    *,
    video_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> Any:
    """``processor_cls(image_processor, tokenizer, ...)``, with a video processor for the classes that take one:
    transformers' own (``Qwen2VLVideoProcessor(**video_kwargs)``) when torchvision is usable, else
    :class:`FrameVideoProcessor` (module docstring)."""
    takes_video = "video_processor" in inspect.signature(processor_cls.__init__).parameters
    if not takes_video:
        return processor_cls(
            image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs
        )
    video_kwargs = dict(video_kwargs or {})
    if _torchvision_usable():
        from transformers import Qwen2VLVideoProcessor

        return processor_cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template,
                             video_processor=Qwen2VLVideoProcessor(**video_kwargs), **kwargs)  # fmt: skip
    proc = _without_video_check(processor_cls)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=None,
        chat_template=chat_template,
        **kwargs,
    )
    proc.video_processor = FrameVideoProcessor(**video_kwargs)
    return proc


def load_processor(path: str | os.PathLike) -> Any:
    """The processor of a local image-text-to-text checkpoint (never downloads).

    ``AutoProcessor``; when that fails because the video processor needs torchvision, the processor is rebuilt
    from its image processor (PIL backend), tokenizer and chat template with :class:`FrameVideoProcessor`
    (settings from ``video_preprocessor_config.json`` / ``processor_config.json``), and a warning says so.
    """
    import json

    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path, local_files_only=True)
    except (ImportError, AttributeError, ValueError, TypeError) as e:
        if _torchvision_usable():
            raise
        err = e
    import transformers
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

    root = Path(path)
    config = AutoConfig.from_pretrained(root, local_files_only=True)
    proc_cfg: dict[str, Any] = {}
    if (root / "processor_config.json").is_file():
        proc_cfg = json.loads((root / "processor_config.json").read_text())
    name = proc_cfg.get("processor_class") or _processor_class_name(config)
    cls = getattr(transformers, name, None) if name else None
    if cls is None:
        raise ValueError(f"cannot build the processor of {str(root)!r}: {err}") from err
    video_kwargs = proc_cfg.get("video_processor") or {}
    if (root / "video_preprocessor_config.json").is_file():
        video_kwargs = json.loads((root / "video_preprocessor_config.json").read_text())
    image_processor = AutoImageProcessor.from_pretrained(root, local_files_only=True, backend="pil")
    tokenizer = AutoTokenizer.from_pretrained(root, local_files_only=True)
    template = getattr(tokenizer, "chat_template", None)
    if (root / "chat_template.jinja").is_file():
        template = (root / "chat_template.jinja").read_text()
    extra = {k: v for k, v in proc_cfg.items() if k in ("patch_size", "num_additional_image_tokens",
                                                         "vision_feature_select_strategy", "image_token")}  # fmt: skip
    logger.warning(
        "%s: AutoProcessor failed (%s: %s); built %s without transformers' video processor (torchvision is not "
        "usable): videos go through fastgrpo.vlm.FrameVideoProcessor",
        root, type(err).__name__, err, name,
    )  # fmt: skip
    return make_processor(cls, image_processor, tokenizer, template, video_kwargs=video_kwargs, **extra)


def _processor_class_name(config: Any) -> str | None:
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    return PROCESSOR_MAPPING_NAMES.get(getattr(config, "model_type", None))


def is_processor(obj: Any) -> bool:
    """True for a multimodal processor (has an image processor); False for a plain tokenizer."""
    return getattr(obj, "image_processor", None) is not None


def _tokenizer_of(obj: Any) -> Any:
    return getattr(obj, "tokenizer", obj)


# ----------------------------------------------------------------------------------------------------------
# examples -> prompts


def _parts(example: Any, index: int | None) -> tuple[int, int]:
    """Validate the chat parts of ``example.messages``; returns the (image, video) part counts."""
    messages = getattr(example, "messages", None)
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{_where(index, 'messages')}: a non-empty list of chat turns is required")
    n_img = n_vid = 0
    for m, msg in enumerate(messages):
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise ValueError(
                f"{_where(index, f'messages[{m}].content')}: a string or a list of parts, got {type(content).__name__}"
            )
        for k, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image":
                n_img += 1
            elif kind == "video":
                n_vid += 1
            elif kind == "text":
                if not isinstance(part.get("text"), str):
                    raise ValueError(
                        f"{_where(index, f'messages[{m}].content[{k}]')}: a text part needs 'text'"
                    )
            else:
                raise ValueError(
                    f"{_where(index, f'messages[{m}].content[{k}]')}: part type must be 'text', 'image' or 'video', "
                    f"got {kind!r}"
                )
    return n_img, n_vid


def check_example(
    example: Any, index: int | None, processor: Any, *, decode: bool = True
) -> tuple[list[Any], list[tuple[list[Any], float]]]:
    """Validate one example against ``processor`` (a processor, or a tokenizer for a text-only model) and load its
    media: ``(RGB images, [(frames, fps), ...])``. Raises ``ValueError`` naming the example and the field.

    ``decode=False`` checks the structure only (parts against media, a text-only model given media, media files
    that do not exist) and returns no media: the cheap check of a whole dataset before any model work; the
    media are decoded, and checked, when the prompt is encoded."""
    n_img, n_vid = _parts(example, index)
    images = list(getattr(example, "images", None) or [])
    videos = list(getattr(example, "videos", None) or [])
    if (images or videos or n_img or n_vid) and not is_processor(processor):
        raise ValueError(
            f"{_where(index, 'images' if images or n_img else 'videos')}: the example has images / video but the "
            f"model is text-only ({type(processor).__name__} has no image processor); load an image-text-to-text "
            "model, or drop the media"
        )
    for name, parts, media in (("images", n_img, images), ("videos", n_vid, videos)):
        if parts != len(media):
            raise ValueError(
                f"{_where(index, name)}: {parts} {name[:-1]} part(s) in the messages but {len(media)} {name}; each "
                f"{{'type': '{name[:-1]}'}} part takes the next entry of {name}, in order"
            )
    if videos and getattr(processor, "video_processor", None) is None:
        raise ValueError(f"{_where(index, 'videos')}: {type(processor).__name__} takes no video")
    if not decode:
        for name, media in (("images", images), ("videos", videos)):
            for k, x in enumerate(media):
                src = x.get("path") if isinstance(x, dict) and not x.get("bytes") else x
                if isinstance(src, (str, os.PathLike)) and not Path(src).expanduser().is_file():
                    raise ValueError(f"{_where(index, f'{name}[{k}]')}: file {str(src)!r} does not exist")
        return [], []
    loaded_images = [load_image(x, where=_where(index, f"images[{k}]")) for k, x in enumerate(images)]
    loaded_videos = [load_video(v, where=_where(index, f"videos[{k}]")) for k, v in enumerate(videos)]
    return loaded_images, loaded_videos


def _split_items(out: dict[str, Any], modality: str, count: int, index: int | None) -> list[MediaItem]:
    """Slice the processor's batched vision outputs into one :class:`MediaItem` per image / video."""
    if count == 0:
        return []
    is_video = modality == "video"
    keys = [k for k in out if k not in ("input_ids", "attention_mask", "mm_token_type_ids", "video_metadata")
            and ("video" in k) == is_video]  # fmt: skip
    grid_key = "video_grid_thw" if is_video else "image_grid_thw"
    seconds = out.get("second_per_grid_ts") if is_video else None
    tensors = {k: torch.as_tensor(out[k]) for k in keys if k != "second_per_grid_ts"}
    per_item: list[dict[str, Tensor]] = [{} for _ in range(count)]
    grid = tensors.get(grid_key)
    for k, t in tensors.items():
        if grid is not None and k != grid_key and t.shape[0] == int(grid.prod(-1).sum()):
            parts = torch.split(t, grid.prod(-1).tolist())  # flat patches of all items (Qwen2-VL family)
        elif t.shape[0] == count:
            parts = torch.split(t, 1)
        else:
            raise ValueError(
                f"{_where(index, modality + 's')}: cannot split the processor output {k} {tuple(t.shape)} into "
                f"{count} items"
            )
        for item, part in zip(per_item, parts):
            item[k] = part
    items = []
    for j, inputs in enumerate(per_item):
        sec = float(torch.as_tensor(seconds).reshape(-1)[j]) if seconds is not None else None
        items.append(MediaItem(modality, inputs, _hash_inputs(modality, inputs), sec))
    return items


def encode_prompts(
    processor: Any,
    examples: Sequence[Any],
    *,
    add_generation_prompt: bool = True,
) -> list[EncodedPrompt]:
    """Prompt ids and vision inputs of ``examples`` (objects with ``messages``, ``images``, ``videos``, like
    :class:`fastgrpo.tasks.base.Example`), rendered with ``processor``'s chat template.

    Every example is validated and its media loaded first (:func:`check_example`), so a bad example fails before
    any processing. ``processor`` may be a plain tokenizer for text-only examples (a text-only model). The
    placeholders are expanded by the processor to one token per vision feature; ``vision`` is None for a prompt
    without media.
    """
    loaded = [check_example(ex, i, processor) for i, ex in enumerate(examples)]
    out: list[EncodedPrompt] = []
    for i, (ex, (images, videos)) in enumerate(zip(examples, loaded)):
        text = processor.apply_chat_template(
            ex.messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        if not is_processor(processor):
            out.append(EncodedPrompt(processor(text, add_special_tokens=False)["input_ids"], None, text))
            continue
        kw: dict[str, Any] = {}
        if images:
            kw["images"] = images
        if videos:
            from transformers.video_utils import VideoMetadata

            kw["videos"] = [frames for frames, _ in videos]
            kw["video_metadata"] = [VideoMetadata(total_num_frames=len(f), fps=fps) for f, fps in videos]
        try:
            enc = processor(text=[text], add_special_tokens=False, return_tensors="pt", **kw)
        except ValueError as e:
            raise ValueError(f"example {i}: the processor refused the prompt: {e}") from e
        ids = enc["input_ids"][0]
        types = enc.get("mm_token_type_ids")
        types = torch.as_tensor(
            processor.create_mm_token_type_ids([ids.tolist()])[0] if types is None else types[0]
        )
        if not images and not videos:
            out.append(EncodedPrompt(ids.tolist(), None, text))
            continue
        vision = VisionInputs(
            types.long(),
            _split_items(enc, "image", len(images), i),
            _split_items(enc, "video", len(videos), i),
        )
        out.append(EncodedPrompt(ids.tolist(), vision, text))
    return out


def _cat_inputs(items: Sequence[MediaItem]) -> dict[str, Tensor]:
    return {k: torch.cat([it.inputs[k] for it in items]) for k in items[0].inputs} if items else {}


def rollout_prompts(
    processor: Any, examples: Sequence[Any], *, model: nn.Module, text_prompt: Any
) -> tuple[list[Any], dict[str, Tensor] | None, list[VisionInputs | None] | None]:
    """What :func:`fastgrpo.rollout.generate_rollouts` takes for ``examples``, and what packing takes after it:
    ``(prompts, model_inputs, vision)``. A text model's processor is its tokenizer: ``text_prompt(example)``
    each (messages for its chat template, or a rendered string), no extra inputs, no vision. A vision-language
    model's: the prompt ids rendered by :func:`encode_prompts` (chat template and media placeholders), the
    media inputs of :func:`generation_inputs` (the ids are padded by ``generate_rollouts`` itself) and each
    prompt's :class:`VisionInputs` (None for a text-only prompt)."""
    if not is_processor(processor):
        return [text_prompt(e) for e in examples], None, None
    enc = encode_prompts(processor, examples)
    tok = processor.tokenizer
    extra = generation_inputs(
        enc, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id, model=model
    )
    del extra["input_ids"], extra["attention_mask"]
    return [e.ids for e in enc], extra, [e.vision for e in enc]


def generation_inputs(
    prompts: Sequence[EncodedPrompt],
    pad_token_id: int,
    *,
    padding_side: str = "left",
    device: torch.device | str | None = None,
    model: nn.Module | None = None,
) -> dict[str, Tensor]:
    """The keyword arguments of ``model.generate`` for ``prompts``: ``input_ids`` / ``attention_mask`` /
    ``mm_token_type_ids`` ``[B, T]`` padded on ``padding_side`` (the same side for all three: padding them apart
    misaligns M-RoPE), and the media of all prompts concatenated in prompt order (``pixel_values``,
    ``image_grid_thw``, ``pixel_values_videos``, ``video_grid_thw``, ``second_per_grid_ts``, ...).

    For G samples of each prompt pass ``num_return_sequences=G`` (transformers expands the media per sample).
    With ``model``, ``mm_token_type_ids`` is left out when its forward does not take it (LLaVA)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    t = max(len(p.ids) for p in prompts)
    ids = torch.full((len(prompts), t), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), t, dtype=torch.long)
    types = torch.zeros(len(prompts), t, dtype=torch.long)
    for b, p in enumerate(prompts):
        n = len(p.ids)
        sl = slice(t - n, t) if padding_side == "left" else slice(0, n)
        ids[b, sl] = torch.as_tensor(p.ids)
        mask[b, sl] = 1
        if p.vision is not None:
            types[b, sl] = p.vision.mm_token_type_ids
    out: dict[str, Tensor] = {"input_ids": ids, "attention_mask": mask}
    images = [it for p in prompts if p.vision for it in p.vision.images]
    videos = [it for p in prompts if p.vision for it in p.vision.videos]
    if images or videos:
        if model is None or "mm_token_type_ids" in inspect.signature(_unwrap(model).forward).parameters:
            out["mm_token_type_ids"] = types
        out.update(_cat_inputs(images))
        out.update(_cat_inputs(videos))
        if videos and videos[0].seconds_per_grid is not None:
            out["second_per_grid_ts"] = torch.tensor([v.seconds_per_grid for v in videos])
    if device is not None:
        out = {k: v.to(device) for k, v in out.items()}
    return out


# ----------------------------------------------------------------------------------------------------------
# the model side


def _unwrap(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def vlm_body(model: nn.Module) -> nn.Module | None:
    """The multimodal body of an image-text-to-text model (``model.model``: vision encoder + language model,
    ``get_image_features``), or None for a text-only model."""
    inner = _unwrap(model)
    if getattr(getattr(inner, "config", None), "vision_config", None) is None:
        return None
    body = getattr(inner, "model", inner)
    if not callable(getattr(body, "get_image_features", None)):
        raise ValueError(
            f"{type(inner).__name__} has a vision config but no get_image_features(): unsupported"
        )
    return body


def is_vlm(model: nn.Module) -> bool:
    """True for an image-text-to-text model (its config has a ``vision_config``)."""
    return vlm_body(model) is not None


def uses_mrope(model: nn.Module) -> bool:
    """True for models with multimodal rotary positions (Qwen2-VL family: ``get_rope_index``)."""
    body = vlm_body(model)
    return body is not None and callable(getattr(body, "get_rope_index", None))


def vision_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules that turn pixels into language-model embeddings: every child of the body except the language
    model (Qwen2-VL: ``visual`` with its merger; LLaVA: ``vision_tower`` and ``multi_modal_projector``)."""
    body = vlm_body(model)
    if body is None:
        return []
    lm = body.get_decoder() if callable(getattr(body, "get_decoder", None)) else None
    return [(n, m) for n, m in body.named_children() if m is not lm and any(True for _ in m.parameters())]


def set_vision_trainable(model: nn.Module, trainable: bool) -> nn.Module:
    """Freeze (default for training) or unfreeze the vision modules (:func:`vision_modules`); returns the model.

    With the tower frozen, :func:`encode_media` runs it without autograd (no activations kept)."""
    for _, m in vision_modules(model):
        for p in m.parameters():
            p.requires_grad_(trainable)
    return model


def _vision_needs_grad(model: nn.Module) -> bool:
    return torch.is_grad_enabled() and any(
        p.requires_grad for _, m in vision_modules(model) for p in m.parameters()
    )


def encode_media(model: nn.Module, items: Sequence[MediaItem], modality: str) -> list[Tensor]:
    """One vision-encoder call over ``items`` (all of one modality): per-item features ``[n_tokens_i, D]`` in
    the language model's input space, in the order of ``items``. Without autograd when the vision modules are
    frozen."""
    body = vlm_body(model)
    if body is None:
        raise ValueError(
            f"{type(_unwrap(model)).__name__} is a text-only model: it cannot encode {modality}s"
        )
    if not items:
        return []
    device = next(body.parameters()).device
    kw = {k: v.to(device) for k, v in _cat_inputs(items).items()}
    fn = body.get_image_features if modality == "image" else getattr(body, "get_video_features", None)
    if fn is None:
        raise ValueError(f"{type(body).__name__} takes no video")
    ctx = contextlib.nullcontext() if _vision_needs_grad(model) else torch.no_grad()
    with ctx:
        out = fn(**kw, return_dict=True)
    feats = out.pooler_output if hasattr(out, "pooler_output") else out
    feats = list(feats) if not isinstance(feats, Tensor) else list(feats.unbind(0))
    feats = [f.reshape(-1, f.shape[-1]) for f in feats]
    if len(feats) != len(items):
        raise ValueError(
            f"the vision encoder returned {len(feats)} feature blocks for {len(items)} {modality}s"
        )
    return feats


def mrope_positions(model: nn.Module, vision: VisionInputs, num_completion_tokens: int) -> Tensor:
    """``[3, P + L]`` int64 t / h / w rotary positions of a prompt followed by ``L`` text tokens, by the model's
    own ``get_rope_index`` (so equal bit for bit to what it computes for the unpacked sequence). The positions
    of a completion of length ``l <= L`` are the first ``P + l`` columns."""
    body = vlm_body(model)
    if body is None or not callable(getattr(body, "get_rope_index", None)):
        raise ValueError(
            f"{type(_unwrap(model)).__name__} has no multimodal rotary positions (get_rope_index)"
        )
    types = torch.cat([vision.mm_token_type_ids, torch.zeros(num_completion_tokens, dtype=torch.long)])
    kw: dict[str, Any] = {}
    if vision.images:
        kw["image_grid_thw"] = torch.stack([it.grid_thw for it in vision.images])
    if vision.videos:
        kw["video_grid_thw"] = torch.stack([it.grid_thw for it in vision.videos])
        if vision.videos[0].seconds_per_grid is not None:
            kw["second_per_grid_ts"] = torch.tensor([it.seconds_per_grid for it in vision.videos])
    # get_rope_index reads the token types and the grids; the ids only give the length
    pos, _ = body.get_rope_index(types[None], mm_token_type_ids=types[None], **kw)
    return pos[:, 0]
