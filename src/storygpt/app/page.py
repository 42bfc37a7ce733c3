"""The storygpt web app: type a prompt, watch a story being written.

A Streamlit script over the Python API (`storygpt.load()` / `StoryModel.stream`). Start it with
`storygpt app [--model DIR ...] [--models-dir DIR] [--port N]`, which passes the model folders in the
STORYGPT_APP_MODELS environment variable (a JSON list; none = the shipped default model).

Streamlit runs this file top to bottom for every interaction, in one thread per browser session. The
model is loaded once per process (`cache_resource`), with one decoding engine (storygpt.generate.engine, the
HTTP server's): every session's story joins the same batch (continuous batching), and its words stream
to that session's page as they are decoded. Stopping works the Streamlit way: pressing Stop asks for a
rerun, which interrupts the running script at its next write (the story leaves the batch); the words
written so far are kept in the session state.

An instruction-tuned model (TinyStories-Instruct, `storygpt.text.instruct`) also gets inputs for words the
story must use, a sentence it must contain and its features; the story is then written for that
instruction (`StoryModel.instruct_prompt`), and the text box holds the story's beginning, if any.
"""

from __future__ import annotations

import json
import os
import random
from datetime import datetime
from pathlib import Path

import streamlit as st

import storygpt
from storygpt.app.launch import COMPILE_ENV, DTYPE_ENV, MODELS_ENV
from storygpt.errors import StoryGPTError
from storygpt.eval.quality import quality_rows
from storygpt.generate.batching import Done, Piece
from storygpt.generate.engine import Engine, QueueFull
from storygpt.generate.story_model import StoryModel, StoryStart
from storygpt.model.load import SHIPPED_MODELS, instruct_model_installed
from storygpt.text.instruct import FEATURES

HISTORY_SIZE = 10
APP_SLOTS = 8  # stories the engine decodes at once (one per session writing); more sessions wait their turn
EXAMPLES = [
    "Once upon a time, there was a little girl named Lily who found a shiny key in the garden.",
    "Tom and his dog Max went to the park. Max saw a big red ball and",
    "The little bird was sad because it could not fly.",
    "One day, a boy named Ben wanted to bake a cake for his mom.",
]
DEFAULTS = {"prompt": "", "max_new_tokens": 200, "temperature": 0.8, "top_k": 0, "top_p": 0.95,
            "repetition_penalty": 1.0, "seed": 42, "fresh_seed": True, "words": "", "sentence": "", "features": [],
            "guide": True}


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------
def model_choices() -> dict[str, str | None]:
    """Display name -> model folder (None = the shipped default model, "instruct" = the shipped instruct model),
    from STORYGPT_APP_MODELS; none: the shipped models (the instruct one when it is installed)."""
    paths = json.loads(os.environ.get(MODELS_ENV) or "[]")
    if not paths:
        return {"storygpt default": None, **({"storygpt instruct": "instruct"} if instruct_model_installed() else {})}
    names: dict[str, str | None] = {}
    for p in paths:
        name = f"storygpt {p}" if p in SHIPPED_MODELS else Path(p).name or str(p)
        names[name if name not in names else str(p)] = p
    return names


@st.cache_resource(show_spinner="Loading the model…", max_entries=4)
def get_model(path: str | None, compile: bool = False, dtype: str = "auto") -> StoryModel:
    model = storygpt.load(path, compile=compile, dtype=dtype)
    if compile:  # under the loading spinner
        model.warm_up()
    return model


@st.cache_resource(show_spinner=False, max_entries=4)
def get_engine(path: str | None, compile: bool = False, dtype: str = "auto") -> Engine:
    """The model's decoding engine, shared by every session of this process."""
    return Engine(get_model(path, compile, dtype), slots=APP_SLOTS, name="app")


def describe(model: StoryModel) -> str:
    facts = model.facts()
    parts = [f"**{facts['params'] / 1e6:.1f}M** parameters", f"context **{facts['context']}** tokens",
             f"vocabulary **{facts['vocab_size']:,}**"]
    for name, result in (facts.get("evals") or {}).items():
        parts.append(f"held-out **{result['bits_per_byte']:.3f}** bits/byte on {name}")
    return " · ".join(parts)


# --------------------------------------------------------------------------------------------
# Widgets' callbacks (run before the script, so they may change widget values)
# --------------------------------------------------------------------------------------------
def use_example(text: str) -> None:
    st.session_state.prompt = text


def surprise_seed() -> None:
    st.session_state.seed = random.randrange(1_000_000)


def start_story() -> None:
    if st.session_state.fresh_seed:
        surprise_seed()
    st.session_state.writing = True


