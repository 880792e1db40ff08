"""Prompt layout and token ids as the reference builds them; patchify/unpatchify."""
import json
from dataclasses import replace

import pytest
import torch

from nextstep_core.weights.config import FAMILY_V1, FAMILY_V1_1
from nextstep_core.generation.prompt import build_rows, image_string, patchify, prefix_ids, tokenize_rows, unpatchify
from nextstep_core.weights.tokenizer import Tokenizer


@pytest.mark.parametrize("c,h,w,p", [(16, 8, 8, 2), (16, 4, 12, 2), (3, 6, 2, 1), (4, 9, 6, 3)])
def test_patchify_round_trip_square_and_not(c, h, w, p):
    z = torch.randn(2, c, h, w)
    t = patchify(z, p)
    assert t.shape == (2, (h // p) * (w // p), c * p * p)
    assert torch.equal(unpatchify(t, h // p, w // p, p), z)


def test_token_layout_is_raster_order_channel_major():
    z = torch.arange(2 * 4 * 4).float().reshape(1, 2, 4, 4)
    t = patchify(z, 2)
    # token 1 = grid cell (row 0, col 1); inside it: channel, then dy, then dx
    assert t[0, 1].tolist() == [2, 3, 6, 7, 18, 19, 22, 23]


def test_prefix_ids(tiny_model):
    tok, cfg = tiny_model.tokenizer, tiny_model.config
    area = tok.token_to_id("<|image_area|>")
    digit = {d: tok.token_to_id(d) for d in "0123456789*"}
    assert prefix_ids(tok, cfg, 32, 32) == [area, digit["3"], digit["2"], digit["*"], digit["3"], digit["2"], cfg.boi]
    assert prefix_ids(tok, cfg, 4, 12) == [area, digit["4"], digit["*"], digit["1"], digit["2"], cfg.boi]


def test_bos_rule_strips_the_prefix_and_prepends_for_1_1(tiny_dir):
    cfg_dict = json.load(open(tiny_dir + "/tokenizer_config.json"))
    cfg_dict["bos_token"] = "<|endoftext|>"
    tok = Tokenizer(open(tiny_dir + "/tokenizer.json").read(), cfg_dict)
    from nextstep_core.weights.loading import load_model

    cfg = load_model(tiny_dir, dtype="float32").config
    # a tokenizer that does not auto-add BOS: the reference strips <|image_area|> itself (its H2 state)
    assert prefix_ids(tok, cfg, 2, 2)[0] == tok.token_to_id("2")
    v1 = tokenize_rows(tok, replace(cfg, family="nextstep-1"), ["a cat"], 2, 2, []).input_ids[0].tolist()
    v11 = tokenize_rows(tok, replace(cfg, family="nextstep-1.1"), ["a cat"], 2, 2, []).input_ids[0].tolist()
    assert v11 == [tok.token_to_id("<|endoftext|>")] + v1


def test_rows_for_each_guidance_mode():
    rows, img = build_rows(["p1", "p2"], "pos", "neg", 2, 2, None)
    assert rows == ["p1 pos", "p1 pos", "p2 pos", "p2 pos", "neg", "neg", "neg", "neg"] and img == []
    rows, img = build_rows(["<image>edit"], "", "Copy original image.", 1, 3, [(2, 3)])
    assert rows[0] == image_string(2, 3) + "edit"
    assert rows[1] == image_string(2, 3) + "Copy original image." and rows[2] == "Copy original image."
    assert img == [0, 1]
    assert build_rows(["a"], "", "", 1, 1, None) == (["a"], [])


def test_edit_string_tokenises_to_placeholders(tiny_model):
    tok, cfg = tiny_model.tokenizer, tiny_model.config
    ids = tok.encode(image_string(2, 3) + "x")
    assert ids.count(cfg.image_placeholder_id) == 6
    assert ids[ids.index(cfg.boi) + 7] == cfg.eoi


def test_left_padding(tiny_model):
    b = tokenize_rows(tiny_model.tokenizer, tiny_model.config, ["a", "the cat on the mat"], 2, 2, [])
    assert b.real[0].sum() < b.real[1].sum() and bool(b.real[1].all())
    assert not bool(b.real[0, 0]) and bool(b.real[0, -1])
    assert b.input_ids[0, 0].item() == tiny_model.tokenizer.token_to_id("[PAD]")


def test_tokens_only_named_in_added_tokens_json_are_merged(tiny_dir, tmp_path):
    """transformers adds added_tokens.json entries on load; so does our tokenizer, at the same ids."""
    tok_json = json.load(open(tiny_dir + "/tokenizer.json"))
    last = max(tok_json["added_tokens"], key=lambda a: a["id"])
    tok_json["added_tokens"].remove(last)
    t = Tokenizer(json.dumps(tok_json), {}, {last["content"]: last["id"]})
    assert t.token_to_id(last["content"]) == last["id"]
    assert t.encode("x" + last["content"])[-1] == last["id"]
    with pytest.raises(Exception, match="disagree"):
        Tokenizer(json.dumps(tok_json), {}, {last["content"]: last["id"] + 5})
