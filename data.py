"""Preference and SFT data: files in the layouts people have, chat templates, tokenization,
truncation, batching, and a built-in synthetic set shaped the way the paper describes ambiguity.

A preference row becomes a Pair (prompt messages, chosen text, rejected text, margin, β);
tokenize_rows renders each prompt with a chat template, tokenizes it once and appends each answer's
tokens, so the prompt tokens of a pair are identical in both rows. An SFT row (a conversation) is
rendered through the same templates turn by turn, with the loss on the assistant turns. A
micro-batch is packed into one sequence without padding (pack), each pair's prompt once.
PairSampler decides which pairs each step trains on, the same for 1 or N processes.
`python data.py to-jsonl SPLIT.parquet OUT.jsonl` turns a hub parquet split into JSON lines.
"""

import argparse
import codecs
import functools
import importlib.util
import json
import math
import random
import shutil
import string
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch

from model import Packed


class DataError(ValueError):
    """Bad input; the message starts with the file and line (`data.jsonl:3: ...`)."""


ROLES = ("system", "user", "assistant")


@dataclass
class Pair:
    prompt: list  # messages [{"role", "content"}], ending with a user turn
    chosen: str
    rejected: str
    margin: float | None = None  # score_chosen - score_rejected (MixDPO)
    beta: float | None = None  # per-pair β (SP2DPO)


# ----------------------------------------------------------------------------- reading files

UTF16_BOMS = {codecs.BOM_UTF16_LE: "utf-16-le", codecs.BOM_UTF16_BE: "utf-16-be"}


def read_text(path: Path) -> str:
    """The file as text: UTF-8 (a BOM is skipped), or UTF-16 when it starts with a UTF-16 BOM, as
    Windows export tools write it. Any other undecodable byte is an error naming its line and
    column."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    encoding, bom = "utf-8", codecs.BOM_UTF8 if raw.startswith(codecs.BOM_UTF8) else b""
    for utf16_bom, utf16 in UTF16_BOMS.items():
        if raw.startswith(utf16_bom):
            encoding, bom = utf16, utf16_bom
    raw = raw[len(bom) :]
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        before = raw[: e.start].decode(encoding)
        line, column = before.count("\n") + 1, len(before) - before.rfind("\n")
        raise DataError(
            f"{path}:{line}: not {encoding.upper()[:6]} text (byte 0x{raw[e.start]:02x} at column "
            f"{column}); re-encode the file as UTF-8"
        ) from None


def parse_json(text: str, path, line: int | None = None):
    """json.loads with every way it can fail as a DataError at `path:line` (line: where the text
    starts in the file, else the line the decoder stopped at)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        where = f"{path}:{line or e.lineno}"
        raise DataError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
    except RecursionError:
        raise DataError(f"{path}:{line or 1}: JSON nested too deeply to read") from None
    except ValueError as e:  # an integer of more than 4300 digits
        raise DataError(f"{path}:{line or 1}: not readable JSON ({e})") from None


