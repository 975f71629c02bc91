"""Local vision models (image-text-to-text: SmolVLM/Idefics3, Qwen2-VL, LLaVA…):
prompts through the processor's chat template, replies through `generate`.

The new message's images go as `{"type": "image"}` parts of the last user message;
history turns stay text, with their `[image: name]` placeholders. The prompt is fitted
by prompt.py's own `build_prompt`, on the processor seen as a tokenizer
(`ProcessorTokenizer`): the template is rendered around stand-ins as for text models,
every content is tokenized as plain text, and only the template's own image slot is
expanded by the processor into the image tokens it stands for. So the image tokens
count against the budget as the model will read them, and a user who types `<image>`
or `<|im_start|>` gets those characters, never an image slot or a turn.

These models run on the batched-`generate` path, one reply per call, not in the step
scheduler: the scheduler's slots hold text tokens only. Everything here blocks: run it
on the backend's worker threads.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from transformers import StoppingCriteriaList

from bot import metrics
from bot.inference.backend import Note, Prompt
from bot.inference.generation import (
    GenerationOptions,
    _BatchStreamer,
    _StopWhenSet,
    budget,
    eos_ids,
)
from bot.inference.loader import LoadedModel
from bot.inference.prompt import PromptFormat, build_prompt, renders_names
from bot.messages import Turn
from bot.settings import ConfigError, Settings

log = logging.getLogger(__name__)

IMAGE_PART = {"type": "image"}
# Outputs of the processor that are per token of its text: laid out again over the
# whole prompt (zero outside the image's part), like Qwen2-VL's mm_token_type_ids.
PER_TOKEN = ("mm_token_type_ids", "token_type_ids")
# Outputs that are the text's own (rebuilt for the whole prompt) or bookkeeping.
TEXT_OUTPUTS = ("input_ids", "attention_mask", "text_replacement_offsets")


def images_left_out(kept: int, sent: int) -> str:
    if kept == 0:
        return (
            "(Your images were too big for the room I have, so I answered from your text only.)\n\n"
        )
    return (
        f"(Only the first {kept} of your {sent} images fitted in the room I have, "
        "so I looked at those.)\n\n"
    )


def cut_for_images(read: int, whole: int) -> str:
    return (
        f"(With your images, your message was too long for me: I read only its first "
        f"{read:,} of {whole:,} characters.)\n\n"
    )


class ProcessorTokenizer:
    """A vision model's processor as the tokenizer prompt.py builds prompts with, for
    one prompt's `images` (none: a text-only prompt on the vision model).

    Messages get their contents as parts (the processors' templates iterate them), the
    images as image parts before the text of the last user message. Template text goes
    through the tokenizer as it is, except the piece holding the image slots, which the
    processor expands (and whose processed images it keeps: `model_inputs`).
    Contents never reach the processor: prompt.py tokenizes them as plain text.
    """

    def __init__(self, processor: Any, images: Sequence[Image.Image] = ()) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.images = list(images)
        self.image_token: str = processor.image_token
        self.chat_template = (
            getattr(processor, "chat_template", None) or self.tokenizer.chat_template
        )
        # prompt.encode_text spells out any added token that plain tokenizing still made.
        self.added_tokens_decoder = self.tokenizer.added_tokens_decoder
        self._expanded: dict[str, Any] = {}  # template text with the image slots: processed

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any:
        if "chat_template" not in kwargs:
            kwargs["chat_template"] = self.chat_template
        return self.processor.apply_chat_template(self.parts(conversation), **kwargs)

    def parts(self, conversation: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """The messages with their contents as parts; the images in the last user one."""
        last_user = max((i for i, m in enumerate(conversation) if m["role"] == "user"), default=-1)
        out = []
        for i, message in enumerate(conversation):
            content: list[dict[str, Any]] = [{"type": "text", "text": message["content"]}]
            if i == last_user:
                content = [dict(IMAGE_PART) for _ in self.images] + content
            out.append({**message, "content": content})
        return out

    def encode(self, text: str, **kwargs: Any) -> list[int]:
        # Contents come with split_special_tokens (prompt.encode_text): plain text always.
        if kwargs.get("split_special_tokens") or self.image_token not in text:
            return list(self.tokenizer.encode(text, **kwargs))
        return list(self._expand(text)["input_ids"][0].tolist())

    def decode(self, token_ids: Sequence[int], **kwargs: Any) -> str:
        return str(self.tokenizer.decode(token_ids, **kwargs))

    def _expand(self, text: str) -> Any:
        """Template text holding the image slots, through the processor with the images
        (once per distinct text: fitting renders the same piece many times)."""
        known = self._expanded.get(text)
        if known is not None:
            return known
        slots = text.count(self.image_token)
        if slots != len(self.images):
            # Only the template's image parts make slots (contents are plain text), and
            # they are all in the last user message: a template that splits them is not
            # one this code knows.
            raise ValueError(
                f"the chat template put {slots} of {len(self.images)} image slots together"
            )
        processed = self.processor(
            text=[text], images=self.images or None, add_special_tokens=False, return_tensors="pt"
        )
        self._expanded[text] = processed
        return processed

    def model_inputs(self, ids: list[int]) -> dict[str, torch.Tensor]:
        """`generate`'s inputs for the prompt `ids` (built by prompt.py through this
        object): the ids, and the processed images of the image slots in them."""
        inputs = text_inputs(ids)
        for processed in self._expanded.values():
            piece = processed["input_ids"][0].tolist()
            start = _find(ids, piece)
            if start < 0:
                continue  # a probe's piece that the prompt did not keep
            for key, value in processed.items():
                if key in PER_TOKEN:
                    whole = torch.zeros(1, len(ids), dtype=value.dtype)
                    whole[:, start : start + len(piece)] = value
                    inputs[key] = whole
                elif key not in TEXT_OUTPUTS:
                    inputs[key] = value
            break
        return inputs


def text_inputs(ids: list[int]) -> dict[str, torch.Tensor]:
    """`generate`'s inputs for a prompt of text only."""
    return {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
    }


