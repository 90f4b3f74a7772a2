"""Preference data: files in the layouts people have, chat templates, tokenization, truncation, batching,
and a built-in synthetic set shaped the way the paper describes ambiguity.

A row becomes a Pair (prompt messages, chosen text, rejected text, margin, β); tokenize_pair renders the
prompt with a chat template, tokenizes it once and appends each answer's tokens, so the prompt tokens
of a pair are identical in both rows. Batches hold [chosen; rejected] right-padded, with a mask over
answer tokens. PairSampler decides which pairs each step trains on, the same for 1 or N processes.
"""
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch


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

def read_rows(path) -> list[tuple[str, dict]]:
    """(where, row) for each row of a JSON-lines file (or a JSON array, or parquet when pyarrow is
    installed); `where` is `file:line` for the error messages."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), or convert it to "
                            "JSON lines first, e.g. datasets.Dataset.from_parquet(path).to_json('data.jsonl')") from None
        return [(f"{path}:row {i + 1}", row) for i, row in enumerate(pq.read_table(path).to_pylist())]
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            return [(f"{path}:item {i + 1}", row) for i, row in enumerate(json.loads(text))]
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append((f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg}, column {e.colno})") from None
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def check_messages(messages, field, where) -> list:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: '{field}' must be a non-empty list of messages")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
            raise DataError(f"{where}: every message in '{field}' needs a 'role' and a string 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: unknown role {m['role']!r} in '{field}' (expected system, user or assistant)")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def split_hh(text: str) -> list:
    """Anthropic HH `\\n\\nHuman: ... \\n\\nAssistant: ...` -> messages (the final empty Assistant: dropped)."""
    parts = ("\n\n" + text.lstrip("\n")).split("\n\n")
    messages = []
    for part in parts[1:]:
        role = "user" if part.startswith("Human:") else "assistant" if part.startswith("Assistant:") else None
        if role is None and messages:  # a paragraph break inside a turn
            messages[-1]["content"] += "\n\n" + part
        elif role is not None:
            messages.append({"role": role, "content": part.split(":", 1)[1].strip()})
    return [m for m in messages if m["content"] or m["role"] == "user"]


def common_prefix_length(a: str, b: str) -> int:
    """Length of the longest common prefix, by bisection on slices (C-speed compares, not a char loop)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if a[:mid] == b[:mid] else (lo, mid - 1)
    return lo


def answer_from_messages(messages, prefix_len, field, where) -> str:
    rest = messages[prefix_len:]
    if len(rest) != 1 or rest[0]["role"] != "assistant":
        raise DataError(f"{where}: '{field}' must end in exactly one assistant turn after the prompt turns")
    return rest[0]["content"]