def json_value(value):
    """A value JSON can hold: numpy scalars and arrays as Python numbers and lists, NaN and
    infinities as null, bytes as text, dates as ISO strings, anything else unknown as its str()."""
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    if hasattr(value, "tolist"):  # numpy
        return json_value(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def parquet_rows(path: Path):
    """The rows of a parquet file as JSON values, read batch by batch."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow: pip install pyarrow") from None

    def rows():
        try:
            for batch in pq.ParquetFile(path).iter_batches():
                yield from (json_value(row) for row in batch.to_pylist())
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise DataError(f"{path}: not a readable parquet file ({e})") from None

    return rows()


def read_rows(path) -> list[tuple[str, dict]]:
    """(where, row) for each row of a JSON-lines file (or a JSON array, or parquet when pyarrow is
    installed); `where` is `file:line` for the error messages."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    text = read_text(path) if path.suffix != ".parquet" else None
    if text is None:
        rows = [(f"{path}:row {i + 1}", row) for i, row in enumerate(parquet_rows(path))]
    elif text_is_one_array(text):
        rows = [(f"{path}:item {i + 1}", row) for i, row in enumerate(parse_json(text, path))]
    else:
        # Split on "\n" alone: JSON strings may hold U+2028 and other breaks splitlines() splits at.
        lines = enumerate(text.split("\n"), 1)
        rows = [(f"{path}:{n}", parse_json(line, path, n)) for n, line in lines if line.strip()]
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def text_is_one_array(text: str) -> bool:
    """A JSON array file, not JSON lines whose first row happens to be an array."""
    first, _, rest = text.lstrip().partition("\n")
    if not first.startswith("[") or not rest.strip():
        return first.startswith("[")
    try:
        json.loads(first)
    except (ValueError, RecursionError):
        return True
    return False


def check_text(text: str, field: str, where: str) -> str:
    """A JSON escape like "\\ud800" gives a lone surrogate: a str that is no text, which no
    tokenizer encodes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(
            f"{where}: '{field}' holds a lone surrogate (\\u{ord(text[e.start]):04x}), which is "
            "not a character; fix that escape in the file"
        ) from None
    return text


def check_messages(messages, field, where) -> list:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: '{field}' must be a non-empty list of messages")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
            raise DataError(
                f"{where}: every message in '{field}' needs a 'role' and a string 'content'"
            )
        if m["role"] not in ROLES:
            raise DataError(
                f"{where}: unknown role {m['role']!r:.40} in '{field}' "
                "(expected system, user or assistant)"
            )
    return [
        {"role": m["role"], "content": check_text(m["content"], field, where)} for m in messages
    ]


def as_messages(value, role: str, field: str, where: str) -> list:
    """A field that is either one message's text (of `role`) or a list of messages."""
    if isinstance(value, str):
        return [{"role": role, "content": check_text(value, field, where)}]
    if isinstance(value, list):
        return check_messages(value, field, where)
    raise DataError(
        f"{where}: '{field}' must be a string or a list of messages, got {type(value).__name__}"
    )


def check_turn_order(messages: list, field: str, where: str) -> None:
    """What every template can render: an optional system turn first, then a user turn; no system
    turn later (Mistral's template has none: it folds the system text into the first user turn)."""
    roles = [m["role"] for m in messages]
    if "system" in roles[1:]:
        raise DataError(f"{where}: a system turn can only open the conversation in '{field}'")
    after_system = roles[1:] if roles[0] == "system" else roles
    if not after_system or after_system[0] != "user":
        raise DataError(
            f"{where}: the conversation in '{field}' must start with a user turn "
            "(after an optional system turn)"
        )


def split_hh(text: str) -> list:
    """Anthropic HH `\\n\\nHuman: ... \\n\\nAssistant: ...` -> messages (the final empty Assistant:
    dropped)."""
    parts = ("\n\n" + text.lstrip("\n")).split("\n\n")
    speakers, messages = {"Human:": "user", "Assistant:": "assistant"}, []
    for part in parts[1:]:
        role = next((r for s, r in speakers.items() if part.startswith(s)), None)
        if role is None and messages:  # a paragraph break inside a turn
            messages[-1]["content"] += "\n\n" + part
        elif role is not None:
            messages.append({"role": role, "content": part.split(":", 1)[1].strip()})
    return [m for m in messages if m["content"] or m["role"] == "user"]


def common_prefix_length(a: str, b: str) -> int:
    """Length of the longest common prefix, by bisection on slices (C-speed compares, not a char
    loop)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if a[:mid] == b[:mid] else (lo, mid - 1)
    return lo


def answer_from_messages(messages, prefix_len, field, where) -> str:
    rest = messages[prefix_len:]
    if len(rest) != 1 or rest[0]["role"] != "assistant":
        raise DataError(
            f"{where}: '{field}' must end in exactly one assistant turn after the prompt turns"
        )
    return rest[0]["content"]


def parse_row(row, where: str = "row", beta_column: str = "beta") -> Pair:
    """Any supported layout -> Pair: prompt/chosen/rejected strings; chosen/rejected message lists
    (UltraFeedback-binarized, TRL conversational; the prompt is the `prompt` field or the shared
    leading turns); Anthropic HH strings (the prompt is the common prefix up to the last Assistant
    turn)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    for field in ("chosen", "rejected"):
        if field not in row:
            raise DataError(f"{where}: missing field '{field}'")
        if not isinstance(row[field], (str, list)):
            raise DataError(
                f"{where}: '{field}' must be a string or a list of messages, "
                f"got {type(row[field]).__name__}"
            )
    chosen, rejected, prompt_msgs = row["chosen"], row["rejected"], None
    if row.get("prompt") is not None:
        prompt_msgs = as_messages(row["prompt"], "user", "prompt", where)
    if isinstance(chosen, list) or isinstance(rejected, list):
        chosen = check_messages(chosen, "chosen", where)
        rejected = check_messages(rejected, "rejected", where)
        # The answers are what follows the leading turns the two lists share; the prompt is the
        # `prompt` field when there is one (UltraFeedback, TRL), else those shared turns.
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        prompt_msgs = prompt_msgs or chosen[:shared]
        chosen = answer_from_messages(chosen, shared, "chosen", where)
        rejected = answer_from_messages(rejected, shared, "rejected", where)
    elif prompt_msgs is None:  # Anthropic HH: one string per answer, the dialogue included
        cut = chosen.rfind("\n\nAssistant:", 0, common_prefix_length(chosen, rejected))
        if cut < 0:
            raise DataError(
                f"{where}: missing field 'prompt' "
                "(and no '\\n\\nAssistant:' turn to split an HH dialogue at)"
            )
        cut += len("\n\nAssistant:")
        prompt_msgs = split_hh(check_text(chosen[:cut], "chosen", where))
        chosen, rejected = chosen[cut:], rejected[cut:]
    if not prompt_msgs or not any(m["content"].strip() for m in prompt_msgs):
        raise DataError(f"{where}: empty prompt")
    check_turn_order(prompt_msgs, "prompt", where)
    if prompt_msgs[-1]["role"] != "user":
        raise DataError(f"{where}: the prompt must end with a user turn")
    for field, text in (("chosen", chosen), ("rejected", rejected)):
        if not check_text(text, field, where).strip():
            raise DataError(f"{where}: '{field}' is empty")
    margin, beta = read_margin(row, where), read_beta(row, beta_column, where)
    return Pair(prompt_msgs, chosen, rejected, margin, beta)


def finite_number(value) -> float | None:
    """value as a finite float; None for anything else (a bool, a string, NaN, ±inf, an int past
    float range)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


def read_margin(row, where):
    if "score_chosen" not in row and "score_rejected" not in row:
        return None
    scores = finite_number(row.get("score_chosen")), finite_number(row.get("score_rejected"))
    # A NaN margin would pass for "no margin" in a batch (pack's NaN) and sort anywhere in the
    # curriculum.
    if None in scores or not math.isfinite(scores[0] - scores[1]):
        raise DataError(
            f"{where}: 'score_chosen' and 'score_rejected' must both be finite numbers, got "
            f"{row.get('score_chosen')!r:.40} and {row.get('score_rejected')!r:.40}"
        )
    return scores[0] - scores[1]


def read_beta(row, column, where):
    if column not in row:
        return None
    beta = finite_number(row[column])
    if beta is None or not beta > 0:
        raise DataError(
            f"{where}: '{column}' must be a positive finite number, got {row[column]!r:.40}"
        )
    return beta


# ----------------------------------------------------------------------------- chat templates


@dataclass(frozen=True)
class Template:
    bos: str  # "{bos}": the tokenizer family's own
    turns: dict  # role -> format of a whole turn, with {content}
    generation: str  # what opens the assistant's turn at the end of the prompt
    answer: str  # an answer's format: its text, then the end of turn the model learns to stop with
    system: str = ""  # preamble of a system turn that is always present (Llama 3.1)


# In every template an assistant turn inside a prompt starts with generation + answer, so that a
# conversation rendered turn by turn (SFT) is the prompt text of each of its turns followed by that
# turn.
LLAMA3_TURN = "<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>"
LLAMA3 = Template(
    "<|begin_of_text|>",
    {r: LLAMA3_TURN for r in ROLES},
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "{content}<|eot_id|>",
)
TEMPLATES = {
    "llama3": LLAMA3,
    # Llama 3.1 Instruct's official template opens every conversation with this system block.
    "llama31": Template(
        LLAMA3.bos,
        LLAMA3.turns,
        LLAMA3.generation,
        LLAMA3.answer,
        system="Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n",
    ),
    # Mistral Instruct has no system turn: a system message goes before the first user message.
    "mistral": Template(
        "<s>",
        {"user": "[INST] {content} [/INST]", "assistant": "{content}</s>"},
        "",
        "{content}</s>",
    ),
    "zephyr": Template(
        "{bos}",
        {r: "<|" + r + "|>\n{content}{eos}\n" for r in ROLES},
        "<|assistant|>\n",
        "{content}{eos}",
    ),
    "plain": Template(
        "{bos}",
        {
            "system": "{content}\n\n",
            "user": "Human: {content}\n\n",
            "assistant": "Assistant: {content}{eos}\n\n",
        },
        "Assistant:",
        " {content}{eos}",
    ),
}
# BOS / EOS of a tokenizer family, for the templates that use the tokenizer's own ({bos}, {eos}).
FAMILY_SPECIALS = [("<|begin_of_text|>", "<|end_of_text|>"), ("<s>", "</s>")]


def family_specials(tokenizer) -> dict:
    for bos, eos in FAMILY_SPECIALS:
        if tokenizer.token_to_id(bos) is not None and tokenizer.token_to_id(eos) is not None:
            return {"bos": bos, "eos": eos}
    raise DataError(f"the tokenizer has none of the BOS/EOS pairs {FAMILY_SPECIALS}")


def render_prompt(messages, template: Template, specials: dict) -> str:
    """The prompt text, from BOS to the opening of the assistant's turn. Contents are stripped of
    surrounding whitespace, as Llama 3's template does (`| trim`)."""
    messages = [{**m, "content": m["content"].strip()} for m in messages]
    if messages[0]["role"] == "system" and "system" not in template.turns:
        system, messages = messages[0]["content"], messages[1:]
        messages[0] = {**messages[0], "content": system + "\n\n" + messages[0]["content"]}
    if template.system:
        system = messages[0]["content"] if messages[0]["role"] == "system" else ""
        messages = [{"role": "system", "content": template.system + system}] + (
            messages[1:] if messages[0]["role"] == "system" else messages
        )
    turns = (
        template.turns[m["role"]].format(role=m["role"], content=m["content"], **specials)
        for m in messages
    )
    return template.bos.format(**specials) + "".join(turns) + template.generation


def render_answer(text: str, template: Template, specials: dict) -> str:
    return template.answer.format(content=text.strip(), **specials)


def jinja_literal(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def jinja_expression(fmt: str, content: str, role: str = "") -> str:
    """One of the Template's format strings as a Jinja expression: text quoted, {content} the given
    expression, {bos} and {eos} the tokenizer's tokens as Hugging Face passes them."""
    fields = {"content": content, "bos": "bos_token", "eos": "eos_token"}
    parts = []
    for text, field, _, _ in string.Formatter().parse(fmt.replace("{role}", role)):
        parts += [jinja_literal(text)] if text else []
        parts += [fields[field]] if field is not None else []
    return " + ".join(parts) or "''"


def chat_template_jinja(name: str) -> str:
    """A template of the table as a Hugging Face chat template (tokenizer_config.json's
    `chat_template`): it renders exactly what render_prompt renders, with add_generation_prompt; a
    conversation ending in an assistant turn renders as render_prompt of the turns before it +
    render_answer of that turn."""
    t = TEMPLATES[name]
    is_system = "messages[0]['role'] == 'system'"
    emit = lambda fmt, content, role="": "{{- " + jinja_expression(fmt, content, role) + " -}}"
    lines = [
        "{%- set system = (messages[0]['content'] | trim) if " + is_system + " else '' -%}",
        "{%- set turns = messages[1:] if " + is_system + " else messages -%}",
        emit(t.bos, "''"),
    ]
    if t.system:  # a system turn that is always there
        lines += [emit(t.turns["system"], jinja_literal(t.system) + " + system", "system")]
    elif "system" in t.turns:
        system_turn = emit(t.turns["system"], "system", "system")
        lines += ["{%- if " + is_system + " -%}" + system_turn + "{%- endif -%}"]
    lines += ["{%- for message in turns -%}", "{%- set content = message['content'] | trim -%}"]
    if "system" not in t.turns:  # the system text goes before the first turn's
        prepend = "{%- set content = system + '\\n\\n' + content -%}"
        lines += ["{%- if loop.first and " + is_system + " -%}" + prepend + "{%- endif -%}"]
    answer = emit(t.generation + t.answer, "content")
    lines += ["{%- if loop.last and message['role'] == 'assistant' -%}" + answer]
    lines += [
        "{%- elif message['role'] == '" + role + "' -%}" + emit(t.turns[role], "content", role)
        for role in ROLES
        if role in t.turns and role != "system"
    ]
    lines += ["{%- endif -%}", "{%- endfor -%}"]
    if t.generation:
        lines += ["{%- if add_generation_prompt -%}" + emit(t.generation, "") + "{%- endif -%}"]
    return "\n".join(lines)


def template_of_jinja(jinja: str) -> str | None:
    """Which built-in template a Hugging Face chat template is: one this project wrote, or one
    recognized by the markers of the official templates."""
    for name in TEMPLATES:
        if jinja == chat_template_jinja(name):
            return name
    if "<|start_header_id|>" in jinja:
        return "llama31" if "Cutting Knowledge Date" in jinja else "llama3"
    # Llama 2's has [INST] too, but its own system block.
    if "[INST]" in jinja and "<<SYS>>" not in jinja:
        return "mistral"
    if "<|user|>" in jinja and "<|assistant|>" in jinja:
        return "zephyr"
    return None


def read_tokenizer_config(weights_dir: Path) -> dict | None:
    file = weights_dir / "tokenizer_config.json"
    if not file.is_file():
        return None
    config = parse_json(read_text(file), file)
    if not isinstance(config, dict):
        raise DataError(f"{file}: not a JSON object")
    return config


def checkpoint_chat_template(weights_dir: Path, config: dict | None) -> str | None:
    """The chat template a Hugging Face checkpoint carries: `chat_template` in
    tokenizer_config.json (a string, or a list of {"name", "template"} of which the "default" one),
    else chat_template.jinja beside it, the file recent transformers versions write."""
    value = (config or {}).get("chat_template")
    if isinstance(value, list):
        defaults = [t for t in value if isinstance(t, dict) and t.get("name") == "default"]
        value = defaults[0].get("template") if defaults else None
    if isinstance(value, str):
        return value
    file = weights_dir / "chat_template.jinja"
    return read_text(file) if file.is_file() else None


def special_tokens_hint(weights_dir: Path) -> str:
    try:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(weights_dir / "tokenizer.json"))
    except Exception:  # only a hint: a missing or unreadable tokenizer gives none
        return ""
    if tokenizer.token_to_id("<|start_header_id|>") is not None:
        return (
            "Its tokenizer has Llama 3's header tokens (<|start_header_id|>): llama31 or llama3 "
            "for Meta's instruct models, zephyr for a base model fine-tuned the Zephyr way. "
        )
    if tokenizer.token_to_id("<s>") is not None:
        return (
            "Its tokenizer has Mistral's <s>: mistral for Mistral Instruct, zephyr for a base "
            "model fine-tuned the Zephyr way. "
        )
    return ""


def template_from_checkpoint(weights_dir) -> str:
    """The name of the chat template a checkpoint was trained with: the one this project recorded
    when it saved it (`aao_template` in tokenizer_config.json), else its Hugging Face chat template
    recognized."""
    weights_dir = Path(weights_dir)
    config = read_tokenizer_config(weights_dir)
    choices = ", ".join(sorted(TEMPLATES))
    recorded = (config or {}).get("aao_template")
    if recorded is not None:
        if recorded not in TEMPLATES:
            raise DataError(
                f"{weights_dir / 'tokenizer_config.json'}: aao_template {recorded!r:.40} "
                f"is not one of {choices}"
            )
        return recorded
    jinja = checkpoint_chat_template(weights_dir, config)
    name = template_of_jinja(jinja) if jinja is not None else None
    if name is not None:
        return name
    if jinja is not None:
        found = f"a chat_template this project does not know ({jinja[:80]!r})"
    elif config is None:
        found = "no tokenizer_config.json"
    else:
        found = "no chat_template in its tokenizer_config.json"
    raise DataError(
        f"{weights_dir}: cannot tell which chat template the model was trained with: {found}. "
        f"{special_tokens_hint(weights_dir)}Pass --template (one of {choices})."
    )


# Keys of tokenizer_config.json that name special tokens; transformers passes them to a chat
# template.
SPECIAL_KEYS = "bos_token eos_token unk_token pad_token sep_token cls_token mask_token".split()


def special_tokens(config: dict | None, tokenizer) -> dict:
    """{"bos_token": "<s>", ...}: the special tokens a checkpoint names in tokenizer_config.json (a
    string, or an AddedToken's {"content"}); a tokenizer that comes without that file (the tiny one)
    uses its family's BOS and EOS, and one with neither gets none (a template that needs none still
    renders)."""
    if config is None:
        try:
            family = family_specials(tokenizer)
        except DataError:
            return {}
        return {"bos_token": family["bos"], "eos_token": family["eos"]}
    specials = {}
    for key in SPECIAL_KEYS:
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            specials[key] = value
    return specials


@functools.lru_cache(maxsize=8)
def compiled_jinja(source: str):
    """A checkpoint's chat template compiled as transformers compiles it: a sandbox (the template is
    code from the hub), trim_blocks and lstrip_blocks, loop controls, and its globals and tojson
    filter."""
    try:
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise DataError(
            "rendering a checkpoint's own chat template needs jinja2: pip install jinja2"
        ) from None

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def jinja_available() -> bool:
    return importlib.util.find_spec("jinja2") is not None


@dataclass(frozen=True)
class Chat:
    """How one checkpoint writes a conversation as text: its own Jinja chat template, rendered as
    transformers' apply_chat_template renders it, or a built-in Template; with the special tokens
    (bos_token, eos_token, ...) that the template is rendered with."""

    name: str  # a built-in template's name, or "checkpoint": the checkpoint's own Jinja
    specials: dict
    jinja: str | None = None

    def render(self, messages: list, add_generation_prompt: bool) -> str:
        """The conversation as text: with add_generation_prompt, up to the opening of the
        assistant's turn; without, a conversation that ends with an assistant turn, that turn
        included."""
        if self.jinja is not None:
            try:
                return compiled_jinja(self.jinja).render(
                    messages=messages, add_generation_prompt=add_generation_prompt, **self.specials
                )
            except Exception as e:  # raise_exception, or any error the template's own code makes
                raise DataError(
                    f"the checkpoint's chat template failed: {type(e).__name__}: {e}"
                ) from None
        t = TEMPLATES[self.name]
        fields = {k: self.specials.get(k + "_token", "") for k in ("bos", "eos")}
        if add_generation_prompt:
            return render_prompt(messages, t, fields)
        prompt = render_prompt(messages[:-1], t, fields)
        return prompt + render_answer(messages[-1]["content"], t, fields)


def split_answer(chat: Chat, prompt: list, answer: str, where: str) -> tuple[str, str]:
    """(prompt text, answer text) as TRL splits a conversational pair: the prompt rendered with the
    generation prompt, the answer what the whole conversation adds after it (its end of turn
    included)."""
    turn = {"role": "assistant", "content": answer}
    try:
        prompt_text = chat.render(prompt, add_generation_prompt=True)
        whole = chat.render(prompt + [turn], add_generation_prompt=False)
    except DataError as e:
        raise DataError(f"{where}: {e}") from None
    if not whole.startswith(prompt_text):
        raise DataError(
            f"{where}: the chat template renders the prompt ({prompt_text[-60:]!r}) differently "
            f"inside the whole conversation ({whole[: len(prompt_text)][-60:]!r}), so no answer "
            "can be cut from it"
        )
    return prompt_text, whole[len(prompt_text) :]


def load_chat(weights_dir, tokenizer, given: str | None = None) -> Chat:
    """The chat a checkpoint was trained with. Its own Jinja template is the truth when jinja2 is
    installed; a template this project recorded when it saved the checkpoint (`aao_template`), or
    --template (given), is a built-in; without jinja2 a checkpoint template that is a built-in's is
    rendered by the built-in."""
    weights_dir = Path(weights_dir) if weights_dir is not None else None
    config = read_tokenizer_config(weights_dir) if weights_dir is not None else None
    specials = special_tokens(config, tokenizer)
    if given is not None:
        return Chat(given, specials)
    if config is not None and "aao_template" not in config and jinja_available():
        jinja = checkpoint_chat_template(weights_dir, config)
        if jinja is not None:
            return Chat("checkpoint", specials, jinja)
    return Chat(template_from_checkpoint(weights_dir), specials)


def end_of_turn(chat: Chat, tokenizer) -> int | None:
    """The id of the token that ends an assistant turn: the first special token after an answer's
    text (<|eot_id|>, <|im_end|>, </s>, ...); None when the template ends turns with plain text."""
    answer = split_answer(chat, [{"role": "user", "content": "Hi."}], "Yes.", "end of turn")[1]
    special = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    ids = tokenizer.encode(answer, add_special_tokens=False).ids
    return next((i for i in ids if i in special), None)


def answer_stop_ids(chat: Chat, tokenizer) -> list[int]:
    """Where generation stops: the template's end of turn, then the tokenizer's EOS."""
    eos_token = chat.specials.get("eos_token")
    eos = tokenizer.token_to_id(eos_token) if eos_token else None
    ids = [i for i in (end_of_turn(chat, tokenizer), eos) if i is not None]
    if not ids:
        raise DataError(
            f"chat template {chat.name}: no special token ends an answer and the tokenizer names "
            "no EOS, so generation would never stop"
        )
    return list(dict.fromkeys(ids))


def as_chat(template, tokenizer) -> Chat:
    """A Chat, or a built-in template's name rendered with the tokenizer's family's tokens."""
    if isinstance(template, Chat):
        return template
    return Chat(template, special_tokens(None, tokenizer))


CHECKPOINT_TOKENIZER_FILES = (
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
)


def write_tokenizer_config(out_dir, chat: Chat, source_dir=None) -> None:
    """The chat template files of a saved checkpoint, so that the next stage (SFT -> preference
    optimization -> generation) renders what this stage trained on. A checkpoint's own template is
    carried unchanged, with its special tokens; a built-in one is written as Jinja (chat_template)
    into the source's tokenizer_config.json, with `aao_template` naming it."""
    out_dir, source_dir = Path(out_dir), Path(source_dir) if source_dir is not None else None
    if chat.jinja is not None:
        for name in CHECKPOINT_TOKENIZER_FILES:
            if source_dir is not None and (source_dir / name).is_file():
                shutil.copyfile(source_dir / name, out_dir / name)
        return
    config = (read_tokenizer_config(source_dir) if source_dir is not None else None) or {}
    jinja = checkpoint_chat_template(source_dir, config) if source_dir is not None else None
    if jinja is None or template_of_jinja(jinja) != chat.name:
        config["chat_template"] = chat_template_jinja(chat.name)
    elif "chat_template" not in config:  # it came from chat_template.jinja, which is not copied
        config["chat_template"] = jinja
    config["aao_template"] = chat.name
    # The tokens the template was rendered with, so that the Jinja ({{ bos_token }},
    # {{ eos_token }}) renders what the model was trained on; EOS, where generation stops, is the
    # token that ends an answer (Llama 3.1 base's config says <|end_of_text|>, but a llama3-template
    # answer ends in <|eot_id|>).
    config.update({k: chat.specials[k] for k in ("bos_token",) if k in chat.specials})
    tokenizer_file = out_dir / "tokenizer.json"
    if tokenizer_file.is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        end = end_of_turn(chat, tokenizer)
        if end is not None:
            config["eos_token"] = tokenizer.id_to_token(end)
    text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    (out_dir / "tokenizer_config.json").write_text(text, encoding="utf-8")


# ----------------------------------------------------------------------------- tokenization


def encode(tokenizer, texts: list) -> list[list[int]]:
    # add_special_tokens=False: a template may write BOS itself; leading_specials adds the
    # post-processor's BOS where it does not. encode_batch tokenizes on every core.
    return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]


