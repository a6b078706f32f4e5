"""The registry of environment switches: how a value is read, that the engine reads no switch
outside it, and that an engine reports the settings of the process its kernels run in."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import vlm_engine
from vlm_engine import Engine, envs
from vlm_engine.envs import SWITCHES, VARIABLES, Switch, Switches
from vlm_engine.testing import make_tiny_checkpoint


@pytest.mark.parametrize(
    "value, default_on, default_off",
    [(None, True, False), ("0", False, False), ("1", True, True), ("yes", True, False)],
)
def test_a_value_flips_only_its_default(value, default_on, default_off):
    environ = {} if value is None else {"X": value}
    assert Switch("x", "X", True).read(environ) is default_on
    assert Switch("x", "X", False).read(environ) is default_off


def test_switches_read_the_environment():
    values = Switches({"VLM_ENGINE_PDL": "0", "VLM_ENGINE_VISION_TRITON_ATTN": "1"})
    reported = values.by_variable()
    assert reported["VLM_ENGINE_PDL"] is False and values.pdl is False
    assert reported["VLM_ENGINE_VISION_TRITON_ATTN"] is True
    assert sum(reported.values()) == len(SWITCHES) - 1  # the others keep their defaults


def test_every_switch_the_engine_reads_is_registered():
    """No module outside the registry reads a VLM_ENGINE_* variable; every variable a module
    names is in the registry."""
    registered = VARIABLES
    root = Path(vlm_engine.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        if path.name != "envs.py":
            assert "os.environ" not in text or "VLM_ENGINE_" not in text, path
        assert set(re.findall(r"VLM_ENGINE_[A-Z_]+", text)) <= registered, path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def test_stats_report_the_switches_in_process(checkpoint, monkeypatch):
    monkeypatch.setattr(envs.values, "skinny_linear", False)
    with Engine(checkpoint, device="cpu", dtype="float32", core_process=False) as engine:
        switches = engine.stats()["switches"]
    assert switches["VLM_ENGINE_SKINNY_LINEAR"] is False and switches["VLM_ENGINE_PDL"] is True


def test_stats_report_the_core_process_switches(checkpoint, monkeypatch):
    """A core in its own process reads its environment, inherited from the frontend's."""
    monkeypatch.setenv("VLM_ENGINE_VISION_FOLD_NORMS", "0")
    with Engine(checkpoint, device="cpu", dtype="float32", core_process=True) as engine:
        switches = engine.stats()["switches"]
    assert switches["VLM_ENGINE_VISION_FOLD_NORMS"] is False
    assert envs.values.vision_fold_norms is True  # this process read its environment earlier