def _find(haystack: list[int], needle: list[int]) -> int:
    """Where `needle` starts in `haystack`, or -1."""
    if not needle:
        return -1
    first = needle[0]
    for i in range(len(haystack) - len(needle) + 1):
        if haystack[i] == first and haystack[i : i + len(needle)] == needle:
            return i
    return -1


def unpack(
    fmt: PromptFormat, messages: Sequence[dict[str, str]]
) -> tuple[PromptFormat, list[Turn], str, str | None]:
    """The format, history, message and speaker that `fmt.messages` made `messages`
    from (a prepared prompt's messages, fitted again once its images are known)."""
    system = ""
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    *earlier, last = messages
    # Names either sit in the template's `name` fields, or are already in the text.
    named = any("name" in m for m in messages)
    turns = [
        Turn(
            "user" if m["role"] == "user" else "assistant",
            m["content"],
            author_name=m.get("name", ""),
        )
        for m in earlier
    ]
    speaker = last.get("name", "") if named else None
    return dataclasses.replace(fmt, system_prompt=system), turns, last["content"], speaker


class VisionGenerator:
    """A loaded image-text-to-text model: prompt fitting and `generate`, one reply per
    call, with the images of the message being answered."""

    takes_images = True

    def __init__(
        self,
        loaded: LoadedModel,
        options: GenerationOptions,
        system_prompt: str,
        context_tokens: int | None = None,
    ) -> None:
        if loaded.processor is None:
            raise ValueError(f"{loaded.name} has no processor: it takes no images")
        self.loaded = loaded
        self.processor = loaded.processor
        plain = ProcessorTokenizer(self.processor)
        if not plain.chat_template:
            raise ConfigError(f"MODEL={loaded.name} has no chat template")
        probe = ProcessorTokenizer(self.processor, [Image.new("RGB", (8, 8))])
        rendered = probe.apply_chat_template(
            [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
        )
        if probe.image_token not in str(rendered):
            raise ConfigError(
                f"The chat template of MODEL={loaded.name} shows no image slot "
                f"({probe.image_token}) for an image part"
            )
        self.format = PromptFormat(
            loaded.is_encoder_decoder,
            system_prompt,
            renders_names(plain, loaded.is_encoder_decoder),
        )
        # The same budget as the text models'.
        _, self.prompt_budget, max_new = budget(loaded, options, context_tokens)
        self.options = dataclasses.replace(options, max_new_tokens=max_new)
        # Fast tokenizers are not safe to call from several threads at once: fitting
        # (prepare thread, generate thread) shares this one, decoding has its own copy.
        self._tokenizer_lock = threading.Lock()
        self._decoder = copy.deepcopy(loaded.tokenizer)
        self._eos = eos_ids(loaded)

    @classmethod
    def from_settings(cls, loaded: LoadedModel, settings: Settings) -> VisionGenerator:
        return cls(
            loaded,
            GenerationOptions.from_settings(settings),
            settings.system_prompt,
            settings.context_tokens,
        )

    def prepare(
        self,
        history: Sequence[Turn],
        user_text: str,
        system_prompt: str | None = None,
        speaker: str | None = None,
    ) -> Prompt:
        """The prompt without images (they come with the prompt, at `generate`): the
        text fitted as for a text model, and the chat messages kept, for fitting again
        with the images."""
        fmt = self.format
        if system_prompt is not None:
            fmt = dataclasses.replace(fmt, system_prompt=system_prompt)
        with self._tokenizer_lock:
            prompt = build_prompt(
                ProcessorTokenizer(self.processor),
                fmt,
                history,
                user_text,
                self.prompt_budget,
                speaker=speaker,
            )
        kept = history[len(history) - prompt.kept_turns :]
        messages = fmt.messages(kept, prompt.user_text, speaker)
        return dataclasses.replace(prompt, messages=tuple(messages))

    def count_tokens(self, text: str) -> int:
        """How many tokens `text` is to this model (for usage limits)."""
        with self._tokenizer_lock:
            return len(self.loaded.tokenizer(text, add_special_tokens=False)["input_ids"])

    def fit(self, prompt: Prompt) -> tuple[list[int], dict[str, torch.Tensor], list[str]]:
        """The prompt's ids with its images, `generate`'s inputs, and notes for the
        person: the history is trimmed for the images' tokens as for text; when the
        message with them is still too long its text is cut; images that do not fit
        even so are left out, the last first."""
        if not prompt.images or not prompt.messages:
            return prompt.input_ids, text_inputs(prompt.input_ids), []
        fmt, history, text, speaker = unpack(self.format, prompt.messages)
        pictures = [image.pil() for image in prompt.images]
        with self._tokenizer_lock:
            for kept in range(len(pictures), 0, -1):
                view = ProcessorTokenizer(self.processor, pictures[:kept])
                fitted = build_prompt(view, fmt, history, text, self.prompt_budget, speaker=speaker)
                if len(fitted.input_ids) <= self.prompt_budget:
                    break
            else:  # not even one image fits: the text alone, as prepared
                note = images_left_out(0, len(pictures))
                return prompt.input_ids, text_inputs(prompt.input_ids), [note]
            inputs = view.model_inputs(fitted.input_ids)
        notes = []
        if kept < len(pictures):
            notes.append(images_left_out(kept, len(pictures)))
        if fitted.user_text != text:
            notes.append(cut_for_images(len(fitted.user_text), prompt.original_chars))
        if fitted.kept_turns < len(history):
            log.info(
                "Room for %d image(s): %d of %d history turns kept",
                kept,
                fitted.kept_turns,
                len(history),
            )
        return fitted.input_ids, inputs, notes

    def generate(
        self,
        prompt: Prompt,
        on_text: Callable[[str], None] = lambda _text: None,
        stop: threading.Event | None = None,
        on_note: Callable[[str], None] = lambda _note: None,
    ) -> str:
        """Generate a reply to `prompt` and its images, passing text to `on_text` as it
        is decoded (notes about the images to `on_note`, before it); `stop` ends it."""
        stop = stop or threading.Event()
        if stop.is_set():  # the reader went away while it waited
            return ""
        _, inputs, notes = self.fit(prompt)
        for note in notes:
            on_note(Note(note))
        options = self.options
        if prompt.temperature is not None:
            options = dataclasses.replace(options, temperature=prompt.temperature)
        model = self.loaded.model
        device = self.loaded.device
        # Images in the model's dtype (bf16 on a GPU); ids and masks stay integers.
        moved = {
            key: value.to(device, dtype=model.dtype)
            if value.is_floating_point()
            else value.to(device)
            for key, value in inputs.items()
        }
        streamer = _BatchStreamer(self._decoder, [on_text], self._eos)
        with torch.inference_mode():
            model.generate(
                **moved,
                pad_token_id=self.loaded.tokenizer.pad_token_id,
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([_StopWhenSet([stop])]),
                **options.generate_kwargs(),
            )
        metrics.TOKENS.inc(streamer.token_count())
        return streamer.text(0)

    def generate_batch(
        self,
        prompts: Sequence[Prompt],
        sinks: Sequence[Callable[[str], None]],
        stops: Sequence[threading.Event],
    ) -> list[str]:
        """The batch runner's interface: one reply after the other (notes as text)."""
        return [
            self.generate(prompt, sink, stop, sink)
            for prompt, sink, stop in zip(prompts, sinks, stops, strict=True)
        ]
