"""Tokenizer (HF `tokenizers`), chat templates (jinja2) and incremental detokenization."""

from __future__ import annotations

import json
from pathlib import Path

from edgeloop.errors import EdgeloopError


class Tokenizer:
    def __init__(self, directory: Path, generation: dict):
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(directory) / "tokenizer.json"
        if not path.is_file():
            raise EdgeloopError(f"no tokenizer.json in {directory}; text generation needs one (logits() works without)")
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception on malformed files
            raise EdgeloopError(f"cannot read {path}: {e}") from None
        config = _read_optional_json(Path(directory) / "tokenizer_config.json")
        self.bos_id = generation.get("bos_token_id", self._token_id(config.get("bos_token")))
        eos = generation.get("eos_token_id", self._token_id(config.get("eos_token")))
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.add_bos = bool(config.get("add_bos_token", False))
        template = config.get("chat_template")
        tpl_file = Path(directory) / "chat_template.jinja"
        if tpl_file.is_file():
            template = tpl_file.read_text(encoding="utf-8")
        self.chat_template = template if isinstance(template, str) else None
        self.special = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token")}

    def _token_id(self, token) -> int | None:
        text = _token_text(token)
        return self._tok.token_to_id(text) if text else None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, *, skip_special: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            # A plain transcript for base models without a template.
            text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
            return text + ("Assistant:" if add_generation_prompt else "")
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)

        def raise_exception(message):
            raise EdgeloopError(f"chat template error: {message}")

        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.special)
        except jinja2.TemplateError as e:
            raise EdgeloopError(f"the model's chat template failed: {e}") from None


class IncrementalDecoder:
    """Turns a growing token list into text pieces that never split a UTF-8 character.

    Decodes a small window of recent tokens and emits only the new suffix once it no longer
    ends in a replacement character (an incomplete byte sequence).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the decode window
        self.read = 0  # tokens whose text has been emitted

    def push(self, token: int) -> str:
        self.ids.append(token)
        done = self.tok.decode(self.ids[self.prefix:self.read])
        full = self.tok.decode(self.ids[self.prefix:])
        if full.endswith("\ufffd") or len(full) <= len(done):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return full[len(done):]

    def flush(self) -> str:
        """Whatever is left at the end (an incomplete character stays a replacement char)."""
        done = self.tok.decode(self.ids[self.prefix:self.read])
        full = self.tok.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return full[len(done):]


def _token_text(token) -> str | None:
    if isinstance(token, dict):
        return token.get("content")
    return token


def _read_optional_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise EdgeloopError(f"{path} is not valid JSON ({e})") from None
