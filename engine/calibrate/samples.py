"""Calibration samples: read, validate and tokenize a samples file before any model is touched.

Accepted files (the format is sniffed from the first non-blank character, never from the suffix):
- a JSON list of strings (chat-templated prompts), e.g. `["<|User|>hi", ...]`;
- JSONL, one object per line, `{"text": "..."}` (modelopt's calibration format);
- JSONL, one object per line, `{"messages": [{"role": ..., "content": ...}, ...]}`, rendered with the
  checkpoint's chat template (`tokenizer.apply_chat_template(..., tokenize=False)`).

Every structural problem raises SamplesError naming the file, the item or line (and column for bad
JSON), and what to do: so does a file that leaves nothing to calibrate on (no samples, only empty ones,
fewer tokens than one batch). Samples longer than `seq_len` tokens are truncated and counted. Too few
tokens per routed expert is only a warning (`thin_expert_warning`), recorded in the calibration manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.core.errors import SamplesError

KINDS = ("json-list", "jsonl-text", "jsonl-messages")


@dataclass(frozen=True)
class RawSamples:
    """What the file holds, validated: `items` are strings (text) or message lists (messages)."""

    path: str
    kind: str  # one of KINDS
    items: list[Any]
    sha256: str


@dataclass
class Samples:
    """Tokenized samples ready for calibration."""

    path: str
    kind: str
    texts: list[str]
    input_ids: list[list[int]] = field(default_factory=list)
    seq_len: int = 0
    truncated: int = 0  # samples cut to seq_len
    tokens: int = 0  # tokens kept, over all samples
    sha256: str = ""  # of the file bytes

    def summary(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "num_samples": len(self.texts), "seq_len": self.seq_len,
                "truncated": self.truncated, "tokens": self.tokens, "sha256": self.sha256}


def _fail(msg: str, path: str, hint: str | None = None) -> SamplesError:
    return SamplesError(msg, at=path, hint=hint or "fix the samples file: a JSON list of non-empty strings, "
                        "or JSONL lines with {\"text\": ...} or {\"messages\": [...]}")


def _type_name(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
            bool: "a boolean", type(None): "null"}.get(type(v), type(v).__name__)


def _json_error(e: json.JSONDecodeError, path: str, line_base: int = 0) -> SamplesError:
    return _fail(f"{path}: unreadable JSON at line {e.lineno + line_base}, column {e.colno}: {e.msg}", path)


def _check_messages(msgs: Any, where: str, path: str) -> None:
    if not isinstance(msgs, list) or not msgs:
        raise _fail(f"{path}: {where}: \"messages\" must be a non-empty list, found {_type_name(msgs)}", path)
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise _fail(f"{path}: {where}: message {j} must be an object with \"role\" and \"content\"", path)
        if not isinstance(m["content"], (str, list)):
            raise _fail(f"{path}: {where}: message {j} content is {_type_name(m['content'])}, "
                        "expected a string", path)
    if not any(_has_text(m["content"]) for m in msgs):
        raise _fail(f"{path}: {where}: every message's content is empty", path,
                    hint="remove empty samples from the file")


def _has_text(content: Any) -> bool:
    """A message content (a string, or a list of parts with "text") that holds more than whitespace."""
    if isinstance(content, str):
        return bool(content.strip())
    return any(_has_text(p.get("text", "") if isinstance(p, dict) else p) for p in content
               if isinstance(p, (str, dict)))


def read_samples_file(path: str | os.PathLike, num_samples: int | None = None) -> RawSamples:
    """Parse and validate the file; keeps the first `num_samples` items (all if None)."""
    p = str(path)
    try:
        data = Path(p).read_bytes()
    except FileNotFoundError:
        raise _fail(f"samples file not found: {p}", p,
                    hint="check the path (--samples / [calibration] samples)") from None
    except OSError as e:
        raise _fail(f"cannot read samples file {p}: {e.strerror}", p) from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _fail(f"{p}: not UTF-8 text (byte {e.start})", p) from e
    stripped = text.lstrip()
    if not stripped:
        raise _fail(f"{p}: the samples file is empty", p)
    sha = hashlib.sha256(data).hexdigest()
    if stripped[0] == "[":
        kind, items = "json-list", _parse_json_list(text, p)
    elif stripped[0] == "{":
        _refuse_single_object(text, p)
        kind, items = _parse_jsonl(text, p)
    else:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise _json_error(e, p) from e
        raise _fail(f"{p}: expected a JSON list of strings or JSONL objects, found {_type_name(obj)}", p)
    if not items:
        raise _fail(f"{p}: holds no samples (an empty {'list' if kind == 'json-list' else 'file'})", p,
                    hint="add calibration prompts: a few hundred varied texts, or point at another file")
    if num_samples is not None:
        if num_samples <= 0:
            raise _fail(f"number of samples must be positive, got {num_samples}", p,
                        hint="ask for at least one sample (--num-samples)")
        if len(items) < num_samples:
            raise _fail(f"{p}: holds {len(items)} samples, {num_samples} asked", p,
                        hint=f"add samples or ask for at most {len(items)} (--num-samples)")
        items = items[:num_samples]
    return RawSamples(path=p, kind=kind, items=items, sha256=sha)


def _parse_json_list(text: str, p: str) -> list[str]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise _json_error(e, p) from e
    if not isinstance(obj, list):
        raise _fail(f"{p}: expected a JSON list of strings, found {_type_name(obj)}", p)
    for i, item in enumerate(obj):
        if not isinstance(item, str):
            raise _fail(f"{p}: item {i} is {_type_name(item)}, expected a string", p)
        if not item.strip():
            raise _fail(f"{p}: item {i} is an empty string", p, hint="remove empty samples from the file")
    return obj


def _refuse_single_object(text: str, p: str) -> None:
    """A whole file that is one JSON object without "text"/"messages" is a wrong shape, not a bad JSONL line."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return
    if isinstance(obj, dict) and "text" not in obj and "messages" not in obj:
        raise _fail(f"{p}: expected a JSON list of strings, found an object (keys: {sorted(obj)[:5]})", p)


