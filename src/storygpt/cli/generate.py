"""The `storygpt generate`: a story from a prompt (and an instruction, for instruction-tuned models).

Each command's parser next to what it does; the handlers import what they use when they run, so that
`storygpt --help` stays fast."""

from __future__ import annotations

import json
import sys

from storygpt.errors import StoryGPTError

from .options import DECODE_DTYPES


def add_commands(sub) -> None:
    g = sub.add_parser("generate", help="write a story from a prompt")
    g.add_argument("prompt", nargs="?", default="", help="the story's beginning (default: start from scratch)")
    g.add_argument("--model", default=None, help="model or run directory (default: the shipped model; "
                   "'instruct': the shipped instruction-tuned model)")
    ins = g.add_argument_group("instructions (instruction-tuned models: --model instruct, or one fine-tuned on "
                               "TinyStories-Instruct); the story is printed without them, the prompt is its beginning")
    ins.add_argument("--words", help="words the story must use, comma-separated: dog,ball,happy")
    ins.add_argument("--sentence", help="a sentence the story must contain")
    ins.add_argument("--features", help="comma-separated, of: Dialogue, BadEnding, MoralValue, Twist, Foreshadowing, "
                     "Conflict (case, spaces and '-' do not matter)")
    ins.add_argument("--summary", help="what the story is about, in a sentence or two")
    ins.add_argument("--character", help="the story's main character, its kind and name: \"a cat named Pip\"")
    ins.add_argument("--request", help="instead of the above, a request in plain words: \"Write a story about ...\"")
    ins.add_argument("--no-guide", action="store_true", help="leave the model to itself: no guided decoding toward "
                     "the words and the sentence asked for (see docs/results/instruct.md)")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None, help="same seed, same story")
    g.add_argument("--num-samples", type=int, default=1)
    g.add_argument("--stop", action="append", default=[], help="end the story at this string (repeatable)")
    g.add_argument("--no-stream", action="store_true")
    g.add_argument("--json", action="store_true")
    g.add_argument("--verbose", action="store_true", help="print speed on stderr")
    g.add_argument("--device", default="auto")
    g.add_argument("--dtype", default="auto", choices=DECODE_DTYPES,
                   help="weights' precision (auto: bf16 where the hardware has it, else fp32; int8: weight-only "
                        "int8 on CPU, 1/4 of the weights' memory, slower than fp32 on AVX2 CPUs)")
    g.add_argument("--compile", action="store_true",
                   help="decode with a torch.compile'd step: 4-7x the tokens/s at batch 1 after a one-off compile "
                        "(up to 1.5 minutes on 2 cores)")
    g.set_defaults(func=cmd_generate)


def cmd_generate(args) -> None:
    from storygpt.generate.story_model import instruction_header, load

    prompt = args.prompt or ""
    try:
        for text in (prompt, args.sentence, args.summary, args.request, args.character):
            (text or "").encode("utf-8")
    except UnicodeEncodeError:
        raise StoryGPTError("prompt is not valid UTF-8 text") from None
    if args.num_samples < 1:
        raise StoryGPTError(f"--num-samples must be >= 1, got {args.num_samples}")
    instruction = dict(words=args.words, sentence=args.sentence, features=args.features, summary=args.summary,
                       character=args.character, request=args.request)
    instruction_header(**instruction)  # bad requirements fail before the model loads
    model = load(args.model, device=args.device, dtype=args.dtype, compile=args.compile)
    model_prompt = model.instruct_prompt(prompt, **instruction)  # a plain model refuses requirements
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop,
                   guide=not args.no_guide, **instruction)
    if args.json or args.num_samples > 1 or args.no_stream:
        stories = model.generate(prompt, num_samples=args.num_samples, **options)
        if args.json:
            extra = {"instruction": model_prompt} if model_prompt is not None else {}
            print(json.dumps({"prompt": prompt, **extra, "stories": stories, "stats": model.last_stats}))
        else:
            print("\n\n".join(stories) if args.num_samples == 1 else
                  "\n\n".join(f"--- story {i + 1} ---\n{t}" for i, t in enumerate(stories)))
    else:
        for piece in model.stream(prompt, **options):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    if args.verbose:
        st = model.last_stats
        print(f"{st['new_tokens']} tokens in {st['seconds']:.2f} s: {st['tokens_per_s']:.1f} tokens/s, "
              f"first token after {1000 * st['time_to_first_token_s']:.0f} ms", file=sys.stderr)
