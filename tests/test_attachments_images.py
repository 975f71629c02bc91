"""Images attached to a message: which are downloaded (only for a model that takes
images), the caps, the notes, and what the engine gives the model and keeps in memory
(a placeholder, never the bytes)."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator

from PIL import Image

from bot.attachments import Fetch, FileRef, ImageLimits, prompt_text, read_files
from bot.engine import Engine
from bot.inference.backend import Backend, Prompt
from bot.inference.local import LocalBackend
from bot.messages import ConversationKey, FileText, Message, Turn
from bot.store.memory import InProcessMemory
from tests.scripted import ScriptedModel
from tests.test_images import picture, png_declaring

LIMITS = ImageLimits(max_bytes=50_000, max_count=2, max_side=64)
CONV = ConversationKey("discord", "7")


def ref(name: str, content_type: str, size: int = 100) -> FileRef:
    return FileRef(name, size, content_type, f"https://cdn.example/{name}")


def fetcher(bodies: dict[str, bytes], fetched: list[str]) -> Fetch:
    async def fetch(file: FileRef, limit: int) -> bytes:
        fetched.append(file.name)
        return bodies[file.name][: limit + 1]

    return fetch


async def test_a_text_only_model_gets_the_note_and_no_download() -> None:
    fetched: list[str] = []
    bodies = {"a.txt": b"alpha", "shot.png": picture("PNG")}
    refs = [ref("a.txt", "text/plain", 5), ref("shot.png", "image/png")]
    read = await read_files(
        refs, fetcher(bodies, fetched), max_bytes=100, seconds_each=5, where="x"
    )
    assert fetched == ["a.txt"]
    assert read.images == () and read.image_names == ("shot.png",)
    assert read.notes == ("(I read text files only, so I skipped “shot.png”.)",)


async def test_images_are_read_within_their_caps_and_bad_ones_get_notes() -> None:
    fetched: list[str] = []
    whole = picture("PNG", size=(300, 100))
    bodies = {
        "notes.txt": b"see the picture",
        "shot.png": whole,
        "photo.jpg": picture("JPEG", size=(20, 20)),
        "bomb.png": png_declaring(50_000, 50_000),
        "cut.png": whole[: len(whole) // 2],
        "fake.png": b"this is text pretending to be a picture",
        "lying.webp": b"x" * 60_000,  # declared small, is not
    }
    refs = [
        ref("notes.txt", "text/plain", 15),
        ref("shot.png", "image/png", len(whole)),
        ref("photo.jpg", "", 300),  # typed by its name only
        ref("huge.png", "image/png", 10_000_000),  # declared over the cap: not downloaded
        ref("old.bmp", "image/bmp"),  # an image of a kind not read
        ref("doc.pdf", "application/pdf"),
    ]
    read = await read_files(
        refs, fetcher(bodies, fetched), max_bytes=100, seconds_each=5, where="x", images=LIMITS
    )
    assert sorted(fetched) == ["notes.txt", "photo.jpg", "shot.png"]
    assert read.files == (FileText("notes.txt", "see the picture"),)
    assert [(i.name, i.width, i.height) for i in read.images] == [
        ("shot.png", 64, 21),  # scaled down to the bound
        ("photo.jpg", 20, 20),
    ]
    assert read.image_names == ("shot.png", "photo.jpg", "huge.png", "old.bmp")
    assert read.notes == (
        "(I read text files and images only, so I skipped “doc.pdf”.)",
        "(I look at png, jpeg, webp and gif images only, so I skipped “old.bmp”.)",
        "(I skipped “huge.png”: I look at images of up to 50,000 bytes.)",
    )

    # More than IMAGE_MAX_COUNT, a bomb, a truncated file, a disguised one, a liar.
    fetched.clear()
    refs = [
        ref("bomb.png", "image/png"),
        ref("cut.png", "image/png"),
        ref("fake.png", "image/png"),
        ref("lying.webp", "image/webp"),
    ]
    read = await read_files(
        refs,
        fetcher(bodies, fetched),
        max_bytes=100,
        seconds_each=5,
        where="x",
        images=ImageLimits(50_000, 3, 64),
    )
    assert sorted(fetched) == ["bomb.png", "cut.png", "fake.png"]
    assert read.images == ()
    assert read.notes == (
        "(I look at up to 3 images a message, so I skipped “lying.webp”.)",
        "(I skipped “bomb.png”: too many pixels for me to look at.)",
        "(I couldn't read “cut.png”, “fake.png” as an image, so I answered without them.)",
    )
    fetched.clear()
    read = await read_files(
        [ref("lying.webp", "image/webp")],
        fetcher(bodies, fetched),
        max_bytes=100,
        seconds_each=5,
        where="x",
        images=LIMITS,
    )
    assert read.notes == ("(I skipped “lying.webp”: I look at images of up to 50,000 bytes.)",)


async def test_a_failed_image_download_gets_the_download_note() -> None:
    async def fetch(file: FileRef, limit: int) -> bytes:
        raise ConnectionError("reset")

    read = await read_files(
        [ref("shot.png", "image/png")], fetch, max_bytes=100, seconds_each=5, where="x",
        images=LIMITS,
    )  # fmt: skip
    assert read.notes == ("(I couldn't download “shot.png”, so I answered without it.)",)
    assert read.image_names == ("shot.png",)


def test_placeholders_come_first_in_the_prompt_text() -> None:
    text = prompt_text("what is this error?", [FileText("a.log", "x")], ["shot.png", "b.png"])
    assert text == (
        "[image: shot.png] [image: b.png]\n\nwhat is this error?"
        "\n\nAttached file a.log:\n```\nx\n```"
    )


class SeeingBackend(Backend):
    """A backend whose model takes images: records each prompt, answers one line."""

    def __init__(self) -> None:
        self.prompts: list[Prompt] = []
        self.histories: list[list[Turn]] = []

    @property
    def takes_images(self) -> bool:
        return True

    async def prepare(
        self,
        history: list[Turn],
        user_text: str,
        system_prompt: str | None = None,
        speaker: str | None = None,
    ) -> Prompt:
        self.histories.append(list(history))
        return Prompt([], user_text, len(history), False, len(user_text))

    async def stream(self, prompt: Prompt) -> AsyncIterator[str]:
        self.prompts.append(prompt)
        yield f"I see {len(prompt.images)} image(s)."

    async def close(self) -> None:
        pass


def shot() -> Message:
    from bot.images import decode_image

    image = decode_image("shot.png", picture("PNG"))
    return Message(
        CONV, "u1", "Ann", "what is this?", message_id="m1", images=(image,),
        image_names=("shot.png",),
    )  # fmt: skip


async def test_the_current_images_reach_the_model_and_memory_keeps_a_placeholder() -> None:
    backend = SeeingBackend()
    engine = Engine(backend, InProcessMemory(20, 600))
    assert engine.takes_images
    reply = await engine.reply(shot())
    assert reply.text == "I see 1 image(s)."
    assert [i.name for i in backend.prompts[0].images] == ["shot.png"]
    assert backend.prompts[0].user_text == "[image: shot.png]\n\nwhat is this?"
    stored = await engine.memory.history(CONV)
    assert stored[0].content == "[image: shot.png]\n\nwhat is this?"
    assert "base64" not in repr(stored) and "PNG" not in repr(stored)
    # The next message: the history has the placeholder, the model no image.
    follow = Message(CONV, "u1", "Ann", "and now?", message_id="m2")
    assert (await engine.reply(follow)).text == "I see 0 image(s)."
    assert backend.histories[1][0].content == "[image: shot.png]\n\nwhat is this?"
    # An image alone is a message to answer.
    alone = Message(
        CONV, "u1", "Ann", "", message_id="m3", images=shot().images, image_names=("shot.png",)
    )
    assert (await engine.reply(alone)).text == "I see 1 image(s)."
    assert (await engine.memory.history(CONV))[-2].content == "[image: shot.png]"
    await engine.close()


async def test_a_text_only_model_keeps_the_note_and_the_placeholder() -> None:
    model = ScriptedModel("A text answer.")
    engine = Engine(LocalBackend(model), InProcessMemory(20, 600))
    assert not engine.takes_images
    note = "(I read text files only, so I skipped “shot.png”.)"
    message = Message(
        CONV, "u1", "Ann", "what is this?", message_id="m1", notes=(note,),
        image_names=("shot.png",),
    )  # fmt: skip
    reply = await engine.reply(message)
    assert reply.text == note + "\n\nA text answer."
    assert model.inputs == ["[image: shot.png]\n\nwhat is this?"]
    assert (await engine.memory.history(CONV))[0].content == "[image: shot.png]\n\nwhat is this?"
    # A text-only backend given images (the adapters download none for it) ignores them.
    assert (await engine.reply(shot())).text == "A text answer."
    # Only an image: the note is the answer, as before; nothing stored.
    only = Message(CONV, "u1", "Ann", "", notes=(note,), image_names=("shot.png",))
    assert (await engine.reply(only)).text == note
    assert len(model.inputs) == 2
    await engine.close()


def test_decoded_images_are_rgb_pngs() -> None:
    from bot.images import decode_image

    image = decode_image("x.gif", picture("GIF"))
    assert Image.open(io.BytesIO(image.data)).format == "PNG"
