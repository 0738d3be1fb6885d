"""Every `python train.py …` command and every Hydra override written in README.md and docs/*.md
composes with Hydra's compose API and passes the run's checks before data loads
(`cdep_exp.run.compose.validate`, the trainer's schema and ranges), without training.

What is read (docs/reference.md is exempt: it quotes the original code's commands):
* commands: `python train.py …` (any `…/python` prefix, leading `VAR=value` assignments) in
  fenced or indented code blocks, `\\` continuations joined, shell comments dropped, and in
  inline code spans. `-m` sweeps compose once per swept value (the other keys at their first
  value); `--cfg job` and other Hydra flags are accepted.
* standalone overrides: an inline code span made only of `key=value` tokens, e.g.
  `method.penalty.dropout=off` or `trainer.precision=32\\|bf16\\|16` (each `|` alternative is
  checked). The span passes when it composes on some config: the default one, another dataset
  or method (the pair named in the same paragraph or table row first), or a table preset.
  Upper-case keys (`SCALE=paper`, `DATA_DIR=…`) are make or environment variables, and an
  undotted key that is no top-level key or group (`inplace=True`, `target=loss`) is a function's
  argument or a key named without its group: neither is read.

Placeholders (PLACEHOLDERS below: `<path>`, `...`, `$(DATA_DIR)`, `X`, `[overrides]`) are not
composed, token by token, but their key must exist (`paths.data_dir=$(DATA_DIR)`); the rest of
the command is checked. `make … ARGS=…` lines are not read.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict

from cdep_exp.run.compose import trainer_settings, validate

ROOT = Path(__file__).resolve().parents[1]
EXEMPT = {"docs/reference.md"}
DATASETS = tuple(sorted(path.stem for path in (ROOT / "conf" / "dataset").glob("*.yaml")))
METHODS = ("vanilla", "cdep", "cdep_original", "rrr", "eg", "augment", "clp", "group_dro", "jtt", "dfr",
           "find_another")
# Configs a standalone override may need besides the dataset × method pairs (scale=…, grid.…).
PRESETS = ("table1/cdep", "table2/decoymnist_cdep", "table3/faithful_cdep", "table4/cdep", "tableS1/cdep",
           "shortcut/decoymnist_cdep_both", "demo")

# Placeholders: a token holding one of these stands for a value the reader fills in, so it is
# skipped (the rest of the command is still checked).
PLACEHOLDERS = (
    re.compile(r"<[^<>`]*>"),            # <path>, <run dir>, <table>/<preset>
    re.compile(r"\.\.\.|…"),             # dataset=..., [overrides …]
    re.compile(r"\$\(?[A-Za-z_]\w*\)?"),  # $(DATA_DIR), $SCALE: make and shell variables
    re.compile(r"=[^\W\d_]$"),           # dataset=X method=Y, mask_samples=k: one letter
    re.compile(r"=(?:your|my)[\w.]*$"),  # model=yournet
    re.compile(r"=$"),                   # `method=`: names the key, no value
    re.compile(r"^\[[\w ]+\]$"),         # [overrides]
)
ABSENT = object()

PYTHON_TRAIN = re.compile(r"(?:^|[\s;&(])(?:\S*/)?python3?\s+train\.py(?=\s|$)(?P<rest>.*)")
OVERRIDE_TOKEN = re.compile(r"^(?:\+\+|\+|~)?(?P<key>[A-Za-z_][\w-]*(?:[./@][\w-]+)*)(?:=(?P<value>.*))?$")
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE = re.compile(r"(?<!`)`([^`]+)`(?!`)")
# Hydra's flags: those followed by a value consume the next token.
FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                    "--config-dir", "-cd", "--experimental-rerun"}


@dataclass
class Snippet:
    """A command or a standalone override span, with where it was written."""

    source: str
    line: int
    kind: str  # "command" | "overrides"
    text: str
    context: str = ""  # the paragraph or table row around an inline span
    skipped: list[str] = field(default_factory=list)  # placeholders: their keys are checked, not values
    not_config: list[str] = field(default_factory=list)  # `inplace=True`: not a key of the config

    @property
    def id(self) -> str:
        return f"{self.source}:{self.line}"


def placeholder(token: str) -> bool:
    return any(pattern.search(token) for pattern in PLACEHOLDERS)


def code_mask(lines: list[str]) -> list[bool]:
    """Per line, whether it is code: inside a fenced block (fences included) or an indented
    block (4 spaces or a tab, after a blank line or another code line)."""
    mask, in_fence = [], False
    for number, line in enumerate(lines):
        if FENCE.match(line):
            in_fence = not in_fence
            mask.append(True)
            continue
        after = number == 0 or not lines[number - 1].strip() or mask[-1]
        mask.append(in_fence or (line.startswith(("    ", "\t")) and after and bool(line.strip())))
    return mask


def code_lines(lines: list[str]) -> Iterator[tuple[int, str]]:
    """(first line number, logical line) of every code line, `\\` continuations joined."""
    mask, pending, start = code_mask(lines), "", 0
    for number, (line, is_code) in enumerate(zip(lines, mask), 1):
        if not is_code or FENCE.match(line):
            if pending:
                yield start, pending
                pending = ""
            continue
        if not pending:
            start = number
        stripped = line.rstrip()
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        yield start, pending + stripped
        pending = ""
    if pending:
        yield start, pending


def prose_blocks(lines: list[str]) -> Iterator[tuple[int, list[str]]]:
    """(first line number, lines) of each paragraph and each table row outside code blocks."""
    block, first = [], 0
    for number, (line, is_code) in enumerate(zip(lines, code_mask(lines)), 1):
        table_row = line.lstrip().startswith("|")
        if is_code or not line.strip() or table_row:
            if block:
                yield first, block
                block = []
            if table_row and not is_code:
                yield number, [line]
            continue
        if not block:
            first = number
        block.append(line)
    if block:
        yield first, block


def command_snippet(source: str, line: int, text: str, context: str = "") -> Snippet | None:
    match = PYTHON_TRAIN.search(text)
    if not match:
        return None
    rest = re.split(r"\s(?:&&|\|\||;|\|)\s", match.group("rest"))[0]
    rest = re.sub(r"(?:^|\s)#.*$", "", rest)  # a shell comment
    return Snippet(source, line, "command", " ".join(rest.split()), context)


def extract(text: str, source: str) -> list[Snippet]:
    """The commands and standalone override spans written in one markdown text."""
    lines = text.splitlines()
    snippets = []
    for number, line in code_lines(lines):
        snippet = command_snippet(source, number, line)
        if snippet:
            snippets.append(snippet)
    for first, block in prose_blocks(lines):
        joined = " ".join(block)
        starts = [sum(len(b) + 1 for b in block[:i]) for i in range(len(block))]
        for match in INLINE.finditer(joined):
            line = first + sum(1 for s in starts if s <= match.start()) - 1
            span = match.group(1).replace("\\|", "|").strip()
            snippet = command_snippet(source, line, span, joined)
            if snippet:
                snippets.append(snippet)
            elif override_span(span):
                snippets.append(Snippet(source, line, "overrides", span, joined))
    return sorted(snippets, key=lambda s: s.line)


def override_span(span: str) -> bool:
    """Whether an inline span is made only of Hydra overrides (`key=value` tokens, a key in
    lower case: `SCALE=paper` is a make variable)."""
    tokens = span.split()
    if not tokens:
        return False
    for token in tokens:
        match = OVERRIDE_TOKEN.match(token)
        if not match or match.group("value") is None and not token.startswith("~"):
            return False
        if match.group("key")[0].isupper():
            return False
    return True


def command_overrides(snippet: Snippet) -> tuple[list[str], bool]:
    """The overrides of a command (placeholders removed, into snippet.skipped) and whether it is
    a multirun."""
    snippet.skipped.clear()
    text = re.sub(r"<[^<>]*>", lambda m: m.group(0).replace(" ", "_"), snippet.text)
    tokens = shlex.split(text, comments=True)
    overrides, multirun, skip_next = [], False, False
    for token in tokens:
        if skip_next:
            skip_next = False
        elif token in ("-m", "--multirun"):
            multirun = True
        elif token in FLAGS_WITH_VALUE:
            skip_next = True
        elif token.startswith("-"):
            continue
        elif placeholder(token):
            snippet.skipped.append(token)
        else:
            overrides.append(token)
    return overrides, multirun


def variants(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The configs a command composes: one, or for a sweep each swept value once (the other
    swept keys at their first value)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = []
    for text, override in zip(overrides, parsed):
        if override.is_sweep_override():
            if not multirun:
                raise ValueError(f"{text} is a sweep: the command needs -m")
            choices.append([f"{override.get_key_element()}={v}" for v in override.sweep_string_iterator()])
        else:
            choices.append([text])
    first = [values[0] for values in choices]
    out = [first]
    for i, values in enumerate(choices):
        out += [first[:i] + [value] + first[i + 1:] for value in values[1:]]
    return out


def check(overrides: list[str]) -> None:
    """Compose as train.py does, then run the checks a run makes before loading data."""
    cfg = compose("config", overrides=overrides, return_hydra_config=True)
    hydra_config = HydraConfig.instance()
    previous, hydra_config.cfg = hydra_config.cfg, None
    try:
        hydra_config.set_config(cfg)  # for ${hydra:...} in the presets
        with open_dict(cfg):
            del cfg["hydra"]
        validate(cfg)
        trainer_settings(cfg.trainer)
    finally:
        hydra_config.cfg = previous  # no Hydra state left for other tests


@cache
def _problem(overrides: tuple[str, ...]) -> str | None:
    try:
        check(list(overrides))
    except Exception as err:  # noqa: BLE001 (any failure is the finding, named in one line)
        return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
    return None


def problem(overrides: list[str]) -> str | None:
    """None when the overrides compose and pass the checks, else the error in one line."""
    return _problem(tuple(overrides))


def command_problem(snippet: Snippet) -> str | None:
    try:
        overrides, multirun = command_overrides(snippet)
        runs = variants(overrides, multirun)
    except Exception as err:  # noqa: BLE001 (unbalanced quotes, a malformed override: the finding)
        return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
    for run in runs:
        found = problem(run)
        if found:
            return f"{' '.join(run)} -> {found}"
    # A placeholder's key must exist in the command's config, or (`scale=<scale>` beside
    # `experiment=<preset>`) in some other.
    unknown = [t for t in snippet.skipped if placeholder_key(t)
               and not any(knows(base, t) for base in [tuple(runs[0]), *bases(snippet.context)])]
    return f"{unknown[0]}: its key is no key or group of any config" if unknown else None


def placeholder_key(token: str) -> bool:
    """Whether a placeholder token names a real key (`paths.data_dir=$(DATA_DIR)`), which is
    then checked to exist; `<name>=1` or `[overrides]` name none."""
    match = OVERRIDE_TOKEN.match(token.split("=", 1)[0] + "=")
    return bool(match) and not token.startswith("+")


def bases(context: str) -> list[tuple[str, ...]]:
    """Configs a standalone override is tried on besides the default: the dataset and method the
    context names, every dataset with the default method and every method with the default
    dataset (a pair file changes values, not which keys exist), the presets."""
    named_d = [d for d in re.findall(r"dataset=(\w+)", context) if d in DATASETS]
    named_m = [m for m in re.findall(r"method=(\w+)", context) if m in METHODS]
    out = [(f"dataset={d}", f"method={m}") for d in named_d for m in named_m]
    out += [(f"dataset={d}",) for d in (*named_d, *DATASETS)] + [(f"method={m}",) for m in (*named_m, *METHODS)]
    out += [(f"experiment={p}",) for p in PRESETS]
    return list(dict.fromkeys(out))


@cache
def base_config(base: tuple[str, ...]) -> DictConfig:
    return compose("config", overrides=list(base), return_hydra_config=True)


def knows(base: tuple[str, ...], token: str) -> bool:
    """Whether the key of an override exists in a base config (a key or a config group)."""
    if token.startswith(("+", "~")):
        return True
    key = OVERRIDE_TOKEN.match(token).group("key").split("@")[0]
    cfg = base_config(base)
    in_config = OmegaConf.select(cfg, key.replace("/", "."), default=ABSENT) is not ABSENT
    return in_config or key in cfg.hydra.runtime.choices


@cache
def config_heads() -> frozenset[str]:
    """Top-level keys and config groups: an undotted key that is none of them (`inplace=True`,
    `target=loss`) is a function's argument or a key named without its group, not an override."""
    groups = {path.name for path in (ROOT / "conf").iterdir() if path.is_dir()}
    configs = [base_config(()), base_config(("experiment=table3/faithful_cdep",))]  # table keys: grid, protocol
    return frozenset(groups | {key for cfg in configs for key in (*cfg.keys(), *cfg.hydra.runtime.choices.keys())})


