"""The web demo: one chat that draws, edits and describes pictures, over `UniPicPipeline`.

    unipic-jax demo --checkpoint checkpoints/unipic [--host 127.0.0.1 --port 7860]

Each turn is a message (text, and optionally an attached image) sent in the mode picked under the
chat: "Generate a picture" runs `pipe.generate(text)`, "Edit the last picture" runs
`pipe.edit(last, text)` and "Ask about the last picture" runs `pipe.caption(last, text)`. The last
picture is the newest one generated, edited or attached in this browser session (Gradio session
state); an attached image becomes the last picture before the mode applies. Every picture is saved
as a PNG carrying its prompt, seed and settings (`images.save_image`) and offered for download.

Users are queued: every model call takes the one slot of the "model" queue, so calls never
interleave. The model is loaded once per dtype, on first use (the default dtype at start). While a
turn waits, its message in the chat says whether the model loads or the sampler compiles first
(the first call with given settings), and Gradio's progress bar follows the pipeline's tqdm bar
over the MAR steps. Errors (an unreadable image, a prompt too long for the context, a size that is
not a multiple of 16) are answered in the chat; the page never dies.
"""

from __future__ import annotations

import atexit
import dataclasses
import inspect
import logging
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Optional

import gradio as gr

from unipic_jax import api, images, prompts
from unipic_jax.api import UniPicPipeline

GENERATE, EDIT, ASK = "Generate a picture", "Edit the last picture", "Ask about the last picture"
MODES = (GENERATE, EDIT, ASK)
DTYPES = ("float32", "bfloat16")
SAMPLERS = ("faithful", "fast")
ANSWER_TOKENS = 256  # default answer length in the demo (the API's default, 1024, is slow on a CPU)
log = logging.getLogger(__name__)
# System fonts (the default theme fetches web fonts, which an offline host cannot), and pictures in
# the chat 320 px wide (the tiny test model draws 64 px ones; the full-screen button shows them whole).
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
CSS = ("#chat .image-frame img { width: 320px; height: 320px; max-width: 100%; max-height: none; "
       "object-fit: contain; }")


def has_fast_mode() -> bool:
    """Whether the pipeline has the fast/faithful switch (`fast=` on both `generate` and `edit`)."""
    return all("fast" in inspect.signature(f).parameters for f in (UniPicPipeline.generate, UniPicPipeline.edit))


class Models:
    """The pipelines of one checkpoint: loaded on first use, one per dtype, kept in memory; and the
    settings whose programs this process has already compiled."""

    def __init__(self, checkpoint: str):
        self.checkpoint = checkpoint
        self._pipes: dict[str, UniPicPipeline] = {}
        self._lock = threading.Lock()
        self.compiled: set[tuple] = set()

    def loaded(self, dtype: str) -> bool:
        return dtype in self._pipes

    def get(self, dtype: str) -> UniPicPipeline:
        with self._lock:
            if dtype not in self._pipes:
                self._pipes[dtype] = UniPicPipeline.from_pretrained(self.checkpoint, dtype=dtype)
            return self._pipes[dtype]

    @property
    def config(self):
        """The model config (the same for every dtype)."""
        return next(iter(self._pipes.values())).config if self._pipes else api.peek_config(self.checkpoint)


@dataclasses.dataclass
class Settings:
    """The controls beside the chat, as one turn reads them."""

    mode: str
    size: int
    steps: int
    cfg: float
    seed: Optional[int]
    dtype: str
    answer_tokens: int
    sampler: str = "faithful"

    def __post_init__(self):
        # Gradio's sliders and number boxes may hand over floats such as 2.0; the pipeline wants ints.
        for name in ("size", "steps", "seed", "answer_tokens"):
            value = getattr(self, name)
            if isinstance(value, float) and value.is_integer():
                setattr(self, name, int(value))
        if self.seed is None or (isinstance(self.seed, int) and self.seed < 0):
            self.seed = None  # a fresh seed, reported with the picture

    def compile_key(self) -> tuple:
        """What the compiled programs depend on (besides the prompt's length bucket)."""
        if self.mode == ASK:
            return self.dtype, ASK, self.size, self.answer_tokens
        return self.dtype, self.mode, self.size, self.steps, self.cfg != 1.0, self.sampler

    def sampling(self, method) -> dict:
        """Keyword arguments of `generate`/`edit`."""
        extra = {"fast": self.sampler == "fast"} if "fast" in inspect.signature(method).parameters else {}
        return dict(size=self.size, steps=self.steps, cfg=self.cfg, seed=self.seed, **extra)