def leading_specials(tokenizer) -> list[int]:
    """The ids the tokenizer's post-processor writes before a text (Llama's and Mistral's: BOS)."""
    plain, full = (tokenizer.encode("a", add_special_tokens=s).ids for s in (False, True))
    starts = [i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain]
    return full[: starts[0]] if starts else []


def with_one_bos(ids: list, lead: list) -> list:
    """A prompt's ids with the post-processor's leading tokens exactly once: kept where the template
    wrote them (Llama 3's writes {{ bos_token }}), added where it did not (a ChatML template)."""
    return ids if not lead or ids[: len(lead)] == lead else lead + ids


def instruction_prompts(chat: Chat, tokenizer, instructions: list) -> list[list[int]]:
    """Each instruction as one user turn, rendered up to the assistant's answer and tokenized as the
    prompts of training are: what generation starts from."""
    texts = [
        chat.render([{"role": "user", "content": text}], add_generation_prompt=True)
        for text in instructions
    ]
    lead = leading_specials(tokenizer)
    return [with_one_bos(ids, lead) for ids in encode(tokenizer, texts)]


def truncate_pair(
    prompt: list, chosen: list, rejected: list, max_length: int, max_prompt_length: int
) -> dict:
    """Cut the prompt from the left to max_prompt_length (its end kept, and BOS), then the answers
    from the right so that prompt + answer fits max_length. An answer left with no room comes back
    empty."""
    prompt_cut = len(prompt) > max_prompt_length
    if prompt_cut:
        prompt = prompt[:1] + prompt[len(prompt) - max_prompt_length + 1 :]
    room = max(0, max_length - len(prompt))
    return {
        "prompt_ids": prompt,
        "chosen_ids": chosen[:room],
        "rejected_ids": rejected[:room],
        "prompt_truncated": prompt_cut,
        "answer_truncated": max(len(chosen), len(rejected)) > room,
    }


