"""A plain re-implementation of how the official Qwen3-VL-Embedding code computes vectors and
scores, used as the oracle that qvlsearch is checked against.

It follows the official algorithm step by step: the whole list of conversations goes
through qwen-vl-utils' `process_vision_info` and one processor call (right padding,
tokenizer truncation) and one forward pass for the embedder; the reranker runs one
(query, document) pair per forward pass, truncating ordinary tokens and keeping special
tokens and the 5 closing tokens. It shares no code with qvlsearch's model layer (only the
`tiny` checkpoints), so agreement means qvlsearch computes what the official models do.
The one deliberate fix: under transformers 5 the official reranker crashes because
`mm_token_type_ids` is not padded with `input_ids`; here it is recomputed after padding.
"""

from __future__ import annotations

import unicodedata

import numpy as np
import torch
from PIL import Image
from qwen_vl_utils import process_vision_info, vision_process
from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

# The official reader (decord), set in qwen-vl-utils only: the environment variable would choose qvlsearch's too.
vision_process.FORCE_QWENVL_VIDEO_READER = "decord"

MIN_PIXELS, MAX_PIXELS, TOTAL_PIXELS, FPS, MAX_FRAMES = 4096, 1843200, 7864320, 1.0, 64
JUDGE = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided. "
    'Note that the answer can only be "yes" or "no".'
)


def _content(item: dict, fps: float | None = None, max_frames: int | None = None) -> list[dict]:
    text, image, video = item.get("text"), item.get("image"), item.get("video")
    texts = [] if text is None else [text] if isinstance(text, str) else list(text)
    images = [] if image is None else list(image) if isinstance(image, list) else [image]
    if video is None:
        videos = []
    elif isinstance(video, str) or (
        isinstance(video, list)
        and isinstance(video[0], (Image.Image, str))
        and (isinstance(video[0], Image.Image) or video[0].endswith((".jpg", ".png")))
    ):
        videos = [video]
    else:
        videos = list(video)
    if not (texts or images or videos):
        return [{"type": "text", "text": "NULL"}]
    content = []
    for v in videos:
        if isinstance(v, list):
            frames = v if len(v) <= MAX_FRAMES else [v[i] for i in np.linspace(0, len(v) - 1, MAX_FRAMES, dtype=int)]
            content.append(
                {
                    "type": "video",
                    "video": [f if isinstance(f, Image.Image) else "file://" + f for f in frames],
                    "total_pixels": TOTAL_PIXELS,
                }
            )
        else:
            content.append(
                {
                    "type": "video",
                    "video": v,
                    "fps": item.get("fps") or fps or FPS,
                    "max_frames": item.get("max_frames") or max_frames or MAX_FRAMES,
                }
            )
    for im in images:
        src = im if isinstance(im, Image.Image) or im.startswith("http") else "file://" + im
        content.append({"type": "image", "image": src, "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS})
    content += [{"type": "text", "text": t} for t in texts]
    return content


def _vision(conversations: list) -> tuple:
    images, videos, kwargs = process_vision_info(
        conversations, image_patch_size=16, return_video_metadata=True, return_video_kwargs=True
    )
    metadata = None
    if videos is not None:
        videos, metadata = (list(x) for x in zip(*videos, strict=True))
    return images, videos, metadata, kwargs


class ReferenceEmbedder:
    def __init__(self, path: str, max_length: int = 8192, device: str = "cpu", dtype: torch.dtype = torch.float32):
        lm = Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=dtype)
        self.model = lm.model.to(device).eval()
        self.processor = AutoProcessor.from_pretrained(path, padding_side="right")
        self.max_length = max_length

    @torch.no_grad()
    def process(self, items: list[dict]) -> np.ndarray:
        conversations = []
        for item in items:
            instruction = (item.get("instruction") or "").strip()
            if instruction and not unicodedata.category(instruction[-1]).startswith("P"):
                instruction += "."
            conversations.append(
                [
                    {
                        "role": "system",
                        "content": [{"type": "text", "text": instruction or "Represent the user's input."}],
                    },
                    {"role": "user", "content": _content(item)},
                ]
            )
        text = self.processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=False)
        images, videos, metadata, kwargs = _vision(conversations)
        inputs = self.processor(
            text=text,
            images=images,
            videos=videos,
            video_metadata=metadata,
            truncation=True,
            max_length=self.max_length,
            padding=True,
            do_resize=False,
            return_tensors="pt",
            **kwargs,
        )
        inputs = inputs.to(self.model.device)
        hidden = self.model(**inputs).last_hidden_state
        mask = inputs["attention_mask"]
        last = mask.shape[1] - mask.flip(dims=[1]).argmax(dim=1) - 1
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return torch.nn.functional.normalize(pooled.float(), p=2, dim=-1).cpu().numpy()


class ReferenceReranker:
    def __init__(self, path: str, max_length: int = 10240, device: str = "cpu", dtype: torch.dtype = torch.float32):
        lm = Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device).eval()
        self.model = lm.model
        self.processor = AutoProcessor.from_pretrained(path, padding_side="left")
        vocab = self.processor.tokenizer.get_vocab()
        self.yes_minus_no = lm.lm_head.weight[vocab["yes"]] - lm.lm_head.weight[vocab["no"]]
        self.max_length = max_length

    def _truncate(self, ids: list[int]) -> list[int]:
        body, tail = ids[:-5], ids[-5:]
        if len(body) <= self.max_length:
            return body + tail
        special = set(self.processor.tokenizer.all_special_ids)
        keep = self.max_length - sum(1 for t in body if t in special)
        out = []
        for t in body:
            if t in special:
                out.append(t)
            elif keep > 0:
                out.append(t)
                keep -= 1
        return out + tail

    @torch.no_grad()
    def process(self, inputs: dict) -> list[float]:
        query, instruction = (
            inputs["query"],
            inputs.get("instruction") or ("Given a search query, retrieve relevant candidates that answer the query."),
        )
        fps, max_frames = inputs.get("fps"), inputs.get("max_frames")
        scores = []
        for doc in inputs["documents"]:
            content = [{"type": "text", "text": "<Instruct>: " + instruction}, {"type": "text", "text": "<Query>:"}]
            content += _content(query, fps, max_frames) + [{"type": "text", "text": "\n<Document>:"}]
            content += _content(doc, fps, max_frames)
            pair = [
                {"role": "system", "content": [{"type": "text", "text": JUDGE}]},
                {"role": "user", "content": content},
            ]
            text = self.processor.apply_chat_template([pair], add_generation_prompt=True, tokenize=False)
            images, videos, metadata, kwargs = _vision([pair])
            enc = self.processor(
                text=text,
                images=images,
                videos=videos,
                video_metadata=metadata,
                truncation=False,
                padding=False,
                do_resize=False,
                return_tensors="pt",
                **kwargs,
            )
            ids = torch.tensor([self._truncate(enc["input_ids"][0].tolist())])
            types = torch.zeros_like(ids, dtype=torch.int)
            types[ids == self.processor.image_token_id] = 1
            types[ids == self.processor.video_token_id] = 2
            device = self.model.device
            skip = ("input_ids", "attention_mask", "mm_token_type_ids")
            model_inputs = {k: v.to(device) for k, v in enc.items() if k not in skip}
            ids, types = ids.to(device), types.to(device)
            hidden = self.model(
                input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=types, **model_inputs
            ).last_hidden_state[:, -1]
            scores.append(torch.sigmoid(hidden @ self.yes_minus_no).item())
        return scores