def _one_line(error: BaseException, upload: Optional[str] = None) -> str:
    """An exception's message on one line, an uploaded file named by its own name, not its temp path."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text.replace(upload, Path(upload).name) if upload else text


def _assistant(content) -> dict:
    return {"role": "assistant", "content": content}


def _error(text: str) -> dict:
    return _assistant(f"Error: {text}")


class Demo:
    """The chat's event handlers over `models`; pictures are written under `folder`."""

    def __init__(self, models: Models, folder: Path):
        self.models = models
        self.folder = folder

    @staticmethod
    def new_session() -> dict:
        return {"last": None, "files": [], "dir": None}

    def user_turn(self, message: Optional[dict], history: list):
        """Show the user's message at once and pass it to `bot_turn` (the returned request); lock the
        input meanwhile. An attached file that is not a readable image is answered here."""
        message = message or {}
        text = (message.get("text") or "").strip()
        files = message.get("files") or []
        upload = files[0] if files else None
        upload = upload.get("path") if isinstance(upload, dict) else upload
        if not text and upload is None:
            return history, None, gr.MultimodalTextbox(value=None, interactive=True)
        content = [text] if text else []
        if upload is not None:
            try:
                images.load_image(upload)
            except ValueError as e:
                content.append(f"(attached {Path(upload).name})")
                history = history + [{"role": "user", "content": content},
                                     _error(f"That file cannot be used: {_one_line(e, upload)}")]
                return history, None, gr.MultimodalTextbox(value=None, interactive=True)
            content.append({"path": upload})
        history = history + [{"role": "user", "content": content}, _assistant("Waiting for the model…")]
        return history, {"text": text, "upload": upload}, gr.MultimodalTextbox(value=None, interactive=False)

    def waiting_note(self, request: dict, s: Settings) -> str:
        """What the turn is about to do: load the model, compile, or just run."""
        if request["upload"] and not request["text"]:
            return "Reading the picture…"
        notes = []
        if not self.models.loaded(s.dtype):
            notes.append(f"loading the model in {s.dtype} (first use of this dtype)")
        if s.compile_key() not in self.models.compiled:
            what = f"{s.size} px" if s.mode == ASK else f"{s.size} px, {s.steps} steps"
            notes.append(f"compiling for {what} (first run with these settings; later ones start at once)")
        doing = {GENERATE: "drawing", EDIT: "editing the last picture", ASK: "reading the picture"}[s.mode]
        note = ", then ".join(notes + [doing])
        return note[0].upper() + note[1:] + "…"

    def bot_turn(self, request: Optional[dict], history: list, session: dict, mode: str, size, steps, cfg, seed,
                 dtype: str, answer_tokens, sampler: str, progress=gr.Progress(track_tqdm=True)):
        """Answer the pending request: yields the chat with a waiting note, then with the answer.
        Outputs: chat, session, downloads, input box. `progress` (Gradio's) follows the pipeline's
        tqdm bar over the MAR steps."""
        if request is None:  # nothing to do (an empty message, or answered by `user_turn`)
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        s = Settings(mode, size, steps, cfg, seed, dtype, answer_tokens, sampler)
        history = list(history[:-1])  # without the "waiting" message
        yield history + [_assistant(self.waiting_note(request, s))], gr.skip(), gr.skip(), gr.skip()
        session = dict(session or self.new_session())
        try:
            reply = self._answer(request, session, s)
        except ValueError as e:  # the pipeline's one-line refusals: bad settings, prompt too long, ...
            reply = _error(_one_line(e, request["upload"]))
        except Exception as e:  # anything else is a bug, but the conversation goes on
            log.exception("demo turn failed")
            reply = _error(f"Something went wrong: {type(e).__name__}: {_one_line(e)}")
        yield history + [reply], session, session["files"], gr.MultimodalTextbox(value=None, interactive=True)

    def _answer(self, request: dict, session: dict, s: Settings) -> dict:
        """Run the turn and return the assistant's message; updates `session` (last picture, files)."""
        text, upload = request["text"], request["upload"]
        if upload is not None:
            session["last"] = upload
            if not text:
                return _assistant("Got it: this is now the last picture. Ask about it, or edit it.")
        if s.mode in (EDIT, ASK) and session["last"] is None:
            return _error("There is no picture yet: generate one, or attach an image to your message.")
        config = self.models.config
        if s.mode == ASK:
            api.check_caption(config, size=s.size, max_new_tokens=s.answer_tokens)
            answer = self.models.get(s.dtype).caption(session["last"], text or prompts.CAPTION_TEXT, size=s.size,
                                                      max_new_tokens=s.answer_tokens)
            self.models.compiled.add(s.compile_key())
            return _assistant(answer.strip() or "(the model gave an empty answer)")
        api.check_sampling(config, size=s.size, steps=s.steps, cfg=s.cfg)
        pipe = self.models.get(s.dtype)
        if s.mode == GENERATE:
            image = pipe.generate(text, **s.sampling(pipe.generate))[0]
        else:
            image = pipe.edit(session["last"], text, **s.sampling(pipe.edit))
        self.models.compiled.add(s.compile_key())
        path = self._save(image, session)
        session["last"] = str(path)
        info = image.info
        summary = (f"{'Edited' if s.mode == EDIT else 'Generated'}: seed {info['seed']}, {info['size']} px, "
                   f"{info['steps']} steps, guidance {info['cfg']:g}, {info['dtype']}")
        return _assistant([{"path": str(path), "alt_text": info["prompt"]}, summary])

    def _save(self, image, session: dict) -> Path:
        """Write `image` (PNG, settings in its metadata) into the session's folder."""
        if session["dir"] is None:
            session["dir"] = tempfile.mkdtemp(prefix="session-", dir=self.folder)
        name = f"{len(session['files']) + 1:02d}-{image.info['task']}-seed{image.info['seed']}.png"
        path = images.save_image(image, Path(session["dir"]) / name, image.info)
        session["files"] = session["files"] + [str(path)]
        return path