def _parse_jsonl(text: str, p: str) -> tuple[str, list[Any]]:
    kind = None
    items: list[Any] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise _json_error(e, p, line_base=lineno - 1) from e
        where = f"line {lineno}"
        if not isinstance(obj, dict):
            raise _fail(f"{p}: {where} is {_type_name(obj)}, expected an object with \"text\" or \"messages\"", p)
        if "text" in obj:
            this, val = "jsonl-text", obj["text"]
            if not isinstance(val, str):
                raise _fail(f"{p}: {where}: \"text\" is {_type_name(val)}, expected a string", p)
            if not val.strip():
                raise _fail(f"{p}: {where}: \"text\" is an empty string", p, hint="remove empty samples from the file")
        elif "messages" in obj:
            this, val = "jsonl-messages", obj["messages"]
            _check_messages(val, where, p)
        else:
            raise _fail(f"{p}: {where}: object has neither \"text\" nor \"messages\" (keys: {sorted(obj)})", p)
        if kind is None:
            kind = this
        elif kind != this:
            raise _fail(f"{p}: {where} uses {this.split('-')[1]!r} but earlier lines use {kind.split('-')[1]!r}", p,
                        hint="use one kind of line per file")
        items.append(val)
    return kind or "jsonl-text", items


def validate_samples_file(path: str | os.PathLike, num_samples: int | None = None) -> None:
    """Cheap preflight check (no tokenizer, no torch): raises SamplesError or returns None."""
    read_samples_file(path, num_samples)


def _load_tokenizer(tokenizer: Any):
    if tokenizer is None or not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
    except (OSError, ValueError) as e:
        raise SamplesError(f"cannot load the tokenizer from {tokenizer}: {e}", at=str(tokenizer),
                           hint="the checkpoint needs tokenizer files (tokenizer.json / tokenizer_config.json)") from e


