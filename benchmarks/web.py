"""The page `storygpt web` builds, in headless Chromium, against storygpt's own decoding on the same machine.

    python benchmarks/web.py [--model DIR | --site SITE] [--int8] [--new-tokens 256] [--rounds 3]
                             [--screenshot docs/web.png] [--smoke]

The site (built with `build_site`, or --site) is served twice on loopback ports: (a) by plain
`python -m http.server` (no headers: onnxruntime-web runs on one thread) and (b) by storygpt's server with
Cross-Origin-Opener-Policy / Cross-Origin-Embedder-Policy (cross-origin isolated: onnxruntime-web's threads, as many as
the browser reports cores, at most 4). Each page decodes greedily from the start token, the end-of-story token never
taken (`window.storygpt.generate({maxNewTokens, temperature: 0, ignoreEos: true})`), and reports its tokens/s (new
tokens over the wall time of the story, prefill included, as storygpt counts) and its time to first token.
--int8 adds the page of the same model exported with --dtype int8 (plain server, one thread).
storygpt's `StoryModel` (batch 1, eager, CPU) decodes the same tokens in fp32 and bf16. Contenders alternate round
by round (benchmarks/common.py); medians are reported. Every request to another origin is aborted and counted
(there must be none). A full run writes benchmarks/results/web.json and, through the page's own form, a screenshot of
a story (docs/web.png); --smoke decodes a few tokens once and writes nothing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from common import alternate, header, median, run_main, save, table

import storygpt
from storygpt.convert.web import build_site, site_info

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from web_page import SitePage, chromium, static_server  # noqa: E402

SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "web.png"
STORY = dict(prompt="Once upon a time, there was a little girl named Lily who loved to", max_new_tokens=256,
             temperature=0.8, top_p=0.95, seed=7)


def page_contender(sp: SitePage, new_tokens: int, ttft: list[float]):
    def run() -> float:
        r = sp.generate(prompt="", maxNewTokens=new_tokens, temperature=0, ignoreEos=True)
        assert r["stats"]["new_tokens"] == new_tokens, r["stats"]
        ttft.append(r["stats"]["time_to_first_token_s"])
        return r["stats"]["tokens_per_s"]

    return run


def storygpt_contender(path, dtype: str, new_tokens: int, ttft: list[float]):
    model = storygpt.load(path, device="cpu", dtype=dtype)

    def run() -> float:
        model.generate("", temperature=0, max_new_tokens=new_tokens, ignore_eos=True)
        ttft.append(model.last_stats["time_to_first_token_s"])
        return model.last_stats["new_tokens"] / model.last_stats["seconds"]

    return run


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="storygpt-web-") as work:
        bench(Path(work))


def bench(work: Path) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: the shipped model)")
    ap.add_argument("--site", type=Path, help="a site built by storygpt web (default: build one for --model)")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--int8", action="store_true", help="also the page of the model in int8 (one thread)")
    ap.add_argument("--screenshot", type=Path, default=SCREENSHOT, help="where to save the page after a story")
    ap.add_argument("--smoke", action="store_true", help="a few tokens, one round, nothing written")
    args = ap.parse_args()
    if args.smoke:
        args.new_tokens, args.rounds = 16, 1
    site = args.site or build_site(args.model, work / "site")
    info = site_info(site)
    model_path = info["model"]["source"] if args.site else args.model  # "default"/"instruct": the shipped models
    if info["model"]["dtype"] != "fp32":
        print(f"note: the site's model is {info['model']['dtype']}; storygpt decodes fp32 and bf16", file=sys.stderr)
    int8_site = None
    if args.int8:
        int8_site = build_site(model_path, work / "site-int8", dtype="int8")
    ttft: dict[str, list[float]] = {}
    with (static_server(site) as plain_url, static_server(site, isolated=True) as isolated_url,
          static_server(int8_site or site) as int8_url, chromium() as browser):
        pages = {"page, 1 thread": SitePage(browser, plain_url), "page, threads": SitePage(browser, isolated_url)}
        if int8_site:
            pages["page int8, 1 thread"] = SitePage(browser, int8_url)
        facts = {}
        for name, sp in pages.items():
            if sp.open() != "ready":
                raise SystemExit(f"{name}: the page did not load: {sp.error_text()}")
            facts[name] = sp.facts()
            sp.generate(prompt="", maxNewTokens=8, temperature=0, ignoreEos=True)  # warm up
        runs = {name: page_contender(sp, args.new_tokens, ttft.setdefault(name, [])) for name, sp in pages.items()}
        for dtype in ("fp32", "bf16"):
            name = f"storygpt {dtype}"
            runs[name] = storygpt_contender(model_path, dtype, args.new_tokens, ttft.setdefault(name, []))
            runs[name]()  # warm up
            ttft[name].clear()
        measured = alternate(runs, args.rounds)
        if not args.smoke:
            sp = pages["page, 1 thread"]
            story = sp.write(**STORY)
            args.screenshot.parent.mkdir(parents=True, exist_ok=True)
            sp.page.screenshot(path=str(args.screenshot), full_page=True)
            print(story["shown"], file=sys.stderr)
        foreign = sum(len(sp.foreign) for sp in pages.values())
        version = browser.version
        for sp in pages.values():
            sp.close()
    if foreign:
        raise SystemExit(f"the page asked for {foreign} URLs outside the site")
    threads = {name: f["threads"] for name, f in facts.items()}
    rows = [{"contender": name, "threads": threads.get(name), "tokens_per_s": round(median(v), 1),
             "time_to_first_token_ms": round(1000 * median(ttft[name]), 1), "rounds": [round(x, 1) for x in v]}
            for name, v in measured.items()]
    result = header("web", model=info["model"]["source"], params=info["model"]["params"], dtype=info["model"]["dtype"],
                    chromium=version, onnxruntime_web=info["ort"]["version"], new_tokens=args.new_tokens,
                    rounds=args.rounds, site_bytes=info["sizes"],
                    **({"int8_site_bytes": site_info(int8_site)["sizes"]} if int8_site else {}),
                    requests_outside_the_site=foreign, rows=rows)
    save(result, "web", args.smoke)
    print(f"{result['machine']}; Chromium {version}; onnxruntime-web {info['ort']['version']}; "
          f"{args.new_tokens} greedy tokens from the start token, median of {args.rounds}")
    print(table(rows, {
        "contender": lambda r: r["contender"],
        "threads": lambda r: str(r["threads"] or "torch's"),
        "tokens/s": lambda r: f"{r['tokens_per_s']:.1f}",
        "first token (ms)": lambda r: f"{r['time_to_first_token_ms']:.1f}",
    }))
    print(f"site: {info['sizes']['total'] / 1e6:.1f} MB (model {info['sizes']['model'] / 1e6:.1f} MB, runtime "
          f"{info['sizes']['runtime'] / 1e6:.1f} MB)" + (f"; int8 site: {result['int8_site_bytes']['total'] / 1e6:.1f} MB "
          f"(model {result['int8_site_bytes']['model'] / 1e6:.1f} MB)" if int8_site else "")
          + f"; requests outside the site: {foreign}")


if __name__ == "__main__":
    run_main(main)
