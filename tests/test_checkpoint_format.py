"""A saved policy folder is an HF folder with MiMo-named MTP weights that loads back bit for bit."""

import json

import pytest
import torch
from safetensors.torch import load_file

from occ_exp.models.loading import CheckpointError, load_policy_folder, save_policy


def test_round_trip_bit_for_bit(tiny_policy, tmp_path):
    policy, tok = tiny_policy
    save_policy(policy, tok, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["num_nextn_predict_layers"] == policy.num_mtp_layers
    keys = load_file(str(tmp_path / "model.safetensors")).keys()
    assert any(k.startswith("model.mtp_layers.1.") for k in keys)
    loaded, tok2 = load_policy_folder(tmp_path)
    for (n1, a), (n2, b) in zip(policy.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(a, b), n1
    text = "Make 24 with 3 5 7 9.\n9-3=6 [5 6 7]\n\\boxed{(9-3)*(7-5)}"
    assert tok2(text)["input_ids"] == tok(text)["input_ids"]
    assert tok2.decode(tok(text)["input_ids"]) == text


def test_wrong_size_checkpoint_is_a_clear_error(tiny_policy, tmp_path):
    from tests.conftest import compose_cfg
    from occ_exp.models.loading import build_tiny_policy

    policy, tok = tiny_policy
    save_policy(policy, tok, tmp_path)
    other, _ = build_tiny_policy(compose_cfg().model)  # the default (larger) tiny model
    with pytest.raises(CheckpointError, match="another model size.*hidden_size"):
        load_policy_folder(tmp_path, expected_config=other.config)


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_policy_folder(tmp_path)