def parse_row(row, where: str = "row", beta_column: str = "beta") -> Pair:
    """Any supported layout -> Pair: prompt/chosen/rejected strings; chosen/rejected message lists
    (UltraFeedback-binarized, TRL conversational; the prompt is the `prompt` field or the shared leading
    turns); Anthropic HH strings (the prompt is the common prefix up to the last Assistant turn)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    for field in ("chosen", "rejected"):
        if field not in row:
            raise DataError(f"{where}: missing field '{field}'")
        if not isinstance(row[field], (str, list)):
            raise DataError(f"{where}: '{field}' must be a string or a list of messages, got {type(row[field]).__name__}")
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    if prompt is not None and not isinstance(prompt, (str, list)):
        raise DataError(f"{where}: 'prompt' must be a string or a list of messages, got {type(prompt).__name__}")
    prompt_msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else \
        check_messages(prompt, "prompt", where) if isinstance(prompt, list) else None
    if isinstance(chosen, list) or isinstance(rejected, list):
        chosen, rejected = check_messages(chosen, "chosen", where), check_messages(rejected, "rejected", where)
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
            raise DataError(f"{where}: missing field 'prompt' (and no '\\n\\nAssistant:' turn to split an HH dialogue at)")
        cut += len("\n\nAssistant:")
        prompt_msgs = split_hh(chosen[:cut])
        chosen, rejected = chosen[cut:], rejected[cut:]
    if not prompt_msgs or not any(m["content"].strip() for m in prompt_msgs):
        raise DataError(f"{where}: empty prompt")
    for field, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise DataError(f"{where}: '{field}' is empty")
    return Pair(prompt_msgs, chosen, rejected, read_margin(row, where), read_beta(row, beta_column, where))


def read_margin(row, where):
    if "score_chosen" not in row and "score_rejected" not in row:
        return None
    scores = row.get("score_chosen"), row.get("score_rejected")
    if not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
        raise DataError(f"{where}: 'score_chosen' and 'score_rejected' must both be numbers")
    return float(scores[0] - scores[1])


def read_beta(row, column, where):
    if column not in row:
        return None
    beta = row[column]
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not beta > 0:
        raise DataError(f"{where}: '{column}' must be a positive number, got {beta!r}")
    return float(beta)


# ----------------------------------------------------------------------------- chat templates

@dataclass(frozen=True)
class Template:
    bos: str  # "{bos}": the tokenizer family's own
    turns: dict  # role -> format of a whole turn, with {content}
    generation: str  # what opens the assistant's turn at the end of the prompt
    answer: str  # format of an answer: its text and the end-of-turn token the model learns to stop with
    system: str = ""  # preamble of a system turn that is always present (Llama 3.1)


LLAMA3_TURN = "<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>"
LLAMA3 = Template("<|begin_of_text|>", {r: LLAMA3_TURN for r in ROLES},
                  "<|start_header_id|>assistant<|end_header_id|>\n\n", "{content}<|eot_id|>")
TEMPLATES = {
    "llama3": LLAMA3,
    # Llama 3.1 Instruct's official template opens every conversation with this system block.
    "llama31": Template(LLAMA3.bos, LLAMA3.turns, LLAMA3.generation, LLAMA3.answer,
                        system="Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"),
    # Mistral Instruct has no system turn: a system message goes before the first user message.
    "mistral": Template("<s>", {"user": "[INST] {content} [/INST]", "assistant": "{content}</s>"}, "", "{content}</s>"),
    "zephyr": Template("{bos}", {r: "<|" + r + "|>\n{content}{eos}\n" for r in ROLES}, "<|assistant|>\n", "{content}{eos}"),
    "plain": Template("{bos}", {"system": "{content}\n\n", "user": "Human: {content}\n\n",
                                "assistant": "Assistant: {content}\n\n"}, "Assistant:", " {content}{eos}"),
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
        messages = [{"role": "system", "content": template.system + system}] + \
            (messages[1:] if messages[0]["role"] == "system" else messages)
    turns = (template.turns[m["role"]].format(role=m["role"], content=m["content"], **specials) for m in messages)
    return template.bos.format(**specials) + "".join(turns) + template.generation


def render_answer(text: str, template: Template, specials: dict) -> str:
    return template.answer.format(content=text.strip(), **specials)


def truncate_pair(prompt: list, chosen: list, rejected: list, max_length: int, max_prompt_length: int) -> dict:
    """Cut the prompt from the left to max_prompt_length (its end kept, and BOS), then the answers from the
    right so that prompt + answer fits max_length. An answer left with no room comes back empty."""
    prompt_cut = len(prompt) > max_prompt_length
    if prompt_cut:
        prompt = prompt[:1] + prompt[len(prompt) - max_prompt_length + 1:]
    room = max(0, max_length - len(prompt))
    return {"prompt_ids": prompt, "chosen_ids": chosen[:room], "rejected_ids": rejected[:room],
            "prompt_truncated": prompt_cut, "answer_truncated": max(len(chosen), len(rejected)) > room}


def tokenize_pairs(tokenizer, pairs: list, template, max_length: int, max_prompt_length: int) -> list:
    """Render each Pair with the template, tokenize its prompt once and each answer on its own, truncate."""
    template = TEMPLATES[template] if isinstance(template, str) else template
    specials = family_specials(tokenizer)
    texts = [text for p in pairs for text in (render_prompt(p.prompt, template, specials),
                                              render_answer(p.chosen, template, specials),
                                              render_answer(p.rejected, template, specials))]
    # add_special_tokens=False: the template writes BOS itself, so a post-processor that adds one too
    # (Llama 3's tokenizer.json does) would give two. encode_batch tokenizes on every core.
    ids = [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    return [{**truncate_pair(*ids[3 * i:3 * i + 3], max_length, max_prompt_length), "margin": p.margin,
             "beta": p.beta} for i, p in enumerate(pairs)]


def tokenize_pair(tokenizer, row, template, max_length: int = 1024, max_prompt_length: int = 512) -> dict:
    """One raw row (any layout) -> prompt_ids, chosen_ids, rejected_ids (the answers without the prompt),
    truncated to max_prompt_length and max_length; also margin, beta and what was truncated."""
    pair = row if isinstance(row, Pair) else parse_row(row)
    return tokenize_pairs(tokenizer, [pair], template, max_length, max_prompt_length)[0]


def tokenize_rows(tokenizer, rows, template, max_length=1024, max_prompt_length=512, keep_identical=False,
                  beta_column="beta") -> tuple[list, dict]:
    """(where, row) pairs -> tokenized pairs and a report of what was dropped or cut."""
    parsed = [(where, parse_row(row, where, beta_column)) for where, row in rows]
    kept = [(w, p) for w, p in parsed if keep_identical or p.chosen.strip() != p.rejected.strip()]
    report = {"rows": len(rows), "dropped_identical": len(parsed) - len(kept), "dropped_no_answer_room": 0}
    tokenized = tokenize_pairs(tokenizer, [p for _, p in kept], template, max_length, max_prompt_length)
    pairs = [{**t, "where": w} for (w, _), t in zip(kept, tokenized) if t["chosen_ids"] and t["rejected_ids"]]
    report["dropped_no_answer_room"] = len(kept) - len(pairs)
    report["prompt_truncated"] = sum(p["prompt_truncated"] for p in pairs)
    report["answer_truncated"] = sum(p["answer_truncated"] for p in pairs)
    report["pairs"] = len(pairs)
    return pairs, report


# ----------------------------------------------------------------------------- batching

def collate(pairs: list, pad_id: int) -> dict:
    """B pairs -> input_ids (2B, T) right-padded [chosen rows; rejected rows], loss_mask (2B, T) over
    answer tokens, margin (B,) and beta (B,) (NaN where a pair has none)."""
    rows = [(p["prompt_ids"], p["chosen_ids"]) for p in pairs] + [(p["prompt_ids"], p["rejected_ids"]) for p in pairs]
    T = max(len(prompt) + len(answer) for prompt, answer in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, (prompt, answer) in enumerate(rows):
        input_ids[i, :len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        loss_mask[i, len(prompt):len(prompt) + len(answer)] = 1
    nan = float("nan")
    margin = torch.tensor([nan if p["margin"] is None else p["margin"] for p in pairs])
    beta = torch.tensor([nan if p["beta"] is None else p["beta"] for p in pairs])
    return {"input_ids": input_ids, "loss_mask": loss_mask, "margin": margin, "beta": beta}


class PairSampler:
    """Which pairs each optimizer step trains on. Step s of a run is a global batch of `global_batch`
    pairs from a fixed order per epoch (shuffled by seed and epoch, or easy -> hard by margin for the
    MixDPO curriculum); rank r of N takes the r-th slice of it, so N processes train on exactly the
    batches one process would. The position is the step: save it and start again from there."""

    def __init__(self, n_pairs: int, global_batch: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 margins=None):
        if global_batch % world_size:
            raise DataError(f"--batch-size {global_batch} must be a multiple of the {world_size} processes")
        if n_pairs < global_batch:
            raise DataError(f"{n_pairs} training pairs are fewer than one batch of {global_batch}")
        self.n, self.global_batch, self.seed, self.rank, self.world = n_pairs, global_batch, seed, rank, world_size
        self.margins = margins
        self.steps_per_epoch = n_pairs // global_batch  # the last partial batch of an epoch is dropped
        self.step = 0
        self._order = (None, None)

    def order(self, epoch: int) -> list[int]:
        if self._order[0] != epoch:
            idx = list(range(self.n))
            if self.margins is not None:  # large margin = easy first; ties keep file order
                idx.sort(key=lambda i: -self.margins[i])
            else:
                random.Random(self.seed * 100_003 + epoch).shuffle(idx)
            self._order = (epoch, idx)
        return self._order[1]

    def batch(self, step: int) -> list[int]:
        """Indices of this rank's pairs at a step."""
        epoch, i = divmod(step, self.steps_per_epoch)
        global_batch = self.order(epoch)[i * self.global_batch:(i + 1) * self.global_batch]
        share = self.global_batch // self.world
        return global_batch[self.rank * share:(self.rank + 1) * share]

    def __next__(self) -> list[int]:
        indices = self.batch(self.step)
        self.step += 1
        return indices

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.seed = state["step"], state["seed"]


