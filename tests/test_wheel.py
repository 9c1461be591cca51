"""The built wheel works outside the checkout: package data (merge recipes) and the console script.

The wheel is built from a copy of the sources in tmp_path (pip builds in-tree: no build/ or egg-info
left in the checkout), installed with ``--no-deps`` into a fresh virtualenv outside the checkout whose
only view of the third-party dependencies is a ``.pth`` line naming this environment's site-packages:
such a line appends the directory to sys.path without processing the ``.pth`` files in it, so the
editable install of the checkout stays inactive and ``delta_router`` comes from the wheel alone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted(p.stem for p in (REPO / "merge_recipes").glob("*.yaml"))

# Run in the fresh environment with cwd = tmp_path: a named-recipe merge of two random adapters.
MERGE_SNIPPET = """
import json
from pathlib import Path

import torch

torch.set_num_threads(1)
import delta_router
from delta_router.merging.merger import RECIPE_DIR, Merger, available_recipes
from delta_router.testing import RandomAdapterFactory, make_tiny_base
from transformers import AutoModelForCausalLM

here = Path.cwd()  # absolute paths: a relative "base" would be taken for a Hub id
base = make_tiny_base(here / "base")
factory = RandomAdapterFactory(base)
adapters = [factory.make(here / f"adapter-{i}", seed=i, scale=0.1) for i in range(2)]
out = Merger(base, "ties", progress=False).merge(adapters, here / "merged")
model = AutoModelForCausalLM.from_pretrained(out)
print(json.dumps({
    "package": delta_router.__file__,
    "recipe_dir": str(RECIPE_DIR),
    "recipes": available_recipes(),
    "out": str(out.resolve()),
    "files": sorted(p.name for p in out.iterdir()),
    "params": sum(p.numel() for p in model.parameters()),
}))
"""


def _run(args: list, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_wheel_installs_outside_the_checkout_with_recipes_and_cli(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PIP_DISABLE_PIP_VERSION_CHECK="1")

    # Build from a copy of the sources, with this environment's setuptools and no index.
    src = tmp_path / "src"
    junk = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
    for name in ("delta_router", "merge_recipes"):
        shutil.copytree(REPO / name, src / name, ignore=junk)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    dist = tmp_path / "dist"
    pip = [sys.executable, "-m", "pip"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", dist, src], tmp_path, env)
    (wheel,) = dist.glob("delta_router-*.whl")

    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"delta_router/merge_recipes/{r}.yaml" for r in RECIPES} <= names
    assert not [n for n in names if n.startswith("merge_recipes/")]
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "delta_router").rglob("*.py")}
    assert not modules - names, "subpackages missing from the wheel: list them in pyproject.toml"

    # A fresh venv outside the checkout; the wheel's dependencies come from this environment.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path, env)
    python = venv / "bin" / "python"
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, env)
    deps = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (Path(purelib.stdout.strip()) / "_delta_router_test_deps.pth").write_text("\n".join(deps) + "\n")
    _run([*pip, "--python", python, "install", "--no-deps", "--no-index", wheel], tmp_path, env)

    cli = venv / "bin" / "delta-router"
    assert "build" in _run([cli, "--help"], tmp_path, env).stdout
    build_help = " ".join(_run([cli, "build", "--help"], tmp_path, env).stdout.split())
    assert f"merge recipe: {', '.join(RECIPES)} or a YAML path" in build_help

    result = json.loads(_run([python, "-c", MERGE_SNIPPET], tmp_path, env).stdout.strip().splitlines()[-1])
    installed = venv.resolve()
    assert Path(result["package"]).resolve().is_relative_to(installed), result["package"]
    assert Path(result["recipe_dir"]).resolve().is_relative_to(installed), result["recipe_dir"]
    assert result["recipes"] == RECIPES
    assert Path(result["out"]) == (tmp_path / "merged").resolve()
    assert "config.json" in result["files"] and "delta_router.json" in result["files"]
    assert any(f.endswith(".safetensors") for f in result["files"]) and result["params"] > 0