def _forget(session: Optional[dict]) -> None:
    """Remove a closed session's pictures."""
    if session and session.get("dir"):
        shutil.rmtree(session["dir"], ignore_errors=True)


def build_app(models: Models, folder: Path, *, size: int = api.DEFAULT_SIZE, steps: int = api.DEFAULT_STEPS,
              dtype: str = "float32") -> gr.Blocks:
    """The Gradio app (queue set up, not launched). `size`, `steps`, `dtype`: the controls' first values."""
    demo = Demo(models, folder)
    # Gradio's own copies of served and uploaded files: checked hourly, removed after a day.
    with gr.Blocks(title="UniPic-JAX", analytics_enabled=False, delete_cache=(3600, 86400)) as app:
        gr.Markdown(f"## UniPic-JAX\nOne model that draws, edits and describes pictures, in one conversation. "
                    f"Checkpoint: `{models.checkpoint}`.")
        session = gr.State(demo.new_session(), delete_callback=_forget)
        request = gr.State(None)
        with gr.Row():
            with gr.Column(scale=3):
                chat = gr.Chatbot(elem_id="chat", label="Conversation", height="70vh", min_height=360, autoscroll=True,
                                  buttons=["copy", "copy_all"],
                                  placeholder="Type a prompt and press Enter. Attach an image with the paperclip.")
                mode = gr.Radio(list(MODES), value=GENERATE, label="Your message asks to", elem_id="mode")
                box = gr.MultimodalTextbox(elem_id="message", show_label=False, file_count="single",
                                           placeholder="A red fox in the snow, golden hour", sources=["upload"])
            with gr.Column(scale=1):
                with gr.Group():
                    size_box = gr.Number(size, label="Size (px, a multiple of 16)", precision=0, step=16,
                                         minimum=16, elem_id="size")
                    steps_box = gr.Slider(1, 128, value=steps, step=1, label="MAR steps", elem_id="steps")
                    cfg_box = gr.Slider(1.0, 10.0, value=3.0, step=0.5, label="Guidance (1 = none)", elem_id="cfg")
                    seed_box = gr.Number(-1, label="Seed (-1: a new one each time)", precision=0, minimum=-1,
                                         elem_id="seed")
                    if has_fast_mode():
                        sampler = gr.Radio(list(SAMPLERS), value="faithful", label="Sampler", elem_id="sampler",
                                           info="faithful: the released sampler; fast: less work per picture "
                                                "(fewer diffusion steps, cached guidance), approximate")
                    else:
                        sampler = gr.State("faithful")
                    dtype_box = gr.Radio(list(DTYPES), value=dtype, label="Precision", elem_id="dtype",
                                         info="Another dtype loads the model again, once (both stay in memory).")
                    tokens_box = gr.Slider(8, api.DEFAULT_MAX_NEW_TOKENS, value=ANSWER_TOKENS, step=8,
                                           label="Longest answer (tokens)", elem_id="answer-tokens")
                downloads = gr.File(label="Pictures (PNG, prompt and settings inside)", file_count="multiple",
                                    interactive=False, elem_id="downloads")

        settings = [mode, size_box, steps_box, cfg_box, seed_box, dtype_box, tokens_box, sampler]
        box.submit(demo.user_turn, [box, chat], [chat, request, box], concurrency_limit=None,
                   show_progress="hidden").then(
            demo.bot_turn, [request, chat, session, *settings], [chat, session, downloads, box],
            concurrency_id="model", concurrency_limit=1, show_progress_on=[chat])
        chat.clear(lambda: (demo.new_session(), [], None), None, [session, downloads, request],
                   concurrency_limit=None)  # the chat's bin icon starts a new conversation
    app.queue(default_concurrency_limit=1)
    return app


def serve(checkpoint: str, *, host: str = "127.0.0.1", port: int = 7860, size: int = api.DEFAULT_SIZE,
          steps: int = api.DEFAULT_STEPS, dtype: str = "float32") -> None:
    """Load the checkpoint in `dtype`, then serve the demo at http://HOST:PORT until interrupted."""
    models = Models(checkpoint)
    print(f"loading {checkpoint} ({dtype}) ...", flush=True)
    models.get(dtype)  # a damaged checkpoint is an error now, not at the first message
    folder = Path(tempfile.mkdtemp(prefix="unipic-jax-demo-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    app = build_app(models, folder, size=size, steps=steps, dtype=dtype)
    app.launch(server_name=host, server_port=port, allowed_paths=[str(folder)], ssr_mode=False, show_error=True,
               footer_links=[], theme=THEME, css=CSS)