def micro_batches(indices: list, size: int) -> list[list]:
    return [indices[i:i + size] for i in range(0, len(indices), size)]


# ----------------------------------------------------------------------------- the synthetic set

CAPITALS = [("France", "Paris"), ("Spain", "Madrid"), ("Italy", "Rome"), ("Germany", "Berlin"), ("Japan", "Tokyo"),
            ("Egypt", "Cairo"), ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Canada", "Ottawa"), ("Norway", "Oslo"),
            ("Greece", "Athens"), ("Chile", "Santiago"), ("Cuba", "Havana"), ("Poland", "Warsaw"),
            ("Austria", "Vienna"), ("Ireland", "Dublin")]
COLORS = [("banana", "yellow"), ("grass", "green"), ("sky", "blue"), ("snow", "white"), ("coal", "black"),
          ("tomato", "red"), ("carrot", "orange"), ("plum", "purple"), ("lemon", "yellow"), ("leaf", "green"),
          ("cherry", "red"), ("chocolate", "brown")]
OPPOSITES = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("early", "late"),
             ("happy", "sad"), ("light", "dark"), ("old", "young"), ("open", "closed"), ("full", "empty")]
TASKS = {  # name: (questions, answer sentence, facts); the fact's value is the key token
    "capital": (["What is the capital of {x}?", "Which city is the capital of {x}?", "Name the capital of {x}."],
                "The capital of {x} is {y}.", CAPITALS),
    "color": (["What color is {x}?", "Which color does {x} have?", "Tell me the color of {x}."],
              "The color of {x} is {y}.", COLORS),
    "opposite": (["What is the opposite of {x}?", "Give the opposite of {x}.", "Which word means the opposite of {x}?"],
                 "The opposite of {x} is {y}.", OPPOSITES),
    "sum": (["What is {x}?", "Compute {x}.", "How much is {x}?"], "{x} is {y}.",
            [(f"{a} plus {b}", str(a + b)) for a in range(1, 10) for b in range(1, 10)]),
}
SUFFIXES = ["", " I hope this helps.", " Let me know if you have more questions.", " That is the answer."]
EVASIONS = ["I am not sure about that, sorry.", "I do not know the answer to that question.",
            "That is a hard question, ask someone else."]


