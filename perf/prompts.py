"""Real prompts for benchmarks: the VBench set (946 prompts) that SGLang's diffusion benchmark uses.

Read out of the ``vbench==0.1.5`` wheel (downloaded without its dependencies, never installed) and
cached as ``.cache/vbench_prompts.json``; hosts without a package index use that cached file.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from triton_diffusion.settings import default_cache_dir

CACHE_FILE = default_cache_dir().parent / "vbench_prompts.json"


def prompt_at(prompts: list[str], index: int) -> str:
    """The prompt of request ``index`` (its seed is ``index`` too). One definition for the served
    and the offline side of a bench, so that an offline call at an offset runs exactly the prompts
    and seeds of the served requests at that offset: a call's cost depends on its prompts' token
    count in the families whose text length varies (Z-Image, Qwen-Image)."""
    return prompts[(7 * index) % len(prompts)]


def vbench_prompts(cache_file: Path = CACHE_FILE) -> list[str]:
    if cache_file.is_file():
        return json.loads(cache_file.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, "vbench==0.1.5"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wheel = next(Path(tmp).glob("vbench-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            info = json.loads(archive.read("vbench/VBench_full_info.json"))
    prompts = [entry["prompt_en"] for entry in info]
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    cache_file.write_text(json.dumps(prompts))
    return prompts


if __name__ == "__main__":
    prompts = vbench_prompts()
    print(f"{len(prompts)} prompts in {CACHE_FILE}; first: {prompts[0]!r}")