def tokenize_rows(
    tokenizer,
    rows,
    chat,
    max_length=1024,
    max_prompt_length=512,
    keep_identical=False,
    beta_column="beta",
) -> tuple[list, dict]:
    """(where, row) pairs of preference rows -> tokenized pairs and a report of what was dropped or
    cut. Each pair: prompt_ids (rendered with the chat template, tokenized once), chosen_ids and
    rejected_ids (what the conversation adds after the prompt: the answer and its end of turn,
    tokenized on its own), truncated to max_prompt_length and max_length; margin, beta, where, and
    what was truncated."""
    chat = as_chat(chat, tokenizer)
    parsed = [(where, parse_row(row, where, beta_column)) for where, row in rows]
    kept = [(w, p) for w, p in parsed if keep_identical or p.chosen.strip() != p.rejected.strip()]
    texts = []
    for w, p in kept:
        prompt, chosen = split_answer(chat, p.prompt, p.chosen, w)
        texts += [prompt, chosen, split_answer(chat, p.prompt, p.rejected, w)[1]]
    ids, lead = encode(tokenizer, texts), leading_specials(tokenizer)
    tokenized = []
    for i, (w, p) in enumerate(kept):
        prompt, chosen, rejected = with_one_bos(ids[3 * i], lead), ids[3 * i + 1], ids[3 * i + 2]
        cut = truncate_pair(prompt, chosen, rejected, max_length, max_prompt_length)
        tokenized.append({**cut, "margin": p.margin, "beta": p.beta, "where": w})
    pairs = [t for t in tokenized if t["chosen_ids"] and t["rejected_ids"]]
    report = {
        "rows": len(rows),
        "dropped_identical": len(parsed) - len(kept),
        "dropped_no_answer_room": len(kept) - len(pairs),
        "prompt_truncated": sum(p["prompt_truncated"] for p in pairs),
        "answer_truncated": sum(p["answer_truncated"] for p in pairs),
        "pairs": len(pairs),
    }
    return pairs, report