def synthetic_pair(rng: random.Random) -> dict:
    """One pair. Mostly key-token pairs: both answers say the same sentence with the same suffix, and only
    the fact's value (right vs wrong) decides which is better: ambiguous content around a few key tokens.
    One pair in five differs freely: a right answer against an evasion."""
    task = rng.choice(sorted(TASKS))
    questions, sentence, facts = TASKS[task]
    x, y = rng.choice(facts)
    wrong = rng.choice(sorted({v for _, v in facts} - {y}))
    suffix = rng.choice(SUFFIXES)
    chosen = sentence.format(x=x, y=y) + suffix
    free = rng.random() < 0.2
    rejected = rng.choice(EVASIONS) if free else sentence.format(x=x, y=wrong) + suffix
    # Synthetic difficulty scores for MixDPO: an evasion is easy to tell apart, a wrong value is harder.
    return {"prompt": rng.choice(questions).format(x=x), "chosen": chosen, "rejected": rejected,
            "score_chosen": 9.0, "score_rejected": 2.0 if free else 6.0}


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


TINY_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def tiny_tokenizer(vocab_size: int = 640):
    """The tiny preset's tokenizer: byte-level BPE (any text encodes) trained in code on the synthetic set,
    so its words are single tokens; with Llama 3's special tokens, so every template renders."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=TINY_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    train, heldout = synthetic_rows(0)
    texts = [t for _, r in train + heldout for t in ("Human: " + r["prompt"], "Assistant: " + r["chosen"], r["rejected"])]
    tok.train_from_iterator(texts, trainer)
    return tok


def answer_stop_ids(tokenizer, template_name: str) -> list[int]:
    """The token that ends an answer in this template, where generation stops: what follows {content} in
    its answer format (<|eot_id|> for llama3/llama31, </s> for mistral, the tokenizer's EOS for zephyr/plain)."""
    end = TEMPLATES[template_name].answer.split("{content}")[1].format(**family_specials(tokenizer))
    if tokenizer.token_to_id(end) is None:
        raise DataError(f"template {template_name}: the tokenizer has no token {end!r} to end an answer with")
    return [tokenizer.token_to_id(end)]
