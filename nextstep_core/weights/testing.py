"""Random-weight NextStep checkpoints in exactly the official layout, for tests, demos and benchmarks.

    make_tiny_checkpoint(dst, size="tiny")   # or "small", "medium"; returns dst
    write_official_config(dst)               # its config.json as StepFun's own code writes it (no family key)

writes `config.json`, two or more `model-0000N-of-0000M.safetensors` shards with `model.safetensors.index.json`,
a byte-level Qwen2-style tokenizer (`tokenizer.json`, `tokenizer_config.json`, `vocab.json`, `merges.txt`) whose
NextStep special tokens sit at the ids the config names, and `vae/` (`config.json` + `checkpoint.pt`).

The weights are random but not degenerate: nothing is zero (the reference zero-initialises the head's AdaLN and
output layers, which would make every token prompt-independent), norms and biases are randomised so that a loader
which drops them fails the tests, and `image_in_projector` has a dominant bias so that the fed-back token only
modulates the image-position embedding. That keeps the autoregressive loop contractive: two correct
implementations stay within round-off of each other instead of drifting apart token by token. The images are noise.
"""
from __future__ import annotations

import json
import os

import torch

from .config import ModelConfig, VAEConfig
from ..model.family import FAMILY_V1

SIZES = {
    # hidden, layers, heads, kv heads, intermediate, head dim, head layers
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, fm_head_dim=32, fm_head_layers=2),
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                  intermediate_size=1408, fm_head_dim=384, fm_head_layers=4),
    "medium": dict(hidden_size=1024, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4,
                   intermediate_size=2816, fm_head_dim=768, fm_head_layers=6),
    # the real NextStep-1 geometry (14.9B parameters): for GPU benchmarks with random weights
    "full": dict(hidden_size=5120, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
                 intermediate_size=13824, fm_head_dim=1536, fm_head_layers=12),
}
TINY_VAE = dict(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1)
FULL_VAE = dict(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2)

# tokenizer: 256 byte symbols, then merges, then the specials (ids named by the config)
_MERGES = [("Ġ", "a"), ("t", "h"), ("th", "e"), ("Ġ", "the"), ("i", "n"), ("a", "t"), ("Ġ", "c"), ("Ġc", "at"),
           ("o", "r"), ("e", "n"), ("Ġ", "s"), ("e", "r"), ("o", "n"), ("a", "n"), ("Ġ", "o"), ("Ġ", "w")]
_SPECIALS = ["<|endoftext|>", "[PAD]", "<|image_area|>", "<|begin_of_image|>", "<|end_of_image|>",
             "<|image_placeholder|>", "<|begin_of_prompt_refinement|>", "<|end_of_prompt_refinement|>",
             "<|begin_of_thinking|>", "<|end_of_thinking|>"]
# Qwen2's pre-tokenizer split: contractions, words, single digits, punctuation runs, newlines, spaces
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), 256))
    out, n = {}, 0
    for b in range(256):
        out[b] = chr(b) if b in keep else chr(256 + n)
        n += b not in keep
    return out