# ----------------------------------------------------------------------------- SFT examples


def sft_conversation(row, where: str) -> tuple[list, int]:
    """An SFT row -> (messages ending in an assistant turn, index of the first turn the loss may
    cover). Layouts: {"messages"} (UltraChat-200k, TRL conversational: every assistant turn is
    trained; UltraChat's "prompt" and "prompt_id" beside it are ignored); {"prompt", "completion"}
    (TRL: the completion's assistant turns); a preference row (its chosen answer after its
    prompt)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    if "messages" in row:
        field, messages, first = "messages", check_messages(row["messages"], "messages", where), 0
    elif "chosen" in row:
        pair = parse_row(row, where)
        return pair.prompt + [{"role": "assistant", "content": pair.chosen}], len(pair.prompt)
    elif "prompt" in row and "completion" in row:
        prompt = as_messages(row["prompt"], "user", "prompt", where)
        completion = as_messages(row["completion"], "assistant", "completion", where)
        field, messages, first = "completion", prompt + completion, len(prompt)
    else:
        raise DataError(
            f"{where}: an SFT row needs 'messages', or 'prompt' and 'completion', or 'chosen' "
            f"(found {', '.join(map(repr, list(row)[:8])) or 'no keys'})"
        )
    check_turn_order(messages, field, where)
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the conversation in '{field}' must end with an assistant turn")
    for i, m in enumerate(messages):
        if not m["content"].strip():
            raise DataError(f"{where}: turn {i + 1} ({m['role']}) of the conversation is empty")
    return messages, first


def sft_pieces(messages: list, first: int, chat, where: str = "row") -> list[tuple[str, int]]:
    """The rendered conversation as (text, in_loss) pieces: before each trained assistant turn, the
    rest of the prompt that leads to it (the turns before it with the generation prompt, as a
    preference pair on that turn would see it), then the turn as its answer: its text and end of
    turn, which the loss covers."""
    pieces, text = [], ""
    for k, m in enumerate(messages):
        if k < first or m["role"] != "assistant":
            continue
        prompt, answer = split_answer(chat, messages[:k], m["content"], where)
        if not prompt.startswith(text):
            raise DataError(
                f"{where}: the chat template renders the turns before turn {k + 1} differently "
                "from the conversation that led to them, so the turns cannot be trained in one row"
            )
        pieces += [(prompt[len(text) :], 0), (answer, 1)]
        text = prompt + answer
    return pieces


def sft_examples(tokenizer, rows, chat, max_length: int = 1024) -> tuple[list, dict]:
    """(where, row) SFT rows -> examples {input_ids, loss_mask (1 on the tokens the loss covers),
    where}, truncated from the right to max_length, and a report. Each piece is tokenized on its
    own, so a single turn gives exactly prompt_ids + chosen_ids of the preference pair with the same
    prompt and answer."""
    chat, lead = as_chat(chat, tokenizer), leading_specials(tokenizer)
    conversations = [(w, sft_pieces(*sft_conversation(row, w), chat, w)) for w, row in rows]
    ids = iter(encode(tokenizer, [text for _, pieces in conversations for text, _ in pieces]))
    examples, truncated = [], 0
    for where, pieces in conversations:
        input_ids, loss_mask = [], []
        for _, in_loss in pieces:
            piece = next(ids)
            if not input_ids:
                piece = with_one_bos(piece, lead)
            input_ids += piece
            loss_mask += [in_loss] * len(piece)
        if any(loss_mask[:max_length]):
            truncated += len(input_ids) > max_length
            input_ids, loss_mask = input_ids[:max_length], loss_mask[:max_length]
            examples.append({"input_ids": input_ids, "loss_mask": loss_mask, "where": where})
    report = {
        "rows": len(rows),
        "dropped_no_answer_room": len(rows) - len(examples),
        "truncated": truncated,
        "examples": len(examples),
    }
    return examples, report


# ----------------------------------------------------------------------------- batching


def packed_layout(items: list, sft: bool) -> tuple[list, list, list, list]:
    """Where pack puts each token, as host lists: the tokens, each one's position in its unpacked
    row, the segments (query start, length, key ranges) and the answers (packed index of each
    answer token, packed index of the state that predicts it), chosen ones then rejected ones."""
    tokens, positions, segments, answers = [], [], [], []

    def place(ids, first_position):  # append a run of tokens; -> where it starts
        start = len(tokens)
        tokens.extend(ids)
        positions.extend(range(first_position, first_position + len(ids)))
        return start

    if sft:
        for e in items:
            s = place(e["input_ids"], 0)
            segments.append((s, len(e["input_ids"]), [(s, len(e["input_ids"]))]))
            # Token 0 has no predictor.
            at = [s + t for t, m in enumerate(e["loss_mask"]) if m and t > 0]
            answers.append((at, [i - 1 for i in at]))
        return tokens, positions, segments, answers
    chosen, rejected = [], []
    for p in items:
        P = len(p["prompt_ids"])
        assert P > 0, "a prompt has at least its template's tokens"
        s = place(p["prompt_ids"], 0)
        segments.append((s, P, [(s, P)]))
        for side, out in (("chosen_ids", chosen), ("rejected_ids", rejected)):
            a = place(p[side], P)
            segments.append((a, len(p[side]), [(s, P), (a, len(p[side]))]))
            at = list(range(a, a + len(p[side])))
            # The first answer token is read off the prompt's end.
            out.append((at, [s + P - 1] + at[:-1]))
    return tokens, positions, segments, chosen + rejected


def packed_tensors(tokens: list, positions: list, segments: list, answers: list) -> Packed:
    """The layout as a Packed: the indices of every segment's keys, the cumulative query and key
    lengths, and each answer token's place in the packed sequence and in the (rows, width) grid."""
    width = max(len(at) for at, _ in answers)
    grid = [r * width + j for r, (at, _) in enumerate(answers) for j in range(len(at))]
    answer_at = torch.tensor([i for at, _ in answers for i in at])
    long = lambda x: torch.tensor(x, dtype=torch.long)
    cumulative = lambda n: torch.tensor([0] + n, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    query_lengths = [n for _, n, _ in segments]
    key_lengths = [sum(n for _, n in keys) for _, _, keys in segments]
    key_index = [s + j for _, _, keys in segments for s, n in keys for j in range(n)]
    predicted_from = [i for _, f in answers for i in f]
    return Packed(
        torch.tensor(tokens),
        long(positions),
        long(key_index),
        cumulative(query_lengths),
        cumulative(key_lengths),
        query_lengths,
        key_lengths,
        answer_at,
        long(predicted_from),
        long(grid),
        len(answers),
        width,
    )


def pack(items: list, sft: bool) -> dict:
    """Items -> one packed sequence, no padding, and the per-answer grids the objective reads.

    A pair packs as [prompt | chosen | rejected]: the prompt runs through the layers once; each
    answer's queries see the prompt's keys and its own keys causally (never the other answer's), at
    the positions of its unpacked row (the answer's continue from the prompt's length), so every
    log-prob is the padded row's. An SFT example is one segment of its own. -> {"packed": Packed,
    "answer_mask" (rows, width), "answer_ids" (rows, width), and for pairs margin (B,) and beta
    (B,), NaN where a pair has none}."""
    packed = packed_tensors(*packed_layout(items, sft))
    cells, width = packed.rows * packed.width, packed.width
    at, tokens = packed.answer_index, packed.input_ids[packed.answer_at]
    answer_ids = torch.zeros(cells, dtype=torch.long).index_put_((at,), tokens)
    answer_mask = torch.zeros(cells, dtype=torch.long).index_fill_(0, at, 1)
    batch = {
        "packed": packed,
        "answer_mask": answer_mask.view(-1, width),
        "answer_ids": answer_ids.view(-1, width),
    }
    if not sft:
        nan = float("nan")
        batch["margin"] = torch.tensor([nan if p["margin"] is None else p["margin"] for p in items])
        batch["beta"] = torch.tensor([nan if p["beta"] is None else p["beta"] for p in items])
    return batch


def micro_batch(items: list, indices: list, sft: bool, device) -> dict:
    """Items -> the packed micro-batch on the device; every index is computed here on the host, so
    that the device never waits on a nonzero()."""
    batch = pack([items[i] for i in indices], sft)
    if device.type == "cuda":  # pinned memory: the copy runs beside the GPU's work
        return {
            k: v.to(device) if k == "packed" else v.pin_memory().to(device, non_blocking=True)
            for k, v in batch.items()
        }
    return {k: v.to(device) for k, v in batch.items()}


def mismatched_pairs(items: list, indices: list, max_length: int) -> list:
    """KTO's mismatched (prompt, answer) examples of a micro-batch, as TRL builds them: the answers
    shifted by one within the batch. TRL shifts its 2B examples [chosen ...; rejected ...] by one;
    here each prompt takes the previous pair's two answers (the first prompt the last pair's), the
    same 2B mismatched examples up to which slot holds them, as pairs: pack's layout, each prompt
    through the layers once. Cut to max_length as TRL's collator cuts prompt + answer. With one
    pair the answers are its own: the trainer refuses a micro-batch of 1 for KTO."""
    pairs = [items[i] for i in indices]
    mismatched = []
    for pair, previous in zip(pairs, pairs[-1:] + pairs[:-1]):
        room = max(1, max_length - len(pair["prompt_ids"]))
        mismatched.append(
            {
                "prompt_ids": pair["prompt_ids"],
                "chosen_ids": previous["chosen_ids"][:room],
                "rejected_ids": previous["rejected_ids"][:room],
                "margin": None,
                "beta": None,
            }
        )
    return mismatched


def segment_lengths(items: list, indices: list) -> list[tuple[int, int, int]]:
    """(queries, keys, answer tokens) of each segment pack makes of the items: per pair the prompt
    (P, P, 0) and each answer (A, P + A, A); per SFT example (T, T, its loss tokens)."""
    out = []
    for item in (items[i] for i in indices):
        if "input_ids" in item:
            out.append((len(item["input_ids"]), len(item["input_ids"]), sum(item["loss_mask"][1:])))
        else:
            P, answers = len(item["prompt_ids"]), (item["chosen_ids"], item["rejected_ids"])
            out += [(P, P, 0)] + [(len(a), P + len(a), len(a)) for a in answers]
    return out


def hold_out(items: list, n: int, seed: int) -> tuple[list, list]:
    """(training, held-out) items: the first n of a seeded shuffle held out."""
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    return [items[i] for i in order[n:]], [items[i] for i in order[:n]]


def check_pair_columns(pairs: list, beta_column: str | None, mixdpo: bool) -> None:
    """What MixDPO and SP2DPO read must be in every row, held-out rows included (their β enters
    evaluation)."""
    for needed, key, what in (
        (beta_column, "beta", f"--beta-column {beta_column}: the row has no such column"),
        (mixdpo, "margin", "MixDPO needs score_chosen and score_rejected in every row"),
    ):
        missing = [p["where"] for p in pairs if p[key] is None] if needed else []
        if missing:
            more = f" ({len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DataError(f"{missing[0]}: {what}{more}")


class PairSampler:
    """Which pairs each optimizer step trains on. Step s of a run is a global batch of
    `global_batch` pairs from a fixed order per epoch (shuffled by seed and epoch, or easy -> hard
    by margin for the MixDPO curriculum); rank r of N takes the r-th slice of it, so N processes
    train on exactly the batches one process would. The position is the step: a resumed run asks
    for batch(step) again."""

    def __init__(self, n_pairs: int, global_batch: int, seed=0, rank=0, world_size=1, margins=None):
        if global_batch % world_size:
            raise DataError(
                f"--batch-size {global_batch} must be a multiple of the {world_size} processes"
            )
        if n_pairs < global_batch:
            raise DataError(f"{n_pairs} training pairs are fewer than one batch of {global_batch}")
        self.n, self.global_batch, self.seed = n_pairs, global_batch, seed
        self.rank, self.world, self.margins = rank, world_size, margins
        self.steps_per_epoch = n_pairs // global_batch  # the last partial batch is dropped
        self._order = (None, None)

    def order(self, epoch: int) -> list[int]:
        if self._order[0] != epoch:
            idx = list(range(self.n))
            random.Random(self.seed * 100_003 + epoch).shuffle(idx)
            # Large margin = easy first; the sort is stable: ties stay shuffled.
            if self.margins is not None:
                idx.sort(key=lambda i: -self.margins[i])
            self._order = (epoch, idx)
        return self._order[1]

    def batch(self, step: int) -> list[int]:
        """Indices of this rank's pairs at a step."""
        epoch, i = divmod(step, self.steps_per_epoch)
        global_batch = self.order(epoch)[i * self.global_batch : (i + 1) * self.global_batch]
        share = self.global_batch // self.world
        return global_batch[self.rank * share : (self.rank + 1) * share]


def micro_batches(indices: list, size: int) -> list[list]:
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def lockstep_chunks(n: int, micro: int, rank: int, world: int):
    """(real indices, weight) of a rank's micro-batches over n items, for a pass in lockstep (FSDP
    gathers weights collectively, so every rank must run as many forwards as the others): rank r
    takes items r, r + world, ...; a chunk of padding alone runs item 0 with weight 0."""
    share = list(range(rank, n, world))
    share += [-1] * (-(-n // world) - len(share))
    for chunk in micro_batches(share, micro):
        real = [i for i in chunk if i >= 0]
        yield real or [0], float(len(real))


# ----------------------------------------------------------------------------- the synthetic set

# fmt: off
CAPITALS = [
    ("France", "Paris"), ("Spain", "Madrid"), ("Italy", "Rome"), ("Germany", "Berlin"),
    ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Peru", "Lima"), ("Kenya", "Nairobi"),
    ("Canada", "Ottawa"), ("Norway", "Oslo"), ("Greece", "Athens"), ("Chile", "Santiago"),
    ("Cuba", "Havana"), ("Poland", "Warsaw"), ("Austria", "Vienna"), ("Ireland", "Dublin"),
]
COLORS = [
    ("banana", "yellow"), ("grass", "green"), ("sky", "blue"), ("snow", "white"),
    ("coal", "black"), ("tomato", "red"), ("carrot", "orange"), ("plum", "purple"),
    ("lemon", "yellow"), ("leaf", "green"), ("cherry", "red"), ("chocolate", "brown"),
]
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("early", "late"),
    ("happy", "sad"), ("light", "dark"), ("old", "young"), ("open", "closed"), ("full", "empty"),
]
# fmt: on
TASKS = {  # name: (questions, answer sentence, facts); the fact's value is the key token
    "capital": (
        [
            "What is the capital of {x}?",
            "Which city is the capital of {x}?",
            "Name the capital of {x}.",
        ],
        "The capital of {x} is {y}.",
        CAPITALS,
    ),
    "color": (
        ["What color is {x}?", "Which color does {x} have?", "Tell me the color of {x}."],
        "The color of {x} is {y}.",
        COLORS,
    ),
    "opposite": (
        [
            "What is the opposite of {x}?",
            "Give the opposite of {x}.",
            "Which word means the opposite of {x}?",
        ],
        "The opposite of {x} is {y}.",
        OPPOSITES,
    ),
    "sum": (
        ["What is {x}?", "Compute {x}.", "How much is {x}?"],
        "{x} is {y}.",
        [(f"{a} plus {b}", str(a + b)) for a in range(1, 10) for b in range(1, 10)],
    ),
}
SUFFIXES = [
    "",
    " I hope this helps.",
    " Let me know if you have more questions.",
    " That is the answer.",
]
EVASIONS = [
    "I am not sure about that, sorry.",
    "I do not know the answer to that question.",
    "That is a hard question, ask someone else.",
]


def synthetic_pair(rng: random.Random) -> dict:
    """One pair. Mostly key-token pairs: both answers say the same sentence with the same suffix,
    and only the fact's value (right vs wrong) decides which is better: ambiguous content around a
    few key tokens. One pair in five differs freely: a right answer against an evasion."""
    task = rng.choice(sorted(TASKS))
    questions, sentence, facts = TASKS[task]
    x, y = rng.choice(facts)
    wrong = rng.choice(sorted({v for _, v in facts} - {y}))
    suffix = rng.choice(SUFFIXES)
    chosen = sentence.format(x=x, y=y) + suffix
    free = rng.random() < 0.2
    rejected = rng.choice(EVASIONS) if free else sentence.format(x=x, y=wrong) + suffix
    # Synthetic difficulty scores for MixDPO: an evasion is easy to tell apart, a wrong value is
    # harder.
    return {
        "prompt": rng.choice(questions).format(x=x),
        "chosen": chosen,
        "rejected": rejected,
        "score_chosen": 9.0,
        "score_rejected": 2.0 if free else 6.0,
    }


def synthetic_rows(seed: int = 0, n_train: int = 2048, n_heldout: int = 256) -> tuple[list, list]:
    """Train and held-out rows as (where, row). Held-out pairs use the same facts in combinations
    (question, wrong value, suffix) that never occur in training."""
    rng = random.Random(seed)
    seen, splits = set(), []
    for n, name in ((n_train, "train"), (n_heldout, "heldout")):
        rows = []
        while len(rows) < n:
            row = synthetic_pair(rng)
            key = (row["prompt"], row["chosen"], row["rejected"])
            if name == "train" or key not in seen:
                seen.add(key)
                rows.append((f"synthetic-{name}:{len(rows) + 1}", row))
        splits.append(rows)
    return splits[0], splits[1]


# Llama 3's special tokens: the tiny tokenizer has them, so every template renders with it.
LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]


def tiny_tokenizer(vocab_size: int = 640):
    """The tiny preset's tokenizer: byte-level BPE (any text encodes) trained in code on the
    synthetic set, so its words are single tokens; with Llama 3's special tokens, so every template
    renders."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=LLAMA3_SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    train, heldout = synthetic_rows(0)
    texts = []
    for _, r in train + heldout:
        texts += ["Human: " + r["prompt"], "Assistant: " + r["chosen"], r["rejected"]]
    tok.train_from_iterator(texts, trainer)
    return tok


# ----------------------------------------------------------------------------- command line


def parquet_to_jsonl(sources: list, target) -> int:
    """Parquet files as the hub serves a split (UltraFeedback's
    data/train_prefs-00000-of-00001.parquet, or UltraChat's three train_sft shards) -> one
    JSON-lines file, without the datasets library; returns the number of rows."""
    sources, target = [Path(s) for s in sources], Path(target)
    for source in sources:
        if not source.is_file():
            raise DataError(f"{source}: no such file")
    target.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    try:
        with open(target, "w", encoding="utf-8") as out:
            for source in sources:
                for row in parquet_rows(source):
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
                    n += 1
    except DataError:
        target.unlink()  # no half-written file that a later run would read as the whole split
        raise
    return n


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Data tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    to_jsonl = commands.add_parser(
        "to-jsonl", help="turn a parquet split into JSON lines (needs pyarrow)"
    )
    to_jsonl.add_argument(
        "sources", nargs="+", help="parquet files, e.g. data/train_prefs-00000-of-00001.parquet"
    )
    to_jsonl.add_argument(
        "target", help="the JSON-lines file to write, e.g. ultrafeedback/train_prefs.jsonl"
    )
    args = parser.parse_args(argv)
    try:
        n = parquet_to_jsonl(args.sources, args.target)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.target}: {n} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
