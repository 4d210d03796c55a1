"""The GPUs of this machine, and which LLM cores are given which.

The supervisor looks for GPUs once, when it starts: through ``nvidia-smi``
if it is on PATH, else through ``torch.cuda`` if torch is installed (the
``gpu`` extra; ROCm builds of torch see AMD GPUs too). Neither is needed:
without them no GPU is found and everything runs as before. What is found
only informs (``aiosctl status``, a warning for a core given a GPU that was
not found): a core's GPUs are what its ``devices`` say, whatever discovery
saw, since discovery can miss GPUs that llama.cpp would use.

A core given ``devices`` sees only those GPUs: the supervisor starts it with
``CUDA_VISIBLE_DEVICES`` and ``HIP_VISIBLE_DEVICES`` set (see core_env), as
the GPU runtime reads them once, when llama.cpp loads.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable
from typing import Any

from .config import CoreConfig

log = logging.getLogger(__name__)

#: The GPUs the supervisor found, as JSON in its children's environment:
#: it looks before it starts them, and they do not change while it runs.
ENV = "AIOS_GPUS_JSON"

#: Where GPUs are looked for, in order (the first that finds any wins).
SOURCES = ("nvidia-smi", "torch.cuda")

NVIDIA_SMI_ARGS = ["--query-gpu=index,name,memory.total,uuid", "--format=csv,noheader,nounits"]
#: nvidia-smi can hang on a wedged driver, and the daemon's start must not
#: (together under the systemd unit's WatchdogSec, 30 s).
NVIDIA_SMI_TIMEOUT = 5.0
#: importing torch and initialising CUDA takes seconds on a cold start.
TORCH_TIMEOUT = 20.0


# -- what a core's process sees ------------------------------------------------------


def core_env(core: CoreConfig) -> dict[str, str]:
    """What to add to the environment of ``core``'s process: with
    ``devices``, the GPU runtimes' visibility variables (CUDA and HIP both,
    as the build decides which one reads them), and CUDA's device order set
    to PCI bus order, so that a number means the GPU nvidia-smi and
    ``aiosctl status`` show under it (CUDA's own default order is fastest
    first). Without ``devices``: nothing, the environment stays as it is."""
    if not core.devices:
        return {}
    visible = ",".join(str(d) for d in core.devices)
    return {"CUDA_VISIBLE_DEVICES": visible, "HIP_VISIBLE_DEVICES": visible,
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


# -- discovery --------------------------------------------------------------------------


def parse_nvidia_smi(text: str) -> list[dict[str, Any]]:
    """The GPUs in the output of ``nvidia-smi`` run with NVIDIA_SMI_ARGS:
    one ``index, name, memory MiB, uuid`` line each. A line that does not
    read so (a warning nvidia-smi printed) is skipped, and a value it could
    not tell ("[N/A]" memory) is left out, rather than failing the start."""
    gpus = []
    for line in text.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 4 or not fields[0].isdigit():
            continue
        # the index first, memory and uuid last: a name may hold a comma
        name = ", ".join(fields[1:-2])
        memory, uuid = fields[-2], fields[-1]
        gpu: dict[str, Any] = {"index": int(fields[0]), "name": name,
                               "memory_mb": int(memory) if memory.isdigit() else None,
                               "source": "nvidia-smi"}
        if uuid and not uuid.startswith("["):
            gpu["uuid"] = uuid
        gpus.append(gpu)
    return gpus


def from_nvidia_smi(timeout: float = NVIDIA_SMI_TIMEOUT) -> list[dict[str, Any]]:
    """The GPUs nvidia-smi lists; none if it is missing or fails."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        log.debug("GPU discovery: nvidia-smi is not on PATH")
        return []
    try:
        done = subprocess.run([exe, *NVIDIA_SMI_ARGS], capture_output=True, text=True,
                              timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("GPU discovery: nvidia-smi failed: %s", exc)
        return []
    if done.returncode != 0:
        log.debug("GPU discovery: nvidia-smi exited %d: %s", done.returncode,
                  done.stderr.strip() or done.stdout.strip())
        return []
    return parse_nvidia_smi(done.stdout)


def torch_installed() -> bool:
    return importlib.util.find_spec("torch") is not None


def from_torch(timeout: float = TORCH_TIMEOUT) -> list[dict[str, Any]]:
    """The GPUs torch.cuda sees; none if torch is missing or fails. Asked
    in a process of its own: torch would otherwise stay in the supervisor's
    memory (hundreds of MB) for the daemon's whole life."""
    if not torch_installed():
        log.debug("GPU discovery: torch is not installed (the gpu extra)")
        return []
    # numbered in the order the cores' CUDA_VISIBLE_DEVICES reads (core_env)
    env = {**os.environ, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    try:
        done = subprocess.run([sys.executable, "-m", "aiosd.gpus", "torch"], capture_output=True,
                              text=True, timeout=timeout, check=False, env=env)
        gpus = json.loads(done.stdout) if done.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        log.debug("GPU discovery: torch.cuda failed: %s", exc)
        return []
    if not isinstance(gpus, list):
        log.debug("GPU discovery: torch.cuda failed: %s", done.stderr.strip()[-500:])
        return []
    return [g for g in gpus if isinstance(g, dict) and isinstance(g.get("index"), int)]


def torch_gpus_here() -> list[dict[str, Any]]:
    """The GPUs torch.cuda sees from this process (run by from_torch)."""
    import torch

    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        out.append({"index": i, "name": torch.cuda.get_device_name(i),
                    "memory_mb": props.total_memory // 2**20, "source": "torch.cuda"})
    return out


def discover() -> list[dict[str, Any]]:
    """This machine's GPUs, from the first source in SOURCES that finds any."""
    return from_nvidia_smi() or from_torch()


def from_env() -> list[dict[str, Any]]:
    """The GPUs the supervisor found (ENV); none for a process it did not
    start, or if the variable is not a list of GPUs."""
    try:
        found = json.loads(os.environ.get(ENV) or "[]")
    except ValueError:
        return []
    return [g for g in found if isinstance(g, dict)] if isinstance(found, list) else []


# -- what the config asks of them ---------------------------------------------------------


def not_found(cores: Iterable[CoreConfig], gpus: list[dict[str, Any]]) -> list[str]:
    """A warning for each core given GPUs that discovery did not find. Not
    an error: discovery can miss GPUs, and a config written for a machine
    with GPUs must still run on one without them."""
    found = {g["index"] for g in gpus}
    seen = ", ".join(str(i) for i in sorted(found)) or "none"
    out = []
    for core in cores:
        missing = [d for d in core.devices if d not in found]
        if missing:
            out.append(f"llm.models[{core.name}].devices: core {core.core} is given GPU(s) "
                       f"{', '.join(map(str, missing))}, which were not found (found: {seen}; "
                       f"looked through {' and '.join(SOURCES)}); it starts anyway, with "
                       f"CUDA_VISIBLE_DEVICES={','.join(map(str, core.devices))}")
    return out


def assigned(gpus: list[dict[str, Any]], cores: Iterable[CoreConfig]) -> list[dict[str, Any]]:
    """Each GPU with the cores given it (those whose ``devices`` name it)."""
    cores = list(cores)
    return [{**gpu, "cores": [c.core for c in cores if gpu.get("index") in c.devices]}
            for gpu in gpus]


def describe(found: list[dict[str, Any]]) -> str:
    """One line for the log: what discovery found."""
    if not found:
        return f"no GPU found (looked through {' and '.join(SOURCES)})"
    return "GPUs: " + "; ".join(
        f"{g['index']} {g['name']}" + (f" ({g['memory_mb']} MiB)" if g.get("memory_mb") else "")
        + f" [{g['source']}]" for g in found)


if __name__ == "__main__" and sys.argv[1:] == ["torch"]:
    print(json.dumps(torch_gpus_here()))
