"""GPU discovery and what a core is given: nvidia-smi's output read, the
environment a core starts with, the warning for a GPU that was not found,
and discovery on a machine with neither nvidia-smi nor torch."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from aiosd import config, gpus
from aiosd.supervisor import Supervisor

TWO_GPUS = """\
0, NVIDIA A100-SXM4-40GB, 40960, GPU-8f6e2c0a-1b2c-3d4e-5f60-718293a4b5c6
1, NVIDIA A100-SXM4-40GB, 40960, GPU-0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9
"""


def cores(*models: dict[str, Any]) -> list[config.CoreConfig]:
    return config.from_dict({"llm": {"models": list(models)}}).llm.cores


# -- nvidia-smi's output ------------------------------------------------------------------


def test_two_gpus_are_read_with_index_name_memory_and_uuid() -> None:
    found = gpus.parse_nvidia_smi(TWO_GPUS)
    assert found == [
        {"index": 0, "name": "NVIDIA A100-SXM4-40GB", "memory_mb": 40960, "source": "nvidia-smi",
         "uuid": "GPU-8f6e2c0a-1b2c-3d4e-5f60-718293a4b5c6"},
        {"index": 1, "name": "NVIDIA A100-SXM4-40GB", "memory_mb": 40960, "source": "nvidia-smi",
         "uuid": "GPU-0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9"},
    ]


def test_empty_output_is_no_gpu() -> None:
    assert gpus.parse_nvidia_smi("") == []
    assert gpus.parse_nvidia_smi("\n\n") == []


def test_lines_that_are_not_gpus_are_skipped() -> None:
    text = ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n"
            "Make sure that the latest NVIDIA driver is installed and running.\n"
            "garbage\n, , ,\nx, name, 1, GPU-1\n"
            "3, Tesla T4, 15360, GPU-abc\n")
    assert gpus.parse_nvidia_smi(text) == [
        {"index": 3, "name": "Tesla T4", "memory_mb": 15360, "source": "nvidia-smi",
         "uuid": "GPU-abc"}]


def test_values_nvidia_smi_cannot_tell_are_left_out() -> None:
    [gpu] = gpus.parse_nvidia_smi("0, Some GPU, [N/A], [N/A]\n")
    assert gpu == {"index": 0, "name": "Some GPU", "memory_mb": None, "source": "nvidia-smi"}


def test_a_name_with_a_comma_is_kept_whole() -> None:
    [gpu] = gpus.parse_nvidia_smi("2, Acme, Inc. X1, 8192, GPU-x\n")
    assert gpu["index"] == 2 and gpu["name"] == "Acme, Inc. X1" and gpu["memory_mb"] == 8192


# -- the environment a core starts with -----------------------------------------------------


def test_a_core_given_devices_sees_them_in_its_environment() -> None:
    [core] = cores({"devices": [1, 3]})
    env = gpus.core_env(core)
    assert env["CUDA_VISIBLE_DEVICES"] == env["HIP_VISIBLE_DEVICES"] == "1,3"
    # numbered as nvidia-smi numbers them, not fastest first
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"


def test_a_core_without_devices_keeps_the_environment() -> None:
    [core] = cores({})
    assert gpus.core_env(core) == {}


def test_replicas_each_see_their_share_of_the_devices() -> None:
    envs = [gpus.core_env(c) for c in cores({"replicas": 2, "devices": [0, 1, 2, 3]})]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0,1", "2,3"]


def test_the_supervisor_starts_each_core_with_its_own_environment(tmp_path: Path) -> None:
    cfg = config.from_dict({"llm": {"models": [{"name": "a", "devices": [1]}, {"name": "b"}]}})
    sup = Supervisor(cfg, tmp_path / "run", tmp_path / "data")
    by_name = {c.name: c for c in sup.children}
    assert by_name["a"].env["CUDA_VISIBLE_DEVICES"] == "1"
    assert by_name["b"].env == {} and by_name["scheduler"].env == {}
    # and the children learn what the supervisor found
    sup.gpus = gpus.parse_nvidia_smi(TWO_GPUS)
    assert json.loads(sup.child_env()[gpus.ENV]) == sup.gpus


# -- what the config asks of the GPUs found ---------------------------------------------------


def test_a_core_given_a_gpu_not_found_is_warned_of() -> None:
    found = gpus.parse_nvidia_smi(TWO_GPUS)
    msgs = gpus.not_found(cores({"name": "big", "devices": [1, 2]}, {"name": "small"}), found)
    assert len(msgs) == 1
    assert msgs[0].startswith("llm.models[big].devices: core big is given GPU(s) 2,")
    assert "found: 0, 1" in msgs[0]


def test_without_gpus_every_core_given_devices_is_warned_of() -> None:
    msgs = gpus.not_found(cores({"name": "m", "replicas": 2, "devices": [0, 1]}), [])
    assert [m.split(":")[0] for m in msgs] == ["llm.models[m].devices"] * 2
    assert "core m-0" in msgs[0] and "core m-1" in msgs[1] and "found: none" in msgs[0]


def test_gpus_found_and_given_need_no_warning() -> None:
    assert gpus.not_found(cores({"devices": [0, 1]}), gpus.parse_nvidia_smi(TWO_GPUS)) == []


def test_each_gpu_lists_the_cores_given_it() -> None:
    found = gpus.parse_nvidia_smi(TWO_GPUS)
    given = gpus.assigned(found, cores({"name": "a", "devices": [0], "share": True},
                                       {"name": "b", "devices": [0, 1], "share": True},
                                       {"name": "c"}))
    assert [g["cores"] for g in given] == [["a", "b"], ["b"]]
    assert given[0]["name"] == "NVIDIA A100-SXM4-40GB"


# -- discovery ------------------------------------------------------------------------------


def fake_nvidia_smi(bin_dir: Path, script: str) -> None:
    exe = bin_dir / "nvidia-smi"
    exe.write_text(f"#!/bin/sh\n{script}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)


def test_nothing_to_look_through_finds_no_gpu(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    monkeypatch.setattr(gpus, "torch_installed", lambda: False)
    with caplog.at_level(logging.DEBUG, logger="aiosd.gpus"):
        assert gpus.discover() == []
    assert "nvidia-smi is not on PATH" in caplog.text and "torch is not installed" in caplog.text
    assert gpus.describe([]) == "no GPU found (looked through nvidia-smi and torch.cuda)"


def test_gpus_come_from_nvidia_smi_on_the_path(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    fake_nvidia_smi(tmp_path, f"cat <<'EOF'\n{TWO_GPUS}EOF")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}/usr/bin{os.pathsep}/bin")
    monkeypatch.setattr(gpus, "torch_installed", lambda: pytest.fail("torch asked after nvidia-smi"))
    assert [g["index"] for g in gpus.discover()] == [0, 1]


@pytest.mark.parametrize("script", ["echo 'NVIDIA-SMI has failed' >&2; exit 9", "sleep 5"])
def test_a_failing_nvidia_smi_finds_none(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture, script: str) -> None:
    fake_nvidia_smi(tmp_path, script)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}/usr/bin{os.pathsep}/bin")
    with caplog.at_level(logging.DEBUG, logger="aiosd.gpus"):
        assert gpus.from_nvidia_smi(timeout=0.5) == []
    assert "nvidia-smi" in caplog.text


FAKE_TORCH = """
class _Props:
    total_memory = 24 * 2**30