def override_problems(snippet: Snippet) -> list[str]:
    """The alternatives of a standalone span that compose on none of the bases."""
    snippet.skipped.clear()
    snippet.not_config.clear()
    tokens = []
    for token in snippet.text.split():
        key = OVERRIDE_TOKEN.match(token).group("key")
        if "." not in key and "/" not in key and key not in config_heads():
            snippet.not_config.append(token)
        elif placeholder(token):
            snippet.skipped.append(token)
        else:
            tokens.append(token)
    failures = [f"{t}: its key is no key or group of any config" for t in snippet.skipped
                if placeholder_key(t) and not any(knows(base, t) for base in [(), *bases(snippet.context)])]
    if not tokens:
        return failures
    # key=a|b|c: each alternative, with the span's other tokens at their first alternative.
    options = [[f"{t.split('=', 1)[0]}={v}" for v in t.split("=", 1)[1].split("|")] if "=" in t else [t]
               for t in tokens]
    first = [o[0] for o in options]
    runs = [first] + [first[:i] + [v] + first[i + 1:] for i, o in enumerate(options) for v in o[1:]]
    for run in runs:
        first_error = problem(run)
        if first_error is None:
            continue
        candidates = [base for base in bases(snippet.context) if all(knows(base, t) for t in run)]
        if not any(problem([*base, *run]) is None for base in candidates):
            failures.append(f"{' '.join(run)} -> {first_error}")
    return failures