def write_tokenizer(dst: str, vocab_size: int) -> dict[str, int]:
    """Write a Qwen2-style byte-level BPE tokenizer; returns the special token ids."""
    vocab = {ch: i for i, ch in enumerate(_bytes_to_unicode().values())}
    for a, b in _MERGES:
        vocab.setdefault(a + b, len(vocab))
    first_special = len(vocab)
    specials = {tok: first_special + i for i, tok in enumerate(_SPECIALS)}
    if first_special + len(_SPECIALS) > vocab_size:
        raise ValueError("vocab_size too small for the tokenizer")
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for t, i in specials.items()]
    tok = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": _QWEN2_SPLIT}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": [f"{a} {b}" for a, b in _MERGES]},
    }
    with open(os.path.join(dst, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tok, f, ensure_ascii=False)
    with open(os.path.join(dst, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(dst, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _MERGES))
    cfg = {
        "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "[PAD]",
        "unk_token": None, "model_max_length": 131072, "clean_up_tokenization_spaces": False,
        "errors": "replace", "split_special_tokens": False, "add_prefix_space": False,
        "additional_special_tokens": _SPECIALS[2:],
        "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added},
    }
    with open(os.path.join(dst, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=1)
    with open(os.path.join(dst, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump({"eos_token": "<|endoftext|>", "pad_token": "[PAD]", "additional_special_tokens": _SPECIALS[2:]},
                  f, indent=1)
    return specials


def tiny_config(size: str = "tiny", family: str = FAMILY_V1, vocab_size: int = 320, **over) -> ModelConfig:
    ids = {t: 256 + len(_MERGES) + i for i, t in enumerate(_SPECIALS)}
    cfg = ModelConfig(**SIZES[size], vocab_size=vocab_size, bos_token_id=ids["<|endoftext|>"],
                      eos_token_id=ids["<|endoftext|>"], pad_token_id_added=ids["[PAD]"],
                      boi=ids["<|begin_of_image|>"], eoi=ids["<|end_of_image|>"],
                      image_placeholder_id=ids["<|image_placeholder|>"], family=family,
                      max_position_embeddings=32768)
    cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def random_model_state(cfg: ModelConfig, seed: int = 0, with_lm_head: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor of the published key set, randomised as described in the module docstring."""
    from ..model.decoder import NextStep

    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in NextStep(cfg, with_lm_head=with_lm_head).state_dict().items()}
    state = {}
    for k, shape in shapes.items():
        if k == "gen_pos_embed":
            from ..model.decoder import sincos_2d_table

            state[k] = sincos_2d_table(cfg.hidden_size, cfg.base_image_grid_size)[None]
            continue
        fan_in = shape[-1] if len(shape) > 1 else 1
        if k.endswith(("layernorm.weight", "norm.weight", "in_ln.weight")):
            t = 1 + 0.2 * torch.randn(shape, generator=g)
        elif k == "image_in_projector.bias":
            t = torch.randn(shape, generator=g)  # dominant: see the module docstring
        elif k == "image_in_projector.weight":
            t = 0.02 * torch.randn(shape, generator=g) / fan_in**0.5
        elif k.endswith(".bias"):
            t = 0.05 * torch.randn(shape, generator=g)
        elif k == "embed_tokens.weight":
            t = torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) / fan_in**0.5
        state[k] = t.float()
    return state


def random_vae_state(cfg: VAEConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    from ..model.vae import AutoEncoder

    g = torch.Generator().manual_seed(seed + 1)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoEncoder(cfg).state_dict().items()}
    state = {}
    for k, shape in shapes.items():
        if len(shape) == 4:
            fan_in = shape[1] * shape[2] * shape[3]
            t = torch.randn(shape, generator=g) / fan_in**0.5
        elif k.endswith("weight"):
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            t = 0.02 * torch.randn(shape, generator=g)
        state[k] = t
    return state


def write_shards(state: dict[str, torch.Tensor], dst: str, shards: int = 2, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    keys = list(state)
    per = -(-len(keys) // shards)
    weight_map, total = {}, 0
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k].contiguous() for k in keys[i * per:(i + 1) * per]}
        save_file(part, os.path.join(dst, name), metadata={"format": "pt", **(metadata or {})})
        for k, t in part.items():
            weight_map[k] = name
            total += t.numel() * t.element_size()
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)


def write_vae(dst: str, cfg: VAEConfig | None = None, seed: int = 0, size: str = "tiny") -> str:
    cfg = cfg or VAEConfig(**(TINY_VAE if size != "full" else FULL_VAE), scaling_factor=1.0, shift_factor=0.0,
                           deterministic=True, encoder_norm=True, psz=2)
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg.to_json_dict(), f, indent=1)
    torch.save(random_vae_state(cfg, seed), os.path.join(dst, "checkpoint.pt"))
    return dst


# what LlamaConfig.to_dict adds around NextStepConfig's own fields (transformers 4.49)
_LLAMA_BOOKKEEPING = {"architectures": ["NextStep"], "model_type": "nextstep", "attention_dropout": 0.0,
                      "hidden_act": "silu", "initializer_range": 0.02, "pretraining_tp": 1, "rope_scaling": None,
                      "use_cache": True, "torch_dtype": "float32", "transformers_version": "4.49.0",
                      "lm_loss_weight": 0.01, "im_loss_weight": 1.0, "fm_head_batch_mul": 4}


def write_official_config(dst: str, name_or_path: str = "", vae_name_or_path: str = "vae/", **extra) -> str:
    """Rewrite `dst/config.json` the way StepFun's own `NextStepConfig` saves it (reference notes §14.7, §15).

    The NextStep-1 GitHub class (@6e49bae) and the NextStep-1.1 one write the same kind of file: no
    `nextstep_family` (that key is ours), `o_attention_bias` always, `vae_name_or_path` as the author passed it
    ("vae/" for a VAE saved beside the model), `_name_or_path` as given (often empty). `extra` adds keys, e.g. the
    1.1-era training code's. The weights are untouched; returns `dst`.
    """
    path = os.path.join(dst, "config.json")
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    for ours in ("nextstep_family", "nextstep_family_reason"):
        raw.pop(ours, None)
    raw.update(_LLAMA_BOOKKEEPING, _name_or_path=name_or_path, vae_name_or_path=vae_name_or_path,
               o_attention_bias=bool(raw.get("o_attention_bias", False)), **extra)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(dict(sorted(raw.items())), f, indent=2)
    return dst


def make_tiny_checkpoint(dst: str, size: str = "tiny", seed: int = 0, family: str = FAMILY_V1, shards: int = 2,
                         with_vae: bool = True, with_lm_head: bool = True, **config_overrides) -> str:
    """Write a random NextStep checkpoint in the official layout to `dst` (created); returns `dst`."""
    os.makedirs(dst, exist_ok=True)
    cfg = tiny_config(size, family, **config_overrides)
    write_tokenizer(dst, cfg.vocab_size)
    raw = cfg.to_json_dict()
    raw.update({"architectures": ["NextStep"], "torch_dtype": "float32", "hidden_act": "silu",
                "initializer_range": 0.02, "lm_loss_weight": 0.01, "im_loss_weight": 1.0, "fm_head_batch_mul": 4})
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(raw, f, indent=1)
    write_shards(random_model_state(cfg, seed, with_lm_head), dst, shards)
    if with_vae:
        write_vae(os.path.join(dst, "vae"), seed=seed, size=size)
    return dst