class cuda:
    is_available = staticmethod(lambda: True)
    device_count = staticmethod(lambda: 1)
    get_device_name = staticmethod(lambda i: "AMD Radeon RX 7900 XTX")
    get_device_properties = staticmethod(lambda i: _Props())
"""


def test_without_nvidia_smi_gpus_come_from_torch_cuda(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    # a stand-in torch, asked in a process of its own as the real one is
    (tmp_path / "torch.py").write_text(FAKE_TORCH)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setattr(gpus, "from_nvidia_smi", list)  # finds none
    monkeypatch.setattr(gpus, "torch_installed", lambda: True)
    assert gpus.discover() == [{"index": 0, "name": "AMD Radeon RX 7900 XTX",
                                "memory_mb": 24576, "source": "torch.cuda"}]


def test_a_failing_torch_finds_none(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "torch.py").write_text("raise ImportError('libcudart.so.12: not found')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setattr(gpus, "torch_installed", lambda: True)
    assert gpus.from_torch() == []


def test_the_gpus_found_reach_the_scheduler_through_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    found = gpus.parse_nvidia_smi(TWO_GPUS)
    monkeypatch.setenv(gpus.ENV, json.dumps(found))
    assert gpus.from_env() == found
    monkeypatch.setenv(gpus.ENV, "not json")
    assert gpus.from_env() == []
    monkeypatch.delenv(gpus.ENV)
    assert gpus.from_env() == []
