"""mkdocs hooks (mkdocs.yml `hooks:`): the parts of the site that are made from the code at build time, so that
they cannot drift from it. Nothing is written into the source tree; every page is changed in memory.

- reference/cli.md: the marker `<!-- storygpt:cli -->` becomes the usage and help of every `storygpt` command
  and subcommand, walked from the argparse parser (`storygpt.cli.build_parser()`).
- reference/http.md: `<!-- storygpt:http -->` becomes the endpoints and the request/response schemas of the
  HTTP server, read from the OpenAPI schema of `storygpt.serve.create_app` over the shipped model.
- index.md: `<!-- storygpt:readme-tour -->` becomes the README's ten-minute tour (between its
  `<!-- tour:start -->` and `<!-- tour:end -->` lines), its links made relative to the page, so that the tour on
  the site is the README's, word for word.
- every page: a link to a file of the repository outside docs/ (written relative to the page, e.g.
  `../../src/storygpt/data/rename.py`, so that it works when the Markdown is read on GitHub) is checked (a
  missing file is a warning, so `mkdocs build --strict` fails) and becomes, on the site, the file's path as
  code (with `repo_url` set in mkdocs.yml: a link to the file in the repository); an image is copied into
  the site (under `_repo/`).

`extra: {docs_draft: true}` in a config that inherits mkdocs.yml turns the missing-file warnings into info
lines (for building while files are still being moved).
"""

from __future__ import annotations

import argparse
import json
import logging
import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.hooks.storygpt")

CLI_MARKER = "<!-- storygpt:cli -->"
HTTP_MARKER = "<!-- storygpt:http -->"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp"}


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------
def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, help, parser) of each subcommand of `parser`, in the order they were added."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            seen = set()
            for name, sub in action.choices.items():
                if id(sub) not in seen:  # an alias maps to the same parser
                    seen.add(id(sub))
                    out.append((name, helps.get(name, ""), sub))
    return out


def _walk(parser: argparse.ArgumentParser, path: list[str], help: str, out: list) -> None:
    out.append((path, help, parser))
    for name, sub_help, sub in _subcommands(parser):
        _walk(sub, path + [name], sub_help, out)


def cli_markdown() -> str:
    from storygpt.cli import build_parser

    parser = build_parser()
    commands: list = []
    _walk(parser, ["storygpt"], parser.description or "", commands)
    lines = ["| command | what it does |", "|---|---|"]
    for path, help, _ in commands[1:]:
        lines.append(f"| [`{' '.join(path)}`](#{_anchor(path)}) | {_cell(help)} |")
    lines.append("")
    for path, help, sub in commands:
        level = "#" * min(len(path) + 1, 4)
        lines.append(f"{level} `{' '.join(path)}` {{ #{_anchor(path)} }}")
        lines.append("")
        if help and len(path) > 1:
            lines.append(_escape(help[0].upper() + help[1:]) + ("" if help.endswith(".") else "."))
            lines.append("")
        # the help as argparse prints it, at a fixed width so that the build is the same on every terminal
        sub.formatter_class = _fixed_width(sub.formatter_class)
        lines += ["```text", sub.format_help().rstrip(), "```", ""]
    return "\n".join(lines)


def _fixed_width(formatter_class):
    class Fixed(formatter_class):
        def __init__(self, prog, *args, **kwargs):
            kwargs["width"] = 88
            super().__init__(prog, *args, **kwargs)

    return Fixed


def _anchor(path: list[str]) -> str:
    return "-".join(path)


def _cell(text: str) -> str:
    return _escape(text).replace("|", "\\|").replace("\n", " ")


def _escape(text: str) -> str:
    return text.replace("<", "&lt;").replace(">", "&gt;")


