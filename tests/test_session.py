"""The test session itself (tests/conftest.py): offline, one thread."""

from __future__ import annotations

import os
import time

import pytest
import torch

from mech.errors import MechError


def test_the_whole_session_is_offline():
    import huggingface_hub.constants

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        assert os.environ.get(var) == "1", var
    # huggingface_hub reads the variable once, at its import: conftest must set it before anything imports it
    assert huggingface_hub.constants.HF_HUB_OFFLINE and huggingface_hub.constants.is_offline_mode()


def test_a_hub_id_fails_at_once_instead_of_reaching_for_the_network():
    from mech.models import load_model

    t0 = time.perf_counter()
    with pytest.raises(MechError, match="could not load model mech-tests/no-such-model"):
        load_model("mech-tests/no-such-model")
    assert time.perf_counter() - t0 < 10


def test_torch_runs_on_one_thread():
    assert torch.get_num_threads() == 1 and torch.get_num_interop_threads() == 1
