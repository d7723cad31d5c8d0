"""Guards the repo layout: recipe folders must never become importable packages.

A top-level `tokenizers/` package would shadow Hugging Face's `tokenizers` (which
transformers imports), and a wheel shipping it would overwrite theirs.
"""

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STDLIB_AND_DEPS = set(sys.stdlib_module_names) | {
    "torch", "torchvision", "transformers", "open_clip", "vector_quantize_pytorch", "webdataset",
    "accelerate", "safetensors", "tokenizers", "yaml", "tqdm", "matplotlib", "tensorboard",
    "pycocoevalcap", "PIL", "numpy", "pyarrow", "peft", "scipy",
}


def test_recipe_folders_are_not_packages():
    for d in ["tokenizers", "training", "eval", "tests"]:
        assert (ROOT / d).is_dir(), d
        assert not (ROOT / d / "__init__.py").exists(), f"{d}/__init__.py must not exist"
    for d in ["tokenizers", "training", "eval"]:
        assert (ROOT / d / "README.md").is_file(), f"{d}/README.md missing"


def test_wheel_ships_only_mmkit():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert cfg["tool"]["setuptools"]["packages"]["find"]["include"] == ["mmkit*"]
    assert cfg["project"]["scripts"]["mmkit"] == "mmkit.cli:main"


def test_no_module_named_after_a_dependency_or_stdlib():
    for path in (ROOT / "mmkit").rglob("*"):
        if path.name == "__pycache__" or path.name.startswith("__"):
            continue
        if path.is_dir() or path.suffix == ".py":
            stem = path.stem if path.suffix == ".py" else path.name
            # inside the package, names are qualified (mmkit.x.y); only top-level ones can shadow.
            if path.parent == ROOT / "mmkit":
                assert stem not in STDLIB_AND_DEPS, f"mmkit/{path.name} shadows a module name"
    for path in ROOT.iterdir():
        if path.is_dir() and (path / "__init__.py").exists():
            assert path.name == "mmkit", f"top-level package {path.name} besides mmkit"


def test_hf_tokenizers_is_the_real_one():
    out = subprocess.run([sys.executable, "-c", "import tokenizers; print(tokenizers.__file__)"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "site-packages" in out


def test_python_m_mmkit_equals_console_script():
    a = subprocess.run([sys.executable, "-m", "mmkit", "--version"], capture_output=True, text=True)
    assert a.returncode == 0 and a.stdout.startswith("mmkit ")