def render_texts(raw: RawSamples, tokenizer: Any = None) -> list[str]:
    """The sample texts; messages are rendered with the tokenizer's chat template."""
    if raw.kind != "jsonl-messages":
        return list(raw.items)
    tok = _load_tokenizer(tokenizer)
    if tok is None or not getattr(tok, "chat_template", None):
        raise SamplesError(f"{raw.path}: \"messages\" samples need the checkpoint's chat template, and none was found",
                           at=raw.path, hint="give a checkpoint whose tokenizer has a chat template, "
                           "or pre-render the prompts as {\"text\": ...} lines")
    out = []
    for i, msgs in enumerate(raw.items):
        try:
            out.append(tok.apply_chat_template(msgs, tokenize=False))
        except Exception as e:  # jinja errors: a template that rejects these messages
            raise SamplesError(f"{raw.path}: sample {i}: the chat template failed: {e}", at=raw.path) from e
    return out


def load_samples(path: str | os.PathLike, num_samples: int | None = None, tokenizer: Any = None,
                 seq_len: int = 512, batch_size: int | None = None) -> Samples:
    """Read, validate, render and (when a tokenizer or its directory is given) tokenize the samples.

    Each sample becomes one sequence of at most `seq_len` tokens (the tokenizer's special tokens
    included, as `tokenizer(text)` adds them); longer ones are truncated and counted. With `batch_size`
    (what calibrate passes), samples that together hold fewer tokens than one batch (`batch_size` × `seq_len`)
    are refused: that is not a calibration set.
    """
    if seq_len <= 0:
        raise SamplesError(f"sequence length must be positive, got {seq_len}", at=str(path), hint="--seq-len")
    raw = read_samples_file(path, num_samples)
    tok = _load_tokenizer(tokenizer)
    texts = render_texts(raw, tok)
    s = Samples(path=raw.path, kind=raw.kind, texts=texts, seq_len=seq_len, sha256=raw.sha256)
    if tok is None:
        return s
    for text in texts:
        ids = list(tok(text)["input_ids"])
        if len(ids) > seq_len:
            ids = ids[:seq_len]
            s.truncated += 1
        if not ids:
            raise SamplesError(f"{raw.path}: a sample tokenizes to nothing", at=raw.path)
        s.input_ids.append(ids)
        s.tokens += len(ids)
    if batch_size is not None:
        refuse_less_than_a_batch(s, batch_size)
    return s


def refuse_less_than_a_batch(s: Samples, batch_size: int) -> None:
    """SamplesError when the tokenized samples hold fewer tokens than one batch of `batch_size` × `seq_len`."""
    batch = max(1, batch_size) * s.seq_len
    if s.tokens < batch:
        raise SamplesError(
            f"{s.path}: {len(s.input_ids)} sample(s) hold {s.tokens} tokens, fewer than one batch "
            f"(batch_size {batch_size} x seq_len {s.seq_len} = {batch})", at=s.path,
            hint="add samples, or lower calibration.seq_len / batch_size (--seq-len, --batch-size)")


# Fewer tokens than this per routed expert, on average, leaves expert activation ranges to chance.
MIN_TOKENS_PER_EXPERT = 32


def thin_expert_warning(tokens: int, config: dict[str, Any]) -> str | None:
    """A warning when `tokens` routed with the config's top-k over its routed experts give each expert fewer
    than MIN_TOKENS_PER_EXPERT tokens on average (None for a dense model or enough tokens)."""
    experts = next((config[k] for k in ("n_routed_experts", "num_local_experts", "num_experts", "n_experts")
                    if isinstance(config.get(k), int) and config[k] > 0), None)
    top_k = next((config[k] for k in ("num_experts_per_tok", "n_activated_experts", "moe_topk")
                  if isinstance(config.get(k), int) and config[k] > 0), None)
    if not experts or not top_k:
        return None
    per_expert = tokens * top_k / experts
    if per_expert >= MIN_TOKENS_PER_EXPERT:
        return None
    return (f"thin calibration: {tokens} tokens x top-{top_k} over {experts} routed experts is {per_expert:.1f} "
            f"tokens per expert on average (want >= {MIN_TOKENS_PER_EXPERT}); experts that see none get their "
            f"siblings' scales. Add samples, raise seq_len, or set calibration.all_experts = true")
