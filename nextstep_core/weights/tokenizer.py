"""The model's tokenizer: the Qwen2 fast-tokenizer file of a model folder (or a converted file's metadata), with the
special tokens NextStep's prompt layout uses checked against the ids its config names."""
from __future__ import annotations

import json
import os

from ..errors import CheckpointError
from .config import ModelConfig

IMAGE_AREA = "<|image_area|>"
BOI, EOI, PLACEHOLDER = "<|begin_of_image|>", "<|end_of_image|>", "<|image_placeholder|>"


def _token_str(v):
    if isinstance(v, dict):
        return v.get("content")
    return v


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` (the fast tokenizer file that transformers also reads)."""

    def __init__(self, tokenizer_json: str, tokenizer_config: dict | None = None, added: dict | None = None):
        from tokenizers import Tokenizer as _Tok

        self._tok = _Tok.from_str(tokenizer_json)
        self._tok.no_padding()
        self._tok.no_truncation()
        cfg = tokenizer_config or {}
        extra = {int(i): _token_str(v) for i, v in (cfg.get("added_tokens_decoder") or {}).items()}
        extra.update({int(i): t for t, i in (added or {}).items()})
        self._add_missing(extra)
        self.bos_token = _token_str(cfg.get("bos_token"))
        self.pad_token = _token_str(cfg.get("pad_token"))
        self.json = self._tok.to_str()
        self.config_dict = cfg

    def _add_missing(self, tokens: dict[int, str]) -> None:
        """Tokens that transformers adds from tokenizer_config.json / added_tokens.json but tokenizer.json lacks.

        They are appended in id order, so each must land exactly on its id, or the files disagree.
        """
        from tokenizers import AddedToken

        for i in sorted(tokens):
            content = tokens[i]
            if content is None or self._tok.token_to_id(content) is not None:
                continue
            if i != self._tok.get_vocab_size(with_added_tokens=True):
                raise CheckpointError(f"the tokenizer files disagree: {content!r} should be id {i}, but tokenizer.json "
                                      "ends elsewhere. Re-download the tokenizer files of this model.")
            self._tok.add_special_tokens([AddedToken(content, special=True, normalized=False)])

    @classmethod
    def from_folder(cls, folder: str) -> "Tokenizer":
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise CheckpointError(
                f"{folder}: tokenizer.json is missing. Copy the tokenizer files (tokenizer.json, tokenizer_config.json) "
                "from the model's Hugging Face repo into this folder.")
        def optional_json(name):
            p = os.path.join(folder, name)
            if not os.path.isfile(p):
                return {}
            with open(p, encoding="utf-8") as f:
                return json.load(f)

        with open(path, encoding="utf-8") as f:
            return cls(f.read(), optional_json("tokenizer_config.json"), optional_json("added_tokens.json"))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=True).ids

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def check_against(self, cfg: ModelConfig, source: str) -> None:
        """The special tokens must sit at the ids the model config names."""
        wrong = []
        for tok, want in ((BOI, cfg.boi), (EOI, cfg.eoi), (PLACEHOLDER, cfg.image_placeholder_id)):
            got = self.token_to_id(tok)
            if got != want:
                wrong.append(f"{tok} is id {got}, config says {want}")
        if self.token_to_id(IMAGE_AREA) is None:
            wrong.append(f"{IMAGE_AREA} is not in the vocabulary")
        if wrong:
            raise CheckpointError(f"{source}: the tokenizer does not match this model ({'; '.join(wrong)}). "
                                  "Use the tokenizer files shipped with the same NextStep model.")
