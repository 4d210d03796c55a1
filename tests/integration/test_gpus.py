"""GPUs on real daemons: a core given ``devices`` starts with them in its
environment (and still serves on a CPU build of llama.cpp), status and
``aiosctl status`` show the GPUs found and each core's, and, where a GPU
and a GPU build exist, a core offloads its layers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from aiosd import gpus

from ..conftest import Daemon

pytestmark = pytest.mark.integration

#: Small KV caches: two cores of the embedded model side by side.
SMALL = {"path": "embedded", "slots": 2, "n_ctx": 512, "kv_mb": 36, "evicted_mb": 0}


def environ_of(pid: int) -> dict[str, str]:
    """A process's environment as it started (from /proc). Kernel processes
    are non-dumpable: only root (CAP_SYS_PTRACE) reads theirs."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except PermissionError:
        pytest.skip("aiosd's processes are non-dumpable: reading a core's environment "
                    "takes root")
    pairs = (item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)
    return dict(pairs)


def test_a_core_given_a_device_sees_only_it_and_one_without_keeps_the_environment(
        make_daemon) -> None:
    d: Daemon = make_daemon(config={"llm": {"models": [{**SMALL, "name": "on-gpu1", "devices": [1]},
                                                       {**SMALL, "name": "plain"}]}})
    given = d.core_pid("on-gpu1")
    plain = d.core_pid("plain")
    assert given and plain
    env = environ_of(given)
    assert env["CUDA_VISIBLE_DEVICES"] == "1" and env["HIP_VISIBLE_DEVICES"] == "1"
    # nothing is added to a core without devices: what it has is the test's own
    env = environ_of(plain)
    assert env.get("CUDA_VISIBLE_DEVICES") == os.environ.get("CUDA_VISIBLE_DEVICES")
    assert env.get("HIP_VISIBLE_DEVICES") == os.environ.get("HIP_VISIBLE_DEVICES")
    # a CPU build of llama.cpp ignores them: the core serves
    with d.client() as c:
        assert c.chat("Hi", model="on-gpu1", max_tokens=4).usage["completion_tokens"] > 0


def test_status_shows_the_gpus_found_and_each_core_s_devices(make_daemon) -> None:
    d: Daemon = make_daemon(config={"llm": {"models": [{**SMALL, "devices": [1],
                                                        "tensor_split": [1.0]}]}})
    status = d.status()
    assert isinstance(status["gpus"], list)
    [core] = status["cores"]
    assert core["devices"] == [1] and core["n_gpu_layers"] is None
    assert core["main_gpu"] == 0 and core["tensor_split"] == [1.0]
    assert core["info"]["n_gpu_layers"] == (-1 if gpu_build() else 0)
    human = d.ctl("status")
    assert human.returncode == 0, human.stderr
    if status["gpus"]:
        assert "GPUs" in human.stdout
    else:
        assert "GPUs: none found (nvidia-smi, torch.cuda)" in human.stdout
    assert "core smollm2-135m: devices 1; n_gpu_layers auto" in human.stdout
    if 1 not in {g["index"] for g in status["gpus"]}:
        # a warning, not an error: the core above started
        assert "llm.models[smollm2-135m].devices: core smollm2-135m is given GPU(s) 1" \
            in d.log_text()
    else:
        assert [g["cores"] for g in status["gpus"] if g["index"] == 1] == [["smollm2-135m"]]


def gpu_build() -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


@pytest.mark.gpu
def test_a_core_offloads_every_layer_to_a_gpu(make_daemon) -> None:
    if not gpu_build():
        pytest.skip("llama-cpp-python has no GPU offload here (a CPU build): "
                    "see `make install GPU=cuda`")
    found = gpus.discover()
    if not found:
        pytest.skip(f"no GPU found ({gpus.describe(found)})")
    d: Daemon = make_daemon(config={"llm": {"models": [{**SMALL, "n_gpu_layers": -1,
                                                        "devices": [found[0]["index"]]}]}})
    [core] = d.status()["cores"]
    assert core["n_gpu_layers"] == -1 and core["info"]["n_gpu_layers"] == -1
    with d.client() as c:
        assert c.chat("Hi", max_tokens=4).usage["completion_tokens"] > 0