def stop_story() -> None:
    st.session_state.stopped = True


def init_state() -> None:
    for key, value in DEFAULTS.items():
        st.session_state.setdefault(key, value)
    st.session_state.setdefault("history", [])
    st.session_state.setdefault("writing", False)
    st.session_state.setdefault("stopped", False)


# --------------------------------------------------------------------------------------------
# Page
# --------------------------------------------------------------------------------------------
def sidebar(choices: dict[str, str | None]) -> str | None:
    with st.sidebar:
        st.header("Settings")
        name = st.selectbox("Model", list(choices), key="model_name", disabled=len(choices) == 1)
        st.slider("Length (new tokens)", 16, 1024, step=8, key="max_new_tokens")
        st.slider("Temperature", 0.0, 2.0, step=0.05, key="temperature",
                  help="0 always picks the most likely word; higher is more adventurous.")
        st.number_input("Top-k", 0, 100_000, step=1, key="top_k", help="0 = off")
        st.slider("Top-p", 0.05, 1.0, step=0.05, key="top_p")
        st.slider("Repetition penalty", 1.0, 2.0, step=0.05, key="repetition_penalty", help="1 = off")
        st.number_input("Seed", 0, 2**31 - 1, step=1, key="seed", help="Same seed and settings, same story.")
        st.toggle("New seed for every story", key="fresh_seed")
        st.button("Surprise me", on_click=surprise_seed, key="surprise", help="Pick a random seed.")
    return choices[name]


def options() -> dict:
    ss = st.session_state
    return dict(max_new_tokens=int(ss.max_new_tokens), temperature=float(ss.temperature), top_k=int(ss.top_k),
                top_p=float(ss.top_p), repetition_penalty=float(ss.repetition_penalty), seed=int(ss.seed),
                guide=bool(ss.guide))


def instruction() -> dict:
    """The instruct model's inputs that are filled in (words, sentence, features)."""
    ss = st.session_state
    given = {"words": ss.words.strip(), "sentence": ss.sentence.strip(), "features": list(ss.features)}
    return {k: v for k, v in given.items() if v}


def instruct_inputs() -> None:
    st.text_input("Words the story must use (comma-separated)", key="words", placeholder="dog, ball, happy",
                  max_chars=200)
    st.text_input("A sentence the story must contain", key="sentence", max_chars=1000)
    st.multiselect("Features", FEATURES, key="features",
                   help="Dialogue, a bad ending, a moral value, a twist, foreshadowing, conflict")
    st.toggle("Guide the story to the words and the sentence", key="guide",
              help="Steers the writing so that the story uses every word and the sentence asked for. Off: the "
                   "model alone, which forgets most of them.")


def check_prompt(model: StoryModel, prompt: str) -> str | None:
    """A friendly message if the prompt cannot be used, else None."""
    n = model.count_tokens(prompt)
    if n >= model.context:
        return (f"Your beginning is {n} tokens long, but this model can only read {model.context - 1} at a time. "
                "Please shorten it (the last sentence or two is usually enough).")
    return None


def write_story(engine: Engine, prompt: str, opts: dict, stop_slot, model_prompt: str | None = None) -> None:
    """Stream a story into the page; on success add it to the history. `model_prompt`: what an instruct model
    reads (the instruction, then the story's beginning `prompt`)."""
    ss = st.session_state
    stats: dict = {}
    start = StoryStart() if model_prompt is not None and not prompt else None  # no space after "Story:"
    ss.partial = {"prompt": prompt, "story": "", "seed": opts["seed"], "model": ss.model_name}
    if model_prompt is not None:
        ss.partial["instruction"] = model_prompt
    stop_slot.button("Stop", on_click=stop_story, key="stop")

    def pieces():
        yield prompt_markdown(prompt)
        for event in engine.events(model_prompt or prompt, 1, **opts):  # leaving early (Stop): out of the batch
            if isinstance(event, Piece):
                text = start(event.index, event.text) if start else event.text
                ss.partial["story"] += text
                yield as_markdown(text)
            elif isinstance(event, Done):
                stats.update(event.stats)

    with st.container(key="story"):
        st.write_stream(pieces())
    stop_slot.empty()
    finish(ss.partial, stats)


def finish(entry: dict, stats: dict | None) -> None:
    ss = st.session_state
    entry["stats"] = stats or {}
    entry["time"] = datetime.now().strftime("%H:%M:%S")
    ss.history = [entry] + ss.history[:HISTORY_SIZE - 1]
    ss.partial = None


def as_markdown(text: str) -> str:
    """Story text shown as-is: markdown's special characters escaped, line breaks kept."""
    for ch in "\\`*_[]<>#|$~":
        text = text.replace(ch, "\\" + ch)
    return text.replace("\n", "  \n")