def doc_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return [f for f in files if f.relative_to(ROOT).as_posix() not in EXEMPT]


def all_snippets() -> list[Snippet]:
    return [s for path in doc_files() for s in extract(path.read_text(), path.relative_to(ROOT).as_posix())]


SNIPPETS = all_snippets()


@pytest.fixture(scope="module")
def hydra_conf() -> Iterator[None]:
    """Hydra's compose API on conf/, from the repository root (relative search paths)."""
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            yield
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("snippet", [s for s in SNIPPETS if s.kind == "command"], ids=lambda s: s.id)
def test_documented_command_composes(hydra_conf: None, snippet: Snippet) -> None:
    found = command_problem(snippet)
    assert found is None, f"{snippet.id}: `python train.py {snippet.text}`: {found}"


@pytest.mark.parametrize("snippet", [s for s in SNIPPETS if s.kind == "overrides"], ids=lambda s: s.id)
def test_documented_override_composes(hydra_conf: None, snippet: Snippet) -> None:
    found = override_problems(snippet)
    assert not found, f"{snippet.id}: `{snippet.text}` composes on no dataset × method or preset: {found}"


def test_configuration_defaults_table_is_current(hydra_conf: None) -> None:
    """docs/configuration.md's table is what scripts/effective_defaults.py makes of conf/ now."""
    spec = importlib.util.spec_from_file_location("effective_defaults", ROOT / "scripts" / "effective_defaults.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    path = ROOT / "docs" / "configuration.md"
    text = path.read_text()
    assert script.replace_block(text, script.render(script.rows()), path) == text, (
        "docs/configuration.md's defaults table is stale: python scripts/effective_defaults.py --write "
        "docs/configuration.md")


def test_docs_hold_commands_and_overrides() -> None:
    """The extractor finds what the docs are known to hold (a sweep, an inline override)."""
    kinds = {s.kind for s in SNIPPETS}
    assert kinds == {"command", "overrides"} and len(SNIPPETS) > 20


MADE_UP = """\
# A page

Train one model:

    .venv/bin/python train.py dataset=compas method=cdep \\
        trainer.max_epochs=2    # two epochs
    python train.py -m method=cdep,rrr seed=0,1 trainer.nonsense=3

Or `python train.py --cfg job dataset=<name>`, with `method.penalty.dropout=off` for the
original's CD, `trainer.precision=32\\|bf16\\|fp8` in a table, `SCALE=paper` for make, and
`method.penalty.no_such_key=true` nowhere, nor `trainer.nope=<n>`. λ folders read `lam=0.1`.

| COMPAS | `dataset=compas` | `dataset.keyword_bug=true` |
|---|---|---|
| presets | `scale=quick\\|paper` | `model=yournet` |

```bash
make tables ARGS="trainer.max_epochs=2"
python train.py dataset=X method=Y
python train.py method=cdep,rrr
```
"""


def test_extractor_and_checker_report_the_bad_ones(hydra_conf: None) -> None:
    snippets = extract(MADE_UP, "made_up.md")
    assert [(s.line, s.kind, s.text) for s in snippets] == [
        (5, "command", "dataset=compas method=cdep trainer.max_epochs=2"),
        (7, "command", "-m method=cdep,rrr seed=0,1 trainer.nonsense=3"),
        (9, "command", "--cfg job dataset=<name>"),
        (9, "overrides", "method.penalty.dropout=off"),
        (10, "overrides", "trainer.precision=32|bf16|fp8"),
        (11, "overrides", "method.penalty.no_such_key=true"),
        (11, "overrides", "trainer.nope=<n>"),
        (11, "overrides", "lam=0.1"),
        (13, "overrides", "dataset=compas"),
        (13, "overrides", "dataset.keyword_bug=true"),
        (15, "overrides", "scale=quick|paper"),
        (15, "overrides", "model=yournet"),
        (19, "command", "dataset=X method=Y"),
        (20, "command", "method=cdep,rrr"),
    ]
    results = {s.text: command_problem(s) if s.kind == "command" else override_problems(s) for s in snippets}
    bad = {"-m method=cdep,rrr seed=0,1 trainer.nonsense=3", "trainer.precision=32|bf16|fp8",
           "method.penalty.no_such_key=true", "trainer.nope=<n>", "method=cdep,rrr"}
    assert all(not found for text, found in results.items() if text not in bad), results
    assert "Could not override 'trainer.nonsense'" in results["-m method=cdep,rrr seed=0,1 trainer.nonsense=3"]
    assert results["trainer.precision=32|bf16|fp8"] == [
        "trainer.precision=fp8 -> ConfigError: trainer.precision='fp8' must be one of 32, bf16, 16."]
    assert results["method.penalty.no_such_key=true"] == [
        "method.penalty.no_such_key=true -> ConfigCompositionException: Could not override "
        "'method.penalty.no_such_key'."]
    assert results["method=cdep,rrr"] == "ValueError: method=cdep,rrr is a sweep: the command needs -m"
    assert results["trainer.nope=<n>"] == ["trainer.nope=<n>: its key is no key or group of any config"]
    skipped = {s.text: s.skipped for s in snippets if s.skipped}
    assert skipped == {"--cfg job dataset=<name>": ["dataset=<name>"], "trainer.nope=<n>": ["trainer.nope=<n>"],
                       "model=yournet": ["model=yournet"], "dataset=X method=Y": ["dataset=X", "method=Y"]}
    assert [s.not_config for s in snippets if s.not_config] == [["lam=0.1"]]
