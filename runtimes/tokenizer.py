"""Tokenizer (HF `tokenizers`), chat templates (jinja2) and incremental detokenization."""

from __future__ import annotations

from pathlib import Path

from edgeloop.errors import EdgeloopError


def resolve_tokenizer(directory: Path, generation: dict, vocab_size: int):
    """(TokenizerSection, chat template text or None) for a model directory, validated: the tokenizer
    loads, fits the model's vocabulary, its config is a UTF-8 JSON object, the BOS/EOS ids are in range.
    Compile stores the section in the artifact contract; the runtime then reads nothing else."""
    from edgeloop.runtimes.contract import TokenizerSection

    directory = Path(directory)
    config = _read_optional_json(directory / "tokenizer_config.json")
    path = directory / "tokenizer.json"
    hf = _load_hf(path) if path.is_file() else None
    if hf is not None and hf.get_vocab_size(with_added_tokens=True) > vocab_size:
        ids = hf.get_vocab_size(with_added_tokens=True)
        raise EdgeloopError(f"{path} has {ids} tokens but the model's vocabulary holds {vocab_size}; the tokenizer "
                            "does not belong to this model")

    def token_id(key: str):
        text = _token_text(config.get(key))
        return hf.token_to_id(text) if hf is not None and text else None

    bos = generation.get("bos_token_id", token_id("bos_token"))
    eos = generation.get("eos_token_id", token_id("eos_token"))
    eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
    for name, value in [("bos_token_id", bos)] + [("eos_token_id", e) for e in eos]:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size):
            raise EdgeloopError(f"{name} {value!r} is not a token id of this model (vocabulary {vocab_size})")
    add_bos = config.get("add_bos_token", False)
    if not isinstance(add_bos, bool):
        raise EdgeloopError(f"{directory / 'tokenizer_config.json'}: add_bos_token must be true or false")
    template = config.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if template is not None and not isinstance(template, str):
        raise EdgeloopError(f"{directory / 'tokenizer_config.json'}: chat_template must be a string")
    tpl_file = directory / "chat_template.jinja"
    if tpl_file.is_file():
        from edgeloop.fileio import read_text

        template = read_text(tpl_file, "chat template")
    special = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token")}
    for key, value in special.items():
        if value is not None and not isinstance(value, str):
            raise EdgeloopError(f"{directory / 'tokenizer_config.json'}: {key} must be a string")
    section = TokenizerSection(file="tokenizer.json" if hf is not None else None, bos_token_id=bos,
                               eos_token_ids=tuple(eos), add_bos=add_bos, bos_token=special["bos_token"],
                               eos_token=special["eos_token"])
    return section, template


def _load_hf(path: Path):
    from tokenizers import Tokenizer as HFTokenizer

    try:
        return HFTokenizer.from_file(str(path))
    except Exception as e:  # the library raises a bare Exception on malformed files
        raise EdgeloopError(f"cannot read {path}: {str(e).splitlines()[0][:160]}") from None


class Tokenizer:
    """Text <-> ids for one model: HF `tokenizers` plus the contract's special tokens and template."""

    def __init__(self, directory: Path, section, template: str | None = None):
        if section.file is None:
            raise EdgeloopError(f"no tokenizer.json in {directory}; text generation needs one (logits() works without)")
        self._tok = _load_hf(Path(directory) / section.file)
        self.bos_id = section.bos_token_id
        self.eos_ids = set(section.eos_token_ids)
        self.add_bos = section.add_bos
        if template is None and section.chat_template:
            from edgeloop.fileio import read_text

            template = read_text(Path(directory) / section.chat_template, "chat template")
        self.chat_template = template
        self.special = {"bos_token": section.bos_token, "eos_token": section.eos_token}

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        if not isinstance(text, str):
            raise EdgeloopError(f"the prompt must be text (str), got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise EdgeloopError("the prompt is not valid UTF-8 text (it holds undecodable bytes)") from None
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
    from edgeloop.fileio import read_json

    return read_json(path, path.name)