def prompt_markdown(prompt: str) -> str:
    """The prompt in bold (with the whitespace it ended with, which the story continues from)."""
    if not prompt.strip():
        return ""
    return f"**{as_markdown(prompt.strip())}**" + as_markdown(prompt[len(prompt.rstrip()):])


def show_stats(entry: dict) -> None:
    s = entry.get("stats") or {}
    if s:
        line = (f"{s['new_tokens']} tokens in {s['seconds']:.2f} s · **{s['tokens_per_s']:.0f} tokens/s** · "
                f"first token after {1000 * s['time_to_first_token_s']:.0f} ms · seed {entry['seed']}")
    else:
        line = f"stopped early · seed {entry['seed']}"
    st.caption(line)


def story_text(entry: dict) -> str:
    return entry["prompt"] + entry["story"]


def history() -> None:
    entries = st.session_state.history
    if not entries:
        return
    st.divider()
    st.subheader("This session's stories")
    everything = "\n\n<|endoftext|>\n\n".join(story_text(e) for e in entries)
    st.download_button("Download all (.txt)", everything, file_name="stories.txt", mime="text/plain",
                       key="download_all")
    for i, e in enumerate(entries):
        title = (e["prompt"].strip() or e["story"].strip())[:60] or "(empty)"
        with st.expander(f"{e['time']} · {title}…", expanded=False):
            if e.get("instruction"):
                st.caption(as_markdown(e["instruction"]))
            st.markdown(as_markdown(story_text(e)))
            show_stats(e)
            st.download_button("Download (.txt)", story_text(e), file_name=f"story-{e['seed']}.txt",
                               mime="text/plain", key=f"download_{i}")


def main() -> None:
    st.set_page_config(page_title="storygpt", page_icon="📖", layout="centered")
    init_state()
    ss = st.session_state
    choices = model_choices()
    path = sidebar(choices)
    st.title("storygpt")
    st.write("Type the beginning of a story, or pick one below, and a tiny language model writes the rest.")
    try:
        how = (os.environ.get(COMPILE_ENV) == "1", os.environ.get(DTYPE_ENV) or "auto")  # compile, dtype
        model = get_model(path, *how)
        engine = get_engine(path, *how)
    except StoryGPTError as e:
        st.error(f"This model cannot be loaded: {e}")
        return
    st.caption(describe(model))
    if rows := quality_rows(model.facts()):
        with st.expander("How good is this model? (`storygpt eval --suite stories`)"):
            st.table(rows)

    cols = st.columns(len(EXAMPLES))
    for i, (col, text) in enumerate(zip(cols, EXAMPLES)):
        col.button(text[:28] + "…", key=f"example_{i}", on_click=use_example, args=(text,), help=text,
                   use_container_width=True)
    if model.is_instruct:
        instruct_inputs()
    st.text_area("Beginning of the story (empty = the model starts from scratch)", key="prompt", height=100,
                 max_chars=4000)
    left, right = st.columns([1, 1])
    left.button("Write my story", type="primary", on_click=start_story, key="write")
    stop_slot = right.empty()

    if ss.stopped and ss.get("partial"):  # Stop pressed: keep what was written so far
        finish(ss.partial, None)
        st.info("Stopped. The story so far is in the history below.")
    ss.stopped = False

    if ss.writing:
        ss.writing = False
        prompt, model_prompt = ss.prompt, None
        try:
            if model.is_instruct and instruction():
                model_prompt = model.instruct_prompt(prompt, **instruction())
                prompt = prompt.lstrip()
            problem = check_prompt(model, model_prompt or prompt)
        except StoryGPTError as e:
            problem = f"Those requirements don't work: {e}"
        if problem:
            st.warning(problem)
        else:
            try:
                write_story(engine, prompt, options(), stop_slot, model_prompt)
                show_stats(ss.history[0])
            except QueueFull:
                ss.partial = None
                st.warning("Too many stories are being written right now. Please try again in a moment.")
            except StoryGPTError as e:
                ss.partial = None
                st.warning(f"Those settings don't work: {e}")
            except Exception as e:  # never a traceback on the page
                ss.partial = None
                st.error(f"Something went wrong while writing ({type(e).__name__}: {e}). Please try again.")
    elif ss.history:  # the latest story stays on the page across reruns
        latest = ss.history[0]
        with st.container(key="story"):
            st.markdown(prompt_markdown(latest["prompt"]) + as_markdown(latest["story"]))
        show_stats(latest)
    history()


if __name__ == "__main__":
    main()