# --------------------------------------------------------------------------------------------
# The HTTP API
# --------------------------------------------------------------------------------------------
def openapi_schema() -> dict:
    """The server's OpenAPI schema, from the app as `storygpt serve` builds it, over the shipped model."""
    import storygpt
    from storygpt.serve import create_app

    app = create_app({"storygpt-default": storygpt.load()})
    try:
        return json.loads(json.dumps(app.openapi()))
    finally:
        for engine in getattr(app.state, "engines", {}).values():  # their decoding threads
            engine.close()


def http_markdown(schema: dict) -> str:
    components = schema.get("components", {}).get("schemas", {})
    info = schema.get("info", {})
    lines = [f"{info.get('description', '')} (OpenAPI {schema.get('openapi', '')}, "
             f"`{info.get('title', '')}` {info.get('version', '')}.)", "",
             "| method | path | summary |", "|---|---|---|"]
    operations = [(path, method, op) for path, ops in schema.get("paths", {}).items() for method, op in ops.items()]
    for path, method, op in operations:
        summary = _cell(op.get("summary", ""))
        lines.append(f"| `{method.upper()}` | [`{path}`](#{_op_anchor(method, path)}) | {summary} |")
    lines.append("")
    for path, method, op in operations:
        lines += [f"### `{method.upper()} {path}` {{ #{_op_anchor(method, path)} }}", ""]
        if op.get("summary"):
            lines += [f"**{_escape(op['summary'])}**" + (f" (tags: {', '.join(op['tags'])})" if op.get("tags") else ""),
                      ""]
        if op.get("description"):
            lines += [op["description"].strip(), ""]
        params = op.get("parameters", [])
        if params:
            lines += ["| parameter | in | type | required | description |", "|---|---|---|---|---|"]
            for p in params:
                lines.append(f"| `{p['name']}` | {p.get('in', '')} | {_type(p.get('schema', {}))} | "
                             f"{'yes' if p.get('required') else ''} | {_cell(p.get('description', ''))} |")
            lines.append("")
        body = op.get("requestBody")
        if body:
            for media, content in body.get("content", {}).items():
                lines += [f"Request body ({media}{', required' if body.get('required') else ''}): "
                          f"{_type(content.get('schema', {}))}", ""]
        lines += ["| status | body | description |", "|---|---|---|"]
        for status, response in op.get("responses", {}).items():
            bodies = [f"{media}: {_type(content.get('schema', {}))}"
                      for media, content in response.get("content", {}).items()]
            lines.append(f"| {status} | {_cell('; '.join(bodies)) if bodies else ''} | "
                         f"{_cell(response.get('description', ''))} |")
        lines.append("")
    lines += ["## Schemas", ""]
    for name in sorted(components):
        lines += _schema_markdown(name, components[name])
    return "\n".join(lines)


def _schema_markdown(name: str, schema: dict) -> list[str]:
    lines = [f"### {name} {{ #{_schema_anchor(name)} }}", ""]
    if schema.get("description"):
        lines += [_escape(schema["description"].strip()), ""]
    props = schema.get("properties")
    if not props:
        lines += [f"Type: {_type(schema)}", ""]
        return lines
    required = set(schema.get("required", []))
    lines += ["| field | type | default | description |", "|---|---|---|---|"]
    for field, prop in props.items():
        default = f"`{json.dumps(prop['default'])}`" if "default" in prop else ("required" if field in required else "")
        lines.append(f"| `{field}` | {_type(prop)} | {default} | {_cell(prop.get('description', ''))} |")
    lines.append("")
    return lines


