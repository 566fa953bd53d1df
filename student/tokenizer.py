"""The student tokenizer: any Hugging Face ``tokenizer.json`` (trained here as a byte-level BPE, or loaded).

Public API (stable):

- ``StudentTokenizer.train(texts, vocab_size, min_frequency=2) -> StudentTokenizer``: GPT-2 style byte-level
  BPE over an iterable of strings; every byte is a token, so any text encodes and decodes losslessly.
  Id 0 is the special end-of-document token ``<|endoftext|>`` (``eos_id``).
- ``StudentTokenizer.load(path)`` / ``.save(path)``: a standard ``tokenizer.json`` (also readable by
  ``transformers.PreTrainedTokenizerFast(tokenizer_file=...)``); ``save`` writes atomically. A
  ``tokenizer_config.json`` beside the loaded file is read (``eos_token``, ``bos_token``, ``chat_template``)
  and written again beside the saved one.
- Two spellings of token bytes are understood: byte-level (GPT-2's printable stand-ins for bytes, e.g.
  SmolLM2) and SentencePiece (``▁`` for a space, byte-fallback tokens ``<0xNN>`` for one byte, e.g. Llama 2).
- ``encode(text) -> list[int]``, ``encode_batch(texts) -> list[list[int]]``, ``decode(ids) -> str``.
- ``token_bytes(id) -> bytes``: the exact bytes a token stands for (a token may be part of a multi-byte
  UTF-8 character); special tokens give their UTF-8 text. ``vocab_bytes() -> list[bytes]``, indexed by id:
  what ``storage.alignment`` matches teacher tokens against. A SentencePiece tokenizer that prepends ``▁`` to
  the text gives ``b" "`` + the text's bytes when its tokens' bytes are joined (``decode`` drops that space).
- ``vocab_size`` (ids ``0 .. vocab_size-1``), ``eos_id``; ``bos_id`` (None when there is none);
  ``chat_template`` (None when there is none) and ``render_chat(messages, add_generation_prompt=False)``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

EOS = "<|endoftext|>"
CONFIG_FILE = "tokenizer_config.json"
# Tried in order when no tokenizer_config.json names the end-of-sequence / beginning-of-sequence token.
KNOWN_EOS = (EOS, "</s>", "<|end_of_text|>", "<|im_end|>")
KNOWN_BOS = ("<s>", "<|begin_of_text|>", "<bos>")
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@cache
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode``: the printable character standing for each byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _component_types(spec: Any) -> set[str]:
    """Every ``type`` named in a (possibly nested) tokenizer.json component."""
    if isinstance(spec, dict):
        found = {spec["type"]} if isinstance(spec.get("type"), str) else set()
        for value in spec.values():
            found |= _component_types(value)
        return found
    if isinstance(spec, list):
        return set().union(*(_component_types(item) for item in spec)) if spec else set()
    return set()


def _spelling(tokenizer: Tokenizer) -> str:
    """``"byte_level"`` or ``"sentencepiece"``: how this tokenizer.json spells bytes in its tokens."""
    spec = json.loads(tokenizer.to_str())
    parts = _component_types([spec.get("pre_tokenizer"), spec.get("decoder"), spec.get("normalizer")])
    if "ByteLevel" in parts:
        return "byte_level"
    if parts & {"Metaspace", "ByteFallback"} or (spec.get("model") or {}).get("byte_fallback"):
        return "sentencepiece"
    raise ValueError(
        "tokenizer.json is neither byte-level (ByteLevel pre-tokenizer/decoder) nor SentencePiece style "
        "(Metaspace or byte fallback); its token bytes cannot be known exactly"
    )


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


class StudentTokenizer:
    def __init__(
        self, tokenizer: Tokenizer, config: Mapping[str, Any] | None = None, source: str = ""
    ) -> None:
        self._tok = tokenizer
        self._config = dict(config) if config is not None else None
        self._source = source
        self.eos_id = self._special_id("eos_token", KNOWN_EOS)
        if self.eos_id is None:
            where = f"{source}: " if source else ""
            raise ValueError(f"{where}tokenizer has no end-of-sequence token (tried {', '.join(KNOWN_EOS)})")
        self.bos_id = self._special_id("bos_token", KNOWN_BOS)
        template = (self._config or {}).get("chat_template")
        if isinstance(template, list):
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        self.chat_template: str | None = template if isinstance(template, str) else None
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self._special = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
        self._spelling = _spelling(tokenizer)
        self._bytes = [self._decode_token(i) for i in range(self.vocab_size)]

    def _special_id(self, field: str, known: Sequence[str]) -> int | None:
        """The id of the token the config names in ``field``, else of the first ``known`` name present."""
        if self._config is not None and field in self._config:
            name = _token_text(self._config[field])
            if name is None:
                return None
            token_id = self._tok.token_to_id(name)
            if token_id is None:
                config = Path(self._source).with_name(CONFIG_FILE) if self._source else CONFIG_FILE
                raise ValueError(f"{config}: field {field}: token {name!r} is not in the vocabulary")
            return token_id
        return next((i for i in map(self._tok.token_to_id, known) if i is not None), None)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> StudentTokenizer:
        if vocab_size < 257:
            raise ValueError(f"vocab_size must be at least 257 (256 bytes + {EOS}), got {vocab_size}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | Path) -> StudentTokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: tokenizer file not found")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:
            raise ValueError(f"{path}: not a Hugging Face tokenizer.json: {exc}") from None
        config_path = path.with_name(CONFIG_FILE)
        config: dict[str, Any] | None = None
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{config_path}: line {exc.lineno}: not valid JSON: {exc.msg}") from None
            if not isinstance(config, dict):
                raise ValueError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
            template_file = path.with_name("chat_template.jinja")
            if "chat_template" not in config and template_file.is_file():
                config["chat_template"] = template_file.read_text(encoding="utf-8")
        return cls(tok, config, source=str(path))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        self._tok.save(str(tmp))
        if self._config is not None:
            config_tmp = path.with_name(CONFIG_FILE + ".tmp")
            config_tmp.write_text(
                json.dumps(self._config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
            )
            os.replace(config_tmp, path.with_name(CONFIG_FILE))
        os.replace(tmp, path)
        return path

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        if self._spelling == "sentencepiece":
            return self._tok.decode(list(ids), skip_special_tokens=False)
        return b"".join(self._bytes[i] for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id]

    def vocab_bytes(self) -> list[bytes]:
        return list(self._bytes)

    def render_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False) -> str:
        """Render ``messages`` with the chat template, in a sandbox, with the variables transformers passes."""
        if self.chat_template is None:
            raise ValueError(f"tokenizer has no chat_template (expected in {CONFIG_FILE})")
        return _compiled_template(self.chat_template).render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=self._config_token("bos_token"),
            eos_token=self._config_token("eos_token") or self._tok.id_to_token(self.eos_id),
        )

    def _config_token(self, field: str) -> str:
        return _token_text((self._config or {}).get(field)) or ""

    def _decode_token(self, token_id: int) -> bytes:
        token = self._tok.id_to_token(token_id)
        if token is None:
            raise ValueError(f"tokenizer has no token with id {token_id} (ids must be contiguous)")
        if token in self._special:
            return token.encode("utf-8")
        if self._spelling == "sentencepiece":
            byte = _BYTE_TOKEN.fullmatch(token)
            return bytes([int(byte.group(1), 16)]) if byte else token.replace("▁", " ").encode("utf-8")
        table = _unicode_to_byte()
        try:
            return bytes(table[c] for c in token)
        except KeyError as exc:
            raise ValueError(
                f"token {token_id} {token!r} has character {exc.args[0]!r}, not a byte-level stand-in for a byte"
            ) from None


@cache
def _compiled_template(template: str) -> Any:
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, **kwargs: Any) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, **kwargs)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)