def _type(s: dict) -> str:
    """A JSON schema in a few words: `string` (at most 256 characters), a list of `string`, [Usage](#...)."""
    if not s:
        return "any"
    if "$ref" in s:
        name = s["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{_schema_anchor(name)})"
    for key in ("anyOf", "oneOf", "allOf"):
        if key in s:
            branches = [_type(b) for b in s[key]]
            return (" or " if key != "allOf" else " and ").join(dict.fromkeys(branches))
    if "const" in s:
        return f"`{json.dumps(s['const'])}`"
    if "enum" in s:
        return "one of " + ", ".join(f"`{json.dumps(v)}`" for v in s["enum"])
    kind = s.get("type", "any")
    if isinstance(kind, list):
        return " or ".join(f"`{k}`" for k in kind)
    if kind == "array":
        text = f"list of {_type(s.get('items', {}))}"
    elif kind == "object" and "additionalProperties" in s and isinstance(s["additionalProperties"], dict):
        text = f"`object` of {_type(s['additionalProperties'])}"
    elif kind == "string" and "contentSchema" in s:
        text = f"JSON text of {_type(s['contentSchema'])}"
    elif kind == "object" and s.get("properties"):
        fields = ", ".join(f"`{k}`: {_type(v)}" for k, v in s["properties"].items())
        text = f"`object` {{{fields}}}"
    else:
        text = f"`{kind}`"
    bounds = []
    low, high = s.get("minimum"), s.get("maximum")
    if low is not None and high is not None:
        bounds.append(f"only {_number(low)}" if low == high else f"{_number(low)} to {_number(high)}")
    else:
        if low is not None:
            bounds.append(f"≥ {_number(low)}")
        if "exclusiveMinimum" in s:
            bounds.append(f"> {_number(s['exclusiveMinimum'])}")
        if high is not None:
            bounds.append(f"≤ {_number(high)}")
        if "exclusiveMaximum" in s:
            bounds.append(f"< {_number(s['exclusiveMaximum'])}")
    for low_key, high_key, unit in (("minLength", "maxLength", "characters"), ("minItems", "maxItems", "items"),
                                    ("minProperties", "maxProperties", "keys")):
        low, high = s.get(low_key), s.get(high_key)
        if low is not None and high is not None:
            bounds.append(f"{_number(low)} to {_number(high)} {unit}")
        elif low is not None:
            bounds.append(f"at least {_number(low)} {unit}")
        elif high is not None:
            bounds.append(f"at most {_number(high)} {unit}")
    return text + (f" ({', '.join(bounds)})" if bounds else "")


def _number(x) -> str:
    return str(int(x)) if isinstance(x, float) and x.is_integer() else str(x)


def _op_anchor(method: str, path: str) -> str:
    return f"{method.lower()}-" + re.sub(r"[^a-z0-9]+", "-", path.lower()).strip("-")


def _schema_anchor(name: str) -> str:
    return "schema-" + name.lower()


# --------------------------------------------------------------------------------------------
# Links to files of the repository outside docs/
# --------------------------------------------------------------------------------------------
FENCE_RE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
# a link (its text may hold code spans) or a code span, whichever starts first
LINK_OR_CODE_RE = re.compile(r"(?P<link>(?P<bang>!?)\[(?P<text>(?:[^\]\n`]|`[^`\n]*`)*)\]\((?P<target>[^)\s]+)\))"
                             r"|(?P<code>`[^`\n]*`)")


def _prose_links(markdown: str, replace) -> str:
    """`replace(match)` on every link outside fenced blocks and code spans."""

    def one(m: re.Match) -> str:
        return replace(m) if m.group("link") else m.group(0)

    out, last = [], 0
    for f in FENCE_RE.finditer(markdown):
        out.append(LINK_OR_CODE_RE.sub(one, markdown[last:f.start()]))
        out.append(f.group(0))
        last = f.end()
    out.append(LINK_OR_CODE_RE.sub(one, markdown[last:]))
    return "".join(out)


def _is_external(target: str) -> bool:
    return bool(re.match(r"^[a-z][a-z0-9+.-]*:", target)) or target.startswith(("#", "/"))


def _outside_links(markdown: str, page, config, files) -> str:
    docs = Path(config["docs_dir"]).resolve()
    repo = docs.parent
    page_dir = (docs / page.file.src_uri).parent
    draft = bool(config.get("extra", {}).get("docs_draft"))

    def replace(m: re.Match) -> str:
        bang, text, target = m.group("bang"), m.group("text"), m.group("target")
        if _is_external(target):
            return m.group(0)
        path_part, _, anchor = target.partition("#")
        resolved = (page_dir / path_part).resolve()
        if resolved == docs or docs in resolved.parents:
            return m.group(0)  # inside docs/: mkdocs checks it
        if repo not in resolved.parents:
            log.warning(f"{page.file.src_uri}: a link leaves the repository: {target}")
            return m.group(0)
        rel = resolved.relative_to(repo).as_posix()
        code = f"`{rel}`"
        if not resolved.exists():
            (log.info if draft else log.warning)(f"{page.file.src_uri}: links to {rel}, which does not exist")
            return code
        if bang and resolved.suffix.lower() in IMAGE_SUFFIXES:
            uri = f"_repo/{rel}"
            if files.get_file_from_path(uri) is None:
                files.append(File.generated(config, uri, abs_src_path=str(resolved)))
            return f"![{text}]({posixpath.relpath(uri, posixpath.dirname(page.file.src_uri))})"
        repo_url = config.get("repo_url")
        if repo_url:
            kind = "tree" if resolved.is_dir() else "blob"
            url = f"{repo_url.rstrip('/')}/{kind}/main/{rel}" + (f"#{anchor}" if anchor else "")
            return f"[{text}]({url})"
        plain = text.strip("`")
        return code if not plain or rel.endswith(plain) else f"{text} ({code})"

    return _prose_links(markdown, replace)


# --------------------------------------------------------------------------------------------
# The README's tour, on the home page
# --------------------------------------------------------------------------------------------
README_TOUR_MARKER = "<!-- storygpt:readme-tour -->"
TOUR_START, TOUR_END = "<!-- tour:start -->", "<!-- tour:end -->"


def readme_tour(page, config) -> str:
    """The README's section between its tour markers, with its links (relative to the repository root) made
    relative to the page that includes it."""
    docs = Path(config["docs_dir"]).resolve()
    repo = docs.parent
    readme = (repo / "README.md").read_text(encoding="utf-8")
    if TOUR_START not in readme or TOUR_END not in readme:
        log.warning(f"README.md has no {TOUR_START} ... {TOUR_END} section for {page.file.src_uri}")
        return ""
    section = readme.split(TOUR_START, 1)[1].split(TOUR_END, 1)[0].strip("\n")
    page_dir = (docs / page.file.src_uri).parent

    def rebase(m: re.Match) -> str:
        target = m.group("target")
        if _is_external(target):
            return m.group(0)
        path_part, sep, anchor = target.partition("#")
        new = posixpath.relpath((repo / path_part).resolve().as_posix(), page_dir.as_posix())
        return f"{m.group('bang')}[{m.group('text')}]({new}{sep}{anchor})"

    return _prose_links(section, rebase)


# --------------------------------------------------------------------------------------------
# mkdocs events
# --------------------------------------------------------------------------------------------
_cache: dict[str, str] = {}


def on_page_markdown(markdown: str, page, config, files, **kwargs) -> str:
    if CLI_MARKER in markdown:
        if "cli" not in _cache:
            _cache["cli"] = cli_markdown()
        markdown = markdown.replace(CLI_MARKER, _cache["cli"])
    if README_TOUR_MARKER in markdown:
        markdown = markdown.replace(README_TOUR_MARKER, readme_tour(page, config))
    if HTTP_MARKER in markdown:
        if "http" not in _cache:
            _cache["http"] = http_markdown(openapi_schema())
        markdown = markdown.replace(HTTP_MARKER, _cache["http"])
    return _outside_links(markdown, page, config, files)


def on_pre_build(config, **kwargs) -> None:
    _cache.clear()  # each build (and each rebuild of `mkdocs serve`) reads the code anew
